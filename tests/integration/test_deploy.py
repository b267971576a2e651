"""`make deploy HOST=...` on a PC, as the README tells an operator to run it: inside a
machine booted by its own systemd (tests/integration/machines.py), whose /etc is the
host's with writes kept apart, and whose /etc/systemd/system starts empty.

First deploy: the unit is installed pointing at this clone, the config copied to
/etc/agentvisor, validated, the unit enabled and started, status shown. Deploy again
after editing the config on the PC: the edit is kept, the unit reloaded, the agents
already running untouched. An invalid edit: deploy stops at validation, exit 1, and the
fleet runs on. Undeploy: stopped, disabled, unit file gone, config kept for the next
deploy. Then the PC adopts its legacy file: deploy restarts the supervisor on it (a
reload would only read shop.yaml again). And where systemd does not run the machine,
deploy says so and changes nothing.

The PC's own legacy file (`LEGACY=`), where it is, with an overlay beside it: both stay
byte for byte as they were; deploy writes /etc/agentvisor/HOST.env naming them, with
PYTHONPATH= and the variables the file reads, and validates with the environment the
unit will have. The unit runs `--config LEGACY --overlay OVERLAY`; an overlay edit is
reloaded into the agent, a typo in it stops at its line, a new variable in HOST.env
restarts the supervisor (a reload could not give it one), and a kept HOST.env naming
other files is not overruled.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.integration.harness import free_port, wait_until
from tests.integration.machines import AGENTVISOR, ROOT, Machine, booted, skip_reason

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")

HOST = "shop"
UNIT = f"agentvisor@{HOST}.service"
ETC_CONFIG = f"/etc/agentvisor/{HOST}.yaml"
ETC_ENV = f"/etc/agentvisor/{HOST}.env"  # the unit's EnvironmentFile=
OFFSET = 1000  # the overlay's port_offset: what "${PORT_OFFSET}+N" adds, unset in the unit

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


def _supervisor_args(machine: Machine) -> list[str]:
    """The running supervisor's arguments after `run`, as systemd expanded ExecStart."""
    pid = int(machine.show(UNIT, "MainPID")["MainPID"])
    argv = machine.cmdline(pid).split("\0")[:-1]
    return argv[argv.index("run") + 1:]


# A stand-in for the fleet's agents: its port from what the old launcher exported, a
# baked-in default otherwise; no health server, whatever its YAML entry says.
REGISTER = """\
import os, socket
srv = socket.create_server(("127.0.0.1", int(os.environ.get("AGENT_PORT", "7100"))))
while True:
    srv.accept()[0].close()
"""


def _legacy_layout(root: Path, port: int, health_port: int) -> tuple[Path, Path]:
    """(legacy file, overlay path) of a PC's repository as the users have it: the file in
    <root>/main_pc_code/config/, written as theirs are, and its agent's script beside."""
    (root / "main_pc_code" / "agents").mkdir(parents=True)
    (root / "main_pc_code" / "agents" / "register.py").write_text(REGISTER)
    config = root / "main_pc_code" / "config"
    config.mkdir()
    (config / "startup_config.yaml").write_text(f"""\
# MainPC's startup_config.yaml, as start_system_v2.py reads it.
error_bus_port: 7150    # the old launcher's: agentvisor warns, keeps it, ignores it
global_settings:
  environment:
    PYTHONPATH: '${{PYTHONPATH}}:${{PWD}}/..'
agent_groups:
  core_services:
    Register:
      script_path: main_pc_code/agents/register.py
      port: "${{PORT_OFFSET}}+{port - OFFSET}"
      health_check_port: {health_port}    # nobody opens it: ready by its main port
      required: true
      dependencies: []
      env_vars: {{LEDGER_DIR: '${{LEDGER_DIR}}/register'}}    # the environment's
""")
    return config / "startup_config.yaml", config / "agentvisor.yaml"


