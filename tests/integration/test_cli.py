"""The `agentvisor` command as operators type it: help, validate's exit codes and
messages, logs -f, and FATAL's timed retry."""

import json
import os
import socket
import subprocess
import sys

from tests.integration.harness import ROOT, wait_until


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "supervisor.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_help_lists_every_command_and_exit_codes():
    out = run_cli("--help")
    assert out.returncode == 0
    for cmd in ("validate", "run", "status", "start", "stop", "restart", "logs", "reload",
                "rollback"):
        assert cmd in out.stdout
    assert "exit codes" in out.stdout
    assert run_cli().returncode == 2  # no command: usage


def test_validate_reports_every_problem_with_location_and_exits_1(tmp_path):
    (tmp_path / "a.py").write_text("")
    cfg = tmp_path / "pc2.yaml"
    cfg.write_text("""\
pc2_services:
  - name: ResourceManager
    script_path: a.py
    port: 7113
  - name: TaskScheduler
    script_path: missing.py
    port: 7113
    dependencies: [Ghost]
  - name: Loop1
    script_path: a.py
    dependencies: [Loop2]
  - name: Loop2
    script_path: a.py
    dependencies: [Loop1]
    env_vars: {NATS_PASSWORD: "${NATS_PASSWORD}"}
""")
    out = run_cli("validate", "--offline", str(cfg))
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    assert any(f"{cfg}:7: pc2_services[1].port (TaskScheduler): 7113 is also used by "
               "ResourceManager" in line for line in lines), out.stdout
    assert any("pc2_services[1].script_path (TaskScheduler)" in line and "missing.py" in line
               for line in lines)
    assert any("Ghost" in line for line in lines)
    assert any("Loop1 -> Loop2 -> Loop1" in line for line in lines)
    assert any("NATS_PASSWORD" in line and "pc2_services[3]" in line for line in lines)
    assert "Traceback" not in out.stdout + out.stderr
    # --warn reports the same problems but does not fail; --json carries them too.
    warn = run_cli("validate", "--offline", "--warn", str(cfg))
    assert warn.returncode == 0 and warn.stdout == out.stdout
    as_json = json.loads(run_cli("validate", "--offline", "--json", str(cfg)).stdout)
    assert len(as_json[0]["problems"]) == len(lines)


def test_validate_malformed_yaml_gives_line_and_column_and_unreadable_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("agent_groups:\n  core:\n    A: {script_path: x.py\n")
    out = run_cli("validate", str(bad))
    assert out.returncode == 1
    assert f"{bad}:4:" in out.stdout and "column" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr
    out = run_cli("validate", str(tmp_path / "nope.yaml"))
    assert out.returncode == 2 and "cannot read" in out.stderr


def test_validate_warns_about_a_port_already_listening_on_this_machine(tmp_path):
    # Only that agent will fail to start: said, not failed.
    (tmp_path / "a.py").write_text("")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cfg = tmp_path / "host.yaml"
        cfg.write_text(f"pc2_services:\n  - {{name: Svc, script_path: a.py, port: {port}}}\n")
        out = run_cli("validate", str(cfg))
        assert out.returncode == 0, out.stdout + out.stderr
        assert out.stdout.startswith(f"warning: {cfg}:2: pc2_services[0].port (Svc): {port} is "
                                     "already listening on this machine")
        assert "this agent will fail to start until it is freed" in out.stdout
        offline = run_cli("validate", "--offline", str(cfg))
        assert offline.returncode == 0 and offline.stdout == ""


def test_validate_accepts_the_shipped_demo_as_an_operator_adopts_it():
    """The demo's legacy file unchanged plus its overlay: valid, with warnings for what
    agentvisor ignores, and the project root found from the legacy layout."""
    demo = "config/demo/main_pc_code/config/"
    legacy = ["validate", demo + "startup_config.yaml", "--overlay", demo + "agentvisor.yaml"]
    # Its PYTHONPATH: '${PYTHONPATH}:${PWD}/..' reads the supervisor's environment, as
    # demo.sh (and the deployed unit's environment file) provide it.
    out = run_cli_env({"PYTHONPATH": ""}, *legacy)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "warning:" in out.stdout and "health_checks" in out.stdout
    assert "project root: " in out.stderr and "config/demo" in out.stderr


