"""One supervisor per runtime directory, with plain values: which runtime directory a
command uses, the nftables table a runtime directory owns, and the lock itself (two
acquisitions in one process conflict just as two processes do: flock belongs to the
open file, not to the process)."""

import hashlib
import os
from pathlib import Path

import pytest

from sidecar.proxy import nftables
from supervisor import paths, runtime_lock
from supervisor.traffic import table_for


def test_the_deployed_runtime_dir_keeps_the_table_deployed_hosts_have():
    assert table_for(Path("/run/agentvisor")) == "agentvisor"
    assert table_for(Path("/run/agentvisor/")) == "agentvisor"
    assert table_for(Path("/run/../run/agentvisor")) == "agentvisor"
    assert paths.SYSTEM_RUNTIME_DIR == Path("/run/agentvisor")


def test_every_other_runtime_dir_has_a_table_of_its_own():
    one, two = table_for(Path("/tmp/pytest/run")), table_for(Path("/tmp/pytest/run2"))
    assert one == "agentvisor_" + hashlib.sha256(b"/tmp/pytest/run").hexdigest()[:10]
    assert one != two != "agentvisor"
    for name in (one, two):
        assert nftables._TABLE_NAME.match(name), name  # usable unquoted in an nft script
    # The same directory however it is written: absolute, relative, with a trailing /.
    assert table_for(Path("/tmp/pytest/run/")) == one
    here = Path.cwd()
    assert table_for(Path("some/run")) == table_for(here / "some" / "run")


def test_the_table_follows_symlinks_to_the_directory_itself(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    assert table_for(tmp_path / "link") == table_for(real)


def test_a_flag_beats_the_environment_which_beats_the_default(monkeypatch):
    monkeypatch.delenv(paths.RUNTIME_DIR_ENV, raising=False)
    assert paths.runtime_dir_override(None) is None
    assert paths.runtime_dir(None) == paths.default_runtime_dir()
    monkeypatch.setenv(paths.RUNTIME_DIR_ENV, "/tmp/from-env")
    assert paths.runtime_dir_override(None) == Path("/tmp/from-env")
    assert paths.runtime_dir(None) == Path("/tmp/from-env")
    assert paths.runtime_dir(Path("/tmp/from-flag")) == Path("/tmp/from-flag")
    monkeypatch.setenv(paths.RUNTIME_DIR_ENV, "")  # set but empty: as if unset
    assert paths.runtime_dir(None) == paths.default_runtime_dir()


def test_a_second_lock_on_the_same_dir_is_refused_with_the_holders_pid(tmp_path):
    run = tmp_path / "run"
    with runtime_lock.acquire(run) as first:
        assert (run / paths.LOCK_FILE).read_text() == f"{os.getpid()}\n"
        with pytest.raises(runtime_lock.AlreadyRunning) as refused:
            runtime_lock.acquire(run)
        assert refused.value.pid == os.getpid()
        assert str(refused.value) == \
            f"a supervisor (pid {os.getpid()}) is already running on {run}"
        # Another directory is another supervisor's business.
        with runtime_lock.acquire(tmp_path / "other"):
            pass
        assert first.held
    assert not first.held
    with runtime_lock.acquire(run):  # released: the next one gets it
        pass


def test_a_lock_file_left_with_a_dead_pid_does_not_block(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / paths.LOCK_FILE).write_text("999999999\n")  # nobody holds it
    with runtime_lock.acquire(run) as lock:
        assert (run / paths.LOCK_FILE).read_text() == f"{os.getpid()}\n"
        assert lock.runtime_dir == run


def test_the_lock_is_not_inherited_by_children(tmp_path):
    with runtime_lock.acquire(tmp_path / "run") as lock:
        assert not os.get_inheritable(lock._fd)
