"""A seeded mutation fuzzer for the sidecar's L7 listeners, beside a steady client.

One run: a real sidecar process (compiled or interpreted, as asked) in front of two
origins on 127.0.0.1. `Steady` is a well-behaved HTTP/1.1 server; `Faulty` answers the
fuzzer with mutated answers. A steady client (http.client, keep-alive, as agents use it)
sends GETs and POSTs through the Steady listener the whole time, with the default
breaker, while fuzz cases (valid requests, mutated) go to the Steady listener, the
Faulty listener and the forward proxy, sent whole or in pieces, half-closed, abandoned.

What must hold, and is counted:
- the sidecar never exits, logs no traceback or internal error, and stays ready;
- every steady request gets its own 200 answer (no 503 from a breaker an agent's bad
  bytes opened, no answer meant for another connection);
- the Steady origin only ever parses well-framed requests that the agent sent as
  requests: every target it sees is one a strict reference parse (llhttp, as the
  sidecar runs it) of the agent's mutated bytes found as a request of its own, before
  sending. Fuzz bodies are themselves requests (to /smuggled/N): if the sidecar and the
  origin ever disagree on framing, the origin sees one of those. And it never gets
  bytes it cannot parse.

Used by tests/integration/test_fuzz.py (bounded, in `make test`) and bench/fuzz.py
(longer runs, figures for the README).
"""

from __future__ import annotations

import asyncio
import http.client
import random
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httptools
import uvloop

from tests.integration.harness import StandaloneSidecar, free_port

# Log lines that mean the sidecar itself failed, not a peer.
INTERNAL_ERROR = re.compile(r"Traceback|SystemError|callback failed|Unhandled|ERROR")


@dataclass
class Report:
    build: str
    seed: int
    cases: int = 0
    fuzz_answers: dict[str, int] = field(default_factory=dict)  # first status or how it ended
    steady_ok: int = 0
    steady_failed: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    internal_errors: list[str] = field(default_factory=list)
    sidecar_exit: int | None = None
    ready_after: bool = False
    elapsed_s: float = 0.0

    @property
    def clean(self) -> bool:
        return (not self.steady_failed and not self.violations and not self.internal_errors
                and self.sidecar_exit is None and self.ready_after and self.steady_ok > 0)

    def summary(self) -> dict:
        return {"build": self.build, "seed": self.seed, "cases": self.cases,
                "cases_per_s": round(self.cases / self.elapsed_s, 1) if self.elapsed_s else 0,
                "steady_ok": self.steady_ok, "steady_failed": len(self.steady_failed),
                "violations": len(self.violations),
                "internal_errors": len(self.internal_errors),
                "sidecar_alive": self.sidecar_exit is None, "ready_after": self.ready_after,
                "elapsed_s": round(self.elapsed_s, 1), "fuzz_answers": self.fuzz_answers}


