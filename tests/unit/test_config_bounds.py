"""What a host config may cost to read, and values its types let through but nothing can
use: an alias bomb, deep nesting or an oversized file is one problem at its place (never a
traceback, never minutes of work); a NUL in a path or a NaN or infinite number of seconds
is refused by `validate` instead of breaking the agent at run time."""

from pathlib import Path
from textwrap import dedent

import pytest

from supervisor.config import load, validate_file
from supervisor.config.yamlsrc import Malformed, parse


def aliases(levels: int, width: int) -> str:
    """'Billion laughs': each anchor is `width` aliases of the one before, so the text
    grows by a line per level while what it stands for grows `width` times."""
    lines = ["l0: &l0 [" + ", ".join(["lol"] * width) + "]"]
    for n in range(1, levels):
        lines.append(f"l{n}: &l{n} [" + ", ".join([f"*l{n - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def write(folder: Path, text: str) -> Path:
    (folder / "a.py").touch()
    path = folder / "host.yaml"
    path.write_text(dedent(text))
    return path


def problems(path: Path) -> list[str]:
    return [str(p) for p in validate_file(path, check_machine=False)[1]]


# --- aliases, nesting, size ----------------------------------------------------------


def test_aliases_that_expand_past_the_limit_are_refused_at_the_line_that_does_it():
    # 111,111 values from 5 short lines: past what any host config holds.
    with pytest.raises(Malformed) as e:
        parse(aliases(5, 10), "bomb.yaml")
    problem = e.value.problem
    assert problem.line == 5
    assert str(problem).startswith("bomb.yaml:5: ")
    assert "aliases" in problem.message and "100000 values" in problem.message


@pytest.mark.parametrize("opening", ["[", "{a: "])
def test_deep_nesting_is_one_problem_not_a_recursion_error(opening):
    with pytest.raises(Malformed) as e:
        parse(opening * 60_000, "deep.yaml")
    assert e.value.problem.line == 1
    assert "nested more than 64 levels deep" in e.value.problem.message


def test_nesting_built_from_aliases_counts_too():
    # Two levels as written, a thousand once every alias is followed.
    text = "l0: &l0 [x]\n" + "".join(f"l{n}: &l{n} [*l{n - 1}]\n" for n in range(1, 1000))
    with pytest.raises(Malformed) as e:
        parse(text, "deep.yaml")
    assert e.value.problem.line == 64
    assert "nested more than 64 levels deep" in e.value.problem.message


def test_an_alias_inside_its_own_anchor_is_refused():
    with pytest.raises(Malformed) as e:
        parse("agent: &a {name: x, again: *a}\n", "loop.yaml")
    assert "alias refers to a value that contains it" in e.value.problem.message


def test_an_oversized_file_is_refused_without_parsing_it(tmp_path):
    path = tmp_path / "host.yaml"
    path.write_text("# padding\n" * 30_000 + "pc2_services: []\n")  # 300 KB of comments
    (problem,) = problems(path)
    assert problem == f"{path}: the file is 300017 bytes; a host config may be at most 262144 (256 KiB)"


def test_anchors_and_merges_as_operators_write_them_still_load(tmp_path):
    path = tmp_path / "host.yaml"
    (tmp_path / "a.py").touch()
    text = (
        "agent_groups:\n"
        "  shared:\n"
        "    Base: &defaults\n"
        "      script_path: a.py\n"
        "      restart: {policy: on-failure, backoff: {initial_s: 1, max_s: 10}}\n"
        "      health: {type: tcp, timeout_s: 2, port: 7099}\n"
        "      env_vars: &env {LOG_LEVEL: INFO, NATS_URL: 'nats://127.0.0.1:4222'}\n"
        "pc2_services:\n"
        + "".join(f"  - {{<<: *defaults, name: A{n}, health: {{port: {7000 + n}}}, "
                  f"env_vars: *env}}\n" for n in range(40))
    )
    path.write_text(text)
    config = load(path, check_machine=False)
    assert len(config.agents) == 41
    last = config.agent("A39")
    assert last.restart.backoff.max_s == 10 and last.health.port == 7039
    assert last.env["LOG_LEVEL"] == "INFO"


# --- values no path or clock can use -------------------------------------------------


BASE = """\
project_root: .
pc2_services:
  - name: A
    script_path: a.py
"""


@pytest.mark.parametrize(
    "text, line, where",
    [
        (BASE.replace("a.py", '"a\\0.py"'), 4, "pc2_services[0].script_path (A)"),
        (BASE.replace("project_root: .", 'project_root: ".\\0"'), 1, "project_root"),
        (BASE + 'secrets: {dir: "/dev/shm/s\\0"}\n', 5, "secrets.dir"),
        (BASE + 'logs: {dir: "/tmp/lo\\0gs"}\n', 5, "logs.dir"),
        (BASE + 'runtime_dir: "/run/x\\0"\n', 5, "runtime_dir"),
        (BASE + '    env_vars: {TOKEN: "a\\0b"}\n', 5, "pc2_services[0].env_vars.TOKEN (A)"),
        (BASE.replace("    script_path: a.py", '    command: ["/bin/x\\0"]'), 4,
         "pc2_services[0].command[0] (A)"),
        ('agent_groups:\n  core:\n    "Bad\\0Name": {script_path: a.py}\n', 3,
         "agent_groups.core.Bad\\x00Name (Bad\\x00Name)"),
    ],
)
def test_a_nul_character_in_a_path_or_argument_is_one_problem(tmp_path, text, line, where):
    path = write(tmp_path, text)
    (problem,) = problems(path)
    assert problem.startswith(f"{path}:{line}: {where}:"), problem
    assert "NUL character" in problem


@pytest.mark.parametrize(
    "block, line, where",
    [
        ("global_settings: {health_checks: {interval_seconds: .nan}}", 5,
         "global_settings.health_checks.interval_seconds"),
        ("global_settings: {restart: {backoff: {max_s: .inf}}}", 5,
         "global_settings.restart.backoff.max_s"),
        ("global_settings: {restart: {fatal_retry_s: .inf}}", 5,
         "global_settings.restart.fatal_retry_s"),
        ("global_settings: {restart: {start_s: .NaN}}", 5, "global_settings.restart.start_s"),
        ("global_settings: {resource_limits: {cpu_percent: .nan}}", 5,
         "global_settings.resource_limits.cpu_percent"),
        ("secrets: {poll_s: .inf}", 5, "secrets.poll_s"),
        ("resource_interval_s: .Inf", 5, "resource_interval_s"),
        ("    health: {type: tcp, port: 7000, timeout_s: .nan}", 5,
         "pc2_services[0].health.timeout_s (A)"),
        ("    restart: {stop_grace_s: .inf}", 5, "pc2_services[0].restart.stop_grace_s (A)"),
    ],
)
def test_a_nan_or_infinite_number_of_seconds_is_one_problem(tmp_path, block, line, where):
    path = write(tmp_path, BASE + block + "\n")
    (problem,) = problems(path)
    assert problem.startswith(f"{path}:{line}: {where}:"), problem
    assert "is not a finite number" in problem
