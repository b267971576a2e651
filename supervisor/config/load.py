"""The one way a host config becomes a HostConfig.

`validate_file` reads, parses and checks a file and reports every problem at once;
`load` is the same but raises them as one ConfigError. The model is built only from
data the schema accepted, so the builder below never checks a type: it only applies
defaults and resolves paths.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import shutil
import socket
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import psutil

from supervisor.paths import default_logs_dir, default_runtime_dir, default_state_dir

from . import legacy, overlay, validate, yamlsrc
from .model import (
    DEFAULT_RESOURCE_INTERVAL_S, AgentSpec, Backoff, ConfigError, HealthCheck, HostConfig, ProbeKind, Problem,
    WARNING, Intercept, ResourceLimits, RestartMode, RestartPolicy, SecretsConfig, errors,
    warnings,
)
from sidecar.config import (DataSettings, Deliver, SidecarSettings, UpstreamPolicy, parse_data,
                            parse_sidecar, parse_upstreams)
from sidecar.routing import self_loops

SCHEMA_NAME = "agentvisor.schema.json"
# Addresses an agent binds to that a probe cannot connect to.
_WILDCARD_HOSTS = {"0.0.0.0", "::", ""}
_LOOPBACK = "127.0.0.1"
# The model's field names for the legacy global_settings.health_checks keys.
_LEGACY_PROBE_TIMING = {"interval_seconds": "interval_s", "timeout_seconds": "timeout_s", "retries": "retries"}
# The legacy resource_limits keys (ResourceLimits' fields).
_LIMIT_FIELDS = ("memory_mb", "cpu_percent", "max_threads")
# Keys of a native `health` block that are HealthCheck fields as they stand.
_PROBE_FIELDS = ("path", "status", "interval_s", "timeout_s", "retries", "start_timeout_s")


class ConfigUnreadable(Exception):
    """The config file could not be read at all (missing, a folder, no permission)."""


def load(
    path: str | os.PathLike[str],
    *,
    overlays: Sequence[str | os.PathLike[str]] = (),
    runtime_dir: Path | None = None,
    logs_dir: Path | None = None,
    check_machine: bool = True,
    exclude_pids: frozenset[int] = frozenset(),
    strict: bool = False,
    environ: Mapping[str, str] | None = None,
) -> HostConfig:
    """The host config in `path`; ConfigError with every error if there is any. The
    warnings are in the returned config's `warnings`.

    runtime_dir and logs_dir override the file's and the defaults. check_machine also
    warns about ports that are already listening here, except those held by exclude_pids
    (the supervisor's own agents, on a reload). strict (or the file's `strict: true`)
    makes unknown keys errors. environ is the supervisor's environment (default
    os.environ): what ${NAME} placeholders and port expressions are filled from."""
    config, problems = validate_file(
        path, overlays=overlays, runtime_dir=runtime_dir, logs_dir=logs_dir,
        check_machine=check_machine, exclude_pids=exclude_pids, strict=strict,
        environ=environ,
    )
    if errors(problems) or config is None:
        raise ConfigError(errors(problems))
    return config


def validate_file(
    path: str | os.PathLike[str],
    *,
    overlays: Sequence[str | os.PathLike[str]] = (),
    runtime_dir: Path | None = None,
    logs_dir: Path | None = None,
    check_machine: bool = True,
    exclude_pids: frozenset[int] = frozenset(),
    strict: bool = False,
    environ: Mapping[str, str] | None = None,
) -> tuple[HostConfig | None, list[Problem]]:
    """(config, problems), never raising ConfigError (ConfigUnreadable still, for a file
    that cannot be read). problems holds errors and warnings (Problem.severity) in file
    order; `errors()`/`warnings()` split them. The config is None when the file is not
    YAML or breaks the schema; otherwise it is built even if there are errors, e.g. a
    missing script, and carries the warnings."""
    path = Path(path)
    try:
        # The file with its include: files and overlays laid over it (overlay.py).
        source = overlay.compose(path, overlays)
    except OSError as e:  # the file or an overlay: say which
        raise ConfigUnreadable(f"{e.filename or path}: cannot read: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ConfigUnreadable(f"{path}: cannot read: not UTF-8 text (byte {e.start})") from e
    except yamlsrc.Malformed as e:
        return None, [e.problem]
    folder = path.absolute().parent
    data = source.data if isinstance(source.data, dict) else {}
    project_root, project_root_reason = legacy.project_root(source)
    environ = os.environ if environ is None else environ
    strict = strict or data.get("strict") is True
    entries = validate.agent_entries(data)
    evaluated, port_problems = validate.evaluate_ports(source, entries, environ)
    context = validate.Context(
        project_root=project_root,
        listeners=listening_ports(exclude_pids) if check_machine else {},
        environ=environ,
        store=validate.secret_store(data, folder, environ),
        ports=evaluated,
    )
    schema_problems = validate.schema_problems(source, schema())
    problems = validate.by_line([
        *source.problems, *schema_problems, *port_problems,
        *validate.semantic_problems(source, context),
        *validate.unknown_keys(source, schema(), strict),
        *validate.restart_policy_problems(source, entries, strict),
        *validate.upstream_warnings(source),
    ])
    if schema_problems:
        return None, problems
    # The sidecar's own parser reads its blocks: one reading of upstreams everywhere.
    upstreams, upstream_problems = parse_upstreams(data.get("upstreams"),
                                                   resilience=data.get("resilience"))
    sidecar, sidecar_problems = parse_sidecar(data.get("sidecar"))
    sidecar_problems += self_loops(upstreams, sidecar)
    data_settings, data_problems = parse_data(data.get("hubs"), data.get("spool"),
                                              data.get("hub"))
    sidecar_problems += data_problems
    problems += _forwarding_warnings(source, upstreams, data_settings)
    problems = validate.by_line(problems + [
        source.problem(p.path, None, p.message) for p in upstream_problems + sidecar_problems])
    paths = _Paths(
        folder=folder,
        project_root=project_root,
        # Absolute once, here: children run in other working directories.
        runtime_dir=Path(runtime_dir or _under(folder, data.get("runtime_dir"))
                         or default_runtime_dir()).absolute(),
        logs_dir=Path(logs_dir or _under(folder, data.get("logs", {}).get("dir"))
                      or default_logs_dir()).absolute(),
    )
    config = replace(_build(data, path, paths, upstreams, sidecar, context),
                     data=data_settings,
                     state_dir=Path(_under(folder, data.get("state_dir"))
                                    or default_state_dir()).absolute(),
                     overlays=tuple(Path(os.path.abspath(o)) for o in overlays),
                     project_root_reason=project_root_reason,
                     warnings=tuple(warnings(problems)))
    return config, problems


@functools.cache
def schema() -> Mapping[str, Any]:
    """The JSON Schema: from the source tree's config/, else where the wheel installs it."""
    for candidate in (
        Path(__file__).resolve().parents[2] / "config" / SCHEMA_NAME,
        Path(sys.prefix) / "share" / "agentvisor" / SCHEMA_NAME,
    ):
        if candidate.is_file():
            return json.loads(candidate.read_text(encoding="utf-8"))
    raise FileNotFoundError(f"{SCHEMA_NAME} is not installed")


