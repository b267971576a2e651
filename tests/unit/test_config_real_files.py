"""Files shaped like the users' real startup_config.yaml validate with warnings only, and
real mistakes stay errors: port expressions, ${NAME} from the environment or the secret
store, credentials in the wrong place, legacy keys with and without a native meaning,
--strict."""

from pathlib import Path
from textwrap import dedent

import pytest

from supervisor import secrets
from supervisor.config import ConfigError, RestartMode, errors, load, validate_file, warnings
from supervisor.config.model import DEFAULT_START_TIMEOUT_S


def write(folder: Path, text: str, scripts: tuple[str, ...] = ("a.py", "b.py")) -> Path:
    for script in scripts:
        (folder / script).touch()
    path = folder / "startup_config.yaml"
    path.write_text(dedent(text))
    return path


def check(path: Path, environ=None, **kw):
    """(errors, warnings) as printed; the supervisor's environment is `environ` only."""
    _, found = validate_file(path, check_machine=False, environ=environ or {}, **kw)
    return [str(p) for p in errors(found)], [str(p) for p in warnings(found)]


# --- port expressions ------------------------------------------------------------------


def test_ports_are_evaluated_once_and_everything_uses_the_int(tmp_path):
    path = write(tmp_path, """\
        port_offset: 5
        agent_groups:
          core_services:
            ServiceRegistry:
              script_path: a.py
              port: "${PORT_OFFSET}+7200"
              health_check_port: "8200 + ${PORT_OFFSET}"
            RequestCoordinator:
              script_path: b.py
              port: 7211
              health: {type: http, port: "${PORT_OFFSET}+9000"}
        """)
    config = load(path, check_machine=False, environ={})
    registry, coordinator = config.agents
    assert (registry.port, registry.health_check_port) == (7205, 8205)
    assert (registry.port_expression, registry.health_check_port_expression) == (
        "${PORT_OFFSET}+7200", "8200 + ${PORT_OFFSET}")
    assert registry.health.port == 8205  # the probe dials the int
    assert (coordinator.port, coordinator.port_expression, coordinator.health.port) == (7211, None, 9005)
    # The environment's PORT_OFFSET beats the file's port_offset, as for the old launcher.
    shifted = load(path, check_machine=False, environ={"PORT_OFFSET": "100"})
    assert shifted.agent("ServiceRegistry").port == 7300


def test_a_clash_hidden_behind_an_expression_names_both_with_their_values(tmp_path):
    path = write(tmp_path, """\
        agent_groups:
          core_services:
            ServiceRegistry: {script_path: a.py, port: 7100, health_check_port: 7200}
          utility_services:
            RequestCoordinator: {script_path: b.py, port: "${PORT_OFFSET}+7200"}
        """)
    errs, _ = check(path)
    assert errs == [
        f'{path}:5: agent_groups.utility_services.RequestCoordinator.port (RequestCoordinator): '
        '"${PORT_OFFSET}+7200" (= 7200) is also used by ServiceRegistry '
        '(agent_groups.core_services.ServiceRegistry.health_check_port: 7200)'
    ]
    # The clash moves with the offset: shifted apart, there is none.
    assert check(path, {"PORT_OFFSET": "1"})[0] == []


def test_an_unset_variable_or_garbage_in_a_port_is_an_error_at_its_line(tmp_path):
    path = write(tmp_path, """\
        pc2_services:
          - {name: A, script_path: a.py, port: "${PC2_BASE}+7100", health: {type: tcp}}
          - {name: B, script_path: b.py, port: "${PORT_OFFSET}-1"}
        """)
    errs, _ = check(path)
    assert errs == [
        f'{path}:2: pc2_services[0].port (A): "${{PC2_BASE}}+7100": PC2_BASE is not set in the '
        "supervisor's environment; set it there (e.g. Environment= in its systemd unit) or "
        "write the port as a number",
        f'{path}:3: pc2_services[1].port (B): "${{PORT_OFFSET}}-1" is not a port: write a number '
        '(7200), "${VAR}", "${VAR}+N" or "N+${VAR}"',
    ]
    with pytest.raises(ConfigError):
        load(path, check_machine=False, environ={})


