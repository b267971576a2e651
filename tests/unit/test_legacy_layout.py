"""The legacy layout: the project root found from where the file sits, and script_path
resolved by the old launcher's rule, the same way for `validate` and for the agents."""

from pathlib import Path
from textwrap import dedent

from supervisor.config import load, validate_file
from supervisor.config.legacy import infer_project_root, resolve_script, script_candidates

LEGACY = """\
agent_groups:
  core_services:
    ServiceRegistry:
      script_path: main_pc_code/agents/service_registry_agent.py
      port: 7200
    ModelManagerAgent:
      script_path: agents/model_manager_agent.py
      port: 7211
"""
SCRIPTS = ("main_pc_code/agents/service_registry_agent.py",
           "main_pc_code/agents/model_manager_agent.py")


def touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).touch()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dedent(text))
    return path


def errors(path: Path, **kw) -> list:
    return [p for p in validate_file(path, check_machine=False, **kw)[1]
            if getattr(p, "severity", "error") == "error"]


# --- the project root ----------------------------------------------------------------


def test_the_root_of_a_mainpc_file_is_the_repository_root():
    root, why = infer_project_root("/opt/ai_system/main_pc_code/config/startup_config.yaml")
    assert root == Path("/opt/ai_system")
    assert why == "inferred: the file is in main_pc_code/config/"


def test_the_root_of_a_pc2_file_is_the_repository_root():
    root, why = infer_project_root("/srv/ai/pc2_code/config/../config/startup_config.yaml")
    assert root == Path("/srv/ai")
    assert "pc2_code/config/" in why


def test_elsewhere_the_root_is_the_files_folder():
    root, why = infer_project_root("/etc/agentvisor/mainpc.yaml")
    assert root == Path("/etc/agentvisor")
    assert "the config file's folder" in why
    # A folder merely called config is not the layout.
    assert infer_project_root("/srv/config/startup_config.yaml")[0] == Path("/srv/config")


def test_load_infers_the_root_and_says_why(tmp_path):
    touch(tmp_path, *SCRIPTS)
    legacy = write(tmp_path / "main_pc_code/config/startup_config.yaml", LEGACY)
    assert errors(legacy) == []
    config = load(legacy, check_machine=False, logs_dir=tmp_path / "logs")
    assert config.project_root == tmp_path
    assert config.project_root_reason == "inferred: the file is in main_pc_code/config/"
    # Agents run from the root, as under the old launcher.
    assert config.agent("ServiceRegistry").cwd == tmp_path


def test_an_overlays_project_root_is_relative_to_the_overlays_folder(tmp_path):
    touch(tmp_path / "checkout", *SCRIPTS)
    legacy = write(tmp_path / "main_pc_code/config/startup_config.yaml", LEGACY)
    overlay = write(tmp_path / "deploy/agentvisor.yaml", "project_root: ../checkout\n")
    config = load(legacy, overlays=[overlay], check_machine=False, logs_dir=tmp_path / "logs")
    assert config.project_root.resolve() == (tmp_path / "checkout").resolve()
    assert config.project_root_reason == f"set at {overlay}:1"
    script = config.agent("ServiceRegistry").script_path
    assert script is not None and script.resolve() == (
        tmp_path / "checkout/main_pc_code/agents/service_registry_agent.py").resolve()


def test_a_project_root_beside_the_legacy_file_is_relative_to_that_folder(tmp_path):
    touch(tmp_path, *SCRIPTS)
    legacy = write(tmp_path / "main_pc_code/config/startup_config.yaml", LEGACY)
    overlay = write(tmp_path / "main_pc_code/config/agentvisor.yaml",
                    "host: mainpc\nproject_root: ../..\n")
    config = load(legacy, overlays=[overlay], check_machine=False, logs_dir=tmp_path / "logs")
    assert config.project_root.resolve() == tmp_path.resolve()
    assert config.project_root_reason == f"set at {overlay}:2"


def test_other_relative_paths_of_an_overlay_are_relative_to_its_folder(tmp_path):
    touch(tmp_path, *SCRIPTS)
    legacy = write(tmp_path / "main_pc_code/config/startup_config.yaml", LEGACY)
    overlay = write(tmp_path / "deploy/agentvisor.yaml", """\
        runtime_dir: run
        logs: {dir: logs}
        secrets: {dir: secrets}
        """)
    config = load(legacy, overlays=[overlay], check_machine=False)
    assert config.runtime_dir == tmp_path / "deploy/run"
    assert config.logs_dir == tmp_path / "deploy/logs"
    assert config.secrets.dir == tmp_path / "deploy/secrets"


# --- script_path ---------------------------------------------------------------------


def test_a_script_is_looked_for_as_written_then_under_main_pc_code(tmp_path):
    touch(tmp_path, "main_pc_code/agents/model_manager_agent.py", "tools/probe.py")
    assert resolve_script(tmp_path, "agents/model_manager_agent.py") == (
        tmp_path / "main_pc_code/agents/model_manager_agent.py")
    assert resolve_script(tmp_path, "tools/probe.py") == tmp_path / "tools/probe.py"
    # A path that already starts with main_pc_code/ is not tried twice.
    assert script_candidates(tmp_path, "main_pc_code/agents/x.py") == (
        tmp_path / "main_pc_code/agents/x.py",)
    # Found nowhere: the path as written, for the "no such file".
    assert resolve_script(tmp_path, "agents/ghost.py") == tmp_path / "agents/ghost.py"


def test_the_agent_runs_the_script_the_launcher_would_have_found(tmp_path):
    touch(tmp_path, *SCRIPTS)
    legacy = write(tmp_path / "main_pc_code/config/startup_config.yaml", LEGACY)
    config = load(legacy, check_machine=False, logs_dir=tmp_path / "logs")
    manager = config.agent("ModelManagerAgent")
    expected = tmp_path / "main_pc_code/agents/model_manager_agent.py"
    assert manager.script_path == expected
    assert manager.argv[1] == str(expected)


def test_a_missing_script_names_where_it_was_looked_for(tmp_path):
    touch(tmp_path, "main_pc_code/agents/service_registry_agent.py")
    legacy = write(tmp_path / "main_pc_code/config/startup_config.yaml", LEGACY)
    (problem,) = errors(legacy)
    assert problem.agent == "ModelManagerAgent" and problem.line == 7
    assert f"no such file: {tmp_path / 'agents/model_manager_agent.py'}" in problem.message
    assert f"also tried {tmp_path / 'main_pc_code/agents/model_manager_agent.py'}" in problem.message
