"""What `make deploy` lists in HOST.env: the variables a legacy file reads from the
supervisor's environment, classified as `validate` classifies them."""

from pathlib import Path

from supervisor.config import envfile, overlay

LEGACY = """\
global_settings:
  environment:
    PYTHONPATH: '${PYTHONPATH}:${PWD}/..'
    NATS_PASSWORD: '${NATS_PASSWORD}'
agent_groups:
  core:
    Registry:
      script_path: a.py
      port: "${PORT_OFFSET}+7200"
      health_check_port: "${HEALTH_BASE}+1"
      env_vars: {DATA: '${LEDGER_DIR}/data', TOKEN: '${API_TOKEN}'}
"""


def _reads(tmp_path: Path, overlay_text: str | None = None) -> dict[str, list[str]]:
    legacy = tmp_path / "startup_config.yaml"
    legacy.write_text(LEGACY)
    overlays = []
    if overlay_text is not None:
        (tmp_path / "agentvisor.yaml").write_text(overlay_text)
        overlays.append(tmp_path / "agentvisor.yaml")
    source = overlay.compose(legacy, overlays)
    return {name: [source.origin(p)[1] for p in paths]
            for name, paths in envfile.environment_reads(source, tmp_path).items()}


def test_variables_credentials_and_port_expressions_are_listed_with_their_lines(tmp_path):
    assert _reads(tmp_path) == {
        "PYTHONPATH": [3],
        "!NATS_PASSWORD": [4],  # a credential: the store, not HOST.env
        "LEDGER_DIR": [11],
        "!API_TOKEN": [11],
        "HEALTH_BASE": [10],  # PORT_OFFSET has a default; ${PWD} is the agent's folder
    }


def test_a_name_the_secret_store_has_needs_no_environment(tmp_path):
    reads = _reads(tmp_path, "secrets: {names: [NATS_PASSWORD, API_TOKEN]}\n")
    assert set(reads) == {"PYTHONPATH", "LEDGER_DIR", "HEALTH_BASE"}


def test_the_command_prints_one_line_per_variable_and_nothing_for_an_unreadable_file(
        tmp_path, capsys):
    (tmp_path / "startup_config.yaml").write_text(LEGACY)
    assert envfile.main([str(tmp_path / "startup_config.yaml")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "PYTHONPATH\tstartup_config.yaml:3" in lines
    assert "!NATS_PASSWORD\tstartup_config.yaml:4" in lines
    assert envfile.main([str(tmp_path / "missing.yaml")]) == 0
    assert capsys.readouterr().out == ""
