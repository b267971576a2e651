"""The data process's command line, with plain values: what the supervisor (or an
operator) passes must be read exactly, and a mistake named, not half-understood."""

import argparse

import pytest

from sidecar.args import address, inherited


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:9100", ("127.0.0.1", 9100)),
    ("localhost:0", ("localhost", 0)),
    ("[::1]:9000", ("::1", 9000)),
])
def test_addresses(text, expected):
    assert address(text) == expected


@pytest.mark.parametrize("text, why", [
    ("9100", "is not host:port"), ("host:", "is not a number"),
    (":9100", "the host is missing"), ("host:port", "is not a number"),
    ("host:70000", "out of range"), ("::1:9000", "needs brackets"),
])
def test_bad_addresses_are_named(text, why):
    """The same words as the host config's (sidecar.config.address_problem)."""
    with pytest.raises(argparse.ArgumentTypeError, match=why):
        address(text)


def test_inherited_sockets_by_agent():
    assert inherited("A=5,TutorAgent=6") == {"A": 5, "TutorAgent": 6}
    assert inherited(None) == {} and inherited("") == {}
    with pytest.raises(ValueError, match="AGENT=FD"):
        inherited("A=5,B")
    with pytest.raises(ValueError, match="AGENT=FD"):
        inherited("A=x")
