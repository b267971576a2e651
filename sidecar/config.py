"""The sidecar's configuration: upstreams and the policy applied to each.

One parser for the `upstreams:` block, used by the sidecar when it runs on its own and by
the supervisor's config loader when it runs the sidecar (the supervisor imports this;
this never imports the supervisor). `parse_upstreams` gathers every problem with its
location instead of stopping at the first.

Every default is a named constant with the reason for its number; the breaker's are the
fleet's own seed values.
"""

from __future__ import annotations

import enum
import ipaddress
import math
import re
import socket
from dataclasses import dataclass, field, replace
from typing import AbstractSet, Any, Mapping

# --- defaults, each with why -------------------------------------------------------

# Breaker: the users' seed values: 5 failures in a 60 s window open it, it stays open
# 30 s, 3 successful probes in half-open close it.
DEFAULT_BREAKER_FAILURES = 5
DEFAULT_BREAKER_WINDOW_S = 60.0
DEFAULT_BREAKER_OPEN_S = 30.0
DEFAULT_BREAKER_SUCCESSES = 3
# Half-open admits this many probe requests at a time, not every waiting caller: a
# recovering upstream sees a trickle, not the backlog.
DEFAULT_BREAKER_PROBES = 1
# "10 s timeout on critical calls" (the users' target), per request for L7.
DEFAULT_REQUEST_TIMEOUT_S = 10.0
# A TCP connect on a LAN completes in well under a millisecond; 2 s means the peer is
# gone, not slow.
DEFAULT_CONNECT_TIMEOUT_S = 2.0
# L4 connections with no byte either way for this long are closed (a dead peer that
# never sent FIN/RST would otherwise hold the agent for ever). ZeroMQ-style long-lived
# connections with heartbeats stay well inside it.
DEFAULT_IDLE_TIMEOUT_S = 300.0
# L4: bytes from the agent and not a byte back for this long is a failure, and the agent
# gets a reset: a hung server still accepts connections (its kernel does) and reads, so
# without this a ZeroMQ REQ/REP call to it waits idle_timeout_s and never trips the
# breaker. 10 s is the users' "10 s timeout on critical calls", as request_timeout_s is
# for L7, but it bounds only the first byte of an answer: slow, long answers are fine.
# A server that speaks first owes nothing until the agent answers it. One-way streams
# (PUSH/PULL, log shipping) and quiet subscriptions never answer: 0 or null turns it off.
DEFAULT_RESPONSE_TIMEOUT_S = 10.0
# Retries: one retry at most, and retries no more than 20 % of requests plus 10 per
# second (Linkerd's budget), so a failing upstream never sees a retry storm.
DEFAULT_RETRY_ATTEMPTS = 1
DEFAULT_RETRY_BUDGET_RATIO = 0.2
DEFAULT_RETRY_MIN_PER_S = 10.0
DEFAULT_RETRY_WINDOW_S = 10.0
# Statuses that count as upstream failures for the breaker.
DEFAULT_FAILURE_STATUSES = frozenset(range(500, 600))
# Bad-input limits: a request/response head bigger than this is not HTTP we serve.
DEFAULT_MAX_HEADER_BYTES = 64 * 1024
# Bytes buffered toward a slow side before the other side is paused (flow control).
DEFAULT_MAX_PENDING_BYTES = 1024 * 1024
# Requests pipelined by one agent connection before we stop reading from it.
DEFAULT_MAX_PENDING_REQUESTS = 64
# Idle keep-alive connections kept per upstream endpoint.
DEFAULT_POOL_SIZE = 32
# An agent connection must send a whole request head within this long of its first
# byte: a legacy agent writes its head in one go, so only a slowloris client ever
# needs more. The users' own call timeout.
DEFAULT_HEADER_TIMEOUT_S = 10.0
# An agent connection with no request begun for this long is closed: long enough that
# agents pushing every few seconds keep theirs, short enough that a thousand idle
# clients cannot hold a thousand descriptors (and upstream connections) for ever.
DEFAULT_AGENT_IDLE_TIMEOUT_S = 60.0


