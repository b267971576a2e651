"""What the control socket can be asked: one coroutine per command.

Each takes the supervisor and the request and returns the reply's fields; failures are
exceptions that `dispatch` turns into `{"ok": false, "error": ...}`. The CLI in
`supervisor/cli.py` is the user-facing side of each.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Awaitable, Callable

from supervisor.config import ConfigError, ConfigUnreadable
from supervisor.policy.lifecycle import AT_REST, State
from supervisor.traffic import ListenerError

if TYPE_CHECKING:
    from supervisor.daemon import Supervisor

Command = Callable[["Supervisor", dict], Awaitable[dict]]

# An operator's `start` waits this long beyond the agent's own start timeout before
# giving the prompt back (the agent keeps starting either way).
START_WAIT_SLACK_S = 5.0


async def status(sup: "Supervisor", req: dict) -> dict:
    """The host's state and a row per agent."""
    return sup.status()


async def start(sup: "Supervisor", req: dict) -> dict:
    """Start an agent (clears FATAL) and wait until it is RUNNING or gives up."""
    agent = sup.agent(req.get("name", ""))
    agent.start()
    timeout = agent.spec.health.start_timeout_s + START_WAIT_SLACK_S
    await agent.wait_for(
        lambda a: a.state is State.RUNNING or (a.state in AT_REST and not a.wants_running),
        timeout,
    )
    return {"agent": agent.status()}


async def stop(sup: "Supervisor", req: dict) -> dict:
    """Stop an agent and every process it forked; returns once they are gone."""
    agent = sup.agent(req.get("name", ""))
    await agent.stop(by_operator=True)
    return {"agent": agent.status()}


async def restart(sup: "Supervisor", req: dict) -> dict:
    """Stop, then start and wait until RUNNING."""
    agent = sup.agent(req.get("name", ""))
    await agent.stop(by_operator=True)
    return await start(sup, req)


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
