"""The data process's ingest: real `python -m sidecar.data` processes, pushed to by
unmodified clients (urllib.request, http.client, raw sockets), and the spool they leave on
disk read back after they are gone.

What an agent relies on: a push is answered 200 (with its sequence) only once it is in the
spool, so a SIGKILL at any moment loses no answered push; bad input from one agent costs
only that agent's connection; a full spool says 503 with Retry-After and keeps everything
it answered before.
"""

from __future__ import annotations

import http.client
import http.server
import json
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from sidecar import spool as spool_module
from sidecar.spool import Push, Spool
from tests.integration.harness import ROOT, free_port, wait_until
from tests.integration.hubside import LegacyHub, Receiver

HOST = "TestHost"


class DataProcess:
    """One `python -m sidecar.data` with an ingest listener per agent, in tmp_path."""

    def __init__(self, tmp_path: Path, agents=("A", "B"), *extra: str):
        self.state_dir = tmp_path / "state"
        self.log_path = tmp_path / "data.log"
        self.ports = {agent: free_port() for agent in agents}
        self.status_port = free_port()
        self.extra = extra
        self.proc: subprocess.Popen | None = None

    def start(self, *extra: str, until_exit: bool = False) -> DataProcess:
        argv = [sys.executable, "-m", "sidecar.data", "--state-dir", str(self.state_dir),
                "--host", HOST, "--status", f"127.0.0.1:{self.status_port}",
                "--log-level", "debug", *self.extra, *extra]
        for agent, port in self.ports.items():
            argv += ["--ingest", f"{agent}=127.0.0.1:{port}"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if until_exit:  # it is meant to stop by itself
            wait_until(lambda: self.proc.poll() is not None, 30, "the data process to exit")
            return self
        wait_until(lambda: self.ready() or self.proc.poll() is not None, 20,
                   "the data process to be ready")
        assert self.proc.poll() is None, self.log()
        return self

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.status_port}/ready",
                                        timeout=2) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def status(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.status_port}/status",
                                    timeout=5) as r:
            return json.load(r)

    def url(self, agent: str, path: str = "/api/metrics") -> str:
        return f"http://127.0.0.1:{self.ports[agent]}{path}"

    def connect(self, agent: str) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.ports[agent], timeout=10)

    def stop(self, timeout_s: float = 20) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def records(self) -> list:
        """Everything in the spool, read once the process is gone."""
        assert self.proc.poll() is not None, "read the spool once the process is gone"
        spool = Spool(self.state_dir / "metrics.db", host=HOST)
        try:
            out, after = [], 0
            while batch := spool.pending(limit=10_000, max_bytes=1 << 30, after_id=after):
                out += batch
                after = batch[-1].id
            return out
        finally:
            spool.close()


@pytest.fixture
def data(tmp_path):
    processes = []

    def make(*extra: str, agents=("A", "B")) -> DataProcess:
        p = DataProcess(tmp_path, agents, *extra)
        processes.append(p)
        return p

    yield make
    for p in processes:
        p.kill()


def push(url: str, body: bytes | None, content_type: str | None = "application/json",
         method: str = "POST") -> tuple[int, dict, bytes]:
    """One push the way an unmodified agent sends it (urllib.request)."""
    headers = {"Content-Type": content_type} if content_type else {}
    req = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_pushes_are_answered_with_their_sequence_and_stored_as_sent(data):
    d = data().start()
    before = time.time()
    sent = [("A", "/api/metrics?x=1", "application/json", b'{"cpu": 1}', "POST"),
            ("A", "/push", "text/plain; charset=utf-8", b"cpu 2\n", "PUT"),
            ("B", "/api/metrics", "application/octet-stream", b"\x00\xffbinary", "PATCH"),
            ("A", "/api/metrics", "application/json", b'{"cpu": 3}', "POST")]
    answers = [push(d.url(agent, path), body, ctype, method)
               for agent, path, ctype, body, method in sent]
    # The answer an old client expects from the hub, plus each push's sequence, per agent.
    assert [a[0] for a in answers] == [200] * 4
    assert all(json.loads(a[2]) == {"status": "ok"} for a in answers)
    assert [a[1]["X-Agentvisor-Seq"] for a in answers] == ["1", "2", "1", "3"]
    status = d.status()
    assert status["ingest"]["agents"]["A"]["accepted"] == 3
    assert status["ingest"]["agents"]["B"]["accepted"] == 1
    assert d.stop() == 0
    records = d.records()
    assert [(r.agent, r.path, r.content_type, r.body, r.method) for r in records] == [
        (agent, path, ctype, body, method) for agent, path, ctype, body, method in sent]
    assert [(r.host, r.seq) for r in records] == [(HOST, 1), (HOST, 2), (HOST, 1), (HOST, 3)]
    assert all(before <= r.time <= time.time() for r in records)


