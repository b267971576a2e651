"""Agents' metric pushes, accepted over HTTP/1.1 into the spool.

An agent pushes its metrics the way it always did (an HTTP POST to what it takes for the
hub); the supervisor points each agent at its own ingest listener, so the listener an agent
reached says which agent it is: nothing in a request is trusted for that. A push (POST, PUT,
PATCH) is appended to the spool and answered only once `Spool.append` has returned, so an
answered push survives a SIGKILL of this process at any moment (and power loss up to the
spool's sync interval). The answer is a 200 an old client accepts (`{"status": "ok"}`,
configurable) with the record's per-agent sequence in `X-Agentvisor-Seq`.

The one idea is group commit: a commit costs about as much for one push as for hundreds,
so the pushes whose bodies complete in the same event-loop iteration (or within a short
window, if one is configured) go to the spool in ONE `append()` call and are all answered
after it. Under load, batches grow by themselves (what arrives while a batch commits forms
the next one); idle, a push is committed in the iteration it arrived in.

When the spool is full (or failing), pushes get 503 with `Retry-After` and the reason, and
are counted: nothing already answered is ever dropped to make room.

Reads (GET, HEAD and every other method) are not ingest's business: they belong to the
hub, and must meet the upstream's timeouts, breaker and fallback. With `reads_to` (the
proxy's listener for the upstream, `--reads-to`), each read is relayed there as it came
and the proxy's answer takes its turn among the connection's answers (`sidecar.data.reads`);
without it, a read is answered 502 saying reads go through the proxy. The method is known
when the request target begins (`on_url`), so only a read's fields are kept: a push costs
what it did.

One asyncio Protocol per connection, one httptools parser, no task per push. Answers go
out in request order (an answer ready early waits behind earlier pushes still committing),
gathered into one write per commit. One timer for the whole server closes connections idle
for too long and answers 408 to requests stalled half-way.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
from collections import deque
from dataclasses import dataclass
from http import HTTPStatus
from typing import Callable

import httptools

from sidecar.data.reads import DEFAULT_READS_TIMEOUT_S, ReadRelay, relayed_request
from sidecar.spool import Push, Record, Spool, SpoolFull

log = logging.getLogger("agentvisor.data.ingest")

# The methods that push, as the parser names them and as records carry them.
_PUSH_METHODS = {b"POST": "POST", b"PUT": "PUT", b"PATCH": "PATCH"}
# The request fields ingest reads; every other field is passed over by one lookup (and by
# its length, when spelled in an unusual case).
_CONTENT_TYPE, _CONTENT_LENGTH, _EXPECT = 1, 2, 3
_FIELDS = {spelling: field for name, field in (
    (b"content-type", _CONTENT_TYPE), (b"content-length", _CONTENT_LENGTH),
    (b"expect", _EXPECT)) for spelling in (name, name.title())}
_FIELD_LENGTHS = frozenset(len(name) for name in _FIELDS)

# An agent's metrics push is a few hundred bytes to a few KiB; a body over a MiB is a bug
# in the agent (or not an agent at all), and the spool should not carry it to the hub.
DEFAULT_MAX_BODY_BYTES = 1 << 20
# 0: a batch commits at the end of the loop iteration that completed its pushes, which is
# enough for batches to grow with the load; a window trades each push's latency for fewer
# commits when pushes trickle in one per iteration.
DEFAULT_COMMIT_WINDOW_S = 0.0
# Bounds on one batch: one commit holds the loop for its whole duration (about 10 us a
# small push, so ~20 ms at most), and the spool holds a transaction in memory until it
# commits. Only a burst far above the fleet's load fills one.
DEFAULT_MAX_BATCH = 2048
DEFAULT_MAX_BATCH_BYTES = 8 << 20
# Agents push every second or so over keep-alive connections; one quiet for this long is
# gone or forgotten, and holds a descriptor for nothing.
DEFAULT_IDLE_TIMEOUT_S = 300.0
# A request begun and not finished in this long (a client stalled half-way, or a
# slowloris) is answered 408 and its connection closed.
DEFAULT_REQUEST_TIMEOUT_S = 30.0
# Over-limit bodies are read and dropped (up to this much) before the 413 goes out, so that
# the agent, still sending, sees the 413 instead of a reset connection.
MAX_DISCARD_BYTES = 64 << 20
# Answers a pipelining client may have waiting before its connection stops being read.
MAX_WAITING_ANSWERS = 256
# How often the one timer looks for idle and stalled connections.
SWEEP_INTERVAL_S = 1.0
# How often a draining ingest looks at its open connections.
DRAIN_POLL_S = 0.02

CLOSE = b"Connection: close\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

# Reasons a connection is not being read, as bits: each is lifted on its own.
_WRITES_FULL = 1  # the agent is not reading its answers
_BACKLOG = 2  # too many answers waiting for their turn


def _status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Status"
    return b"HTTP/1.1 %d %s\r\n" % (status, phrase.encode())


def reply(status: int, text: str, *, extra: bytes = b"", close: bool = False,
          head_only: bool = False) -> bytes:
    """A plain-text answer ingest gives itself (errors, refusals, reads)."""
    body = text.encode() + b"\n"
    return b"".join((_status_line(status), b"Content-Type: text/plain; charset=utf-8\r\n",
                     b"Content-Length: %d\r\n" % len(body), extra, CLOSE if close else b"",
                     b"\r\n", b"" if head_only else body))


READS_ELSEWHERE = ("agentvisor: this listener takes metric pushes (POST, PUT, PATCH) only; "
                   "reads of the hub go through the sidecar proxy")


@dataclass(frozen=True, slots=True)
class Answer:
    """What an accepted push is answered: by default a 200 an old client accepts, whatever
    it expected from the hub. The record's sequence is always added in a header."""

    status: int = 200
    body: bytes = b'{"status": "ok"}'
    content_type: str = "application/json"

    def problem(self) -> str | None:
        """Why this answer cannot be sent; None when it can."""
        if not 200 <= self.status <= 299:
            return f"answer status {self.status}: an accepted push is answered with a 2xx"
        if self.status in (204, 205) and self.body:
            return f"answer status {self.status} carries no body; the body must be empty"
        if any(c in self.content_type for c in "\r\n"):
            return "answer content type: a line break is not allowed in a header"
        return None

    def framing(self, close: bool) -> tuple[bytes, bytes]:
        """(what comes before the sequence number, what comes after it)."""
        ctype = (b"Content-Type: %s\r\n" % self.content_type.encode("latin-1")
                 if self.content_type and self.body else b"")
        length = b"" if self.status == 204 else b"Content-Length: %d\r\n" % len(self.body)
        return (_status_line(self.status) + ctype + length + b"X-Agentvisor-Seq: ",
                b"\r\n" + (CLOSE if close else b"") + b"\r\n" + self.body)


