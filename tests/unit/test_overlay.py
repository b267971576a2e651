"""Overlay files: native settings laid over a legacy file that stays byte for byte as it
is, merged by one documented rule, with every problem at the file and line to edit."""

import hashlib
from pathlib import Path
from textwrap import dedent

import pytest

from supervisor.config import ProbeKind, RestartMode, load, validate_file
from supervisor.config.overlay import MAX_INCLUDE_DEPTH, compose
from supervisor.config.yamlsrc import Malformed

# The MainPC file as the users write it (nested), in its real place in the repository.
MAINPC = """\
global_settings:
  environment: {LOG_LEVEL: INFO, REGION: lab}
  resource_limits: {cpu_percent: 80, memory_mb: 2048}
agent_groups:
  core_services:
    ServiceRegistry:
      script_path: main_pc_code/agents/service_registry_agent.py
      port: 7200
      health_check_port: 8200
      required: true
      dependencies: []
    RequestCoordinator:
      script_path: main_pc_code/agents/request_coordinator.py
      port: 7201
      dependencies: [ServiceRegistry]
"""
MAINPC_SCRIPTS = ("main_pc_code/agents/service_registry_agent.py",
                  "main_pc_code/agents/request_coordinator.py")

# PC2's flat list.
PC2 = """\
pc2_services:
  - name: MemoryOrchestratorService
    script_path: pc2_code/agents/memory_orchestrator_service.py
    port: 7140
    health_check_port: 8140
  - name: ResourceManager
    script_path: pc2_code/agents/resource_manager.py
    port: 7113
    dependencies: [MemoryOrchestratorService]
"""
PC2_SCRIPTS = ("pc2_code/agents/memory_orchestrator_service.py",
               "pc2_code/agents/resource_manager.py")


def tree(root: Path, files: dict[str, str], scripts: tuple[str, ...] = ()) -> dict[str, Path]:
    """Write `files` (relative name -> YAML) and empty `scripts` under root."""
    for script in scripts:
        (root / script).parent.mkdir(parents=True, exist_ok=True)
        (root / script).touch()
    paths = {}
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dedent(text))
        paths[name] = path
    return paths


def mainpc(tmp_path: Path, overlay: str, **more: str) -> tuple[Path, Path]:
    """(legacy file, overlay beside it) in main_pc_code/config/."""
    files = tree(tmp_path, {"main_pc_code/config/startup_config.yaml": MAINPC,
                            "main_pc_code/config/agentvisor.yaml": overlay, **more}, MAINPC_SCRIPTS)
    return files["main_pc_code/config/startup_config.yaml"], files["main_pc_code/config/agentvisor.yaml"]


def line_of(path: Path, text: str) -> int:
    """The 1-based line of `path` that contains `text`."""
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if text in line:
            return n
    raise AssertionError(f"{text!r} is not in {path}")


def errors(path: Path, **kw) -> list:
    kw.setdefault("check_machine", False)
    return [p for p in validate_file(path, **kw)[1] if getattr(p, "severity", "error") == "error"]


# --- the merge rule -------------------------------------------------------------------


def test_mappings_merge_key_by_key_and_scalars_and_lists_replace(tmp_path):
    legacy, overlay = mainpc(tmp_path, """\
        global_settings:
          environment: {REGION: prod, NATS_URL: "nats://127.0.0.1:4222"}
          resource_limits: {memory_mb: 4096}
        agent_groups:
          core_services:
            RequestCoordinator:
              dependencies: []
        """)
    data = compose(legacy, [overlay]).data
    settings = data["global_settings"]
    # Merged key by key: what the overlay leaves out stays as the legacy file says.
    assert settings["environment"] == {"LOG_LEVEL": "INFO", "REGION": "prod",
                                       "NATS_URL": "nats://127.0.0.1:4222"}
    assert settings["resource_limits"] == {"cpu_percent": 80, "memory_mb": 4096}
    # A list is replaced whole, not appended to.
    agent = data["agent_groups"]["core_services"]["RequestCoordinator"]
    assert agent["dependencies"] == []
    assert agent["port"] == 7201


