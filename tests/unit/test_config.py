"""Loading host configs: both legacy formats, the native keys, and every problem at once."""

import json
import os
import re
import socket
from pathlib import Path
from textwrap import dedent

import psutil
import pytest
import yaml
from jsonschema import Draft202012Validator

from supervisor.config import (
    ConfigError,
    ConfigUnreadable,
    ProbeKind,
    RestartMode,
    load,
    validate_file,
)
from supervisor.config.model import DEFAULT_BACKOFF_INITIAL_S, DEFAULT_PROBE_INTERVAL_S

REPO = Path(__file__).resolve().parents[2]
FLEET_PC2_PORTS = {
    "MemoryOrchestratorService": 7140, "ResourceManager": 7113, "AdvancedRouter": 7129,
    "TaskScheduler": 7115, "AuthenticationAgent": 7116, "UnifiedUtilsAgent": 7118,
    "AgentTrustScorer": 7122, "UnifiedMemoryReasoningAgent": 7105, "ContextManager": 7111,
    "ExperienceTracker": 7112, "CacheManager": 7102, "ProactiveContextMonitor": 7119,
    "VisionProcessingAgent": 7150, "TieredResponder": 7100, "AsyncProcessor": 7101,
    "FileSystemAssistantAgent": 7123, "RemoteConnectorAgent": 7124, "UnifiedWebAgent": 7126,
    "DreamWorldAgent": 7104, "DreamingModeAgent": 7127, "TutorAgent": 7108,
    "TutoringAgent": 7131, "TutoringServiceAgent": 7130, "MemoryDecayManager": None,
    "EnhancedContextualMemory": None,
}


def write(folder: Path, text: str, scripts: tuple[str, ...] = ()) -> Path:
    """A config file in `folder`; each of `scripts` exists under it (the default root)."""
    for script in scripts:
        (folder / script).parent.mkdir(parents=True, exist_ok=True)
        (folder / script).touch()
    path = folder / "host.yaml"
    path.write_text(dedent(text))
    return path


def problems(path: Path, **kw) -> list[str]:
    """Errors and warnings (a warning's starts with "warning: "), in file order. The
    supervisor's environment is empty unless a test gives one: ${NAME} and port
    expressions must not depend on the shell the tests run in."""
    kw.setdefault("check_machine", False)
    kw.setdefault("environ", {})
    return [str(p) for p in validate_file(path, **kw)[1]]


def one_problem(path: Path, **kw) -> str:
    (problem,) = problems(path, **kw)
    return problem


MAINPC = """\
global_settings:
  environment: {LOG_LEVEL: INFO, NATS_URL: "nats://${upstream:NATS}"}
  resource_limits: {cpu_percent: 80, memory_mb: 2048, max_threads: 4}
  health_checks: {interval_seconds: 15, timeout_seconds: 5, retries: 2}
upstreams:
  NATS: {address: "127.0.0.1:4222"}
secrets: {names: [NATS_PASSWORD]}
agent_groups:
  core_services:
    ServiceRegistry:
      script_path: agents/service_registry_agent.py
      port: 7200
      health_check_port: 8200
      required: true
      dependencies: []
      config: {db: registry.db}
      host: 0.0.0.0
      env_vars: {NATS_PASSWORD: "${NATS_PASSWORD}", LOG_LEVEL: DEBUG}
      resource_limits: {memory_mb: 4096}
"""

PC2 = """\
pc2_services:
  - name: MemoryOrchestratorService
    script_path: pc2_code/agents/memory_orchestrator_service.py
    port: 7140
    health_check_port: 8140
    required: true
    dependencies: []
  - name: ResourceManager
    script_path: pc2_code/agents/resource_manager.py
    port: 7113
    dependencies: [MemoryOrchestratorService]
"""
PC2_SCRIPTS = ("pc2_code/agents/memory_orchestrator_service.py", "pc2_code/agents/resource_manager.py")


# --- building the model -------------------------------------------------------------


