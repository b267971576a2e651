"""The hub receiver as an operator runs it: `python -m sidecar.hub` between forwarders
and a stand-in legacy hub, real processes and sockets.

What must hold: every push reaches the legacy hub once, in each agent's order, exactly
as the agent sent it; a resent batch, or one resent to a receiver that was SIGKILLed and
restarted, is not delivered again; while the legacy hub is down nothing is lost and
nothing blocks; a push the legacy hub refuses does not hold up the others; a malformed
batch is refused and changes nothing; /health and /metrics say what happened.
"""

import json
import os
import signal
import socket
import struct
import subprocess
import sys

import pytest
from prometheus_client.utils import floatToGoString

from sidecar import samples
from sidecar import spool as spool_module
from sidecar.hub import wire
from sidecar.hub.receiver import DELIVERY_SPOOL
from sidecar.spool import Push, Record, Spool
from tests.integration.harness import ROOT, free_port, wait_until
from tests.integration.hubside import LegacyHub, Receiver

T0 = 1_732_990_000.0


def rec(agent: str, seq: int, host: str = "PC2", *, body: bytes | None = None,
        path: str = "/api/metrics", content_type: str = "application/json",
        method: str = "POST") -> Record:
    if body is None:
        body = json.dumps({"agent": agent, "seq": seq, "value": seq * 1.5}).encode()
    return Record(0, host, agent, seq, T0 + seq, method, path, content_type, body)


@pytest.fixture
def legacy(tmp_path):
    hub = LegacyHub(tmp_path)
    yield hub
    hub.stop()


@pytest.fixture
def receiver(tmp_path, legacy):
    r = Receiver(tmp_path, legacy.port)
    yield r
    r.kill()


def delivered(legacy: LegacyHub, count: int, timeout_s: float = 15.0) -> list:
    return wait_until(lambda: (lambda p: p if len(p) >= count else None)(legacy.pushes()),
                      timeout_s, lambda: f"{count} pushes at the legacy hub "
                                         f"(have {len(legacy.pushes())})")


def test_pushes_reach_the_legacy_hub_in_order_as_sent(legacy, receiver):
    legacy.start()
    receiver.start()
    batches = [[rec("EdgeAgent", 1), rec("Sensor", 1), rec("EdgeAgent", 2)],
               [rec("Sensor", 2, body=b"\x00raw\xffbytes", content_type=""),
                rec("EdgeAgent", 3, method="PUT", path="/api/v2/push?batch=1&x=%20y")]]
    for batch in batches:
        status, answer, _ = receiver.send(batch)
        assert (status, answer) == (200, {"stored": len(batch), "duplicates": 0})
    got = delivered(legacy, 5)
    sent = [r for batch in batches for r in batch]
    assert [(h, a, s) for h, a, s in got] == [(r.host, r.agent, r.seq) for r in sent]
    for request, record in zip(legacy.received(), sent):
        assert request["method"] == record.method
        assert request["path"] == record.path
        assert request["body"].encode("latin-1") == record.body
        assert request["headers"].get("Content-Type") == (record.content_type or None)
        assert float(request["headers"]["X-Agentvisor-Time"]) == pytest.approx(record.time)


def test_a_resent_batch_is_not_delivered_twice(legacy, receiver):
    legacy.start()
    receiver.start()
    batch = [rec("EdgeAgent", s) for s in (1, 2, 3)]
    assert receiver.send(batch)[:2] == (200, {"stored": 3, "duplicates": 0})
    # The forwarder's answer was lost: it resends, partly overlapping the next batch.
    assert receiver.send(batch)[:2] == (200, {"stored": 0, "duplicates": 3})
    assert receiver.send(batch[1:] + [rec("EdgeAgent", 4)])[:2] == \
        (200, {"stored": 1, "duplicates": 2})
    # Delivery is in order: once seq 4 is in, everything before it is too.
    delivered(legacy, 4)
    assert legacy.pushes() == [("PC2", "EdgeAgent", s) for s in (1, 2, 3, 4)]
    agent = receiver.health()["hosts"]["PC2"]["agents"]["EdgeAgent"]
    assert (agent["received"], agent["stored"], agent["duplicates"], agent["last_seq"]) == \
        (9, 4, 5, 4)


