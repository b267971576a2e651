"""Machines for tests: the machine's own systemd as PID 1 of namespaces a test creates,
and agentvisor@.service installed in it as shipped.

Each Machine has PID, mount, UTS, network and cgroup namespaces of its own (how, and why
nothing reaches the host, is at ENTER and BOOT). Commands run inside through nsenter,
as an operator's shell there would run them; every pid that systemctl or `agentvisor
status` reports is the machine's, not ours. Several machines can run at once and be
wired together with a veth pair (`link`), as two PCs on a network.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.integration.harness import wait_until

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_UNIT = ROOT / "systemd" / "agentvisor@.service"
INSTALLED_AGENTVISOR = "/opt/agentvisor/.venv/bin/agentvisor"
INSTALLED_CONFIG = "/etc/agentvisor/%i.yaml"
INSTALLED_ENV = "/etc/agentvisor/%i.env"  # the unit's optional EnvironmentFile=
SYSTEMD = next((p for p in ("/lib/systemd/systemd", "/usr/lib/systemd/systemd")
                if os.access(p, os.X_OK)), None)
AGENTVISOR = str(Path(sys.executable).parent / "agentvisor")

# Container-style boot, so that nothing systemd does reaches the host. PID 1 gets:
# - a cgroup of its own in each hierarchy systemd uses (made by the test, removed after),
#   and a cgroup namespace rooted there;
# - fresh mounts of those hierarchies on a private tmpfs at /sys/fs/cgroup, made
#   read-only as container managers do, so systemd mounts no controller hierarchies
#   (those would be the host's) and cannot remount the host's tmpfs;
# - private tmpfs on /run and /var/log, a test folder as /var/lib, where the unit's
#   directories go, and /etc overlaid (see BOOT);
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
# /etc as the host's, but what is written there (a deployed unit, /etc/agentvisor)
# lands in a test folder; and an empty /etc/systemd/system, so that none of the host's
# own units (timesyncd would set the clock, which no namespace separates) is loaded.
mount -t overlay overlay -o "lowerdir=/etc,upperdir=$ETC/upper,workdir=$ETC/work" /etc
mount -t tmpfs -o mode=0755 tmpfs /etc/systemd/system
mount -t tmpfs -o mode=0755 cgroup /sys/fs/cgroup
mkdir /sys/fs/cgroup/systemd /sys/fs/cgroup/unified
mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd
mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified
mount -o remount,ro /sys/fs/cgroup
# Shared again, as on a booted host: systemd mounts each unit's credentials in a child
# namespace, and they reach this one only by propagation. These are new peer groups,
# inside this namespace alone: nothing propagates to the host's.
mount --make-rshared /
exec env -i container=agentvisor-test SYSTEMD_UNIT_PATH="$UNITS:/etc/systemd/system" \
    "$SYSTEMD" --system --unit=agentvisor-test.target --log-target=null
"""
# The host hierarchies the boot above needs: systemd 252's hybrid layout (a named v1
# hierarchy for process tracking beside cgroup2), as on this machine.
HIERARCHIES = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))

# Targets the unit's default dependencies name, empty: the test boots nothing else.
TARGETS = ("sysinit", "basic", "shutdown", "network-online", "multi-user",
           "agentvisor-test")

def skip_reason() -> str | None:
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


class Machine:
    """systemd as PID 1 of namespaces of our own, and commands run inside them."""

    def __init__(self, root: Path):
        self.root = root
        self.units = root / "units"
        self.units.mkdir(parents=True)
        for name in TARGETS:
            (self.units / f"{name}.target").write_text(
                f"[Unit]\nDescription={name}\nDefaultDependencies=no\n")
        self.boot_log = root / "boot.log"
        self.var_lib = root / "var-lib"
        self.var_lib.mkdir(mode=0o755)
        self.etc = root / "etc"  # the overlay's writable layer: what was written to /etc
        for d in ("upper", "work"):
            (self.etc / d).mkdir(parents=True)
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
                     "SYSTEMD": SYSTEMD, "VARLIB": str(self.var_lib), "ETC": str(self.etc)},
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


