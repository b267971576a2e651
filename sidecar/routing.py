"""Which upstream a forward-proxied or transparently redirected connection belongs to.

A destination that matches a declared upstream's endpoint (by name or by the addresses it
resolved to at start) gets that upstream's policy; any other destination gets a
pass-through upstream with the default policy, created on first use and kept in a
bounded LRU so an agent scanning ports cannot grow the sidecar without bound.
"""

from __future__ import annotations

import socket
from collections import OrderedDict

from sidecar.config import Protocol, UpstreamPolicy
from sidecar.upstream import Upstream

# Distinct undeclared destinations remembered (each with its own breaker and metrics).
MAX_PASS_THROUGH = 1024


class Router:
    def __init__(self, upstreams: dict[str, Upstream], resolve: bool = True):
        self.upstreams = upstreams
        self._declared: dict[tuple[str, int], Upstream] = {}
        for up in upstreams.values():
            for host, port in up.policy.endpoints:
                self._declared[(host, port)] = up
                if resolve:
                    for ip in _addresses(host):
                        self._declared.setdefault((ip, port), up)
        self._pass_through: OrderedDict[tuple[str, int, Protocol], Upstream] = OrderedDict()

    def route(self, host: str, port: int, protocol: Protocol) -> Upstream:
        up = self._declared.get((host, port))
        if up is not None:
            return up
        key = (host, port, protocol)
        up = self._pass_through.get(key)
        if up is None:
            up = Upstream(UpstreamPolicy(name=f"{host}:{port}", endpoints=((host, port),),
                                         protocol=protocol))
            self._pass_through[key] = up
            if len(self._pass_through) > MAX_PASS_THROUGH:
                self._pass_through.popitem(last=False)
        else:
            self._pass_through.move_to_end(key)
        return up

    def http(self, host: bytes, port: int) -> Upstream:
        """For the forward proxy: absolute-form targets and CONNECT."""
        # Hosts on the wire are ASCII (IDNA names arrive already punycoded).
        return self.route(host.decode("ascii", "replace").lower(), port, Protocol.HTTP)

    def tcp(self, ip: str, port: int) -> Upstream:
        """For the transparent listener: original destinations."""
        return self.route(ip, port, Protocol.TCP)

    def all(self) -> list[Upstream]:
        return [*self.upstreams.values(), *self._pass_through.values()]


def _addresses(host: str) -> set[str]:
    try:
        return {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except OSError:
        return set()  # unresolvable now: matched by name only
