"""Resource sampling of real process trees, the limit verdicts, and the cgroup v2 paths
(on a fake tree: this host's cgroup v2 has no memory controller)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.config.model import ResourceLimits
from tests.integration.harness import wait_until
from supervisor.resources import (
    SUPERVISOR_CGROUP,
    LimitKind,
    ResourceSampler,
    Usage,
    Verdict,
    add_process,
    cgroup_v2_dir,
    check_limits,
    set_memory_max,
)

# The agent holds 60 MB and forks a worker that holds 40 MB and spins, the way a legacy
# agent forks a busy worker. Each says it is ready only once its memory is touched.
WORKER = """
ballast = b"\\x01" * (40 << 20)
print("ready", flush=True)
while True:
    pass
"""
AGENT = """
import subprocess, sys
ballast = b"\\x01" * (60 << 20)
worker = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE)
assert worker.stdout.readline() == b"ready\\n"
print(worker.pid, flush=True)
sys.stdin.read()  # until the test goes away
"""


def readline(proc: subprocess.Popen, deadline_s: float = 10.0) -> bytes:
    ready, _, _ = select.select([proc.stdout], [], [], deadline_s)
    assert ready, "child did not answer in time"
    return proc.stdout.readline()


@pytest.fixture
def agent():
    proc = subprocess.Popen([sys.executable, "-c", AGENT, WORKER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, start_new_session=True)
    try:
        worker_pid = int(readline(proc))
        yield proc, worker_pid
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_usage_is_summed_over_the_agent_and_its_worker(agent):
    proc, worker_pid = agent
    sampler = ResourceSampler()
    usage = sampler.sample(proc.pid)
    assert usage is not None
    # 60 + 40 MB of ballast plus two interpreters: the worker's 40 MB must be in it.
    assert usage.rss_mb >= 100, usage
    assert usage.threads >= 2 and usage.fds >= 6, usage

    # The worker spins: CPU is a delta between samples, so it shows from the second on.
    usage = wait_until(lambda: (lambda u: u if u.cpu_percent >= 20 else None)(
        sampler.sample(proc.pid)), 10, "the busy worker's CPU to show")


def test_memory_over_limit_is_an_enforced_verdict(agent):
    proc, _ = agent
    usage = ResourceSampler().sample(proc.pid)
    assert usage is not None
    verdicts = check_limits(usage, ResourceLimits(memory_mb=50))
    assert [(v.kind, v.enforced) for v in verdicts] == [(LimitKind.MEMORY, True)]
    assert verdicts[0].message == f"memory {usage.rss_mb:.0f} MB over limit 50 MB"
    assert check_limits(usage, ResourceLimits(memory_mb=4096)) == []


def test_a_gone_process_samples_as_none(agent):
    proc, worker_pid = agent
    sampler = ResourceSampler()
    assert sampler.sample(proc.pid) is not None
    os.killpg(proc.pid, signal.SIGKILL)
    # Exited but not yet reaped (a zombie) is already gone for the sampler...
    wait_until(lambda: sampler.sample(proc.pid) is None, 5, "a killed agent to sample as gone")
    proc.wait()
    # ...and so is a pid nobody has any more.
    assert sampler.sample(proc.pid) is None
    assert sampler._handles == {} and sampler._trees == {}


def test_sample_many_and_forget(agent):
    proc, worker_pid = agent
    sampler = ResourceSampler()
    gone = subprocess.Popen(["true"])
    gone.wait()
    both = sampler.sample_many([proc.pid, gone.pid])
    assert both[proc.pid] is not None and both[gone.pid] is None
    sampler.forget(proc.pid)
    assert sampler._handles == {}


# --- check_limits: pure ----------------------------------------------------------------


def test_cpu_and_threads_are_warned_not_enforced():
    usage = Usage(rss_mb=100.0, cpu_percent=150.0, threads=120, fds=10)
    verdicts = check_limits(usage, ResourceLimits(memory_mb=2048, cpu_percent=80, max_threads=100))
    assert verdicts == [
        Verdict(LimitKind.CPU, False, 150.0, 80, "cpu 150% over limit 80%"),
        Verdict(LimitKind.THREADS, False, 120, 100, "threads 120 over limit 100"),
    ]
    assert verdicts[0].kind == "cpu"  # a StrEnum: plain strings compare equal


def test_at_the_limit_is_not_over_it_and_no_limits_means_no_verdicts():
    usage = Usage(rss_mb=2048.0, cpu_percent=80.0, threads=100, fds=10)
    limits = ResourceLimits(memory_mb=2048, cpu_percent=80, max_threads=100)
    assert check_limits(usage, limits) == []
    assert check_limits(Usage(1e6, 1e6, 10**6, 10**6), ResourceLimits()) == []


def test_memory_message_reads_like_the_operator_expects():
    [v] = check_limits(Usage(2100.4, 0, 1, 3), ResourceLimits(memory_mb=2048))
    assert v.message == "memory 2100 MB over limit 2048 MB" and v.enforced


# --- cgroup v2 -------------------------------------------------------------------------


def fake_host(tmp_path: Path, controllers: str = "cpu memory pids",
              cgroup: str = "/system.slice/x.service", mount_root: str = "/") -> tuple[Path, Path]:
    """A /proc/self and a cgroup2 mount, as files: (proc_self, our cgroup dir)."""
    mount = tmp_path / "cg root"  # a space, escaped as \\040 in mountinfo
    ours = mount / (cgroup if mount_root == "/" else cgroup[len(mount_root):]).lstrip("/")
    ours.mkdir(parents=True)
    (ours / "cgroup.controllers").write_text(controllers + "\n")
    (ours / "cgroup.subtree_control").write_text("\n")
    (ours / "cgroup.procs").write_text("")
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(f"4:memory:/x\n0::{cgroup}\n")
    escaped = str(mount).replace(" ", "\\040")
    (proc / "mountinfo").write_text(
        "22 1 0:20 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
        f"35 22 0:30 {mount_root} {escaped} rw,nosuid - cgroup2 cgroup2 rw\n")
    return proc, ours


def test_cgroup_v2_dir_finds_our_delegated_cgroup(tmp_path: Path):
    proc, ours = fake_host(tmp_path)
    assert cgroup_v2_dir(proc) == ours


def test_cgroup_v2_dir_within_a_cgroup_namespace_mount(tmp_path: Path):
    proc, ours = fake_host(tmp_path, cgroup="/system.slice/x.service", mount_root="/system.slice")
    assert cgroup_v2_dir(proc) == ours


def test_cgroup_v2_dir_none_without_the_memory_controller(tmp_path: Path):
    proc, _ = fake_host(tmp_path, controllers="cpu pids")
    assert cgroup_v2_dir(proc) is None


def test_cgroup_v2_dir_none_without_cgroup2(tmp_path: Path):
    proc, _ = fake_host(tmp_path)
    (proc / "mountinfo").write_text("22 1 0:20 / /sys/fs/cgroup/memory rw - cgroup cgroup rw\n")
    assert cgroup_v2_dir(proc) is None
    assert cgroup_v2_dir(tmp_path / "no-such-proc") is None


def test_cgroup_v2_dir_on_this_host_is_none_or_usable():
    found = cgroup_v2_dir()
    assert found is None or "memory" in (found / "cgroup.controllers").read_text().split()


def test_set_memory_max_moves_us_out_enables_memory_and_limits_the_agent(tmp_path: Path):
    _, ours = fake_host(tmp_path)
    (ours / "cgroup.procs").write_text("4242\n")  # the supervisor, before delegation
    path = set_memory_max(ours, "ServiceRegistry", 512)
    assert path == ours / "ServiceRegistry"
    assert (path / "memory.max").read_text() == f"{512 * 1024 * 1024}\n"
    assert (path / "memory.oom.group").read_text() == "1\n"
    assert (ours / SUPERVISOR_CGROUP / "cgroup.procs").read_text() == "4242\n"
    assert (ours / "cgroup.subtree_control").read_text() == "+memory\n"
    add_process(path, 777)
    assert (path / "cgroup.procs").read_text() == "777\n"


def test_set_memory_max_refuses_names_that_are_not_a_cgroup(tmp_path: Path):
    _, ours = fake_host(tmp_path)
    for bad in ("", "../escape", ".hidden", "cgroup.procs", SUPERVISOR_CGROUP):
        with pytest.raises(ValueError):
            set_memory_max(ours, bad, 512)


def test_set_memory_max_raises_oserror_when_the_kernel_refuses(tmp_path: Path):
    with pytest.raises(OSError):
        set_memory_max(tmp_path / "not-a-cgroup", "agent", 512)
