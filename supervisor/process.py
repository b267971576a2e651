"""One child process: spawn it in its own process group, and make sure nothing it forks
outlives it.

Three guards, because each covers a case the others miss:
- every agent is a session/process-group leader, so a stop signals the whole group;
- PR_SET_PDEATHSIG makes the kernel kill the agent if the supervisor dies, even by
  SIGKILL, when there is no one left to send SIGTERM;
- the pgid and start time of every live agent are recorded in the runtime directory, and a
  supervisor that starts after a crash kills the groups its predecessor left behind
  (grandchildren are not covered by PDEATHSIG). Under systemd, KillMode=mixed and the
  service's cgroup add a fourth.
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

log = logging.getLogger("agentvisor.process")

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _child_setup(parent_pid: int, user: "Identity | None") -> None:
    # Runs in the child between fork and exec: a handful of syscalls, nothing else.
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    # The parent may have died between fork and prctl; then nobody would ever kill us.
    if os.getppid() != parent_pid:
        os._exit(1)
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
    pass_fds: Sequence[int] = (), user: str | None = None,
) -> asyncio.subprocess.Process:
    """Start argv in a new session with stdout and stderr appended to log_path,
    inheriting pass_fds, as user when given."""
    who = identity(user) if user is not None else None
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        # O_APPEND: every write lands at the current end even if someone truncates the
        # file under us (logrotate's copytruncate), so there is never a hole of NULs.
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    except OSError as exc:
        raise SpawnError(f"cannot open log file {log_path}: {exc.strerror}") from None
    parent = os.getpid()
    try:
        return await asyncio.create_subprocess_exec(
            *argv,
            cwd=str(cwd),
            env=dict(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            start_new_session=True,
            preexec_fn=lambda: _child_setup(parent, who),
            pass_fds=tuple(pass_fds),
        )
    except FileNotFoundError:
        raise SpawnError(f"cannot execute {argv[0]}: no such file") from None
    except PermissionError:
        who = f" as user {user}" if user is not None else ""
        raise SpawnError(f"permission denied{who}: cannot enter {cwd} or execute "
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
