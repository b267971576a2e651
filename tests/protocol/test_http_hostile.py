"""The L7 proxy against careless and hostile agents and faulty upstreams, by bytes alone.

Each test is one way an agent's fault used to become an upstream's failure (a breaker
verdict every other agent then paid for), one way bytes an agent never sent as a request
reached an upstream, or one way an answer reached the agent corrupted. Driven with the
fake loop and transports of `rig.py`: no sockets, no sleeping."""

from __future__ import annotations

import pytest

from sidecar.config import DEFAULT_HEADER_TIMEOUT_S, RetrySettings
from tests.protocol.rig import GET, OK, Rig


def failures(rig: Rig) -> dict:
    return dict(rig.stats.failures)


def breaker_failures(rig: Rig) -> int:
    return rig.breaker().failures_in_window(rig.loop.now)


def fire_all(rig: Rig) -> None:
    """Fire every armed timer whose time has come, the clock moved to each."""
    for _ in range(100):
        armed = sorted(rig.loop.armed(), key=lambda t: t.when)
        if not armed:
            return
        timer = armed[0]
        rig.loop.now = max(rig.loop.now, timer.when)
        timer.fire()


def accept_all(rig: Rig) -> None:
    """Complete every connect the proxy asked for: whatever it meant to send, it sends."""
    for connect in rig.loop.connects:
        if connect.transport is None:
            connect.accept()


def sent_upstream(rig: Rig) -> bytes:
    return b"".join(b"".join(c.transport.writes) for c in rig.loop.connects
                    if c.transport is not None)


# --- smuggling: framing is never hop-by-hop ------------------------------------------

SMUGGLED = b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize("connection", [b"Content-Length", b"close, content-length",
                                        b"Keep-Alive, CONTENT-LENGTH"])
def test_a_request_whose_connection_names_content_length_is_refused(connection):
    rig = Rig()
    proxy, agent = rig.agent()
    proxy.data_received(b"POST /push HTTP/1.1\r\nHost: x\r\nConnection: %s\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (connection, len(SMUGGLED), SMUGGLED))
    accept_all(rig)
    assert b"/admin" not in sent_upstream(rig)
    answer = agent.take()
    assert answer.startswith(b"HTTP/1.1 400 ") and agent.closed
    assert failures(rig) == {} and breaker_failures(rig) == 0


def test_a_chunked_request_whose_connection_names_transfer_encoding_is_refused():
    rig = Rig()
    proxy, agent = rig.agent()
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)
    proxy.data_received(b"POST /push HTTP/1.1\r\nHost: x\r\nConnection: Transfer-Encoding\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n" + body)
    accept_all(rig)
    assert b"/admin" not in sent_upstream(rig)
    assert agent.take().startswith(b"HTTP/1.1 400 ") and agent.closed


def test_the_forward_proxy_refuses_framing_named_in_connection_too():
    rig = Rig()
    proxy, agent = rig.agent(forward_route=lambda host, port: rig.upstream)
    proxy.data_received(b"POST http://hub:9000/push HTTP/1.1\r\nHost: hub:9000\r\n"
                        b"Connection: Content-Length\r\nContent-Length: %d\r\n\r\n%s"
                        % (len(SMUGGLED), SMUGGLED))
    accept_all(rig)
    assert b"/admin" not in sent_upstream(rig)
    assert agent.take().startswith(b"HTTP/1.1 400 ")


@pytest.mark.parametrize("same_read", [True, False])
def test_an_answer_nobody_asked_for_closes_the_connection_it_came_on(same_read):
    rig = Rig()
    proxy, agent = rig.agent()
    proxy.data_received(GET)
    first = rig.loop.connects[0]
    up = first.accept()
    extra = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!"
    if same_read:
        first.respond(OK + extra)
    else:
        first.respond(OK)
        first.respond(extra)
    assert agent.take() == OK
    assert up.closed
    first.lost()
    # The next request goes on a new connection and gets its own answer.
    proxy.data_received(GET)
    second = rig.loop.connects[-1]
    assert second is not first
    second.accept()
    second.respond(OK)
    assert agent.take() == OK


# --- agents' faults are not the upstream's --------------------------------------------


