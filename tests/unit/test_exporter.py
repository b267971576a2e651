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


def test_the_spool_and_the_forwarder_are_exported_on_a_store_forward_host():
    collector = AgentsCollector(clock=lambda: 100.0)
    collector.update(json.dumps([]))
    assert "agentvisor_forwarder_partitioned" not in scrape(collector)  # no store_forward
    collector.update(json.dumps([]), json.dumps({
        "state": "partitioned", "pending_records": 1200, "pending_bytes": 360_000,
        "max_bytes": 512 << 20, "oldest_pending_s": 95.5, "refusing": None}))
    text = scrape(collector)
    for line in ("agentvisor_forwarder_partitioned 1.0",
                 "agentvisor_spool_pending_records 1200.0",
                 "agentvisor_spool_pending_bytes 360000.0",
                 "agentvisor_spool_oldest_pending_seconds 95.5",
                 "agentvisor_spool_refusing 0.0"):
        assert line in text, line
    collector.update(json.dumps([]), json.dumps({"state": "forwarding", "refusing": "full",
                                                 "oldest_pending_s": None}))
    text = scrape(collector)
    assert "agentvisor_forwarder_partitioned 0.0" in text
    assert "agentvisor_spool_refusing 1.0" in text
    assert "agentvisor_spool_oldest_pending_seconds 0.0" in text


def test_status_says_partitioned_in_one_line():
    from supervisor.cli import render_metrics

    line = render_metrics({"state": "partitioned", "hub": None, "partitioned_since": 1000.0,
                           "pending_records": 12345, "pending_bytes": 3_700_000,
                           "max_bytes": 512_000_000, "oldest_pending_s": 130.0,
                           "refusing": None}, now=1130.0)
    assert line == ("metrics spool: PARTITIONED for 2m10s, no hub answers; 12,345 pushes "
                    "pending (3.7 of 512 MB), oldest 2m10s")
    assert render_metrics({"state": "idle", "hub": "127.0.0.1:9190", "pending_records": 0,
                           "pending_bytes": 0, "max_bytes": 512_000_000,
                           "oldest_pending_s": None, "refusing": "spool full"}) == (
        "metrics spool: idle to hub 127.0.0.1:9190; 0 pushes pending (0.0 of 512 MB); "
        "REFUSING pushes: spool full")
    assert render_metrics({"state": "data process BACKOFF"}) == \
        "metrics spool: data process BACKOFF"
