"""One agent connection: parses its requests, sends each to an upstream, relays the
answers in order, and answers bad input itself (400, 408, 431, 502, 504).

Heads are read from their bytes once llhttp has accepted them (`heads`), not a Python
callback per field; the forward proxy, and a connection after a chunked request, read
them field by field (`_FieldByField`). An exchange is plain state (`Exchange`) with a
deadline, watched by one timer per agent connection; how it ends, and whose fault that
is, is the table in `exchange`.

Compiled: part of the hot path mypyc compiles (sidecar/compile.py), so its types are
exact, not hints: mypyc checks declared attribute and argument types at run time, and
narrows an attribute after an assignment in a method (read it in another method if a
call in between may change it). The tests run it compiled and interpreted.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Callable, Final

import httptools

from sidecar.config import (
    DEFAULT_AGENT_IDLE_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_MAX_PENDING_BYTES,
    DEFAULT_MAX_PENDING_REQUESTS,
    FallbackKind,
)
from sidecar.metrics import FailureKind, Outcome
from sidecar.policy.retry import IDEMPOTENT_METHODS, may_retry
from sidecar.proxy.http.exchange import (
    ADMITTED, AGENT_GONE, AGENT_MALFORMED, ANSWERED, ANSWERED_FAILING, ANSWERING,
    BAD_GATEWAY, BODY_TIMEOUT, BREAKER_OPEN, CARRY_ON, CLOSE, CUT, DEADLINE, DEADLINE_UNREAD,
    ENDED, FAILURE, FALLBACK, FRESH, GATEWAY_TIMEOUT, OTHER, REFUSAL, RELAYED, RELEASE,
    STALE_RESET, SUCCESS, UPSTREAM_BROKE, UPSTREAM_FAILED, Exchange, ending)
from sidecar.proxy.http.heads import (
    CHUNKED_BODY, CONNECTION, CONTENT_LENGTH, FRAMINGS_MAX, GET, HOST, HTTP10, HTTP11,
    KIND_BY_SPELLING, PLAIN, PLAIN_CONNECTION, SMALL_READ, TRANSFER_ENCODING, ZERO_DIGITS,
    BadMessage, HeadTooLarge, host_port, kind_of, listed, request_known, split_target,
    without)
from sidecar.proxy.http.pool import state_of
from sidecar.proxy.http.replies import (
    BAD_REQUEST, BODY_TIMED_OUT, CONNECT_OK, HEAD_TIMED_OUT, HEAD_TOO_LARGE, LAST_CHUNK,
    NO_ROUTE, NOT_A_TUNNEL, tunnel_refusal)
from sidecar.proxy.http.upstream_conn import UpstreamConnection
# A cut answer ends with RST (tcp.reset): it must fail the agent's read, not end it the
# way a complete close-delimited answer ends.
from sidecar.proxy.tcp import TcpRelay, adopt, reset
from sidecar.upstream import Endpoint, Upstream

log = logging.getLogger("sidecar.proxy.http")

# Reasons reading from the agent is paused, as bits: each is lifted on its own.
_UPSTREAM_FULL: Final = 1  # the upstream's write buffer is above its high-water mark
_BACKLOG: Final = 2  # too many requests or bytes waiting for their turn or for a connection


# uvloop's clock and timers have millisecond resolution: a timer may fire a hair before
# the deadline as loop.time() reads it. Within this slack the deadline counts as reached.
_TIMER_SLACK_S: Final = 0.002

# The longest read looked up whole among the requests seen before (UpstreamState.whole_heads):
# an agent's GET is a few hundred bytes; a longer read is rarely repeated byte for byte.
_WHOLE_HEAD_MAX: Final = 1024


class _FieldByFieldFrom(Exception):
    """A chunked request's head begins at this offset of the read: see
    `HttpProxy.on_headers_complete`."""



class _FieldByField:
    """The request parser's callbacks field by field, for the forward proxy and for a
    connection after a chunked request (see `HttpProxy.on_headers_complete`): the
    head's parts are gathered on the proxy, which takes over once the head is in."""

    __slots__ = ("proxy", "on_body", "on_message_complete")

    def __init__(self, proxy: HttpProxy):
        self.proxy = proxy
        self.on_body = proxy.on_body
        self.on_message_complete = proxy.on_message_complete

    def on_message_begin(self) -> None:
        self.proxy._head_open = True  # a head has begun: the header timeout runs

    def on_url(self, url: bytes) -> None:
        self.proxy._url += url  # usually one piece; the head's size is checked when complete

    def on_header(self, name: bytes, value: bytes) -> None:
        proxy = self.proxy
        n = proxy._head_bytes = proxy._head_bytes + len(name) + len(value) + 4
        if n > proxy._max_header_bytes:
            raise HeadTooLarge
        kind = KIND_BY_SPELLING.get(name)
        if kind is None:
            kind = kind_of(name)
        if kind == PLAIN:
            proxy._fields += (name, b": ", value, b"\r\n")
        elif kind == CONTENT_LENGTH:
            proxy._framed = True
            proxy._fields += (name, b": ", value, b"\r\n")
        elif kind == HOST:
            proxy._host = value
        elif kind == CONNECTION:
            proxy._connection = value
        elif kind == TRANSFER_ENCODING:
            proxy._chunked = b"chunked" in value.lower()
            proxy._framed = True
            proxy._fields += (name, b": ", value, b"\r\n")

    def on_headers_complete(self) -> None:
        self.proxy._fields_done()


