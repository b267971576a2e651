"""One supervisor per runtime directory, as an operator meets it.

A second `agentvisor run` on a runtime directory where one already runs (named by the
config, by --runtime-dir or by $AGENTVISOR_RUNTIME_DIR) refuses at once, naming the
first one's pid, and touches nothing of it: not its agents, not its control socket, not
its record of process groups. `cleanup` refuses the same way. A SIGKILLed supervisor
blocks nobody: the kernel drops its lock, and the next start cleans up after it.

Each runtime directory has its own nftables table: a supervisor or a `cleanup` on one
never removes another's redirects, production's (`agentvisor`, for /run/agentvisor)
included. Those tests run in a network namespace of their own (see test_transparent).
"""

import json
import os
import subprocess
import sys

import pytest
import yaml

from supervisor.paths import LOCK_FILE, SOCKET_FILE
from supervisor.traffic import NFT_TABLE, table_for
from tests.integration import test_transparent as transparent
from tests.integration import test_transparent_supervised as supervised
from tests.integration.harness import ROOT, Fleet, pid_alive, wait_until

# Their fixtures: a network namespace with nft usable in it (else the test is skipped,
# saying why), and a folder the agent's user (nobody) may enter.
ns = transparent.ns
public_dir = supervised.public_dir

# A legacy agent with a worker in its process group: the group a second supervisor
# used to SIGKILL as "left behind", and a record in agents.json worth checking.
FORKER = """
import os, subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"])
with open(os.environ["WORKER_PID_FILE"] + ".tmp", "w") as f:
    f.write(str(worker.pid))
os.rename(os.environ["WORKER_PID_FILE"] + ".tmp", os.environ["WORKER_PID_FILE"])
time.sleep(1000)
"""


def _forker_config(fleet: Fleet) -> dict:
    return {"pc2_services": [{
        "name": "Forker", "script_path": fleet.script("forker.py", FORKER),
        "restart": {"start_s": 0.1},
        "env_vars": {"WORKER_PID_FILE": str(fleet.dir / "worker.pid")}}]}


def _running_forker(fleet: Fleet) -> dict:
    """Start the fleet's supervisor with Forker; what an operator would see of it once
    it runs and has recorded its agent's process group."""
    fleet.write_config(_forker_config(fleet))
    fleet.start()
    agent = fleet.wait_state("Forker", "RUNNING")
    worker = int(wait_until(lambda: (fleet.dir / "worker.pid").exists()
                            and (fleet.dir / "worker.pid").read_text(), 10, "the worker"))
    records = fleet.runtime_dir / "agents.json"
    wait_until(lambda: records.exists() and str(agent["pid"]) in records.read_text(), 5,
               "the agent's process group in agents.json")
    return _snapshot(fleet) | {"worker": worker}


def _snapshot(fleet: Fleet) -> dict:
    status = fleet.status()  # answers, or this raises
    return {
        "supervisor": status["pid"],
        "agent": {a["name"]: a["pid"] for a in status["agents"]}["Forker"],
        "socket_inode": os.stat(fleet.runtime_dir / SOCKET_FILE).st_ino,
        "records": (fleet.runtime_dir / "agents.json").read_text(),
        "lock": (fleet.runtime_dir / LOCK_FILE).read_text(),
    }


def _untouched(fleet: Fleet, before: dict) -> None:
    after = _snapshot(fleet)
    assert after == {k: before[k] for k in after}, (before, after)
    assert pid_alive(before["agent"]) and pid_alive(before["worker"])
    assert fleet.agent("Forker")["state"] == "RUNNING"
    assert fleet.proc.poll() is None


