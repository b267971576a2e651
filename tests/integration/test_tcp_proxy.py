"""The L4 relay against real sockets on 127.0.0.1, on uvloop as in production.

Each test runs a real upstream (echo, source, resetter, black hole or nothing at all) and
a real per-upstream listener, and talks to it as an agent would: through a socket.
Nothing sleeps to synchronise; `until` polls a condition against a deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import select
import socket
import struct
import time
from typing import Awaitable, Callable

import uvloop

from sidecar.config import BreakerSettings, UpstreamPolicy
from sidecar.metrics import FailureKind, Outcome
from sidecar.policy.breaker import BreakerState
from sidecar.proxy.tcp import TcpRelay, adopt, serve_upstream
from sidecar.upstream import Upstream

TEST_TIMEOUT_S = 30.0
PROMPT_S = 1.0  # "at once": a failure reaches the agent well within this


def run(coro: Awaitable) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(coro, TEST_TIMEOUT_S))


async def until(condition: Callable[[], object], timeout_s: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; "
                                 f"last: {value!r}")
        await asyncio.sleep(0.005)


def policy(port: int, **kw) -> UpstreamPolicy:
    breaker = kw.pop("breaker", BreakerSettings())
    return UpstreamPolicy(name="up", endpoints=(("127.0.0.1", port),), breaker=breaker, **kw)


def failures(up: Upstream, kind: FailureKind) -> int:
    return up.stats.failures.get((up.endpoints[0].label, kind.value), 0)


# --- upstreams -----------------------------------------------------------------------

class Echo(asyncio.Protocol):
    """Echoes, with flow control of its own; FIN answered with FIN."""

    accepted = 0

    def connection_made(self, transport):
        Echo.accepted += 1
        self.t = transport

    def data_received(self, data):
        self.t.write(data)

    def pause_writing(self):
        self.t.pause_reading()

    def resume_writing(self):
        self.t.resume_reading()

    def eof_received(self):
        return False  # close: our FIN after the echoed bytes


class Source(asyncio.Protocol):
    """Sends `total` bytes of a known stream as fast as the peer lets it, then FIN."""

    def __init__(self, block: bytes, total: int):
        self.block, self.total, self.sent, self.paused = block, total, 0, False

    def connection_made(self, transport):
        self.t = transport
        self._push()

    def _push(self):
        while not self.paused and self.sent < self.total:
            self.t.write(self.block)
            self.sent += len(self.block)
        if self.sent >= self.total and not self.paused:
            self.t.write_eof()

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        self._push()


class Resetter(asyncio.Protocol):
    """Resets the connection (RST) on the first byte it receives."""

    def connection_made(self, transport):
        self.t = transport

    def data_received(self, data):
        self.t.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.t.abort()


class Collector(asyncio.Protocol):
    """Reads until FIN, then answers with how many bytes it got (a half-close client)."""

    def connection_made(self, transport):
        self.t, self.n = transport, 0

    def data_received(self, data):
        self.n += len(data)

    def eof_received(self):
        self.t.write(b"got %d" % self.n)
        return False


class Sidecar:
    """Listeners and servers of one test, closed at the end; relays seen, for
    white-box checks of flow control."""

    def __init__(self):
        self.servers: list[asyncio.AbstractServer] = []
        self.relays: list[TcpRelay] = []

    async def upstream(self, factory) -> int:
        server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        self.servers.append(server)
        return server.sockets[0].getsockname()[1]

    async def listen(self, up: Upstream, factory=None) -> int:
        inner = factory or serve_upstream(up)

        def track():
            relay = inner()
            self.relays.append(relay)
            return relay

        return await self.upstream(track)

    def close(self):
        for s in self.servers:
            s.close()


async def connect(port: int, rcvbuf: int | None = None):
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # also stops autotuning
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock, limit=1 << 20)


async def ended(reader: asyncio.StreamReader, timeout_s: float = PROMPT_S) -> str:
    """How the agent's connection ended ('eof' or 'reset'); fails if it did not end in
    time, or if bytes arrived instead."""
    try:
        data = await asyncio.wait_for(reader.read(1 << 16), timeout_s)
    except ConnectionResetError:
        return "reset"
    assert data == b"", f"expected the connection to end, got {data[:60]!r}"
    return "eof"


def closed_port() -> socket.socket:
    """A port that refuses connections (bound, not listening), held so nobody takes it."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    return s


