"""`resilience:` gives every upstream its policy defaults, and is checked where it is
written, as `hubs:` is."""

from pathlib import Path

from sidecar.config import parse_upstreams
from supervisor.config import validate_file

UPSTREAMS = {
    "Hub": {"address": "127.0.0.1:9000", "protocol": "http", "breaker": {"failures": 9}},
    "Registry": {"address": "127.0.0.1:7200", "protocol": "http", "request_timeout_s": 3},
}


def test_defaults_reach_every_upstream_and_its_own_values_win_key_by_key():
    policies, problems = parse_upstreams(UPSTREAMS, resilience={
        "request_timeout_s": 7, "breaker": {"failures": 2, "open_s": 11}})
    assert problems == []
    hub, registry = policies["Hub"], policies["Registry"]
    assert hub.request_timeout_s == 7 and registry.request_timeout_s == 3
    assert (hub.breaker.failures, hub.breaker.open_s) == (9, 11)  # merged, not replaced
    assert (registry.breaker.failures, registry.breaker.open_s) == (2, 11)


def test_without_resilience_the_builtin_defaults_hold():
    plain, _ = parse_upstreams(UPSTREAMS)
    with_empty, _ = parse_upstreams(UPSTREAMS, resilience={})
    assert plain == with_empty


def test_bad_defaults_are_reported_at_their_place_and_reach_no_upstream():
    policies, problems = parse_upstreams(UPSTREAMS, resilience={
        "request_timeout_s": -1, "address": "127.0.0.1:1", "breaker": {"failures": 0}})
    where = {".".join(map(str, p.path)): p.message for p in problems}
    assert set(where) == {"resilience.request_timeout_s", "resilience.address",
                          "resilience.breaker.failures"}, where
    assert "unknown key" in where["resilience.address"]  # identity is per upstream
    # Nothing of a bad block is applied: the upstreams keep the built-in defaults.
    assert policies == parse_upstreams(UPSTREAMS)[0]
    assert parse_upstreams(None, resilience=[1])[1][0].message.startswith("must be a mapping")


def test_validate_reports_both_with_lines(tmp_path: Path):
    cfg = tmp_path / "host.yaml"
    cfg.write_text("hubs: ['127.0.0.1:9190', 'nowhere']\n"
                   "resilience: {request_timeout_s: -1}\n"
                   "pc2_services:\n  - {name: A, command: [sleep, '1']}\n")
    _, problems = validate_file(cfg, check_machine=False)
    found = {(p.line, p.location) for p in problems if p.severity == "error"}
    assert found == {(1, "hubs[1]"), (2, "resilience.request_timeout_s")}, problems


def test_store_forward_hubs_and_spool_are_read_and_checked():
    from sidecar.config import Deliver, parse_data

    policies, problems = parse_upstreams({
        "Hub": {"address": "127.0.0.1:9000", "protocol": "http", "deliver": "store_forward"},
        "Raw": {"address": "127.0.0.1:9001", "deliver": "store_forward"},
        "Second": {"address": "127.0.0.1:9002", "protocol": "http", "deliver": "store_forward"},
    })
    assert policies["Hub"].deliver is Deliver.STORE_FORWARD
    assert policies["Raw"].deliver is Deliver.PROXY  # refused: tcp has no pushes to keep
    where = {".".join(map(str, p.path)): p.message for p in problems}
    assert "needs protocol: http" in where["upstreams.Raw.deliver"]
    assert "one metrics upstream per host" in where["upstreams.Second.deliver"]

    data, problems = parse_data(["127.0.0.1:9190", "[::1]:9190"],
                                {"max_mb": 64, "sync_interval_s": 0})
    assert problems == []
    assert data.hubs == (("127.0.0.1", 9190), ("::1", 9190))
    assert (data.spool_max_mb, data.sync_interval_s) == (64, 0.0)
    _, problems = parse_data("127.0.0.1:9190", {"max_mb": 0, "extra": 1})
    assert {".".join(map(str, p.path)) for p in problems} == {"hubs", "spool.max_mb",
                                                               "spool.extra"}


def test_hub_block_is_read_and_checked():
    from sidecar.config import HubSettings, parse_data

    data, problems = parse_data(None, None, {"listen": "127.0.0.1:9190",
                                             "deliver_to": "127.0.0.1:9000"})
    assert problems == []
    assert data.hub == HubSettings(listen=("127.0.0.1", 9190), deliver_to=("127.0.0.1", 9000),
                                   peers=())
    # Peers: by default the hubs that are not on this host; or as given.
    data, problems = parse_data(["127.0.0.1:9190", "pc2:9190", "[::1]:9190"], None,
                                {"listen": "0.0.0.0:9190", "deliver_to": "127.0.0.1:9000"})
    assert problems == [] and data.hub.peers == (("pc2", 9190),)
    data, problems = parse_data(["127.0.0.1:9190", "pc2:9190"], None,
                                {"listen": "0.0.0.0:9190", "deliver_to": "127.0.0.1:9000",
                                 "peers": ["10.0.0.2:9190", "edge:9191"]})
    assert problems == [] and data.hub.peers == (("10.0.0.2", 9190), ("edge", 9191))
    for block, where in (({"listen": "127.0.0.1:9190"}, "hub.deliver_to"),
                         ({"listen": "127.0.0.1:9190", "deliver_to": "h:1", "peers": "pc2"},
                          "hub.peers"),
                         ({"listen": "127.0.0.1:9190", "deliver_to": "h:1",
                           "peers": ["pc2"]}, "hub.peers.0"),
                         ({"listen": "127.0.0.1:0", "deliver_to": "127.0.0.1:9000"},
                          "hub.listen"),
                         ({"listen": "127.0.0.1:9190", "deliver_to": "nowhere"},
                          "hub.deliver_to"),
                         ({"listen": "127.0.0.1:9190", "deliver_to": "h:1", "x": 1}, "hub.x"),
                         ([1], "hub")):
        data, problems = parse_data(None, None, block)
        assert data.hub is None
        assert where in {".".join(map(str, p.path)) for p in problems}, (block, problems)
