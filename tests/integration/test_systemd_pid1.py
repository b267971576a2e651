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
last, and leaves the unit inactive with /run/agentvisor gone; after a crash,
ExecStopPost= removes the transparent redirects.

Skipped, with the reason, where this cannot run: not root, no unshare/nsenter, no
systemd binary, a machine that systemd already runs, or a systemd that does not reach
"running" here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.integration.harness import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_UNIT = ROOT / "systemd" / "agentvisor@.service"
INSTALLED_AGENTVISOR = "/opt/agentvisor/.venv/bin/agentvisor"
INSTALLED_CONFIG = "/etc/agentvisor/%i.yaml"
SYSTEMD = next((p for p in ("/lib/systemd/systemd", "/usr/lib/systemd/systemd")
                if os.access(p, os.X_OK)), None)
AGENTVISOR = str(Path(sys.executable).parent / "agentvisor")
INSTANCE = "fleet"
UNIT = f"agentvisor@{INSTANCE}.service"
SECRET = "s3cr3t-from-LoadCredential"  # a test value, planted on purpose
WATCHDOG_S = 3

# Container-style boot, so that nothing systemd does reaches the host. PID 1 gets:
# - a cgroup of its own in each hierarchy systemd uses (made by the test, removed after),
#   and a cgroup namespace rooted there;
# - fresh mounts of those hierarchies on a private tmpfs at /sys/fs/cgroup, made
#   read-only as container managers do, so systemd mounts no controller hierarchies
#   (those would be the host's) and cannot remount the host's tmpfs;
# - private tmpfs on /run and /var/log, and a test folder as /var/lib, where the unit's
#   directories go;
# - a network namespace of its own: its ports and nftables rules are its own.
ENTER = """
set -e
for box in "$@"; do echo $$ > "$box/cgroup.procs"; done
exec unshare --pid --fork --mount --uts --cgroup --net --mount-proc --propagation private \
    sh -c "$BOOT" sh
"""
BOOT = """
set -e
mount --make-rprivate /
for d in /run /var/log; do mount -t tmpfs -o mode=0755 tmpfs "$d"; done
# /var/lib on disk, as on a host: systemd-creds keeps its host key there, and refuses
# to keep it on a memory filesystem.
mount --bind "$VARLIB" /var/lib
mount -t tmpfs -o mode=0755 cgroup /sys/fs/cgroup
mkdir /sys/fs/cgroup/systemd /sys/fs/cgroup/unified
mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd
mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified
mount -o remount,ro /sys/fs/cgroup
# Shared again, as on a booted host: systemd mounts each unit's credentials in a child
# namespace, and they reach this one only by propagation. These are new peer groups,
# inside this namespace alone: nothing propagates to the host's.
mount --make-rshared /
exec env -i container=agentvisor-test SYSTEMD_UNIT_PATH="$UNITS" \
    "$SYSTEMD" --system --unit=agentvisor-test.target --log-target=null
"""
# The host hierarchies the boot above needs: systemd 252's hybrid layout (a named v1
# hierarchy for process tracking beside cgroup2), as on this machine.
HIERARCHIES = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))