def test_a_port_already_listening_is_said_with_its_expression(tmp_path):
    path = write(tmp_path, 'pc2_services:\n  - {name: A, script_path: a.py, port: "${PORT_OFFSET}+7100"}\n')
    _, found = validate_file(path, environ={}, check_machine=False)
    assert found == []
    from supervisor.config import validate
    from supervisor.config.yamlsrc import parse

    source = parse(path.read_text(), str(path))
    entries = validate.agent_entries(source.data)
    ports, _ = validate.evaluate_ports(source, entries, {})
    (warning,) = validate.ports_in_use(source, entries, ports, {7100: "pid 42, redis-server"})
    assert str(warning) == (
        f'warning: {path}:2: pc2_services[0].port (A): "${{PORT_OFFSET}}+7100" (= 7100) is '
        "already listening on this machine (pid 42, redis-server): this agent will fail to "
        "start until it is freed")


# --- ${NAME}: secret, environment, or missing ----------------------------------------------


def test_a_name_in_the_store_is_a_secret_anything_else_the_environment(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "REDIS_PASSWORD").write_text("x\n")
    sealed = tmp_path / "sealed"
    sealed.mkdir()
    (sealed / "API_TOKEN.sealed").write_text("...")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "HUB_TOKEN").write_text("x")
    path = write(tmp_path, """\
        secrets: {dir: store, sealed_dir: sealed, names: [NATS_PASSWORD]}
        global_settings:
          environment:
            PYTHONPATH: '${PYTHONPATH}:${PWD}/..'
        agent_groups:
          core_services:
            ServiceRegistry:
              script_path: a.py
              env_vars:
                NATS_URL: "nats://agent:${NATS_PASSWORD}@localhost:4222"
                REDIS_URL: "redis://:${REDIS_PASSWORD}@localhost"
                API: "${API_TOKEN}"
                HUB: "${HUB_TOKEN}"
                LOG_LEVEL: "${LOG_LEVEL}"
        """)
    environ = {"PYTHONPATH": "/opt/lib", "LOG_LEVEL": "INFO", "CREDENTIALS_DIRECTORY": str(creds)}
    assert check(path, environ) == ([], [])
    agent = load(path, check_machine=False, environ=environ).agent("ServiceRegistry")
    assert agent.secret_names == ("API_TOKEN", "HUB_TOKEN", "NATS_PASSWORD", "REDIS_PASSWORD")
    # Rotation watches secrets only: a ${PYTHONPATH} is not a file in any store.
    assert secrets.referenced(agent) == frozenset(agent.secret_names)


def test_a_name_in_neither_is_an_error_saying_both_ways_to_provide_it(tmp_path):
    path = write(tmp_path, """\
        pc2_services:
          - name: A
            script_path: a.py
            env_vars: {MODEL_DIR: "${MODELS}/llm"}
        """)
    (err,), _ = check(path)
    assert err.startswith(f"{path}:4: pc2_services[0].env_vars.MODEL_DIR (A): ${{MODELS}}: 'MODELS' "
                          "is neither in the secret store")
    # Not a credential's name: the environment is said first, the store second.
    assert err.index("Environment=") < err.index("agentvisor secrets seal MODELS")
    assert check(path, {"MODELS": "/srv/models"}) == ([], [])


def test_a_missing_name_shared_through_an_anchor_is_one_error_at_its_line(tmp_path):
    path = write(tmp_path, """\
        pc2_services:
          - {name: A, script_path: a.py, env_vars: &env {NATS_PASSWORD: "${NATS_PASSWORD}"}}
          - {name: B, script_path: b.py, env_vars: *env}
          - {name: C, script_path: b.py, env_vars: *env}
        """)
    (err,), _ = check(path)
    assert err.startswith(f"{path}:2: pc2_services[0].env_vars.NATS_PASSWORD (A): ${{NATS_PASSWORD}}: ")
    assert err.endswith("(the same value, through a YAML anchor, for 2 more agents: B, C)")
    # A credential's name: the store is said first.
    assert err.index("agentvisor secrets seal NATS_PASSWORD") < err.index("Environment=")


def test_pwd_without_pwd_in_the_environment_is_the_agents_working_directory(tmp_path):
    path = write(tmp_path, "pc2_services:\n  - {name: A, script_path: a.py, env_vars: {P: '${PWD}/..'}}\n")
    assert check(path) == ([], [])  # systemd sets no PWD: never an error, never a credential


