"""YAML that remembers where every value came from.

PyYAML's `safe_load` forgets line numbers and silently keeps the last of two equal keys,
which is how two agents of the same name in one `agent_groups` group used to vanish. Here
we compose the node tree with SafeLoader, build the data ourselves, and keep a map from
each value's path (`("pc2_services", 3, "port")`) to its 1-based line, so that every
problem found later can point at the line the operator has to edit.

Composing is bounded (size, nesting, what aliases expand to) by `sidecar.yamlbounds`, the
one place the supervisor and the sidecar share those limits, so the tree built here is
never deeper or larger than a real config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from sidecar import yamlbounds

from .model import Problem

PathKey = tuple[str | int, ...]

_MERGE_TAG = "tag:yaml.org,2002:merge"
# Collections are built here, not by PyYAML's constructors, so any other tag on a
# mapping or list (!!set, !!omap, !!python/...) would be silently dropped: refuse it.
_PLAIN_TAGS = {MappingNode: "tag:yaml.org,2002:map", SequenceNode: "tag:yaml.org,2002:seq"}


class Malformed(Exception):
    """The file is not YAML at all; there is nothing further to check."""

    def __init__(self, problem: Problem):
        self.problem = problem
        super().__init__(str(problem))


@dataclass(frozen=True)
class Source:
    """Parsed data plus where each value sits: its line, and its file when the data was
    composed from several (a legacy file and its overlays, see `overlay.compose`)."""

    file: str  # the file asked for; every path not in `files` comes from it
    data: Any
    lines: Mapping[PathKey, int]
    problems: tuple[Problem, ...] = ()  # found while parsing: duplicate keys
    files: Mapping[PathKey, str] = field(default_factory=dict)  # a path's file, if not `file`
    layers: tuple[str, ...] = ()  # the files composed, base first; () means just `file`

    def origin(self, path: PathKey) -> tuple[str, int | None]:
        """(file, line) of the value at path. A missing key has no line of its own: the
        nearest thing that exists stands for it, in the file that thing came from."""
        for n in range(len(path), -1, -1):
            if path[:n] in self.lines:
                return self.files.get(path[:n], self.file), self.lines[path[:n]]
        return self.file, None

    def line(self, path: PathKey) -> int | None:
        return self.origin(path)[1]

    def problem(self, path: PathKey, agent: str | None, message: str, **fields: Any) -> Problem:
        """A Problem at the file and line of `path`; `fields` are Problem's further ones."""
        file, line = self.origin(path)
        return Problem(file, line, location(path), agent, message, **fields)

    @property
    def base(self) -> str:
        """The file the others are laid over: the legacy file, for an overlay."""
        return self.layers[0] if self.layers else self.file


def location(path: PathKey) -> str:
    """("pc2_services", 3, "port") -> "pc2_services[3].port"."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{printable(part)}" if text else printable(part)
    return text


def printable(key: str) -> str:
    """A key as a terminal can show it: a NUL or other control character escaped."""
    return key if key.isprintable() else key.encode("unicode_escape").decode("ascii")


def read(path: Path) -> str:
    """The text of a config file; Malformed if it is too large to be one. OSError and
    UnicodeDecodeError as from Path.read_text."""
    try:
        return yamlbounds.read(path)
    except yamlbounds.Refused as e:
        raise Malformed(Problem(str(path), None, "", None, e.problem or "")) from None


def parse(text: str, file: str) -> Source:
    """Parse one YAML document; raise Malformed (with line and column) if it is not YAML,
    or (with line) if it costs more than any real config to read."""
    try:
        return _compose_and_build(text, file)
    except yamlbounds.Refused as e:
        line = e.problem_mark.line + 1 if e.problem_mark else None
        raise Malformed(Problem(file, line, "", None, e.problem or "")) from None
    except yaml.MarkedYAMLError as e:
        raise Malformed(_syntax_problem(file, e)) from None
    except yaml.YAMLError as e:  # e.g. a control character, reported by offset
        raise Malformed(Problem(file, None, "", None, f"invalid YAML: {e}")) from None


def _compose_and_build(text: str, file: str) -> Source:
    loader = yamlbounds.BoundedLoader(text, file)
    try:
        node = loader.get_single_node()
        builder = _Builder(loader, file)
        data = None if node is None else builder.value(node, ())
        return Source(file, data, builder.lines, tuple(builder.problems))
    finally:
        loader.dispose()


def _syntax_problem(file: str, e: yaml.MarkedYAMLError) -> Problem:
    mark = e.problem_mark or e.context_mark
    if mark is None:
        return Problem(file, None, "", None, f"invalid YAML: {e}")
    context = f"{e.context} (line {e.context_mark.line + 1}), " if e.context and e.context_mark else ""
    return Problem(file, mark.line + 1, "", None, f"invalid YAML at column {mark.column + 1}: {context}{e.problem}")


class _Builder:
    def __init__(self, loader: yaml.SafeLoader, file: str):
        self.loader = loader
        self.file = file
        self.lines: dict[PathKey, int] = {}
        self.problems: list[Problem] = []

    def value(self, node: Node, path: PathKey) -> Any:
        self.lines.setdefault(path, node.start_mark.line + 1)
        if not isinstance(node, (MappingNode, SequenceNode)):
            return self.loader.construct_object(node, deep=True)
        if node.tag != _PLAIN_TAGS[type(node)]:
            raise yaml.constructor.ConstructorError(
                None, None, f"the tag {node.tag} is not supported here", node.start_mark
            )
        if isinstance(node, SequenceNode):
            return [self.value(item, path + (i,)) for i, item in enumerate(node.value)]
        return self.mapping(node, path)

    def mapping(self, node: MappingNode, path: PathKey) -> dict[str, Any]:
        # Duplicates are looked for among the keys written here; keys that `<<:` merges
        # in are meant to be overridden by them.
        first_line: dict[str, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key, line = self.key(key_node), key_node.start_mark.line + 1
            if key in first_line:
                self.problems.append(
                    Problem(
                        self.file, line, location(path + (key,)), None,
                        f"duplicate key {key!r} (first at line {first_line[key]}); "
                        "YAML would silently keep only the last one",
                    )
                )
            first_line.setdefault(key, line)
        self.loader.flatten_mapping(node)  # resolves `<<:`, merged pairs first
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = self.key(key_node)
            self.lines[path + (key,)] = key_node.start_mark.line + 1
            result[key] = self.value(value_node, path + (key,))
        return result

    def key(self, node: Node) -> str:
        # JSON Schema and the environment both need string keys; YAML 1.1 reads `7200:`
        # as an int, which the legacy files never meant.
        return str(self.loader.construct_object(node, deep=True))
