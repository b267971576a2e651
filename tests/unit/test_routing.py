"""Which policy a destination gets: every spelling of a declared place gets the declared
upstream, and undeclared places get a pass-through one."""

from sidecar.config import Protocol, UpstreamPolicy
from sidecar.routing import Router
from sidecar.upstream import Upstream


def router(endpoint, hosts_file=None, resolve=True):
    hub = Upstream(UpstreamPolicy(name="Hub", endpoints=(endpoint,), protocol=Protocol.HTTP))
    return Router({"Hub": hub}, resolve=resolve, hosts_file=hosts_file), hub


def test_localhost_gets_the_policy_declared_for_127_0_0_1():
    r, hub = router(("127.0.0.1", 7113), resolve=False)
    for spelling in (b"localhost", b"LOCALHOST", b"localhost.", b"agent.localhost",
                     b"127.1", b"::ffff:127.0.0.1", b"0x7f000001"):
        assert r.http(spelling, 7113) is hub, spelling
    assert r.tcp("::ffff:127.0.0.1", 7113) is hub
    # Another port, or another loopback address, is another place.
    assert r.http(b"localhost", 7114) is not hub
    assert r.http(b"127.0.0.2", 7113) is not hub


def test_a_name_in_the_hosts_file_gets_the_policy_of_its_address(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# comment\n10.9.8.7  hub.lan hub   # the hub\n::1 ip6-localhost\n")
    r, hub = router(("10.9.8.7", 80), hosts_file=hosts, resolve=False)
    assert r.http(b"hub.lan", 80) is hub and r.http(b"HUB", 80) is hub
    assert r.http(b"other.lan", 80) is not hub


def test_a_declared_name_is_matched_by_name_and_v6_loopback_by_its_forms():
    r, hub = router(("::1", 9000), resolve=False)
    assert r.http(b"0:0:0:0:0:0:0:1", 9000) is hub
    assert r.http(b"ip6-localhost", 9000) is hub
    r, hub = router(("hub.example", 443), resolve=False)
    assert r.http(b"Hub.Example.", 443) is hub


def test_an_unknown_name_costs_no_lookup_and_gets_a_pass_through(monkeypatch):
    import socket

    r, hub = router(("127.0.0.1", 7113), resolve=False)

    def no_dns(*args, **kwargs):
        raise AssertionError("DNS on the request path")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    up = r.http(b"somewhere.example", 7113)
    assert up is not hub and up.name == "somewhere.example:7113"
    assert r.http(b"somewhere.example", 7113) is up
