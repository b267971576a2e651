"""Hostile or broken config files, as the commands that read them meet them: `validate`
and the sidecar refuse an alias bomb or absurd nesting at once, with the file and line
and no traceback; and a reload whose file is slow to read leaves the supervisor
answering and systemd's watchdog fed."""

import os
import socket
import subprocess
import sys
import time

from supervisor.control.client import request
from tests.integration.harness import ROOT, free_port, wait_until

# 'Billion laughs': 342 bytes that stand for 9**9 (387 million) strings.
BOMB = "l0: &l0 [" + ", ".join(["lol"] * 9) + "]\n" + "".join(
    f"l{n}: &l{n} [" + ", ".join([f"*l{n - 1}"] * 9) + "]\n" for n in range(1, 9))
DEEP = "agents: " + "[" * 100_000 + "\n"
# Run alone, the sidecar binds its metrics listener: any free port, not the default.
SIDECAR_ALONE = f'sidecar: {{metrics_listen: "127.0.0.1:{free_port()}"}}\n'


def run(*argv, timeout_s=20):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout_s)


def test_validate_refuses_an_alias_bomb_in_seconds_with_its_line(tmp_path):
    path = tmp_path / "host.yaml"
    path.write_text(BOMB)
    started = time.monotonic()
    out = run("-m", "supervisor.cli", "validate", "--offline", str(path))
    assert time.monotonic() - started < 10
    assert out.returncode == 1, out.stderr
    (line,) = out.stdout.splitlines()
    assert line.startswith(f"{path}:6: ") and "aliases" in line
    assert "Traceback" not in out.stdout + out.stderr


def test_validate_refuses_deep_nesting_with_its_line(tmp_path):
    path = tmp_path / "host.yaml"
    path.write_text(DEEP)
    out = run("-m", "supervisor.cli", "validate", "--offline", str(path))
    assert out.returncode == 1, out.stderr
    (line,) = out.stdout.splitlines()
    assert line.startswith(f"{path}:1: ") and "nested more than 64 levels deep" in line
    assert "Traceback" not in out.stdout + out.stderr


def test_the_sidecar_refuses_the_same_files_the_same_way(tmp_path):
    for name, text, line, words in [("bomb.yaml", SIDECAR_ALONE + BOMB, 7, "aliases"),
                                    ("deep.yaml", SIDECAR_ALONE + DEEP, 2, "nested")]:
        path = tmp_path / name
        path.write_text(text)
        out = run("-m", "sidecar.main", "--config", str(path))
        assert out.returncode != 0
        assert f"{path}:{line}: " in out.stderr and words in out.stderr, out.stderr
        assert "Traceback" not in out.stderr


def test_a_reload_slow_to_read_its_file_leaves_the_supervisor_answering(fleet, tmp_path):
    notify_path = tmp_path / "notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(15)

    def until(message: str) -> None:
        while message not in notify.recv(4096).decode().splitlines():
            pass

    fleet.write_config({"pc2_services": [{"name": "Idle", "script_path": fleet.script(
        "idle.py", "import time\nwhile True:\n    time.sleep(1000)\n")}]})
    fleet.start(env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "400000"})
    until("READY=1")
    pid = fleet.wait_state("Idle", "RUNNING")["pid"]
    # A config file that is a pipe nobody writes yet: reading it takes as long as we like.
    text = fleet.config_path.read_text()
    fleet.config_path.unlink()
    os.mkfifo(fleet.config_path)
    reload = subprocess.Popen(
        [sys.executable, "-m", "supervisor.cli", "reload"], cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "AGENTVISOR_RUNTIME_DIR": str(fleet.runtime_dir)})
    try:
        until("RELOADING=1")
        # Watchdog pings every 0.2 s: three in a row mean the loop is not stuck reading.
        notify.settimeout(2)
        for _ in range(3):
            until("WATCHDOG=1")
        assert request(fleet.runtime_dir, {"cmd": "status"}, timeout_s=5)["agents"]
        assert reload.poll() is None  # still waiting for its file
    finally:
        # Hand the reader its file, whatever happened above, so the supervisor can stop.
        fd = wait_until(lambda: _open_for_reader(fleet.config_path), 10, "a reader of the pipe")
        with os.fdopen(fd, "w") as pipe:
            pipe.write(text)
    assert reload.wait(30) == 0, reload.stderr.read()
    fleet.config_path.unlink()
    fleet.config_path.write_text(text)
    assert fleet.agent("Idle")["pid"] == pid  # the same file again: nothing to change
    notify.close()


def _open_for_reader(path) -> int | None:
    try:
        return os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # ENXIO: nobody has it open for reading yet
        return None
