"""The L7 proxy's own work per request, in CPU instructions: a figure that does not move
with the machine's load.

bench/hot_path.py measures the whole path (syscalls, event loop, Python) against HAProxy
on real sockets, and on this small shared machine its microseconds move by 10-20 % from
run to run. This one drives `sidecar.proxy.http` alone, with in-memory transports (no
sockets, no event loop: the loop's clock is read, its timers are never due), through
whole exchanges, and counts the instructions under valgrind's callgrind: the same code
gives the same count, whatever else the machine is doing. Use it before and after a
hot-path change; the real-socket benchmark says what the change is worth in the end.

Instructions per request = (count for N2 exchanges - count for N1) / (N2 - N1), so that
interpreter start-up and imports cancel out. Cases:
  plain      wrk's request (Host only) and nginx's answer (five fields, keep-alive):
             the answer head goes to the agent as it came.
  agent      a `requests` request (five fields, as the fleet's agents send) and
             nginx's answer: both heads as they came but Host.
  keepalive  the same request and Apache's answer (Keep-Alive):
             the answer head is rebuilt without its hop-by-hop fields.
  listed     the same request and an answer whose Connection header names a field:
             the answer head is rebuilt line by line (rare).
  alternating  the agent case, but two requests and two answers in turn: no read repeats
             the one before it, so none is taken as a repeat without parsing.
  live       the agent case on real sockets: the sidecar process itself (uvloop, its
             transports and timers) under callgrind, nginx as the upstream, 16 keep-alive
             clients outside valgrind; counted after a warm-up. User space only: the
             kernel's share (about 70 % of the CPU) is not in any of these figures.

Needs valgrind (Debian package). Usage: .venv/bin/python bench/l7_instructions.py
Writes bench/results/l7_instructions.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

import sidecar  # noqa: E402  (from this tree)

_REQUESTS_GET = (b"GET /registry/agents HTTP/1.1\r\nHost: 127.0.0.1:18081\r\n"
                 b"User-Agent: python-requests/2.32.3\r\nAccept-Encoding: gzip, deflate\r\n"
                 b"Accept: */*\r\nConnection: keep-alive\r\n\r\n")
CASES = {
    "plain": (
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1:18081\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
        b"Content-Type: text/plain\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n",
    ),
    "agent": (
        _REQUESTS_GET,
        b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
        b"Content-Type: application/json\r\nContent-Length: 2\r\nConnection: keep-alive\r\n"
        b"\r\n{}",
    ),
    "keepalive": (
        _REQUESTS_GET,
        b"HTTP/1.1 200 OK\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\nServer: Apache/2.4.62\r\n"
        b"Content-Length: 2\r\nKeep-Alive: timeout=5, max=100\r\nConnection: Keep-Alive\r\n"
        b"Content-Type: application/json\r\n\r\n{}",
    ),
    "listed": (
        _REQUESTS_GET,
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
        b"Date: Mon, 01 Jan 2024 00:00:00 GMT\r\nServer: Python/3.11 aiohttp/3.9.5\r\n"
        b"Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n\r\n{}",
    ),
}
# An agent that polls two endpoints in turn, and answers whose Date has moved: no read is
# the previous one again on either side, so nothing is skipped as a repeat (see
# HttpProxy._repeated and UpstreamConnection._repeated); the per-shape caches still apply.
ALTERNATING = (
    (_REQUESTS_GET, CASES["agent"][1]),
    (_REQUESTS_GET.replace(b"/registry/agents", b"/registry/hosts"),
     CASES["agent"][1].replace(b"00:00:00 GMT", b"00:00:01 GMT")),
)
SMALL, LARGE = 1_000, 6_000


class _Transport:
    """Takes writes and drops them; the proxy's flow-control calls do nothing."""

    def __init__(self) -> None:
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def get_extra_info(self, name, default=None):
        return default

    def close(self) -> None:
        raise SystemExit("the proxy closed a connection: the case is not a clean exchange")


class _Connect:
    """The one upstream connection (create_connection's task), completed by `accept`."""

    def __init__(self, factory) -> None:
        self.protocol = factory()
        self.transport = _Transport()
        self.callbacks: list = []

    def add_done_callback(self, callback) -> None:
        self.callbacks.append(callback)

    def accept(self) -> None:
        self.protocol.connection_made(self.transport)
        for callback in self.callbacks:
            callback(self)

    def cancelled(self) -> bool:
        return False

    def exception(self):
        return None


