"""One child process: spawn it in its own process group, and make sure nothing it forks
outlives it.

Guards, because each covers a case the others miss:
- every agent is a session/process-group leader, so a stop signals the whole group;
- a descendant that leaves the group with setsid() is still the agent's (`Lineage`):
  where the supervisor has a cgroup v2 subtree it may write (systemd `Delegate=yes`),
  each agent runs in a cgroup of its own, entered before exec, and a stop empties it
  with `cgroup.kill`; elsewhere the descendants seen while the agent ran are killed
  one by one (a descendant whose parent exited before anyone saw it is lost there);
- PR_SET_PDEATHSIG makes the kernel kill the agent if the supervisor dies, even by
  SIGKILL, when there is no one left to send SIGTERM;
- the pgid and start time of every live agent are recorded in the runtime directory, and a
  supervisor that starts after a crash kills the groups its predecessor left behind
  (grandchildren are not covered by PDEATHSIG). Under systemd, KillMode=mixed and the
  service's cgroup add another.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import psutil

from supervisor import resources

log = logging.getLogger("agentvisor.process")

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _child_setup(parent_pid: int, user: "Identity | None", cgroup_procs: str | None) -> None:
    # Runs in the child between fork and exec: a handful of syscalls, nothing else.
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    # The parent may have died between fork and prctl; then nobody would ever kill us.
    if os.getppid() != parent_pid:
        os._exit(1)
    if cgroup_procs is not None:
        # Before exec, so that nothing the agent forks is ever outside its cgroup. "0"
        # is the writer itself. Still root here (setuid comes after).
        try:
            fd = os.open(cgroup_procs, os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
        except OSError:
            pass  # the process group and the sampled descendants still hold
    if user is not None:
        # Groups first: after setuid we could no longer change them.
        os.setgroups(list(user.groups))
        os.setgid(user.gid)
        os.setuid(user.uid)
        # setuid clears the death signal (prctl(2)): set it again as the new user.
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int
    groups: tuple[int, ...]


def identity(user: str) -> Identity:
    """A user name or numeric uid -> who the child runs as; SpawnError if unknown."""
    import grp
    import pwd

    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, ValueError):
        if user.isdigit():  # a uid with no passwd entry is still a uid
            return Identity(int(user), int(user), ())
        raise SpawnError(f"no such user {user!r}") from None
    groups = tuple(g.gr_gid for g in grp.getgrall() if entry.pw_name in g.gr_mem)
    return Identity(entry.pw_uid, entry.pw_gid, (entry.pw_gid, *groups))


class SpawnError(Exception):
    """The agent could not be started (missing interpreter, unwritable log, ...).

    `permanent`: trying again cannot help until something outside changes (a missing
    or unsafe secret file): the agent goes FATAL at once instead of burning retries."""

    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


async def spawn(
    argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], log_path: Path,
    pass_fds: Sequence[int] = (), user: str | None = None, cgroup: Path | None = None,
) -> asyncio.subprocess.Process:
    """Start argv in a new session with stdout and stderr appended to log_path,
    inheriting pass_fds, as user when given, inside cgroup when given (see
    `agent_cgroup`)."""
    who = identity(user) if user is not None else None
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        # O_APPEND: every write lands at the current end even if someone truncates the
        # file under us (logrotate's copytruncate), so there is never a hole of NULs.
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    except OSError as exc:
        raise SpawnError(f"cannot open log file {log_path}: {exc.strerror}") from None
    parent = os.getpid()
    procs = str(cgroup / "cgroup.procs") if cgroup is not None else None
    try:
        return await asyncio.create_subprocess_exec(
            *argv,
            cwd=str(cwd),
            env=dict(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            start_new_session=True,
            preexec_fn=lambda: _child_setup(parent, who, procs),
            pass_fds=tuple(pass_fds),
        )
    except FileNotFoundError:
        raise SpawnError(f"cannot execute {argv[0]}: no such file") from None
    except PermissionError:
        as_user = f" as user {user}" if user is not None else ""
        raise SpawnError(f"permission denied{as_user}: cannot enter {cwd} or execute "
                         f"{argv[0]}") from None
    except NotADirectoryError:
        raise SpawnError(f"working directory {cwd} does not exist") from None
    except OSError as exc:
        raise SpawnError(f"cannot start {argv[0]}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def signal_group(pgid: int, sig: int) -> bool:
    """Send sig to a process group; False if the group is already empty."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        log.warning("not allowed to signal process group %d", pgid)
        return False


# --- everything an agent started -------------------------------------------------------


