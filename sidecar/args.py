"""Command-line argument types shared by the sidecar's processes (`sidecar.data`,
`sidecar.hub`): one reading of HOST:PORT (the config's, `sidecar.config.address_problem`)
and of numbers, so each process refuses the same mistakes with the same words."""

from __future__ import annotations

import argparse
import math
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