def test_mainpc_agent_from_the_nested_format(tmp_path):
    config = load(write(tmp_path, MAINPC, ("agents/service_registry_agent.py",)), check_machine=False, logs_dir=tmp_path / "logs")
    agent = config.agent("ServiceRegistry")
    script = tmp_path / "agents/service_registry_agent.py"
    assert (agent.group, agent.location) == ("core_services", "agent_groups.core_services.ServiceRegistry")
    assert agent.script_path == script and agent.argv[1:] == (str(script),)
    assert agent.cwd == config.project_root == tmp_path
    assert (agent.port, agent.health_check_port, agent.required, agent.config) == (7200, 8200, True, {"db": "registry.db"})
    # env_vars over global environment, placeholders kept as templates until spawn
    assert agent.env == {"LOG_LEVEL": "DEBUG", "NATS_URL": "nats://${upstream:NATS}", "NATS_PASSWORD": "${NATS_PASSWORD}"}
    # legacy default probe: tcp on the health port, on loopback since it binds 0.0.0.0
    h = agent.health
    assert (h.kind, h.host, h.port, h.interval_s, h.timeout_s, h.retries) == (ProbeKind.TCP, "127.0.0.1", 8200, 15, 5, 2)
    assert (agent.limits.memory_mb, agent.limits.cpu_percent, agent.limits.max_threads) == (4096, 80, 4)
    assert agent.log_path == tmp_path / "logs" / "ServiceRegistry.log"


def test_pc2_agents_from_the_flat_list_in_file_order(tmp_path):
    config = load(write(tmp_path, PC2, PC2_SCRIPTS), check_machine=False)
    assert [(a.name, a.group, a.location) for a in config.agents] == [
        ("MemoryOrchestratorService", None, "pc2_services[0]"),
        ("ResourceManager", None, "pc2_services[1]"),
    ]
    manager = config.agent("ResourceManager")
    assert manager.dependencies == ("MemoryOrchestratorService",)
    assert (manager.health.kind, manager.health.port) == (ProbeKind.TCP, 7113)
    assert manager.health.interval_s == DEFAULT_PROBE_INTERVAL_S


def test_both_formats_in_one_file(tmp_path):
    text = MAINPC + PC2.replace("dependencies: [MemoryOrchestratorService]", "dependencies: [ServiceRegistry]")
    config = load(write(tmp_path, text, PC2_SCRIPTS + ("agents/service_registry_agent.py",)), check_machine=False)
    assert [a.name for a in config.agents] == ["ServiceRegistry", "MemoryOrchestratorService", "ResourceManager"]


def test_native_agent_keys(tmp_path):
    path = write(
        tmp_path,
        """\
        project_root: app
        python: /opt/py/bin/python3
        global_settings:
          restart: {policy: on-failure, backoff: {max_s: 60}, fatal_retry_s: 120}
        pc2_services:
          - name: Worker
            script_path: worker.py
            args: [--fast]
            python: /usr/bin/python3.11
            cwd: data
            restart: {backoff: {factor: 3}, max_failures: 9}
          - name: Native
            command: [/usr/bin/env, nats-server]
            args: [-p, "4223"]
            host: 10.0.0.2
            port: 4223
            health: {type: exec, command: "nats-server --version", interval_s: 2, start_timeout_s: 5}
            restart: never
        """,
        ("app/worker.py",),
    )
    config = load(path, check_machine=False)
    worker, native = config.agents
    assert config.project_root == tmp_path / "app"
    assert worker.argv == ("/usr/bin/python3.11", str(tmp_path / "app/worker.py"), "--fast")
    assert worker.cwd == tmp_path / "app/data"
    assert worker.restart.mode is RestartMode.ON_FAILURE
    assert (worker.restart.backoff.factor, worker.restart.backoff.max_s) == (3, 60)
    assert worker.restart.backoff.initial_s == DEFAULT_BACKOFF_INITIAL_S
    assert (worker.restart.max_failures, worker.restart.fatal_retry_s) == (9, 120)
    assert worker.health.kind is ProbeKind.NONE
    assert native.argv == ("/usr/bin/env", "nats-server", "-p", "4223")
    assert native.script_path is None
    assert native.restart.mode is RestartMode.NEVER
    h = native.health
    assert (h.kind, h.command, h.host, h.interval_s, h.start_timeout_s) == (
        ProbeKind.EXEC, ("nats-server", "--version"), "10.0.0.2", 2, 5)


def test_http_probe_overlays_the_legacy_default(tmp_path):
    path = write(tmp_path, """\
        pc2_services:
          - {name: Hub, command: [hub], port: 9100, health_check_port: 10100, health: {type: http, path: /healthz, status: 204}}
          - {name: Quiet, command: [q], health: {interval_s: 3}}
        """)
    hub, quiet = load(path, check_machine=False).agents
    assert (hub.health.kind, hub.health.port, hub.health.path, hub.health.status) == (ProbeKind.HTTP, 10100, "/healthz", 204)
    assert (quiet.health.kind, quiet.health.interval_s) == (ProbeKind.NONE, 3)


