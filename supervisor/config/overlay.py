"""One host config from several files: the legacy file as it is, native settings beside it.

The users' `startup_config.yaml` must run byte for byte unchanged (their old tools still
read it), so agentvisor's own settings go in an overlay file next to it:

    # agentvisor.yaml, beside main_pc_code/config/startup_config.yaml
    include: startup_config.yaml     # optional; a path or a list, relative to this file
    host: mainpc
    secrets: {dir: /run/agentvisor/secrets, names: [NATS_PASSWORD]}
    global_settings: {restart: {policy: always}}
    agents:                          # per agent, by name, wherever it is declared
      ServiceRegistry:
        health: {type: http, path: /health}
        restart: on-failure

and either `agentvisor run --config startup_config.yaml --overlay agentvisor.yaml` or
`agentvisor run --config agentvisor.yaml` (which includes the legacy file) runs the two.

The merge rule:
- Files apply in order, base first: the file given, then each `--overlay` in command-line
  order. A file's `include:` files (a path or a list, relative to it) apply before the
  file itself, in the order listed; includes may nest up to MAX_INCLUDE_DEPTH deep, and
  a cycle is an error naming the chain. A file reached twice applies once, at its first
  place (an overlay that includes the legacy file it is already laid over).
- Mappings merge key by key, recursively; a scalar or a list in a later file replaces
  the earlier value (a later `dependencies: [...]` is the whole list).
- `agents: {NAME: {...}}` merges into the agent called NAME, wherever an earlier file (or
  this one) declares it: `agent_groups.GROUP.NAME` or the `pc2_services` item whose `name`
  is NAME. A name nobody declares is an error at the overlay's line, with "did you mean".
- After merging, `include` and `agents` are gone: the schema and every check see one
  config in the legacy shape, exactly as if it had been written in one file.
- Every value keeps the file and line it came from (`Source.files`, `Source.lines`), so a
  problem is reported where the operator has to edit: an overlay's value at the overlay.
- A relative path setting (`project_root`, `runtime_dir`, `state_dir`, `logs.dir`, `secrets.dir`,
  `secrets.sealed_dir`, `secrets.key_file`) is relative to the folder of the file that
  sets it, as in a single file.

Reading errors follow `yamlsrc`: the given file or an `--overlay` that cannot be read
raises OSError (with its filename), one that is not YAML raises `yamlsrc.Malformed`; an
included file that cannot be read is a problem at its `include:` line.
"""

from __future__ import annotations

import copy
import difflib
import errno
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

from . import validate, yamlsrc
from .model import Problem
from .yamlsrc import PathKey, Source

# An include of an include of ... : a real setup nests one or two; eight is plenty, and a
# bound keeps a runaway chain from reading files until the stack gives out.
MAX_INCLUDE_DEPTH = 8
# Keys only an overlay uses: consumed here, never seen by the schema.
INCLUDE, AGENTS = "include", "agents"
# Settings that name a folder or file, relative to the file that sets them.
PATH_SETTINGS: tuple[PathKey, ...] = (
    ("project_root",), ("runtime_dir",), ("state_dir",), ("logs", "dir"),
    ("secrets", "dir"), ("secrets", "sealed_dir"), ("secrets", "key_file"),
)


def compose(path: str | os.PathLike[str], overlays: Sequence[str | os.PathLike[str]] = ()) -> Source:
    """The config in `path` with its includes and `overlays` laid over it, as one Source
    whose every path knows its file and line. A file without include: or agents: and no
    overlays is parsed exactly as `yamlsrc.parse` does. Raises OSError,
    UnicodeDecodeError (for `path` only) or yamlsrc.Malformed as reading it would;
    everything else wrong is in the returned Source's problems."""
    layers: list[Source] = []
    problems: list[Problem] = []
    laid: set[Path] = set()
    main = yamlsrc.parse(yamlsrc.read(Path(path)), str(path))
    _expand(Path(path), main, (_identity(path),), layers, laid, problems)
    for extra in overlays:
        if _identity(extra) not in laid:
            _expand(Path(extra), _read_overlay(Path(extra)), (_identity(extra),), layers, laid,
                    problems)
    if len(layers) == 1 and not problems and not _uses_overlay_keys(main.data):
        return main  # a plain single file: nothing to compose
    return _Composer(str(path)).compose(layers, problems)


