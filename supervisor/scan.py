"""`agentvisor scan`: the credential audit.

Owns finding plaintext credentials where they must not be: in config and source files, in
running processes' command lines (what `ps aux` shows every user), in the environment of
processes that are not agents, and in log files and their gzip archives. It knows two kinds
of evidence:

- patterns: the assignments operators already grep for (`NATS_*`, `REDIS_*`, `*API_KEY*`,
  `*TOKEN*`, `password`-like keys) holding a literal value, URLs with a password in
  them, `Authorization:` headers, private keys, and high-entropy values under
  secret-looking keys;
- known values: the live secrets (one file per secret in `--secrets-dir`, by default
  `$CREDENTIALS_DIRECTORY`), also in their URL-encoded and base64 forms.

`${NAME}` / `${upstream:NAME}` placeholders are the fix, never a finding. A finding names
where (file:line, or pid and process name and cmdline/environ variable) and which rule, and
never contains the secret: values are shown as `<redacted, N chars>`.

The rules are pure (`scan_text`, `scan_process`, `AllowList`); the I/O (walking folders,
gzip, psutil) is a thin layer around them. Exit codes: 0 clean, 1 findings (a CI gate),
2 bad usage or something that could not be read.
"""

from __future__ import annotations

import argparse
import base64
import fnmatch
import functools
import gzip
import json
import math
import os
import re
import stat
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, NoReturn
from urllib.parse import quote, quote_plus

EXIT_CLEAN, EXIT_FINDINGS, EXIT_USAGE = 0, 1, 2

# Rule names: what a finding's `rule` is, and what an allow-list entry `path:rule` names.
ASSIGNMENT = "credential-assignment"
URL_CREDENTIALS = "url-credentials"
AUTH_HEADER = "auth-header"
PRIVATE_KEY = "private-key"
HIGH_ENTROPY = "high-entropy"
KNOWN_SECRET = "known-secret"
RULES = frozenset({ASSIGNMENT, URL_CREDENTIALS, AUTH_HEADER, PRIVATE_KEY, HIGH_ENTROPY,
                   KNOWN_SECRET})

MIN_KNOWN_LEN = 4  # shorter known values would match everywhere
MIN_LITERAL_LEN = 3  # `X-Secret: 1`, `auth: 0` are flags, not credentials
MIN_TOKEN_LEN = 8  # `Authorization: Basic ...` in a docstring is not a header
MIN_ENTROPY_LEN = 16
# A random 16-character string over [A-Za-z0-9] scores about 3.8 bits per character, an
# English passphrase about 3.3. Hex has only 16 symbols, so its bar is lower.
ENTROPY_BITS = 3.5
HEX_ENTROPY_BITS = 3.0
# A base64 fragment this short would turn up by chance in a large log.
MIN_BASE64_FRAGMENT = 8

AGENT_MARKER = "AGENTVISOR_AGENT"  # set by the supervisor in every agent's environment
SKIP_DIRS = frozenset({".git", ".hg", ".svn", ".venv", "venv", "__pycache__", "node_modules",
                       ".tox", ".mypy_cache", ".pytest_cache", ".ruff_cache"})


@dataclass(frozen=True)
class Finding:
    """One plaintext credential. `line` is 0 for a place that is not a line in a file
    (a process); `detail` never contains the value."""

    path: str
    line: int
    rule: str
    detail: str

    def __str__(self) -> str:
        if self.line == 0:
            return f"{self.path} {self.detail}"
        return f"{self.path}:{self.line}: {self.rule}: {self.detail}"


def redacted(value: str) -> str:
    return f"<redacted, {len(value)} chars>"


def shannon_entropy(value: str) -> float:
    """Bits per character of `value`'s own character distribution."""
    if not value:
        return 0.0
    n = len(value)
    return -sum(c / n * math.log2(c / n) for c in Counter(value).values())


# --- which keys hold credentials -------------------------------------------------------

# What operators grep for today: `(NATS_|REDIS_|API_KEY|TOKEN).*=`. NATS and REDIS only as
# the key's first word (`NATS_USER`, `nats_password`), not `agentvisor-nats`.
_OPERATOR_PREFIXES = frozenset({"NATS", "REDIS"})
_OPERATOR_WORDS = frozenset({"TOKEN", "APIKEY"})
# A key ending in one of these holds the credential itself, whatever its prefix.
_SECRET_LAST = frozenset({"PASSWORD", "PASSWD", "PASS", "PWD", "PASSPHRASE", "SECRET",
                          "TOKEN", "APIKEY", "CREDENTIAL", "CREDENTIALS", "CREDS", "NKEY"})
# ... and so does `<qualifier>_KEY` (API_KEY, PRIVATE_KEY, SECRET_KEY, ...).
_KEY_QUALIFIERS = frozenset({"API", "PRIVATE", "SECRET", "SIGNING", "ENCRYPTION", "ACCESS",
                             "AUTH"})
