"""One exchange, a request from the agent to the end of its answer, and the table of
how exchanges end.

Everything that decides how an exchange ends lives here, the way h11 keeps every
transition in one table: the exchange's phase, the events that end it, and `ENDINGS`,
which says for each event in each phase whose fault the ending is (the breaker's
verdict), the outcome counted, what the agent is sent, how its connection goes on, and
whether the request may be sent again. The agent connection (`agent.HttpProxy`) reports
events and carries out the ending the table names; it decides no verdict itself.

The classifier's one rule: only what the upstream did counts against it. An agent that
breaks its own request, stops sending, stops reading or leaves gets its answer (or not)
and the admission is handed back without a verdict; a pooled connection the upstream
had already closed says nothing about the upstream's health.

Compiled: part of the hot path mypyc compiles (sidecar/compile.py), so its types are
exact, not hints: mypyc checks declared attribute and argument types at run time, and
narrows an attribute after an assignment in a method (read it in another method if a
call in between may change it). The tests run it compiled and interpreted.
"""

from __future__ import annotations

from typing import Final

from sidecar.metrics import Outcome
from sidecar.proxy.http.pool import UpstreamState
from sidecar.upstream import Endpoint, Upstream

# --- phases: where an exchange is; one int, only ever moved forward (a retry aside) ----
QUEUED: Final = 0  # its head is in; it waits for its turn, then for a breaker
ADMITTED: Final = 1  # a breaker admitted it to an endpoint; no answer byte went to the agent
ANSWERING: Final = 2  # bytes of an answer went to the agent: nothing else may follow them
ENDED: Final = 3  # over: body bytes the agent still sends for it are dropped
PHASES: Final = ("queued", "admitted", "answering", "ended")

# --- events: what happened that may end it ----------------------------------------------
ANSWERED: Final = 0  # the upstream's whole answer is relayed
ANSWERED_FAILING: Final = 1  # ... with a status the policy counts as a failure
UPSTREAM_BROKE: Final = 2  # refused, no connection in time, reset, or not HTTP/1.1
STALE_RESET: Final = 3  # a pooled connection reset as it was reused, before any answer byte
DEADLINE: Final = 4  # the request timeout passed
DEADLINE_UNREAD: Final = 5  # ... while the agent was not reading what it was sent
AGENT_MALFORMED: Final = 6  # the agent's bytes broke its request, or it half-closed mid-body
AGENT_GONE: Final = 7  # the agent's connection is lost
BREAKER_OPEN: Final = 8  # no endpoint's breaker admits it
EVENTS: Final = ("answered", "answered_failing", "upstream_broke", "stale_reset", "deadline",
                 "deadline_unread", "agent_malformed", "agent_gone", "breaker_open")

# --- what an ending does -----------------------------------------------------------------
# The breaker's verdict: whose fault the ending is.
NO_VERDICT: Final = 0  # never admitted: nothing to record
SUCCESS: Final = 1
FAILURE: Final = 2  # the upstream's fault
RELEASE: Final = 3  # the agent's, or nobody's: the admission is handed back unrecorded
VERDICTS: Final = ("no_verdict", "success", "failure", "release")

# What the agent is sent.
RELAYED: Final = 0  # what was relayed of the upstream's answer stands (nothing more)
UPSTREAM_FAILED: Final = 1  # 502 or 504 naming the upstream and what went wrong
GATEWAY_TIMEOUT: Final = 2  # 504: no answer within the request timeout
BODY_TIMEOUT: Final = 3  # 408: the agent did not finish its request in time
REFUSAL: Final = 4  # what its bytes earned (400, 431)
BAD_GATEWAY: Final = 5  # 502: the request may have been acted on, and is not sent twice
FALLBACK: Final = 6  # the upstream's fallback, when it has one for this request, else 503
NOTHING: Final = 7  # nobody is listening
REPLIES: Final = ("relayed", "upstream_failed", "gateway_timeout", "body_timeout", "refusal",
                  "bad_gateway", "fallback", "nothing")