def _agentvisor(*args: str, env: dict | None = None,
                timeout_s: float = 60) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "AGENTVISOR_RUNTIME_DIR"}
    return subprocess.run([sys.executable, "-m", "supervisor.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout_s,
                          env={**base, **(env or {})})


@pytest.mark.parametrize("named_by", ["config", "flag", "environment"])
def test_a_second_run_on_the_same_runtime_dir_refuses_and_touches_nothing(fleet, named_by):
    before = _running_forker(fleet)
    # The second supervisor's own file names another runtime dir: only the flag or the
    # environment sends it to the first's (or, for "config", the same file does).
    other = fleet.dir / "other.yaml"
    other.write_text(yaml.safe_dump({
        **yaml.safe_load(fleet.config_path.read_text()),
        "runtime_dir": str(fleet.dir / "elsewhere")}))
    args, env = {
        "config": (["--config", str(fleet.config_path)], None),
        "flag": (["--config", str(other), "--runtime-dir", str(fleet.runtime_dir)], None),
        "environment": (["--config", str(other)],
                        {"AGENTVISOR_RUNTIME_DIR": str(fleet.runtime_dir)}),
    }[named_by]
    second = _agentvisor("run", *args, env=env, timeout_s=30)
    assert second.returncode == 1, second.stderr
    assert (f"agentvisor: a supervisor (pid {before['supervisor']}) is already running on "
            f"{fleet.runtime_dir}; not starting") in second.stderr
    assert "Traceback" not in second.stderr
    _untouched(fleet, before)
    assert not (fleet.dir / "elsewhere").exists()
    # The first is still in charge: it still stops its agent when asked.
    assert fleet.cli("restart", "Forker").returncode == 0


def test_run_puts_its_socket_where_the_environment_says(fleet):
    fleet.write_config(_forker_config(fleet))
    # The file names a decoy: the environment wins, as it does for client commands.
    decoy = fleet.dir / "decoy"
    config = yaml.safe_load(fleet.config_path.read_text())
    fleet.config_path.write_text(yaml.safe_dump({**config, "runtime_dir": str(decoy)}))
    fleet.start(env={"AGENTVISOR_RUNTIME_DIR": str(fleet.runtime_dir)})
    fleet.wait_state("Forker", "RUNNING")
    out = fleet.cli("status", "--json")  # finds it through the same variable
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["runtime_dir"] == str(fleet.runtime_dir)
    assert status["nftables_table"] == table_for(fleet.runtime_dir)
    assert (fleet.runtime_dir / SOCKET_FILE).is_socket()
    assert not decoy.exists()
    # A reload keeps it there (the override is kept across reloads).
    assert fleet.cli("reload").returncode == 0
    assert json.loads(fleet.cli("status", "--json").stdout)["runtime_dir"] == \
        str(fleet.runtime_dir)
    assert not decoy.exists()


def test_cleanup_refuses_while_a_supervisor_holds_the_dir_and_a_killed_one_blocks_nobody(
        fleet):
    before = _running_forker(fleet)
    refused = fleet.cli("cleanup")
    assert refused.returncode == 1
    assert (f"agentvisor: a supervisor (pid {before['supervisor']}) is already running on "
            f"{fleet.runtime_dir} and owns what it started; nothing done") in refused.stderr
    _untouched(fleet, before)

    fleet.kill()  # SIGKILL: its lock goes with it, its worker and records stay
    wait_until(lambda: not pid_alive(before["agent"]), 5, "the agent to die with it")
    assert pid_alive(before["worker"])
    assert (fleet.runtime_dir / LOCK_FILE).read_text() == f"{before['supervisor']}\n"
    fleet.start()  # not refused: nobody holds the lock, whatever pid the file says
    wait_until(lambda: not pid_alive(before["worker"]), 10, "the leftover to be killed")
    assert "left by a previous supervisor: killed Forker: process group" in \
        fleet.supervisor_log()
    fleet.wait_state("Forker", "RUNNING")
    assert (fleet.runtime_dir / LOCK_FILE).read_text() == f"{fleet.proc.pid}\n"


def test_cleanup_removes_the_secret_files_a_dead_supervisor_left(fleet):
    # As a SIGKILLed supervisor leaves them: an agent's private folder, 0400 in 0500.
    # With RuntimeDirectoryPreserve=yes systemd no longer removes them: cleanup must.
    folder = fleet.runtime_dir / "secrets" / "Reader"
    folder.mkdir(parents=True)
    (folder / "CERT_KEY").write_text("key-material")
    (folder / "CERT_KEY").chmod(0o400)
    folder.chmod(0o500)
    done = fleet.cli("cleanup", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["done"] == [
        f"removed the secret files of 1 agent ({fleet.runtime_dir / 'secrets'})"]
    assert not folder.exists()


# An agentvisor from before the lock: answers on the control socket, holds no lock.
OLD_SUPERVISOR = """
import json, os, socket, sys
srv = socket.socket(socket.AF_UNIX)
srv.bind(sys.argv[1])
srv.listen()
print("ready", flush=True)
while True:
    c, _ = srv.accept()
    with c:
        if c.recv(65536):
            c.sendall(json.dumps({"ok": True, "pid": os.getpid()}).encode() + b"\\n")
"""


def test_a_supervisor_without_the_lock_is_found_by_its_socket(fleet):
    fleet.write_config(_forker_config(fleet))
    fleet.runtime_dir.mkdir()
    old = subprocess.Popen([sys.executable, "-c", OLD_SUPERVISOR,
                            str(fleet.runtime_dir / SOCKET_FILE)],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert old.stdout.readline().strip() == "ready"
        inode = os.stat(fleet.runtime_dir / SOCKET_FILE).st_ino
        second = _agentvisor("run", "--config", str(fleet.config_path), timeout_s=30)
        assert second.returncode == 1, second.stderr
        assert f"a supervisor (pid {old.pid}) is already running on {fleet.runtime_dir}" \
            in second.stderr
        assert os.stat(fleet.runtime_dir / SOCKET_FILE).st_ino == inode  # not unlinked
        assert fleet.cli("cleanup").returncode == 1
        assert old.poll() is None
    finally:
        old.kill()
        old.wait()


# --- nftables: one table per runtime directory --------------------------------------


def _tables(ns) -> set[str]:
    """The inet tables in the namespace, by name."""
    return {line.split()[-1] for line in ns.tables().splitlines()
            if line.startswith("table inet ")}


def test_a_runtime_dir_removes_only_its_own_nftables_table(ns, tmp_path, public_dir):
    (tmp_path / "second").mkdir()
    second = Fleet(tmp_path / "second")
    theirs = table_for(tmp_path / "first" / "run")  # another test supervisor's
    ours = table_for(second.runtime_dir)
    assert len({theirs, ours, NFT_TABLE}) == 3
    # Another test supervisor's redirects, and production's, as a crash would leave
    # them or as they stand while those supervisors run.
    for table in (theirs, NFT_TABLE):
        ns.run("nft", "add", "table", "inet", table)
    (public_dir / "idle.py").write_text("import time\nwhile True: time.sleep(60)\n")
    supervised._one_transparent_agent(second, public_dir, "idle.py", public_dir / "unused")
    try:
        second.start(prefix=("ip", "netns", "exec", ns.name))
        second.wait_state("Client", "RUNNING")
        assert _tables(ns) == {theirs, ours, NFT_TABLE}  # installed its own, beside them
        assert json.loads(second.cli("status", "--json").stdout)["nftables_table"] == ours
        assert second.stop() == 0
        assert _tables(ns) == {theirs, NFT_TABLE}  # removed its own, and only it
        done = ns.run(sys.executable, "-m", "supervisor.cli", "cleanup", "--json",
                      "--runtime-dir", str(second.runtime_dir), cwd=ROOT)
        assert json.loads(done.stdout) == {"done": [], "problems": []}
        assert _tables(ns) == {theirs, NFT_TABLE}
        # A SIGKILLed supervisor's table is its own runtime dir's to clean up.
        second.start(prefix=("ip", "netns", "exec", ns.name))
        second.wait_state("Client", "RUNNING")
        second.kill()
        assert ours in _tables(ns)
        done = ns.run(sys.executable, "-m", "supervisor.cli", "cleanup", "--json",
                      "--runtime-dir", str(second.runtime_dir), cwd=ROOT)
        assert f"removed nftables table inet {ours} (transparent redirects)" in \
            json.loads(done.stdout)["done"]
        assert _tables(ns) == {theirs, NFT_TABLE}
    finally:
        second.kill()

