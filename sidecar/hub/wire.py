"""The batch format between a host's forwarder and a hub receiver.

`POST /agentvisor/v1/records`, `Content-Type: application/x-agentvisor-records`, a body
of frames, one per record, in spool order:

    4-byte big-endian length H | H bytes of UTF-8 JSON header | 4-byte length B | B bytes

The header is `{"host", "agent", "seq", "time", "method", "path", "content_type"}`; the
body is the agent's push, byte for byte. A length-prefixed binary body is not JSON-escaped
and is sliced, not parsed, so a megabyte push costs one copy on each side.

The one idea: a batch comes from another machine, so `decode` trusts nothing. Every
length is checked against what is left of the batch and against the limits *before*
anything is sliced (a forged 4 GiB length allocates nothing), every header field is
type-checked, and anything the receiver later writes into an HTTP request to the legacy
hub (method, path, content type, host and agent names) is refused if it could split or
smuggle a request. Any malformed frame rejects the whole batch with a `WireError` whose
reason names the frame and what is wrong: the receiver answers 400 with it, stores
nothing, and the sender logs it.

A header that repeats an earlier one's bytes up to its seq and time (as encode writes
them, and as a host's forwarder sends the same few agents all day) is not parsed again:
its text fields are the earlier header's, checked then, and only its two numbers are
read and checked; what json would have made of it is exactly that (see _ENCODED). Any
other header is parsed and checked in full.

Unknown header keys are ignored, so a newer sender can add fields an older receiver
does not know.
"""

from __future__ import annotations

import json
import math
import re
import struct
from typing import Any, Final, Sequence, cast

from sidecar.spool import Record, new_record

PATH: Final = "/agentvisor/v1/records"
CONTENT_TYPE: Final = "application/x-agentvisor-records"

# 8 MiB: eight times the forwarder's default batch (1 MiB), so one push at ingest's body
# limit (1 MiB) always fits in a batch with room to spare, while a receiver never holds
# more than this per request in memory.
MAX_BATCH_BYTES: Final = 8 << 20
# 4 KiB: the header is seven short fields; the request target is the only long one, and
# agents' metric pushes use paths of a few dozen bytes.
MAX_HEADER_BYTES: Final = 4 << 10

_LENGTH: Final = struct.Struct(">I")
# Headers are UTF-8 by the spec: decoded as such, then parsed as text (json.loads on
# bytes would also guess UTF-16/32, and costs a third more per header).
_JSON: Final = json.JSONDecoder()
# The C scanner JSONDecoder itself uses: one value at the start of a string, no checks of
# what follows it (decode's own end check is what _json adds).
_SCAN: Final = cast(Any, _JSON).scan_once
_INF: Final = math.inf
_NAN: Final = math.nan
# (host, agent, method, path, content_type) of a header, once checked.
_Texts = tuple[str, str, str, str, str]
_FIELDS: Final = ("host", "agent", "seq", "time", "method", "path", "content_type")

# RFC 9110 token characters: what a method may be made of.
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# No control characters, no DEL, no space: a request target sent on as it came.
_TARGET: Final = re.compile(r"/[!-~]*\Z")
# Header values (the legacy hub gets these as HTTP header fields): printable ASCII and
# tabs; no CR, LF or other controls, nothing a latin-1 header could not carry.
_FIELD_VALUE: Final = re.compile(r"[\t\x20-\x7e]*\Z")
# SQLite's INTEGER is 64-bit signed: a larger seq could not be stored as a mark.
MAX_SEQ: Final = (1 << 63) - 1
# A header as encode() writes it: HEAD + `"seq":<integer>,"time":<number>}`, where HEAD
# ends in a comma and the numbers are in JSON's grammar without a sign. A header whose
# HEAD is byte for byte that of an earlier header which was parsed as JSON in full and
# passed every check is read without JSON: its fields are the earlier header's with this
# seq and time. That is exactly what json would make of it. The earlier header was a
# JSON object; in it the `"` of `"seq":` (after a comma, not a backslash) opens a string,
# a key, whose object the one brace at the end closes: the top-level one. So HEAD is that
# object's opening and members up to a separating comma, and HEAD + any such tail is the
# same object with this seq and time (the last of a repeated key wins, in json too). The
# numbers are read as json reads them (an integer time, which json makes an int and the
# checks float(), reads as the same float: both round correctly); one out of range (seq
# over MAX_SEQ, time past float) goes to the full parse, whose checks say what is wrong.
# Possessive repeats: a digit run is never given back (nothing after one could match a
# digit), so the pattern's work is linear in the header: a 4 KiB one, however made,
# costs it 20-30 us, what json takes to parse it.
_ENCODED: Final = re.compile(
    rb'(.*,)"seq":([1-9][0-9]{0,18}+),"time":'
    rb'((?:0|[1-9][0-9]*+)(?:\.[0-9]++)?+(?:[eE][-+]?[0-9]++)?+)}', re.DOTALL)
