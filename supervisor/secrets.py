"""Where secret values come from: files on a memory filesystem.

`$CREDENTIALS_DIRECTORY` (systemd's LoadCredential=) wins over the configured
`secrets.dir`. Values are read at spawn and handed straight to the child's environment;
they are never stored on the supervisor, never put in argv and never in an error message.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from supervisor.config.model import SecretsConfig


class SecretError(Exception):
    """A secret that cannot be used. The message names the file, never the value."""


def secrets_dir(cfg: SecretsConfig, env: Mapping[str, str] = os.environ) -> Path | None:
    creds = env.get("CREDENTIALS_DIRECTORY")
    if creds:
        return Path(creds)
    return cfg.dir


def read_secret(cfg: SecretsConfig, name: str, env: Mapping[str, str] = os.environ) -> str:
    folder = secrets_dir(cfg, env)
    if folder is None:
        raise SecretError(
            f"secret {name}: no secrets directory (set secrets.dir or run under systemd "
            "with LoadCredential=)"
        )
    path = folder / name
    try:
        value = path.read_text()
    except FileNotFoundError:
        raise SecretError(f"secret {name}: {path} does not exist") from None
    except OSError as exc:
        raise SecretError(f"secret {name}: cannot read {path}: {exc.strerror}") from None
    # Files written with `echo` end in a newline that is not part of the password.
    return value[:-1] if value.endswith("\n") else value
