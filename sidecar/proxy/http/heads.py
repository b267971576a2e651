"""Reading HTTP/1.1 heads: what a request's or an answer's fields say to the proxy.

Pure functions over bytes llhttp has already accepted, and the small caches that spare
the hot path a scan: an agent or an upstream sends the same few heads over and over, so
what a head's fields say is kept by the head's shape (its digits zeroed). The bad input
they find is raised as `BadMessage` or `HeadTooLarge`; the connection's owner answers it.

Compiled: part of the hot path mypyc compiles (sidecar/compile.py), so its types are
exact, not hints: mypyc checks declared attribute and argument types at run time, and
narrows an attribute after an assignment in a method (read it in another method if a
call in between may change it). The tests run it compiled and interpreted.
"""

from __future__ import annotations

import re
from typing import Final


class HeadTooLarge(Exception):
    pass


class BadMessage(Exception):
    """A message whose framing is in doubt, or that is not HTTP/1.x the proxy serves."""


# Headers that describe one connection, not the message (RFC 9110 7.6.1), plus the
# proxy's own credentials: never forwarded. Each side of the proxy frames its own
# connection.
HOP_BY_HOP: Final = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te",
                         b"trailer", b"upgrade", b"proxy-authorization"})
# What an answer's rebuilt head leaves out: the above, and Transfer-Encoding (the proxy
# frames the body afresh).
NOT_FORWARDED: Final = HOP_BY_HOP | {b"transfer-encoding"}
# Their lines, each with the CRLF before it, in any spelling: one pass removes them all
# (three times cheaper than a Python loop over the lines).
_NOT_FORWARDED_LINES: Final = re.compile(
    rb"\r\n(?:%s):[^\r]*" % b"|".join(sorted(NOT_FORWARDED)), re.IGNORECASE)
# Connection tokens that name no header to drop.
_CONNECTION_OPTIONS: Final = frozenset({b"close", b"keep-alive", b"upgrade"})
# Fields that frame the message: never hop-by-hop, whatever Connection says. A message
# whose Connection names one would lose its framing on the way while its body still
# went: the next hop would read that body as another message (request smuggling).
_FRAMING_NAMES: Final = frozenset({b"content-length", b"transfer-encoding"})
# The request lines the proxy serves end in one of these (llhttp also takes HTTP/0.9
# lines, "GET /", which have no head to rewrite and no framing: refused).
HTTP11: Final = b" HTTP/1.1"
HTTP10: Final = b" HTTP/1.0"
# The headers the proxy looks at, by lower-case name; any other (PLAIN) is forwarded as
# it is.
DROP: Final = 0
CONNECTION: Final = 1
HOST: Final = 2
TRANSFER_ENCODING: Final = 3
CONTENT_LENGTH: Final = 4
PLAIN: Final = 5
_SPECIAL: Final = {name: DROP for name in HOP_BY_HOP}
_SPECIAL.update({b"connection": CONNECTION, b"host": HOST,
                 b"transfer-encoding": TRANSFER_ENCODING, b"content-length": CONTENT_LENGTH})
# The same by exact spelling, learnt as names arrive: one dict lookup per header line
# instead of a lower() and a lookup. Peers use a few spellings each; the bounds keep odd
# ones from growing it (those take the long way, to the same answer).
KIND_BY_SPELLING: dict[bytes, int] = {}
_SPELLINGS_MAX: Final = 1024
_SPELLING_MAX_BYTES: Final = 64


def kind_of(name: bytes) -> int:
    kind = _SPECIAL.get(name.lower(), PLAIN)
    if len(name) <= _SPELLING_MAX_BYTES and len(KIND_BY_SPELLING) < _SPELLINGS_MAX:
        KIND_BY_SPELLING[name] = kind
    return kind


# An answer's head is read from its bytes, not field by field: one pass over the
# lower-cased head finds the fields the proxy acts on, with their values. llhttp
# (strict, as httptools runs it) refuses bare LF, folded lines and space before the
# colon, so a field line begins right after a CRLF and a match is exactly a field
# llhttp parsed. An answer forwarded as it came has only Content-Length, chunked
# framing and Connection: keep-alive among them. A value with trailing whitespace does
# not compare equal and takes the long way (a lazy match that trims it costs twice as
# much, on every answer).
FRAMING_FIELDS: Final = re.compile(
    rb"\r\n(connection|keep-alive|proxy-connection|te|trailer|upgrade|proxy-authorization"
    rb"|transfer-encoding|content-length):[ \t]*([^\r]*)")

