"""Fakes for driving the L7 proxy's protocols by bytes alone: transports that record
what each side would have sent, a loop that holds the clock, the timers and the
connects, each fired by the test. No sockets and no sleeping."""

from __future__ import annotations

from sidecar.config import Protocol, UpstreamPolicy
from sidecar.proxy.http import HttpProxy
from sidecar.upstream import Upstream


class FakeTransport:
    def __init__(self, protocol=None):
        self.protocol = protocol
        self.writes: list[bytes] = []
        self.closed = False
        self.reading = True
        self.limits = None

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.writes.append(bytes(data))

    def take(self) -> bytes:
        data = b"".join(self.writes)
        self.writes.clear()
        return data

    def close(self) -> None:
        self.closed = True

    abort = close

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        self.limits = high

    def get_extra_info(self, name, default=None):
        return default


class FakeTimer:
    def __init__(self, when, callback, args):
        self.when, self.callback, self.args = when, callback, args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def fire(self) -> None:
        assert not self.cancelled
        self.cancelled = True
        self.callback(*self.args)


class FakeConnect:
    """One `create_connection` the proxy asked for, completed by the test."""

    def __init__(self, factory, host, port):
        self.factory, self.host, self.port = factory, host, port
        self.callbacks = []
        self._cancelled = False
        self._exc = None
        self.transport: FakeTransport | None = None
        self.protocol = None

    # the Task side
    def add_done_callback(self, cb) -> None:
        self.callbacks.append(cb)

    def cancel(self) -> bool:
        self._cancelled = True
        self._done()
        return True

    def cancelled(self) -> bool:
        return self._cancelled

    def exception(self):
        return self._exc

    def _done(self) -> None:
        for cb in self.callbacks:
            cb(self)
        self.callbacks.clear()

    # the test side
    def accept(self) -> FakeTransport:
        self.protocol = self.factory()
        self.transport = FakeTransport(self.protocol)
        self.protocol.connection_made(self.transport)
        self._done()
        return self.transport

    def refuse(self) -> None:
        self._exc = ConnectionRefusedError(111, "Connection refused")
        self._done()

    def respond(self, data: bytes) -> None:
        self.protocol.data_received(data)

    def lost(self) -> None:
        self.transport.closed = True
        self.protocol.connection_lost(None)


class FakeLoop:
    def __init__(self):
        self.now = 1000.0
        self.timers: list[FakeTimer] = []
        self.connects: list[FakeConnect] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when, callback, *args) -> FakeTimer:
        timer = FakeTimer(when, callback, args)
        self.timers.append(timer)
        return timer

    def call_later(self, delay, callback, *args) -> FakeTimer:
        return self.call_at(self.now + delay, callback, *args)

    def armed(self) -> list[FakeTimer]:
        return [t for t in self.timers if not t.cancelled]

    def create_connection(self, factory, host, port) -> FakeConnect:
        connect = FakeConnect(factory, host, port)
        self.connects.append(connect)
        return connect

    def create_task(self, connect: FakeConnect) -> FakeConnect:
        return connect


def policy(**kw) -> UpstreamPolicy:
    kw.setdefault("endpoints", (("10.0.0.1", 8080),))
    return UpstreamPolicy(name="Hub", protocol=Protocol.HTTP, **kw)


class Rig:
    """One upstream and agent connections to its per-upstream listener."""

    def __init__(self, **kw):
        self.loop = FakeLoop()
        self.upstream = Upstream(policy(**kw))
        self.stats = self.upstream.stats

    def agent(self, forward_route=None):
        if forward_route is None:
            proxy = HttpProxy(lambda host, port: self.upstream, loop=self.loop)
        else:
            proxy = HttpProxy(forward_route, forward=True, loop=self.loop)
        transport = FakeTransport(proxy)
        proxy.connection_made(transport)
        return proxy, transport

    def breaker(self, i=0):
        return self.upstream.endpoints[i].breaker


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello"
GET = b"GET /status HTTP/1.1\r\nHost: localhost:9000\r\nUser-Agent: legacy\r\n\r\n"
