"""`make deploy HOST=...` on a PC, as the README tells an operator to run it: inside a
machine booted by its own systemd (tests/integration/machines.py), whose /etc is the
host's with writes kept apart, and whose /etc/systemd/system starts empty.

First deploy: the unit is installed pointing at this clone, the config copied to
/etc/agentvisor, validated, the unit enabled and started, status shown. Deploy again
after editing the config on the PC: the edit is kept, the unit reloaded, the agents
already running untouched. An invalid edit: deploy stops at validation, exit 1, and the
fleet runs on. Undeploy: stopped, disabled, unit file gone, config kept for the next
deploy. And where systemd does not run the machine, deploy says so and changes nothing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.integration.harness import free_port
from tests.integration.machines import AGENTVISOR, ROOT, Machine, booted, skip_reason

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")

HOST = "shop"
UNIT = f"agentvisor@{HOST}.service"
ETC_CONFIG = f"/etc/agentvisor/{HOST}.yaml"

IDLE = "import socket, os\nsrv = socket.create_server(('127.0.0.1', int(os.environ['PORT'])))\n" \
       "while True:\n    srv.accept()[0].close()\n"


def _config(folder: Path, agents: dict[str, int]) -> str:
    return yaml.safe_dump({
        "host": "Shop", "project_root": str(folder), "python": sys.executable,
        "pc2_services": [{"name": name, "script_path": "idle.py", "port": port,
                          "required": True, "env_vars": {"PORT": str(port)}}
                         for name, port in agents.items()],
    }, sort_keys=False)


@pytest.fixture
def machine(tmp_path):
    m = booted(tmp_path / "machine")
    yield m
    m.shutdown()  # every process of the machine ends with its PID 1


def _deploy(machine: Machine, *extra: str) -> subprocess.CompletedProcess:
    return machine.run("make", "-s", "-C", str(ROOT), "deploy", f"HOST={HOST}", *extra,
                       check=False)


def _agents(machine: Machine) -> dict[str, dict]:
    out = machine.run(AGENTVISOR, "status", "--json", check=False).stdout
    return {a["name"]: a for a in json.loads(out)["agents"]}


def test_deploy_installs_starts_and_redeploys_without_touching_the_agents(machine, tmp_path):
    (tmp_path / "idle.py").write_text(IDLE)
    ports = {"Register": free_port(), "Ledger": free_port()}
    shipped = tmp_path / "shop.yaml"
    shipped.write_text(_config(tmp_path, {"Register": ports["Register"]}))

    first = _deploy(machine, f"CONFIG={shipped}")
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"installed from {shipped}" in first.stdout
    assert f"enable and start {UNIT}" in first.stdout
    assert "Register" in first.stdout.split("==> status")[-1]  # the status table
    assert machine.run("systemctl", "is-enabled", UNIT).stdout.strip() == "enabled"
    assert machine.run("systemctl", "is-active", UNIT).stdout.strip() == "active"
    unit = machine.run("cat", "/etc/systemd/system/agentvisor@.service").stdout
    assert f"ExecStart={ROOT}/.venv/bin/agentvisor run --config /etc/agentvisor/%i.yaml" \
        in unit and "/opt/agentvisor" not in unit
    register = _agents(machine)["Register"]
    assert register["state"] == "RUNNING"

    # The operator adds an agent to the deployed config, then deploys again.
    machine.run("sh", "-c", f"cat > {ETC_CONFIG}",
                input=_config(tmp_path, ports))
    again = _deploy(machine, f"CONFIG={shipped}")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "kept as it is" in again.stdout  # the PC's edit, not the repository's file
    assert f"reload {UNIT}" in again.stdout
    agents = _agents(machine)
    assert agents["Ledger"]["state"] == "RUNNING", agents
    assert agents["Register"]["pid"] == register["pid"]  # untouched by the reload

    # An invalid edit: deploy stops at validation and the fleet runs on as it was.
    machine.run("sh", "-c", f"sed -i 's/port: {ports['Ledger']}/port: 80000/' {ETC_CONFIG}")
    broken = _deploy(machine)
    assert broken.returncode != 0
    assert "80000" in broken.stdout + broken.stderr
    assert "==> unit" not in broken.stdout  # nothing after validation ran
    assert machine.run("systemctl", "is-active", UNIT).stdout.strip() == "active"
    assert {n: a["pid"] for n, a in _agents(machine).items()} == \
        {n: a["pid"] for n, a in agents.items()}

    # The way back: undeploy stops and disables the fleet and removes the unit file; the
    # PC's config stays, so deploying again brings the fleet back as it was.
    machine.run("sh", "-c", f"sed -i 's/port: 80000/port: {ports['Ledger']}/' {ETC_CONFIG}")
    gone = machine.run("make", "-s", "-C", str(ROOT), "undeploy", f"HOST={HOST}",
                       check=False)
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert machine.run("systemctl", "is-enabled", UNIT, check=False).returncode != 0
    assert machine.run("systemctl", "is-active", UNIT, check=False).stdout.strip() \
        == "inactive"
    assert machine.run("test", "-e", "/etc/systemd/system/agentvisor@.service",
                       check=False).returncode != 0
    assert machine.run("test", "-e", ETC_CONFIG, check=False).returncode == 0
    back = _deploy(machine)
    assert back.returncode == 0, back.stdout + back.stderr
    assert "kept as it is" in back.stdout and f"enable and start {UNIT}" in back.stdout
    assert {n: a["state"] for n, a in _agents(machine).items()} == \
        {"Register": "RUNNING", "Ledger": "RUNNING"}


def test_deploy_without_a_host_is_a_usage_error():
    done = subprocess.run(["make", "-s", "-C", str(ROOT), "deploy"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0
    assert "usage: make deploy HOST=NAME" in done.stderr


def test_deploy_where_systemd_does_not_run_the_machine_says_so_and_touches_nothing():
    # This host (the skip condition guarantees it): no systemd as PID 1.
    done = subprocess.run(["make", "-s", "-C", str(ROOT), "deploy", "HOST=nowhere"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "systemd does not run this machine (PID 1)" in done.stderr
    assert not Path("/etc/agentvisor/nowhere.yaml").exists()


@pytest.mark.skipif(shutil.which("nats-server") is None and
                    not Path("/usr/sbin/nats-server").exists(),
                    reason="nats-server is not installed (Debian package: nats-server)")
def test_deploy_with_nats_runs_the_pcs_nats_server_as_a_dynamic_user(machine, tmp_path):
    # PC2's deploy with NATS=1: config/nats-pc2.conf (port 4223, JetStream) and the
    # shipped agentvisor-nats.service, as they are, under the machine's systemd.
    (tmp_path / "idle.py").write_text(IDLE)
    config = tmp_path / "pc2.yaml"
    config.write_text(_config(tmp_path, {"Register": free_port()}))
    done = machine.run("make", "-s", "-C", str(ROOT), "deploy", "HOST=pc2",
                       f"CONFIG={config}", "NATS=1", check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "listening on port 4223" in done.stdout
    nats = machine.show("agentvisor-nats.service", "ActiveState", "MainPID")
    assert nats["ActiveState"] == "active", nats
    # A throwaway uid, not root; JetStream on, its store in the StateDirectory.
    owner = machine.run("ps", "-o", "user=", "-p", nats["MainPID"]).stdout.strip()
    assert owner not in ("root", "0", ""), owner
    info = machine.run(sys.executable, "-c", (
        "import socket; s = socket.create_connection(('127.0.0.1', 4223), timeout=5);"
        "print(s.recv(4096).decode())")).stdout
    assert info.startswith("INFO ") and '"jetstream":true' in info, info
    machine.run("test", "-d", "/var/lib/private/agentvisor-nats/jetstream")
    # Deploy again: the running server is reloaded (SIGHUP), not restarted.
    again = machine.run("make", "-s", "-C", str(ROOT), "deploy", "HOST=pc2",
                        "NATS=1", check=False)
    assert again.returncode == 0, again.stdout + again.stderr
    assert machine.show("agentvisor-nats.service", "MainPID")["MainPID"] == nats["MainPID"]
