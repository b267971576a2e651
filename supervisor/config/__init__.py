"""A host's configuration: `load()` it (or `validate_file()` it) into a HostConfig."""

from .load import ConfigUnreadable, load, validate_file
from .model import (
    AgentSpec,
    Backoff,
    ConfigError,
    HealthCheck,
    HostConfig,
    Problem,
    ProbeKind,
    ResourceLimits,
    RestartMode,
    RestartPolicy,
    SecretsConfig,
    errors,
    warnings,
)

__all__ = [
    "AgentSpec",
    "Backoff",
    "ConfigError",
    "ConfigUnreadable",
    "HealthCheck",
    "HostConfig",
    "Problem",
    "ProbeKind",
    "ResourceLimits",
    "RestartMode",
    "RestartPolicy",
    "SecretsConfig",
    "errors",
    "load",
    "validate_file",
    "warnings",
]
