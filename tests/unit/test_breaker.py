"""The circuit breaker driven with plain numbers for time, seed defaults unless said:
5 failures in 60 s open it, it stays open 30 s, 3 successful probes close it, 1 probe
at a time."""

from sidecar.config import BreakerSettings
from sidecar.policy.breaker import Breaker, BreakerState

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def breaker(**kw) -> Breaker:
    return Breaker("ObservabilityHub", BreakerSettings(**kw))


def fail(b: Breaker, times, reason: str = "connection refused") -> None:
    for t in times:
        assert b.allow(t)
        b.record(False, t, reason)


def tripped(**kw) -> Breaker:
    """A breaker that opened at t=100."""
    b = breaker(**kw)
    fail(b, [96, 97, 98, 99, 100])
    assert b.state_at(100) is OPEN
    return b


def test_four_failures_stay_closed_the_fifth_within_60s_opens():
    b = breaker()
    fail(b, [0, 10, 20, 30])
    assert b.state_at(30) is CLOSED and b.allow(30) and b.trips == 0
    fail(b, [59.5])
    assert b.state_at(59.5) is OPEN
    assert b.trips == 1
    assert b.tripped_at == 59.5
    assert b.trip_reason == "5 failures in 60 s, last: connection refused"


def test_failures_spread_over_more_than_60s_never_open():
    b = breaker()
    fail(b, [i * 15.0 for i in range(40)])  # 4 in any 60 s window, for 10 minutes
    assert b.state_at(600) is CLOSED
    assert b.trips == 0
    # exactly 60 s between the 1st and the 5th is not "within 60 s"
    b = breaker()
    fail(b, [0, 1, 2, 3, 60])
    assert b.state_at(60) is CLOSED


def test_successes_in_closed_do_not_reset_the_failure_count():
    b = breaker()
    fail(b, [0, 1, 2, 3])
    b.record(True, 4)
    fail(b, [5])
    assert b.state_at(5) is OPEN


def test_open_rejects_and_counts_rejections():
    b = tripped()
    assert [b.allow(t) for t in (100, 110, 129.9)] == [False, False, False]
    assert b.rejections == 3
    assert b.state_at(129.9) is OPEN


def test_after_open_s_half_open_admits_exactly_probes_calls():
    b = tripped(probes=2)
    assert b.state_at(130) is HALF_OPEN
    assert [b.allow(130) for _ in range(4)] == [True, True, False, False]
    assert b.rejections == 2
    assert b.snapshot(130)["probes_in_flight"] == 2
    b.record(True, 131)  # one slot freed, one success so far
    assert b.allow(131)
    assert not b.allow(131)


def test_three_successful_probes_close_it():
    b = tripped()
    for t in (130, 131, 132):
        assert b.state_at(t) is not CLOSED
        assert b.allow(t)
        b.record(True, t)
    assert b.state_at(132) is CLOSED
    # the window was cleared: it takes 5 new failures to trip again
    fail(b, [133, 134, 135, 136])
    assert b.state_at(136) is CLOSED
    assert b.trips == 1


def test_a_failed_probe_reopens_for_a_new_open_period():
    b = tripped()
    assert b.allow(130)
    b.record(True, 130)
    assert b.allow(140)
    b.record(False, 140, "HTTP 503")
    assert b.state_at(140) is OPEN
    assert b.trips == 2
    assert b.tripped_at == 140
    assert b.trip_reason == "probe failed: HTTP 503"
    assert not b.allow(169.9)  # the new period counts from the failed probe
    assert b.state_at(170) is HALF_OPEN
    # the earlier success does not carry over: 3 new ones are needed
    for t in (170, 171):
        assert b.allow(t)
        b.record(True, t)
    assert b.state_at(171) is HALF_OPEN
    assert b.allow(172)
    b.record(True, 172)
    assert b.state_at(172) is CLOSED


def test_release_frees_a_probe_slot_without_a_verdict():
    b = tripped()
    assert b.allow(130)
    assert not b.allow(130)
    b.release()
    assert b.allow(131)
    assert b.state_at(131) is HALF_OPEN
    assert b.snapshot(131)["probes_in_flight"] == 1