# Keys that look secret enough for the entropy rule (brief: password, passwd, secret,
# token, api_key, apikey, credential, private_key, auth). Whole words, so that `author`,
# `max_tokens` and `tokenizer` are not secrets.
_ENTROPY_WORDS = frozenset({"PASSWORD", "PASSWD", "PWD", "PASSPHRASE", "SECRET", "SECRETS",
                            "TOKEN", "APIKEY", "CREDENTIAL", "CREDENTIALS", "CREDS", "AUTH",
                            "AUTHORIZATION", "AUTHENTICATION", "PRIVATEKEY", "AUTHTOKEN"})
# A key ending in one of these describes a credential (where it is, how it is used) rather
# than holding it: `NATS_URL`, `NATS_PASSWORD_FILE`, `TOKEN_TTL`, `SSH_AUTH_SOCK`.
_NON_SECRET_LAST = frozenset({
    "URL", "URLS", "URI", "HOST", "HOSTS", "HOSTNAME", "PORT", "ADDR", "ADDRESS", "SERVER",
    "SERVERS", "ENDPOINT", "CLUSTER", "SUBJECT", "SUBJECTS", "STREAM", "STREAMS", "TOPIC",
    "CHANNEL", "QUEUE", "BUCKET", "PREFIX", "NAME", "NAMES", "FILE", "FILES", "PATH", "DIR",
    "DIRECTORY", "SOCK", "SOCKET", "HEADER", "FIELD", "PARAM", "ENV", "VAR", "REF", "ID",
    "TYPE", "MODE", "METHOD", "LEVEL", "ENABLED", "ENABLE", "DISABLED", "REQUIRED", "TIMEOUT",
    "TTL", "EXPIRY", "EXPIRES", "INTERVAL", "HASH", "HASHED", "DIGEST", "LENGTH", "LEN",
    "SIZE", "LIMIT", "COUNT", "VERSION", "DB", "TLS", "SSL", "CA", "CERT", "VERIFY", "CONF",
    "CONFIG", "CFG", "START", "END", "BEGIN", "RE", "REGEX", "PATTERN", "RULE", "FORMAT",
    "FMT", "TEMPLATE", "KIND", "CLASS", "SEPARATOR", "DELIMITER",
})
# systemd's way of handing a unit its credentials from files: the fix, not a leak.
_CREDENTIAL_FILE_KEYS = frozenset({"LoadCredential", "LoadCredentialEncrypted",
                                   "ImportCredential", "SetCredentialEncrypted"})


def key_words(key: str) -> list[str]:
    """`natsPassword`, `nats-password`, `NATS_PASSWORD` -> ["NATS", "PASSWORD"]."""
    key = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", key)
    key = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key)
    return [w for w in re.split(r"[^A-Za-z0-9]+", key.upper()) if w]


def _has_pair(words: list[str], first: set[str] | frozenset[str], second: str) -> bool:
    return any(a in first and b == second for a, b in zip(words, words[1:]))


@functools.lru_cache(maxsize=4096)
def key_kind(key: str) -> str | None:
    """"secret" when the key's value is the credential itself, "operator" when the key only
    matches what operators grep for (`NATS_*`, `REDIS_*`), "entropy" when it only looks
    secret enough for the entropy rule, None otherwise."""
    words = key_words(key)
    if (not words or words[-1] in _NON_SECRET_LAST or key in _CREDENTIAL_FILE_KEYS
            or "PUBLIC" in words):  # publicKeyToken, PUBLIC_KEY: public by name
        return None
    last = words[-1]
    if last in _SECRET_LAST or (last == "KEY" and len(words) > 1
                                and words[-2] in _KEY_QUALIFIERS):
        return "secret"
    if ((words[0] in _OPERATOR_PREFIXES and len(words) > 1) or _OPERATOR_WORDS & set(words)
            or _has_pair(words, {"API"}, "KEY")):
        return "operator"
    if _ENTROPY_WORDS & set(words) or _has_pair(words, {"API", "PRIVATE"}, "KEY"):
        return "entropy"
    return None


# --- which values are literal credentials ----------------------------------------------

# How a file's values are written. In "python" and "code" a credential is a string literal
# (an unquoted value is an expression); in "yaml" and "text" (.env, .sh, .conf, .ini,
# logs, anything else) an unquoted value is literal too.
PYTHON, CODE, YAML, TEXT = "python", "code", "yaml", "text"
_CODE_SUFFIXES = (".c", ".h", ".cc", ".cpp", ".hpp", ".js", ".mjs", ".cjs", ".ts", ".tsx",
                  ".jsx", ".go", ".java", ".kt", ".rs", ".rb", ".php", ".cs", ".swift",
                  ".scala", ".lua", ".pl", ".pyx", ".pxd")


def language(path: str, first_line: str = "") -> str:
    if path.endswith((".py", ".pyi", ".pyw")) or (first_line.startswith("#!")
                                                  and "python" in first_line):
        return PYTHON
    if path.endswith(_CODE_SUFFIXES):
        return CODE
    if path.endswith((".yaml", ".yml")):
        return YAML
    return TEXT


