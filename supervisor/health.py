"""Readiness and liveness probes: one `probe()` per configured `HealthCheck`.

A probe answers one question, "is this agent serving?", and always answers it: every
failure (refused, reset, timeout, bad status, missing binary) becomes `ok=False` with a
`detail` an operator can act on, so the watcher that calls it never needs a try/except
and a broken probe can never take the supervisor down. Only cancellation propagates.

The whole probe, connect included, runs under one `timeout_s` deadline. HTTP is a
hand-written HTTP/1.0 GET over asyncio streams rather than aiohttp: the supervisor stays
small in memory, and a status line is all a probe needs to read.

A tcp probe with a `fallback_port` (derived from the legacy fields) is the old launcher's
readiness: the health port first, and when nobody listens there (connection refused, not
a timeout or a reset: those are a health server that is unwell) a connect to the main
port. Every probe tries the health port again, so an agent that opens it later is judged
by it from then on. `describe` says which probe is in use, for `status`.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shlex
import signal
import socket
from dataclasses import dataclass
from typing import Awaitable, Callable

from supervisor.config.model import HealthCheck, ProbeKind

# A status line longer than this is not a real HTTP server; don't buffer its noise.
_MAX_STATUS_LINE_BYTES = 8192


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    detail: str  # what happened, in words an operator can act on
    # The port that answered when it is not the probe's own: the main port of an agent
    # with nothing listening on its health port (`HealthCheck.fallback_port`).
    via: int | None = None


async def probe(check: HealthCheck) -> ProbeResult:
    """Run `check` once. Never raises, except `asyncio.CancelledError`."""
    if check.kind is ProbeKind.NONE:
        return ProbeResult(True, "no probe configured")
    try:
        async with asyncio.timeout(check.timeout_s):
            return await _PROBES[check.kind](check)
    except TimeoutError:
        return ProbeResult(False, f"timed out after {check.timeout_s} s")
    except socket.gaierror as e:
        return ProbeResult(False, f"cannot resolve {check.host}: {e.strerror}")
    except OSError as e:
        return ProbeResult(False, f"{_describe(e)} on {_hostport(check)}")
    except Exception as e:  # a probe must never take its watcher down
        return ProbeResult(False, f"probe error: {type(e).__name__}: {e}")


async def _tcp(check: HealthCheck) -> ProbeResult:
    if check.port is None:
        return ProbeResult(False, "tcp probe has no port")
    try:
        await _connect(check.host, check.port)
    except OSError as e:
        if check.fallback_port is None or e.errno != errno.ECONNREFUSED:
            raise
        return await _tcp_main_port(check, check.fallback_port)
    return ProbeResult(True, f"connected to {_hostport(check)}")


async def _tcp_main_port(check: HealthCheck, main: int) -> ProbeResult:
    health = _hostport(check)
    try:
        await _connect(check.host, main)
    except OSError as e:
        return ProbeResult(False, f"{_describe(e)} on {_hostport(check, main)} (main port), "
                                  f"connection refused on {health} (health port)")
    # An agent that opens its main port right after its health port (most do) may have
    # opened both between the two connects: ask the health port again before saying
    # nothing listens there, or status would say so until the next probe.
    try:
        await _connect(check.host, check.port)
    except OSError:
        pass
    else:
        return ProbeResult(True, f"connected to {health}")
    return ProbeResult(True, f"connected to {_hostport(check, main)} (main port; nothing "
                             f"listens on health port {check.port})", via=main)


async def _connect(host: str, port: int) -> None:
    _, writer = await asyncio.open_connection(host, port)
    await _close(writer)


async def _http(check: HealthCheck) -> ProbeResult:
    if check.port is None:
        return ProbeResult(False, "http probe has no port")
    hostport = _hostport(check)
    url = f"http://{hostport}{check.path}"
    reader, writer = await asyncio.open_connection(
        check.host, check.port, limit=_MAX_STATUS_LINE_BYTES
    )
    try:
        # HTTP/1.0 plus Connection: close: the server answers and hangs up, so there is
        # no keep-alive state and no chunked body to reason about.
        writer.write(
            f"GET {check.path} HTTP/1.0\r\nHost: {hostport}\r\n"
            "User-Agent: agentvisor-probe\r\nConnection: close\r\n\r\n".encode("latin-1")
        )
        await writer.drain()
        try:
            line = await reader.readline()
        except ValueError:  # longer than the stream limit
            return ProbeResult(False, f"status line too long from {url}")
    finally:
        await _close(writer)
    if not line:
        return ProbeResult(False, f"connection closed without a response from {url}")
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return ProbeResult(False, f"malformed status line {line[:80]!r} from {url}")
    status = int(parts[1])
    detail = f"HTTP {status} from {url}"
    if status == check.status:
        return ProbeResult(True, detail)
    if check.status != 200:  # say what was expected only when it is not the obvious
        detail += f", expected {check.status}"
    return ProbeResult(False, detail)


async def _exec(check: HealthCheck) -> ProbeResult:
    if not check.command:
        return ProbeResult(False, "exec probe has no command")
    try:
        proc = await asyncio.create_subprocess_exec(
            *check.command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            # Its own process group, so a timeout also kills whatever a shell-script
            # probe forked (a hung curl), not just the shell.
            start_new_session=True,
        )
    except OSError as e:
        return ProbeResult(False, f"exec failed: {check.command[0]}: {_describe(e)}")
    try:
        rc = await proc.wait()
    finally:
        # Reached on timeout or cancellation. Not yet reaped means the pid (and so the
        # group id) is still ours: killing the group cannot hit a stranger.
        if proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await proc.wait()
    if rc == 0:
        return ProbeResult(True, "exec exited 0")
    if rc < 0:
        return ProbeResult(False, f"exec killed by {signal.Signals(-rc).name}")
    return ProbeResult(False, f"exec exited {rc}")


_PROBES: dict[ProbeKind, Callable[[HealthCheck], Awaitable[ProbeResult]]] = {
    ProbeKind.TCP: _tcp,
    ProbeKind.HTTP: _http,
    ProbeKind.EXEC: _exec,
}


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:  # a peer that reset on close has still answered the probe
        pass


def _hostport(check: HealthCheck, port: int | None = None) -> str:
    host = f"[{check.host}]" if ":" in check.host else check.host
    return f"{host}:{check.port if port is None else port}"


def describe(check: HealthCheck, via: int | None = None) -> str:
    """The probe in use, for `status`: "tcp :8200", "http :8200/health", "exec CMD", and
    for an agent judged by its main port (`via`, from the last ProbeResult) which port
    that is and why."""
    if check.kind is ProbeKind.NONE:
        return "none"
    if check.kind is ProbeKind.EXEC:
        return "exec " + shlex.join(check.command)
    # The usual host is loopback (the agent's wildcard address); name any other.
    host = "" if check.host == "127.0.0.1" else (
        f"[{check.host}]" if ":" in check.host else check.host)
    if via is not None:
        return (f"{check.kind.value} {host}:{via} (main port; nothing listens on health "
                f"port {check.port})")
    path = check.path if check.kind is ProbeKind.HTTP else ""
    return f"{check.kind.value} {host}:{check.port}{path}"


def _describe(e: OSError) -> str:
    # asyncio's messages ("Connect call failed ('127.0.0.1', 1)") repeat the address;
    # the errno's own text ("connection refused") is what an operator recognises.
    if e.errno:
        return os.strerror(e.errno).lower()
    return str(e) or type(e).__name__
