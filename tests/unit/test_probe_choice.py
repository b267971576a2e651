"""Which probe an agent gets, and how status names it: the legacy default falls back to
the main port (as the old launcher judged readiness) only when nothing but the legacy
fields chose it."""

from pathlib import Path
from textwrap import dedent

import pytest

from supervisor.config import ProbeKind, load
from supervisor.config.model import HealthCheck
from supervisor.health import describe


def probe_of(tmp_path: Path, agent: str):
    (tmp_path / "a.py").touch()
    path = tmp_path / "host.yaml"
    path.write_text(dedent(f"""\
        pc2_services:
          - {{name: Agent, script_path: a.py, {agent}}}
        """))
    return load(path, check_machine=False).agent("Agent").health


def test_legacy_ports_probe_the_health_port_and_fall_back_to_the_main_port(tmp_path):
    h = probe_of(tmp_path, "port: 7200, health_check_port: 8200")
    assert (h.kind, h.port, h.fallback_port) == (ProbeKind.TCP, 8200, 7200)


def test_native_timing_alone_keeps_the_fallback(tmp_path):
    h = probe_of(tmp_path, "port: 7200, health_check_port: 8200, "
                           "health: {interval_s: 2, start_timeout_s: 5}")
    assert (h.port, h.fallback_port, h.start_timeout_s) == (8200, 7200, 5)


@pytest.mark.parametrize("agent, port", [
    # The operator chose the probe: it is judged exactly as written.
    ("port: 7200, health_check_port: 8200, health: {port: 9200}", 9200),
    ("port: 7200, health_check_port: 8200, health: {type: tcp}", 8200),
    # Only one port: there is nothing to fall back to.
    ("port: 7200", 7200),
    ("health_check_port: 8200", 8200),
])
def test_no_fallback_when_the_probe_was_chosen_or_there_is_one_port(tmp_path, agent, port):
    h = probe_of(tmp_path, agent)
    assert (h.kind, h.port, h.fallback_port) == (ProbeKind.TCP, port, None)


def test_an_http_probe_never_falls_back(tmp_path):
    h = probe_of(tmp_path, "port: 7200, health_check_port: 8200, health: {type: http}")
    assert (h.kind, h.port, h.fallback_port) == (ProbeKind.HTTP, 8200, None)


@pytest.mark.parametrize("check, via, shown", [
    (HealthCheck(ProbeKind.TCP, port=8200, fallback_port=7200), None, "tcp :8200"),
    (HealthCheck(ProbeKind.TCP, port=8200, fallback_port=7200), 7200,
     "tcp :7200 (main port; nothing listens on health port 8200)"),
    (HealthCheck(ProbeKind.HTTP, port=9100, path="/ready"), None, "http :9100/ready"),
    (HealthCheck(ProbeKind.TCP, host="10.0.0.2", port=4223), None, "tcp 10.0.0.2:4223"),
    (HealthCheck(ProbeKind.TCP, host="::1", port=4223), None, "tcp [::1]:4223"),
    (HealthCheck(ProbeKind.EXEC, command=("nats-server", "--version")), None,
     "exec nats-server --version"),
    (HealthCheck(ProbeKind.NONE), None, "none"),
])
def test_status_names_the_probe_in_use(check, via, shown):
    assert describe(check, via) == shown
