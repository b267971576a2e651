"""Port expressions: how the legacy files write a port, evaluated once into an int.

MainPC's real `startup_config.yaml` writes most ports as `"${PORT_OFFSET}+7200"`, so that
a second copy of the fleet can run shifted on one machine; some ports are plain ints.
The old launcher evaluated them from its environment, with PORT_OFFSET 0 when unset.
Here a port is evaluated once, at load, and every consumer (probes, AGENT_PORT, the
duplicate check, status) uses the resulting int: a clash hidden behind two different
expressions is caught like any other.

The grammar is deliberately small, the forms the files really use:

    7200            an int
    "7200"          a numeric string
    "${VAR}"        a variable
    "${VAR}+N"      a variable plus a number (also "N+${VAR}", spaces around + allowed)

Variables come from the supervisor's environment. PORT_OFFSET, when the environment
does not set it, is the file's own `port_offset:` (0 when absent), as the old launcher's
default was. Anything else (two variables, a minus, a suffix) is an error saying which
forms are understood, never a guess. Pure: no os, no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

# Below 1024 needs root to bind (and clashes with system services); above 65535 is no port.
MIN_PORT = 1024
MAX_PORT = 65535
# The one variable with a default: the old launcher read it with a 0 fallback.
PORT_OFFSET = "PORT_OFFSET"
# More digits than any port or offset: refused before int() is asked to parse them.
_MAX_DIGITS = 9

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_NUMBER = re.compile(r"\d+")
_VARIABLE = re.compile(r"\$\{(" + _NAME + r")\}")
_VARIABLE_PLUS = re.compile(r"\$\{(" + _NAME + r")\}\s*\+\s*(\d+)")
_PLUS_VARIABLE = re.compile(r"(\d+)\s*\+\s*\$\{(" + _NAME + r")\}")
_FORMS = 'a number (7200), "${VAR}", "${VAR}+N" or "N+${VAR}"'


class PortError(ValueError):
    """A port that cannot be evaluated; the message says what and why, and never
    repeats the location (the caller's Problem has it)."""


@dataclass(frozen=True)
class Port:
    value: int
    expression: str | None  # as written, None for a plain int

    def describe(self) -> str:
        """`7200`, or `"${PORT_OFFSET}+7200" (= 7200)` when written as an expression."""
        if self.expression is None:
            return str(self.value)
        return f'"{self.expression}" (= {self.value})'


def evaluate(written: Any, environ: Mapping[str, str], port_offset: int = 0) -> Port:
    """The port `written` means; PortError if it means none."""
    if isinstance(written, bool) or not isinstance(written, (int, str)):
        raise PortError(f"{written!r} is not a port: write {_FORMS}")
    if isinstance(written, int):
        return Port(_in_range(written, None), None)
    text = written.strip()
    if _NUMBER.fullmatch(text):  # "7200": a number in quotes, not an expression
        return Port(_in_range(_number(text, written), written), None)
    if m := _VARIABLE.fullmatch(text):
        value = _variable(m.group(1), written, environ, port_offset)
    elif m := _VARIABLE_PLUS.fullmatch(text):
        value = _variable(m.group(1), written, environ, port_offset) + _number(m.group(2), written)
    elif m := _PLUS_VARIABLE.fullmatch(text):
        value = _number(m.group(1), written) + _variable(m.group(2), written, environ, port_offset)
    else:
        raise PortError(f'"{written}" is not a port: write {_FORMS}')
    return Port(_in_range(value, written), written)


def _number(digits: str, written: str) -> int:
    if len(digits.lstrip("0")) > _MAX_DIGITS:
        raise PortError(f'"{written}": {digits[:12]}... is far larger than any port '
                        f"({MIN_PORT}-{MAX_PORT})")
    return int(digits)


def _variable(name: str, written: str, environ: Mapping[str, str], port_offset: int) -> int:
    if name not in environ:
        if name == PORT_OFFSET:
            return port_offset
        raise PortError(
            f'"{written}": {name} is not set in the supervisor\'s environment; set it there '
            "(e.g. Environment= in its systemd unit) or write the port as a number")
    raw = environ[name].strip()
    sign = -1 if raw.startswith("-") else 1
    digits = raw.lstrip("+-")
    if not _NUMBER.fullmatch(digits) or len(raw) - len(digits) > 1:
        raise PortError(f'"{written}": {name} is {environ[name]!r} in the supervisor\'s '
                        "environment, not a whole number")
    return sign * _number(digits, written)


def _in_range(value: int, written: str | None) -> int:
    if MIN_PORT <= value <= MAX_PORT:
        return value
    shown = str(value) if written is None else f'"{written}" (= {value})'
    raise PortError(f"{shown} is not a port between {MIN_PORT} and {MAX_PORT}")
