"""The shipped `agentvisor@.service`, run by a real systemd as PID 1.

The test boots systemd (the machine's own, Debian's 252 here) as PID 1 of PID, mount,
UTS, network and cgroup namespaces it creates (how, and why nothing reaches the host, is
at ENTER and BOOT below). systemd loads units only from a folder of the test's: the
shipped unit with two paths rewritten (this checkout's `agentvisor` and a config in the
test's folder) and a drop-in that adds only what a host adds (a credential, a shorter
watchdog, a log file for failure messages). Every command an operator would type runs
inside the namespaces through nsenter: `systemctl`, `agentvisor status --json`, `nft`.

What it shows, none of which `systemd-analyze verify` can: start returns only once the
fleet is up (Type=notify, READY=1); a credential, plain (LoadCredential=) or sealed with
`agentvisor secrets seal --systemd` (LoadCredentialEncrypted=), reaches the agent that
asked for it and nothing else; reload applies a good config and refuses a bad one
without touching the agents; a killed supervisor is restarted with its orphans gone
(KillMode=mixed); a wedged one is caught by the watchdog; a broken config fails the start
with the reason in its log; stop runs agents down in reverse dependency order, sidecar
last, and leaves the unit inactive with nothing of it left in /run/agentvisor; after a
crash, ExecStopPost= removes the transparent redirects; a second instance on the same
machine refuses to start and leaves the first one's agents and control socket alone.

Skipped, with the reason, where this cannot run: not root, no unshare/nsenter, no
systemd binary, a machine that systemd already runs, or a systemd that does not reach
"running" here.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.integration.harness import free_port, wait_until
from tests.integration.machines import AGENTVISOR, Machine, booted, install_unit, skip_reason

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")

INSTANCE = "fleet"
UNIT = f"agentvisor@{INSTANCE}.service"
SECRET = "s3cr3t-from-LoadCredential"  # a test value, planted on purpose
WATCHDOG_S = 3

# An unmodified agent: listens on its port (the supervisor's health check), and on
# SIGTERM writes its name to the stop log before it exits.
AGENT = """
import os, signal, socket, sys
srv = socket.create_server(("127.0.0.1", int(os.environ["AGENT_PORT"])))
def bye(*_):
    with open(os.environ["STOP_LOG"], "a") as f:
        f.write(os.environ["AGENTVISOR_AGENT"] + "\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, bye)
while True:
    srv.accept()[0].close()
"""


class Host:
    """The unit as installed on a host: shipped text, this checkout's binary, a config."""

    def __init__(self, machine: Machine, root: Path):
        self.machine = machine
        self.dir = root / "host"
        (self.dir / "agents").mkdir(parents=True)
        (self.dir / "agents" / "legacy.py").write_text(AGENT)
        self.config = self.dir / f"{INSTANCE}.yaml"
        self.stop_log = self.dir / "stopped.txt"
        self.supervisor_log = self.dir / "supervisor.log"
        self.ports = {name: free_port()
                      for name in ("Store", "Api", "Worker", "Hub", "metrics")}
        credential = self.dir / "db_password"
        credential.write_text(SECRET)
        credential.chmod(0o600)

        # What a host's own drop-in would add; everything else is the shipped unit.
        install_unit(machine, self.dir, self.supervisor_log, f"""\
            LoadCredential=DB_PASSWORD:{credential}
            WatchdogSec={WATCHDOG_S}s
            """)

    def write_config(self, *, worker: bool = False, broken: bool = False) -> None:
        def agent(name: str, deps: list[str], **env: str) -> dict:
            return {"script_path": "agents/legacy.py", "port": self.ports[name],
                    "required": True, "dependencies": deps,
                    "env_vars": {"AGENT_PORT": str(self.ports[name]),
                                 "STOP_LOG": str(self.stop_log), **env}}

        agents = {"Store": agent("Store", []),
                  "Api": agent("Api", ["Store"], DB_PASSWORD="${DB_PASSWORD}",
                               HUB_URL="http://${upstream:Hub}")}
        if worker:
            agents["Worker"] = agent("Worker", ["Api"])
        if broken:
            agents["Api"]["dependencies"] = ["NoSuchAgent"]
            agents["Api"]["port"] = "not a port"
        config = {"host": "SystemdTest", "project_root": str(self.dir),
                  "python": sys.executable, "secrets": {"names": ["DB_PASSWORD"]},
                  "upstreams": {"Hub": {"address": f"127.0.0.1:{self.ports['Hub']}",
                                        "protocol": "http"}},
                  # Not the default port, so a mistake in the namespacing collides.
                  "sidecar": {"metrics_listen": f"127.0.0.1:{self.ports['metrics']}"},
                  "agent_groups": {"core": agents}}
        self.config.write_text(yaml.safe_dump(config, sort_keys=False))

    def status(self) -> dict:
        # Exit status 1 means "not ok", which some tests wait through: read the JSON.
        return json.loads(self.machine.run(AGENTVISOR, "status", "--json", check=False).stdout)

    def pids(self) -> dict[str, int]:
        return {a["name"]: a["pid"] for a in self.status()["agents"]}

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.machine.run("systemctl", *args, check=check)

    def show(self, *props: str) -> dict[str, str]:
        return self.machine.show(UNIT, *props)

    def log(self) -> str:
        return self.supervisor_log.read_text() if self.supervisor_log.exists() else ""

    def start(self) -> None:
        started = self.systemctl("start", UNIT, check=False)
        if started.returncode != 0:
            status = self.systemctl("status", "--no-pager", "-l", UNIT, check=False).stdout
            raise AssertionError(f"systemctl start failed:\n{started.stderr}{status}\n"
                                 f"supervisor log:\n{self.log()[-4000:]}")


@pytest.fixture(scope="module")
def machine(tmp_path_factory):
    m = booted(tmp_path_factory.mktemp("pid1"))
    yield m
    m.shutdown()


@pytest.fixture(scope="module")
def host(machine, tmp_path_factory):
    return Host(machine, tmp_path_factory.mktemp("unit"))


@pytest.fixture
def fleet(host):
    """The unit started on the two-agent config, and stopped (and un-failed) after."""
    host.write_config()
    host.systemctl("reset-failed", UNIT, check=False)
    host.stop_log.unlink(missing_ok=True)
    host.start()
    yield host
    host.systemctl("stop", UNIT, check=False)
    host.systemctl("reset-failed", UNIT, check=False)


def test_start_returns_once_the_fleet_is_up(fleet):
    # No waiting here: Type=notify makes `systemctl start` return only after READY=1.
    status = fleet.status()
    assert status["state"] == "ok", status
    assert {a["name"]: a["state"] for a in status["agents"]} == \
        {"sidecar": "RUNNING", "Store": "RUNNING", "Api": "RUNNING"}, status
    unit = fleet.show("ActiveState", "SubState", "StatusText", "MainPID", "NRestarts")
    assert unit["ActiveState"] == "active" and unit["SubState"] == "running", unit
    assert int(unit["MainPID"]) > 0 and unit["NRestarts"] == "0", unit
    assert unit["StatusText"].startswith("ok"), unit  # STATUS= as `systemctl status` shows it
    # The unit's directories exist, in the namespace's own /run and /var.
    fleet.machine.run("test", "-S", "/run/agentvisor/control.sock")
    fleet.machine.run("test", "-d", "/var/lib/agentvisor")
    fleet.machine.run("test", "-d", "/var/log/agentvisor")


def test_credential_reaches_the_agent_that_asked_and_nothing_else(fleet):
    machine, pids = fleet.machine, fleet.pids()
    api_env = machine.environ(pids["Api"])
    assert f"DB_PASSWORD={SECRET}" in api_env
    for other in ("Store", "sidecar"):
        assert not any(SECRET in v for v in machine.environ(pids[other])), other
    main_pid = int(fleet.show("MainPID")["MainPID"])
    assert SECRET not in machine.cmdline(main_pid)
    assert SECRET not in json.dumps(fleet.status())
    # The agent got the sidecar's listener for its upstream, not the upstream itself.
    hub = next(v for v in api_env if v.startswith("HUB_URL="))
    assert hub.startswith("HUB_URL=http://127.0.0.1:") and \
        not hub.endswith(f":{fleet.ports['Hub']}"), hub


def test_reload_applies_a_good_config_and_refuses_a_bad_one(fleet):
    before = fleet.pids()
    fleet.write_config(worker=True)
    fleet.systemctl("reload", UNIT)
    after = wait_until(lambda: (lambda p: p if p.get("Worker") else None)(fleet.pids()),
                       15, "Worker to start after reload")
    assert after["Store"] == before["Store"] and after["Api"] == before["Api"]

    fleet.write_config(worker=True, broken=True)
    refused = fleet.systemctl("reload", UNIT, check=False)
    assert refused.returncode != 0
    assert fleet.show("ActiveState")["ActiveState"] == "active"
    assert fleet.pids() == after  # nothing was restarted by the refused config
    assert "NoSuchAgent" in fleet.log()  # the reason, where `journalctl -u` would show it


def test_a_killed_supervisor_is_restarted_and_its_orphans_are_gone(fleet):
    old_main = int(fleet.show("MainPID")["MainPID"])
    old_agents = fleet.pids()
    fleet.machine.kill(old_main, signal.SIGKILL)

    def restarted():
        unit = fleet.show("ActiveState", "MainPID", "NRestarts")
        ok = (unit["ActiveState"] == "active" and unit["NRestarts"] == "1"
              and int(unit["MainPID"]) not in (0, old_main))
        return unit if ok else None

    wait_until(restarted, 30, "systemd to restart the supervisor")
    # KillMode=mixed: the dead supervisor's agents were killed, not left holding ports.
    assert not any(fleet.machine.alive(pid) for pid in old_agents.values())
    new_agents = wait_until(lambda: (lambda s: s if s["state"] == "ok" else None)(
        fleet.status()), 30, "the restarted fleet to be ok")
    assert {a["name"] for a in new_agents["agents"]} == {"sidecar", "Store", "Api"}


def test_a_wedged_supervisor_is_restarted_by_the_watchdog(fleet):
    # A live supervisor pings: systemd records each WATCHDOG=1 it accepts.
    first = fleet.show("WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"]
    wait_until(lambda: fleet.show("WatchdogTimestampMonotonic")[
        "WatchdogTimestampMonotonic"] != first, WATCHDOG_S * 2, "a WATCHDOG=1 ping")
    old_main = int(fleet.show("MainPID")["MainPID"])
    fleet.machine.kill(old_main, signal.SIGSTOP)  # its loop stops, and so do the pings

    def restarted():
        unit = fleet.show("ActiveState", "MainPID", "NRestarts", "Result")
        return unit if int(unit["MainPID"]) not in (0, old_main) \
            and unit["ActiveState"] == "active" else None

    unit = wait_until(restarted, WATCHDOG_S + 30, "the watchdog to restart the supervisor")
    assert unit["NRestarts"] == "1", unit
    assert not fleet.machine.alive(old_main)


def test_stop_runs_the_fleet_down_in_reverse_order_and_cleans_up(fleet):
    pids = fleet.pids()
    fleet.systemctl("stop", UNIT)
    # Dependants first: Api depends on Store.
    assert fleet.stop_log.read_text().split() == ["Api", "Store"]
    assert not any(fleet.machine.alive(pid) for pid in pids.values())
    unit = fleet.show("ActiveState", "Result")
    assert unit == {"ActiveState": "inactive", "Result": "success"}, unit
    # Nothing that describes the stopped processes is left for the next start (the
    # folder itself stays: RuntimeDirectoryPreserve=yes, see the unit).
    for left in ("control.sock", "agents.json"):
        assert fleet.machine.run("test", "-e", f"/run/agentvisor/{left}",
                                 check=False).returncode != 0, left
    # What `journalctl -u` shows of this stop: each agent once, the sidecar last, so the
    # agents' last calls still had it.
    last_run = fleet.log().rsplit("shutting down:", 1)[-1]
    stopped = re.findall(r"INFO agentvisor\.agent: (\S+): stopped, exited with status 0",
                         last_run)
    assert stopped == ["Api", "Store", "sidecar"], last_run


def test_a_second_instance_refuses_and_leaves_the_first_alone(fleet):
    # `systemctl start agentvisor@other` on a PC that runs agentvisor@fleet: both would
    # use /run/agentvisor (the default runtime dir). The second refuses, and neither it
    # nor systemd touches anything of the first: agents, control socket, unit.
    machine, second = fleet.machine, "agentvisor@second.service"
    (fleet.dir / "second.yaml").write_text(fleet.config.read_text())
    main_pid = int(fleet.show("MainPID")["MainPID"])
    agents = fleet.pids()

    def socket_inode() -> str:
        return machine.run("stat", "-c", "%i", "/run/agentvisor/control.sock").stdout

    inode = socket_inode()
    try:
        started = machine.run("systemctl", "start", second, check=False)
        assert started.returncode != 0
        assert (f"agentvisor: a supervisor (pid {main_pid}) is already running on "
                "/run/agentvisor; not starting") in fleet.log()
        # Each of its restarts (Restart=on-failure) is refused the same way; stopped,
        # it is gone, and systemd removed nothing the first one needs.
        machine.run("systemctl", "stop", second, check=False)
        assert socket_inode() == inode
        status = fleet.status()
        assert status["state"] == "ok" and status["pid"] == main_pid, status
        assert fleet.pids() == agents
        assert fleet.show("ActiveState", "MainPID") == \
            {"ActiveState": "active", "MainPID": str(main_pid)}
    finally:
        machine.run("systemctl", "stop", second, check=False)
        machine.run("systemctl", "reset-failed", second, check=False)


def test_a_broken_config_fails_the_start_with_the_reason(host):
    host.write_config(broken=True)
    host.systemctl("reset-failed", UNIT, check=False)
    started = host.systemctl("start", UNIT, check=False)
    try:
        assert started.returncode != 0
        log = host.log()
        assert "NoSuchAgent" in log and "Traceback" not in log.split("NoSuchAgent")[-1]
    finally:
        host.systemctl("stop", UNIT, check=False)
        host.systemctl("reset-failed", UNIT, check=False)


def test_after_a_crash_the_unit_removes_the_transparent_redirects(host):
    # ExecStopPost= runs `agentvisor cleanup` after every exit. With Restart=no (this
    # instance's drop-in) the unit stays down, so what a crash leaves is observable.
    machine, unit = host.machine, "agentvisor@crash.service"
    dropin = machine.units / f"{unit}.d"
    dropin.mkdir()
    (dropin / "no-restart.conf").write_text("[Service]\nRestart=no\n")
    machine.run("systemctl", "daemon-reload")
    (host.dir / "crash.yaml").write_text(yaml.safe_dump({
        "host": "CrashTest", "python": sys.executable,
        "upstreams": {"Hub": {"address": f"127.0.0.1:{host.ports['Hub']}"}},
        "sidecar": {"metrics_listen": f"127.0.0.1:{host.ports['metrics']}"},
        # nobody cannot read this venv's python (under /root): the system's runs it.
        "pc2_services": [{"name": "Idle", "user": 65534, "intercept": "transparent",
                          "cwd": "/", "command": ["/usr/bin/python3", "-c",
                                                  "import time\nwhile True: time.sleep(60)"]}],
    }, sort_keys=False))
    try:
        machine.run("systemctl", "start", unit)
        tables = machine.run("nft", "list", "tables").stdout
        assert "inet agentvisor" in tables, host.log()[-2000:]
        machine.kill(int(machine.show(unit, "MainPID")["MainPID"]), signal.SIGKILL)
        wait_until(lambda: machine.show(unit, "ActiveState")["ActiveState"] == "failed", 30,
                   "the unit to fail")
        assert "agentvisor" not in machine.run("nft", "list", "tables").stdout
        assert "removed nftables table inet agentvisor (transparent redirects)" in host.log()
    finally:
        machine.run("systemctl", "stop", unit, check=False)
        machine.run("systemctl", "reset-failed", unit, check=False)


def test_a_secret_sealed_with_systemd_creds_reaches_its_agent(host):
    # The README's recipe: `agentvisor secrets seal NAME --systemd` on the host (bound to
    # this machine's key, made by systemd-creds in the namespace's own /var/lib), then
    # LoadCredentialEncrypted=. systemd decrypts it; only the agent that asked gets it.
    machine, unit = host.machine, "agentvisor@sealed.service"
    token = "t0ken-sealed-by-systemd-creds"  # a test value, planted on purpose
    sealed = host.dir / "sealed"
    sealed.mkdir()
    machine.run(AGENTVISOR, "secrets", "seal", "API_TOKEN", "--systemd", "--out", str(sealed),
                input=token)
    cred = sealed / "API_TOKEN.cred"
    assert token.encode() not in cred.read_bytes()
    dropin = machine.units / f"{unit}.d"
    dropin.mkdir()
    (dropin / "sealed.conf").write_text(
        f"[Service]\nLoadCredentialEncrypted=API_TOKEN:{cred}\n")
    machine.run("systemctl", "daemon-reload")
    agent = {"script_path": "agents/legacy.py", "required": True,
             "port": host.ports["Worker"],
             "env_vars": {"AGENT_PORT": str(host.ports["Worker"]),
                          "STOP_LOG": str(host.stop_log), "API_TOKEN": "${API_TOKEN}"}}
    (host.dir / "sealed.yaml").write_text(yaml.safe_dump({
        "host": "SealedTest", "project_root": str(host.dir), "python": sys.executable,
        "secrets": {"names": ["API_TOKEN"]}, "agent_groups": {"core": {"Api": agent}},
    }, sort_keys=False))
    try:
        machine.run("systemctl", "start", unit)
        status = host.status()
        assert status["state"] == "ok", status
        pid = next(a["pid"] for a in status["agents"] if a["name"] == "Api")
        assert f"API_TOKEN={token}" in machine.environ(pid)
        assert token not in json.dumps(status)
    finally:
        machine.run("systemctl", "stop", unit, check=False)
        machine.run("systemctl", "reset-failed", unit, check=False)
