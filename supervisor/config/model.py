"""The validated shape of a host's configuration.

Everything the supervisor acts on is one of these frozen dataclasses, built once by
`supervisor.config.load()` from either legacy format (MainPC's nested `agent_groups`,
PC2's flat `pc2_services`) plus the native keys. Nothing downstream ever looks at raw
YAML again, so a value is converted and checked in exactly one place.

Every default is a named constant with the reason for its number.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from sidecar.config import DataSettings, SidecarSettings, UpstreamPolicy

# --- defaults, each with why -------------------------------------------------------

# The fleet's own global_settings.health_checks seed: probe every 30 s, 10 s timeout,
# 3 misses in a row before we call an agent unhealthy.
DEFAULT_PROBE_INTERVAL_S = 30.0
DEFAULT_PROBE_TIMEOUT_S = 10.0
DEFAULT_PROBE_RETRIES = 3
# While an agent is STARTING we probe much faster than the steady-state interval, so
# dependants start within a fraction of a second of their dependency becoming ready.
DEFAULT_STARTUP_PROBE_INTERVAL_S = 0.1
# A legacy agent that has not become ready after this long is treated as a failed start
# (killed and retried with backoff) instead of holding its dependants forever.
DEFAULT_START_TIMEOUT_S = 60.0
# supervisord's `startsecs`: a run shorter than this is a failed start; a run longer than
# this resets the backoff. An agent with no probe becomes RUNNING after this long.
DEFAULT_START_S = 1.0
# Restart backoff: first restart immediate, then 0.5 s doubling to a 30 s cap, +-20 %
# jitter so that 40 agents that failed together do not restart in lockstep.
DEFAULT_BACKOFF_INITIAL_S = 0.5
DEFAULT_BACKOFF_FACTOR = 2.0
DEFAULT_BACKOFF_MAX_S = 30.0
DEFAULT_BACKOFF_JITTER = 0.2
# supervisord's `startretries`: this many failures within the window make the agent
# FATAL. Counted over wall-clock exits, so it holds even with start_s = 0.
DEFAULT_MAX_FAILURES = 5
DEFAULT_FAILURE_WINDOW_S = 60.0
# Grace between SIGTERM and SIGKILL: long enough for a Python agent to flush and close.
DEFAULT_STOP_GRACE_S = 10.0
# Resource sampling cadence: cheap (two /proc reads per agent) and fast enough to catch
# a leak long before the OOM killer does.
DEFAULT_RESOURCE_INTERVAL_S = 5.0


class RestartMode(enum.Enum):
    ALWAYS = "always"
    ON_FAILURE = "on-failure"
    NEVER = "never"


class Intercept(enum.Enum):
    """How an agent's outbound traffic reaches the sidecar (see ARCHITECTURE.md)."""

    ENDPOINT = "endpoint"  # only ${upstream:NAME} values point at the sidecar
    PROXY = "proxy"  # HTTP_PROXY/HTTPS_PROXY point at the sidecar's forward proxy
    TRANSPARENT = "transparent"  # nftables redirects the agent's uid's TCP to the sidecar


class ProbeKind(enum.Enum):
    TCP = "tcp"
    HTTP = "http"
    EXEC = "exec"
    NONE = "none"  # no probe: ready once the process has lived start_s


@dataclass(frozen=True)
class HealthCheck:
    kind: ProbeKind
    host: str = "127.0.0.1"
    port: int | None = None
    # tcp only: the agent's main port, tried when nothing listens on `port` (connection
    # refused). Set only for a probe derived from the legacy fields: the old launcher
    # judged readiness by a connect to the main port, and about 29 of the fleet's agents
    # name a health_check_port without serving one.
    fallback_port: int | None = None
    path: str = "/health"  # http only
    status: int = 200  # http only: the status that means healthy
    command: tuple[str, ...] = ()  # exec only: exit 0 means healthy
    interval_s: float = DEFAULT_PROBE_INTERVAL_S
    timeout_s: float = DEFAULT_PROBE_TIMEOUT_S
    retries: int = DEFAULT_PROBE_RETRIES
    start_timeout_s: float = DEFAULT_START_TIMEOUT_S
    startup_interval_s: float = DEFAULT_STARTUP_PROBE_INTERVAL_S


@dataclass(frozen=True)
class Backoff:
    initial_s: float = DEFAULT_BACKOFF_INITIAL_S
    factor: float = DEFAULT_BACKOFF_FACTOR
    max_s: float = DEFAULT_BACKOFF_MAX_S
    jitter: float = DEFAULT_BACKOFF_JITTER  # fraction, 0.2 means +-20 %


@dataclass(frozen=True)
class RestartPolicy:
    mode: RestartMode = RestartMode.ALWAYS
    start_s: float = DEFAULT_START_S
    backoff: Backoff = field(default_factory=Backoff)
    max_failures: int = DEFAULT_MAX_FAILURES
    window_s: float = DEFAULT_FAILURE_WINDOW_S
    # None: FATAL stays FATAL until an operator says `start`. A number: try again after
    # that many seconds in FATAL (supervisord users asked for this for years).
    fatal_retry_s: float | None = None
    stop_grace_s: float = DEFAULT_STOP_GRACE_S


@dataclass(frozen=True)
class ResourceLimits:
    memory_mb: int | None = None  # enforced: restart with reason when exceeded
    cpu_percent: float | None = None  # reported and warned
    max_threads: int | None = None  # reported and warned


@dataclass(frozen=True)
class SecretsConfig:
    dir: Path | None = None  # used when $CREDENTIALS_DIRECTORY is not set
    require_memory_fs: bool = True
    names: tuple[str, ...] = ()  # declared secret names; a file of that name holds each
    # Secret files are stat()ed this often to notice rotation: one syscall per secret.
    poll_s: float = 1.0
    sealed_dir: Path | None = None  # NAME.sealed files, unsealed into dir at start
    key_file: Path | None = None  # the host key that unseals them


