"""Everything that can be wrong with a host config, each as a Problem with its place.

Each check is a function of the parsed data (a `Source`) that returns a list of
problems and never stops at the first. The checks run even when the schema has already
failed, so they look at values defensively: a value of the wrong type was reported by
the schema and is simply skipped here.

A problem is an error (the file cannot be used as it is) or a warning (it works, and
something about it deserves to be said). The users' real files must validate with
warnings only, so what they legitimately contain is a warning: keys agentvisor has no
use for, a credential filled from the environment, a port some process holds right now.
What is surely a mistake stays an error: a near-miss of a known key (`dependancies`), a
${NAME} found nowhere, a port clash, hidden behind expressions or not.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping

from jsonschema import Draft202012Validator, ValidationError, validators

from sidecar.config import upstream_warnings as _upstream_warnings

from ..policy.order import find_cycles
from ..scan import MIN_LITERAL_LEN, YAML, key_kind, literal_secret
from . import legacy, placeholders, ports
from .model import ERROR, WARNING, Problem
from .yamlsrc import PathKey, Source, location, printable

# Probe kinds that talk to a port.
_PORT_PROBES = ("tcp", "http")
# The two keys of an agent that take a port in the host's one port namespace.
_PORT_KEYS = ("port", "health_check_port")
# Where a port may be written as an expression (config/ports.py), under an agent.
PORT_PATHS: tuple[tuple[str, ...], ...] = (("port",), ("health_check_port",), ("health", "port"))
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


@dataclass(frozen=True)
class SecretStore:
    """Which ${NAME} is a secret, as far as a load can tell: a name declared in
    secrets.names, or a file of that name in the store folders ($CREDENTIALS_DIRECTORY,
    secrets.dir), or NAME.sealed in secrets.sealed_dir (unsealed into secrets.dir at
    start). Any other ${NAME} is the supervisor's environment, as in the legacy files
    (`PYTHONPATH: '${PYTHONPATH}:${PWD}/..'`)."""

    declared: frozenset[str] = frozenset()
    folders: tuple[Path, ...] = ()
    sealed_dir: Path | None = None

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        if name in self.declared:
            return True
        if not name or "/" in name or "\0" in name or name in (".", ".."):
            return False  # no file can have that name
        return (any(os.path.lexists(folder / name) for folder in self.folders)
                or (self.sealed_dir is not None
                    and os.path.lexists(self.sealed_dir / f"{name}.sealed")))

    def describe(self) -> str:
        """Where it looked, for a message."""
        places = [f"secrets.names ({', '.join(sorted(self.declared)) or 'none declared'})"]
        places += [str(folder) for folder in self.folders]
        if self.sealed_dir is not None:
            places.append(f"{self.sealed_dir}/*.sealed")
        return ", ".join(places)


def secret_store(data: Any, folder: Path, environ: Mapping[str, str]) -> SecretStore:
    """The secret store a file describes, read defensively (a value of the wrong type
    was reported by the schema). Relative folders are relative to the file's `folder`."""
    block = data.get("secrets") if isinstance(data, dict) else None
    block = block if isinstance(block, dict) else {}
    folders = []
    if environ.get("CREDENTIALS_DIRECTORY"):  # systemd's LoadCredential=, first
        folders.append(Path(environ["CREDENTIALS_DIRECTORY"]))
    if isinstance(block.get("dir"), str):
        folders.append(folder / Path(block["dir"]).expanduser())
    sealed = block.get("sealed_dir")
    return SecretStore(
        declared=frozenset(_names(block.get("names"))),
        folders=tuple(folders),
        sealed_dir=folder / Path(sealed).expanduser() if isinstance(sealed, str) else None,
    )


@dataclass(frozen=True)
class Context:
    """What the checks know beyond the file: the machine and the supervisor's
    environment."""

    project_root: Path
    # A port already listening on this machine -> who holds it.
    listeners: Mapping[int, str] = field(default_factory=dict)
    environ: Mapping[str, str] = field(default_factory=dict)  # the supervisor's
    store: SecretStore = field(default_factory=SecretStore)
    # Every agent port, evaluated (evaluate_ports): path of the value -> Port.
    ports: Mapping[PathKey, ports.Port] = field(default_factory=dict)


