"""The forwarder-to-hub batch format: what goes in comes out, byte for byte, and anything
malformed is a WireError naming the frame, never another exception, a misread record or
a large allocation."""

import json
import re
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


# --- a header that repeats a known head is read without JSON, as JSON would read it ------

HEAD = (b'{"host":"PC2","agent":"EdgeAgent","method":"POST","path":"/m",'
        b'"content_type":"application/json",')


def framed(header: bytes, body: bytes = b"x") -> bytes:
    return struct.pack(">I", len(header)) + header + struct.pack(">I", len(body)) + body


def decode_in_full(data: bytes) -> list[Record] | str:
    """decode() with no head known and none learnt: every header parsed as JSON."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(wire, "_HEADS", {})
        m.setattr(wire, "_ENCODED", re.compile(rb"(?!)"))
        try:
            return wire.decode(data)
        except wire.WireError as exc:
            return exc.reason


def outcome(data: bytes) -> list[Record] | str:
    try:
        return wire.decode(data)
    except wire.WireError as exc:
        return exc.reason


def test_encode_writes_headers_decode_reads_without_json(monkeypatch):
    monkeypatch.setattr(wire, "_HEADS", {})
    records = [record(seq=n, time=1_732_990_000.25 + n / 7) for n in range(1, 6)]
    data = wire.encode(records)
    assert wire.decode(data) == records  # the first frame is parsed and teaches its head
    assert len(wire._HEADS) == 1
    parsed = []
    monkeypatch.setattr(wire, "_json", lambda *a: parsed.append(a))
    assert wire.decode(data) == records and parsed == []  # now none is parsed


_digits = st.integers(0, 1 << 70).map(str)
_json_numbers = st.one_of(
    _digits, st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda f: f"{f:.17g}"),
    st.builds(lambda i, f, e: f"{i}.{f}e{e}", _digits, _digits,
              st.integers(-400, 400)))
_tails = st.one_of(_json_numbers, st.sampled_from([
    "0", "00", "01", "-0", "-0.0", "1.", ".5", "1e400", "1" + "0" * 400, "1E5", "1e+5",
    "NaN", "Infinity", "-Infinity", "true", '"7"', " 7", "7 ", "1_0", "0x10", "[]",
    str(wire.MAX_SEQ), str(wire.MAX_SEQ + 1), "9" * 19, "9" * 20]))


@given(seq=_tails, time=_tails, closing=st.sampled_from([b"}", b" }", b"}}", b""]))
@settings(max_examples=1000, deadline=None)
def test_a_known_head_with_any_tail_reads_as_json_reads_it(seq, time, closing):
    header = HEAD + b'"seq":%s,"time":%s%s' % (seq.encode(), time.encode(), closing)
    first = framed(HEAD + b'"seq":1,"time":2.5}')
    expected = decode_in_full(first + framed(header))
    alone = decode_in_full(framed(header))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(wire, "_HEADS", {})
        assert outcome(first + framed(header)) == expected  # learnt from the first frame
        assert outcome(first + framed(header)) == expected  # known from the start
        assert outcome(framed(header)) == alone


@pytest.mark.parametrize("header", [
    # "seq": inside a key, after an escaped quote, not a comma: no head
    b'{"host":"PC2","agent":"EdgeAgent","method":"POST","path":"/m",'
    b'"content_type":"","x\\"seq":2,"time":3}',
    # no comma before "seq": (a space): parsed in full, never learnt
    b'{"host":"PC2","agent":"EdgeAgent","method":"POST","path":"/m",'
    b'"content_type":"", "seq":2,"time":3}',
    # the head's own fields are bad: refused, never learnt
    b'{"host":"PC2","agent":"EdgeAgent","method":"POST","path":"m",'
    b'"content_type":"","seq":2,"time":3}',
    # a head that is not an object's beginning
    b'["host","seq":2,"time":3}',
    b'{"host":"PC2",,"seq":2,"time":3}',
])
def test_odd_heads_are_parsed_in_full_every_time(monkeypatch, header):
    monkeypatch.setattr(wire, "_HEADS", {})
    expected = decode_in_full(framed(header))
    parsed = []
    parse = wire._json
    monkeypatch.setattr(wire, "_json", lambda *a: parsed.append(a) or parse(*a))
    for n in range(1, 3):
        assert outcome(framed(header)) == expected
        assert len(parsed) == n
    assert not wire._HEADS


@pytest.mark.parametrize("head", [
    HEAD,
    b' {\n "trace": {"a": [1, 2.5, null, "x,\\"seq\\":"]},' + HEAD[1:],  # more keys, spaces
    HEAD + b'"seq":99,"time":1e3,',  # an earlier seq and time: the last one wins
    HEAD + b'"path":"/other?a=%22seq%22",',  # an earlier path: the last one wins
    b'{"host":"PC\\u0032","agent":"Edge\\/Agent","method":"PUT","path":"/",'
    b'"content_type":"",',  # escapes, read as json reads them
])
def test_any_head_json_reads_is_learnt_and_read_as_json_reads_it(monkeypatch, head):
    headers = [head + b'"seq":%d,"time":%s}' % (n, t)
               for n, t in ((1, b"2.5"), (2, b"3"), (7, b"1764530000.1234567"))]
    data = b"".join(map(framed, headers))
    expected = decode_in_full(data)
    assert not isinstance(expected, str) and len(expected) == 3
    monkeypatch.setattr(wire, "_HEADS", {})
    assert wire.decode(data) == expected and list(wire._HEADS) == [head]
    assert wire.decode(data) == expected


def test_an_integer_time_past_float_is_a_wire_error(monkeypatch):
    header = HEAD + b'"seq":1,"time":1' + b"0" * 400 + b"}"
    for heads in ({}, {HEAD: ("PC2", "EdgeAgent", "POST", "/m", "application/json")}):
        monkeypatch.setattr(wire, "_HEADS", heads)
        with pytest.raises(wire.WireError, match="frame 0: time must be unix seconds"):
            wire.decode(framed(header))


def test_known_heads_are_bounded(monkeypatch):
    monkeypatch.setattr(wire, "_HEADS", {})
    monkeypatch.setattr(wire, "MAX_HEADS", 8)
    for n in range(20):
        wire.decode(wire.encode([record(agent=f"Agent{n}")]))
        assert 1 <= len(wire._HEADS) <= 8


def test_any_bytes_like_batch_is_read(monkeypatch):
    data = wire.encode([record(seq=1), record(seq=2)])
    for form in (bytearray(data), memoryview(data)):
        monkeypatch.setattr(wire, "_HEADS", {})
        assert wire.decode(form) == wire.decode(data)
        assert all(type(r.body) is bytes for r in wire.decode(form))