_PLACEHOLDER = re.compile(r"\$\$\{|\$\{[^}]*\}")  # ${NAME}, ${upstream:NAME}, $${ escape
_SHELL_DEFAULT = re.compile(r"^\$\{\w+:?[-=](?P<default>[^}]*)\}$")  # ${X:-default}
_SHELL_REF = re.compile(r"^\$(\w+|\([^)]*\)|\{[^}]*\})$")  # $X, $(cmd)
_TEMPLATE = re.compile(r"\{\{.*\}\}|\{[\w.\[\]]*\}|%\(\w+\)s|%s|<[^<>]*>|\[\[.*\]\]")
# "****", ":xxxx" (redacted), "..." (elided in an example)
_MASKED = re.compile(r"^[:*xX.•#\- ]*(?:[*•xX]{3,}|\.\.\.|…)[:*xX.•#\- ]*$")
_NULLISH = frozenset({"null", "none", "nil", "~", "true", "false", "yes", "no", "on", "off",
                      "undefined"})
# Prose in comments and docstrings reads like `key: value` ("the secret: the value ...");
# a credential is not one of these words.
_PROSE = frozenset({"the", "a", "an", "is", "are", "was", "be", "see", "set", "from", "in",
                    "of", "to", "and", "or", "not", "this", "that", "these", "it", "its",
                    "if", "when", "where", "which", "used", "required", "optional", "must",
                    "should", "may", "via", "as", "at", "by", "for", "with", "read", "stored",
                    "given", "provided", "one", "each", "every", "any", "all", "no", "only"})
_BCRYPT = re.compile(r"^\$2[abxy]?\$\d\d\$[./A-Za-z0-9]{53}$")  # a hash, not the password
_URL_START = re.compile(r"^[A-Za-z][\w+.-]*://")
_NUMBERISH = re.compile(r"^\d+(\.\d+)?[A-Za-z]{0,3}$")  # 4222, 2gb, 10s
_PATH = re.compile(r"^(~|\.\.?)?/[\w.@+-]+(/[\w.@+-]*)+$")  # /run/credentials/x.creds
# What documentation writes where a password goes: `https://user:password@host`.
_EXAMPLE_PASSWORDS = frozenset({"password", "passwd", "pass", "pwd", "secret", "pw"})


def literal_secret(value: str, quoted: bool, lang: str = TEXT) -> str | None:
    """The part of `value` that is a plaintext credential, or None when it is not one:
    empty, null-ish, a placeholder, a variable or template reference, a hash, a mask."""
    if not value or value in ('""', "''"):
        return None
    default = _SHELL_DEFAULT.match(value)
    if default and lang not in (PYTHON, CODE):  # ${X:-hunter2}: the default is a leak
        return default.group("default") or None
    if not quoted:
        if lang in (PYTHON, CODE):  # an expression: os.environ[...], None, a name
            return None
        if value[:1] in "{[(|>&*$<" or (lang == YAML and value.startswith("!")):
            # structure, YAML block scalar, anchor/alias, tag (!secret, !vault), shell
            # expansion ($VAR, $(cat file)), `<your token>`; bcrypt hashes start with $ too
            return None
        if value.lower() in _NULLISH:
            return None
    if _PLACEHOLDER.search(value) or _SHELL_REF.match(value) or _TEMPLATE.search(value):
        return None
    if value.startswith(("$(", "`")):  # "$(cat "$CREDENTIALS_DIRECTORY/X")": the quotes nest
        return None
    if _MASKED.match(value) or _BCRYPT.match(value):
        return None
    return value


# --- patterns --------------------------------------------------------------------------

_QUOTED = r"""(?P<prefix>[rbuRBU]?)(?P<qc>["'])(?P<qv>(?:\\.|(?!(?P=qc))[^\\])*)(?P=qc)"""
# A `${...}` keeps its braces (so that `${X:-default}` is seen whole), else a run up to a
# space or a flow-collection delimiter: `{NATS_PASSWORD: hunter2, ...}`.
_UNQUOTED = r"""(?P<uv>\$\{[^}\s]*\}[^\s,;}\])'"`]*|[^\s,;{}\[\]()'"`][^\s,;}\])'"`(\[]*)"""
_VALUE = f"(?:{_QUOTED}|{_UNQUOTED})"
# A key starts a word: not inside a path (`/etc/nats.conf:`), a dotted or hyphenated name
# (matched whole from its start), or a `$VAR`; `--flag=` is a key.
_KEY = r"""(?<![\w$/.])(?<![^-]-)(?P<kq>["']?)(?P<key>[A-Za-z_][\w.-]*)(?P=kq)\]?"""
# `key: value` needs a space after an unquoted key (so `http://x` is not key `http`);
# `"key":value` (JSON) does not. `=` is not `==`, `<=`, `!=`.
_OP = r"""\s*(?:(?P<eq>(?<![=!<>])=(?!=))|(?<=["'\]]):|:(?=\s))\s*"""
_ASSIGN = re.compile(_KEY + _OP + _VALUE)
# Python also has `NATS_PASSWORD: str = "..."` (pydantic settings) and getenv defaults.
_PY_ANNOTATED = re.compile(_KEY + r"\s*:\s*[\w.\[\]|, ]+?\s*=(?!=)\s*" + _VALUE)
_PY_DEFAULT = re.compile(r"""(?:getenv|get|setdefault|pop)\(\s*(?P<kq>["'])(?P<key>[\w.-]+)"""
                         r"""(?P=kq)\s*,\s*""" + _QUOTED)
