"""Everything that can be wrong with a host config, each as a Problem with its place.

Each check is a function of the parsed data (a `Source`) that returns a list of
problems and never stops at the first. The checks run even when the schema has already
failed, so they look at values defensively: a value of the wrong type was reported by
the schema and is simply skipped here.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from jsonschema import Draft202012Validator, ValidationError, validators

from sidecar.config import upstream_warnings as _upstream_warnings

from ..policy.order import find_cycles
from . import placeholders
from .model import Problem
from .yamlsrc import PathKey, Source, location, printable

# Probe kinds that talk to a port.
_PORT_PROBES = ("tcp", "http")
# The two keys of an agent that take a port in the host's one port namespace.
_PORT_KEYS = ("port", "health_check_port")
# YAML's .nan and .inf are floats, and JSON Schema's range keywords let NaN through (every
# comparison with it is false) while .inf is a timeout never reached: for the schema a
# number is finite or it is not a number.
_Validator = validators.extend(
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine(
        "number",
        lambda checker, value: (Draft202012Validator.TYPE_CHECKER.is_type(value, "number")
                                and math.isfinite(value)),
    ),
)


@dataclass(frozen=True)
class Entry:
    """One agent as written, in either legacy format."""

    name: str | None  # None when a pc2_services item has no (string) name
    group: str | None
    path: PathKey  # ("agent_groups", group, name) or ("pc2_services", i)
    fields: Mapping[str, Any]


def agent_entries(data: Any) -> list[Entry]:
    """The agents of a file in file order: agent_groups first, then pc2_services."""
    data = data if isinstance(data, dict) else {}
    entries: list[Entry] = []
    groups = data.get("agent_groups")
    for group, agents in (groups.items() if isinstance(groups, dict) else ()):
        for name, fields in (agents.items() if isinstance(agents, dict) else ()):
            if isinstance(fields, dict):
                entries.append(Entry(name, group, ("agent_groups", group, name), fields))
    services = data.get("pc2_services")
    for i, fields in enumerate(services if isinstance(services, list) else ()):
        if isinstance(fields, dict):
            name = fields.get("name")
            entries.append(Entry(_str(name), None, ("pc2_services", i), fields))
    return entries


def semantic_problems(source: Source, project_root: Path, listeners: Mapping[int, str]) -> list[Problem]:
    """Checks 2-8: what a schema cannot say. `listeners` maps a port that is already
    listening on this machine to who holds it."""
    entries = agent_entries(source.data)
    return [
        *missing_scripts(source, entries, project_root),
        *duplicate_names(source, entries),
        *duplicate_ports(source, entries),
        *ports_in_use(source, entries, listeners),
        *dependency_problems(source, entries),
        *placeholder_problems(source, entries),
        *probes_without_port(source, entries),
        *intercept_problems(source, entries),
        *nul_characters(source, entries),
    ]


def by_line(problems: list[Problem]) -> list[Problem]:
    """In file order; problems without a line last. Stable, so one line's problems keep
    the order of the checks."""
    return sorted(problems, key=lambda p: (p.line is None, p.line or 0))


# --- 1. schema ---------------------------------------------------------------------


def schema_problems(source: Source, schema: Mapping[str, Any]) -> list[Problem]:
    """Every schema error, in jsonschema's words unless the schema's `errorMessage` (or
    a shorter wording here) says it better."""
    problems = []
    for error in _Validator(schema).iter_errors(source.data):
        path = tuple(error.absolute_path)
        if error.validator == "additionalProperties":
            # One problem per unknown key, on its own line, with the likely intended key.
            known = list(error.schema.get("properties", {}))
            for key in sorted(set(error.instance) - set(known)):
                problems.append(
                    source.problem(path + (key,), agent_at(source.data, path), _unknown_key(key, known))
                )
        else:
            problems.append(source.problem(path, agent_at(source.data, path), _message(error)))
    return problems


def agent_at(data: Any, path: PathKey) -> str | None:
    """The name of the agent a path lies in, if it lies in one."""
    if len(path) >= 3 and path[0] == "agent_groups":
        return str(path[2])
    if len(path) >= 2 and path[0] == "pc2_services" and isinstance(data, dict):
        services = data.get("pc2_services")
        if isinstance(services, list) and isinstance(path[1], int) and path[1] < len(services):
            item = services[path[1]]
            return _str(item.get("name")) if isinstance(item, dict) else None
    return None


def _unknown_key(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else "allowed: " + ", ".join(known)
    return f"unknown key {key!r}; {hint}"


def _message(error: ValidationError) -> str:
    custom = error.schema.get("errorMessage", {}) if isinstance(error.schema, dict) else {}
    if error.validator in custom:
        return custom[error.validator]
    if not error.absolute_path and error.instance is None:
        return "the file is empty"
    if (error.validator == "type" and isinstance(error.instance, float)
            and not math.isfinite(error.instance)):
        return f"{error.instance} is not a finite number"
    if error.validator == "type" and isinstance(error.instance, (dict, list, type(None))):
        # jsonschema would print the whole mapping or list; its kind is what matters.
        return f"expected {_json_types(error.validator_value)}, got {_json_type(error.instance)}"
    return error.message


def _json_types(expected: str | list[str]) -> str:
    return " or ".join(expected) if isinstance(expected, list) else expected


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", type(None): "null"}.get(type(value), type(value).__name__)


# --- 2. script paths ---------------------------------------------------------------


def missing_scripts(source: Source, entries: list[Entry], project_root: Path) -> list[Problem]:
    """script_path must name a file under project_root, the root the agent will run from."""
    if "\0" in str(project_root):
        return []  # no path holds one: nul_characters says so, once
    if not project_root.is_dir():
        # Every script would be missing; the one cause is what the operator must fix.
        return [source.problem(("project_root",), None, f"{project_root} is not a folder")]
    problems = []
    for entry in entries:
        script = entry.fields.get("script_path")
        if (isinstance(script, str) and "\0" not in script
                and not (project_root / script).is_file()):
            problems.append(
                source.problem(
                    entry.path + ("script_path",), entry.name,
                    f"no such file: {project_root / script} (script_path is relative to "
                    f"project_root {project_root})",
                )
            )
    return problems


# --- 3, 4. ports -------------------------------------------------------------------


def _ports(entries: list[Entry]) -> Iterator[tuple[Entry, str, int]]:
    for entry in entries:
        for key in _PORT_KEYS:
            port = entry.fields.get(key)
            if isinstance(port, int) and not isinstance(port, bool):
                yield entry, key, port


def duplicate_ports(source: Source, entries: list[Entry]) -> list[Problem]:
    """port and health_check_port share the host's one namespace: each is taken once.
    Reported on the later use, naming the earlier one."""
    first: dict[int, tuple[Entry, str]] = {}
    problems = []
    for entry, key, port in _ports(entries):
        if port in first:
            owner, owner_key = first[port]
            problems.append(
                source.problem(
                    entry.path + (key,), entry.name,
                    f"{port} is also used by {owner.name} ({location(owner.path + (owner_key,))})",
                )
            )
        else:
            first[port] = (entry, key)
    return problems


def ports_in_use(source: Source, entries: list[Entry], listeners: Mapping[int, str]) -> list[Problem]:
    return [
        source.problem(
            entry.path + (key,), entry.name,
            f"{port} is already listening on this machine ({listeners[port]})",
        )
        for entry, key, port in _ports(entries)
        if port in listeners
    ]


# --- 5, 6. names and the dependency graph ------------------------------------------


def duplicate_names(source: Source, entries: list[Entry]) -> list[Problem]:
    first: dict[str, Entry] = {}
    problems = []
    for entry in entries:
        if entry.name is None:
            continue
        if entry.name in first:
            earlier = first[entry.name].path
            problems.append(
                source.problem(
                    entry.path, entry.name,
                    f"agent name {entry.name!r} is already used at {location(earlier)} "
                    f"(line {source.line(earlier)})",
                )
            )
        else:
            first[entry.name] = entry
    return problems


def dependency_problems(source: Source, entries: list[Entry]) -> list[Problem]:
    named: dict[str, Entry] = {}
    for entry in entries:
        if entry.name is not None:
            named.setdefault(entry.name, entry)  # a duplicate is reported by duplicate_names
    deps: dict[str, list[str]] = {}
    problems = []
    for name, entry in named.items():
        listed = entry.fields.get("dependencies")
        deps[name] = [d for d in listed if isinstance(d, str)] if isinstance(listed, list) else []
        for i, dep in enumerate(deps[name]):
            if dep not in named:
                close = difflib.get_close_matches(dep, list(named), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                problems.append(
                    source.problem(
                        entry.path + ("dependencies", i), name,
                        f"depends on {dep!r}, which is not an agent of this file{hint}",
                    )
                )
    for cycle in find_cycles(deps):
        problems.append(
            source.problem(
                named[cycle[0]].path + ("dependencies",), cycle[0],
                "dependency cycle: " + " -> ".join(cycle),
            )
        )
    return problems


# --- 7. placeholders ---------------------------------------------------------------


def placeholder_problems(source: Source, entries: list[Entry]) -> list[Problem]:
    """Every ${NAME} must be a declared secret and every ${upstream:NAME} a declared
    upstream, so that a typo fails validation instead of an agent at spawn."""
    data = source.data if isinstance(source.data, dict) else {}
    secrets = _names(_get(data, "secrets", "names"))
    upstreams = _names(data.get("upstreams"))
    environments = [(("global_settings", "environment"), None, _get(data, "global_settings", "environment"))]
    environments += [(e.path + ("env_vars",), e.name, e.fields.get("env_vars")) for e in entries]
    problems = []
    for path, agent, env in environments:
        for var, template in (env.items() if isinstance(env, dict) else ()):
            for kind, name in placeholders.find(template) if isinstance(template, str) else ():
                message = _placeholder_problem(kind, name, secrets, upstreams)
                if message:
                    problems.append(source.problem(path + (var,), agent, message))
    for entry in entries:
        files = _get(entry.fields, "secrets", "files")
        for i, name in enumerate(files if isinstance(files, list) else ()):
            if name not in secrets:
                problems.append(source.problem(
                    entry.path + ("secrets", "files", i), entry.name,
                    f"{name!r} is not in secrets.names ({', '.join(sorted(secrets)) or 'none declared'})"))
    return problems


def _placeholder_problem(kind: str | None, name: str, secrets: set[str], upstreams: set[str]) -> str | None:
    written = "${" + placeholders.key(kind, name) + "}"
    if kind is None and name not in secrets:
        return f"{written}: {name!r} is not in secrets.names ({', '.join(sorted(secrets)) or 'none declared'})"
    if kind == placeholders.UPSTREAM and name not in upstreams:
        return f"{written}: {name!r} is not in upstreams ({', '.join(sorted(upstreams)) or 'none declared'})"
    if kind not in (None, placeholders.UPSTREAM):
        return f"{written}: unknown placeholder kind {kind!r}; use ${{NAME}} for a secret or ${{upstream:NAME}}"
    return None


# --- 8. probes ---------------------------------------------------------------------


def probes_without_port(source: Source, entries: list[Entry]) -> list[Problem]:
    problems = []
    for entry in entries:
        health = entry.fields.get("health")
        if not isinstance(health, dict) or health.get("type") not in _PORT_PROBES:
            continue
        if not any(isinstance(v, int) for v in (health.get("port"), *map(entry.fields.get, _PORT_KEYS))):
            problems.append(
                source.problem(
                    entry.path + ("health",), entry.name,
                    f"a {health['type']} probe needs a port: set health.port, health_check_port or port",
                )
            )
    return problems


# The supervisor's own child in status and in every agent's dependencies.
RESERVED_NAMES = {"sidecar"}


def intercept_problems(source: Source, entries: list[Entry]) -> list[Problem]:
    """Transparent interception tells an agent's traffic apart by its uid, so the agent
    needs a user of its own; and the sidecar's name is taken."""
    problems = []
    for entry in entries:
        if entry.name in RESERVED_NAMES:
            problems.append(source.problem(entry.path, entry.name,
                                           f"{entry.name!r} is reserved for agentvisor's own "
                                           "process; rename the agent"))
        intercept = entry.fields.get("intercept")
        mode = intercept.get("mode") if isinstance(intercept, dict) else intercept
        if mode == "transparent" and "user" not in entry.fields:
            problems.append(source.problem(entry.path + ("intercept",), entry.name,
                                           "intercept: transparent needs `user:` (the agent's "
                                           "own uid is how its traffic is redirected)"))
    return problems


