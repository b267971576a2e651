"""One connection to an upstream endpoint: connects (a task per new connection, none per
request), sends one exchange at a time, and parses the answers with httptools, writing
them reframed into the agent connection's reply. Idle, it waits in its endpoint's pool.

Compiled: part of the hot path mypyc compiles (sidecar/compile.py), so its types are
exact, not hints: mypyc checks declared attribute and argument types at run time, and
narrows an attribute after an assignment in a method (read it in another method if a
call in between may change it). The tests run it compiled and interpreted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import TYPE_CHECKING, Callable, Final

import httptools

from sidecar.metrics import FailureKind, Outcome
from sidecar.proxy.http.exchange import ENDED, Exchange
from sidecar.proxy.http.heads import (
    AS_IS, FRAMING_FIELDS, NO_BODY, NOT_FORWARDED, RECHUNK, SMALL_READ, ZERO_DIGITS,
    BadMessage, HeadTooLarge, answer_known, rechunked_coding, response_fields, status_line,
    without)
from sidecar.proxy.http.pool import LAST_GOOD_MAX_BODY_BYTES, UpstreamState
from sidecar.proxy.http.replies import CHUNKED, CLOSE, FALLBACK_LAST_GOOD, KEEP_ALIVE, LAST_CHUNK
from sidecar.upstream import Endpoint

if TYPE_CHECKING:  # its module imports this one
    from sidecar.proxy.http.agent import HttpProxy

log = logging.getLogger("sidecar.proxy.http")

_OK: Final = Outcome.OK  # read per request


class UpstreamConnection(asyncio.Protocol):
    """One connection to an endpoint: serves one exchange at a time, then waits in its
    endpoint's pool. Parses responses and writes them, reframed, into the proxy's reply."""

    __slots__ = (
        # fixed
        "loop", "_time", "state", "endpoint", "parser", "feed", "max_header_bytes",
        # the connection
        "transport", "send", "proxy", "reused", "dead", "reading_paused", "_connecting",
        "_cancellable",
        "_connect_timer",
        # the response being parsed
        "got_bytes", "head_buf", "head_at", "head_part", "length", "mode",
        "informational", "eof_body", "close_agent", "keeps", "capture", "capture_bytes",
        "head_raw", "in_head", "heads", "status",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, state: UpstreamState,
                 endpoint: Endpoint):
        self.loop = loop
        self._time = loop.time  # bound once: read per request
        self.state = state
        self.endpoint = endpoint
        self.parser = httptools.HttpResponseParser(self)
        self.feed: Callable[[bytes], None] = self.parser.feed_data  # bound once (HttpProxy)
        self.max_header_bytes = state.policy.max_header_bytes

        self.transport: asyncio.Transport | None = None
        self.proxy: HttpProxy | None = None  # the exchange served; None while idle
        self.reused = False
        self.dead = False
        self.reading_paused = False
        self._connecting: asyncio.Task | None = None
        self._cancellable = True
        self._connect_timer: asyncio.TimerHandle | None = None

        self.got_bytes = False
        # The response head is read from the bytes themselves, once llhttp has accepted
        # it, instead of a Python callback per status line and header (a third of the
        # proxy's own work per request, with a typical server's six headers).
        # `head_buf[head_at:]` is where the next head begins: the read it begins in, or
        # `head_part` (a head split across reads so far) and that read. -1: the response
        # ended in this read, and nothing may follow it.
        self.head_buf = b""
        self.head_at = 0
        self.head_part = b""
        self.length = False  # the head has Content-Length
        self.mode = NO_BODY
        self.informational = False
        self.eof_body = False  # the body ends when the upstream closes
        self.close_agent = False
        self.keeps = False  # the answer keeps the connection, known from its head
        self.capture: list[bytes] | None = None  # a 2xx GET being kept for LAST_GOOD
        self.capture_bytes = 0
        self.head_raw = 0
        self.in_head = True
        self.heads = 0
        self.status = 0  # the last final answer's, when it went as it came

    # --- connecting (a task per new connection, none per request) -------------------

    def open(self) -> None:
        loop = self.loop
        ep = self.endpoint
        self._connect_timer = loop.call_later(self.state.policy.connect_timeout_s,
                                              self._connect_timed_out)
        self._connecting = loop.create_task(loop.create_connection(lambda: self, ep.host,
                                                                   ep.port))
        self._connecting.add_done_callback(self._connect_done)
        # A name is looked up first, and a connect cancelled during the lookup (the
        # agent left, the deadline passed) leaves the lookup's failure unretrieved: an
        # asyncio error in the log per bad name. Such a connect is never cancelled; it
        # runs to its end, `_connect_done` collects its outcome, and `dead` drops a
        # connection nobody wants any more.
        self._cancellable = _is_address(ep.host)

    def _connect_timed_out(self) -> None:
        self._connect_timer = None
        if self.transport is None and not self.dead:
            self.dead = True
            if self._connecting is not None and self._cancellable:
                self._connecting.cancel()
            if self.proxy is not None:
                self.proxy.upstream_failed(self, FailureKind.CONNECT_TIMEOUT)

    def _connect_done(self, task: asyncio.Task) -> None:
        self._connecting = None
        if task.cancelled():
            return  # the connect deadline: already reported
        exc = task.exception()
        if exc is None:
            return  # connection_made did the work
        if self._connect_timer is not None:
            self._connect_timer.cancel()
            self._connect_timer = None
        if not self.dead:
            self.dead = True
            if self.proxy is not None:
                kind = (FailureKind.CONNECT_TIMEOUT if isinstance(exc, TimeoutError)
                        else FailureKind.REFUSED)
                self.proxy.upstream_failed(self, kind)

    # --- the upstream's transport ----------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        self.send: Callable[[bytes], None] = transport.write  # bound once (HttpProxy)
        if self._connect_timer is not None:
            self._connect_timer.cancel()
            self._connect_timer = None
        proxy = self.proxy
        if self.dead or proxy is None:  # given up (deadline, agent gone) as it came up
            transport.abort()
            return
        transport.set_write_buffer_limits(self.state.policy.max_pending_bytes)
        proxy.connected(self)

    def data_received(self, data: bytes) -> None:
        proxy = self.proxy
        if proxy is None:  # an idle connection must stay silent; this one is not HTTP
            self.close()
            return
        self.got_bytes = True
        heads = self.heads
        was_in_head = self.in_head
        whole = False  # this read begins with a head, between messages
        if was_in_head:  # as in HttpProxy.data_received (inline there too, per read)
            part = self.head_part
            if part:
                self.head_buf = part + data
                self.head_part = b""
            else:
                whole = True
                if data == self.state.last_answer and self._repeated(proxy, data):
                    return
                self.head_buf = data
            self.head_at = 0
        try:
            self.feed(data)
        except httptools.HttpParserError as exc:
            if isinstance(exc, httptools.HttpParserCallbackError) and not isinstance(
                    exc.__context__, (HeadTooLarge, BadMessage)):
                log.error("upstream response callback failed", exc_info=exc.__context__)
            self._malformed()
            return
        if (whole and self.head_at == -1 and self.heads == heads + 1 and self.keeps
                and self.mode == AS_IS and len(data) <= SMALL_READ):
            # One whole final answer, from its head to the end of its Content-Length
            # body, and nothing after it; it went to the agent as it came (keeps: the
            # short way in on_headers_complete), so its bytes are its reply.
            state = self.state
            state.last_answer = data
            state.last_answer_status = self.status
        if self.in_head and self.head_at >= 0:
            # What a head begun in this read has so far, for the next read to complete
            # (-1: the answer ended in this read, and no head may follow it).
            self.head_part = self.head_buf[self.head_at:]
            if was_in_head and heads == self.heads and self.proxy is not None:
                self.head_raw += len(data)
                if self.head_raw > self.max_header_bytes:
                    self._malformed()
                    return
        proxy = self.proxy
        if proxy is not None and proxy.reply:  # else the answer has been written
            proxy.send_reply()

    def _repeated(self, proxy: HttpProxy, data: bytes) -> bool:
        """`data` is the upstream's last whole answer again, byte for byte, and the
        parser is between messages: the answer is taken as that one was, without
        feeding it to the parser, when the exchange would take it the same short way
        (see `on_headers_complete`). False: parse it.

        llhttp accepted exactly these bytes from this state (between messages, on a
        connection kept alive) as one answer framed by its Content-Length, and was back
        in this state after them: it would say the same again. An upstream under load
        repeats an answer byte for byte until its Date changes, once a second; llhttp
        and its callbacks are about a third of the proxy's own work per exchange, and an
        answer that differs costs one compare."""
        req = proxy.current
        state = self.state
        status = state.last_answer_status
        if req is None or req.endpoint is None or not _as_it_came(req, state, status):
            return False
        self.heads += 1
        self.head_raw = 0
        self._sent_as_it_came(req, status, AS_IS)
        self.head_buf = data
        proxy.reply.append(data)
        self.on_message_complete()
        now_serving = self.proxy
        if now_serving is not None and now_serving.reply:
            now_serving.send_reply()
        return True

    def _sent_as_it_came(self, req: Exchange, status: int, mode: int) -> None:
        """The answer's head goes to the agent as it came (`_as_it_came`), framed by
        `mode`: what the rest of the exchange needs to know of it."""
        req.failed_status = status in self.state.failure_statuses
        self.length = mode == AS_IS
        self.mode = mode
        self.capture = None
        self.eof_body = False
        self.close_agent = False
        # What llhttp would say: HTTP/1.1, no close, framed by length or chunks.
        self.keeps = True
        self.status = status

    def connection_lost(self, exc: Exception | None) -> None:
        self.dead = True
        pool = self.state.pools.get(self.endpoint)
        if pool and self in pool:
            pool.remove(self)
        proxy = self.proxy
        if proxy is None:
            return
        if self.eof_body and not self.in_head:
            # A body delimited by the close has ended.
            if self.mode == RECHUNK:
                proxy.reply.append(LAST_CHUNK)
            proxy.response_done(self, False, self.close_agent)
        else:
            proxy.upstream_failed(self, FailureKind.RESET)

    def pause_writing(self) -> None:
        # The upstream reads slower than the agent sends: stop reading the agent.
        if self.proxy is not None:
            self.proxy.upstream_full()

    def resume_writing(self) -> None:
        if self.proxy is not None:
            self.proxy.upstream_drained()

    def pause_reading(self) -> None:
        """Stop reading the upstream (the agent reads slower than it answers); a
        connection still connecting starts paused."""
        self.reading_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.reading_paused = False
        if self.transport is not None:
            self.transport.resume_reading()

    def close(self) -> None:
        self.dead = True
        if self.transport is not None:
            self.transport.close()
            return
        if self._connect_timer is not None:
            self._connect_timer.cancel()
            self._connect_timer = None
        if self._connecting is not None and self._cancellable:
            self._connecting.cancel()

    def _malformed(self) -> None:
        proxy = self.proxy
        self.close()
        if proxy is not None:
            proxy.upstream_failed(self, FailureKind.MALFORMED)

    # --- the response parser's callbacks ---------------------------------------------

    def on_message_begin(self) -> None:
        if self.head_at < 0:
            # Bytes after a complete response, in the same read: an answer to nothing
            # asked (one request at a time is sent). Never taken for the next answer.
            raise BadMessage

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.heads += 1
        proxy = self.proxy
        if proxy is None:
            raise BadMessage  # a response to nothing we sent
        buf = self.head_buf
        at = self.head_at
        last = self.state.last_head
        if at == 0 and last and buf.startswith(last):
            # The upstream's previous answer head again, byte for byte (under load, all
            # answers within one second of Date): it ends where that one ended, since
            # that one's first blank line was its end. No search.
            end = len(last)
            head = last
        else:
            # llhttp accepted the head, and it refuses bare LF: the first blank line
            # ends it. (partition: see HttpProxy.on_headers_complete)
            end = (len(buf.partition(b"\r\n\r\n")[0]) if at == 0 and len(buf) <= SMALL_READ
                   else buf.index(b"\r\n\r\n", at)) + 4
            head = buf[at:end]
        self.head_at = end  # a 1xx answer is followed by the next head at once
        if len(head) > self.max_header_bytes:
            raise HeadTooLarge
        self.head_raw = 0
        req = proxy.current
        if req is None:
            raise BadMessage  # an exchange ended early (say, at a 504) has no answer
        # Most answers are 200s from HTTP/1.1 servers: no call for the code.
        status = 200 if head.startswith(b"HTTP/1.1 200 ") else self.parser.get_status_code()
        reply = proxy.reply
        if status < 200:
            if status == 101:
                raise BadMessage  # we never ask to switch protocols
            # 100 Continue and friends: the agent may be waiting for one (not 1.0).
            self.informational = True
            if not req.http10:  # with its fields (103 Early Hints has Link)
                line_end = head.index(b"\r\n")
                reply.append(status_line(head, line_end))
                reply.append(b"\r\n")
                fields = head[line_end + 2:-2]
                if fields:
                    reply.append(without(fields, NOT_FORWARDED))
                reply.append(b"\r\n")
            return
        state = self.state
        method = req.method
        # An upstream gives the same few heads over and over, differing in digits (Date,
        # Content-Length): what its fields say is kept per head with its digits zeroed,
        # a dict lookup instead of a scan of the head. Exact: no field name or value it
        # looks at has a digit, and zeroing keeps a digit a digit (see `answer_known`).
        if head == state.last_head:
            known = state.last_known
        else:
            shape = head.translate(ZERO_DIGITS)
            found = state.framings.get(shape)
            known = found if found is not None else answer_known(head, shape, state.framings)
            state.last_head = head
            state.last_known = known
        if (isinstance(known, int) and head.startswith(b"HTTP/1.1 ")
                and _as_it_came(req, state, status)):
            # The common answer goes to the agent as it came: its only framing and
            # hop-by-hop fields are Content-Length, chunked, and Connection: keep-alive,
            # which is also the proxy's own option for this agent connection (RFC 9110
            # 7.6.1 lets a proxy replace Connection with its own). Any other answer
            # takes the long way below, which rebuilds the head.
            self._sent_as_it_came(req, status, known)
            reply.append(head)
            return
        self.keeps = False  # ask the parser at the end
        found = known if isinstance(known, list) else FRAMING_FIELDS.findall(head.lower())
        line_end = head.index(b"\r\n")
        first_line = status_line(head, line_end)
        fields, self.length, te = response_fields(head, line_end, found)
        req.failed_status = status in state.failure_statuses
        if state.last_good is not None and method == b"GET" and 200 <= status < 300:
            self.capture = [first_line, b"\r\n", fields]
            self.capture_bytes = 0
        else:
            self.capture = None
        reply.append(first_line)
        reply.append(b"\r\n")
        reply.append(fields)
        close_agent = not req.keep_alive
        self.eof_body = False
        # The proxy frames the body afresh: the codings other than chunked (and
        # identity, which means none) stay, and chunked ends the list.
        rechunked = rechunked_coding(te) if te is not None else CHUNKED
        if method == b"HEAD" or status == 204 or status == 304:
            self.mode = NO_BODY
            if te is not None and method == b"HEAD" and not req.http10:
                reply.append(rechunked)
        elif te is None and self.length:
            self.mode = AS_IS
        else:  # chunked, or delimited by the upstream's close
            # llhttp reads a body whose last coding is not chunked to the close.
            self.eof_body = te is None or not te.lower().endswith(b"chunked")
            if req.http10:  # no chunked for 1.0: the close delimits the body
                self.mode = AS_IS
                close_agent = True
            else:
                self.mode = RECHUNK
                reply.append(rechunked)
        self.close_agent = close_agent
        if close_agent:
            reply.append(CLOSE)
        elif req.http10:
            reply.append(KEEP_ALIVE)
        reply.append(b"\r\n")
        if method == b"HEAD":
            # httptools cannot be told a response has no body, so a HEAD answer with a
            # length would leave the parser waiting for it: this connection ends here.
            proxy.response_done(self, False, close_agent)

    def on_body(self, body: bytes) -> None:
        proxy = self.proxy
        if proxy is None or not body:
            return
        if self.mode == RECHUNK:
            proxy.reply.append(b"%x\r\n%b\r\n" % (len(body), body))
        else:
            proxy.reply.append(body)
        capture = self.capture
        if capture is not None:
            self.capture_bytes += len(body)
            if self.capture_bytes > LAST_GOOD_MAX_BODY_BYTES:
                self.capture = None
            else:
                capture.append(body)

    def on_message_complete(self) -> None:
        self.in_head = True
        if self.informational:
            self.informational = False
            return
        self.head_at = -1  # first: the next exchange may begin inside this callback
        proxy = self.proxy
        if proxy is None:
            return  # HEAD: done at the head
        req = proxy.current
        ep = req.endpoint if req is not None else None
        if req is None or ep is None:
            raise BadMessage  # as in on_headers_complete
        if self.mode == RECHUNK:
            proxy.reply.append(LAST_CHUNK)
        capture = self.capture
        if capture is not None:
            self.capture = None
            self._remember(req.target, capture)
        transport = proxy.transport
        state = self.state
        if (req.failed_status or self.close_agent or self.reading_paused or transport is None
                or state.held >= state.pool_size
                or proxy.queue or proxy.paused or proxy.owed is not None or proxy.eof
                or not req.complete or not (self.keeps or self.parser.should_keep_alive())):
            proxy.response_done(self, self.keeps or self.parser.should_keep_alive(),
                                 self.close_agent)
            return
        # The common ending, inline: `response_done`, `_finish`, `_end` and
        # `send_reply` for a good answer on a connection both sides keep, with nothing
        # queued behind it and no flow control engaged (each of those takes the long way).
        proxy.conn = None
        self.proxy = None
        proxy.held_conn = self
        state.held += 1
        req.phase = ENDED  # ANSWERED in exchange.ENDINGS, inline
        now = self._time()
        breaker = ep.breaker
        if not breaker.closed:
            breaker.record(True, now)
        stats = state.stats
        stats.active -= 1
        stats.done(_OK, now - req.started)
        proxy.current = None
        if proxy.wire:
            proxy.wire.clear()
            proxy.wire_bytes = 0
        reply = proxy.reply
        if reply:
            proxy.send(reply[0] if len(reply) == 1 else b"".join(reply))
            reply.clear()

    def _remember(self, target: bytes, capture: list[bytes]) -> None:
        """Keep a 2xx GET answer for LAST_GOOD, framed by length whatever its framing."""
        length = b"" if self.length else b"Content-Length: %d\r\n" % self.capture_bytes
        self.state.remember(target, b"".join(
            (*capture[:3], length, FALLBACK_LAST_GOOD, b"\r\n", *capture[3:])))


def _as_it_came(req: Exchange, state: UpstreamState, status: int) -> bool:
    """Whether this exchange lets an HTTP/1.1 answer whose only framing and hop-by-hop
    fields the agent connection shares go to the agent as it came: a keep-alive 1.1
    agent, not HEAD (its answer ends the connection), and not a good GET that LAST_GOOD
    must capture (its capture is taken on the long way)."""
    method = req.method
    return (req.keep_alive and not req.http10 and method != b"HEAD"
            and (state.last_good is None or method != b"GET" or status >= 300))


def _is_address(host: str) -> bool:
    """An IP literal (connects without a lookup), not a name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