@dataclass(frozen=True, slots=True)
class IngestSettings:
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    commit_window_s: float = DEFAULT_COMMIT_WINDOW_S
    max_batch: int = DEFAULT_MAX_BATCH
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    # The proxy's listener for this upstream, where reads are relayed; None: answered 502.
    reads_to: tuple[str, int] | None = None
    reads_timeout_s: float = DEFAULT_READS_TIMEOUT_S


class AgentIngest:
    """One agent's listener: who it is, what its pushes are answered, what happened."""

    __slots__ = ("agent", "answer", "_keep", "_close", "accepted", "refused", "malformed",
                 "too_large", "reads", "timeouts", "last_seq", "connections",
                 "connections_total")

    def __init__(self, agent: str, answer: Answer):
        self.agent = agent
        self.answer = answer
        self._keep = answer.framing(close=False)
        self._close = answer.framing(close=True)
        self.accepted = 0  # pushes stored and answered
        self.refused = 0  # pushes answered 503 (spool full or failing)
        self.malformed = 0  # requests answered 400
        self.too_large = 0  # pushes answered 413
        self.reads = 0  # other methods: relayed to the proxy, or answered 502 without it
        self.timeouts = 0  # requests answered 408
        self.last_seq = 0
        self.connections = 0
        self.connections_total = 0

    def accepted_answer(self, seq: int, keep: bool) -> bytes:
        before, after = self._keep if keep else self._close
        return b"%s%d%s" % (before, seq, after)

    def counters(self) -> dict:
        return {name: getattr(self, name) for name in (
            "accepted", "refused", "malformed", "too_large", "reads", "timeouts",
            "last_seq", "connections", "connections_total")}


