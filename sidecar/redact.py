"""Known secret values taken out of log lines before they are shipped or archived.

An agent that logs its own password (in a connection URL, a debug dump, an auth header)
must not carry it into the hub or a gzip archive. Every known value is matched as written,
URL-encoded and base64-encoded (how it shows in URLs and Basic auth headers) and replaced
by `[REDACTED:NAME]`, naming the secret, never quoting it.

One compiled alternation, longest value first (a secret that contains another is
replaced whole); values shorter than MIN_LENGTH are not matched (they would shred
ordinary text and are not secrets worth the name).
"""

from __future__ import annotations

import base64
import re
from typing import Mapping
from urllib.parse import quote

MIN_LENGTH = 4


class Redactor:
    def __init__(self, secrets: Mapping[str, str]):
        forms: dict[bytes, str] = {}
        for name, value in secrets.items():
            if len(value) < MIN_LENGTH:
                continue
            raw = value.encode()
            for form in (raw, quote(value, safe="").encode(), base64.b64encode(raw),
                         base64.b64encode(raw).rstrip(b"=")):
                forms.setdefault(form, name)
        self._names = forms
        ordered = sorted(forms, key=len, reverse=True)
        self._pattern = re.compile(b"|".join(map(re.escape, ordered))) if ordered else None

    def __bool__(self) -> bool:
        return self._pattern is not None

    def redact(self, line: bytes) -> bytes:
        if self._pattern is None:
            return line
        return self._pattern.sub(lambda m: b"[REDACTED:%s]" % self._names[m.group()].encode(),
                                 line)
