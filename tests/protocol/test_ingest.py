"""Ingest's connection protocol and its group commit, driven by bytes alone: a loop whose
"end of the iteration" (`call_soon`) and timers the test fires by hand, transports that
record what each agent would read, and a spool stand-in that can be made full or failing.

What an agent relies on: no answer before its push is stored; answers in request order;
one commit for the pushes of one loop iteration; a full spool refuses with 503 and
Retry-After and stores nothing after the first refusal.
"""

from __future__ import annotations

import math
import sqlite3

from sidecar.data.ingest import (
    MAX_WAITING_ANSWERS,
    Answer,
    Ingest,
    IngestConnection,
    IngestSettings,
)
from sidecar.spool import Record, SpoolFull
from tests.protocol.rig import FakeLoop, FakeTimer, FakeTransport


class Loop(FakeLoop):
    """FakeLoop plus `call_soon`: what runs at the end of the current iteration."""

    def __init__(self):
        super().__init__()
        self.soon: list[FakeTimer] = []

    def call_soon(self, callback, *args) -> FakeTimer:
        timer = FakeTimer(self.now, callback, args)
        self.soon.append(timer)
        return timer

    def end_iteration(self) -> None:
        soon, self.soon = self.soon, []
        for timer in soon:
            if not timer.cancelled:
                timer.fire()

    def fire_timers(self, advance_s: float) -> None:
        self.now += advance_s
        for timer in [t for t in self.armed() if t.when <= self.now]:
            timer.fire()


class MemorySpool:
    """Spool.append's contract in memory: all or none, per-agent sequences."""

    def __init__(self, room: int | None = None):
        self.records: list[Record] = []
        self.appends: list[int] = []  # the size of each append() call
        self.room = room  # records it still takes; None: no bound
        self.failing: Exception | None = None
        self._seq: dict[str, int] = {}

    def append(self, pushes):
        self.appends.append(len(pushes))
        if self.failing is not None:
            raise self.failing
        if self.room is not None and len(pushes) > self.room:
            raise SpoolFull(f"spool full: {len(self.records)} records", 2.5)
        out = []
        for p in pushes:
            seq = self._seq[p.agent] = self._seq.get(p.agent, 0) + 1
            out.append(Record(len(self.records) + len(out) + 1, "H", p.agent, seq, p.time,
                              p.method, p.path, p.content_type, p.body))
        self.records += out
        if self.room is not None:
            self.room -= len(out)
        return out


def post(body: bytes = b'{"cpu": 1}', path: str = "/api/metrics", method: str = "POST",
         extra: str = "") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: hub\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def answers(data: bytes) -> list[tuple[int, dict, bytes]]:
    """Each answer in `data`: (status, fields with lower-case names, body)."""
    out = []
    while data:
        head, _, data = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        fields = dict((k.lower(), v.strip()) for k, _, v in
                      (line.partition(":") for line in lines[1:]))
        n = int(fields.get("content-length", 0))
        status = int(lines[0].split()[1])
        if status == 100:
            n = 0
        out.append((status, fields, data[:n]))
        data = data[n:]
    return out


class Rig:
    def __init__(self, spool: MemorySpool | None = None, **settings):
        self.loop = Loop()
        self.spool = spool or MemorySpool()
        self.appended = 0
        self.ingest = Ingest(self.spool, IngestSettings(**settings), loop=self.loop,
                             on_appended=self._appended)

    def _appended(self) -> None:
        self.appended += 1

    def connect(self, agent: str = "A", answer: Answer | None = None
                ) -> tuple[IngestConnection, FakeTransport]:
        state = self.ingest.agents.get(agent) or self.ingest.add(agent, answer)
        conn = IngestConnection(self.ingest, state)
        transport = FakeTransport(conn)
        conn.connection_made(transport)
        return conn, transport


