"""Two real hub receivers (`python -m sidecar.hub --peer`) in front of their own stand-in
legacy hubs, as central on MainPC and edge on PC2: each shares what it knows with the
other within 2 s, so either answers for the fleet, and a failover's resent batch is not
delivered to the second legacy hub."""

from __future__ import annotations

import time

from sidecar import samples
from sidecar.spool import Record
from tests.integration.harness import free_port, wait_until
from tests.integration.hubside import LegacyHub, Receiver

T0 = 1_732_990_000.0


def rec(agent: str, seq: int, host: str = "PC2") -> Record:
    return Record(0, host, agent, seq, T0 + seq, "POST", "/api/metrics",
                  "application/json", b'{"seq": %d}' % seq)


def test_hubs_share_hosts_marks_and_samples_and_a_failover_is_not_delivered_twice(tmp_path):
    central_port, edge_port = free_port(), free_port()
    legacy_central = LegacyHub(tmp_path).start()
    legacy_edge = LegacyHub(tmp_path).start()
    central = Receiver(tmp_path, legacy_central.port, port=central_port, name="central",
                       extra=("--peer", f"127.0.0.1:{edge_port}"))
    edge = Receiver(tmp_path, legacy_edge.port, port=edge_port, name="edge",
                    extra=("--peer", f"127.0.0.1:{central_port}"))
    try:
        central.start()
        edge.start()
        # PC2 forwards to its edge hub: pushes 1-10 and a round of samples.
        round_ = samples.round_body(T0 + 10, {"A": {"up": 1.0, "cpu_percent": 7.5}})
        sent = time.monotonic()
        assert edge.send([rec("A", n) for n in range(1, 11)] + [
            Record(0, "PC2", samples.SENDER, 1, T0 + 10, "POST", samples.PATH,
                   samples.CONTENT_TYPE, round_)])[0] == 200

        # Central, which never heard from PC2, shows it within 2 s: heard by edge, its
        # agent's mark, and its samples on central's /metrics.
        def central_knows():
            host = central.health()["hosts"].get("PC2")
            return host if host and host["agents"].get("A", {}).get("last_seq") == 10 else None

        pc2 = wait_until(central_knows, 10, "central to show PC2 as edge reported it")
        shared_in = time.monotonic() - sent
        assert shared_in < 2.0, f"shared in {shared_in:.2f} s"
        assert set(pc2["heard_by"]) == {"edge"} and pc2["state"] == "live"
        assert pc2["agents"]["A"]["via"] == "edge"
        text = central.metrics()
        assert 'agentvisor_agent_cpu_percent{agent="A",host="PC2"} 7.5' in text
        assert 'agentvisor_hub_host_partitioned{host="PC2"} 0.0' in text
        assert 'agentvisor_hub_peer_up{peer="edge"} 1.0' in text
        peers = central.health()["peers"]
        assert peers["heard"]["edge"]["state"] == "live"
        assert peers["sending"][f"127.0.0.1:{edge_port}"]["sent"] >= 1

        # Edge stops answering mid-stream; PC2's forwarder fails over to central and
        # resends what it had no answer for (8-10, which edge did store) with 11-15.
        status, answer, _ = central.send([rec("A", n) for n in range(8, 16)])
        assert status == 200 and answer == {"stored": 5, "duplicates": 3}, answer
        a = central.health()["hosts"]["PC2"]["agents"]["A"]
        assert (a["held_by_peer"], a["gaps"], a["missing"]) == (3, 0, 0), a
        wait_until(lambda: len(legacy_central.pushes()) == 5, 15, "central's deliveries")
        wait_until(lambda: len(legacy_edge.pushes()) == 10, 15, "edge's deliveries")
        # Exactly once across the two legacy hubs, in order at each.
        assert [s for _, _, s in legacy_edge.pushes()] == list(range(1, 11))
        assert [s for _, _, s in legacy_central.pushes()] == list(range(11, 16))
        # And edge learns central's mark: when PC2 comes back to it with 16, no gap.
        wait_until(lambda: edge.health()["hosts"]["PC2"]["agents"]["A"].get("last_seq") == 10
                   and "central" in edge.health()["hosts"]["PC2"]["heard_by"], 10,
                   "edge to hear central's report")
        assert edge.send([rec("A", 16)])[1] == {"stored": 1, "duplicates": 0}
        assert edge.health()["hosts"]["PC2"]["agents"]["A"]["gaps"] == 0

        # Central goes away: edge shows it silent, and says so on /metrics.
        central.kill()
        wait_until(lambda: edge.health()["peers"]["heard"]["central"]["state"] == "silent",
                   15, "edge to show central silent")
        assert 'agentvisor_hub_peer_up{peer="central"} 0.0' in edge.metrics()
        assert edge.health()["peers"]["sending"][f"127.0.0.1:{central_port}"]["last_error"]
    finally:
        central.kill()
        edge.kill()
        legacy_central.stop()
        legacy_edge.stop()
