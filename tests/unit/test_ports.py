"""Port expressions as MainPC's real file writes them ("${PORT_OFFSET}+7200"), evaluated
once into the int every probe, AGENT_PORT and duplicate check uses."""

import pytest

from supervisor.config.ports import Port, PortError, evaluate


@pytest.mark.parametrize(
    "written, environ, expected",
    [
        (7200, {}, Port(7200, None)),
        ("7200", {}, Port(7200, None)),  # a number in quotes is a number
        (" 7200 ", {}, Port(7200, None)),
        ("${AGENT_PORT_BASE}", {"AGENT_PORT_BASE": "7300"}, Port(7300, "${AGENT_PORT_BASE}")),
        ("${PORT_OFFSET}+7200", {"PORT_OFFSET": "100"}, Port(7300, "${PORT_OFFSET}+7200")),
        ("7200+${PORT_OFFSET}", {"PORT_OFFSET": "100"}, Port(7300, "7200+${PORT_OFFSET}")),
        ("${PORT_OFFSET} + 7200", {"PORT_OFFSET": "100"}, Port(7300, "${PORT_OFFSET} + 7200")),
        ("7200 +${PORT_OFFSET}", {"PORT_OFFSET": " 1 "}, Port(7201, "7200 +${PORT_OFFSET}")),
        ("${PORT_OFFSET}+7200", {"PORT_OFFSET": "-100"}, Port(7100, "${PORT_OFFSET}+7200")),
        ("${PORT_OFFSET}+07200", {"PORT_OFFSET": "0"}, Port(7200, "${PORT_OFFSET}+07200")),
    ],
)
def test_the_forms_the_files_use(written, environ, expected):
    assert evaluate(written, environ) == expected


def test_port_offset_comes_from_the_environment_else_the_file_else_zero():
    assert evaluate("${PORT_OFFSET}+7200", {"PORT_OFFSET": "10"}, port_offset=500).value == 7210
    assert evaluate("${PORT_OFFSET}+7200", {}, port_offset=500).value == 7700
    assert evaluate("${PORT_OFFSET}+7200", {}).value == 7200
    # Only PORT_OFFSET has a default: the old launcher's.
    with pytest.raises(PortError, match="OFFSET2 is not set in the supervisor's environment"):
        evaluate("${OFFSET2}+7200", {}, port_offset=500)


def test_an_unset_variable_is_named_with_what_to_do():
    with pytest.raises(PortError) as e:
        evaluate("${BASE}+7200", {"PORT_OFFSET": "0"})
    assert str(e.value) == (
        '"${BASE}+7200": BASE is not set in the supervisor\'s environment; set it there '
        "(e.g. Environment= in its systemd unit) or write the port as a number")


@pytest.mark.parametrize(
    "written, environ, message",
    [
        ("${PORT_OFFSET}+70000", {}, '"${PORT_OFFSET}+70000" (= 70000) is not a port between 1024 and 65535'),
        ("${PORT_OFFSET}+1000", {}, '"${PORT_OFFSET}+1000" (= 1000) is not a port between 1024 and 65535'),
        ("${PORT_OFFSET}+7200", {"PORT_OFFSET": "60000"}, "(= 67200) is not a port"),
        ("80", {}, '"80" (= 80) is not a port between 1024 and 65535'),
        (80, {}, "80 is not a port between 1024 and 65535"),
        ("${PORT_OFFSET}+7200", {"PORT_OFFSET": "abc"}, "PORT_OFFSET is 'abc' in the supervisor's environment, not a whole number"),
        ("${PORT_OFFSET}+7200", {"PORT_OFFSET": "--1"}, "not a whole number"),
        ("${PORT_OFFSET}+7200", {"PORT_OFFSET": ""}, "not a whole number"),
        ("${A}+${B}", {"A": "1", "B": "7200"}, 'is not a port: write a number (7200), "${VAR}", "${VAR}+N" or "N+${VAR}"'),
        ("7200abc", {}, '"7200abc" is not a port: write a number'),
        ("${PORT_OFFSET}-1", {}, '"${PORT_OFFSET}-1" is not a port'),
        ("$PORT_OFFSET+7200", {}, "is not a port: write"),
        ("", {}, '"" is not a port'),
        ("9" * 5000, {}, "far larger than any port"),  # never handed whole to int()
        ("${PORT_OFFSET}+" + "9" * 30, {}, "far larger than any port"),
        ("${PORT_OFFSET}+7200", {"PORT_OFFSET": "9" * 5000}, "far larger than any port"),
        (True, {}, "True is not a port"),
        (7200.0, {}, "7200.0 is not a port"),
    ],
)
def test_what_is_no_port_says_why(written, environ, message):
    with pytest.raises(PortError) as e:
        evaluate(written, environ)
    assert message in str(e.value)


def test_describe_shows_the_expression_and_its_value():
    assert Port(7200, None).describe() == "7200"
    assert Port(7200, "${PORT_OFFSET}+7200").describe() == '"${PORT_OFFSET}+7200" (= 7200)'
