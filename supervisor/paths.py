"""Where things live on a host when the config does not say: one answer for the
supervisor, the loader and every client command."""

from __future__ import annotations

import os
from pathlib import Path

SOCKET_FILE = "control.sock"  # in runtime_dir
GROUPS_FILE = "agents.json"  # in runtime_dir: pgids of live agents, for crash recovery


def default_runtime_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/run/agentvisor")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "agentvisor"
    return Path(f"/tmp/agentvisor-{os.getuid()}")


def default_logs_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/log/agentvisor")
    return Path.home() / ".local/state/agentvisor/logs"