def test_a_credential_from_the_environment_is_one_warning_saying_how_to_move_it(tmp_path):
    path = write(tmp_path, """\
        global_settings:
          environment: {LOG_LEVEL: INFO}
        agent_groups:
          core_services:
            ServiceRegistry: {script_path: a.py, env_vars: {NATS_PASSWORD: "${NATS_PASSWORD}"}}
            RequestCoordinator: {script_path: b.py, env_vars: {NATS_PASSWORD: "${NATS_PASSWORD}"}}
        """)
    errs, warns = check(path, {"NATS_PASSWORD": "hunter2-from-env", "LOG_LEVEL": "x"})
    assert errs == []
    assert warns == [
        f"warning: {path}:5: agent_groups.core_services.ServiceRegistry.env_vars.NATS_PASSWORD "
        "(ServiceRegistry): ${NATS_PASSWORD} (and 1 more: line 6) is a credential taken from the "
        "supervisor's environment (plain text in a unit file or profile, inherited by every "
        "child); move it to the secret store: `agentvisor secrets seal NATS_PASSWORD` into "
        "secrets.sealed_dir, a file NATS_PASSWORD in secrets.dir, or systemd's "
        "LoadCredential=NATS_PASSWORD:FILE"
    ]
    assert "hunter2" not in "".join(warns)


def test_a_credential_in_plain_text_is_a_warning_that_never_prints_it(tmp_path):
    path = write(tmp_path, """\
        pc2_services:
          - name: A
            script_path: a.py
            env_vars:
              NATS_PASSWORD: hunter2
              API_KEY: "sk-live-0123456789"
              NATS_URL: nats://localhost:4222
              PASSWORD_FILE: /run/credentials/nats
              DB_PASSWORD: "${DB_PASSWORD}"
              EMPTY_TOKEN: ""
        secrets: {names: [DB_PASSWORD]}
        """)
    errs, warns = check(path)
    assert errs == []
    assert [w.split(": ", 3)[2] for w in warns] == [
        "pc2_services[0].env_vars.NATS_PASSWORD (A)", "pc2_services[0].env_vars.API_KEY (A)"]
    assert "NATS_PASSWORD holds a credential in plain text (7 characters, not shown)" in warns[0]
    assert 'write "${NATS_PASSWORD}" here' in warns[0]
    assert not any(secret in w for w in warns for secret in ("hunter2", "sk-live"))


def test_secret_files_must_be_in_the_store(tmp_path):
    path = write(tmp_path, """\
        secrets: {names: [NATS_PASSWORD]}
        pc2_services:
          - {name: A, script_path: a.py, secrets: {files: [NATS_PASSWORD, NATS_NKEY]}}
        """)
    (err,), _ = check(path)
    assert err.startswith(f"{path}:3: pc2_services[0].secrets.files[1] (A): 'NATS_NKEY' is not in "
                          "the secret store (looked in secrets.names (NATS_PASSWORD))")


# --- unknown keys ----------------------------------------------------------------------

REAL = """\
global_settings:
  environment: {LOG_LEVEL: INFO}
  resource_limits: {cpu_percent: 80, memory_mb: 2048, max_threads: 4}
  health_checks: {interval_seconds: 30, timeout_seconds: 10, retries: 3}
  performance_tuning: {batch_size: 8}
health_checks: {interval_seconds: 30}
pc2_network: {host: 192.168.1.2, port: 7150}
error_bus_port: 7150
hybrid_inference_policy: {prefer: local}
docker_groups: {core: [ServiceRegistry]}
agent_groups:
  core_services:
    ServiceRegistry:
      script_path: a.py
      port: 7200
      feature_flags: [registry_v2]
      health_checks: {path: /health}
    RequestCoordinator:
      script_path: b.py
      port: 7201
      feature_flags: [fast_path]
"""


