"""What each agent uses (memory, CPU, threads, fds) and what to do when it is too much.

An agent is a process *tree*: legacy agents fork workers and shell out, and a leak in a
worker is the agent's leak. So usage is summed over the agent's process and all of its
descendants. `ResourceSampler` owns the psutil handles (CPU percent is a delta against the
previous sample, so a handle must live from one sample to the next) and finds the
descendants with one scan of /proc per round, however many agents there are.
`check_limits` is pure: usage and limits in, verdicts out; the watcher decides when.

On a host with a delegated cgroup v2 subtree (systemd `Delegate=yes`), `set_memory_max`
adds the kernel's own limit as a backstop beneath the sampled one; see its docstring.
"""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import psutil

from supervisor.config.model import ResourceLimits

_MB = 1024 * 1024


@dataclass(frozen=True)
class Usage:
    """One sample of an agent's process tree. `cpu_percent` is of one CPU, as `top`
    shows it (a tree busy on two cores reads 200). `rss_mb` adds each process's RSS, so
    pages a forked worker still shares with its parent count twice: it errs high."""

    rss_mb: float
    cpu_percent: float
    threads: int
    fds: int


class LimitKind(enum.StrEnum):
    MEMORY = "memory"
    CPU = "cpu"
    THREADS = "threads"


@dataclass(frozen=True)
class Verdict:
    kind: LimitKind
    enforced: bool  # True: restart the agent (memory). False: report and warn.
    value: float
    limit: float
    message: str  # "memory 2100 MB over limit 2048 MB"


def check_limits(usage: Usage, limits: ResourceLimits) -> list[Verdict]:
    """Every limit `usage` is over. Memory is enforced because a leak only grows and the
    OOM killer would otherwise pick a victim for us; CPU and threads are warned, because
    a busy agent may be doing exactly its job."""
    verdicts = []
    if limits.memory_mb is not None and usage.rss_mb > limits.memory_mb:
        verdicts.append(Verdict(LimitKind.MEMORY, True, usage.rss_mb, limits.memory_mb,
                                f"memory {usage.rss_mb:.0f} MB over limit {limits.memory_mb} MB"))
    if limits.cpu_percent is not None and usage.cpu_percent > limits.cpu_percent:
        verdicts.append(Verdict(LimitKind.CPU, False, usage.cpu_percent, limits.cpu_percent,
                                f"cpu {usage.cpu_percent:.0f}% over limit {limits.cpu_percent:g}%"))
    if limits.max_threads is not None and usage.threads > limits.max_threads:
        verdicts.append(Verdict(LimitKind.THREADS, False, usage.threads, limits.max_threads,
                                f"threads {usage.threads} over limit {limits.max_threads}"))
    return verdicts


# A process is (pid, start time in clock ticks): a pid alone may have been reused since
# the last sample, and then its CPU delta would be against a stranger.
_Key = tuple[int, int]


class ResourceSampler:
    def __init__(self) -> None:
        self._handles: dict[_Key, psutil.Process] = {}
        self._trees: dict[int, set[_Key]] = {}  # agent pid -> the processes last seen

    def sample(self, pid: int) -> Usage | None:
        """Usage of `pid` and its descendants; None once `pid` has exited."""
        return self.sample_many([pid])[pid]

    def sample_many(self, pids: Iterable[int]) -> dict[int, Usage | None]:
        """`sample` for every agent at once, with a single scan of /proc."""
        stats = self._scan()
        children: dict[int, list[int]] = {}
        for p, (ppid, _, _) in stats.items():
            children.setdefault(ppid, []).append(p)
        return {pid: self._sample_tree(pid, stats, children) for pid in pids}

    def forget(self, pid: int) -> None:
        """Drop the handles of an agent that has exited, or is no longer ours to watch."""
        for key in self._trees.pop(pid, ()):
            self._handles.pop(key, None)

    def _sample_tree(self, root: int, stats: dict[int, tuple[int, int, str]],
                     children: dict[int, list[int]]) -> Usage | None:
        # An exited agent not yet reaped by its watcher is a zombie: it is gone.
        if root not in stats or stats[root][2] == "Z":
            self.forget(root)
            return None
        tree: set[_Key] = set()
        rss = cpu = 0.0
        threads = fds = 0
        todo = [root]
        while todo:
            pid = todo.pop()
            todo.extend(children.get(pid, ()))
            _, start, state = stats[pid]
            if state == "Z":
                continue
            key = (pid, start)
            try:
                proc = self._handles.get(key)
                if proc is None:
                    proc = psutil.Process(pid)
                with proc.oneshot():
                    # First call on a new handle returns 0.0: a process forked since the
                    # last round contributes CPU from the next round on.
                    p_cpu = proc.cpu_percent(None)
                    p_rss = proc.memory_info().rss
                    p_threads = proc.num_threads()
                    p_fds = _num_fds(proc)
            except psutil.NoSuchProcess:
                if pid == root:
                    self.forget(root)
                    return None
                continue  # a worker that exited mid-sample
            self._handles[key] = proc
            tree.add(key)
            rss += p_rss
            cpu += p_cpu
            threads += p_threads
            fds += p_fds
        for gone in self._trees.get(root, set()) - tree:
            self._handles.pop(gone, None)
        self._trees[root] = tree
        return Usage(rss_mb=rss / _MB, cpu_percent=cpu, threads=threads, fds=fds)

    def _scan(self) -> dict[int, tuple[int, int, str]]:
        """pid -> (ppid, start time, state) for every process, from /proc/PID/stat.
        This is psutil's own method for children(); doing it once per round instead of
        once per agent keeps a 77-agent host at one /proc walk per interval."""
        stats = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    raw = f.read()
            except OSError:  # exited while we walked
                continue
            # The command name (field 2) may hold spaces and parentheses; everything
            # after its closing parenthesis is space-separated numbers.
            fields = raw[raw.rfind(b")") + 2:].split()
            stats[int(name)] = (int(fields[1]), int(fields[19]), fields[0].decode())
        return stats


