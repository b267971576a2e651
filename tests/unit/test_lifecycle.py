"""The agent lifecycle table, driven with events alone."""

import pytest

from supervisor.policy.lifecycle import (
    LIVE,
    TRANSITIONS,
    Event,
    IllegalTransition,
    State,
    next_state,
)

S, E = State, Event


def walk(state: State, *steps: tuple[Event, State]) -> State:
    for event, expected in steps:
        state = next_state(state, event)
        assert state is expected, f"{event.value}: got {state.value}, want {expected.value}"
    return state


def test_crash_backoff_retry_then_operator_stop():
    walk(
        S.STOPPED,
        (E.START, S.STARTING),
        (E.READY, S.RUNNING),
        (E.EXIT_RESTART, S.BACKOFF),
        (E.RETRY, S.STARTING),
        (E.READY, S.RUNNING),
        (E.STOP, S.STOPPING),
        (E.GONE, S.STOPPED),
    )


def test_unhealthy_agent_is_killed_and_restarted():
    walk(
        S.RUNNING,
        (E.KILL, S.STOPPING),
        (E.EXIT_RESTART, S.BACKOFF),
        (E.RETRY, S.STARTING),
    )


def test_stop_during_a_kill_turns_the_restart_into_a_stop():
    walk(S.RUNNING, (E.KILL, S.STOPPING), (E.STOP, S.STOPPING), (E.GONE, S.STOPPED))


def test_fatal_waits_for_an_operator_start_or_fatal_retry():
    walk(S.STARTING, (E.EXIT_FATAL, S.FATAL), (E.START, S.STARTING))
    walk(S.RUNNING, (E.EXIT_FATAL, S.FATAL), (E.RETRY, S.STARTING))
    walk(S.STARTING, (E.EXIT_FATAL, S.FATAL), (E.STOP, S.STOPPED))


def test_exited_agent_stays_until_started():
    walk(S.RUNNING, (E.EXIT_DONE, S.EXITED), (E.START, S.STARTING))


def test_operator_start_during_backoff_skips_the_delay():
    assert next_state(S.BACKOFF, E.START) is S.STARTING


def test_stop_in_backoff_needs_no_process_to_end():
    assert next_state(S.BACKOFF, E.STOP) is S.STOPPED
    assert S.BACKOFF not in LIVE


@pytest.mark.parametrize(
    "state,event",
    [
        (S.STOPPED, E.READY),
        (S.STOPPED, E.EXIT_RESTART),
        (S.STOPPED, E.GONE),
        (S.RUNNING, E.START),
        (S.RUNNING, E.RETRY),
        (S.RUNNING, E.GONE),
        (S.BACKOFF, E.READY),
        (S.FATAL, E.KILL),
        (S.EXITED, E.READY),
    ],
)
def test_illegal_transitions_raise(state, event):
    message = f"{event.value} is not allowed in {state.value}"
    with pytest.raises(IllegalTransition, match=message):
        next_state(state, event)


def reachable(start: State) -> set[State]:
    seen, todo = {start}, [start]
    while todo:
        here = todo.pop()
        for (src, _), dst in TRANSITIONS.items():
            if src is here and dst not in seen:
                seen.add(dst)
                todo.append(dst)
    return seen


def test_every_state_is_reachable_from_stopped():
    assert reachable(S.STOPPED) == set(State)


@pytest.mark.parametrize("state", list(State))
def test_an_operator_can_always_get_back_to_stopped(state):
    assert S.STOPPED in reachable(state)