def test_unknown_keys_are_one_warning_per_key_pattern_with_lines(tmp_path):
    path = write(tmp_path, REAL)
    errs, warns = check(path)
    assert errs == []
    kept = ": kept, and ignored by agentvisor (an error with --strict)"
    assert warns == [
        f"warning: {path}:5: global_settings.performance_tuning: unknown key 'performance_tuning'{kept}",
        f"warning: {path}:6: health_checks: unknown key 'health_checks'{kept}",
        f"warning: {path}:7: pc2_network: unknown key 'pc2_network'{kept}",
        f"warning: {path}:8: error_bus_port: unknown key 'error_bus_port'{kept}",
        f"warning: {path}:9: hybrid_inference_policy: unknown key 'hybrid_inference_policy'{kept}",
        f"warning: {path}:10: docker_groups: unknown key 'docker_groups'{kept}",
        f"warning: {path}:16: agent_groups.*.*.feature_flags: unknown key 'feature_flags' in 2 "
        f"agents (lines 16, 21){kept}",
        f"warning: {path}:17: agent_groups.core_services.ServiceRegistry.health_checks "
        f"(ServiceRegistry): unknown key 'health_checks'{kept}",
    ]
    # Kept and ignored: the config is built as if they were not there.
    config = load(path, check_machine=False, environ={})
    assert [a.name for a in config.agents] == ["ServiceRegistry", "RequestCoordinator"]
    assert len(config.warnings) == 8


def test_a_pattern_lists_at_most_five_lines_then_counts(tmp_path):
    agents = "".join(f"  - {{name: A{i}, command: [a], priority: {i}}}\n" for i in range(8))
    path = write(tmp_path, "pc2_services:\n" + agents)
    (warn,) = check(path)[1]
    assert warn.startswith(f"warning: {path}:2: pc2_services[*].priority: unknown key 'priority' "
                           "in 8 agents (lines 2, 3, 4, 5, 6 and 3 more)")


@pytest.mark.parametrize(
    "where, text, key, meant",
    [
        ("agent_groups.core.A", "agent_groups:\n  core:\n    A: {script_path: a.py, dependancies: []}\n", "dependancies", "dependencies"),
        ("agent_groups.core.A", "agent_groups:\n  core:\n    A: {scrip_path: a.py}\n", "scrip_path", "script_path"),
        ("pc2_services[0]", "pc2_services:\n  - {name: A, script_path: a.py, helth_check_port: 8100}\n", "helth_check_port", "health_check_port"),
        ("pc2_services[0]", "pc2_services:\n  - {name: A, script_path: a.py, Port: 8100}\n", "Port", "port"),
        ("", "agent_group: {}\n", "agent_group", "agent_groups"),
        ("global_settings", "global_settings: {enviroment: {}}\n", "enviroment", "environment"),
    ],
)
def test_a_near_miss_of_a_known_key_is_an_error_with_did_you_mean(tmp_path, where, text, key, meant):
    path = write(tmp_path, text)
    errs, _ = check(path)
    location = f"{where}.{key}" if where else key
    assert any(e.startswith(f"{path}:") and f" {location}" in e
               and e.endswith(f"unknown key {key!r}; did you mean {meant!r}?") for e in errs), errs


def test_none_of_the_real_files_keys_is_taken_for_a_typo(tmp_path):
    path = write(tmp_path, REAL.replace("      feature_flags: [fast_path]\n", """\
      feature_flags: [fast_path]
      startup_timeout: 30
      restart_policy: on-failure
      health_check: {path: /health}
      depends_on: []
      timeout: 5
"""))
    assert check(path)[0] == []


def test_strict_makes_every_unknown_key_an_error(tmp_path):
    path = write(tmp_path, REAL)
    errs, warns = check(path, strict=True)
    assert len(errs) == 8 and warns == []
    assert errs[6] == (
        f"{path}:16: agent_groups.*.*.feature_flags: unknown key 'feature_flags' in 2 agents "
        "(lines 16, 21): not allowed with --strict or `strict: true`; remove it, or validate "
        "without strict")
    with pytest.raises(ConfigError) as e:
        load(path, check_machine=False, environ={}, strict=True)
    assert len(e.value.problems) == 8
    # The file can ask for it itself.
    strict_file = write(tmp_path, "strict: true\n" + REAL)
    assert len(check(strict_file)[0]) == 8


# --- legacy keys with a native meaning --------------------------------------------------


