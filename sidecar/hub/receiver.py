"""The hub receiver: takes forwarded batches, keeps each (host, agent, seq) once, and
answers only when the batch is on disk.

The one idea: the high-water marks are the delivery spool's own per-(host, agent)
sequences (`Spool.high_water`), not a second table beside it. A mark is the highest seq
the spool ever stored for that agent: while its records wait for delivery they are the
mark themselves, and the transaction that acks (deletes) them writes the sequence floor
that keeps it. So the marks and the records commit together or not at all: there is no
moment, however the process dies, at which a record is stored without its mark (it would
be stored twice on a resend) or a mark raised without its record (it would be dropped as
a duplicate and lost), and a restarted receiver reads the same marks back.

A batch is admitted by `admit` (pure): a record whose seq is at or below its agent's mark
is a duplicate (resent after a lost answer, or repeated within the batch) and dropped; a
seq above mark + 1 is a *gap*, stored and counted, never refused: it means the records
between went elsewhere (the other hub, during a failover) or were lost upstream, and an
operator must be able to see that. The first record heard from an agent sets its mark
whatever its seq (a new receiver, or one that took over from the other hub, starts in
the middle of a stream).

Answers (see `sidecar.hub.wire`): 200 `{"stored", "duplicates"}` once every record of
the batch is stored or already was; 400 with the reason for a malformed batch (nothing
stored); 413 over `wire.MAX_BATCH_BYTES`; 503 with Retry-After when the delivery spool is
full. `GET /health` is JSON (hosts, agents, counts, last heard, the delivery backlog and
the legacy hub's state); `GET /metrics` is Prometheus text from a registry of its own.

Records whose content type is `sidecar.samples.CONTENT_TYPE` are a host supervisor's
rounds of its agents' process samples: their latest values are exported as
`agentvisor_agent_<name>{host, agent}`, with `agentvisor_agent_sampled_timestamp_seconds`
saying when they were taken, so every agent of every host has an exporter here, and keeps
one through a partition (the values arrive late, in order).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Final, Iterator, Sequence

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from sidecar import samples
from sidecar.args import show
from sidecar.hub import wire
from sidecar.hub.delivery import DEFAULT_TIMEOUT_S, Delivery
from sidecar.hub.peers import PATH as peers_path
from sidecar.hub.peers import SHARE_INTERVAL_S, Peers, report_body
from sidecar.spool import Record, Spool, SpoolError, SpoolFull

log = logging.getLogger("agentvisor.hub")

# Sample series (host, agent, name) kept at most: the fleet needs ~77 agents x 2 hosts x
# a dozen samples; this bound only stops a misbehaving sender from filling memory.
MAX_SAMPLED_AGENTS: Final = 10_000
# A host not heard from for this long is shown as silent (partitioned from this hub, or
# sending to the other one, or down). Hosts send their agents' samples every few seconds.
SILENT_AFTER_S: Final = 10.0
# What the delivery spool may hold on disk by default: weeks of the fleet's pushes.
DEFAULT_MAX_BYTES: Final = 512 << 20
DELIVERY_SPOOL: Final = "hub-delivery.db"

Key = tuple[str, str]  # (host, agent)


# --- admission (pure) -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Gap:
    host: str
    agent: str
    mark: int  # the last seq this receiver had
    seq: int  # the seq that arrived instead of mark + 1

    @property
    def missing(self) -> int:
        return self.seq - self.mark - 1


@dataclass(frozen=True, slots=True)
class Admission:
    new: list[Record]  # to store, in batch order
    duplicates: list[Record]
    gaps: list[Gap]
    marks: dict[Key, int]  # the raised marks of the agents in `new`


def admit(records: Sequence[Record], mark: Callable[[str, str], int]) -> Admission:
    """Split a batch against the marks (`mark(host, agent)`: the highest seq stored, 0
    for none): what is new, what is a duplicate, where seqs jump. Records of one agent
    must come in rising seq order, as a forwarder sends them; one that does not is at or
    below the running mark and is a duplicate."""
    raised: dict[Key, int] = {}
    new: list[Record] = []
    duplicates: list[Record] = []
    gaps: list[Gap] = []
    for record in records:
        key = (record.host, record.agent)
        last = raised.get(key)
        if last is None:
            last = mark(record.host, record.agent)
        if record.seq <= last:
            duplicates.append(record)
            continue
        if last and record.seq != last + 1:
            gaps.append(Gap(record.host, record.agent, last, record.seq))
        raised[key] = record.seq
        new.append(record)
    return Admission(new, duplicates, gaps, raised)


# --- what the receiver knows of the hosts it hears from ----------------------------------

@dataclass(slots=True)
class AgentView:
    last_seq: int = 0
    last_heard: float | None = None  # this receiver's clock, when a batch last had it
    last_record_time: float | None = None  # the newest stored record's own time
    received: int = 0
    stored: int = 0
    duplicates: int = 0
    gaps: int = 0
    missing: int = 0  # seqs skipped over by gaps
    held_by_peer: int = 0  # duplicates the other hub had stored (resent after a failover)


@dataclass(slots=True)
class HostView:
    agents: dict[str, AgentView] = field(default_factory=dict)
    last_heard: float | None = None


class Receiver:
    """De-duplicates batches into the delivery spool and keeps the views /health and
    /metrics show. Synchronous and single-threaded, like the spool it writes."""

    def __init__(self, spool: Spool, *, delivery: Delivery | None = None,
                 peers: Peers | None = None, silent_after_s: float = SILENT_AFTER_S,
                 clock: Callable[[], float] = time.time):
        self.spool = spool
        self.delivery = delivery
        self.peers = peers  # the other hubs: their marks, hosts and samples
        self.silent_after_s = silent_after_s
        self.clock = clock
        # Hosts and agents: every one the spool has a mark for, so that a restarted
        # receiver still lists them (not heard from yet: silent until they send again).
        self.hosts: dict[str, HostView] = {}
        for (host, agent), mark in spool.high_waters().items():
            self._agent(host, agent).last_seq = mark
        self.batches = {"stored": 0, "malformed": 0, "too_large": 0, "full": 0,
                        "abandoned": 0}
        # (host, agent) -> (when sampled on its host, latest values by sample name)
        self.sampled: dict[Key, tuple[float, dict[str, float]]] = {}
        self.samples_rejected = 0
        self._sample_complaints: set[str] = set()  # hosts whose bad samples were logged

    def _agent(self, host: str, agent: str) -> AgentView:
        view = self.hosts.get(host)
        if view is None:
            view = self.hosts[host] = HostView()
        row = view.agents.get(agent)
        if row is None:
            row = view.agents[agent] = AgentView()
        return row

    def store(self, records: Sequence[Record]) -> Admission:
        """Store the batch's new records and raise their marks in one transaction.
        SpoolFull (nothing stored, no mark raised) when the delivery spool is full."""
        own = self.spool.high_water
        mark = own
        if self.peers is not None:
            # What another hub stored is not stored again here (sidecar.hub.peers).
            peer = self.peers.mark
            mark = lambda host, agent: max(own(host, agent), peer(host, agent))  # noqa: E731
        admission = admit(records, mark)
        # Before the append raises the marks: duplicates above our own mark are held by
        # the other hub.
        elsewhere = Counter([(r.host, r.agent) for r in admission.duplicates
                             if r.seq > own(r.host, r.agent)]) if self.peers else Counter()
        if admission.new:
            try:
                self.spool.append_records(admission.new)
            except SpoolFull:
                self.batches["full"] += 1
                raise
        self.batches["stored"] += 1
        # Counted per agent, not per record: a batch is up to a thousand records of a
        # few dozen agents, and this runs on the receiving path.
        now = self.clock()
        for (host, agent), count in Counter([(r.host, r.agent) for r in records]).items():
            row = self._agent(host, agent)
            row.received += count
            row.last_heard = now
            self.hosts[host].last_heard = now
        for (host, agent), count in Counter(
                [(r.host, r.agent) for r in admission.duplicates]).items():
            self._agent(host, agent).duplicates += count
        for (host, agent), count in elsewhere.items():
            self._agent(host, agent).held_by_peer += count
        newest: dict[Key, Record] = {}
        for record in admission.new:
            newest[(record.host, record.agent)] = record
            if record.content_type == samples.CONTENT_TYPE:
                self._sample(record)
        for (host, agent), count in Counter(
                [(r.host, r.agent) for r in admission.new]).items():
            row = self._agent(host, agent)
            row.stored += count
            row.last_seq = newest[(host, agent)].seq
            row.last_record_time = newest[(host, agent)].time
        for gap in admission.gaps:
            row = self._agent(gap.host, gap.agent)
            row.gaps += 1
            row.missing += gap.missing
        if admission.gaps:
            # One line per batch: after a failover every agent of a host jumps at once.
            shown = ", ".join(f"{g.host}/{g.agent}: seq {g.seq} came after {g.mark}"
                              for g in admission.gaps[:5])
            more = len(admission.gaps) - 5
            log.warning("%s%s: %d records missing here (sent to the other hub, or lost "
                        "upstream)", shown, f" and {more} more gaps" if more > 0 else "",
                        sum(g.missing for g in admission.gaps))
        if admission.new and self.delivery is not None:
            self.delivery.wake()
        return admission

    def _sample(self, record: Record) -> None:
        """A host's round of agent samples (`sidecar.samples`): the latest values, and the
        time they were sampled, per (host, agent)."""
        parsed = samples.parse_round(record.body)
        if isinstance(parsed, str):
            self.samples_rejected += 1
            if record.host not in self._sample_complaints:
                self._sample_complaints.add(record.host)
                log.warning("%s: samples seq %d ignored: %s (later ones are only counted)",
                            record.host, record.seq, parsed)
            return
        when, agents = parsed
        for agent, metrics in agents.items():
            key = (record.host, agent)
            if key not in self.sampled and len(self.sampled) >= MAX_SAMPLED_AGENTS:
                self.samples_rejected += 1
                continue
            self.sampled[key] = (when, metrics)  # bounded per agent by samples.MAX_SAMPLES

    def health(self) -> dict:
        now = self.clock()
        hosts = self.hosts_health()
        stats = self.spool.stats()
        oldest = stats.oldest_time
        out = {"hosts": hosts, "batches": dict(self.batches),
               "delivery": {"backlog_records": stats.records, "backlog_bytes": stats.bytes,
                            "oldest_s": None if oldest is None else max(0.0, now - oldest),
                            "max_bytes": stats.max_bytes},
               "samples": {"agents": len(self.sampled), "rejected": self.samples_rejected}}
        if self.delivery is not None:
            out["legacy_hub"] = self.delivery.status()
        if self.peers is not None:
            out["peers"] = self.peers.status()
        if self.spool.recovered:
            out["spool_recovered"] = self.spool.recovered
        return out

    def hosts_health(self) -> dict[str, dict]:
        """Every host heard from, by this hub and (with peers) by the others."""
        now = self.clock()
        hosts = {}
        for name, host in sorted(self.hosts.items()):
            silent = host.last_heard is None or now - host.last_heard > self.silent_after_s
            hosts[name] = {
                "state": "silent" if silent else "live",
                # All a receiver can tell: not heard from within silent_after_s. The host
                # may be cut off, sending to the other hub, or down.
                "partitioned": silent,
                "last_heard": host.last_heard,
                "agents": {agent: self._agent_health(name, agent, row)
                           for agent, row in sorted(host.agents.items())}}
        if self.peers is not None:
            hosts = self.peers.merge_hosts(hosts, self.silent_after_s)
        return hosts

    def _agent_health(self, host: str, agent: str, row: AgentView) -> dict:
        out: dict[str, object] = {
            "last_seq": row.last_seq, "last_heard": row.last_heard,
            "last_record_time": row.last_record_time, "received": row.received,
            "stored": row.stored, "duplicates": row.duplicates, "gaps": row.gaps,
            "missing": row.missing, "held_by_peer": row.held_by_peer}
        if self.delivery is not None:
            counts = self.delivery.agents.get((host, agent))
            out["delivered"] = counts.delivered if counts else 0
            out["refused"] = counts.refused if counts else 0
            if counts and counts.last_refusal:
                out["last_refusal"] = counts.last_refusal
        return out


# --- /metrics ------------------------------------------------------------------------------

class HubCollector:
    """Prometheus families built at scrape time from the receiver's plain counters."""

    def __init__(self, receiver: Receiver):
        self.receiver = receiver

    def collect(self) -> Iterator[Metric]:
        r = self.receiver
        now = r.clock()
        per_agent = {
            "received": ("agentvisor_hub_records_received",
                         "Records received from forwarders, duplicates included"),
            "stored": ("agentvisor_hub_records_stored", "Records stored for delivery"),
            "duplicates": ("agentvisor_hub_records_duplicate",
                           "Records dropped as already stored (by host, agent, seq)"),
            "gaps": ("agentvisor_hub_gaps",
                     "Times an agent's seq jumped past the next one expected"),
            "missing": ("agentvisor_hub_records_missing",
                        "Seqs skipped by gaps: sent to the other hub or lost upstream"),
            "held_by_peer": ("agentvisor_hub_records_held_by_peer",
                             "Duplicates the other hub had stored (resent after a failover)"),
        }
        families = {attr: CounterMetricFamily(name, doc, labels=["agent", "host"])
                    for attr, (name, doc) in per_agent.items()}
        last_seq = GaugeMetricFamily("agentvisor_hub_last_seq",
                                     "The highest seq stored per agent (the high-water mark)",
                                     labels=["agent", "host"])
        heard = GaugeMetricFamily("agentvisor_hub_host_last_heard_timestamp_seconds",
                                  "When a batch last carried this host's records (to this "
                                  "hub or, as its peers report, another)", labels=["host"])
        silent = GaugeMetricFamily("agentvisor_hub_host_partitioned",
                                   f"1 when no hub heard from the host within "
                                   f"{r.silent_after_s:g} s", labels=["host"])
        for host, entry in r.hosts_health().items():
            times = [t for t in entry.get("heard_by", {host: entry["last_heard"]}).values()
                     if t is not None]
            if times:
                heard.add_metric([host], max(times))
            silent.add_metric([host], float(entry["partitioned"]))
        for host, view in r.hosts.items():
            for agent, row in view.agents.items():
                for attr, family in families.items():
                    family.add_metric([agent, host], getattr(row, attr))
                last_seq.add_metric([agent, host], row.last_seq)
        yield from families.values()
        yield last_seq
        yield heard
        yield silent
        batches = CounterMetricFamily("agentvisor_hub_batches", "Batches by outcome",
                                      labels=["outcome"])
        for outcome, count in r.batches.items():
            batches.add_metric([outcome], count)
        yield batches
        stats = r.spool.stats()
        yield GaugeMetricFamily("agentvisor_hub_delivery_backlog_records",
                                "Records stored and not yet delivered to the legacy hub",
                                value=stats.records)
        yield GaugeMetricFamily("agentvisor_hub_delivery_backlog_bytes",
                                "Bytes of the delivery backlog", value=stats.bytes)
        yield GaugeMetricFamily(
            "agentvisor_hub_delivery_oldest_seconds",
            "Age of the oldest undelivered record (0 when none)",
            value=0.0 if stats.oldest_time is None else max(0.0, now - stats.oldest_time))
        d = r.delivery
        if d is not None:
            yield GaugeMetricFamily("agentvisor_hub_legacy_up",
                                    "1 when the local legacy hub answered last",
                                    value=float(bool(d.up)))
            delivered = CounterMetricFamily("agentvisor_hub_delivered",
                                            "Pushes the legacy hub accepted (2xx)",
                                            labels=["agent", "host"])
            refused = CounterMetricFamily("agentvisor_hub_delivery_refused",
                                          "Pushes the legacy hub refused (4xx), dropped",
                                          labels=["agent", "host"])
            for (host, agent), counts in d.agents.items():
                delivered.add_metric([agent, host], counts.delivered)
                refused.add_metric([agent, host], counts.refused)
            yield delivered
            yield refused
            yield CounterMetricFamily("agentvisor_hub_delivery_retries",
                                      "Delivery attempts that failed and were retried",
                                      value=d.retries_total)
        if r.peers is not None:
            up = GaugeMetricFamily("agentvisor_hub_peer_up",
                                   "1 while the other hub's reports arrive", labels=["peer"])
            last = GaugeMetricFamily("agentvisor_hub_peer_last_heard_timestamp_seconds",
                                     "When the other hub's last report arrived",
                                     labels=["peer"])
            for name, peer in r.peers.heard.items():
                up.add_metric([name], float(r.peers.live(peer, now)))
                last.add_metric([name], peer.received_at)
            yield up
            yield last
        yield CounterMetricFamily("agentvisor_hub_samples_rejected",
                                  "Sample records or series that could not be exported",
                                  value=r.samples_rejected)
        # The newest samples of each agent, this hub's or a peer's (either hub answers for
        # the whole fleet).
        latest = dict(r.sampled)
        if r.peers is not None:
            for key, sample in r.peers.samples().items():
                if key not in latest or sample[0] > latest[key][0]:
                    latest[key] = sample
        sampled = GaugeMetricFamily(samples.PREFIX + "sampled_timestamp_seconds",
                                    "When the agent's latest samples were taken on its host "
                                    "(late after a partition: they travel in order)",
                                    labels=["agent", "host"])
        by_name: dict[str, list[tuple[Key, float]]] = {}
        for (host, agent), (when, metrics) in latest.items():
            sampled.add_metric([agent, host], when)
            for name, value in metrics.items():
                by_name.setdefault(name, []).append(((host, agent), value))
        yield sampled
        for name, values in sorted(by_name.items()):
            gauge = GaugeMetricFamily(samples.PREFIX + name,
                                      f"The latest {name} sample of each agent",
                                      labels=["agent", "host"])
            for (host, agent), value in values:
                gauge.add_metric([agent, host], value)
            yield gauge