# --- tests ---------------------------------------------------------------------------

def test_echo_round_trip_and_half_close():
    async def main():
        sc = Sidecar()
        try:
            up = Upstream(policy(await sc.upstream(Echo)))
            port = await sc.listen(up)
            reader, writer = await connect(port)
            writer.write(b"hello")  # before the relay's upstream connect completes
            assert await asyncio.wait_for(reader.readexactly(5), 5) == b"hello"
            assert up.stats.active == 1
            writer.write(b" again")
            assert await asyncio.wait_for(reader.readexactly(6), 5) == b" again"
            writer.write_eof()  # our FIN reaches the echo server, whose FIN comes back
            assert await ended(reader) == "eof"
            writer.close()
            await until(lambda: up.stats.active == 0, what="connection accounted")
            assert up.stats.outcomes[Outcome.OK.value] == 1
            assert up.stats.failures == {}
            assert up.endpoints[0].breaker.state_at(0) is BreakerState.CLOSED
        finally:
            sc.close()

    run(main())


def test_half_close_request_then_response():
    """A client that sends, shuts down its write side, then reads the answer."""
    async def main():
        sc = Sidecar()
        try:
            up = Upstream(policy(await sc.upstream(Collector)))
            reader, writer = await connect(await sc.listen(up))
            writer.write(b"x" * 100_000)
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 5) == b"got 100000"
            writer.close()
            await until(lambda: up.stats.outcomes[Outcome.OK.value] == 1, what="done(OK)")
        finally:
            sc.close()

    run(main())


def test_five_megabytes_both_ways():
    async def main():
        sc = Sidecar()
        try:
            up = Upstream(policy(await sc.upstream(Echo), max_pending_bytes=64 * 1024))
            reader, writer = await connect(await sc.listen(up))
            payload = os.urandom(5 * 1024 * 1024)

            async def send():
                for i in range(0, len(payload), 64 * 1024):
                    writer.write(payload[i:i + 64 * 1024])
                    await writer.drain()

            sending = asyncio.create_task(send())
            echoed = await reader.readexactly(len(payload))
            await sending
            assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
            writer.close()
            await until(lambda: up.stats.active == 0, what="connection accounted")
            assert up.stats.failures == {}
        finally:
            sc.close()

    run(main())