class _Timer:
    def cancel(self) -> None:
        pass


class _Loop:
    """A clock that stands still and timers that never fire: only the exchange runs."""

    def __init__(self) -> None:
        self.connects: list[_Connect] = []

    def time(self) -> float:
        return 1000.0

    def call_at(self, when, callback, *args) -> _Timer:
        return _Timer()

    def call_later(self, delay, callback, *args) -> _Timer:
        return _Timer()

    def create_connection(self, factory, host, port) -> _Connect:
        self.connects.append(_Connect(factory))
        return self.connects[-1]

    def create_task(self, connect: _Connect) -> _Connect:
        return connect


def exchanges(case: str, n: int) -> None:
    """Run `n` exchanges of `case` through one agent connection, the way the sidecar's
    per-upstream listener does, and check each one was answered."""
    from sidecar.config import Protocol, UpstreamPolicy
    from sidecar.proxy.http import HttpProxy
    from sidecar.upstream import Upstream

    pairs = ALTERNATING if case == "alternating" else (CASES[case],)
    request, answer = pairs[0]
    loop = _Loop()
    upstream = Upstream(UpstreamPolicy(name="Bench", protocol=Protocol.HTTP,
                                       endpoints=(("127.0.0.1", 18080),)))
    proxy = HttpProxy(lambda host, port: upstream, loop=loop)  # as serve_upstream does
    agent = _Transport()
    proxy.connection_made(agent)
    proxy.data_received(request)  # the first exchange opens the upstream connection
    loop.connects[0].accept()
    upstream_side = loop.connects[0].protocol
    upstream_side.data_received(answer)
    feed_agent, feed_upstream = proxy.data_received, upstream_side.data_received
    if len(pairs) == 1:
        for _ in range(n):
            feed_agent(request)
            feed_upstream(answer)
    else:
        (request1, answer1), (request2, answer2) = pairs
        for _ in range(n // 2):
            feed_agent(request2)
            feed_upstream(answer2)
            feed_agent(request1)
            feed_upstream(answer1)
        n -= n % 2
    if len(loop.connects) != 1 or agent.writes != n + 1:
        raise SystemExit(f"{case}: {agent.writes} answers for {n + 1} requests over "
                         f"{len(loop.connects)} upstream connections")
    if upstream.stats.outcomes["ok"] != n + 1:
        raise SystemExit(f"{case}: outcomes {dict(upstream.stats.outcomes)}")


def instructions(case: str, n: int) -> int:
    """Instructions callgrind counts for a whole interpreter running `n` exchanges."""
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
         sys.executable, __file__, "--inner", case, str(n)],
        capture_output=True, text=True, check=True)
    found = re.search(r"Collected : (\d+)", out.stderr)
    if not found:
        raise SystemExit(f"callgrind gave no count:\n{out.stderr[-2000:]}")
    return int(found.group(1))


# --- live: the sidecar process itself, on real sockets ------------------------------------

LIVE_CONNECTIONS = 16
LIVE_WARMUP = 1600  # fills the pools and caches before the counters are zeroed
LIVE_REQUESTS = 16000


async def _drive(port: int, per_connection: int) -> None:
    """LIVE_CONNECTIONS keep-alive clients, one request at a time each, as the agents do."""
    import asyncio

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(per_connection):
            writer.write(_REQUESTS_GET)
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"Content-Length: (\d+)", head, re.I)
            await reader.readexactly(int(length.group(1)) if length else 0)
        writer.close()

    await asyncio.gather(*(client() for _ in range(LIVE_CONNECTIONS)))