_STRING = re.compile(r"""[rbufRBUF]{0,2}(?P<q>["'])(?P<body>(?:\\.|(?!(?P=q))[^\\])*)(?P=q)""")
_ESCAPED_BREAK = re.compile(r"\\[rnt]")  # b"X-Secret: 1\r\nKeep-Alive: ..." is two lines
# After a value: code that makes it part of an expression (`"--user=" + name`,
# `"%s" % x`, `"x".join`), or, unquoted, a call or an index (`text[start:]`).
_EXPRESSION_AFTER = re.compile(r"\s*(?:[+%*]|\.\w)")
_CALL_AFTER = re.compile(r"[(\[.]")
# The password runs to the last `@` before the host: `p@ss` is one password, and no part of
# it may end up in the host that the finding shows.
_URL = re.compile(r"""(?P<scheme>[A-Za-z][\w+.-]*)://(?P<user>[^\s:/@'"`<>\[]*):"""
                  r"""(?P<password>[^\s/'"`<>\]]+)@(?P<host>[^\s/'"`<>,;)@]*)""")
_AUTH_HEADER = re.compile(r"""\b(?P<key>(?:Proxy-)?Authorization)["']?\s*[:=]\s*[rbf]?["']?"""
                          r"""(?P<scheme>Bearer|Basic|Token|Digest)\s+(?P<cred>[^\s"',;]+)""",
                          re.IGNORECASE)
# A PEM private key: the header alone on its line (a key file, a YAML block) or followed by
# its body in the same string (JSON, an env value); a bare header in code is a constant.
_PEM = re.compile(r"^\W*-----BEGIN (?:[A-Z0-9]+ )*(?:PRIVATE KEY|NKEY SEED)-----\W*$"
                  r"|-----BEGIN (?:[A-Z0-9]+ )*(?:PRIVATE KEY|NKEY SEED)-----(?:\\n|\s)+"
                  r"[A-Za-z0-9+/=]{16}")
_NKEY_SEED = re.compile(r"\bS[UOASCX][A-Z2-7]{56}\b")  # user, operator, account, ... seeds
# Every key the assignment and header rules care about contains one of these words and is
# followed by `=`, `:` or (getenv's default) `,`. Lines without such a key skip the costly
# regexes: most of a log's lines. Searched in the lowercased line, which is five times
# faster than re.IGNORECASE: a 100 MB log takes seconds.
_HINT = re.compile(r"""(?:pass|pwd|secret|token|key|cred|auth|nats|redis)[\w.-]*["'\]]*\s*[:=,]""")


@dataclass(frozen=True)
class _Hit:
    rule: str
    detail: str
    value: str  # never leaves this module: used to drop hits a known value explains


def _assignment_hit(key: str, raw: str, quoted: bool, lang: str,
                    raw_string: bool = False) -> _Hit | None:
    kind = key_kind(key)
    if kind is None:
        return None
    value = literal_secret(raw, quoted, lang)
    if value is None or _URL_START.match(value):  # a URL's credentials are _URL's business
        return None
    if len(key_words(key)) > 1 and key_words(value) == key_words(key):
        return None  # a label: `PRIVATE_KEY = "private-key"`, `names: NATS_PASSWORD`
    if len(value) < MIN_LITERAL_LEN or value.lower() in _PROSE or _PATH.match(value):
        return None
    if raw_string and "\\" in value:  # r"[^\W\d]\w*" under `jsonnet_token`: a regex
        return None
    shown = redacted(value) if value == raw else raw.replace(value, redacted(value))
    if kind == "secret":
        return _Hit(ASSIGNMENT, f"{key} = {shown}", value)
    if kind == "operator":
        # `NATS_MAX_PAYLOAD: 1048576` matches the grep but is not a credential; keys that
        # end in a secret word were handled above.
        if _NUMBERISH.match(value):
            return None
        return _Hit(ASSIGNMENT, f"{key} = {shown}", value)
    return _entropy_hit(key, value)


def _looks_random(value: str) -> float | None:
    """`value`'s entropy when it is long and random enough to be a key, else None."""
    if len(value) < MIN_ENTROPY_LEN or " " in value:
        return None
    bits = shannon_entropy(value)
    bar = HEX_ENTROPY_BITS if re.fullmatch(r"[0-9a-fA-F]+", value) else ENTROPY_BITS
    return bits if bits >= bar else None


