"""Which variables of the supervisor's environment a host's files read, for the deployed
unit's environment file (`make deploy ... LEGACY=FILE` writes /etc/agentvisor/HOST.env).

systemd gives the supervisor almost no environment (PATH, LANG), so a legacy
`PYTHONPATH: '${PYTHONPATH}:${PWD}/..'` that worked from the old launcher's shell is a
validation error under the unit until HOST.env sets it. `systemd/deploy.sh` lists every
such variable there, with the file and line that reads it, classified exactly as
`agentvisor validate` classifies them (secret store, credential names, PWD, PORT_OFFSET).

    python -m supervisor.config.envfile LEGACY [OVERLAY...]

prints a line `NAME<TAB>file:line, ...` per variable, `!NAME<TAB>...` per credential
that is not in the secret store (it belongs there, not in HOST.env); nothing when the
files cannot be read (validation says why).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Sequence

from . import overlay, placeholders, ports, validate, yamlsrc
from .yamlsrc import PathKey, Source

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# More places than this per variable are counted, not listed.
_MOST_PLACES = 5


def environment_reads(source: Source, folder: Path) -> dict[str, list[PathKey]]:
    """Variable (prefixed "!" for a credential) -> the paths that read it, in file order.
    Secrets in the store, ${PWD} (the agent's folder) and PORT_OFFSET (it has a default)
    are not listed: none needs the environment."""
    data = source.data if isinstance(source.data, dict) else {}
    store = validate.secret_store(data, folder, {})
    entries = validate.agent_entries(data)
    uses: dict[str, list[PathKey]] = {}
    for path, _, block in validate.environment_blocks(data, entries):
        for var, template in (block.items() if isinstance(block, dict) else ()):
            if not isinstance(template, str):
                continue
            for kind, name in placeholders.find(template):
                if kind is None and name != validate.WORKING_DIR_VAR and name not in store:
                    secret = validate.credential_name(name) or validate.credential_name(var)
                    uses.setdefault(("!" if secret else "") + name, []).append(path + (var,))
    for entry in entries:
        for key in ("port", "health_check_port"):
            written = entry.fields.get(key)
            for name in _VARIABLE.findall(written if isinstance(written, str) else ""):
                if name != ports.PORT_OFFSET:
                    uses.setdefault(name, []).append(entry.path + (key,))
    return uses


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: python -m supervisor.config.envfile LEGACY [OVERLAY...]", file=sys.stderr)
        return 2
    legacy, *overlays = args
    try:
        source = overlay.compose(legacy, overlays)
    except (OSError, UnicodeDecodeError, yamlsrc.Malformed):
        return 0  # validation, which runs next, says what is wrong with the files
    for name, paths in environment_reads(source, Path(legacy).absolute().parent).items():
        places = list(dict.fromkeys(
            f"{os.path.basename(file)}:{line}" for file, line in map(source.origin, paths)))
        more = ", ..." if len(places) > _MOST_PLACES else ""
        print(f"{name}\t{', '.join(places[:_MOST_PLACES])}{more}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
