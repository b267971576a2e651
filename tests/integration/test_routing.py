"""Many undeclared destinations through the forward proxy: what operators read about
them (`agentvisor breakers`, /metrics) stays bounded and keeps working."""

import json
import re
import socket
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from tests.integration.harness import free_port

SLEEPER = "import time\nwhile True:\n    time.sleep(1000)\n"
DESTINATIONS = 700  # past the ~600 at which the reply to `breakers` used to exceed 64 KiB
MAX_UPSTREAM_SERIES = 100  # far above the cap, far below the destinations


def through_proxy(proxy_port: int, host: str, port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=20) as s:
        s.sendall(f"GET http://{host}:{port}/ HTTP/1.1\r\nHost: {host}:{port}\r\n"
                  "Connection: close\r\n\r\n".encode())
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return reply


def test_breakers_and_metrics_stay_bounded_with_many_undeclared_destinations(fleet):
    proxy, metrics, dead = free_port(), free_port(), free_port()
    fleet.write_config({
        "upstreams": {"Hub": {"address": f"127.0.0.1:{dead}", "protocol": "http"}},
        "sidecar": {"metrics_listen": f"127.0.0.1:{metrics}",
                    "proxy_listen": f"127.0.0.1:{proxy}"},
        "pc2_services": [{"name": "Svc", "script_path": fleet.script("s.py", SLEEPER),
                          "restart": {"start_s": 0.1}}]})
    fleet.start()
    fleet.wait_state("sidecar", "RUNNING")
    # Distinct loopback addresses on a port nobody listens on: each is refused at once,
    # and each is a new pass-through upstream with its own breaker.
    hosts = [f"127.0.{2 + i // 250}.{1 + i % 250}" for i in range(DESTINATIONS)]
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda h: through_proxy(proxy, h, dead), hosts))
    assert all(r.startswith(b"HTTP/1.1 5") for r in replies), replies[:3]

    listed = fleet.cli("breakers", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert rows[0]["name"] == "Hub"  # declared upstreams always come first
    table = fleet.cli("breakers")
    assert table.returncode == 0, table.stderr
    if len(rows) < DESTINATIONS + 1:  # cut short: the operator is told how many are not shown
        assert re.search(r"\d+ more breakers? not shown", table.stdout + table.stderr)

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics",
                                  timeout=10).read().decode()
    requests = [line for line in text.splitlines()
                if line.startswith("agentvisor_sidecar_requests_total{")]
    upstreams = {re.search(r'upstream="([^"]*)"', line)[1] for line in requests}
    assert "Hub" in upstreams
    assert len(upstreams) <= MAX_UPSTREAM_SERIES, len(upstreams)
    # Folding destinations together loses no request.
    counted = sum(float(line.rsplit(" ", 1)[1]) for line in requests
                  if 'upstream="Hub"' not in line)
    assert counted == DESTINATIONS
    assert "Traceback" not in fleet.supervisor_log()