def test_reads_are_not_taken_by_ingest(data):
    d = data().start()
    status, _, body = push(d.url("A"), None, None, "GET")
    assert status == 502 and b"through the sidecar proxy" in body
    status, headers, body = push(d.url("A"), None, None, "HEAD")
    assert status == 502 and body == b""
    assert d.status()["ingest"]["agents"]["A"]["reads"] == 2
    assert d.stop() == 0
    assert d.records() == []


def test_keep_alive_and_chunked_pushes(data):
    d = data().start()
    conn = d.connect("A")
    seqs = []
    for i in range(5):
        conn.request("POST", f"/m/{i}", body=b"plain %d" % i,
                     headers={"Content-Type": "text/plain"})
        if i == 0:
            first_socket = conn.sock
        r = conn.getresponse()
        r.read()
        assert r.status == 200
        seqs.append(int(r.headers["X-Agentvisor-Seq"]))
    # Chunked, in pieces the parser sees apart, and with no content type at all.
    conn.request("PUT", "/chunked", body=iter([b"one ", b"two ", b"three"]),
                 encode_chunked=True)
    r = conn.getresponse()
    r.read()
    assert r.status == 200
    seqs.append(int(r.headers["X-Agentvisor-Seq"]))
    assert conn.sock is first_socket, "the connection was not kept alive"
    conn.close()
    assert seqs == [1, 2, 3, 4, 5, 6]
    assert d.status()["ingest"]["agents"]["A"]["connections_total"] == 1
    assert d.stop() == 0
    records = d.records()
    assert [r.body for r in records] == [b"plain %d" % i for i in range(5)] + [b"one two three"]
    assert (records[-1].method, records[-1].path, records[-1].content_type) == (
        "PUT", "/chunked", "")


def read_answers(f, n: int) -> list[tuple[int, str | None]]:
    """(status, X-Agentvisor-Seq) of n answers read off one connection, in order."""
    out = []
    for _ in range(n):
        status = int(f.readline().split()[1])
        fields = {}
        while (line := f.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            fields[name.lower()] = value.strip()
        f.read(int(fields.get("content-length", 0)))
        out.append((status, fields.get("x-agentvisor-seq")))
    return out


def test_pipelined_pushes_are_answered_in_order(data):
    d = data().start()
    requests = b"".join(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n%d" % i
                        for i in range(10))
    requests += b"GET /read HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", d.ports["A"]), timeout=10) as s:
        s.sendall(requests)
        answers = read_answers(s.makefile("rb"), 11)
    assert answers == [(200, str(i + 1)) for i in range(10)] + [(502, None)]
    assert d.stop() == 0
    assert [r.body for r in d.records()] == [b"%d" % i for i in range(10)]


