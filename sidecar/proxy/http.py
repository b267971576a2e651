"""The L7 hot path: HTTP/1.1 between unmodified agents and their upstreams.

Owns every HTTP request an agent sends through the sidecar, from the agent's bytes to the
upstream's answer: keep-alive on both sides (an agent connection keeps the upstream
connection it last used; the others wait pooled per endpoint), a per-request timeout,
breaker verdicts, safe retries, a fallback while the breaker is open, flow control, and
the answers to bad input (400, 431, 502, 504). HTTPS through the forward proxy is a
CONNECT tunnel handed to the L4 relay.

The one idea: two asyncio Protocols and no tasks per request. `HttpProxy` is one agent
connection, `_UpstreamConnection` one pooled connection to an endpoint, each with one
httptools parser (an agent connection's is replaced once, after a chunked request: see
`HttpProxy.on_headers_complete`); an exchange is plain state (`_Request`) with a
deadline, watched by one timer per agent connection. Heads are read from their bytes once
llhttp has accepted them, not a Python callback per field, and what a head's fields say
is kept per upstream by the head's shape. Bytes are rewritten only where HTTP demands it
(the head, chunk framing) and gathered into one `write()` per read. The
policy objects are asked at the three points where a decision is due: before a call
(`choose`), when a call fails before any response byte (`may_retry`, the retry budget),
and when it ends (`record`).

Compiled: this module is part of the hot path mypyc compiles (sidecar/compile.py), so its
types are exact, not hints: mypyc checks declared attribute and argument types at run
time, and narrows an attribute after an assignment in a method (read it in another
method if a call in between may change it). The tests run it compiled and interpreted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import re
from collections import OrderedDict, deque
from http import HTTPStatus
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
# A cut answer ends with RST (tcp.reset): it must fail the agent's read, not end it the
# way a complete close-delimited answer ends.
from sidecar.proxy.tcp import TcpRelay, adopt, reset
from sidecar.upstream import Endpoint, Upstream

log = logging.getLogger(__name__)

_OK: Final = Outcome.OK  # read per request

# Headers that describe one connection, not the message (RFC 9110 7.6.1), plus the
# proxy's own credentials: never forwarded. Each side of the proxy frames its own
# connection.
_HOP_BY_HOP: Final = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te",
                         b"trailer", b"upgrade", b"proxy-authorization"})
# What an answer's rebuilt head leaves out: the above, and Transfer-Encoding (the proxy
# frames the body afresh).
_NOT_FORWARDED: Final = _HOP_BY_HOP | {b"transfer-encoding"}
# Their lines, each with the CRLF before it, in any spelling: one pass removes them all
# (three times cheaper than a Python loop over the lines).
_NOT_FORWARDED_LINES: Final = re.compile(
    rb"\r\n(?:%s):[^\r]*" % b"|".join(sorted(_NOT_FORWARDED)), re.IGNORECASE)
# Connection tokens that name no header to drop.
_CONNECTION_OPTIONS: Final = frozenset({b"close", b"keep-alive", b"upgrade"})
# Fields that frame the message: never hop-by-hop, whatever Connection says. A message
# whose Connection names one would lose its framing on the way while its body still
# went: the next hop would read that body as another message (request smuggling).
_FRAMING_NAMES: Final = frozenset({b"content-length", b"transfer-encoding"})
# The request lines the proxy serves end in one of these (llhttp also takes HTTP/0.9
# lines, "GET /", which have no head to rewrite and no framing: refused).
_HTTP11: Final = b" HTTP/1.1"
_HTTP10: Final = b" HTTP/1.0"
# The headers the proxy looks at, by lower-case name; any other (_PLAIN) is forwarded as
# it is.
_DROP: Final = 0
_CONNECTION: Final = 1
_HOST: Final = 2
_TRANSFER_ENCODING: Final = 3
_CONTENT_LENGTH: Final = 4
_PLAIN: Final = 5
_SPECIAL: Final = {name: _DROP for name in _HOP_BY_HOP}
_SPECIAL.update({b"connection": _CONNECTION, b"host": _HOST,
                 b"transfer-encoding": _TRANSFER_ENCODING, b"content-length": _CONTENT_LENGTH})
# The same by exact spelling, learnt as names arrive: one dict lookup per header line
# instead of a lower() and a lookup. Peers use a few spellings each; the bounds keep odd
# ones from growing it (those take the long way, to the same answer).
_KIND_BY_SPELLING: dict[bytes, int] = {}
_SPELLINGS_MAX: Final = 1024
_SPELLING_MAX_BYTES: Final = 64


def _kind_of(name: bytes) -> int:
    kind = _SPECIAL.get(name.lower(), _PLAIN)
    if len(name) <= _SPELLING_MAX_BYTES and len(_KIND_BY_SPELLING) < _SPELLINGS_MAX:
        _KIND_BY_SPELLING[name] = kind
    return kind


# An answer's head is read from its bytes, not field by field: one pass over the
# lower-cased head finds the fields the proxy acts on, with their values. llhttp
# (strict, as httptools runs it) refuses bare LF, folded lines and space before the
# colon, so a field line begins right after a CRLF and a match is exactly a field
# llhttp parsed. An answer forwarded as it came has only Content-Length, chunked
# framing and Connection: keep-alive among them. A value with trailing whitespace does
# not compare equal and takes the long way (a lazy match that trims it costs twice as
# much, on every answer).
_FRAMING_FIELDS: Final = re.compile(
    rb"\r\n(connection|keep-alive|proxy-connection|te|trailer|upgrade|proxy-authorization"
    rb"|transfer-encoding|content-length):[ \t]*([^\r]*)")

# The request fields the proxy acts on: the answer's names, and Host.
_REQUEST_FIELDS: Final = re.compile(
    rb"\r\n(host|connection|keep-alive|proxy-connection|te|trailer|upgrade"
    rb"|proxy-authorization|transfer-encoding|content-length):[ \t]*([^\r]*)")
_CHUNKED_BODY: Final = 2
_GET: Final = b"GET"
# What a request head's fields say: see `_request_known`.
_RequestShape = tuple[tuple[int, ...], int, bytes | None]

# Answer heads by shape (digits zeroed) -> framing, per upstream; cleared when full.
# A read this small is searched by partition(), which copies what follows the match.
_SMALL_READ: Final = 4096
_ZERO_DIGITS: Final = bytes.maketrans(b"123456789", b"000000000")
_FRAMINGS_MAX: Final = 256

# Connection values naming no field, as servers and clients spell them: nothing to drop,
# known without splitting the value (most responses carry one). Any other spelling takes
# the long way, to the same result.
_PLAIN_CONNECTION: Final = frozenset({b"keep-alive", b"Keep-Alive", b"close", b"Close"})

# LAST_GOOD fallback: responses remembered per upstream, and the largest body kept. A
# fallback is for small, read-mostly answers (status, config, registry lookups).
LAST_GOOD_ENTRIES: Final = 256
LAST_GOOD_MAX_BODY_BYTES: Final = 64 * 1024

# Reasons reading from the agent is paused, as bits: each is lifted on its own.
_UPSTREAM_FULL: Final = 1  # the upstream's write buffer is above its high-water mark
_BACKLOG: Final = 2  # too many requests or bytes waiting for their turn or for a connection

# How a response body goes to the agent.
_NO_BODY: Final = 0
_AS_IS: Final = 1
_RECHUNK: Final = 2

_CONNECT_OK: Final = b"HTTP/1.1 200 Connection established\r\n\r\n"

# uvloop's clock and timers have millisecond resolution: a timer may fire a hair before
# the deadline as loop.time() reads it. Within this slack the deadline counts as reached.
_TIMER_SLACK_S: Final = 0.002

def _canned(status: int, reason: str, text: str, extra: bytes = b"",
            close: bool = False) -> bytes:
    """A complete response the proxy answers with itself, built once."""
    body = text.encode() + b"\n"
    return b"".join((
        b"HTTP/1.1 %d %s\r\n" % (status, reason.encode()),
        b"Content-Type: text/plain; charset=utf-8\r\n",
        b"Content-Length: %d\r\n" % len(body),
        extra,
        b"Connection: close\r\n" if close else b"",
        b"\r\n", body))


_BAD_REQUEST: Final = _canned(400, "Bad Request", "agentvisor: malformed HTTP request", close=True)
_HEAD_TIMED_OUT: Final = _canned(408, "Request Timeout",
                                 "agentvisor: request head not received in time", close=True)
_BODY_TIMED_OUT: Final = _canned(408, "Request Timeout",
                                 "agentvisor: request body not received in time", close=True)
_HEAD_TOO_LARGE: Final = _canned(431, "Request Header Fields Too Large",
                          "agentvisor: request head too large", close=True)
_NOT_A_TUNNEL: Final = _canned(405, "Method Not Allowed",
                        "agentvisor: CONNECT is served by the forward proxy only", close=True)
_NO_ROUTE: Final = _canned(502, "Bad Gateway", "agentvisor: no upstream for this destination")
_TUNNEL_REFUSED: Final = _canned(502, "Bad Gateway", "agentvisor: tunnel refused", close=True)
_TUNNEL_OPEN: Final = _canned(503, "Service Unavailable", "agentvisor: circuit breaker open",
                       close=True)

# Status lines up to the reason phrase, which is the upstream's own.
_STATUS_PREFIX: Final = [b"HTTP/1.1 %d " % code for code in range(600)]

_CLOSE: Final = b"Connection: close\r\n"
_KEEP_ALIVE: Final = b"Connection: keep-alive\r\n"  # HTTP/1.0 agents keep only when told
_CHUNKED: Final = b"Transfer-Encoding: chunked\r\n"
_LAST_CHUNK: Final = b"0\r\n\r\n"
_FALLBACK_LAST_GOOD: Final = b"X-Agentvisor-Fallback: last_good\r\n"


class _HeadTooLarge(Exception):
    pass


class _BadMessage(Exception):
    pass


class _FieldByFieldFrom(Exception):
    """A chunked request's head begins at this offset of the read: see
    `HttpProxy.on_headers_complete`."""


class _UpstreamState:
    """What the L7 proxy keeps per upstream: idle connections per endpoint, canned
    answers naming the upstream, and the LAST_GOOD cache. Holds no reference to the
    Upstream itself, so it lives exactly as long as the Upstream (see `_state_of`)."""

    __slots__ = ("policy", "stats", "failure_statuses", "request_timeout_s", "pools", "host_lines", "last_good", "rejection",
                 "static", "timed_out", "connect_timed_out", "bad_gateway", "malformed",
                 "framings", "last_head", "last_known", "request_shapes", "request_heads",
                 "pool_size", "held")

    def __init__(self, upstream: Upstream):
        policy = self.policy = upstream.policy
        self.stats = upstream.stats
        # read per exchange (the policy is a plain dataclass: a slower attribute read)
        self.failure_statuses = policy.failure_statuses
        self.request_timeout_s = policy.request_timeout_s
        name = upstream.name
        self.pools: dict[Endpoint, list[_UpstreamConnection]] = {}
        # Idle connections are at most pool_size, pooled or held by an agent connection
        # for its next request (`HttpProxy._held`): idle agents cannot pin more.
        self.pool_size = policy.pool_size
        self.held = 0
        # How this upstream's answers are framed, by the shape of their head: see
        # `_UpstreamConnection.on_headers_complete`.
        self.framings: dict[bytes, int | list[tuple[bytes, bytes]]] = {}
        # And the last answer's head as it came, with its verdict: an upstream under load
        # repeats its answers byte for byte until the Date changes, once a second, and
        # comparing two heads is far cheaper than zeroing and hashing one. One entry:
        # a miss costs a failed compare, never a dict (measured: bench/l7_instructions).
        self.last_head = b""
        self.last_known: int | list[tuple[bytes, bytes]] = 0
        # The same for requests' fields: see `_request_known`; and by the fields
        # themselves, for requests without a body (see `HttpProxy.on_headers_complete`).
        self.request_shapes: dict[bytes, _RequestShape] = {}
        self.request_heads: dict[bytes, _RequestShape] = {}
        self.host_lines = {ep: b"Host: %s\r\n" % ep.label.encode() for ep in upstream.endpoints}
        fallback = policy.fallback
        self.last_good: OrderedDict[bytes, bytes] | None = (
            OrderedDict() if fallback.kind is FallbackKind.LAST_GOOD else None)
        breakers = ", ".join(ep.breaker.name for ep in upstream.endpoints)
        self.rejection = _canned(
            503, "Service Unavailable", f"agentvisor: circuit breaker open for {name}",
            b"X-Agentvisor-Breaker: %s\r\nRetry-After: %d\r\n"
            % (breakers.encode(), math.ceil(policy.breaker.open_s)))
        self.static = b"".join((
            b"HTTP/1.1 %d %s\r\n" % (fallback.status, _reason(fallback.status)),
            b"Content-Type: %s\r\n" % fallback.content_type.encode(),
            b"Content-Length: %d\r\n" % len(fallback.body),
            b"X-Agentvisor-Fallback: static\r\n\r\n", fallback.body))
        self.timed_out = _canned(504, "Gateway Timeout", f"agentvisor: {name} gave no "
                                 f"response within {policy.request_timeout_s:g} s")
        self.connect_timed_out = _canned(504, "Gateway Timeout", f"agentvisor: no "
                                         f"connection to {name} within "
                                         f"{policy.connect_timeout_s:g} s")
        self.bad_gateway = _canned(502, "Bad Gateway",
                                   f"agentvisor: {name} refused or dropped the connection")
        self.malformed = _canned(502, "Bad Gateway",
                                 f"agentvisor: {name} sent a response that is not HTTP/1.1")

    def failure_reply(self, kind: FailureKind) -> bytes:
        if kind is FailureKind.CONNECT_TIMEOUT:
            return self.connect_timed_out
        if kind is FailureKind.MALFORMED:
            return self.malformed
        return self.bad_gateway

    def checkout(self, ep: Endpoint) -> _UpstreamConnection | None:
        """The most recently used idle connection to `ep` that is still open."""
        pool = self.pools.get(ep)
        while pool:
            conn = pool.pop()
            transport = conn.transport
            if not conn.dead and transport is not None and not transport.is_closing():
                return conn
        return None

    def checkin(self, conn: _UpstreamConnection) -> None:
        pool = self.pools.get(conn.endpoint)
        if pool is None:
            pool = self.pools[conn.endpoint] = []
        if conn.dead or len(pool) + self.held >= self.pool_size:
            conn.close()
            return
        if conn.reading_paused:  # an idle connection must read, to see the upstream close
            conn.resume_reading()
        pool.append(conn)

    def remember(self, target: bytes, response: bytes) -> None:
        cache = self.last_good
        assert cache is not None  # only LAST_GOOD upstreams remember
        cache[target] = response
        cache.move_to_end(target)
        if len(cache) > LAST_GOOD_ENTRIES:
            cache.popitem(last=False)


def _state_of(upstream: Upstream) -> _UpstreamState:
    """The L7 state of `upstream`, made on first use. It hangs on the Upstream (opaque
    to it), so an Upstream the router forgets takes its pools and cache with it."""
    state = upstream.l7_state
    if state is None:
        state = upstream.l7_state = _UpstreamState(upstream)
    return state


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Fallback"


class _Request:
    """One request from the agent, from its head to the end of its exchange.

    No __slots__: the exchange's fields start as the class's defaults below and only
    the head's are set per request (interpreted, a third of the stores on every
    request; compiled, every field is a native slot either way)."""

    # the body, kept for a resend while it fits max_pending_bytes: a list once a part
    # arrives; None once a part went out and was let go
    replay: list[bytes] | tuple[()] | None = ()
    body_bytes = 0
    tunnel = False  # CONNECT
    complete = False  # the agent sent all of it
    # the exchange
    started = 0.0
    deadline = 0.0  # loop time by which the whole answer must be in
    endpoint: Endpoint | None = None
    admitted = False  # a breaker admission awaits its record() or release()
    attempt = 0  # retries sent
    fresh_retry = False  # the one resend after a stale pooled connection
    replied = False  # bytes of an answer were written to the agent
    done = False  # answered: body bytes still arriving are dropped
    failed_status = False

    def __init__(self, method: bytes, host_line: bytes | None, fields: bytes,
                 chunked: bool, keep_alive: bool, http10: bool, target: bytes,
                 upstream: Upstream | None, state: _UpstreamState | None):
        self.method = method
        self.host_line = host_line  # None: the chosen endpoint's host:port
        self.fields = fields  # the other forwarded header lines, each with its CRLF
        self.chunked = chunked
        self.keep_alive = keep_alive
        self.http10 = http10
        self.target = target
        self.upstream = upstream
        self.state = state
        if method == b"CONNECT":
            self.tunnel = True


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
            raise _HeadTooLarge
        kind = _KIND_BY_SPELLING.get(name)
        if kind is None:
            kind = _kind_of(name)
        if kind == _PLAIN:
            proxy._fields += (name, b": ", value, b"\r\n")
        elif kind == _CONTENT_LENGTH:
            proxy._framed = True
            proxy._fields += (name, b": ", value, b"\r\n")
        elif kind == _HOST:
            proxy._host = value
        elif kind == _CONNECTION:
            proxy._connection = value
        elif kind == _TRANSFER_ENCODING:
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
        "_transport", "_send", "_paused", "_agent_blocked", "_owed", "_eof", "_timer",
        "_timer_at",
        # the request being parsed
        "_url", "_host", "_fields", "_chunked", "_framed", "_connection", "_head_bytes",
        "_head_raw", "_in_head", "_heads", "_parsing", "_lean", "_head_buf", "_head_at",
        "_head_part", "_head_open", "_head_since",
        # exchanges, one at a time, in order
        "_current", "_queue", "_queued_bytes", "_conn", "_wire", "_wire_bytes",
        "_reply", "_advancing",
        # between exchanges
        "_held", "_last_started",
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
        self._fixed_state = _state_of(fixed) if fixed is not None else None
        policy = fixed.policy if fixed is not None else None
        self._max_header_bytes = policy.max_header_bytes if policy else DEFAULT_MAX_HEADER_BYTES
        self._max_pending_bytes = (policy.max_pending_bytes if policy
                                   else DEFAULT_MAX_PENDING_BYTES)
        self._max_pending_requests = (policy.max_pending_requests if policy
                                      else DEFAULT_MAX_PENDING_REQUESTS)
        self._header_timeout_s = policy.header_timeout_s if policy else DEFAULT_HEADER_TIMEOUT_S
        self._idle_timeout_s = (policy.agent_idle_timeout_s if policy
                                else DEFAULT_AGENT_IDLE_TIMEOUT_S)

        self._transport: asyncio.Transport | None = None
        self._paused = 0  # _UPSTREAM_FULL | _BACKLOG
        self._agent_blocked = False  # the agent's write buffer is full
        self._owed: bytes | None = None  # answer to send after the in-flight one, then close
        self._eof = False  # the agent half-closed: answer what it asked, then close
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
        self._parsing: _Request | None = None
        # Where heads begin (lean only): `_head_buf[_head_at:]`, the read with the part
        # of a head that earlier reads brought (`_head_part`) in front.
        self._head_buf = b""
        self._head_at = 0
        self._head_part = b""
        # The header timeout: a head has begun (field by field: on_message_begin; read
        # from its bytes: `_head_part` holds its start) since `_head_since` (0: none).
        self._head_open = False
        self._head_since = 0.0

        self._current: _Request | None = None
        self._queue: deque[_Request] = deque()
        self._queued_bytes = 0  # body bytes of queued requests
        self._conn: _UpstreamConnection | None = None
        self._wire: list[bytes] = []  # bytes for the upstream, not written yet
        self._wire_bytes = 0
        self._reply: list[bytes] = []  # bytes for the agent, not written yet
        self._advancing = False

        # Connection affinity: the upstream connection of the last exchange stays with
        # this agent connection, idle, for its next request to the same endpoint, and
        # goes to the pool only when the agent leaves (or goes elsewhere). Through the
        # pool instead, every agent beyond pool_size churned one upstream connection per
        # request, and the pool's checkout and checkin cost every request.
        self._held: _UpstreamConnection | None = None
        # When the last request began: the connection is idle from then on once its
        # exchange ends, and is closed after `_idle_timeout_s` (see `_idle_check`).
        self._last_started = 0.0

    # --- the agent's transport -----------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._transport = transport
        self._send: Callable[[bytes], None] = transport.write  # bound once (see _feed)
        transport.set_write_buffer_limits(self._max_pending_bytes)
        # The connection's one timer, armed now so that a client that sends nothing
        # is still bounded: first at the header timeout, which the first request's
        # deadline (the request timeout, usually no shorter) does not overtake.
        now = self._last_started = self._time()
        self._arm(now + self._header_timeout_s)

    def data_received(self, data: bytes) -> None:
        if self._owed is not None:
            return  # the connection is ending: nothing more is read as a request
        heads = self._heads
        was_in_head = self._in_head
        lean = self._lean
        if lean:  # the same bookkeeping as _UpstreamConnection.data_received, kept inline
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
            self._refuse(_BAD_REQUEST)
            return
        if replay:
            # Outside the handler: httptools takes the exception being handled as the
            # cause of a callback's failure, so inside it the replay's own refusal
            # (a _BadMessage) would be lost and logged as our bug.
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
                self._refuse(_HEAD_TOO_LARGE)
                return
        if self._wire:
            self._flush_wire()

    def _callback_failed(self, cause: BaseException | None) -> None:
        """One of the request parser's callbacks raised `cause`: a refusal, or our bug."""
        if isinstance(cause, _HeadTooLarge):
            self._refuse(_HEAD_TOO_LARGE)
        elif isinstance(cause, _BadMessage):
            self._refuse(_BAD_REQUEST)
        else:  # our bug: say so, and still answer like a proxy
            log.error("agent request callback failed", exc_info=cause)
            self._refuse(_BAD_REQUEST)

    def eof_received(self) -> bool:
        req = self._parsing
        if req is not None and not req.complete and not req.done:
            # The agent stopped sending inside a request's body: it can never complete,
            # and waiting for the upstream's answer to half a request would end in a
            # timeout charged to an upstream that did nothing wrong.
            self._refuse(_BAD_REQUEST)
            return self._transport is not None and self._owed is not None
        if self._current is None and not self._queue:
            self._release_held()  # now: the next agent may want it before we are gone
            return False  # nothing owed: close
        self._eof = True  # a client that shuts down its sending side still reads
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._queue.clear()
        self._release_held()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._current is not None:
            self._abandon(self._current, Outcome.FAILED)

    def pause_writing(self) -> None:
        # The agent reads slower than the upstream answers: stop reading the upstream.
        self._agent_blocked = True
        conn = self._conn
        if conn is not None and not conn.reading_paused:
            conn.pause_reading()

    def resume_writing(self) -> None:
        self._agent_blocked = False
        conn = self._conn
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
        # llhttp skips empty lines before a request line (RFC 9112 2.2): so do we. (By
        # index: compiled, a byte read is native; startswith() would be a call each.)
        n_buf = len(buf)
        while at < n_buf and (buf[at] == 13 or buf[at] == 10):
            at += 1
        # llhttp accepted the head, and it refuses bare LF: the request line ends at the
        # first CRLF, the head at the first blank line after it.
        if at == 0 and len(buf) <= _SMALL_READ:
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
            raise _HeadTooLarge
        state = self._fixed_state
        assert state is not None  # lean: a per-upstream listener
        fields = buf[line_end + 2:end - 2]
        # An agent sends the same fields with every GET: those, as they are, first (no
        # pass over them); then their shape.
        known = state.request_heads.get(fields)
        if known is None:
            shape = fields.translate(_ZERO_DIGITS)
            known = state.request_shapes.get(shape)
            if known is None:
                known = _request_known(fields, shape, state.request_shapes)
            if known[1] == 0:  # no body: no Content-Length to vary
                heads = state.request_heads
                if len(heads) >= _FRAMINGS_MAX:
                    heads.clear()
                heads[fields] = known
        kept, framing, connection = known
        # llhttp checked the request line: METHOD SP target SP HTTP/d.d, or an HTTP/0.9
        # "METHOD SP target", which ends without a version.
        proto = buf[line_end - 9:line_end] if line_end - 9 > at else b""
        if proto != _HTTP11 and proto != _HTTP10:
            raise _BadMessage
        parser = self._parser
        if framing and parser.should_upgrade():
            # llhttp ends an Upgrade request at its head and leaves its body unread: the
            # body would be taken for the next request. No protocol switch carries one.
            raise _BadMessage
        if framing == _CHUNKED_BODY:
            raise _FieldByFieldFrom(at)
        # Most requests are GETs, each read beginning with one: no call for the name.
        method = _GET if at == 0 and buf.startswith(b"GET ") else parser.get_method()
        http11 = proto == _HTTP11
        if http11 and (connection is None or connection == b"keep-alive"
                       or connection == b"Keep-Alive"):
            keep_alive = True  # what llhttp would say: 1.1, and no close
        else:
            keep_alive = parser.should_keep_alive()
        n = len(kept)  # one span (Host first, hop-by-hop last, as http.client sends) or two
        req = _Request(
            method, None,
            fields[kept[0]:kept[1]] if n == 2
            else fields[kept[0]:kept[1]] + fields[kept[2]:kept[3]] if n == 4
            else b"".join([fields[kept[i]:kept[i + 1]] for i in range(0, n, 2)]),
            False, keep_alive, not http11,
            buf[at + len(method) + 1:line_end - 9], self._fixed, state)
        self._head_raw = 0
        self._head_done(req, framing)

    def _fields_done(self) -> None:
        """A head read field by field (`_FieldByField`) is complete."""
        self._in_head = False
        self._heads += 1
        self._head_open = False
        self._head_since = 0.0
        url = self._url
        if self._head_bytes + len(url) > self._max_header_bytes:
            raise _HeadTooLarge
        parser = self._parser
        method = parser.get_method()
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise _BadMessage  # HTTP/0.9: see _HTTP11
        if self._framed and method != b"CONNECT" and parser.should_upgrade():
            raise _BadMessage  # an Upgrade request with a body: see on_headers_complete
        host_line = None
        if not self._forward:
            upstream, state = self._fixed, self._fixed_state
            target = url
        elif method == b"CONNECT":
            upstream, state, target = None, None, url  # routed when the tunnel is set up
        else:
            authority, target = _split_target(url, self._host)
            host, port = _host_port(authority)
            if not port:
                raise _BadMessage
            upstream = self._routed(host, port)
            if upstream is None:
                state = None
                if self._on_unrouted is not None:
                    self._on_unrouted(host, port)
            else:
                state = _state_of(upstream)
                policy = upstream.policy
                self._max_pending_bytes = policy.max_pending_bytes
                self._max_pending_requests = policy.max_pending_requests
            # The target's authority is the destination, whatever Host says (RFC 9112
            # 3.2.2): the upstream must be told the place it was reached as, not a name
            # the agent made up (a virtual host it may not serve to this agent).
            host_line = b"Host: %s\r\n" % authority
        fields = b"".join(self._fields)
        connection = self._connection
        if connection is not None and connection not in _PLAIN_CONNECTION:
            fields = _without(fields, _listed(connection))
        keep_alive = parser.should_keep_alive()
        # An HTTP/1.0 agent keeps its connection only when it says so: an agent that
        # keeps it and said nothing speaks 1.1, without asking the parser.
        http10 = version == "1.0"
        req = _Request(method, host_line, fields, self._chunked, keep_alive, http10, target,
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

    def _head_done(self, req: _Request, framed: bool | int) -> None:
        """A request's head is in: queue it, answer it, or send it on (with its body
        when one follows in the same read)."""
        self._parsing = req
        if req.tunnel:
            return  # the parser raises HttpParserUpgrade next: see _upgraded
        if self._current is not None or self._queue:
            self._queue.append(req)
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
        self._current = req
        state = req.state
        assert state is not None  # routed
        now = req.started = self._last_started = self._time()
        state.stats.active += 1
        for ep in upstream.endpoints:  # Upstream.choose, one call fewer
            breaker = ep.breaker
            if breaker.closed or breaker.allow(now):
                break
        else:
            self._reject(req)
            return
        upstream.retry_budget.deposit(now)
        deadline = req.deadline = now + state.request_timeout_s
        if self._timer is None or deadline < self._timer_at:
            self._arm(deadline)
        conn = self._held
        transport = conn.transport if conn is not None else None
        if (conn is None or transport is None or conn.endpoint is not ep or conn.dead
                or self._paused or self._agent_blocked or transport.is_closing()):
            self._attempt(req, ep, fresh=False)
            return
        self._held = None
        state.held -= 1
        req.endpoint = ep
        req.admitted = True
        conn.reused = True
        conn.proxy = self
        conn.got_bytes = False
        self._conn = conn
        head = b"%s %s HTTP/1.1\r\n%s%s\r\n" % (
            req.method, req.target, req.host_line or state.host_lines[ep], req.fields)
        if framed:  # the body follows: one write with it, after this read
            self._wire.append(head)
        else:
            transport.write(head)

    def on_body(self, body: bytes) -> None:
        self._head_at += len(body)  # a body read from its head on is as it came
        req = self._parsing
        assert req is not None
        if req.done:
            return  # already answered (breaker, failure, early response): drain
        part = b"%x\r\n%b\r\n" % (len(body), body) if req.chunked else body
        self._add_body(req, part)

    def on_message_complete(self) -> None:
        self._in_head = True
        req = self._parsing
        assert req is not None
        req.complete = True
        if req.chunked and not req.done:
            self._add_body(req, _LAST_CHUNK)  # trailers are not forwarded

    def _add_body(self, req: _Request, part: bytes) -> None:
        n = len(part)
        req.body_bytes += n
        replay = req.replay
        if replay is not None:
            if not replay:
                replay = req.replay = []  # the class's shared empty default until now
            replay.append(part)
        if req is self._current:
            self._wire.append(part)
            self._wire_bytes += n
            if self._wire_bytes > self._max_pending_bytes:
                conn = self._conn
                if conn is not None and conn.transport is None:
                    self._check_backlog()  # still connecting: bytes pile up here
        else:
            self._queued_bytes += n
            if self._queued_bytes > self._max_pending_bytes:
                self._check_backlog()

    # --- one exchange ----------------------------------------------------------------

    def _start(self, req: _Request) -> None:
        """`req` is next in line: choose an endpoint, or answer at once."""
        self._current = req
        self._queued_bytes -= req.body_bytes
        upstream = req.upstream
        if upstream is None:
            req.done = True
            self._reply.append(_NO_ROUTE)
            self._end(req)
            return
        now = req.started = self._last_started = self._time()
        state = req.state
        assert state is not None  # routed
        state.stats.active += 1
        ep = upstream.choose(now)
        if ep is None:
            self._reject(req)
            return
        upstream.retry_budget.deposit(now)
        deadline = req.deadline = now + state.request_timeout_s
        if self._timer is None or deadline < self._timer_at:
            self._arm(deadline)
        self._attempt(req, ep, fresh=False)

    def _attempt(self, req: _Request, ep: Endpoint, fresh: bool) -> None:
        """Queue `req` for `ep`, on an idle pooled connection or a new one. The caller
        flushes, so that a head and the body parsed with it leave in one write."""
        req.endpoint = ep
        req.admitted = True
        state = req.state
        assert state is not None  # routed
        conn = self._held
        if conn is not None:
            self._held = None
            conn.state.held -= 1
            transport = conn.transport
            if (fresh or conn.endpoint is not ep or conn.dead or transport is None
                    or transport.is_closing()):
                conn.state.checkin(conn)  # closes it if dead
                conn = None
        if conn is None and not fresh:
            conn = state.checkout(ep)
        if conn is None:
            conn = _UpstreamConnection(self._loop, state, ep)
            conn.open()
        else:
            conn.reused = True
        conn.proxy = self
        conn.got_bytes = False
        self._conn = conn
        if self._paused & _UPSTREAM_FULL:  # that was the previous connection's buffer
            self._resume(_UPSTREAM_FULL)
        wire = self._wire
        wire.clear()
        wire.append(b"%s %s HTTP/1.1\r\n%s%s\r\n" % (
            req.method, req.target, req.host_line or state.host_lines[ep], req.fields))
        replay = req.replay
        if replay:
            wire += replay
        self._wire_bytes = req.body_bytes
        if self._agent_blocked:
            conn.pause_reading()

    def _flush_wire(self) -> None:
        conn = self._conn
        if conn is None or conn.transport is None:
            return  # still connecting: `_connected` flushes
        wire = self._wire
        conn.send(wire[0] if len(wire) == 1 else b"".join(wire))
        wire.clear()
        self._wire_bytes = 0
        req = self._current
        assert req is not None  # a connection is only ever held for an exchange
        if req.replay is not None and req.body_bytes > self._max_pending_bytes:
            req.replay = None  # sent and too big to keep: this request is not resent
        if self._paused & _BACKLOG:
            self._check_backlog()

    def _connected(self, conn: _UpstreamConnection) -> None:
        if self._agent_blocked:
            conn.pause_reading()
        self._flush_wire()

    def _reject(self, req: _Request) -> None:
        """Every endpoint's breaker is open: the fallback, else 503 naming the breaker."""
        state = req.state
        assert state is not None  # routed
        kind = state.policy.fallback.kind
        outcome = Outcome.FALLBACK
        reply = None
        if kind is FallbackKind.STATIC:
            reply = state.static
        elif kind is FallbackKind.LAST_GOOD and req.method == b"GET":
            assert state.last_good is not None
            reply = state.last_good.get(req.target)
        if reply is None:
            reply, outcome = state.rejection, Outcome.REJECTED
        elif req.method == b"HEAD":
            reply = reply[:reply.index(b"\r\n\r\n") + 4]
        req.done = True
        self._reply.append(reply)
        self._finish(req, outcome)

    def _arm(self, deadline: float) -> None:
        if self._timer is not None:
            self._timer.cancel()  # only when a shorter timeout overtakes a longer one
        self._timer = self._loop.call_at(deadline, self._deadline_check)
        self._timer_at = deadline

    def _deadline_check(self) -> None:
        self._timer = None
        req = self._current
        if req is None:
            self._idle_check()
            return
        if self._time() + _TIMER_SLACK_S < req.deadline:
            self._arm(req.deadline)  # a later request is in flight now
            return
        if req.replied and self._agent_blocked:
            # The upstream answered in time; the agent is not reading the answer, and
            # the upstream waits on it: the agent's fault, cut without a verdict.
            self._abandon(req, Outcome.CANCELLED)
            self._end(req, cut=True)
            return
        if not req.complete and not req.replied:
            # The agent never finished sending its request: no upstream answers half a
            # request, so the wait is the agent's, and so is the 408.
            self._abandon(req, Outcome.BAD_REQUEST)
            self._reply.clear()
            self._reply.append(_BODY_TIMED_OUT)
            self._end(req, close=True)
            return
        self._drop_conn()
        self._failure(req, FailureKind.TIMEOUT)
        if req.replied:  # half an answer is out: only a cut connection says so now
            self._finish(req, Outcome.FAILED, cut=True)
        else:
            req.done = True
            self._reply.clear()  # a head not yet written gives way to the 504
            assert req.state is not None  # routed
            self._reply.append(req.state.timed_out)
            self._finish(req, Outcome.FAILED)

    def _head_begun(self) -> None:
        """A request head has begun and is not complete: it has the header timeout
        from now (a client sending its head a byte at a time is not waited for)."""
        now = self._head_since = self._time()
        if self._current is None and (self._timer is None
                                      or now + self._header_timeout_s < self._timer_at):
            self._arm(now + self._header_timeout_s)

    def _idle_check(self) -> None:
        """The timer fired with no exchange in flight: a head overdue is answered 408,
        a connection idle too long is closed, else the timer waits for whichever of
        the two is next."""
        transport = self._transport
        if transport is None or self._owed is not None:
            return  # gone, tunnelled, or closing after its last answer
        now = self._time() + _TIMER_SLACK_S
        if self._head_since:
            due = self._head_since + self._header_timeout_s
            if now >= due:
                self._refuse(_HEAD_TIMED_OUT)
                return
        else:
            due = self._last_started + self._idle_timeout_s
            if now >= due:
                self._release_held()
                transport.close()
                return
        self._arm(due)

    def _upstream_failed(self, conn: _UpstreamConnection, kind: FailureKind) -> None:
        """`conn` failed the current exchange (refused, connect timeout, reset,
        malformed): resend if that is safe, else answer 502/504."""
        req = self._current
        assert req is not None  # only an exchange holds a connection
        state, upstream, ep = req.state, req.upstream, req.endpoint
        assert state is not None and upstream is not None and ep is not None
        got_bytes = conn.got_bytes
        self._drop_conn()
        if req.replied:
            self._failure(req, kind)
            self._finish(req, Outcome.FAILED, cut=True)
            return
        self._reply.clear()  # a head not yet written: the request is answered afresh
        if kind is FailureKind.RESET and conn.reused and not got_bytes:
            # A pooled connection the upstream closed as we reused it says nothing about
            # the upstream's health. A request that may be repeated goes once more, on a
            # new connection, same admission; any other may have been acted on, and is
            # never sent twice: the agent hears so, and the breaker hears nothing.
            if (req.method in IDEMPOTENT_METHODS and not req.fresh_retry
                    and req.replay is not None):
                req.fresh_retry = True
                self._attempt(req, ep, fresh=True)  # flushed once connected
                return
            self._abandon(req, Outcome.FAILED)
            self._reply.append(state.bad_gateway)
            self._end(req)
            return
        self._failure(req, kind)
        settings = state.policy.retry
        if req.replay is not None and may_retry(req.method, not got_bytes, req.attempt + 1,
                                                settings):
            now = self._time()
            if upstream.retry_budget.withdraw(now):
                other = _choose_other(upstream, ep, now)
                if other is not None:
                    req.attempt += 1
                    state.stats.retried()
                    self._attempt(req, other, fresh=False)
                    self._flush_wire()
                    return
            else:
                state.stats.retry_denied()
        req.done = True
        self._reply.clear()
        self._reply.append(state.failure_reply(kind))
        self._finish(req, Outcome.FAILED)

    def _failure(self, req: _Request, kind: FailureKind) -> None:
        ep, state = req.endpoint, req.state
        assert ep is not None and state is not None  # an attempt was made
        if req.admitted:
            req.admitted = False
            ep.breaker.record(False, self._time(), kind.value)
        state.stats.failed(kind, ep.label)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: %s: %s", state.stats.upstream, ep.label, kind.value)

    def _response_done(self, conn: _UpstreamConnection, reusable: bool,
                       close_agent: bool) -> None:
        """The whole response is relayed: the verdict, the connection back to the pool."""
        req = self._current
        assert req is not None and req.endpoint is not None
        self._conn = None
        conn.proxy = None
        if not (reusable and req.complete):
            conn.close()
        elif close_agent or self._transport is None or conn.state.held >= conn.state.pool_size:
            conn.state.checkin(conn)
        else:
            if conn.reading_paused:  # idle, it must read, to see the upstream close
                conn.resume_reading()
            self._held = conn
            conn.state.held += 1
        if req.failed_status:
            self._failure(req, FailureKind.STATUS)
            outcome = Outcome.FAILED
        else:
            req.admitted = False
            req.endpoint.breaker.record(True, self._time())
            outcome = Outcome.OK
        req.done = True
        self._finish(req, outcome, close=close_agent)

    def _finish(self, req: _Request, outcome: Outcome, close: bool = False,
                cut: bool = False) -> None:
        assert req.state is not None  # routed
        stats = req.state.stats
        stats.active -= 1
        stats.done(outcome, self._time() - req.started)
        self._end(req, close, cut)

    def _end(self, req: _Request, close: bool = False, cut: bool = False) -> None:
        """The agent has its answer (or all it will get, when `cut`): write it, then
        the next request's turn."""
        self._current = None
        self._wire.clear()
        self._wire_bytes = 0
        if self._paused & _UPSTREAM_FULL:
            self._resume(_UPSTREAM_FULL)
        self._send_reply()
        transport = self._transport
        if transport is None:
            return
        if cut:
            reset(transport)
            return
        if close or not req.keep_alive:
            self._release_held()
            transport.close()
            return
        if self._owed is not None:
            self._release_held()
            transport.write(self._owed)
            transport.close()
            return
        if not self._advancing:  # else called from _advance (a queued request answered)
            self._advance()

    def _advance(self) -> None:
        """The next requests' turn, in order, until one is in flight."""
        # A method of its own, not the end of `_end`: there `_current` was just set to
        # None, and a type checker (and mypyc's compiled code) would take it to stay None
        # across the `_start` calls below.
        self._advancing = True
        try:
            queue = self._queue
            while self._current is None and queue and self._transport is not None:
                self._start(queue.popleft())
            if self._eof and self._current is None and self._transport is not None:
                self._release_held()
                self._transport.close()
                return
            if self._paused & _BACKLOG:
                self._check_backlog()
            if self._wire:
                self._flush_wire()
        finally:
            self._advancing = False

    def _send_reply(self) -> None:
        reply = self._reply
        if reply:
            req = self._current
            if req is not None:
                req.replied = True
            if self._transport is not None:
                self._send(reply[0] if len(reply) == 1 else b"".join(reply))
            reply.clear()

    def _abandon(self, req: _Request, outcome: Outcome) -> None:
        """End an exchange that cannot complete (the agent left, or its request broke):
        the breaker gets no verdict, since the upstream gave none; the upstream
        connection is mid-exchange and goes."""
        self._current = None
        req.done = True
        self._drop_conn()
        assert req.state is not None  # routed
        if req.admitted:
            req.admitted = False
            assert req.endpoint is not None
            req.endpoint.breaker.release()
        stats = req.state.stats
        stats.active -= 1
        stats.done(outcome, self._time() - req.started)

    def _release_held(self) -> None:
        conn = self._held
        if conn is not None:
            self._held = None
            conn.state.held -= 1
            conn.state.checkin(conn)

    def _drop_conn(self) -> None:
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.proxy = None
            conn.close()

    # --- bad input, tunnels, flow control --------------------------------------------

    def _refuse(self, reply: bytes) -> None:
        """The agent's bytes are not HTTP we serve: answer once, in turn, and close."""
        self._pause(_BACKLOG)
        self._queue.clear()
        req = self._current
        transport = self._transport
        assert transport is not None  # from data_received
        if req is not None and req is self._parsing and not req.complete:
            # What broke is the body of the request in flight: it cannot be completed.
            self._abandon(req, Outcome.BAD_REQUEST)
            if req.replied:
                self._send_reply()
                reset(transport)
                return
            self._reply.clear()
        else:
            upstream = self._fixed
            if upstream is not None:
                upstream.stats.done(Outcome.BAD_REQUEST, 0.0)
            if req is not None:
                self._owed = reply  # after the answer the agent is waiting for
                if self._wire:  # what it asked before the bad bytes still goes
                    self._flush_wire()
                return
        self._release_held()
        transport.write(reply)
        transport.close()

    def _upgraded(self, rest: bytes) -> None:
        req = self._parsing
        assert req is not None
        if not req.tunnel:
            # Another protocol was asked for; Upgrade is not forwarded, so the upstream
            # answers in HTTP/1.1 and what follows is the next request.
            if rest:
                self.data_received(rest)
            elif self._wire:
                self._flush_wire()
            return
        if not self._forward:
            self._refuse(_NOT_A_TUNNEL)
            return
        if self._current is not None or self._queue:
            self._refuse(_BAD_REQUEST)  # a tunnel behind pipelined requests: not HTTP
            return
        host, port = _host_port(req.target)
        upstream = self._routed(host, port) if port else None
        transport = self._transport
        assert transport is not None  # from data_received
        if upstream is None:
            if port and self._on_unrouted is not None:
                self._on_unrouted(host, port)
            transport.write(_NO_ROUTE if port else _BAD_REQUEST)
            transport.close()
            return
        self._transport = None  # the relay owns it now
        self._release_held()
        adopt(transport, TcpRelay(upstream, greeting=_CONNECT_OK, refusal=_tunnel_refusal),
              rest)

    def _routed(self, host: bytes, port: int) -> Upstream | None:
        try:
            return self._route(host, port)
        except Exception:  # a router bug must cost one request, not the connection
            log.exception("no route for %r port %d", host, port)
            return None

    def _check_backlog(self) -> None:
        over = (len(self._queue) >= self._max_pending_requests
                or self._queued_bytes > self._max_pending_bytes
                or self._wire_bytes > self._max_pending_bytes)
        if over:
            self._pause(_BACKLOG)
        elif self._paused & _BACKLOG and self._owed is None:
            self._resume(_BACKLOG)

    def _pause(self, reason: int) -> None:
        if not self._paused and self._transport is not None:
            self._transport.pause_reading()
        self._paused |= reason

    def _resume(self, reason: int) -> None:
        paused = self._paused
        self._paused = paused & ~reason
        if paused and not self._paused and self._transport is not None:
            self._transport.resume_reading()


class _UpstreamConnection(asyncio.Protocol):
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
        "head_raw", "in_head", "heads",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, state: _UpstreamState,
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
        self.mode = _NO_BODY
        self.informational = False
        self.eof_body = False  # the body ends when the upstream closes
        self.close_agent = False
        self.keeps = False  # the answer keeps the connection, known from its head
        self.capture: list[bytes] | None = None  # a 2xx GET being kept for LAST_GOOD
        self.capture_bytes = 0
        self.head_raw = 0
        self.in_head = True
        self.heads = 0

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
                self.proxy._upstream_failed(self, FailureKind.CONNECT_TIMEOUT)

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
                self.proxy._upstream_failed(self, kind)

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
        proxy._connected(self)

    def data_received(self, data: bytes) -> None:
        proxy = self.proxy
        if proxy is None:  # an idle connection must stay silent; this one is not HTTP
            self.close()
            return
        self.got_bytes = True
        heads = self.heads
        was_in_head = self.in_head
        if was_in_head:  # as in HttpProxy.data_received (inline there too, per read)
            part = self.head_part
            if part:
                self.head_buf = part + data
                self.head_part = b""
            else:
                self.head_buf = data
            self.head_at = 0
        try:
            self.feed(data)
        except httptools.HttpParserError as exc:
            if isinstance(exc, httptools.HttpParserCallbackError) and not isinstance(
                    exc.__context__, (_HeadTooLarge, _BadMessage)):
                log.error("upstream response callback failed", exc_info=exc.__context__)
            self._malformed()
            return
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
        if proxy is not None and proxy._reply:  # else the answer has been written
            proxy._send_reply()

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
            if self.mode == _RECHUNK:
                proxy._reply.append(_LAST_CHUNK)
            proxy._response_done(self, False, self.close_agent)
        else:
            proxy._upstream_failed(self, FailureKind.RESET)

    def pause_writing(self) -> None:
        # The upstream reads slower than the agent sends: stop reading the agent.
        if self.proxy is not None:
            self.proxy._pause(_UPSTREAM_FULL)

    def resume_writing(self) -> None:
        if self.proxy is not None:
            self.proxy._resume(_UPSTREAM_FULL)

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
            proxy._upstream_failed(self, FailureKind.MALFORMED)

    # --- the response parser's callbacks ---------------------------------------------

    def on_message_begin(self) -> None:
        if self.head_at < 0:
            # Bytes after a complete response, in the same read: an answer to nothing
            # asked (one request at a time is sent). Never taken for the next answer.
            raise _BadMessage

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.heads += 1
        proxy = self.proxy
        if proxy is None:
            raise _BadMessage  # a response to nothing we sent
        buf = self.head_buf
        at = self.head_at
        # llhttp accepted the head, and it refuses bare LF: the first blank line ends it.
        # (partition: see HttpProxy.on_headers_complete)
        end = (len(buf.partition(b"\r\n\r\n")[0]) if at == 0 and len(buf) <= _SMALL_READ
               else buf.index(b"\r\n\r\n", at)) + 4
        self.head_at = end  # a 1xx answer is followed by the next head at once
        head = buf[at:end]
        if len(head) > self.max_header_bytes:
            raise _HeadTooLarge
        self.head_raw = 0
        req = proxy._current
        if req is None:
            raise _BadMessage  # an exchange ended early (say, at a 504) has no answer
        # Most answers are 200s from HTTP/1.1 servers: no call for the code.
        status = 200 if head.startswith(b"HTTP/1.1 200 ") else self.parser.get_status_code()
        reply = proxy._reply
        if status < 200:
            if status == 101:
                raise _BadMessage  # we never ask to switch protocols
            # 100 Continue and friends: the agent may be waiting for one (not 1.0).
            self.informational = True
            if not req.http10:  # with its fields (103 Early Hints has Link)
                line_end = head.index(b"\r\n")
                reply.append(_status_line(head, line_end))
                reply.append(b"\r\n")
                fields = head[line_end + 2:-2]
                if fields:
                    reply.append(_without(fields, _NOT_FORWARDED))
                reply.append(b"\r\n")
            return
        state = self.state
        method = req.method
        # An upstream gives the same few heads over and over, differing in digits (Date,
        # Content-Length): what its fields say is kept per head with its digits zeroed,
        # a dict lookup instead of a scan of the head. Exact: no field name or value it
        # looks at has a digit, and zeroing keeps a digit a digit (see `_known`).
        if head == state.last_head:
            known = state.last_known
        else:
            shape = head.translate(_ZERO_DIGITS)
            found = state.framings.get(shape)
            known = found if found is not None else _known(head, shape, state.framings)
            state.last_head = head
            state.last_known = known
        if (isinstance(known, int) and req.keep_alive and not req.http10
                and method != b"HEAD" and head.startswith(b"HTTP/1.1 ")
                and (state.last_good is None or method != b"GET" or status >= 300)):
            # The common answer goes to the agent as it came: its only framing and
            # hop-by-hop fields are Content-Length, chunked, and Connection: keep-alive,
            # which is also the proxy's own option for this agent connection (RFC 9110
            # 7.6.1 lets a proxy replace Connection with its own). Any other answer
            # takes the long way below, which rebuilds the head.
            req.failed_status = status in state.failure_statuses
            self.length = known == _AS_IS
            self.mode = known
            self.capture = None
            self.eof_body = False
            self.close_agent = False
            # What llhttp would say: HTTP/1.1, no close, framed by length or chunks.
            self.keeps = True
            reply.append(head)
            return
        self.keeps = False  # ask the parser at the end
        found = known if isinstance(known, list) else _FRAMING_FIELDS.findall(head.lower())
        line_end = head.index(b"\r\n")
        status_line = _status_line(head, line_end)
        fields, self.length, te = _response_fields(head, line_end, found)
        req.failed_status = status in state.failure_statuses
        if state.last_good is not None and method == b"GET" and 200 <= status < 300:
            self.capture = [status_line, b"\r\n", fields]
            self.capture_bytes = 0
        else:
            self.capture = None
        reply.append(status_line)
        reply.append(b"\r\n")
        reply.append(fields)
        close_agent = not req.keep_alive
        self.eof_body = False
        # The proxy frames the body afresh: the codings other than chunked (and
        # identity, which means none) stay, and chunked ends the list.
        rechunked = _rechunked(te) if te is not None else _CHUNKED
        if method == b"HEAD" or status == 204 or status == 304:
            self.mode = _NO_BODY
            if te is not None and method == b"HEAD" and not req.http10:
                reply.append(rechunked)
        elif te is None and self.length:
            self.mode = _AS_IS
        else:  # chunked, or delimited by the upstream's close
            # llhttp reads a body whose last coding is not chunked to the close.
            self.eof_body = te is None or not te.lower().endswith(b"chunked")
            if req.http10:  # no chunked for 1.0: the close delimits the body
                self.mode = _AS_IS
                close_agent = True
            else:
                self.mode = _RECHUNK
                reply.append(rechunked)
        self.close_agent = close_agent
        if close_agent:
            reply.append(_CLOSE)
        elif req.http10:
            reply.append(_KEEP_ALIVE)
        reply.append(b"\r\n")
        if method == b"HEAD":
            # httptools cannot be told a response has no body, so a HEAD answer with a
            # length would leave the parser waiting for it: this connection ends here.
            proxy._response_done(self, False, close_agent)

    def on_body(self, body: bytes) -> None:
        proxy = self.proxy
        if proxy is None or not body:
            return
        if self.mode == _RECHUNK:
            proxy._reply.append(b"%x\r\n%b\r\n" % (len(body), body))
        else:
            proxy._reply.append(body)
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
        req = proxy._current
        ep = req.endpoint if req is not None else None
        if req is None or ep is None:
            raise _BadMessage  # as in on_headers_complete
        if self.mode == _RECHUNK:
            proxy._reply.append(_LAST_CHUNK)
        capture = self.capture
        if capture is not None:
            self.capture = None
            self._remember(req.target, capture)
        transport = proxy._transport
        state = self.state
        if (req.failed_status or self.close_agent or self.reading_paused or transport is None
                or state.held >= state.pool_size
                or proxy._queue or proxy._paused or proxy._owed is not None or proxy._eof
                or not req.complete or not (self.keeps or self.parser.should_keep_alive())):
            proxy._response_done(self, self.keeps or self.parser.should_keep_alive(),
                                 self.close_agent)
            return
        # The common ending, inline: `_response_done`, `_finish`, `_end` and
        # `_send_reply` for a good answer on a connection both sides keep, with nothing
        # queued behind it and no flow control engaged (each of those takes the long way).
        proxy._conn = None
        self.proxy = None
        proxy._held = self
        state.held += 1
        req.admitted = False
        req.done = True
        now = self._time()
        breaker = ep.breaker
        if not breaker.closed:
            breaker.record(True, now)
        stats = state.stats
        stats.active -= 1
        stats.done(_OK, now - req.started)
        proxy._current = None
        if proxy._wire:
            proxy._wire.clear()
            proxy._wire_bytes = 0
        reply = proxy._reply
        if reply:
            proxy._send(reply[0] if len(reply) == 1 else b"".join(reply))
            reply.clear()

    def _remember(self, target: bytes, capture: list[bytes]) -> None:
        """Keep a 2xx GET answer for LAST_GOOD, framed by length whatever its framing."""
        length = b"" if self.length else b"Content-Length: %d\r\n" % self.capture_bytes
        self.state.remember(target, b"".join(
            (*capture[:3], length, _FALLBACK_LAST_GOOD, b"\r\n", *capture[3:])))


def _is_address(host: str) -> bool:
    """An IP literal (connects without a lookup), not a name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _choose_other(upstream: Upstream, failed: Endpoint, now: float) -> Endpoint | None:
    """`Upstream.choose` for a retry: the nearest admitting endpoint other than the one
    that just failed (whose breaker may not have tripped yet), else that one again."""
    for ep in upstream.endpoints:
        if ep is not failed and ep.breaker.allow(now):
            return ep
    return failed if failed.breaker.allow(now) else None


def _tunnel_refusal(reason: str) -> bytes:
    """The answer to a CONNECT the L4 relay could not open."""
    return _TUNNEL_OPEN if reason.startswith("circuit breaker open") else _TUNNEL_REFUSED


def _split_target(url: bytes, host: bytes | None) -> tuple[bytes, bytes]:
    """A forward proxy's request target -> (authority, origin-form target)."""
    if url[:7].lower() == b"http://":
        rest = url[7:]
        end = len(rest)
        for sep in (b"/", b"?"):
            i = rest.find(sep)
            if 0 <= i < end:
                end = i
        authority, target = rest[:end], rest[end:]
        if not target.startswith(b"/"):
            target = b"/" + target
        authority = authority.rpartition(b"@")[2]  # userinfo is not forwarded
        if authority:
            return authority, target
    elif url.startswith(b"/") and host:
        return host, url  # origin-form to the proxy: the Host header names the destination
    raise _BadMessage  # https:// (use CONNECT), no host, or not a URL


def _host_port(authority: bytes) -> tuple[bytes, int]:
    """b'host:port' -> (b'host', port); port 80 when absent; port 0 when unreadable."""
    host, sep, port = authority.rpartition(b":")
    if not sep or b"]" in port:  # no port, or the colon was inside an IPv6 literal
        host, port = authority, b"80"
    if host.startswith(b"[") and host.endswith(b"]"):
        host = host[1:-1]
    return host, int(port) if port.isdigit() and 0 < int(port) < 65536 else 0


def _known(head: bytes, shape: bytes, framings: dict[bytes, int | list[tuple[bytes, bytes]]]
           ) -> int | list[tuple[bytes, bytes]]:
    """What an answer head's framing and hop-by-hop fields say, kept in `framings` under
    its `shape` (the head with digits zeroed): _AS_IS (Content-Length) or _RECHUNK
    (chunked) when it may go to the agent as it came, else the fields themselves
    (`_FRAMING_FIELDS`), for the rebuild. The fields are kept only when the values the
    rebuild uses (Connection, Transfer-Encoding) have no digit, so that every head of
    that shape has the same ones."""
    found = _FRAMING_FIELDS.findall(head.lower())
    length = chunked = False
    plain = True
    for name, value in found:
        if name == b"content-length":
            length = True
        elif name == b"transfer-encoding" and value == b"chunked":
            chunked = True
        elif name != b"connection" or value != b"keep-alive":
            plain = False
    if plain and (length or chunked):
        known: int | list = _RECHUNK if chunked else _AS_IS
    else:
        known = found
        if any(name in (b"connection", b"transfer-encoding") and value != value.translate(
                _ZERO_DIGITS) for name, value in found):
            return known  # not kept
    if len(framings) >= _FRAMINGS_MAX:
        framings.clear()
    framings[shape] = known
    return known


def _request_known(fields: bytes, shape: bytes, shapes: dict[bytes, _RequestShape]
                   ) -> _RequestShape:
    """What a request's header lines (as llhttp accepted them, each with its CRLF) say,
    kept in `shapes` under their `shape` (digits zeroed): (the spans of `fields` to
    forward, in order, as start, end, start, end...; the framing: 0 none, 1 Content-Length, _CHUNKED_BODY; the
    Connection value or None). Left out: Host (the endpoint's goes instead), hop-by-hop
    fields and those Connection names. Kept only when the Connection value has no
    digit, so that every request of that shape names the same fields."""
    cut: list[tuple[int, int]] = []
    framing = 0
    connection = None
    # Each line begins after a CRLF, the first one too.
    for m in _REQUEST_FIELDS.finditer(b"\r\n" + fields.lower()):
        name = m.group(1)
        if name == b"content-length":
            framing = framing or 1
            continue
        if name == b"transfer-encoding":
            framing = _CHUNKED_BODY if b"chunked" in m.group(2).lower() else 1
            continue
        if name == b"connection":
            value = m.group(2).strip()
            connection = value if connection is None else b"%s, %s" % (connection, value)
        start = m.start()  # in `fields`: the line's first byte
        cut.append((start, fields.index(b"\r\n", start) + 2))
    if connection is not None and connection not in _PLAIN_CONNECTION:
        names = _listed(connection)
        at = 0
        for line in fields.split(b"\r\n")[:-1]:
            if line[:line.index(b":")].lower() in names:
                cut.append((at, at + len(line) + 2))
            at += len(line) + 2
        cut.sort()
    kept: list[int] = []  # start, end, start, end, ...
    at = 0
    for start, end in cut:
        if start > at:
            kept += (at, start)
        at = max(at, end)
    if at < len(fields) or not kept:
        kept += (at, len(fields))
    known = (tuple(kept), framing, connection)
    if connection is None or connection == connection.translate(_ZERO_DIGITS):
        if len(shapes) >= _FRAMINGS_MAX:
            shapes.clear()
        shapes[shape] = known
    return known


def _status_line(head: bytes, line_end: int) -> bytes:
    """The status line the agent gets: HTTP/1.1 and the upstream's code and reason."""
    return head[:line_end] if head.startswith(b"HTTP/1.1 ") else (
        b"HTTP/1.1" + head[8:line_end])  # llhttp checked the "HTTP/d.d " prefix


def _response_fields(head: bytes, line_end: int, found: list[tuple[bytes, bytes]]
                     ) -> tuple[bytes, bool, bytes | None]:
    """A response head llhttp accepted, where its status line ends, and its framing and
    hop-by-hop fields (`_FRAMING_FIELDS`) -> (the header lines to forward, each with its
    CRLF; whether it has Content-Length; its Transfer-Encoding). Left out: hop-by-hop
    fields, those its Connection header names, and Transfer-Encoding (the proxy frames
    the body afresh)."""
    length = False
    te = connection = None
    for name, value in found:
        if name == b"content-length":
            length = True
        elif name == b"transfer-encoding":
            te = value.strip() if te is None else b"%s, %s" % (te, value.strip())
        elif name == b"connection":
            connection = value if connection is None else b"%s, %s" % (connection, value)
    if length and len(found) == 1 or not found:
        return head[line_end + 2:-2], length, te  # nothing to leave out
    if connection is not None and connection not in _PLAIN_CONNECTION:
        return _without(head[line_end + 2:-2], _NOT_FORWARDED | _listed(connection)), length, te
    # From the CRLF that ends the status line to the last field's end.
    fields = _NOT_FORWARDED_LINES.sub(b"", head[line_end:-4])[2:]
    return fields + b"\r\n" if fields else b"", length, te


def _rechunked(te: bytes) -> bytes:
    """The Transfer-Encoding line for a body the proxy sends chunked, from the one the
    upstream sent: its content codings, then chunked."""
    codings = [c for c in (t.strip() for t in te.split(b","))
               if c and c.lower() != b"chunked" and c.lower() != b"identity"]
    return b"Transfer-Encoding: %s\r\n" % b", ".join([*codings, b"chunked"])


def _listed(connection: bytes) -> set[bytes]:
    """The field names a Connection header lists (RFC 9110 7.6.1), lower-case.
    _BadMessage if it lists a framing field: the message's framing is in doubt."""
    names = {t.strip().lower() for t in connection.split(b",")} - _CONNECTION_OPTIONS
    if names & _FRAMING_NAMES:
        raise _BadMessage
    return names


def _without(fields: bytes, names: frozenset[bytes] | set[bytes]) -> bytes:
    """`fields` (header lines llhttp accepted, each with its CRLF) without those whose
    lower-case name is in `names`."""
    return b"".join([line + b"\r\n" for line in fields.split(b"\r\n")[:-1]
                     if line[:line.index(b":")].lower() not in names])


def serve_upstream(upstream: Upstream) -> Callable[[], HttpProxy]:
    """The protocol factory of a per-upstream listener: every request goes to
    `upstream`, with Host rewritten to the chosen endpoint's host:port."""
    route = lambda host, port: upstream  # noqa: E731
    return lambda: HttpProxy(route)


def serve_forward(route: Callable[[bytes | None, int | None], Upstream | None]
                  ) -> Callable[[], HttpProxy]:
    """The protocol factory of the forward proxy (HTTP_PROXY): absolute-form targets go
    to `route(host, port)`, in origin-form; CONNECT host:port becomes an L4 tunnel."""
    return lambda: HttpProxy(route, forward=True)
