"""The supervisor's side of systemd's sd_notify protocol, without libsystemd.

The protocol is one datagram of `KEY=VALUE` lines to the AF_UNIX socket named in
$NOTIFY_SOCKET: READY=1 when the host is up, STATUS= for `systemctl status`,
WATCHDOG=1 as a keep-alive, RELOADING=1 and STOPPING=1 around reloads and shutdown.
It is small enough to speak directly, and a dependency on libsystemd would be the only
C library the supervisor needs.

Notification must never hurt the host: outside systemd every call is a no-op, and a
failed send is logged at debug level and forgotten. The socket is non-blocking, so a
stalled systemd cannot stall the event loop either; at worst it misses a keep-alive.

This module also owns the list of variables systemd hands the supervisor that must not
reach agents (`CHILD_ENV_DROP`).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Mapping

log = logging.getLogger(__name__)

# systemd sets these for the supervisor alone. Passed on, they would let an agent speak
# to systemd, claim our sockets, or act as the unit. Dropped before every spawn.
CHILD_ENV_DROP = (
    # Only the supervisor speaks for the unit. NotifyAccess=main already makes systemd
    # drop a child's READY/STOPPING (with a journal warning each time); without the
    # variable an agent's sd_notify library stays quiet, and the watchdog can only ever
    # be fed by the supervisor's own loop, even if the unit is changed to
    # NotifyAccess=all.
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    # Socket-activation fds are the supervisor's; a library that skips the LISTEN_PID
    # check would take fd 3 as its listener.
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    # "You run under systemd, log to the journal": many programs drop timestamps or
    # switch format on these, but an agent's output goes to its own log file.
    "INVOCATION_ID",
    "JOURNAL_STREAM",
    "SYSTEMD_EXEC_PID",
    # Every credential of the unit. An agent receives only the secrets its config names,
    # filled into its own env_vars at spawn.
    "CREDENTIALS_DIRECTORY",
    # The supervisor's own directories (RuntimeDirectory= etc.); an agent that honours
    # them would write its files among the supervisor's.
    "RUNTIME_DIRECTORY",
    "STATE_DIRECTORY",
    "LOGS_DIRECTORY",
    "CACHE_DIRECTORY",
    "CONFIGURATION_DIRECTORY",
    # systemd >= 254: the unit's memory pressure fd/path.
    "MEMORY_PRESSURE_WATCH",
    "MEMORY_PRESSURE_WRITE",
)


def child_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` without the variables in `CHILD_ENV_DROP`: the base of an agent's env."""
    return {k: v for k, v in env.items() if k not in CHILD_ENV_DROP}


class Notifier:
    """sd_notify for this process. Build one at startup, from the unit's environment."""

    def __init__(self, env: Mapping[str, str] = os.environ):
        self._address = _parse_socket(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = _parse_watchdog(env)
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        """True when systemd is listening (the unit is Type=notify)."""
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to call `watchdog()`: half of WatchdogSec=, as systemd advises, so
        one late tick is not a restart. None when this process has no watchdog."""
        if self._watchdog_usec is None or not self.enabled:
            return None
        return self._watchdog_usec / 2 / 1e6

    def ready(self, status: str | None = None) -> None:
        """Startup (or a reload) is done: `systemctl start` returns, dependants start."""
        self._send("READY=1", *([_status(status)] if status is not None else []))

    def status(self, text: str) -> None:
        """One line for `systemctl status`, e.g. "64/77 agents running"."""
        self._send(_status(text))

    def reloading(self) -> None:
        """A reload began; send `ready()` when it is done. MONOTONIC_USEC lets systemd
        (>= 253) tell this reload from an older one."""
        self._send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self) -> None:
        """Shutdown began: systemd shows "deactivating" while agents stop."""
        self._send("STOPPING=1")

    def watchdog(self) -> None:
        """Keep-alive. A no-op unless this process owns the unit's watchdog."""
        if self.watchdog_interval_s is not None:
            self._send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send(self, *lines: str) -> None:
        if self._address is None:
            return
        try:
            if self._sock is None:
                # Non-blocking: sendto on a full receive queue fails at once instead of
                # stalling the loop that restarts agents.
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
            self._sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as e:
            log.debug("sd_notify %r to %r failed: %s", lines, self._address, e)


def _parse_socket(value: str) -> str | bytes | None:
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        # An abstract socket: '@' stands for the leading NUL byte.
        return b"\0" + value[1:].encode()
    if value:
        log.debug("NOTIFY_SOCKET=%r is not a path or abstract socket; not notifying", value)
    return None


def _parse_watchdog(env: Mapping[str, str]) -> int | None:
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
        # WATCHDOG_PID names the process systemd watches. Inherited by a process that is
        # not that one (we were started by a wrapper), it is not ours to feed.
        pid = env.get("WATCHDOG_PID")
        if pid is not None and int(pid) != os.getpid():
            return None
    except ValueError:
        return None
    return usec if usec > 0 else None


def _status(text: str) -> str:
    # One datagram, one line per field: a newline in the text would start a new field.
    return "STATUS=" + " ".join(text.splitlines())