# --- warnings: valid, but surely not what was meant ----------------------------------


def upstream_warnings(source: Source) -> list[Problem]:
    """Keys only the L7 proxy reads, on a `tcp` upstream: the file works, but a
    request_timeout_s there bounds nothing, so it is said, not failed. Which keys those
    are is sidecar.config's one list (L7_ONLY_UPSTREAM_KEYS)."""
    data = source.data if isinstance(source.data, dict) else {}
    return [source.problem(w.path, None, w.message)
            for w in _upstream_warnings(data.get("upstreams"))]


# --- 9. NUL characters -------------------------------------------------------------

# The sidecar's own parser checks its blocks; an agent's `config` reaches it as JSON,
# which escapes a NUL, so it may hold anything.
_NOT_OURS = ("upstreams", "sidecar")


def nul_characters(source: Source, entries: list[Entry]) -> list[Problem]:
    """A NUL ends a string at the OS: a path, argument, user or environment value holding
    one passes every other check and fails only at spawn (`embedded null byte`)."""
    skip = {(key,) for key in _NOT_OURS} | {e.path + ("config",) for e in entries}
    problems = []
    pending: list[tuple[PathKey, Any]] = [((), source.data)]
    while pending:
        path, value = pending.pop()
        if path in skip:
            continue
        if isinstance(value, dict):
            pending += [(path + (key,), item) for key, item in value.items()]
            bad: list[PathKey] = [path + (key,) for key in value if "\0" in key]
        elif isinstance(value, list):
            pending += [(path + (i,), item) for i, item in enumerate(value)]
            bad = []
        else:
            bad = [path] if isinstance(value, str) and "\0" in value else []
        for where in bad:
            agent = agent_at(source.data, where)
            problems.append(source.problem(
                where, agent and printable(agent),
                "contains a NUL character (\\0), which no path, argument or environment "
                "value can hold"))
    return problems


# --- helpers -----------------------------------------------------------------------


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _get(data: Any, *keys: str) -> Any:
    for key in keys:
        data = data.get(key) if isinstance(data, dict) else None
    return data


def _names(value: Any) -> set[str]:
    """The string names of a list, or the keys of a mapping."""
    return {v for v in value if isinstance(v, str)} if isinstance(value, (list, dict)) else set()
