"""The CLI's side of the control socket: blocking and dependency-free, so that
`agentvisor status` starts fast."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from supervisor.paths import SOCKET_FILE


class Unreachable(Exception):
    """No supervisor answers on that runtime directory."""


def request(runtime_dir: Path, payload: dict, timeout_s: float | None = None) -> dict:
    path = runtime_dir / SOCKET_FILE
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout_s)
    try:
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise Unreachable(f"no supervisor is running (no answer on {path})") from None
        except PermissionError:
            raise Unreachable(f"permission denied on {path} (run as root or the "
                              "supervisor's user)") from None
        s.sendall(json.dumps(payload).encode() + b"\n")
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        s.close()
    data = b"".join(chunks)
    if not data:
        raise Unreachable(f"the supervisor closed {path} without answering")
    return json.loads(data)

