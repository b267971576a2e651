"""Reads that reach an ingest listener, relayed to the sidecar proxy.

An agent whose metrics upstream is `deliver: store_forward` reaches its ingest listener
for everything it sends what it takes for the hub. Pushes (POST, PUT, PATCH) are ingest's;
reads (a GET of the hub's dashboard or /health, a HEAD, any other method) still belong to
the hub, and must meet the upstream's timeouts, breaker and fallback like any other request
an agent makes. So ingest sends each read, as it came, to the proxy's listener for that
upstream (`--reads-to`), and puts the proxy's answer back in its place among the answers of
the agent's connection: a push answered after a read stays after it.

A read is rare beside the pushes (an operator's dashboard, a health check): it gets an
asyncio task and a connection to the proxy from a small pool, and its answer is read whole
(bounded) before it is relayed, so it can take its turn in the connection's answers. The
answer keeps its status, reason, fields and body; only what belongs to one connection is
redone: `Connection`, `Keep-Alive`, and the body's framing (a chunked answer is relayed as
one chunk to an HTTP/1.1 agent; a close-delimited one gets a Content-Length, so the agent's
keep-alive survives it).

Bounds, each an answer the agent can act on: the proxy cannot be reached -> 502 with the
reason; no answer in `timeout_s` -> 504 (the proxy applies the upstream's own request
timeout and answers 504 itself first: this is a safety net); an answer head over
`max_head_bytes` or a body over `max_body_bytes`, a malformed answer, a protocol switch ->
502; too many reads in flight at once -> 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING

import httptools

from sidecar.args import show

if TYPE_CHECKING:
    from sidecar.data.ingest import IngestConnection

log = logging.getLogger("agentvisor.data.reads")

# The proxy answers 504 after the upstream's own request timeout (seconds at most); a read
# still unanswered after this long is stuck somewhere, and the agent is told so.
DEFAULT_READS_TIMEOUT_S = 30.0
# A dashboard page or a health answer has a head of a few hundred bytes; this much is a
# broken or hostile answer, not worth holding.
DEFAULT_MAX_HEAD_BYTES = 64 << 10
# Answers are read whole before they take their turn; a hub page is KiBs. Beyond this the
# read is refused rather than held in memory.
DEFAULT_MAX_BODY_BYTES = 16 << 20
# Idle connections to the proxy kept for the next read: reads are rare, one or two at once.
DEFAULT_POOL_SIZE = 4
# Reads relayed at once, every agent together: each holds a connection to the proxy and a
# task; an agent flooding reads gets 503s rather than the host's descriptors.
DEFAULT_MAX_IN_FLIGHT = 64

# Fields that describe one connection, not the request: the relay frames its own.
_REQUEST_HOP_BY_HOP = frozenset((
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"content-length", b"expect"))
_BODY_FRAMING = frozenset((b"content-length", b"transfer-encoding"))
_ANSWER_CONNECTION = frozenset((b"connection", b"keep-alive", b"proxy-connection"))
# Methods a read may be sent again for, when a pooled connection turns out closed before
# the proxy saw it (RFC 9110 9.2.2).
_IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"DELETE"))


class RelayError(Exception):
    """Why a read could not be relayed (the 502's reason). `unsent`: nothing of an answer
    came back on a reused connection, so the read may be sent again on a new one."""

    def __init__(self, reason: str, *, unsent: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.unsent = unsent


class _Stop(Exception):
    """Raised in a parser callback once the exchange is settled: read no further."""


def relayed_request(method: bytes, target: bytes, fields: list[tuple[bytes, bytes]],
                    body: bytes) -> bytes:
    """A read as it came (method, target, fields in order, body) for the proxy, with the
    fields of the agent's connection left out and the body framed by its length."""
    out = [b"%s %s HTTP/1.1\r\n" % (method, target)]
    framed = bool(body)
    for name, value in fields:
        lower = name.lower()
        if lower in _REQUEST_HOP_BY_HOP:
            framed = framed or lower in _BODY_FRAMING
            continue
        out.append(b"%s: %s\r\n" % (name, value))
    if framed:
        out.append(b"Content-Length: %d\r\n" % len(body))
    out.append(b"\r\n")
    out.append(body)
    return b"".join(out)


@dataclass(slots=True)
class ReadAnswer:
    """The proxy's answer to one read, as it came (its framing aside)."""

    status: int
    reason: bytes
    fields: list[tuple[bytes, bytes]]
    body: bytes = b""
    chunked: bool = False
    interim: list[bytes] = field(default_factory=list)  # 1xx heads before it, as sent

    def render(self, *, close: bool, head_only: bool, http11: bool) -> bytes:
        """The answer for the agent: its own status line and fields, this connection's
        `Connection`, and the body framed for it (chunked stays chunked for HTTP/1.1)."""
        status = self.status
        bodiless = head_only or status in (204, 304) or status < 200
        reason = self.reason or _phrase(status)
        out = list(self.interim) if http11 else []  # no 1xx to an HTTP/1.0 agent
        out.append(b"HTTP/1.1 %d %s\r\n" % (status, reason))
        for name, value in self.fields:
            lower = name.lower()
            if lower in _ANSWER_CONNECTION or (not bodiless and lower in _BODY_FRAMING):
                continue  # a bodiless answer's length is the GET's: kept as it came
            out.append(b"%s: %s\r\n" % (name, value))
        body = b""
        if not bodiless:
            if self.chunked and http11:
                out.append(b"Transfer-Encoding: chunked\r\n")
                body = (b"%x\r\n%s\r\n" % (len(self.body), self.body) if self.body
                        else b"") + b"0\r\n\r\n"
            else:
                out.append(b"Content-Length: %d\r\n" % len(self.body))
                body = self.body
        if close:
            out.append(b"Connection: close\r\n")
        out.append(b"\r\n")
        out.append(body)
        return b"".join(out)


def _phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Status"


class ProxyConnection(asyncio.Protocol):
    """One connection to the proxy's listener: one read at a time, its answer parsed by
    httptools (Content-Length, chunked, close-delimited; HEAD and 1xx answers)."""

    def __init__(self, max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 loop: asyncio.AbstractEventLoop | None = None):
        self._loop = loop or asyncio.get_running_loop()
        self._max_head = max_head_bytes
        self._max_body = max_body_bytes
        self.transport: asyncio.Transport | None = None
        self.reusable = False  # the last answer left the connection fit for another read
        self._waiter: asyncio.Future | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._head_only = False
        self._received = False
        self._settled = False  # the answer is complete: anything after it is unasked for
        self._interim: list[bytes] = []
        self._head_bytes = 0  # every head of this read's answer, interim ones included
        self._reset_answer()

    def _reset_answer(self) -> None:
        self._status = 0
        self._reason = b""
        self._fields: list[tuple[bytes, bytes]] = []
        self._headers_done = False
        self._framed = False  # Content-Length or Transfer-Encoding: not close-delimited
        self._chunked = False
        self._body: list[bytes] = []
        self._body_bytes = 0

    def begin(self, request: bytes, head_only: bool) -> asyncio.Future:
        """Send one read; the future is its ReadAnswer, or a RelayError."""
        assert self._waiter is None or self._waiter.done(), "one read at a time"
        self._waiter = waiter = self._loop.create_future()
        self._parser = httptools.HttpResponseParser(self)
        self._head_only = head_only
        self._received = self._settled = False
        self.reusable = False
        self._interim = []
        self._head_bytes = 0
        self._reset_answer()
        if self.transport is None or self.transport.is_closing():
            waiter.set_exception(RelayError("the connection to the proxy closed",
                                            unsent=True))
        else:
            self.transport.write(request)
        return waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    @property
    def idle(self) -> bool:
        return (self.transport is not None and not self.transport.is_closing()
                and (self._waiter is None or self._waiter.done()))

    # -- the connection

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.transport = None
        self.reusable = False
        self._ended(exc)

    def eof_received(self) -> bool:
        self._ended(None)
        return False  # close: one read at a time, nothing more to send on it

    def _ended(self, exc) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if (self._headers_done and not self._framed and not self._head_only
                and self._status >= 200):
            self._settle()  # close-delimited: the end of the connection ends the body
            return
        if not self._received:
            why = "the proxy closed the connection without answering"
        else:
            why = "the proxy closed the connection in the middle of its answer"
        if exc is not None:
            why += f" ({exc})"
        self._fail(why, unsent=not self._received)

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            self.reusable = False  # bytes nobody asked for: this connection is not trusted
            self.close()
            return
        self._received = True
        try:
            self._parser.feed_data(data)  # type: ignore[union-attr]
        except httptools.HttpParserUpgrade:
            self._fail("the proxy switched protocols (101); a read is not relayed on "
                       "another protocol")
        except httptools.HttpParserError as exc:
            if not waiter.done():
                self._fail(f"malformed answer from the proxy ({exc})")
        if waiter.done() and not self.reusable:
            self.close()

    def _fail(self, reason: str, unsent: bool = False) -> None:
        self.reusable = False
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(RelayError(reason, unsent=unsent))

    def _settle(self) -> None:
        self._settled = True
        self._waiter.set_result(ReadAnswer(  # type: ignore[union-attr]
            self._status, self._reason, self._fields,
            b"".join(self._body), self._chunked, self._interim))

    # -- the parser's callbacks

    def on_message_begin(self) -> None:
        if self._settled:
            self.reusable = False  # a second answer to one read
            raise _Stop
        self._reset_answer()

    def on_status(self, reason: bytes) -> None:
        self._reason += reason
        self._count_head(len(reason))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        if self._headers_done:
            return  # a chunked answer's trailer fields: not relayed
        self._fields.append((name, value))
        lower = name.lower()
        if lower in _BODY_FRAMING:
            self._framed = True
            if lower == b"transfer-encoding" and b"chunked" in value.lower():
                self._chunked = True

    def _count_head(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > self._max_head:
            self._fail(f"the proxy's answer head is over {self._max_head} bytes")
            raise _Stop

    def on_headers_complete(self) -> None:
        self._headers_done = True
        self._status = status = self._parser.get_status_code()  # type: ignore[union-attr]
        if self._head_only and status >= 200:
            # A HEAD answer has no body whatever its Content-Length says; httptools cannot
            # be told so, so the answer ends here and the parser is not fed further. The
            # connection is not reused: a server that sends a body anyway (some do) would
            # have it read as the next read's answer.
            self._settle()
            raise _Stop

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self._max_body:
            self._fail(f"the proxy's answer body is over {self._max_body} bytes")
            raise _Stop
        self._body.append(body)

    def on_message_complete(self) -> None:
        status = self._status
        if status < 200:
            # An interim answer; the final one follows on the same connection. 100 Continue
            # was for the relay (it sends a read whole), so it is not passed on.
            if status != 100:
                self._interim.append(b"HTTP/1.1 %d %s\r\n%s\r\n" % (
                    status, self._reason or _phrase(status),
                    b"".join(b"%s: %s\r\n" % f for f in self._fields)))
            return
        self.reusable = self._parser.should_keep_alive()  # type: ignore[union-attr]
        self._settle()


class ReadRelay:
    """Relays ingest's reads to the proxy at `where`, with a small pool of connections."""

    def __init__(self, where: tuple[str, int], *, timeout_s: float = DEFAULT_READS_TIMEOUT_S,
                 max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 pool_size: int = DEFAULT_POOL_SIZE,
                 max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
                 loop: asyncio.AbstractEventLoop | None = None):
        self.where = where
        self.timeout_s = timeout_s
        self._max_head = max_head_bytes
        self._max_body = max_body_bytes
        self._pool_size = pool_size
        self._max_in_flight = max_in_flight
        self._loop = loop or asyncio.get_running_loop()
        self._idle: list[ProxyConnection] = []
        self._tasks: set[asyncio.Task] = set()
        self.name = show(where)
        self.failing: str | None = None  # why reads are failing now; None: they are not
        self.relayed = 0  # answers of the proxy relayed to agents
        self.failed = 0  # reads answered 502: the proxy unreachable or its answer unusable
        self.timeouts = 0  # reads answered 504
        self.refused = 0  # reads answered 503: too many in flight
        self.connects = 0  # connections opened to the proxy

    def relay(self, conn: IngestConnection, entry: list, request: bytes, *, method: bytes,
              head_only: bool, close: bool, http11: bool) -> None:
        """Send `request` to the proxy; its answer (or why there is none) goes into
        `entry` and `conn.release()` sends it in its turn."""
        from sidecar.data.ingest import reply

        if len(self._tasks) >= self._max_in_flight:
            self.refused += 1
            entry[0] = reply(503, f"agentvisor: {len(self._tasks)} reads are being relayed "
                                  "to the hub already; try again", extra=b"Retry-After: 1\r\n",
                             close=close, head_only=head_only)
            conn.release()
            return
        task = self._loop.create_task(self._run(conn, entry, request, method, head_only,
                                                close, http11))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, conn: IngestConnection, entry: list, request: bytes,
                   method: bytes, head_only: bool, close: bool, http11: bool) -> None:
        from sidecar.data.ingest import reply

        agent = conn.agent.agent
        try:
            async with asyncio.timeout(self.timeout_s):
                answer = await self._exchange(request, method, head_only)
        except TimeoutError:
            self.timeouts += 1
            self._failing(f"{agent}: {method.decode()} {_target(request)}: no answer from "
                          f"the proxy at {self.name} in {self.timeout_s:g} s; answered 504")
            data = reply(504, f"agentvisor: the sidecar proxy at {self.name} did not "
                              f"answer this read in {self.timeout_s:g} s",
                         close=close, head_only=head_only)
        except RelayError as exc:
            self.failed += 1
            self._failing(f"{agent}: {method.decode()} {_target(request)}: {exc.reason} "
                          f"(the proxy for reads at {self.name}); answered 502")
            data = reply(502, f"agentvisor: this read could not be relayed to the hub "
                              f"through the sidecar proxy at {self.name}: {exc.reason}",
                         close=close, head_only=head_only)
        else:
            self.relayed += 1
            if self.failing is not None:
                log.info("reads reach the proxy at %s again", self.name)
                self.failing = None
            data = answer.render(close=close, head_only=head_only, http11=http11)
        entry[0] = data
        conn.release()

    def _failing(self, what: str) -> None:
        """A read failed: a warning when reads begin failing, then one line at debug per
        read (an agent polling a health page would fill the log otherwise)."""
        if self.failing is None:
            log.warning("%s; further failures are logged at debug until a read succeeds",
                        what)
        else:
            log.debug("%s", what)
        self.failing = what

    async def _exchange(self, request: bytes, method: bytes, head_only: bool) -> ReadAnswer:
        proxy, reused = await self._connection()
        try:
            answer = await self._ask(proxy, request, head_only)
        except RelayError as exc:
            # A pooled connection the proxy had closed meanwhile (its idle timeout): the
            # read never reached it, and may go again on a fresh connection.
            if not (reused and exc.unsent and method in _IDEMPOTENT):
                raise
            proxy, _ = await self._connection(fresh=True)
            answer = await self._ask(proxy, request, head_only)
        if proxy.reusable and proxy.idle and len(self._idle) < self._pool_size:
            self._idle.append(proxy)
        else:
            proxy.close()
        return answer

    @staticmethod
    async def _ask(proxy: ProxyConnection, request: bytes, head_only: bool) -> ReadAnswer:
        waiter = proxy.begin(request, head_only)
        try:
            return await waiter
        finally:
            if not waiter.done() or waiter.cancelled() or waiter.exception() is not None:
                proxy.close()  # timed out or failed: the connection's state is unknown

    async def _connection(self, fresh: bool = False) -> tuple[ProxyConnection, bool]:
        while self._idle and not fresh:
            proxy = self._idle.pop()
            if proxy.idle:
                return proxy, True
        host, port = self.where
        try:
            _, proxy = await self._loop.create_connection(
                lambda: ProxyConnection(self._max_head, self._max_body, self._loop),
                host, port)
        except OSError as exc:
            raise RelayError(f"cannot connect to it: {exc.strerror or exc}") from None
        self.connects += 1
        return proxy, False

    def status(self) -> dict:
        return {"reads_to": self.name, "failing": self.failing, "relayed": self.relayed,
                "failed": self.failed, "timeouts": self.timeouts, "refused": self.refused,
                "in_flight": len(self._tasks), "pooled": len(self._idle),
                "connects": self.connects}

    async def close(self) -> None:
        """Drop the reads still in flight (their agents' connections are gone) and the
        pooled connections."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for proxy in self._idle:
            proxy.close()
        self._idle.clear()


def _target(request: bytes) -> str:
    """The request target of a relayed request, for a log line."""
    line = request.split(b"\r\n", 1)[0].split(b" ")
    return line[1].decode("latin-1")[:200] if len(line) > 1 else "?"
