"""Delivery to the local legacy hub: every stored push, in order, exactly as the agent
sent it.

The legacy hub agent (the users' ObservabilityHub) stays as it is: it gets the original
request (method, path, content type, body) as if the agent had sent it, plus
`X-Agentvisor-Host`, `X-Agentvisor-Agent`, `X-Agentvisor-Seq` and `X-Agentvisor-Time`
(the push's own time, unix seconds) for a hub that wants to know where and when a push
came from, or to drop a redelivery itself.

The one idea: the delivery spool is the queue, and a record leaves it only once the hub
has answered it. One record at a time, oldest first, so every agent's pushes reach the
hub in the order the agent made them. What the hub's answer means:
- 2xx: delivered; acked.
- connection refused/reset, a timeout, 5xx, 408 or 429: the hub is down or busy; the same
  record is tried again after a backoff (doubling from 50 ms, capped at 1 s, so a hub
  that comes back gets its backlog within a second), never skipped.
- any other answer (4xx, 3xx): the hub refuses *that* push (a body it cannot parse, a
  path it does not serve). Retrying would block every agent behind one poisoned record
  for ever, so it is counted, logged once per agent, acked, and delivery moves on.

A record is acked right after its answer, in its own small transaction: a crash between
the answer and the ack redelivers that one record (at least once to the legacy hub; the
X-Agentvisor-Seq header lets a hub that cares drop it), never loses it. A stop is not a
crash: `finish()` lets the record in hand get its answer and its ack first.

Sample records (`sidecar.samples`: a host's supervisor's process samples of an agent)
are not the legacy hub's: the receiver exports them itself. They pass through the queue
like any record, in order, and are acked without being sent.

While there is nothing to deliver, the hub is probed with a TCP connect every
`probe_interval_s`, so `/health` says whether it is up before the next push needs it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable, Final

import aiohttp
from yarl import URL

from sidecar import samples
from sidecar.spool import Record, Spool

log = logging.getLogger("agentvisor.hub.delivery")

# Backoff after a failed attempt: doubling from FIRST, capped at MAX. The cap is the
# longest a hub that came back waits for its backlog to start moving.
BACKOFF_FIRST_S: Final = 0.05
BACKOFF_MAX_S: Final = 1.0
# A legacy hub that has not answered one push within this long is treated as down for
# that attempt. Agents' own calls to it used a 10 s timeout; a push is small, and a
# shorter one keeps a hung hub from stalling the queue for long between retries.
DEFAULT_TIMEOUT_S: Final = 5.0
# How often an idle delivery checks that the legacy hub still accepts connections.
PROBE_INTERVAL_S: Final = 2.0
# Records read from the spool per query. Delivery is one push at a time anyway; this
# only bounds how many are held in memory.
READ_LIMIT: Final = 256
# Answers that mean "not now" rather than "not this push".
RETRY_STATUSES: Final = frozenset({408, 429})


def backoff_s(failures: int) -> float:
    """Seconds to wait before the next attempt after `failures` failed ones in a row."""
    if failures <= 0:
        return 0.0
    return min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** min(failures - 1, 30))


def classify(status: int) -> str:
    """What a legacy hub's answer means for the record: delivered, retry or refused."""
    if 200 <= status < 300:
        return "delivered"
    if status >= 500 or status in RETRY_STATUSES:
        return "retry"
    return "refused"


@dataclass(slots=True)
class AgentDelivery:
    delivered: int = 0
    refused: int = 0
    last_refusal: str = ""  # "HTTP 400 on POST /api/metrics", for /health


