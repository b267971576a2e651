"""The sidecar's operator commands: list breakers, open/close/reset one by hand.

Served on a unix socket (mode 0600 in the supervisor's runtime directory), one JSON
request per connection, one JSON reply line; the supervisor's `agentvisor breakers` and
`agentvisor breaker ...` reach it through there. Read-only views (`/metrics`, `/ready`)
are on the TCP metrics listener instead, for Prometheus.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Callable

from sidecar.upstream import Upstream

ACTIONS = ("open", "close", "reset")


def breaker_rows(upstreams: list[Upstream], now: float) -> list[dict]:
    """One row per breaker, with wall-clock times for people."""
    to_wall = time.time() - now
    rows = []
    for up in upstreams:
        for breaker in up.breakers():
            row = breaker.snapshot(now)
            row["upstream"] = up.name
            if row.get("tripped_at") is not None:
                row["tripped_at"] = round(row["tripped_at"] + to_wall, 3)
            rows.append(row)
    return rows


def act(upstreams: list[Upstream], action: str, name: str, now: float) -> list[str]:
    """Apply an operator action to the breaker named, or to every breaker of the upstream
    named; returns the breakers touched (empty: no such name)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}; use one of {', '.join(ACTIONS)}")
    touched = []
    for up in upstreams:
        for breaker in up.breakers():
            if name in (breaker.name, up.name):
                if action == "open":
                    breaker.force_open(now)
                elif action == "close":
                    breaker.force_close(now)
                else:
                    breaker.reset(now)
                touched.append(breaker.name)
    return touched


async def serve(path: Path, upstreams: Callable[[], list[Upstream]]) -> asyncio.AbstractServer:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = json.loads(await reader.readline())
            now = time.monotonic()
            if request.get("cmd") == "breakers":
                reply = {"ok": True, "breakers": breaker_rows(upstreams(), now)}
            elif request.get("cmd") == "breaker":
                touched = act(upstreams(), request.get("action", ""), request.get("name", ""), now)
                reply = ({"ok": True, "breakers": touched} if touched else
                         {"ok": False, "error": f"no breaker or upstream named "
                                                f"{request.get('name')!r}"})
            else:
                reply = {"ok": False, "error": f"unknown command {request.get('cmd')!r}"}
        except (ValueError, AttributeError) as exc:
            reply = {"ok": False, "error": f"malformed request: {exc}"}
        try:
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    try:
        path.unlink()
    except FileNotFoundError:
        pass
    old = os.umask(0o177)
    try:
        return await asyncio.start_unix_server(answer, path=str(path))
    finally:
        os.umask(old)
