"""Hub choice driven with plain numbers for time: PC2's order (edge, then central), a
failed hub retried after 1 s unless it said otherwise."""

import pytest

from sidecar.policy.hubs import MAX_RETRY_AFTER_S, HubChoice

EDGE, CENTRAL = "pc2:9100", "mainpc:9000"


def pc2(**kw) -> HubChoice:
    return HubChoice([EDGE, CENTRAL], **kw)


def row(choice: HubChoice, hub: str, now: float) -> dict:
    return next(h for h in choice.snapshot(now)["hubs"] if h["hub"] == hub)


def test_the_nearest_hub_is_used_first_and_shown_untried_until_it_answers():
    c = pc2()
    assert c.choose(0) == EDGE
    assert c.probes_due(0) == []
    assert row(c, EDGE, 0)["state"] == "unknown"
    c.succeeded(EDGE, 0.5)
    assert c.choose(1) == EDGE
    assert row(c, EDGE, 1) == {
        "hub": EDGE, "state": "up", "since": 0.5, "last_error": None, "failures": 0,
        "retry_in_s": None, "probing": False}
    assert c.snapshot(1)["partitioned_since"] is None


def test_a_failing_hub_is_left_at_once_for_the_next():
    c = pc2()
    c.succeeded(EDGE, 0)
    c.failed(EDGE, 10, "connection refused")
    assert c.choose(10) == CENTRAL  # no retry, no waiting: the very next batch
    assert c.current == CENTRAL
    assert c.switches == 1
    edge = row(c, EDGE, 10.25)
    assert (edge["state"], edge["since"], edge["last_error"]) == ("down", 10, "connection refused")
    assert edge["retry_in_s"] == pytest.approx(0.75)
    assert c.snapshot(10)["partitioned_since"] is None


def test_a_failed_nearer_hub_is_probed_no_sooner_than_retry_s_and_taken_back_when_it_answers():
    c = pc2()
    c.failed(EDGE, 10, "timed out after 1 s")
    c.succeeded(CENTRAL, 10.1)
    assert c.next_attempt_at() == 11.0  # the caller's timer for the probe
    assert c.probes_due(10.9) == []
    assert c.probes_due(11.0) == [EDGE]
    c.probe_started(EDGE, 11.0)
    assert c.probes_due(11.5) == []  # one probe at a time
    assert c.next_attempt_at() is None
    assert c.choose(11.5) == CENTRAL  # batches keep flowing meanwhile
    c.succeeded(EDGE, 11.2)
    assert c.choose(11.2) == EDGE
    assert c.switches == 2  # away and back
    assert row(c, EDGE, 11.2)["since"] == 11.2
    assert row(c, EDGE, 11.2)["last_error"] == "timed out after 1 s"  # outlives it


def test_a_failed_probe_keeps_the_farther_hub_and_renews_the_wait_not_the_episode():
    c = pc2()
    c.failed(EDGE, 10, "connection refused")
    c.probe_started(EDGE, 11)
    c.failed(EDGE, 11, "connection reset")
    assert c.choose(11) == CENTRAL
    assert c.probes_due(11.5) == [] and c.probes_due(12) == [EDGE]
    edge = row(c, EDGE, 12)
    assert (edge["since"], edge["failures"], edge["last_error"]) == (10, 2, "connection reset")


def test_with_every_hub_failing_the_host_is_partitioned_and_retries_the_nearest_due_first():
    c = pc2()
    c.failed(EDGE, 10, "connection refused")
    c.failed(CENTRAL, 10.4, "connection refused")
    snap = c.snapshot(10.4)
    assert snap["hub"] is None and snap["partitioned_since"] == 10.4
    assert c.choose(10.5) is None
    assert c.probes_due(10.5) == []  # partitioned: the batch itself is the probe
    assert c.next_attempt_at() == 11.0
    assert c.choose(11.0) == EDGE
    c.failed(EDGE, 11.0, "connection refused")
    assert c.choose(11.0) is None and c.next_attempt_at() == 11.4
    assert c.choose(11.4) == CENTRAL
    c.failed(CENTRAL, 11.4, "connection refused")
    assert c.snapshot(11.4)["partitioned_since"] == 10.4  # since the first, not the last


def test_any_hub_answering_ends_the_partition_and_a_return_to_the_same_hub_is_no_move():
    c = pc2()
    c.failed(EDGE, 10, "connection refused")
    c.failed(CENTRAL, 10, "connection refused")
    switches = c.switches
    c.succeeded(CENTRAL, 30)
    assert c.snapshot(30)["partitioned_since"] is None
    assert c.current == CENTRAL and c.switches == switches
    c.probe_started(EDGE, 31)
    c.succeeded(EDGE, 31)
    assert c.current == EDGE and c.switches == switches + 1


def test_retry_after_of_a_full_hub_sets_its_own_retry_time_within_a_bound():
    c = pc2()
    c.failed(EDGE, 10, "503 spool full: 512.0 of 512 MiB", retry_after_s=5)
    assert c.probes_due(14.9) == [] and c.probes_due(15) == [EDGE]
    c.failed(CENTRAL, 10, "503", retry_after_s=3600)
    assert row(c, CENTRAL, 10)["retry_in_s"] == MAX_RETRY_AFTER_S
    assert c.next_attempt_at() == 15


def test_a_hub_being_probed_is_not_chosen_while_partitioned_until_its_result():
    c = pc2()
    c.failed(EDGE, 10, "connection refused")
    c.probe_started(EDGE, 11)  # probed while central was still in use
    c.failed(CENTRAL, 11.5, "timed out after 1 s")
    assert c.choose(12) is None  # the probe of the edge will say
    assert c.next_attempt_at() == 12.5
    c.succeeded(EDGE, 12.2)
    assert c.choose(12.2) == EDGE


def test_a_farther_hub_failing_changes_nothing_for_the_nearest():
    c = HubChoice(["a:1", "b:2", "c:3"])
    c.succeeded("a:1", 0)
    c.failed("b:2", 1, "connection refused")
    assert c.choose(1) == "a:1" and c.probes_due(5) == [] and c.switches == 0
    assert c.next_attempt_at() is None  # nothing nearer to probe
    c.failed("a:1", 2, "connection refused")
    assert c.choose(2) == "c:3"  # b is still down: skipped, not waited for...
    assert c.probes_due(2) == ["b:2"]  # ...but probed beside, its retry being due
    assert c.probes_due(3) == ["a:1", "b:2"]


@pytest.mark.parametrize("hubs, kw, message", [
    ([], {}, "at least one hub"),
    ([EDGE, EDGE], {}, "listed twice"),
    ([EDGE], {"retry_s": 0}, "retry_s must be > 0"),
])
def test_a_list_that_cannot_be_used_is_refused_with_what_is_wrong(hubs, kw, message):
    with pytest.raises(ValueError, match=message):
        HubChoice(hubs, **kw)