def test_pushes_of_one_iteration_share_one_commit_and_are_answered_after_it():
    rig = Rig()
    conns = [rig.connect(agent) for agent in ("A", "B", "A")]
    for i, (conn, _) in enumerate(conns):
        conn.data_received(post(b"%d" % i))
    # Nothing is answered before the spool has the pushes.
    assert rig.spool.appends == [] and all(t.writes == [] for _, t in conns)
    rig.loop.end_iteration()
    assert rig.spool.appends == [3]
    got = [answers(t.take()) for _, t in conns]
    assert [(a[0][0], a[0][1]["x-agentvisor-seq"], a[0][2]) for a in got] == [
        (200, "1", b'{"status": "ok"}'), (200, "1", b'{"status": "ok"}'),
        (200, "2", b'{"status": "ok"}')]
    assert [(r.agent, r.seq, r.body, r.path, r.content_type, r.method)
            for r in rig.spool.records] == [
        ("A", 1, b"0", "/api/metrics", "application/json", "POST"),
        ("B", 1, b"1", "/api/metrics", "application/json", "POST"),
        ("A", 2, b"2", "/api/metrics", "application/json", "POST")]
    assert rig.appended == 1  # the forwarder is woken once per commit
    assert not any(t.closed for _, t in conns)


def test_a_batch_is_bounded_by_count():
    rig = Rig(max_batch=4)
    conn, transport = rig.connect()
    conn.data_received(b"".join(post(b"%d" % i) for i in range(10)))
    assert rig.spool.appends == [4, 4]  # committed as soon as a batch was full
    rig.loop.end_iteration()
    assert rig.spool.appends == [4, 4, 2]
    assert [int(a[1]["x-agentvisor-seq"]) for a in answers(transport.take())] == list(
        range(1, 11))


def test_pipelined_answers_keep_request_order():
    rig = Rig()
    conn, transport = rig.connect()
    conn.data_received(post(b"one") + b"GET /x HTTP/1.1\r\nHost: hub\r\n\r\n" + post(b"two"))
    assert transport.writes == []  # the 502 waits behind the first push
    rig.loop.end_iteration()
    got = answers(transport.take())
    assert [(s, f.get("x-agentvisor-seq")) for s, f, _ in got] == [
        (200, "1"), (502, None), (200, "2")]
    assert b"through the sidecar proxy" in got[1][2]


def test_full_spool_stores_the_front_of_a_batch_and_refuses_the_rest_in_order():
    rig = Rig(MemorySpool(room=2))
    conns = [rig.connect(agent) for agent in ("A", "B", "A", "B")]
    for i, (conn, _) in enumerate(conns):
        conn.data_received(post(b"%d" % i))
    rig.loop.end_iteration()
    # The batch of 4 was refused whole; then one at a time up to the first refusal.
    assert rig.spool.appends == [4, 1, 1, 1]
    assert [r.body for r in rig.spool.records] == [b"0", b"1"]
    got = [answers(t.take())[0] for _, t in conns]
    assert [s for s, _, _ in got] == [200, 200, 503, 503]
    assert got[2][1]["retry-after"] == str(math.ceil(2.5))
    assert b"spool full" in got[2][2]
    status = rig.ingest.status()
    assert (status["accepted"], status["refused"]) == (2, 2)
    assert status["refusing"].startswith("spool full")
    # Room again: pushes are taken, and the refusal is over.
    rig.spool.room = None
    conns[2][0].data_received(post(b"again"))
    rig.loop.end_iteration()
    assert answers(conns[2][1].take())[0][0] == 200
    assert rig.ingest.status()["refusing"] is None


def test_failing_spool_answers_503_and_serves_on():
    rig = Rig()
    rig.spool.failing = sqlite3.OperationalError("disk I/O error")
    conn, transport = rig.connect()
    conn.data_received(post())
    rig.loop.end_iteration()
    status, fields, body = answers(transport.take())[0]
    assert (status, fields["retry-after"]) == (503, "1")
    assert b"spool unavailable: disk I/O error" in body
    assert rig.ingest.status()["spool_failed"] == 1
    assert not transport.closed
    rig.spool.failing = None
    conn.data_received(post())
    rig.loop.end_iteration()
    assert answers(transport.take())[0][0] == 200


def test_expect_continue_is_answered_before_the_body():
    rig = Rig()
    conn, transport = rig.connect()
    whole = post(b"x" * 10, extra="Expect: 100-continue\r\n")
    head, body = whole[:-10], whole[-10:]
    conn.data_received(head)
    assert transport.take() == b"HTTP/1.1 100 Continue\r\n\r\n"
    conn.data_received(body)
    rig.loop.end_iteration()
    assert answers(transport.take())[0][0] == 200


def test_over_limit_push_with_expect_is_refused_before_its_body():
    rig = Rig(max_body_bytes=100)
    conn, transport = rig.connect()
    conn.data_received(post(b"x" * 101, extra="Expect: 100-continue\r\n")[:-101])
    status, fields, _ = answers(transport.take())[0]
    assert (status, fields["connection"]) == (413, "close")
    assert transport.closed and rig.spool.appends == []


