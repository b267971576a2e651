"""Hubs share what they know, so that either PC can answer for both.

Every `SHARE_INTERVAL_S` each hub receiver POSTs a *report* to the other hubs' receivers
(`POST /agentvisor/v1/peer`, JSON): the hosts and agents it hears from and when, every
high-water mark of its delivery spool, and the latest samples of every agent. A receiver
keeps the last report of each peer and:
- shows the peers' hosts beside its own in `/health` (`heard_by` each hub, a host being
  partitioned only when no hub has heard from it lately) and their agents' samples on
  `/metrics`: an operator asking either hub sees the whole fleet;
- admits records against the higher of its own mark and the peers' (`Peers.mark`): after
  a failover the forwarder resends the batch it could not get an answer for, and what
  the other hub already stored is dropped here instead of reaching a second legacy hub;
  the seqs that follow are not counted as a gap, since the peer has the ones between.

Why marks from a peer are safe to drop by: a peer's mark is the highest seq it *stored*,
and a stored record is delivered by that hub in the end (its spool keeps it through
restarts). Marks only rise, so an old report is a lower bound, never wrong; it can only
let a duplicate through, never drop a record nobody has. The other half is in the
receiver: a batch whose forwarder gave up (closed the connection) before the receiver got
to it, as happens to every batch queued at a hung receiver, is not stored at all. What
neither closes: a batch caught half-way through its commit when its hub hangs, resent to
the other hub, reaches both legacy hubs (a record or two per failover).

A report is data from another machine: parsed leniently and bounded (`parse_report`),
what is malformed is left out, and a report that is not an object is refused with 400.
Clocks are not trusted across machines: a peer's times are taken relative to its own
`time` and placed on this hub's clock by when the report arrived.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Final, Mapping, Sequence

import aiohttp

from sidecar import samples
from sidecar.args import show

log = logging.getLogger("agentvisor.hub.peers")

PATH: Final = "/agentvisor/v1/peer"
# The bound is "within 2 s": a report every second, each given a second to land.
SHARE_INTERVAL_S: Final = 1.0
# A peer not heard from this long is shown silent (down, or the cable is out).
PEER_SILENT_AFTER_S: Final = 5.0
MAX_REPORT_BYTES: Final = 8 << 20
# Bounds on what one report may carry: the fleet has ~80 agents on two hosts.
MAX_HOSTS: Final = 1000
MAX_KEYS: Final = 50_000

Key = tuple[str, str]  # (host, agent)


@dataclass(frozen=True, slots=True)
class AgentSeen:
    mark: int
    last_heard: float | None  # on the receiving hub's clock
    last_record_time: float | None  # the record's own time (the sending host's clock)


@dataclass(frozen=True, slots=True)
class HostSeen:
    last_heard: float | None  # on the receiving hub's clock
    agents: dict[str, AgentSeen]


@dataclass(frozen=True, slots=True)
class Report:
    name: str
    time: float  # the peer's clock when it sent the report
    hosts: dict[str, HostSeen]
    marks: dict[Key, int]
    samples: dict[Key, tuple[float, dict[str, float]]]  # (sampled at, metrics)
    legacy_hub: str  # "up", "down", "unknown"
    backlog_records: int


def _number(value: Any) -> float | None:
    return float(value) if samples.finite(value) else None


def _text(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 200


def parse_report(data: bytes, *, received_at: float) -> Report | str:
    """A peer's report, with its times moved onto this hub's clock (`received_at` is
    when it arrived), or why it is not one. Malformed entries are left out."""
    if len(data) > MAX_REPORT_BYTES:
        return f"report of {len(data)} bytes (at most {MAX_REPORT_BYTES})"
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        return f"not JSON ({exc})"
    if not isinstance(doc, dict):
        return "not a JSON object"
    name, sent = doc.get("name"), _number(doc.get("time"))
    if not isinstance(name, str) or not _text(name) or sent is None:
        return 'needs "name" (text) and "time" (unix seconds)'

    def here(t: Any) -> float | None:  # a peer-clock time as this hub's clock reads it
        t = _number(t)
        return None if t is None else received_at - max(0.0, sent - t)

    hosts: dict[str, HostSeen] = {}
    raw_hosts = doc.get("hosts")
    for host, entry in (raw_hosts.items() if isinstance(raw_hosts, dict) else ()):
        if len(hosts) >= MAX_HOSTS or not _text(host) or not isinstance(entry, dict):
            continue
        agents: dict[str, AgentSeen] = {}
        raw_agents = entry.get("agents")
        for agent, row in (raw_agents.items() if isinstance(raw_agents, dict) else ()):
            if len(agents) >= MAX_KEYS or not _text(agent) or not isinstance(row, dict):
                continue
            mark = row.get("mark")
            agents[agent] = AgentSeen(
                mark if type(mark) is int and mark >= 0 else 0,
                here(row.get("last_heard")), _number(row.get("last_record_time")))
        hosts[host] = HostSeen(here(entry.get("last_heard")), agents)
    marks: dict[Key, int] = {}
    raw_marks = doc.get("marks")
    for item in (raw_marks[:MAX_KEYS] if isinstance(raw_marks, list) else ()):
        if (isinstance(item, list) and len(item) == 3 and _text(item[0]) and _text(item[1])
                and type(item[2]) is int and item[2] > 0):
            marks[(item[0], item[1])] = item[2]
    got: dict[Key, tuple[float, dict[str, float]]] = {}
    raw_samples = doc.get("samples")
    for item in (raw_samples[:MAX_KEYS] if isinstance(raw_samples, list) else ()):
        if not (isinstance(item, list) and len(item) == 4 and _text(item[0])
                and _text(item[1])):
            continue
        when, metrics = _number(item[2]), samples.check(item[3])
        if when is not None and not isinstance(metrics, str):
            got[(item[0], item[1])] = (when, metrics)
    legacy = doc.get("legacy_hub")
    backlog = doc.get("backlog_records")
    return Report(name, sent, hosts, marks, got,
                  legacy if legacy in ("up", "down", "unknown") else "unknown",
                  backlog if type(backlog) is int and backlog >= 0 else 0)


def report_body(name: str, now: float, hosts: Mapping[str, Any], marks: Mapping[Key, int],
                sampled: Mapping[Key, tuple[float, Mapping[str, float]]], legacy_hub: str,
                backlog_records: int) -> bytes:
    """What this hub tells its peers. `hosts` is `Receiver.hosts` (HostView by name)."""
    return json.dumps({
        "name": name, "time": now,
        "hosts": {host: {"last_heard": view.last_heard,
                         "agents": {agent: {"mark": row.last_seq,
                                            "last_heard": row.last_heard,
                                            "last_record_time": row.last_record_time}
                                    for agent, row in view.agents.items()}}
                  for host, view in hosts.items()},
        "marks": [[h, a, n] for (h, a), n in marks.items()],
        "samples": [[h, a, when, dict(metrics)] for (h, a), (when, metrics) in sampled.items()],
        "legacy_hub": legacy_hub, "backlog_records": backlog_records,
    }, separators=(",", ":")).encode()


@dataclass(slots=True)
class Heard:
    """A peer's last report and when it came (this hub's clock)."""
    address: str  # where it came from
    received_at: float
    report: Report


@dataclass(slots=True)
class Sending:
    """How this hub's reports to one peer fare."""
    sent: int = 0
    failed: int = 0
    last_ok: float | None = None
    last_error: str = ""
    said: bool = False  # the current failure was logged


