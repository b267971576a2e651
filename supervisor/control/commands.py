"""What the control socket can be asked: one coroutine per command.

Each takes the supervisor and the request and returns the reply's fields; failures are
exceptions that `dispatch` turns into `{"ok": false, "error": ...}`. The CLI in
`supervisor/cli.py` is the user-facing side of each.

`start`, `stop` and `restart` act on one agent (`"name"`, reply `"agent"`: its status
row) or on every agent of a group (`"group"`, the old launcher's --group; reply
`"group"` and `"agents"`, a row each).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Awaitable, Callable

from supervisor.config import ConfigError, ConfigUnreadable
from supervisor.traffic import ListenerError

if TYPE_CHECKING:
    from supervisor.agent import Agent
    from supervisor.daemon import Supervisor

Command = Callable[["Supervisor", dict], Awaitable[dict]]

# An operator's `start` waits this long beyond the agent's own start timeout before
# giving the prompt back (the agent keeps starting either way).
START_WAIT_SLACK_S = 5.0


async def status(sup: "Supervisor", req: dict) -> dict:
    """The host's state and a row per agent."""
    return sup.status()


async def start(sup: "Supervisor", req: dict) -> dict:
    """Start an agent, or a group's agents in dependency order (clears FATAL), and wait
    until each is RUNNING, has given up, or is blocked by a dependency that needs an
    operator."""
    agents = _targets(sup, req)
    for agent in agents:
        agent.start()
    await sup.wait_settled(agents, sup.start_timeout_s(agents) + START_WAIT_SLACK_S)
    return _reply(req, agents)


async def stop(sup: "Supervisor", req: dict) -> dict:
    """Stop an agent, or a group's agents dependants first, and every process they
    forked; returns once they are gone."""
    agents = _targets(sup, req)
    await sup.stop_by_operator(agents)
    return _reply(req, agents)


async def restart(sup: "Supervisor", req: dict) -> dict:
    """Stop, then start and wait until RUNNING."""
    await stop(sup, req)
    return await start(sup, req)


def _targets(sup: "Supervisor", req: dict) -> list["Agent"]:
    if "group" in req:
        return sup.group(req["group"])
    return [sup.agent(req.get("name", ""))]


def _reply(req: dict, agents: list["Agent"]) -> dict:
    if "group" in req:
        return {"group": req["group"], "agents": [a.status() for a in agents]}
    return {"agent": agents[0].status()}


async def logs(sup: "Supervisor", req: dict) -> dict:
    """Where an agent's stdout and stderr go (the client reads the file itself)."""
    agent = sup.agent(req.get("name", ""))
    return {"path": str(agent.spec.log_path)}


async def reload(sup: "Supervisor", req: dict) -> dict:
    """Re-read the config file and apply only what changed."""
    return await sup.reload()


async def rollback(sup: "Supervisor", req: dict) -> dict:
    """Go back to the config that was in force before the last reload."""
    return await sup.rollback()


async def breakers(sup: "Supervisor", req: dict) -> dict:
    """Every breaker of the sidecar: state, failures in window, trips, rejections."""
    return await _sidecar(sup, {"cmd": "breakers"})


async def breaker(sup: "Supervisor", req: dict) -> dict:
    """Open, close or reset a breaker (or every breaker of an upstream) by hand."""
    return await _sidecar(sup, {"cmd": "breaker", "action": req.get("action"),
                                "name": req.get("name")})


async def _sidecar(sup: "Supervisor", payload: dict) -> dict:
    reply = await sup.traffic.ask_sidecar(payload)
    if not reply.pop("ok", False):
        raise LookupError(reply.get("error", "the sidecar refused"))
    return reply


COMMANDS: dict[str, Command] = {
    "breakers": breakers,
    "breaker": breaker,
    "status": status,
    "start": start,
    "stop": stop,
    "restart": restart,
    "logs": logs,
    "reload": reload,
    "rollback": rollback,
}


async def dispatch(sup: "Supervisor", request: dict[str, str]) -> dict:
    """`request` as `sidecar.control.parse_request` returns it: every field a string."""
    cmd = request.get("cmd", "")
    command = COMMANDS.get(cmd)
    if command is None:
        return {"ok": False, "error": f"unknown command {cmd[:80]!r}"}
    try:
        return {"ok": True, **await command(sup, request)}
    except ConfigError as exc:
        return {"ok": False, "error": "the config is invalid; nothing was changed",
                "problems": [str(p) for p in exc.problems]}
    except ListenerError as exc:
        return {"ok": False, "error": "the config cannot be applied; nothing was changed",
                "problems": [str(exc)]}
    except (LookupError, ConfigUnreadable) as exc:
        return {"ok": False, "error": str(exc.args[0]) if exc.args else str(exc)}
