"""The supervisor with its sidecar: real agent processes reaching real upstreams through
the sidecar, with no edit to the agents.

An "agent" here is a plain script that calls what its environment says (OBS_HUB_URL, or
any URL under HTTP_PROXY) in a loop and appends one line per call to a file: the test
reads what the agent saw.
"""

import http.server
import json
import os
import signal
import threading
import urllib.request

import pytest
import yaml

from tests.integration.harness import free_port, pid_alive, wait_until

CALLER = """
import os, sys, time, urllib.request, urllib.error
url = os.environ["TARGET_URL"]
out = open(os.environ["RESULTS"], "a", buffering=1)
def call():
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            out.write(f"ok {r.status} {r.read().decode().strip()}\\n")
    except urllib.error.HTTPError as e:
        out.write(f"http {e.code} {e.headers.get('X-Agentvisor-Breaker', '')}\\n")
    except Exception as e:
        out.write(f"error {type(e).__name__} {e}\\n")
if os.environ.get("CALL_ON_SIGTERM"):
    import signal
    def last_call(*_):
        call()
        out.write("bye\\n")
        sys.exit(0)
    signal.signal(signal.SIGTERM, last_call)
while True:
    call()
    time.sleep(float(os.environ.get("PERIOD", "0.05")))
"""


class Upstream:
    """A real HTTP upstream in the test process: answers 200 with its name."""

    def __init__(self, status=200):
        self.status = status
        self.hits = 0
        upstream = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                upstream.hits += 1
                body = b"hello from upstream\n"
                self.send_response(upstream.status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def upstream():
    u = Upstream()
    yield u
    u.close()


def results(path):
    return path.read_text().splitlines() if path.exists() else []


def host_config(fleet, upstream_port, agent_extra, upstream_extra=None):
    metrics = free_port()
    fleet.write_config({
        "upstreams": {"Hub": {"address": f"127.0.0.1:{upstream_port}", "protocol": "http",
                              **(upstream_extra or {})}},
        "sidecar": {"metrics_listen": f"127.0.0.1:{metrics}", "drain_s": 5},
        "pc2_services": [{
            "name": "Caller", "script_path": fleet.script("caller.py", CALLER),
            "restart": {"start_s": 0.2},
            **agent_extra,
        }],
    })
    return metrics


def test_sidecar_starts_first_and_agents_reach_upstreams_through_it(fleet, upstream):
    out = fleet.dir / "calls.txt"
    metrics = host_config(fleet, upstream.port, {"env_vars": {
        "TARGET_URL": "http://${upstream:Hub}/status", "RESULTS": str(out)}})
    fleet.start()
    sidecar = fleet.wait_state("sidecar", "RUNNING")
    fleet.wait_state("Caller", "RUNNING")
    wait_until(lambda: any(l.startswith("ok 200 hello") for l in results(out)), 10,
               "a call through the sidecar")
    # The agent was pointed at the sidecar's listener, not at the upstream itself.
    caller = fleet.agent("Caller")
    env = open(f"/proc/{caller['pid']}/environ", "rb").read().split(b"\0")
    target = next(e for e in env if e.startswith(b"TARGET_URL=")).decode()
    assert f":{upstream.port}/" not in target and target.startswith("TARGET_URL=http://127.0.0.1:")
    # And the sidecar counted it.
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5).read().decode()
    assert 'agentvisor_sidecar_requests_total{outcome="ok",upstream="Hub"}' in text
    status = fleet.status()
    assert status["agents"][0]["name"] == "sidecar"
    listen = status["upstreams"]["Hub"]["listen"]
    assert target.startswith(f"TARGET_URL=http://{listen}/")
    assert f"127.0.0.1:{upstream.port}" in fleet.cli("status").stdout
    log = fleet.supervisor_log()
    assert log.index("sidecar: started") < log.index("Caller: started")
    assert sidecar["pid"] != caller["pid"]