def live_instructions(folder: Path, floor: bool = False) -> int:
    """Instructions per request of a real sidecar process (uvloop, its sockets, its timers,
    everything but the kernel) serving python-requests' GETs to nginx: the process runs
    under callgrind, the counters are zeroed after a warm-up and dumped after
    LIVE_REQUESTS requests sent by clients outside valgrind. With floor, the same for
    bench/floor_http.py (uvloop + httptools, no policy): the difference is the sidecar's
    own work, the figure hot_path.py's "own work" row measures in microseconds."""
    import asyncio
    import time

    import yaml

    from hot_path import free_port, get, start_nginx

    upstream, listen, metrics = free_port(), free_port(), free_port()
    nginx = start_nginx(folder / "nginx", upstream)
    config = folder / "sidecar.yaml"
    config.write_text(yaml.safe_dump({
        "upstreams": {"Nginx": {"address": f"127.0.0.1:{upstream}", "protocol": "http",
                                "listen": f"127.0.0.1:{listen}"}},
        "sidecar": {"metrics_listen": f"127.0.0.1:{metrics}"}}))
    out = folder / "callgrind.out"
    # The same two syscalls each way per request for both (strace -c says so): what
    # differs is user space, which is what callgrind counts.
    program = ([str(ROOT / "bench" / "floor_http.py"), str(listen), str(upstream)] if floor
               else ["-m", "sidecar.main", "--config", str(config), "--log-level", "warning"])
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
         *program], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300  # imports under valgrind take a while
        while get(listen) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("live: the sidecar did not start under valgrind")
            time.sleep(0.5)
        asyncio.run(_drive(listen, LIVE_WARMUP // LIVE_CONNECTIONS))
        subprocess.run(["callgrind_control", "--zero", str(proc.pid)], check=True,
                       capture_output=True)
        asyncio.run(_drive(listen, LIVE_REQUESTS // LIVE_CONNECTIONS))
        subprocess.run(["callgrind_control", "--dump", str(proc.pid)], check=True,
                       capture_output=True)
        dump = max(folder.glob("callgrind.out.*"), key=lambda p: p.stat().st_mtime)
        total = re.search(r"^summary: (\d+)", dump.read_text(), re.M)
        if not total:
            raise SystemExit(f"live: no summary in {dump}")
        return round(int(total.group(1)) / LIVE_REQUESTS)
    finally:
        proc.terminate()
        proc.wait()
        nginx.proc.terminate()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inner", nargs=2, metavar=("CASE", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON")
    args = ap.parse_args()
    if args.inner:
        exchanges(args.inner[0], int(args.inner[1]))
        return 0
    if not shutil.which("valgrind"):
        raise SystemExit("valgrind not found: apt-get install valgrind")
    rows = {}
    for case in [*CASES, "alternating"]:
        print(f"{case}: callgrind, {SMALL} and {LARGE} exchanges ...", file=sys.stderr,
              flush=True)
        small, large = instructions(case, SMALL), instructions(case, LARGE)
        rows[case] = {"instructions_per_request": round((large - small) / (LARGE - SMALL))}
    if shutil.which("nginx") and shutil.which("callgrind_control"):
        print(f"live: the sidecar under callgrind, {LIVE_REQUESTS} requests over "
              f"{LIVE_CONNECTIONS} connections ...", file=sys.stderr, flush=True)
        import tempfile
        sys.path.insert(0, str(ROOT / "bench"))
        with tempfile.TemporaryDirectory() as folder:
            rows["live"] = {"instructions_per_request": live_instructions(Path(folder))}
        print("floor: bench/floor_http.py the same way ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as folder:
            rows["floor"] = {"instructions_per_request": live_instructions(Path(folder), True)}
        rows["own work"] = {"instructions_per_request": rows["live"]["instructions_per_request"]
                            - rows["floor"]["instructions_per_request"]}
    else:
        print("live: skipped (needs nginx: apt-get install nginx-light)", file=sys.stderr)
    print(f"\nhot path {'compiled' if sidecar.compiled() else 'interpreted'}")
    print(f"{'case':11s} {'instructions/request':>21s}")
    for case, r in rows.items():
        print(f"{case:11s} {r['instructions_per_request']:21,d}")
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "l7_instructions.json").write_text(json.dumps(
        {"git": git, "python": sys.version.split()[0], "cpus": os.cpu_count(),
         "hot_path": "compiled" if sidecar.compiled() else "interpreted",
         "exchanges": [SMALL, LARGE], "cases": rows}, indent=2) + "\n")
    print(f"\nJSON: {args.out / 'l7_instructions.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
