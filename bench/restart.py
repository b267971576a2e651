"""Restart latency and the supervisor's own cost, measured on a real supervisor.

1. Crash -> replacement running: an agent whose first statement reports (pid, monotonic
   clock) over UDP is SIGKILLed once it has run past start_s (so each restart is a *first*
   restart: immediate by policy); the time from the kill to the new pid's report is the
   restart latency. The same script started directly by this bench, in the same run, gives
   the interpreter's own start-up time: the peer to subtract.
2. 100 idle agents (TCP health probes at the fleet's 30 s interval, resource sampling on):
   the supervisor's CPU (percent of one core) and RSS over a window once all are RUNNING.

Targets (issue 2): restart p50 under 50 ms; under 1 % of one core and under 80 MB RSS.
Usage: python bench/restart.py [--restarts N] [--agents N] [--window S] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from supervisor.control.client import request  # noqa: E402

REPORTER = """\
import os, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(f"{os.getpid()} {time.clock_gettime_ns(time.CLOCK_MONOTONIC)}".encode(),
         ("127.0.0.1", int(os.environ["REPORT_PORT"])))
while True:
    time.sleep(1000)
"""

IDLE = """\
import os, socket
srv = socket.create_server(("127.0.0.1", int(os.environ["AGENT_PORT"])))
while True:
    srv.accept()[0].close()
"""


def percentile(values, p):
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_supervisor(folder: Path, config: dict) -> subprocess.Popen:
    path = folder / "host.yaml"
    path.write_text(yaml.safe_dump({"host": "bench", "runtime_dir": str(folder / "run"),
                                    "logs": {"dir": str(folder / "logs")},
                                    "python": sys.executable, **config}))
    proc = subprocess.Popen([sys.executable, "-m", "supervisor.cli", "run", "--config",
                             str(path), "--log-level", "warning"], cwd=ROOT,
                            stderr=open(folder / "supervisor.log", "wb"))
    deadline = time.monotonic() + 30
    while not (folder / "run" / "control.sock").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit((folder / "supervisor.log").read_text())
        time.sleep(0.05)
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


def measure_restarts(folder: Path, n: int) -> dict:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(10)
    port = udp.getsockname()[1]
    (folder / "reporter.py").write_text(REPORTER)
    proc = start_supervisor(folder, {"pc2_services": [{
        "name": "Crasher", "script_path": "reporter.py", "env_vars": {"REPORT_PORT": str(port)},
        # A run past start_s resets the backoff: each measured restart is a first restart.
        "restart": {"start_s": 0.05, "max_failures": 100000, "window_s": 1},
    }]})
    latencies = []
    try:
        pid, _ = map(int, udp.recv(100).split())
        for _ in range(n):
            time.sleep(0.1)  # let it run past start_s (this is the load, not a sync)
            t_kill = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            os.kill(pid, signal.SIGKILL)
            while True:
                new_pid, t_up = map(int, udp.recv(100).split())
                if new_pid != pid:
                    break
            latencies.append((t_up - t_kill) / 1e6)
            pid = new_pid
    finally:
        stop(proc)
    # The peer: the same script started straight from here, no supervisor in between.
    direct = []
    for _ in range(max(10, n // 2)):
        t0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        child = subprocess.Popen([sys.executable, str(folder / "reporter.py")],
                                 env={**os.environ, "REPORT_PORT": str(port)})
        _, t_up = map(int, udp.recv(100).split())
        direct.append((t_up - t0) / 1e6)
        child.kill()
        child.wait()
    return {"restarts": n, "restart_ms_p50": percentile(latencies, 50),
            "restart_ms_p95": percentile(latencies, 95),
            "restart_ms_max": max(latencies),
            "interpreter_start_ms_p50": percentile(direct, 50),
            "supervisor_overhead_ms_p50": percentile(latencies, 50) - percentile(direct, 50)}


def measure_idle(folder: Path, n_agents: int, window_s: float) -> dict:
    (folder / "idle.py").write_text(IDLE)
    agents = []
    for i in range(n_agents):
        port = free_port()
        agents.append({"name": f"Idle{i:03d}", "script_path": "idle.py", "port": port,
                       "env_vars": {"AGENT_PORT": str(port)}})
    config = {"global_settings": {"health_checks": {"interval_seconds": 30,
                                                    "timeout_seconds": 10, "retries": 3}},
              "pc2_services": agents}
    proc = start_supervisor(folder, config)
    runtime = folder / "run"
    try:
        t0 = time.monotonic()
        while True:
            status = request(runtime, {"cmd": "status"})
            running = sum(a["state"] == "RUNNING" for a in status["agents"])
            if running == n_agents:
                break
            if time.monotonic() - t0 > 120:
                raise SystemExit(f"only {running}/{n_agents} agents RUNNING after 120 s")
            time.sleep(0.2)
        all_up_s = time.monotonic() - t0
        sup = psutil.Process(proc.pid)
        cpu0, w0 = sup.cpu_times(), time.monotonic()
        time.sleep(window_s)  # the measurement window itself
        cpu1, w1 = sup.cpu_times(), time.monotonic()
        busy = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
        return {"agents": n_agents, "all_running_s": round(all_up_s, 2),
                "window_s": round(w1 - w0, 1),
                "supervisor_cpu_percent": 100 * busy / (w1 - w0),
                "supervisor_rss_mb": sup.memory_info().rss / 2**20}
    finally:
        stop(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--restarts", type=int, default=50)
    ap.add_argument("--agents", type=int, default=100)
    ap.add_argument("--window", type=float, default=30.0, help="idle window, seconds")
    ap.add_argument("--json", type=Path, default=ROOT / "bench/results/restart.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        r = measure_restarts(Path(a), args.restarts)
        idle = measure_idle(Path(b), args.agents, args.window)
    result = {"restart": r, "idle": idle, "python": sys.version.split()[0],
              "cpus": os.cpu_count(), "when": time.strftime("%Y-%m-%d %H:%M")}
    rows = [
        ("crash -> replacement running, p50", f"{r['restart_ms_p50']:.1f} ms", "< 50 ms"),
        ("  p95 / max", f"{r['restart_ms_p95']:.1f} / {r['restart_ms_max']:.1f} ms", ""),
        ("  of which interpreter start-up (peer), p50", f"{r['interpreter_start_ms_p50']:.1f} ms", ""),
        ("  supervisor's share, p50", f"{r['supervisor_overhead_ms_p50']:.1f} ms", ""),
        (f"supervisor CPU, {idle['agents']} idle agents", f"{idle['supervisor_cpu_percent']:.2f} % of a core", "< 1 %"),
        (f"supervisor RSS, {idle['agents']} idle agents", f"{idle['supervisor_rss_mb']:.1f} MB", "< 80 MB"),
        (f"time until all {idle['agents']} agents RUNNING", f"{idle['all_running_s']:.1f} s", ""),
    ]
    w = max(len(r[0]) for r in rows)
    print(f"{'measure':<{w}}  {'result':<22}  target")
    for name, value, target in rows:
        print(f"{name:<{w}}  {value:<22}  {target}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n({args.restarts} restarts, {idle['window_s']} s idle window; JSON: {args.json})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
