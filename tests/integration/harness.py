"""Real supervisors for tests: a config and agent scripts in a temp folder, `agentvisor
run` as a real child process, and the real control socket to ask it things.

Nothing here sleeps to synchronise: `wait_until` polls a condition against a deadline
and fails with the last thing it saw.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from supervisor.control.client import Unreachable, request

ROOT = Path(__file__).resolve().parents[2]
POLL_S = 0.02  # how often wait_until re-checks; the deadline is what bounds a test


def wait_until(condition, timeout_s: float = 10.0, what="condition"):
    """Return condition()'s first truthy value; fail after timeout_s with the last value.
    `what` may be a callable, to describe the state at the moment of failure."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(POLL_S)
    what = what() if callable(what) else what
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; last: {last!r}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Fleet:
    """One host: a folder with agents/ scripts, host.yaml, run/ and logs/."""

    def __init__(self, tmp_path: Path):
        self.dir = tmp_path
        self.runtime_dir = tmp_path / "run"
        self.logs_dir = tmp_path / "logs"
        self.config_path = tmp_path / "host.yaml"
        self.proc: subprocess.Popen | None = None
        (tmp_path / "agents").mkdir(exist_ok=True)

    def script(self, name: str, body: str) -> str:
        path = self.dir / "agents" / name
        path.write_text(textwrap.dedent(body))
        return f"agents/{name}"

    def write_config(self, config: dict) -> None:
        base = {"host": "TestHost", "runtime_dir": str(self.runtime_dir),
                "logs": {"dir": str(self.logs_dir)}, "python": sys.executable}
        self.config_path.write_text(yaml.safe_dump({**base, **config}, sort_keys=False))

    def start(self, env: dict | None = None, wait_socket: bool = True,
              prefix: tuple[str, ...] = ()) -> subprocess.Popen:
        """Run the supervisor (prefix: e.g. `ip netns exec NS` to run it elsewhere)."""
        self.stderr_path = self.dir / "supervisor.log"
        self._stderr = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "supervisor.cli", "run", "--config",
             str(self.config_path),
             "--log-level", "debug"],
            cwd=ROOT, stdout=self._stderr, stderr=subprocess.STDOUT,
            # `run` honours $AGENTVISOR_RUNTIME_DIR over the config's runtime_dir: one
            # exported in the shell running the tests must not move this supervisor.
            env={**{k: v for k, v in os.environ.items() if k != "AGENTVISOR_RUNTIME_DIR"},
                 **(env or {})},
        )
        if wait_socket:
            # Answering, not merely present: a supervisor killed before leaves its socket.
            wait_until(lambda: self._answers() or self.proc.poll() is not None, 15,
                       "the control socket to answer")
            assert self.proc.poll() is None, self.supervisor_log()
        return self.proc

    def _answers(self) -> bool:
        try:
            self.status()
            return True
        except (Unreachable, OSError):
            return False

    def supervisor_log(self) -> str:
        return self.stderr_path.read_text() if self.stderr_path.exists() else ""

    def ask(self, cmd: str, **fields) -> dict:
        return request(self.runtime_dir, {"cmd": cmd, **fields}, timeout_s=60)

    def status(self) -> dict:
        return self.ask("status")

    def agent(self, name: str) -> dict:
        for row in self.status()["agents"]:
            if row["name"] == name:
                return row
        raise KeyError(name)

    def wait_state(self, name: str, state: str, timeout_s: float = 15.0) -> dict:
        return wait_until(lambda: (lambda a: a if a["state"] == state else None)(self.agent(name)),
                          timeout_s, lambda: f"{name} to be {state} (now: {self._states()})")

    def _states(self) -> str:
        try:
            return ", ".join(f"{a['name']}={a['state']}" for a in self.status()["agents"])
        except Exception as exc:  # the supervisor may be gone; say so
            return f"unavailable ({exc})"

    def cli(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "supervisor.cli", *args], cwd=ROOT, capture_output=True,
            text=True, timeout=timeout_s,
            env={**os.environ, "AGENTVISOR_RUNTIME_DIR": str(self.runtime_dir)},
        )

    def stop(self, timeout_s: float = 30) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        finally:
            self._stderr.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def parse_json(text: str):
    return json.loads(text)


class StandaloneSidecar:
    """`python -m sidecar.main` on its own, from a config dict, compiled or interpreted,
    ready when started; its log kept for the test to read."""

    def __init__(self, workdir: Path, config: dict, *, pure: bool = False):
        self.metrics_port = int(config["sidecar"]["metrics_listen"].rsplit(":", 1)[1])
        self.config_path = workdir / "sidecar.yaml"
        self.config_path.write_text(json.dumps(config))  # JSON is YAML
        self.log_path = workdir / "sidecar.log"
        env = dict(os.environ, AGENTVISOR_PURE_PYTHON="1" if pure else "0")
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sidecar.main", "--config", str(self.config_path)],
                cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        wait_until(lambda: self.ready() or self.proc.poll() is not None, 20,
                   "the sidecar to be ready")

    def ready(self) -> bool:
        return self.get("/ready")[0] == 200

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}",
                                        timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            return 0, ""

    def descriptors(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