class Registry:
    """Targets the clients declared before sending: anything else reaching the Steady
    origin was never sent as a request of its own."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.targets: set[bytes] = set()
        self.next_id = 0

    def sent(self, data: bytes) -> None:
        """Declare the requests a reference parse finds in `data`, in origin-form."""
        targets = reference_targets(data)
        with self.lock:
            self.targets.update(targets)

    def new(self, kind: str) -> bytes:
        with self.lock:
            self.next_id += 1
            target = b"/%s/%d" % (kind.encode(), self.next_id)
            if kind == "s":  # the steady client's are sent as they are; a fuzz case's
                self.targets.add(target)  # count once a reference parse finds them
            return target


class SteadyOrigin(asyncio.Protocol):
    """Strict: a parse error or an unregistered target is a violation."""

    def __init__(self, registry: Registry, violations: list[str]):
        self.registry = registry
        self.violations = violations
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.violations.append(f"steady origin could not parse what reached it: {exc!r} "
                                   f"in {data[:120]!r}")
            self.transport.close()

    def on_url(self, url):
        self.url += url

    def on_body(self, body):
        self.body += body

    def on_message_complete(self):
        url, body = self.url, self.body
        self.url, self.body = b"", b""
        if url not in self.registry.targets:
            self.violations.append(f"steady origin got a request nobody sent: {url[:80]!r}")
        answer = b"ok %s %d" % (url, len(body))
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer))


class FaultyOrigin(asyncio.Protocol):
    """Answers with mutated answers, chosen by its own seeded generator."""

    ANSWERS = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\nuntil close",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, identity\r\n\r\nuntil close",
        b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\n"
        b"Content-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!",
        b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n"
        b"Content-Length: 4\r\n\r\nevil",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
        b"HTTP/1.0 200 OK\r\n\r\nclose-delimited",
        b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n",
        b"garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort",
        b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n",
        b"",
    ]

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_message_complete(self):
        answer = mutate(self.rng, self.rng.choice(self.ANSWERS), rate=0.3)
        self.transport.write(answer)
        ending = self.rng.random()
        if ending < 0.2:
            self.transport.close()
        elif ending < 0.3:
            self.transport.abort()


# --- requests and their mutations ----------------------------------------------------

class _Targets:
    def __init__(self) -> None:
        self.url = b""
        self.done: list[bytes] = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        self.done.append(self.url)
        self.url = b""


def reference_targets(data: bytes) -> list[bytes]:
    """The targets of the complete requests llhttp reads in `data`, up to its first error,
    absolute-form ones as the forward proxy sends them on (origin-form)."""
    found = _Targets()
    parser = httptools.HttpRequestParser(found)
    try:
        parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError:
        pass
    out = []
    for url in found.done:
        if url[:7].lower() == b"http://":
            rest = url[7:]
            cut = min([i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0],
                      default=len(rest))
            url = rest[cut:] if rest[cut:].startswith(b"/") else b"/" + rest[cut:]
        out.append(url)
    return out


def valid_request(rng: random.Random, target: bytes, host: bytes) -> bytes:
    kind = rng.randrange(5)
    if kind == 0:
        return b"GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: fuzz\r\n\r\n" % (target, host)
    if kind == 1:
        body = smuggled_body(rng)
        return (b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (target, host, len(body), body))
    if kind == 2:
        body = smuggled_body(rng)
        return (b"POST %s HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"%x\r\n%s\r\n0\r\n\r\n" % (target, host, len(body), body))
    if kind == 3:
        return b"GET %s HTTP/1.0\r\nHost: %s\r\nConnection: keep-alive\r\n\r\n" % (target, host)
    return b"HEAD %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, host)


def smuggled_body(rng: random.Random) -> bytes:
    """A body that is itself a request to a target nobody registers."""
    n = rng.randrange(1_000_000)
    return b"GET /smuggled/%d HTTP/1.1\r\nHost: x\r\n\r\n" % n


# Field lines and fragments that test framing and parsing edges.
FRAGMENTS = [
    b"Connection: Content-Length\r\n", b"Connection: Transfer-Encoding\r\n",
    b"Connection: close\r\n", b"Connection: Upgrade\r\nUpgrade: websocket\r\n",
    b"Content-Length: 0\r\n", b"Content-Length: 5\r\n", b"Content-Length: -1\r\n",
    b"Content-Length: 99999999999999999999\r\n", b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: identity\r\n", b"Transfer-Encoding: gzip, chunked\r\n",
    b"Transfer-Encoding : chunked\r\n", b" folded\r\n", b"X: \x00\r\n", b"Expect: 100-continue\r\n",
    b"Host: 127.0.0.1\r\n", b"\r\n", b"\n", b"\r", b"GET / HTTP/1.1\r\n", b"GET /\r\n",
    b"0\r\n\r\n", b"ffffffffffffffff\r\n", b"HTTP/1.1", b"\xff\xfe", b"%", b"\t",
]


def mutate(rng: random.Random, data: bytes, rate: float = 1.0) -> bytes:
    if not data or rng.random() > rate:
        return data
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(7)
        at = rng.randrange(len(buf) + 1)
        if op == 0 and buf:  # flip a byte
            buf[min(at, len(buf) - 1)] = rng.randrange(256)
        elif op == 1:  # insert a fragment
            buf[at:at] = rng.choice(FRAGMENTS)
        elif op == 2:  # cut
            del buf[at:at + rng.randint(1, 16)]
        elif op == 3:  # duplicate a line
            lines = bytes(buf).split(b"\r\n")
            i = rng.randrange(len(lines))
            lines.insert(i, lines[i])
            buf = bytearray(b"\r\n".join(lines))
        elif op == 4:  # truncate
            del buf[at:]
        elif op == 5:  # repeat a slice (pipelining, long lines)
            piece = buf[at:at + rng.randint(1, 64)]
            buf[at:at] = piece * rng.randint(1, 50)
        else:  # case changes in the head
            head_end = buf.find(b"\r\n\r\n")
            if head_end > 0:
                i = rng.randrange(head_end)
                buf[i:i + 1] = bytes(buf[i:i + 1]).swapcase()
    return bytes(buf)


async def fuzz_case(rng: random.Random, registry: Registry, ports: dict[str, int],
                    answers: dict[str, int]) -> None:
    listener = rng.choice(["Steady", "Steady", "Faulty", "proxy"])
    if listener == "proxy":
        host = b"127.0.0.1:%d" % ports["steady_origin"]
        target = registry.new("f")
        request = valid_request(rng, b"http://%s%s" % (host, target), host)
        port = ports["proxy"]
    else:
        target = registry.new("f")
        request = valid_request(rng, target, b"localhost")
        port = ports[listener]
    if rng.random() < 0.3:  # a second request behind it, pipelined
        request += valid_request(rng, registry.new("f"), b"localhost")
    data = mutate(rng, request, rate=0.85)
    registry.sent(data)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), 2.0)
    except (OSError, asyncio.TimeoutError):
        answers["connect_failed"] = answers.get("connect_failed", 0) + 1
        return
    how = "?"
    try:
        ending = rng.random()
        pieces = rng.randint(1, 4)
        cuts = sorted(rng.randrange(len(data) + 1) for _ in range(pieces - 1))
        start = 0
        for cut in [*cuts, len(data)]:
            writer.write(data[start:cut])
            await writer.drain()
            start = cut
        if ending < 0.1:  # abandon at once
            writer.transport.abort()
            how = "abandoned"
            return
        if ending < 0.3 and writer.can_write_eof():
            writer.write_eof()  # half-close: still reads
        first = await asyncio.wait_for(reader.read(64), 1.5)
        m = re.match(rb"HTTP/1\.[01] (\d{3})", first)
        how = m.group(1).decode() if m else ("closed" if not first else "not_http")
        await asyncio.wait_for(reader.read(1 << 16), 0.2)
    except asyncio.TimeoutError:
        how = "no_answer_in_time" if how == "?" else how
    except (ConnectionError, OSError):
        how = "reset" if how == "?" else how
    finally:
        answers[how] = answers.get(how, 0) + 1
        if not writer.transport.is_closing():
            writer.transport.abort()


def steady_client(registry: Registry, port: int, stop: threading.Event,
                  report: Report) -> None:
    """An agent as the fleet's are: http.client, keep-alive, GETs and POSTs in turn."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    n = 0
    while not stop.is_set():
        n += 1
        target = registry.new("s")
        body = b'{"cpu": %d}' % n if n % 2 else None
        try:
            conn.request("POST" if body else "GET", target.decode(), body=body,
                         headers={"Content-Type": "application/json"} if body else {})
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            report.steady_failed.append(f"{target!r}: {exc!r}")
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
            continue
        expected = b"ok %s %d" % (target, len(body or b""))
        if response.status != 200 or data != expected:
            report.steady_failed.append(f"{target!r}: {response.status} {data[:100]!r}")
        else:
            report.steady_ok += 1
        if response.will_close:
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    conn.close()


