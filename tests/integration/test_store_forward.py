"""`deliver: store_forward` end to end under the supervisor: an unmodified agent POSTs its
metrics to ${upstream:ObservabilityHub} as it always did; each push is answered from the
host's spool at once, and reaches the hub (a real `python -m sidecar.hub` receiver in
front of a stand-in legacy hub) exactly once and in order, also across a hub outage; a
GET still goes through the proxy to the hub."""

from __future__ import annotations

import json
import time
import urllib.request

from sidecar import samples
from tests.integration.harness import free_port, wait_until
from tests.integration.hubside import LegacyHub, Receiver

# An agent as the fleet's are written: it reads the hub's URL from its environment and
# POSTs a JSON document every few milliseconds, counting what it was answered.
PUSHER = """
import json, os, sys, time, urllib.request
url = os.environ["OBS_HUB_URL"]
out = open(os.environ["PUSH_LOG"], "a")
for n in range(1, int(os.environ["PUSHES"]) + 1):
    body = json.dumps({"agent": os.environ["AGENT_NAME"], "n": n}).encode()
    req = urllib.request.Request(url + "/api/metrics", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        out.write(f"{n} {r.status} {r.headers.get('X-Agentvisor-Seq')}\\n")
        out.flush()
    time.sleep(0.005)
time.sleep(3600)
"""

# A dashboard reader: its GET is not a push, and goes through to the hub.
READER = """
import os, time, urllib.request
with urllib.request.urlopen(os.environ["OBS_HUB_URL"] + "/dashboard", timeout=10) as r:
    open(os.environ["READ_LOG"], "w").write(f"{r.status} {r.headers.get('X-Agentvisor-Seq')}")
time.sleep(3600)
"""


def _config(fleet, tmp_path, legacy: LegacyHub, hub_port: int, agents: dict) -> dict:
    return {
        "state_dir": str(tmp_path / "state"),
        "upstreams": {"ObservabilityHub": {"address": f"127.0.0.1:{legacy.port}",
                                           "protocol": "http", "deliver": "store_forward"}},
        "hubs": [f"127.0.0.1:{hub_port}"],
        "sidecar": {"metrics_listen": f"127.0.0.1:{free_port()}"},
        # Sampling rounds (and with them the samples spooled for the hubs) twice a second.
        "resource_interval_s": 0.5,
        "agent_groups": {"reporters": agents},
    }


def _pusher(fleet, tmp_path, name: str, pushes: int) -> dict:
    return {"script_path": fleet.script(f"{name.lower()}.py", PUSHER),
            "env_vars": {"OBS_HUB_URL": "http://${upstream:ObservabilityHub}",
                         "PUSH_LOG": str(tmp_path / f"{name}.pushes"), "PUSHES": str(pushes)}}


def _answered(tmp_path, name: str) -> list[tuple[int, ...]]:
    path = tmp_path / f"{name}.pushes"
    lines = path.read_text().split() if path.exists() else []
    return [tuple(map(int, lines[i:i + 3])) for i in range(0, len(lines) - 2, 3)]


def _metrics_listen(fleet) -> str:
    import yaml

    return yaml.safe_load(fleet.config_path.read_text())["sidecar"]["metrics_listen"]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def _at_hub(legacy: LegacyHub, name: str) -> list[int]:
    return [json.loads(r["body"])["n"] for r in legacy.received()
            if r["headers"].get("X-Agentvisor-Agent") == name]