def test_a_crashed_sidecar_restarts_and_agents_see_delay_not_refusal(fleet, upstream):
    out = fleet.dir / "calls.txt"
    host_config(fleet, upstream.port, {"env_vars": {
        "TARGET_URL": "http://${upstream:Hub}/status", "RESULTS": str(out), "PERIOD": "0.01"}})
    fleet.start()
    first = fleet.wait_state("sidecar", "RUNNING")
    fleet.wait_state("Caller", "RUNNING")
    wait_until(lambda: len(results(out)) >= 5, 10, "calls")
    os.kill(first["pid"], signal.SIGKILL)
    wait_until(lambda: fleet.agent("sidecar")["pid"] not in (None, first["pid"])
               and fleet.agent("sidecar")["state"] == "RUNNING", 15, "a new sidecar")
    before = len(results(out))
    wait_until(lambda: len(results(out)) >= before + 5, 10, "calls after the restart")
    # The listening socket belongs to the supervisor: no caller was ever refused. (A call
    # in flight at the moment of the kill may see its connection reset; that is all.)
    refused = [l for l in results(out) if "refused" in l.lower()]
    assert refused == []
    assert fleet.agent("Caller")["restarts"] == 0


def test_shutdown_stops_the_sidecar_last_so_last_calls_go_through(fleet, upstream):
    out = fleet.dir / "calls.txt"
    host_config(fleet, upstream.port, {"env_vars": {
        "TARGET_URL": "http://${upstream:Hub}/status", "RESULTS": str(out), "PERIOD": "0.5",
        "CALL_ON_SIGTERM": "1"}})
    fleet.start()
    sidecar = fleet.wait_state("sidecar", "RUNNING")
    fleet.wait_state("Caller", "RUNNING")
    wait_until(lambda: results(out), 10, "a first call")
    assert fleet.stop() == 0
    lines = results(out)
    assert lines[-1] == "bye" and lines[-2].startswith("ok 200"), lines[-3:]
    assert not pid_alive(sidecar["pid"])


def test_breaker_trips_shows_in_breakers_and_operators_can_override(fleet):
    dead = free_port()  # nothing listens: every call is refused
    out = fleet.dir / "calls.txt"
    host_config(fleet, dead, {"env_vars": {
        "TARGET_URL": "http://${upstream:Hub}/status", "RESULTS": str(out), "PERIOD": "0.02"}},
        {"breaker": {"failures": 3, "open_s": 60}, "retry": {"attempts": 0}})
    fleet.start()
    fleet.wait_state("Caller", "RUNNING")
    wait_until(lambda: any(l.startswith("http 503 Hub") for l in results(out)), 15,
               "calls rejected by the open breaker")
    table = fleet.cli("breakers")
    assert table.returncode == 0 and "Hub" in table.stdout and "OPEN" in table.stdout
    rows = json.loads(fleet.cli("breakers", "--json").stdout)
    assert rows[0]["state"] == "open" and rows[0]["trips"] >= 1
    assert "refused" in rows[0]["trip_reason"]
    assert fleet.cli("breaker", "close", "Hub").returncode == 0
    rows = json.loads(fleet.cli("breakers", "--json").stdout)
    assert rows[0]["state"] == "closed" and rows[0]["forced"] == "closed"
    assert fleet.cli("breaker", "reset", "Hub").returncode == 0
    out2 = fleet.cli("breaker", "open", "Nope")
    assert out2.returncode == 1 and "Nope" in out2.stderr


def test_proxy_mode_intercepts_an_unmodified_urllib_agent(fleet, upstream):
    out = fleet.dir / "calls.txt"
    metrics = host_config(fleet, upstream.port, {
        "intercept": "proxy",
        # The agent calls the upstream's REAL address; HTTP_PROXY sends it via the sidecar.
        "env_vars": {"TARGET_URL": f"http://127.0.0.1:{upstream.port}/status",
                     "RESULTS": str(out)}})
    fleet.start()
    fleet.wait_state("Caller", "RUNNING")
    wait_until(lambda: any(l.startswith("ok 200 hello") for l in results(out)), 10, "a call")
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5).read().decode()
    assert 'agentvisor_sidecar_requests_total{outcome="ok",upstream="Hub"}' in text
    line = next(l for l in text.splitlines()
                if l.startswith('agentvisor_sidecar_requests_total{outcome="ok",upstream="Hub"}'))
    assert float(line.split()[-1]) >= 1


