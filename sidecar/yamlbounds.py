"""What reading a YAML config may cost: one set of limits for the supervisor and the sidecar.

YAML lets a few hundred bytes stand for billions of values (anchors made of aliases of
anchors: "billion laughs"), and PyYAML composes nested collections by recursion, so
100,000 `[` end in a RecursionError. Both are stopped while the file is composed into
nodes, before anything walks the tree those nodes stand for. The one idea: an alias can
only name a node composed before it, so when a node is finished the size and height of
everything it stands for are already known; summing them costs one step per node as
written, however far the aliases would expand. A file too large to compose quickly is
refused before it is read.

The supervisor builds its own data from the nodes (`supervisor/config/yamlsrc.py`); the
sidecar, which must not import the supervisor, calls `load()`. Both compose here.
"""

from __future__ import annotations

import os
import stat
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.events import AliasEvent, MappingStartEvent, SequenceStartEvent
from yaml.nodes import MappingNode, Node, SequenceNode

# The fleet's largest host config (PC2, 25 agents) is 8 KB. 256 KiB is room for a
# thousand agents, and pure-Python PyYAML composes it in about 3 s on a busy host.
MAX_FILE_BYTES = 256 * 1024
# Values (scalars and collections) once every alias is followed. The 25-agent file holds
# about 450; 256 KiB written out in full, about 40,000. A bomb passes this a few lines in.
MAX_VALUES = 100_000
# Collections inside collections. The deepest real file nests 6 (agent_groups, group,
# agent, health, command). PyYAML's composer and the supervisor's builder take two stack
# frames a level: 64 stays far below Python's limit of 1000, in any thread.
MAX_DEPTH = 64


class Refused(yaml.MarkedYAMLError):
    """A config that would cost more to read than any real one does. `problem` says
    what, `problem_mark` (None for a file's size) where."""

    def __init__(self, problem: str, mark: yaml.Mark | None = None):
        super().__init__(problem=problem, problem_mark=mark)


def read(path: str | os.PathLike[str]) -> str:
    """The file's text; Refused, unread, if it is larger than MAX_FILE_BYTES. OSError
    and UnicodeDecodeError as from Path.read_text."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        if stat.S_ISREG(st.st_mode) and st.st_size > MAX_FILE_BYTES:
            raise Refused(_too_large(st.st_size))
        # A pipe or device has no size to look at: read one byte past the limit.
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise Refused(_too_large(None))
    return data.decode("utf-8")


def load(text: str, name: str) -> Any:
    """The data of one YAML document, as yaml.safe_load gives it, within the limits;
    a yaml.YAMLError (Refused for a limit) otherwise. `name` is what marks call it."""
    loader = BoundedLoader(text, name)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _too_large(size: int | None) -> str:
    actual = f"{size} bytes" if size is not None else f"over {MAX_FILE_BYTES} bytes"
    return (f"the file is {actual}; a host config may be at most {MAX_FILE_BYTES} "
            f"({MAX_FILE_BYTES // 1024} KiB)")


def _too_deep() -> str:
    return f"nested more than {MAX_DEPTH} levels deep"


class BoundedLoader(yaml.SafeLoader):
    """SafeLoader whose composer refuses a document past MAX_DEPTH or MAX_VALUES, and
    an alias inside the value it names (a loop no walk of the data would get out of)."""

    def __init__(self, text: str, name: str | None = None):
        if len(text) > MAX_FILE_BYTES:  # characters: at most as many as bytes
            raise Refused(_too_large(len(text.encode("utf-8"))))
        super().__init__(text)
        if name is not None:
            self.name = name
        self._depth = 0  # collections open around the node being composed
        self._values = 0  # the document so far, every alias followed
        # id(node) -> (values, height) of what it stands for; set once it is composed.
        self._cost: dict[int, tuple[int, int]] = {}

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        mark = self.peek_event().start_mark
        if self.check_event(AliasEvent):
            node = super().compose_node(parent, index)
            cost = self._cost.get(id(node))
            if cost is None:  # named while still being composed: it contains itself
                raise ComposerError(None, None, "an alias refers to a value that contains it",
                                    mark)
            values, height = cost
            self._count(values, mark)
            if self._depth + height > MAX_DEPTH:
                raise Refused(_too_deep() + " once this alias is followed", mark)
            return node
        collection = self.check_event(SequenceStartEvent, MappingStartEvent)
        if collection:
            self._depth += 1
            if self._depth > MAX_DEPTH:
                raise Refused(_too_deep(), mark)
        node = super().compose_node(parent, index)
        if collection:
            self._depth -= 1
        self._cost[id(node)] = self._measure(node)
        self._count(1, mark)
        return node

    def _measure(self, node: Node) -> tuple[int, int]:
        if isinstance(node, SequenceNode):
            children = [self._cost[id(child)] for child in node.value]
        elif isinstance(node, MappingNode):
            children = [self._cost[id(n)] for pair in node.value for n in pair]
        else:
            return 1, 0
        return 1 + sum(v for v, _ in children), 1 + max((h for _, h in children), default=0)

    def _count(self, values: int, mark: yaml.Mark) -> None:
        self._values += values
        if self._values > MAX_VALUES:
            raise Refused(f"more than {MAX_VALUES} values once aliases are followed (a real "
                          "config holds a few thousand; an alias bomb, billions)", mark)
