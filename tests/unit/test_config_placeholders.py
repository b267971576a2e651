"""${NAME} secrets and ${upstream:NAME} upstreams in env values."""

import pytest

from supervisor.config.placeholders import expand, find


def test_find_secrets_and_upstreams():
    assert find("nats://user:${NATS_PASSWORD}@${upstream:NATS}") == [
        (None, "NATS_PASSWORD"),
        ("upstream", "NATS"),
    ]


def test_find_reports_unknown_kinds_as_written():
    assert find("${foo:bar}") == [("foo", "bar")]


def test_escaped_dollar_is_not_a_placeholder():
    assert find("$${NOT_A_SECRET} and ${REAL}") == [(None, "REAL")]
    assert expand("$${NOT_A_SECRET} and ${REAL}", {"REAL": "x"}) == "${NOT_A_SECRET} and x"


def test_text_without_placeholders_is_unchanged():
    assert find("plain $HOME {x}") == []
    assert expand("plain $HOME {x}", {}) == "plain $HOME {x}"


def test_expand_fills_secrets_and_upstreams():
    values = {"NATS_PASSWORD": "s3cret", "upstream:ObservabilityHub": "127.0.0.1:41000"}
    assert expand("http://${upstream:ObservabilityHub}/push", values) == "http://127.0.0.1:41000/push"
    assert expand("${NATS_PASSWORD}", values) == "s3cret"


def test_expand_names_the_missing_key():
    with pytest.raises(KeyError) as e:
        expand("http://${upstream:Hub}", {"Hub": "not an upstream"})
    assert e.value.args == ("upstream:Hub",)
    with pytest.raises(KeyError) as e:
        expand("${NATS_PASSWORD}", {})
    assert e.value.args == ("NATS_PASSWORD",)
