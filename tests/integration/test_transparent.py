"""Transparent interception end to end, in a network namespace this test creates.

Inside the namespace: a plain TCP echo upstream on 127.0.0.1, a sidecar process with the
transparent listener, and our nftables table redirecting uid 65534's TCP to it. An
unmodified client (stdlib python3, run as uid 65534) dials the upstream's real address
and gets its answer through the sidecar, which proves it saw the connection (it reports
the original destination it read with SO_ORIGINAL_DST) and, once stopped, that the
client cannot get through without it. A dead upstream gives the client a prompt error
and trips the breaker. The rules are gone at the end, and so is the namespace.

The client runs as nobody, who cannot enter /root (0700): it is /usr/bin/python3 with
code on its command line, run from /, and needs no file.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV_PYTHON = sys.executable
SYSTEM_PYTHON = "/usr/bin/python3"
NOBODY = 65534
TABLE = "agentvisor_test"
# A fresh namespace has every port free: fixed ports keep the rules readable.
UPSTREAM_PORT = 7001
LISTEN_PORT = 15001
PROMPT_S = 2.0  # a refused/broken upstream reaches the client well within this
# How a reset from the sidecar reaches the client depends on which of its calls it lands
# before: recv (ECONNRESET), sendall (EPIPE) or shutdown (ENOTCONN, a plain OSError).
RESET = {"ECONNRESET", "EPIPE", "ENOTCONN"}

ECHO = """
import socket, sys, threading
host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
srv = socket.create_server((host, int(sys.argv[1])), family=socket.AF_INET6 if ":" in host
                           else socket.AF_INET)
print("ready", flush=True)
def serve(c):
    with c:
        while data := c.recv(65536):
            c.sendall(data)
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# The sidecar: every upstream is the destination the agent dialled; each event is a
# JSON line on stdout so the test can wait for it.
SIDECAR = """
import asyncio, json, sys
import uvloop
from sidecar.config import BreakerSettings, UpstreamPolicy
from sidecar.proxy.transparent import serve_transparent
from sidecar.upstream import Upstream

def say(**event):
    sys.stdout.write(json.dumps(event) + "\\n")
    sys.stdout.flush()

class Tap(asyncio.Protocol):
    # Stands between a transport and the relay that took it over, and reports each
    # finished connection once the relay has counted it (the relay is compiled code:
    # no method of it can be overridden, so the events are read at its edge).
    def __init__(self, relay, upstream):
        self.relay, self.upstream = relay, upstream
        self.before = upstream.stats.outcomes
        self.data_received = relay.data_received
        self.eof_received = relay.eof_received
        self.pause_writing = relay.pause_writing
        self.resume_writing = relay.resume_writing

    def connection_lost(self, exc):
        self.relay.connection_lost(exc)
        up = self.upstream
        after = up.stats.outcomes
        outcome, = [o for o, n in after.items() if n != self.before[o]]
        say(done=outcome, upstream=up.name,
            failures={f"{e}/{k}": c for (e, k), c in up.stats.failures.items()},
            breaker=up.endpoints[0].breaker.state_at(asyncio.get_running_loop().time()).value)

class Redirected(asyncio.Protocol):
    # The sidecar's transparent protocol, then the Tap over the relay it hands to.
    def __init__(self):
        self.inner = serve_transparent(route)()

    def connection_made(self, transport):
        self.inner.connection_made(transport)
        relay = transport.get_protocol()
        if relay is not self:  # handed to a relay (which may have closed it already)
            transport.set_protocol(Tap(relay, routed[-1]))

upstreams = {}
routed = []

def route(ip, port):
    name = f"{ip}:{port}"
    up = upstreams.get(name)
    if up is None:
        up = upstreams[name] = Upstream(UpstreamPolicy(
            name=name, endpoints=((ip, port),), connect_timeout_s=1.0,
            breaker=BreakerSettings(failures=5, window_s=60, open_s=60)))
    say(route=[ip, port])
    routed.append(up)
    return up

async def main():
    loop = asyncio.get_running_loop()
    for host in sys.argv[2:] or ["127.0.0.1"]:
        await loop.create_server(Redirected, host, int(sys.argv[1]))
    say(ready=True)
    await asyncio.Event().wait()

with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
    runner.run(main())
"""