def test_host_level_native_keys(tmp_path):
    path = write(tmp_path, """\
        host: pc2
        runtime_dir: run
        logs: {dir: logs, max_bytes: 100}
        resource_interval_s: 2.5
        resilience: {breaker: {failures: 4}}
        secrets: {dir: secrets, require_memory_fs: false, names: [NATS_PASSWORD]}
        upstreams:
          ObservabilityHub: {addresses: ["127.0.0.1:9100", "mainpc:9000"], protocol: http, request_timeout_s: 10}
          NATS: {address: "[::1]:4223"}
        """)
    config = load(path, check_machine=False)
    assert (config.host, config.runtime_dir, config.logs_dir) == ("pc2", tmp_path / "run", tmp_path / "logs")
    assert config.resource_interval_s == 2.5
    assert (config.secrets.dir, config.secrets.require_memory_fs, config.secrets.names) == (
        tmp_path / "secrets", False, ("NATS_PASSWORD",))
    hub, nats = config.upstreams["ObservabilityHub"], config.upstreams["NATS"]
    assert (hub.endpoints, hub.protocol.value, hub.request_timeout_s) == (
        (("127.0.0.1", 9100), ("mainpc", 9000)), "http", 10.0)
    assert (nats.endpoints, nats.protocol.value) == ((("::1", 4223),), "tcp")
    assert hub.breaker.failures == nats.breaker.failures == 4  # resilience: the defaults
    assert config.traffic_source["resilience"] == {"breaker": {"failures": 4}}  # the sidecar's too


def test_upstream_policy_problems_carry_their_line(tmp_path):
    path = write(tmp_path, """        upstreams:
          Hub:
            address: "127.0.0.1:9100"
            breaker: {failures: 0}
        """)
    problems = validate_file(path, check_machine=False)[1]
    assert [str(p) for p in problems] == [
        f"{path}:4: upstreams.Hub.breaker.failures: 0 is less than the minimum of 1"]


def test_defaults_for_host_paths(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    config = load(write(tmp_path, "pc2_services: []\n"), check_machine=False)
    assert (config.host, config.project_root) == (socket.gethostname(), tmp_path)
    assert config.runtime_dir == tmp_path / "xdg" / "agentvisor"
    assert config.logs_dir == Path.home() / ".local/state/agentvisor/logs"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert load(tmp_path / "host.yaml", check_machine=False).runtime_dir == Path(f"/tmp/agentvisor-{os.getuid()}")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    config = load(tmp_path / "host.yaml", check_machine=False)
    assert (config.runtime_dir, config.logs_dir) == (Path("/run/agentvisor"), Path("/var/log/agentvisor"))
    overridden = load(tmp_path / "host.yaml", check_machine=False, runtime_dir=tmp_path / "r", logs_dir=tmp_path / "l")
    assert (overridden.runtime_dir, overridden.logs_dir) == (tmp_path / "r", tmp_path / "l")


# --- unreadable and malformed -------------------------------------------------------


def test_missing_file_is_unreadable(tmp_path):
    with pytest.raises(ConfigUnreadable, match="nope.yaml"):
        load(tmp_path / "nope.yaml")
    with pytest.raises(ConfigUnreadable, match=str(tmp_path)):
        validate_file(tmp_path)


def test_malformed_yaml_is_a_problem_with_line_and_column(tmp_path):
    path = write(tmp_path, "pc2_services:\n  - name: A\n    port: [7100\n")
    with pytest.raises(ConfigError) as e:
        load(path)
    (problem,) = e.value.problems
    assert problem.line == 4 and "invalid YAML at column 1" in problem.message
    assert validate_file(path)[0] is None


def test_empty_file(tmp_path):
    assert one_problem(write(tmp_path, "")) == f"{tmp_path / 'host.yaml'}: the file is empty"


# --- 1. schema ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "agent, expected",
    [
        ("port: 70000", "pc2_services[0].port (A): 70000 is greater than the maximum of 65535"),
        ("port: 80", "pc2_services[0].port (A): 80 is less than the minimum of 1024"),
        ("port: '7100abc'", 'pc2_services[0].port (A): "7100abc" is not a port: write a number (7200), "${VAR}", "${VAR}+N" or "N+${VAR}"'),
        ("port: 7100.5", "pc2_services[0].port (A): 7100.5 is not of type 'integer', 'string'"),
        ("prot: 7100", "pc2_services[0].prot (A): unknown key 'prot'; did you mean 'port'?"),
        ("env_vars: {DEBUG: 1}", "pc2_services[0].env_vars.DEBUG (A): 1 is not of type 'string'"),
        ("dependencies: B", "pc2_services[0].dependencies (A): 'B' is not of type 'array'"),
        ("restart: sometimes", "pc2_services[0].restart (A): 'sometimes' is not one of ['always', 'on-failure', 'never']"),
        ("restart: {backoff: {jitter: 2}}", "pc2_services[0].restart.backoff.jitter (A): 2 is greater than the maximum of 1"),
        ("health: {type: exec}", "pc2_services[0].health (A): 'command' is a required property"),
        ("health: {type: http, path: health, port: 8100}", "pc2_services[0].health.path (A): must start with /"),
        ("resource_limits: {memroy_mb: 10}", "pc2_services[0].resource_limits.memroy_mb (A): unknown key 'memroy_mb'; did you mean 'memory_mb'?"),
        ("dependancies: []", "pc2_services[0].dependancies (A): unknown key 'dependancies'; did you mean 'dependencies'?"),
        ("config: [1]", "pc2_services[0].config (A): expected object, got array"),
    ],
)
def test_schema_problem_names_location_and_agent(tmp_path, agent, expected):
    path = write(tmp_path, f"pc2_services:\n  - name: A\n    script_path: a.py\n    {agent}\n", ("a.py",))
    assert one_problem(path) == f"{path}:4: {expected}"


