"""Metrics through partitions on two PCs, each under its own systemd, joined by a cable.

MainPC (10.77.0.1) runs the central legacy hub (an agent on :9000) and its receiver
(`hub:` on :9190); PC2 (10.77.0.2) the edge legacy hub (:9100) and its receiver (:9190).
Both declare ObservabilityHub `deliver: store_forward`, so their pushers' POSTs are
answered from each host's spool and forwarded to the hub receivers, nearest first (as
config/pc2.yaml and config/mainpc.yaml declare them). The legacy hubs and pushers are
plain stdlib scripts that know nothing of agentvisor: a pusher writes down each push's
answer and the sequence it was given; a legacy hub writes down every push it gets.

The story, in order:
1. PC2's pushes reach the edge hub, MainPC's the central hub.
2. PC2's receiver hangs (SIGSTOP): PC2 fails over to central across the cable within
   2 s; it is let go again and PC2 takes its edge hub back.
3. A 30 s partition: the edge receiver is stopped by the operator and the cable is cut.
   PC2 has no hub: it keeps answering pushes from its spool and says "partitioned" in
   `status`; its data process is SIGKILLed mid-stream and restarted by the supervisor.
   The cable comes back: the backlog drains to central; the edge receiver is started
   and PC2 returns to it.
4. A 2 min partition, the same way; meanwhile central's receiver is SIGKILLed and
   restarted on MainPC (its marks on disk keep it from storing resent records twice).
At the end every push that was answered 200 is at a legacy hub, once at that hub, in
the agent's order at each hub.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.integration.harness import wait_until
from tests.integration.machines import PC, add_hosts, link, skip_reason

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")

MAINPC, PC2 = "10.77.0.1", "10.77.0.2"
CENTRAL_PORT, EDGE_PORT, RECEIVER_PORT = 9000, 9100, 9190
SHORT_PARTITION_S, LONG_PARTITION_S = 30, 120

# A legacy hub: takes every POST (200) and writes it down; answers GETs with its name.
LEGACY_HUB = """
import http.server, json, os
name, out = os.environ["HUB_NAME"], open(os.environ["HUB_LOG"], "a", buffering=1)
class Hub(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        out.write(json.dumps({"host": self.headers.get("X-Agentvisor-Host"),
                              "agent": self.headers.get("X-Agentvisor-Agent"),
                              "seq": int(self.headers.get("X-Agentvisor-Seq", 0)),
                              "n": json.loads(body)["n"]}) + "\\n")
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(name)))
        self.end_headers()
        self.wfile.write(name.encode())
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer((os.environ["HUB_HOST"], int(os.environ["HUB_PORT"])),
                                Hub).serve_forever()
"""

# A legacy agent: POSTs its metrics every 50 ms, as the fleet's do, and writes down what
# each push was answered (its n, the status, the sequence the spool gave it).
PUSHER = """
import json, os, time, urllib.request
url = os.environ["OBS_HUB_URL"] + "/api/metrics"
out, n = open(os.environ["PUSH_LOG"], "a", buffering=1), 0
while True:
    n += 1
    body = json.dumps({"agent": os.environ["AGENT_NAME"], "n": n}).encode()
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            out.write(f"{n} {r.status} {r.headers.get('X-Agentvisor-Seq')}\\n")
    except Exception as e:
        out.write(f"{n} error {type(e).__name__}\\n")
    time.sleep(0.05)
"""


class FleetPC(PC):
    """A PC of this story: its agents' scripts, and what the test asks of it."""

    def __init__(self, root: Path, instance: str, config: dict):
        # Agents' and agentvisor's own logs beside the test's files, for a failure's story.
        logs = {"logs": {"dir": str(root / instance / "logs")}}
        super().__init__(root, instance, {**config, **logs},
                         {"hub.py": LEGACY_HUB, "pusher.py": PUSHER})

    def pid(self, name: str) -> int:
        return next(a["pid"] for a in self.status()["agents"] if a["name"] == name)

    def spool(self) -> dict:
        return self.status().get("metrics", {})

    def hub_health(self) -> dict:
        """The local hub receiver's /health, as asked from inside the machine."""
        out = self.run(sys.executable, "-c", "import sys, urllib.request; sys.stdout.write("
                       f"urllib.request.urlopen('http://127.0.0.1:{RECEIVER_PORT}/health', "
                       "timeout=5).read().decode())", check=False)
        return json.loads(out.stdout) if out.returncode == 0 else {"hosts": {}}

    def cable(self, up: bool) -> None:
        self.run("ip", "link", "set", "lan0", "up" if up else "down")