# The agent: plain stdlib, connect to the real address, send, half-close, read to EOF.
CLIENT = """
import errno, json, socket, sys, time
started = time.monotonic()
out = {}
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    s.sendall(b"ping")
    s.shutdown(socket.SHUT_WR)
    reply = b""
    while chunk := s.recv(65536):
        reply += chunk
    out["reply"] = reply.decode()
except OSError as exc:
    out["error"] = type(exc).__name__
    out["errno"] = errno.errorcode.get(exc.errno, str(exc.errno))
out["elapsed"] = time.monotonic() - started
print(json.dumps(out))
"""


def _run(*args, check=True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=30, check=check, **kw)


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, nftables, setpriv)"
    for tool in ("ip", "nft", "setpriv"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"{SYSTEM_PYTHON} is needed to run the client as uid {NOBODY}"
    return None


class Namespace:
    def __init__(self, name: str):
        self.name = name
        self.procs: list[subprocess.Popen] = []

    def exec(self, *args) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def run(self, *args, check=True, **kw) -> subprocess.CompletedProcess:
        return _run(*self.exec(*args), check=check, **kw)

    def spawn(self, *args, **kw) -> "Child":
        proc = subprocess.Popen(self.exec(*args), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, **kw)
        self.procs.append(proc)
        return Child(proc)

    def client(self, uid: int | None = NOBODY, host: str = "127.0.0.1",
               port: int = UPSTREAM_PORT) -> dict:
        """One request from an unmodified agent to the upstream's real address."""
        cmd = [SYSTEM_PYTHON, "-c", CLIENT, host, str(port)]
        if uid is not None:
            cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *cmd]
        done = self.run(*cmd, cwd="/", env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        return json.loads(done.stdout)

    def tables(self) -> str:
        return self.run("nft", "list", "tables").stdout


class Child:
    """A process whose stdout lines (JSON events) are read by a thread into a queue."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def expect(self, match, timeout_s: float = 10.0, what: str = "an event"):
        """The first line for which match(line) is true; fails after timeout_s."""
        deadline = time.monotonic() + timeout_s
        seen = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None and self.lines.empty():
                err = self.proc.stderr.read() if self.proc.poll() is not None else ""
                raise AssertionError(f"no {what} within {timeout_s} s; saw {seen}; {err}")
            try:
                line = self.lines.get(timeout=min(left, 0.1))
            except queue.Empty:
                continue
            seen.append(line)
            value = match(line)
            if value:
                return value

    def event(self, key: str, timeout_s: float = 10.0) -> dict:
        def match(line):
            try:
                event = json.loads(line)
            except ValueError:
                return None
            return event if key in event else None
        return self.expect(match, timeout_s, f"{key!r} event")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def ns():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    name = f"agentvisor-test-{secrets.token_hex(4)}"
    made = _run("ip", "netns", "add", name, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {made.stderr.strip()}")
    space = Namespace(name)
    try:
        space.run("ip", "link", "set", "lo", "up")
        probe = space.run(VENV_PYTHON, "-c",
                          "from sidecar.proxy import nftables; print(nftables.available() or '')",
                          cwd=ROOT)
        if probe.stdout.strip():
            pytest.skip(probe.stdout.strip())
        yield space
    finally:
        for proc in space.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        _run("ip", "netns", "del", name, check=False)


def _nft(space: Namespace, call: str):
    space.run(VENV_PYTHON, "-c", "from sidecar.proxy.nftables import *; " + call, cwd=ROOT)


def test_transparent_interception_end_to_end(ns):
    echo = ns.spawn(SYSTEM_PYTHON, "-c", ECHO, str(UPSTREAM_PORT))
    echo.expect(lambda line: line == "ready", what="echo ready")
    sidecar = ns.spawn(VENV_PYTHON, "-c", SIDECAR, str(LISTEN_PORT), cwd=ROOT)
    sidecar.event("ready")
    try:
        _nft(ns, f"install({TABLE!r}, [Redirect({NOBODY}, {LISTEN_PORT})])")
        listed = ns.run("nft", "list", "table", "inet", TABLE).stdout
        assert f"meta skuid {NOBODY}" in listed and f"redirect to :{LISTEN_PORT}" in listed
        # Installing again replaces the table: idempotent, not an error.
        _nft(ns, f"install({TABLE!r}, [Redirect({NOBODY}, {LISTEN_PORT})])")

        # The agent dials the upstream's real address and is answered through the
        # sidecar, which read where it was going.
        assert ns.client() == {"reply": "ping", "elapsed": pytest.approx(0, abs=PROMPT_S)}
        assert sidecar.event("route")["route"] == ["127.0.0.1", UPSTREAM_PORT]
        done = sidecar.event("done")
        assert done["done"] == "ok" and done["breaker"] == "closed"
        # Root (the sidecar's uid) is not redirected: it reaches the upstream directly,
        # and the sidecar sees nothing.
        assert ns.client(uid=None)["reply"] == "ping"

        # A connection that was not redirected (dialled the listener itself) is closed,
        # not relayed back into the listener.
        assert ns.client(uid=None, port=LISTEN_PORT).get("reply", "") == ""
        # The upstream dies: every agent connection ends at once with an error, and
        # after five the breaker is open.
        echo.stop()
        for i in range(5):
            result = ns.client()
            # An error, not an empty answer: the sidecar resets the agent's connection.
            assert result.get("errno") in RESET, result
            assert result["elapsed"] < PROMPT_S, result
            done = sidecar.event("done")
            assert done["done"] == "failed"
            assert done["failures"] == {f"127.0.0.1:{UPSTREAM_PORT}/refused": i + 1}
        assert done["breaker"] == "open"
        result = ns.client()
        assert result.get("errno") in RESET and result["elapsed"] < PROMPT_S, result
        assert sidecar.event("done")["done"] == "rejected"

        # Without the sidecar the redirected agent gets nowhere, though the upstream runs.
        echo = ns.spawn(SYSTEM_PYTHON, "-c", ECHO, str(UPSTREAM_PORT))
        echo.expect(lambda line: line == "ready", what="echo ready")
        sidecar.stop()
        assert ns.client() == {"error": "ConnectionRefusedError", "errno": "ECONNREFUSED",
                               "elapsed": pytest.approx(0, abs=PROMPT_S)}
        assert ns.client(uid=None)["reply"] == "ping"
    finally:
        _nft(ns, f"remove({TABLE!r})")
    assert TABLE not in ns.tables()
    _nft(ns, f"remove({TABLE!r})")  # removing what is not there is not an error
    # Rules gone: the agent reaches the upstream directly again.
    assert ns.client()["reply"] == "ping"


def test_transparent_interception_ipv6(ns):
    """IPv6 redirects land on [::1]; the destination comes from IP6T_SO_ORIGINAL_DST."""
    if "::1" not in ns.run("ip", "-6", "addr", "show", "dev", "lo", check=False).stdout:
        pytest.skip("no IPv6 loopback in the namespace")
    echo = ns.spawn(SYSTEM_PYTHON, "-c", ECHO, str(UPSTREAM_PORT), "::1")
    echo.expect(lambda line: line == "ready", what="echo ready")
    sidecar = ns.spawn(VENV_PYTHON, "-c", SIDECAR, str(LISTEN_PORT), "127.0.0.1", "::1",
                       cwd=ROOT)
    sidecar.event("ready")
    try:
        _nft(ns, f"install({TABLE!r}, [Redirect({NOBODY}, {LISTEN_PORT})])")
        assert ns.client(host="::1")["reply"] == "ping"
        assert sidecar.event("route")["route"] == ["::1", UPSTREAM_PORT]
        assert sidecar.event("done")["done"] == "ok"
    finally:
        _nft(ns, f"remove({TABLE!r})")
    assert TABLE not in ns.tables()


def test_exempt_loopback_ports_are_not_redirected(ns):
    """An agent reaches its exempt loopback ports directly (no sidecar is running here:
    a redirected connection would be refused)."""
    echo = ns.spawn(SYSTEM_PYTHON, "-c", ECHO, str(UPSTREAM_PORT))
    echo.expect(lambda line: line == "ready", what="echo ready")
    try:
        _nft(ns, f"install({TABLE!r}, [Redirect({NOBODY}, {LISTEN_PORT}, "
                 f"exempt_ports=({UPSTREAM_PORT},))])")
        assert ns.client()["reply"] == "ping"
        _nft(ns, f"install({TABLE!r}, [Redirect({NOBODY}, {LISTEN_PORT})])")
        assert ns.client()["error"] == "ConnectionRefusedError"
    finally:
        _nft(ns, f"remove({TABLE!r})")
    assert TABLE not in ns.tables()