def test_an_agent_that_half_closes_mid_body_is_not_an_upstream_failure():
    rig = Rig()
    proxy, agent = rig.agent()
    proxy.data_received(b"POST /push HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
                        b"0123456789")
    connect = rig.loop.connects[0]
    up = connect.accept()
    assert up.take().endswith(b"0123456789")
    keep_open = proxy.eof_received()
    fire_all(rig)  # nothing the upstream did is waited for: the body will never come
    assert up.closed
    assert not keep_open or agent.closed
    assert failures(rig) == {} and breaker_failures(rig) == 0
    assert rig.stats.outcomes["failed"] == 0


@pytest.mark.parametrize("held", [False, True])
def test_a_valid_request_before_garbage_in_the_same_read_is_sent_and_answered(held):
    rig = Rig()
    proxy, agent = rig.agent()
    if held:  # the agent's connection keeps the upstream connection it last used
        proxy.data_received(GET)
        rig.loop.connects[0].accept()
        rig.loop.connects[0].respond(OK)
        assert agent.take() == OK
        rig.loop.connects[0].transport.take()
    proxy.data_received(b"POST /push HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
                        b"\x16\x03\x01 this is not HTTP\r\n\r\n")
    connect = rig.loop.connects[0]
    up = connect.transport if held else connect.accept()
    assert up.take().startswith(b"POST /push HTTP/1.1\r\n")
    connect.respond(OK)
    answer = agent.take()
    assert answer.startswith(OK) and b"HTTP/1.1 400 " in answer and agent.closed
    assert failures(rig) == {} and breaker_failures(rig) == 0
    assert rig.stats.outcomes["ok"] == 1 + held


def test_an_upgrade_request_with_a_body_is_refused_not_timed_out():
    rig = Rig()
    proxy, agent = rig.agent()
    proxy.data_received(b"POST /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                        b"Upgrade: websocket\r\nContent-Length: 5\r\n\r\nhello")
    accept_all(rig)
    fire_all(rig)
    assert agent.take().startswith(b"HTTP/1.1 400 ")
    assert failures(rig) == {} and breaker_failures(rig) == 0


def test_an_upgrade_request_without_a_body_is_forwarded_without_upgrade():
    rig = Rig()
    proxy, agent = rig.agent()
    proxy.data_received(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                        b"Upgrade: websocket\r\n\r\n")
    connect = rig.loop.connects[0]
    up = connect.accept()
    sent = up.take()
    assert sent.startswith(b"GET /ws HTTP/1.1\r\n") and b"Upgrade" not in sent
    connect.respond(OK)
    assert agent.take() == OK


@pytest.mark.parametrize("forward", [False, True])
@pytest.mark.parametrize("line", [b"GET /\r\n\r\n", b"GET /\r\nHost: x\r\n\r\n",
                                  b"GET / HTTP/0.9\r\n\r\n", b"GET / HTTP/2.0\r\n\r\n"])
def test_a_request_line_that_is_not_http_1_is_refused(line, forward):
    rig = Rig()
    if forward:
        line = line.replace(b" /", b" http://hub:9000/", 1)
        proxy, agent = rig.agent(forward_route=lambda host, port: rig.upstream)
    else:
        proxy, agent = rig.agent()
    proxy.data_received(line)
    accept_all(rig)
    assert sent_upstream(rig) == b""
    answer = agent.take()
    assert answer.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 505 ")) and agent.closed
    assert failures(rig) == {}


def test_a_slow_reader_is_cut_at_the_deadline_without_blaming_the_upstream():
    rig = Rig()
    proxy, agent = rig.agent()
    proxy.data_received(GET)
    connect = rig.loop.connects[0]
    connect.accept()
    connect.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 65536)
    proxy.pause_writing()  # the agent stopped reading
    assert not connect.transport.reading
    fire_all(rig)
    assert failures(rig) == {} and breaker_failures(rig) == 0


def test_an_upstream_that_trickles_its_body_past_the_deadline_is_a_timeout():
    rig = Rig()
    proxy, agent = rig.agent()
    proxy.data_received(GET)
    connect = rig.loop.connects[0]
    connect.accept()
    connect.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nxx")
    fire_all(rig)
    assert failures(rig) == {("10.0.0.1:8080", "timeout"): 1}


# --- no replay of what may not be repeated ---------------------------------------------


