"""`agentvisor scan` against real files, a real child process and real log archives: it
finds the planted credentials, names file:line or pid, exits 1, and never prints a value."""

import argparse
import gzip
import json
import os
import secrets
import subprocess
import sys
import textwrap

import psutil
import pytest

from supervisor import scan
from tests.integration.harness import ROOT, pid_alive

PLANTED_PASSWORD = "s3cr3t-Pl4nted-9f8e7d"
PLANTED_URL_PASSWORD = "hunter22"

# A MainPC-style legacy startup_config.yaml (FLEET.md) as it looked before placeholders:
# one agent with the password in env_vars, one with it in the NATS URL, and one agent
# already fixed with a ${NAME} placeholder that must not be reported.
LEGACY = textwrap.dedent(f"""\
    global_settings:
      environment: {{PYTHONPATH: /opt/ai_system, LOG_LEVEL: INFO}}
      resource_limits: {{cpu_percent: 80, memory_mb: 2048, max_threads: 4}}
      health_checks: {{interval_seconds: 30, timeout_seconds: 10, retries: 3}}

    agent_groups:
      core_services:
        ServiceRegistry:
          script_path: main_pc_code/agents/service_registry_agent.py
          port: 7200
          health_check_port: 8200
          required: true
          dependencies: []
          config: {{}}
          host: 0.0.0.0
          env_vars:
            NATS_PASSWORD: "{PLANTED_PASSWORD}"
        RequestCoordinator:
          script_path: main_pc_code/agents/request_coordinator.py
          port: 7201
          health_check_port: 8201
          required: true
          dependencies: [ServiceRegistry]
          env_vars:
            NATS_URL: nats://agent:{PLANTED_URL_PASSWORD}@10.0.0.1:4222
        ModelManagerAgent:
          script_path: main_pc_code/agents/model_manager_agent.py
          port: 7211
          health_check_port: 8211
          required: true
          dependencies: [RequestCoordinator]
          env_vars: {{NATS_PASSWORD: "${{NATS_PASSWORD}}", OBS_HUB_URL: ${{upstream:CentralHub}}}}
""")


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


PW_LINE = line_of(LEGACY, PLANTED_PASSWORD)
URL_LINE = line_of(LEGACY, "nats://")


@pytest.fixture
def legacy(tmp_path):
    path = tmp_path / "main_pc_code" / "config" / "startup_config.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(LEGACY)
    return path


