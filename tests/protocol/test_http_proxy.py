"""The L7 proxy's protocols driven by bytes alone: fake transports record what each side
would have sent, a fake loop holds the clock, the timers and the connects, and the test
fires them by hand. No sockets, no sleeping: a 10 s timeout is tested in microseconds."""

from __future__ import annotations

import pytest

from sidecar.config import (DEFAULT_AGENT_IDLE_TIMEOUT_S, DEFAULT_HEADER_TIMEOUT_S, BreakerSettings, Fallback, FallbackKind, Protocol, RetrySettings,
                            UpstreamPolicy)
from sidecar.policy.breaker import BreakerState
from sidecar.proxy.http import HttpProxy
from sidecar.upstream import Upstream
from tests.protocol.rig import GET, OK, FakeTransport, Rig


def head_of(message: bytes) -> bytes:
    return message.split(b"\r\n\r\n", 1)[0]


# --- forwarding --------------------------------------------------------------------


def test_request_forwarded_and_answer_relayed_with_keep_alive_on_both_sides():
    rig = Rig()
    proxy, agent = rig.agent()
    proxy.data_received(GET)
    [connect] = rig.loop.connects
    assert (connect.host, connect.port) == ("10.0.0.1", 8080)
    up = connect.accept()
    assert up.take() == (b"GET /status HTTP/1.1\r\nHost: 10.0.0.1:8080\r\n"
                         b"User-Agent: legacy\r\n\r\n")
    connect.respond(OK)
    assert agent.take() == OK
    assert not agent.closed and not up.closed
    assert rig.stats.outcomes["ok"] == 1 and rig.stats.active == 0

    # The next request reuses the pooled connection: no new connect.
    proxy.data_received(GET)
    assert len(rig.loop.connects) == 1
    assert up.take().startswith(b"GET /status HTTP/1.1\r\n")
    connect.respond(OK)
    assert agent.take() == OK
    assert rig.stats.outcomes["ok"] == 2


def test_hop_by_hop_headers_are_not_forwarded_either_way():
    rig = Rig()
    proxy, agent = rig.agent()
    proxy.data_received(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, X-Secret\r\n"
                        b"X-Secret: 1\r\nKeep-Alive: timeout=5\r\nProxy-Authorization: b\r\n"
                        b"TE: trailers\r\nX-Kept: yes\r\n\r\n")
    connect = rig.loop.connects[0]
    up = connect.accept()
    sent = up.take()
    for name in (b"Connection", b"X-Secret", b"Keep-Alive", b"Proxy-Authorization", b"TE:"):
        assert name not in sent
    assert b"X-Kept: yes\r\n" in sent
    connect.respond(b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n"
                    b"Content-Length: 2\r\n\r\nok")
    answer = agent.take()
    assert b"Keep-Alive" not in answer and b"Connection" not in answer
    assert answer.endswith(b"\r\n\r\nok")
    # Fields a Connection header names go too, however the names are spelt.
    proxy.data_received(GET)
    connect.respond(b"HTTP/1.1 200 OK\r\nCONNECTION: Keep-Alive, x-private\r\n"
                    b"X-Private: 1\r\nX-Public: 2\r\nContent-Length: 2\r\n\r\nok")
    answer = agent.take()
    assert b"X-Private" not in answer and b"CONNECTION" not in answer
    assert b"X-Public: 2\r\n" in answer


def test_a_plain_answer_reaches_the_agent_byte_for_byte():
    # Content-Length or chunked, and Connection: keep-alive (the proxy's own option for
    # this agent too): the head is not rebuilt, so field order and spelling survive.
    rig = Rig()
    proxy, agent = rig.agent()
    proxy.data_received(GET)
    connect = rig.loop.connects[0]
    connect.accept()
    answer = (b"HTTP/1.1 200 OK\r\nserver: odd-Case\r\nX-B: 2\r\nX-A: 1\r\n"
              b"Connection: keep-alive\r\nContent-Length: 2\r\n\r\nok")
    connect.respond(answer)
    assert agent.take() == answer
    proxy.data_received(GET)
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"2\r\nok\r\n0\r\n\r\n")
    connect.respond(chunked)
    assert agent.take() == chunked
    assert rig.stats.outcomes["ok"] == 2


