"""The forwarder-to-hub batch format: what goes in comes out, byte for byte, and anything
malformed is a WireError naming the frame, never another exception, a misread record or
a large allocation."""

import json
import struct
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.hub import wire
from sidecar.spool import Record


def record(seq=1, agent="ModelManagerAgent", body=b'{"cpu": 1.5}', **kw) -> Record:
    fields = dict(id=0, host="MainPC", agent=agent, seq=seq, time=1_732_990_000.25,
                  method="POST", path="/api/metrics?src=agent", content_type="application/json",
                  body=body)
    fields.update(kw)
    return Record(**fields)


def frame(header: object, body: bytes = b"", raw_header: bytes | None = None) -> bytes:
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack(">I", len(h)) + h + struct.pack(">I", len(body)) + body


GOOD = {"host": "PC2", "agent": "EdgeAgent", "seq": 7, "time": 1.5, "method": "POST",
        "path": "/m", "content_type": ""}


def test_round_trip_keeps_order_and_bodies():
    records = [record(seq=1), record(seq=2, body=b"\x00\xff" * 1000),
               record(seq=1, agent="Other", content_type="", method="PUT", path="/")]
    assert wire.decode(wire.encode(records)) == records


def test_empty_batch_is_no_records():
    assert wire.encode([]) == b""
    assert wire.decode(b"") == []


def test_decoded_ids_are_zero():
    assert [r.id for r in wire.decode(wire.encode([record(id=41)]))] == [0]


def test_unknown_header_keys_are_ignored():
    (r,) = wire.decode(frame({**GOOD, "trace": "x"}, b"body"))
    assert (r.agent, r.seq, r.body) == ("EdgeAgent", 7, b"body")


@pytest.mark.parametrize("change, words", [
    ({"seq": "7"}, "seq must be an integer"),
    ({"seq": True}, "seq must be an integer"),
    ({"seq": 0}, "seq must be an integer"),
    ({"seq": 1 << 63}, "seq must be an integer"),
    ({"seq": 1.0}, "seq must be an integer"),
    ({"time": "now"}, "time must be unix seconds"),
    ({"time": -1}, "time must be unix seconds"),
    ({"host": ""}, "host is empty"),
    ({"agent": 5}, "agent must be a string, not int"),
    ({"host": ["PC2"]}, "host must be a string, not list"),
    ({"path": {"p": 1}}, "path must be a string, not dict"),
    ({"method": "PO ST"}, "not an HTTP method"),
    ({"method": ""}, "method is empty"),
    ({"path": "api/metrics"}, "not a request target"),
    ({"path": "/a\r\nX-Injected: 1"}, "not a request target"),
    ({"path": "/a b"}, "not a request target"),
    ({"content_type": "text/plain\r\nX: y"}, "content_type"),
    ({"agent": "Ag\nent"}, "not an agent name"),
])
def test_bad_header_fields_are_refused_with_the_field_named(change, words):
    with pytest.raises(wire.WireError) as err:
        wire.decode(frame({**GOOD, **change}))
    assert words in err.value.reason
    assert err.value.reason.startswith("frame 0")


def test_missing_field_is_named():
    header = dict(GOOD)
    del header["path"]
    with pytest.raises(wire.WireError, match="frame 0: header has no path"):
        wire.decode(frame(header))


def test_non_finite_time_is_refused():
    raw = json.dumps(GOOD).replace('"time": 1.5', '"time": NaN').encode()
    with pytest.raises(wire.WireError, match="time"):
        wire.decode(frame(None, raw_header=raw))


@pytest.mark.parametrize("raw, words", [
    (b"{not json", "not UTF-8 JSON"),
    (b"\xff\xfe{}", "not UTF-8 JSON"),
    (b"[1, 2]", "header is a JSON list"),
    (b"[" * 2000 + b"]" * 2000, "not UTF-8 JSON"),  # nested past the recursion limit
])
def test_bad_json_headers_are_refused(raw, words):
    with pytest.raises(wire.WireError, match=words):
        wire.decode(frame(None, raw_header=raw))


def test_the_second_bad_frame_rejects_the_whole_batch_and_names_it():
    data = wire.encode([record(seq=1)]) + frame({**GOOD, "seq": -3})
    with pytest.raises(wire.WireError, match="frame 1"):
        wire.decode(data)