def test_a_later_overlay_wins_and_each_value_keeps_its_file(tmp_path):
    legacy, first = mainpc(tmp_path, "host: first\nlogs: {dir: /var/log/first}\n")
    second = tree(tmp_path, {"second.yaml": "host: second\n"})["second.yaml"]
    source = compose(legacy, [first, second])
    assert source.data["host"] == "second"
    assert source.data["logs"] == {"dir": "/var/log/first"}
    assert source.origin(("host",)) == (str(second), 1)
    assert source.origin(("logs", "dir")) == (str(first), 2)
    assert source.origin(("agent_groups", "core_services", "ServiceRegistry", "port")) == (
        str(legacy), line_of(legacy, "port: 7200"))
    assert source.layers == (str(legacy), str(first), str(second))


def test_agents_by_name_merge_into_the_nested_format(tmp_path):
    legacy, overlay = mainpc(tmp_path, """\
        agents:
          ServiceRegistry:
            health: {type: http, path: /status}
            restart: on-failure
            intercept: proxy
        """)
    source = compose(legacy, [overlay])
    assert "agents" not in source.data  # gone: the schema never sees it
    entry = source.data["agent_groups"]["core_services"]["ServiceRegistry"]
    assert entry["health"] == {"type": "http", "path": "/status"}
    assert entry["port"] == 7200  # the legacy fields are still there
    config = load(legacy, overlays=[overlay], check_machine=False, logs_dir=tmp_path / "logs")
    registry = config.agent("ServiceRegistry")
    assert registry.health.kind is ProbeKind.HTTP and registry.health.path == "/status"
    assert registry.restart.mode is RestartMode.ON_FAILURE
    assert registry.intercept.value == "proxy"
    assert config.agent("RequestCoordinator").restart.mode is RestartMode.ALWAYS
    assert config.overlays == (overlay.absolute(),)


def test_agents_by_name_merge_into_the_flat_format(tmp_path):
    files = tree(tmp_path, {"pc2_code/config/startup_config.yaml": PC2,
                            "pc2_code/config/agentvisor.yaml": """\
                                agents:
                                  ResourceManager:
                                    env_vars: {MODE: edge}
                                    restart: {policy: never}
                                """}, PC2_SCRIPTS)
    legacy = files["pc2_code/config/startup_config.yaml"]
    overlay = files["pc2_code/config/agentvisor.yaml"]
    source = compose(legacy, [overlay])
    assert source.data["pc2_services"][1]["env_vars"] == {"MODE": "edge"}
    assert source.data["pc2_services"][1]["name"] == "ResourceManager"
    assert source.origin(("pc2_services", 1, "env_vars", "MODE")) == (
        str(overlay), line_of(overlay, "MODE: edge"))
    config = load(legacy, overlays=[overlay], check_machine=False, logs_dir=tmp_path / "logs")
    assert config.agent("ResourceManager").restart.mode is RestartMode.NEVER
    assert config.agent("ResourceManager").env["MODE"] == "edge"


def test_an_unknown_agent_name_is_an_error_at_the_overlays_line_with_did_you_mean(tmp_path):
    legacy, overlay = mainpc(tmp_path, """\
        host: mainpc
        agents:
          ServiceRegistery:
            restart: never
        """)
    (problem,) = errors(legacy, overlays=[overlay])
    assert problem.file == str(overlay) and problem.line == 3
    assert problem.location == "agents.ServiceRegistery"
    assert "did you mean 'ServiceRegistry'?" in problem.message


def test_an_agent_declared_in_the_same_overlay_can_be_given_settings(tmp_path):
    legacy, overlay = mainpc(tmp_path, """\
        agent_groups:
          extras:
            Echo: {script_path: main_pc_code/agents/request_coordinator.py, port: 7300}
        agents:
          Echo: {restart: never}
        """)
    assert errors(legacy, overlays=[overlay]) == []
    config = load(legacy, overlays=[overlay], check_machine=False, logs_dir=tmp_path / "logs")
    assert config.agent("Echo").group == "extras"
    assert config.agent("Echo").restart.mode is RestartMode.NEVER


# --- include: -------------------------------------------------------------------------