# --- the service: spool, receiver, delivery and the HTTP listener together ----------------

class Hub:
    """The hub side on one host: `await start(sock)`, `await wait()` (returns only if
    delivery or syncing failed: the process should exit and be restarted, which reopens
    and, if need be, recovers the spool), then `await stop()`.

    `sync_interval_s` bounds what a power loss can take (records answered within it);
    0 makes every batch durable against power loss before it is answered, at the cost of
    an fsync per commit."""

    def __init__(self, state_dir: Path, deliver_to: tuple[str, int], *, name: str = "",
                 host: str = "", max_bytes: int = DEFAULT_MAX_BYTES,
                 sync_interval_s: float = 1.0, deliver_timeout_s: float | None = None,
                 silent_after_s: float = SILENT_AFTER_S,
                 peers: Sequence[tuple[str, int]] = (),
                 share_interval_s: float = SHARE_INTERVAL_S):
        self.name = name
        self.sync_interval_s = sync_interval_s
        path = state_dir / DELIVERY_SPOOL
        # `host` names this spool's own pushes; the hub only re-spools other hosts'.
        self.spool = Spool(path, host=host or name or "hub", max_bytes=max_bytes,
                           sync_interval_s=sync_interval_s)
        if self.spool.recovered:  # loud only when damaged (else a crash's unanswered append)
            log.log(logging.ERROR if self.spool.damaged else logging.INFO,
                    "delivery spool %s: %s", path, self.spool.recovered)
        self.delivery = Delivery(self.spool, deliver_to, timeout_s=(
            DEFAULT_TIMEOUT_S if deliver_timeout_s is None else deliver_timeout_s))
        self.peers = Peers(peers, name=name or host or "hub", report=self._report,
                           interval_s=share_interval_s) if peers else None
        self.receiver = Receiver(self.spool, delivery=self.delivery, peers=self.peers,
                                 silent_after_s=silent_after_s)
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task] = []

    def app(self) -> web.Application:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(HubCollector(self.receiver))

        async def records(request: web.Request) -> web.Response:
            length = request.content_length
            body = None if length is not None and length > wire.MAX_BATCH_BYTES \
                else await _body(request)  # None: over the limit, refused unread
            if body is not None and not _sender_waiting(request):
                # The forwarder gave up on this batch (its timeout closed the connection)
                # before we got to it, e.g. while this process was stopped: it has been or
                # will be sent again, maybe to the other hub. Storing it now would put it
                # at both hubs; nobody would read the answer.
                self.receiver.batches["abandoned"] += 1
                log.info("a batch whose sender had already given up was not stored")
                return _answer(503, {"error": "sender gone"})
            return self.records(request.content_type, length, body)

        async def health(_request: web.Request) -> web.Response:
            return web.json_response({"name": self.name, "time": time.time(),
                                      **self.receiver.health()})

        async def metrics(_request: web.Request) -> web.Response:
            return web.Response(body=generate_latest(registry),
                                headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def ready(_request: web.Request) -> web.Response:
            return web.Response(text="ready\n")

        async def peer(request: web.Request) -> web.Response:
            if self.peers is None:
                return _answer(404, {"error": "this hub has no peers configured (--peer)"})
            status, answer = self.peers.take(await request.read(), request.remote or "?")
            if status != 200:
                log.warning("peer report from %s refused: %s", request.remote,
                            answer["error"])
            return _answer(status, answer)

        # aiohttp refuses a larger body with 413 on its own.
        app = web.Application(client_max_size=wire.MAX_BATCH_BYTES)
        app.add_routes([web.post(wire.PATH, records), web.get("/health", health),
                        web.get("/metrics", metrics), web.get("/ready", ready),
                        web.post(peers_path, peer)])
        return app

    def records(self, content_type: str, length: int | None,
                body: bytes | None) -> web.Response:
        """One batch, answered (the HTTP handler's logic)."""
        batches = self.receiver.batches
        if body is None or (length is not None and length > wire.MAX_BATCH_BYTES):
            batches["too_large"] += 1
            return _answer(413, {"error": f"batch over {wire.MAX_BATCH_BYTES} bytes: send "
                                          "fewer records per batch"})
        if content_type != wire.CONTENT_TYPE:
            batches["malformed"] += 1
            return _answer(400, {"error": f"Content-Type must be {wire.CONTENT_TYPE}, "
                                          f"not {content_type or 'missing'}"})
        try:
            batch = wire.decode(body)
        except wire.WireError as exc:
            batches["malformed"] += 1
            log.warning("malformed batch refused: %s", exc.reason)
            return _answer(400, {"error": exc.reason})
        try:
            admission = self.receiver.store(batch)
        except SpoolFull as exc:
            log.warning("batch of %d records refused: %s", len(batch), exc.reason)
            return _answer(503, {"error": exc.reason},
                           {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))})
        except SpoolError as exc:  # the disk, not the batch: the sender keeps it, retries
            batches["full"] += 1
            log.error("batch of %d records not stored: %s", len(batch), exc)
            return _answer(503, {"error": str(exc)}, {"Retry-After": "1"})
        return _answer(200, {"stored": len(admission.new),
                             "duplicates": len(admission.duplicates)})

    def _report(self, now: float) -> bytes:
        """What this hub tells the others each interval (sidecar.hub.peers)."""
        d = self.delivery
        return report_body(self.peers.name if self.peers else self.name, now,
                           self.receiver.hosts, self.spool.high_waters(),
                           self.receiver.sampled,
                           {None: "unknown", True: "up", False: "down"}[d.up],
                           self.spool.stats().records)

    async def start(self, sock: socket.socket) -> None:
        runner = self._runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        sock.setblocking(False)
        await web.SockSite(runner, sock).start()
        self._tasks = [asyncio.create_task(self.delivery.run(), name="delivery")]
        if self.peers is not None:
            self._tasks.append(asyncio.create_task(self.peers.run(), name="peers"))
        if self.sync_interval_s > 0:
            self._tasks.append(asyncio.create_task(self._sync(), name="sync"))
        if self.spool.verifying:
            self._tasks.append(asyncio.create_task(self._verify_spool(), name="spool check"))
        stats = self.spool.stats()
        log.info("hub %s: receiving on %s, delivering to %s:%d; %d records waiting; "
                 "peers: %s", self.name or "(unnamed)", _address(sock),
                 *self.delivery.address, stats.records,
                 ", ".join(self.peers.sending) if self.peers else "none")

    async def wait(self) -> str:
        """Return why the hub cannot go on (a failed task), if it ever comes to that."""
        done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                exc = task.exception()
                return f"{task.get_name()} failed: {exc}"
        return "stopped"

    async def _verify_spool(self) -> None:
        """Read back the rows an open after a clean close trusted, a slice per turn of
        the loop (Spool.verify_some). Damage fails this task: `wait` says so, and the
        hub stops so that the next open recovers the intact records."""
        while not self.spool.verify_some():
            await asyncio.sleep(0)
        log.info("hub %s: every stored record from before the last clean stop reads back "
                 "intact", self.name or "(unnamed)")

    async def _sync(self) -> None:
        while True:
            await asyncio.sleep(self.sync_interval_s)
            self.spool.sync()  # a no-op when nothing changed since the last one

    async def stop(self) -> None:
        """Stop receiving and delivering; make what was stored durable; close."""
        if self._runner is not None:
            await self._runner.cleanup()
        # The push in hand is finished and acked, not delivered again after the restart.
        if self._tasks:
            await self.delivery.finish(self._tasks[0], self.delivery.timeout_s + 1.0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            self.spool.sync()
        finally:
            self.spool.close()


def _sender_waiting(request: web.Request) -> bool:
    """Whether the sender still waits for this request's answer: its connection is open
    and has not sent FIN or RST behind the request. Peeked on a duplicate of the socket
    (the loop's own transport may not expose recv), never consuming a byte."""
    transport = request.transport
    if transport is None or transport.is_closing():
        return False
    sock = transport.get_extra_info("socket")
    if sock is None:
        return True
    try:
        fd = os.dup(sock.fileno())
    except (OSError, ValueError):
        return True
    with socket.socket(fileno=fd) as peek:
        try:
            return peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except (BlockingIOError, InterruptedError):
            return True  # nothing behind the request: it waits
        except OSError:
            return False  # reset


async def _body(request: web.Request) -> bytes | None:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        return None


def _answer(status: int, payload: dict, headers: dict | None = None) -> web.Response:
    return web.json_response(payload, status=status, headers=headers)


def _address(sock: socket.socket) -> str:
    return show(sock.getsockname())