def test_every_truncation_is_an_error_or_a_whole_frame_prefix():
    records = [record(seq=1), record(seq=2, body=b"x" * 50)]
    data = wire.encode(records)
    first = len(wire.encode(records[:1]))
    for cut in range(1, len(data)):
        if cut == first:
            assert wire.decode(data[:cut]) == records[:1]
            continue
        with pytest.raises(wire.WireError, match="truncated|only .* left"):
            wire.decode(data[:cut])


def test_lengths_past_the_end_are_refused():
    good = frame(GOOD, b"abc")
    with pytest.raises(wire.WireError, match="body of 4 bytes but only 3 left"):
        wire.decode(good[:-7] + struct.pack(">I", 4) + b"abc")
    with pytest.raises(wire.WireError, match="header of 100 bytes but only"):
        wire.decode(struct.pack(">I", 100) + b"{}")


def test_huge_lengths_do_not_allocate():
    header = json.dumps(GOOD).encode()
    forged = [struct.pack(">I", 0xFFFF_FFFF) + header,  # header length
              struct.pack(">I", len(header)) + header + struct.pack(">I", 0xFFFF_FFFF)]
    tracemalloc.start()
    try:
        for data in forged:
            with pytest.raises(wire.WireError):
                wire.decode(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_header_limit():
    over = frame(None, raw_header=b" " * (wire.MAX_HEADER_BYTES + 1))
    with pytest.raises(wire.WireError, match=f"header length {wire.MAX_HEADER_BYTES + 1} "
                                             f"is over {wire.MAX_HEADER_BYTES}"):
        wire.decode(over)
    long_path = record(path="/" + "p" * wire.MAX_HEADER_BYTES)
    with pytest.raises(wire.WireError, match="MainPC/ModelManagerAgent seq 1: header of"):
        wire.encode([long_path])


def test_batch_limit():
    with pytest.raises(wire.WireError, match="over"):
        wire.decode(b"\x00" * (wire.MAX_BATCH_BYTES + 1))
    big = [record(seq=i, body=b"b" * (1 << 20)) for i in range(1, 10)]
    with pytest.raises(wire.WireError, match="send fewer records"):
        wire.encode(big)
    # Seven 1 MiB pushes (ingest's body limit) fit in one batch.
    fits = wire.encode(big[:7])
    assert len(fits) <= wire.MAX_BATCH_BYTES
    assert len(wire.decode(fits)) == 7


# --- properties ---------------------------------------------------------------------------

_visible = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1,
                   max_size=30)
_records = st.builds(
    Record, id=st.just(0), host=_visible, agent=_visible,
    seq=st.integers(1, wire.MAX_SEQ),
    time=st.floats(0, 4e9, allow_nan=False, allow_infinity=False),
    method=st.sampled_from(["POST", "PUT", "PATCH"]),
    path=st.builds(lambda s: "/" + s,
                   st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E),
                           max_size=60)),
    content_type=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E),
                         max_size=40),
    body=st.binary(max_size=300))


@given(st.lists(_records, max_size=20))
@settings(max_examples=300, deadline=None)
def test_round_trip_property(records):
    assert wire.decode(wire.encode(records)) == records


@given(st.binary(max_size=200))
@settings(max_examples=500, deadline=None)
def test_garbage_is_only_ever_a_wire_error(data):
    try:
        records = wire.decode(data)
    except wire.WireError:
        return
    assert all(isinstance(r, Record) for r in records)


@given(st.lists(_records, min_size=1, max_size=5), st.data())
@settings(max_examples=300, deadline=None)
def test_a_changed_byte_is_refused_or_reads_as_well_formed_records(records, data):
    encoded = bytearray(wire.encode(records))
    at = data.draw(st.integers(0, len(encoded) - 1))
    encoded[at] = data.draw(st.integers(0, 255).filter(lambda b: b != encoded[at]))
    try:
        decoded = wire.decode(bytes(encoded))
    except wire.WireError:
        return
    # Whatever still parses passed every check a receiver relies on.
    for r in decoded:
        assert r.seq >= 1 and r.path.startswith("/") and "\n" not in r.content_type