def test_logs_follow_prints_lines_as_the_agent_writes_them(fleet):
    fleet.write_config({"pc2_services": [{
        "name": "Ticker", "restart": {"start_s": 0.1},
        "script_path": fleet.script("ticker.py", f"""
            import os, time
            n = 0
            while True:
                if os.path.exists({str(fleet.dir / 'go')!r}):
                    n += 1
                    print("tick", n, flush=True)
                time.sleep(0.05)
        """),
    }]})
    fleet.start()
    fleet.wait_state("Ticker", "RUNNING")
    follower = subprocess.Popen(
        [sys.executable, "-m", "supervisor.cli", "logs", "Ticker", "-f",
         "--runtime-dir", str(fleet.runtime_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        (fleet.dir / "go").touch()  # the agent starts writing only once we follow
        first = follower.stdout.readline()
        assert first.startswith("tick")
    finally:
        follower.kill()
        follower.wait()


def test_fatal_retry_s_tries_again_by_itself(fleet):
    fleet.write_config({"pc2_services": [{
        "name": "Crasher", "script_path": fleet.script("crash.py", "raise SystemExit(1)\n"),
        "restart": {"max_failures": 1, "window_s": 60, "fatal_retry_s": 0.3,
                    "backoff": {"initial_s": 0.01}},
    }]})
    fleet.start()
    fleet.wait_state("Crasher", "FATAL")
    first = fleet.agent("Crasher")["restarts"]
    # No operator: it leaves FATAL on its own after fatal_retry_s and crashes again.
    wait_until(lambda: fleet.agent("Crasher")["restarts"] > first, 10, "a retry after FATAL")
    wait_until(lambda: fleet.supervisor_log().count("retrying in 0.3 s") >= 2, 10,
               "FATAL again, with the retry announced")


def test_validate_warns_about_l7_keys_on_a_tcp_upstream_and_still_passes(tmp_path):
    config = tmp_path / "pc2.yaml"
    config.write_text("host: pc2\nupstreams:\n  Zmq:\n    address: 127.0.0.1:5555\n"
                      "    protocol: tcp\n    retry: {attempts: 2}\n")
    out = run_cli("validate", "--offline", str(config))
    assert out.returncode == 0, out.stderr
    assert f"warning: {config}:6: upstreams.Zmq.retry: ignored" in out.stdout
    out = run_cli("validate", "--offline", "--json", str(config))
    [report] = json.loads(out.stdout)
    assert (report["errors"], report["warnings"]) == (0, 1)
    assert [p["severity"] for p in report["problems"]] == ["warning"]


LEGACY = """\
global_settings:
  environment: {PYTHONPATH: '${PYTHONPATH}:${PWD}/..'}
  performance_tuning: {batch_size: 8}
docker_groups: {core: [ServiceRegistry]}
agent_groups:
  core_services:
    ServiceRegistry:
      script_path: a.py
      port: "${PORT_OFFSET}+7200"
      health_check_port: 8200
      startup_timeout: 30
      restart_policy: on_failure
      feature_flags: [registry_v2]
"""


def test_validate_a_legacy_file_exits_0_with_warnings_and_1_with_strict(tmp_path):
    (tmp_path / "a.py").write_text("")
    cfg = tmp_path / "startup_config.yaml"
    cfg.write_text(LEGACY)
    env = {"PYTHONPATH": "/opt/lib"}
    out = run_cli_env(env, "validate", "--offline", str(cfg))
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith(f"warning: {cfg}:") for line in lines), lines
    assert f"{cfg}: valid, 3 warnings" in out.stderr
    [report] = json.loads(run_cli_env(env, "validate", "--offline", "--json", str(cfg)).stdout)
    assert (report["errors"], report["warnings"]) == (0, 3)
    assert {p["severity"] for p in report["problems"]} == {"warning"}
    assert report["problems"][0]["location"] == "global_settings.performance_tuning"
    strict = run_cli_env(env, "validate", "--offline", "--strict", str(cfg))
    assert strict.returncode == 1
    assert f"{cfg}: 3 errors" in strict.stderr
    assert not any(line.startswith("warning:") for line in strict.stdout.splitlines())
    # A typo of a known key is an error without --strict.
    cfg.write_text(LEGACY.replace("startup_timeout", "startup_timout"))
    typo = run_cli_env(env, "validate", "--offline", str(cfg))
    assert typo.returncode == 1
    assert "unknown key 'startup_timout'; did you mean 'startup_timeout'?" in typo.stdout
    assert "Traceback" not in typo.stdout + typo.stderr


def run_cli_env(env: dict, *args):
    """run_cli with `env` laid over this process's environment."""
    return subprocess.run([sys.executable, "-m", "supervisor.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})