def parse(*argv):
    parser = argparse.ArgumentParser()
    scan.add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def run_in_process(capsys, *argv):
    code = scan.run(parse(*argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_as_command(*argv, env=None):
    proc = subprocess.run(
        [sys.executable, "-c", "from supervisor.scan import main; main()", *map(str, argv)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, **(env or {})})
    return proc.returncode, proc.stdout, proc.stderr


def assert_no_values(*outputs, values=(PLANTED_PASSWORD, PLANTED_URL_PASSWORD)):
    for output in outputs:
        for value in values:
            assert value not in output


# --- files -----------------------------------------------------------------------------


def test_legacy_config_in_process(legacy, capsys):
    code, out, err = run_in_process(capsys, legacy)
    assert code == scan.EXIT_FINDINGS
    assert out.splitlines() == [
        f"{legacy}:{PW_LINE}: credential-assignment: NATS_PASSWORD = <redacted, 21 chars>",
        f"{legacy}:{URL_LINE}: url-credentials: nats://agent:<redacted, 8 chars>@10.0.0.1:4222",
    ]
    assert "2 findings" in err
    assert_no_values(out, err)


def test_legacy_config_as_a_command(legacy, tmp_path):
    code, out, err = run_as_command(tmp_path)  # the folder, walked recursively
    assert code == 1, err
    assert f"{legacy}:{PW_LINE}: credential-assignment" in out
    assert f"{legacy}:{URL_LINE}: url-credentials" in out
    assert_no_values(out, err)

    code, out, err = run_as_command("--json", legacy)
    assert code == 1
    findings = json.loads(out)
    assert {(f["line"], f["rule"]) for f in findings} == {
        (PW_LINE, "credential-assignment"), (URL_LINE, "url-credentials")}
    assert all(f["path"] == str(legacy) for f in findings)
    assert_no_values(out, err)


def test_a_known_secret_in_a_config_names_the_secret(legacy, tmp_path, capsys):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "NATS_PASSWORD").write_text(PLANTED_PASSWORD + "\n")  # as `echo` writes it
    code, out, err = run_in_process(capsys, legacy, "--secrets-dir", creds)
    assert code == 1
    assert (f"{legacy}:{PW_LINE}: known-secret: "
            "contains the value of NATS_PASSWORD") in out
    assert_no_values(out, err)


def test_credentials_directory_is_the_default_and_is_not_scanned_itself(tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "NATS_PASSWORD").write_text(PLANTED_PASSWORD)
    (tmp_path / "app.log").write_text(f"boot\nauth with {PLANTED_PASSWORD}\n")
    # Scanning a tree that contains the credentials directory: the secret files are where
    # secrets belong, not findings.
    code, out, err = run_as_command(tmp_path, env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert code == 1, err
    assert out.splitlines() == [
        f"{tmp_path / 'app.log'}:2: known-secret: contains the value of NATS_PASSWORD"]
    assert_no_values(out, err)


def test_allow_list_silences_accepted_findings(legacy, tmp_path, capsys):
    allow = tmp_path / "scan-allow.txt"
    allow.write_text(textwrap.dedent(f"""\
        # legacy file kept for the migration diff
        main_pc_code/config/startup_config.yaml:{PW_LINE}
        main_pc_code/config/*.yaml:url-credentials
    """))
    code, out, err = run_in_process(capsys, legacy, "--allow", allow)
    assert code == scan.EXIT_CLEAN, out + err
    assert out == ""
    assert "0 findings, 2 allowed" in err

    code, out, err = run_as_command(legacy, "--allow", allow)
    assert code == 0, out + err
    assert_no_values(out, err)


def test_walk_skips_vcs_venv_caches_binaries_and_fifos(tmp_path):
    for folder in (".git", ".venv", "__pycache__", "node_modules", "src"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "settings.env").write_text("NATS_PASSWORD=hunter2-everywhere\n")
    (tmp_path / "src" / "model.bin").write_bytes(b"\0\1NATS_PASSWORD=hunter2-binary\n")
    os.mkfifo(tmp_path / "src" / "pipe")  # opening it to read would block forever
    with gzip.open(tmp_path / "src" / "old.env.gz", "wt") as f:
        f.write("A=1\nNATS_PASSWORD=hunter2-archived\n")
    findings = scan.scan_paths([tmp_path])
    assert sorted((os.path.relpath(f.path, tmp_path), f.line) for f in findings) == [
        ("src/old.env.gz", 2), ("src/settings.env", 1)]


def test_usage_errors_exit_2(tmp_path, capsys):
    code, _, err = run_in_process(capsys)
    assert code == scan.EXIT_USAGE and "nothing to scan" in err
    code, _, err = run_in_process(capsys, tmp_path / "missing.yaml")
    assert code == scan.EXIT_USAGE and "missing.yaml" in err
    code, _, err = run_in_process(capsys, tmp_path, "--allow", tmp_path / "no-allow.txt")
    assert code == scan.EXIT_USAGE and "no-allow.txt" in err
    code, _, err = run_in_process(capsys, tmp_path, "--secrets-dir", tmp_path / "no-creds")
    assert code == scan.EXIT_USAGE and "no-creds" in err
    (tmp_path / "clean.yaml").write_text("NATS_PASSWORD: ${NATS_PASSWORD}\n")
    code, out, err = run_in_process(capsys, tmp_path / "clean.yaml")
    assert code == scan.EXIT_CLEAN and out == "" and "0 findings" in err


def test_an_unreadable_file_makes_the_audit_incomplete(tmp_path, capsys):
    (tmp_path / "app.log.2.gz").write_bytes(b"\x1f\x8b truncated by a full disk")
    (tmp_path / "app.log").write_text("fine\n")
    code, _, err = run_in_process(capsys, "--logs", tmp_path)
    assert code == scan.EXIT_USAGE
    assert "app.log.2.gz: cannot read" in err and "1 unreadable" in err


# --- processes -------------------------------------------------------------------------


def test_processes_finds_a_secret_in_a_child_command_line(tmp_path, capsys):
    value = "the-secret-value-" + secrets.token_hex(6)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "NATS_PASSWORD").write_text(value + "\n")
    # Popen returns once the child has exec'd, so its argv is already in /proc.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", value])
    try:
        name = psutil.Process(child.pid).name()
        code, out, err = run_in_process(capsys, "--processes", "--secrets-dir", creds)
    finally:
        child.kill()
        child.wait()
    assert code == scan.EXIT_FINDINGS
    mine = [line for line in out.splitlines() if line.startswith(f"pid {child.pid} (")]
    assert mine == [f"pid {child.pid} ({name}) cmdline: contains the value of NATS_PASSWORD"]
    assert value not in out and value not in err
    assert not pid_alive(child.pid)


@pytest.mark.skipif(os.geteuid() != 0, reason="reading other processes' environments")
def test_processes_checks_the_environment_of_non_agents_only(tmp_path):
    value = "env-secret-" + secrets.token_hex(6)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "NATS_PASSWORD").write_text(value)
    sleeper = [sys.executable, "-c", "import time; time.sleep(30)"]
    leaky = subprocess.Popen(sleeper, env={**os.environ, "LEAKED": value})
    agent = subprocess.Popen(sleeper, env={**os.environ, "NATS_PASSWORD": value,
                                           "AGENTVISOR_AGENT": "ServiceRegistry"})
    try:
        code, out, err = run_as_command("--processes", "--secrets-dir", creds)
    finally:
        for p in (leaky, agent):
            p.kill()
            p.wait()
    assert code == 1, err
    assert f"pid {leaky.pid} (" in out
    assert "environ LEAKED: contains the value of NATS_PASSWORD" in out
    assert f"pid {agent.pid} (" not in out
    assert value not in out and value not in err


# --- logs ------------------------------------------------------------------------------


def test_logs_and_their_gzip_archives(tmp_path, capsys):
    value = "log-secret-" + secrets.token_hex(6)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "NATS_PASSWORD").write_text(value)
    logs = tmp_path / "logs" / "ServiceRegistry"
    logs.mkdir(parents=True)
    (logs / "stdout.log").write_text(f"starting\nconnecting with password {value}\nready\n")
    with gzip.open(logs / "stdout.log.1.gz", "wt") as f:
        f.write(f"old\nolder\nDEBUG nats connect user=agent pass={value}\n")
    (logs / "stderr.log").write_text("Traceback: nats://agent:hunter22@10.0.0.1:4222 refused\n")
    code, out, err = run_in_process(capsys, "--logs", tmp_path / "logs", "--secrets-dir", creds)
    assert code == scan.EXIT_FINDINGS
    assert out.splitlines() == [
        f"{logs / 'stderr.log'}:1: url-credentials: nats://agent:<redacted, 8 chars>@10.0.0.1:4222",
        f"{logs / 'stdout.log'}:2: known-secret: contains the value of NATS_PASSWORD",
        f"{logs / 'stdout.log.1.gz'}:3: known-secret: contains the value of NATS_PASSWORD",
    ]
    assert_no_values(out, err, values=(value, "hunter22"))
