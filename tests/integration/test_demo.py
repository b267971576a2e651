"""`make demo` as a new user runs it: the demo fleet comes up whole (sidecar included)
and stops cleanly. DEMO_SECONDS bounds it."""

import os
import subprocess

from tests.integration.harness import ROOT


def test_the_demo_fleet_comes_up_and_stops_cleanly():
    out = subprocess.run(["config/demo/demo.sh"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "DEMO_SECONDS": "10"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "DemoPC: ok: 5 running" in out.stdout
    assert "Registry  CLOSED" in out.stdout
    assert "supervisor exited with status 0" in out.stdout