def booted(root: Path) -> Machine:
    """A machine booted in folder `root`; the calling test is skipped, with the reason,
    where systemd cannot run as PID 1 here."""
    import pytest

    machine = Machine(root)
    reason = machine.boot()
    if reason is not None:
        machine.shutdown()
        pytest.skip(f"systemd does not run as PID 1 of a namespace here: {reason}")
    return machine


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



def install_unit(machine: Machine, config_dir: Path, log: Path, extra: str = "") -> None:
    """agentvisor@.service as shipped, with this checkout's binary and configs read from
    config_dir/INSTANCE.yaml (and its environment from config_dir/INSTANCE.env, if
    any), plus a drop-in with what a host adds: the supervisor's output appended to
    `log` (for failure messages) and `extra` [Service] lines."""
    text = SHIPPED_UNIT.read_text()
    assert all(path in text for path in (INSTALLED_AGENTVISOR, INSTALLED_CONFIG, INSTALLED_ENV)), \
        "the shipped unit's paths changed; update this rewrite"
    text = text.replace(INSTALLED_AGENTVISOR, AGENTVISOR)
    text = text.replace(INSTALLED_CONFIG, str(config_dir / "%i.yaml"))
    text = text.replace(INSTALLED_ENV, str(config_dir / "%i.env"))
    (machine.units / "agentvisor@.service").write_text(text)
    dropin = machine.units / "agentvisor@.service.d"
    dropin.mkdir(exist_ok=True)
    (dropin / "host.conf").write_text(
        f"[Service]\nStandardOutput=append:{log}\nStandardError=append:{log}\n"
        + textwrap.dedent(extra))
    machine.run("systemctl", "daemon-reload")


def link(a: Machine, a_address: str, b: Machine, b_address: str, name: str = "lan0") -> None:
    """A veth pair between two machines, as a cable between two PCs: interface `name` in
    each, with the given CIDR addresses, up. It goes away with the machines."""
    subprocess.run(["ip", "link", "add", name, "netns", str(a.pid1), "type", "veth",
                    "peer", "name", name, "netns", str(b.pid1)],
                   check=True, capture_output=True, timeout=30)
    for machine, address in ((a, a_address), (b, b_address)):
        machine.run("ip", "addr", "add", address, "dev", name)
        machine.run("ip", "link", "set", name, "up")


def add_hosts(machine: Machine, folder: Path, names: dict[str, str]) -> None:
    """Names for other machines, in the machine's own /etc/hosts (a copy of the host's
    plus these lines, bound over it inside the machine's mount namespace)."""
    hosts = folder / "hosts"
    lines = [f"{address} {name}" for name, address in names.items()]
    hosts.write_text(Path("/etc/hosts").read_text() + "\n".join(lines) + "\n")
    machine.run("mount", "--bind", str(hosts), "/etc/hosts")


class PC:
    """One PC for a test: a machine booted in `root/instance`, the shipped unit installed,
    its host config `config` (project_root: its folder, python: ours) and `scripts`
    (file name: text) written in its folder for the config's agents to run."""

    def __init__(self, root: Path, instance: str, config: dict, scripts: dict[str, str]):
        import yaml

        self.dir = root / instance
        self.dir.mkdir()
        for name, text in scripts.items():
            (self.dir / name).write_text(text)
        self.log = self.dir / "supervisor.log"
        self.unit = f"agentvisor@{instance}.service"
        self.machine = booted(self.dir)
        install_unit(self.machine, self.dir, self.log)
        (self.dir / f"{instance}.yaml").write_text(yaml.safe_dump(
            {"project_root": str(self.dir), "python": sys.executable, **config},
            sort_keys=False))

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.machine.run(*args, check=check)

    def start(self) -> None:
        started = self.run("systemctl", "start", self.unit, check=False)
        assert started.returncode == 0, f"{started.stderr}\n{self.log.read_text()[-3000:]}"

    def agentvisor(self, *args: str) -> str:
        return self.run(AGENTVISOR, *args).stdout

    def status(self) -> dict:
        # Exit 1 while degraded (a required agent down): the JSON is there all the same.
        import json

        return json.loads(self.run(AGENTVISOR, "status", "--json", check=False).stdout)

    def stop(self) -> None:
        """Stop the unit, then end the machine."""
        self.run("systemctl", "stop", self.unit, check=False)
        self.machine.shutdown()
