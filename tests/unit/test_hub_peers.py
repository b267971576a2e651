"""What one hub makes of another's report (sidecar/hub/peers.py): pure, plain numbers
for time."""

from __future__ import annotations

import json

from sidecar.hub.peers import Peers, parse_report, report_body
from sidecar.hub.receiver import AgentView, HostView

NOW = 1_000_000.0


def body(**fields) -> bytes:
    doc = {"name": "edge", "time": 5_000.0, "hosts": {}, "marks": [], "samples": [],
           "legacy_hub": "up", "backlog_records": 0}
    doc.update(fields)
    return json.dumps(doc).encode()


def peers(clock=lambda: NOW) -> Peers:
    return Peers([("pc2", 9190)], name="central", report=lambda now: b"", clock=clock)


def test_a_report_reads_back_as_sent_with_times_on_our_clock():
    hosts = {"PC2": HostView({"A": AgentView(last_seq=7, last_heard=4_998.0,
                                             last_record_time=4_990.0)}, 4_998.0)}
    data = report_body("edge", 5_000.0, hosts, {("PC2", "A"): 7, ("PC2", "B"): 3},
                       {("PC2", "A"): (4_995.0, {"up": 1.0})}, "up", 12)
    # The peer's clock is 995,000 s behind ours: its times are placed by their age.
    report = parse_report(data, received_at=NOW)
    assert report.name == "edge" and report.backlog_records == 12
    assert report.hosts["PC2"].last_heard == NOW - 2.0
    assert report.hosts["PC2"].agents["A"].mark == 7
    assert report.hosts["PC2"].agents["A"].last_heard == NOW - 2.0
    assert report.marks == {("PC2", "A"): 7, ("PC2", "B"): 3}
    # Sample times are the sending host's own, carried as they are.
    assert report.samples == {("PC2", "A"): (4_995.0, {"up": 1.0})}


def test_a_careless_or_hostile_report_loses_only_its_bad_parts():
    assert "not JSON" in parse_report(b"{", received_at=NOW)
    assert "not a JSON object" in parse_report(b"[]", received_at=NOW)
    assert "name" in parse_report(body(name=""), received_at=NOW)
    assert "name" in parse_report(body(time="soon"), received_at=NOW)
    report = parse_report(body(
        hosts={"PC2": {"agents": {"A": {"mark": -4}, "B": "x"}}, "": {}, "X": 3},
        marks=[["PC2", "A", 9], ["PC2", "B", "9"], ["PC2", "C", 0], "junk", ["a", "b"]],
        samples=[["PC2", "A", 1.0, {"up": "yes"}], ["PC2", "B", 2.0, {"up": 1}],
                 ["PC2", "C", None, {}]],
        legacy_hub="exploded", backlog_records=-1), received_at=NOW)
    assert list(report.hosts) == ["PC2"] and list(report.hosts["PC2"].agents) == ["A"]
    assert report.hosts["PC2"].agents["A"].mark == 0
    assert report.marks == {("PC2", "A"): 9}
    assert report.samples == {("PC2", "B"): (2.0, {"up": 1.0})}
    assert (report.legacy_hub, report.backlog_records) == ("unknown", 0)


def test_marks_only_rise_and_a_report_under_our_own_name_is_refused():
    p = peers()
    assert p.take(body(marks=[["PC2", "A", 9]]), "10.0.0.2")[0] == 200
    assert p.take(body(marks=[["PC2", "A", 4], ["PC2", "B", 2]]), "10.0.0.2")[0] == 200
    assert (p.mark("PC2", "A"), p.mark("PC2", "B"), p.mark("PC2", "Z")) == (9, 2, 0)
    status, answer = p.take(body(name="central"), "10.0.0.9")
    assert status == 400 and "own name" in answer["error"] and p.refused == 1


def test_either_hub_shows_the_fleet_and_a_host_is_partitioned_only_when_no_hub_hears_it():
    clock = [NOW]
    p = peers(lambda: clock[0])
    p.take(body(time=5_000.0, hosts={
        "PC2": {"last_heard": 4_999.0, "agents": {"A": {"mark": 7}}},
        "MainPC": {"last_heard": 4_000.0, "agents": {}}}), "pc2")
    own = {"MainPC": {"last_heard": NOW - 1.0, "agents": {"M": {"last_seq": 3}}},
           "Lab": {"last_heard": NOW - 60.0, "agents": {}}}
    merged = p.merge_hosts(own, silent_after_s=10.0)
    assert set(merged) == {"MainPC", "PC2", "Lab"}
    assert merged["PC2"]["heard_by"] == {"edge": NOW - 1.0}
    assert merged["PC2"]["agents"]["A"] == {"last_seq": 7, "last_heard": None,
                                            "last_record_time": None, "via": "edge"}
    assert merged["PC2"]["state"] == "live" and not merged["PC2"]["partitioned"]
    # MainPC: the peer last heard it long ago, but this hub did just now.
    assert merged["MainPC"]["heard_by"] == {"central": NOW - 1.0, "edge": NOW - 1_000.0}
    assert merged["MainPC"]["partitioned"] is False
    assert merged["Lab"]["partitioned"] is True
    # Time passes and nobody hears PC2 again: partitioned, as either hub now says.
    clock[0] += 30
    assert p.merge_hosts({}, silent_after_s=10.0)["PC2"]["partitioned"] is True
    assert p.status()["heard"]["edge"]["state"] == "silent"
