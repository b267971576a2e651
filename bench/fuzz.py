"""The L7 fuzzer of tests/integration/test_fuzz.py, run longer: `python bench/fuzz.py`.

Mutated requests (and, from the Faulty origin, mutated answers) through a real sidecar
beside a steady client, on the compiled and the interpreted build in turn; prints one
table and writes bench/results/fuzz.json. What must hold is said in
tests/integration/fuzzing.py: no sidecar crash or internal error, no failure of the
steady client with the default breaker, no bytes at the Steady origin that an agent did
not send as one well-framed request. Exit 1 if any of those is broken.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.integration.fuzzing import run  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1, help="first seed (default 1)")
    ap.add_argument("--cases", type=int, default=20000, help="cases per build")
    ap.add_argument("--seconds", type=float, default=120.0, help="time bound per build")
    ap.add_argument("--builds", default="compiled,interpreted")
    args = ap.parse_args()
    rows = []
    for build in args.builds.split(","):
        print(f"{build}: up to {args.cases} cases or {args.seconds:g} s ...", flush=True)
        with tempfile.TemporaryDirectory(prefix="agentvisor-fuzz-") as tmp:
            report = run(Path(tmp), seed=args.seed, cases=args.cases, seconds=args.seconds,
                         pure=build == "interpreted")
        rows.append(report.summary())
        for what in (report.violations, report.steady_failed, report.internal_errors):
            for line in what[:5]:
                print("  ", line[:200])
    print()
    print(f"{'build':<12}{'cases':>8}{'cases/s':>9}{'steady ok':>11}{'steady failed':>15}"
          f"{'violations':>12}{'internal errors':>17}{'alive':>7}")
    for r in rows:
        print(f"{r['build']:<12}{r['cases']:>8}{r['cases_per_s']:>9}{r['steady_ok']:>11}"
              f"{r['steady_failed']:>15}{r['violations']:>12}{r['internal_errors']:>17}"
              f"{'yes' if r['sidecar_alive'] and r['ready_after'] else 'NO':>7}")
    out = ROOT / "bench" / "results" / "fuzz.json"
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nJSON: {out}")
    clean = all(r["steady_failed"] == r["violations"] == r["internal_errors"] == 0
                and r["sidecar_alive"] and r["ready_after"] for r in rows)
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