def _entropy_hit(key: str, value: str) -> _Hit | None:
    bits = _looks_random(value)
    if bits is None:
        return None
    return _Hit(HIGH_ENTROPY, f"{key} = {redacted(value)[:-1]}, entropy {bits:.1f} bits/char>",
                value)


def _overlapping(regex: re.Pattern[str], text: str) -> Iterator[re.Match[str]]:
    """Matches that may start inside an earlier match's value: in
    `Environment=NATS_PASSWORD=hunter2` the key that matters is the second."""
    pos = 0
    while (m := regex.search(text, pos)) is not None:
        yield m
        pos = m.end("key")


def _assignments(text: str, lang: str, add: Callable[[_Hit | None], None]) -> None:
    code = lang in (PYTHON, CODE)
    regexes = (_PY_ANNOTATED, _PY_DEFAULT, _ASSIGN) if lang == PYTHON else (_ASSIGN,)
    strings = [(m.start(), m.end()) for m in _STRING.finditer(text)] if code else []
    for regex in regexes:
        for m in _overlapping(regex, text):
            kq = m.group("kq")
            if any(a < m.start("key") < b and not (kq and a == m.start("kq"))
                   for a, b in strings):
                continue  # `b"password=" + VALUE`: the key is inside a string
            if lang == PYTHON and not kq and regex is _ASSIGN and not m.group("eq"):
                continue  # `Token.Name: "#ccc"`: a bare name before `:` is an expression
            quoted = m.group("qc") is not None
            after = text[m.end():]
            if quoted and code and _EXPRESSION_AFTER.match(after):
                continue
            if (not quoted and lang == TEXT and _CALL_AFTER.match(after)
                    and re.fullmatch(r"[A-Za-z_][\w.]*", m.group("uv"))):
                continue  # code in a README or a comment, not a config value
            raw_string = code and quoted and m.group("prefix") in ("r", "R")
            add(_assignment_hit(m.group("key"), m.group("qv") if quoted else m.group("uv"),
                                quoted, lang, raw_string))


def _pattern_hits(line: str, lang: str) -> list[_Hit]:
    hits: list[_Hit] = []
    hinted = _HINT.search(line.lower()) is not None
    seen: set[tuple[str, str]] = set()

    def add(hit: _Hit | None) -> None:
        if hit is not None and (hit.rule, hit.value) not in seen:
            seen.add((hit.rule, hit.value))
            hits.append(hit)

    if hinted:
        _assignments(line, lang, add)
    if hinted and lang in (PYTHON, CODE):
        # ... and what its strings say: an argv list's `--password=...`, an env line.
        for m in _STRING.finditer(line):
            for part in _ESCAPED_BREAK.split(m.group("body")):
                _assignments(part, TEXT, add)
    for m in _URL.finditer(line) if "://" in line else ():
        password = literal_secret(m.group("password"), True)
        if password is not None and password.lower() not in _EXAMPLE_PASSWORDS:
            user = m.group("user")
            if _looks_random(user):  # https://<token>:x-oauth-basic@host: the user is a key
                user = redacted(user)
            add(_Hit(URL_CREDENTIALS, f"{m.group('scheme')}://{user}:"
                     f"{redacted(password)}@{m.group('host')}", password))
    for m in _AUTH_HEADER.finditer(line) if hinted else ():
        cred = literal_secret(m.group("cred"), True)
        if cred is not None and len(cred) >= MIN_TOKEN_LEN:
            add(_Hit(AUTH_HEADER, f"{m.group('key')}: {m.group('scheme')} {redacted(cred)}",
                     cred))
    for m in _PEM.finditer(line) if "-----BEGIN" in line else ():
        add(_Hit(PRIVATE_KEY, "PEM private key block", m.group(0)))
    for m in _NKEY_SEED.finditer(line):
        add(_Hit(PRIVATE_KEY, f"NATS nkey seed {redacted(m.group(0))}", m.group(0)))
    return hits


# --- known values ----------------------------------------------------------------------


@dataclass(frozen=True)
class Needle:
    """One searchable form of a known secret: the value, URL-encoded or a base64 run."""

    text: str
    name: str
    form: str  # "" for the value itself, else "URL-encoded" / "base64"


