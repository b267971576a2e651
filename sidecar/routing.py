"""Which upstream a forward-proxied or transparently redirected connection belongs to.

A destination that is the same place as a declared upstream's endpoint gets that
upstream's policy, whichever way it is spelled: by the endpoint's name, by an address the
name resolved to at start, by a loopback name (`localhost` for `127.0.0.1`), by a name
in the hosts file, or by another spelling of the same address (`127.1`,
`::ffff:127.0.0.1`). Any other destination gets a pass-through upstream with the
default policy, created on first use and kept in a bounded LRU so an agent scanning
ports cannot grow the sidecar without bound.

A destination that is one of the sidecar's own listeners (its port, on any address of
this host) is refused: the sidecar would call itself, and that call would call itself
again, until every descriptor is taken. A name only the DNS knows cannot be told from
here; the fd ceiling behind /ready bounds that case (see sidecar/main.py).

No request ever waits for DNS: the event loop runs every agent's traffic, and one slow
resolver would stall them all (and an agent sending a thousand made-up names would make
a thousand lookups). Names are resolved from what is known without asking anyone: the
declared endpoints (resolved once, at start), RFC 6761's loopback names, and the hosts
file read at start. A name only the DNS knows is matched by name alone.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path
from typing import Mapping

from sidecar.config import Protocol, SidecarSettings, UpstreamPolicy, UpstreamProblem
from sidecar.policy.breaker import BreakerState
from sidecar.upstream import Upstream

# Distinct undeclared destinations remembered (each with its own breaker and metrics).
log = logging.getLogger(__name__)

MAX_PASS_THROUGH = 1024
HOSTS_FILE = Path("/etc/hosts")
# A hosts file is a few KiB; one bigger than this is not one we should parse at start.
MAX_HOSTS_FILE_BYTES = 1024 * 1024
# Distinct spellings whose canonical form is remembered; agents use a handful of names,
# and a scan of made-up names only costs a parse each once this is full.
MAX_SPELLINGS = 4096

# RFC 6761 6.3: these names (and every name under .localhost) are the loopback
# interface, whatever a resolver would say.
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost",
                            "ip6-loopback"})
LOOPBACK_ADDRESSES = frozenset({"127.0.0.1", "::1"})


class Destinations(list):
    """What `Router.all()` returns: every upstream, the `declared` ones first, then the
    pass-through ones most telling first (a breaker that is not closed, then the most
    recently used). Views that must stay bounded (metrics, the breakers command) keep
    the declared ones whole and cut or fold the rest."""

    declared: int = 0


class Router:
    def __init__(self, upstreams: dict[str, Upstream], resolve: bool = True,
                 hosts_file: Path | None = HOSTS_FILE):
        self.upstreams = upstreams
        self._declared: dict[tuple[str, int], Upstream] = {}
        for up in upstreams.values():
            for host, port in up.policy.endpoints:
                self._declared[(host, port)] = up
                places = {host.rstrip(".").lower(), *_spellings_of(host)}
                if resolve:
                    places |= _addresses(host)
                for place in places:
                    self._declared.setdefault((place, port), up)
        self._hosts = _hosts_file(hosts_file) if hosts_file is not None else {}
        # The sidecar's own listening ports (`serving`) and this host's addresses.
        self._own_ports: set[int] = set()
        self._local = _local_addresses()
        self.loops_refused = 0
        self._pass_through: OrderedDict[tuple[str, int, Protocol], Upstream] = OrderedDict()

    def serving(self, port: int) -> None:
        """The sidecar listens on `port`: a destination there on this host is itself."""
        self._own_ports.add(port)

    def route(self, host: str, port: int, protocol: Protocol) -> Upstream | None:
        """The upstream of a destination; None for the sidecar's own listeners."""
        up = self._declared.get((host, port))
        if up is not None:
            return up
        key = (host, port, protocol)
        up = self._pass_through.get(key)
        if up is None:
            up = self._same_place(host, port)
            if up is not None:
                return up
            if port in self._own_ports and self._is_here(host):
                self.loops_refused += 1
                if self.loops_refused & (self.loops_refused - 1) == 0:  # 1, 2, 4, 8...
                    log.warning("refused %d calls to the sidecar's own listener (latest "
                                "%s:%d): they would loop back into it", self.loops_refused,
                                host, port)
                return None
            up = Upstream(UpstreamPolicy(name=f"{host}:{port}", endpoints=((host, port),),
                                         protocol=protocol))
            self._pass_through[key] = up
            if len(self._pass_through) > MAX_PASS_THROUGH:
                self._pass_through.popitem(last=False)
        else:
            self._pass_through.move_to_end(key)
        return up

    def _same_place(self, host: str, port: int) -> Upstream | None:
        """The declared upstream another spelling of `host` names, if any. Only on a
        miss of the exact spelling, so a declared destination costs one dict lookup."""
        declared = self._declared
        name = host.rstrip(".").lower()
        for place in (name, *_spellings_of(name), *self._hosts.get(name, ())):
            up = declared.get((place, port))
            if up is not None:
                return up
        return None

    def _is_here(self, host: str) -> bool:
        name = host.rstrip(".").lower()
        return any(_loopback(address) or address in self._local
                   for address in (*_spellings_of(name), *self._hosts.get(name, ())))

    def http(self, host: bytes, port: int) -> Upstream | None:
        """For the forward proxy: absolute-form targets and CONNECT."""
        # Hosts on the wire are ASCII (IDNA names arrive already punycoded).
        return self.route(host.decode("ascii", "replace").lower(), port, Protocol.HTTP)

    def tcp(self, ip: str, port: int) -> Upstream | None:
        """For the transparent listener: original destinations."""
        return self.route(ip, port, Protocol.TCP)

    def all(self) -> Destinations:
        now = time.monotonic()
        recent_first = reversed(self._pass_through.values())
        # sorted() is stable: within each kind, the most recently used stay first.
        pass_through = sorted(recent_first, key=lambda up: _all_closed(up, now))
        out = Destinations([*self.upstreams.values(), *pass_through])
        out.declared = len(self.upstreams)
        return out


