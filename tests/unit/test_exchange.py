"""The table of how exchanges end (sidecar/proxy/http/exchange.py), held to its rules by
events alone: no sockets, no proxy. Each rule is one way an agent's fault could become an
upstream's failure, or an answer could reach an agent corrupted, if a row changed."""

from __future__ import annotations

import itertools

import pytest

from sidecar.metrics import Outcome
from sidecar.proxy.http import exchange as ex

IN_FLIGHT = (ex.ADMITTED, ex.ANSWERING)
BOTH = (False, True)

# Where each event can happen, as the agent connection reports them.
MEETS = {
    ex.ANSWERED: IN_FLIGHT, ex.ANSWERED_FAILING: IN_FLIGHT, ex.UPSTREAM_BROKE: IN_FLIGHT,
    ex.STALE_RESET: (ex.ADMITTED,), ex.DEADLINE: IN_FLIGHT, ex.DEADLINE_UNREAD: IN_FLIGHT,
    ex.AGENT_MALFORMED: IN_FLIGHT, ex.AGENT_GONE: IN_FLIGHT, ex.BREAKER_OPEN: (ex.QUEUED,),
}


def met():
    for event, phases in MEETS.items():
        for phase, complete in itertools.product(phases, BOTH):
            yield event, phase, complete, ex.ending(event, phase, complete)


def test_every_event_has_an_ending_in_every_phase_it_can_meet():
    assert set(MEETS) == set(range(len(ex.EVENTS)))
    assert len(list(met())) == sum(len(p) for p in MEETS.values()) * 2


@pytest.mark.parametrize("event, phase", [
    (ex.ANSWERED, ex.QUEUED), (ex.STALE_RESET, ex.ANSWERING), (ex.BREAKER_OPEN, ex.ADMITTED),
    (ex.UPSTREAM_BROKE, ex.ENDED), (ex.AGENT_GONE, ex.ENDED)])
def test_an_event_in_a_phase_it_cannot_meet_is_a_lookup_error_naming_both(event, phase):
    with pytest.raises(LookupError, match=f"{ex.EVENTS[event]} in phase {ex.PHASES[phase]}"):
        ex.ending(event, phase, True)


def test_two_rows_for_one_event_and_phase_are_refused_when_the_table_is_built():
    row = ex.Ending(ex.SUCCESS, Outcome.OK, ex.RELAYED, ex.KEEP)
    with pytest.raises(ValueError, match="two endings for answered in admitted"):
        ex._table([(ex.ANSWERED, ex.ADMITTED, ex.ANY, row),
                   (ex.ANSWERED, ex.ADMITTED, True, row)])


def test_what_the_agent_does_is_never_an_upstream_failure():
    agents = [(e, p, c, end) for e, p, c, end in met()
              if e in (ex.AGENT_MALFORMED, ex.AGENT_GONE)
              or (e in (ex.DEADLINE, ex.DEADLINE_UNREAD) and p == ex.ADMITTED and not c)
              or (e == ex.DEADLINE_UNREAD and p == ex.ANSWERING)]
    assert len(agents) == 12
    for event, phase, complete, end in agents:
        assert end.verdict != ex.FAILURE, (ex.EVENTS[event], ex.PHASES[phase], complete)
        assert end.outcome in (Outcome.BAD_REQUEST, Outcome.CANCELLED)


def test_a_pooled_connection_closed_under_us_gives_no_verdict_and_is_resent_fresh():
    for complete in BOTH:
        end = ex.ending(ex.STALE_RESET, ex.ADMITTED, complete)
        assert (end.verdict, end.resend, end.reply) == (ex.RELEASE, ex.FRESH, ex.BAD_GATEWAY)


def test_what_the_upstream_does_wrong_counts_against_it():
    for event, phase, complete, end in met():
        upstream_fault = (event in (ex.UPSTREAM_BROKE, ex.ANSWERED_FAILING)
                          or (event == ex.DEADLINE and (complete or phase == ex.ANSWERING))
                          or (event == ex.DEADLINE_UNREAD and phase == ex.ADMITTED
                              and complete))
        assert (end.verdict == ex.FAILURE) == upstream_fault, (ex.EVENTS[event],
                                                               ex.PHASES[phase], complete)
        if upstream_fault:
            assert end.outcome is Outcome.FAILED


def test_every_admission_ends_in_exactly_one_verdict_or_release():
    for event, phase, complete, end in met():
        if phase == ex.QUEUED:
            assert end.verdict == ex.NO_VERDICT  # never admitted: nothing to hand back
        elif end.then != ex.CARRY_ON:
            assert end.verdict in (ex.SUCCESS, ex.FAILURE, ex.RELEASE)
        else:
            assert end.verdict == ex.NO_VERDICT  # goes on: its verdict is still to come


def test_once_an_answer_byte_is_out_the_proxy_never_writes_its_own_reply():
    for event, phase, complete, end in met():
        if phase != ex.ANSWERING:
            continue
        assert end.reply in (ex.RELAYED, ex.NOTHING), ex.EVENTS[event]
        assert end.resend == ex.NO_RESEND
        whole = event in (ex.ANSWERED, ex.ANSWERED_FAILING)
        if not whole and end.then not in (ex.CARRY_ON,) and event != ex.AGENT_GONE:
            # half an answer: only a reset tells the agent it is not the whole of it
            assert end.then == ex.CUT, ex.EVENTS[event]


def test_only_the_upstream_failing_before_any_answer_is_retried_elsewhere():
    retried = {(e, p) for e, p, c, end in met() if end.resend == ex.OTHER}
    assert retried == {(ex.UPSTREAM_BROKE, ex.ADMITTED)}


def test_an_agent_that_never_finished_its_request_gets_408_and_its_connection_closed():
    for event in (ex.DEADLINE, ex.DEADLINE_UNREAD):
        end = ex.ending(event, ex.ADMITTED, False)
        assert (end.reply, end.then, end.outcome) == (ex.BODY_TIMEOUT, ex.CLOSE,
                                                       Outcome.BAD_REQUEST)


def test_bad_bytes_after_a_whole_request_let_its_exchange_go_on():
    for phase in IN_FLIGHT:
        assert ex.ending(ex.AGENT_MALFORMED, phase, True).then == ex.CARRY_ON
        assert ex.ending(ex.AGENT_MALFORMED, phase, False).then != ex.CARRY_ON


def test_the_inline_ending_of_a_good_answer_is_the_tables():
    # upstream_conn.on_message_complete ends a good answer inline, without the table:
    # success, OK, the answer as relayed, the connection kept.
    for phase, complete in itertools.product(IN_FLIGHT, BOTH):
        end = ex.ending(ex.ANSWERED, phase, complete)
        assert (end.verdict, end.outcome, end.reply, end.then) == (
            ex.SUCCESS, Outcome.OK, ex.RELAYED, ex.KEEP)


def test_an_ending_reads_as_words():
    assert repr(ex.ending(ex.STALE_RESET, ex.ADMITTED, True)) == (
        "Ending(release, failed, bad_gateway, keep, resend=fresh)")