def _config(host: str, legacy_port: int, hub_host: str, pushers: list[str],
            legacy_name: str, legacy_log: Path, other: str, other_legacy_port: int) -> dict:
    legacy = {"script_path": "hub.py", "port": legacy_port, "required": True,
              "env_vars": {"HUB_NAME": legacy_name, "HUB_HOST": hub_host,
                           "HUB_PORT": str(legacy_port), "HUB_LOG": str(legacy_log)}}
    agents = {f"{legacy_name.capitalize()}Hub": legacy}
    for name in pushers:
        agents[name] = {"script_path": "pusher.py",
                        "env_vars": {"OBS_HUB_URL": "http://${upstream:ObservabilityHub}",
                                     "PUSH_LOG": str(legacy_log.parent / f"{name}.pushes")}}
    return {
        "host": host,
        "resource_interval_s": 1,
        "upstreams": {"ObservabilityHub": {
            "addresses": [f"127.0.0.1:{legacy_port}", f"{other}:{other_legacy_port}"],
            "protocol": "http", "deliver": "store_forward"}},
        "hubs": [f"127.0.0.1:{RECEIVER_PORT}", f"{other}:{RECEIVER_PORT}"],
        "hub": {"listen": f"0.0.0.0:{RECEIVER_PORT}",
                "deliver_to": f"127.0.0.1:{legacy_port}"},
        "agent_groups": {"observability": agents},
    }


@pytest.fixture
def pcs(tmp_path):
    mainpc = FleetPC(tmp_path, "mainpc", _config(
        "MainPC", CENTRAL_PORT, "0.0.0.0", ["MainPusher"], "central",
        tmp_path / "central.jsonl", "pc2", EDGE_PORT))
    pc2 = None
    try:
        pc2 = FleetPC(tmp_path, "pc2", _config(
            "PC2", EDGE_PORT, "0.0.0.0", ["EdgePusherA", "EdgePusherB"], "edge",
            tmp_path / "edge.jsonl", "mainpc", CENTRAL_PORT))
        link(mainpc.machine, f"{MAINPC}/24", pc2.machine, f"{PC2}/24")
        add_hosts(pc2.machine, pc2.dir, {"mainpc": MAINPC})
        add_hosts(mainpc.machine, mainpc.dir, {"pc2": PC2})
        mainpc.start()
        pc2.start()
        yield mainpc, pc2, tmp_path
    finally:
        for pc in (pc2, mainpc):
            if pc is not None:
                pc.stop()


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _at(hub_log: Path) -> list[dict]:
    return [json.loads(line) for line in _lines(hub_log) if line.endswith("}")]


def _answered(folder: Path, agent: str) -> dict[int, int]:
    """n -> seq of every push the agent had answered 200."""
    out = {}
    for line in _lines(folder / f"{agent}.pushes"):
        parts = line.split()
        if len(parts) == 3 and parts[1] == "200":
            out[int(parts[0])] = int(parts[2])
    return out


def _newest(hub_log: Path, host: str) -> int:
    return max((r["seq"] for r in _at(hub_log) if r["host"] == host
                and r["agent"] == "EdgePusherA"), default=0)