def test_exactly_one_of_script_path_or_command(tmp_path):
    path = write(tmp_path, """\
        agent_groups:
          core:
            Both: {script_path: a.py, command: [a.out]}
            Neither: {port: 7100}
        """, ("a.py",))
    assert problems(path) == [
        f"{path}:3: agent_groups.core.Both (Both): needs exactly one of script_path or command",
        f"{path}:4: agent_groups.core.Neither (Neither): needs exactly one of script_path or command",
    ]


def test_schema_problems_in_native_and_legacy_top_level_keys(tmp_path):
    path = write(tmp_path, """\
        projet_root: /srv/app
        global_settings:
          health_checks: {interval_seconds: 0}
        upstreams:
          Hub: {address: nohost}
          Other: {protocol: http}
        secrets: {names: [NATS-PASSWORD]}
        agent_groups:
          core:
            ServiceRegistry: {name: ServiceRegistry, script_path: a.py}
        pc2_services:
          - script_path: a.py
        """, ("a.py",))
    assert problems(path) == [
        f"{path}:1: projet_root: unknown key 'projet_root'; did you mean 'project_root'?",
        f"{path}:3: global_settings.health_checks.interval_seconds: 0 is less than or equal to the minimum of 0",
        f"{path}:5: upstreams.Hub.address: must be host:port",
        f"{path}:6: upstreams.Other: needs exactly one of address or addresses",
        f"{path}:7: secrets.names[0]: a secret name is letters, digits and _, not starting with a digit",
        f"{path}:10: agent_groups.core.ServiceRegistry.name (ServiceRegistry): in agent_groups the key is the agent's name; remove name",
        f"{path}:12: pc2_services[0]: 'name' is a required property",
    ]


def test_schema_problems_give_no_config(tmp_path):
    config, found = validate_file(write(tmp_path, "pc2_services: [{name: A, command: [x], port: 1}]\n"))
    assert config is None and len(found) == 1


# --- 2. script paths ----------------------------------------------------------------


def test_missing_script_names_the_path_it_looked_for(tmp_path):
    path = write(tmp_path, PC2, PC2_SCRIPTS[:1])
    assert one_problem(path) == (
        f"{path}:9: pc2_services[1].script_path (ResourceManager): no such file: "
        f"{tmp_path}/pc2_code/agents/resource_manager.py (script_path is relative to project_root {tmp_path}; "
        f"also tried {tmp_path}/main_pc_code/pc2_code/agents/resource_manager.py)"
    )


def test_missing_project_root_is_one_problem(tmp_path):
    path = write(tmp_path, "project_root: ../elsewhere\n" + PC2)
    assert one_problem(path) == f"{path}:1: project_root: {tmp_path}/../elsewhere is not a folder"


def test_semantic_problems_still_give_a_config(tmp_path):
    config, found = validate_file(write(tmp_path, PC2))
    assert config is not None and config.agent("ResourceManager").port == 7113
    assert len(found) == 2


# --- 3, 4. ports --------------------------------------------------------------------