def _overlay(mode: str, more_env: str = "") -> str:
    """agentvisor's settings for the PC, laid over the legacy file (`agents:` last)."""
    return (f"host: Shop\npython: {sys.executable}\nport_offset: {OFFSET}\n"
            f"agents:\n  Register:\n    env_vars: {{SHOP_MODE: {mode}{more_env}}}\n")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
    assert f"ExecStart={ROOT}/.venv/bin/agentvisor run --config ${{AGENTVISOR_CONFIG}} " \
        "$AGENTVISOR_OVERLAYS" in unit and "/opt/agentvisor" not in unit
    # Without /etc/agentvisor/shop.env: the default config, and no overlay argument at all
    # (an unset $AGENTVISOR_OVERLAYS is none, not an empty one).
    assert _supervisor_args(machine) == ["--config", ETC_CONFIG]
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

    # The PC adopts its legacy file. The running supervisor was started on shop.yaml,
    # which a reload would only read again: deploy restarts it on the legacy file.
    legacy, overlay = _legacy_layout(tmp_path / "ai_system", free_port(), free_port())
    overlay.write_text(_overlay("adopted"))
    assert _deploy(machine, f"LEGACY={legacy}").returncode != 0  # LEDGER_DIR is unset
    machine.run("sed", "-i", "s|^#LEDGER_DIR=$|LEDGER_DIR=/srv/ledger|", ETC_ENV)
    adopted = _deploy(machine, f"LEGACY={legacy}")
    assert adopted.returncode == 0, adopted.stdout + adopted.stderr
    assert f"restart {UNIT}" in adopted.stdout
    assert f"it runs '--config {ETC_CONFIG}'" in adopted.stdout
    assert _supervisor_args(machine) == ["--config", str(legacy), "--overlay", str(overlay)]
    assert {n: a["state"] for n, a in _agents(machine).items()} == {"Register": "RUNNING"}