# How the agent connection goes on.
KEEP: Final = 0  # as the agent and the answer say (keep-alive or close)
CLOSE: Final = 1  # closed after the reply
CUT: Final = 2  # reset: a half-written answer must fail the agent's read, not end it
CARRY_ON: Final = 3  # not an ending: the bad bytes came after this request, which goes on
THEN: Final = ("keep", "close", "cut", "carry_on")

# Whether the request is sent again instead of ending.
NO_RESEND: Final = 0
FRESH: Final = 1  # once, on a new connection to the same endpoint, same admission; only
#                   a request that may be repeated and is still held whole
OTHER: Final = 2  # to another endpoint, as the retry policy and budget allow
RESENDS: Final = ("no", "fresh", "other")

ANY: Final = -1  # in a row: whether or not the agent sent all of its request


class Ending:
    """One row of the table: what the agent connection does for an event."""

    __slots__ = ("verdict", "outcome", "reply", "then", "resend")

    def __init__(self, verdict: int, outcome: Outcome, reply: int, then: int,
                 resend: int = NO_RESEND):
        self.verdict = verdict
        self.outcome = outcome
        self.reply = reply
        self.then = then
        self.resend = resend

    def __repr__(self) -> str:
        return (f"Ending({VERDICTS[self.verdict]}, {self.outcome.value}, "
                f"{REPLIES[self.reply]}, {THEN[self.then]}, resend={RESENDS[self.resend]})")


_OK: Final = Outcome.OK
_FAILED: Final = Outcome.FAILED
_BAD: Final = Outcome.BAD_REQUEST
_CANCELLED: Final = Outcome.CANCELLED

# (event, phase, whether the agent sent all of its request) -> the ending. Every event an
# exchange can meet in every phase it can meet it in; anything else is a bug, and
# `ending` raises for it. tests/unit/test_exchange.py holds the table to its rules.
_ROWS: Final[list[tuple[int, int, int, Ending]]] = [
    # The upstream answered, whatever the agent still sends (an early answer): its bytes
    # may still wait to be written (their read ended the answer).
    (ANSWERED, ADMITTED, ANY, Ending(SUCCESS, _OK, RELAYED, KEEP)),
    (ANSWERED, ANSWERING, ANY, Ending(SUCCESS, _OK, RELAYED, KEEP)),
    (ANSWERED_FAILING, ADMITTED, ANY, Ending(FAILURE, _FAILED, RELAYED, KEEP)),
    (ANSWERED_FAILING, ANSWERING, ANY, Ending(FAILURE, _FAILED, RELAYED, KEEP)),
    # The upstream broke: before any answer byte the agent can still be told, and the
    # request may go elsewhere; after one, only a cut says that the answer is not whole.
    (UPSTREAM_BROKE, ADMITTED, ANY, Ending(FAILURE, _FAILED, UPSTREAM_FAILED, KEEP, OTHER)),
    (UPSTREAM_BROKE, ANSWERING, ANY, Ending(FAILURE, _FAILED, RELAYED, CUT)),
    # A pooled connection closed by the upstream as it was reused: nobody's fault.
    (STALE_RESET, ADMITTED, ANY, Ending(RELEASE, _FAILED, BAD_GATEWAY, KEEP, FRESH)),
    # The deadline: the upstream's fault if it had the whole request, the agent's if it
    # never finished sending it, or if it is not reading an answer already on its way.
    (DEADLINE, ADMITTED, True, Ending(FAILURE, _FAILED, GATEWAY_TIMEOUT, KEEP)),
    (DEADLINE, ADMITTED, False, Ending(RELEASE, _BAD, BODY_TIMEOUT, CLOSE)),
    (DEADLINE, ANSWERING, ANY, Ending(FAILURE, _FAILED, RELAYED, CUT)),
    (DEADLINE_UNREAD, ADMITTED, True, Ending(FAILURE, _FAILED, GATEWAY_TIMEOUT, KEEP)),
    (DEADLINE_UNREAD, ADMITTED, False, Ending(RELEASE, _BAD, BODY_TIMEOUT, CLOSE)),
    (DEADLINE_UNREAD, ANSWERING, ANY, Ending(RELEASE, _CANCELLED, RELAYED, CUT)),
    # The agent broke its request: one it had finished goes on (the refusal waits its
    # turn); one it had not can never be completed, and is no upstream's failure.
    (AGENT_MALFORMED, ADMITTED, False, Ending(RELEASE, _BAD, REFUSAL, CLOSE)),
    (AGENT_MALFORMED, ANSWERING, False, Ending(RELEASE, _BAD, RELAYED, CUT)),
    (AGENT_MALFORMED, ADMITTED, True, Ending(NO_VERDICT, _BAD, RELAYED, CARRY_ON)),
    (AGENT_MALFORMED, ANSWERING, True, Ending(NO_VERDICT, _BAD, RELAYED, CARRY_ON)),
    (AGENT_GONE, ADMITTED, ANY, Ending(RELEASE, _CANCELLED, NOTHING, CLOSE)),
    (AGENT_GONE, ANSWERING, ANY, Ending(RELEASE, _CANCELLED, NOTHING, CLOSE)),
    # No breaker admits it: the fallback (outcome FALLBACK) or 503 (REJECTED).
    (BREAKER_OPEN, QUEUED, ANY, Ending(NO_VERDICT, Outcome.REJECTED, FALLBACK, KEEP)),
]