def _base64_fragments(value: bytes) -> set[str]:
    """The base64 characters that encode `value` wherever it sits in a larger encoded blob
    (e.g. `user:password` in a Basic auth header): one run per alignment mod 3, minus the
    edge characters that mix in neighbouring bytes."""
    out = set()
    n = len(value)
    for k in range(3):
        enc = base64.b64encode(b"\0" * k + value + b"\0\0").decode()
        start = -(-4 * k // 3)  # first character made only of value bits
        end = (8 * (k + n)) // 6  # last character made only of value bits
        frag = enc[start:end]
        if len(frag) >= MIN_BASE64_FRAGMENT:
            out.add(frag)
            out.add(frag.replace("+", "-").replace("/", "_"))  # urlsafe alphabet
    return out


def needles(known: Mapping[str, str]) -> list[Needle]:
    """Every form in which the known secrets are searched for; shorter values are skipped."""
    out: list[Needle] = []
    for name, value in sorted(known.items()):
        if len(value) < MIN_KNOWN_LEN:
            continue
        out.append(Needle(value, name, ""))
        for encoded in sorted({quote(value, safe=""), quote(value), quote_plus(value)}
                              - {value}):
            out.append(Needle(encoded, name, "URL-encoded"))
        for frag in sorted(_base64_fragments(value.encode())):
            out.append(Needle(frag, name, "base64"))
    return out


def _known_hits(text: str, found_in: list[Needle]) -> list[_Hit]:
    hits, names = [], set()
    for needle in found_in:
        if needle.name in names or needle.text not in text:
            continue
        names.add(needle.name)
        form = f" ({needle.form})" if needle.form else ""
        hits.append(_Hit(KNOWN_SECRET, f"contains the value of {needle.name}{form}",
                         needle.text))
    return hits


# --- text ------------------------------------------------------------------------------


def _line_hits(line: str, lang: str, found_in: list[Needle]) -> list[_Hit]:
    known = _known_hits(line, found_in) if found_in else []
    hits = _pattern_hits(line, lang)
    if known:
        # A pattern hit whose value is a known secret says less than the known-secret hit.
        plain = [h.value for h in known]
        hits = [h for h in hits if not any(p in h.value for p in plain)]
    return known + hits


def scan_lines(path: str, lines: Iterable[str], known: Mapping[str, str] | None = None,
               *, _needles: list[Needle] | None = None) -> Iterator[Finding]:
    """Findings for `lines` (numbered from 1) of the file shown as `path`."""
    found_in = _needles if _needles is not None else needles(known or {})
    lang = None
    for number, line in enumerate(lines, 1):
        if lang is None:  # app.py.gz is Python too
            lang = language(path.removesuffix(".gz"), line)
        for hit in _line_hits(line.rstrip("\r\n"), lang, found_in):
            yield Finding(path, number, hit.rule, hit.detail)


def scan_text(path: str, text: str, known: Mapping[str, str] | None = None) -> list[Finding]:
    """Findings in `text`, the content of the file shown as `path`; its name says how values
    are written (Python and other code: only string literals are literal values)."""
    return list(scan_lines(path, text.splitlines(), known))


# --- processes -------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessInfo:
    """What the audit reads of one process; `environ` None when it could not be read."""

    pid: int
    name: str
    cmdline: tuple[str, ...]
    environ: Mapping[str, str] | None = None


def _secret_flag(arg: str) -> bool:
    """`--password`, `--nats-token`, `--auth` (nats-server's token flag: a generic `*_AUTH`
    key in a file does not imply a credential, a flag of that name does)."""
    if not arg.startswith("--") or "=" in arg:
        return False
    words = key_words(arg)
    return key_kind(arg) == "secret" or (bool(words) and words[-1] == "AUTH")


def _argv_hits(args: list[str], found_in: list[Needle]) -> list[_Hit]:
    known: list[_Hit] = []
    patterns: list[_Hit] = []
    for i, arg in enumerate(args):
        for line in arg.splitlines():
            for hit in _line_hits(line, TEXT, found_in):
                (known if hit.rule == KNOWN_SECRET else patterns).append(hit)
        if _secret_flag(arg) and i + 1 < len(args):  # `--password hunter2`
            value = literal_secret(args[i + 1], False)
            if value is not None and not value.startswith("-"):
                patterns.append(_Hit(ASSIGNMENT, f"{arg} {redacted(value)}", value))
    # One line per secret: the same value may show in several arguments, and a pattern hit
    # on a live secret says less than the known-secret hit that names it.
    plain = [h.value for h in known]
    out, seen = [], set()
    for hit in known + [h for h in patterns if not any(p in h.value for p in plain)]:
        if (hit.rule, hit.detail) not in seen:
            seen.add((hit.rule, hit.detail))
            out.append(hit)
    return out


def scan_process(proc: ProcessInfo, known: Mapping[str, str] | None = None,
                 *, _needles: list[Needle] | None = None) -> list[Finding]:
    """Findings in one process: its command line (known values and patterns) and, unless
    it is an agent (whose environment legitimately holds its secrets), its environment
    (known values only: a process's environment is private to its uid, so the leak that
    matters there is a live secret in a process that should not have it)."""
    found_in = _needles if _needles is not None else needles(known or {})
    where = f"pid {proc.pid} ({proc.name})"
    out = [Finding(where, 0, hit.rule, f"cmdline: {hit.detail}")
           for hit in _argv_hits(list(proc.cmdline), found_in)]
    if proc.environ is not None and AGENT_MARKER not in proc.environ and found_in:
        for var, value in sorted(proc.environ.items()):
            out.extend(Finding(where, 0, hit.rule, f"environ {var}: {hit.detail}")
                       for hit in _known_hits(value, found_in))
    return out


def _read_processes() -> Iterator[ProcessInfo]:
    import psutil

    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        cmdline = p.info.get("cmdline")
        if not cmdline:  # kernel threads, zombies, or not ours to read
            continue
        try:
            environ = p.environ()
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess, OSError):
            environ = None
        yield ProcessInfo(p.info["pid"], p.info.get("name") or "?", tuple(cmdline), environ)


