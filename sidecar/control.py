"""The sidecar's operator commands: list breakers, open/close/reset one by hand.

Served on a unix socket (mode 0600 in the supervisor's runtime directory), one JSON
request per connection, one JSON reply line; the supervisor's `agentvisor breakers` and
`agentvisor breaker ...` reach it through there. Read-only views (`/metrics`, `/ready`)
are on the TCP metrics listener instead, for Prometheus.

What a well-formed control request is (`parse_request`) is defined here once, for this
socket and the supervisor's: anything else gets an error reply, never silence.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Callable, Sequence

from sidecar.upstream import Upstream

ACTIONS = ("open", "close", "reset")
# Fields a request may carry; each, when present, is a string.
REQUEST_FIELDS = ("cmd", "name", "action", "group", "rows", "forwarding")
REQUEST_TIMEOUT_S = 10.0  # a client that connects and says nothing is not kept waiting
# The supervisor reads a reply as one line with asyncio's default 64 KiB limit; rows are
# cut to stay under it with room for the envelope. Each row is a few hundred bytes, so
# this keeps every declared upstream and a couple of hundred undeclared ones.
MAX_ROWS_BYTES = 56 * 1024


class MalformedRequest(ValueError):
    """A control request that is not a JSON object of string fields; the message says
    what is wrong, for the reply."""


def parse_request(line: bytes) -> dict[str, str]:
    """One request line -> its fields; MalformedRequest for anything else (not UTF-8,
    not JSON, nested too deep to parse, not an object, a field that is not a string)."""
    try:
        request = json.loads(line)
    except RecursionError:
        raise MalformedRequest("malformed request: nested too deep") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError alike
        raise MalformedRequest(f"malformed request: not JSON ({exc})") from None
    if not isinstance(request, dict):
        raise MalformedRequest("malformed request: not a JSON object")
    fields = {}
    for key in REQUEST_FIELDS:
        value = request.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise MalformedRequest(f"malformed request: {key!r} must be a string, not "
                                   f"{type(value).__name__}")
        fields[key] = value
    if "cmd" not in fields:
        raise MalformedRequest("malformed request: no 'cmd'")
    return fields


def bounded(rows: Sequence[dict], max_bytes: int = MAX_ROWS_BYTES) -> tuple[list[dict], int]:
    """The leading rows whose JSON fits in max_bytes, and how many were left out. Rows
    come most important first (declared upstreams, then open breakers), so the cut
    falls on closed breakers of destinations nobody declared."""
    kept: list[dict] = []
    size = 0
    for row in rows:
        size += len(json.dumps(row)) + 2  # ", " between rows
        if size > max_bytes:
            break
        kept.append(row)
    return kept, len(rows) - len(kept)


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


async def serve(path: Path, upstreams: Callable[[], list[Upstream]],
                agents: Callable[[str, str | None], int] | None = None) -> asyncio.AbstractServer:
    """The control socket. `agents` takes the supervisor's agent rows (a JSON list, as
    the text of the `rows` field) and, on a host with store_forward, the spool's and
    forwarder's state (a JSON object as the text of `forwarding`) for the exporter, and
    says how many rows it kept."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT_S)
            except ValueError:  # over the reader's limit: no request is that long
                raise MalformedRequest("malformed request: too long") from None
            except asyncio.TimeoutError:
                raise MalformedRequest("malformed request: none within "
                                       f"{REQUEST_TIMEOUT_S:g} s") from None
            request = parse_request(line)
            now = time.monotonic()
            cmd = request["cmd"]
            if cmd == "breakers":
                rows, omitted = bounded(breaker_rows(upstreams(), now))
                reply = {"ok": True, "breakers": rows, "omitted": omitted}
            elif cmd == "breaker":
                name = request.get("name", "")
                touched = act(upstreams(), request.get("action", ""), name, now)
                reply = ({"ok": True, "breakers": touched} if touched else
                         {"ok": False, "error": f"no breaker or upstream named {name!r}"})
            elif cmd == "agents" and agents is not None:
                forwarding = request.get("forwarding")
                reply = {"ok": True, "kept": agents(
                    request.get("rows", "[]"),
                    forwarding if isinstance(forwarding, str) else None)}
            else:
                reply = {"ok": False, "error": f"unknown command {cmd[:80]!r}"}
        except ValueError as exc:  # MalformedRequest, or act()'s unknown action
            reply = {"ok": False, "error": str(exc)}
        except (ConnectionError, asyncio.IncompleteReadError):
            writer.close()
            return  # the client went away; nothing to tell it
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