def test_a_restarted_receiver_still_drops_duplicates_and_delivers_its_backlog(
        tmp_path, legacy, receiver):
    # The legacy hub is down: what the receiver stores waits in its delivery spool.
    receiver.start()
    batch = [rec("EdgeAgent", s) for s in range(1, 6)] + [rec("Sensor", 1)]
    assert receiver.send(batch)[:2] == (200, {"stored": 6, "duplicates": 0})
    receiver.kill()  # SIGKILL: no chance to flush anything
    receiver.start()
    assert receiver.health()["delivery"]["backlog_records"] == 6
    # It still knows the hosts it heard before: silent until they send again.
    pc2 = receiver.health()["hosts"]["PC2"]
    assert pc2["partitioned"] is True and pc2["last_heard"] is None
    assert pc2["agents"]["EdgeAgent"]["last_seq"] == 5
    assert receiver.send(batch)[:2] == (200, {"stored": 0, "duplicates": 6})
    assert receiver.send([rec("EdgeAgent", 6)])[:2] == (200, {"stored": 1, "duplicates": 0})
    assert receiver.health()["hosts"]["PC2"]["agents"]["EdgeAgent"]["last_seq"] == 6
    legacy.start()
    got = delivered(legacy, 7)
    assert sorted(got) == sorted(set(got)), "a push was delivered twice"
    assert [s for _, a, s in got if a == "EdgeAgent"] == [1, 2, 3, 4, 5, 6]
    wait_until(lambda: receiver.health()["delivery"]["backlog_records"] == 0, 10,
               "the delivery backlog to empty")


def test_records_wait_while_the_legacy_hub_is_down_and_arrive_in_order(
        tmp_path, legacy, receiver):
    receiver.start()
    legacy.start()
    assert receiver.send([rec("A", 1)])[0] == 200
    delivered(legacy, 1)
    legacy.stop()
    for s in range(2, 12):
        assert receiver.send([rec("A", s), rec("B", s)])[0] == 200
    health = wait_until(lambda: (lambda h: h if h["legacy_hub"]["state"] == "down" else None)(
        receiver.health()), 10, "the legacy hub to be seen down")
    assert health["legacy_hub"]["last_error"]
    assert health["delivery"]["backlog_records"] >= 19  # one may be in flight
    assert "agentvisor_hub_legacy_up 0.0" in receiver.metrics()
    legacy.start()  # same port, same file
    got = delivered(legacy, 21)
    assert [s for _, a, s in got if a == "A"] == list(range(1, 12))
    assert [s for _, a, s in got if a == "B"] == list(range(2, 12))
    # The hub writes a push down before it answers: the ack follows a moment later.
    health = wait_until(lambda: (lambda h: h if h["delivery"]["backlog_records"] == 0
                                 else None)(receiver.health()), 10, "the backlog to empty")
    assert health["legacy_hub"]["state"] == "up"


def test_a_push_the_legacy_hub_refuses_does_not_block_the_rest(tmp_path):
    legacy = LegacyHub(tmp_path, refuse="/bad").start()
    receiver = Receiver(tmp_path, legacy.port).start()
    try:
        batch = [rec("A", 1), rec("A", 2, path="/bad/schema"), rec("A", 3), rec("B", 1)]
        assert receiver.send(batch)[0] == 200
        got = delivered(legacy, 4)
        assert got == [("PC2", "A", 1), ("PC2", "A", 2), ("PC2", "A", 3), ("PC2", "B", 1)]
        health = wait_until(
            lambda: (lambda h: h if h["delivery"]["backlog_records"] == 0 else None)(
                receiver.health()), 10, "the backlog to empty")
        a = health["hosts"]["PC2"]["agents"]["A"]
        assert a["delivered"] == 2 and a["refused"] == 1 and "HTTP 400" in a["last_refusal"]
        assert health["legacy_hub"]["refused_total"] == 1
        assert 'agentvisor_hub_delivery_refused_total{agent="A",host="PC2"} 1.0' in \
            receiver.metrics()
        assert receiver.log().count("refused a push of PC2/A") == 1
    finally:
        receiver.kill()
        legacy.stop()


def test_a_legacy_hub_answering_5xx_gets_the_same_push_again(tmp_path):
    legacy = LegacyHub(tmp_path, unavailable=3).start()
    receiver = Receiver(tmp_path, legacy.port).start()
    try:
        assert receiver.send([rec("A", 1), rec("A", 2)])[0] == 200
        got = delivered(legacy, 2)
        assert got == [("PC2", "A", 1), ("PC2", "A", 2)]
        tries = [(r["headers"]["X-Agentvisor-Seq"], r["status"]) for r in legacy.received()]
        assert tries == [("1", 503)] * 3 + [("1", 200), ("2", 200)]
        wait_until(lambda: receiver.health()["delivery"]["backlog_records"] == 0, 10,
                   "the backlog to empty")
        assert receiver.health()["legacy_hub"]["retries_total"] == 3
    finally:
        receiver.kill()
        legacy.stop()


