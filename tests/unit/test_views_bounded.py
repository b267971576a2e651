"""What operators read about undeclared destinations stays bounded however many an agent
reaches: the breakers reply fits what the supervisor reads, /metrics keeps a fixed
number of series, and neither loses a declared upstream, an open breaker or a count."""

import json
import re
import time

from prometheus_client import CollectorRegistry

from sidecar.config import Protocol, UpstreamPolicy
from sidecar.control import MAX_ROWS_BYTES, bounded, breaker_rows
from sidecar.metrics import (
    MAX_PASS_THROUGH_SERIES,
    OTHER,
    FailureKind,
    Outcome,
    SidecarCollector,
    render,
)
from sidecar.routing import Router
from sidecar.upstream import Upstream

DESTINATIONS = 1000


def scanned_router():
    hub = Upstream(UpstreamPolicy(name="Hub", endpoints=(("10.0.0.1", 9000),),
                                  protocol=Protocol.HTTP))
    r = Router({"Hub": hub}, resolve=False, hosts_file=None)
    for i in range(DESTINATIONS):
        up = r.tcp(f"10.1.{i // 250}.{i % 250}", 80)
        up.stats.done(Outcome.FAILED, 0.001)
        up.stats.failed(FailureKind.REFUSED, up.endpoints[0].label)
    return r, hub


def test_the_breakers_reply_fits_one_read_and_keeps_what_matters_first():
    r, hub = scanned_router()
    now = time.monotonic()
    tripped = r.tcp("10.1.0.7", 80)  # an old destination, with an open breaker
    tripped.breakers()[0].force_open(now)
    r.tcp("10.1.3.200", 80)  # the most recently used
    rows, omitted = bounded(breaker_rows(r.all(), now))
    reply = json.dumps({"ok": True, "breakers": rows, "omitted": omitted}).encode()
    assert len(reply) < 64 * 1024  # asyncio's default line limit, what the supervisor reads
    assert omitted > 0 and len(rows) + omitted == DESTINATIONS + 1
    assert [row["name"] for row in rows[:3]] == ["Hub", "10.1.0.7:80", "10.1.3.200:80"]
    assert bounded([{"name": "x" * MAX_ROWS_BYTES}]) == ([], 1)


def test_metrics_fold_undeclared_destinations_and_keep_every_count():
    r, hub = scanned_router()
    hub.stats.done(Outcome.OK, 0.001)
    registry = CollectorRegistry()
    registry.register(SidecarCollector(r.all))
    lines = render(registry).decode().splitlines()
    requests = [line for line in lines if line.startswith("agentvisor_sidecar_requests_total{")]
    upstreams = {re.search(r'upstream="([^"]*)"', line)[1] for line in requests}
    assert "Hub" in upstreams and OTHER in upstreams
    assert len(upstreams) == 1 + MAX_PASS_THROUGH_SERIES + 1
    failed = sum(float(line.rsplit(" ", 1)[1]) for line in requests if 'outcome="failed"' in line)
    assert failed == DESTINATIONS
    assert (f'agentvisor_sidecar_failures_total{{endpoint="{OTHER}",kind="refused",'
            f'upstream="{OTHER}"}} {DESTINATIONS - MAX_PASS_THROUGH_SERIES}.0') in lines
    count = f'agentvisor_sidecar_request_duration_seconds_count{{upstream="{OTHER}"}}'
    assert [line for line in lines if line.startswith(count)] == [
        f"{count} {DESTINATIONS - MAX_PASS_THROUGH_SERIES}.0"]


def test_a_plain_list_of_upstreams_keeps_a_series_each():
    ups = [Upstream(UpstreamPolicy(name=f"U{i}", endpoints=(("10.0.0.1", 9000 + i),)))
           for i in range(MAX_PASS_THROUGH_SERIES + 5)]
    registry = CollectorRegistry()
    registry.register(SidecarCollector(lambda: ups))
    text = render(registry).decode()
    assert OTHER not in text and 'upstream="U24"' in text
