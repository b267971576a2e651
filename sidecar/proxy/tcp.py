"""The L4 relay: one agent connection spliced to one upstream connection.

Owns what the sidecar does to a TCP byte stream it does not parse: pick an endpoint the
breaker admits, connect with a deadline, hand the breaker its verdict (refused, connect
timeout, reset, no answer), close connections that stay idle, and carry half-closes and
backpressure through. Used by the per-upstream listeners (`serve_upstream`), the
transparent listener and HTTP CONNECT tunnels (`adopt` a transport another protocol
accepted).

The one idea: two raw asyncio Protocols that write straight into each other's transports,
with backpressure wired crosswise (a full write buffer on one side pauses reading on the
other), so a relayed chunk costs one `write()` and one clock read: no task, no await, no
copy, no timer work. Per connection there is one task (the connect) and one timer handle,
first the connect deadline, then the check of the response and idle deadlines, which
re-arms itself from times the data path stamps instead of being cancelled and re-armed
on every chunk.

Response timeout: a connection made proves only that the kernel accepts; a server whose
process hangs still does. So once bytes from the agent are owed an answer (the oldest
agent bytes relayed since the upstream last sent any: each request of a request/reply
exchange) and the upstream sends nothing for `response_timeout_s`, that is a breaker
failure. The breaker's success verdict, likewise, waits for the upstream's first bytes;
with the response timeout off (0) it is given at connect, as a one-way stream never
hears back. An upstream that speaks first owes nothing until the agent speaks after it.

Failures end the agent's connection with a TCP reset (RST), not a FIN: the agent is
released at once and sees an error (ECONNRESET), never a clean end of stream that it
could take for a complete, empty answer. When the caller passes `refusal` (HTTP CONNECT),
the agent gets those bytes and a FIN instead, as long as nothing was relayed yet.

Compiled: this module is part of the hot path mypyc compiles (sidecar/compile.py), so its
types are exact, not hints: mypyc checks declared attribute and argument types at run
time, and narrows an attribute after an assignment in a method (read it in another
method if a call in between may change it). The tests run it compiled and interpreted.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import Callable, Final

from sidecar.metrics import FailureKind, Outcome
from sidecar.upstream import Endpoint, Upstream

log = logging.getLogger(__name__)

# SO_LINGER on with 0 s: close() drops the buffers and sends RST instead of FIN.
_LINGER_RESET = struct.pack("ii", 1, 0)

# uvloop's clock and timers have millisecond resolution: a timer may fire a hair before
# the deadline as loop.time() reads it. Within this slack the deadline counts as reached
# (otherwise the check would re-arm for a zero delay and spin).
_TIMER_SLACK_S: Final = 0.002

# Connection states: plain ints, read on every event, never shown.
_CONNECTING: Final = 0
_RELAYING: Final = 1
_CLOSED: Final = 2


class TcpRelay(asyncio.Protocol):
    """The agent side of one relayed connection (the protocol of the agent's transport)."""

    __slots__ = (
        # fixed for the relay's life
        "_upstream", "_greeting", "_refusal", "_loop", "_time",
        # the connection
        "_agent", "_up", "_ep", "_state", "_outcome", "_started", "_timer", "_last",
        "_asked", "_due",
        # until the upstream is connected
        "_connect", "_pending", "_pending_bytes",
        # half-close: each side's FIN seen
        "_agent_eof", "_up_eof",
    )

    # The loop's clock, bound once in connection_made, before anything reads it. Declared
    # here rather than set to None in __init__: it is read per relayed chunk, where a
    # None check would cost.
    _time: Callable[[], float]

    def __init__(self, upstream: Upstream, *, greeting: bytes | None = None,
                 refusal: Callable[[str], bytes] | None = None):
        self._upstream = upstream
        self._greeting = greeting  # written to the agent once the upstream is connected
        self._refusal = refusal  # reason -> bytes for the agent when nothing can be relayed
        self._loop: asyncio.AbstractEventLoop | None = None

        self._agent: asyncio.Transport | None = None
        self._up: asyncio.Transport | None = None
        self._ep: Endpoint | None = None
        self._state = _CONNECTING
        self._outcome = Outcome.OK
        self._started = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._last = 0.0  # loop time of the last byte relayed either way
        # Loop time of the oldest agent bytes relayed since the upstream last sent any;
        # 0.0 when nothing is owed (loop time is monotonic and never 0 in practice).
        self._asked = 0.0
        # The breaker admitted this call and is owed exactly one record() or release().
        self._due = False

        self._connect: asyncio.Task | None = None
        self._pending: list[bytes] | None = None
        self._pending_bytes = 0

        self._agent_eof = False
        self._up_eof = False

    # --- the agent's transport -----------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        loop = self._loop = asyncio.get_running_loop()
        self._time = loop.time
        now = self._started = loop.time()
        self._agent = transport
        upstream = self._upstream
        upstream.stats.active += 1
        ep = upstream.choose(now)
        if ep is None:
            self._state = _CLOSED
            self._outcome = Outcome.REJECTED
            self._end_agent(f"circuit breaker open for {upstream.name}")
            return
        self._ep = ep
        self._due = True
        policy = upstream.policy
        transport.set_write_buffer_limits(policy.max_pending_bytes)
        self._timer = loop.call_at(now + policy.connect_timeout_s, self._connect_timed_out)
        self._connect = loop.create_task(self._open(ep))

    def data_received(self, data: bytes) -> None:
        up = self._up
        if up is not None:
            up.write(data)
            now = self._last = self._time()
            if self._asked == 0.0:
                self._asked = now
        elif self._state == _CONNECTING:
            # uvloop reads before the upstream can be connected (and ignores a pause made
            # in connection_made): hold the bytes, bounded, and stop reading beyond that.
            pending = self._pending
            if pending is None:
                self._pending = [data]
            else:
                pending.append(data)
            self._pending_bytes += len(data)
            if self._pending_bytes > self._upstream.policy.max_pending_bytes:
                agent = self._agent
                assert agent is not None  # set in connection_made
                agent.pause_reading()
        # _CLOSED: the relay is over and the bytes have nowhere to go.

    def eof_received(self) -> bool:
        self._agent_eof = True
        up = self._up
        if up is not None and self._state == _RELAYING:
            if self._up_eof:
                self._close_both()
            else:
                up.write_eof()
        # Before the upstream is connected the FIN is remembered and passed on after the
        # held bytes. True keeps our write side open: the upstream may still answer.
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        state = self._state
        self._state = _CLOSED
        if state == _CONNECTING:
            timer, connect = self._timer, self._connect
            # connection_made chose an endpoint, armed the deadline and started the connect
            assert timer is not None and connect is not None
            timer.cancel()
            connect.cancel()
        elif state == _RELAYING:
            timer, up = self._timer, self._up
            assert timer is not None and up is not None  # set in _upstream_made
            timer.cancel()
            if exc is None:
                up.close()  # flush what the agent sent, then FIN
            else:
                up.abort()
        if self._due:
            # Ended before the upstream gave a verdict (the agent left while connecting,
            # or nobody said anything): the admitted call ends with none.
            self._due = False
            ep = self._ep
            assert ep is not None  # chosen when the call was admitted
            ep.breaker.release()
        stats = self._upstream.stats
        stats.active -= 1
        stats.done(self._outcome, self._time() - self._started)

    def pause_writing(self) -> None:
        # The agent reads slower than the upstream sends: stop reading the upstream.
        up = self._up
        if up is not None:
            up.pause_reading()

    def resume_writing(self) -> None:
        up = self._up
        if up is not None and not self._up_eof:  # reading again after a FIN re-reports it
            up.resume_reading()

    # --- connecting ----------------------------------------------------------------

    async def _open(self, ep: Endpoint) -> None:
        loop = self._loop
        assert loop is not None  # set in connection_made, which starts this task
        try:
            await loop.create_connection(self._upstream_side, ep.host, ep.port)
            return
        except asyncio.CancelledError:
            return  # the connect deadline passed or the agent left: handled there
        except ConnectionRefusedError:
            kind, reason = FailureKind.REFUSED, "connection refused"
        except TimeoutError:  # the kernel gave up first (ETIMEDOUT)
            kind, reason = FailureKind.CONNECT_TIMEOUT, "connect timed out"
        except ConnectionResetError:
            kind, reason = FailureKind.RESET, "connection reset while connecting"
        except OSError as exc:
            # Unreachable, no route, unresolvable: for the agent as for the breaker the
            # endpoint cannot take connections, which is what "refused" counts.
            kind, reason = FailureKind.REFUSED, exc.strerror or str(exc)
        if self._state == _CONNECTING:
            self._fail(kind, reason)

    def _upstream_side(self) -> _UpstreamSide:
        return _UpstreamSide(self)

    def _connect_timed_out(self) -> None:
        if self._state == _CONNECTING:
            connect = self._connect
            assert connect is not None  # started right after this timer was armed
            connect.cancel()
            self._fail(FailureKind.CONNECT_TIMEOUT,
                       f"no connection within {self._upstream.policy.connect_timeout_s:g} s")

    def _upstream_made(self, transport: asyncio.Transport) -> None:
        if self._state != _CONNECTING:
            # The deadline passed or the agent left in the same loop turn; the verdict
            # (or release) is already given.
            transport.abort()
            return
        loop, ep, timer, agent = self._loop, self._ep, self._timer, self._agent
        # Still connecting: connection_made set these and chose the endpoint being opened.
        assert loop is not None and ep is not None and timer is not None and agent is not None
        self._state = _RELAYING
        self._up = transport
        now = self._time()
        policy = self._upstream.policy
        if policy.response_timeout_s <= 0.0:
            self._due = False
            ep.breaker.record(True, now)
        transport.set_write_buffer_limits(policy.max_pending_bytes)
        timer.cancel()
        self._last = now
        self._timer = loop.call_at(self._next_check(now), self._check)

        if self._greeting:
            agent.write(self._greeting)
        pending = self._pending
        if pending is not None:
            self._pending = None
            # Resume before writing: the write may pause the agent again, rightly.
            if self._pending_bytes > policy.max_pending_bytes:
                agent.resume_reading()
            transport.write(pending[0] if len(pending) == 1 else b"".join(pending))
            self._asked = now
        if self._agent_eof:
            transport.write_eof()

    # --- the upstream's transport (via _UpstreamSide) --------------------------------

    def _upstream_eof(self) -> bool:
        self._up_eof = True
        # It has said all it will: nothing more can be owed (a server that hangs up
        # without answering is not a hung one).
        self._asked = 0.0
        if self._state == _RELAYING:
            if self._agent_eof:
                self._close_both()
            else:
                agent = self._agent
                assert agent is not None  # set in connection_made
                agent.write_eof()
        return True

    def _upstream_lost(self, exc: Exception | None) -> None:
        if self._state != _RELAYING:
            return  # we closed it, or the relay ended first
        if exc is not None:
            self._fail(FailureKind.RESET, f"connection reset by upstream ({exc})")
        else:
            self._state = _CLOSED
            timer, agent = self._timer, self._agent
            assert timer is not None and agent is not None  # relaying: both set
            timer.cancel()
            agent.close()

    # --- timers and endings --------------------------------------------------------

    def _answered(self) -> None:
        """The upstream's first bytes: it works, whatever the agent makes of them."""
        self._due = False
        ep = self._ep
        assert ep is not None  # relaying
        ep.breaker.record(True, self._last)

    def _next_check(self, now: float) -> float:
        """When `_check` must look next: the idle deadline, or sooner the response
        deadline. With nothing owed it still looks every response_timeout_s, so that a
        request the data path stamps meanwhile is caught on time without the data path
        touching the timer."""
        policy = self._upstream.policy
        at = self._last + policy.idle_timeout_s
        response_s = policy.response_timeout_s
        if response_s > 0.0:
            asked = self._asked
            at = min(at, (asked if asked != 0.0 else now) + response_s)
        return at

    def _check(self) -> None:
        if self._state != _RELAYING:
            return
        now = self._time()
        policy = self._upstream.policy
        response_s = policy.response_timeout_s
        if response_s > 0.0:
            asked = self._asked
            if asked != 0.0:
                if now + _TIMER_SLACK_S >= asked + response_s:
                    self._fail(FailureKind.TIMEOUT, f"no answer within {response_s:g} s")
                    return
            elif self._due:
                # response_s since the connect and not a byte either way: there is no
                # verdict to give yet, and in half-open this call holds a probe slot
                # other agents wait for. Give it back; a later answer is not counted.
                self._due = False
                ep = self._ep
                assert ep is not None  # relaying
                ep.breaker.release()
        if now + _TIMER_SLACK_S < self._last + policy.idle_timeout_s:
            loop = self._loop
            assert loop is not None  # set in connection_made
            self._timer = loop.call_at(self._next_check(now), self._check)
            return
        ep, agent, up = self._ep, self._agent, self._up
        assert ep is not None and agent is not None and up is not None  # relaying: all set
        # Counted, but not a breaker failure: an idle connection says nothing about the
        # upstream's health (an agent may simply have nothing to say).
        self._state = _CLOSED
        self._upstream.stats.failed(FailureKind.IDLE_TIMEOUT, ep.label)
        # Nothing moved for idle_timeout_s, so whatever is still buffered never will.
        agent.abort()
        up.abort()

    def _close_both(self) -> None:
        """Both sides sent FIN: flush what is buffered and close."""
        timer, agent, up = self._timer, self._agent, self._up
        assert timer is not None and agent is not None and up is not None  # relaying: all set
        self._state = _CLOSED
        timer.cancel()
        agent.close()
        up.close()

    def _fail(self, kind: FailureKind, reason: str) -> None:
        """The upstream failed this connection: a breaker verdict, a count, and the agent
        released at once."""
        timer, ep = self._timer, self._ep
        # Connecting or relaying: the endpoint was chosen and a timer armed.
        assert timer is not None and ep is not None
        self._state = _CLOSED
        self._due = False
        timer.cancel()
        ep.breaker.record(False, self._time(), reason)
        self._upstream.stats.failed(kind, ep.label)
        self._outcome = Outcome.FAILED
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: %s: %s", self._upstream.name, ep.label, reason)
        self._end_agent(f"{self._upstream.name} ({ep.label}): {reason}")

    def _end_agent(self, reason: str) -> None:
        agent, refusal = self._agent, self._refusal
        assert agent is not None  # set in connection_made
        if refusal is not None and self._up is None:
            agent.write(refusal(reason))
            agent.close()
        else:
            reset(agent)


class _UpstreamSide(asyncio.Protocol):
    """The protocol of the upstream's transport: its bytes go straight to the agent."""

    __slots__ = ("relay", "agent", "time")

    def __init__(self, relay: TcpRelay):
        agent = relay._agent
        assert agent is not None  # the relay opens its upstream from its connection_made
        self.relay = relay
        self.agent = agent
        self.time = relay._time

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.relay._upstream_made(transport)

    def data_received(self, data: bytes) -> None:
        self.agent.write(data)
        relay = self.relay
        relay._last = self.time()
        relay._asked = 0.0
        if relay._due:
            relay._answered()

    def eof_received(self) -> bool:
        return self.relay._upstream_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay._upstream_lost(exc)

    def pause_writing(self) -> None:
        # The upstream reads slower than the agent sends: stop reading the agent.
        self.agent.pause_reading()

    def resume_writing(self) -> None:
        if not self.relay._agent_eof:  # reading again after a FIN re-reports it
            self.agent.resume_reading()


def reset(transport: asyncio.Transport) -> None:
    """Close with RST: the peer's blocked recv/send fails at once with ECONNRESET."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass  # already gone: abort() below is all that is left to do
    transport.abort()


def serve_upstream(upstream: Upstream) -> Callable[[], TcpRelay]:
    """The protocol factory of a listener that relays every connection to `upstream`."""
    return lambda: TcpRelay(upstream)


def adopt(transport: asyncio.Transport, protocol: asyncio.Protocol,
          initial: bytes = b"") -> None:
    """Hand a connected transport to `protocol` as if it had been accepted for it, and
    feed it `initial`: bytes the previous protocol read but did not consume."""
    transport.set_protocol(protocol)
    # The previous protocol may have paused reading (its own backpressure); the new one
    # cannot know, so it starts with reading on, like a freshly accepted connection.
    if not transport.is_reading():
        transport.resume_reading()
    protocol.connection_made(transport)
    if initial and not transport.is_closing():
        protocol.data_received(initial)