def test_malformed_batches_are_refused_and_change_nothing(legacy, receiver):
    legacy.start()
    receiver.start()
    good = wire.encode([rec("A", 1)])
    header = json.dumps({"host": "PC2", "agent": "A", "seq": "2", "time": T0, "method": "POST",
                         "path": "/m", "content_type": ""}).encode()
    bad_frame = struct.pack(">I", len(header)) + header + struct.pack(">I", 0)
    cases = [
        (b"\x00\x00\x00\x05{}", wire.CONTENT_TYPE, "header of 5 bytes but only 2 left"),
        (good[:-3], wire.CONTENT_TYPE, "but only"),
        (good + bad_frame, wire.CONTENT_TYPE, "frame 1: seq must be an integer"),
        (good, "application/json", "Content-Type must be application/x-agentvisor-records"),
    ]
    for body, content_type, words in cases:
        status, answer, _ = receiver.post(body, content_type)
        assert status == 400 and words in answer["error"], (status, answer)
    status, answer, _ = receiver.post(b"\x00" * (wire.MAX_BATCH_BYTES + 1))
    assert status == 413, (status, answer)
    health = receiver.health()
    assert health["hosts"] == {} and health["delivery"]["backlog_records"] == 0
    assert health["batches"]["malformed"] == 4 and health["batches"]["too_large"] == 1
    # Nothing of the refused batches raised a mark: seq 1 is new.
    assert receiver.send([rec("A", 1)])[:2] == (200, {"stored": 1, "duplicates": 0})
    delivered(legacy, 1)
    assert legacy.pushes() == [("PC2", "A", 1)]


def test_health_and_metrics_show_hosts_agents_counts_gaps_and_samples(legacy, receiver):
    legacy.start()
    receiver.start()
    # PC2's supervisor's round of samples, taken at T0 + 5 (sidecar.samples).
    round_ = samples.round_body(T0 + 5, {"EdgeAgent": {"cpu_percent": 12.5,
                                                       "rss_bytes": 52_428_800}})
    batch = [rec("EdgeAgent", 1), rec("EdgeAgent", 2), rec("EdgeAgent", 7),
             rec("Model", 1, host="MainPC"),
             rec(samples.SENDER, 1, body=round_, content_type=samples.CONTENT_TYPE,
                 path=samples.PATH)]
    assert receiver.send(batch)[0] == 200
    assert receiver.send(batch[:2])[0] == 200  # two duplicates
    # The samples are exported here and passed over in delivery: the legacy hub gets
    # the agents' own pushes only.
    wait_until(lambda: receiver.health()["legacy_hub"]["samples_total"] == 1, 15,
               "the sample record to be passed over")
    assert legacy.pushes() == [("PC2", "EdgeAgent", 1), ("PC2", "EdgeAgent", 2),
                               ("PC2", "EdgeAgent", 7), ("MainPC", "Model", 1)]
    health = receiver.health()
    assert health["name"] == "central"
    assert set(health["hosts"]) == {"PC2", "MainPC"}
    pc2 = health["hosts"]["PC2"]
    assert pc2["state"] == "live" and pc2["partitioned"] is False and pc2["last_heard"]
    edge = pc2["agents"]["EdgeAgent"]
    assert (edge["last_seq"], edge["stored"], edge["duplicates"], edge["gaps"],
            edge["missing"]) == (7, 3, 2, 1, 4)
    assert edge["last_record_time"] == T0 + 7
    text = receiver.metrics()
    for line in ('agentvisor_hub_records_stored_total{agent="EdgeAgent",host="PC2"} 3.0',
                 'agentvisor_hub_records_duplicate_total{agent="EdgeAgent",host="PC2"} 2.0',
                 'agentvisor_hub_gaps_total{agent="EdgeAgent",host="PC2"} 1.0',
                 'agentvisor_hub_records_missing_total{agent="EdgeAgent",host="PC2"} 4.0',
                 'agentvisor_hub_last_seq{agent="Model",host="MainPC"} 1.0',
                 'agentvisor_agent_cpu_percent{agent="EdgeAgent",host="PC2"} 12.5',
                 'agentvisor_agent_rss_bytes{agent="EdgeAgent",host="PC2"} 5.24288e+07',
                 'agentvisor_agent_sampled_timestamp_seconds{agent="EdgeAgent",host="PC2"} '
                 + floatToGoString(T0 + 5),
                 'agentvisor_hub_host_partitioned{host="PC2"} 0.0'):
        assert line in text, line
    assert "PC2/EdgeAgent: seq 7 came after 2: 4 records missing" in receiver.log()