# The request fields the proxy acts on: the answer's names, and Host.
_REQUEST_FIELDS: Final = re.compile(
    rb"\r\n(host|connection|keep-alive|proxy-connection|te|trailer|upgrade"
    rb"|proxy-authorization|transfer-encoding|content-length):[ \t]*([^\r]*)")
CHUNKED_BODY: Final = 2
GET: Final = b"GET"
# What a request head's fields say: see `request_known`.
RequestShape = tuple[tuple[int, ...], int, bytes | None]

# Answer heads by shape (digits zeroed) -> framing, per upstream; cleared when full.
# A read this small is searched by partition(), which copies what follows the match.
SMALL_READ: Final = 4096
ZERO_DIGITS: Final = bytes.maketrans(b"123456789", b"000000000")
FRAMINGS_MAX: Final = 256

# Connection values naming no field, as servers and clients spell them: nothing to drop,
# known without splitting the value (most responses carry one). Any other spelling takes
# the long way, to the same result.
PLAIN_CONNECTION: Final = frozenset({b"keep-alive", b"Keep-Alive", b"close", b"Close"})

# How a response body goes to the agent.
NO_BODY: Final = 0
AS_IS: Final = 1
RECHUNK: Final = 2



def split_target(url: bytes, host: bytes | None) -> tuple[bytes, bytes]:
    """A forward proxy's request target -> (authority, origin-form target)."""
    if url[:7].lower() == b"http://":
        rest = url[7:]
        end = len(rest)
        for sep in (b"/", b"?"):
            i = rest.find(sep)
            if 0 <= i < end:
                end = i
        authority, target = rest[:end], rest[end:]
        if not target.startswith(b"/"):
            target = b"/" + target
        authority = authority.rpartition(b"@")[2]  # userinfo is not forwarded
        if authority:
            return authority, target
    elif url.startswith(b"/") and host:
        return host, url  # origin-form to the proxy: the Host header names the destination
    raise BadMessage  # https:// (use CONNECT), no host, or not a URL


def host_port(authority: bytes) -> tuple[bytes, int]:
    """b'host:port' -> (b'host', port); port 80 when absent; port 0 when unreadable."""
    host, sep, port = authority.rpartition(b":")
    if not sep or b"]" in port:  # no port, or the colon was inside an IPv6 literal
        host, port = authority, b"80"
    if host.startswith(b"[") and host.endswith(b"]"):
        host = host[1:-1]
    return host, int(port) if port.isdigit() and 0 < int(port) < 65536 else 0


def answer_known(head: bytes, shape: bytes, framings: dict[bytes, int | list[tuple[bytes, bytes]]]
           ) -> int | list[tuple[bytes, bytes]]:
    """What an answer head's framing and hop-by-hop fields say, kept in `framings` under
    its `shape` (the head with digits zeroed): AS_IS (Content-Length) or RECHUNK
    (chunked) when it may go to the agent as it came, else the fields themselves
    (`FRAMING_FIELDS`), for the rebuild. The fields are kept only when the values the
    rebuild uses (Connection, Transfer-Encoding) have no digit, so that every head of
    that shape has the same ones."""
    found = FRAMING_FIELDS.findall(head.lower())
    length = chunked = False
    plain = True
    for name, value in found:
        if name == b"content-length":
            length = True
        elif name == b"transfer-encoding" and value == b"chunked":
            chunked = True
        elif name != b"connection" or value != b"keep-alive":
            plain = False
    if plain and (length or chunked):
        known: int | list = RECHUNK if chunked else AS_IS
    else:
        known = found
        if any(name in (b"connection", b"transfer-encoding") and value != value.translate(
                ZERO_DIGITS) for name, value in found):
            return known  # not kept
    if len(framings) >= FRAMINGS_MAX:
        framings.clear()
    framings[shape] = known
    return known


