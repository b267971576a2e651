"""Secrets with real child processes: the agent gets its value; no command line, status
output or supervisor log holds it; every unsafe or missing file is refused with its own
message and stops only the agent that needs it; rotation restarts exactly the agents
that use the secret, one at a time.

The store is a real tmpfs folder under /dev/shm (what systemd's LoadCredential= gives)."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from tests.integration.harness import ROOT, wait_until

VALUE = "nats-Pa55w0rd-7f3c9e21"  # distinctive, to grep every output for

DUMPER = """
import hashlib, os, sys, time
out = os.environ["RESULTS"]
value = os.environ.get("NATS_PASSWORD", "")
folder = os.environ.get("SECRETS_DIR")
files = {n: open(os.path.join(folder, n)).read() for n in os.listdir(folder)} if folder else {}
with open(out, "a") as f:
    f.write(repr({"pid": os.getpid(), "env": value, "files": files, "t": time.monotonic()}) + "\\n")
while True:
    time.sleep(1000)
"""


@pytest.fixture
def store():
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm (tmpfs) on this machine")
    d = Path(tempfile.mkdtemp(prefix="agentvisor-secrets-", dir="/dev/shm"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def put(store: Path, name: str, value: str, mode: int = 0o400) -> Path:
    path = store / name
    if path.exists():
        os.chmod(path, 0o600)
    tmp = store / f".{name}.tmp"
    tmp.write_text(value + "\n")
    os.chmod(tmp, mode)
    os.replace(tmp, path)  # how operators rotate: a new file, renamed into place
    return path


def runs(path: Path) -> list[dict]:
    return [eval(line) for line in path.read_text().splitlines()] if path.exists() else []


def agent(fleet, name, results, **extra):
    return {"name": name, "script_path": fleet.script("dumper.py", DUMPER),
            "restart": {"start_s": 0.1},
            "env_vars": {"RESULTS": str(results), **extra.pop("env", {})}, **extra}


def test_agent_gets_its_secret_and_nothing_else_shows_it(fleet, store):
    put(store, "NATS_PASSWORD", VALUE)
    out = fleet.dir / "runs.txt"
    fleet.write_config({
        "secrets": {"dir": str(store), "names": ["NATS_PASSWORD"]},
        "pc2_services": [agent(fleet, "Nats", out, env={"NATS_PASSWORD": "${NATS_PASSWORD}"})],
    })
    fleet.start()
    row = fleet.wait_state("Nats", "RUNNING")
    wait_until(lambda: runs(out), 5, "the agent's report")
    assert runs(out)[0]["env"] == VALUE
    for proc in psutil.process_iter(["cmdline"]):
        assert VALUE not in " ".join(proc.info["cmdline"] or ()), proc
    assert VALUE not in fleet.cli("status", "--json").stdout
    assert VALUE not in fleet.cli("status").stdout
    assert VALUE not in fleet.config_path.read_text()
    sup_env = open(f"/proc/{fleet.proc.pid}/environ", "rb").read().decode(errors="replace")
    assert VALUE not in sup_env
    assert row["pid"]
    fleet.stop()
    assert VALUE not in fleet.supervisor_log()


def test_each_unsafe_or_missing_secret_has_its_own_error_and_stops_only_its_agent(
        fleet, store, tmp_path):
    out = fleet.dir / "runs.txt"
    put(store, "OPEN", VALUE, mode=0o644)
    as_root = os.geteuid() == 0  # only root can give a file to another owner
    if as_root:
        put(store, "FOREIGN", VALUE)
        os.chown(store / "FOREIGN", 65534, 65534)
    outside = tmp_path / "elsewhere"
    outside.write_text(VALUE)
    os.chmod(outside, 0o400)
    os.symlink(outside, store / "ESCAPE")
    disk = tmp_path / "disk-store"
    disk.mkdir()
    put(disk, "ONDISK", VALUE)
    names = ["OPEN", *(["FOREIGN"] if as_root else []), "ESCAPE", "MISSING", "GOOD"]
    put(store, "GOOD", VALUE)
    fleet.write_config({
        "secrets": {"dir": str(store), "names": names},
        "pc2_services": [agent(fleet, f"Uses{n.title()}", out, env={"S": "${%s}" % n})
                         for n in names],
    })
    fleet.start()
    fleet.wait_state("UsesGood", "RUNNING")
    reasons = {}
    for n in names[:-1]:
        reasons[n] = fleet.wait_state(f"Uses{n.title()}", "FATAL")["reason"]
    assert "readable by group or others (mode 0644)" in reasons["OPEN"]
    if as_root:
        assert "owned by uid 65534" in reasons["FOREIGN"]
    assert "symlink out of" in reasons["ESCAPE"]
    assert "does not exist" in reasons["MISSING"]
    for reason in reasons.values():
        assert VALUE not in reason
    assert fleet.agent("UsesGood")["restarts"] == 0
    # A missing secret that appears is picked up: its agent starts by itself.
    put(store, "MISSING", "now-here")
    fleet.wait_state("UsesMissing", "RUNNING")


def test_a_secret_on_disk_is_refused_unless_allowed(fleet, tmp_path):
    disk = tmp_path / "disk-store"
    disk.mkdir()
    put(disk, "TOKEN", VALUE)
    out = fleet.dir / "runs.txt"
    fleet.write_config({
        "secrets": {"dir": str(disk), "names": ["TOKEN"]},
        "pc2_services": [agent(fleet, "Svc", out, env={"TOKEN": "${TOKEN}"})],
    })
    fleet.start()
    reason = fleet.wait_state("Svc", "FATAL")["reason"]
    assert "not tmpfs/ramfs" in reason and "require_memory_fs" in reason


def test_rotation_restarts_exactly_the_agents_that_use_it_one_at_a_time(fleet, store):
    put(store, "A", "a-one")
    put(store, "B", "b-one")
    outs = {n: fleet.dir / f"{n}.txt" for n in ("A1", "A2", "B1", "None1")}
    fleet.write_config({
        "secrets": {"dir": str(store), "names": ["A", "B"], "poll_s": 0.1},
        "pc2_services": [
            agent(fleet, "A1", outs["A1"], env={"NATS_PASSWORD": "${A}"}),
            agent(fleet, "A2", outs["A2"], env={"NATS_PASSWORD": "${A}"}),
            agent(fleet, "B1", outs["B1"], env={"NATS_PASSWORD": "${B}"}),
            agent(fleet, "None1", outs["None1"]),
        ]})
    fleet.start()
    for n in outs:
        fleet.wait_state(n, "RUNNING")
    before = {n: fleet.agent(n)["pid"] for n in outs}
    put(store, "A", "a-two")
    wait_until(lambda: len(runs(outs["A1"])) == 2 and len(runs(outs["A2"])) == 2, 15,
               "both users of A restarted")
    assert [r["env"] for r in runs(outs["A1"])] == ["a-one", "a-two"]
    assert [r["env"] for r in runs(outs["A2"])] == ["a-one", "a-two"]
    # One at a time: the second restart was spawned only once the first was up again.
    first, second = sorted(("A1", "A2"), key=lambda n: runs(outs[n])[1]["t"])
    log = fleet.supervisor_log()
    first_ready = log.index(f"{first}: STARTING -> RUNNING",
                            log.index(f"{first}: started, pid {runs(outs[first])[1]['pid']}"))
    second_spawned = log.index(f"{second}: started, pid {runs(outs[second])[1]['pid']}")
    assert first_ready < second_spawned
    assert fleet.agent("B1")["pid"] == before["B1"]
    assert fleet.agent("None1")["pid"] == before["None1"]
    assert len(runs(outs["B1"])) == 1


def test_secret_files_folder_is_private_to_the_agent_and_removed_on_stop(fleet, store):
    put(store, "NATS_PASSWORD", VALUE)
    put(store, "CERT_KEY", "key-material")
    put(store, "OTHER", "not-for-this-agent")
    out = fleet.dir / "runs.txt"
    fleet.runtime_dir = Path(tempfile.mkdtemp(prefix="agentvisor-run-", dir="/dev/shm"))
    try:
        fleet.write_config({
            "secrets": {"dir": str(store), "names": ["NATS_PASSWORD", "CERT_KEY", "OTHER"]},
            "pc2_services": [agent(fleet, "Reader", out,
                                   env={"NATS_PASSWORD": "${NATS_PASSWORD}"},
                                   secrets={"files": ["CERT_KEY"], "files_env": "SECRETS_DIR"})],
        })
        fleet.start()
        fleet.wait_state("Reader", "RUNNING")
        wait_until(lambda: runs(out), 5, "the agent's report")
        assert runs(out)[0]["files"] == {"NATS_PASSWORD": VALUE, "CERT_KEY": "key-material"}
        folder = fleet.runtime_dir / "secrets" / "Reader"
        assert oct(folder.stat().st_mode & 0o777) == "0o500"
        assert {oct(p.stat().st_mode & 0o777) for p in folder.iterdir()} == {"0o400"}
        assert fleet.cli("stop", "Reader").returncode == 0
        assert not folder.exists()
    finally:
        fleet.stop()
        shutil.rmtree(fleet.runtime_dir, ignore_errors=True)


def test_sealed_secrets_are_unsealed_at_start_and_tampering_is_refused(fleet, store, tmp_path):
    key, sealed_dir = tmp_path / "host.key", tmp_path / "sealed"
    sealed_dir.mkdir()
    assert fleet.cli("secrets", "keygen", "--key", str(key)).returncode == 0
    sealing = subprocess.run(
        [sys.executable, "-m", "supervisor.cli", "secrets", "seal", "NATS_PASSWORD", "--key",
         str(key), "--out", str(sealed_dir)], input=VALUE + "\n", capture_output=True,
        text=True, cwd=ROOT, timeout=30)
    assert sealing.returncode == 0, sealing.stderr
    assert VALUE not in (sealed_dir / "NATS_PASSWORD.sealed").read_text()
    out = fleet.dir / "runs.txt"
    fleet.write_config({
        "secrets": {"dir": str(store), "sealed_dir": str(sealed_dir), "key_file": str(key),
                    "names": ["NATS_PASSWORD"]},
        "pc2_services": [agent(fleet, "Nats", out, env={"NATS_PASSWORD": "${NATS_PASSWORD}"})],
    })
    fleet.start()
    fleet.wait_state("Nats", "RUNNING")
    wait_until(lambda: runs(out), 5, "the agent's report")
    assert runs(out)[0]["env"] == VALUE
    assert oct((store / "NATS_PASSWORD").stat().st_mode & 0o777) == "0o400"
    assert fleet.stop() == 0

    # One altered byte: the supervisor says so, and the agent that needs it does not start.
    sealed_file = sealed_dir / "NATS_PASSWORD.sealed"
    header, body = sealed_file.read_text().splitlines()
    sealed_file.write_text(f"{header}\n{body[:10]}{'A' if body[10] != 'A' else 'B'}{body[11:]}\n")
    os.unlink(store / "NATS_PASSWORD")
    fleet.start()
    fleet.wait_state("Nats", "FATAL")
    assert "authentication failed" in fleet.supervisor_log()
    assert VALUE not in fleet.supervisor_log()


def test_a_secret_refused_for_its_mode_or_owner_is_used_once_fixed(fleet, store):
    # The refusal says `chmod 0400 it`; doing so changes neither content nor mtime, only
    # the mode, and the agent must not stay FATAL after the operator did as told.
    put(store, "OPEN", VALUE, mode=0o644)
    as_root = os.geteuid() == 0  # only root can give a file to another owner
    if as_root:
        put(store, "FOREIGN", VALUE)
        os.chown(store / "FOREIGN", 65534, 65534)
    names = ["OPEN", *(["FOREIGN"] if as_root else [])]
    outs = {n: fleet.dir / f"{n}.txt" for n in names}
    fleet.write_config({
        "secrets": {"dir": str(store), "names": names, "poll_s": 0.1},
        "pc2_services": [agent(fleet, f"Uses{n.title()}", outs[n],
                               env={"NATS_PASSWORD": "${%s}" % n}) for n in names],
    })
    fleet.start()
    assert "chmod 0400 it" in fleet.wait_state("UsesOpen", "FATAL")["reason"]
    if as_root:
        assert "owned by uid 65534" in fleet.wait_state("UsesForeign", "FATAL")["reason"]
    os.chmod(store / "OPEN", 0o400)
    if as_root:
        os.chown(store / "FOREIGN", os.geteuid(), os.getegid())
    for n in names:
        fleet.wait_state(f"Uses{n.title()}", "RUNNING")
        wait_until(lambda: runs(outs[n]), 5, f"Uses{n.title()}'s report")
        assert runs(outs[n])[0]["env"] == VALUE