def test_a_host_not_heard_from_is_shown_partitioned(tmp_path, legacy):
    receiver = Receiver(tmp_path, legacy.port, extra=("--silent-after", "0.3")).start()
    try:
        assert receiver.send([rec("A", 1)])[0] == 200
        wait_until(lambda: receiver.health()["hosts"]["PC2"]["partitioned"], 5,
                   "PC2 to be shown partitioned")
        assert 'agentvisor_hub_host_partitioned{host="PC2"} 1.0' in receiver.metrics()
        assert receiver.send([rec("A", 2)])[0] == 200
        assert receiver.health()["hosts"]["PC2"]["state"] == "live"
    finally:
        receiver.kill()


def test_a_full_delivery_spool_answers_503_and_keeps_what_it_answered(tmp_path, legacy):
    receiver = Receiver(tmp_path, legacy.port, extra=("--max-bytes", "4096")).start()
    try:
        stored = []
        seq = 0
        while True:
            seq += 1
            status, answer, headers = receiver.send([rec("A", seq, body=b"x" * 500)])
            if status != 200:
                break
            stored.append(seq)
            assert seq < 100, "the spool never filled"
        assert status == 503 and "full" in answer["error"]
        assert int(headers["Retry-After"]) >= 1
        assert receiver.health()["batches"]["full"] == 1
        legacy.start()
        got = delivered(legacy, len(stored))
        assert [s for _, _, s in got] == stored
        # Room again: the refused record is taken now, as new (its mark was not raised).
        assert receiver.send([rec("A", seq, body=b"x" * 500)])[:2] == \
            (200, {"stored": 1, "duplicates": 0})
    finally:
        receiver.kill()


def test_an_inherited_listening_socket_is_served(tmp_path, legacy):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port = sock.getsockname()[1]
    fd = sock.fileno()
    receiver = Receiver(tmp_path, legacy.port, port=port)
    receiver.args[:2] = ["--fds", f"listen={fd}"]
    try:
        receiver.start(pass_fds=(fd,))
        sock.close()
        assert receiver.send([rec("A", 1)])[:2] == (200, {"stored": 1, "duplicates": 0})
    finally:
        receiver.kill()


def test_sigterm_exits_0_and_keeps_the_backlog(tmp_path, legacy, receiver):
    receiver.start()
    assert receiver.send([rec("A", 1), rec("A", 2)])[0] == 200
    assert receiver.terminate() == 0
    receiver.start()
    assert receiver.health()["delivery"]["backlog_records"] == 2


