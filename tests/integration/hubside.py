"""The hub side for tests: a stand-in legacy hub and a real `python -m sidecar.hub`
receiver, each a child process on a free port with its own files.

`LegacyHub` is what the users' ObservabilityHub is to the receiver: an HTTP server that
appends every request it gets (method, path, headers, body, the status it answered) as
one JSON line to a file, and answers 200; 400 to paths starting with a refused prefix;
503 to its first `unavailable` requests. Run alone:
`python -m tests.integration.hubside --port P --out FILE [--refuse /prefix]
[--unavailable N]`.

`Receiver` runs the receiver on a tmp state dir and talks to it: `send(records)` posts
one batch as a forwarder does, `health()` and `metrics()` read what an operator reads.
Other tests (the forwarder's) use both.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.integration.harness import ROOT, free_port, wait_until

class LegacyHub:
    def __init__(self, workdir: Path, port: int | None = None, refuse: str = "",
                 unavailable: int = 0, delay_s: float = 0.0):
        self.port = port or free_port()
        self.unavailable = unavailable
        self.delay_s = delay_s
        self.out = workdir / f"legacy-hub-{self.port}.jsonl"
        self.log_path = workdir / f"legacy-hub-{self.port}.log"
        self.refuse = refuse
        self.proc: subprocess.Popen | None = None

    def start(self) -> "LegacyHub":
        args = [sys.executable, "-m", "tests.integration.hubside", "--port", str(self.port),
                "--out", str(self.out)]
        if self.refuse:
            args += ["--refuse", self.refuse]
        if self.unavailable:
            args += ["--unavailable", str(self.unavailable)]
        if self.delay_s:
            args += ["--delay", str(self.delay_s)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: self._listening() or self.proc.poll() is not None, 10,
                   "the legacy hub to listen")
        assert self.proc.poll() is None, self.log_path.read_text()
        return self

    def _listening(self) -> bool:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{self.port}/__ping", timeout=1).read()
            return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    def received(self) -> list[dict]:
        if not self.out.exists():
            return []
        # The hub process may be half-way through writing its last line: only whole
        # lines (ended by a newline) are read.
        text = self.out.read_text()
        whole = text[:text.rfind("\n") + 1]
        return [json.loads(line) for line in whole.splitlines()
                if line.strip() and '"__ping"' not in line]

    def pushes(self) -> list[tuple[str, str, int]]:
        """(host, agent, seq) of every push taken (200) or refused (400), in arrival
        order; not those answered 503."""
        return [(r["headers"]["X-Agentvisor-Host"], r["headers"]["X-Agentvisor-Agent"],
                 int(r["headers"]["X-Agentvisor-Seq"])) for r in self.received()
                if r["status"] != 503]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Receiver:
    def __init__(self, workdir: Path, deliver_to: int, *, port: int | None = None,
                 name: str = "central", extra: tuple[str, ...] = (),
                 state_dir: Path | None = None):
        self.port = port or free_port()
        self.state_dir = state_dir or workdir / f"hub-state-{name}"
        self.log_path = workdir / f"receiver-{name}.log"
        self.args = ["--listen", f"127.0.0.1:{self.port}", "--state-dir",
                     str(self.state_dir), "--deliver-to", f"127.0.0.1:{deliver_to}",
                     "--name", name, "--log-level", "debug", *extra]
        self.proc: subprocess.Popen | None = None

    def start(self, **popen) -> "Receiver":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "sidecar.hub", *self.args],
                                         cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         **popen)
        wait_until(lambda: self.get("/ready")[0] == 200 or self.proc.poll() is not None,
                   20, "the receiver to be ready")
        assert self.proc.poll() is None, self.log()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None) -> tuple[int, dict, bytes]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=body,
                                     method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()
        except OSError:
            return 0, {}, b""

    def get(self, path: str) -> tuple[int, bytes]:
        status, _, body = self.request("GET", path)
        return status, body

    def send(self, records) -> tuple[int, dict, dict]:
        """One batch as a forwarder posts it: (status, JSON answer, headers)."""
        from sidecar.hub import wire

        return self.post(wire.encode(records))

    def post(self, body: bytes, content_type: str | None = None) -> tuple[int, dict, dict]:
        from sidecar.hub import wire

        status, headers, answer = self.request(
            "POST", wire.PATH, body, {"Content-Type": content_type or wire.CONTENT_TYPE})
        try:
            parsed = json.loads(answer)
        except ValueError:
            parsed = {"raw": answer.decode(errors="replace")}
        return status, parsed, headers

    def health(self) -> dict:
        status, body = self.get("/health")
        assert status == 200, (status, body)
        return json.loads(body)

    def metrics(self) -> str:
        status, body = self.get("/metrics")
        assert status == 200, (status, body)
        return body.decode()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def terminate(self, timeout_s: float = 15) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)


# --- the stand-in legacy hub, as a child process ------------------------------------------

def _serve(port: int, out: Path, refuse: str, unavailable: int, delay_s: float) -> None:
    sink = open(out, "a", buffering=1)
    lock = threading.Lock()
    seen = [0]

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes: with Nagle on, the second waits for the
        # client's delayed ACK (40 ms), and a stand-in would take 25 pushes a second.
        disable_nagle_algorithm = True

        def _push(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            status = 200
            if self.path != "/__ping":  # the test's own readiness check
                with lock:
                    seen[0] += 1
                    if seen[0] <= unavailable:
                        status = 503
                    elif refuse and self.path.startswith(refuse):
                        status = 400
                    sink.write(json.dumps({
                        "method": self.command, "path": self.path,
                        "headers": {k: v for k, v in self.headers.items()},
                        "body": body.decode("latin-1"), "status": status}) + "\n")
            answer = json.dumps({"status": status}).encode()
            if delay_s and self.path != "/__ping":
                time.sleep(delay_s)  # a slow hub: it has the push, its answer comes later
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        do_POST = do_PUT = do_PATCH = do_GET = _push

        def log_message(self, *args):
            pass

    http.server.ThreadingHTTPServer.allow_reuse_address = True
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    server.serve_forever()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--refuse", default="")
    ap.add_argument("--unavailable", type=int, default=0)
    ap.add_argument("--delay", type=float, default=0.0)
    a = ap.parse_args()
    _serve(a.port, a.out, a.refuse, a.unavailable, a.delay)
