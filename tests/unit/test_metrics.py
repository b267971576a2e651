"""The sidecar's metrics as Prometheus scrapes them: exact sample lines from a registry
holding a SidecarCollector over upstreams."""

import pytest
from prometheus_client import CollectorRegistry

from sidecar.config import UpstreamPolicy
from sidecar.metrics import (
    CONTENT_TYPE,
    FailureKind,
    Outcome,
    SidecarCollector,
    render,
)
from sidecar.upstream import Upstream


def scrape(upstreams, now: float = 1000.0) -> list[str]:
    registry = CollectorRegistry()
    registry.register(SidecarCollector(lambda: upstreams, clock=lambda: now))
    return render(registry).decode().splitlines()


def samples(lines: list[str], name: str) -> list[str]:
    return [line for line in lines if line.startswith(name + "{") or line.startswith(name + " ")]


@pytest.fixture
def hub():
    return Upstream(UpstreamPolicy(name="Hub",
                                   endpoints=(("10.0.0.1", 9000), ("10.0.0.2", 9100))))


def test_requests_count_every_outcome_from_zero(hub):
    hub.stats.done(Outcome.OK, 0.0003)
    hub.stats.done(Outcome.OK, 0.002)
    hub.stats.done(Outcome.REJECTED, 0.00001)
    lines = scrape([hub])
    assert samples(lines, "agentvisor_sidecar_requests_total") == [
        'agentvisor_sidecar_requests_total{outcome="ok",upstream="Hub"} 2.0',
        'agentvisor_sidecar_requests_total{outcome="failed",upstream="Hub"} 0.0',
        'agentvisor_sidecar_requests_total{outcome="rejected",upstream="Hub"} 1.0',
        'agentvisor_sidecar_requests_total{outcome="fallback",upstream="Hub"} 0.0',
        'agentvisor_sidecar_requests_total{outcome="bad_request",upstream="Hub"} 0.0',
        'agentvisor_sidecar_requests_total{outcome="cancelled",upstream="Hub"} 0.0',
    ]
    assert "# TYPE agentvisor_sidecar_requests_total counter" in lines


def test_duration_histogram_buckets_are_cumulative(hub):
    for d in (0.0003, 0.0005, 0.002, 0.002, 0.7, 12.0):
        hub.stats.done(Outcome.OK, d)
    lines = scrape([hub])
    name = "agentvisor_sidecar_request_duration_seconds"
    assert f"# TYPE {name} histogram" in lines
    assert samples(lines, name + "_bucket") == [
        f'{name}_bucket{{le="0.0005",upstream="Hub"}} 2.0',  # 0.0005 itself is <= 0.0005
        f'{name}_bucket{{le="0.001",upstream="Hub"}} 2.0',
        f'{name}_bucket{{le="0.0025",upstream="Hub"}} 4.0',
        f'{name}_bucket{{le="0.005",upstream="Hub"}} 4.0',
        f'{name}_bucket{{le="0.01",upstream="Hub"}} 4.0',
        f'{name}_bucket{{le="0.025",upstream="Hub"}} 4.0',
        f'{name}_bucket{{le="0.05",upstream="Hub"}} 4.0',
        f'{name}_bucket{{le="0.1",upstream="Hub"}} 4.0',
        f'{name}_bucket{{le="0.25",upstream="Hub"}} 4.0',
        f'{name}_bucket{{le="0.5",upstream="Hub"}} 4.0',
        f'{name}_bucket{{le="1.0",upstream="Hub"}} 5.0',
        f'{name}_bucket{{le="2.5",upstream="Hub"}} 5.0',
        f'{name}_bucket{{le="5.0",upstream="Hub"}} 5.0',
        f'{name}_bucket{{le="10.0",upstream="Hub"}} 5.0',
        f'{name}_bucket{{le="+Inf",upstream="Hub"}} 6.0',
    ]
    assert samples(lines, name + "_count") == [f'{name}_count{{upstream="Hub"}} 6.0']
    (total,) = samples(lines, name + "_sum")
    assert total.startswith(f'{name}_sum{{upstream="Hub"}} 12.7048')
    assert hub.stats.count == 6


