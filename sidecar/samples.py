"""Agents' process samples as they travel from a host's supervisor to the hubs.

The supervisor samples each agent every round (state, restarts, health, CPU, RSS,
threads, descriptors: `supervisor status` rows). The host's /metrics serves them at once
(`sidecar.exporter`); they also go through the host's spool to the hubs, so that a hub
shows every host's agents, with the values arriving late and in order after a partition.

The one idea: a round of samples is one spool record, pushed by the supervisor itself
under the reserved agent name `SENDER`, with content type `CONTENT_TYPE`, timed when it
was sampled, and the body `{"time": T, "agents": {agent: {name: number}}}`. It then gets
everything a push gets (its own sequence, the power-loss bound, exactly once at the hub,
in order) without a second path, and agents' own sequences are untouched. Sample names
are the host's exporter names without `agentvisor_agent_` (`up`, `restarts_total`,
`cpu_percent`...), so one query reads either /metrics.

The supervisor hands a round to the data process as `POST /samples` on its status
listener (`round_body`); the data process checks it (`parse_round`) and spools it; the
hub receiver reads it back the same way and exports the latest values.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Final, Mapping, TypeGuard

CONTENT_TYPE: Final = "application/x-agentvisor-samples"
# The path a sample record carries (a legacy hub never gets it: the receiver exports
# samples itself and delivers only agents' own pushes).
PATH: Final = "/agentvisor/v1/samples"
PREFIX: Final = "agentvisor_agent_"
# The agent name a host's sample records are pushed under: reserved, no agent may take it
# (supervisor.config), so their sequence is the supervisor's own.
SENDER: Final = "agentvisor"
NAME: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]{0,99}\Z")
# An agent name as a sample round may carry it: printable ASCII, nothing a hub could not
# put in an HTTP header field (the wire refuses the same).
AGENT: Final = re.compile(r"[!-~][ -~]{0,199}\Z")
MAX_AGENTS: Final = 1000  # a host has ~40 agents
MAX_SAMPLES: Final = 64  # per agent; a row gives nine
# A round's body as spooled: ~170 bytes an agent; a host of 1,000 agents fits.
MAX_ROUND_BYTES: Final = 1 << 20


def from_row(row: Mapping[str, Any]) -> dict[str, float]:
    """An agent's samples from its `status` row: only what the row has as numbers (a
    stopped agent has no CPU; an unprobed one no health)."""
    out: dict[str, float] = {}
    state = row.get("state")
    if isinstance(state, str):
        out["up"] = 1.0 if state == "RUNNING" else 0.0
    for name, key, scale in (("restarts_total", "restarts", 1.0),
                             ("cpu_percent", "cpu_percent", 1.0),
                             ("resident_memory_bytes", "rss_mb", 1024.0 * 1024.0),
                             ("threads", "threads", 1.0),
                             ("open_fds", "fds", 1.0),
                             ("uptime_seconds", "uptime_s", 1.0)):
        value = row.get(key)
        if finite(value):
            out[name] = float(value) * scale
    if isinstance(row.get("healthy"), bool):
        out["healthy"] = 1.0 if row["healthy"] else 0.0
    return out


def finite(value: Any) -> TypeGuard[int | float]:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def check(metrics: Any) -> dict[str, float] | str:
    """`{name: number}` checked, or why it is not."""
    if not isinstance(metrics, dict):
        return "not an object of sample name to number"
    if len(metrics) > MAX_SAMPLES:
        return f"{len(metrics)} samples (at most {MAX_SAMPLES})"
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not NAME.match(name):
            return f"sample name {str(name)[:60]!r} is not a metric name " \
                   "([a-zA-Z_][a-zA-Z0-9_]*)"
        if type(value) not in (int, float, bool) or not math.isfinite(value):
            return f"sample {name}: {value!r} is not a finite number"
        out[name] = float(value)
    return out


def round_body(time: float, agents: Mapping[str, Mapping[str, float]]) -> bytes:
    """What the supervisor POSTs to the data process for one sampling round."""
    return json.dumps({"time": time, "agents": agents}, separators=(",", ":")).encode()


def parse_round(data: bytes | memoryview) -> tuple[float, dict[str, dict[str, float]]] | str:
    """(time, {agent: metrics}) from a round's body, or what is wrong with it."""
    if len(data) > MAX_ROUND_BYTES:
        return f"{len(data)} bytes (at most {MAX_ROUND_BYTES})"
    try:
        doc = json.loads(bytes(data))
    except (ValueError, RecursionError) as exc:
        return f"not JSON ({exc})"
    if not isinstance(doc, dict):
        return "not a JSON object"
    time, agents = doc.get("time"), doc.get("agents")
    if not finite(time) or time <= 0:
        return '"time" must be unix seconds'
    if not isinstance(agents, dict):
        return '"agents" must be an object of agent name to samples'
    if len(agents) > MAX_AGENTS:
        return f"{len(agents)} agents (at most {MAX_AGENTS})"
    out: dict[str, dict[str, float]] = {}
    for agent, metrics in agents.items():
        if not AGENT.match(agent):
            return f"agent name {agent[:60]!r} is not 1-200 printable ASCII characters"
        checked = check(metrics)
        if isinstance(checked, str):
            return f"{agent}: {checked}"
        out[agent] = checked
    return float(time), out