class HttpProxy(asyncio.Protocol):
    """One agent connection: parses its requests, sends each to an upstream, relays the
    answers in order. `route(host, port)` names the upstream of a request: called with
    (None, None) once per connection by a per-upstream listener, with the target's
    host and port per request by the forward proxy."""

    __slots__ = (
        # fixed for the connection
        "_route", "_forward", "_on_unrouted", "_loop", "_time", "_parser", "_feed", "_fixed",
        "_fixed_state", "_header_timeout_s", "_idle_timeout_s",
        "_max_header_bytes", "_max_pending_bytes", "_max_pending_requests",
        # the connection
        "transport", "send", "paused", "_agent_blocked", "owed", "eof", "_timer",
        "_timer_at",
        # the request being parsed
        "_url", "_host", "_fields", "_chunked", "_framed", "_connection", "_head_bytes",
        "_head_raw", "_in_head", "_heads", "_parsing", "_lean", "_head_buf", "_head_at",
        "_head_part", "_head_open", "_head_since", "_last_read", "_last_whole",
        # exchanges, one at a time, in order
        "current", "queue", "_queued_bytes", "conn", "wire", "wire_bytes",
        "reply", "_advancing",
        # between exchanges
        "held_conn", "_last_started",
    )

    def __init__(self, route: Callable[[bytes | None, int | None], Upstream | None], *,
                 forward: bool = False, on_unrouted: Callable | None = None,
                 loop: asyncio.AbstractEventLoop | None = None):
        self._route = route
        self._forward = forward
        self._on_unrouted = on_unrouted  # (host, port) of a request no upstream takes
        self._loop = loop or asyncio.get_running_loop()
        self._time = self._loop.time  # bound once: read twice per request
        self._lean = not forward  # heads read from their bytes: see on_headers_complete
        self._parser = httptools.HttpRequestParser(self if self._lean else _FieldByField(self))
        # Bound once, like the clock: a call by name on an object compiled code does not
        # own looks the method up in its type every time.
        self._feed: Callable[[bytes], None] = self._parser.feed_data
        # A per-upstream listener knows its upstream, and so its limits, before the
        # first byte; the forward proxy learns them per request (the head's limit is
        # the default, since the head names the destination).
        fixed = self._fixed = None if forward else route(None, None)
        self._fixed_state = state_of(fixed) if fixed is not None else None
        policy = fixed.policy if fixed is not None else None
        self._max_header_bytes = policy.max_header_bytes if policy else DEFAULT_MAX_HEADER_BYTES
        self._max_pending_bytes = (policy.max_pending_bytes if policy
                                   else DEFAULT_MAX_PENDING_BYTES)
        self._max_pending_requests = (policy.max_pending_requests if policy
                                      else DEFAULT_MAX_PENDING_REQUESTS)
        self._header_timeout_s = policy.header_timeout_s if policy else DEFAULT_HEADER_TIMEOUT_S
        self._idle_timeout_s = (policy.agent_idle_timeout_s if policy
                                else DEFAULT_AGENT_IDLE_TIMEOUT_S)

        self.transport: asyncio.Transport | None = None
        self.paused = 0  # _UPSTREAM_FULL | _BACKLOG
        self._agent_blocked = False  # the agent's write buffer is full
        self.owed: bytes | None = None  # answer to send after the in-flight one, then close
        self.eof = False  # the agent half-closed: answer what it asked, then close
        # The request timeout. Arming and cancelling a uvloop timer costs ~2 us here, a
        # third of the proxy's own work per request, so one timer serves the connection:
        # armed at a deadline, it checks the request in flight when it fires and re-arms
        # for that request's deadline (a later request's) or lapses if there is none.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

        self._url = b""
        self._host: bytes | None = None
        self._fields: list[bytes] = []
        self._chunked = False
        self._framed = False  # the head announces a body (Content-Length or chunked)
        self._connection: bytes | None = None
        self._head_bytes = 0  # the head so far, as counted from the parser's callbacks
        self._head_raw = 0  # the head so far, as counted from whole reads inside it
        self._in_head = True  # between messages counts as in the next head
        self._heads = 0  # heads completed: tells whether a read ended one
        self._parsing: Exchange | None = None
        # Where heads begin (lean only): `_head_buf[_head_at:]`, the read with the part
        # of a head that earlier reads brought (`_head_part`) in front.
        self._head_buf = b""
        self._head_at = 0
        self._head_part = b""
        # The header timeout: a head has begun (field by field: on_message_begin; read
        # from its bytes: `_head_part` holds its start) since `_head_since` (0: none).
        self._head_open = False
        self._head_since = 0.0
        # This connection's last whole-head read and what it said (see whole_heads): an
        # agent polls the same request, and comparing two reads costs a fraction of
        # hashing one for the dict.
        self._last_read = b""
        self._last_whole: tuple[bytes, bytes, bytes] | None = None

        self.current: Exchange | None = None
        self.queue: deque[Exchange] = deque()
        self._queued_bytes = 0  # body bytes of queued requests
        self.conn: UpstreamConnection | None = None
        self.wire: list[bytes] = []  # bytes for the upstream, not written yet
        self.wire_bytes = 0
        self.reply: list[bytes] = []  # bytes for the agent, not written yet
        self._advancing = False

        # Connection affinity: the upstream connection of the last exchange stays with
        # this agent connection, idle, for its next request to the same endpoint, and
        # goes to the pool only when the agent leaves (or goes elsewhere). Through the
        # pool instead, every agent beyond pool_size churned one upstream connection per
        # request, and the pool's checkout and checkin cost every request.
        self.held_conn: UpstreamConnection | None = None
        # When the last request began: the connection is idle from then on once its
        # exchange ends, and is closed after `_idle_timeout_s` (see `_idle_check`).
        self._last_started = 0.0

    # --- the agent's transport -----------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        self.send: Callable[[bytes], None] = transport.write  # bound once (see _feed)
        transport.set_write_buffer_limits(self._max_pending_bytes)
        # The connection's one timer, armed now so that a client that sends nothing
        # is still bounded: first at the header timeout, which the first request's
        # deadline (the request timeout, usually no shorter) does not overtake.
        now = self._last_started = self._time()
        self._arm(now + self._header_timeout_s)

    def data_received(self, data: bytes) -> None:
        if self.owed is not None:
            return  # the connection is ending: nothing more is read as a request
        if data == self._last_read and self._in_head and not self._head_part and self._lean:
            self._repeated()
            return
        heads = self._heads
        was_in_head = self._in_head
        lean = self._lean
        if lean:  # the same bookkeeping as UpstreamConnection.data_received, kept inline
            # on both sides: a shared method would cost the interpreted fallback a call
            # per read
            part = self._head_part
            if part:
                self._head_buf = part + data
                self._head_part = b""
            else:
                self._head_buf = data
            self._head_at = 0
        replay = False
        rest = b""
        try:
            self._feed(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgraded(data[exc.args[0]:])
            return
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if not isinstance(cause, _FieldByFieldFrom):
                self._callback_failed(cause)
                return
            # A chunked request: from its head on, field by field for good.
            rest = self._head_buf[cause.args[0]:]
            self._lean = False
            self._in_head = True
            self._heads -= 1
            self._parser = httptools.HttpRequestParser(_FieldByField(self))
            self._feed = self._parser.feed_data
            replay = True
        except httptools.HttpParserError:
            self._refuse(BAD_REQUEST)
            return
        if replay:
            # Outside the handler: httptools takes the exception being handled as the
            # cause of a callback's failure, so inside it the replay's own refusal
            # (a BadMessage) would be lost and logged as our bug.
            self.data_received(rest)
            return
        if lean and self._in_head:
            at = self._head_at
            if at < len(self._head_buf):  # a head begun in this read, for the next
                self._head_part = self._head_buf[at:]
                if self._head_since == 0.0:
                    self._head_begun()
        elif self._head_open and self._head_since == 0.0:
            self._head_begun()
        # httptools only reports a header line once it is complete, so a read that
        # neither starts nor ends a head (a long line, sent slowly) is counted whole.
        if was_in_head and self._in_head and heads == self._heads:
            self._head_raw += len(data)
            if self._head_raw > self._max_header_bytes:
                self._refuse(HEAD_TOO_LARGE)
                return
        if self.wire:
            self._flush_wire()

    def _repeated(self) -> None:
        """This read is the connection's last request again, byte for byte, and the
        parser is between messages: not fed to it.

        `_last_read` is only ever the last head llhttp parsed on this connection, and
        only when that head was a whole keep-alive HTTP/1.1 request without a body that
        ended where its read ended (see `on_headers_complete`): llhttp accepted exactly
        these bytes from exactly this state, and was back in it after them. It would
        say the same again, so what it said then is taken as it stands. An agent polls
        with the same bytes every time; llhttp and its callbacks are about a third of
        the proxy's own work per request, and a read that differs costs one compare."""
        whole = self._last_whole
        assert whole is not None  # set with _last_read
        buf = self._last_read
        self._heads += 1
        self._head_since = 0.0
        self._head_buf = buf
        self._head_at = len(buf)
        self._head_raw = 0
        method, target, forwarded = whole
        req = Exchange(method, None, forwarded, False, True, False, target, self._fixed,
                       self._fixed_state)
        self._head_done(req, 0)
        req.complete = True  # as on_message_complete: a request without a body ends here
        if self.wire:
            self._flush_wire()

    def _callback_failed(self, cause: BaseException | None) -> None:
        """One of the request parser's callbacks raised `cause`: a refusal, or our bug."""
        if isinstance(cause, HeadTooLarge):
            self._refuse(HEAD_TOO_LARGE)
        elif isinstance(cause, BadMessage):
            self._refuse(BAD_REQUEST)
        else:  # our bug: say so, and still answer like a proxy
            log.error("agent request callback failed", exc_info=cause)
            self._refuse(BAD_REQUEST)

    def eof_received(self) -> bool:
        req = self._parsing
        if req is not None and not req.complete and req.phase != ENDED:
            # The agent stopped sending inside a request's body: it can never complete,
            # and waiting for the upstream's answer to half a request would end in a
            # timeout charged to an upstream that did nothing wrong.
            self._refuse(BAD_REQUEST)
            return self.transport is not None and self.owed is not None
        if self.current is None and not self.queue:
            self._release_held()  # now: the next agent may want it before we are gone
            return False  # nothing owed: close
        self.eof = True  # a client that shuts down its sending side still reads
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.queue.clear()
        self._release_held()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.current is not None:
            self._conclude(self.current, AGENT_GONE)

    def pause_writing(self) -> None:
        # The agent reads slower than the upstream answers: stop reading the upstream.
        self._agent_blocked = True
        conn = self.conn
        if conn is not None and not conn.reading_paused:
            conn.pause_reading()

    def resume_writing(self) -> None:
        self._agent_blocked = False
        conn = self.conn
        if conn is not None and conn.reading_paused:
            conn.resume_reading()

    # --- the request parser's callbacks ----------------------------------------------

    # A per-upstream listener reads each request head from its bytes once llhttp has
    # accepted it, as the upstream side does answers (no Python callback per field),
    # and keeps what a head's fields say by the head's shape. That needs to know where
    # in a read each head begins: the read's start, or the end of the previous message,
    # which the proxy can follow for bodies framed by Content-Length (their bytes come
    # as they are) but not for chunked ones. So a chunked request hands the connection
    # to `_FieldByField` callbacks for good, replaying its head. The forward proxy uses
    # those from the start (targets and Host name the destination).

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._heads += 1
        self._head_since = 0.0
        buf = self._head_buf
        at = self._head_at
        state = self._fixed_state
        assert state is not None  # lean: a per-upstream listener
        # A read that is exactly a request seen before (see UpstreamState.whole_heads):
        # llhttp accepted it, so it ends where the read ends. (endswith() first: compiled
        # it is native, and a read with a body rarely ends in a blank line, so a POST is
        # not hashed for nothing.)
        if at == 0 and buf.endswith(b"\r\n\r\n") and len(buf) <= _WHOLE_HEAD_MAX:
            if buf == self._last_read:
                whole = self._last_whole
            else:
                whole = state.whole_heads.get(buf)
                if whole is not None:
                    self._last_read = buf
                    self._last_whole = whole
            if whole is not None:
                method, target, forwarded = whole
                self._head_at = len(buf)
                self._head_raw = 0
                self._head_done(Exchange(method, None, forwarded, False, True, False, target,
                                         self._fixed, state), 0)
                return
        # llhttp skips empty lines before a request line (RFC 9112 2.2): so do we. (By
        # index: compiled, a byte read is native; startswith() would be a call each.)
        n_buf = len(buf)
        while at < n_buf and (buf[at] == 13 or buf[at] == 10):
            at += 1
        # llhttp accepted the head, and it refuses bare LF: the request line ends at the
        # first CRLF, the head at the first blank line after it.
        if at == 0 and len(buf) <= SMALL_READ:
            # The common read, a head from its start: partition() takes its argument as
            # it is, where index() parses a tuple of them at several times the cost of
            # the search; the copies it makes are small.
            head = buf.partition(b"\r\n\r\n")[0]
            line_end = len(head.partition(b"\r\n")[0])
            end = len(head) + 4
        else:
            line_end = buf.index(b"\r\n", at)
            end = buf.index(b"\r\n\r\n", line_end) + 4
        self._head_at = end  # where the body, if any, begins
        if end - at > self._max_header_bytes:
            raise HeadTooLarge
        fields = buf[line_end + 2:end - 2]
        # An agent sends the same fields with every GET: those, as they are, first (no
        # pass over them); then their shape.
        known = state.request_heads.get(fields)
        if known is None:
            shape = fields.translate(ZERO_DIGITS)
            known = state.request_shapes.get(shape)
            if known is None:
                known = request_known(fields, shape, state.request_shapes)
            if known[1] == 0:  # no body: no Content-Length to vary
                heads = state.request_heads
                if len(heads) >= FRAMINGS_MAX:
                    heads.clear()
                heads[fields] = known
        kept, framing, connection = known
        # llhttp checked the request line: METHOD SP target SP HTTP/d.d, or an HTTP/0.9
        # "METHOD SP target", which ends without a version.
        proto = buf[line_end - 9:line_end] if line_end - 9 > at else b""
        if proto != HTTP11 and proto != HTTP10:
            raise BadMessage
        parser = self._parser
        if framing and parser.should_upgrade():
            # llhttp ends an Upgrade request at its head and leaves its body unread: the
            # body would be taken for the next request. No protocol switch carries one.
            raise BadMessage
        if framing == CHUNKED_BODY:
            raise _FieldByFieldFrom(at)
        # Most requests are GETs, each read beginning with one: no call for the name.
        method = GET if at == 0 and buf.startswith(b"GET ") else parser.get_method()
        http11 = proto == HTTP11
        if http11 and (connection is None or connection == b"keep-alive"
                       or connection == b"Keep-Alive"):
            keep_alive = True  # what llhttp would say: 1.1, and no close
        else:
            keep_alive = parser.should_keep_alive()
        n = len(kept)  # one span (Host first, hop-by-hop last, as http.client sends) or two
        forwarded = (
            fields[kept[0]:kept[1]] if n == 2
            else fields[kept[0]:kept[1]] + fields[kept[2]:kept[3]] if n == 4
            else b"".join([fields[kept[i]:kept[i + 1]] for i in range(0, n, 2)]))
        target = buf[at + len(method) + 1:line_end - 9]
        if (at == 0 and end == n_buf and not framing and keep_alive and http11
                and n_buf <= _WHOLE_HEAD_MAX):
            wholes = state.whole_heads
            if len(wholes) >= FRAMINGS_MAX:
                wholes.clear()
            whole = (method, target, forwarded)
            wholes[buf] = whole
            self._last_read = buf
            self._last_whole = whole
        else:
            self._last_read = b""  # the last head parsed is not a whole one: see _repeated
        self._head_raw = 0
        self._head_done(Exchange(method, None, forwarded, False, keep_alive, not http11, target,
                                 self._fixed, state), framing)

    def _fields_done(self) -> None:
        """A head read field by field (`_FieldByField`) is complete."""
        self._last_read = b""  # see _repeated
        self._in_head = False
        self._heads += 1
        self._head_open = False
        self._head_since = 0.0
        url = self._url
        if self._head_bytes + len(url) > self._max_header_bytes:
            raise HeadTooLarge
        parser = self._parser
        method = parser.get_method()
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise BadMessage  # HTTP/0.9: see HTTP11
        if self._framed and method != b"CONNECT" and parser.should_upgrade():
            raise BadMessage  # an Upgrade request with a body: see on_headers_complete
        host_line = None
        if not self._forward:
            upstream, state = self._fixed, self._fixed_state
            target = url
        elif method == b"CONNECT":
            upstream, state, target = None, None, url  # routed when the tunnel is set up
        else:
            authority, target = split_target(url, self._host)
            host, port = host_port(authority)
            if not port:
                raise BadMessage
            upstream = self._routed(host, port)
            if upstream is None:
                state = None
                if self._on_unrouted is not None:
                    self._on_unrouted(host, port)
            else:
                state = state_of(upstream)
                policy = upstream.policy
                self._max_pending_bytes = policy.max_pending_bytes
                self._max_pending_requests = policy.max_pending_requests
            # The target's authority is the destination, whatever Host says (RFC 9112
            # 3.2.2): the upstream must be told the place it was reached as, not a name
            # the agent made up (a virtual host it may not serve to this agent).
            host_line = b"Host: %s\r\n" % authority
        fields = b"".join(self._fields)
        connection = self._connection
        if connection is not None and connection not in PLAIN_CONNECTION:
            fields = without(fields, listed(connection))
        keep_alive = parser.should_keep_alive()
        # An HTTP/1.0 agent keeps its connection only when it says so: an agent that
        # keeps it and said nothing speaks 1.1, without asking the parser.
        http10 = version == "1.0"
        req = Exchange(method, host_line, fields, self._chunked, keep_alive, http10, target,
                       upstream, state)
        self._fields.clear()
        self._url = b""
        self._host = None
        self._chunked = False
        framed = self._framed
        self._framed = False
        self._connection = None
        self._head_bytes = 0
        self._head_raw = 0
        self._head_done(req, framed)

    def _head_done(self, req: Exchange, framed: bool | int) -> None:
        """A request's head is in: queue it, answer it, or send it on (with its body
        when one follows in the same read)."""
        self._parsing = req
        if req.tunnel:
            return  # the parser raises HttpParserUpgrade next: see _upgraded
        if self.current is not None or self.queue:
            self.queue.append(req)
            self._check_backlog()
            return
        upstream = req.upstream
        if upstream is None:
            self._start(req)  # answered at once
            return
        # The common exchange, inline: `_start` and `_attempt` on the connection this
        # agent held, and the head written now when no body follows. Per request that
        # is about ten Python calls fewer; anything else (another endpoint, no held
        # connection, flow control engaged) takes `_attempt` from the endpoint chosen.
        self.current = req
        state = req.state
        assert state is not None  # routed
        now = req.started = self._last_started = self._time()
        state.stats.active += 1
        for ep in upstream.endpoints:  # Upstream.choose, one call fewer
            breaker = ep.breaker
            if breaker.closed or breaker.allow(now):
                break
        else:
            self._conclude(req, BREAKER_OPEN)
            return
        upstream.retry_budget.deposit(now)
        deadline = req.deadline = now + state.request_timeout_s
        if self._timer is None or deadline < self._timer_at:
            self._arm(deadline)
        conn = self.held_conn
        transport = conn.transport if conn is not None else None
        if (conn is None or transport is None or conn.endpoint is not ep or conn.dead
                or self.paused or self._agent_blocked or transport.is_closing()):
            self._attempt(req, ep, fresh=False)
            return
        self.held_conn = None
        state.held -= 1
        req.endpoint = ep
        req.phase = ADMITTED
        conn.reused = True
        conn.proxy = self
        conn.got_bytes = False
        self.conn = conn
        head = b"%s %s HTTP/1.1\r\n%s%s\r\n" % (
            req.method, req.target, req.host_line or state.host_lines[ep], req.fields)
        if framed:  # the body follows: one write with it, after this read
            self.wire.append(head)
        else:
            transport.write(head)

    def on_body(self, body: bytes) -> None:
        self._head_at += len(body)  # a body read from its head on is as it came
        req = self._parsing
        assert req is not None
        if req.phase == ENDED:
            return  # already answered (breaker, failure, early response): drain
        part = b"%x\r\n%b\r\n" % (len(body), body) if req.chunked else body
        self._add_body(req, part)

    def on_message_complete(self) -> None:
        self._in_head = True
        req = self._parsing
        assert req is not None
        req.complete = True
        if req.chunked and req.phase != ENDED:
            self._add_body(req, LAST_CHUNK)  # trailers are not forwarded

    def _add_body(self, req: Exchange, part: bytes) -> None:
        n = len(part)
        req.body_bytes += n
        replay = req.replay
        if replay is not None:
            if not replay:
                replay = req.replay = []  # the class's shared empty default until now
            replay.append(part)
        if req is self.current:
            self.wire.append(part)
            self.wire_bytes += n
            if self.wire_bytes > self._max_pending_bytes:
                conn = self.conn
                if conn is not None and conn.transport is None:
                    self._check_backlog()  # still connecting: bytes pile up here
        else:
            self._queued_bytes += n
            if self._queued_bytes > self._max_pending_bytes:
                self._check_backlog()

    # --- one exchange ----------------------------------------------------------------

    def _start(self, req: Exchange) -> None:
        """`req` is next in line: choose an endpoint, or answer at once."""
        self.current = req
        self._queued_bytes -= req.body_bytes
        upstream = req.upstream
        if upstream is None:
            req.phase = ENDED
            self.reply.append(NO_ROUTE)
            self._end(req)
            return
        now = req.started = self._last_started = self._time()
        state = req.state
        assert state is not None  # routed
        state.stats.active += 1
        ep = upstream.choose(now)
        if ep is None:
            self._conclude(req, BREAKER_OPEN)
            return
        upstream.retry_budget.deposit(now)
        deadline = req.deadline = now + state.request_timeout_s
        if self._timer is None or deadline < self._timer_at:
            self._arm(deadline)
        self._attempt(req, ep, fresh=False)

    def _attempt(self, req: Exchange, ep: Endpoint, fresh: bool) -> None:
        """Queue `req` for `ep`, on an idle pooled connection or a new one. The caller
        flushes, so that a head and the body parsed with it leave in one write."""
        req.endpoint = ep
        req.phase = ADMITTED
        state = req.state
        assert state is not None  # routed
        conn = self.held_conn
        if conn is not None:
            self.held_conn = None
            conn.state.held -= 1
            transport = conn.transport
            if (fresh or conn.endpoint is not ep or conn.dead or transport is None
                    or transport.is_closing()):
                conn.state.checkin(conn)  # closes it if dead
                conn = None
        if conn is None and not fresh:
            conn = state.checkout(ep)
        if conn is None:
            conn = UpstreamConnection(self._loop, state, ep)
            conn.open()
        else:
            conn.reused = True
        conn.proxy = self
        conn.got_bytes = False
        self.conn = conn
        if self.paused & _UPSTREAM_FULL:  # that was the previous connection's buffer
            self._resume(_UPSTREAM_FULL)
        wire = self.wire
        wire.clear()
        wire.append(b"%s %s HTTP/1.1\r\n%s%s\r\n" % (
            req.method, req.target, req.host_line or state.host_lines[ep], req.fields))
        replay = req.replay
        if replay:
            wire += replay
        self.wire_bytes = req.body_bytes
        if self._agent_blocked:
            conn.pause_reading()

    def _flush_wire(self) -> None:
        conn = self.conn
        if conn is None or conn.transport is None:
            return  # still connecting: `connected` flushes
        wire = self.wire
        conn.send(wire[0] if len(wire) == 1 else b"".join(wire))
        wire.clear()
        self.wire_bytes = 0
        req = self.current
        assert req is not None  # a connection is only ever held for an exchange
        if req.replay is not None and req.body_bytes > self._max_pending_bytes:
            req.replay = None  # sent and too big to keep: this request is not resent
        if self.paused & _BACKLOG:
            self._check_backlog()

    def connected(self, conn: UpstreamConnection) -> None:
        if self._agent_blocked:
            conn.pause_reading()
        self._flush_wire()

    def _fallback(self, req: Exchange) -> tuple[bytes, Outcome]:
        """Every endpoint's breaker is open: the fallback, else 503 naming the breaker."""
        state = req.state
        assert state is not None  # routed
        kind = state.policy.fallback.kind
        reply = None
        if kind is FallbackKind.STATIC:
            reply = state.static
        elif kind is FallbackKind.LAST_GOOD and req.method == b"GET":
            assert state.last_good is not None
            reply = state.last_good.get(req.target)
        if reply is None:
            return state.rejection, Outcome.REJECTED
        if req.method == b"HEAD":
            reply = reply[:reply.index(b"\r\n\r\n") + 4]
        return reply, Outcome.FALLBACK

    def _arm(self, deadline: float) -> None:
        if self._timer is not None:
            self._timer.cancel()  # only when a shorter timeout overtakes a longer one
        self._timer = self._loop.call_at(deadline, self._deadline_check)
        self._timer_at = deadline

    def _deadline_check(self) -> None:
        self._timer = None
        req = self.current
        if req is None:
            self._idle_check()
            return
        if self._time() + _TIMER_SLACK_S < req.deadline:
            self._arm(req.deadline)  # a later request is in flight now
            return
        self._conclude(req, DEADLINE_UNREAD if self._agent_blocked else DEADLINE,
                       FailureKind.TIMEOUT)

    def _head_begun(self) -> None:
        """A request head has begun and is not complete: it has the header timeout
        from now (a client sending its head a byte at a time is not waited for)."""
        now = self._head_since = self._time()
        if self.current is None and (self._timer is None
                                      or now + self._header_timeout_s < self._timer_at):
            self._arm(now + self._header_timeout_s)

    def _idle_check(self) -> None:
        """The timer fired with no exchange in flight: a head overdue is answered 408,
        a connection idle too long is closed, else the timer waits for whichever of
        the two is next."""
        transport = self.transport
        if transport is None or self.owed is not None:
            return  # gone, tunnelled, or closing after its last answer
        now = self._time() + _TIMER_SLACK_S
        if self._head_since:
            due = self._head_since + self._header_timeout_s
            if now >= due:
                self._refuse(HEAD_TIMED_OUT)
                return
        else:
            due = self._last_started + self._idle_timeout_s
            if now >= due:
                self._release_held()
                transport.close()
                return
        self._arm(due)

    def upstream_failed(self, conn: UpstreamConnection, kind: FailureKind) -> None:
        """`conn` failed the current exchange (refused, connect timeout, reset,
        malformed): resend if that is safe, else answer 502/504."""
        req = self.current
        assert req is not None  # only an exchange holds a connection
        # A pooled connection the upstream closed as we reused it, before any byte of
        # an answer: the upstream closed an idle connection, which is no fault.
        stale = (kind is FailureKind.RESET and conn.reused and not conn.got_bytes
                 and req.phase == ADMITTED)
        self._conclude(req, STALE_RESET if stale else UPSTREAM_BROKE, kind, conn.got_bytes)

    def response_done(self, conn: UpstreamConnection, reusable: bool,
                      close_agent: bool) -> None:
        """The whole response is relayed: the connection back to the pool, the verdict."""
        req = self.current
        assert req is not None and req.endpoint is not None
        self.conn = None
        conn.proxy = None
        if not (reusable and req.complete):
            conn.close()
        elif close_agent or self.transport is None or conn.state.held >= conn.state.pool_size:
            conn.state.checkin(conn)
        else:
            if conn.reading_paused:  # idle, it must read, to see the upstream close
                conn.resume_reading()
            self.held_conn = conn
            conn.state.held += 1
        self._conclude(req, ANSWERED_FAILING if req.failed_status else ANSWERED,
                       FailureKind.STATUS, close=close_agent)

    def _conclude(self, req: Exchange, event: int, kind: FailureKind = FailureKind.RESET,
                  got_bytes: bool = False, refusal: bytes = BAD_REQUEST,
                  close: bool = False) -> None:
        """`event` happened to the exchange in flight: carry out the ending the table
        (`exchange.ENDINGS`) names for it. `kind` says how the upstream failed,
        `got_bytes` whether it had sent any of an answer, `refusal` what the agent's bad
        bytes earned, `close` whether the answer closes the agent's connection."""
        end = ending(event, req.phase, req.complete)
        then = end.then
        if then == CARRY_ON:
            return
        state, ep = req.state, req.endpoint
        assert state is not None  # routed
        resend = end.resend
        if resend == FRESH and ep is not None:
            # Once, same admission: only a request that may be repeated (any other may
            # have been acted on, and is never sent twice), and only while held whole.
            self._drop_conn()
            if (req.method in IDEMPOTENT_METHODS and not req.fresh_retry
                    and req.replay is not None):
                req.fresh_retry = True
                self.reply.clear()  # a head not yet written: answered afresh
                self._attempt(req, ep, fresh=True)  # flushed once connected
                return
        verdict = end.verdict
        if verdict == FAILURE:
            assert ep is not None  # admitted
            ep.breaker.record(False, self._time(), kind.value)
            state.stats.failed(kind, ep.label)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s: %s: %s", state.stats.upstream, ep.label, kind.value)
            if resend == OTHER:
                self._drop_conn()
                if self._retried(req, ep, got_bytes):
                    self.reply.clear()  # a head not yet written: answered afresh
                    return
        elif verdict == SUCCESS:
            assert ep is not None  # admitted
            ep.breaker.record(True, self._time())
        elif verdict == RELEASE:
            assert ep is not None  # admitted
            ep.breaker.release()
        req.phase = ENDED
        self.current = None
        self._drop_conn()  # mid-exchange, unless the answer handed it back already
        reply = end.reply
        outcome = end.outcome
        if reply != RELAYED:
            self.reply.clear()  # a head not yet written gives way to the proxy's answer
            if reply == UPSTREAM_FAILED:
                self.reply.append(state.failure_reply(kind))
            elif reply == GATEWAY_TIMEOUT:
                self.reply.append(state.timed_out)
            elif reply == BODY_TIMEOUT:
                self.reply.append(BODY_TIMED_OUT)
            elif reply == REFUSAL:
                self.reply.append(refusal)
            elif reply == BAD_GATEWAY:
                self.reply.append(state.bad_gateway)
            elif reply == FALLBACK:
                answer, outcome = self._fallback(req)
                self.reply.append(answer)
        stats = state.stats
        stats.active -= 1
        stats.done(outcome, self._time() - req.started)
        self._end(req, close or then == CLOSE, then == CUT)

    def _retried(self, req: Exchange, failed: Endpoint, got_bytes: bool) -> bool:
        """Whether `req`, which `failed` failed, went to another endpoint (or the same
        one again), as the retry policy and budget allow."""
        upstream, state = req.upstream, req.state
        assert upstream is not None and state is not None  # routed
        if req.replay is None or not may_retry(req.method, not got_bytes, req.attempt + 1,
                                               state.policy.retry):
            return False
        now = self._time()
        if not upstream.retry_budget.withdraw(now):
            state.stats.retry_denied()
            return False
        other = _choose_other(upstream, failed, now)
        if other is None:
            return False
        req.attempt += 1
        state.stats.retried()
        self._attempt(req, other, fresh=False)
        self._flush_wire()
        return True

    def _end(self, req: Exchange, close: bool = False, cut: bool = False) -> None:
        """The agent has its answer (or all it will get, when `cut`): write it, then
        the next request's turn."""
        self.current = None
        self.wire.clear()
        self.wire_bytes = 0
        if self.paused & _UPSTREAM_FULL:
            self._resume(_UPSTREAM_FULL)
        self.send_reply()
        transport = self.transport
        if transport is None:
            return
        if cut:
            reset(transport)
            return
        if close or not req.keep_alive:
            self._release_held()
            transport.close()
            return
        if self.owed is not None:
            self._release_held()
            transport.write(self.owed)
            transport.close()
            return
        if not self._advancing:  # else called from _advance (a queued request answered)
            self._advance()

    def _advance(self) -> None:
        """The next requests' turn, in order, until one is in flight."""
        # A method of its own, not the end of `_end`: there `current` was just set to
        # None, and a type checker (and mypyc's compiled code) would take it to stay None
        # across the `_start` calls below.
        self._advancing = True
        try:
            queue = self.queue
            while self.current is None and queue and self.transport is not None:
                self._start(queue.popleft())
            if self.eof and self.current is None and self.transport is not None:
                self._release_held()
                self.transport.close()
                return
            if self.paused & _BACKLOG:
                self._check_backlog()
            if self.wire:
                self._flush_wire()
        finally:
            self._advancing = False

    def send_reply(self) -> None:
        reply = self.reply
        if reply:
            req = self.current
            if req is not None:
                req.phase = ANSWERING
            if self.transport is not None:
                self.send(reply[0] if len(reply) == 1 else b"".join(reply))
            reply.clear()

    def _release_held(self) -> None:
        conn = self.held_conn
        if conn is not None:
            self.held_conn = None
            conn.state.held -= 1
            conn.state.checkin(conn)

    def _drop_conn(self) -> None:
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.proxy = None
            conn.close()

    # --- bad input, tunnels, flow control --------------------------------------------

    def _refuse(self, reply: bytes) -> None:
        """The agent's bytes are not HTTP we serve: answer once, in turn, and close."""
        self._last_read = b""  # the parser is past its error state: nothing is repeated
        self._pause(_BACKLOG)
        self.queue.clear()
        req = self.current
        transport = self.transport
        assert transport is not None  # from data_received
        if req is not None and req is self._parsing and not req.complete:
            # What broke is the body of the request in flight: it cannot be completed.
            self._conclude(req, AGENT_MALFORMED, refusal=reply)
            return
        upstream = self._fixed
        if upstream is not None:
            upstream.stats.done(Outcome.BAD_REQUEST, 0.0)
        if req is not None:
            # The bad bytes came after the request in flight (see exchange.CARRY_ON):
            # it goes on, and the refusal is owed after its answer.
            self.owed = reply
            if self.wire:  # what it asked before the bad bytes still goes
                self._flush_wire()
            return
        self._release_held()
        transport.write(reply)
        transport.close()

    def _upgraded(self, rest: bytes) -> None:
        self._last_read = b""  # llhttp stopped at the upgrade, not between messages
        req = self._parsing
        assert req is not None
        if not req.tunnel:
            # Another protocol was asked for; Upgrade is not forwarded, so the upstream
            # answers in HTTP/1.1 and what follows is the next request.
            if rest:
                self.data_received(rest)
            elif self.wire:
                self._flush_wire()
            return
        if not self._forward:
            self._refuse(NOT_A_TUNNEL)
            return
        if self.current is not None or self.queue:
            self._refuse(BAD_REQUEST)  # a tunnel behind pipelined requests: not HTTP
            return
        host, port = host_port(req.target)
        upstream = self._routed(host, port) if port else None
        transport = self.transport
        assert transport is not None  # from data_received
        if upstream is None:
            if port and self._on_unrouted is not None:
                self._on_unrouted(host, port)
            transport.write(NO_ROUTE if port else BAD_REQUEST)
            transport.close()
            return
        self.transport = None  # the relay owns it now
        self._release_held()
        adopt(transport, TcpRelay(upstream, greeting=CONNECT_OK, refusal=tunnel_refusal),
              rest)

    def _routed(self, host: bytes, port: int) -> Upstream | None:
        try:
            return self._route(host, port)
        except Exception:  # a router bug must cost one request, not the connection
            log.exception("no route for %r port %d", host, port)
            return None

    def _check_backlog(self) -> None:
        over = (len(self.queue) >= self._max_pending_requests
                or self._queued_bytes > self._max_pending_bytes
                or self.wire_bytes > self._max_pending_bytes)
        if over:
            self._pause(_BACKLOG)
        elif self.paused & _BACKLOG and self.owed is None:
            self._resume(_BACKLOG)

    def upstream_full(self) -> None:
        """The upstream connection's write buffer is above its high-water mark."""
        self._pause(_UPSTREAM_FULL)

    def upstream_drained(self) -> None:
        self._resume(_UPSTREAM_FULL)

    def _pause(self, reason: int) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused |= reason

    def _resume(self, reason: int) -> None:
        paused = self.paused
        self.paused = paused & ~reason
        if paused and not self.paused and self.transport is not None:
            self.transport.resume_reading()



def _choose_other(upstream: Upstream, failed: Endpoint, now: float) -> Endpoint | None:
    """`Upstream.choose` for a retry: the nearest admitting endpoint other than the one
    that just failed (whose breaker may not have tripped yet), else that one again."""
    for ep in upstream.endpoints:
        if ep is not failed and ep.breaker.allow(now):
            return ep
    return failed if failed.breaker.allow(now) else None