# Those HEADs, with their checked text fields, kept from batch to batch (a receiver
# hears the same few hundred agents' heads all day): HEAD -> (host, agent, method, path,
# content_type). Whether a HEAD qualifies depends on its bytes alone, not on the batch it
# came in. At most MAX_HEADS (emptied when full: a sender that makes every head new only
# slows its own batches down), so at most 4 MiB even of the longest heads.
MAX_HEADS: Final = 1024
_HEADS: Final[dict[bytes, _Texts]] = {}


class WireError(ValueError):
    """A malformed batch (or a record that cannot be framed); `reason` says what, where."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


_DUMPS: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def encode(records: Sequence[Record]) -> bytes:
    """One batch body for `records`, in the order given.

    WireError if a record's header is over MAX_HEADER_BYTES or the batch over
    MAX_BATCH_BYTES (a receiver would refuse it; the caller sends fewer records)."""
    parts: list[bytes] = []
    append = parts.append
    pack = _LENGTH.pack
    size = 0
    # A batch repeats a few (host, agent, method, path, content type): their JSON is
    # made once per batch, and each header adds only its seq and time, in the order
    # and form decode's fast path reads (_ENCODED). The time as %.17g, not repr(): both
    # read back as the same float (17 significant digits always do), and the shortest
    # repr costs 60 % more (7,600 instructions a time against 4,600).
    prefixes: dict[tuple, bytes] = {}
    for record in records:
        texts = (record.host, record.agent, record.method, record.path,
                 record.content_type)
        prefix = prefixes.get(texts)
        if prefix is None:
            prefix = prefixes[texts] = _DUMPS(
                {"host": record.host, "agent": record.agent, "method": record.method,
                 "path": record.path, "content_type": record.content_type}
            )[:-1].encode() + b',"seq":'
        header = b'%b%d,"time":%.17g}' % (prefix, record.seq, record.time)
        if len(header) > MAX_HEADER_BYTES:
            raise WireError(
                f"record {record.host}/{record.agent} seq {record.seq}: header of "
                f"{len(header)} bytes is over {MAX_HEADER_BYTES} (path of "
                f"{len(record.path)} characters)")
        body = record.body
        append(pack(len(header)) + header + pack(len(body)))
        append(body)
        size += 8 + len(header) + len(body)
    if size > MAX_BATCH_BYTES:
        raise WireError(f"batch of {len(records)} records is {size} bytes, over "
                        f"{MAX_BATCH_BYTES}: send fewer records per batch")
    return b"".join(parts)


def _text(header: dict, key: str, frame: int, pattern: re.Pattern[str], what: str,
          empty_ok: bool = False) -> str:
    value = header.get(key)
    if not isinstance(value, str):
        raise WireError(f"frame {frame}: {key} must be a string, not "
                        f"{type(value).__name__}" if key in header
                        else f"frame {frame}: header has no {key}")
    if not value and not empty_ok:
        raise WireError(f"frame {frame}: {key} is empty")
    if not pattern.match(value):
        raise WireError(f"frame {frame}: {key} {value[:80]!r} is not {what}")
    return value


def _record(header: Any, body: bytes, frame: int, valid: set[Any]) -> Record:
    """A Record from one frame's parsed header; `valid` holds the text fields already
    checked in this batch (a batch repeats a few hosts, agents and paths, and the checks
    are most of decode's time after json.loads)."""
    if not isinstance(header, dict):
        raise WireError(f"frame {frame}: header is a JSON {type(header).__name__}, "
                        "not an object")
    seq = header.get("seq")
    # bool is an int in Python; true is not a sequence number.
    if type(seq) is not int or not 1 <= seq <= MAX_SEQ:
        raise WireError(f"frame {frame}: seq must be an integer from 1 to {MAX_SEQ}, "
                        f"not {seq!r}")
    time = header.get("time")
    try:  # an integer past float's range (JSON allows 4,000 digits) is OverflowError
        seconds = float(cast(float, time)) if type(time) in (int, float) else _NAN
    except OverflowError:
        seconds = _NAN
    if not 0.0 <= seconds < _INF:  # NaN fails it too
        raise WireError(f"frame {frame}: time must be unix seconds (a number), "
                        f"not {repr(time)[:80]}")
    texts = (header.get("host"), header.get("agent"), header.get("method"),
             header.get("path"), header.get("content_type"))
    try:
        known = texts in valid
    except TypeError:  # a list or object where a string belongs: _text says which
        known = False
    if not known:
        _text(header, "host", frame, _FIELD_VALUE, "a host name")
        _text(header, "agent", frame, _FIELD_VALUE, "an agent name")
        _text(header, "method", frame, _TOKEN, "an HTTP method")
        _text(header, "path", frame, _TARGET, "a request target (/...)")
        _text(header, "content_type", frame, _FIELD_VALUE, "a header value", empty_ok=True)
        valid.add(texts)
    host, agent, method, path, content_type = cast(_Texts, texts)  # checked above
    return new_record(0, host, agent, seq, seconds, method, path, content_type, body)


def _json(data: bytes, offset: int, length: int, frame: int) -> Any:
    """The header at data[offset:offset + length], parsed as UTF-8 JSON."""
    try:
        text = str(data[offset:offset + length], "utf-8")
        try:
            value, end = _SCAN(text, 0)
            if end == len(text):
                return value
        except StopIteration:  # not a JSON value at all: let decode() say why
            pass
        return _JSON.decode(text)  # whitespace around the value, or an error to report
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise WireError(f"frame {frame} at byte {offset}: header is not UTF-8 JSON "
                        f"({exc})") from None


def decode(data: bytes) -> list[Record]:
    """The records of one batch body, in order, with id 0; WireError if any frame is
    malformed (then none are returned: a batch is taken whole or not at all)."""
    size = len(data)
    if size > MAX_BATCH_BYTES:
        raise WireError(f"batch of {size} bytes is over {MAX_BATCH_BYTES}")
    if type(data) is not bytes:  # a bytearray or memoryview: slices of it must be bytes
        data = bytes(data)
    unpack = _LENGTH.unpack_from
    encoded = _ENCODED.fullmatch
    make = new_record
    heads = _HEADS
    records: list[Record] = []
    append = records.append
    valid: set[Any] = set()
    offset = 0
    while offset < size:  # frame number len(records): each frame adds one record
        if size - offset < 4:
            raise WireError(f"frame {len(records)} at byte {offset}: truncated header "
                            f"length ({size - offset} of 4 bytes)")
        (length,) = unpack(data, offset)
        start = offset + 4
        end = start + length
        if length > MAX_HEADER_BYTES:
            raise WireError(f"frame {len(records)} at byte {offset}: header length "
                            f"{length} is over {MAX_HEADER_BYTES}")
        if end > size:
            raise WireError(f"frame {len(records)} at byte {offset}: header of {length} "
                            f"bytes but only {size - start} left")
        # A header that repeats a known HEAD (see _ENCODED) is read without JSON.
        match = encoded(data, start, end)
        known: _Texts | None = None
        if match is not None:
            head, digits, number = match.groups()
            known = heads.get(head)
            if known is not None:
                seq = int(digits)
                time = float(number)
                if seq > MAX_SEQ or time == _INF:  # the full parse says what is wrong
                    known = None
        if known is None:
            header = _json(data, start, length, len(records))
        if size - end < 4:
            raise WireError(f"frame {len(records)} at byte {end}: truncated body length "
                            f"({size - end} of 4 bytes)")
        (length,) = unpack(data, end)
        offset = end + 4 + length
        if offset > size:
            raise WireError(f"frame {len(records)} at byte {end}: body of {length} bytes "
                            f"but only {size - end - 4} left")
        body = data[end + 4:offset]
        if known is not None:
            host, agent, method, path, content_type = known
            append(make(0, host, agent, seq, time, method, path, content_type, body))
            continue
        # A header parsed in full: the common case inline (exact types and text fields
        # this batch already had checked, a strict subset of what _record accepts);
        # everything else, including every error, goes through _record.
        record = None
        if type(header) is dict:
            given_seq = header.get("seq")
            given_time = header.get("time")
            texts = (header.get("host"), header.get("agent"), header.get("method"),
                     header.get("path"), header.get("content_type"))
            if (type(given_seq) is int and 0 < given_seq <= MAX_SEQ
                    and type(given_time) is float and 0.0 <= given_time < _INF):
                try:
                    checked = texts in valid
                except TypeError:  # a list or object where a string belongs
                    checked = False
                if checked:
                    host, agent, method, path, content_type = cast(_Texts, texts)
                    record = make(0, host, agent, given_seq, given_time, method, path,
                                  content_type, body)
        if record is None:
            record = _record(header, body, len(records), valid)
        append(record)
        if match is not None:  # its HEAD is learnt
            if len(heads) >= MAX_HEADS:
                heads.clear()
            heads[head] = (record.host, record.agent, record.method, record.path,
                           record.content_type)
    return records