def test_failures_retries_and_active(hub):
    hub.stats.failed(FailureKind.REFUSED, "10.0.0.1:9000")
    hub.stats.failed(FailureKind.REFUSED, "10.0.0.1:9000")
    hub.stats.failed(FailureKind.CONNECT_TIMEOUT, "10.0.0.2:9100")
    hub.stats.retried()
    hub.stats.retry_denied()
    hub.stats.retry_denied()
    hub.stats.active += 3
    hub.stats.active -= 1
    lines = scrape([hub])
    assert samples(lines, "agentvisor_sidecar_failures_total") == [
        'agentvisor_sidecar_failures_total{endpoint="10.0.0.1:9000",kind="refused",'
        'upstream="Hub"} 2.0',
        'agentvisor_sidecar_failures_total{endpoint="10.0.0.2:9100",kind="connect_timeout",'
        'upstream="Hub"} 1.0',
    ]
    assert samples(lines, "agentvisor_sidecar_retries_total") == [
        'agentvisor_sidecar_retries_total{upstream="Hub"} 1.0']
    assert samples(lines, "agentvisor_sidecar_retries_denied_total") == [
        'agentvisor_sidecar_retries_denied_total{upstream="Hub"} 2.0']
    assert samples(lines, "agentvisor_sidecar_active_requests") == [
        'agentvisor_sidecar_active_requests{upstream="Hub"} 2.0']
    assert "# TYPE agentvisor_sidecar_active_requests gauge" in lines


def test_breaker_state_trips_and_rejections_at_scrape_time(hub):
    near, far = hub.breakers()
    for t in range(5):
        near.allow(900 + t)
        near.record(False, 900 + t, "connection refused")  # opened at 904
    near.allow(905)  # rejected
    far.force_open(0)
    cache = Upstream(UpstreamPolicy(name="Cache", endpoints=(("10.0.0.3", 6379),)))

    lines = scrape([hub, cache], now=920.0)
    assert samples(lines, "agentvisor_sidecar_breaker_state") == [
        'agentvisor_sidecar_breaker_state{breaker="Hub/10.0.0.1:9000",upstream="Hub"} 2.0',
        'agentvisor_sidecar_breaker_state{breaker="Hub/10.0.0.2:9100",upstream="Hub"} 2.0',
        'agentvisor_sidecar_breaker_state{breaker="Cache",upstream="Cache"} 0.0',
    ]
    assert samples(lines, "agentvisor_sidecar_breaker_trips_total") == [
        'agentvisor_sidecar_breaker_trips_total{breaker="Hub/10.0.0.1:9000",upstream="Hub"} 1.0',
        'agentvisor_sidecar_breaker_trips_total{breaker="Hub/10.0.0.2:9100",upstream="Hub"} 1.0',
        'agentvisor_sidecar_breaker_trips_total{breaker="Cache",upstream="Cache"} 0.0',
    ]
    assert samples(lines, "agentvisor_sidecar_breaker_rejections_total") == [
        'agentvisor_sidecar_breaker_rejections_total{breaker="Hub/10.0.0.1:9000",'
        'upstream="Hub"} 1.0',
        'agentvisor_sidecar_breaker_rejections_total{breaker="Hub/10.0.0.2:9100",'
        'upstream="Hub"} 0.0',
        'agentvisor_sidecar_breaker_rejections_total{breaker="Cache",upstream="Cache"} 0.0',
    ]
    # 30 s after the trip the scrape reads half-open, without admitting anything
    later = scrape([hub], now=934.0)
    assert ('agentvisor_sidecar_breaker_state{breaker="Hub/10.0.0.1:9000",upstream="Hub"} 1.0'
            in later)
    assert near.rejections == 1


def test_no_upstreams_still_renders_and_names_are_registered_once():
    lines = scrape([])
    assert "# TYPE agentvisor_sidecar_requests_total counter" in lines
    assert not [line for line in lines if line and not line.startswith("#")]
    registry = CollectorRegistry()
    registry.register(SidecarCollector(lambda: []))
    with pytest.raises(ValueError):
        registry.register(SidecarCollector(lambda: []))
    assert CONTENT_TYPE.startswith("text/plain")
