"""The control socket: a unix stream socket in the runtime directory.

One JSON request per connection, one JSON reply line. A unix socket rather than TCP so
that the kernel tells us who is asking (SO_PEERCRED): only root, the supervisor's own user
and (optionally) one configured group get in, and every refusal is logged with the peer's
uid and pid.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from sidecar.control import MalformedRequest, parse_request
from supervisor.control import commands

if TYPE_CHECKING:
    from supervisor.daemon import Supervisor

log = logging.getLogger("agentvisor.control")

MAX_REQUEST_BYTES = 64 * 1024  # a request is a command and a name; anything bigger is junk
REQUEST_TIMEOUT_S = 10.0  # a client that connects and says nothing is not kept waiting


class ControlError(Exception):
    pass


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)


class ControlServer:
    def __init__(self, path: Path, supervisor: "Supervisor", allowed_gid: int | None = None):
        self.path = path
        self._supervisor = supervisor
        self._allowed_gid = allowed_gid
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            if _answers(self.path):
                raise ControlError(
                    f"another supervisor is already running with control socket {self.path}"
                )
            # Stale, left by a supervisor that died. Safe to remove: only a Supervisor
            # starts this server, and it holds the runtime directory's lock
            # (runtime_lock.py), so no other supervisor can be serving on this path.
            self.path.unlink()
        # Create it private, then widen to the group if one is configured: there is no
        # window in which others could connect.
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=MAX_REQUEST_BYTES
            )
        finally:
            os.umask(old)
        if self._allowed_gid is not None:
            os.chown(self.path, -1, self._allowed_gid)
            os.chmod(self.path, 0o660)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        try:
            self.path.unlink()
        except OSError:
            pass

    def _allowed(self, pid: int, uid: int, gid: int) -> bool:
        if uid in (0, os.geteuid()):
            return True
        wanted = self._allowed_gid
        return wanted is not None and (gid == wanted or wanted in _supplementary_groups(pid))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            # Read the request before answering even a refusal: a reply sent before the
            # client has written would meet its write with a reset instead of the reason.
            unreadable = None
            try:
                line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT_S)
            except (ValueError, asyncio.LimitOverrunError):
                line, unreadable = b"", "malformed request: too long"
            except asyncio.TimeoutError:
                line, unreadable = b"", f"no request within {REQUEST_TIMEOUT_S:g} s"
            pid, uid, gid = peer_credentials(writer.get_extra_info("socket"))
            if not self._allowed(pid, uid, gid):
                log.warning("refused control connection from uid %d pid %d", uid, pid)
                reply = {"ok": False, "error": "permission denied"}
            elif unreadable is not None:
                reply = {"ok": False, "error": unreadable}
            else:
                reply = await self._answer(line)
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing to tell it
        finally:
            writer.close()

    async def _answer(self, line: bytes) -> dict:
        try:
            request = parse_request(line)
        except MalformedRequest as exc:
            return {"ok": False, "error": str(exc)}
        return await commands.dispatch(self._supervisor, request)


def _supplementary_groups(pid: int) -> set[int]:
    # SO_PEERCRED carries the primary gid only; membership is usually supplementary.
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


def _answers(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()