# Targets the unit's default dependencies name, empty: the test boots nothing else.
TARGETS = ("sysinit", "basic", "shutdown", "network-online", "multi-user",
           "agentvisor-test")

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


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create namespaces and run systemd as their PID 1"
    if SYSTEMD is None:
        return "no systemd binary (Debian package: systemd)"
    for tool in ("unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian package: util-linux)"
    if not os.access(AGENTVISOR, os.X_OK):
        return f"{AGENTVISOR} is not installed (make install)"
    if Path("/run/systemd/system").is_dir():
        return ("this machine runs systemd already: run the unit itself "
                "(systemctl start agentvisor@NAME); this test is for hosts without one, "
                "such as CI containers")
    for h in HIERARCHIES:
        if not (h / "cgroup.procs").exists():
            return (f"no cgroup hierarchy at {h}: the test boots systemd on the hybrid "
                    "layout (name=systemd plus cgroup2)")
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


class Machine:
    """systemd as PID 1 of namespaces of our own, and commands run inside them."""

    def __init__(self, root: Path):
        self.root = root
        self.units = root / "units"
        self.units.mkdir()
        for name in TARGETS:
            (self.units / f"{name}.target").write_text(
                f"[Unit]\nDescription={name}\nDefaultDependencies=no\n")
        self.boot_log = root / "boot.log"
        self.var_lib = root / "var-lib"
        self.var_lib.mkdir(mode=0o755)
        self.proc: subprocess.Popen | None = None
        self.pid1 = 0
        self.boxes = [h / f"agentvisor-test-{os.getpid()}-{root.name}" for h in HIERARCHIES]

    def boot(self) -> str | None:
        """Start PID 1 and wait until it is running; the reason when it cannot."""
        for box in self.boxes:
            box.mkdir()
        with open(self.boot_log, "wb") as log:
            self.proc = subprocess.Popen(
                ["sh", "-c", ENTER, "sh", *map(str, self.boxes)],
                env={**os.environ, "BOOT": BOOT, "UNITS": str(self.units),
                     "SYSTEMD": SYSTEMD, "VARLIB": str(self.var_lib)},
                stdout=log, stderr=subprocess.STDOUT)

        def pid1() -> int:
            try:
                children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
                return int(children.read_text().split()[0])
            except (OSError, IndexError, ValueError):
                return 0

        try:
            wait_until(lambda: pid1() or self.proc.poll() is not None, 10,
                       "unshare to fork PID 1")
        except AssertionError as exc:
            return str(exc)
        if self.proc.poll() is not None:
            return f"unshare exited {self.proc.returncode}: {self.boot_log.read_text()}"
        self.pid1 = pid1()  # a host pid, > 1: what shutdown() may SIGKILL

        def state() -> str:
            out = self.run("systemctl", "is-system-running", check=False).stdout.strip()
            return out if out in ("running", "degraded") else ""

        try:
            wait_until(state, 30, "systemd to reach running")
        except AssertionError as exc:
            return f"{exc}; {self.boot_log.read_text()}"
        return None

    def run(self, *args: str, check: bool = True, timeout_s: float = 120,
            input: str | None = None) -> subprocess.CompletedProcess:
        """A command inside the namespaces, as an operator's shell there would run it."""
        result = subprocess.run(["nsenter", "-t", str(self.pid1), "-m", "-p", "-u", "-n",
                                 *args], input=input,
                                capture_output=True, text=True, timeout=timeout_s)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stdout}{result.stderr}")
        return result

    # Every pid that systemctl or `agentvisor status` reports is the namespace's, not
    # ours: signals and /proc reads go through nsenter, never os.kill.
    def kill(self, pid: int, sig: signal.Signals) -> None:
        self.run("kill", f"-{sig.name.removeprefix('SIG')}", str(pid))

    def alive(self, pid: int) -> bool:
        return self.run("kill", "-0", str(pid), check=False).returncode == 0

    def environ(self, pid: int) -> list[str]:
        return self.run("cat", f"/proc/{pid}/environ").stdout.split("\0")

    def cmdline(self, pid: int) -> str:
        return self.run("cat", f"/proc/{pid}/cmdline").stdout

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, "-p", ",".join(props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def shutdown(self) -> None:
        """End PID 1, and with it every process of its namespace, and remove its cgroups.
        The tests stop their units first; this is the power cord."""
        if self.pid1 > 1:  # never the host's own PID 1
            try:
                os.kill(self.pid1, signal.SIGKILL)  # PID 1 of a child namespace: allowed
            except ProcessLookupError:
                pass
        if self.proc is not None:
            self.proc.wait(30)
        for box in self.boxes:
            # A cgroup can be removed once its last process is reaped, which the kernel
            # finishes shortly after the namespace ends: retry against a deadline.
            wait_until(lambda: _remove_tree(box), 10, f"{box} to be removable")


def _remove_tree(top: Path) -> bool:
    """rmdir a cgroup and everything below it, deepest first; True once it is gone."""
    if not top.exists():
        return True
    for path in sorted((p for p in top.rglob("*") if p.is_dir()),
                       key=lambda p: len(p.parts), reverse=True) + [top]:
        try:
            path.rmdir()
        except OSError:
            return False
    return True


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

        text = SHIPPED_UNIT.read_text()
        assert INSTALLED_AGENTVISOR in text and INSTALLED_CONFIG in text, \
            "the shipped unit's paths changed; update this test's rewrite"
        text = text.replace(INSTALLED_AGENTVISOR, AGENTVISOR)
        text = text.replace(INSTALLED_CONFIG, str(self.dir / "%i.yaml"))
        (machine.units / "agentvisor@.service").write_text(text)
        dropin = machine.units / "agentvisor@.service.d"
        dropin.mkdir()
        # What a host's own drop-in would add; everything else is the shipped unit.
        (dropin / "host.conf").write_text(textwrap.dedent(f"""\
            [Service]
            LoadCredential=DB_PASSWORD:{credential}
            WatchdogSec={WATCHDOG_S}s
            StandardOutput=append:{self.supervisor_log}
            StandardError=append:{self.supervisor_log}
            """))
        machine.run("systemctl", "daemon-reload")

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
    m = Machine(tmp_path_factory.mktemp("pid1"))
    reason = m.boot()
    if reason is not None:
        m.shutdown()
        pytest.skip(f"systemd does not run as PID 1 of a namespace here: {reason}")
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
    # RuntimeDirectoryPreserve=no: no stale control socket for the next start.
    assert fleet.machine.run("test", "-e", "/run/agentvisor", check=False).returncode != 0
    # What `journalctl -u` shows of this stop: each agent once, the sidecar last, so the
    # agents' last calls still had it.
    last_run = fleet.log().rsplit("shutting down:", 1)[-1]
    stopped = re.findall(r"INFO agentvisor\.agent: (\S+): stopped, exited with status 0",
                         last_run)
    assert stopped == ["Api", "Store", "sidecar"], last_run


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