@pytest.mark.parametrize("method", [b"POST", b"PATCH"])
def test_a_non_idempotent_request_is_never_resent_after_a_reused_connection_resets(method):
    rig = Rig(retry=RetrySettings(attempts=2))
    proxy, agent = rig.agent()
    proxy.data_received(GET)
    first = rig.loop.connects[0]
    first.accept().take()
    first.respond(OK)
    assert agent.take() == OK
    proxy.data_received(b"%s /push HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
                        % method)
    assert first.transport.take().startswith(method + b" /push")
    first.lost()  # reset before any answer: the upstream may have run it
    assert len(rig.loop.connects) == 1, "the request was sent a second time"
    assert agent.take().startswith(b"HTTP/1.1 502 ")


def test_a_get_on_a_stale_pooled_connection_is_resent_once_on_a_fresh_one():
    rig = Rig()
    proxy, agent = rig.agent()
    proxy.data_received(GET)
    first = rig.loop.connects[0]
    first.accept()
    first.respond(OK)
    agent.take()
    proxy.data_received(GET)
    first.lost()
    second = rig.loop.connects[-1]
    assert second is not first
    second.accept()
    second.respond(OK)
    assert agent.take() == OK
    assert failures(rig) == {}


# --- request lines read as llhttp reads them -------------------------------------------


@pytest.mark.parametrize("prefix", [b"\r\n", b"\n", b"\r\n\r\n"])
def test_empty_lines_before_a_request_are_ignored(prefix):
    rig = Rig()
    proxy, agent = rig.agent()
    proxy.data_received(prefix + GET)
    connect = rig.loop.connects[0]
    up = connect.accept()
    assert up.take() == (b"GET /status HTTP/1.1\r\nHost: 10.0.0.1:8080\r\n"
                         b"User-Agent: legacy\r\n\r\n")
    connect.respond(OK)
    assert agent.take() == OK
    # and between keep-alive requests
    proxy.data_received(prefix + GET)
    assert connect.transport.take().startswith(b"GET /status HTTP/1.1\r\nHost: 10.0.0.1")


# --- answers relayed intact --------------------------------------------------------------