class Protocol(enum.Enum):
    TCP = "tcp"  # L4: connect/idle timeouts, breaking on refused/timed-out/reset
    HTTP = "http"  # L7: HTTP/1.1, per-request timeout, breaking on 5xx/timeouts


class Deliver(enum.Enum):
    PROXY = "proxy"  # every request goes through to the upstream (timeouts, breaker)
    # Metrics pushes (POST/PUT/PATCH) are kept in the host's spool, answered at once, and
    # forwarded to the nearest hub exactly once; reads still go through the proxy.
    STORE_FORWARD = "store_forward"


class FallbackKind(enum.Enum):
    NONE = "none"  # 503 with X-Agentvisor-Breaker
    LAST_GOOD = "last_good"  # last good response to the same GET, else 503
    STATIC = "static"  # a configured status/body


@dataclass(frozen=True)
class BreakerSettings:
    failures: int = DEFAULT_BREAKER_FAILURES
    window_s: float = DEFAULT_BREAKER_WINDOW_S
    open_s: float = DEFAULT_BREAKER_OPEN_S
    successes: int = DEFAULT_BREAKER_SUCCESSES
    probes: int = DEFAULT_BREAKER_PROBES


@dataclass(frozen=True)
class RetrySettings:
    attempts: int = DEFAULT_RETRY_ATTEMPTS  # retries after the first try; 0 disables
    budget_ratio: float = DEFAULT_RETRY_BUDGET_RATIO
    min_per_s: float = DEFAULT_RETRY_MIN_PER_S
    window_s: float = DEFAULT_RETRY_WINDOW_S


@dataclass(frozen=True)
class Fallback:
    kind: FallbackKind = FallbackKind.NONE
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"


@dataclass(frozen=True)
class UpstreamPolicy:
    name: str
    endpoints: tuple[tuple[str, int], ...]  # nearest first
    protocol: Protocol = Protocol.TCP
    deliver: Deliver = Deliver.PROXY
    # Where the sidecar listens for this upstream; port 0: the supervisor picks one.
    listen: tuple[str, int] = ("127.0.0.1", 0)
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    # 0: off. A declared upstream gets DEFAULT_RESPONSE_TIMEOUT_S from parse_upstreams;
    # a policy built in code (a destination nobody declared, reached through the
    # forward or transparent proxy) has none: nobody said its protocol ever answers.
    response_timeout_s: float = 0.0
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    failure_statuses: frozenset[int] = DEFAULT_FAILURE_STATUSES
    breaker: BreakerSettings = field(default_factory=BreakerSettings)
    retry: RetrySettings = field(default_factory=RetrySettings)
    fallback: Fallback = field(default_factory=Fallback)
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES
    max_pending_requests: int = DEFAULT_MAX_PENDING_REQUESTS
    pool_size: int = DEFAULT_POOL_SIZE
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    agent_idle_timeout_s: float = DEFAULT_AGENT_IDLE_TIMEOUT_S


Path = tuple  # ("upstreams", "ObservabilityHub", "addresses", 0): a place in the file


@dataclass(frozen=True)
class UpstreamProblem:
    path: Path
    message: str

    @property
    def location(self) -> str:
        """e.g. "upstreams.ObservabilityHub.addresses[0]"."""
        out = ""
        for part in self.path:
            out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
        return out


def parse_address(text: Any, *, any_port: bool = False, bind: bool = False
                  ) -> tuple[str, int] | None:
    """'host:port' or '[v6]:port' -> (host, port); None if it is not one (see
    `address_problem` for why)."""
    parsed = _address(text, any_port, bind)
    return parsed if isinstance(parsed, tuple) else None


def address_problem(text: Any, *, any_port: bool = False, bind: bool = False) -> str | None:
    """Why `text` is not an address: None if it is one. `any_port`: port 0 (a free
    port) is allowed; `bind`: it is to be listened on, so a name must resolve here."""
    parsed = _address(text, any_port, bind)
    return parsed if isinstance(parsed, str) else None


# A host name as resolvers take it: dot-separated labels of letters, digits, - and _
# (some internal names have _), none longer than 63, the whole at most 253.
_HOST_NAME = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?")