# --- files -----------------------------------------------------------------------------


def _open_text(path: str):
    """A line iterator over `path` (gunzipped for .gz), or None for a binary file."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        head = f.read(8192)
    if b"\0" in head:
        return None
    return opener(path, "rt", encoding="utf-8", errors="replace", newline="")


@dataclass
class Scanner:
    """One audit run: the known secrets, and counts for the summary."""

    known: Mapping[str, str] = field(default_factory=dict)
    skip: tuple[str, ...] = ()  # real paths never to read (the secrets directory)
    on_error: Callable[[str], None] | None = None
    files: int = 0
    processes: int = 0
    errors: int = 0

    def __post_init__(self) -> None:
        self._needles = needles(self.known)
        self._skip = {os.path.realpath(p) for p in self.skip}

    def _error(self, message: str) -> None:
        self.errors += 1
        if self.on_error is not None:
            self.on_error(message)

    def file(self, path: str) -> list[Finding]:
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):  # a FIFO would block the audit forever
                return []
            lines = _open_text(path)
            if lines is None:
                return []
            with lines:
                self.files += 1
                return list(scan_lines(path, lines, _needles=self._needles))
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            self._error(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}")
            return []

    def walk(self, root: str) -> Iterator[str]:
        """Files under `root` in a stable order, without VCS/venv/cache folders."""
        if not os.path.isdir(root):
            yield root
            return

        def onerror(exc: OSError) -> None:
            self._error(f"{exc.filename}: cannot read: {exc.strerror}")

        for folder, dirs, names in os.walk(root, onerror=onerror):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS
                             and os.path.realpath(os.path.join(folder, d)) not in self._skip)
            for name in sorted(names):
                yield os.path.join(folder, name)

    def paths(self, roots: Iterable[str]) -> list[Finding]:
        out: list[Finding] = []
        for root in roots:
            if os.path.realpath(root) in self._skip:
                continue
            for path in self.walk(root):
                if os.path.realpath(path) in self._skip:
                    continue
                out.extend(self.file(os.path.normpath(path)))
        return out

    def running(self, procs: Iterable[ProcessInfo] | None = None) -> list[Finding]:
        out: list[Finding] = []
        for proc in _read_processes() if procs is None else procs:
            self.processes += 1
            out.extend(scan_process(proc, _needles=self._needles))
        return out


def scan_paths(paths: Iterable[str | os.PathLike], known: Mapping[str, str] | None = None,
               on_error: Callable[[str], None] | None = None) -> list[Finding]:
    """Findings in files and folders (recursively): text files and .gz archives of text;
    binary files and .git/.venv/__pycache__/node_modules are skipped."""
    return Scanner(known or {}, on_error=on_error).paths(os.fspath(p) for p in paths)


def read_known(folder: str | os.PathLike) -> tuple[dict[str, str], list[str]]:
    """The secrets in `folder` (file name -> value, minus one trailing newline, as the
    supervisor reads them) and notes about files that cannot be searched for.
    OSError when the folder cannot be listed or a secret cannot be read."""
    known, notes = {}, []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_file():
            continue
        with open(entry.path, "rb") as f:
            data = f.read()
        try:
            value = data.decode("utf-8")
        except UnicodeDecodeError:
            notes.append(f"secret {entry.name}: not text, not searched for")
            continue
        value = value[:-1] if value.endswith("\n") else value
        if len(value) < MIN_KNOWN_LEN:
            notes.append(f"secret {entry.name}: shorter than {MIN_KNOWN_LEN} characters, "
                         "not searched for")
            continue
        known[entry.name] = value
    return known, notes


# --- allow-list ------------------------------------------------------------------------


class AllowListError(ValueError):
    pass


@dataclass(frozen=True)
class AllowEntry:
    glob: str
    line: int | None = None
    rule: str | None = None


class AllowList:
    """Findings an operator has accepted. One entry per line: `path:line`, `path:rule` or
    a glob over paths (`tests/*`, `pid * (nats-server)`); a trailing `/` means everything
    under a folder; `#` starts a comment. Relative paths are relative to the allow-list
    file's folder, or to the current directory."""

    def __init__(self, entries: Iterable[AllowEntry] = (), base: str | None = None):
        self.entries = list(entries)
        self.base = base

    @classmethod
    def parse(cls, text: str, base: str | None = None) -> "AllowList":
        entries = []
        for raw in text.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", raw).strip()
            if not line:
                continue
            head, colon, tail = line.rpartition(":")
            if colon and tail.strip().isdigit():
                entries.append(AllowEntry(head.strip(), line=int(tail)))
            elif colon and tail.strip() in RULES:
                entries.append(AllowEntry(head.strip(), rule=tail.strip()))
            else:
                entries.append(AllowEntry(line))
        return cls(entries, base)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AllowList":
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise AllowListError(f"{path}: cannot read allow-list: "
                                 f"{getattr(exc, 'strerror', None) or exc}") from None
        return cls.parse(text, os.path.dirname(os.path.abspath(path)))

    def _names(self, path: str) -> list[str]:
        if path.startswith("pid "):
            return [path]
        absolute = os.path.abspath(path)
        names = [os.path.normpath(path), absolute]
        if self.base:
            names.append(os.path.relpath(absolute, self.base))
        return names

    def allows(self, finding: Finding) -> bool:
        names = self._names(finding.path)
        for e in self.entries:
            if e.line is not None and e.line != finding.line:
                continue
            if e.rule is not None and e.rule != finding.rule:
                continue
            glob = e.glob
            if not glob.startswith("pid "):
                glob = os.path.normpath(glob) + ("/*" if glob.endswith("/") else "")
            if any(fnmatch.fnmatchcase(n, glob) for n in names):
                return True
        return False