def agent_cgroup(name: str, proc_self: Path = Path("/proc/self")) -> Path | None:
    """A cgroup v2 for agent `name` alone (created if need be), beside the supervisor's
    own processes; None where there is none to be had, and then `Lineage` samples.

    Only under a cgroup of the supervisor's own (a systemd service's, say): at the root
    of the hierarchy, or in one shared with the rest of a login session, a child named
    after an agent could be another supervisor's. The directory is the one the memory
    limit uses (`resources.set_memory_max`), so an agent with both is in one cgroup."""
    if not name or "/" in name or name.startswith((".", "cgroup.")) or \
            name == resources.SUPERVISOR_CGROUP:
        return None
    try:
        rel = next((line[3:] for line in (proc_self / "cgroup").read_text().splitlines()
                    if line.startswith("0::")), None)
        mount = resources._cgroup2_mount(proc_self / "mountinfo")  # one parser of mountinfo
    except OSError:
        return None
    if rel is None or mount is None:
        return None
    mount_point, mount_root = mount
    if mount_root != "/" and rel.startswith(mount_root):
        rel = rel[len(mount_root):]
    rel = rel.strip("/")
    if rel.rsplit("/", 1)[-1] == resources.SUPERVISOR_CGROUP:
        rel = rel.rpartition("/")[0]  # moved aside by the memory limit: agents sit beside it
    if not rel or not _owns(rel):
        return None
    home = mount_point / rel
    if not (os.access(home, os.W_OK) and (home / "cgroup.kill").exists()):
        return None  # read-only, or a kernel before 5.14 with no one-write kill
    path = home / name
    try:
        path.mkdir(exist_ok=True)
    except OSError:
        return None
    return path


def _owns(rel: str) -> bool:
    # A cgroup systemd gave one service (or a scope it delegated): never a user's session
    # slice, where every login shares the cgroup.
    return rel.endswith((".service", ".scope")) and "/session-" not in rel


class Lineage:
    """Every process one run of an agent started: its process group, its cgroup when it
    has one, and the descendants seen while it ran (which a setsid() took out of the
    group). Processes are known by pid and start time, so a recycled pid is left alone."""

    def __init__(self, leader: int, cgroup: Path | None = None):
        self.leader = leader
        self.cgroup = cgroup
        self._seen: dict[int, float] = {}  # pid -> psutil create_time

    def observe(self) -> None:
        """Remember the leader's descendants as they are now."""
        try:
            found = psutil.Process(self.leader).children(recursive=True)
        except psutil.Error:
            return
        for child in found:
            if child.pid not in self._seen:
                try:
                    self._seen[child.pid] = child.create_time()
                except psutil.Error:
                    pass

    def signal(self, sig: int) -> None:
        """sig to the group, the cgroup and every descendant seen that still lives."""
        signal_group(self.leader, sig)
        if self.cgroup is not None:
            self._signal_cgroup(sig)
        for pid, created in list(self._seen.items()):
            try:
                if psutil.Process(pid).create_time() != created:
                    raise psutil.NoSuchProcess(pid)  # a stranger has the pid now
                os.kill(pid, sig)
            except (psutil.NoSuchProcess, ProcessLookupError):
                del self._seen[pid]
            except (psutil.Error, PermissionError):
                log.warning("not allowed to signal process %d", pid)

    def remaining(self) -> list[int]:
        """Descendants seen that are still alive (zombies count as gone)."""
        alive = []
        for pid, created in self._seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.Error:
                pass
        return alive

    def _signal_cgroup(self, sig: int) -> None:
        assert self.cgroup is not None
        try:
            if sig == signal.SIGKILL:
                (self.cgroup / "cgroup.kill").write_text("1")
                return
            pids = (self.cgroup / "cgroup.procs").read_text().split()
        except OSError as exc:
            log.warning("cannot signal cgroup %s: %s", self.cgroup, exc)
            return
        for pid in map(int, pids):
            try:
                # The group had this signal already: a second SIGTERM would find a
                # process inside its handler (a Python agent's exits by the default
                # action then, as if it had no handler at all).
                if os.getpgid(pid) == self.leader:
                    continue
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exited with status {returncode}"


# --- leftovers from a supervisor that died -----------------------------------------


@dataclass(frozen=True)
class GroupRecord:
    name: str
    pgid: int
    create_time: float  # psutil's, so a recycled pid is never mistaken for our agent


def record_for(name: str, pid: int) -> GroupRecord | None:
    try:
        return GroupRecord(name, pid, psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def write_records(path: Path, records: Sequence[GroupRecord]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([r.__dict__ for r in records]))
    os.replace(tmp, path)


def kill_leftovers(path: Path) -> list[str]:
    """Kill the process groups a previous supervisor recorded and did not stop.

    Returns a line per group killed, for the log. A record whose leader is gone is still
    checked: its group may live on in forked children.
    """
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    killed = []
    for entry in entries:
        try:
            rec = GroupRecord(**entry)
        except TypeError:
            continue
        try:
            same = psutil.Process(rec.pgid).create_time() == rec.create_time
        except psutil.NoSuchProcess:
            same = None  # leader gone; look for members of its group
        except psutil.Error:
            continue
        if same is False:
            continue  # the pid was recycled by an unrelated process
        members = [p for p in psutil.process_iter() if _pgid(p.pid) == rec.pgid]
        if members and signal_group(rec.pgid, signal.SIGKILL):
            killed.append(f"{rec.name}: process group {rec.pgid} ({len(members)} processes)")
    try:
        path.unlink()
    except OSError:
        pass
    return killed


def descendants(pid: int) -> list[int]:
    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None