def test_deploy_runs_the_legacy_file_where_it_is_with_its_overlay(machine, tmp_path):
    port = free_port()
    legacy, overlay = _legacy_layout(tmp_path / "ai_system", port, free_port())
    legacy_sha = _sha256(legacy)

    # No overlay beside it yet: deploy says where it looked and writes nothing.
    alone = _deploy(machine, f"LEGACY={legacy}")
    assert alone.returncode != 0, alone.stdout + alone.stderr
    assert f"no overlay at {overlay}" in alone.stderr
    assert machine.run("test", "-e", ETC_ENV, check=False).returncode != 0

    overlay.write_text(_overlay("first"))
    overlay_sha = _sha256(overlay)
    # The unit's environment file names both files where they are; the legacy file's
    # ${PYTHONPATH} reads it from there, empty as under a shell without one, and the
    # variable systemd cannot know is listed there for the operator to set. Validation,
    # with the environment the unit will have, stops the deploy until it is.
    unset = _deploy(machine, f"LEGACY={legacy}")
    assert unset.returncode != 0, unset.stdout + unset.stderr
    assert "'LEDGER_DIR' is neither in the secret store" in unset.stdout, unset.stdout
    assert f"goes in {ETC_ENV}" in unset.stderr
    assert machine.run("systemctl", "is-active", UNIT, check=False).stdout.strip() != "active"
    env = machine.run("cat", ETC_ENV).stdout
    assert f"\nAGENTVISOR_CONFIG={legacy}\n" in env, env
    assert f"\nAGENTVISOR_OVERLAYS=--overlay {overlay}\n" in env, env
    assert "\nPYTHONPATH=\n" in env, env
    ledger_line = legacy.read_text().splitlines().index(
        "      env_vars: {LEDGER_DIR: '${LEDGER_DIR}/register'}    # the environment's") + 1
    assert f"# ${{LEDGER_DIR}} is read at startup_config.yaml:{ledger_line}: set it" in env, env
    machine.run("sed", "-i", "s|^#LEDGER_DIR=$|LEDGER_DIR=/srv/ledger|", ETC_ENV)

    first = _deploy(machine, f"LEGACY={legacy}")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "kept as it is" in first.stdout  # the operator's edit
    assert f"enable and start {UNIT}" in first.stdout
    assert machine.run("systemctl", "is-active", UNIT).stdout.strip() == "active"
    assert _supervisor_args(machine) == ["--config", str(legacy), "--overlay", str(overlay)]
    register = _agents(machine)["Register"]
    assert register["state"] == "RUNNING", register
    environ = machine.environ(register["pid"])
    assert f"AGENT_PORT={port}" in environ and "SHOP_MODE=first" in environ, environ
    assert "LEDGER_DIR=/srv/ledger/register" in environ, environ
    pythonpath = next(v for v in environ if v.startswith("PYTHONPATH="))
    assert pythonpath.startswith("PYTHONPATH=:/") and pythonpath.endswith("/.."), pythonpath
    assert not any(v.startswith("AGENTVISOR_CONFIG=") for v in environ)  # the unit's own
    assert (_sha256(legacy), _sha256(overlay)) == (legacy_sha, overlay_sha)

    # The operator changes the agent's environment in the overlay and deploys again: a
    # reload (the environment file is kept as it is) restarts that agent with it.
    overlay.write_text(_overlay("second"))
    again = _deploy(machine, f"LEGACY={legacy}")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "kept as it is" in again.stdout and f"reload {UNIT}" in again.stdout

    def restarted_with(variable: str) -> dict | None:
        try:
            now = _agents(machine)["Register"]
        except (ValueError, KeyError):  # no answer while the supervisor restarts
            return None
        fresh = now["state"] == "RUNNING" and now["pid"] != register["pid"]
        return now if fresh and variable in machine.environ(now["pid"]) else None

    register = wait_until(lambda: restarted_with("SHOP_MODE=second"), 30,
                          "Register to run again with SHOP_MODE=second")

    # A misspelt agent name in the overlay: validation stops the deploy at the overlay's
    # line, and the fleet runs on untouched.
    good = _overlay("second")
    overlay.write_text(good + "  Registr:\n    env_vars: {SHOP_MODE: third}\n")
    typo = _deploy(machine, f"LEGACY={legacy}")
    assert typo.returncode != 0, typo.stdout + typo.stderr
    assert f"{overlay}:{good.count(chr(10)) + 1}: agents.Registr" in typo.stdout, typo.stdout
    assert "did you mean 'Register'" in typo.stdout
    assert "==> unit" not in typo.stdout and "goes in" not in typo.stderr
    assert machine.run("systemctl", "is-active", UNIT).stdout.strip() == "active"
    assert _agents(machine)["Register"]["pid"] == register["pid"]

    # A new variable of the supervisor's environment, set in the environment file: a
    # reload could not give it to the running supervisor, so deploy restarts the unit.
    overlay.write_text(_overlay("second", ", SHOP_REGION: '${SHOP_REGION}'"))
    machine.run("sh", "-c", f"echo SHOP_REGION=north >> {ETC_ENV}")
    region = _deploy(machine, f"LEGACY={legacy}")
    assert region.returncode == 0, region.stdout + region.stderr
    assert f"restart {UNIT}" in region.stdout
    assert "its SHOP_REGION is not the one" in region.stdout
    register = wait_until(lambda: restarted_with("SHOP_REGION=north"), 30,
                          "Register to run again with SHOP_REGION=north")
    assert register["state"] == "RUNNING"

    # Another legacy file while the kept environment file names this one: the operator's
    # file is not silently overruled, nor the running fleet touched.
    other, other_overlay = _legacy_layout(tmp_path / "elsewhere", free_port(), free_port())
    other_overlay.write_text(_overlay("other"))
    supervisor = machine.show(UNIT, "MainPID")["MainPID"]
    elsewhere = _deploy(machine, f"LEGACY={other}")
    assert elsewhere.returncode != 0
    assert f"{ETC_ENV} (kept: an operator's edit wins) has the unit run" in elsewhere.stderr
    assert f"not {other} with --overlay {other_overlay}" in elsewhere.stderr
    assert machine.show(UNIT, "MainPID")["MainPID"] == supervisor
    assert _sha256(legacy) == legacy_sha  # through every deploy, byte for byte


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
