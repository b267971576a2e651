"""Every agent gets an exporter without code: the supervisor's samples of an unmodified
agent appear as agentvisor_agent_* on the host's /metrics (the sidecar's listener), and
follow the agent when it dies and comes back."""

import os
import re
import signal
import urllib.request

from tests.integration.harness import free_port, wait_until

IDLE = """
import socket, time
srv = socket.create_server(("127.0.0.1", 0))
threads = []
while True:
    time.sleep(3600)
"""


def _metrics(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            return r.read().decode()
    except OSError:
        return ""


def _value(text: str, series: str) -> float | None:
    m = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def test_an_unmodified_agent_is_exported_on_the_hosts_metrics(fleet):
    metrics = free_port()
    fleet.write_config({
        "resource_interval_s": 0.2,
        "upstreams": {"Hub": {"address": f"127.0.0.1:{free_port()}", "protocol": "http"}},
        "sidecar": {"metrics_listen": f"127.0.0.1:{metrics}"},
        "agent_groups": {"core": {"Worker": {
            "script_path": fleet.script("worker.py", IDLE),
            "restart": {"start_s": 0.1, "backoff": {"initial_s": 0.1}}}}},
    })
    fleet.start()
    worker = fleet.wait_state("Worker", "RUNNING")
    labels = 'agent="Worker",group="core"'
    # Rows come each sampling round: the first may predate RUNNING.
    text = wait_until(lambda: (lambda t: t if _value(t, f"agentvisor_agent_up{{{labels}}}") == 1.0
                               and _value(t, f"agentvisor_agent_open_fds{{{labels}}}")
                               else None)(_metrics(metrics)),
                      15, "Worker's samples on /metrics")
    assert _value(text, f'agentvisor_agent_state{{{labels},state="RUNNING"}}') == 1.0
    assert _value(text, f"agentvisor_agent_resident_memory_bytes{{{labels}}}") > 1e6
    assert _value(text, f"agentvisor_agent_threads{{{labels}}}") >= 1
    assert _value(text, f"agentvisor_agent_restarts_total{{{labels}}}") == 0.0
    assert _value(text, 'agentvisor_agent_up{agent="sidecar",group="agentvisor"}') == 1.0

    # Killed: the supervisor restarts it, and the exporter says so.
    os.kill(worker["pid"], signal.SIGKILL)
    text = wait_until(lambda: (lambda t: t if _value(
        t, f"agentvisor_agent_restarts_total{{{labels}}}") == 1.0
        and _value(t, f"agentvisor_agent_up{{{labels}}}") == 1.0 else None)(_metrics(metrics)),
        15, "the restart on /metrics")
    assert f'agentvisor_agent_last_exit_info{{{labels},last_exit="killed by SIGKILL"}} 1.0' \
        in text
    status = fleet.status()["agents"]
    row = next(a for a in status if a["name"] == "Worker")
    assert row["threads"] >= 1 and row["fds"] >= 3  # status --json has them too