def semantic_problems(source: Source, context: Context) -> list[Problem]:
    """Checks 2-8: what a schema cannot say."""
    entries = agent_entries(source.data)
    return [
        *missing_scripts(source, entries, context.project_root),
        *duplicate_names(source, entries),
        *duplicate_ports(source, entries, context.ports),
        *ports_in_use(source, entries, context.ports, context.listeners),
        *dependency_problems(source, entries),
        *placeholder_problems(source, entries, context),
        *probes_without_port(source, entries, context.ports),
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
        if not isinstance(script, str) or "\0" in script:
            continue
        # The old launcher's rule (legacy.py), as the loader applies it.
        primary, *others = legacy.script_candidates(project_root, script)
        if not legacy.resolve_script(project_root, script).is_file():
            tried = "".join(f"; also tried {other}" for other in others)
            problems.append(
                source.problem(
                    entry.path + ("script_path",), entry.name,
                    f"no such file: {primary} (script_path is relative to "
                    f"project_root {project_root}{tried})",
                )
            )
    return problems


# --- 3, 4. ports -------------------------------------------------------------------


def port_offset(data: Any) -> int:
    """The file's `port_offset:`, PORT_OFFSET when the environment does not set it."""
    value = data.get("port_offset") if isinstance(data, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def evaluate_ports(source: Source, entries: list[Entry],
                   environ: Mapping[str, str]) -> tuple[dict[PathKey, ports.Port], list[Problem]]:
    """Every port of every agent evaluated once (config/ports.py), by the path of its
    value, and a problem for each string that is no port. An int out of range was
    reported by the schema and is simply left out."""
    offset = port_offset(source.data)
    found: dict[PathKey, ports.Port] = {}
    problems = []
    for entry in entries:
        for key in PORT_PATHS:
            written = _get(entry.fields, *key)
            if written is None or isinstance(written, bool) or not isinstance(written, (int, str)):
                continue
            try:
                found[entry.path + key] = ports.evaluate(written, environ, offset)
            except ports.PortError as e:
                if isinstance(written, str):
                    problems.append(source.problem(entry.path + key, entry.name, str(e)))
    return found, problems


def _ports(entries: list[Entry], evaluated: Mapping[PathKey, ports.Port]
           ) -> Iterator[tuple[Entry, str, ports.Port]]:
    for entry in entries:
        for key in _PORT_KEYS:
            port = evaluated.get(entry.path + (key,))
            if port is not None:
                yield entry, key, port


def duplicate_ports(source: Source, entries: list[Entry],
                    evaluated: Mapping[PathKey, ports.Port]) -> list[Problem]:
    """port and health_check_port share the host's one namespace: each is taken once,
    by value, whatever expression wrote it. Reported on the later use, naming the
    earlier one (with both expressions and values when an expression is involved)."""
    first: dict[int, tuple[Entry, str, ports.Port]] = {}
    problems = []
    for entry, key, port in _ports(entries, evaluated):
        if port.value in first:
            owner, owner_key, owner_port = first[port.value]
            where = location(owner.path + (owner_key,))
            if port.expression or owner_port.expression:
                where += f": {owner_port.describe()}"
            problems.append(source.problem(
                entry.path + (key,), entry.name,
                f"{port.describe()} is also used by {owner.name} ({where})"))
        else:
            first[port.value] = (entry, key, port)
    return problems


def ports_in_use(source: Source, entries: list[Entry], evaluated: Mapping[PathKey, ports.Port],
                 listeners: Mapping[int, str]) -> list[Problem]:
    """A port some process already listens on: a warning, not an error. Only that agent
    (and its dependants) will fail to start, and the holder may be gone by then."""
    return [
        source.problem(
            entry.path + (key,), entry.name,
            f"{port.describe()} is already listening on this machine ({listeners[port.value]}): "
            "this agent will fail to start until it is freed",
            severity=WARNING,
        )
        for entry, key, port in _ports(entries, evaluated)
        if port.value in listeners
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


# ${PWD} with no PWD in the supervisor's environment (systemd sets none) is the agent's
# working directory: the legacy files write `PYTHONPATH: '${PYTHONPATH}:${PWD}/..'`, meant
# as "where the agent runs", which the old launcher's shell supplied.
WORKING_DIR_VAR = "PWD"
# How a value gets into the secret store, for messages.
_TO_STORE = ("`agentvisor secrets seal {name}` into secrets.sealed_dir, a file {name} in "
             "secrets.dir, or systemd's LoadCredential={name}:FILE")


def credential_name(name: str) -> bool:
    """Whether a variable's name says it holds a credential (NATS_PASSWORD, API_KEY,
    AUTH_TOKEN): `agentvisor scan`'s one classification of keys. PWD, which scan reads
    as a password, is the shell's working directory when it is the whole name."""
    return name != WORKING_DIR_VAR and key_kind(name) == "secret"


def environment_blocks(data: Any, entries: list[Entry]) -> list[tuple[PathKey, str | None, Any]]:
    """Where ${...} placeholders may be written: (path, agent, the block as written) for
    global_settings.environment and each agent's env_vars."""
    blocks: list[tuple[PathKey, str | None, Any]] = [
        (("global_settings", "environment"), None, _get(data, "global_settings", "environment"))]
    blocks += [(e.path + ("env_vars",), e.name, e.fields.get("env_vars")) for e in entries]
    return blocks


def placeholder_problems(source: Source, entries: list[Entry], context: Context) -> list[Problem]:
    """Every ${NAME} must be a secret in the store or set in the supervisor's environment,
    and every ${upstream:NAME} a declared upstream, so that a typo fails validation
    instead of an agent at spawn. A credential taken from the environment or written in
    plain text works, and is a warning saying how to move it to the store."""
    data = source.data if isinstance(source.data, dict) else {}
    upstreams = _names(data.get("upstreams"))
    environments = environment_blocks(data, entries)
    problems = []
    from_environment: dict[str, list[tuple[PathKey, str | None]]] = {}
    # (line, message, severity) -> where: `env_vars: *common_env` gives many agents the
    # value of one line, which is one problem, there.
    shared: dict[tuple[int | None, str, str], list[tuple[PathKey, str | None]]] = {}
    for path, agent, env in environments:
        for var, template in (env.items() if isinstance(env, dict) else ()):
            if not isinstance(template, str):
                continue
            where = path + (var,)
            if "\0" not in template and credential_name(var) and _plain_credential(template):
                message = (f"{var} holds a credential in plain text ({len(template)} characters, "
                           "not shown), in this file and its backups; put it in the secret "
                           f'store ({_TO_STORE.format(name=var)}) and write "${{{var}}}" here')
                shared.setdefault((source.line(where), message, WARNING), []).append((where, agent))
            for kind, name in placeholders.find(template):
                if kind is None and name not in context.store and name in context.environ:
                    if credential_name(name) or credential_name(var):
                        from_environment.setdefault(name, []).append((where, agent))
                    continue
                missing = _placeholder_problem(kind, name, context, upstreams, var)
                if missing:
                    shared.setdefault((source.line(where), missing, ERROR), []).append((where, agent))
    for (_, text, severity), uses in shared.items():
        (first, who), others = uses[0], [a for _, a in uses[1:] if a]
        if others:
            text += (f" (the same value, through a YAML anchor, for {len(others)} more "
                     f"agents: {', '.join(others[:_MOST_LINES])}"
                     f"{', ...' if len(others) > _MOST_LINES else ''})")
        problems.append(source.problem(first, who, text, severity=severity))
    for name, env_uses in from_environment.items():
        (first, who), more = env_uses[0], env_uses[1:]
        also = f" (and {len(more)} more: {_lines(source, [u for u, _ in more])})" if more else ""
        problems.append(source.problem(
            first, who,
            f"${{{name}}}{also} is a credential taken from the supervisor's environment "
            "(plain text in a unit file or profile, inherited by every child); move it to "
            f"the secret store: {_TO_STORE.format(name=name)}", severity=WARNING))
    for entry in entries:
        files = _get(entry.fields, "secrets", "files")
        for i, name in enumerate(files if isinstance(files, list) else ()):
            if name not in context.store:
                problems.append(source.problem(
                    entry.path + ("secrets", "files", i), entry.name,
                    f"{name!r} is not in the secret store (looked in {context.store.describe()}); "
                    f"add it: {_TO_STORE.format(name=name)}"))
    return problems


def _plain_credential(value: str) -> bool:
    """A value that is a credential itself, by `agentvisor scan`'s rule for literals: not
    a placeholder, a mask or a reference, not too short to be one, not a path."""
    literal = literal_secret(value, True, YAML)
    return (literal is not None and len(literal) >= MIN_LITERAL_LEN
            and not literal.startswith(("/", "~/", "./", "../")))


def _placeholder_problem(kind: str | None, name: str, context: Context, upstreams: set[str],
                         var: str) -> str | None:
    written = "${" + placeholders.key(kind, name) + "}"
    if kind is None:
        if name in context.store or name in context.environ or name == WORKING_DIR_VAR:
            return None
        store = f"put it in the secret store: {_TO_STORE.format(name=name)}"
        environment = "set it in the supervisor's environment (e.g. Environment= in its systemd unit)"
        # Say first the way that fits the names: a password goes in the store.
        secret = credential_name(name) or credential_name(var)
        first, then = (store, environment) if secret else (environment, store)
        return (f"{written}: {name!r} is neither in the secret store (looked in "
                f"{context.store.describe()}) nor set in the supervisor's environment; "
                f"{first}, or {then}")
    if kind == placeholders.UPSTREAM and name not in upstreams:
        return f"{written}: {name!r} is not in upstreams ({', '.join(sorted(upstreams)) or 'none declared'})"
    if kind != placeholders.UPSTREAM:
        return (f"{written}: unknown placeholder kind {kind!r}; use ${{NAME}} for a secret or "
                "a variable of the supervisor's environment, or ${upstream:NAME}")
    return None


def secret_names(env: Mapping[str, str], store: SecretStore) -> tuple[str, ...]:
    """The ${NAME} of an agent's environment that are secrets (the rest are the
    supervisor's environment), sorted: what AgentSpec.secret_names holds."""
    return tuple(sorted({name for template in env.values() if isinstance(template, str)
                         for kind, name in placeholders.find(template)
                         if kind is None and name in store}))


def _lines(source: Source, paths: list[PathKey], most: int = 5) -> str:
    """`lines 14, 30, 46` for a message; the first `most`, then how many more."""
    lines = list(dict.fromkeys(str(source.line(p)) for p in paths))  # an anchor's, once
    shown = ", ".join(lines[:most]) + (f" and {len(lines) - most} more" if len(lines) > most else "")
    return ("line " if len(lines) == 1 else "lines ") + shown


# --- 8. probes ---------------------------------------------------------------------


def probes_without_port(source: Source, entries: list[Entry],
                        evaluated: Mapping[PathKey, ports.Port]) -> list[Problem]:
    problems = []
    for entry in entries:
        health = entry.fields.get("health")
        if not isinstance(health, dict) or health.get("type") not in _PORT_PROBES:
            continue
        # A port written but not evaluated was reported as such: no second problem.
        if not any(entry.path + key in evaluated or isinstance(_get(entry.fields, *key), str)
                   for key in PORT_PATHS):
            problems.append(
                source.problem(
                    entry.path + ("health",), entry.name,
                    f"a {health['type']} probe needs a port: set health.port, health_check_port or port",
                )
            )
    return problems


# The supervisor's own children in status and in every agent's dependencies, and the name
# its agents' samples are spooled under (sidecar.samples.SENDER).
RESERVED_NAMES = {"sidecar", "sidecar-data", "sidecar-hub", "agentvisor"}


def intercept_problems(source: Source, entries: list[Entry]) -> list[Problem]:
    """Transparent interception tells an agent's traffic apart by its uid, so the agent
    needs a user of its own; and the sidecar's name is taken."""
    problems = []
    for entry in entries:
        if entry.name in RESERVED_NAMES:
            problems.append(source.problem(entry.path, entry.name,
                                           f"{entry.name!r} is reserved for agentvisor's own "
                                           "use; rename the agent"))
        intercept = entry.fields.get("intercept")
        mode = intercept.get("mode") if isinstance(intercept, dict) else intercept
        if mode == "transparent" and "user" not in entry.fields:
            problems.append(source.problem(entry.path + ("intercept",), entry.name,
                                           "intercept: transparent needs `user:` (the agent's "
                                           "own uid is how its traffic is redirected)"))
    return problems


# --- 10. keys agentvisor does not know --------------------------------------------

# Keys the users' real files carry that agentvisor has no use for: never taken for a typo
# of a known key, whatever they look like (`health_checks` is 0.8 like `health_check_port`).
LEGACY_KEYS = frozenset({"health_checks", "pc2_network", "error_bus_port",
                         "hybrid_inference_policy", "docker_groups", "performance_tuning",
                         "startup_timeout", "restart_policy", "feature_flags", "features"})
# A near-miss of a known key is a typo, and an error: `dependancies` would otherwise be a
# warning and the agent would start without its dependencies. Near means one keystroke
# away (`prot`, `Port`), or similar (difflib's ratio, case ignored) and two keystrokes
# away, so that a longer or shorter real key (`health_check` beside `health_check_port`,
# `memory` beside `memory_mb`) is not taken for a typo.
NEAR_MISS_RATIO = 0.8
NEAR_MISS_EDITS = 2
# More lines than this in one message are counted, not listed.
_MOST_LINES = 5


def unknown_keys(source: Source, schema: Mapping[str, Any], strict: bool) -> list[Problem]:
    """Keys the schema does not name, where the legacy files have them (top level,
    global_settings and its legacy blocks, each agent, its resource_limits and
    restart_policy). They are kept and ignored: ONE warning per key and place pattern
    (`agent_groups.*.*.feature_flags`, with how many agents and their lines), an error
    with `strict`. A near-miss of a known key is an error at each of its lines, with
    "did you mean". Native blocks (health, restart, secrets, ...) stay closed in the
    schema: their unknown keys are schema errors."""
    found: dict[tuple[str, str], list[tuple[PathKey, str | None]]] = {}
    problems = []
    for path, pattern, agent, mapping, known in _open_levels(source.data, schema):
        for key in mapping:
            if key in known:
                continue
            close = _near_miss(key, known)
            if close is not None:
                problems.append(source.problem(path + (key,), agent,
                                               f"unknown key {key!r}; did you mean {close!r}?"))
            else:
                found.setdefault((pattern, key), []).append((path + (key,), agent))
    for (pattern, key), uses in found.items():
        (first, agent), n = uses[0], len(uses)
        where = f"unknown key {key!r}"
        if pattern.endswith(".restart_policy"):
            where = f"restart_policy key {key!r} is not understood"
        if n > 1:
            where += f" in {n} agents ({_lines(source, [p for p, _ in uses], _MOST_LINES)})"
        if strict:
            message = (f"{where}: not allowed with --strict or `strict: true`; remove it, "
                       "or validate without strict")
        else:
            message = f"{where}: kept, and ignored by agentvisor (an error with --strict)"
        problem = source.problem(first, agent if n == 1 else None, message,
                                 severity=ERROR if strict else WARNING)
        if n > 1:
            problem = replace(problem, location=f"{pattern}.{printable(key)}")
        problems.append(problem)
    return problems


def _open_levels(data: Any, schema: Mapping[str, Any]
                 ) -> Iterator[tuple[PathKey, str, str | None, Mapping[str, Any], Mapping[str, Any]]]:
    """(path, its pattern, agent, the mapping there, its known keys) for every place
    where unknown keys are kept: the ones the schema leaves open."""
    if not isinstance(data, dict):
        return
    top = schema["properties"]
    defs = schema["$defs"]
    yield (), "", None, data, top
    settings = data.get("global_settings")
    if isinstance(settings, dict):
        known = top["global_settings"]["properties"]
        yield ("global_settings",), "global_settings", None, settings, known
        for key, block in (("health_checks", known["health_checks"]),
                           ("resource_limits", defs["resourceLimits"])):
            if isinstance(settings.get(key), dict):
                yield (("global_settings", key), f"global_settings.{key}", None, settings[key],
                       block["properties"])
    for entry in agent_entries(data):
        pattern = "agent_groups.*.*" if entry.group is not None else "pc2_services[*]"
        yield entry.path, pattern, entry.name, entry.fields, defs["agent"]["properties"]
        for key, block in (("resource_limits", defs["resourceLimits"]),
                           ("restart_policy", defs["legacyRestartPolicy"])):
            value = entry.fields.get(key)
            if isinstance(value, dict):
                yield entry.path + (key,), f"{pattern}.{key}", entry.name, value, block["properties"]


def _near_miss(key: str, known: Mapping[str, Any]) -> str | None:
    if key in LEGACY_KEYS:
        return None
    for candidate in known:
        a, b = key.lower(), candidate.lower()
        edits = _edits(a, b)
        if edits <= 1 or (edits <= NEAR_MISS_EDITS
                          and difflib.SequenceMatcher(None, a, b).ratio() >= NEAR_MISS_RATIO):
            return candidate
    return None


def _edits(a: str, b: str) -> int:
    """Levenshtein distance, with a swap of two neighbours counting as one edit."""
    if abs(len(a) - len(b)) > NEAR_MISS_EDITS:
        return NEAR_MISS_EDITS + 1
    previous, current = None, list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        before, previous, current = previous, current, [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1,
                             previous[j - 1] + (a[i - 1] != b[j - 1]))
            if (before is not None and i > 1 and j > 1 and a[i - 1] == b[j - 2]
                    and a[i - 2] == b[j - 1]):
                current[j] = min(current[j], before[j - 2] + 1)
    return current[len(b)]


# --- 11. legacy keys with a native meaning -------------------------------------------

# restart_policy's modes as the old files write them. YAML reads an unquoted `no` as
# false, so false is "no" too.
LEGACY_RESTART_MODES: Mapping[Any, str] = {
    "always": "always", "on-failure": "on-failure", "on_failure": "on-failure",
    "never": "never", "no": "never", False: "never",
}
# restart_policy's keys -> where they go in a native restart block.
LEGACY_RESTART_KEYS: Mapping[str, tuple[str, ...]] = {
    "max_restarts": ("max_failures",), "max_retries": ("max_failures",),
    "restart_delay": ("backoff", "initial_s"), "delay": ("backoff", "initial_s"),
    "backoff_seconds": ("backoff", "initial_s"),
    "policy": ("policy",), "mode": ("policy",),
}


def legacy_restart_block(value: Any) -> dict[str, Any]:
    """A legacy `restart_policy` (a mode, or a mapping) as a native restart block. What
    is not understood is left out (and warned about by restart_policy_problems)."""
    if not isinstance(value, dict):
        value = {"policy": value}
    block: dict[str, Any] = {}
    for key, item in value.items():
        target = LEGACY_RESTART_KEYS.get(key)
        if target == ("policy",):
            if _hashable(item) and item in LEGACY_RESTART_MODES:
                block["policy"] = LEGACY_RESTART_MODES[item]
        elif target is not None:
            *parents, leaf = target
            into = block
            for parent in parents:
                into = into.setdefault(parent, {})
            into[leaf] = item
    return block


def restart_policy_problems(source: Source, entries: list[Entry], strict: bool) -> list[Problem]:
    """A restart_policy mode agentvisor does not know: the default (always) applies."""
    problems = []
    for entry in entries:
        value = entry.fields.get("restart_policy")
        places: list[tuple[PathKey, Any]] = []
        if isinstance(value, dict):
            places = [((key,), value[key]) for key in ("policy", "mode") if key in value]
        elif value is not None:
            places = [((), value)]
        for sub, mode in places:
            if isinstance(mode, (str, bool)) and mode not in LEGACY_RESTART_MODES:
                problems.append(source.problem(
                    entry.path + ("restart_policy",) + sub, entry.name,
                    f"restart_policy {mode!r} is not understood, so restart.policy's default "
                    "(always) applies; write always, on-failure or never",
                    severity=ERROR if strict else WARNING))
    return problems


def _hashable(value: Any) -> bool:
    return isinstance(value, (str, bool, int, float, type(None)))


# --- warnings: valid, but surely not what was meant ----------------------------------


def upstream_warnings(source: Source) -> list[Problem]:
    """Keys only the L7 proxy reads, on a `tcp` upstream: the file works, but a
    request_timeout_s there bounds nothing, so it is said, not failed. Which keys those
    are is sidecar.config's one list (L7_ONLY_UPSTREAM_KEYS)."""
    data = source.data if isinstance(source.data, dict) else {}
    return [source.problem(w.path, None, w.message, severity=WARNING)
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
