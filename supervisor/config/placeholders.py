"""`${...}` placeholders in env values: how a secret, a variable of the supervisor's
environment or an upstream reaches an agent.

`${NAME}` is a secret when the name is in the secret store (filled from its file at
spawn so that it never sits in a config file or in argv), else the supervisor's
environment, as the legacy files mean `PYTHONPATH: '${PYTHONPATH}:${PWD}/..'`; which one
is decided once, at load (validate.SecretStore, AgentSpec.secret_names).
`${upstream:NAME}` is the sidecar's local listener for a declared upstream. `$${` is a
literal `${`. Templates are stored unexpanded in the model and expanded only at spawn,
so the one parser here serves both validation and spawning.
"""

from __future__ import annotations

import re
from typing import Mapping

UPSTREAM = "upstream"

# `$${` first, so that an escaped `${` is consumed before it can look like a placeholder.
_TOKEN = re.compile(r"\$\$\{|\$\{([^}]*)\}")


def _parse(inner: str) -> tuple[str | None, str]:
    kind, colon, name = inner.partition(":")
    return (kind, name) if colon else (None, inner)


def find(template: str) -> list[tuple[str | None, str]]:
    """Every placeholder in `template` as (kind, name): kind None for a secret or a
    variable of the environment, "upstream" for an upstream, and any other kind as
    written, so that validation can flag it."""
    return [_parse(m.group(1)) for m in _TOKEN.finditer(template) if m.group(1) is not None]


def key(kind: str | None, name: str) -> str:
    """The key `expand` looks a placeholder up by: "NAME" or "upstream:NAME"."""
    return name if kind is None else f"{kind}:{name}"


def expand(template: str, values: Mapping[str, str]) -> str:
    """Fill every placeholder from `values`; KeyError(key) names the first one missing."""

    def fill(match: re.Match[str]) -> str:
        if match.group(1) is None:
            return "${"
        wanted = key(*_parse(match.group(1)))
        try:
            return values[wanted]
        except KeyError:
            raise KeyError(wanted) from None

    return _TOKEN.sub(fill, template)