def listening_ports(exclude_pids: frozenset[int] = frozenset()) -> dict[int, str]:
    """Port -> who listens on it on this machine. Empty when the OS will not say: the
    check is a courtesy, and a missing courtesy must not fail a valid config."""
    try:
        connections = psutil.net_connections(kind="inet")
    except (psutil.AccessDenied, PermissionError):
        return {}
    holders: dict[int, str] = {}
    for conn in connections:
        if conn.status == psutil.CONN_LISTEN and conn.pid not in exclude_pids:
            holders.setdefault(conn.laddr.port, _process(conn.pid))
    return holders


def _process(pid: int | None) -> str:
    if pid is None:
        return "held by a process we may not see"
    try:
        return f"pid {pid}, {psutil.Process(pid).name()}"
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return f"pid {pid}"


def _forwarding_warnings(source, upstreams: Mapping[str, UpstreamPolicy],
                         data: DataSettings) -> list[Problem]:
    """Valid, but surely not meant: pushes kept and never forwarded, or hubs nobody uses."""
    kept = [n for n, u in upstreams.items() if u.deliver is Deliver.STORE_FORWARD]
    if kept and not data.hubs:
        return [source.problem(("upstreams", kept[0], "deliver"), None,
                               "no hubs: pushes are kept in the spool and never forwarded "
                               "(set hubs:, nearest first)", severity=WARNING)]
    if data.hubs and not kept:
        return [source.problem(("hubs",), None, "no upstream is deliver: store_forward: "
                               "nothing is forwarded to these hubs", severity=WARNING)]
    return []


