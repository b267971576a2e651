"""Where the legacy launcher looked for things, as one set of rules.

The users' config sits in `<root>/main_pc_code/config/startup_config.yaml` (MainPC) or
`<root>/pc2_code/config/startup_config.yaml` (PC2), and its `script_path`s are relative to
`<root>`, the repository root, not to the file's folder. The old launcher
(`main_pc_code/scripts/start_system_v2.py`) resolved a script against that root, and one
that was not there under `<root>/main_pc_code/`. Doing the same here is what lets the file
run unchanged: `infer_project_root` finds `<root>` from where the file is when no
`project_root` is set, `resolve_script` applies the launcher's rule. Both the loader and
`validate` use these, so an agent runs the script validate found.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePath

from .yamlsrc import Source

# The folders the fleet's repository keeps a host's code and config in, one per PC.
LEGACY_CODE_DIRS = ("main_pc_code", "pc2_code")
# The old launcher's second try for a script_path that does not start with it.
LAUNCHER_CODE_DIR = "main_pc_code"


def infer_project_root(config_file: str | os.PathLike[str]) -> tuple[Path, str]:
    """(root, why) for a config that sets no project_root: `<root>` for a file in
    `<root>/main_pc_code/config/` or `<root>/pc2_code/config/`, otherwise the file's own
    folder. Looks at the path only, never at the disk."""
    file = Path(os.path.abspath(config_file))
    config_dir = file.parent
    code_dir = config_dir.parent
    if config_dir.name == "config" and code_dir.name in LEGACY_CODE_DIRS:
        return code_dir.parent, f"inferred: the file is in {code_dir.name}/config/"
    return config_dir, ("the config file's folder: no project_root is set and the file is "
                        "not in main_pc_code/config/ or pc2_code/config/")


def script_candidates(root: Path, script_path: str) -> tuple[Path, ...]:
    """Where the old launcher looked for a script, in order: `root/script_path`, then,
    for a relative path that does not start with main_pc_code/, under
    `root/main_pc_code/`."""
    primary = root / script_path
    parts = PurePath(script_path).parts
    if PurePath(script_path).is_absolute() or (parts and parts[0] == LAUNCHER_CODE_DIR):
        return (primary,)
    return primary, root / LAUNCHER_CODE_DIR / script_path


def resolve_script(root: Path, script_path: str) -> Path:
    """The script an agent runs: the first candidate that is a file; if none is, the
    first one, so a "no such file" names the path as written."""
    candidates = script_candidates(root, script_path)
    return next((c for c in candidates if c.is_file()), candidates[0])


def project_root(source: Source) -> tuple[Path, str]:
    """(root, why) of a composed config: its project_root, relative to the folder of the
    file asked for (overlay.compose has anchored one set in another folder), else the
    root inferred from where the base (legacy) file is."""
    value = source.data.get("project_root") if isinstance(source.data, dict) else None
    if isinstance(value, str) and value:
        file, line = source.origin(("project_root",))
        folder = Path(source.file).absolute().parent
        return folder / Path(value).expanduser(), f"set at {file}:{line}" if line else f"set in {file}"
    return infer_project_root(source.base)