def request_known(fields: bytes, shape: bytes, shapes: dict[bytes, RequestShape]
                   ) -> RequestShape:
    """What a request's header lines (as llhttp accepted them, each with its CRLF) say,
    kept in `shapes` under their `shape` (digits zeroed): (the spans of `fields` to
    forward, in order, as start, end, start, end...; the framing: 0 none, 1 Content-Length, CHUNKED_BODY; the
    Connection value or None). Left out: Host (the endpoint's goes instead), hop-by-hop
    fields and those Connection names. Kept only when the Connection value has no
    digit, so that every request of that shape names the same fields."""
    cut: list[tuple[int, int]] = []
    framing = 0
    connection = None
    # Each line begins after a CRLF, the first one too.
    for m in _REQUEST_FIELDS.finditer(b"\r\n" + fields.lower()):
        name = m.group(1)
        if name == b"content-length":
            framing = framing or 1
            continue
        if name == b"transfer-encoding":
            framing = CHUNKED_BODY if b"chunked" in m.group(2).lower() else 1
            continue
        if name == b"connection":
            value = m.group(2).strip()
            connection = value if connection is None else b"%s, %s" % (connection, value)
        start = m.start()  # in `fields`: the line's first byte
        cut.append((start, fields.index(b"\r\n", start) + 2))
    if connection is not None and connection not in PLAIN_CONNECTION:
        names = listed(connection)
        at = 0
        for line in fields.split(b"\r\n")[:-1]:
            if line[:line.index(b":")].lower() in names:
                cut.append((at, at + len(line) + 2))
            at += len(line) + 2
        cut.sort()
    kept: list[int] = []  # start, end, start, end, ...
    at = 0
    for start, end in cut:
        if start > at:
            kept += (at, start)
        at = max(at, end)
    if at < len(fields) or not kept:
        kept += (at, len(fields))
    known = (tuple(kept), framing, connection)
    if connection is None or connection == connection.translate(ZERO_DIGITS):
        if len(shapes) >= FRAMINGS_MAX:
            shapes.clear()
        shapes[shape] = known
    return known


def status_line(head: bytes, line_end: int) -> bytes:
    """The status line the agent gets: HTTP/1.1 and the upstream's code and reason."""
    return head[:line_end] if head.startswith(b"HTTP/1.1 ") else (
        b"HTTP/1.1" + head[8:line_end])  # llhttp checked the "HTTP/d.d " prefix


def response_fields(head: bytes, line_end: int, found: list[tuple[bytes, bytes]]
                     ) -> tuple[bytes, bool, bytes | None]:
    """A response head llhttp accepted, where its status line ends, and its framing and
    hop-by-hop fields (`FRAMING_FIELDS`) -> (the header lines to forward, each with its
    CRLF; whether it has Content-Length; its Transfer-Encoding). Left out: hop-by-hop
    fields, those its Connection header names, and Transfer-Encoding (the proxy frames
    the body afresh)."""
    length = False
    te = connection = None
    for name, value in found:
        if name == b"content-length":
            length = True
        elif name == b"transfer-encoding":
            te = value.strip() if te is None else b"%s, %s" % (te, value.strip())
        elif name == b"connection":
            connection = value if connection is None else b"%s, %s" % (connection, value)
    if length and len(found) == 1 or not found:
        return head[line_end + 2:-2], length, te  # nothing to leave out
    if connection is not None and connection not in PLAIN_CONNECTION:
        return without(head[line_end + 2:-2], NOT_FORWARDED | listed(connection)), length, te
    # From the CRLF that ends the status line to the last field's end.
    fields = _NOT_FORWARDED_LINES.sub(b"", head[line_end:-4])[2:]
    return fields + b"\r\n" if fields else b"", length, te


def rechunked_coding(te: bytes) -> bytes:
    """The Transfer-Encoding line for a body the proxy sends chunked, from the one the
    upstream sent: its content codings, then chunked."""
    codings = [c for c in (t.strip() for t in te.split(b","))
               if c and c.lower() != b"chunked" and c.lower() != b"identity"]
    return b"Transfer-Encoding: %s\r\n" % b", ".join([*codings, b"chunked"])


def listed(connection: bytes) -> set[bytes]:
    """The field names a Connection header lists (RFC 9110 7.6.1), lower-case.
    BadMessage if it lists a framing field: the message's framing is in doubt."""
    names = {t.strip().lower() for t in connection.split(b",")} - _CONNECTION_OPTIONS
    if names & _FRAMING_NAMES:
        raise BadMessage
    return names


def without(fields: bytes, names: frozenset[bytes] | set[bytes]) -> bytes:
    """`fields` (header lines llhttp accepted, each with its CRLF) without those whose
    lower-case name is in `names`."""
    return b"".join([line + b"\r\n" for line in fields.split(b"\r\n")[:-1]
                     if line[:line.index(b":")].lower() not in names])