def test_over_limit_body_is_read_and_dropped_then_refused():
    rig = Rig(max_body_bytes=100)
    conn, transport = rig.connect()
    whole = (b"POST /m HTTP/1.1\r\nHost: hub\r\nTransfer-Encoding: chunked\r\n\r\n"
             + b"".join(b"40\r\n" + b"y" * 64 + b"\r\n" for _ in range(4)) + b"0\r\n\r\n")
    conn.data_received(whole[:80])
    assert transport.writes == []  # still reading it: the agent sees its 413, not a reset
    conn.data_received(whole[80:])
    status, fields, body = answers(transport.take())[0]
    assert (status, fields["connection"]) == (413, "close") and b"100 bytes" in body
    assert transport.closed and rig.spool.appends == []
    assert rig.ingest.status()["too_large"] == 1


def test_malformed_request_is_answered_400_and_closed():
    rig = Rig()
    conn, transport = rig.connect()
    conn.data_received(post(b"fine") + b"\x00\x01 nonsense\r\n\r\n")
    rig.loop.end_iteration()
    got = answers(transport.take())
    assert [s for s, _, _ in got] == [200, 400]  # the push before it still counts
    assert transport.closed
    assert rig.ingest.status()["malformed"] == 1


def test_http10_and_connection_close_end_the_connection_after_the_answer():
    rig = Rig()
    conn, transport = rig.connect()
    conn.data_received(b"POST /m HTTP/1.0\r\nContent-Length: 1\r\n\r\nx" + post(b"ignored"))
    rig.loop.end_iteration()
    got = answers(transport.take())
    assert len(got) == 1 and got[0][1]["connection"] == "close"
    assert transport.closed
    assert [r.body for r in rig.spool.records] == [b"x"]


def test_half_closed_agent_gets_its_answer_then_the_close():
    rig = Rig()
    conn, transport = rig.connect()
    conn.data_received(post())
    assert conn.eof_received() is True
    assert not transport.closed
    rig.loop.end_iteration()
    assert answers(transport.take())[0][0] == 200 and transport.closed


def test_stalled_request_gets_408_and_idle_connection_is_closed():
    rig = Rig(request_timeout_s=30, idle_timeout_s=300)
    stalled, t1 = rig.connect()
    idle, t2 = rig.connect()
    stalled.data_received(post()[:20])
    rig.loop.fire_timers(31)
    status, fields, _ = answers(t1.take())[0]
    assert (status, fields["connection"]) == (408, "close") and t1.closed
    assert not t2.closed
    rig.loop.fire_timers(270)
    assert t2.closed
    assert rig.ingest.status()["timeouts"] == 1


def test_answers_waiting_for_a_commit_keep_a_connection_from_looking_idle():
    rig = Rig(idle_timeout_s=1)
    conn, transport = rig.connect()
    conn.data_received(post())
    rig.loop.fire_timers(5)  # no end of iteration yet: the answer is owed
    assert not transport.closed
    rig.loop.end_iteration()
    assert answers(transport.take())[0][0] == 200


def test_a_pipelining_flood_pauses_reading_until_answers_go_out():
    rig = Rig(max_batch=10_000)
    conn, transport = rig.connect()
    conn.data_received(post() * (MAX_WAITING_ANSWERS + 1))
    assert not transport.reading
    rig.loop.end_iteration()
    assert transport.reading
    assert len(answers(transport.take())) == MAX_WAITING_ANSWERS + 1


def test_draining_answers_with_close():
    rig = Rig()
    conn, transport = rig.connect()
    rig.ingest.draining = True
    conn.data_received(post())
    rig.loop.end_iteration()
    assert answers(transport.take())[0][1]["connection"] == "close"
    assert transport.closed


def test_configured_answer_and_its_checks():
    rig = Rig()
    conn, transport = rig.connect("A", Answer(204, b"", "application/json"))
    conn.data_received(post())
    rig.loop.end_iteration()
    status, fields, body = answers(transport.take())[0]
    assert (status, body, fields["x-agentvisor-seq"]) == (204, b"", "1")
    assert "content-length" not in fields and "content-type" not in fields
    assert Answer(500).problem() is not None
    assert Answer(204, b"x").problem() is not None
    assert Answer(200, b"ok", "text/plain\r\nX-Evil: 1").problem() is not None
    assert Answer().problem() is None
