"""Who may use the control socket: root, the supervisor's own user, and members of the
configured group (primary or supplementary, as the kernel reports them)."""

import os

from supervisor.control import server
from supervisor.control.server import ControlServer


def make(gid):
    return ControlServer(path=None, supervisor=None, allowed_gid=gid)


def test_root_and_own_user_always_pass_others_need_the_group(monkeypatch):
    monkeypatch.setattr(server, "_supplementary_groups", lambda pid: {4242} if pid == 7 else set())
    open_to_group = make(4242)
    assert open_to_group._allowed(pid=1, uid=0, gid=0)
    assert open_to_group._allowed(pid=1, uid=os.geteuid(), gid=0)
    assert open_to_group._allowed(pid=1, uid=5000, gid=4242)  # primary group
    assert open_to_group._allowed(pid=7, uid=5000, gid=100)  # supplementary group
    assert not open_to_group._allowed(pid=8, uid=5000, gid=100)
    assert not make(None)._allowed(pid=7, uid=5000, gid=4242)  # no group configured


def test_supplementary_groups_are_read_from_proc():
    mine = set(os.getgroups())
    assert server._supplementary_groups(os.getpid()) == mine
    assert server._supplementary_groups(2**22 + 12345) == set()  # no such process
