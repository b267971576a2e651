"""The sample format between a host's supervisor, its data process and the hubs
(sidecar/samples.py): what a status row becomes, and what a round may carry."""

from __future__ import annotations

import json

from sidecar import samples

T = 1_732_990_000.0


def test_a_status_row_becomes_the_exporters_numbers():
    row = {"name": "ModelManager", "state": "RUNNING", "restarts": 2, "healthy": True,
           "cpu_percent": 12.5, "rss_mb": 50.0, "threads": 4, "fds": 17,
           "uptime_s": 61.0, "last_exit": "exit 1"}
    assert samples.from_row(row) == {
        "up": 1.0, "restarts_total": 2.0, "healthy": 1.0, "cpu_percent": 12.5,
        "resident_memory_bytes": 50.0 * 1024 * 1024, "threads": 4.0, "open_fds": 17.0,
        "uptime_seconds": 61.0}


def test_a_stopped_agent_has_only_what_is_known():
    # No process: no CPU, RSS or threads; never probed: no health. Not zeros, which
    # would read as a healthy idle process.
    row = {"name": "A", "state": "FATAL", "restarts": 5, "healthy": None,
           "cpu_percent": None, "rss_mb": float("nan"), "threads": True}
    assert samples.from_row(row) == {"up": 0.0, "restarts_total": 5.0}


def test_a_round_reads_back_as_it_was_sent():
    agents = {"A": {"up": 1.0, "cpu_percent": 3.5}, "B b": {}}
    assert samples.parse_round(samples.round_body(T, agents)) == (T, agents)


def test_a_bad_round_says_what_is_wrong():
    def problem(doc) -> str:
        result = samples.parse_round(json.dumps(doc).encode()
                                     if not isinstance(doc, bytes) else doc)
        assert isinstance(result, str), result
        return result

    assert "not JSON" in problem(b"{")
    assert "not a JSON object" in problem([1])
    assert "unix seconds" in problem({"time": "now", "agents": {}})
    assert "unix seconds" in problem({"time": -1, "agents": {}})
    assert "object of agent name" in problem({"time": T, "agents": []})
    assert "not a metric name" in problem({"time": T, "agents": {"A": {"cpu-%": 1}}})
    assert "finite number" in problem({"time": T, "agents": {"A": {"cpu": "high"}}})
    assert "finite number" in problem(b'{"time": 1, "agents": {"A": {"cpu": NaN}}}')
    assert "A: not an object" in problem({"time": T, "agents": {"A": 3}})
    assert "printable ASCII" in problem({"time": T, "agents": {"A\r\nX-Evil: 1": {}}})
    assert "at most" in problem({"time": T, "agents": {
        f"a{i}": {} for i in range(samples.MAX_AGENTS + 1)}})
    assert "at most" in problem(b" " * (samples.MAX_ROUND_BYTES + 1))
    assert "nested" in problem(b"[" * 100_000) or "not JSON" in problem(b"[" * 100_000)