def test_answers_that_differ_only_in_digits_are_each_framed_by_their_own_fields():
    # The proxy keeps what a head's fields say by the head's shape (digits zeroed): a
    # later head of the same shape must get exactly the treatment its own fields ask.
    rig = Rig()
    proxy, agent = rig.agent()
    proxy.data_received(GET)
    connect = rig.loop.connects[0]
    connect.accept()
    for length in (2, 7, 3):  # Content-Length's digits change; the verdict holds
        body = b"x" * length
        answer = b"HTTP/1.1 200 OK\r\nDate: Mon, 0%d Jan\r\nContent-Length: %d\r\n\r\n%s" % (
            length, length, body)
        connect.respond(answer)
        assert agent.take() == answer
        proxy.data_received(GET)
    # A Connection header naming a field with a digit: each answer drops its own.
    for drop, keep in ((b"X-Hop1", b"X-Hop2"), (b"X-Hop2", b"X-Hop1")):
        connect.respond(b"HTTP/1.1 200 OK\r\nConnection: keep-alive, %s\r\nX-Hop1: a\r\n"
                        b"X-Hop2: b\r\nContent-Length: 2\r\n\r\nok" % drop)
        got = agent.take()
        assert drop + b":" not in got and keep + b":" in got, got
        proxy.data_received(GET)
    assert rig.stats.outcomes["ok"] == 5


def test_answer_head_split_across_reads_is_relayed_whole():
    rig = Rig()
    proxy, agent = rig.agent()
    proxy.data_received(GET)
    connect = rig.loop.connects[0]
    connect.accept()
    answer = (b"HTTP/1.0 200 OK\r\nKeep-Alive: timeout=5\r\nConnection: keep-alive\r\n"
              b"Content-Length: 5\r\nX-Late: yes\r\n\r\nhello")
    for i in range(0, len(answer), 7):  # a 1.0 answer with hop-by-hop fields: rebuilt
        connect.respond(answer[i:i + 7])
    got = agent.take()
    assert got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(b"\r\n\r\nhello")
    assert b"X-Late: yes\r\n" in got and b"Content-Length: 5\r\n" in got
    assert b"Keep-Alive" not in got and b"Connection" not in got
    # 100 Continue and the answer in one read, then the next exchange as usual.
    proxy.data_received(GET)
    connect.respond(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)
    assert agent.take() == b"HTTP/1.1 100 Continue\r\n\r\n" + OK
    proxy.data_received(GET)
    connect.respond(OK)
    assert agent.take() == OK
    assert rig.stats.outcomes["ok"] == 3


@pytest.mark.parametrize("stray", [OK, b"HTTP/1.1 200 OK\r\nContent-Le"])
def test_bytes_after_a_complete_answer_are_never_taken_for_the_next(stray):
    # One request at a time goes upstream, so anything after the answer in the same
    # read answers nothing: the connection goes, and the next request gets a new one.
    rig = Rig()
    proxy, agent = rig.agent()
    proxy.data_received(GET)
    connect = rig.loop.connects[0]
    up = connect.accept()
    connect.respond(OK + stray)
    assert agent.take() == OK
    assert up.closed
    proxy.data_received(GET)
    assert len(rig.loop.connects) == 2
    rig.loop.connects[1].accept()
    rig.loop.connects[1].respond(OK)
    assert agent.take() == OK
    assert rig.stats.outcomes["ok"] == 2


def test_body_sent_before_the_upstream_is_connected_is_held_and_forwarded():
    rig = Rig()
    proxy, agent = rig.agent()
    proxy.data_received(b"POST /m HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n01234")
    proxy.data_received(b"56789")
    up = rig.loop.connects[0].accept()
    assert up.take().endswith(b"Content-Length: 10\r\n\r\n0123456789")