class Delivery:
    """Feeds the delivery spool's records to the legacy hub at `address`."""

    def __init__(self, spool: Spool, address: tuple[str, int], *,
                 timeout_s: float = DEFAULT_TIMEOUT_S,
                 probe_interval_s: float = PROBE_INTERVAL_S,
                 clock: Callable[[], float] = time.time):
        self.spool = spool
        self.address = address
        self.timeout_s = timeout_s
        self.probe_interval_s = probe_interval_s
        self.clock = clock
        self._wake = asyncio.Event()
        self._finishing = False
        self._base = f"http://{address[0]}:{address[1]}" if ":" not in address[0] \
            else f"http://[{address[0]}]:{address[1]}"
        # The legacy hub as last seen: None until the first attempt or probe.
        self.up: bool | None = None
        self.since: float | None = None
        self.last_error = ""
        self.delivered_total = 0
        self.refused_total = 0
        self.retries_total = 0
        self.samples_total = 0  # sample records passed over (exported, not delivered)
        self.agents: dict[tuple[str, str], AgentDelivery] = {}

    def wake(self) -> None:
        """New records were stored: deliver them now rather than at the next probe."""
        self._wake.set()

    def _state(self, up: bool, error: str = "") -> None:
        now = self.clock()
        if up is not self.up:
            if up:
                log.info("legacy hub %s is up", self._base)
            else:
                log.warning("legacy hub %s is down: %s; records wait in the delivery "
                            "spool", self._base, error)
            self.up = up
            self.since = now
        if not up:
            self.last_error = error

    async def run(self) -> None:
        """Deliver until cancelled, or until `finish()` and the record in hand is done."""
        connector = aiohttp.TCPConnector(limit=1, enable_cleanup_closed=True)
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                         auto_decompress=False) as session:
            while not self._finishing:
                records = self.spool.pending(limit=READ_LIMIT)
                if not records:
                    self._wake.clear()
                    await self._idle()
                    continue
                for record in records:
                    if self._finishing:
                        break
                    await self._deliver(session, record)

    async def finish(self, task: asyncio.Task, grace_s: float) -> None:
        """Stop after the record in hand (`task` runs `run()`): a push the legacy hub has
        already taken is acked before we go, so a stop (SIGTERM) does not deliver it
        twice. Only a record the hub has not answered within `grace_s` is cut off, and
        delivered again after the restart."""
        self._finishing = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), grace_s)
        except (asyncio.TimeoutError, Exception):
            pass

    async def _idle(self) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), self.probe_interval_s)
        except asyncio.TimeoutError:
            await self._probe()

    async def _probe(self) -> None:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(*self.address),
                                               self.timeout_s)
        except (OSError, asyncio.TimeoutError) as exc:
            self._state(False, _describe(exc))
            return
        writer.close()
        self._state(True)
        try:
            await writer.wait_closed()
        except OSError:
            pass

    async def _deliver(self, session: aiohttp.ClientSession, record: Record) -> None:
        """Send one record until the hub answers it; then ack it."""
        if record.content_type == samples.CONTENT_TYPE:
            self.samples_total += 1
            self.spool.ack(record.id)
            return
        url = URL(self._base + record.path, encoded=True)
        headers = {"X-Agentvisor-Host": record.host, "X-Agentvisor-Agent": record.agent,
                   "X-Agentvisor-Seq": str(record.seq),
                   "X-Agentvisor-Time": f"{record.time:.6f}"}
        skip: tuple[str, ...] = ()
        if record.content_type:
            headers["Content-Type"] = record.content_type
        else:  # as the agent sent it: without one, not aiohttp's octet-stream
            skip = ("Content-Type",)
        failures = 0
        while True:
            try:
                async with session.request(record.method, url, data=record.body,
                                           headers=headers, skip_auto_headers=skip,
                                           allow_redirects=False) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                outcome, error = "retry", _describe(exc)
            except (ValueError, TypeError, LookupError) as exc:
                # The client cannot even form this request: trying again cannot help,
                # and the queue must not stop behind it. It is counted as refused (and
                # logged once per agent, below); the traceback is for a debug log.
                log.debug("cannot send %s/%s seq %d", record.host, record.agent,
                          record.seq, exc_info=True)
                outcome, error = "refused", f"cannot send it: {exc!r}"
                break
            else:
                outcome = classify(status)
                error = f"HTTP {status} on {record.method} {record.path}"
            if outcome != "retry":
                break
            self._state(False, error)
            if self._finishing:  # not taken: it stays in the spool for the next start
                return
            failures += 1
            self.retries_total += 1
            await asyncio.sleep(backoff_s(failures))
        if not error.startswith("cannot send"):  # it answered: it is up
            self._state(True)
        counts = self.agents.get((record.host, record.agent))
        if counts is None:
            counts = self.agents[(record.host, record.agent)] = AgentDelivery()
        if outcome == "delivered":
            counts.delivered += 1
            self.delivered_total += 1
        else:
            if not counts.refused:  # once per agent: a hub refusing every push of an
                # agent would otherwise log a line per push
                log.warning(
                    "legacy hub %s refused a push of %s/%s (seq %d): %s; it is dropped and "
                    "counted, and later refusals of this agent's pushes are only counted",
                    self._base, record.host, record.agent, record.seq, error)
            counts.refused += 1
            counts.last_refusal = error
            self.refused_total += 1
        self.spool.ack(record.id)

    def status(self) -> dict:
        """The legacy hub as /health shows it."""
        return {"address": f"{self.address[0]}:{self.address[1]}",
                "state": {None: "unknown", True: "up", False: "down"}[self.up],
                "since": self.since, "last_error": self.last_error,
                "delivered_total": self.delivered_total,
                "refused_total": self.refused_total, "retries_total": self.retries_total,
                "samples_total": self.samples_total}


def _describe(exc: BaseException) -> str:
    """A delivery failure as /health and the log say it."""
    if isinstance(exc, asyncio.TimeoutError):
        return "no answer within the timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or exc.os_error}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot connect: {exc.strerror}"
    return str(exc) or type(exc).__name__
