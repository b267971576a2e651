"""Where things live on a host when the config does not say: one answer for the
supervisor, the loader and every client command."""

from __future__ import annotations

import os
from pathlib import Path

SOCKET_FILE = "control.sock"  # in runtime_dir
GROUPS_FILE = "agents.json"  # in runtime_dir: pgids of live agents, for crash recovery
LOCK_FILE = "supervisor.lock"  # in runtime_dir: flock'ed by its one supervisor, pid inside
SECRETS_DIR = "secrets"  # in runtime_dir: one folder of secret files per agent
RUNTIME_DIR_ENV = "AGENTVISOR_RUNTIME_DIR"
# The deployed hosts' runtime directory (root's default, the unit's RuntimeDirectory=).
SYSTEM_RUNTIME_DIR = Path("/run/agentvisor")


def default_runtime_dir() -> Path:
    if os.geteuid() == 0:
        return SYSTEM_RUNTIME_DIR
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "agentvisor"
    return Path(f"/tmp/agentvisor-{os.getuid()}")


def runtime_dir_override(flag: Path | None) -> Path | None:
    """The runtime directory the operator chose for this command, if any: --runtime-dir,
    else $AGENTVISOR_RUNTIME_DIR. It beats a config file's runtime_dir (`run` passes it
    to the loader as an override), so `run` and the client commands given the same flag
    or environment always meet on the same control socket."""
    if flag is not None:
        return flag
    env = os.environ.get(RUNTIME_DIR_ENV)
    return Path(env) if env else None


def runtime_dir(flag: Path | None) -> Path:
    """Where a client command finds its supervisor: --runtime-dir, else
    $AGENTVISOR_RUNTIME_DIR, else the default (`run` puts the config file's runtime_dir
    between the last two)."""
    return runtime_dir_override(flag) or default_runtime_dir()


def default_state_dir() -> Path:
    """Durable state (the metrics spool): the unit's StateDirectory= as root."""
    if os.geteuid() == 0:
        return Path("/var/lib/agentvisor")
    return Path.home() / ".local/state/agentvisor"


def default_logs_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/log/agentvisor")
    return Path.home() / ".local/state/agentvisor/logs"