def _address(text: Any, any_port: bool, bind: bool) -> tuple[str, int] | str:
    if not isinstance(text, str) or ":" not in text:
        return f"{text!r} is not host:port"
    if "\0" in text:
        return f"{text!r} is not host:port: it contains a NUL byte"
    if any(c.isspace() or not c.isprintable() for c in text):
        return f"{text!r} is not host:port: it contains a space or control character"
    host, _, port = text.rpartition(":")
    if not port.isascii() or not port.isdigit() or len(port) > 5:
        return f"{text!r}: the port {port!r} is not a number"
    number = int(port)
    if number > 65535:
        return f"{text!r}: port {number} is out of range (at most 65535)"
    if number == 0 and not any_port:
        return f"{text!r}: port 0 means any free port; this address needs a fixed one"
    literal = True
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f"{text!r}: {host!r} in brackets is not an IPv6 address"
    elif ":" in host:
        return f"{text!r}: an IPv6 address needs brackets, e.g. [::1]:{port}"
    elif not host:
        return f"{text!r} is not host:port: the host is missing"
    else:
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            literal = False
            if len(host) > 253 or not _HOST_NAME.fullmatch(host):
                return f"{text!r}: {host!r} is not an IP address or a host name"
    if bind and not literal:
        try:
            socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            return (f"{text!r}: cannot listen on {host!r}: not an IP address, and it does "
                    f"not resolve ({reason})")
    return host, number


def parse_upstreams(data: Any, where: Path = ("upstreams",), resilience: Any = None) -> tuple[
        dict[str, UpstreamPolicy], list[UpstreamProblem]]:
    """Every upstream in the block, and every problem found, with its location.
    `resilience` (the host's block of that name) holds defaults for every upstream's
    policy keys (timeouts, breaker, retry, fallback...): an upstream's own value wins, and
    its breaker and retry blocks are merged over the defaults' key by key."""
    policies: dict[str, UpstreamPolicy] = {}
    problems: list[UpstreamProblem] = []
    defaults = _resilience(resilience, problems)
    if data is None:
        return policies, problems
    if not isinstance(data, Mapping):
        return policies, [*problems, UpstreamProblem(where, "must be a mapping of name to upstream")]
    for name, raw in data.items():
        p = _Parser((*where, name), problems)
        if not isinstance(raw, Mapping):
            p.bad((), "must be a mapping with address or addresses")
            continue
        p.check_keys(raw, UPSTREAM_KEYS)
        raw = _with_defaults(defaults, raw)
        endpoints = p.endpoints(raw)
        protocol = p.choice(raw, "protocol", Protocol, Protocol.TCP)
        deliver = p.choice(raw, "deliver", Deliver, Deliver.PROXY)
        if deliver is Deliver.STORE_FORWARD and protocol is not Protocol.HTTP:
            p.bad(("deliver",), "store_forward keeps HTTP pushes: it needs protocol: http")
            deliver = Deliver.PROXY
        breaker = raw.get("breaker") or {}
        retry = raw.get("retry") or {}
        if not isinstance(breaker, Mapping):
            p.bad(("breaker",), "must be a mapping")
            breaker = {}
        if not isinstance(retry, Mapping):
            p.bad(("retry",), "must be a mapping")
            retry = {}
        p.check_keys(breaker, set(BreakerSettings.__dataclass_fields__), ("breaker",))
        p.check_keys(retry, set(RetrySettings.__dataclass_fields__), ("retry",))
        listen = p.address(raw, "listen", ("127.0.0.1", 0), any_port=True)
        policy = UpstreamPolicy(
            name=str(name),
            endpoints=endpoints,
            protocol=protocol,
            deliver=deliver,
            listen=listen,
            connect_timeout_s=p.seconds(raw, "connect_timeout_s", DEFAULT_CONNECT_TIMEOUT_S),
            idle_timeout_s=p.seconds(raw, "idle_timeout_s", DEFAULT_IDLE_TIMEOUT_S),
            response_timeout_s=p.seconds_or_off(raw, "response_timeout_s",
                                                DEFAULT_RESPONSE_TIMEOUT_S),
            request_timeout_s=p.seconds(raw, "request_timeout_s", DEFAULT_REQUEST_TIMEOUT_S),
            failure_statuses=p.statuses(raw),
            breaker=BreakerSettings(
                failures=p.count(breaker, "failures", DEFAULT_BREAKER_FAILURES, ("breaker",), 1),
                window_s=p.seconds(breaker, "window_s", DEFAULT_BREAKER_WINDOW_S, ("breaker",)),
                open_s=p.seconds(breaker, "open_s", DEFAULT_BREAKER_OPEN_S, ("breaker",)),
                successes=p.count(breaker, "successes", DEFAULT_BREAKER_SUCCESSES, ("breaker",), 1),
                probes=p.count(breaker, "probes", DEFAULT_BREAKER_PROBES, ("breaker",), 1),
            ),
            retry=RetrySettings(
                attempts=p.count(retry, "attempts", DEFAULT_RETRY_ATTEMPTS, ("retry",), 0),
                budget_ratio=p.number(retry, "budget_ratio", DEFAULT_RETRY_BUDGET_RATIO, ("retry",)),
                min_per_s=p.number(retry, "min_per_s", DEFAULT_RETRY_MIN_PER_S, ("retry",)),
                window_s=p.seconds(retry, "window_s", DEFAULT_RETRY_WINDOW_S, ("retry",)),
            ),
            fallback=p.fallback(raw.get("fallback")),
            max_header_bytes=p.count(raw, "max_header_bytes", DEFAULT_MAX_HEADER_BYTES, (), 1024),
            max_pending_bytes=p.count(raw, "max_pending_bytes", DEFAULT_MAX_PENDING_BYTES, (),
                                      4096),
            max_pending_requests=p.count(raw, "max_pending_requests",
                                         DEFAULT_MAX_PENDING_REQUESTS, (), 1),
            pool_size=p.count(raw, "pool_size", DEFAULT_POOL_SIZE, (), 0),
        )
        policies[policy.name] = policy
    # Each agent has one ingest listener and its pushes one sequence: one metrics
    # upstream per host (the fleet has one, its ObservabilityHub).
    kept = [n for n, pol in policies.items() if pol.deliver is Deliver.STORE_FORWARD]
    for name in kept[1:]:
        problems.append(UpstreamProblem((*where, name, "deliver"),
                                        f"store_forward is already {kept[0]}'s: one "
                                        "metrics upstream per host"))
    return policies, problems


