"""MainPC and PC2, each under its own systemd, joined by a cable: PC2's agents reach the
observability hubs through PC2's sidecar, edge first, central across the link second, as
config/pc2.yaml declares them.

Two machines (tests/integration/machines.py), each running the shipped
agentvisor@.service with its own host config, joined by a veth pair (MainPC 10.77.0.1,
PC2 10.77.0.2; "mainpc" resolves on PC2, as in pc2.yaml). The hubs and the reporting agent
are plain stdlib scripts that know nothing of agentvisor: the reporter calls
OBS_HUB_URL in a loop and writes down what each call got and how long it took.

The story, in order: the edge hub answers; stopped, PC2 fails over to MainPC's central
hub across the link; the link is cut on MainPC's side (PC2's packets go nowhere), and
every call is released within the timeout and then refused at once by the open breakers;
the link is restored and central answers again; the edge hub is started and takes over
again.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.harness import wait_until
from tests.integration.machines import PC, add_hosts, link, skip_reason

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")

MAINPC, PC2 = "10.77.0.1", "10.77.0.2"
CENTRAL_PORT, EDGE_PORT = 9000, 9100  # FLEET.md's hubs
REQUEST_TIMEOUT_S = 1.0
CONNECT_TIMEOUT_S = 1.0
OPEN_S = 1.0

# A hub: answers every GET with its name.
HUB = """
import http.server, os
name = os.environ["HUB_NAME"].encode()
class Hub(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(name)))
        self.end_headers()
        self.wfile.write(name)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer((os.environ["HUB_HOST"], int(os.environ["HUB_PORT"])),
                                Hub).serve_forever()
"""

# A legacy agent: calls its hub every 50 ms, one JSON line per call.
REPORTER = """
import json, os, time, urllib.request, urllib.error
url, out = os.environ["OBS_HUB_URL"], open(os.environ["RESULTS"], "a", buffering=1)
while True:
    started = time.monotonic()
    call = {}
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            call = {"status": r.status, "body": r.read().decode()}
    except urllib.error.HTTPError as e:
        call = {"status": e.code, "breaker": e.headers.get("X-Agentvisor-Breaker")}
    except Exception as e:
        call = {"error": type(e).__name__}
    call["elapsed"] = time.monotonic() - started
    out.write(json.dumps(call) + "\\n")
    time.sleep(0.05)
