"""bench/hot_path.py's arithmetic, with plain numbers: what the README's table says is
computed here, so a slip would misreport a goal as met or missed."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import hot_path  # noqa: E402  (stdlib, psutil and yaml at import; matplotlib only to plot)


def _round(n: int, target: str, conns: int, p50: float, p99: float, rps: float = 50_000,
           cpu: float = 17.0) -> dict:
    return {"round": n, "target": target, "conns": conns, "p50_us": p50, "p99_us": p99,
            "rps": rps, "cpu_us_per_request": cpu, "process_cores": 0.9, "wrk_cores": 0.5,
            "socket_errors": 0, "non_2xx": 0}


def test_added_latency_is_the_median_of_paired_differences_to_direct():
    # Round 2's direct run was slow: pairing keeps that round's noise out of the
    # difference, where a difference of medians would not.
    runs = [
        _round(1, "direct", 16, 100, 200), _round(1, "haproxy-http", 16, 250, 500),
        _round(2, "direct", 16, 150, 400), _round(2, "haproxy-http", 16, 300, 700),
        _round(3, "direct", 16, 100, 200), _round(3, "haproxy-http", 16, 260, 520),
    ]
    runs += [_round(r["round"], r["target"], 1, 1, 1) for r in runs]
    medians = hot_path.summarize(runs, ["direct", "haproxy-http"])
    sixteen = medians["haproxy-http"]["16"]
    assert sixteen["added_p50_us"] == 150  # median of 150, 150, 160
    assert sixteen["added_p99_us"] == 300  # median of 300, 300, 320
    assert sixteen["p99_us"] == 520


def _medians(sidecar_p99: float, floor_p99: float, peer_p99: float) -> dict:
    def cell(added_p99: float, rps: float, cpu: float) -> dict:
        return {"added_p50_us": 100.0, "added_p99_us": added_p99, "rps": rps,
                "cpu_us_per_request": cpu}
    return {
        "sidecar-L7": {"1": cell(50, 9_000, 40), "16": cell(sidecar_p99, 54_000, 17.3)},
        "haproxy-http": {"1": cell(50, 9_000, 40), "16": cell(peer_p99, 54_000, 16.6)},
        "floor-L7": {"1": cell(50, 9_000, 40), "16": cell(floor_p99, 55_000, 15.5)},
    }


def test_the_p99_goal_is_judged_against_the_peer_in_the_same_run():
    met = {c.measure: c.met for c in hot_path.compare(_medians(420, 400, 355))
           if c.layer == "L7"}
    assert met["added p99 @16 conn"] is True  # 420 <= 1.2 x 355 = 426
    missed = {c.measure: c.met for c in hot_path.compare(_medians(430, 400, 355))
              if c.layer == "L7"}
    assert missed["added p99 @16 conn"] is False
    assert missed["throughput @16 conn"] is True and missed["CPU per request"] is True


def test_the_floor_line_puts_the_sidecars_latency_ratio_beside_the_stacks():
    lines = hot_path.floor_lines(_medians(469, 452, 355))
    assert lines[-1] == ("floor-L7's added latency @16 conn over haproxy-http's: "
                         "p50 1.00x (sidecar 1.00x), p99 1.27x (sidecar 1.32x).")
    assert "+1.8 us CPU per request" in lines[1]
