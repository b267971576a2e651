"""The hub's pure decisions: which records of a batch are new, duplicates or after a gap;
what a sample record exports; how delivery reads the legacy hub's answers and backs off."""

from sidecar.hub.delivery import BACKOFF_MAX_S, backoff_s, classify
from sidecar.hub.receiver import Gap, admit
from sidecar.spool import Record


def rec(agent: str, seq: int, host: str = "PC2") -> Record:
    return Record(0, host, agent, seq, 1.0, "POST", "/m", "", b"")


def marks(**by_agent):
    """A mark lookup as the spool's high_water is: PC2's agents' highest seqs."""
    return lambda host, agent: by_agent.get(agent, 0) if host == "PC2" else 0


def seqs(records):
    return [(r.agent, r.seq) for r in records]


def test_first_batch_is_all_new_and_raises_the_marks():
    a = admit([rec("A", 1), rec("B", 1), rec("A", 2)], marks())
    assert seqs(a.new) == [("A", 1), ("B", 1), ("A", 2)]
    assert a.duplicates == [] and a.gaps == []
    assert a.marks == {("PC2", "A"): 2, ("PC2", "B"): 1}


def test_a_resent_batch_is_all_duplicates():
    a = admit([rec("A", 1), rec("B", 1), rec("A", 2)], marks(A=2, B=1))
    assert a.new == [] and a.marks == {}
    assert len(a.duplicates) == 3


def test_a_batch_overlapping_the_marks_keeps_only_the_new_tail():
    a = admit([rec("A", 2), rec("A", 3), rec("A", 4)], marks(A=3))
    assert seqs(a.new) == [("A", 4)] and len(a.duplicates) == 2


def test_repeats_within_a_batch_are_duplicates():
    a = admit([rec("A", 1), rec("A", 1), rec("A", 2)], marks())
    assert seqs(a.new) == [("A", 1), ("A", 2)] and seqs(a.duplicates) == [("A", 1)]


def test_a_gap_is_stored_and_reported():
    a = admit([rec("A", 5), rec("A", 9)], marks(A=4))
    assert seqs(a.new) == [("A", 5), ("A", 9)]
    assert a.gaps == [Gap("PC2", "A", 5, 9)] and a.gaps[0].missing == 3


def test_the_first_record_heard_from_an_agent_is_no_gap():
    # A hub taking over from the other one starts in the middle of a stream.
    a = admit([rec("A", 500)], marks())
    assert seqs(a.new) == [("A", 500)] and a.gaps == []


def test_hosts_are_apart():
    a = admit([rec("A", 1, host="MainPC")], marks(A=10))
    assert seqs(a.new) == [("A", 1)] and a.marks == {("MainPC", "A"): 1}


def test_what_a_legacy_hub_answer_means():
    assert [classify(s) for s in (200, 201, 204)] == ["delivered"] * 3
    assert [classify(s) for s in (500, 502, 503, 408, 429)] == ["retry"] * 5
    assert [classify(s) for s in (400, 404, 405, 413, 422, 301)] == ["refused"] * 6


def test_backoff_doubles_up_to_a_second():
    delays = [backoff_s(n) for n in range(0, 10)]
    assert delays[:4] == [0.0, 0.05, 0.1, 0.2]
    assert max(delays) == BACKOFF_MAX_S == delays[-1]
    assert backoff_s(10_000) == BACKOFF_MAX_S