def self_loops(policies: Mapping[str, UpstreamPolicy], settings: SidecarSettings,
               where: tuple = ("upstreams",)) -> list[UpstreamProblem]:
    """Endpoints that are the sidecar's own listeners, for `validate`: a call to one
    would come back to the sidecar, which would call it again, until every descriptor is
    taken. Only fixed listen ports can be told from the config; `Router.route` refuses
    the rest at run time."""
    own = {port for _, port in (settings.proxy_listen, settings.transparent_listen,
                                settings.metrics_listen) if port}
    own |= {p.listen[1] for p in policies.values() if p.listen[1]}
    problems = []
    for name, policy in policies.items():
        several = len(policy.endpoints) > 1
        for i, (host, port) in enumerate(policy.endpoints):
            if port in own and any(_loopback(a) for a in _spellings_of(host)):
                problems.append(UpstreamProblem(
                    (*where, name, *(("addresses", i) if several else ("address",))),
                    f"{host}:{port} is one of the sidecar's own listeners: calls would loop "
                    f"back into the sidecar"))
    return problems


def _loopback(address: str) -> bool:
    """A canonical address (see `_spellings_of`) that reaches this host whatever its
    interfaces: loopback, or the unspecified address (which connects to loopback)."""
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or ip.is_unspecified


def _local_addresses() -> frozenset[str]:
    """This host's own addresses, canonical, as the interfaces have them now."""
    try:
        import psutil

        found = {a.address.split("%", 1)[0] for addrs in psutil.net_if_addrs().values()
                 for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)}
    except Exception:  # no psutil, no /proc: loopback and unspecified still count
        return frozenset()
    return frozenset(s for a in found for s in _spellings_of(a))


def _all_closed(up: Upstream, now: float) -> bool:
    return all(b.state_at(now) is BreakerState.CLOSED for b in up.breakers())


@lru_cache(maxsize=MAX_SPELLINGS)
def _spellings_of(host: str) -> tuple[str, ...]:
    """The canonical addresses `host` stands for without asking a resolver: itself as a
    normalised IP address, or the loopback addresses for a loopback name; () for any
    other name."""
    name = host.rstrip(".").lower()
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return tuple(sorted(LOOPBACK_ADDRESSES))
    try:
        ip = ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        # inet_aton reads what connect() would also reach: 127.1, 0x7f000001, 2130706433.
        # A name made only of letters is not one of those and fails here at once.
        try:
            return (socket.inet_ntoa(socket.inet_aton(name)),)
        except OSError:
            return ()
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return (str(ip.ipv4_mapped),)
    return (str(ip),)


def _hosts_file(path: Path) -> dict[str, tuple[str, ...]]:
    """name -> addresses, from a hosts(5) file; {} when it cannot be read."""
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_HOSTS_FILE_BYTES).decode("utf-8", "replace")
    except OSError:
        return {}
    names: dict[str, list[str]] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        addresses = _spellings_of(fields[0])
        if not addresses:
            continue  # not an address: a malformed line
        for name in fields[1:]:
            names.setdefault(name.rstrip(".").lower(), []).extend(addresses)
    return {name: tuple(dict.fromkeys(addrs)) for name, addrs in names.items()}


def _addresses(host: str) -> set[str]:
    try:
        return {str(info[4][0]) for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except OSError:
        return set()  # unresolvable now: matched by name only