def test_include_a_string_puts_the_included_file_first(tmp_path):
    legacy, overlay = mainpc(tmp_path, """\
        include: startup_config.yaml
        global_settings: {environment: {REGION: prod}}
        agents:
          ServiceRegistry: {restart: never}
        """)
    before = legacy.read_bytes()
    config, problems = validate_file(overlay, check_machine=False, logs_dir=tmp_path / "logs")
    assert [p for p in problems if p.severity == "error"] == []
    assert config.environment["REGION"] == "prod"
    assert config.agent("ServiceRegistry").restart.mode is RestartMode.NEVER
    assert config.source == overlay.absolute()
    assert config.project_root == tmp_path  # inferred from where the legacy file is
    assert legacy.read_bytes() == before


def test_include_a_list_applies_in_order_and_nests(tmp_path):
    legacy, overlay = mainpc(tmp_path, """\
        include: [startup_config.yaml, ../../site/common.yaml]
        host: mainpc
        """, **{"site/common.yaml": "include: region.yaml\nhost: common\nlogs: {dir: /l}\n",
                "site/region.yaml": "host: region\nresource_interval_s: 7\n"})
    source = compose(overlay)
    assert source.data["host"] == "mainpc"  # the including file comes last
    assert source.data["logs"] == {"dir": "/l"}
    assert source.data["resource_interval_s"] == 7
    assert "include" not in source.data
    region = tmp_path / "main_pc_code/config/../../site/region.yaml"
    assert source.origin(("resource_interval_s",)) == (str(region), 2)
    assert [Path(f).name for f in source.layers] == [
        "startup_config.yaml", "region.yaml", "common.yaml", "agentvisor.yaml"]


def test_an_include_cycle_is_an_error_naming_the_chain(tmp_path):
    files = tree(tmp_path, {"a.yaml": "include: b.yaml\nhost: a\n",
                            "b.yaml": "host: b\ninclude: a.yaml\n"})
    (problem,) = compose(files["a.yaml"]).problems
    assert problem.file == str(tmp_path / "b.yaml") and problem.line == 2
    assert f"include cycle: {tmp_path / 'a.yaml'} -> {tmp_path / 'b.yaml'} -> " \
           f"{tmp_path / 'a.yaml'}" in problem.message


def test_includes_nest_only_so_deep(tmp_path):
    depth = MAX_INCLUDE_DEPTH + 2
    files = tree(tmp_path, {f"f{i}.yaml": f"include: f{i + 1}.yaml\n" for i in range(depth)}
                 | {f"f{depth}.yaml": "host: deep\n"})
    (problem,) = compose(files["f0.yaml"]).problems
    assert f"more than {MAX_INCLUDE_DEPTH} deep" in problem.message


def test_an_included_file_that_cannot_be_read_is_an_error_at_the_include_line(tmp_path):
    legacy, overlay = mainpc(tmp_path, """\
        host: mainpc
        include:
          - startup_config.yaml
          - secrets.yaml
        """)
    (problem,) = errors(overlay)
    assert problem.file == str(overlay) and problem.line == 4
    assert problem.location == "include[1]"
    assert "cannot read" in problem.message and "secrets.yaml" in problem.message


def test_an_include_that_is_not_a_file_name_is_an_error(tmp_path):
    files = tree(tmp_path, {"a.yaml": "host: a\ninclude: {file: b.yaml}\n"})
    (problem,) = compose(files["a.yaml"]).problems
    assert problem.line == 2 and "a file name or a list of file names" in problem.message


def test_an_overlay_that_cannot_be_read_names_itself(tmp_path):
    from supervisor.config import ConfigUnreadable

    legacy, overlay = mainpc(tmp_path, "host: mainpc\n")
    with pytest.raises(ConfigUnreadable, match="missing.yaml: cannot read"):
        validate_file(legacy, overlays=[tmp_path / "missing.yaml"], check_machine=False)
    overlay.write_bytes(b"host: \xff\n")
    with pytest.raises(ConfigUnreadable, match=f"{overlay}: cannot read: not UTF-8"):
        validate_file(legacy, overlays=[overlay], check_machine=False)


