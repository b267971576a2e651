"""YAML parsing that keeps lines, finds duplicate keys and never raises a traceback."""

import pytest

from supervisor.config.yamlsrc import Malformed, location, parse

TEXT = """\
agent_groups:
  core_services:
    ServiceRegistry:
      port: 7200
pc2_services:
  - name: ResourceManager
    port: 7113
"""


def test_lines_by_path():
    src = parse(TEXT, "host.yaml")
    assert src.data["pc2_services"][0]["port"] == 7113
    assert src.lines[("agent_groups", "core_services", "ServiceRegistry", "port")] == 4
    assert src.lines[("pc2_services", 0)] == 6
    assert src.lines[("pc2_services", 0, "port")] == 7
    assert src.problems == ()


def test_line_of_a_missing_key_is_its_nearest_parent():
    src = parse(TEXT, "host.yaml")
    assert src.line(("pc2_services", 0, "script_path")) == 6


def test_location_text():
    assert location(("pc2_services", 3, "port")) == "pc2_services[3].port"
    assert location(("agent_groups", "core", "A", "dependencies", 0)) == "agent_groups.core.A.dependencies[0]"
    assert location(()) == ""


def test_duplicate_agent_in_a_group_is_a_problem():
    src = parse(TEXT.replace("      port: 7200\n", "      port: 7200\n    ServiceRegistry:\n      port: 7201\n"), "h.yaml")
    (problem,) = src.problems
    assert problem.line == 5
    assert problem.location == "agent_groups.core_services.ServiceRegistry"
    assert "duplicate key 'ServiceRegistry' (first at line 3)" in problem.message


def test_merge_keys_are_not_duplicates():
    src = parse("base: &b {port: 1, host: a}\nagent:\n  <<: *b\n  port: 2\n", "h.yaml")
    assert src.problems == ()
    assert src.data["agent"] == {"port": 2, "host": "a"}
    assert src.lines[("agent", "port")] == 4


@pytest.mark.parametrize(
    "text, line, words",
    [
        ("a: [1\nb: 2\n", 2, "column 2"),
        ("a: b: c\n", 1, "column 5: mapping values are not allowed here"),
        ("a: 1\n---\nb: 2\n", 2, "single document"),
        ("x: !!python/object:os.system {}\n", 1, "tag:yaml.org,2002:python/object:os.system is not supported"),
        ("x: !!python/name:os.system ''\n", 1, "could not determine a constructor"),
        ("x: &a [*a]\n", 1, "alias refers to a value that contains it"),
    ],
)
def test_malformed_yaml_is_one_problem_with_line_and_column(text, line, words):
    with pytest.raises(Malformed) as e:
        parse(text, "bad.yaml")
    assert e.value.problem.line == line
    assert words in e.value.problem.message
    assert str(e.value.problem).startswith(f"bad.yaml:{line}: invalid YAML")


def test_control_character_is_malformed_not_a_traceback():
    with pytest.raises(Malformed) as e:
        parse("a: \x07\n", "bad.yaml")
    assert "special characters are not allowed" in e.value.problem.message


def test_non_string_keys_become_strings():
    assert parse("env: {7200: x}\n", "h.yaml").data == {"env": {"7200": "x"}}
