"""Probes against real sockets, real HTTP servers and real child processes."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

from supervisor.config.model import HealthCheck, ProbeKind
from supervisor.health import ProbeResult, probe
from tests.integration.harness import pid_alive, wait_until


def run(check: HealthCheck) -> ProbeResult:
    return asyncio.run(probe(check))


def closed_port() -> int:
    # Bound then closed: nothing listens there, and the kernel will not hand the port
    # to anyone else for a while.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_none_is_always_ok():
    assert run(HealthCheck(ProbeKind.NONE)).ok


# --- tcp -------------------------------------------------------------------------


def test_tcp_ok_against_a_listening_socket():
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        result = run(HealthCheck(ProbeKind.TCP, port=port, timeout_s=2))
    assert result == ProbeResult(True, f"connected to 127.0.0.1:{port}")


def test_tcp_refused_names_the_address():
    port = closed_port()
    result = run(HealthCheck(ProbeKind.TCP, port=port, timeout_s=2))
    assert result == ProbeResult(False, f"connection refused on 127.0.0.1:{port}")


def test_tcp_without_port_fails_instead_of_raising():
    assert not run(HealthCheck(ProbeKind.TCP, port=None)).ok


def test_unresolvable_host_fails_instead_of_raising():
    result = run(HealthCheck(ProbeKind.TCP, host="no-such-host.invalid", port=80, timeout_s=5))
    # An offline resolver may hang instead of answering NXDOMAIN: both are failures.
    assert not result.ok
    assert "no-such-host.invalid" in result.detail or result.detail == "timed out after 5 s"


# --- tcp with the main-port fallback (legacy agents without a health server) --------


def test_nothing_on_the_health_port_falls_back_to_the_main_port_until_it_opens():
    health = closed_port()
    with socket.create_server(("127.0.0.1", 0)) as main:
        m = main.getsockname()[1]
        check = HealthCheck(ProbeKind.TCP, port=health, fallback_port=m, timeout_s=2)
        assert run(check) == ProbeResult(
            True, f"connected to 127.0.0.1:{m} (main port; nothing listens on health port "
                  f"{health})", via=m)
        # The agent opens its health port later: from then on that is what counts.
        with socket.create_server(("127.0.0.1", health)):
            assert run(check) == ProbeResult(True, f"connected to 127.0.0.1:{health}")


def test_a_health_port_held_by_another_process_that_accepts_is_not_the_fallback_case():
    # Whoever accepts on the health port answers the probe; the main port is not asked.
    with socket.create_server(("127.0.0.1", 0)) as stranger:
        health = stranger.getsockname()[1]
        main = closed_port()
        result = run(HealthCheck(ProbeKind.TCP, port=health, fallback_port=main, timeout_s=2))
    assert result == ProbeResult(True, f"connected to 127.0.0.1:{health}")


def test_both_ports_refused_names_both():
    health, main = closed_port(), closed_port()
    result = run(HealthCheck(ProbeKind.TCP, port=health, fallback_port=main, timeout_s=2))
    assert result == ProbeResult(
        False, f"connection refused on 127.0.0.1:{main} (main port), connection refused on "
               f"127.0.0.1:{health} (health port)")


# --- http ------------------------------------------------------------------------


async def http_probe_against(status_line: bytes, path: str = "/health", expect: int = 200):
    """Serve one canned status line from a real asyncio server; return (result, the
    request line the server received)."""
    seen: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        seen.append(await reader.readline())
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        writer.write(status_line + b"Content-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        result = await probe(HealthCheck(ProbeKind.HTTP, port=port, path=path, status=expect,
                                         timeout_s=2))
    return result, seen, port


def test_http_200_is_healthy_and_sends_a_plain_get():
    result, seen, port = asyncio.run(http_probe_against(b"HTTP/1.1 200 OK\r\n"))
    assert result == ProbeResult(True, f"HTTP 200 from http://127.0.0.1:{port}/health")
    assert seen == [b"GET /health HTTP/1.0\r\n"]


def test_http_503_is_unhealthy():
    result, _, port = asyncio.run(http_probe_against(b"HTTP/1.1 503 Service Unavailable\r\n"))
    assert result == ProbeResult(False, f"HTTP 503 from http://127.0.0.1:{port}/health")


def test_http_expected_status_is_configurable():
    result, _, _ = asyncio.run(http_probe_against(b"HTTP/1.0 204 No Content\r\n", expect=204))
    assert result.ok
    result, _, port = asyncio.run(http_probe_against(b"HTTP/1.0 200 OK\r\n", "/ready", 204))
    assert result == ProbeResult(
        False, f"HTTP 200 from http://127.0.0.1:{port}/ready, expected 204")


def test_http_garbage_is_unhealthy():
    result, _, _ = asyncio.run(http_probe_against(b"SSH-2.0-OpenSSH_9.2\r\n"))
    assert not result.ok and "malformed status line" in result.detail


def test_http_server_that_never_answers_times_out():
    # A listening socket that never accepts: the kernel completes the handshake from
    # its backlog, then nothing ever comes back. The dead-socket hang of the old boot
    # script, in miniature.
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        started = time.monotonic()
        result = run(HealthCheck(ProbeKind.HTTP, port=port, timeout_s=0.2))
        elapsed = time.monotonic() - started
    assert result == ProbeResult(False, "timed out after 0.2 s")
    assert elapsed < 2.0


def test_http_refused():
    port = closed_port()
    result = run(HealthCheck(ProbeKind.HTTP, port=port, timeout_s=2))
    assert result == ProbeResult(False, f"connection refused on 127.0.0.1:{port}")


# --- exec ------------------------------------------------------------------------


def test_exec_true_and_false():
    assert run(HealthCheck(ProbeKind.EXEC, command=("true",), timeout_s=5)) == ProbeResult(
        True, "exec exited 0")
    assert run(HealthCheck(ProbeKind.EXEC, command=("sh", "-c", "exit 2"), timeout_s=5)) == (
        ProbeResult(False, "exec exited 2"))
    assert not run(HealthCheck(ProbeKind.EXEC, command=("false",), timeout_s=5)).ok


def test_exec_missing_binary_fails_instead_of_raising():
    result = run(HealthCheck(ProbeKind.EXEC, command=("/nonexistent/probe",), timeout_s=5))
    assert result == ProbeResult(
        False, "exec failed: /nonexistent/probe: no such file or directory")


def test_exec_timeout_kills_the_probe_and_what_it_forked(tmp_path: Path):
    pids = tmp_path / "pids"
    # The shell forks a background sleep (a grandchild of the supervisor) and then
    # becomes a sleep itself: both must be gone when the probe returns.
    script = f"sleep 10 & echo $! > {pids}; echo $$ >> {pids}; exec sleep 10"
    started = time.monotonic()
    result = run(HealthCheck(ProbeKind.EXEC, command=("sh", "-c", script), timeout_s=0.3))
    assert time.monotonic() - started < 3.0
    assert result == ProbeResult(False, "timed out after 0.3 s")
    grandchild, child = (int(p) for p in pids.read_text().split())
    wait_until(lambda: not pid_alive(child), 5, "the probe process to be killed at its timeout")
    wait_until(lambda: not pid_alive(grandchild), 5, "what the probe forked to be killed")


def test_cancelled_exec_probe_kills_its_process(tmp_path: Path):
    # The supervisor cancels probes when it stops an agent or shuts down; a cancelled
    # probe must not leave its process behind.
    pidfile = tmp_path / "pid"
    check = HealthCheck(ProbeKind.EXEC, command=("sh", "-c", f"echo $$ > {pidfile}; exec sleep 10"),
                        timeout_s=30)

    async def main() -> int:
        task = asyncio.create_task(probe(check))
        end = time.monotonic() + 5
        while not pidfile.exists() or not pidfile.read_text().strip():
            assert time.monotonic() < end, "probe process never started"
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return int(pidfile.read_text())

    pid = asyncio.run(main())
    wait_until(lambda: not pid_alive(pid), 5, "the cancelled probe's process to be killed")


def test_cancelled_http_probe_raises_cancelled():
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        check = HealthCheck(ProbeKind.HTTP, port=srv.getsockname()[1], timeout_s=30)

        async def main():
            task = asyncio.create_task(probe(check))
            done, _ = await asyncio.wait([task], timeout=0.1)
            assert not done  # nobody answers: it is blocked reading the status line
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(main())