class Peers:
    """The other hubs: what they last told us, and telling them what we know."""

    def __init__(self, addresses: Sequence[tuple[str, int]], *, name: str,
                 report: Callable[[float], bytes], interval_s: float = SHARE_INTERVAL_S,
                 silent_after_s: float = PEER_SILENT_AFTER_S,
                 clock: Callable[[], float] = time.time):
        self.name = name
        self.addresses = list(addresses)
        self._report = report
        self.interval_s = interval_s
        self.silent_after_s = silent_after_s
        self.clock = clock
        self.heard: dict[str, Heard] = {}
        self.sending = {show(a): Sending() for a in self.addresses}
        self.refused = 0  # reports refused (malformed, or our own name)
        self._marks: dict[Key, int] = {}  # the highest mark any peer reported

    # --- taking reports -----------------------------------------------------------------

    def take(self, body: bytes, source: str) -> tuple[int, dict]:
        """A report from a peer: (HTTP status, answer)."""
        now = self.clock()
        parsed = parse_report(body, received_at=now)
        if isinstance(parsed, str):
            self.refused += 1
            return 400, {"error": parsed}
        if parsed.name == self.name:
            self.refused += 1
            return 400, {"error": f"the report is from a hub named {parsed.name!r}, this "
                                  "hub's own name: give each hub its own (--name)"}
        if parsed.name not in self.heard:
            log.info("peer hub %s (%s) heard from", parsed.name, source)
        self.heard[parsed.name] = Heard(source, now, parsed)
        for key, mark in parsed.marks.items():
            if mark > self._marks.get(key, 0):
                self._marks[key] = mark
        return 200, {"name": self.name}

    def mark(self, host: str, agent: str) -> int:
        """The highest seq any peer said it stored for (host, agent); 0: none."""
        return self._marks.get((host, agent), 0)

    def live(self, heard: Heard, now: float) -> bool:
        return now - heard.received_at <= self.silent_after_s

    def samples(self) -> dict[Key, tuple[float, dict[str, float]]]:
        """The newest samples of each agent among the peers' reports."""
        out: dict[Key, tuple[float, dict[str, float]]] = {}
        for heard in self.heard.values():
            for key, entry in heard.report.samples.items():
                if key not in out or entry[0] > out[key][0]:
                    out[key] = entry
        return out

    # --- telling them -------------------------------------------------------------------

    async def run(self) -> None:
        """Send a report to every peer each interval, until cancelled."""
        timeout = aiohttp.ClientTimeout(total=self.interval_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                started = asyncio.get_running_loop().time()
                body = self._report(self.clock())
                await asyncio.gather(*(self._send(session, a, body) for a in self.addresses))
                spent = asyncio.get_running_loop().time() - started
                await asyncio.sleep(max(0.05, self.interval_s - spent))

    async def _send(self, session: aiohttp.ClientSession, address: tuple[str, int],
                    body: bytes) -> None:
        shown = show(address)
        state = self.sending[shown]
        try:
            async with session.post(f"http://{shown}{PATH}", data=body,
                                    headers={"Content-Type": "application/json"}) as r:
                answer = await r.read()
                if r.status != 200:
                    raise ValueError(f"HTTP {r.status}: {answer[:200].decode(errors='replace')}")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            state.failed += 1
            state.last_error = _describe(exc)
            if not state.said:
                log.warning("peer hub %s: report not taken: %s (retried every %g s; "
                            "said once until it works again)", shown, state.last_error,
                            self.interval_s)
                state.said = True
            return
        if state.said:
            log.info("peer hub %s takes reports again", shown)
        state.sent += 1
        state.last_ok = self.clock()
        state.said = False

    # --- what /health shows ---------------------------------------------------------------

    def status(self) -> dict:
        now = self.clock()
        return {
            "heard": {name: {"address": h.address, "state": "live" if self.live(h, now)
                             else "silent", "last_heard": h.received_at,
                             "hosts": sorted(h.report.hosts), "legacy_hub": h.report.legacy_hub,
                             "backlog_records": h.report.backlog_records}
                      for name, h in sorted(self.heard.items())},
            "sending": {address: {"sent": s.sent, "failed": s.failed, "last_ok": s.last_ok,
                                  "last_error": s.last_error}
                        for address, s in self.sending.items()},
            "refused": self.refused,
        }

    def merge_hosts(self, own: dict[str, dict], silent_after_s: float) -> dict[str, dict]:
        """`Receiver.health()["hosts"]` with what the peers heard added: each host's
        `heard_by` (hub name: last heard, this hub's clock), its state live while any hub
        heard it within `silent_after_s`, and agents only a peer heard, marked `via`."""
        now = self.clock()
        out = {host: {**entry, "agents": dict(entry["agents"]),
                      "heard_by": {self.name: entry["last_heard"]}}
               for host, entry in own.items()}
        for peer, heard in sorted(self.heard.items()):
            for host, seen in heard.report.hosts.items():
                entry = out.get(host)
                if entry is None:
                    entry = out[host] = {"last_heard": None, "agents": {}, "heard_by": {}}
                entry["heard_by"][peer] = seen.last_heard
                for agent, row in seen.agents.items():
                    if agent not in entry["agents"]:
                        entry["agents"][agent] = {
                            "last_seq": row.mark, "last_heard": row.last_heard,
                            "last_record_time": row.last_record_time, "via": peer}
        for entry in out.values():
            times = [t for t in entry["heard_by"].values() if t is not None]
            live = bool(times) and now - max(times) <= silent_after_s
            entry["state"] = "live" if live else "silent"
            entry["partitioned"] = not live
        return dict(sorted(out.items()))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "no answer within the interval"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or exc.os_error}"
    return str(exc) or type(exc).__name__