# Two fixed partitions (2.5 min) plus boots, failovers and drains: the suite's 120 s per
# test does not hold it.
@pytest.mark.timeout(480)
def test_pushes_ride_out_partitions_of_30_s_and_2_min_and_arrive_once_in_order(pcs):
    mainpc, pc2, folder = pcs
    central, edge = folder / "central.jsonl", folder / "edge.jsonl"
    figures: dict[str, float] = {}

    # 1. Each host's pushes reach its own hub.
    wait_until(lambda: _newest(edge, "PC2") >= 20, 60, "PC2's pushes at the edge hub")
    wait_until(lambda: any(r["host"] == "MainPC" for r in _at(central)), 30,
               "MainPC's pushes at the central hub")

    # 2. The edge receiver hangs: PC2 leaves it for central within 2 s, and takes it
    #    back once it answers again.
    hung = pc2.pid("sidecar-hub")
    pc2.machine.kill(hung, signal.SIGSTOP)
    stopped = time.monotonic()
    before = _newest(edge, "PC2")
    wait_until(lambda: _newest(central, "PC2") > before, 10,
               "PC2's pushes to reach central after the edge receiver hung")
    figures["failover_s"] = time.monotonic() - stopped
    pc2.machine.kill(hung, signal.SIGCONT)
    resumed = time.monotonic()
    after = _newest(central, "PC2")
    wait_until(lambda: _newest(edge, "PC2") > after, 20, "PC2 to return to its edge hub")
    figures["taken_back_s"] = time.monotonic() - resumed

    for length_s, name in ((SHORT_PARTITION_S, "30 s"), (LONG_PARTITION_S, "2 min")):
        # 3/4. The edge receiver is stopped and the cable cut: PC2 has no hub.
        pc2.agentvisor("stop", "sidecar-hub")
        mainpc.cable(False)
        cut = time.monotonic()
        wait_until(lambda: pc2.spool().get("state") == "partitioned", 20,
                   f"PC2's status to say partitioned ({name})")
        counted = len(_answered(folder, "EdgePusherA"))
        wait_until(lambda: len(_answered(folder, "EdgePusherA")) > counted + 20, 20,
                   "pushes answered from the spool while partitioned")
        if length_s == SHORT_PARTITION_S:
            # The data process dies mid-stream; the supervisor restarts it, and no push
            # it answered is lost.
            pc2.machine.kill(pc2.pid("sidecar-data"), signal.SIGKILL)
            wait_until(lambda: next(a for a in pc2.status()["agents"]
                                    if a["name"] == "sidecar-data")["restarts"] >= 1
                       and pc2.spool().get("state") == "partitioned", 30,
                       "sidecar-data to be restarted")
        else:
            # Central's receiver dies and is restarted on MainPC (the cable is down: PC2
            # cannot see it either way).
            mainpc.machine.kill(mainpc.pid("sidecar-hub"), signal.SIGKILL)
            wait_until(lambda: next(a for a in mainpc.status()["agents"]
                                    if a["name"] == "sidecar-hub")["state"] == "RUNNING"
                       and next(a for a in mainpc.status()["agents"]
                                if a["name"] == "sidecar-hub")["restarts"] >= 1, 30,
                       "central's receiver to be restarted")
        # Central's /health, through the missing peer reports, says PC2 is silent.
        wait_until(lambda: mainpc.hub_health()["hosts"].get("PC2", {}).get("partitioned")
                   is True, 30, "central to show PC2 partitioned")
        remaining = length_s - (time.monotonic() - cut)
        if remaining > 0:
            # The partition itself: a fixed length is the point of this wait.
            time.sleep(remaining)
        pending = pc2.spool()["pending_records"]
        assert pending > 0, pc2.spool()
        mainpc.cable(True)
        healed = time.monotonic()
        wait_until(lambda: pc2.spool().get("state") in ("forwarding", "idle")
                   and pc2.spool()["pending_records"] < 50, 60,
                   lambda: f"PC2's backlog to drain to central ({name}): {pc2.spool()}")
        figures[f"drain_after_{name}_s"] = time.monotonic() - healed
        figures[f"pending_after_{name}"] = pending
        pc2.agentvisor("start", "sidecar-hub")
        after = _newest(central, "PC2")
        wait_until(lambda: _newest(edge, "PC2") > after, 30, "PC2 back on its edge hub")

    # The end: pushers stop; everything answered must be at a hub.
    for pc, pushers in ((pc2, ("EdgePusherA", "EdgePusherB")), (mainpc, ("MainPusher",))):
        for pusher in pushers:
            pc.agentvisor("stop", pusher)
    wanted = {(host, agent): _answered(folder, agent) for host, agent in (
        ("PC2", "EdgePusherA"), ("PC2", "EdgePusherB"), ("MainPC", "MainPusher"))}

    def arrived():
        got = {key: set() for key in wanted}
        for r in _at(edge) + _at(central):
            if (r["host"], r["agent"]) in got:
                got[(r["host"], r["agent"])].add(r["seq"])
        return all(set(wanted[k].values()) <= got[k] for k in wanted)

    wait_until(arrived, 60, "every answered push at a hub")
    cross = 0
    for (host, agent), answered in wanted.items():
        assert len(answered) > 500, (agent, len(answered))
        # Answered pushes got one sequence each, in the order the agent pushed them.
        assert sorted(answered.values()) == [answered[n] for n in sorted(answered)]
        seen: dict[str, list[int]] = {}
        for hub, log in (("edge", edge), ("central", central)):
            seqs = [r["seq"] for r in _at(log) if (r["host"], r["agent"]) == (host, agent)]
            # Once at each hub, and in the agent's order.
            assert seqs == sorted(set(seqs)), (host, agent, hub)
            seen[hub] = seqs
        cross += len(set(seen["edge"]) & set(seen["central"]))
    # Batches the hung receiver got while stopped are not stored once it runs again (the
    # forwarder had given up on them): what remains is a batch caught in the middle of
    # its commit, a record or two (sidecar/hub/peers.py). Measured: 0.
    assert cross <= 10, cross
    print(f"two PCs: {json.dumps(figures)}; pushes in both hubs: {cross}")
    assert figures["failover_s"] < 3.0, figures