def test_duplicate_port_reported_on_the_later_use(tmp_path):
    path = write(tmp_path, """\
        pc2_services:
          - {name: MemoryOrchestratorService, command: [m], port: 7140, health_check_port: 8140}
          - {name: ResourceManager, command: [r], port: 7113, health_check_port: 8113}
          - {name: AdvancedRouter, command: [a], port: 7129, health_check_port: 8140}
          - {name: X, command: [x], port: 7113}
        """)
    assert problems(path) == [
        f"{path}:4: pc2_services[2].health_check_port (AdvancedRouter): 8140 is also used by "
        "MemoryOrchestratorService (pc2_services[0].health_check_port)",
        f"{path}:5: pc2_services[3].port (X): 7113 is also used by ResourceManager (pc2_services[1].port)",
    ]


def test_duplicate_ports_across_formats(tmp_path):
    path = write(tmp_path, """\
        agent_groups:
          core: {ServiceRegistry: {command: [s], port: 7200}}
        pc2_services:
          - {name: B, command: [b], health_check_port: 7200}
        """)
    assert one_problem(path) == (
        f"{path}:4: pc2_services[0].health_check_port (B): 7200 is also used by "
        "ServiceRegistry (agent_groups.core.ServiceRegistry.port)"
    )


@pytest.fixture
def listener():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock.getsockname()[1]
    sock.close()


def test_port_already_listening_is_a_warning_naming_the_process(tmp_path, listener):
    # Only that agent will fail to start (and the holder may be gone by then): the host's
    # config stays usable.
    path = write(tmp_path, f"pc2_services:\n  - {{name: A, command: [a], port: {listener}}}\n")
    me = psutil.Process().name()
    assert one_problem(path, check_machine=True) == (
        f"warning: {path}:2: pc2_services[0].port (A): {listener} is already listening on this "
        f"machine (pid {os.getpid()}, {me}): this agent will fail to start until it is freed"
    )
    config = load(path, check_machine=True)
    assert [w.severity for w in config.warnings] == ["warning"]
    assert problems(path, check_machine=True, exclude_pids=frozenset({os.getpid()})) == []
    assert problems(path, check_machine=False) == []


def test_listening_check_is_skipped_when_the_os_refuses(tmp_path, listener, monkeypatch):
    def refuse(kind):
        raise psutil.AccessDenied()

    monkeypatch.setattr(psutil, "net_connections", refuse)
    path = write(tmp_path, f"pc2_services:\n  - {{name: A, command: [a], port: {listener}}}\n")
    assert problems(path, check_machine=True) == []


# --- 5, 6. dependencies and names ---------------------------------------------------


def test_unknown_dependency(tmp_path):
    path = write(tmp_path, PC2.replace("[MemoryOrchestratorService]", "[MemoryOrchestrator]"), PC2_SCRIPTS)
    assert one_problem(path) == (
        f"{path}:11: pc2_services[1].dependencies[0] (ResourceManager): depends on "
        "'MemoryOrchestrator', which is not an agent of this file; did you mean 'MemoryOrchestratorService'?"
    )


def test_dependency_cycle_reported_once_on_its_first_agent(tmp_path):
    path = write(tmp_path, """\
        agent_groups:
          core:
            RequestCoordinator: {command: [r], dependencies: [ModelManagerAgent]}
            ModelManagerAgent: {command: [m], dependencies: [SystemDigitalTwin]}
            SystemDigitalTwin: {command: [s], dependencies: [RequestCoordinator, SystemDigitalTwin]}
        """)
    assert problems(path) == [
        f"{path}:3: agent_groups.core.RequestCoordinator.dependencies (RequestCoordinator): dependency cycle: "
        "RequestCoordinator -> ModelManagerAgent -> SystemDigitalTwin -> RequestCoordinator",
        f"{path}:5: agent_groups.core.SystemDigitalTwin.dependencies (SystemDigitalTwin): dependency cycle: "
        "SystemDigitalTwin -> SystemDigitalTwin",
    ]


def test_duplicate_agent_names_anywhere(tmp_path):
    path = write(tmp_path, """\
        agent_groups:
          core:
            ServiceRegistry: {command: [a]}
            ServiceRegistry: {command: [b]}
          utility:
            ServiceRegistry: {command: [c]}
        pc2_services:
          - {name: ServiceRegistry, command: [d]}
        """)
    assert problems(path) == [
        f"{path}:4: agent_groups.core.ServiceRegistry: duplicate key 'ServiceRegistry' (first at line 3); "
        "YAML would silently keep only the last one",
        f"{path}:6: agent_groups.utility.ServiceRegistry (ServiceRegistry): agent name 'ServiceRegistry' "
        "is already used at agent_groups.core.ServiceRegistry (line 4)",
        f"{path}:8: pc2_services[0] (ServiceRegistry): agent name 'ServiceRegistry' "
        "is already used at agent_groups.core.ServiceRegistry (line 4)",
    ]


