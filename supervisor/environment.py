"""What an agent finds in its environment at spawn.

The supervisor's own environment, minus what belongs to the supervisor (systemd's notify
socket, watchdog and credentials directory: an agent must not be able to speak for the
supervisor), then the legacy launch contract, then `global_settings.environment` and the
agent's `env_vars` with their `${...}` placeholders filled in.

The legacy launch contract is what the old launcher (`start_system_v2.py`) exported to
every agent, and what the real agents read their ports from (falling back to defaults
baked into their code, so a port edited in the YAML would otherwise never reach them):
AGENT_NAME, AGENT_PORT and HEALTH_CHECK_PORT (the evaluated ints; omitted when the agent
has none) and AGENT_GROUP (omitted for a flat list). The agent's own env_vars are laid
over them, as the old launcher did.

A `${NAME}` is a secret when load found it in the secret store (AgentSpec.secret_names):
read from its file now, never kept. Any other `${NAME}` is the supervisor's environment;
`${PWD}` without a PWD there (systemd sets none) is the agent's working directory.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

from supervisor import secrets
from supervisor.config import placeholders
from supervisor.config.validate import WORKING_DIR_VAR
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
    env.update(launch_contract(spec))
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
                values.setdefault(f"upstream:{name}",
                                  traffic.upstream_address(host, name, spec.name))
            elif kind is None and name not in values:
                values[name] = _from_environment(spec, name, base)
        env[key] = placeholders.expand(template, values)
    return env


def launch_contract(spec: AgentSpec) -> dict[str, str]:
    """The variables the old launcher gave every agent (see the module docstring)."""
    env = {"AGENT_NAME": spec.name}
    if spec.port is not None:
        env["AGENT_PORT"] = str(spec.port)
    if spec.health_check_port is not None:
        env["HEALTH_CHECK_PORT"] = str(spec.health_check_port)
    if spec.group is not None:
        env["AGENT_GROUP"] = spec.group
    return env


def _from_environment(spec: AgentSpec, name: str, base: Mapping[str, str]) -> str:
    """A ${NAME} that is not a secret: the supervisor's environment. `base` has dropped
    the supervisor's own variables, which validation saw, so os.environ is asked too."""
    for env in (base, os.environ):
        if name in env:
            return env[name]
    if name == WORKING_DIR_VAR:
        return str(spec.cwd)
    raise SpawnError(f"${{{name}}} in its env_vars is not set in the supervisor's "
                     "environment any more (validation found it); set it and restart the "
                     "supervisor, or put it in the secret store", permanent=True)


def _write_secret_folder(host: HostConfig, spec: AgentSpec, values: dict[str, str]):
    """The agent's own folder of secret files (only those it references)."""
    folder = secrets.agent_folder(host.runtime_dir, spec.name)
    if host.secrets.require_memory_fs:
        secrets.check_memory_fs(host.runtime_dir)
    who = process.identity(spec.user) if spec.user else None
    uid, gid = (who.uid, who.gid) if who else (os.geteuid(), os.getegid())
    folder.write(values, uid, gid)
    return folder.path