"""


def _hub(name: str, host: str, port: int) -> dict:
    return {"script_path": "hub.py", "port": port, "required": True,
            "env_vars": {"HUB_NAME": name, "HUB_HOST": host, "HUB_PORT": str(port)}}


SCRIPTS = {"hub.py": HUB, "reporter.py": REPORTER}


@pytest.fixture
def pcs(tmp_path):
    results = tmp_path / "reports.jsonl"
    mainpc = PC(tmp_path, "mainpc", {
        "host": "MainPC",
        "agent_groups": {"core_services": {"CentralHub": _hub("central", "0.0.0.0",
                                                              CENTRAL_PORT)}},
    }, SCRIPTS)
    pc2 = None
    try:
        pc2 = PC(tmp_path, "pc2", {
            "host": "PC2",
            "upstreams": {"ObservabilityHub": {
                "addresses": [f"127.0.0.1:{EDGE_PORT}", f"mainpc:{CENTRAL_PORT}"],
                "protocol": "http", "request_timeout_s": REQUEST_TIMEOUT_S,
                "connect_timeout_s": CONNECT_TIMEOUT_S,
                "breaker": {"failures": 2, "window_s": 10, "open_s": OPEN_S,
                            "successes": 1},
            }},
            "pc2_services": [
                {"name": "EdgeHub", **_hub("edge", "127.0.0.1", EDGE_PORT)},
                {"name": "Reporter", "script_path": "reporter.py",
                 "env_vars": {"OBS_HUB_URL": "http://${upstream:ObservabilityHub}/",
                              "RESULTS": str(results)}},
            ],
        }, SCRIPTS)
        link(mainpc.machine, f"{MAINPC}/24", pc2.machine, f"{PC2}/24")
        add_hosts(pc2.machine, pc2.dir, {"mainpc": MAINPC})
        mainpc.start()
        pc2.start()
        yield mainpc, pc2, results
    finally:
        for pc in (pc2, mainpc):
            if pc is not None:
                pc.stop()


def _calls(results: Path) -> list[dict]:
    if not results.exists():
        return []
    return [json.loads(line) for line in results.read_text().splitlines()
            if line.endswith("}")]


def _answered_by(results: Path, hub: str, after: int, count: int = 3):
    """True once `count` calls in a row after call `after` were answered by `hub`."""
    calls = _calls(results)[after:]
    return len(calls) >= count and all(c.get("body") == hub for c in calls[-count:])


def test_pc2_fails_over_to_mainpc_and_rides_out_a_partition(pcs):
    mainpc, pc2, results = pcs
    wait_until(lambda: _answered_by(results, "edge", 0), 15, "the edge hub to answer")

    # The edge hub stops: PC2's calls go across the link to MainPC's central hub.
    pc2.agentvisor("stop", "EdgeHub")
    mark = len(_calls(results))
    wait_until(lambda: _answered_by(results, "central", mark), 15,
               lambda: f"central to answer; calls: {_calls(results)[mark:][-5:]}")

    # The cable is cut at MainPC: PC2's packets leave and nothing comes back.
    mainpc.run("ip", "link", "set", "lan0", "down")
    cut = len(_calls(results))

    def breaker_answers():
        calls = _calls(results)[cut:]
        fast = [c for c in calls if c.get("status") == 503 and c.get("breaker")]
        return len(fast) >= 3 and calls

    during = wait_until(breaker_answers, 20, lambda: f"the breakers to open; calls: "
                        f"{_calls(results)[cut:][-5:]}")
    # Nobody hung: every call ended within the timeout (plus scheduling slack), with an
    # answer from the sidecar: 504 from central's timeout, 502 when a probe of the
    # (stopped) edge hub is refused, 503 from the open breakers; or, before the cut
    # took hold, central's own answer.
    odd = [c for c in during if c.get("status") not in (502, 503, 504)
           and c.get("body") != "central"]
    assert not odd, odd
    slowest = max(c["elapsed"] for c in during)
    assert slowest < max(REQUEST_TIMEOUT_S, CONNECT_TIMEOUT_S) + 1.5, during
    fast = [c["elapsed"] for c in during if c.get("status") == 503]
    assert sorted(fast)[len(fast) // 2] < 0.2, during  # refused at once, not after a wait

    # The cable is back: once open_s has passed, a probe finds central and closes it.
    mainpc.run("ip", "link", "set", "lan0", "up")
    healed = len(_calls(results))
    wait_until(lambda: _answered_by(results, "central", healed), 20,
               lambda: f"central to answer again; calls: {_calls(results)[healed:][-5:]}")

    # The edge hub comes back and, nearest first, takes the calls again.
    pc2.agentvisor("start", "EdgeHub")
    back = len(_calls(results))
    wait_until(lambda: _answered_by(results, "edge", back), 20,
               lambda: f"edge to answer again; calls: {_calls(results)[back:][-5:]}")

    # What an operator on PC2 sees: both endpoints' breakers tripped, and why.
    rows = json.loads(pc2.agentvisor("breakers", "--json"))
    trips = {r["name"]: r["trips"] for r in rows if r["upstream"] == "ObservabilityHub"}
    assert len(trips) == 2 and all(n >= 1 for n in trips.values()), rows
    status = json.loads(pc2.agentvisor("status", "--json"))
    assert status["state"] == "ok", status
    # MainPC never noticed anything but the quiet: its hub ran throughout.
    assert json.loads(mainpc.agentvisor("status", "--json"))["agents"][-1]["restarts"] == 0