class GroupCommit:
    """Pushes waiting for their commit; one `Spool.append` per batch, then every push of
    the batch is answered (stored: the answer with its sequence; refused: a 503)."""

    def __init__(self, spool: Spool, settings: IngestSettings,
                 on_appended: Callable[[], None] | None = None,
                 loop: asyncio.AbstractEventLoop | None = None):
        self.spool = spool
        self._loop = loop or asyncio.get_running_loop()
        self._window_s = settings.commit_window_s
        self._max_batch = settings.max_batch
        self._max_batch_bytes = settings.max_batch_bytes
        self._on_appended = on_appended
        self._pushes: list[Push] = []
        self._waiting: list[tuple[IngestConnection, list, bool]] = []
        self._bytes = 0
        self._handle: asyncio.Handle | None = None
        self.batches = 0
        self.largest_batch = 0
        self.refused = 0
        self.failed = 0  # pushes refused because the spool failed (not full): disk, I/O
        self.refusing: str | None = None  # why pushes are refused now; None: they are not
        self._failing_now = False  # refusing because the spool fails, not because full
        self._refused_before = 0  # refused + failed when the refusing began

    def submit(self, push: Push, conn: IngestConnection, entry: list, keep: bool) -> None:
        self._pushes.append(push)
        self._waiting.append((conn, entry, keep))
        self._bytes += len(push.body)
        if len(self._pushes) >= self._max_batch or self._bytes >= self._max_batch_bytes:
            self.flush()
        elif self._handle is None:
            self._handle = (self._loop.call_soon(self.flush) if self._window_s <= 0
                            else self._loop.call_later(self._window_s, self.flush))

    def flush(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        pushes, waiting = self._pushes, self._waiting
        if not pushes:
            return
        self._pushes, self._waiting, self._bytes = [], [], 0
        records, refusal = self._append(pushes)
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(pushes))
        stored = len(records)
        for i, (conn, entry, keep) in enumerate(waiting):
            agent = conn.agent
            if i < stored:
                seq = records[i].seq
                entry[0] = agent.accepted_answer(seq, keep)
                agent.accepted += 1
                agent.last_seq = seq
            else:
                agent.refused += 1
                entry[0] = refusal[keep]  # type: ignore[index]
                entry[1] = not keep
        for conn in dict.fromkeys(w[0] for w in waiting):
            conn.release()
        if stored and self._on_appended is not None:
            self._on_appended()

    def _append(self, pushes: list[Push]) -> tuple[list[Record], tuple[bytes, bytes] | None]:
        """The records stored, in order, and (for the rest) the refusal to answer, by
        keep-alive (index 1: kept, 0: closing)."""
        try:
            records = self.spool.append(pushes)
        except SpoolFull as full:
            records = []
            if len(pushes) > 1:
                # A batch is all or none, but the pushes at its front may fit on their
                # own: take them in order up to the first refused, so that no agent's
                # later push is stored after an earlier one was refused.
                for push in pushes:
                    try:
                        records += self.spool.append([push])
                    except SpoolFull as exc:
                        full = exc
                        break
                    except Exception as exc:  # failing, not full: see below
                        return records, self._failing(exc, len(pushes) - len(records))
            reason = getattr(full, "reason", "") or str(full) or "spool full"
            if self._refusing_since(reason, failing=False):
                log.warning("%s: refusing pushes with 503 until the forwarder frees room "
                            "(nothing answered is dropped)", reason)
            self.refused += len(pushes) - len(records)
            retry = max(1, math.ceil(getattr(full, "retry_after_s", 1.0)))
            return records, self._refusal(reason, retry)
        except Exception as exc:  # sqlite3.Error, OSError: a disk full or failing
            return [], self._failing(exc, len(pushes))
        if self.refusing is not None:
            log.info("spool takes pushes again (%d refused meanwhile)",
                     self.refused + self.failed - self._refused_before)
            self.refusing = None
        return records, None

    def _refusing_since(self, reason: str, failing: bool) -> bool:
        """Note why pushes are refused; True when that is news (worth one log line: the
        reason's figures change with every refusal, its kind does not)."""
        was, self.refusing = self.refusing, reason
        if was is None:
            self._refused_before = self.refused + self.failed
            self._failing_now = failing
            return True
        news, self._failing_now = self._failing_now != failing, failing
        return news

    def _failing(self, exc: Exception, refused: int) -> tuple[bytes, bytes]:
        reason = f"spool unavailable: {exc}"
        if self._refusing_since(reason, failing=True):
            log.error("%s (%s); refusing pushes with 503; check the state directory's "
                      "disk", reason, type(exc).__name__)
        self.failed += refused
        return self._refusal(reason, 1)

    @staticmethod
    def _refusal(reason: str, retry_after_s: int) -> tuple[bytes, bytes]:
        extra = b"Retry-After: %d\r\n" % retry_after_s
        return (reply(503, f"agentvisor: {reason}", extra=extra, close=True),
                reply(503, f"agentvisor: {reason}", extra=extra))