def test_chunked_request_and_response_bodies_are_streamed_in_chunks():
    rig = Rig()
    proxy, agent = rig.agent()
    proxy.data_received(b"POST /m HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"3\r\nabc\r\n")
    connect = rig.loop.connects[0]
    up = connect.accept()
    proxy.data_received(b"2\r\nde\r\n0\r\n\r\n")
    sent = up.take()
    assert sent.endswith(b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    connect.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwxyz\r\n")
    connect.respond(b"0\r\n\r\n")
    assert agent.take() == (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"4\r\nwxyz\r\n0\r\n\r\n")
    assert rig.stats.outcomes["ok"] == 1


def test_requests_around_a_chunked_one_in_one_read_all_go_upstream_in_order():
    # Heads are read from their bytes until a chunked body, whose end only the parser
    # knows: from that request on the connection is parsed field by field.
    rig = Rig()
    proxy, agent = rig.agent()
    proxy.data_received(
        b"PUT /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nde\r\n0\r\n\r\n"
        b"GET /c HTTP/1.1\r\nHost: x\r\nX-After: 1\r\n\r\n")
    connect = rig.loop.connects[0]
    up = connect.accept()
    for want in (b"PUT /a HTTP/1.1\r\nHost: 10.0.0.1:8080\r\nContent-Length: 3\r\n\r\nabc",
                 b"POST /b HTTP/1.1\r\nHost: 10.0.0.1:8080\r\nTransfer-Encoding: chunked\r\n"
                 b"\r\n2\r\nde\r\n0\r\n\r\n",
                 b"GET /c HTTP/1.1\r\nHost: 10.0.0.1:8080\r\nX-After: 1\r\n\r\n"):
        assert up.take() == want
        connect.respond(OK)
    proxy.data_received(GET)  # and later reads too
    assert up.take().startswith(b"GET /status HTTP/1.1\r\nHost: 10.0.0.1:8080\r\n")
    connect.respond(OK)
    assert agent.take() == OK * 4
    assert rig.stats.outcomes["ok"] == 4


def test_requests_that_differ_only_in_digits_are_each_rewritten_by_their_own_fields():
    # Request heads are kept by shape (digits zeroed), as answers are.
    rig = Rig()
    proxy, agent = rig.agent()
    sent = []
    for drop, keep in ((b"X-Hop1", b"X-Hop2"), (b"X-Hop2", b"X-Hop1")):
        proxy.data_received(b"GET /%s HTTP/1.1\r\nHost: h:1\r\nConnection: %s\r\n"
                            b"X-Hop1: a\r\nX-Hop2: b\r\n\r\n" % (keep[-1:], drop))
        if not rig.loop.connects[-1].transport:
            rig.loop.connects[-1].accept()
        sent.append(rig.loop.connects[-1].transport.take())
        rig.loop.connects[-1].respond(OK)
    for (drop, keep), head in zip(((b"X-Hop1", b"X-Hop2"), (b"X-Hop2", b"X-Hop1")), sent):
        assert drop + b":" not in head and keep + b":" in head, head
    assert agent.take() == OK * 2


def test_close_delimited_response_reaches_a_keep_alive_agent_chunked():
    rig = Rig()
    proxy, agent = rig.agent()
    proxy.data_received(GET)
    connect = rig.loop.connects[0]
    connect.accept()
    connect.respond(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
    connect.lost()
    assert agent.take() == (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"9\r\nall of it\r\n0\r\n\r\n")
    assert not agent.closed
    assert rig.stats.outcomes["ok"] == 1 and rig.stats.failures == {}


def test_head_204_and_304_have_no_body():
    rig = Rig()
    proxy, agent = rig.agent()
    proxy.data_received(b"HEAD /big HTTP/1.1\r\nHost: x\r\n\r\n")
    head = rig.loop.connects[0]
    head.accept()
    head.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    assert agent.take() == b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
    # 204 and 304 end at their heads whatever length they claim; the connection goes on.
    proxy.data_received(GET)
    connect = rig.loop.connects[1]
    connect.accept()
    for status in (b"204 No Content", b"304 Not Modified"):
        answer = b"HTTP/1.1 " + status + b"\r\nContent-Length: 10\r\n\r\n"
        connect.respond(answer)
        assert agent.take() == answer
        proxy.data_received(GET)
    connect.respond(OK)
    assert agent.take() == OK
    assert len(rig.loop.connects) == 2 and rig.stats.outcomes["ok"] == 4


def test_pipelined_requests_answered_in_order_and_reading_paused_beyond_the_limit():
    rig = Rig(max_pending_requests=2)
    proxy, agent = rig.agent()
    proxy.data_received(GET.replace(b"/status", b"/1") + GET.replace(b"/status", b"/2"))
    connect = rig.loop.connects[0]
    up = connect.accept()
    assert agent.reading
    proxy.data_received(GET.replace(b"/status", b"/3"))
    assert not agent.reading  # two requests wait behind the one in flight
    assert up.take().startswith(b"GET /1 ")
    connect.respond(OK.replace(b"hello", b"one!!"))
    assert up.take().startswith(b"GET /2 ")
    assert agent.reading
    connect.respond(OK.replace(b"hello", b"two!!"))
    connect.respond(OK.replace(b"hello", b"three"))
    assert agent.take() == (OK.replace(b"hello", b"one!!") + OK.replace(b"hello", b"two!!")
                            + OK.replace(b"hello", b"three"))


def test_upstream_write_buffer_full_pauses_the_agent_and_agent_full_pauses_upstream():
    rig = Rig()
    proxy, agent = rig.agent()
    proxy.data_received(b"POST /m HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
    connect = rig.loop.connects[0]
    up = connect.accept()
    connect.protocol.pause_writing()
    assert not agent.reading
    connect.protocol.resume_writing()
    assert agent.reading
    proxy.pause_writing()
    assert not up.reading
    proxy.resume_writing()
    assert up.reading


def test_body_beyond_max_pending_bytes_while_connecting_pauses_the_agent():
    rig = Rig(max_pending_bytes=4096)
    proxy, agent = rig.agent()
    proxy.data_received(b"POST /m HTTP/1.1\r\nHost: x\r\nContent-Length: 20000\r\n\r\n"
                        + b"a" * 5000)
    assert not agent.reading  # nowhere to send it yet: stop reading
    up = rig.loop.connects[0].accept()
    assert agent.reading and up.take().endswith(b"a" * 5000)


# --- the common exchange on a held connection (the inline fast path) ----------------


def held(rig, **kw):
    """An agent whose first exchange is over: it holds its upstream connection."""
    proxy, agent = rig.agent()
    proxy.data_received(GET)
    connect = rig.loop.connects[-1]
    up = connect.accept()
    connect.respond(OK)
    assert agent.take() == OK
    up.take()
    return proxy, agent, connect, up


def test_held_connection_sends_each_head_with_its_whole_body_in_one_write():
    rig = Rig()
    proxy, agent, connect, up = held(rig)
    proxy.data_received(b"POST /m HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                        b"Connection: keep-alive\r\n\r\nabcde")
    assert up.writes == [b"POST /m HTTP/1.1\r\nHost: 10.0.0.1:8080\r\n"
                         b"Content-Length: 5\r\n\r\nabcde"]
    up.writes.clear()
    connect.respond(OK)
    proxy.data_received(GET)
    assert up.writes == [b"GET /status HTTP/1.1\r\nHost: 10.0.0.1:8080\r\n"
                         b"User-Agent: legacy\r\n\r\n"]
    connect.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"3\r\nabc\r\n0\r\n\r\n")
    assert agent.take() == OK + (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 b"3\r\nabc\r\n0\r\n\r\n")
    assert len(rig.loop.connects) == 1 and not up.closed and not agent.closed
    assert rig.stats.outcomes["ok"] == 3 and rig.stats.active == 0


def test_held_connection_body_split_across_reads_streams_as_it_comes():
    rig = Rig()
    proxy, agent, connect, up = held(rig)
    proxy.data_received(b"POST /m HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nabc")
    assert up.take().endswith(b"\r\n\r\nabc")  # the head does not wait for the rest
    proxy.data_received(b"def")
    assert up.take() == b"def"
    connect.respond(OK)
    assert agent.take() == OK and rig.stats.outcomes["ok"] == 2


def test_held_connection_failure_statuses_open_the_breaker_for_the_next_request():
    rig = Rig(breaker=BreakerSettings(failures=2))
    proxy, agent, connect, up = held(rig)
    busy = b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy"
    for _ in range(2):
        proxy.data_received(GET)
        connect.respond(busy)
    assert agent.take() == busy * 2
    up.take()
    proxy.data_received(GET)
    assert agent.take().startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert up.take() == b""  # the breaker answered: nothing went upstream
    assert rig.stats.failures == {("10.0.0.1:8080", "status"): 2}
    outcomes = rig.stats.outcomes
    assert (outcomes["ok"], outcomes["failed"], outcomes["rejected"]) == (1, 2, 1)
    assert rig.stats.active == 0 and not agent.closed


def test_held_connection_to_a_farther_endpoint_gives_way_to_the_nearest_that_admits():
    rig = Rig(endpoints=(("10.0.0.1", 8080), ("10.0.0.2", 8080)))
    rig.breaker(0).force_open(rig.loop.now)
    proxy, agent, far, up_far = held(rig)
    assert (far.host, far.port) == ("10.0.0.2", 8080)
    rig.breaker(0).force_close(rig.loop.now)
    proxy.data_received(GET)
    near = rig.loop.connects[-1]
    assert near.host == "10.0.0.1"
    near.accept()
    near.respond(OK)
    assert agent.take() == OK and up_far.take() == b"" and not up_far.closed
    # The farther connection was pooled: another agent sent there reuses it.
    rig.breaker(0).force_open(rig.loop.now)
    p2, a2 = rig.agent()
    p2.data_received(GET)
    assert len(rig.loop.connects) == 2 and up_far.take().startswith(b"GET /status ")


def test_held_connection_request_times_out_and_the_next_gets_a_new_connection():
    rig = Rig(request_timeout_s=10.0)
    proxy, agent, connect, up = held(rig)
    proxy.data_received(GET)
    rig.loop.now += 10.0
    [timer] = rig.loop.armed()
    timer.fire()
    assert agent.take().startswith(b"HTTP/1.1 504 ") and up.closed
    proxy.data_received(GET)
    assert len(rig.loop.connects) == 2
    assert rig.stats.failures == {("10.0.0.1:8080", "timeout"): 1}


def test_held_connection_pipelined_requests_go_upstream_one_at_a_time_in_order():
    rig = Rig()
    proxy, agent, connect, up = held(rig)
    proxy.data_received(b"POST /1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\none"
                        + GET.replace(b"/status", b"/2"))
    assert up.take() == (b"POST /1 HTTP/1.1\r\nHost: 10.0.0.1:8080\r\n"
                         b"Content-Length: 3\r\n\r\none")
    connect.respond(OK.replace(b"hello", b"one!!"))
    assert up.take().startswith(b"GET /2 ")
    connect.respond(OK.replace(b"hello", b"two!!"))
    assert agent.take() == OK.replace(b"hello", b"one!!") + OK.replace(b"hello", b"two!!")
    assert len(rig.loop.connects) == 1 and rig.stats.outcomes["ok"] == 3


def test_held_connection_answer_with_close_ends_both_connections():
    rig = Rig()
    proxy, agent, connect, up = held(rig)
    proxy.data_received(GET.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    connect.respond(OK)
    assert agent.take() == OK.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    assert agent.closed and not up.closed  # the upstream connection goes back to the pool
    proxy2, agent2 = rig.agent()
    proxy2.data_received(GET)
    connect.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
    assert agent2.take() == OK.replace(b"Content-Type: text/plain\r\n", b"")
    assert up.closed and not agent2.closed and len(rig.loop.connects) == 1


def test_each_agent_keeps_its_upstream_connection_within_pool_size():
    rig = Rig(pool_size=2)
    (p1, a1), (p2, a2) = rig.agent(), rig.agent()
    p1.data_received(GET)
    p2.data_received(GET)  # in flight together: two upstream connections
    c1, c2 = rig.loop.connects
    up1, up2 = c1.accept(), c2.accept()
    for _ in range(5):  # answered in turn, each agent's next request on its own connection
        up1.take(), up2.take()
        c1.respond(OK)
        c2.respond(OK)
        p1.data_received(GET)
        p2.data_received(GET)
        assert up1.take().startswith(b"GET ") and up2.take().startswith(b"GET ")
        assert not up1.closed and not up2.closed
    c1.respond(OK)
    c2.respond(OK)
    assert a1.take() == a2.take() == OK * 6
    assert len(rig.loop.connects) == 2 and rig.stats.outcomes["ok"] == 12


def test_connections_held_by_idle_agents_count_against_pool_size():
    # Each idle keep-alive agent used to pin its own upstream connection, whatever
    # pool_size said: a thousand idle agents, a thousand upstream connections.
    rig = Rig(pool_size=2)
    agents = [rig.agent() for _ in range(5)]
    for proxy, _ in agents:
        proxy.data_received(GET)
    ups = [c.accept() for c in rig.loop.connects]
    for c in rig.loop.connects:
        c.respond(OK)
    assert all(a.take() == OK for _, a in agents)
    assert sum(not up.closed for up in ups) == 2


def test_idle_pool_is_bounded_by_pool_size_when_agents_leave():
    rig = Rig(pool_size=1)
    (p1, _), (p2, _) = rig.agent(), rig.agent()
    p1.data_received(GET)
    p2.data_received(GET)
    c1, c2 = rig.loop.connects
    up1, up2 = c1.accept(), c2.accept()
    c1.respond(OK)
    c2.respond(OK)
    p1.connection_lost(None)
    assert p2.eof_received() is False  # an agent done asking hands its connection back
    assert not up1.closed and up2.closed  # one idle connection kept, the other closed
    p3, agent3 = rig.agent()
    p3.data_received(GET)
    assert len(rig.loop.connects) == 2 and up1.take().startswith(b"GET /status ")
    c1.respond(OK)
    assert agent3.take() == OK


def test_agent_going_to_another_endpoint_pools_the_connection_it_held():
    rig = Rig()
    other = Upstream(UpstreamPolicy(name="Other", protocol=Protocol.HTTP,
                                    endpoints=(("10.0.0.9", 80),)))
    routes = {b"hub.lan": rig.upstream, b"other.lan": other}
    proxy, agent = rig.agent(forward_route=lambda host, port: routes[host])
    proxy.data_received(b"GET http://hub.lan/ HTTP/1.1\r\nHost: hub.lan\r\n\r\n")
    hub = rig.loop.connects[0]
    up = hub.accept()
    hub.respond(OK)
    up.take()
    proxy.data_received(b"GET http://other.lan/ HTTP/1.1\r\nHost: other.lan\r\n\r\n")
    assert rig.loop.connects[1].host == "10.0.0.9"
    # The hub connection is idle in the pool now: another agent reuses it.
    p2, a2 = rig.agent()
    p2.data_received(GET)
    assert len(rig.loop.connects) == 2 and up.take().startswith(b"GET /status ")
    hub.respond(OK)
    assert a2.take() == OK


def test_http10_agent_gets_an_unchunked_answer_and_a_close():
    rig = Rig()
    proxy, agent = rig.agent()
    proxy.data_received(b"GET /old HTTP/1.0\r\n\r\n")
    connect = rig.loop.connects[0]
    up = connect.accept()
    assert up.take().startswith(b"GET /old HTTP/1.1\r\nHost: 10.0.0.1:8080\r\n")
    connect.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
                    b"0\r\n\r\n")
    assert agent.take() == b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nabc"
    assert agent.closed and not up.closed  # the upstream connection is still good


def test_agent_that_half_closes_still_gets_its_answer():
    rig = Rig()
    proxy, agent = rig.agent()
    proxy.data_received(GET)
    assert proxy.eof_received() is True
    connect = rig.loop.connects[0]
    connect.accept()
    connect.respond(OK)
    assert agent.take() == OK and agent.closed


# --- bad input ---------------------------------------------------------------------


def test_garbage_from_the_agent_gets_400_and_the_connection_closes():
    rig = Rig()
    proxy, agent = rig.agent()
    proxy.data_received(b"\x16\x03\x01 this is TLS, not HTTP\r\n\r\n")
    assert agent.take().startswith(b"HTTP/1.1 400 ")
    assert agent.closed
    assert rig.loop.connects == []
    assert rig.stats.outcomes["bad_request"] == 1


@pytest.mark.parametrize("pieces", [1, 200])
def test_request_head_larger_than_max_header_bytes_gets_431(pieces):
    rig = Rig(max_header_bytes=4096)
    proxy, agent = rig.agent()
    head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n"
    step = len(head) // pieces + 1
    for i in range(0, len(head), step):
        if agent.closed:
            break
        proxy.data_received(head[i:i + step])
    assert agent.take().startswith(b"HTTP/1.1 431 ")
    assert agent.closed
    assert rig.loop.connects == []


def test_head_limit_counts_heads_not_pipelined_bodies():
    rig = Rig(max_header_bytes=4096)
    proxy, agent = rig.agent()
    body = b"b" * 10000
    proxy.data_received(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10000\r\n\r\n" + body
                        + b"GET /next HTTP/1.1\r\nHo")
    proxy.data_received(b"st: x\r\n\r\n")
    assert not agent.closed and agent.take() == b""


@pytest.mark.parametrize("response", [
    b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n",
    b"SMTP ready\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n",
])
def test_malformed_or_oversized_upstream_response_gets_502_and_counts(response):
    rig = Rig(max_header_bytes=4096)
    proxy, agent = rig.agent()
    proxy.data_received(GET)
    connect = rig.loop.connects[0]
    up = connect.accept()
    connect.respond(response)
    assert agent.take().startswith(b"HTTP/1.1 502 ")
    assert not agent.closed  # the agent's connection is not at fault
    assert up.closed
    assert rig.stats.failures == {("10.0.0.1:8080", "malformed"): 1}
    assert rig.breaker().failures_in_window(rig.loop.now) == 1


# --- timeouts, failures, breaker -----------------------------------------------------


def test_request_timeout_answers_504_counts_a_failure_and_closes_upstream():
    rig = Rig(request_timeout_s=10.0)
    proxy, agent = rig.agent()
    proxy.data_received(GET)
    connect = rig.loop.connects[0]
    up = connect.accept()
    [timer] = rig.loop.armed()  # the connect deadline is gone; the request's remains
    assert timer.when == rig.loop.now + 10.0
    rig.loop.now += 10.0
    timer.fire()
    assert agent.take().startswith(b"HTTP/1.1 504 ")
    assert up.closed and not agent.closed
    assert rig.stats.failures == {("10.0.0.1:8080", "timeout"): 1}
    assert rig.stats.outcomes["failed"] == 1 and rig.stats.active == 0
    assert rig.breaker().failures_in_window(rig.loop.now) == 1


def test_one_timer_per_connection_follows_the_request_in_flight():
    rig = Rig(request_timeout_s=10.0)
    proxy, agent = rig.agent()
    proxy.data_received(GET)
    connect = rig.loop.connects[0]
    connect.accept()
    connect.respond(OK)
    rig.loop.now += 4.0
    proxy.data_received(GET)  # answered in time, the first request's timer stays armed
    [timer] = rig.loop.armed()
    rig.loop.now = timer.when
    timer.fire()  # the second request has 4 s left: no 504, re-armed for its deadline
    assert agent.take() == OK
    [timer] = rig.loop.armed()
    assert timer.when == rig.loop.now + 4.0
    connect.respond(OK)
    rig.loop.now = timer.when
    timer.fire()  # nothing in flight: it waits for the idle timeout, from the last start
    assert agent.take() == OK
    [timer] = rig.loop.armed()
    assert timer.when == rig.loop.now - 10.0 + DEFAULT_AGENT_IDLE_TIMEOUT_S
    assert not agent.closed
    rig.loop.now = timer.when
    timer.fire()  # idle that long: closed, and its upstream connection pooled
    assert agent.closed and rig.loop.armed() == []
    assert rig.stats.failures == {} and rig.stats.outcomes["ok"] == 2
    proxy.connection_lost(None)


def test_timeout_after_the_answer_began_cuts_the_agent_connection():
    rig = Rig(request_timeout_s=1.0)
    proxy, agent = rig.agent()
    proxy.data_received(GET)
    connect = rig.loop.connects[0]
    connect.accept()
    connect.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nslow...")
    assert agent.take().endswith(b"slow...")
    [timer] = rig.loop.armed()
    rig.loop.now = timer.when
    timer.fire()
    assert agent.closed and agent.take() == b""  # no 504 glued to half an answer
    assert rig.stats.failures == {("10.0.0.1:8080", "timeout"): 1}


def test_failure_status_is_passed_unchanged_and_counted_by_the_breaker():
    rig = Rig()
    proxy, agent = rig.agent()
    proxy.data_received(GET)
    connect = rig.loop.connects[0]
    connect.accept()
    answer = b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\nX-Why: load\r\n\r\nbusy"
    connect.respond(answer)
    assert agent.take() == answer
    assert rig.stats.failures == {("10.0.0.1:8080", "status"): 1}
    assert rig.stats.outcomes["failed"] == 1


def test_refused_gets_502_and_connect_timeout_504():
    rig = Rig(retry=RetrySettings(attempts=0))
    proxy, agent = rig.agent()
    proxy.data_received(GET)
    rig.loop.connects[0].refuse()
    assert agent.take().startswith(b"HTTP/1.1 502 ")
    proxy.data_received(GET)
    connect_timer = min(rig.loop.armed(), key=lambda t: t.when)
    connect_timer.fire()
    assert agent.take().startswith(b"HTTP/1.1 504 ")
    assert rig.stats.failures == {("10.0.0.1:8080", "refused"): 1,
                                  ("10.0.0.1:8080", "connect_timeout"): 1}
    for timer in rig.loop.armed():  # what is left lapses: no second answer, no failure
        rig.loop.now = timer.when
        timer.fire()
    assert agent.take() == b"" and rig.stats.outcomes["failed"] == 2


def test_open_breaker_answers_503_at_once_naming_the_breaker():
    rig = Rig(breaker=BreakerSettings(failures=1, open_s=2.5))
    rig.breaker().record(False, rig.loop.now, "test")
    proxy, agent = rig.agent()
    proxy.data_received(GET)
    answer = agent.take()
    assert answer.startswith(b"HTTP/1.1 503 ")
    assert b"X-Agentvisor-Breaker: Hub\r\n" in answer
    assert b"Retry-After: 3\r\n" in answer
    # no request deadline: only the connection's own timer (header, then idle timeout)
    assert rig.loop.connects == []
    assert [t.when for t in rig.loop.armed()] == [rig.loop.now + DEFAULT_HEADER_TIMEOUT_S]
    assert rig.stats.outcomes["rejected"] == 1
    proxy.data_received(GET)  # the agent's connection stays usable
    assert agent.take().startswith(b"HTTP/1.1 503 ")


def test_fallback_last_good_serves_the_last_2xx_of_the_same_get():
    rig = Rig(breaker=BreakerSettings(failures=1), fallback=Fallback(FallbackKind.LAST_GOOD))
    proxy, agent = rig.agent()
    proxy.data_received(GET)
    connect = rig.loop.connects[0]
    connect.accept()
    connect.respond(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n7\r\n{\"a\":1}\r\n0\r\n\r\n")
    agent.take()
    rig.breaker().record(False, rig.loop.now, "test")
    proxy.data_received(GET)
    fallback = agent.take()
    assert fallback == (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 7\r\nX-Agentvisor-Fallback: last_good\r\n\r\n"
                        b"{\"a\":1}")
    proxy.data_received(GET.replace(b"/status", b"/never-seen"))
    assert agent.take().startswith(b"HTTP/1.1 503 ")
    assert rig.stats.outcomes["fallback"] == 1 and rig.stats.outcomes["rejected"] == 1


def test_fallback_static():
    rig = Rig(breaker=BreakerSettings(failures=1),
              fallback=Fallback(FallbackKind.STATIC, 200, b'{"status":"degraded"}'))
    rig.breaker().record(False, rig.loop.now, "test")
    proxy, agent = rig.agent()
    proxy.data_received(b"POST /m HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc" + GET)
    answer = agent.take()
    one = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 21\r\n"
           b"X-Agentvisor-Fallback: static\r\n\r\n{\"status\":\"degraded\"}")
    assert answer == one + one
    assert rig.stats.outcomes["fallback"] == 2


# --- retries -----------------------------------------------------------------------


def two_endpoints(**kw) -> Rig:
    return Rig(endpoints=(("10.0.0.1", 8080), ("10.0.0.2", 8080)), **kw)


def test_get_refused_by_first_endpoint_is_retried_on_the_next():
    rig = two_endpoints(breaker=BreakerSettings(failures=1))
    proxy, agent = rig.agent()
    proxy.data_received(GET)
    rig.loop.connects[0].refuse()  # trips endpoint 1's breaker (failures=1)
    second = rig.loop.connects[1]
    assert second.host == "10.0.0.2"
    up = second.accept()
    assert b"Host: 10.0.0.2:8080\r\n" in up.take()
    second.respond(OK)
    assert agent.take() == OK
    assert rig.stats.retries == 1 and rig.stats.outcomes["ok"] == 1
    assert rig.breaker(0).state_at(rig.loop.now) is BreakerState.OPEN


def test_post_is_not_retried():
    rig = two_endpoints()
    proxy, agent = rig.agent()
    proxy.data_received(b"POST /m HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
    rig.loop.connects[0].refuse()
    assert len(rig.loop.connects) == 1
    assert agent.take().startswith(b"HTTP/1.1 502 ")
    assert rig.stats.retries == 0


def test_retry_denied_by_an_empty_budget_is_counted():
    rig = two_endpoints(retry=RetrySettings(attempts=1, budget_ratio=0.0, min_per_s=0.0))
    proxy, agent = rig.agent()
    proxy.data_received(GET)
    rig.loop.connects[0].refuse()
    assert agent.take().startswith(b"HTTP/1.1 502 ")
    assert rig.stats.retries_denied == 1 and len(rig.loop.connects) == 1


def test_stale_pooled_connection_is_replaced_without_a_breaker_failure():
    # PUT: idempotent, so it may go again (a POST never does: test_http_hostile.py)
    rig = Rig(breaker=BreakerSettings(failures=1))
    proxy, agent = rig.agent()
    body = b"PUT /m HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
    proxy.data_received(body)
    first = rig.loop.connects[0]
    first.accept()
    first.respond(OK)
    agent.take()
    proxy.data_received(body)  # goes out on the pooled connection ...
    first.lost()  # ... which the upstream had closed
    fresh = rig.loop.connects[1]
    up = fresh.accept()
    assert up.take().endswith(b"\r\n\r\nhi")
    fresh.respond(OK)
    assert agent.take() == OK
    assert rig.breaker().state_at(rig.loop.now) is BreakerState.CLOSED
    assert rig.stats.failures == {}


def test_pooled_connection_closed_while_idle_is_not_reused():
    rig = Rig()
    proxy, agent = rig.agent()
    proxy.data_received(GET)
    first = rig.loop.connects[0]
    first.accept()
    first.respond(OK)
    first.lost()  # idle in the pool when the upstream closed it
    proxy.data_received(GET)
    assert len(rig.loop.connects) == 2


def test_agent_leaving_mid_exchange_releases_the_probe_and_closes_upstream():
    rig = Rig(breaker=BreakerSettings(failures=1, open_s=1.0, probes=1))
    rig.breaker().record(False, rig.loop.now, "test")
    rig.loop.now += 1.0  # half-open: one probe may pass
    proxy, agent = rig.agent()
    proxy.data_received(GET)
    up = rig.loop.connects[0].accept()
    proxy.connection_lost(None)
    assert up.closed
    assert rig.stats.active == 0 and rig.loop.armed() == []  # its timer went with it
    # The probe slot is free again for the next caller.
    assert rig.breaker().allow(rig.loop.now)


# --- forward proxy -----------------------------------------------------------------


def test_forward_proxy_routes_absolute_form_and_rewrites_to_origin_form():
    rig = Rig()
    seen = []

    def route(host, port):
        seen.append((host, port))
        return rig.upstream

    proxy, agent = rig.agent(forward_route=route)
    proxy.data_received(b"GET http://hub.lan:9000/metrics?x=1 HTTP/1.1\r\nHost: hub.lan:9000"
                        b"\r\nProxy-Connection: keep-alive\r\n\r\n")
    assert seen == [(b"hub.lan", 9000)]
    up = rig.loop.connects[0].accept()
    assert up.take() == b"GET /metrics?x=1 HTTP/1.1\r\nHost: hub.lan:9000\r\n\r\n"


def test_forward_proxy_without_a_route_answers_502_and_keeps_the_connection():
    rig = Rig()
    unrouted = []
    proxy = HttpProxy(lambda host, port: None, forward=True, loop=rig.loop,
                      on_unrouted=lambda host, port: unrouted.append((host, port)))
    agent = FakeTransport(proxy)
    proxy.connection_made(agent)
    proxy.data_received(b"GET http://nowhere:81/ HTTP/1.1\r\nHost: nowhere:81\r\n\r\n")
    assert agent.take().startswith(b"HTTP/1.1 502 ")
    assert unrouted == [(b"nowhere", 81)] and not agent.closed