def test_pushes_are_spooled_answered_at_once_and_reach_the_hub_in_order(fleet, tmp_path):
    legacy = LegacyHub(tmp_path).start()
    receiver = Receiver(tmp_path, legacy.port).start()
    try:
        pushes = 60
        agents = {n: _pusher(fleet, tmp_path, n, pushes) for n in ("Alpha", "Beta")}
        agents["Reader"] = {"script_path": fleet.script("reader.py", READER),
                            "env_vars": {"OBS_HUB_URL": "http://${upstream:ObservabilityHub}",
                                         "READ_LOG": str(tmp_path / "read")}}
        fleet.write_config(_config(fleet, tmp_path, legacy, receiver.port, agents))
        fleet.start()
        for name in agents:
            fleet.wait_state(name, "RUNNING")
        pushers = ("Alpha", "Beta")
        wait_until(lambda: all(len(_answered(tmp_path, n)) == pushes for n in pushers), 60,
                   "every push answered")
        for name in pushers:  # answered 200 from the spool, its sequence in the header
            assert _answered(tmp_path, name) == [(n, 200, n) for n in range(1, pushes + 1)]
        wait_until(lambda: all(len(_at_hub(legacy, n)) == pushes for n in pushers), 60,
                   "every push at the legacy hub")
        for name in pushers:  # exactly once, in order, with who sent it
            assert _at_hub(legacy, name) == list(range(1, pushes + 1))
        assert {r["headers"]["X-Agentvisor-Host"] for r in legacy.received()
                if r["method"] == "POST"} == {"TestHost"}
        # The read went through to the hub (the proxy's way), not into the spool.
        wait_until(lambda: (tmp_path / "read").exists(), 20, "the reader's GET answered")
        assert (tmp_path / "read").read_text() == "200 None"
        assert [r["path"] for r in legacy.received() if r["method"] == "GET"] == ["/dashboard"]
        assert (tmp_path / "state").is_dir()
        status = fleet.status()
        data = next(a for a in status["agents"] if a["name"] == "sidecar-data")
        assert data["state"] == "RUNNING"
        assert status["upstreams"]["ObservabilityHub"]["listen"] == "per agent (spooled)"
    finally:
        receiver.kill()
        legacy.stop()


def test_a_partition_loses_nothing_and_the_backlog_drains_when_the_hub_returns(
        fleet, tmp_path):
    """No hub at first (partitioned): the agent is answered from the spool all the same;
    the hub comes up, and everything reaches it once, in order, while the agent goes on
    pushing."""
    legacy = LegacyHub(tmp_path).start()
    hub_port = free_port()
    pushes = 150
    fleet.write_config(_config(fleet, tmp_path, legacy, hub_port,
                               {"Gamma": _pusher(fleet, tmp_path, "Gamma", pushes)}))
    fleet.start()
    receiver = None
    try:
        wait_until(lambda: len(_answered(tmp_path, "Gamma")) >= pushes // 2, 60,
                   "pushes answered while no hub is reachable")
        assert _at_hub(legacy, "Gamma") == []  # nothing could have gone anywhere
        # The operator is told: in status, and on the host's /metrics.
        spool = wait_until(lambda: (lambda m: m if m.get("state") == "partitioned" else None)(
            fleet.status().get("metrics", {})), 20, "status to say partitioned")
        assert spool["pending_records"] > 0 and spool["partitioned_since"], spool
        host_metrics = "http://{}/metrics".format(_metrics_listen(fleet))
        wait_until(lambda: "agentvisor_forwarder_partitioned 1.0" in _get(host_metrics), 20,
                   "the host's /metrics to say partitioned")
        assert "PARTITIONED for" in fleet.cli("status").stdout
        receiver = Receiver(tmp_path, legacy.port, port=hub_port).start()
        wait_until(lambda: len(_answered(tmp_path, "Gamma")) == pushes, 60, "every push answered")
        wait_until(lambda: len(_at_hub(legacy, "Gamma")) == pushes, 60, "the backlog drained")
        assert _at_hub(legacy, "Gamma") == list(range(1, pushes + 1))
        wait_until(lambda: fleet.status()["metrics"]["state"] in ("idle", "forwarding"), 20,
                   "status to say the partition is over")
        wait_until(lambda: "agentvisor_forwarder_partitioned 0.0" in _get(host_metrics), 20,
                   "the host's /metrics to say the partition is over")
        # The supervisor's rounds of samples taken during the partition were spooled like
        # pushes and arrived too, every one, in order (no gap in its sequence), and never
        # reached the legacy hub (its samples are the receiver's to export).
        sender = wait_until(lambda: receiver.health()["hosts"]["TestHost"]["agents"].get(
            samples.SENDER), 30, "the supervisor's samples at the receiver")
        assert sender["gaps"] == 0 and sender["last_seq"] == sender["stored"] >= 2, sender
        assert all(r["path"] != samples.PATH for r in legacy.received())
        # The rounds arrive in order: the latest says Gamma is up, once it has arrived.
        wait_until(lambda: 'agentvisor_agent_up{agent="Gamma",host="TestHost"} 1.0'
                   in receiver.metrics(), 30, "Gamma's latest samples at the receiver")
    finally:
        if receiver is not None:
            receiver.kill()
        legacy.stop()


