"""What the HTTP property tests generate messages from (hypothesis strategies)."""

from __future__ import annotations

from hypothesis import strategies as st

# Fields only for one hop, never forwarded as they came (RFC 9110 7.6.1), and framing.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"upgrade", b"proxy-authorization", b"transfer-encoding",
                        b"content-length"})

token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=6)
value = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789 /;=,.-*", min_size=0,
                max_size=20).map(str.strip)


def spelling(name: str) -> st.SearchStrategy[str]:
    """`name` as peers spell it: canonical, lower, upper, or any mix."""
    return st.lists(st.booleans(), min_size=len(name), max_size=len(name)).map(
        lambda ups: "".join(c.upper() if u else c.lower() for c, u in zip(name, ups)))