def _identity(path: str | os.PathLike[str]) -> Path:
    """What makes two names one file, for cycles."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):
        return Path(os.path.abspath(path))


def _read_overlay(path: Path) -> Source:
    try:
        text = yamlsrc.read(path)
    except UnicodeDecodeError as e:
        # As an OSError with the overlay's name: the message must not name the base file.
        raise OSError(errno.EILSEQ, f"not UTF-8 text (byte {e.start})", str(path)) from None
    return yamlsrc.parse(text, str(path))


def _uses_overlay_keys(data: Any) -> bool:
    return isinstance(data, dict) and (INCLUDE in data or AGENTS in data)


def _expand(file: Path, source: Source, chain: tuple[Path, ...], layers: list[Source],
            laid: set[Path], problems: list[Problem]) -> None:
    """Append `source`'s includes (recursively, each before its includer), then source.
    `chain` is the includers down to `file`; `laid` every file already appended."""
    laid.add(chain[-1])
    for key, name in _includes(source, problems):
        target = file.parent / Path(name).expanduser()
        identity = _identity(target)
        if identity in chain:
            names = [str(p) for p in chain[chain.index(identity):]] + [str(identity)]
            problems.append(source.problem(key, None, "include cycle: " + " -> ".join(names)))
            continue
        if identity in laid:
            continue  # already applied, in its first place
        if len(chain) > MAX_INCLUDE_DEPTH:
            problems.append(source.problem(
                key, None, f"includes nest more than {MAX_INCLUDE_DEPTH} deep: "
                + " -> ".join(str(p) for p in (*chain, identity))))
            continue
        try:
            included = yamlsrc.parse(yamlsrc.read(target), str(target))
        except OSError as e:
            problems.append(source.problem(key, None, f"cannot read {target}: {e.strerror or e}"))
            continue
        except UnicodeDecodeError as e:
            problems.append(source.problem(key, None, f"cannot read {target}: not UTF-8 text "
                                                      f"(byte {e.start})"))
            continue
        _expand(target, included, (*chain, identity), layers, laid, problems)
    layers.append(source)


def _includes(source: Source, problems: list[Problem]) -> Iterator[tuple[PathKey, str]]:
    """(path of the entry, file name) for each file the source includes."""
    value = source.data.get(INCLUDE) if isinstance(source.data, dict) else None
    if value is None:
        return
    if isinstance(value, str) and value:
        yield (INCLUDE,), value
        return
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        for i, name in enumerate(value):
            yield (INCLUDE, i), name
        return
    problems.append(source.problem((INCLUDE,), None,
                                   "include: must be a file name or a list of file names"))


class _Composer:
    """Lays the layers over one another, keeping each value's file and line."""

    def __init__(self, file: str):
        self.file = file
        self.data: dict[str, Any] = {}
        self.lines: dict[PathKey, int] = {}
        self.files: dict[PathKey, str] = {}
        self.problems: list[Problem] = []

    def compose(self, layers: list[Source], problems: list[Problem]) -> Source:
        self.lines[()], self.files[()] = 1, layers[0].file
        for layer in layers:
            self.problems += layer.problems  # duplicate keys, each in its own file
            if layer.data is None:
                continue  # an empty file adds nothing
            if not isinstance(layer.data, dict):
                self.problems.append(layer.problem(
                    (), None, "a config file must be a mapping of settings (key: value), "
                    f"not {_kind(layer.data)}"))
                continue
            own = {k: v for k, v in layer.data.items() if k not in (INCLUDE, AGENTS)}
            self._lay(self.data, (), own, layer, ())
            self._agents(layer)
        self._anchor_paths()
        return Source(self.file, self.data, self.lines, (*problems, *self.problems),
                      files=self.files, layers=tuple(layer.file for layer in layers))

    def _lay(self, into: dict, at: PathKey, value: dict, layer: Source, src: PathKey) -> None:
        """Merge `value` (at `src` in layer) into `into` (at `at` in the result)."""
        for key, new in value.items():
            dst, origin = at + (key,), src + (key,)
            old = into.get(key)
            if isinstance(old, dict) and isinstance(new, dict):
                self._lay(old, dst, new, layer, origin)  # the key keeps its first line
                continue
            if key in into:
                for path in _paths(old, dst):
                    self.lines.pop(path, None)
                    self.files.pop(path, None)
            into[key] = new
            for path, from_path in zip(_paths(new, dst), _paths(new, origin)):
                line = layer.line(from_path)
                if line is not None:
                    self.lines[path] = line
                self.files[path] = layer.file

    def _agents(self, layer: Source) -> None:
        """Apply the layer's `agents:` to the agents declared so far, by name."""
        agents = layer.data.get(AGENTS)
        if agents is None:
            return
        if not isinstance(agents, dict):
            self.problems.append(layer.problem(
                (AGENTS,), None, "agents: must map agent names to their settings, "
                f"not {_kind(agents)}"))
            return
        declared: dict[str, list[validate.Entry]] = {}
        for entry in validate.agent_entries(self.data):
            if entry.name is not None:
                declared.setdefault(entry.name, []).append(entry)
        for name, settings in agents.items():
            src = (AGENTS, name)
            if name not in declared:
                self.problems.append(layer.problem(src, None, self._unknown(name, list(declared))))
                continue
            if settings is None:
                continue  # every setting commented out
            if not isinstance(settings, dict):
                self.problems.append(layer.problem(
                    src, name, f"must be a mapping of the agent's settings, not {_kind(settings)}"))
                continue
            if "name" in settings:
                self.problems.append(layer.problem(
                    src + ("name",), name, "an agent is renamed in the file that declares "
                    "it, not in agents:"))
                settings = {k: v for k, v in settings.items() if k != "name"}
            # An agent declared twice (duplicate_names says so) gets the settings twice,
            # each its own copy: a later layer must not change both through one object.
            for i, entry in enumerate(declared[name]):
                own = settings if i == 0 else copy.deepcopy(settings)
                self._lay(entry.fields, entry.path, own, layer, src)

    def _unknown(self, name: str, declared: list[str]) -> str:
        close = difflib.get_close_matches(name, declared, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return (f"no agent named {name!r} is declared (in agent_groups or pc2_services) "
                f"by this file or the ones before it{hint}")

    def _anchor_paths(self) -> None:
        """A relative path set in a file of another folder than the file asked for is
        made absolute here, against its own file's folder: the loader resolves what is
        left against the folder of the file asked for."""
        home = Path(os.path.abspath(self.file)).parent
        for path in PATH_SETTINGS:
            parent = _get(self.data, path[:-1])
            value = parent.get(path[-1]) if isinstance(parent, dict) else None
            if not isinstance(value, str) or not value or value.startswith("~"):
                continue
            folder = Path(os.path.abspath(self.files.get(path, self.file))).parent
            if folder != home and not Path(value).is_absolute():
                parent[path[-1]] = str(folder / value)


def _paths(value: Any, path: PathKey) -> Iterator[PathKey]:
    """path and the path of everything inside value, in one fixed order."""
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, path + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, path + (i,))


def _get(data: Any, path: PathKey) -> Any:
    for key in path:
        data = data.get(key) if isinstance(data, dict) else None
    return data


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", bool: "true/false", int: "a number",
            float: "a number"}.get(type(value), "a single value")