def _resilience(block: Any, problems: list[UpstreamProblem]) -> Mapping[str, Any]:
    """The defaults of `resilience:`, checked as an upstream's keys would be (at their own
    place in the file); {} when absent or wrong, so a bad default never reaches an
    upstream."""
    if block is None:
        return {}
    where: Path = ("resilience",)
    if not isinstance(block, Mapping):
        problems.append(UpstreamProblem(where, "must be a mapping of upstream settings"))
        return {}
    found: list[UpstreamProblem] = []
    _Parser(where, found).check_keys(block, RESILIENCE_KEYS)
    # Read as an upstream would be, so every value is checked where it is written.
    known = {k: v for k, v in block.items() if k in RESILIENCE_KEYS}  # the rest: said above
    _, value_problems = parse_upstreams({"(defaults)": {"address": "127.0.0.1:1", **known}},
                                        ("resilience-check",))
    found += [UpstreamProblem((*where, *pr.path[2:]), pr.message) for pr in value_problems]
    problems += found
    return {} if found else block


def _with_defaults(defaults: Mapping[str, Any], raw: Mapping[str, Any]) -> Mapping[str, Any]:
    if not defaults:
        return raw
    merged = {**defaults, **raw}
    for block in ("breaker", "retry"):
        mine, default = raw.get(block), defaults.get(block)
        if isinstance(mine, Mapping) and isinstance(default, Mapping):
            merged[block] = {**default, **mine}
    return merged


