"""The L7 hot path: HTTP/1.1 between unmodified agents and their upstreams.

Owns every HTTP request an agent sends through the sidecar, from the agent's bytes to the
upstream's answer: keep-alive on both sides (an agent connection keeps the upstream
connection it last used; the others wait pooled per endpoint), a per-request timeout,
breaker verdicts, safe retries, a fallback while the breaker is open, flow control, and
the answers to bad input (400, 408, 431, 502, 504). HTTPS through the forward proxy is a
CONNECT tunnel handed to the L4 relay.

The one idea: two asyncio Protocols and no tasks per request. `agent.HttpProxy` is one
agent connection, `upstream_conn.UpstreamConnection` one pooled connection to an
endpoint, each with one httptools parser; an exchange (`exchange.Exchange`) is plain
state with a deadline, watched by one timer per agent connection. Heads are read from
their bytes once llhttp has accepted them, and what a head's fields say is kept per
upstream by the head's shape (`heads`). Bytes are rewritten only where HTTP demands it
(the head, chunk framing) and gathered into one `write()` per read. The policy objects
are asked at the three points where a decision is due: before a call (`choose`), when a
call fails before any response byte (`may_retry`, the retry budget), and when it ends
(`record`); which verdict an ending gives, and whose fault it is, is one table
(`exchange.ENDINGS`).

The modules, in the order they import each other:
  heads          reading request and answer heads (pure functions over bytes)
  replies        the answers the proxy gives itself, built once
  pool           per upstream: idle connections per endpoint, caches, LAST_GOOD
  exchange       one exchange's state, and the table of how exchanges end
  upstream_conn  one connection to an endpoint; parses and reframes the answers
  agent          one agent connection; parses requests, runs their exchanges in order

All but this file are compiled together by mypyc (sidecar/compile.py).
"""

from __future__ import annotations

from typing import Callable

from sidecar.proxy.http.agent import HttpProxy
from sidecar.proxy.http.pool import LAST_GOOD_ENTRIES, LAST_GOOD_MAX_BODY_BYTES
from sidecar.upstream import Upstream

__all__ = ["HttpProxy", "LAST_GOOD_ENTRIES", "LAST_GOOD_MAX_BODY_BYTES", "serve_forward",
           "serve_upstream"]


def serve_upstream(upstream: Upstream) -> Callable[[], HttpProxy]:
    """The protocol factory of a per-upstream listener: every request goes to
    `upstream`, with Host rewritten to the chosen endpoint's host:port."""
    route = lambda host, port: upstream  # noqa: E731
    return lambda: HttpProxy(route)


def serve_forward(route: Callable[[bytes | None, int | None], Upstream | None]
                  ) -> Callable[[], HttpProxy]:
    """The protocol factory of the forward proxy (HTTP_PROXY): absolute-form targets go
    to `route(host, port)`, in origin-form; CONNECT host:port becomes an L4 tunnel."""
    return lambda: HttpProxy(route, forward=True)
