"""sd_notify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import os
import select
import socket
import time
import uuid
from pathlib import Path

import pytest

from supervisor.systemd import CHILD_ENV_DROP, Notifier, child_env


@pytest.fixture
def systemd(tmp_path: Path):
    """A bound datagram socket where systemd's would be: (socket, NOTIFY_SOCKET value)."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)  # a missing datagram fails the test, not hangs it
        yield sock, str(path)


def received(sock: socket.socket) -> bytes:
    return sock.recv(4096)


def nothing_pending(sock: socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    return not readable


def test_exact_datagrams(systemd):
    sock, address = systemd
    n = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000"})
    assert n.enabled
    n.ready()
    assert received(sock) == b"READY=1"
    n.status("64/77 agents running")
    assert received(sock) == b"STATUS=64/77 agents running"
    n.watchdog()
    assert received(sock) == b"WATCHDOG=1"
    n.stopping()
    assert received(sock) == b"STOPPING=1"
    n.ready(status="reloaded")
    assert received(sock) == b"READY=1\nSTATUS=reloaded"
    n.close()


def test_reloading_carries_the_monotonic_clock(systemd):
    sock, address = systemd
    n = Notifier({"NOTIFY_SOCKET": address})
    before = time.monotonic_ns() // 1000
    n.reloading()
    after = time.monotonic_ns() // 1000
    first, second = received(sock).split(b"\n")
    assert first == b"RELOADING=1"
    key, value = second.split(b"=")
    assert key == b"MONOTONIC_USEC" and before <= int(value) <= after


def test_status_is_one_line_whatever_the_text(systemd):
    sock, address = systemd
    Notifier({"NOTIFY_SOCKET": address}).status("agent A failed\nREADY=1")
    # A newline would have smuggled a READY=1 field into the datagram.
    assert received(sock) == b"STATUS=agent A failed READY=1"


def test_abstract_socket():
    name = f"agentvisor-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert received(sock) == b"READY=1"


def test_watchdog_interval_is_half_of_watchdog_usec():
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "2000000"}
    assert Notifier(env).watchdog_interval_s == 1.0
    assert Notifier(env | {"WATCHDOG_PID": str(os.getpid())}).watchdog_interval_s == 1.0
    assert Notifier({"NOTIFY_SOCKET": "/run/systemd/notify"}).watchdog_interval_s is None
    assert Notifier(env | {"WATCHDOG_USEC": "soon"}).watchdog_interval_s is None
    assert Notifier({"WATCHDOG_USEC": "2000000"}).watchdog_interval_s is None  # no socket


def test_someone_elses_watchdog_is_not_fed(systemd):
    sock, address = systemd
    n = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000",
                  "WATCHDOG_PID": str(os.getpid() + 1)})
    assert n.watchdog_interval_s is None
    n.watchdog()
    n.ready()
    assert received(sock) == b"READY=1"  # the first datagram: no WATCHDOG=1 went out
    assert nothing_pending(sock)


def test_outside_systemd_everything_is_a_no_op():
    n = Notifier({})
    assert not n.enabled and n.watchdog_interval_s is None
    n.ready()
    n.status("x")
    n.watchdog()
    n.reloading()
    n.stopping()
    assert not Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled  # not supported here


def test_a_send_failure_never_raises(tmp_path: Path):
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert n.enabled
    n.ready()  # ENOENT
    n.status("still fine")


def test_a_full_systemd_queue_does_not_block(systemd):
    sock, address = systemd
    n = Notifier({"NOTIFY_SOCKET": address})
    started = time.monotonic()
    for _ in range(10_000):  # far past the receive queue's length: EAGAIN, not a stall
        n.status("flood")
    assert time.monotonic() - started < 5
    assert received(sock) == b"STATUS=flood"


def test_child_env_drops_what_lets_an_agent_act_for_the_unit():
    unit_env = {
        "PATH": "/usr/bin", "PYTHONPATH": "/opt/agents", "NOTIFY_SOCKET": "/run/systemd/notify",
        "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1", "LISTEN_FDS": "1", "LISTEN_PID": "1",
        "LISTEN_FDNAMES": "control", "INVOCATION_ID": "abc", "JOURNAL_STREAM": "8:1",
        "CREDENTIALS_DIRECTORY": "/run/credentials/agentvisor@mainpc.service",
    }
    assert child_env(unit_env) == {"PATH": "/usr/bin", "PYTHONPATH": "/opt/agents"}
    assert set(unit_env) - {"PATH", "PYTHONPATH"} <= set(CHILD_ENV_DROP)