# Every key of an upstream, by the proxy that reads it: the one list of them (the
# schema's must agree; a test checks). The L4 relay serves `tcp` upstreams, and for any
# upstream its CONNECT tunnels and transparently redirected connections.
L4_UPSTREAM_KEYS = frozenset({
    "address", "addresses", "protocol", "listen", "connect_timeout_s", "idle_timeout_s",
    "response_timeout_s", "breaker", "max_pending_bytes",
})
# Read only by the L7 proxy: on a `tcp` upstream they do nothing, which `validate` says.
L7_ONLY_UPSTREAM_KEYS = frozenset({
    "request_timeout_s", "failure_statuses", "retry", "fallback", "max_header_bytes",
    "max_pending_requests", "pool_size", "deliver",
})
UPSTREAM_KEYS = L4_UPSTREAM_KEYS | L7_ONLY_UPSTREAM_KEYS
# What `resilience:` may give every upstream: its policy, not its identity.
RESILIENCE_KEYS = UPSTREAM_KEYS - {"address", "addresses", "protocol", "listen", "deliver"}


def upstream_warnings(data: Any, where: Path = ("upstreams",)) -> list[UpstreamProblem]:
    """What is valid but surely not meant: keys only the L7 proxy reads, on a `tcp`
    upstream (a request_timeout_s there bounds nothing). Not problems: the config
    works, only not as written."""
    warnings: list[UpstreamProblem] = []
    if not isinstance(data, Mapping):
        return warnings
    for name, raw in data.items():
        if not isinstance(raw, Mapping) or raw.get("protocol", "tcp") != Protocol.TCP.value:
            continue
        for key in raw:
            if key in L7_ONLY_UPSTREAM_KEYS:
                warnings.append(UpstreamProblem(
                    (*where, name, key),
                    f"ignored: only protocol: http upstreams use {key} (this one is tcp)"))
    return warnings


class _Parser:
    """Reads typed values out of one upstream block, recording problems as it goes.
    `sub` is the path of a nested block inside the upstream, e.g. ("breaker",)."""

    def __init__(self, base: Path, problems: list[UpstreamProblem]):
        self.base = base
        self.problems = problems

    def bad(self, sub: Path, message: str) -> None:
        self.problems.append(UpstreamProblem((*self.base, *sub), message))

    def check_keys(self, raw: Mapping, allowed: AbstractSet[str], sub: Path = ()) -> None:
        for key in raw:
            if key not in allowed:
                self.bad((*sub, key), "unknown key; known: " + ", ".join(sorted(allowed)))

    def endpoints(self, raw: Mapping) -> tuple[tuple[str, int], ...]:
        items = raw.get("addresses", [raw["address"]] if "address" in raw else None)
        if not items or not isinstance(items, list):
            self.bad((), "needs address: host:port or addresses: [host:port, ...]")
            return ()
        out = []
        for i, text in enumerate(items):
            # Not resolved here: the name may be another host's view (validate --offline),
            # and the L4 relay resolves at each connect anyway.
            addr = _address(text, False, False)
            if isinstance(addr, str):
                self.bad(("address",) if "address" in raw else ("addresses", i), addr)
            else:
                out.append(addr)
        return tuple(out)

    def choice(self, raw: Mapping, key: str, enum_cls, default):
        if key not in raw:
            return default
        try:
            return enum_cls(raw[key])
        except ValueError:
            self.bad((key,), f"{raw[key]!r} is not one of " +
                     ", ".join(repr(e.value) for e in enum_cls))
            return default

    def number(self, raw: Mapping, key: str, default: float, sub: Path = ()) -> float:
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            self.bad((*sub, key), f"{value!r} is not a non-negative number")
            return default
        if not math.isfinite(value):  # YAML's .nan and .inf: no deadline, or never met
            self.bad((*sub, key), f"{value!r} is not a finite number")
            return default
        return float(value)

    def seconds(self, raw: Mapping, key: str, default: float, sub: Path = ()) -> float:
        value = self.number(raw, key, default, sub)
        if value == 0:
            self.bad((*sub, key), "must be more than 0 seconds")
            return default
        return value

    def seconds_or_off(self, raw: Mapping, key: str, default: float, sub: Path = ()) -> float:
        """Seconds, or 0 / null for off (returned as 0.0)."""
        if key in raw and raw[key] is None:
            return 0.0
        return self.number(raw, key, default, sub)

    def address(self, raw: Mapping, key: str, default: tuple[str, int], *,
                any_port: bool, sub: Path = ()) -> tuple[str, int]:
        """An address to listen on: a name must resolve here, where it is bound."""
        if key not in raw:
            return default
        parsed = _address(raw[key], any_port, True)
        if isinstance(parsed, str):
            self.bad((*sub, key), parsed)
            return default
        return parsed

    def count(self, raw: Mapping, key: str, default: int, sub: Path = (), minimum: int = 0) -> int:
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.bad((*sub, key), f"{value!r} is not a whole number >= {minimum}")
            return default
        return value

    def statuses(self, raw: Mapping) -> frozenset[int]:
        value = raw.get("failure_statuses")
        if value is None:
            return DEFAULT_FAILURE_STATUSES
        if not isinstance(value, list) or not all(
                isinstance(v, int) and 100 <= v <= 599 for v in value):
            self.bad(("failure_statuses",), "must be a list of HTTP status codes (100-599)")
            return DEFAULT_FAILURE_STATUSES
        return frozenset(value)

    def fallback(self, raw: Any) -> Fallback:
        if raw is None:
            return Fallback()
        if raw == "last_good":
            return Fallback(FallbackKind.LAST_GOOD)
        if not isinstance(raw, Mapping):
            self.bad(("fallback",), "must be 'last_good' or {status, body, content_type}")
            return Fallback()
        self.check_keys(raw, {"status", "body", "content_type"}, ("fallback",))
        status = raw.get("status", 200)
        if not isinstance(status, int) or not 100 <= status <= 599:
            self.bad(("fallback", "status"), f"{status!r} is not an HTTP status")
            status = 200
        body = raw.get("body", "")
        if not isinstance(body, str):
            self.bad(("fallback", "body"), "must be a string")
            body = ""
        return Fallback(FallbackKind.STATIC, status, body.encode(),
                        str(raw.get("content_type", "application/json")))


