"""The forwarder: drains a host's spool to the nearest hub that answers, batch by batch,
in spool order, and acks a batch only once a hub said it stored all of it.

The one idea: one batch in flight at a time, always the oldest records not yet acked.
That alone keeps per-agent order across failovers and partitions (a batch a hub refused
or never answered is sent again, whole, to the next hub, before anything newer), and
makes delivery at least once on the wire; the receiver drops what it already has by
(host, agent, seq), so each receiver keeps every record exactly once. A batch whose 200
was lost on the way (the hub stored it, then died or was cut off) reaches the next hub
too: the hubs between them hold it twice, never one of them.

Which hub gets the batch is `sidecar.policy.hubs.HubChoice`: this module only turns
answers into its events (200: succeeded; refused, reset, no answer within `timeout_s`,
5xx, 503 with its Retry-After: failed) and probes (`GET /health`) a failed nearer hub
beside the batches, on a connection of its own, so the preferred hub is taken back as
soon as it answers. While one batch is at the hub, the next one is read from the spool
and framed, so the spool's read and the hub's commit overlap.

The HTTP client is a small asyncio Protocol with httptools over one kept-alive
connection per hub, measured against aiohttp's ClientSession on loopback (figures in
`Forwarder`'s docstring); nothing here is per record but the spool's read and
`wire.encode`. What a hub stored is acked when the next batch has gone out, so the
spool's delete overlaps the hub's commit too.

Runs in the sidecar's data process, beside ingest, which owns the spool and calls
`wake()` after each append; single-threaded, synchronous spool calls.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httptools

from sidecar.args import show
from sidecar.hub import wire
from sidecar.policy.hubs import DEFAULT_RETRY_S, HubChoice
from sidecar.spool import Record, Spool

log = logging.getLogger("agentvisor.forwarder")

# --- defaults, each with why -------------------------------------------------------

# Two thousand records (800 KiB of the fleet's 300-byte pushes) per batch: each batch
# costs a request, a read, an ack and a commit besides its records' own work; measured
# against 1,000 (drains of 300,000 records, 3 pairs): the forwarder's CPU per record 7 %
# lower, the receiver's the same, 5 % more records/s. At 25 batches a second that is the
# 50,000 records/s target, and a hub's commit per batch stays in the tens of ms.
DEFAULT_BATCH_RECORDS = 2000
# And at most 1 MiB: one batch on a 100 Mbit/s cable is under 0.1 s, and a receiver
# never holds more than wire.MAX_BATCH_BYTES.
DEFAULT_BATCH_BYTES = 1 << 20
# A hub on the LAN answers a batch in milliseconds: one that has not in 1 s is left, so
# a hub that stops answering is left within ~1-2 s (the target is 2 s).
DEFAULT_TIMEOUT_S = 1.0
# wake() is how new records are announced; this poll only bounds what a missed wake()
# could cost.
POLL_S = 1.0
# With nothing to send, the hub in use is asked `GET /health` this often, so status says
# "partitioned" of an idle host too, and the next batch does not pay a timeout to learn.
IDLE_PROBE_S = 2.0
# A hub's answer is one line of JSON; more than this is not a receiver.
MAX_ANSWER_BYTES = 64 << 10

HEALTH_PATH = "/health"


class HubError(Exception):
    """A hub answered something that is not HTTP we can read."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    retry_after_s: float | None  # from a Retry-After in seconds; None if absent


def hub_name(host: str, port: int) -> str:
    """How status and logs name a hub: `host:port`, `[v6]:port`."""
    return show((host, port))


def _retry_after(value: bytes) -> float | None:
    # Delay-seconds only: a receiver says how long its spool is full; an HTTP-date
    # would need a wall clock agreed between hosts.
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