def test_slow_agent_pauses_the_upstream():
    """An agent that does not read: the relay buffers at most about max_pending_bytes
    and stops reading the upstream, so the upstream itself is held back; when the agent
    reads, every byte arrives intact."""
    limit = 256 * 1024
    block = os.urandom(256 * 1024)
    total = 256 * len(block)  # 64 MiB: more than every kernel buffer on the path holds

    async def main():
        sc = Sidecar()
        sources: list[Source] = []

        def source():
            sources.append(Source(block, total))
            return sources[-1]

        try:
            up = Upstream(policy(await sc.upstream(source), max_pending_bytes=limit))
            reader, writer = await connect(await sc.listen(up), rcvbuf=64 * 1024)
            await until(lambda: sc.relays and sc.relays[0]._up is not None, what="relay up")
            relay = sc.relays[0]
            await until(lambda: sources and sources[0].paused and not relay._up.is_reading(),
                        10, "backpressure to reach the upstream")
            # One read (uvloop reads up to 256 KiB) may land after the high-water mark.
            assert relay._agent.get_write_buffer_size() <= limit + 256 * 1024
            assert sources[0].sent < total

            expected = hashlib.sha256()
            got = hashlib.sha256()
            n = 0
            while chunk := await reader.read(1 << 20):
                got.update(chunk)
                n += len(chunk)
            for _ in range(total // len(block)):
                expected.update(block)
            assert n == total and got.digest() == expected.digest()
            writer.close()
        finally:
            sc.close()

    run(main())


def test_refused_trips_the_breaker_then_rejects_without_connecting():
    async def main():
        sc = Sidecar()
        held = closed_port()
        port = held.getsockname()[1]
        try:
            up = Upstream(policy(port, breaker=BreakerSettings(failures=5, open_s=30)))
            listen = await sc.listen(up)
            for i in range(5):
                reader, writer = await connect(listen)
                writer.write(b"hello?")
                assert await ended(reader) == "reset"  # an error, not a clean empty answer
                writer.close()
            breaker = up.endpoints[0].breaker
            loop = asyncio.get_running_loop()
            assert failures(up, FailureKind.REFUSED) == 5
            assert breaker.state_at(loop.time()) is BreakerState.OPEN
            assert "refused" in breaker.trip_reason

            # The upstream comes back, but the breaker is open: no connection reaches it.
            held.close()
            Echo.accepted = 0
            server = await loop.create_server(Echo, "127.0.0.1", port)
            sc.servers.append(server)
            reader, writer = await connect(listen)
            started = time.monotonic()
            assert await ended(reader) == "reset"
            assert time.monotonic() - started < PROMPT_S
            writer.close()
            await until(lambda: up.stats.outcomes[Outcome.REJECTED.value] == 1, what="REJECTED")
            assert Echo.accepted == 0
            assert breaker.rejections == 1
            await until(lambda: up.stats.active == 0, what="all accounted")
            assert up.stats.outcomes[Outcome.FAILED.value] == 5
        finally:
            held.close()
            sc.close()

    run(main())


def test_breaker_recovers_through_half_open():
    async def main():
        sc = Sidecar()
        held = closed_port()
        port = held.getsockname()[1]
        try:
            settings = BreakerSettings(failures=5, open_s=0.3, successes=3, probes=1)
            up = Upstream(policy(port, breaker=settings))
            listen = await sc.listen(up)
            for _ in range(5):
                reader, writer = await connect(listen)
                await ended(reader)
                writer.close()
            breaker = up.endpoints[0].breaker
            loop = asyncio.get_running_loop()
            assert breaker.state_at(loop.time()) is BreakerState.OPEN

            held.close()
            Echo.accepted = 0
            sc.servers.append(await loop.create_server(Echo, "127.0.0.1", port))
            await until(lambda: breaker.state_at(loop.time()) is BreakerState.HALF_OPEN,
                        5, "open_s to pass")
            # Three good probes, one at a time, close it again.
            for i in range(3):
                reader, writer = await connect(listen)
                writer.write(b"probe")
                assert await asyncio.wait_for(reader.readexactly(5), 5) == b"probe"
                writer.close()
                await until(lambda: up.stats.active == 0, what="probe done")
            assert breaker.state_at(loop.time()) is BreakerState.CLOSED
            assert Echo.accepted == 3
        finally:
            held.close()
            sc.close()

    run(main())


def black_hole() -> tuple[socket.socket, list[socket.socket]]:
    """A listener that never accepts, its accept queue filled: the kernel drops further
    SYNs, so a connect hangs as it would to a host that has vanished."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(16):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(listener.getsockname())
        fillers.append(s)
        _, writable, _ = select.select([], [s], [], 0.2)
        if not writable:  # this one's SYN was dropped: the queue is full
            return listener, fillers
    raise AssertionError("could not fill the listener's accept queue")


def test_connect_timeout_against_a_black_hole():
    async def main():
        sc = Sidecar()
        listener, fillers = black_hole()
        try:
            up = Upstream(policy(listener.getsockname()[1], connect_timeout_s=0.3))
            reader, writer = await connect(await sc.listen(up))
            started = time.monotonic()
            writer.write(b"anyone?")
            assert await ended(reader, 3.0) == "reset"
            elapsed = time.monotonic() - started
            assert 0.25 <= elapsed < 0.3 + PROMPT_S, elapsed
            assert failures(up, FailureKind.CONNECT_TIMEOUT) == 1
            loop = asyncio.get_running_loop()
            assert up.endpoints[0].breaker.failures_in_window(loop.time()) == 1
            writer.close()
            await until(lambda: up.stats.outcomes[Outcome.FAILED.value] == 1, what="FAILED")
        finally:
            for s in fillers:
                s.close()
            listener.close()
            sc.close()

    run(main())


def test_upstream_reset_releases_the_agent():
    async def main():
        sc = Sidecar()
        try:
            up = Upstream(policy(await sc.upstream(Resetter)))
            reader, writer = await connect(await sc.listen(up))
            writer.write(b"boom")
            started = time.monotonic()
            assert await ended(reader) == "reset"
            assert time.monotonic() - started < PROMPT_S
            assert failures(up, FailureKind.RESET) == 1
            loop = asyncio.get_running_loop()
            assert up.endpoints[0].breaker.failures_in_window(loop.time()) == 1
            writer.close()
            await until(lambda: up.stats.outcomes[Outcome.FAILED.value] == 1, what="FAILED")
        finally:
            sc.close()

    run(main())


def test_idle_timeout_closes_idle_but_not_busy_connections():
    idle_s = 0.3

    async def main():
        sc = Sidecar()
        try:
            up = Upstream(policy(await sc.upstream(Echo), idle_timeout_s=idle_s))
            port = await sc.listen(up)

            # Busy: a byte every idle_s / 3 for 3 x idle_s keeps it open.
            reader, writer = await connect(port)
            for i in range(9):
                if i:
                    await asyncio.sleep(idle_s / 3)  # pacing the traffic, not synchronising
                writer.write(b".")
                assert await asyncio.wait_for(reader.readexactly(1), 5) == b"."
            last_byte = time.monotonic()
            assert failures(up, FailureKind.IDLE_TIMEOUT) == 0

            # Idle: closed idle_s after the last byte.
            assert await ended(reader, idle_s + 2.0) in ("eof", "reset")
            elapsed = time.monotonic() - last_byte
            assert idle_s - 0.01 <= elapsed < idle_s + PROMPT_S, elapsed
            writer.close()
            await until(lambda: up.stats.active == 0, what="connection accounted")
            assert failures(up, FailureKind.IDLE_TIMEOUT) == 1
            loop = asyncio.get_running_loop()
            # Idle is no verdict on the upstream's health.
            assert up.endpoints[0].breaker.failures_in_window(loop.time()) == 0
        finally:
            sc.close()

    run(main())


def test_greeting_refusal_and_adopt():
    """What HTTP CONNECT uses: a greeting once connected, a refusal when not, and
    adopting a transport another protocol accepted together with bytes it read."""
    greeting = b"HTTP/1.1 200 Connection established\r\n\r\n"

    def refusal(reason: str) -> bytes:
        return b"HTTP/1.1 502 Bad Gateway\r\nX-Reason: " + reason.encode() + b"\r\n\r\n"

    class Head(asyncio.Protocol):
        """Reads one line, then hands the connection to a relay with what followed."""

        def __init__(self, up):
            self.up, self.buf = up, b""

        def connection_made(self, transport):
            self.t = transport

        def data_received(self, data):
            self.buf += data
            if b"\n" in self.buf:
                _, rest = self.buf.split(b"\n", 1)
                adopt(self.t, TcpRelay(self.up, greeting=greeting, refusal=refusal), rest)

    async def main():
        sc = Sidecar()
        held = closed_port()
        try:
            up = Upstream(policy(await sc.upstream(Echo)))
            reader, writer = await connect(await sc.listen(up, lambda: Head(up)))
            writer.write(b"CONNECT somewhere\nearly bytes")
            want = greeting + b"early bytes"
            assert await asyncio.wait_for(reader.readexactly(len(want)), 5) == want
            writer.close()

            dead = Upstream(policy(held.getsockname()[1]))
            reader, writer = await connect(await sc.listen(dead, lambda: Head(dead)))
            writer.write(b"CONNECT nowhere\n")
            answer = await asyncio.wait_for(reader.read(), 5)  # refusal, then a clean FIN
            assert answer.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
            assert b"connection refused" in answer
            writer.close()
            assert failures(dead, FailureKind.REFUSED) == 1
        finally:
            held.close()
            sc.close()

    run(main())


def test_agent_leaving_while_connecting_gives_the_probe_back():
    """An agent that gives up during the connect: no verdict, but the half-open probe
    slot is released so the breaker is not wedged."""
    async def main():
        sc = Sidecar()
        listener, fillers = black_hole()
        try:
            up = Upstream(policy(listener.getsockname()[1], connect_timeout_s=5))
            breaker = up.endpoints[0].breaker
            loop = asyncio.get_running_loop()
            long_ago = loop.time() - 100  # tripped, and open_s has long passed
            for _ in range(5):
                breaker.record(False, long_ago, "test")
            assert breaker.state_at(loop.time()) is BreakerState.HALF_OPEN
            port = await sc.listen(up)
            reader, writer = await connect(port)
            await until(lambda: up.stats.active == 1, what="the probe connecting")
            assert not breaker.allow(loop.time())  # the one probe slot is taken
            # Gone, not half-closed: a FIN would mean "answer me, then close" and the
            # relay would rightly keep connecting.
            writer.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            await until(lambda: up.stats.active == 0, what="relay accounted")
            assert up.stats.failures == {}
            assert breaker.state_at(loop.time()) is BreakerState.HALF_OPEN
            assert breaker.allow(loop.time())  # the slot came back
            breaker.release()
            assert up.stats.outcomes[Outcome.OK.value] == 1
        finally:
            for s in fillers:
                s.close()
            listener.close()
            sc.close()

    run(main())


# --- response timeout: a server that accepts but never answers ---------------------

RESPONSE_S = 0.3  # response_timeout_s in these tests


class Replier(asyncio.Protocol):
    """A request/reply server (one read, one answer, as ZeroMQ REQ/REP) that answers
    `delay_s` after each request, optionally greets first, and stops answering (hangs,
    connection kept) after `answers` replies. `answers=0` is a hung server."""

    accepted = 0

    def __init__(self, *, delay_s: float = 0.0, answers: int = -1, greeting: bytes = b""):
        self.delay_s, self.answers, self.greeting = delay_s, answers, greeting

    def connection_made(self, transport):
        Replier.accepted += 1
        self.t = transport
        if self.greeting:
            self.t.write(self.greeting)

    def data_received(self, data):
        if self.answers == 0:
            return  # stuck: reads (the kernel would anyway) and never answers
        self.answers -= 1
        asyncio.get_running_loop().call_later(self.delay_s, self._answer, b"re:" + data)

    def _answer(self, data):
        if not self.t.is_closing():
            self.t.write(data)


async def ask(reader, writer, request: bytes, timeout_s: float = 5.0) -> bytes:
    writer.write(request)
    return await asyncio.wait_for(reader.readexactly(3 + len(request)), timeout_s)


async def reset_after(reader, writer, request: bytes) -> float:
    """Sends `request`, asserts the agent gets a reset (not a FIN, not bytes) within
    about RESPONSE_S, and returns how long that took."""
    started = time.monotonic()
    writer.write(request)
    assert await ended(reader, RESPONSE_S + 2.0) == "reset"
    elapsed = time.monotonic() - started
    assert RESPONSE_S - 0.01 <= elapsed < RESPONSE_S + PROMPT_S, elapsed
    writer.close()
    return elapsed


def test_hung_upstream_is_reset_and_trips_the_default_breaker():
    """ZeroMQ REQ/REP against a stuck server: each request is a failure the agent sees
    as a reset, and the fleet's default breaker (5 failures in 60 s) opens."""
    async def main():
        sc = Sidecar()
        try:
            up = Upstream(policy(await sc.upstream(lambda: Replier(answers=0)),
                                 response_timeout_s=RESPONSE_S))
            listen = await sc.listen(up)
            for i in range(5):
                reader, writer = await connect(listen)
                await reset_after(reader, writer, b"REQ %d" % i)
            assert failures(up, FailureKind.TIMEOUT) == 5
            breaker = up.endpoints[0].breaker
            loop = asyncio.get_running_loop()
            assert breaker.state_at(loop.time()) is BreakerState.OPEN
            assert "no answer within 0.3 s" in breaker.trip_reason
            await until(lambda: up.stats.active == 0, what="all accounted")
            assert up.stats.outcomes[Outcome.FAILED.value] == 5

            # Open: the next agent is reset at once, and the stuck server sees no one.
            accepted = Replier.accepted
            reader, writer = await connect(listen)
            started = time.monotonic()
            assert await ended(reader) == "reset"
            assert time.monotonic() - started < RESPONSE_S
            writer.close()
            await until(lambda: up.stats.outcomes[Outcome.REJECTED.value] == 1, what="REJECTED")
            assert Replier.accepted == accepted
        finally:
            sc.close()

    run(main())


def test_slow_answers_within_the_response_timeout_are_not_failures():
    """Each request gets its own RESPONSE_S: four rounds that take twice as long in all
    are fine, and so is an agent that says nothing for a while (nothing was asked)."""
    async def main():
        sc = Sidecar()
        try:
            up = Upstream(policy(await sc.upstream(lambda: Replier(delay_s=RESPONSE_S / 2)),
                                 response_timeout_s=RESPONSE_S))
            reader, writer = await connect(await sc.listen(up))
            for i in range(4):
                assert await ask(reader, writer, b"REQ %d" % i) == b"re:REQ %d" % i
            await asyncio.sleep(2 * RESPONSE_S)  # the agent's own silence, not a wait
            assert await ask(reader, writer, b"again") == b"re:again"
            writer.write_eof()
            writer.close()
            await until(lambda: up.stats.active == 0, what="connection accounted")
            assert up.stats.failures == {}
            assert up.stats.outcomes[Outcome.OK.value] == 1
        finally:
            sc.close()

    run(main())


def test_server_first_protocol_is_not_a_failure():
    """The upstream speaks first (SMTP, MySQL, a ZMTP greeting) and the agent answers
    late: the upstream owes nothing until the agent has spoken after its last bytes."""
    async def main():
        sc = Sidecar()
        try:
            up = Upstream(policy(
                await sc.upstream(lambda: Replier(delay_s=RESPONSE_S / 2, greeting=b"220 ready\n")),
                response_timeout_s=RESPONSE_S))
            reader, writer = await connect(await sc.listen(up))
            assert await asyncio.wait_for(reader.readexactly(10), 5) == b"220 ready\n"
            await asyncio.sleep(2 * RESPONSE_S)  # the agent thinks; nothing is owed
            assert await ask(reader, writer, b"HELO") == b"re:HELO"
            writer.close()
            await until(lambda: up.stats.active == 0, what="connection accounted")
            assert up.stats.failures == {}
        finally:
            sc.close()

    run(main())


def test_a_server_that_hangs_mid_connection_is_reset():
    """A long-lived REQ/REP connection: the first request is answered, the second is
    not; the timer runs from the second request, not from the connect."""
    async def main():
        sc = Sidecar()
        try:
            up = Upstream(policy(await sc.upstream(lambda: Replier(answers=1)),
                                 response_timeout_s=RESPONSE_S))
            reader, writer = await connect(await sc.listen(up))
            assert await ask(reader, writer, b"first") == b"re:first"
            await asyncio.sleep(2 * RESPONSE_S)  # longer than the timeout, nothing owed
            await reset_after(reader, writer, b"second")
            assert failures(up, FailureKind.TIMEOUT) == 1
        finally:
            sc.close()

    run(main())


def test_an_agent_that_keeps_sending_is_still_cut_off():
    """The timer runs from the oldest unanswered bytes: more bytes from the agent do
    not push the deadline of a server that answers none of them."""
    async def main():
        sc = Sidecar()
        try:
            up = Upstream(policy(await sc.upstream(lambda: Replier(answers=0)),
                                 response_timeout_s=RESPONSE_S))
            reader, writer = await connect(await sc.listen(up))
            started = time.monotonic()
            writer.write(b"REQ")
            reading = asyncio.ensure_future(ended(reader, RESPONSE_S + 2.0))
            while not reading.done():
                await asyncio.sleep(RESPONSE_S / 5)  # pacing the agent's traffic
                if not writer.is_closing():
                    writer.write(b".")
            assert reading.result() == "reset"
            assert time.monotonic() - started < RESPONSE_S + PROMPT_S
            writer.close()
            assert failures(up, FailureKind.TIMEOUT) == 1
        finally:
            sc.close()

    run(main())


def test_response_timeout_0_disables_it():
    """One-way streams (PUSH/PULL, log shipping) never hear back: 0 turns it off."""
    async def main():
        sc = Sidecar()
        try:
            up = Upstream(policy(await sc.upstream(lambda: Replier(answers=0)),
                                 response_timeout_s=0))
            reader, writer = await connect(await sc.listen(up))
            writer.write(b"fire and forget")
            try:
                data = await asyncio.wait_for(reader.read(1), 3 * RESPONSE_S)
            except asyncio.TimeoutError:
                pass  # still open: what a one-way stream needs
            else:
                raise AssertionError(f"the connection ended ({data!r})")
            assert up.stats.failures == {}
            writer.close()
        finally:
            sc.close()

    run(main())


def test_half_open_probe_counts_as_success_only_once_answered():
    """A probe that connects to a stuck server is a failure, not a success: connecting
    proves only that the kernel accepts. Answered probes close the breaker."""
    servers: list[Replier] = []

    def replier():
        servers.append(Replier(answers=0 if len(servers) == 0 else -1))
        return servers[-1]

    async def main():
        sc = Sidecar()
        try:
            settings = BreakerSettings(failures=5, open_s=0.3, successes=3, probes=1)
            up = Upstream(policy(await sc.upstream(replier), breaker=settings,
                                 response_timeout_s=RESPONSE_S))
            breaker = up.endpoints[0].breaker
            loop = asyncio.get_running_loop()
            for _ in range(5):
                breaker.record(False, loop.time() - 100, "test")
            assert breaker.state_at(loop.time()) is BreakerState.HALF_OPEN
            listen = await sc.listen(up)

            reader, writer = await connect(listen)  # the first server is stuck
            await reset_after(reader, writer, b"probe")
            assert breaker.state_at(loop.time()) is BreakerState.OPEN
            assert breaker.trips == 2 and "probe failed" in breaker.trip_reason

            await until(lambda: breaker.state_at(loop.time()) is BreakerState.HALF_OPEN,
                        5, "open_s to pass")
            for i in range(3):
                reader, writer = await connect(listen)
                assert await ask(reader, writer, b"probe %d" % i) == b"re:probe %d" % i
                writer.close()
                await until(lambda: up.stats.active == 0, what="probe done")
            assert breaker.state_at(loop.time()) is BreakerState.CLOSED
        finally:
            sc.close()

    run(main())


def test_a_silent_probe_gives_its_slot_back():
    """Half-open admits one probe at a time: a connection on which nobody says anything
    has no verdict to give, and must not hold the slot until the idle timeout."""
    async def main():
        sc = Sidecar()
        try:
            settings = BreakerSettings(failures=5, open_s=0.3, successes=1, probes=1)
            up = Upstream(policy(await sc.upstream(Replier), breaker=settings,
                                 response_timeout_s=RESPONSE_S))
            breaker = up.endpoints[0].breaker
            loop = asyncio.get_running_loop()
            for _ in range(5):
                breaker.record(False, loop.time() - 100, "test")
            listen = await sc.listen(up)
            idle_reader, idle_writer = await connect(listen)  # takes the probe slot
            await until(lambda: up.stats.active == 1 and sc.relays[0]._up is not None,
                        what="the silent probe connected")
            assert breaker.snapshot(loop.time())["probes_in_flight"] == 1
            # Within about RESPONSE_S the slot is free again and the next agent let in.
            await until(lambda: breaker.snapshot(loop.time())["probes_in_flight"] == 0,
                        RESPONSE_S + PROMPT_S, "the probe slot back")
            reader, writer = await connect(listen)
            assert await ask(reader, writer, b"hello") == b"re:hello"
            await until(lambda: breaker.state_at(loop.time()) is BreakerState.CLOSED,
                        what="the answered probe to close the breaker")
            assert up.stats.failures == {}
            writer.close()
            idle_writer.close()
        finally:
            sc.close()

    run(main())
