"""Which cgroup an agent gets: one of its own only under a cgroup the supervisor owns
(a systemd service's), never at the root or in a login session's shared one."""

import signal

from supervisor import process


def fake_host(tmp_path, own: str, kill_file: bool = True):
    mount = tmp_path / "cgroup"
    home = mount / own.strip("/")
    home.mkdir(parents=True, exist_ok=True)
    if kill_file:
        (home / "cgroup.kill").write_text("")
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(f"0::{own}\n")
    (proc / "mountinfo").write_text(
        f"30 24 0:26 / {mount} rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n")
    return proc, home


def test_a_service_supervisor_gives_each_agent_a_cgroup_beside_itself(tmp_path):
    proc, home = fake_host(tmp_path, "/system.slice/agentvisor.service")
    assert process.agent_cgroup("Hub", proc_self=proc) == home / "Hub"
    assert (home / "Hub").is_dir()
    # Moved aside by the memory limit: agents still go beside the supervisor's leaf.
    (proc / "cgroup").write_text("0::/system.slice/agentvisor.service/supervisor\n")
    assert process.agent_cgroup("Hub", proc_self=proc) == home / "Hub"
    assert process.agent_cgroup("cgroup.procs", proc_self=proc) is None


def test_no_cgroup_at_the_root_in_a_session_or_without_cgroup_kill(tmp_path):
    for own, kill in (("/", True), ("/user.slice/user-0.slice/session-3.scope", True),
                      ("/system.slice/old.service", False)):
        case = tmp_path / (own.strip("/").replace("/", "_") or "root")
        case.mkdir()
        proc, _ = fake_host(case, own, kill_file=kill)
        assert process.agent_cgroup("Hub", proc_self=proc) is None, own


def test_a_kill_empties_the_cgroup_in_one_write(tmp_path):
    cgroup = tmp_path / "Hub"
    cgroup.mkdir()
    (cgroup / "cgroup.kill").write_text("")
    (cgroup / "cgroup.procs").write_text("")
    lineage = process.Lineage(2**22 + 4321, cgroup)  # no such leader: only the cgroup acts
    lineage.signal(signal.SIGKILL)
    assert (cgroup / "cgroup.kill").read_text() == "1"
    assert lineage.remaining() == []
