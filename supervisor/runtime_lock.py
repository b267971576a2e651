"""One supervisor per runtime directory.

Everything in a runtime directory (the control socket, the record of agents' process
groups, the agents' secret files) and the nftables table named after it belong to the
one supervisor running there. A second `agentvisor run` on the same directory must not
touch any of it (without a lock, it killed the first one's agents as "leftovers"). So
`run` takes an exclusive flock on runtime_dir/supervisor.lock before it does anything,
and holds it for its whole life; `cleanup` takes the same lock for the little while it
works. The kernel drops the lock when its holder dies, SIGKILL and OOM included, so a
dead supervisor never blocks the next start, and what it left is then cleaned up under
the lock.

The holder's pid is written into the file, only so that a refusal can name it. A
supervisor of a version from before this lock answers on the control socket instead:
that refuses too.

The file is never removed: removing it would let a newcomer lock a new file while an old
holder still holds the removed one. Its descriptor is close-on-exec, so agents never
inherit it (an orphaned agent would otherwise keep the lock after its supervisor died).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from pathlib import Path

from supervisor.paths import LOCK_FILE, SOCKET_FILE

# How long a refusal waits for a lock-less (older) supervisor to say its pid.
_STATUS_TIMEOUT_S = 2.0


class AlreadyRunning(Exception):
    """Another supervisor owns this runtime directory; nothing was touched."""

    def __init__(self, runtime_dir: Path, pid: int | None):
        self.runtime_dir, self.pid = runtime_dir, pid
        who = f"a supervisor (pid {pid})" if pid else "a supervisor"
        super().__init__(f"{who} is already running on {runtime_dir}")


class RuntimeLock:
    """Held: this process is the runtime directory's one supervisor until release()."""

    def __init__(self, runtime_dir: Path, fd: int):
        self.runtime_dir = runtime_dir
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # no pid of a process that no longer holds it
        except OSError:
            pass
        os.close(fd)  # and with it the flock

    def __enter__(self) -> "RuntimeLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(runtime_dir: Path) -> RuntimeLock:
    """Make this process the supervisor of runtime_dir (creating the folder if need be),
    or raise AlreadyRunning naming the one that is; OSError when the folder or the lock
    file cannot be made (a path under a file, no permission)."""
    runtime_dir = Path(os.path.abspath(runtime_dir))
    runtime_dir.mkdir(parents=True, exist_ok=True)
    path = runtime_dir / LOCK_FILE
    fd = _lock(path)
    try:
        pid = _answering_pid(runtime_dir)  # an older supervisor, without this lock
        if pid is not False:
            raise AlreadyRunning(runtime_dir, pid)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return RuntimeLock(runtime_dir, fd)


def _lock(path: Path) -> int:
    """An fd of `path` holding its exclusive flock; AlreadyRunning if another has it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _pid_in(fd)
            os.close(fd)
            raise AlreadyRunning(path.parent, pid) from None
        except BaseException:
            os.close(fd)
            raise
        # Locked, but is it still the file at `path`? If someone removed or replaced it
        # in between (an operator's rm, a RuntimeDirectory= removed by systemd), the
        # next supervisor would lock the new file beside us: lock that one instead.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _pid_in(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _answering_pid(runtime_dir: Path) -> int | None | bool:
    """False when nothing listens on runtime_dir's control socket; else the pid of the
    supervisor there (its `status` says), or None when it does not say."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(_STATUS_TIMEOUT_S)
    try:
        try:
            conn.connect(str(runtime_dir / SOCKET_FILE))
        except (FileNotFoundError, ConnectionRefusedError):
            return False  # absent, or left by a supervisor that died
        except OSError as exc:
            if exc.errno == errno.ENOTSOCK:
                return False  # not a socket: nobody can be serving on it
            return None  # a socket we may not use, or too busy to accept: somebody's
        try:
            conn.sendall(json.dumps({"cmd": "status"}).encode() + b"\n")
            reply = json.loads(b"".join(iter(lambda: conn.recv(65536), b"")))
        except (OSError, ValueError):
            return None  # it accepted the connection: something serves there
    finally:
        conn.close()
    pid = reply.get("pid") if isinstance(reply, dict) else None
    return pid if isinstance(pid, int) and pid > 0 else None
