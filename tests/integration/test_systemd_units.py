"""The unit files in systemd/ pass `systemd-analyze verify`, as the installed units would.

verify checks that every Exec*= binary exists, so each unit is copied to a temporary
directory with /opt/agentvisor/.venv/bin/agentvisor replaced by this venv's console
script (or a stand-in script when the package is not installed), and nats-server, named
bare as systemd finds it, by a stand-in when it is not installed. It runs offline: no
systemd as PID 1 is needed (test_systemd_pid1 and test_deploy run the units under one).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS_DIR = Path(__file__).resolve().parents[2] / "systemd"
INSTALLED_AGENTVISOR = "/opt/agentvisor/.venv/bin/agentvisor"
NATS_EXEC = "ExecStart=nats-server "  # a bare name, found by systemd's search path
ANALYZE = shutil.which("systemd-analyze")

pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def stand_in(tmp_path: Path, name: str) -> str:
    path = tmp_path / "bin" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return str(path)


@functools.cache
def _analyze_flags() -> list[str]:
    # --man=no: Documentation= would be looked up with man(1). --generators=no: no
    # generators, which want root and a booted system. --recursive-errors=no (systemd
    # >= 250): a broken unit elsewhere on the build host is not ours to fail on.
    flags = ["--man=no", "--generators=no"]
    if ANALYZE and "--recursive-errors" in subprocess.run(
            [ANALYZE, "verify", "--help"], capture_output=True, text=True).stdout:
        flags.append("--recursive-errors=no")
    return flags


def complaints(tmp_path: Path, text: str, as_name: str) -> list[str]:
    """Write `text` as unit `as_name` with real binaries in place of the installed
    paths, verify it, and return every line of output about it (empty: clean)."""
    agentvisor = Path(sys.executable).parent / "agentvisor"
    if not agentvisor.exists():  # the package is not installed into this venv
        agentvisor = Path(stand_in(tmp_path, "agentvisor"))
    text = text.replace(INSTALLED_AGENTVISOR, str(agentvisor))
    if shutil.which("nats-server") is None:  # not installed: a stand-in, by its path
        text = text.replace(NATS_EXEC, f"ExecStart={stand_in(tmp_path, 'nats-server')} ")
    units = tmp_path / "units"
    units.mkdir(parents=True, exist_ok=True)
    unit = units / as_name
    unit.write_text(text)

    done = subprocess.run([ANALYZE, "verify", *_analyze_flags(), str(unit)],
                          capture_output=True, text=True, timeout=60,
                          env=os.environ | {"SYSTEMD_COLORS": "0"})
    output = done.stdout + done.stderr
    print(f"systemd-analyze verify {as_name}: exit {done.returncode}\n{output}")
    # Lines name the unit ("agentvisor@mainpc.service: Command ... is not executable")
    # or its file ("/tmp/.../agentvisor@mainpc.service:12: Unknown key ...").
    ours = [line for line in output.splitlines() if as_name in line]
    if done.returncode != 0 and not ours:
        ours = [f"exit {done.returncode}", *output.splitlines()]
    return ours


def test_supervisor_unit_verifies_as_an_instance(tmp_path: Path):
    # Verified as an instance, so %i expands as for `systemctl enable agentvisor@mainpc`.
    text = (UNITS_DIR / "agentvisor@.service").read_text()
    assert complaints(tmp_path, text, "agentvisor@mainpc.service") == []


def test_nats_unit_verifies(tmp_path: Path):
    text = (UNITS_DIR / "agentvisor-nats.service").read_text()
    assert complaints(tmp_path, text, "agentvisor-nats.service") == []


def test_the_check_catches_a_misspelt_key_and_a_missing_binary(tmp_path: Path):
    # Guards the guard: if systemd-analyze stopped reporting these (or the filter above
    # stopped seeing them), the two tests above would pass on anything.
    base = (UNITS_DIR / "agentvisor@.service").read_text()
    misspelt = complaints(tmp_path / "a", base.replace("Delegate=yes", "Delegat=yes"),
                          "agentvisor@mainpc.service")
    assert any("Delegat" in line for line in misspelt), misspelt
    missing = complaints(tmp_path / "b",
                         base.replace(INSTALLED_AGENTVISOR, "/nonexistent/agentvisor"),
                         "agentvisor@mainpc.service")
    assert any("/nonexistent/agentvisor" in line for line in missing), missing