@pytest.mark.parametrize("args, words", [
    (["--listen", "nowhere", "--state-dir", "{d}", "--deliver-to", "127.0.0.1:9000"],
     "'nowhere' is not host:port"),
    (["--listen", "127.0.0.1:70000", "--state-dir", "{d}", "--deliver-to", "127.0.0.1:9"],
     "port 70000 is out of range"),
    (["--listen", "127.0.0.1:{p}", "--state-dir", "{d}"], "--deliver-to"),
    (["--listen", "127.0.0.1:{p}", "--state-dir", "{d}", "--deliver-to", "127.0.0.1:9",
      "--sync-interval", "-1"], "must be 0 or more"),
    (["--listen", "127.0.0.1:{p}", "--state-dir", "{d}", "--deliver-to", "127.0.0.1:9",
      "--max-bytes", "0"], "'0' must be more than 0"),
    (["--listen", "127.0.0.1:{p}", "--state-dir", "/proc/agentvisor-hub",
      "--deliver-to", "127.0.0.1:9"], "--state-dir /proc/agentvisor-hub"),
    (["--fds", "hub=3", "--state-dir", "{d}", "--deliver-to", "127.0.0.1:9"],
     "expected listen=FD"),
])
def test_bad_arguments_exit_2_with_a_clear_error(tmp_path, args, words):
    args = [a.format(d=tmp_path / "state", p=free_port()) for a in args]
    done = subprocess.run([sys.executable, "-m", "sidecar.hub", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2, done.stderr
    assert words in done.stderr
    assert "Traceback" not in done.stderr


def test_a_second_receiver_on_the_same_state_dir_is_refused(tmp_path, legacy, receiver):
    receiver.start()
    second = Receiver(tmp_path, legacy.port, state_dir=receiver.state_dir, name="second")
    done = subprocess.run([sys.executable, "-m", "sidecar.hub", *second.args], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1, done.stderr
    assert "already open by pid" in done.stderr and "Traceback" not in done.stderr
    assert receiver.send([rec("A", 1)])[0] == 200  # the first one is unaffected


def test_a_corrupt_delivery_spool_is_reported_and_the_receiver_serves(
        tmp_path, legacy, receiver):
    receiver.state_dir.mkdir(parents=True)
    (receiver.state_dir / "hub-delivery.db").write_bytes(b"not a database at all" * 100)
    receiver.start()
    health = receiver.health()
    assert "corrupt" in health["spool_recovered"]
    assert "ERROR" in receiver.log() and "hub-delivery.db" in receiver.log()
    assert receiver.send([rec("A", 1)])[:2] == (200, {"stored": 1, "duplicates": 0})


def test_a_batch_whose_sender_gave_up_while_the_receiver_was_stopped_is_not_stored(
        legacy, receiver):
    """A hung receiver (SIGSTOP) gets a batch; the forwarder times out, closes, and sends
    it to the other hub. When this receiver runs again it must not store it too: the
    batch would reach both legacy hubs."""
    legacy.start()
    receiver.start()
    body = wire.encode([rec("A", 1), rec("A", 2)])
    receiver.proc.send_signal(signal.SIGSTOP)
    try:
        with socket.create_connection(("127.0.0.1", receiver.port), timeout=5) as sock:
            sock.sendall(b"POST %s HTTP/1.1\r\nHost: hub\r\nContent-Type: %s\r\n"
                         b"Content-Length: %d\r\n\r\n" % (wire.PATH.encode(),
                                                          wire.CONTENT_TYPE.encode(),
                                                          len(body)) + body)
            sock.settimeout(0.5)
            with pytest.raises(socket.timeout):  # stopped: no answer; the sender gives up
                sock.recv(1)
    finally:
        receiver.proc.send_signal(signal.SIGCONT)
    wait_until(lambda: receiver.health()["batches"]["abandoned"] == 1, 10,
               "the abandoned batch to be noticed")
    assert receiver.health()["batches"]["stored"] == 0
    assert "PC2" not in receiver.health()["hosts"]
    # Sent again (here, as it would be to the other hub), it is new.
    assert receiver.send([rec("A", 1), rec("A", 2)])[:2] == (200, {"stored": 2,
                                                                   "duplicates": 0})
    assert [s for _, _, s in delivered(legacy, 2)] == [1, 2]


def test_a_stopped_receiver_finishes_the_push_in_hand_and_does_not_deliver_it_twice(
        tmp_path):
    """SIGTERM while the legacy hub holds a push (it answers after 1 s): the receiver
    waits for that answer and acks it before exiting, so the restarted one goes on with
    the next push instead of delivering that one again."""
    legacy = LegacyHub(tmp_path, delay_s=1.0).start()
    receiver = Receiver(tmp_path, legacy.port).start()
    try:
        assert receiver.send([rec("A", n) for n in range(1, 4)])[0] == 200
        wait_until(lambda: legacy.received(), 10, "the legacy hub to hold the first push")
        assert receiver.terminate() == 0
        receiver.start()
        got = delivered(legacy, 3)
        assert [s for _, _, s in got] == [1, 2, 3], got
    finally:
        receiver.kill()
        legacy.stop()


def test_a_big_store_damaged_after_a_clean_stop_stops_the_hub_and_is_recovered(tmp_path):
    # A store of more than TRUST_CLEAN_CLOSE_RECORDS closed cleanly opens at once and is
    # read back behind the open: damage found there stops the hub (its unit restarts
    # it), and the next open reads every row, reports the damage and keeps the rest.
    state = tmp_path / "hub-state"
    state.mkdir()
    n = spool_module.TRUST_CLEAN_CLOSE_RECORDS + 5_000
    with Spool(state / DELIVERY_SPOOL, host="central") as store:
        for start in range(0, n, 5_000):
            store.append([Push("A", "POST", "/api/metrics", "application/json",
                               b'{"n": %08d}' % i) for i in range(start, start + 5_000)])
    db = state / DELIVERY_SPOOL
    victim = b'{"n": %08d}' % (n - 10)
    raw = db.read_bytes()
    assert raw.count(victim) == 1
    db.write_bytes(raw.replace(victim, b'{"n": xxxxxxxx}'))
    # Nothing listens where it delivers: the records stay, and only the check reads them.
    receiver = Receiver(tmp_path, free_port(), state_dir=state)
    with open(receiver.log_path, "ab") as log:
        first = subprocess.Popen([sys.executable, "-m", "sidecar.hub", *receiver.args],
                                 cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: first.poll() is not None, 60, "the hub to stop")
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 1
    assert f"record id {n - 9} fails its checksum" in receiver.log()
    assert "spool check failed" in receiver.log()
    receiver.start()
    try:
        health = receiver.health()
        assert "lost 1 record(s) that failed their checksum" in health["spool_recovered"]
    finally:
        receiver.terminate()
