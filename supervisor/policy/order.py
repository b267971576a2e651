"""Start and stop order from the dependency graph, and the cycles that forbid one.

`deps` maps each agent to the names it depends on. A name that is not itself a key is
ignored here: validation reports unknown dependencies, and the supervisor must still be
able to order the rest. Pure functions over names; nothing here knows about processes.
"""

from __future__ import annotations

from typing import Mapping, Sequence


def _known(deps: Mapping[str, Sequence[str]], name: str) -> list[str]:
    return [d for d in deps[name] if d in deps]


def find_cycles(deps: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """Each cycle once, as [A, B, C, A] where A depends on B, B on C, C on A.

    A depth-first walk in the mapping's order; every edge back into the current path
    closes exactly one cycle, so none is reported twice and the first agent of a cycle
    is the one met first in the file.
    """
    cycles: list[list[str]] = []
    done: set[str] = set()
    for root in deps:
        if root in done:
            continue
        path: list[str] = [root]
        on_path = {root}
        pending = [iter(_known(deps, root))]
        while pending:
            dep = next(pending[-1], None)
            if dep is None:
                pending.pop()
                done.add(path[-1])
                on_path.discard(path.pop())
            elif dep in on_path:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in done:
                path.append(dep)
                on_path.add(dep)
                pending.append(iter(_known(deps, dep)))
    return cycles


def start_layers(deps: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """Agents grouped so that each depends only on agents of earlier layers; a layer may
    start all at once. Agents on (or behind) a cycle are left out: validation rejects
    cycles before any of this runs."""
    placed: set[str] = set()
    layers: list[list[str]] = []
    remaining = list(deps)
    while remaining:
        layer = sorted(n for n in remaining if all(d in placed for d in _known(deps, n)))
        if not layer:
            break
        layers.append(layer)
        placed.update(layer)
        remaining = [n for n in remaining if n not in placed]
    return layers


def stop_order(deps: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """The start layers reversed: an agent stops only after everything that needs it."""
    return start_layers(deps)[::-1]
