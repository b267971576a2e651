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
    values: dict[str, str] = {}
    for key, template in spec.env.items():
        for kind, name in placeholders.find(template):
            ref = f"{kind}:{name}" if kind else name
            if ref in values:
                continue
            if kind == "upstream":
                values[ref] = traffic.upstream_address(host, name)
            elif kind is None:
                try:
                    values[ref] = secrets.read_secret(host.secrets, name)
                except secrets.SecretError as exc:
                    raise SpawnError(str(exc)) from None
        env[key] = placeholders.expand(template, values)
    return env
