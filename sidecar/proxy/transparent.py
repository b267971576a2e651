"""The transparent listener: connections nftables redirected here, relayed to where the
agent meant them to go.

Owns one question: where was this connection going? The redirect rewrote its
destination to our listener; conntrack still holds the original, which the kernel hands
back through getsockopt(SO_ORIGINAL_DST). The caller's `route(ip, port)` maps that
destination to an Upstream (a declared one, with its policy, or a pass-through one), and
the connection is handed to a `TcpRelay` with `adopt()`, in the same `connection_made`:
uvloop starts reading only after it returns, so no byte is read by the wrong protocol.

Listen on 127.0.0.1 for IPv4 redirects and, to relay IPv6 too, on [::1] (V6ONLY) at the
same port: nftables' `redirect` sends IPv6 connections to ::1. A connection whose
original destination cannot be read (it was not redirected, or it was redirected to
itself: an agent that dialled the listener directly) is closed, never relayed to
ourselves.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Callable

from sidecar.proxy.tcp import TcpRelay, adopt
from sidecar.upstream import Upstream

log = logging.getLogger(__name__)

# linux/netfilter_ipv4.h SO_ORIGINAL_DST, linux/netfilter_ipv6/ip6_tables.h
# IP6T_SO_ORIGINAL_DST: both 80, read at SOL_IP / SOL_IPV6 respectively.
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
_SOL_IP = getattr(socket, "SOL_IP", socket.IPPROTO_IP)
_SOL_IPV6 = socket.IPPROTO_IPV6
_SOCKADDR_IN = 16  # family, port, addr, zero padding
_SOCKADDR_IN6 = 28  # family, port, flowinfo, addr, scope id


def original_destination(sock) -> tuple[str, int] | None:
    """(ip, port) the connection on `sock` was addressed to before nftables redirected
    it; None if the kernel has no such record (not redirected, or no conntrack)."""
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(_SOL_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6)
            return socket.inet_ntop(socket.AF_INET6, raw[8:24]), int.from_bytes(raw[2:4], "big")
        raw = sock.getsockopt(_SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN)
        return socket.inet_ntoa(raw[4:8]), int.from_bytes(raw[2:4], "big")
    except OSError:
        return None


class _Redirected(asyncio.Protocol):
    """Lives for one `connection_made`: finds the destination, then hands over."""

    __slots__ = ("_route",)

    def __init__(self, route: Callable[[str, int], Upstream]):
        self._route = route

    def connection_made(self, transport: asyncio.Transport) -> None:
        sock = transport.get_extra_info("socket")
        dst = original_destination(sock) if sock is not None else None
        if dst is None or dst == transport.get_extra_info("sockname")[:2]:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("transparent: %s was not redirected; closed",
                          transport.get_extra_info("peername"))
            transport.abort()
            return
        try:
            upstream = self._route(*dst)
        except Exception:
            log.exception("transparent: no route for %s:%d; closed", *dst)
            transport.abort()
            return
        if upstream is None:  # the caller declines this destination
            transport.abort()
            return
        adopt(transport, TcpRelay(upstream))


def serve_transparent(route: Callable[[str, int], Upstream]) -> Callable[[], asyncio.Protocol]:
    """The protocol factory of the listener nftables redirects agents' TCP to;
    `route(ip, port)` gives the Upstream (policy, breaker, stats) of a destination."""
    return lambda: _Redirected(route)