# --- the sidecar process itself ----------------------------------------------------

# Envoy's admin port, familiar to operators who scrape sidecars with Prometheus.
DEFAULT_METRICS_LISTEN = ("127.0.0.1", 9901)
# On shutdown, open connections get this long to finish before the sidecar exits.
DEFAULT_DRAIN_S = 10.0


@dataclass(frozen=True)
class SidecarSettings:
    # None: run the sidecar when there is something for it to do (upstreams declared).
    enabled: bool | None = None
    metrics_listen: tuple[str, int] = DEFAULT_METRICS_LISTEN  # /metrics, /ready
    proxy_listen: tuple[str, int] = ("127.0.0.1", 0)  # HTTP_PROXY for `intercept: proxy`
    transparent_listen: tuple[str, int] = ("127.0.0.1", 0)  # nftables redirect target
    drain_s: float = DEFAULT_DRAIN_S


# The spool's bound when `spool.max_mb` is not set: about 20 days of the fleet's pushes
# (77 agents, 1 push/s of a few hundred bytes), well inside a state partition.
DEFAULT_SPOOL_MAX_MB = 512
# Power loss may take at most this much of what was answered; SIGKILL takes nothing.
DEFAULT_SPOOL_SYNC_INTERVAL_S = 1.0


@dataclass(frozen=True)
class HubSettings:
    """`hub:`: this host runs a hub receiver for the fleet's forwarders, in front of its
    legacy hub agent."""

    listen: tuple[str, int]  # where forwarders (this host's and the others') send batches
    deliver_to: tuple[str, int]  # the legacy hub agent, e.g. 127.0.0.1:9000
    # The other hubs' receivers, which this one shares hosts, marks and samples with.
    # Default: the entries of `hubs:` that are not on this host (not loopback).
    peers: tuple[tuple[str, int], ...] | None = None


@dataclass(frozen=True)
class DataSettings:
    """The data process's: where store_forward pushes go (`hubs:`, nearest first) and how
    the spool keeps them (`spool:`); and the hub receiver this host runs, if any."""

    hubs: tuple[tuple[str, int], ...] = ()
    spool_max_mb: int = DEFAULT_SPOOL_MAX_MB
    sync_interval_s: float = DEFAULT_SPOOL_SYNC_INTERVAL_S
    hub: HubSettings | None = None


