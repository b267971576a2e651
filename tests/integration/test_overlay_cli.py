"""`--overlay` as an operator uses it: the legacy file stays where it is and as it is,
agentvisor's own settings go in a file beside it, `validate` says which project root it
used, and a running supervisor re-reads the same overlays on reload."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from textwrap import dedent

from tests.integration.harness import ROOT, Fleet, wait_until

SLEEPER = """\
import os, time
print("up", os.environ.get("AGENT_NAME"), flush=True)
while True:
    time.sleep(1000)
"""

PC2 = """\
# PC2's file as the old launcher reads it: untouched by agentvisor.
pc2_services:
  - name: MemoryOrchestratorService
    script_path: pc2_code/agents/memory_orchestrator_service.py
    required: true
    dependencies: []
  - name: ResourceManager
    script_path: agents/resource_manager.py
    dependencies: [MemoryOrchestratorService]
"""


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def layout(root: Path, overlay: str) -> tuple[Path, Path]:
    """<root>/pc2_code/config/startup_config.yaml and agentvisor.yaml beside it; the
    second agent's script is where only the old launcher's fallback finds it."""
    for script in ("pc2_code/agents/memory_orchestrator_service.py",
                   "main_pc_code/agents/resource_manager.py"):
        (root / script).parent.mkdir(parents=True, exist_ok=True)
        (root / script).write_text(SLEEPER)
    config = root / "pc2_code/config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "startup_config.yaml").write_text(PC2)
    (config / "agentvisor.yaml").write_text(dedent(overlay))
    return config / "startup_config.yaml", config / "agentvisor.yaml"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_validate_with_an_overlay_exits_0_and_says_the_root_it_used(tmp_path):
    legacy, overlay = layout(tmp_path, """\
        host: pc2
        agents:
          ResourceManager: {restart: on-failure}
        """)
    before = digest(legacy)
    out = run_cli("validate", "--offline", str(legacy), "--overlay", str(overlay))
    assert out.returncode == 0, out.stdout + out.stderr
    assert (f"project root: {tmp_path} (inferred: the file is in pc2_code/config/)"
            in out.stderr), out.stderr
    report = json.loads(run_cli("validate", "--offline", "--json", str(legacy),
                                "--overlay", str(overlay)).stdout)
    assert report[0]["project_root"] == str(tmp_path)
    assert report[0]["overlays"] == [str(overlay)]
    assert digest(legacy) == before


def test_validate_with_a_broken_overlay_exits_1_naming_the_overlays_line(tmp_path):
    legacy, overlay = layout(tmp_path, """\
        host: pc2
        agents:
          ResourceManager:
            restart: sometimes
          ResourceManagr: {restart: never}
        """)
    out = run_cli("validate", "--offline", str(legacy), "--overlay", str(overlay))
    assert out.returncode == 1
    assert f"{overlay}:4: pc2_services[1].restart (ResourceManager):" in out.stdout, out.stdout
    assert f"{overlay}:5: agents.ResourceManagr:" in out.stdout
    assert "did you mean 'ResourceManager'?" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr
    # An overlay that is not there is a file that cannot be read: exit 2, naming it.
    missing = run_cli("validate", "--offline", str(legacy), "--overlay", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and f"{tmp_path / 'nope.yaml'}: cannot read" in missing.stderr


def test_run_with_an_overlay_and_reload_reads_it_again(fleet: Fleet, tmp_path):
    legacy, overlay = layout(tmp_path / "ai", f"""\
        host: PC2-test
        runtime_dir: {fleet.runtime_dir}
        logs: {{dir: {fleet.logs_dir}}}
        python: {sys.executable}
        global_settings:
          restart: {{start_s: 0.1}}
        agents:
          ResourceManager:
            env_vars: {{MODE: old}}
        """)
    before = digest(legacy)
    fleet.stderr_path = tmp_path / "supervisor.log"
    log = open(fleet.stderr_path, "ab")
    fleet._stderr = log
    fleet.proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor.cli", "run", "--config", str(legacy),
         "--overlay", str(overlay), "--log-level", "debug"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    wait_until(lambda: fleet._answers() or fleet.proc.poll() is not None, 15,
               "the control socket to answer")
    assert fleet.proc.poll() is None, fleet.supervisor_log()
    assert fleet.status()["host"] == "PC2-test"  # from the overlay
    fleet.wait_state("ResourceManager", "RUNNING")
    old = fleet.agent("ResourceManager")["pid"]
    assert b"MODE=old" in Path(f"/proc/{old}/environ").read_bytes()

    overlay.write_text(overlay.read_text().replace("MODE: old", "MODE: new"))
    out = fleet.cli("reload")
    assert out.returncode == 0, out.stderr
    assert "changed: ResourceManager" in out.stdout
    new = wait_until(lambda: (lambda a: a["state"] == "RUNNING" and a["pid"] != old and a["pid"])(
        fleet.agent("ResourceManager")), 15, "ResourceManager to run again")
    assert b"MODE=new" in Path(f"/proc/{new}/environ").read_bytes()
    assert fleet.stop() == 0
    assert digest(legacy) == before