class _Connection(asyncio.Protocol):
    """One connection to a hub: one request at a time, its answer parsed by httptools."""

    __slots__ = ("loop", "transport", "closed", "got_bytes", "_parser", "_waiter",
                 "_status", "_retry_after", "_body", "_size")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.got_bytes = False  # any byte of an answer: a failure is then the hub's
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Answer] | None = None
        self._status = 0
        self._retry_after: float | None = None
        self._body: list[bytes] = []
        self._size = 0

    def exchange(self, head: bytes, body: bytes) -> asyncio.Future[Answer]:
        assert self.transport is not None and self._waiter is None
        waiter = self._waiter = self.loop.create_future()
        self.got_bytes = False
        self._retry_after = None
        self._body = []
        self._size = 0
        if body:
            self.transport.writelines((head, body))  # no 1 MiB concatenation
        else:
            self.transport.write(head)
        return waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # --- asyncio -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:  # bytes nobody asked for: the stream cannot be trusted
            self.close()
            return
        self.got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(HubError(f"answer is not HTTP: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        why = f": {exc}" if exc else ""
        self._fail(ConnectionResetError(f"connection closed by the hub{why}"))

    def _fail(self, exc: BaseException) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    # --- httptools callbacks -------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"retry-after":
            self._retry_after = _retry_after(value)

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > MAX_ANSWER_BYTES:
            self._fail(HubError(f"answer is over {MAX_ANSWER_BYTES} bytes"))
            self.close()
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        waiter, self._waiter = self._waiter, None
        if not self._parser.should_keep_alive():
            self.close()
        if waiter is not None and not waiter.done():
            waiter.set_result(Answer(self._status, b"".join(self._body), self._retry_after))


class HubClient:
    """HTTP/1.1 to one hub over a kept-alive connection, one request at a time."""

    __slots__ = ("host", "port", "name", "_conn", "_host_header")

    def __init__(self, host: str, port: int):
        self.host = host
        self.port = port
        self.name = hub_name(host, port)
        self._conn: _Connection | None = None
        self._host_header = self.name.encode()

    async def request(self, method: str, path: str, timeout_s: float, body: bytes = b"",
                      content_type: str = "") -> Answer:
        """One request and its whole answer within `timeout_s`, connecting if need be.
        TimeoutError, OSError (refused, reset, closed) or HubError; the connection is
        closed after any of them, so the next request starts clean."""
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (
            method.encode(), path.encode(), self._host_header)
        if content_type:
            head += b"Content-Type: %s\r\n" % content_type.encode()
        if body or method == "POST":
            head += b"Content-Length: %d\r\n" % len(body)
        head += b"\r\n"
        try:
            async with asyncio.timeout(timeout_s):
                conn = self._conn
                if conn is not None and not conn.closed:
                    try:
                        return await conn.exchange(head, body)
                    except ConnectionError:
                        if conn.got_bytes:
                            raise
                        # A kept-alive connection the hub closed while it was idle (a
                        # restart, its keep-alive timeout): once more, on a new one.
                        # Safe: the receiver drops what it already has.
                conn = self._conn = await self._connect()
                return await conn.exchange(head, body)
        except BaseException:
            self.close()
            raise

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: _Connection(loop), self.host, self.port)
        return conn

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


@dataclass(frozen=True, slots=True)
class _Batch:
    records: list[Record]
    body: bytes

    @property
    def last_id(self) -> int:
        return self.records[-1].id


def _describe(exc: BaseException) -> str:
    """A failure as an operator reads it: "connection refused", not errno 111 and the
    address the log line already names."""
    if isinstance(exc, OSError):
        if exc.errno and exc.errno > 0:  # asyncio puts the address in strerror
            return os.strerror(exc.errno).lower()
        if exc.strerror:  # a name lookup: "Name or service not known"
            return exc.strerror.lower()
    return str(exc) or type(exc).__name__


class Forwarder:
    """Drains `spool` to `hubs` (host, port), nearest first, until cancelled.

    `run()` lets the spool's own errors out (SpoolCorrupt, SpoolError): the owner of the
    spool reopens it (which recovers it) and starts a new Forwarder.

    Measured on this machine's loopback (2 cores shared with other work, so medians),
    300-byte bodies, 1,000 records a batch:
    - the HTTP client alone (an in-memory spool, a receiver that answers 200 at once,
      6 runs of 200,000 records): this Protocol + httptools client about 198,000
      records/s, aiohttp's ClientSession about 181,000. Kept: this one, also for its
      exact per-attempt timeout and the one retry of a kept-alive connection the hub
      closed while idle.
    - with the SQLite spool (read, encode, ack) and that receiver: 57,000-66,000
      records/s, the forwarder's own ceiling.
    - to the real receiver (`python -m sidecar.hub`): 25,000-35,000 records/s, bound by
      the receiver (decoding and storing a batch takes 25-40 ms of the forwarder's wait
      for its answer; reading and framing the next batch is done within that wait).
    - since both sides' work per record was cut (Records built by spool.new_record,
      checksums inline, 50 rows per INSERT, a header's JSON made once per agent and
      batch and read back without JSON once its head is known) and batches are of
      2,000: `bench/spool.py --only drain`, 300,000 records, median of 3, run twice
      alternately with the code before: 59,300 and 59,700 records/s (before: 35,900 and
      33,500); CPU per record forwarder 12.6 and 12.3 us (17.1, 17.7), receiver 14.9 and
      14.3 after its start-up (25.3, 26.6), the receiver still the bound.
    """

    def __init__(self, spool: Spool, hubs: Sequence[tuple[str, int]], *,
                 batch_records: int = DEFAULT_BATCH_RECORDS,
                 batch_bytes: int = DEFAULT_BATCH_BYTES,
                 timeout_s: float = DEFAULT_TIMEOUT_S, retry_s: float = DEFAULT_RETRY_S,
                 idle_probe_s: float = IDLE_PROBE_S,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time):
        if batch_records < 1:
            raise ValueError(f"batch_records must be >= 1, not {batch_records!r}")
        if not 1 <= batch_bytes <= wire.MAX_BATCH_BYTES:
            raise ValueError(f"batch_bytes must be from 1 to {wire.MAX_BATCH_BYTES} "
                             f"(a receiver's limit), not {batch_bytes!r}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, not {timeout_s!r}")
        self.spool = spool
        self._clients = {c.name: c for c in (HubClient(h, p) for h, p in hubs)}
        self._choice = HubChoice(list(self._clients), retry_s=retry_s)
        self.batch_records = batch_records
        self.batch_bytes = batch_bytes
        self.timeout_s = timeout_s
        self.idle_probe_s = idle_probe_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._wakeup = asyncio.Event()
        self._probes: set[asyncio.Task] = set()
        self._probing: set[str] = set()  # hubs with a probe in flight
        self._last_ok: dict[str, float] = {}  # hub: clock time it last answered well
        self._blocked: str | None = None  # a record that cannot be framed (a bug)
        self._stored_id = 0  # the last spool id a hub has stored
        self._acked_id = 0  # the last spool id acked (dropped from the spool)
        # lifetime totals
        self.sent_total = 0  # records acked after a hub stored them
        self.batches_total = 0  # batches a hub stored
        self.failed_batches_total = 0  # batch attempts refused or unanswered
        self.duplicates_total = 0  # records a hub said it already had

    def wake(self) -> None:
        """New records were appended: send now, do not wait for the poll."""
        self._wakeup.set()

    async def run(self) -> None:
        """Forward until cancelled."""
        try:
            await self._forward()
        finally:
            # What a hub has stored leaves the spool now, not at the next start (the
            # receiver would drop it as a duplicate, but not before it crossed the wire).
            try:
                self._ack()
            except Exception as exc:  # the spool closed or failed first: resent, dropped
                log.warning("records up to spool id %d were stored by a hub but are not "
                            "acked (%s): they will be sent again and dropped as duplicates",
                            self._stored_id, exc)
            for task in self._probes:
                task.cancel()
            for client in self._clients.values():
                client.close()

    # --- status --------------------------------------------------------------------

    def status(self) -> dict:
        """What `agentvisor status` shows. Times are unix seconds; `oldest_pending_s` is
        the age of the oldest record not yet acked (None: nothing pending)."""
        now = self._clock()
        wall = self._wall_clock()

        def unix(t: float | None) -> float | None:
            return None if t is None else wall - (now - t)

        stats = self.spool.stats()
        choice = self._choice.snapshot(now)
        if choice["partitioned_since"] is not None:
            state = "partitioned"
        elif self._blocked is not None:
            state = "blocked"
        elif stats.records:
            state = "forwarding"
        else:
            state = "idle"
        hubs = []
        for row in choice["hubs"]:
            row["since"] = unix(row["since"])
            row["last_ok"] = unix(self._last_ok.get(row["hub"]))
            hubs.append(row)
        oldest = stats.oldest_time
        return {
            "state": state,
            "hub": choice["hub"],
            "pending_records": stats.records,
            "pending_bytes": stats.bytes,
            "oldest_pending_s": max(0.0, wall - oldest) if stats.records and oldest else None,
            "partitioned_since": unix(choice["partitioned_since"]),
            "sent_total": self.sent_total,
            "batches_total": self.batches_total,
            "failed_batches_total": self.failed_batches_total,
            "duplicates_total": self.duplicates_total,
            "hub_switches": choice["switches"],
            "blocked": self._blocked,
            "hubs": hubs,
        }

    # --- the loop ------------------------------------------------------------------

    async def _forward(self) -> None:
        choice = self._choice
        batch: _Batch | None = None  # the oldest records no hub has stored yet
        ahead: _Batch | None = None  # the records after it, read while it was sent
        while True:
            self._wakeup.clear()  # a wake() from here on ends the next wait at once
            now = self._clock()
            self._start_probes(now)
            hub = choice.choose(now)
            if hub is None:  # partitioned: nothing to try before the earliest retry
                self._ack()
                at = choice.next_attempt_at()
                await self._wait(POLL_S if at is None else max(0.0, at - now))
                continue
            if batch is None:
                batch, ahead = ahead, None
                if batch is None:
                    batch = self._read(self._stored_id)
                if batch is None:  # nothing to send
                    self._ack()
                    self._probe_idle(hub, now)
                    at = choice.next_attempt_at()  # a nearer hub's probe
                    await self._wait(POLL_S if at is None else min(POLL_S, max(0.0, at - now)))
                    continue
            sending = asyncio.ensure_future(self._send(hub, batch))
            # While the hub decodes and commits this batch: let it go out, ack the one
            # before (stored by a hub already), read and frame the one after.
            await asyncio.sleep(0)
            self._ack()
            if ahead is None:
                ahead = self._read(batch.last_id)
            if await sending:
                self._stored_id = batch.last_id
                batch = None

    def _ack(self) -> None:
        """Drop from the spool what a hub has stored. Deferred from the 200 to the next
        send, so the spool's delete overlaps the hub's commit; reads never go back past
        `_stored_id`, so nothing is sent twice meanwhile."""
        if self._acked_id < self._stored_id:
            self.spool.ack(self._stored_id)
            self._acked_id = self._stored_id

    def _read(self, after_id: int) -> _Batch | None:
        records = self.spool.pending(limit=self.batch_records, max_bytes=self.batch_bytes,
                                     after_id=after_id)
        if not records:
            return None
        try:
            body = wire.encode(records)
        except wire.WireError as exc:
            return self._frame_apart(records, exc)
        if self._blocked is not None:
            self._blocked = None
        return _Batch(records, body)

    def _frame_apart(self, records: list[Record], exc: wire.WireError) -> _Batch | None:
        """Send what precedes a record that cannot be framed; that record itself stops
        the forwarder (dropping it would lose an answered push): a bug to report."""
        for i, record in enumerate(records):
            try:
                wire.encode([record])
            except wire.WireError as one:
                if i:
                    return _Batch(records[:i], wire.encode(records[:i]))
                reason = (f"record {record.id} ({record.agent} seq {record.seq}) cannot be "
                          f"sent: {one.reason}; it and everything after it stay in the spool")
                if reason != self._blocked:
                    log.error("forwarding stopped: %s. This is a bug in agentvisor (ingest "
                              "should have refused that push): report it with this line",
                              reason)
                self._blocked = reason
                return None
        raise exc  # every record frames alone: the batch was over the size limit

    async def _wait(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout_s)
        except TimeoutError:
            pass

    # --- one batch, one probe ------------------------------------------------------

    async def _send(self, hub: str, batch: _Batch) -> bool:
        """Post `batch` to `hub`; True once the hub stored all of it."""
        client = self._clients[hub]
        retry_after = None
        try:
            answer = await client.request("POST", wire.PATH, self.timeout_s, batch.body,
                                          wire.CONTENT_TYPE)
        except TimeoutError:
            reason = f"no answer within {self.timeout_s:g} s"
        except (OSError, HubError) as exc:
            reason = _describe(exc)
        else:
            if answer.status == 200:
                self._stored(hub, batch, answer)
                return True
            text = answer.body[:200].decode("utf-8", "replace").strip()
            reason = f"{answer.status} {text}".strip()
            retry_after = answer.retry_after_s
            if answer.status in (400, 413):
                first, last = batch.records[0], batch.records[-1]
                log.error(
                    "hub %s refused a batch of %d records (spool ids %d-%d, first %s seq "
                    "%d): %s. This is a bug in agentvisor (the forwarder framed what the "
                    "receiver will not take): the records stay in the spool and go to the "
                    "next hub; report it with this line", hub, len(batch.records),
                    first.id, last.id, first.agent, first.seq, reason)
        self.failed_batches_total += 1
        self._failed(hub, reason, retry_after)
        return False

    def _stored(self, hub: str, batch: _Batch, answer: Answer) -> None:
        n = len(batch.records)
        self.sent_total += n
        self.batches_total += 1
        try:
            counts = json.loads(answer.body)
            self.duplicates_total += int(counts.get("duplicates", 0))
            stored = int(counts.get("stored", 0)) + int(counts.get("duplicates", 0))
        except (ValueError, TypeError, AttributeError):
            stored = None
        if stored != n:
            log.warning("hub %s answered 200 to a batch of %d records with %r: taken as "
                        "stored, as the protocol says", hub, n, answer.body[:200])
        self._succeeded(hub)

    def _start_probes(self, now: float) -> None:
        for hub in self._choice.probes_due(now):
            self._launch_probe(hub, now)

    def _probe_idle(self, hub: str, now: float) -> None:
        last = self._last_ok.get(hub)
        if (last is None or now - last >= self.idle_probe_s) and hub not in self._probing:
            self._launch_probe(hub, now)

    def _launch_probe(self, hub: str, now: float) -> None:
        self._choice.probe_started(hub, now)
        self._probing.add(hub)
        task = asyncio.ensure_future(self._probe(hub))
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    async def _probe(self, hub: str) -> None:
        """GET /health of `hub` on a connection of its own (a batch may be using the
        kept-alive one)."""
        c = self._clients[hub]
        client = HubClient(c.host, c.port)
        try:
            answer = await client.request("GET", HEALTH_PATH, self.timeout_s)
        except TimeoutError:
            self._failed(hub, f"health: no answer within {self.timeout_s:g} s")
        except (OSError, HubError) as exc:
            self._failed(hub, f"health: {_describe(exc)}")
        else:
            if answer.status == 200:
                self._succeeded(hub)
            else:
                self._failed(hub, f"health: {answer.status}", answer.retry_after_s)
        finally:
            client.close()
            self._probing.discard(hub)
            self._wakeup.set()  # a hub may be usable now

    # --- policy events, logged where the hub in use changes ------------------------

    def _succeeded(self, hub: str) -> None:
        choice = self._choice
        now = self._clock()
        before, partitioned = choice.current, choice.partitioned_since
        self._last_ok[hub] = now
        choice.succeeded(hub, now)
        if partitioned is not None:
            stats = self.spool.stats()
            log.warning("partition over after %.1f s: hub %s answers; draining %d records "
                        "(%d bytes), oldest first", now - partitioned, hub, stats.records,
                        stats.bytes)
        elif choice.current != before:
            log.warning("forwarding to %s again (was %s)", choice.current, before)

    def _failed(self, hub: str, reason: str, retry_after_s: float | None = None) -> None:
        choice = self._choice
        now = self._clock()
        before = choice.current
        choice.failed(hub, now, reason, retry_after_s)
        after = choice.current
        if after == before:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("hub %s: %s", hub, reason)
            return
        if after is None:
            log.warning("partitioned: no hub answers (%s: %s); spooling until one does, "
                        "trying again every %g s", hub, reason, choice.retry_s)
        else:
            log.warning("hub %s left: %s; forwarding to %s", hub, reason, after)