# --- the command -----------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="*", metavar="PATH",
                        help="files and folders to scan (folders recursively)")
    parser.add_argument("--processes", action="store_true",
                        help="check every process's command line, and the environment of "
                             "processes that are not agents (all processes as root)")
    parser.add_argument("--logs", action="append", default=[], metavar="DIR",
                        help="check log files and their .gz archives under DIR (repeatable)")
    parser.add_argument("--secrets-dir", default=None, metavar="DIR",
                        help="the live secrets, one file per secret, searched for as "
                             "values (default: $CREDENTIALS_DIRECTORY)")
    parser.add_argument("--allow", default=None, metavar="FILE",
                        help="allow-list: `path:line`, `path:rule` or a path glob per line")
    parser.add_argument("--json", action="store_true", help="print findings as a JSON list")


def _scrub(text: str, known: Mapping[str, str]) -> str:
    """A path or process name that itself contains a secret must not print it."""
    for name, value in known.items():
        if len(value) >= MIN_KNOWN_LEN and value in text:
            text = text.replace(value, f"<{name}>")
    return text


def run(args) -> int:
    def err(message: str) -> None:
        print(f"scan: {message}", file=sys.stderr)

    if not (args.paths or args.processes or args.logs):
        err("nothing to scan: give paths, --processes or --logs DIR")
        return EXIT_USAGE
    missing = [p for p in [*args.paths, *args.logs] if not os.path.exists(p)]
    for p in missing:
        err(f"{p}: no such file or folder")
    if missing:
        return EXIT_USAGE
    allow = AllowList()
    if args.allow:
        try:
            allow = AllowList.load(args.allow)
        except AllowListError as exc:
            err(str(exc))
            return EXIT_USAGE
    secrets_dir = args.secrets_dir or os.environ.get("CREDENTIALS_DIRECTORY")
    known: dict[str, str] = {}
    if secrets_dir:
        try:
            known, notes = read_known(secrets_dir)
        except OSError as exc:
            err(f"{exc.filename or secrets_dir}: cannot read secrets: {exc.strerror}")
            return EXIT_USAGE
        for note in notes:
            err(note)
    elif args.processes or args.logs:
        err("no --secrets-dir and no $CREDENTIALS_DIRECTORY: checking patterns only, "
            "not the live secret values")

    scanner = Scanner(known, skip=(secrets_dir,) if secrets_dir else (), on_error=err)
    findings = scanner.paths(args.paths)
    findings += scanner.paths(args.logs)
    if args.processes:
        findings += scanner.running()
        if os.geteuid() != 0:
            err("not root: other users' process environments were not checked")

    shown = [Finding(_scrub(f.path, known), f.line, f.rule, _scrub(f.detail, known))
             for f in findings if not allow.allows(f)]
    allowed = len(findings) - len(shown)
    if args.json:
        print(json.dumps([asdict(f) for f in shown], indent=2))
    else:
        for f in shown:
            print(f)
    parts = [f"{len(shown)} finding{'s' * (len(shown) != 1)}"]
    if allowed:
        parts.append(f"{allowed} allowed")
    parts.append(f"{scanner.files} file{'s' * (scanner.files != 1)} read")
    if args.processes:
        parts.append(f"{scanner.processes} processes")
    if scanner.errors:
        parts.append(f"{scanner.errors} unreadable")
    print("scan: " + ", ".join(parts), file=sys.stderr)
    if shown:
        return EXIT_FINDINGS
    # An audit that could not read everything is not a clean one.
    return EXIT_USAGE if scanner.errors else EXIT_CLEAN


def main(argv: list[str] | None = None) -> NoReturn:
    parser = argparse.ArgumentParser(
        prog="agentvisor scan",
        description="Find plaintext credentials in files, process command lines and logs.",
        epilog="exit codes: 0 clean; 1 findings; 2 bad usage or unreadable")
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
