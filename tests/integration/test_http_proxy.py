"""The L7 proxy on real sockets: uvloop in a thread runs origin servers and the proxy on
127.0.0.1; the callers are what agents use (http.client, urllib through HTTP_PROXY in a
child process, raw sockets for CONNECT). Every wait has a deadline; nothing sleeps to
synchronise."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time

import httptools
import pytest
import uvloop

from sidecar.config import BreakerSettings, Protocol, RetrySettings, UpstreamPolicy
from sidecar.policy.breaker import BreakerState
from sidecar.proxy.http import serve_forward, serve_upstream
from sidecar.upstream import Upstream
from tests.integration.harness import free_port, wait_until

TIMEOUT_S = 0.3  # request timeout of the upstreams under test
OPEN_S = 0.3  # breaker open time
BREAKER = BreakerSettings(failures=5, window_s=60.0, open_s=OPEN_S, successes=2)
BIG = 3 * 1024 * 1024  # above max_pending_bytes: streamed through, never held whole


class Origin(asyncio.Protocol):
    """One connection to a test origin; `server.mode` says how it answers:
    ok, hang, reset (RST half way through the body), status500, garbage."""

    def __init__(self, server: OriginServer):
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport = None
        self.url = b""

    def connection_made(self, transport):
        self.transport = transport
        self.server.connections += 1
        self.server.transports.append(transport)

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_url(self, url):
        self.url = url

    def on_message_complete(self):
        server = self.server
        server.requests.append((self.parser.get_method(), self.url))
        mode = server.mode
        if mode == "ok" and self.url == b"/big":
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG)
            self.transport.write(b"b" * BIG)
        elif mode == "ok":
            body = b"ok " + self.url
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        elif mode == "status500":
            self.transport.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4"
                                 b"\r\nX-Origin: yes\r\n\r\nboom")
        elif mode == "reset":
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
            sock = self.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()
        elif mode == "garbage":
            self.transport.write(b"this is not HTTP\r\n\r\n")
        # hang: read, never answer


class OriginServer:
    def __init__(self, mode: str):
        self.mode = mode
        self.connections = 0
        self.requests: list[tuple[bytes, bytes]] = []
        self.transports: list[asyncio.Transport] = []
        self.port = 0


class Net:
    """A uvloop in a thread: origins and proxies live there; tests call from outside."""

    def __init__(self):
        self.loop = uvloop.new_event_loop()
        self.servers = []
        self.origins: list[OriginServer] = []
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout_s: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def call(self, fn, *args):
        async def call():
            return fn(*args)
        return self.run(call())

    def now(self) -> float:
        return self.call(self.loop.time)

    def listen(self, factory, port: int = 0) -> int:
        server = self.run(self.loop.create_server(factory, "127.0.0.1", port))
        self.servers.append(server)
        return server.sockets[0].getsockname()[1]

    def origin(self, mode: str = "ok", port: int = 0) -> OriginServer:
        origin = OriginServer(mode)
        self.origins.append(origin)
        origin.port = self.listen(lambda: Origin(origin), port)
        return origin

    def upstream(self, *ports: int, **kw) -> Upstream:
        kw.setdefault("request_timeout_s", TIMEOUT_S)
        kw.setdefault("breaker", BREAKER)
        return Upstream(UpstreamPolicy(name="Hub", protocol=Protocol.HTTP,
                                       endpoints=tuple(("127.0.0.1", p) for p in ports), **kw))

    def proxy(self, upstream: Upstream) -> int:
        return self.listen(serve_upstream(upstream))

    def breaker_state(self, upstream: Upstream, i: int = 0) -> BreakerState:
        return self.call(lambda: upstream.endpoints[i].breaker.state_at(self.loop.time()))

    def close(self):
        async def stop():
            for server in self.servers:
                server.close()
            # Origins hang up: the proxy's pooled connections see it and close too.
            for origin in self.origins:
                for transport in origin.transports:
                    transport.close()
            for _ in range(10):
                await asyncio.sleep(0)
        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def net():
    n = Net()
    yield n
    n.close()


def request(port: int, path: str = "/x", method: str = "GET", body: bytes | None = None,
            conn: http.client.HTTPConnection | None = None):
    """(status, headers, body, seconds) or (exception class name, None, None, seconds)."""
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    started = time.monotonic()
    try:
        c.request(method, path, body=body)
        r = c.getresponse()
        data = r.read()
        return r.status, r.headers, data, time.monotonic() - started
    except (OSError, http.client.HTTPException) as exc:
        return type(exc).__name__, None, None, time.monotonic() - started
    finally:
        if conn is None:
            c.close()


# --- relaying ----------------------------------------------------------------------


def test_keep_alive_on_both_sides_one_upstream_connection_for_many_requests(net):
    origin = net.origin("ok")
    upstream = net.upstream(origin.port)
    port = net.proxy(upstream)
    agent = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    for i in range(20):
        status, _, body, _ = request(port, f"/n{i}", conn=agent)
        assert (status, body) == (200, b"ok /n%d" % i)
    # The agent keeps its upstream connection; agents that come and go one after the
    # other share a second one, handed back to the pool as each leaves.
    for i in range(5):
        assert request(port, "/again")[0] == 200
    agent.close()
    assert origin.connections == 2
    assert upstream.stats.outcomes["ok"] == 25


def test_concurrent_agents_keep_their_connections_without_churn_within_pool_size(net):
    # pool_size bounds the idle connections, those agents hold between requests too
    # (tests/protocol/test_http_proxy.py shows the bound); within it, no churn.
    agents, rounds = 4, 50
    origin = net.origin("ok")
    upstream = net.upstream(origin.port, pool_size=agents)
    port = net.proxy(upstream)
    start = threading.Barrier(agents)

    def agent(n: int) -> list:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        start.wait(5)  # all four asking at once
        try:
            return [request(port, f"/a{n}/{i}", conn=conn)[0] for i in range(rounds)]
        finally:
            conn.close()

    results: list = [None] * agents
    threads = [threading.Thread(target=lambda n=n: results.__setitem__(n, agent(n)))
               for n in range(agents)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [[200] * rounds] * agents
    # Each agent's requests ran on its own upstream connection: going through the
    # pool per request would have opened more.
    assert origin.connections == agents


def test_large_bodies_stream_both_ways(net):
    origin = net.origin("ok")
    port = net.proxy(net.upstream(origin.port))
    agent = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    status, _, answer, _ = request(port, "/upload", "PUT", os.urandom(BIG), conn=agent)
    assert (status, answer) == (200, b"ok /upload")
    status, _, answer, _ = request(port, "/big", conn=agent)
    assert status == 200 and answer == b"b" * BIG
    agent.close()


# --- failures and the breaker --------------------------------------------------------


def test_hanging_upstream_releases_the_caller_with_504_at_the_timeout(net):
    origin = net.origin("hang")
    upstream = net.upstream(origin.port)
    port = net.proxy(upstream)
    status, _, body, seconds = request(port)
    assert status == 504
    assert TIMEOUT_S - 0.05 <= seconds < TIMEOUT_S + 0.5
    assert upstream.stats.failures == {(f"127.0.0.1:{origin.port}", "timeout"): 1}


@pytest.mark.parametrize("mode", ["hang", "refused", "reset", "status500"])
def test_breaker_trips_after_five_failures_rejects_at_once_then_probes_and_closes(net, mode):
    origin = net.origin(mode) if mode != "refused" else None
    port_of_origin = origin.port if origin else free_port()
    upstream = net.upstream(port_of_origin, retry=RetrySettings(attempts=0))
    port = net.proxy(upstream)

    for i in range(5):
        status, headers, body, seconds = request(port)
        expected = {"hang": 504, "refused": 502, "reset": "RemoteDisconnected",
                    "status500": 500}[mode]
        if mode == "reset":  # a cut answer is an error to the caller, never a short body
            assert status in ("IncompleteRead", "ConnectionResetError", "RemoteDisconnected")
        else:
            assert status == expected, (i, status, body)
        if mode == "status500":
            assert body == b"boom" and headers["X-Origin"] == "yes"  # passed unchanged
        assert seconds < TIMEOUT_S + 0.5
    assert net.breaker_state(upstream) is BreakerState.OPEN

    seen = len(origin.requests) if origin else 0
    status, headers, body, seconds = request(port)
    assert status == 503 and seconds < 0.1
    assert headers["X-Agentvisor-Breaker"] == "Hub" and headers["Retry-After"] == "1"
    assert (len(origin.requests) if origin else 0) == seen  # the upstream was not touched
    assert upstream.stats.outcomes["rejected"] == 1

    # After open_s one probe is admitted; `successes` good answers close the breaker.
    if origin is None:
        origin = net.origin("ok", port=port_of_origin)
    origin.mode = "ok"
    wait_until(lambda: net.breaker_state(upstream) is BreakerState.HALF_OPEN, 5,
               "the breaker to half-open")
    assert request(port)[0] == 200
    assert net.breaker_state(upstream) is BreakerState.HALF_OPEN
    assert request(port)[0] == 200
    assert net.breaker_state(upstream) is BreakerState.CLOSED


def test_get_to_a_refused_endpoint_is_retried_on_the_next_and_post_is_not(net):
    good = net.origin("ok")
    upstream = net.upstream(free_port(), good.port)
    port = net.proxy(upstream)
    status, _, body, _ = request(port, "/read")
    assert (status, body) == (200, b"ok /read")
    assert upstream.stats.retries == 1
    status, _, _, _ = request(port, "/write", "POST", b"{}")
    assert status == 502
    assert good.requests == [(b"GET", b"/read")]  # the POST never reached the second one


def test_bad_input_is_answered_per_connection_under_load(net):
    good = net.origin("ok")
    garbage = net.origin("garbage")
    good_port = net.proxy(net.upstream(good.port))
    garbage_port = net.proxy(net.upstream(garbage.port, breaker=BreakerSettings(failures=1000)))

    async def one(port: int, payload: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(payload)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.close()
        return head.split(b" ", 2)[1]

    cases = {
        (good_port, b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"): b"200",
        (good_port, b"\x16\x03\x01\x02\x00garbage\r\n\r\n"): b"400",
        (good_port, b"GET / HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n"): b"431",
        (garbage_port, b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"): b"502",
    }

    async def storm():
        jobs = [(expected, one(*case)) for case, expected in cases.items() for _ in range(50)]
        results = await asyncio.gather(*(job for _, job in jobs))
        return [(expected, got) for (expected, _), got in zip(jobs, results)]

    results = net.run(storm(), 30)
    assert all(expected == got for expected, got in results), results
    assert request(good_port)[0] == 200  # and the proxy still serves


# --- forward proxy -----------------------------------------------------------------


LEGACY_CLIENT = textwrap.dedent("""
    # An agent as written: urllib, no proxy code; HTTP_PROXY does the rest.
    import json, sys, time, urllib.error, urllib.request
    out = []
    for method, url in json.loads(sys.argv[1]):
        started = time.monotonic()
        data = b"{}" if method == "POST" else None
        try:
            with urllib.request.urlopen(urllib.request.Request(url, data, method=method),
                                        timeout=10) as r:
                status, headers, body = r.status, dict(r.headers), r.read().decode()
        except urllib.error.HTTPError as e:
            status, headers, body = e.code, dict(e.headers), e.read().decode()
        out.append([status, headers, body, time.monotonic() - started])
    print(json.dumps(out))