def sidecar_config(ports: dict[str, int]) -> dict:
    return {
        "upstreams": {
            # The default breaker: 5 failures in 60 s would open it.
            "Steady": {"address": f"127.0.0.1:{ports['steady_origin']}", "protocol": "http",
                       "listen": f"127.0.0.1:{ports['Steady']}", "request_timeout_s": 2},
            "Faulty": {"address": f"127.0.0.1:{ports['faulty_origin']}", "protocol": "http",
                       "listen": f"127.0.0.1:{ports['Faulty']}", "request_timeout_s": 1},
        },
        "sidecar": {"metrics_listen": f"127.0.0.1:{ports['metrics']}",
                    "proxy_listen": f"127.0.0.1:{ports['proxy']}"},
    }


def run(workdir: Path, *, seed: int, cases: int, seconds: float, pure: bool,
        concurrency: int = 8) -> Report:
    """One bounded run: at most `cases` fuzz cases and `seconds` of fuzzing."""
    report = Report(build="interpreted" if pure else "compiled", seed=seed)
    registry = Registry()
    ports = {name: free_port() for name in ("Steady", "Faulty", "proxy", "metrics")}
    loop = uvloop.new_event_loop()
    faulty_rng = random.Random(seed + 1)

    async def origins() -> None:
        steady = await loop.create_server(
            lambda: SteadyOrigin(registry, report.violations), "127.0.0.1", 0)
        faulty = await loop.create_server(lambda: FaultyOrigin(faulty_rng), "127.0.0.1", 0)
        ports["steady_origin"] = steady.sockets[0].getsockname()[1]
        ports["faulty_origin"] = faulty.sockets[0].getsockname()[1]

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(origins(), loop).result(10)
    sidecar = StandaloneSidecar(workdir, sidecar_config(ports), pure=pure)
    stop = threading.Event()
    steady: threading.Thread | None = None
    try:
        if sidecar.proc.poll() is not None:
            report.sidecar_exit = sidecar.proc.returncode
            report.internal_errors.append(sidecar.log()[-2000:])
            return report
        steady = threading.Thread(target=steady_client,
                                  args=(registry, ports["Steady"], stop, report), daemon=True)
        steady.start()
        rng = random.Random(seed)
        started = time.monotonic()

        async def fuzz() -> None:
            deadline = started + seconds
            pending: set[asyncio.Task] = set()
            while report.cases < cases and time.monotonic() < deadline:
                while len(pending) >= concurrency:
                    _, pending = await asyncio.wait(pending,
                                                    return_when=asyncio.FIRST_COMPLETED)
                case_rng = random.Random(rng.getrandbits(64))
                pending.add(asyncio.ensure_future(
                    fuzz_case(case_rng, registry, ports, report.fuzz_answers)))
                report.cases += 1
            if pending:
                await asyncio.wait(pending, timeout=5)

        asyncio.run_coroutine_threadsafe(fuzz(), loop).result(seconds + 30)
        stop.set()
        steady.join(20)
        report.elapsed_s = time.monotonic() - started
        report.ready_after = sidecar.ready()
        report.sidecar_exit = sidecar.proc.poll()
    finally:
        stop.set()
        sidecar.stop()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
    for line in sidecar.log().splitlines():
        if INTERNAL_ERROR.search(line):
            report.internal_errors.append(line)
    return report

