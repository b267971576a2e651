"""host:port as the sidecar's config takes it: what it accepts, and for what it refuses
an address, the reason `validate` prints."""

import pytest

from sidecar.config import address_problem, parse_address


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:9000", ("127.0.0.1", 9000)),
    ("[::1]:9000", ("::1", 9000)),
    ("mainpc:9000", ("mainpc", 9000)),
    ("pc2.lan.:65535", ("pc2.lan.", 65535)),
    ("obs_hub:1", ("obs_hub", 1)),
])
def test_addresses_accepted(text, expected):
    assert parse_address(text) == expected
    assert address_problem(text) is None


@pytest.mark.parametrize("text, reason", [
    (None, "None is not host:port"),
    ("9000", "'9000' is not host:port"),
    (":9000", "the host is missing"),
    ("hub\0:9000", "it contains a NUL byte"),
    ("hub x:9000", "it contains a space or control character"),
    ("hub:٩٠", "the port '٩٠' is not a number"),  # Arabic-Indic digits: isdigit() says yes
    ("hub:²", "the port '²' is not a number"),  # int() of it raised ValueError
    ("hub:000009000", "is not a number"),
    ("hub:0", "port 0 means any free port; this address needs a fixed one"),
    ("hub:65536", "port 65536 is out of range (at most 65535)"),
    ("::1:9000", "an IPv6 address needs brackets, e.g. [::1]:9000"),
    ("[hub]:9000", "'hub' in brackets is not an IPv6 address"),
    ("-hub:9000", "'-hub' is not an IP address or a host name"),
    ("hub/x:9000", "'hub/x' is not an IP address or a host name"),
    ("a" * 64 + ".lan:9000", "is not an IP address or a host name"),
])
def test_addresses_refused_with_the_reason(text, reason):
    assert parse_address(text) is None
    problem = address_problem(text)
    assert problem is not None and reason in problem


def test_listening_allows_a_free_port_and_needs_a_name_that_resolves():
    assert parse_address("127.0.0.1:0", any_port=True, bind=True) == ("127.0.0.1", 0)
    assert parse_address("localhost:7000", bind=True) == ("localhost", 7000)
    assert parse_address("[::]:7000", bind=True) == ("::", 7000)
    problem = address_problem("no-such-host.invalid:7000", bind=True)
    assert problem is not None and "does not resolve" in problem
    # Connecting is another host's business: its names may only resolve there.
    assert parse_address("no-such-host.invalid:7000") == ("no-such-host.invalid", 7000)
