"""Command-line arguments shared by the sidecar's processes (`sidecar.main`,
`sidecar.data`, `sidecar.hub`): one reading of HOST:PORT (the config's,
`sidecar.config.address_problem`), of numbers, and of the listening sockets the
supervisor hands down (`--fds NAME=FD,...`), so each process refuses the same mistakes
with the same words."""

from __future__ import annotations

import argparse
import math
import socket
from typing import Callable, TypeVar

from sidecar.config import address_problem, parse_address

N = TypeVar("N", int, float)


def address(text: str) -> tuple[str, int]:
    """'HOST:PORT' or '[V6]:PORT' (port 0: any free one) for argparse."""
    problem = address_problem(text, any_port=True)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    parsed = parse_address(text, any_port=True)
    assert parsed is not None
    return parsed


def show(where: tuple[str, int]) -> str:
    """An address as `address()` reads it back and logs and status show it: `host:port`,
    `[v6]:port`."""
    host, port = where[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def number(kind: Callable[[str], N], *, zero_ok: bool) -> Callable[[str], N]:
    """A finite number for argparse: above 0, or from 0 when zero_ok."""
    def parse(text: str) -> N:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
            raise argparse.ArgumentTypeError(
                f"{text!r} must be {'0 or more' if zero_ok else 'more than 0'}")
        return value
    return parse


def inherited(text: str | None) -> dict[str, int]:
    """'A=5,B=6' -> {'A': 5, 'B': 6}; ValueError saying what is wrong."""
    out: dict[str, int] = {}
    for item in filter(None, (text or "").split(",")):
        name, sep, fd = item.rpartition("=")
        if not sep or not name or not fd.isdigit():
            raise ValueError(f"--fds {item!r}: expected AGENT=FD")
        out[name] = int(fd)
    return out


def adopt(fd: int, what: str) -> socket.socket:
    """An inherited listening socket; OSError naming the argument if it is not one."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise OSError(f"{what}: not a socket: {exc.strerror or exc}") from None
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise OSError(f"{what}: not a listening socket")
    return sock