class IngestConnection(asyncio.Protocol):
    """One agent connection: parses its requests, hands each push to the group commit,
    answers in request order."""

    __slots__ = (
        # fixed for the connection
        "ingest", "agent", "_loop", "_parser", "_max_body", "_relay",
        # the connection
        "transport", "_queue", "_paused", "_eof", "_done", "_since",
        # the request being parsed
        "_in_message", "_url", "_ctype", "_length", "_expect", "_method", "_keep_body",
        "_body", "_body_bytes", "_too_large",
        # a read being relayed: its fields as they came (None: a push, or not relayed)
        "_read_fields",
        # the last request's path and type, as bytes and as text
        "_last_url", "_last_ctype",
    )

    def __init__(self, ingest: Ingest, agent: AgentIngest):
        self.ingest = ingest
        self.agent = agent
        self._loop = ingest.loop
        self._parser = httptools.HttpRequestParser(self)
        self._max_body = ingest.settings.max_body_bytes
        self._relay = ingest.reads
        self.transport: asyncio.Transport | None = None
        # Answers in request order: [bytes or None while committing, close after it].
        self._queue: deque[list] = deque()
        self._paused = 0  # _WRITES_FULL | _BACKLOG
        self._eof = False  # the agent half-closed: answer what it asked, then close
        self._done = False  # no more requests are read: the last one said close
        self._since = 0.0  # when the last request began, or the connection was made
        self._in_message = False
        self._url = b""
        self._ctype = b""
        self._length = -1
        self._expect = False
        self._method: str | None = None
        self._keep_body = False  # a push's body, or a relayed read's
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._too_large = False
        self._read_fields: list[tuple[bytes, bytes]] | None = None
        self._last_url = (b"", "")
        self._last_ctype = (b"", "")

    # -- the connection

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._since = self._loop.time()
        self.ingest.connections.add(self)
        self.agent.connections += 1
        self.agent.connections_total += 1

    def connection_lost(self, exc) -> None:
        # Pushes of this connection still in a batch are committed all the same: the
        # agent will not hear it, and may push again (a new record, a new sequence).
        self.transport = None
        self.ingest.connections.discard(self)
        self.agent.connections -= 1

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The request was handled in full; ingest switches to no other protocol.
            self._finish()
        except httptools.HttpParserError as exc:
            if self._done:  # the parser met the next request after a closing one
                return
            self.agent.malformed += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s: malformed request: %s", self.agent.agent, exc)
            self._answer(reply(400, f"agentvisor: malformed HTTP request ({exc})",
                               close=True), close=True)

    def eof_received(self) -> bool:
        self._eof = True
        if not self._queue:
            self.transport.close()  # type: ignore[union-attr]
        return True  # keep writing the answers still owed

    def pause_writing(self) -> None:
        self._pause(_WRITES_FULL)

    def resume_writing(self) -> None:
        self._resume(_WRITES_FULL)

    def _pause(self, reason: int) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused |= reason

    def _resume(self, reason: int) -> None:
        was = self._paused
        self._paused &= ~reason
        if was and not self._paused and self.transport is not None:
            self.transport.resume_reading()

    def _finish(self) -> None:
        """Read no more requests; close once the answers owed are out."""
        self._done = True
        if not self._queue and self.transport is not None:
            self.transport.close()

    # -- the parser's callbacks

    def on_message_begin(self) -> None:
        if self._done:
            raise _Stop  # ends this feed: nothing after a closing request is read
        self._in_message = True
        # When the request began: a stalled request is timed from here, and an idle
        # connection too (a request takes far less than the idle timeout; one clock
        # read per request instead of two).
        self._since = self._loop.time()
        self._url = b""
        self._ctype = b""
        self._length = -1
        self._expect = False
        self._body = []
        self._body_bytes = 0
        self._too_large = False

    def on_url(self, url: bytes) -> None:
        if self._url:  # the rest of a target that came in pieces
            self._url += url
            return
        self._url = url
        # The method is parsed by now: a push or a read is told apart before the fields,
        # so that only a read to relay keeps them all.
        method = self._method = _PUSH_METHODS.get(self._parser.get_method())
        if method is not None:
            self._keep_body = True
        elif self._relay is not None:
            self._keep_body = True
            self._read_fields = []
        else:
            self._keep_body = False

    def on_header(self, name: bytes, value: bytes) -> None:
        fields = self._read_fields
        if fields is not None:  # a read to relay: every field goes on as it came
            fields.append((name, value))
            if len(name) == 6 and name.lower() == b"expect":
                self._expect = value.lower() == b"100-continue"
            return
        field = _FIELDS.get(name)
        if field is None:
            if len(name) not in _FIELD_LENGTHS:
                return
            field = _FIELDS.get(name.lower())
        if field == _CONTENT_TYPE:
            self._ctype = value
        elif field == _CONTENT_LENGTH:
            self._length = int(value) if value.isdigit() else -1  # llhttp checked it
        elif field == _EXPECT:
            self._expect = value.lower() == b"100-continue"

    def on_headers_complete(self) -> None:
        if not self._keep_body:
            return  # a read answered here (no proxy to relay it to): its body is dropped
        if self._length > self._max_body:
            self._too_large = True
            if self._expect:  # the agent waits for word before sending the body: say no
                self._refuse_too_large()
        elif self._expect:
            self._answer(CONTINUE)

    def on_body(self, body: bytes) -> None:
        if not self._keep_body or self._done:
            return  # a read's body, not relayed; or a request already refused: not kept
        n = self._body_bytes = self._body_bytes + len(body)
        if self._too_large:
            if n > MAX_DISCARD_BYTES:
                self._refuse_too_large()
        elif n > self._max_body:
            self._too_large = True
            self._body = []
        else:
            self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        if self._done:
            return  # refused before its end (413 with Expect)
        keep = self._parser.should_keep_alive() and not self.ingest.draining
        if self._method is None:
            self._read(keep)
        elif self._too_large:
            self._refuse_too_large()
        else:
            # An agent pushes to the same path with the same type every time: decode
            # them once per connection, and its records share the strings.
            url, ctype = self._url, self._ctype
            if url != self._last_url[0]:
                self._last_url = (url, url.decode("latin-1"))
            if ctype != self._last_ctype[0]:
                self._last_ctype = (ctype, ctype.decode("latin-1"))
            body = self._body
            push = Push(self.agent.agent, self._method, self._last_url[1],
                        self._last_ctype[1], body[0] if len(body) == 1 else b"".join(body),
                        time.time())
            entry = [None, not keep]
            self._queue.append(entry)
            self.ingest.commit.submit(push, self, entry, keep)
            if len(self._queue) > MAX_WAITING_ANSWERS:
                self._pause(_BACKLOG)
            if not keep:
                self._done = True

    def _read(self, keep: bool) -> None:
        """A read: relayed to the proxy, its answer in its turn; or 502 without one."""
        self.agent.reads += 1
        method = self._parser.get_method()
        head = method == b"HEAD"
        fields, self._read_fields = self._read_fields, None
        if fields is None:
            # No proxy to relay to (no --reads-to: ingest run alone): say where reads go.
            self._answer(reply(502, READS_ELSEWHERE, close=not keep, head_only=head),
                         close=not keep)
            return
        if self._too_large:
            self._refuse_too_large()
            return
        if method == b"CONNECT":
            self._answer(reply(405, "agentvisor: CONNECT is not relayed to the hub",
                               close=True), close=True)
            return
        body = self._body
        request = relayed_request(method, self._url, fields,
                                  body[0] if len(body) == 1 else b"".join(body))
        entry = [None, not keep]
        self._queue.append(entry)
        if not keep:
            self._done = True
        self._relay.relay(self, entry, request, method=method,  # type: ignore[union-attr]
                          head_only=head, close=not keep,
                          http11=self._parser.get_http_version() == "1.1")
        if len(self._queue) > MAX_WAITING_ANSWERS:
            self._pause(_BACKLOG)

    # -- answers, in request order

    def _refuse_too_large(self) -> None:
        self.agent.too_large += 1
        self._answer(reply(413, f"agentvisor: a request body is limited to {self._max_body} "
                                "bytes", close=True), close=True)

    def _answer(self, data: bytes, close: bool = False) -> None:
        """An answer ready now: out at once, or behind the pushes still committing."""
        if close:
            self._done = True
        if self._queue:
            self._queue.append([data, close])
        elif self.transport is not None:
            self.transport.write(data)
            if close or (self._eof and not self._in_message):
                self.transport.close()

    def release(self) -> None:
        """Send the answers now ready at the front of the queue (called after a commit)."""
        queue = self._queue
        out = []
        close = False
        while queue and queue[0][0] is not None:
            data, close = queue.popleft()
            out.append(data)
            if close:
                queue.clear()
                break
        transport = self.transport
        if transport is None:
            return
        if out:
            transport.write(out[0] if len(out) == 1 else b"".join(out))
        if not queue:
            if close or ((self._eof or self._done) and not self._in_message):
                transport.close()
            elif self.ingest.draining and not self._in_message:
                transport.close()
        if self._paused & _BACKLOG and len(queue) <= MAX_WAITING_ANSWERS // 2:
            self._resume(_BACKLOG)

    def check(self, now: float) -> None:
        """The server's timer: close an idle connection, answer a stalled request 408."""
        if self._queue or self._done or self.transport is None:
            return  # answers are owed (busy, not idle), or it is closing already
        settings = self.ingest.settings
        if self._in_message:
            if now - self._since > settings.request_timeout_s:
                self.agent.timeouts += 1
                self._answer(reply(408, "agentvisor: request not received in "
                                        f"{settings.request_timeout_s:g} s", close=True),
                             close=True)
        elif now - self._since > settings.idle_timeout_s or self.ingest.draining:
            self._finish()