def test_startup_timeout_is_the_probes_start_timeout_unless_health_says_otherwise(tmp_path):
    path = write(tmp_path, """\
        pc2_services:
          - {name: A, script_path: a.py, port: 7100, startup_timeout: 45}
          - {name: B, script_path: b.py, startup_timeout: 45, health: {start_timeout_s: 5}}
          - {name: C, script_path: b.py}
        """)
    a, b, c = load(path, check_machine=False, environ={}).agents
    assert (a.health.start_timeout_s, b.health.start_timeout_s, c.health.start_timeout_s) == (
        45, 5, DEFAULT_START_TIMEOUT_S)
    assert a.health.port == 7100


@pytest.mark.parametrize(
    "written, mode, max_failures, initial_s",
    [
        ("always", RestartMode.ALWAYS, 5, 0.5),
        ("on-failure", RestartMode.ON_FAILURE, 5, 0.5),
        ("on_failure", RestartMode.ON_FAILURE, 5, 0.5),
        ("never", RestartMode.NEVER, 5, 0.5),
        ("no", RestartMode.NEVER, 5, 0.5),  # YAML 1.1 reads it as false
        ("'no'", RestartMode.NEVER, 5, 0.5),
        ("{policy: on_failure, max_restarts: 3, restart_delay: 2}", RestartMode.ON_FAILURE, 3, 2),
        ("{mode: never, max_retries: 0, delay: 1.5}", RestartMode.NEVER, 0, 1.5),
        ("{backoff_seconds: 4}", RestartMode.ALWAYS, 5, 4),
    ],
)
def test_restart_policy_maps_to_the_restart_block(tmp_path, written, mode, max_failures, initial_s):
    path = write(tmp_path, f"pc2_services:\n  - name: A\n    script_path: a.py\n    restart_policy: {written}\n")
    assert check(path) == ([], [])
    restart = load(path, check_machine=False, environ={}).agent("A").restart
    assert (restart.mode, restart.max_failures, restart.backoff.initial_s) == (mode, max_failures, initial_s)


def test_native_restart_wins_key_by_key_and_what_is_not_understood_is_said(tmp_path):
    path = write(tmp_path, """\
        pc2_services:
          - name: A
            script_path: a.py
            restart_policy: {policy: never, max_restarts: 2, restart_delay: 3, jitter: 0.5}
            restart: {policy: on-failure, backoff: {max_s: 9}}
          - {name: B, script_path: b.py, restart_policy: unless-stopped}
        """)
    errs, warns = check(path)
    assert errs == []
    assert warns == [
        f"warning: {path}:4: pc2_services[0].restart_policy.jitter (A): restart_policy key "
        "'jitter' is not understood: kept, and ignored by agentvisor (an error with --strict)",
        f"warning: {path}:6: pc2_services[1].restart_policy (B): restart_policy 'unless-stopped' "
        "is not understood, so restart.policy's default (always) applies; write always, "
        "on-failure or never",
    ]
    a, b = load(path, check_machine=False, environ={}).agents
    assert (a.restart.mode, a.restart.max_failures) == (RestartMode.ON_FAILURE, 2)
    assert (a.restart.backoff.initial_s, a.restart.backoff.max_s) == (3, 9)
    assert b.restart.mode is RestartMode.ALWAYS


def test_legacy_keys_keep_their_types_checked(tmp_path):
    path = write(tmp_path, """\
        pc2_services:
          - {name: A, script_path: a.py, startup_timeout: soon, restart_policy: {max_restarts: many}}
        """)
    errs, _ = check(path)
    assert errs == [
        f"{path}:2: pc2_services[0].startup_timeout (A): 'soon' is not of type 'number'",
        f"{path}:2: pc2_services[0].restart_policy.max_restarts (A): 'many' is not of type 'integer'",
    ]


# --- the warnings plumbing -------------------------------------------------------------


def test_load_fails_only_on_errors_and_carries_the_warnings(tmp_path):
    path = write(tmp_path, "error_bus_port: 7150\npc2_services:\n  - {name: A, script_path: a.py}\n")
    config = load(path, check_machine=False, environ={})
    (warning,) = config.warnings
    assert (warning.severity, warning.line, warning.location) == ("warning", 1, "error_bus_port")
    assert str(warning).startswith(f"warning: {path}:1: error_bus_port: ")
    (tmp_path / "a.py").unlink()
    with pytest.raises(ConfigError) as e:
        load(path, check_machine=False, environ={})
    assert [p.severity for p in e.value.problems] == ["error"]  # warnings are not errors