def test_a_hub_host_runs_its_receiver_and_forwards_to_it(fleet, tmp_path):
    """`hub:` in the host config: the supervisor runs the receiver (sidecar-hub) in front
    of the legacy hub; this host's own pushes are forwarded to it, as MainPC's go to the
    central hub, and reach the legacy hub once and in order."""
    legacy = LegacyHub(tmp_path).start()
    hub_port = free_port()
    pushes = 40
    config = _config(fleet, tmp_path, legacy, hub_port,
                     {"Delta": _pusher(fleet, tmp_path, "Delta", pushes)})
    config["hub"] = {"listen": f"127.0.0.1:{hub_port}",
                     "deliver_to": f"127.0.0.1:{legacy.port}"}
    fleet.write_config(config)
    fleet.start()
    try:
        hub = fleet.wait_state("sidecar-hub", "RUNNING")
        assert hub["healthy"] is True and hub["required"] is True
        wait_until(lambda: len(_at_hub(legacy, "Delta")) == pushes, 60,
                   "Delta's pushes at the legacy hub through this host's own receiver")
        assert _at_hub(legacy, "Delta") == list(range(1, pushes + 1))
        assert (tmp_path / "state" / "hub-delivery.db").exists()
        # Every agent of the host has an exporter at the hub: the supervisor's samples,
        # with the time each round was taken.
        metrics = f"http://127.0.0.1:{hub_port}/metrics"
        # (A process's first sample has no CPU figure yet: a rate needs two.)
        text = wait_until(lambda: (lambda t: t if 'cpu_percent{agent="Delta"' in t else None)(
            _get(metrics)), 30, "Delta's samples on the hub's /metrics")
        for family in ("up", "restarts_total", "cpu_percent", "resident_memory_bytes",
                       "threads", "open_fds", "uptime_seconds", "sampled_timestamp_seconds"):
            assert f'agentvisor_agent_{family}{{agent="Delta",host="TestHost"}}' in text, \
                family
        sampled = float(text.split(
            'agentvisor_agent_sampled_timestamp_seconds{agent="Delta",host="TestHost"} ')[1]
            .split()[0])
        assert abs(sampled - time.time()) < 30
    finally:
        legacy.stop()


def test_a_reload_restarts_only_what_a_change_concerns(fleet, tmp_path):
    """Each of the sidecar's processes has its own settings: editing the hubs restarts
    the data process alone, a hub receiver's peers the receiver alone, an agent's
    environment that agent alone; the proxy and the other agents keep their pids."""
    legacy = LegacyHub(tmp_path).start()
    hub_port = free_port()
    agents = {n: _pusher(fleet, tmp_path, n, 10) for n in ("Alpha", "Beta")}
    config = _config(fleet, tmp_path, legacy, hub_port, agents)
    config["hub"] = {"listen": f"127.0.0.1:{hub_port}",
                     "deliver_to": f"127.0.0.1:{legacy.port}"}
    fleet.write_config(config)
    fleet.start()
    try:
        for name in ("Alpha", "Beta", "sidecar-hub"):
            fleet.wait_state(name, "RUNNING")

        def pids() -> dict[str, int]:
            return {a["name"]: a["pid"] for a in fleet.status()["agents"]}

        def reload(change) -> dict[str, int]:
            before = pids()
            change(config)
            fleet.write_config(config)
            out = fleet.cli("reload")
            assert out.returncode == 0, out.stderr
            for name in before:
                fleet.wait_state(name, "RUNNING", timeout_s=30)
            after = pids()
            return {n for n in before if after[n] != before[n]}

        # Another hub for the forwarder: the data process alone.
        assert reload(lambda c: c["hubs"].append("127.0.0.1:1")) == {"sidecar-data"}
        # The receiver's peers: the receiver alone.
        assert reload(lambda c: c["hub"].update(peers=["127.0.0.1:2"])) == {"sidecar-hub"}
        # The spools' sync interval: the data process and the receiver (both keep one).
        assert reload(lambda c: c.__setitem__("spool", {"sync_interval_s": 0.5})) \
            == {"sidecar-data", "sidecar-hub"}
        # An agent's environment: that agent alone.
        assert reload(lambda c: c["agent_groups"]["reporters"]["Beta"]["env_vars"]
                      .update(MODE="new")) == {"Beta"}
        # The upstream's timeouts: the proxy alone (agents keep the listener they have).
        assert reload(lambda c: c["upstreams"]["ObservabilityHub"]
                      .update(request_timeout_s=3)) == {"sidecar"}
    finally:
        legacy.stop()