def test_reload_with_a_new_upstream_restarts_only_the_sidecar(fleet, upstream):
    out, out2 = fleet.dir / "calls.txt", fleet.dir / "calls2.txt"
    host_config(fleet, upstream.port, {"env_vars": {
        "TARGET_URL": "http://${upstream:Hub}/status", "RESULTS": str(out), "PERIOD": "0.05"}})
    fleet.start()
    first_sidecar = fleet.wait_state("sidecar", "RUNNING")["pid"]
    caller = fleet.wait_state("Caller", "RUNNING")["pid"]
    other = Upstream()
    try:
        data = yaml.safe_load(fleet.config_path.read_text())
        data["upstreams"]["Other"] = {"address": f"127.0.0.1:{other.port}", "protocol": "http"}
        data["pc2_services"].append({
            "name": "Caller2", "script_path": "agents/caller.py", "restart": {"start_s": 0.2},
            "env_vars": {"TARGET_URL": "http://${upstream:Other}/x", "RESULTS": str(out2)}})
        fleet.config_path.write_text(yaml.safe_dump(data, sort_keys=False))
        reply = fleet.cli("reload", "--json")
        assert reply.returncode == 0, reply.stderr
        summary = json.loads(reply.stdout)
        assert summary["changed"] == ["sidecar"] and summary["added"] == ["Caller2"]
        fleet.wait_state("Caller2", "RUNNING")
        wait_until(lambda: any(l.startswith("ok 200") for l in results(out2)), 10,
                   "a call to the new upstream")
        assert other.hits >= 1
        assert fleet.agent("Caller")["pid"] == caller  # untouched
        assert fleet.agent("sidecar")["pid"] != first_sidecar
        before = len(results(out))
        wait_until(lambda: len(results(out)) > before + 3, 10, "the old agent still calling")
        assert not any("refused" in l.lower() for l in results(out))
    finally:
        other.close()


def _metrics_up(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def _taken_port():
    """A port something else is listening on, for as long as the socket is open."""
    import socket
    blocker = socket.create_server(("127.0.0.1", 0))
    return blocker, blocker.getsockname()[1]


def test_a_taken_listener_port_at_start_is_one_clear_line_and_exit_1(fleet, upstream):
    blocker, port = _taken_port()
    with blocker:
        host_config(fleet, upstream.port, {"env_vars": {"TARGET_URL": "http://x/"}})
        data = yaml.safe_load(fleet.config_path.read_text())
        data["sidecar"]["metrics_listen"] = f"127.0.0.1:{port}"
        fleet.config_path.write_text(yaml.safe_dump(data, sort_keys=False))
        proc = fleet.start(wait_socket=False)
        assert proc.wait(30) == 1
    log = fleet.supervisor_log()
    assert (f"sidecar listener metrics: cannot bind 127.0.0.1:{port}: Address already in use;"
            " not starting") in log
    assert "Traceback" not in log
    assert not (fleet.runtime_dir / "control.sock").exists()  # no stale socket left behind


def test_a_reload_onto_a_taken_port_is_refused_and_changes_nothing(fleet, upstream):
    out = fleet.dir / "calls.txt"
    metrics = host_config(fleet, upstream.port, {"env_vars": {
        "TARGET_URL": "http://${upstream:Hub}/status", "RESULTS": str(out), "PERIOD": "0.05"}})
    fleet.start()
    sidecar = fleet.wait_state("sidecar", "RUNNING")["pid"]
    caller = fleet.wait_state("Caller", "RUNNING")["pid"]
    blocker, taken = _taken_port()
    data = yaml.safe_load(fleet.config_path.read_text())
    data["sidecar"]["metrics_listen"] = f"127.0.0.1:{taken}"
    fleet.config_path.write_text(yaml.safe_dump(data, sort_keys=False))
    with blocker:
        refused = fleet.cli("reload")
    assert refused.returncode == 1, refused.stdout
    assert "the config cannot be applied; nothing was changed" in refused.stderr
    assert f"cannot bind 127.0.0.1:{taken}: Address already in use" in refused.stderr
    # Every listener is where it was, and nothing was restarted.
    assert _metrics_up(metrics)
    before = len(results(out))
    wait_until(lambda: len(results(out)) > before + 3, 10, "the agent still calling")
    assert all(line.startswith("ok 200") for line in results(out)[before:])
    assert (fleet.agent("sidecar")["pid"], fleet.agent("Caller")["pid"]) == (sidecar, caller)
    assert fleet.status()["state"] == "ok"
    # Once the port is free, the same reload applies.
    applied = fleet.cli("reload", "--json")
    assert applied.returncode == 0, applied.stderr
    assert json.loads(applied.stdout)["changed"] == ["sidecar"]
    wait_until(lambda: _metrics_up(taken), 15, "metrics on the new port")
    assert not _metrics_up(metrics)