# --- 7. placeholders ----------------------------------------------------------------


def test_placeholders_must_be_declared(tmp_path):
    path = write(tmp_path, """\
        secrets: {names: [NATS_PASSWORD]}
        upstreams: {ObservabilityHub: {address: "127.0.0.1:9000"}}
        global_settings:
          environment: {HUB: "http://${upstream:ObservabilityHub}", PRICE: "$${NOT_A_SECRET}"}
        pc2_services:
          - name: A
            command: [a]
            env_vars:
              NATS_PASSWORD: "${NATS_PASWORD}"
              OBS_HUB_URL: "http://${upstream:EdgeHub}/push"
              ODD: "${vault:NATS_PASSWORD}"
        """)
    assert problems(path) == [
        f"{path}:9: pc2_services[0].env_vars.NATS_PASSWORD (A): ${{NATS_PASWORD}}: 'NATS_PASWORD' "
        "is neither in the secret store (looked in secrets.names (NATS_PASSWORD)) nor set in the "
        "supervisor's environment; put it in the secret store: `agentvisor secrets seal "
        "NATS_PASWORD` into secrets.sealed_dir, a file NATS_PASWORD in secrets.dir, or systemd's "
        "LoadCredential=NATS_PASWORD:FILE, or set it in the supervisor's environment (e.g. "
        "Environment= in its systemd unit)",
        f"{path}:10: pc2_services[0].env_vars.OBS_HUB_URL (A): ${{upstream:EdgeHub}}: 'EdgeHub' "
        "is not in upstreams (ObservabilityHub)",
        f"{path}:11: pc2_services[0].env_vars.ODD (A): ${{vault:NATS_PASSWORD}}: unknown placeholder kind "
        "'vault'; use ${NAME} for a secret or a variable of the supervisor's environment, or "
        "${upstream:NAME}",
    ]


def test_placeholders_in_global_environment(tmp_path):
    path = write(tmp_path, 'global_settings:\n  environment: {NATS_PASSWORD: "${NATS_PASSWORD}"}\n')
    assert one_problem(path).startswith(
        f"{path}:2: global_settings.environment.NATS_PASSWORD: ${{NATS_PASSWORD}}: 'NATS_PASSWORD' "
        "is neither in the secret store (looked in secrets.names (none declared)) nor set in the "
        "supervisor's environment"
    )


# --- 8. probes ----------------------------------------------------------------------


def test_port_probe_without_a_port(tmp_path):
    path = write(tmp_path, """\
        pc2_services:
          - {name: MemoryDecayManager, command: [m], health: {type: http}}
          - {name: Fine, command: [f], health: {type: tcp, port: 7999}}
          - {name: Quiet, command: [q]}
        """)
    assert one_problem(path) == (
        f"{path}:2: pc2_services[0].health (MemoryDecayManager): a http probe needs a port: "
        "set health.port, health_check_port or port"
    )


# --- all at once --------------------------------------------------------------------


def test_every_problem_at_once_in_line_order(tmp_path):
    path = write(tmp_path, """\
        pc2_services:
          - {name: A, script_path: missing.py, port: 7100, dependencies: [B]}
          - {name: B, command: [b], port: 70000, dependencies: [A]}
          - {name: C, command: [c], port: 7100, env_vars: {X: "${X}"}}
        """)
    with pytest.raises(ConfigError) as e:
        load(path, check_machine=False)
    found = [(p.line, p.agent, p.location) for p in e.value.problems]
    assert found == [
        (2, "A", "pc2_services[0].script_path"),
        (2, "A", "pc2_services[0].dependencies"),
        (3, "B", "pc2_services[1].port"),
        (4, "C", "pc2_services[2].port"),
        (4, "C", "pc2_services[2].env_vars.X"),
    ]
    assert str(e.value).count("\n") == 4


# --- the shipped schema and examples ------------------------------------------------


