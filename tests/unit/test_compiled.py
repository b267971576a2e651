"""The compiled hot path: the one that is meant to run does, and a stale build is caught
before it can stand in for edited sources."""

import importlib
import importlib.machinery
import os
import subprocess
import sys
from pathlib import Path

import pytest

import sidecar
from sidecar import HOT_PATH, compile as hot_path

EXPECT = os.environ.get("AGENTVISOR_EXPECT_COMPILED")
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


@pytest.mark.skipif(EXPECT is None, reason="`make test` says which hot path it installed "
                    "(AGENTVISOR_EXPECT_COMPILED); run by hand, either may be there")
def test_the_hot_path_that_runs_is_the_one_installed():
    files = {name: importlib.import_module(name).__file__ for name in HOT_PATH}
    if EXPECT == "1":
        assert all(not f.endswith(".py") for f in files.values()), files
        assert sidecar.compiled()
    else:
        assert all(f.endswith(".py") for f in files.values()), files
        assert not sidecar.compiled()


def test_pure_python_switch_loads_sources_even_beside_compiled_modules():
    out = subprocess.run(
        [sys.executable, "-c", "import sidecar, importlib; print(sidecar.compiled(), "
         "[importlib.import_module(m).__file__.endswith('.py') for m in sidecar.HOT_PATH])"],
        env={**os.environ, "AGENTVISOR_PURE_PYTHON": "1"}, capture_output=True, text=True,
        check=True)
    assert out.stdout.strip() == "False " + str([True] * len(HOT_PATH))


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """A project tree with the hot path's sources, and a way to 'compile' one."""
    monkeypatch.setattr(hot_path, "ROOT", tmp_path)
    monkeypatch.setattr(hot_path, "STAMP", tmp_path / "sidecar" / ".compiled-stamp")
    for name in HOT_PATH:
        src = hot_path.source(name)
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_text("# source\n")
        os.utime(src, (1000, 1000))

    def build(name: str, at: float) -> Path:
        ext = hot_path.source(name).with_suffix(SUFFIX)
        ext.write_bytes(b"\x7fELF")
        os.utime(ext, (at, at))
        return ext

    return build


def test_no_compiled_module_is_not_stale(tree):
    assert hot_path.stale() == []


def test_a_current_build_is_not_stale(tree):
    for name in HOT_PATH:
        tree(name, 2000)
    assert hot_path.stale() == []


def test_an_edited_source_makes_the_build_stale(tree):
    for name in HOT_PATH:
        tree(name, 2000)
    edited = hot_path.source("sidecar.proxy.http.agent")
    os.utime(edited, (3000, 3000))
    assert hot_path.stale() == ["sidecar/proxy/http/agent.py: changed since it was compiled"]


def test_a_partial_build_is_stale_and_names_what_is_missing(tree):
    for name in HOT_PATH[:-1]:
        tree(name, 2000)
    assert hot_path.stale() == [
        f"{HOT_PATH[-1].replace('.', '/')}.py: not compiled (the group is all or none)"]


def test_remove_takes_every_compiled_file_and_the_stamp(tree):
    built = [tree(name, 2000) for name in HOT_PATH + (hot_path.GROUP_LIBRARY,)]
    hot_path.STAMP.touch()
    assert hot_path.remove() == len(HOT_PATH) + 1
    assert not any(p.exists() for p in built) and not hot_path.STAMP.exists()
    assert hot_path.stale() == []


def test_a_machine_without_compiler_or_headers_is_told_what_to_install(tree, monkeypatch, capsys):
    import shutil
    import sysconfig

    built = [tree(name, 2000) for name in HOT_PATH]
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"include": "/nowhere"})
    assert hot_path.main([]) == 1
    err = capsys.readouterr().err
    assert "no C compiler: apt-get install gcc" in err
    assert "no Python headers in /nowhere: apt-get install python3-dev" in err
    assert all(p.exists() for p in built)  # the build there stays, untouched


@pytest.mark.skipif(EXPECT != "1", reason="only where `make test` compiled the hot path")
def test_a_machine_that_compiled_has_what_the_build_needs():
    assert hot_path.missing() == []
