"""A read that repeats the last one byte for byte is not parsed again (HttpProxy._repeated
for requests, UpstreamConnection._repeated for answers). That shortcut must change
nothing anyone can see: these tests drive the same exchanges through the proxy twice,
once as it runs and once with the repeat memory wiped before every read (so every byte
goes through llhttp), and require the same bytes upstream, the same bytes to the agents,
the same closes, outcomes and breaker states. The exchanges are drawn from a small set
so that repeats are common, beside the reads that must never count as one: a body that
spells the previous request, a request after `Connection: close`, HTTP/1.0, an Upgrade,
pipelined and split reads, garbage; answers that fail, close, come chunked, come twice,
or answer a HEAD with a body."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from sidecar.config import Fallback, FallbackKind
from sidecar.proxy.http.pool import state_of
from tests.protocol.rig import OK, Rig

GET_A = (b"GET /registry/agents HTTP/1.1\r\nHost: 127.0.0.1:18081\r\n"
         b"User-Agent: python-requests/2.32.3\r\nAccept-Encoding: gzip, deflate\r\n"
         b"Accept: */*\r\nConnection: keep-alive\r\n\r\n")
GET_B = GET_A.replace(b"/registry/agents", b"/registry/hosts")

# Each request as the reads that bring it.
REQUESTS: list[tuple[bytes, ...]] = [
    (GET_A,),
    (GET_A,),
    (GET_B,),
    (GET_A.replace(b"GET", b"HEAD", 1),),
    # A body that spells the previous request is a body.
    (b"POST /push HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(GET_A), GET_A),
    (GET_A.replace(b"keep-alive", b"close"),),
    (GET_A.replace(b"HTTP/1.1", b"HTTP/1.0", 1),),
    (GET_A.replace(b"Connection: keep-alive", b"Connection: Upgrade\r\nUpgrade: h2c"),),
    (GET_A + GET_A,),  # pipelined
    (GET_A[:40], GET_A[40:]),  # split
    (GET_A[:-2],),  # a head left open: the next read completes it
    (b"\x00\x01garbage\r\n\r\n",),
]

CL_OK2 = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nworld"
FAIL = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy"
ANSWERS: list[bytes] = [
    OK,
    OK,
    CL_OK2,
    FAIL,
    FAIL,
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    # Reframed on the way (extension and trailer dropped): its bytes are not its reply.
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=1\r\nhello\r\n0\r\n"
    b"X-Trailer: 1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    b"HTTP/1.1 100 Continue\r\n\r\n" + OK,
    # An interim answer in the same read, whose hop-by-hop field is not forwarded.
    b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\nKeep-Alive: timeout=5\r\n\r\n" + OK,
    OK + OK,  # the second is an answer nobody asked for
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive, X-Hop\r\n"
    b"X-Hop: 1\r\n\r\nhello",
]


HOLD = len(ANSWERS)  # the upstream says nothing this time: requests pile up


def run(steps: list[tuple[int, int, bool]], fallback: bool, parse_all: bool) -> list:
    """Drive `steps` (request, answer or HOLD, whether the upstream answers twice in two
    reads) through one upstream; what every side saw, in order."""
    kw = {"fallback": Fallback(kind=FallbackKind.LAST_GOOD)} if fallback else {}
    rig = Rig(**kw)
    state = state_of(rig.upstream)
    proxy, agent = rig.agent()
    seen: list = []
    lost: set[int] = set()

    def upstream_turn(answer: bytes | None, twice: bool) -> None:
        for i, connect in enumerate(rig.loop.connects):
            if connect.cancelled() or i in lost:
                continue
            if connect.transport is None:
                connect.accept()
            up = connect.transport
            sent = up.take()
            seen.append(("upstream", i, sent))
            if sent and not up.closed and answer is not None:
                for _ in range(2 if twice else 1):
                    if parse_all:
                        state.last_answer = b""
                    if not up.closed:
                        connect.respond(answer)
            if up.closed:
                lost.add(i)
                connect.lost()

    for request, answer, twice in steps:
        if agent.closed:
            proxy.connection_lost(None)
            proxy, agent = rig.agent()
        for read in REQUESTS[request]:
            if parse_all:
                proxy._last_read = b""
            if not agent.closed:
                proxy.data_received(read)
        for _ in range(3):  # pipelined requests leave one at a time
            upstream_turn(ANSWERS[answer] if answer != HOLD else None, twice)
        seen.append(("agent", agent.take(), agent.closed))
    seen.append(("outcomes", dict(rig.stats.outcomes)))
    seen.append(("breaker", rig.breaker().state_at(rig.loop.now).name, rig.breaker().trips))
    return seen


# Sequences an adversary would try first, beside what hypothesis draws: the last request
# again right after one that closes (llhttp takes nothing after `Connection: close`),
# after HTTP/1.0, after garbage, after a held pipeline; an answer that fails, repeated.
@example(steps=[(0, 0, False), (5, HOLD, False), (0, 0, False), (0, 0, False)], fallback=False)
@example(steps=[(0, 0, False), (6, HOLD, False), (0, 0, False)], fallback=False)
@example(steps=[(0, 0, False), (8, HOLD, False), (0, 0, False), (1, 1, False)], fallback=False)
@example(steps=[(0, 0, False), (11, HOLD, False), (0, 0, False)], fallback=False)
@example(steps=[(0, 3, False)] * 7, fallback=False)
@example(steps=[(0, 0, False), (0, 0, True), (0, 0, False)], fallback=True)
# LAST_GOOD keeps a GET's good answer: the bytes a POST got before must not let the GET's
# answer pass uncaptured, or the fallback has nothing to serve once the breaker opens.
@example(steps=[(4, 0, False), (0, 0, False), *[(2, 3, False)] * 5, (0, 0, False)],
         fallback=True)
@settings(max_examples=600, deadline=None)
@given(steps=st.lists(st.tuples(st.integers(0, len(REQUESTS) - 1),
                                st.integers(0, HOLD),
                                st.integers(0, 5).map(lambda n: n == 0)),
                      min_size=1, max_size=12),
       fallback=st.booleans())
def test_a_repeat_taken_without_parsing_is_what_parsing_it_gives(steps, fallback):
    assert run(steps, fallback, parse_all=False) == run(steps, fallback, parse_all=True)


def first_poll():
    """An agent connection that has sent GET_A, and the upstream connection it opened."""
    rig = Rig()
    proxy, agent = rig.agent()
    proxy.data_received(GET_A)
    connect = rig.loop.connects[0]
    return rig, proxy, agent, connect, connect.accept()


def test_polling_the_same_bytes_forwards_and_answers_every_request():
    # The shortcut in use: after the first exchange every read is a repeat on both
    # sides, and each one is still one request upstream, one answer, one outcome.
    rig, proxy, agent, connect, up = first_poll()
    for _ in range(50):
        assert up.take().startswith(b"GET /registry/agents HTTP/1.1\r\n")
        connect.respond(OK)
        assert agent.take() == OK
        proxy.data_received(GET_A)
    assert rig.stats.outcomes["ok"] == 50
    assert state_of(rig.upstream).last_answer == OK  # the answer side did repeat


def test_a_body_that_spells_the_last_request_is_a_body():
    rig, proxy, agent, connect, up = first_poll()
    up.take()
    connect.respond(OK)
    proxy.data_received(b"POST /push HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                        % len(GET_A))
    proxy.data_received(GET_A)
    sent = up.take()
    assert sent.count(b"HTTP/1.1\r\n") == 2  # the POST's line, and its body's copy
    assert sent.startswith(b"POST /push HTTP/1.1\r\n") and sent.endswith(GET_A)
    connect.respond(OK)
    assert agent.take().count(b"HTTP/1.1 200 OK") == 2 and not agent.closed
    assert up.take() == b""  # nothing was taken for a second request


def test_a_failing_answer_repeated_still_opens_the_breaker():
    # The same 503 bytes every time: each is charged to the upstream, as parsed ones are.
    rig, proxy, agent, connect, up = first_poll()
    for i in range(5):
        if i:
            proxy.data_received(GET_A)
        up.take()
        connect.respond(FAIL)
        assert agent.take() == FAIL
    assert rig.stats.outcomes["failed"] == 5
    assert rig.breaker().state_at(rig.loop.now).name == "OPEN"
    proxy.data_received(GET_A)
    assert b"X-Agentvisor-Breaker" in agent.take()


def test_an_answer_repeated_unasked_is_never_handed_to_anyone():
    rig, proxy, agent, connect, up = first_poll()
    up.take()
    connect.respond(OK)
    assert agent.take() == OK
    connect.respond(OK)  # again, with no request in flight: the connection is not HTTP
    assert up.closed
    proxy.data_received(GET_A)
    assert rig.loop.connects[-1] is not connect  # a new connection, not the tainted one
