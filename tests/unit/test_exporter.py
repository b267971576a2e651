"""The agent exporter: the supervisor's rows become agentvisor_agent_* series, and
whatever else arrives is skipped, never fatal."""

import json

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from sidecar.exporter import AgentsCollector

ROW = {"name": "ServiceRegistry", "group": "core_services", "state": "RUNNING", "restarts": 2,
       "healthy": True, "cpu_percent": 12.5, "rss_mb": 20.0, "threads": 4, "fds": 9,
       "uptime_s": 61.0, "last_exit": "killed by SIGKILL"}


def scrape(collector: AgentsCollector) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry).decode()


def test_a_row_becomes_its_series():
    c = AgentsCollector(clock=lambda: 1700000000.0)
    assert c.update(json.dumps([ROW, {"name": "Decay", "group": None, "state": "FATAL",
                                      "restarts": 5, "healthy": None}])) == 2
    text = scrape(c)
    labels = 'agent="ServiceRegistry",group="core_services"'
    for line in (f'agentvisor_agent_up{{{labels}}} 1.0',
                 f'agentvisor_agent_state{{{labels},state="RUNNING"}} 1.0',
                 f'agentvisor_agent_state{{{labels},state="FATAL"}} 0.0',
                 f'agentvisor_agent_restarts_total{{{labels}}} 2.0',
                 f'agentvisor_agent_healthy{{{labels}}} 1.0',
                 f'agentvisor_agent_cpu_percent{{{labels}}} 12.5',
                 f'agentvisor_agent_resident_memory_bytes{{{labels}}} 2.097152e+07',
                 f'agentvisor_agent_threads{{{labels}}} 4.0',
                 f'agentvisor_agent_open_fds{{{labels}}} 9.0',
                 f'agentvisor_agent_last_exit_info{{{labels},last_exit="killed by SIGKILL"}} 1.0',
                 'agentvisor_agent_up{agent="Decay",group=""} 0.0',
                 'agentvisor_agent_state{agent="Decay",group="",state="FATAL"} 1.0',
                 'agentvisor_agents_sampled_timestamp_seconds 1.7e+09'):
        assert line in text, line
    # Unknown health and missing samples are absent, not zero.
    assert 'agentvisor_agent_healthy{agent="Decay"' not in text
    assert 'agentvisor_agent_cpu_percent{agent="Decay"' not in text


@pytest.mark.parametrize("rows", ['{"a": 1}', "not json", "[" * 100000])
def test_what_is_not_a_list_of_rows_is_refused_and_the_last_rows_stay(rows):
    c = AgentsCollector()
    c.update(json.dumps([ROW]))
    with pytest.raises(ValueError):
        c.update(rows)
    assert 'agent="ServiceRegistry"' in scrape(c)


def test_malformed_rows_and_values_are_skipped():
    c = AgentsCollector()
    kept = c.update(json.dumps([1, None, {"state": "RUNNING"}, {"name": 7},
                                {**ROW, "cpu_percent": "lots", "threads": True,
                                 "rss_mb": None}]))
    assert kept == 1
    text = scrape(c)
    assert 'agentvisor_agent_up{agent="ServiceRegistry"' in text
    assert "agentvisor_agent_cpu_percent{" not in text and "agentvisor_agent_threads{" not in text