def test_schema_is_valid_and_documents_every_key():
    schema = json.loads((REPO / "config/agentvisor.schema.json").read_text())
    Draft202012Validator.check_schema(schema)
    undocumented = []

    def walk(node, where):
        for key, sub in node.get("properties", {}).items():
            if isinstance(sub, dict):
                if "description" not in sub:
                    undocumented.append(f"{where}.{key}")
                walk(sub, f"{where}.{key}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key], f"{where}.{key}")

    walk(schema, "")
    for name, sub in schema["$defs"].items():
        walk(sub, name)
    assert undocumented == []


def example_on(tmp_path: Path, name: str) -> Path:
    """The shipped example with project_root moved to tmp_path and every script there."""
    text = (REPO / "config" / name).read_text()
    for agent in _agents(yaml.safe_load(text)):
        write(tmp_path, "", (agent["script_path"],))
    text, n = re.subn(r"(?m)^project_root: .*$", f"project_root: {tmp_path}", text)
    assert n == 1
    path = tmp_path / name
    path.write_text(text)
    return path


def _agents(data):
    for group in data.get("agent_groups", {}).values():
        yield from group.values()
    yield from data.get("pc2_services", [])


@pytest.mark.parametrize("name", ["mainpc.yaml", "pc2.yaml"])
def test_example_configs_load_without_problems(tmp_path, name):
    config = load(example_on(tmp_path, name), check_machine=False)
    assert config.secrets.names == ("NATS_PASSWORD",)
    assert "ObservabilityHub" in config.upstreams
    assert all(a.script_path.is_file() for a in config.agents)
    # Metrics through partitions: pushes spooled and forwarded, nearest hub first; each
    # PC runs a hub receiver that shares with the other PC's.
    from sidecar.config import Deliver

    assert config.upstreams["ObservabilityHub"].deliver is Deliver.STORE_FORWARD
    other = {"mainpc.yaml": "pc2", "pc2.yaml": "mainpc"}[name]
    assert config.data.hubs == (("127.0.0.1", 9190), (other, 9190))
    assert config.data.hub.peers == ((other, 9190),)
    assert config.data.hub.deliver_to == config.upstreams["ObservabilityHub"].endpoints[0]


def test_mainpc_example_has_the_known_agents(tmp_path):
    config = load(example_on(tmp_path, "mainpc.yaml"), check_machine=False)
    for name in ("ServiceRegistry", "RequestCoordinator", "ModelManagerAgent", "ObservabilityHub"):
        assert config.agent(name).group is not None
    assert config.agent("ServiceRegistry").script_path == tmp_path / "main_pc_code/agents/service_registry_agent.py"
    assert config.upstreams["ObservabilityHub"].endpoints[0][1] == 9000


def test_pc2_example_has_every_listed_agent_and_port(tmp_path):
    config = load(example_on(tmp_path, "pc2.yaml"), check_machine=False)
    for name, port in FLEET_PC2_PORTS.items():
        agent = config.agent(name)
        assert (agent.port, agent.health_check_port) == (port, port + 1000 if port else None)
    assert config.agent("MemoryDecayManager").health.kind is ProbeKind.NONE
    assert config.upstreams["ObservabilityHub"].endpoints[0][1] == 9100


def test_transparent_needs_a_user_and_sidecar_is_a_reserved_name(tmp_path):
    (tmp_path / "a.py").write_text("")
    path = write(tmp_path, """\
        pc2_services:
          - {name: sidecar, script_path: a.py}
          - {name: Scanner, script_path: a.py, intercept: transparent}
          - {name: Fine, script_path: a.py, intercept: {mode: transparent}, user: nobody}
          - {name: agentvisor, script_path: a.py}
        """)
    problems = [str(p) for p in validate_file(path, check_machine=False)[1]]
    assert problems == [
        f"{path}:2: pc2_services[0] (sidecar): 'sidecar' is reserved for agentvisor's own "
        "use; rename the agent",
        f"{path}:3: pc2_services[1].intercept (Scanner): intercept: transparent needs `user:` "
        "(the agent's own uid is how its traffic is redirected)",
        # the name a host's agent samples are spooled under (sidecar.samples.SENDER)
        f"{path}:5: pc2_services[3] (agentvisor): 'agentvisor' is reserved for agentvisor's "
        "own use; rename the agent",
    ]


def test_relative_directory_overrides_become_absolute(tmp_path, monkeypatch):
    # `agentvisor run --runtime-dir .demo/run`: the sidecar runs with another cwd.
    monkeypatch.chdir(tmp_path)
    config = load(write(tmp_path, "pc2_services: []\n"), check_machine=False,
                  runtime_dir=Path("rel/run"), logs_dir=Path("rel/logs"))
    assert config.runtime_dir == tmp_path / "rel/run"
    assert config.logs_dir == tmp_path / "rel/logs"


# --- L4 upstreams: response timeout, finite numbers, possible addresses, L7-only keys --


def test_response_timeout_defaults_to_10_s_and_0_or_null_turn_it_off(tmp_path):
    path = write(tmp_path, """\
        upstreams:
          Default: {address: "127.0.0.1:7000"}
          Zero: {address: "127.0.0.1:7001", response_timeout_s: 0}
          Disabled: {address: "127.0.0.1:7002", response_timeout_s: null}
          Set: {address: "127.0.0.1:7003", response_timeout_s: 2.5}
        """)
    ups = load(path, check_machine=False).upstreams
    assert {name: up.response_timeout_s for name, up in ups.items()} == {
        "Default": 10.0, "Zero": 0.0, "Disabled": 0.0, "Set": 2.5}


def test_nan_and_infinite_numbers_are_problems(tmp_path):
    """YAML's .nan passes every comparison a range check makes, and .inf is a deadline
    never met: both would reach run time."""
    path = write(tmp_path, """\
        upstreams:
          Hub:
            address: "127.0.0.1:9100"
            connect_timeout_s: .nan
            idle_timeout_s: .inf
            response_timeout_s: .NaN
            breaker: {window_s: .inf}
        sidecar: {drain_s: .nan}
        """)
    found = problems(path)
    for expected in (
            f"{path}:4: upstreams.Hub.connect_timeout_s: nan is not a finite number",
            f"{path}:5: upstreams.Hub.idle_timeout_s: inf is not a finite number",
            f"{path}:6: upstreams.Hub.response_timeout_s: nan is not a finite number",
            f"{path}:7: upstreams.Hub.breaker.window_s: inf is not a finite number",
            f"{path}:8: sidecar.drain_s: nan is not a finite number"):
        assert expected in found


def test_impossible_addresses_are_problems(tmp_path):
    path = write(tmp_path, """\
        upstreams:
          Nul: {address: "hub\\0evil:9000"}
          NoPort: {address: "127.0.0.1:0"}
          Nowhere: {address: "127.0.0.1:9000", listen: "no-such-host.invalid:7000"}
          FreePort: {address: "mainpc:9000", listen: "127.0.0.1:0"}
        sidecar: {metrics_listen: "127.0.0.1:0", proxy_listen: "localhost:0"}
        """)
    found = problems(path)
    for expected in (
            f"{path}:2: upstreams.Nul.address: 'hub\\x00evil:9000' is not host:port: it "
            "contains a NUL byte",
            f"{path}:3: upstreams.NoPort.address: '127.0.0.1:0': port 0 means any free port; "
            "this address needs a fixed one",
            f"{path}:4: upstreams.Nowhere.listen: 'no-such-host.invalid:7000': cannot listen "
            "on 'no-such-host.invalid': not an IP address, and it does not resolve",
            f"{path}:6: sidecar.metrics_listen: '127.0.0.1:0': port 0 means any free port; "
            "this address needs a fixed one"):
        assert any(p.startswith(expected) for p in found), (expected, found)
    # A free port is what a listener gets by default; an endpoint's name resolves later,
    # on the host that runs it.
    assert not [p for p in found if "FreePort" in p or "proxy_listen" in p]


def test_l7_keys_on_a_tcp_upstream_are_warnings_not_errors(tmp_path):
    text = dedent("""\
        upstreams:
          ZmqHub:
            address: "127.0.0.1:5555"
            request_timeout_s: 5
            retry: {attempts: 2}
            response_timeout_s: 5
          WebHub:
            address: "127.0.0.1:8080"
            protocol: http
            request_timeout_s: 5
        """)
    path = write(tmp_path, text)
    assert problems(path) == [
        f"warning: {path}:4: upstreams.ZmqHub.request_timeout_s: ignored: only protocol: http "
        "upstreams use request_timeout_s (this one is tcp)",
        f"warning: {path}:5: upstreams.ZmqHub.retry: ignored: only protocol: http upstreams use "
        "retry (this one is tcp)",
    ]
    assert len(load(path, check_machine=False).warnings) == 2


def test_schema_and_sidecar_parser_know_the_same_upstream_keys():
    from sidecar.config import L4_UPSTREAM_KEYS, L7_ONLY_UPSTREAM_KEYS, UPSTREAM_KEYS

    schema = json.loads((REPO / "config/agentvisor.schema.json").read_text())
    assert set(schema["$defs"]["upstream"]["properties"]) == set(UPSTREAM_KEYS)
    assert not L4_UPSTREAM_KEYS & L7_ONLY_UPSTREAM_KEYS