def _key(event: int, phase: int, complete: bool) -> int:
    return (event << 3) | (phase << 1) | (1 if complete else 0)


def _table(rows: list[tuple[int, int, int, Ending]]) -> list[Ending | None]:
    table: list[Ending | None] = [None] * (len(EVENTS) << 3)
    for event, phase, complete, row in rows:
        for sent_all in ((False, True) if complete == ANY else (complete == 1,)):
            key = _key(event, phase, sent_all)
            if table[key] is not None:
                raise ValueError(f"two endings for {EVENTS[event]} in {PHASES[phase]}")
            table[key] = row
    return table


ENDINGS: Final = _table(_ROWS)


def ending(event: int, phase: int, complete: bool) -> Ending:
    """How an exchange in `phase` (the agent having sent all of its request or not)
    ends when `event` happens. LookupError for a pair the table does not hold: the
    caller met an event it cannot meet in that phase."""
    found = ENDINGS[_key(event, phase, complete)] if 0 <= phase < ENDED else None
    if found is None:
        raise LookupError(f"no ending for {EVENTS[event]} in phase {PHASES[phase]}"
                          f" (request {'complete' if complete else 'incomplete'})")
    return found


class Exchange:
    """One request from the agent, from its head to the end of its exchange.

    No __slots__: the exchange's fields start as the class's defaults below and only
    the head's are set per request (interpreted, a third of the stores on every
    request; compiled, every field is a native slot either way)."""

    phase = QUEUED
    # the body, kept for a resend while it fits max_pending_bytes: a list once a part
    # arrives; None once a part went out and was let go
    replay: list[bytes] | tuple[()] | None = ()
    body_bytes = 0
    tunnel = False  # CONNECT
    complete = False  # the agent sent all of it
    started = 0.0
    deadline = 0.0  # loop time by which the whole answer must be in
    endpoint: Endpoint | None = None
    attempt = 0  # retries sent
    fresh_retry = False  # the one resend after a stale pooled connection
    failed_status = False  # the answer's status is one the policy counts as a failure

    def __init__(self, method: bytes, host_line: bytes | None, fields: bytes,
                 chunked: bool, keep_alive: bool, http10: bool, target: bytes,
                 upstream: Upstream | None, state: UpstreamState | None):
        self.method = method
        self.host_line = host_line  # None: the chosen endpoint's host:port
        self.fields = fields  # the other forwarded header lines, each with its CRLF
        self.chunked = chunked
        self.keep_alive = keep_alive
        self.http10 = http10
        self.target = target
        self.upstream = upstream
        self.state = state
        if method == b"CONNECT":
            self.tunnel = True