def parse_data(hubs: Any, spool: Any, hub: Any = None) -> tuple[DataSettings,
                                                                list[UpstreamProblem]]:
    problems: list[UpstreamProblem] = []
    receiver = _hub(hub, problems)
    found: list[tuple[str, int]] = []
    if hubs is not None:
        if not isinstance(hubs, list) or not hubs:
            problems.append(UpstreamProblem(("hubs",), "must be a list of host:port, "
                                            "nearest first"))
        else:
            for i, text in enumerate(hubs):
                problem = address_problem(text)
                if problem:
                    problems.append(UpstreamProblem(("hubs", i), problem))
                else:
                    found.append(parse_address(text) or ("", 0))
    block = spool if isinstance(spool, Mapping) else {}
    if spool is not None and not isinstance(spool, Mapping):
        problems.append(UpstreamProblem(("spool",), "must be a mapping"))
    p = _Parser(("spool",), problems)
    p.check_keys(block, {"max_mb", "sync_interval_s"})
    if receiver is not None and receiver.peers is None:
        receiver = replace(receiver, peers=tuple(h for h in found if not _loopback(h[0])))
    return DataSettings(
        hubs=tuple(found),
        spool_max_mb=p.count(block, "max_mb", DEFAULT_SPOOL_MAX_MB, (), 1),
        sync_interval_s=p.number(block, "sync_interval_s", DEFAULT_SPOOL_SYNC_INTERVAL_S),
        hub=receiver,
    ), problems


def _hub(block: Any, problems: list[UpstreamProblem]) -> HubSettings | None:
    if block is None:
        return None
    if not isinstance(block, Mapping):
        problems.append(UpstreamProblem(("hub",), "must be a mapping with listen and "
                                        "deliver_to"))
        return None
    before = len(problems)
    p = _Parser(("hub",), problems)
    p.check_keys(block, {"listen", "deliver_to", "peers"})
    for key in ("listen", "deliver_to"):
        if key not in block:
            p.bad((key,), "is required")
    # Forwarders on the other PC are told this port: a fixed one.
    listen = p.address(block, "listen", ("0.0.0.0", 0), any_port=False)
    deliver = block.get("deliver_to")
    problem = address_problem(deliver) if "deliver_to" in block else None
    if problem:
        p.bad(("deliver_to",), problem)
    peers: list[tuple[str, int]] | None = None
    if "peers" in block:
        peers = []
        if not isinstance(block["peers"], list):
            p.bad(("peers",), "must be a list of host:port (the other hubs' receivers)")
        else:
            for i, text in enumerate(block["peers"]):
                problem = address_problem(text)
                if problem:
                    p.bad(("peers", i), problem)
                else:
                    peers.append(parse_address(text) or ("", 0))
    if len(problems) > before:
        return None
    return HubSettings(listen=listen, deliver_to=parse_address(deliver) or ("", 0),
                       peers=None if peers is None else tuple(peers))


def _loopback(host: str) -> bool:
    return host.startswith("127.") or host in ("::1", "localhost")


def parse_sidecar(data: Any, where: Path = ("sidecar",)) -> tuple[SidecarSettings,
                                                                  list[UpstreamProblem]]:
    problems: list[UpstreamProblem] = []
    if data is None:
        return SidecarSettings(), problems
    if not isinstance(data, Mapping):
        return SidecarSettings(), [UpstreamProblem(where, "must be a mapping")]
    p = _Parser(where, problems)
    p.check_keys(data, set(SidecarSettings.__dataclass_fields__))
    enabled = data.get("enabled")
    if enabled is not None and not isinstance(enabled, bool):
        p.bad(("enabled",), "must be true or false")
        enabled = None
    # Prometheus must find /metrics where it was told: a fixed port. The proxy and
    # transparent listeners are handed to agents and nftables as bound: any port will do.
    return SidecarSettings(
        enabled=enabled,
        metrics_listen=p.address(data, "metrics_listen", DEFAULT_METRICS_LISTEN, any_port=False),
        proxy_listen=p.address(data, "proxy_listen", ("127.0.0.1", 0), any_port=True),
        transparent_listen=p.address(data, "transparent_listen", ("127.0.0.1", 0),
                                     any_port=True),
        drain_s=p.seconds(data, "drain_s", DEFAULT_DRAIN_S),
    ), problems

