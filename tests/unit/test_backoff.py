"""Restart backoff and the FATAL limit, driven with plain numbers for time."""

import random

import pytest

from supervisor.config.model import Backoff, RestartMode, RestartPolicy
from supervisor.policy.backoff import Action, RestartTracker

CRASH = "exited with status 1"
EXACT = Backoff(initial_s=0.5, factor=2.0, max_s=30.0, jitter=0.0)


def tracker(**kw) -> RestartTracker:
    kw.setdefault("backoff", EXACT)
    return RestartTracker(RestartPolicy(**kw), random.Random(0))


def crash_loop(t: RestartTracker, n: int, every_s: float = 1.0, ran_s: float = 0.1):
    return [t.on_exit(i * every_s, ran_s, True, CRASH) for i in range(n)]


def test_first_restart_is_immediate():
    d = tracker().on_exit(100.0, 0.2, True, CRASH)
    assert (d.action, d.delay_s, d.attempt) == (Action.RESTART, 0.0, 1)
    assert d.reason == "exited with status 1; restart 1 in 0.0 s"


def test_delay_grows_exponentially_then_caps():
    t = tracker(max_failures=100)
    delays = [d.delay_s for d in crash_loop(t, 10)]
    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_reason_names_the_attempt_and_delay():
    d = crash_loop(tracker(), 3)[-1]
    assert d.reason == "exited with status 1; restart 3 in 1.0 s"


def test_delay_stays_at_cap_for_a_crasher_that_never_goes_fatal():
    # A float power overflows after ~1000 doublings: hours of slow crashing.
    assert tracker().delay(10_000) == 30.0


def test_jitter_is_bounded_and_deterministic_with_a_seed():
    b = Backoff(initial_s=0.5, factor=2.0, max_s=30.0, jitter=0.2)
    policy = RestartPolicy(backoff=b)
    one = RestartTracker(policy, random.Random(7))
    two = RestartTracker(policy, random.Random(7))
    exact = tracker()
    seen = []
    for attempt in range(2, 40):
        base = exact.delay(attempt)
        got = one.delay(attempt)
        assert got == two.delay(attempt)
        assert base * 0.8 <= got <= base * 1.2
        assert got <= 30.0 * 1.2
        seen.append(got / base)
    assert len(set(seen)) > 1  # actually jittered, not a constant factor


def test_full_jitter_never_goes_negative():
    t = RestartTracker(RestartPolicy(backoff=Backoff(jitter=1.0)), random.Random(3))
    assert all(0.0 <= t.delay(a) <= 60.0 for a in range(2, 200))


def test_a_run_of_start_s_resets_the_backoff():
    t = tracker(start_s=1.0, max_failures=100)
    assert [d.attempt for d in crash_loop(t, 4)] == [1, 2, 3, 4]
    d = t.on_exit(10.0, 1.0, True, CRASH)  # exactly start_s counts as a good run
    assert (d.attempt, d.delay_s) == (1, 0.0)
    assert t.on_exit(11.0, 0.1, True, CRASH).delay_s == 0.5


@pytest.mark.parametrize("max_failures", [1, 3, 5])
def test_fatal_on_the_exit_after_max_failures_restarts(max_failures):
    t = tracker(max_failures=max_failures, window_s=60.0)
    decisions = crash_loop(t, max_failures + 1)
    assert [d.action for d in decisions[:-1]] == [Action.RESTART] * max_failures
    fatal = decisions[-1]
    assert fatal.action is Action.FATAL
    want = f"{max_failures + 1} exits in 60 s (max_failures {max_failures}): FATAL"
    assert fatal.reason == f"{CRASH}; {want}"


def test_window_edge_an_exit_exactly_window_s_old_is_forgotten():
    t = tracker(max_failures=5, window_s=60.0)
    crash_loop(t, 5)  # exits at 0..4
    assert t.on_exit(60.0, 0.1, True, CRASH).action is Action.RESTART  # exit at 0 is out
    t = tracker(max_failures=5, window_s=60.0)
    crash_loop(t, 5)
    assert t.on_exit(59.9, 0.1, True, CRASH).action is Action.FATAL


def test_crash_loop_goes_fatal_even_with_start_s_zero():
    # supervisord with startsecs=0 restarts such a loop forever.
    t = tracker(start_s=0.0, max_failures=5)
    decisions = crash_loop(t, 6, ran_s=0.0)
    assert all(d.delay_s == 0.0 for d in decisions[:-1])
    assert decisions[-1].action is Action.FATAL


def test_long_running_agent_crashing_often_still_goes_fatal():
    # Each run is "good" (resets backoff) but six exits in a minute is still a loop.
    decisions = crash_loop(tracker(start_s=1.0), 6, every_s=9.0, ran_s=8.0)
    assert decisions[-1].action is Action.FATAL


def test_slow_crasher_never_goes_fatal():
    t = tracker(max_failures=5, window_s=60.0)
    decisions = crash_loop(t, 200, every_s=12.0)  # at most 5 exits in any 60 s
    assert {d.action for d in decisions} == {Action.RESTART}
    assert t.failures(200 * 12.0) == 4


def test_on_failure_leaves_a_clean_exit_alone():
    t = tracker(mode=RestartMode.ON_FAILURE, max_failures=1)
    for i in range(10):
        d = t.on_exit(float(i), 0.1, False, "exited with status 0")
        assert (d.action, d.attempt) == (Action.EXIT, 0)
    assert t.failures(10.0) == 0  # clean exits do not count toward FATAL
    assert t.on_exit(10.0, 0.1, True, CRASH).action is Action.RESTART


def test_always_restarts_a_clean_exit_too():
    d = tracker(mode=RestartMode.ALWAYS).on_exit(0.0, 0.1, False, "exited with status 0")
    assert d.action is Action.RESTART


def test_never_means_exit_even_on_failure():
    t = tracker(mode=RestartMode.NEVER, max_failures=1)
    assert {d.action for d in crash_loop(t, 5)} == {Action.EXIT}


def test_reset_after_fatal_allows_restarts_again():
    t = tracker(max_failures=2)
    assert crash_loop(t, 3)[-1].action is Action.FATAL
    t.reset()  # operator `start`
    d = t.on_exit(3.0, 0.1, True, CRASH)
    assert (d.action, d.attempt, d.delay_s) == (Action.RESTART, 1, 0.0)
    assert t.failures(3.0) == 1
