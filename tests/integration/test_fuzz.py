"""The sidecar's L7 listeners under a seeded mutation fuzzer, beside a steady client, on
both builds (tests/integration/fuzzing.py says what is sent and what must hold). Bounded
in count and time; `bench/fuzz.py` runs the same fuzzer longer."""

from __future__ import annotations

import pytest

from tests.integration.fuzzing import run

CASES = 1500
SECONDS = 20.0


@pytest.mark.parametrize("pure", [False, True], ids=["compiled", "interpreted"])
def test_fuzzed_agents_beside_a_steady_one_hurt_nobody(tmp_path, pure):
    report = run(tmp_path, seed=20261130, cases=CASES, seconds=SECONDS, pure=pure)
    summary = report.summary()
    assert report.sidecar_exit is None, summary
    assert report.ready_after, summary
    assert report.internal_errors == [], report.internal_errors[:5]
    assert report.violations == [], report.violations[:5]
    assert report.steady_failed == [], report.steady_failed[:5]
    assert report.steady_ok > 50, summary
    assert report.cases >= min(CASES, 300), summary
