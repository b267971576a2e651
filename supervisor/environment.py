"""What an agent finds in its environment at spawn.

The supervisor's own environment, minus what belongs to the supervisor (systemd's notify
socket, watchdog and credentials directory: an agent must not be able to speak for the
supervisor), plus `global_settings.environment` and the agent's `env_vars` with their
`${...}` placeholders filled in.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

from supervisor import secrets
from supervisor.config import placeholders
from supervisor.config.model import AgentSpec, HostConfig
from supervisor import process
from supervisor.process import SpawnError
from supervisor.systemd import child_env
from supervisor.traffic import Traffic


def base_environment(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    return {k: v for k, v in child_env(env).items() if not k.startswith("AGENTVISOR_")}


def agent_environment(host: HostConfig, spec: AgentSpec, base: Mapping[str, str],
                      traffic: Traffic) -> dict[str, str]:
    """The full environment for one spawn; SpawnError names what is missing."""
    traffic.check_spawn(spec)
    env = dict(base)
    env.update(traffic.proxy_environment(spec))
    # Output through a pipe is block-buffered by default: a crash would lose the last
    # lines an operator needs. Unbuffered unless the agent's config says otherwise.
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["AGENTVISOR_AGENT"] = spec.name
    if spec.config:
        env["AGENTVISOR_AGENT_CONFIG"] = json.dumps(dict(spec.config), sort_keys=True)
    try:
        values = {name: secrets.read_secret(host.secrets, name)
                  for name in sorted(secrets.referenced(spec))}
        if spec.secret_files_env:
            env[spec.secret_files_env] = str(_write_secret_folder(host, spec, values))
    except secrets.SecretError as exc:
        raise SpawnError(str(exc), permanent=True) from None
    for key, template in spec.env.items():
        for kind, name in placeholders.find(template):
            if kind == "upstream":
                values.setdefault(f"upstream:{name}", traffic.upstream_address(host, name))
        env[key] = placeholders.expand(template, values)
    return env


def _write_secret_folder(host: HostConfig, spec: AgentSpec, values: dict[str, str]):
    """The agent's own folder of secret files (only those it references)."""
    folder = secrets.agent_folder(host.runtime_dir, spec.name)
    if host.secrets.require_memory_fs:
        secrets.check_memory_fs(host.runtime_dir)
    who = process.identity(spec.user) if spec.user else None
    uid, gid = (who.uid, who.gid) if who else (os.geteuid(), os.getegid())
    folder.write(values, uid, gid)
    return folder.path