class _Stop(Exception):
    """Raised in a parser callback to stop reading requests after a closing one."""


class Ingest:
    """Every agent's ingest listener of one data process, sharing one spool and one group
    commit. `on_appended` is called after each commit that stored something (the
    forwarder's `wake`)."""

    def __init__(self, spool: Spool, settings: IngestSettings | None = None, *,
                 on_appended: Callable[[], None] | None = None,
                 loop: asyncio.AbstractEventLoop | None = None):
        self.loop = loop or asyncio.get_running_loop()
        self.settings = settings or IngestSettings()
        self.commit = GroupCommit(spool, self.settings, on_appended, self.loop)
        reads_to = self.settings.reads_to
        self.reads = (ReadRelay(reads_to, timeout_s=self.settings.reads_timeout_s,
                                loop=self.loop) if reads_to is not None else None)
        self.agents: dict[str, AgentIngest] = {}
        self.connections: set[IngestConnection] = set()
        self.servers: list[asyncio.AbstractServer] = []
        self.draining = False
        self._sweeper: asyncio.TimerHandle | None = None

    def add(self, agent: str, answer: Answer | None = None) -> AgentIngest:
        """An agent this ingest takes pushes from (its listener is served by `serve`)."""
        if agent in self.agents:
            raise ValueError(f"{agent}: already has an ingest listener")
        state = self.agents[agent] = AgentIngest(agent, answer or Answer())
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(SWEEP_INTERVAL_S, self._sweep)
        return state

    async def serve(self, agent: str, sock: socket.socket,
                    answer: Answer | None = None) -> AgentIngest:
        """Serve `agent`'s pushes on `sock` (listening, bound to this agent only)."""
        state = self.add(agent, answer)
        sock.setblocking(False)
        self.servers.append(await self.loop.create_server(
            lambda: IngestConnection(self, state), sock=sock, backlog=1024))
        return state

    def _sweep(self) -> None:
        now = self.loop.time()
        for conn in list(self.connections):
            conn.check(now)
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL_S, self._sweep)

    def status(self) -> dict:
        agents = {name: a.counters() for name, a in sorted(self.agents.items())}
        totals = {key: sum(a[key] for a in agents.values()) for key in (
            "accepted", "refused", "malformed", "too_large", "reads", "timeouts",
            "connections")}
        commit = self.commit
        return {**totals, "refusing": commit.refusing, "spool_failed": commit.failed,
                "batches": commit.batches, "largest_batch": commit.largest_batch,
                "reads_relay": self.reads.status() if self.reads is not None else None,
                "agents": agents}

    async def drain(self, timeout_s: float) -> None:
        """Stop accepting; commit and answer every push received in full; let requests
        half-way through finish for at most `timeout_s`; then close every connection."""
        self.draining = True
        for server in self.servers:
            server.close()
        self.commit.flush()
        for conn in list(self.connections):
            conn.check(self.loop.time())  # idle ones close now: draining
        deadline = self.loop.time() + timeout_s
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        if self.connections:
            log.warning("drain: %d connections still open after %g s; closing them",
                        len(self.connections), timeout_s)
            for conn in list(self.connections):
                if conn.transport is not None:
                    conn.transport.abort()
        if self.reads is not None:
            await self.reads.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