def test_release_in_closed_is_a_no_op():
    b = breaker()
    assert b.allow(0)
    b.release()
    assert b.snapshot(0)["probes_in_flight"] == 0


def test_force_open_holds_past_open_s_until_closed_by_hand():
    b = breaker()
    b.force_open(10)
    assert b.trips == 1
    assert b.trip_reason == "opened by operator"
    assert b.state_at(10_000) is OPEN
    assert not b.allow(10_000)
    assert b.rejections == 1
    snap = b.snapshot(10_000)
    assert snap["forced"] == "open" and snap["open_remaining_s"] is None
    b.force_close(10_001)
    assert b.allow(10_001) and b.state_at(10_001) is CLOSED


def test_force_open_of_an_open_breaker_is_not_another_trip():
    b = tripped()
    b.force_open(110, "maintenance")
    assert b.trips == 1
    assert b.trip_reason == "maintenance"
    assert b.state_at(500) is OPEN


def test_force_close_ignores_failures():
    b = tripped()
    b.force_close(101)
    assert b.state_at(101) is CLOSED
    fail(b, range(101, 121))
    assert b.state_at(121) is CLOSED
    assert b.trips == 1
    assert b.snapshot(121)["forced"] == "closed"
    assert b.snapshot(121)["failures_in_window"] == 0


def test_reset_returns_to_automatic_with_a_fresh_episode():
    b = tripped()
    assert not b.allow(101)
    b.force_close(102)
    b.reset(103)
    snap = b.snapshot(103)
    assert (snap["state"], snap["forced"], snap["failures_in_window"]) == ("closed", None, 0)
    assert (snap["tripped_at"], snap["trip_reason"]) == (None, None)
    assert (snap["trips"], snap["rejections"]) == (1, 1)  # totals kept
    fail(b, [104, 105, 106, 107, 108])  # automatic again: failures count
    assert b.state_at(108) is OPEN
    assert b.trips == 2


def test_reset_of_a_forced_open_breaker():
    b = breaker()
    b.force_open(0)
    b.reset(1)
    assert b.allow(1) and b.state_at(1) is CLOSED


def test_snapshot_fields():
    b = tripped()
    assert not b.allow(110)
    assert b.snapshot(110) == {
        "name": "ObservabilityHub",
        "state": "open",
        "forced": None,
        "failures_in_window": 5,
        "trips": 1,
        "rejections": 1,
        "tripped_at": 100,
        "trip_reason": "5 failures in 60 s, last: connection refused",
        "open_remaining_s": 20.0,
        "probes_in_flight": 0,
    }
    half = b.snapshot(130)
    assert (half["state"], half["open_remaining_s"]) == ("half_open", None)
    # failures age out of the window in the snapshot too
    assert b.snapshot(158.5)["failures_in_window"] == 2


def test_state_at_and_snapshot_have_no_side_effects():
    b = tripped()
    b.state_at(200)
    b.snapshot(200)
    assert b.rejections == 0
    assert b._state is OPEN  # only allow() moves it to half-open


def test_a_late_verdict_while_open_changes_nothing():
    b = breaker()
    admitted = [b.allow(t) for t in range(6)]  # six calls in flight
    assert all(admitted)
    fail(b, [10, 11, 12, 13, 14])
    before = b.snapshot(15)
    b.record(False, 15, "reset")  # the sixth call fails after the trip
    b.record(True, 15)
    b.release()
    assert b.snapshot(15) == before
    assert b.trips == 1


def test_a_verdict_from_before_half_open_does_not_use_a_probe_slot():
    b = tripped()
    assert b.allow(130)  # the probe
    b.record(True, 131)  # the probe succeeds
    b.record(True, 131)  # a call admitted before the trip: not a probe
    b.record(True, 131)
    assert b.state_at(131) is HALF_OPEN  # one success, not three
    assert b.allow(132)


def test_a_single_failure_breaker_trips_at_once():
    b = breaker(failures=1)
    fail(b, [0])
    assert b.state_at(0) is OPEN