def _num_fds(proc: psutil.Process) -> int:
    try:
        return proc.num_fds()
    except psutil.AccessDenied:  # an agent under another uid, supervisor not root
        return 0


# --- cgroup v2: the kernel's memory limit as a backstop -----------------------------

# The supervisor's own processes move here: cgroup v2 lets a cgroup either hold
# processes or enable controllers for its children, not both ("no internal processes").
SUPERVISOR_CGROUP = "supervisor"


def cgroup_v2_dir(proc_self: Path = Path("/proc/self")) -> Path | None:
    """The supervisor's own cgroup v2 directory, if it may create per-agent memory
    limits there: the memory controller is available to it and it can write its
    `cgroup.subtree_control` (what systemd's `Delegate=yes` grants). None otherwise:
    cgroup v1 or hybrid hosts without memory on the unified tree, undelegated services,
    containers with a read-only cgroupfs. None means "rely on sampling alone"."""
    try:
        rel = next((line[3:] for line in (proc_self / "cgroup").read_text().splitlines()
                    if line.startswith("0::")), None)
        mount = _cgroup2_mount(proc_self / "mountinfo")
        if rel is None or mount is None:
            return None
        mount_point, mount_root = mount
        if mount_root != "/" and rel.startswith(mount_root):
            rel = rel[len(mount_root):]  # the mount shows only part of the hierarchy
        path = mount_point / rel.lstrip("/")
        if "memory" not in (path / "cgroup.controllers").read_text().split():
            return None
    except OSError:
        return None
    writable = os.access(path, os.W_OK) and os.access(path / "cgroup.subtree_control", os.W_OK)
    return path if writable else None


def set_memory_max(dirpath: Path, name: str, memory_mb: int) -> Path:
    """Create (or reuse) the child cgroup `dirpath/name` for one agent, with
    `memory.max` = `memory_mb` and `memory.oom.group` = 1, and return its path.

    `dirpath` is what `cgroup_v2_dir()` returned. The first call moves every process in
    `dirpath` (the supervisor, and anything it started there) into
    `dirpath/supervisor` and enables the memory controller for `dirpath`'s children; the
    kernel refuses the latter while `dirpath` holds processes.

    Best-effort: raises OSError when the kernel refuses. The caller logs that and relies
    on the sampled limit alone. The agent is not moved: call `add_process` right after
    spawning it (a process it forks before that stays outside the limit). With the
    kernel limit in place the OOM killer acts at `memory_mb` before a sampling round
    sees it; `memory.oom.group` makes it kill the agent's whole tree, so the watcher sees
    one clean exit instead of a half-dead agent.
    """
    if not name or "/" in name or name.startswith((".", "cgroup.")) or name == SUPERVISOR_CGROUP:
        raise ValueError(f"{name!r} cannot name an agent's cgroup")
    _enable_memory_for_children(dirpath)
    path = dirpath / name
    path.mkdir(exist_ok=True)
    (path / "memory.max").write_text(f"{memory_mb * _MB}\n")
    try:
        (path / "memory.oom.group").write_text("1\n")
    except OSError:  # kernels before 4.19: the limit still holds, per process
        pass
    return path


def add_process(cgroup: Path, pid: int) -> None:
    """Move `pid` into `cgroup` (a path from `set_memory_max`). Raises OSError."""
    (cgroup / "cgroup.procs").write_text(f"{pid}\n")


def _enable_memory_for_children(dirpath: Path) -> None:
    control = dirpath / "cgroup.subtree_control"
    if "memory" in control.read_text().split():
        return
    pids = (dirpath / "cgroup.procs").read_text().split()
    if pids:
        leaf = dirpath / SUPERVISOR_CGROUP
        leaf.mkdir(exist_ok=True)
        for pid in pids:  # the kernel takes one pid per write
            try:
                add_process(leaf, int(pid))
            except ProcessLookupError:
                pass
    control.write_text("+memory\n")


def _cgroup2_mount(mountinfo: Path) -> tuple[Path, str] | None:
    """(mount point, root within the hierarchy) of the cgroup2 filesystem."""
    for line in mountinfo.read_text().splitlines():
        left, sep, right = line.partition(" - ")
        if sep and right.split(" ", 1)[0] == "cgroup2":
            fields = left.split()
            return Path(_unescape(fields[4])), _unescape(fields[3])
    return None


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash in paths as \ooo octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)