@pytest.mark.parametrize("te", [b"Transfer-Encoding: identity\r\n",
                                b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n"])
def test_an_answer_with_transfer_encoding_identity_reaches_the_agent_well_framed(te):
    rig = Rig()
    proxy, agent = rig.agent()
    proxy.data_received(GET)
    connect = rig.loop.connects[0]
    connect.accept()
    connect.respond(b"HTTP/1.1 200 OK\r\n" + te + b"\r\nhello ")
    connect.respond(b"world")
    connect.lost()  # the close ends the body
    answer = agent.take()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"identity" not in head.lower()
    assert b"\r\ntransfer-encoding: chunked" in head.lower()
    # the body as chunks the agent can read to the end
    text = b""
    while True:
        size, _, body = body.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        text += body[:n]
        body = body[n + 2:]
    assert text == b"hello world"
    assert rig.stats.outcomes["ok"] == 1


def test_early_hints_keep_their_fields():
    rig = Rig()
    proxy, agent = rig.agent()
    proxy.data_received(GET)
    connect = rig.loop.connects[0]
    connect.accept()
    connect.respond(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n"
                    b"Connection: keep-alive\r\n\r\n" + OK)
    answer = agent.take()
    assert answer.startswith(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload"
                             b"\r\n\r\n")
    assert answer.endswith(OK)


# --- bounded: slow heads, idle connections ---------------------------------------------


@pytest.mark.parametrize("forward", [False, True])
def test_a_head_sent_a_byte_at_a_time_is_answered_408_at_the_header_timeout(forward):
    rig = Rig(header_timeout_s=5.0)
    if forward:
        proxy, agent = rig.agent(forward_route=lambda host, port: rig.upstream)
        head = b"GET http://hub:9000/ HTTP/1.1\r\nHost: hub:9000\r\nX-Slow: "
    else:
        proxy, agent = rig.agent()
        head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: "
    start = rig.loop.now
    head += b"x" * 100
    for i in range(len(head)):  # a byte every 0.2 s: never a whole head
        proxy.data_received(head[i:i + 1])
        rig.loop.now += 0.2
        for timer in [t for t in rig.loop.armed() if t.when <= rig.loop.now]:
            timer.fire()
        if agent.closed:
            break
    assert agent.closed
    assert agent.take().startswith(b"HTTP/1.1 408 ")
    # the forward proxy learns a request's upstream from its head: its own default
    limit = DEFAULT_HEADER_TIMEOUT_S if forward else 5.0
    assert rig.loop.now - start <= limit + 0.2 + 1e-9
    assert rig.loop.connects == [] and failures(rig) == {}


def test_a_slow_head_after_a_keep_alive_exchange_has_its_own_header_timeout():
    rig = Rig(header_timeout_s=5.0, agent_idle_timeout_s=60.0)
    proxy, agent = rig.agent()
    proxy.data_received(GET)
    connect = rig.loop.connects[0]
    connect.accept()
    connect.respond(OK)
    assert agent.take() == OK
    rig.loop.now += 30.0  # idle, well inside the idle timeout
    for timer in [t for t in rig.loop.armed() if t.when <= rig.loop.now]:
        timer.fire()
    assert not agent.closed
    proxy.data_received(b"GET / HT")
    deadline = rig.loop.now + 5.0
    fire_all(rig)
    assert agent.closed and agent.take().startswith(b"HTTP/1.1 408 ")
    assert rig.loop.now <= deadline + 0.01


def test_a_connection_that_sends_nothing_is_closed_at_the_idle_timeout():
    rig = Rig(header_timeout_s=5.0, agent_idle_timeout_s=20.0)
    proxy, agent = rig.agent()
    start = rig.loop.now
    fire_all(rig)
    assert agent.closed and agent.take() == b""
    assert rig.loop.now - start == pytest.approx(20.0)


def test_a_request_in_flight_is_never_cut_by_the_idle_timeout():
    rig = Rig(request_timeout_s=30.0, agent_idle_timeout_s=5.0, header_timeout_s=5.0)
    proxy, agent = rig.agent()
    proxy.data_received(GET)
    connect = rig.loop.connects[0]
    connect.accept()
    rig.loop.now += 20.0
    for timer in [t for t in rig.loop.armed() if t.when <= rig.loop.now]:
        timer.fire()
    assert not agent.closed
    connect.respond(OK)
    assert agent.take() == OK


def test_an_agent_that_stalls_mid_body_gets_408_and_the_upstream_no_blame():
    rig = Rig(request_timeout_s=2.0)
    proxy, agent = rig.agent()
    proxy.data_received(b"POST /push HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123")
    connect = rig.loop.connects[0]
    up = connect.accept()
    fire_all(rig)
    assert agent.take().startswith(b"HTTP/1.1 408 ") and agent.closed and up.closed
    assert failures(rig) == {} and breaker_failures(rig) == 0


@pytest.mark.parametrize("after", [b"GET /\r\n\r\n",
                                   b"GET / HTTP/1.1\r\nConnection: Content-Length\r\n\r\n"])
def test_a_refusal_while_a_chunked_request_is_re_read_is_a_400_not_an_internal_error(
        after, caplog):
    # A chunked request hands the connection to field-by-field parsing, re-reading the
    # rest of the read; a request refused in that re-read used to be taken for the
    # hand-over itself, logged as the proxy's own bug, and the agent got no answer.
    rig = Rig()
    proxy, agent = rig.agent()
    proxy.data_received(b"POST /push HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                        b"\r\n2\r\nhi\r\n0\r\n\r\n" + after)
    connect = rig.loop.connects[0]
    up = connect.accept()
    assert up.take().startswith(b"POST /push HTTP/1.1\r\n")
    connect.respond(OK)
    answer = agent.take()
    assert answer.startswith(OK) and b"HTTP/1.1 400 " in answer
    assert "callback failed" not in caplog.text


def test_an_absolute_form_request_goes_on_with_its_targets_host_not_the_agents():
    rig = Rig()
    proxy, agent = rig.agent(forward_route=lambda host, port: rig.upstream)
    proxy.data_received(b"GET http://hub.lan:9000/m HTTP/1.1\r\nHost: admin.internal\r\n\r\n")
    connect = rig.loop.connects[0]
    up = connect.accept()
    assert up.take() == b"GET /m HTTP/1.1\r\nHost: hub.lan:9000\r\n\r\n"


def test_an_agent_that_leaves_before_its_answer_is_cancelled_not_failed():
    rig = Rig()
    proxy, agent = rig.agent()
    proxy.data_received(GET)
    connect = rig.loop.connects[0]
    up = connect.accept()
    assert up.take().startswith(b"GET /status HTTP/1.1\r\n")
    proxy.connection_lost(None)
    assert up.closed  # mid-exchange: the upstream connection cannot be reused
    assert rig.stats.outcomes["cancelled"] == 1 and rig.stats.outcomes["failed"] == 0
    assert failures(rig) == {} and breaker_failures(rig) == 0
    assert rig.stats.active == 0