def _under(folder: Path, value: Any) -> Path | None:
    """A path from the file: relative ones are relative to the file's folder."""
    return folder / Path(value).expanduser() if isinstance(value, str) else None


# --- building the model from schema-valid data ------------------------------------


@dataclass(frozen=True)
class _Paths:
    folder: Path  # the config file's folder
    project_root: Path
    runtime_dir: Path
    logs_dir: Path


@dataclass(frozen=True)
class _Globals:
    """What every agent inherits unless it says otherwise."""

    paths: _Paths
    python: str
    environment: Mapping[str, str]
    limits: Mapping[str, Any]
    probe_timing: Mapping[str, Any]  # in the model's field names
    restart: Mapping[str, Any]  # a restart block


def _build(data: Mapping[str, Any], source: Path, paths: _Paths,
           upstreams: Mapping[str, UpstreamPolicy], sidecar: SidecarSettings,
           context: validate.Context) -> HostConfig:
    settings = data.get("global_settings", {})
    inherited = _Globals(
        paths=paths,
        python=data.get("python") or shutil.which("python3") or sys.executable,
        environment=settings.get("environment", {}),
        limits=_known(settings.get("resource_limits", {}), _LIMIT_FIELDS),
        probe_timing={  # unknown legacy keys were warned about and are left out
            _LEGACY_PROBE_TIMING[k]: v for k, v in settings.get("health_checks", {}).items()
            if k in _LEGACY_PROBE_TIMING
        },
        restart=_restart_block(settings.get("restart")),
    )
    secrets = data.get("secrets", {})
    return HostConfig(
        host=data.get("host") or socket.gethostname(),
        source=source.absolute(),
        project_root=paths.project_root,
        runtime_dir=paths.runtime_dir,
        logs_dir=paths.logs_dir,
        agents=tuple(_agent(e, inherited, context) for e in validate.agent_entries(data)),
        environment=inherited.environment,
        upstreams=upstreams,
        sidecar=sidecar,
        traffic_source={k: data[k] for k in ("upstreams", "resilience", "sidecar") if k in data},
        secrets=SecretsConfig(
            dir=_under(paths.folder, secrets.get("dir")),
            require_memory_fs=secrets.get("require_memory_fs", True),
            names=tuple(secrets.get("names", ())),
            poll_s=secrets.get("poll_s", 1.0),
            sealed_dir=_under(paths.folder, secrets.get("sealed_dir")),
            key_file=_under(paths.folder, secrets.get("key_file")),
        ),
        control_group=data.get("control", {}).get("group"),
        resource_interval_s=data.get("resource_interval_s", DEFAULT_RESOURCE_INTERVAL_S),
    )


def _agent(entry: validate.Entry, inherited: _Globals, context: validate.Context) -> AgentSpec:
    fields, root = _evaluated(entry, context), inherited.paths.project_root
    name = entry.name
    assert name is not None, "the schema requires a name in pc2_services"
    args = tuple(fields.get("args", ()))
    own_secrets = fields.get("secrets", {})
    intercept = fields.get("intercept", {})
    if isinstance(intercept, str):  # `intercept: proxy` is short for {mode: proxy}
        intercept = {"mode": intercept}
    env = {**inherited.environment, **fields.get("env_vars", {})}
    if "script_path" in fields:
        script: Path | None = legacy.resolve_script(root, fields["script_path"])
        argv = (fields.get("python", inherited.python), str(script), *args)
    else:
        script, argv = None, (*fields["command"], *args)
    return AgentSpec(
        name=name,
        group=entry.group,
        location=yamlsrc.location(entry.path),
        argv=argv,
        cwd=root / fields["cwd"] if "cwd" in fields else root,
        script_path=script,
        port=fields.get("port"),
        health_check_port=fields.get("health_check_port"),
        port_expression=_expression(entry, context, "port"),
        health_check_port_expression=_expression(entry, context, "health_check_port"),
        host=fields.get("host", "0.0.0.0"),
        required=fields.get("required", False),
        dependencies=tuple(fields.get("dependencies", ())),
        config=fields.get("config", {}),
        env=env,
        secret_names=validate.secret_names(env, context.store),
        health=_health(fields, inherited.probe_timing),
        restart=_restart(inherited.restart, _own_restart(fields)),
        limits=ResourceLimits(**{**inherited.limits,
                                 **_known(fields.get("resource_limits", {}), _LIMIT_FIELDS)}),
        log_path=inherited.paths.logs_dir / f"{name}.log",
        intercept=Intercept(intercept.get("mode", Intercept.ENDPOINT.value)),
        no_proxy=tuple(intercept.get("no_proxy", ())),
        user=str(fields["user"]) if "user" in fields else None,
        secret_files=tuple(own_secrets.get("files", ())),
        secret_files_env=own_secrets.get("files_env"),
        on_secret_change=own_secrets.get("on_change", "restart"),
    )