def test_an_overlay_that_is_not_yaml_is_reported_at_its_own_line(tmp_path):
    legacy, overlay = mainpc(tmp_path, "host: mainpc\nagents: [\n")
    with pytest.raises(Malformed) as caught:
        compose(legacy, [overlay])
    assert caught.value.problem.file == str(overlay)
    assert validate_file(legacy, overlays=[overlay], check_machine=False)[1][0].file == str(overlay)


def test_a_plain_file_is_parsed_as_before(tmp_path):
    legacy, _ = mainpc(tmp_path, "")
    source = compose(legacy)
    assert source.file == str(legacy) and source.files == {} and source.layers == ()
    assert source.base == str(legacy)


# --- the legacy file is never touched -------------------------------------------------


def test_the_legacy_file_is_unchanged_by_validate_and_load(tmp_path):
    legacy, overlay = mainpc(tmp_path, """\
        include: startup_config.yaml
        host: mainpc
        secrets: {names: [NATS_PASSWORD]}
        agents:
          ServiceRegistry: {health: {type: http}}
        """)
    digest = hashlib.sha256(legacy.read_bytes()).hexdigest()
    stamp = legacy.stat().st_mtime_ns
    validate_file(legacy, overlays=[overlay], check_machine=False)
    load(legacy, overlays=[overlay], check_machine=False, logs_dir=tmp_path / "logs")
    validate_file(overlay, check_machine=False)  # an overlay with include: of it, too
    assert hashlib.sha256(legacy.read_bytes()).hexdigest() == digest
    assert legacy.stat().st_mtime_ns == stamp


# --- problems land where the operator edits ---------------------------------------------


def test_a_bad_value_in_the_overlay_is_reported_at_the_overlays_line(tmp_path):
    legacy, overlay = mainpc(tmp_path, """\
        host: mainpc
        agents:
          ServiceRegistry:
            restart: sometimes
            health: {type: http, interval_s: -1}
        """)
    found = {(p.file, p.line, p.location) for p in errors(legacy, overlays=[overlay])}
    where = "agent_groups.core_services.ServiceRegistry"
    assert (str(overlay), 4, f"{where}.restart") in found
    assert (str(overlay), 5, f"{where}.health.interval_s") in found
    assert all(file == str(overlay) for file, _, _ in found), found


def test_a_bad_value_in_the_legacy_file_is_reported_at_the_legacy_files_line(tmp_path):
    legacy, overlay = mainpc(tmp_path, "host: mainpc\n")
    legacy.write_text(MAINPC.replace("required: true", 'required: "yes"'))
    (problem,) = errors(legacy, overlays=[overlay])
    assert (problem.file, problem.line) == (str(legacy), line_of(legacy, "required:"))
    assert problem.agent == "ServiceRegistry"


def test_a_missing_key_is_reported_at_the_nearest_value_in_its_own_file(tmp_path):
    # The overlay declares an agent without a script: the problem is at the overlay's
    # agent, not at some line of the legacy file.
    legacy, overlay = mainpc(tmp_path, """\
        host: mainpc
        agent_groups:
          extras:
            Echo: {port: 7300}
        """)
    (problem,) = errors(legacy, overlays=[overlay])
    assert (problem.file, problem.line) == (str(overlay), 4)
    assert "script_path or command" in problem.message


def test_duplicate_keys_are_reported_in_their_own_file(tmp_path):
    legacy, overlay = mainpc(tmp_path, "host: mainpc\nhost: other\n")
    legacy.write_text(MAINPC.replace("      port: 7201\n", "      port: 7201\n      port: 7202\n"))
    found = {(p.file, p.line) for p in errors(legacy, overlays=[overlay])
             if "duplicate key" in p.message}
    assert found == {(str(overlay), 2), (str(legacy), line_of(legacy, "port: 7202"))}


def test_an_overlay_must_be_a_mapping(tmp_path):
    legacy, overlay = mainpc(tmp_path, "- host: mainpc\n")
    (problem,) = errors(legacy, overlays=[overlay])
    assert problem.file == str(overlay) and "must be a mapping" in problem.message
