"""Transparent interception as an operator gets it: `intercept: transparent` and `user:`
in the host config, and the supervisor does the rest (nftables rules on start, gone on
stop), inside a network namespace this test creates.

The agent is a plain TCP request/response client run as nobody. It dials the upstream's
real address; the sidecar answers for it, applies the upstream's policy and counts it.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from supervisor.traffic import table_for
from tests.integration import test_transparent as transparent
from tests.integration.harness import pid_alive, wait_until
from tests.integration.test_transparent import ECHO, NOBODY, SYSTEM_PYTHON

ns = transparent.ns  # its fixture: a network namespace where nft works, or a skip

UPSTREAM_PORT = 7001
METRICS_PORT = 9901

CLIENT = f"""
import socket, sys, time
out = open(sys.argv[1], "a", buffering=1)
while True:
    try:
        with socket.create_connection(("127.0.0.1", {UPSTREAM_PORT}), timeout=5) as s:
            s.sendall(b"ping")
            out.write("reply " + s.recv(100).decode() + "\\n")
    except OSError as e:
        out.write(f"error {{type(e).__name__}}\\n")
    time.sleep(0.05)
"""

# A legacy agent that forks a worker into its own process group and waits.
FORKING_AGENT = """
import os, sys, time
pid = os.fork()
if pid == 0:
    while True:
        time.sleep(60)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(pid))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
while True:
    time.sleep(60)
"""


def _one_transparent_agent(fleet, public_dir: Path, script: str, arg: Path, **extra) -> None:
    """The host config of these tests: upstream Echo, and one agent "Client" running
    `script arg` from public_dir as nobody, intercepted transparently."""
    fleet.write_config({
        "upstreams": {"Echo": {"address": f"127.0.0.1:{UPSTREAM_PORT}"}},
        "sidecar": {"metrics_listen": f"127.0.0.1:{METRICS_PORT}"},
        "pc2_services": [{
            "name": "Client", "command": [SYSTEM_PYTHON, str(public_dir / script), str(arg)],
            "user": NOBODY, "intercept": "transparent",
            "cwd": str(public_dir),  # a folder its user may enter
            **extra,
        }],
    })


@pytest.fixture
def public_dir():
    # nobody cannot enter pytest's 0700 tmp: the agent's script and results live here.
    d = Path(tempfile.mkdtemp(prefix="agentvisor-transparent-"))
    os.chmod(d, 0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _tables(ns) -> set[str]:
    """The inet tables in the namespace, by name."""
    return {line.split()[-1] for line in ns.tables().splitlines()
            if line.startswith("table inet ")}


def test_supervisor_installs_redirects_and_the_agent_goes_through_the_sidecar(
        ns, fleet, public_dir):
    ns.spawn(SYSTEM_PYTHON, "-c", ECHO, str(UPSTREAM_PORT)).expect(lambda l: l == "ready")
    (public_dir / "client.py").write_text(CLIENT)
    results = public_dir / "results.txt"
    results.touch()
    os.chmod(results, 0o666)
    _one_transparent_agent(fleet, public_dir, "client.py", results,
                           restart={"start_s": 0.2})
    fleet.start(prefix=("ip", "netns", "exec", ns.name))
    fleet.wait_state("Client", "RUNNING")
    assert fleet.agent("sidecar")["state"] == "RUNNING"
    wait_until(lambda: "reply ping" in results.read_text(), 10, "a reply through the sidecar")
    # Its runtime dir's own table (not production's `agentvisor`: this is a test run).
    table = table_for(fleet.runtime_dir)
    assert "meta skuid 65534" in ns.run("nft", "list", "table", "inet", table).stdout
    # The sidecar, not the upstream directly, carried it: its breaker for Echo saw it.
    metrics = ns.run(SYSTEM_PYTHON, "-c", "import urllib.request; print(urllib.request."
                     f"urlopen('http://127.0.0.1:{METRICS_PORT}/metrics').read().decode())")
    ok = [l for l in metrics.stdout.splitlines() if l.startswith(
        'agentvisor_sidecar_requests_total{outcome="ok",upstream="Echo"}')]
    assert ok and float(ok[0].split()[-1]) >= 1, metrics.stdout[-2000:]
    rows = json.loads(fleet.cli("breakers", "--json").stdout)
    assert [r["name"] for r in rows if r["upstream"] == "Echo"] == ["Echo"]
    assert fleet.stop() == 0
    # Rules are removed on stop: nothing of ours is left in the host's firewall.
    assert _tables(ns) == set()


def _killed_with_leftovers(ns, fleet, public_dir) -> int:
    """A supervisor with a transparent agent, SIGKILLed: returns the surviving worker's
    pid. The agent dies with the supervisor (PDEATHSIG); the worker it forked does not,
    and nothing removed the nftables table."""
    (public_dir / "forking.py").write_text(FORKING_AGENT)
    worker_pid_file = public_dir / "worker.pid"
    _one_transparent_agent(fleet, public_dir, "forking.py", worker_pid_file)
    fleet.start(prefix=("ip", "netns", "exec", ns.name))
    fleet.wait_state("Client", "RUNNING")
    worker = int(wait_until(lambda: worker_pid_file.exists() and worker_pid_file.read_text(),
                            10, "the agent's worker"))
    refused = ns.run(*fleet_cli(fleet, "cleanup"), check=False)
    # Never under a live supervisor: it owns what it started.
    assert refused.returncode == 1 and "is already running on" in refused.stderr
    table = table_for(fleet.runtime_dir)
    assert table in _tables(ns)
    fleet.kill()  # SIGKILL: nothing of its own shutdown runs
    assert pid_alive(worker) and table in _tables(ns)
    return worker


def test_cleanup_undoes_what_a_killed_supervisor_left(ns, fleet, public_dir):
    # What the unit's ExecStopPost= runs after a crash (test_systemd_pid1 runs it there).
    worker = _killed_with_leftovers(ns, fleet, public_dir)

    def cleanup() -> subprocess.CompletedProcess:
        return ns.run(*fleet_cli(fleet, "cleanup", "--json"), check=False)

    done = cleanup()
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["problems"] == []
    lines = report["done"]
    assert any(line.startswith("killed Client: process group") for line in lines), lines
    table = table_for(fleet.runtime_dir)
    assert f"removed nftables table inet {table} (transparent redirects)" in lines
    wait_until(lambda: not pid_alive(worker), 5, "the orphaned worker to be gone")
    assert _tables(ns) == set()
    again = cleanup()
    assert (again.returncode, json.loads(again.stdout)) == (0, {"done": [], "problems": []})


def fleet_cli(fleet, *args: str) -> list[str]:
    """`agentvisor ARGS` for this fleet's runtime dir, as a command line."""
    return [sys.executable, "-m", "supervisor.cli", *args, "--runtime-dir",
            str(fleet.runtime_dir)]


def test_the_next_start_removes_leftovers_whatever_its_config(ns, fleet, public_dir):
    worker = _killed_with_leftovers(ns, fleet, public_dir)
    fleet.write_config({"pc2_services": [{"name": "Plain", "command": [
        SYSTEM_PYTHON, "-c", "import time; time.sleep(600)"]}]})  # nothing transparent
    fleet.start(prefix=("ip", "netns", "exec", ns.name))
    fleet.wait_state("Plain", "RUNNING")
    assert _tables(ns) == set()
    assert not pid_alive(worker)
    log = fleet.supervisor_log()
    table = table_for(fleet.runtime_dir)
    assert f"left by a previous supervisor: removed nftables table inet {table} " in log
    assert "left by a previous supervisor: killed Client: process group" in log
