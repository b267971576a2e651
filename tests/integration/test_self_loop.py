"""The sidecar never calls itself. An absolute-form request to the forward proxy's own
address used to make the sidecar connect to itself until it held every descriptor it
could open, while /ready still said ready; a config whose upstream is the sidecar's own
listener passed `validate`."""

from __future__ import annotations

import http.client
import socket
import subprocess
import sys
import textwrap

import pytest

from sidecar.config import UpstreamPolicy, parse_sidecar, parse_upstreams
from sidecar.routing import Router, self_loops
from tests.integration.harness import ROOT, StandaloneSidecar, free_port


def _own_address() -> str | None:
    """An address of this host that is not loopback, if it has one."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a route
            address = s.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


def test_a_forward_request_to_the_sidecars_own_listeners_is_refused(tmp_path):
    ports = {name: free_port() for name in ("proxy", "metrics", "Hub")}
    sidecar = StandaloneSidecar(tmp_path, {
        "upstreams": {"Hub": {"address": "127.0.0.1:9", "protocol": "http",
                              "listen": f"127.0.0.1:{ports['Hub']}"}},
        "sidecar": {"proxy_listen": f"0.0.0.0:{ports['proxy']}",
                    "metrics_listen": f"127.0.0.1:{ports['metrics']}"}})
    try:
        before = sidecar.descriptors()
        hosts = ["127.0.0.1", "localhost", "127.0.0.2", "[::ffff:127.0.0.1]", "0.0.0.0"]
        own = _own_address()
        if own:
            hosts.append(own)
        for host in hosts:
            for port in (ports["proxy"], ports["metrics"], ports["Hub"]):
                conn = http.client.HTTPConnection("127.0.0.1", ports["proxy"], timeout=5)
                conn.request("GET", f"http://{host}:{port}/loop")
                answer = conn.getresponse()
                answer.read()
                conn.close()
                assert answer.status == 502, (host, port, answer.status)
        assert sidecar.descriptors() < before + 10
        assert sidecar.ready()
        assert "loop back" in sidecar.log()
    finally:
        sidecar.stop()


def test_the_transparent_route_to_an_own_listener_is_refused():
    router = Router({}, resolve=False)
    router.serving(15001)
    assert router.tcp("127.0.0.1", 15001) is None
    assert router.tcp("127.0.0.53", 15001) is None
    assert router.http(b"localhost", 15001) is None
    assert router.tcp("127.0.0.1", 15002) is not None  # another port is another place
    assert router.tcp("192.0.2.7", 15001) is not None  # another host


@pytest.mark.parametrize("address", ["127.0.0.1:15001", "localhost:15001", "0.0.0.0:15002"])
def test_validate_refuses_an_upstream_that_is_the_sidecars_own_listener(address):
    policies, problems = parse_upstreams({
        "Loop": {"address": address, "protocol": "http", "listen": "127.0.0.1:15002"}})
    settings, more = parse_sidecar({"proxy_listen": "127.0.0.1:15001"})
    assert problems == more == []
    [problem] = self_loops(policies, settings)
    assert problem.location == "upstreams.Loop.address"
    assert "loop back into the sidecar" in problem.message


def test_validate_accepts_the_same_port_on_another_host():
    policies, _ = parse_upstreams({"Far": {"address": "10.1.2.3:15001", "protocol": "http"}})
    settings, _ = parse_sidecar({"proxy_listen": "127.0.0.1:15001"})
    assert self_loops(policies, settings) == []
    assert isinstance(policies["Far"], UpstreamPolicy)


def test_ready_fails_when_descriptors_run_out():
    # A process near its descriptor limit cannot accept or connect: /ready must say so,
    # so that the supervisor's probe restarts the sidecar.
    script = textwrap.dedent("""
        import resource, os
        from sidecar.main import descriptors_full
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        assert descriptors_full() == "", descriptors_full()
        held = [os.open("/dev/null", os.O_RDONLY) for _ in range(60)]
        print(descriptors_full())
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("descriptors: ") and "of 64 open" in out.stdout