def keep_pushing(d: DataProcess, agent: str, stop: threading.Event, answered: list,
                 errors: list) -> None:
    """A client pushing as fast as it can on one keep-alive connection, recording what
    was answered 200: (seq, body)."""
    conn = d.connect(agent)
    i = 0
    try:
        while not stop.is_set():
            body = b'{"n": %d, "agent": "%s"}' % (i, agent.encode())
            conn.request("POST", "/api/metrics", body=body,
                         headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                errors.append(r.status)
                return
            answered.append((int(r.headers["X-Agentvisor-Seq"]), body))
            i += 1
    except (OSError, http.client.HTTPException) as exc:
        errors.append(exc)
    finally:
        conn.close()


def test_malformed_request_costs_only_its_own_connection(data):
    d = data().start()
    stop = threading.Event()
    answered, errors = [], []
    other = threading.Thread(target=keep_pushing, args=(d, "B", stop, answered, errors))
    other.start()
    try:
        wait_until(lambda: len(answered) >= 20, 10, "B's pushes to be answered")
        for garbage in (b"NOT HTTP AT ALL\r\n\r\n",
                        b"POST /x HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
                        b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"):
            with socket.create_connection(("127.0.0.1", d.ports["A"]), timeout=10) as s:
                s.sendall(garbage)
                reply = b""
                while chunk := s.recv(4096):  # the connection is closed after the 400
                    reply += chunk
            assert reply.startswith(b"HTTP/1.1 400 "), reply
            assert b"malformed" in reply
        n = len(answered)
        wait_until(lambda: len(answered) >= n + 20, 10, "B's pushes to go on")
    finally:
        stop.set()
        other.join(10)
    assert errors == []
    # A's listener still serves a well-formed push.
    assert push(d.url("A"), b"fine")[0] == 200
    assert d.status()["ingest"]["agents"]["A"]["malformed"] == 3
    assert d.stop() == 0
    records = d.records()
    assert [r.body for r in records if r.agent == "A"] == [b"fine"]
    assert [r.seq for r in records if r.agent == "B"] == [s for s, _ in answered]


def test_over_limit_body_is_refused_with_413(data):
    d = data("--max-body-bytes", "1000").start()
    status, headers, body = push(d.url("A"), b"x" * 5000)
    assert status == 413 and b"1000 bytes" in body
    conn = d.connect("A")
    conn.request("POST", "/chunked", body=iter([b"y" * 600, b"y" * 600]), encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 413
    conn.close()
    assert push(d.url("A"), b"z" * 1000)[0] == 200  # at the limit is fine
    assert d.status()["ingest"]["agents"]["A"]["too_large"] == 2
    assert d.stop() == 0
    assert [r.body for r in d.records()] == [b"z" * 1000]


def test_full_spool_answers_503_and_keeps_what_it_answered(data):
    d = data("--max-bytes", str(256 << 10)).start()
    answered = {}
    refusal = None
    for i in range(5000):
        body = b'{"i": %d, "pad": "%s"}' % (i, b"p" * 2000)
        status, headers, text = push(d.url("A"), body)
        if status == 200:
            answered[int(headers["X-Agentvisor-Seq"])] = body
        else:
            refusal = (status, headers, text)
            break
    assert refusal is not None, "a 256 KiB spool took 10 MB of pushes"
    status, headers, text = refusal
    assert status == 503
    assert int(headers["Retry-After"]) >= 1
    assert b"full" in text
    assert push(d.url("B"), body)[0] == 503  # every agent: the spool is the host's
    st = d.status()
    assert st["ingest"]["refused"] == 2 and st["ingest"]["refusing"]
    assert d.stop() == 0
    records = d.records()
    assert {r.seq: r.body for r in records if r.agent == "A"} == answered
    assert [r.agent for r in records] == ["A"] * len(answered)


def test_sigkill_loses_no_answered_push(data):
    d = data().start()
    stop = threading.Event()
    answered = {agent: [] for agent in ("A", "B")}
    errors: list = []
    # Several connections per agent, so batches hold pushes of both agents.
    clients = [threading.Thread(target=keep_pushing, args=(d, agent, stop, answered[agent],
                                                           errors))
               for agent in ("A", "B") for _ in range(3)]
    for c in clients:
        c.start()
    wait_until(lambda: min(len(a) for a in answered.values()) >= 300, 30,
               "pushes to be answered")
    d.proc.send_signal(signal.SIGKILL)  # mid-stream
    d.proc.wait(10)
    stop.set()
    for c in clients:
        c.join(10)
    stored = {(r.agent, r.seq): r.body for r in d.records()}
    for agent, got in answered.items():
        missing = [(s, b) for s, b in got if stored.get((agent, s)) != b]
        assert missing == [], f"{agent}: {len(missing)} answered pushes are not in the spool"
        # And no holes: the spool holds every sequence up to its last (some of the last
        # may have been stored without their answer reaching the client: that is fine).
        seqs = sorted(s for a, s in stored if a == agent)
        assert seqs == list(range(1, len(seqs) + 1)), f"{agent}: stored seqs have gaps"
        assert len(seqs) >= len(got)
    # A restarted process goes on from the stored sequences: none is given out twice.
    d.start()
    for agent in ("A", "B"):
        top = max(s for (a, s) in stored if a == agent)
        status, headers, _ = push(d.url(agent), b"after")
        assert status == 200 and int(headers["X-Agentvisor-Seq"]) == top + 1
    assert d.stop() == 0


def test_sigterm_answers_the_push_in_flight_and_exits_0(data):
    d = data().start()
    s = socket.create_connection(("127.0.0.1", d.ports["A"]), timeout=10)
    s.sendall(b"POST /late HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhalf ")
    idle = d.connect("B")
    idle.request("POST", "/early", body=b"early")
    assert idle.getresponse().status == 200  # and now idle, kept alive
    d.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: not d.ready(), 10, "the data process to begin draining")
    s.sendall(b"done.")
    answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in answer
    assert s.recv(1) == b""  # then closed
    s.close()
    assert d.proc.wait(20) == 0
    idle.close()
    assert [r.path for r in d.records()] == ["/early", "/late"]
    assert "draining" in d.log()


def test_corrupt_spool_is_reported_and_the_rest_kept(data):
    d = data().start()
    for body in (b"first", b"CORRUPT-ME-0123456789", b"third"):
        assert push(d.url("A"), body)[0] == 200
    assert d.stop() == 0
    # A record's bytes changed on disk behind the spool's back (a bad sector, a stray
    # write): its checksum no longer matches.
    db = d.state_dir / "metrics.db"
    raw = db.read_bytes()
    assert raw.count(b"CORRUPT-ME-0123456789") == 1
    db.write_bytes(raw.replace(b"CORRUPT-ME-0123456789", b"CORRUPT-ME-xxxxxxxxxx"))
    d.start()
    recovered = d.status()["spool"]["recovered"]
    assert recovered, "a damaged spool was opened as if clean"
    assert "ERROR" in d.log() and "damaged" in d.log()
    assert push(d.url("A"), b"fourth")[0] == 200  # and it serves on
    assert d.stop() == 0
    assert [r.body for r in d.records()] == [b"first", b"third", b"fourth"]


def test_a_big_spool_damaged_after_a_clean_stop_is_found_after_start(data):
    # Past TRUST_CLEAN_CLOSE_RECORDS an open after a clean stop takes the totals the
    # close left and serves at once; the rows are read back behind it. Damage found
    # there stops the process (the supervisor restarts it), and that next open, which
    # reads every row, reports it and keeps the rest.
    d = data()
    d.state_dir.mkdir(parents=True, exist_ok=True)
    n = spool_module.TRUST_CLEAN_CLOSE_RECORDS + 5_000
    with Spool(d.state_dir / "metrics.db", host=HOST) as spool:
        for start in range(0, n, 5_000):
            spool.append([Push("A", "POST", "/api/metrics", "application/json",
                               b'{"n": %08d}' % i) for i in range(start, start + 5_000)])
    db = d.state_dir / "metrics.db"
    raw = db.read_bytes()
    victim = b'{"n": %08d}' % (n - 10)
    assert raw.count(victim) == 1
    db.write_bytes(raw.replace(victim, b'{"n": xxxxxxxx}'))
    assert d.start(until_exit=True).proc.returncode == 1
    assert f"record id {n - 9} fails its checksum" in d.log()
    assert "stopping so that reopening the spool recovers it" in d.log()
    d.start()
    assert "lost 1 record(s) that failed their checksum" in d.status()["spool"]["recovered"]
    assert push(d.url("A"), b"after")[0] == 200
    assert d.stop() == 0
    assert d.records()[-1].body == b"after" and len(d.records()) == n


def test_pushes_reach_the_hub_once_it_answers(data, tmp_path):
    # The whole data process: ingest answers at once while no hub is reachable, and the
    # forwarder delivers every push, in each agent's order, once a receiver is there.
    legacy = LegacyHub(tmp_path).start()
    hub_port = free_port()
    d = data("--hub", f"127.0.0.1:{hub_port}").start()
    try:
        sent = []
        for i in range(30):
            agent = "AB"[i % 2]
            status, headers, _ = push(d.url(agent, f"/m?i={i}"), b'{"i": %d}' % i)
            assert status == 200
            sent.append((HOST, agent, int(headers["X-Agentvisor-Seq"])))
        wait_until(lambda: d.status()["forwarder"]["state"] == "partitioned", 10,
                   "the data process to say it is partitioned")
        assert d.status()["forwarder"]["pending_records"] == 30
        receiver = Receiver(tmp_path, legacy.port, port=hub_port).start()
        try:
            wait_until(lambda: d.status()["forwarder"]["pending_records"] == 0, 20,
                       lambda: f"the spool to drain: {d.status()['forwarder']}")
            wait_until(lambda: len(legacy.pushes()) == 30, 20, "the legacy hub's pushes")
            for agent in "AB":
                assert ([p for p in legacy.pushes() if p[1] == agent]
                        == [p for p in sent if p[1] == agent])
            got = legacy.received()
            assert sorted(json.loads(r["body"])["i"] for r in got) == list(range(30))
            assert all(r["path"] == f"/m?i={json.loads(r['body'])['i']}" for r in got)
            assert d.stop() == 0
        finally:
            receiver.kill()
    finally:
        legacy.stop()


def test_configured_answer(data):
    d = data("--answer-status", "202", "--answer-body", "accepted",
             "--answer-content-type", "text/plain").start()
    status, headers, body = push(d.url("A"), b"x")
    assert (status, body, headers["Content-Type"]) == (202, b"accepted", "text/plain")
    assert headers["X-Agentvisor-Seq"] == "1"
    assert d.stop() == 0


@pytest.mark.parametrize("args, says", [
    (["--ingest", "A=nowhere"], "HOST:PORT"),
    (["--ingest", "A=127.0.0.1:1", "--ingest", "A=127.0.0.1:2"], "given twice"),
    (["--ingest", "A=127.0.0.1:1", "--answer-status", "500"], "2xx"),
    (["--ingest", "A=127.0.0.1:1", "--max-bytes", "0"], "more than 0"),
    (["--ingest", "A=127.0.0.1:1", "--fds", "A"], "AGENT=FD"),
    (["--ingest", "A=127.0.0.1:1", "--reads-to", "127.0.0.1:0"], "port 0"),
    (["--ingest", "A=127.0.0.1:1", "--reads-to", "proxy"], "is not host:port"),
    (["--ingest", "A=127.0.0.1:1", "--reads-timeout", "0"], "more than 0"),
    ([], "nothing to do"),
])
def test_bad_command_line_is_explained(tmp_path, args, says):
    r = subprocess.run([sys.executable, "-m", "sidecar.data", "--state-dir",
                        str(tmp_path / "s"), "--host", HOST, *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and says in r.stderr
    assert "Traceback" not in r.stderr


def test_unusable_state_dir_is_explained(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    r = subprocess.run([sys.executable, "-m", "sidecar.data", "--state-dir",
                        str(blocker / "state"), "--host", HOST, "--ingest",
                        f"A=127.0.0.1:{free_port()}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "cannot open the spool" in r.stderr
    assert "Traceback" not in r.stderr


def test_inherited_listener_is_served(tmp_path):
    # The supervisor binds and hands the socket down: the agent is named by the fd map.
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    d = DataProcess(tmp_path, ("B",))
    argv = [sys.executable, "-m", "sidecar.data", "--state-dir", str(d.state_dir),
            "--host", HOST, "--status", f"127.0.0.1:{d.status_port}",
            "--fds", f"Inherited={sock.fileno()}"]
    with open(d.log_path, "ab") as log:
        d.proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  pass_fds=[sock.fileno()])
    sock.close()
    try:
        wait_until(lambda: d.ready() or d.proc.poll() is not None, 20, "ready")
        status, headers, _ = push(f"http://127.0.0.1:{port}/m", b"x")
        assert status == 200
        assert d.stop() == 0
        assert [r.agent for r in d.records()] == ["Inherited"]
    finally:
        d.kill()


# -- reads relayed to the proxy (--reads-to)

DASHBOARD = b"<html><body>hub dashboard</body></html>"


class ReadsOrigin:
    """A stand-in for the proxy's listener at --reads-to (which answers as the hub does,
    through its breaker and fallback): answers reads by path, and records what it was
    sent: (method, path, fields, body, the client's port). `/held` answers only once
    `release` is set."""

    def __init__(self):
        self.requests: list[tuple[str, str, dict, bytes, int]] = []
        self.release = threading.Event()
        origin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def answer(self):
                n = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(n) if n else b""
                origin.requests.append((self.command, self.path, dict(self.headers), body,
                                        self.client_address[1]))
                origin.route(self)

            do_GET = do_HEAD = do_DELETE = do_OPTIONS = answer

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def route(self, h: http.server.BaseHTTPRequestHandler) -> None:
        path = h.path.split("?")[0]
        head = h.command == "HEAD"
        if path == "/chunked":
            h.send_response(200)
            h.send_header("Content-Type", "text/plain")
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            h.wfile.write(b"5\r\nhello\r\n7\r\n, hub! \r\n0\r\n\r\n")
        elif path == "/close":  # close-delimited: no length, the end of the connection
            h.send_response(200)
            h.send_header("Connection", "close")
            h.end_headers()
            h.wfile.write(b"until the end")
            h.close_connection = True
        else:
            status, body = (404, b"no such page") if path == "/missing" else (200, DASHBOARD)
            if path == "/held":
                self.release.wait(20)
                body = b"held answer"
            h.send_response(status)
            h.send_header("Content-Type", "text/html")
            h.send_header("X-Hub", "central")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            if not head:
                h.wfile.write(body)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def origin():
    o = ReadsOrigin()
    yield o
    o.close()


def read_answer(f) -> tuple[int, dict, bytes]:
    """One answer off a raw connection: (status, fields lower-cased, body by length)."""
    status = int(f.readline().split()[1])
    fields = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        fields[name.lower()] = value.strip()
    return status, fields, f.read(int(fields.get("content-length", 0)))


def test_reads_reach_the_proxy_and_its_answers_come_back(data, origin):
    d = data("--reads-to", f"127.0.0.1:{origin.port}").start()
    conn = d.connect("A")
    conn.request("GET", "/dashboard?view=agents", headers={"X-Operator": "alice"})
    r = conn.getresponse()
    assert (r.status, r.read()) == (200, DASHBOARD)
    assert (r.headers["X-Hub"], r.headers["Content-Type"]) == ("central", "text/html")
    sock = conn.sock
    # Chunked as the proxy sent it; close-delimited gets a length, so keep-alive holds.
    conn.request("GET", "/chunked")
    r = conn.getresponse()
    assert (r.status, r.headers["Transfer-Encoding"], r.read()) == (200, "chunked",
                                                                    b"hello, hub! ")
    conn.request("GET", "/close")
    r = conn.getresponse()
    assert (r.status, r.read()) == (200, b"until the end")
    conn.request("GET", "/missing")
    r = conn.getresponse()
    assert (r.status, r.read()) == (404, b"no such page")
    conn.request("HEAD", "/dashboard")
    r = conn.getresponse()
    assert (r.status, r.headers["Content-Length"], r.read()) == (200, str(len(DASHBOARD)),
                                                                 b"")
    conn.request("DELETE", "/alerts/7", body=b"acknowledged")
    assert conn.getresponse().read() == DASHBOARD
    # And pushes on the same connection are ingest's, as ever.
    conn.request("POST", "/api/metrics", body=b'{"cpu": 1}',
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    r.read()
    assert (r.status, r.headers["X-Agentvisor-Seq"]) == (200, "1")
    assert conn.sock is sock, "the agent's connection was not kept alive"
    conn.close()
    seen = [(m, p, b) for m, p, _, b, _ in origin.requests]
    assert seen == [("GET", "/dashboard?view=agents", b""), ("GET", "/chunked", b""),
                    ("GET", "/close", b""), ("GET", "/missing", b""),
                    ("HEAD", "/dashboard", b""), ("DELETE", "/alerts/7", b"acknowledged")]
    assert origin.requests[0][2]["X-Operator"] == "alice"
    assert origin.requests[0][2]["Host"] == f"127.0.0.1:{d.ports['A']}"
    status = d.status()["ingest"]
    assert status["agents"]["A"]["reads"] == 6
    relay = status["reads_relay"]
    assert (relay["relayed"], relay["failed"], relay["timeouts"]) == (6, 0, 0)
    # Connections to the proxy are reused (the close-delimited answer and HEAD end theirs).
    assert relay["connects"] < 6
    assert origin.requests[0][4] == origin.requests[1][4]
    assert d.stop() == 0
    assert [(r.path, r.body) for r in d.records()] == [("/api/metrics", b'{"cpu": 1}')]


def test_a_push_after_a_read_is_answered_after_it(data, origin):
    d = data("--reads-to", f"127.0.0.1:{origin.port}").start()
    pipelined = (b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nfirst"
                 b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n"
                 b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nsecond")
    with socket.create_connection(("127.0.0.1", d.ports["A"]), timeout=10) as s:
        s.sendall(pipelined)
        f = s.makefile("rb")
        status, fields, _ = read_answer(f)
        assert (status, fields["x-agentvisor-seq"]) == (200, "1")
        # The second push is in the spool, and its answer waits behind the read's.
        wait_until(lambda: d.status()["ingest"]["accepted"] == 2, 10,
                   "the second push to be stored")
        assert select.select([s], [], [], 0)[0] == [], "an answer overtook the read's"
        origin.release.set()
        status, fields, body = read_answer(f)
        assert (status, fields["x-hub"], body) == (200, "central", b"held answer")
        status, fields, _ = read_answer(f)
        assert (status, fields["x-agentvisor-seq"]) == (200, "2")
    assert d.stop() == 0
    assert [r.body for r in d.records()] == [b"first", b"second"]


def test_proxy_down_reads_get_502_and_pushes_go_on(data):
    nowhere = free_port()  # nothing listens there
    d = data("--reads-to", f"127.0.0.1:{nowhere}").start()
    conn = d.connect("A")
    conn.request("GET", "/health")
    r = conn.getresponse()
    body = r.read()
    assert r.status == 502
    assert f"sidecar proxy at 127.0.0.1:{nowhere}".encode() in body and b"refused" in body
    conn.request("HEAD", "/health")
    r = conn.getresponse()
    assert (r.status, r.read()) == (502, b"")
    conn.request("POST", "/api/metrics", body=b"still stored")
    r = conn.getresponse()
    r.read()
    assert (r.status, r.headers["X-Agentvisor-Seq"]) == (200, "1")
    conn.close()
    relay = d.status()["ingest"]["reads_relay"]
    assert (relay["relayed"], relay["failed"]) == (0, 2) and "refused" in relay["failing"]
    assert "WARNING" in d.log() and "/health" in d.log()
    assert d.stop() == 0
    assert [r.body for r in d.records()] == [b"still stored"]


def test_a_read_the_proxy_never_answers_gets_504_in_time(data):
    # Connections complete in the kernel's backlog; nothing ever reads or answers them.
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        d = data("--reads-to", f"127.0.0.1:{silent.getsockname()[1]}",
                 "--reads-timeout", "0.5").start()
        conn = d.connect("A")
        began = time.monotonic()
        conn.request("GET", "/dashboard")
        r = conn.getresponse()
        body = r.read()
        took = time.monotonic() - began
        assert r.status == 504 and b"did not answer this read in 0.5 s" in body
        assert 0.5 <= took < 5, took
        conn.request("POST", "/api/metrics", body=b"after the 504")
        r = conn.getresponse()
        r.read()
        assert r.status == 200  # the same connection, kept alive
        conn.close()
        assert d.status()["ingest"]["reads_relay"]["timeouts"] == 1
        assert d.stop() == 0
        assert [r.body for r in d.records()] == [b"after the 504"]
    finally:
        silent.close()


def test_sigterm_answers_the_read_in_flight_and_exits_0(data, origin):
    d = data("--reads-to", f"127.0.0.1:{origin.port}").start()
    with socket.create_connection(("127.0.0.1", d.ports["A"]), timeout=10) as s:
        s.sendall(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_until(lambda: origin.requests, 10, "the read to reach the proxy")
        d.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: not d.ready(), 10, "the data process to begin draining")
        origin.release.set()
        f = s.makefile("rb")
        status, _, body = read_answer(f)
        assert (status, body) == (200, b"held answer")
        assert f.read() == b""  # then closed: the process is going
    assert d.proc.wait(20) == 0
