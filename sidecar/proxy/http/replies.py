"""The answers the proxy gives itself: canned replies built once at import, and the
fixed header lines it adds when it frames a message afresh.

Compiled: part of the hot path mypyc compiles (sidecar/compile.py), so its types are
exact, not hints: mypyc checks declared attribute and argument types at run time, and
narrows an attribute after an assignment in a method (read it in another method if a
call in between may change it). The tests run it compiled and interpreted.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Final

CONNECT_OK: Final = b"HTTP/1.1 200 Connection established\r\n\r\n"


def canned(status: int, reason: str, text: str, extra: bytes = b"",
            close: bool = False) -> bytes:
    """A complete response the proxy answers with itself, built once."""
    body = text.encode() + b"\n"
    return b"".join((
        b"HTTP/1.1 %d %s\r\n" % (status, reason.encode()),
        b"Content-Type: text/plain; charset=utf-8\r\n",
        b"Content-Length: %d\r\n" % len(body),
        extra,
        b"Connection: close\r\n" if close else b"",
        b"\r\n", body))


BAD_REQUEST: Final = canned(400, "Bad Request", "agentvisor: malformed HTTP request", close=True)
HEAD_TIMED_OUT: Final = canned(408, "Request Timeout",
                                 "agentvisor: request head not received in time", close=True)
BODY_TIMED_OUT: Final = canned(408, "Request Timeout",
                                 "agentvisor: request body not received in time", close=True)
HEAD_TOO_LARGE: Final = canned(431, "Request Header Fields Too Large",
                          "agentvisor: request head too large", close=True)
NOT_A_TUNNEL: Final = canned(405, "Method Not Allowed",
                        "agentvisor: CONNECT is served by the forward proxy only", close=True)
NO_ROUTE: Final = canned(502, "Bad Gateway", "agentvisor: no upstream for this destination")
_TUNNEL_REFUSED: Final = canned(502, "Bad Gateway", "agentvisor: tunnel refused", close=True)
_TUNNEL_OPEN: Final = canned(503, "Service Unavailable", "agentvisor: circuit breaker open",
                       close=True)


CLOSE: Final = b"Connection: close\r\n"
KEEP_ALIVE: Final = b"Connection: keep-alive\r\n"  # HTTP/1.0 agents keep only when told
CHUNKED: Final = b"Transfer-Encoding: chunked\r\n"
LAST_CHUNK: Final = b"0\r\n\r\n"
FALLBACK_LAST_GOOD: Final = b"X-Agentvisor-Fallback: last_good\r\n"



def reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Fallback"



def tunnel_refusal(reason: str) -> bytes:
    """The answer to a CONNECT the L4 relay could not open."""
    return _TUNNEL_OPEN if reason.startswith("circuit breaker open") else _TUNNEL_REFUSED