def _health(fields: Mapping[str, Any], timing: Mapping[str, Any]) -> HealthCheck:
    """The agent's probe: the legacy default (tcp on health_check_port, else port, else
    none) with whatever the native `health` block says laid over it."""
    block = fields.get("health", {})
    main, health_port = fields.get("port"), fields.get("health_check_port")
    port = block.get("port") or health_port or main
    kind = ProbeKind(block.get("type", "tcp" if port else "none"))
    # A probe derived from the legacy fields alone falls back to the main port when
    # nothing listens on the health port: the old launcher's readiness test, and the only
    # one that fits the agents that name a health_check_port without serving one.
    derived = "port" not in block and "type" not in block
    fallback = main if derived and health_port and main and main != health_port else None
    agent_host = fields.get("host", "")
    command = block.get("command", ())
    overrides = {k: block[k] for k in _PROBE_FIELDS if k in block}
    return HealthCheck(
        kind=kind,
        host=block.get("host") or (_LOOPBACK if agent_host in _WILDCARD_HOSTS else agent_host),
        port=port,
        fallback_port=fallback,
        command=tuple(shlex.split(command) if isinstance(command, str) else command),
        **{**timing, **overrides},
    )


def _evaluated(entry: validate.Entry, context: validate.Context) -> Mapping[str, Any]:
    """The agent's fields with every port as its evaluated int (None where it could not
    be evaluated: reported), and a legacy `startup_timeout` as the health block's
    start_timeout_s (a native one wins): the builder below reads only native ints."""
    fields = dict(entry.fields)
    health = dict(fields.get("health", {}))
    for key in validate.PORT_PATHS:
        *parents, leaf = key
        into = health if parents else fields
        if leaf in into:
            port = context.ports.get(entry.path + key)
            into[leaf] = port.value if port is not None else None
    if "startup_timeout" in fields:
        health.setdefault("start_timeout_s", fields["startup_timeout"])
    if health or "health" in fields:
        fields["health"] = health
    return fields


def _expression(entry: validate.Entry, context: validate.Context, key: str) -> str | None:
    port = context.ports.get(entry.path + (key,))
    return port.expression if port is not None else None


def _known(block: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """The keys of a legacy block the model has (the others were warned about)."""
    return {k: v for k, v in block.items() if k in names}


def _own_restart(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The agent's native restart block over its legacy restart_policy, key by key."""
    legacy_block = validate.legacy_restart_block(fields["restart_policy"]) if "restart_policy" in fields else {}
    own = _restart_block(fields.get("restart"))
    return {**legacy_block, **own,
            "backoff": {**legacy_block.get("backoff", {}), **own.get("backoff", {})}}


def _restart_block(value: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """`restart: on-failure` is short for `restart: {policy: on-failure}`."""
    if value is None:
        return {}
    return {"policy": value} if isinstance(value, str) else dict(value)


def _restart(inherited: Mapping[str, Any], own: Mapping[str, Any]) -> RestartPolicy:
    """The agent's restart block merged over the global one, backoff key by key."""
    block = {**inherited, **own, "backoff": {**inherited.get("backoff", {}), **own.get("backoff", {})}}
    mode = RestartMode(block.pop("policy", RestartMode.ALWAYS.value))
    return RestartPolicy(mode=mode, backoff=Backoff(**block.pop("backoff")), **block)


