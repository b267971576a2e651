"""`resilience:` reaches the real sidecar process: an upstream that never answers is cut
at the host-wide request timeout, not the built-in 10 s."""

import socket
import time
import urllib.error
import urllib.request

from tests.integration.harness import StandaloneSidecar, free_port


def test_a_silent_upstream_is_cut_at_the_resilience_timeout(tmp_path):
    silent = socket.create_server(("127.0.0.1", 0))  # accepts (backlog), never answers
    listen, metrics = free_port(), free_port()
    sidecar = StandaloneSidecar(tmp_path, {
        "upstreams": {"Slow": {"address": f"127.0.0.1:{silent.getsockname()[1]}",
                               "protocol": "http", "listen": f"127.0.0.1:{listen}"}},
        "resilience": {"request_timeout_s": 0.3},
        "sidecar": {"metrics_listen": f"127.0.0.1:{metrics}"}})
    try:
        started = time.monotonic()
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{listen}/metrics", timeout=8)
            status = 200
        except urllib.error.HTTPError as e:
            status = e.code
        took = time.monotonic() - started
        assert status == 504, sidecar.log()
        assert took < 3.0, took  # the built-in request timeout is 10 s
    finally:
        sidecar.stop()
        silent.close()