@dataclass(frozen=True)
class AgentSpec:
    name: str
    group: str | None  # MainPC's agent group, None for flat lists
    location: str  # where it was declared, e.g. "agent_groups.core_services.ServiceRegistry"
    argv: tuple[str, ...]  # resolved command line (interpreter + absolute script + args)
    cwd: Path
    script_path: Path | None  # absolute, None for a native `command:` agent
    # Evaluated once, at load (see config/ports.py): everything uses these ints. The
    # expressions as written (`"${PORT_OFFSET}+7200"`), None for a plain number, are kept
    # for status and messages.
    port: int | None = None
    health_check_port: int | None = None
    port_expression: str | None = None
    health_check_port_expression: str | None = None
    host: str = "0.0.0.0"
    required: bool = False
    dependencies: tuple[str, ...] = ()
    config: Mapping[str, Any] = field(default_factory=dict)
    # env_vars after global_settings.environment is merged under them, values still
    # templates: ${NAME} placeholders are filled at spawn, never stored expanded.
    env: Mapping[str, str] = field(default_factory=dict)
    # The ${NAME} of env that are secrets (decided once, at load: a name in the secret
    # store); every other ${NAME} is the supervisor's environment. Spawn, rotation and
    # validation all read this, so a ${PYTHONPATH} is never looked for as a secret.
    secret_names: tuple[str, ...] = ()
    health: HealthCheck = field(default_factory=lambda: HealthCheck(ProbeKind.NONE))
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    limits: ResourceLimits = field(default_factory=ResourceLimits)
    log_path: Path = Path("/dev/null")  # stdout+stderr, appended
    intercept: Intercept = Intercept.ENDPOINT
    no_proxy: tuple[str, ...] = ()  # with PROXY: destinations that bypass the sidecar
    user: str | None = None  # run as this user (name or uid); TRANSPARENT needs one
    secret_files: tuple[str, ...] = ()  # secrets it reads as files (beyond ${NAME})
    secret_files_env: str | None = None  # env var naming its folder of secret files
    on_secret_change: str = "restart"  # restart | ignore | signal:NAME
    # Set by the supervisor only (never from YAML): descriptors the child inherits, as
    # the sidecar inherits its listening sockets.
    pass_fds: tuple[int, ...] = ()


@dataclass(frozen=True)
class HostConfig:
    host: str
    source: Path  # the file it came from
    project_root: Path
    runtime_dir: Path
    logs_dir: Path
    agents: tuple[AgentSpec, ...]
    environment: Mapping[str, str] = field(default_factory=dict)
    upstreams: Mapping[str, UpstreamPolicy] = field(default_factory=dict)
    sidecar: SidecarSettings = field(default_factory=SidecarSettings)
    # The data process's (store_forward pushes: hubs, spool) and where it keeps them.
    data: DataSettings = field(default_factory=DataSettings)
    state_dir: Path = Path("/var/lib/agentvisor")
    secrets: SecretsConfig = field(default_factory=SecretsConfig)
    resource_interval_s: float = DEFAULT_RESOURCE_INTERVAL_S
    control_group: str | None = None  # may use the control socket besides root/our user
    # The file's own `upstreams:` and `sidecar:` blocks, as validated: what the sidecar
    # is given to read (it parses them with the same parser).
    traffic_source: Mapping[str, Any] = field(default_factory=dict)
    # The overlay files laid over `source` (absolute, in order; see config/overlay.py): a
    # reload re-reads the same set.
    overlays: tuple[Path, ...] = ()
    # Why project_root is what it is, for `validate` and the log: set in a file, inferred
    # from the legacy layout (<root>/main_pc_code/config/), or the file's folder.
    project_root_reason: str = ""
    # What validation said without failing the file (severity WARNING), in file order:
    # `run` logs each once.
    warnings: tuple[Problem, ...] = ()

    @property
    def sidecar_enabled(self) -> bool:
        if self.sidecar.enabled is not None:
            return self.sidecar.enabled
        return (bool(self.upstreams) or self.data.hub is not None
                or any(a.intercept is not Intercept.ENDPOINT for a in self.agents))

    def agent(self, name: str) -> AgentSpec:
        for a in self.agents:
            if a.name == name:
                return a
        raise KeyError(name)


# A Problem's severity. An error stops `run` and `reload` and fails `validate`; a warning
# is said (validate prints it, run logs it once) and never changes what happens: the file
# works as it is, e.g. a legacy key agentvisor has no use for.
ERROR = "error"
WARNING = "warning"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config, or (severity WARNING) worth saying about it, with
    where it is."""

    file: str
    line: int | None  # 1-based, None when not known
    location: str  # e.g. "pc2_services[3].port"
    agent: str | None
    message: str
    severity: str = ERROR

    @property
    def is_error(self) -> bool:
        return self.severity != WARNING

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        who = f" ({self.agent})" if self.agent else ""
        loc = f" {self.location}{who}:" if self.location else (f"{who}:" if who else "")
        prefix = "warning: " if self.severity == WARNING else ""
        return f"{prefix}{where}:{loc} {self.message}"


def errors(problems: Iterable[Problem]) -> list[Problem]:
    """The problems that stop a config from being used."""
    return [p for p in problems if p.is_error]


def warnings(problems: Iterable[Problem]) -> list[Problem]:
    """The problems that are only said."""
    return [p for p in problems if not p.is_error]


class ConfigError(Exception):
    """Every error found in one load, raised together (warnings are not errors and are
    not in it). Only the CLI turns it into an exit code."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))
