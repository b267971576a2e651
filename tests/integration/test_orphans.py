"""Processes an agent starts do not outlive it, even those that leave its process group
and session with setsid(): a stop (of the agent or of the whole supervisor) ends them.

Where the supervisor has a cgroup v2 subtree of its own the kernel does it (cgroup.kill);
elsewhere, as on this test machine, the descendants the supervisor has seen are killed
one by one. These tests pass either way."""

import os

import psutil
import pytest

from tests.integration.harness import pid_alive, wait_until

# The agent forks a child that leaves the agent's session and process group, then
# reports that child's pid so the test can watch it without guessing.
ESCAPER = """
import os, sys, time
pid = os.fork()
if pid == 0:
    os.setsid()
    os.close(1)
    os.close(2)
    while True:
        time.sleep(1000)
with open(os.environ["ESCAPED_PID_FILE"], "w") as f:
    f.write(str(pid))
print("forked", pid, flush=True)
while True:
    time.sleep(1000)
"""


def escaper(fleet, pid_file):
    return {"name": "Escaper", "script_path": fleet.script("escaper.py", ESCAPER),
            "restart": {"start_s": 0.1, "stop_grace_s": 1},
            "env_vars": {"ESCAPED_PID_FILE": str(pid_file)}}


def escaped_pid(fleet, pid_file, leader: int) -> int:
    text = wait_until(lambda: pid_file.exists() and pid_file.read_text(), 10,
                      "the agent to report its setsid child")
    pid = int(text)
    child = psutil.Process(pid)
    # It really did escape: its own session and group, so killpg of the agent misses it.
    assert os.getsid(pid) == pid and os.getpgid(pid) != os.getpgid(leader)
    assert child.ppid() == leader
    return pid


@pytest.mark.parametrize("how", ["agent", "supervisor"])
def test_a_setsid_grandchild_dies_when_its_agent_is_stopped(fleet, how):
    pid_file = fleet.dir / "escaped.pid"
    fleet.write_config({"pc2_services": [escaper(fleet, pid_file)]})
    fleet.start()
    row = fleet.wait_state("Escaper", "RUNNING")
    grandchild = escaped_pid(fleet, pid_file, row["pid"])
    try:
        if how == "agent":
            out = fleet.cli("stop", "Escaper")
            assert out.returncode == 0, out.stderr + out.stdout
        else:
            assert fleet.stop() == 0
        assert not pid_alive(row["pid"])
        wait_until(lambda: not pid_alive(grandchild), 5,
                   "the setsid grandchild to be killed with its agent")
    finally:
        if pid_alive(grandchild):
            os.kill(grandchild, 9)  # never leave a stray behind, even when the test fails