""")


def test_unmodified_urllib_agent_through_http_proxy(net, tmp_path):
    ok, hang, failing = net.origin("ok"), net.origin("hang"), net.origin("status500")
    refused, moved = free_port(), free_port()
    no_retry = RetrySettings(attempts=0)
    by_port = {port: net.upstream(port, retry=no_retry) for port in
               (ok.port, hang.port, failing.port, refused)}
    # A declared upstream with two endpoints: the agent names the first (dead) one.
    by_port[moved] = net.upstream(moved, ok.port)
    proxy_port = net.listen(serve_forward(lambda host, port: by_port.get(port)))

    def url(port, path="/p"):
        return f"http://127.0.0.1:{port}{path}"
    calls = ([["GET", url(ok.port, "/metrics?x=1")], ["POST", url(ok.port, "/push")],
              ["GET", url(hang.port)], ["GET", url(refused)], ["GET", url(moved, "/r")]]
             + [["GET", url(failing.port)]] * 6)
    script = tmp_path / "agent.py"
    script.write_text(LEGACY_CLIENT)
    env = {**os.environ, "HTTP_PROXY": f"http://127.0.0.1:{proxy_port}", "NO_PROXY": ""}
    run = subprocess.run([sys.executable, str(script), json.dumps(calls)], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    results = json.loads(run.stdout)
    assert [r[0] for r in results] == [200, 200, 504, 502, 200, 500, 500, 500, 500, 500, 503]
    assert results[0][2] == "ok /metrics?x=1"
    assert results[2][3] < TIMEOUT_S + 1.0  # released at the timeout, not the client's 10 s
    assert results[4][2] == "ok /r" and by_port[moved].stats.retries == 1
    assert ok.requests == [(b"GET", b"/metrics?x=1"), (b"POST", b"/push"), (b"GET", b"/r")]
    assert results[10][1]["X-Agentvisor-Breaker"] == "Hub"
    assert len(failing.requests) == 5  # the sixth never reached the failing upstream


def test_connect_tunnels_bytes_and_refuses_with_502(net):
    async def echo(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()
    server = net.run(asyncio.start_server(echo, "127.0.0.1", 0))
    net.servers.append(server)
    echo_port = server.sockets[0].getsockname()[1]
    tunnels = {}

    def route(host, port):  # what the sidecar's router does for undeclared destinations
        if port not in tunnels:
            tunnels[port] = Upstream(UpstreamPolicy(name=f"{host.decode()}:{port}",
                                                    endpoints=((host.decode(), port),)))
        return tunnels[port]
    proxy_port = net.listen(serve_forward(route))

    with socket.create_connection(("127.0.0.1", proxy_port), timeout=5) as s:
        s.sendall(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\nearly "
                  % (echo_port, echo_port))
        got = b""
        while not got.endswith(b"early "):
            got += s.recv(65536)
        assert got == b"HTTP/1.1 200 Connection established\r\n\r\nearly "
        s.sendall(b"\x16\x03\x01 opaque TLS bytes")
        assert s.recv(65536) == b"\x16\x03\x01 opaque TLS bytes"

    with socket.create_connection(("127.0.0.1", proxy_port), timeout=5) as s:
        s.sendall(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\n\r\n" % free_port())
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 502 ")
