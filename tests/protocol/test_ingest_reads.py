"""Reads relayed by ingest to the proxy (`sidecar.data.reads`), driven by bytes alone: the
request the proxy is sent, the proxy's answer as httptools reads it off a fake transport
(lengths, chunks, the end of the connection, HEAD, 1xx, bounds), the answer the agent gets,
and its turn among a connection's answers.

What an agent relies on: a read reaches the hub as it was sent; the answer comes back as
the hub (through the proxy) gave it, with framing that keeps the agent's connection alive;
a push answered after a read stays after it; a bad or missing answer is a 502, never a
hang or a garbled stream.
"""

from __future__ import annotations

import asyncio

import pytest

from sidecar.data.reads import (
    ProxyConnection,
    ReadAnswer,
    ReadRelay,
    RelayError,
    relayed_request,
)
from tests.protocol.rig import FakeTransport
from tests.protocol.test_ingest import Rig, answers, post


def test_the_request_goes_on_as_it_came_without_the_agents_connection_fields():
    fields = [(b"Host", b"hub:9000"), (b"Connection", b"keep-alive"), (b"X-Trace", b"1"),
              (b"Transfer-Encoding", b"chunked"), (b"Expect", b"100-continue"),
              (b"Accept", b"text/html"), (b"Upgrade", b"websocket")]
    assert relayed_request(b"DELETE", b"/a?b=1", fields, b"body") == (
        b"DELETE /a?b=1 HTTP/1.1\r\nHost: hub:9000\r\nX-Trace: 1\r\nAccept: text/html\r\n"
        b"Content-Length: 4\r\n\r\nbody")
    # No body and no framing: no length either; an empty body that was framed keeps it.
    assert relayed_request(b"GET", b"/", [(b"Host", b"h")], b"") == (
        b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert relayed_request(b"GET", b"/", [(b"content-length", b"0")], b"") == (
        b"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n")


def test_the_answer_is_framed_for_the_agents_connection():
    fields = [(b"Content-Type", b"text/plain"), (b"Connection", b"close"),
              (b"Keep-Alive", b"timeout=5"), (b"Transfer-Encoding", b"chunked")]
    chunked = ReadAnswer(200, b"OK", fields, b"hello", chunked=True)
    assert chunked.render(close=False, head_only=False, http11=True) == (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n")
    # HTTP/1.0 knows no chunks; and closing is said.
    assert chunked.render(close=True, head_only=False, http11=False) == (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
        b"Connection: close\r\n\r\nhello")
    # A close-delimited answer gets its length: the agent's connection stays open.
    until_close = ReadAnswer(200, b"OK", [(b"Connection", b"close")], b"all of it")
    assert until_close.render(close=False, head_only=False, http11=True) == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nall of it")
    # Bodiless answers keep their length as the hub gave it (the GET's), and no body.
    head = ReadAnswer(200, b"OK", [(b"Content-Length", b"1234")])
    assert head.render(close=False, head_only=True, http11=True) == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
    assert ReadAnswer(304, b"", [(b"ETag", b'"x"')]).render(
        close=False, head_only=False, http11=True) == (
        b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n')
    # Interim answers go first, to HTTP/1.1 agents only.
    early = ReadAnswer(200, b"OK", [], b"", interim=[b"HTTP/1.1 103 Early Hints\r\n\r\n"])
    assert early.render(close=False, head_only=False, http11=True).startswith(
        b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert early.render(close=False, head_only=False, http11=False).startswith(
        b"HTTP/1.1 200 OK\r\n")


@pytest.fixture
def proxy():
    loop = asyncio.new_event_loop()
    conn = ProxyConnection(max_head_bytes=300, max_body_bytes=100, loop=loop)
    transport = FakeTransport(conn)
    conn.connection_made(transport)
    yield conn, transport
    loop.close()


def outcome(waiter):
    assert waiter.done(), "the answer is still awaited"
    exc = waiter.exception()
    return exc if exc is not None else waiter.result()


def test_an_answer_by_length_in_pieces_leaves_the_connection_reusable(proxy):
    conn, transport = proxy
    waiter = conn.begin(b"GET / HTTP/1.1\r\n\r\n", head_only=False)
    assert transport.take() == b"GET / HTTP/1.1\r\n\r\n"
    whole = b"HTTP/1.1 200 Fine\r\nContent-Length: 11\r\nX-Hub: a\r\n\r\nhello world"
    for i in range(0, len(whole), 7):
        conn.data_received(whole[i:i + 7])
    answer = outcome(waiter)
    assert (answer.status, answer.reason, answer.body) == (200, b"Fine", b"hello world")
    assert answer.fields == [(b"Content-Length", b"11"), (b"X-Hub", b"a")]
    assert conn.reusable and conn.idle and not transport.closed
    # The next read on it starts from a clean slate.
    waiter = conn.begin(b"GET /2 HTTP/1.1\r\n\r\n", head_only=False)
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"3\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n")
    answer = outcome(waiter)
    assert (answer.body, answer.chunked) == (b"abcde", True)
    assert (b"X-Trailer", b"t") not in answer.fields and conn.reusable


def test_interim_answers_are_kept_except_100_continue(proxy):
    conn, _ = proxy
    waiter = conn.begin(b"GET / HTTP/1.1\r\n\r\n", head_only=False)
    conn.data_received(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\n"
                       b"Link: </s.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    answer = outcome(waiter)
    assert (answer.status, answer.body) == (200, b"ok")
    assert answer.interim == [b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"]


def test_a_head_answer_ends_with_its_head(proxy):
    conn, transport = proxy
    waiter = conn.begin(b"HEAD / HTTP/1.1\r\n\r\n", head_only=True)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n")
    answer = outcome(waiter)
    assert (answer.status, answer.body, answer.fields) == (
        200, b"", [(b"Content-Length", b"5000")])
    assert not conn.reusable and transport.closed  # a body sent anyway would follow


def test_a_close_delimited_answer_ends_with_the_connection(proxy):
    conn, _ = proxy
    waiter = conn.begin(b"GET / HTTP/1.1\r\n\r\n", head_only=False)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart ")
    conn.data_received(b"and rest")
    assert not waiter.done()
    assert conn.eof_received() is False
    answer = outcome(waiter)
    assert answer.body == b"part and rest" and not conn.reusable


@pytest.mark.parametrize("data, eof, why, unsent", [
    (b"", True, "closed the connection without answering", True),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", True,
     "in the middle of its answer", False),
    (b"HTTP/1.1 200 OK\r\nX-Big: " + b"x" * 400 + b"\r\n\r\n", False, "head is over 300",
     False),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 200\r\n\r\n" + b"y" * 200, False,
     "body is over 100", False),
    (b"NOT HTTP\r\n\r\n", False, "malformed answer", False),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n"
     b"\r\n", False, "switched protocols", False),
])
def test_an_unusable_answer_is_a_relay_error_and_the_connection_is_dropped(
        proxy, data, eof, why, unsent):
    conn, transport = proxy
    waiter = conn.begin(b"GET / HTTP/1.1\r\n\r\n", head_only=False)
    if data:
        conn.data_received(data)
    if eof:
        conn.eof_received()
    exc = outcome(waiter)
    assert isinstance(exc, RelayError) and why in exc.reason and exc.unsent == unsent
    assert not conn.reusable
    assert transport.closed or eof


def test_bytes_nobody_asked_for_drop_the_connection(proxy):
    conn, transport = proxy
    waiter = conn.begin(b"GET / HTTP/1.1\r\n\r\n", head_only=False)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert outcome(waiter).status == 200 and conn.idle
    conn.data_received(b"stray")  # while idle, in the pool
    assert transport.closed and not conn.idle


def test_a_second_answer_to_one_read_drops_the_connection(proxy):
    conn, transport = proxy
    waiter = conn.begin(b"GET / HTTP/1.1\r\n\r\n", head_only=False)
    conn.data_received(b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert outcome(waiter).status == 204
    assert not conn.reusable and transport.closed


class FakeRelay:
    """ReadRelay's side facing the connection: what it was asked, answered by the test."""

    def __init__(self):
        self.asked: list[tuple] = []

    def relay(self, conn, entry, request, **how) -> None:
        self.asked.append((conn, entry, request, how))

    def status(self) -> dict:
        return {"asked": len(self.asked)}

    def answer(self, i: int, data: bytes) -> None:
        conn, entry, _, _ = self.asked[i]
        entry[0] = data
        conn.release()


def relaying_rig(**settings) -> tuple[Rig, FakeRelay]:
    rig = Rig(**settings)
    relay = rig.ingest.reads = FakeRelay()  # what connections made from now on relay to
    return rig, relay


def test_a_read_takes_its_turn_among_the_pushes_of_its_connection():
    rig, relay = relaying_rig()
    conn, transport = rig.connect()
    conn.data_received(post(b"one") + b"GET /dash?x=1 HTTP/1.1\r\nHost: hub\r\n"
                       b"Connection: keep-alive\r\nX-Op: al\r\n\r\n" + post(b"two"))
    rig.loop.end_iteration()
    # Both pushes are stored; the first is answered; the second waits behind the read.
    assert [r.body for r in rig.spool.records] == [b"one", b"two"]
    assert [s for s, _, _ in answers(transport.take())] == [200]
    [(_, _, request, how)] = relay.asked
    assert request == b"GET /dash?x=1 HTTP/1.1\r\nHost: hub\r\nX-Op: al\r\n\r\n"
    assert how == {"method": b"GET", "head_only": False, "close": False, "http11": True}
    relay.answer(0, b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndash")
    got = answers(transport.take())
    assert [(s, f.get("x-agentvisor-seq"), b) for s, f, b in got] == [
        (200, None, b"dash"), (200, "2", b'{"status": "ok"}')]
    assert not transport.closed
    assert rig.ingest.status()["reads"] == 1


def test_a_reads_body_goes_on_and_its_expect_is_answered_here():
    rig, relay = relaying_rig()
    conn, transport = rig.connect()
    conn.data_received(b"OPTIONS /q HTTP/1.1\r\nHost: hub\r\nExpect: 100-continue\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\n")
    assert transport.take() == b"HTTP/1.1 100 Continue\r\n\r\n"
    conn.data_received(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    [(_, _, request, how)] = relay.asked
    assert request == (b"OPTIONS /q HTTP/1.1\r\nHost: hub\r\nContent-Length: 5\r\n\r\n"
                       b"abcde")
    # A closing agent's read: closed once its answer is out.
    conn.data_received(b"HEAD /h HTTP/1.0\r\n\r\n")
    assert relay.asked[1][3] == {"method": b"HEAD", "head_only": True, "close": True,
                                 "http11": False}
    relay.answer(0, b"HTTP/1.1 204 No Content\r\n\r\n")
    assert not transport.closed
    relay.answer(1, b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
    assert [s for s, _, _ in answers(transport.take())] == [204, 200]
    assert transport.closed


def test_an_over_limit_read_body_is_refused_like_a_push():
    rig, relay = relaying_rig(max_body_bytes=10)
    conn, transport = rig.connect()
    conn.data_received(b"GET /big HTTP/1.1\r\nContent-Length: 20\r\n\r\n" + b"z" * 20)
    status, fields, body = answers(transport.take())[0]
    assert (status, fields["connection"]) == (413, "close") and b"10 bytes" in body
    assert relay.asked == [] and transport.closed


def test_too_many_reads_in_flight_are_refused_with_503():
    rig = Rig()
    rig.ingest.reads = ReadRelay(("127.0.0.1", 9), max_in_flight=0, loop=rig.loop)
    conn, transport = rig.connect()
    conn.data_received(b"GET /dash HTTP/1.1\r\nHost: hub\r\n\r\n" + post(b"after"))
    rig.loop.end_iteration()
    got = answers(transport.take())
    assert [(s, f.get("retry-after")) for s, f, _ in got] == [(503, "1"), (200, None)]
    assert b"reads are being relayed" in got[0][2]
    assert rig.ingest.status()["reads_relay"]["refused"] == 1


class ClosedMeanwhile(FakeTransport):
    """A pooled connection the proxy closed while it sat idle, its end not yet seen: the
    read written to it is met by the end of the connection, nothing answered."""

    def write(self, data: bytes) -> None:
        super().write(data)
        asyncio.get_running_loop().call_soon(self.protocol.eof_received)


class Waiting:
    """The side of an agent's connection a relay answers into."""

    def __init__(self):
        self.agent = type("Agent", (), {"agent": "A"})()
        self.answered = asyncio.Event()

    def release(self) -> None:
        self.answered.set()


@pytest.mark.parametrize("method, sent_again", [(b"GET", True), (b"LOCK", False)])
def test_a_read_met_by_a_closed_pooled_connection_goes_again_if_idempotent(method,
                                                                          sent_again):
    async def scenario() -> tuple[bytes, list[bytes]]:
        seen: list[bytes] = []

        async def proxy(reader, writer):
            seen.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh")
            await reader.read()  # until the relay closes it
            writer.close()

        server = await asyncio.start_server(proxy, "127.0.0.1", 0)
        relay = ReadRelay(server.sockets[0].getsockname()[:2], timeout_s=10)
        stale = ProxyConnection()
        stale.connection_made(ClosedMeanwhile(stale))
        relay._idle.append(stale)  # the pool as a quiet spell left it
        agent, entry = Waiting(), [None, False]
        relay.relay(agent, entry, b"%s /x HTTP/1.1\r\n\r\n" % method, method=method,
                    head_only=False, close=False, http11=True)
        await asyncio.wait_for(agent.answered.wait(), 10)
        await relay.close()
        server.close()
        await server.wait_closed()
        return entry[0], seen

    answer, seen = asyncio.run(scenario())
    if sent_again:
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"fresh")
        assert seen == [b"GET /x HTTP/1.1\r\n\r\n"]
    else:  # it may have reached the proxy: not sent twice
        assert answer.startswith(b"HTTP/1.1 502 ")
        assert b"closed the connection without answering" in answer
        assert seen == []


def test_a_flood_of_interim_answers_counts_against_the_head_limit(proxy):
    conn, _ = proxy
    waiter = conn.begin(b"GET / HTTP/1.1\r\n\r\n", head_only=False)
    conn.data_received(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" * 20)
    exc = outcome(waiter)
    assert isinstance(exc, RelayError) and "head is over 300" in exc.reason
