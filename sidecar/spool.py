"""The durable spool: every accepted push on local disk, in order, until a hub has it.

One module for every kind of record that must outlive a partition (metrics now, log lines
later), used by the host side (ingest appends, the forwarder drains) and by the hub side
(the receiver re-spools what it got). The one idea: a record is *answered* only once its
transaction has committed, and nothing the spool answered is ever dropped by the spool
itself; only `ack` (a hub has it) removes records.

Storage is SQLite in WAL mode (standard library):
- `synchronous=NORMAL`: a commit is a write() of its WAL frames, no fsync, so an append
  that returned survives SIGKILL of this process at any moment (the kernel has the bytes);
  power loss can cost what came after the last `sync()`, which the owner calls every
  `sync_interval_s` (0: fsync at every commit instead, `synchronous=FULL`).
- `sync()` fsyncs the -wal file rather than running `PRAGMA wal_checkpoint(FULL)`.
  Measured on this machine after 20,000 records of 300 bytes: fsync of the -wal 1-4 ms,
  checkpoint(FULL) 5-13 ms (it also copies every page into the database file and fsyncs
  twice). Either makes every committed frame durable; the fsync does no more than that,
  and checkpoints stay SQLite's own business (automatic, every 1000 pages, fsynced).
- Every row carries a CRC-32 of all its fields (SQLite pages carry no checksum, so bytes
  overwritten inside a record would otherwise read back as a different push). Opening
  verifies every row, `pending` again what it hands out. Measured here: opening takes
  0.25-0.5 s with 15 minutes of the fleet's pushes waiting (69,300 records), 5-8 s with a
  full 512 MiB spool (1.3 million); an empty or drained spool opens at once. A big
  spool closed cleanly opens at once too (0.01 s): `close` leaves a mark with the
  running totals (as Kafka's clean-shutdown file does), and an open that finds one for
  more than TRUST_CLEAN_CLOSE_RECORDS records takes them instead of reading the file
  (SQLite's quick_check and the rows' scan: 15 s more when the file is not in the page
  cache, after a reboot). It removes the mark before anything else is written, so a
  crash from then on means a full read again. The rows it trusted, and the pages that
  hold them, are then read back by its owner, a slice at a time between its other work
  (`verify_some`); damage found there raises SpoolCorrupt like `pending`'s, and
  reopening recovers. A spool that met a checksum or SQLite error is never marked.
- Per-(host, agent) sequences: the next one is max(seq still stored) + 1, or the floor in
  the `sequences` table if higher. `ack` writes the floors, in the transaction that
  deletes the records, so a sequence is never reused; on the hub side the same numbers
  are the high-water marks (`high_water`), stored with the records they count. `append`
  also reserves sequences SEQ_RESERVE ahead (one more row written per SEQ_RESERVE pushes
  of an agent: a commit is nearly always its records alone), so that when corruption
  loses records never acked, the fresh file goes on past every sequence ever handed out
  (a gap at the hub) rather than reuse one (the hub would drop it as a duplicate).
- One owner per file: an exclusive flock on `<path>.lock`, which names its holder.
- Opening checks the file (header, `PRAGMA quick_check`, every row's CRC, the WAL's tail).
  A corrupt file is moved aside to `<path>.corrupt-<unix time>` (its WAL beside it as
  `...-wal`, so `sqlite3` opens the pair as found) and every row that still reads back
  intact is copied, oldest first, into a fresh file, which replaces it only once complete
  and fsynced: a crash during recovery redoes or finishes it. A -wal whose last append a
  crash cut short is only reported (SQLite drops the uncommitted frames: never answered);
  one damaged mid-log is copied to `<path>-wal.corrupt-<unix time>` as found. What was
  found and done is in `Spool.recovered`; `Spool.damaged` says whether records may have
  been lost (page someone) or it was only a crash's tail.

Bounded by bytes: each record counts its body and text fields plus RECORD_OVERHEAD_BYTES;
an append that would pass `max_bytes` stores nothing and raises SpoolFull. The total is
recomputed at open by the verifying scan.

Single-threaded: one Spool per process, called from one thread at a time, synchronously
(the data process owns its own event loop; a commit there never stalls the proxy's).
"""

from __future__ import annotations

import collections
import fcntl
import functools
import os
import sqlite3
import struct
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence
from urllib.parse import quote

FORMAT_VERSION = 1  # the schema below; a file from a newer agentvisor is refused, not moved
DEFAULT_MAX_BYTES = 512 << 20  # hours of the whole fleet's pushes (77 agents, 1/s, ~300 B)
# Measured: 410 bytes of database file per record with a 300-byte body and 58 bytes of
# text fields (ids, numbers, CRC, SQLite's cell and page overhead): about 52 more.
RECORD_OVERHEAD_BYTES = 56
BUSY_TIMEOUT_S = 5.0  # only an operator's sqlite3 shell can hold a lock we wait for
DRAIN_WINDOW_S = 30.0  # acks this recent estimate the drain rate for Retry-After
RETRY_AFTER_DEFAULT_S = 1.0  # nothing drained lately (partitioned): ask again soon
RETRY_AFTER_MAX_S = 60.0  # beyond a minute the estimate means little; clients back off
SEQ_RESERVE = 1024  # sequences reserved ahead per agent: the gap a corrupt file can leave
# Above this many records, an open after a clean close trusts the totals it left and
# checks the rows later (verify_some); below it, scanning them at open costs under 0.4 s.
TRUST_CLEAN_CLOSE_RECORDS = 100_000
_SALVAGE_CHUNK = 1000  # rows per insert while copying a corrupt file's readable rows

_CORRUPT_CODES = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB
_FULL_CODE = 13  # SQLITE_FULL: the disk (or a quota) is full
_SQLITE_MAGIC = b"SQLite format 3\x00"
_WAL_MAGIC = (0x377F0682, 0x377F0683)  # checksums little-/big-endian
_WAL_HEADER = struct.Struct(">8I")
_WAL_FRAME_HEADER = struct.Struct(">6I")
_CRC_FIXED = struct.Struct(">qqdq")  # id, seq, time, size

_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE records(
    id INTEGER PRIMARY KEY, host TEXT NOT NULL, agent TEXT NOT NULL,
    seq INTEGER NOT NULL, time REAL NOT NULL, method TEXT NOT NULL, path TEXT NOT NULL,
    content_type TEXT NOT NULL, size INTEGER NOT NULL, crc INTEGER NOT NULL, body BLOB);
CREATE TABLE sequences(
    host TEXT NOT NULL, agent TEXT NOT NULL,
    next_seq INTEGER NOT NULL,  -- exact: every seq below was used (written by ack)
    reserved INTEGER NOT NULL,  -- every seq append ever gave out is below this
    PRIMARY KEY(host, agent)) WITHOUT ROWID;
"""
_COLUMNS = "id, host, agent, seq, time, method, path, content_type, size, crc, body"
_INSERT = f"INSERT INTO records({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
_ROW_VALUES = 11  # the columns, as _store's flat lists of values hold them
# Records per INSERT statement: each statement SQLite steps costs as much again as binding
# a record's eleven values (the module releases the GIL and SQLite takes its mutex around
# every step), so a commit inserts them 50 at a time, the rest in one statement: a fifth
# less CPU per record than one statement each (50 rows: 550 variables, well within even
# old SQLite's limit of 999).
_ROWS_PER_INSERT = 50
_SAVE_SEQ = ("INSERT INTO sequences(host, agent, next_seq, reserved) VALUES (?,?,?,0) "
             "ON CONFLICT(host, agent) DO UPDATE "
             "SET next_seq = max(next_seq, excluded.next_seq)")
_RESERVE_SEQ = ("INSERT INTO sequences(host, agent, next_seq, reserved) VALUES (?,?,1,?) "
                "ON CONFLICT(host, agent) DO UPDATE "
                "SET reserved = max(reserved, excluded.reserved)")


@dataclass(frozen=True, slots=True)
class Push:
    """What ingest hands in: one agent's HTTP push, as it came."""
    agent: str
    method: str  # "POST", "PUT", "PATCH"
    path: str  # request target as sent, e.g. "/api/metrics?x=1"
    content_type: str  # "" when the push had none
    body: bytes
    time: float | None = None  # unix seconds it was accepted; None: now


@dataclass(frozen=True, slots=True)
class Record:
    """What is stored, forwarded and delivered."""
    id: int  # position in this spool file, strictly increasing
    host: str
    agent: str
    seq: int  # per (host, agent): 1, 2, 3... never reused, even after acks
    time: float
    method: str
    path: str
    content_type: str
    body: bytes


class _NewRecord:
    """`new_record(id, host, ...)` is `Record(id, host, ...)` for a fifth of the CPU
    (2,900 instructions against 13,600, 1.5 us a Record here): the drain makes three
    Records per record (read from the spool, decoded at the hub, stored there), and a
    frozen dataclass's __init__ sets each of its nine fields through object.__setattr__.
    This class has Record's slots in the same order, filled by plain stores; the
    instance then becomes a Record, which CPython allows between classes of the same
    layout. What comes out is an ordinary Record in every way (type, equality, hash,
    repr, frozen). Positional only; nothing is converted or checked, as Record(...)
    checks nothing either."""

    __slots__ = Record.__slots__

    def __init__(self, id: int, host: str, agent: str, seq: int, time: float,
                 method: str, path: str, content_type: str, body: bytes):
        self.id = id
        self.host = host
        self.agent = agent
        self.seq = seq
        self.time = time
        self.method = method
        self.path = path
        self.content_type = content_type
        self.body = body
        self.__class__ = Record  # type: ignore[assignment]


new_record: Callable[[int, str, str, int, float, str, str, str, bytes], Record] = \
    _NewRecord  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class SpoolStats:
    records: int  # stored, not yet acked
    bytes: int  # as counted against max_bytes
    oldest_time: float | None  # time of the oldest stored record; None: empty
    max_bytes: int
    appended_total: int  # records, since this Spool was opened
    acked_total: int
    refused_total: int  # records refused (spool or disk full)


class SpoolError(Exception):
    """The spool cannot do its job; the message says where and what to do."""


class SpoolLocked(SpoolError):
    """Another process (or another Spool in this one) owns the file."""


class SpoolCorrupt(SpoolError):
    """A record failed its checksum at run time. Close and reopen the spool: opening
    moves the file aside and keeps every record that still reads back intact."""


class SpoolFull(Exception):
    """Nothing of the refused batch was stored; answer 503 with Retry-After."""

    def __init__(self, reason: str, retry_after_s: float):
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


def record_size(host: str, agent: str, method: str, path: str, content_type: str,
                body: bytes) -> int:
    """What one record counts against max_bytes (and against pending's max_bytes)."""
    return (len(body) + len(host) + len(agent) + len(method) + len(path)
            + len(content_type) + RECORD_OVERHEAD_BYTES)


def retry_after_s(excess_bytes: int, drain_bytes_per_s: float | None) -> float:
    """How long until `excess_bytes` more fit, at the recent drain rate (None: unknown)."""
    if not drain_bytes_per_s:
        return RETRY_AFTER_DEFAULT_S
    return min(max(excess_bytes / drain_bytes_per_s, RETRY_AFTER_DEFAULT_S),
               RETRY_AFTER_MAX_S)


class DrainRate:
    """Bytes acked per second over the last DRAIN_WINDOW_S; `now` is any monotonic clock."""

    def __init__(self, window_s: float = DRAIN_WINDOW_S):
        self.window_s = window_s
        self._acks: collections.deque[tuple[float, int]] = collections.deque()
        self._bytes = 0

    def record(self, acked_bytes: int, now: float) -> None:
        self._acks.append((now, acked_bytes))
        self._bytes += acked_bytes
        self._expire(now)

    def rate(self, now: float) -> float | None:
        """None until acks have spanned at least a second: one ack says nothing of speed."""
        self._expire(now)
        if not self._acks:
            return None
        span = now - self._acks[0][0]
        return self._bytes / span if span >= 1.0 else None

    def _expire(self, now: float) -> None:
        while self._acks and self._acks[0][0] < now - self.window_s:
            self._bytes -= self._acks.popleft()[1]


def _row(id_: int, host: str, agent: str, seq: int, time_: float, method: str, path: str,
         content_type: str, body: bytes) -> tuple:
    """A record as stored: its fields in _COLUMNS order, with its size and CRC."""
    size = record_size(host, agent, method, path, content_type, body)
    head = _CRC_FIXED.pack(id_, seq, time_, size) + "\0".join(
        (host, agent, method, path, content_type)).encode()
    return (id_, host, agent, seq, time_, method, path, content_type, size,
            zlib.crc32(body, zlib.crc32(head)), body)


@functools.lru_cache(maxsize=_ROWS_PER_INSERT)
def _insert_rows(count: int) -> str:
    """One INSERT of `count` records (the sqlite3 module keeps each one compiled)."""
    return (f"INSERT INTO records({_COLUMNS}) VALUES "
            + ",".join(["(?,?,?,?,?,?,?,?,?,?,?)"] * count))


def _intact(row: tuple) -> bool:
    """Whether a stored row reads back as written. A field of the wrong type (a damaged
    row) fails in the computation itself: fewer checks on the path every record takes."""
    id_, host, agent, seq, time_, method, path, content_type, size, crc, body = row
    try:
        head = _CRC_FIXED.pack(id_, seq, time_, size) + "\0".join(
            (host, agent, method, path, content_type)).encode()
        return zlib.crc32(body, zlib.crc32(head)) == crc
    except (TypeError, struct.error, UnicodeError):
        return False


def _sqlite_code(error: sqlite3.Error) -> int:
    return (getattr(error, "sqlite_errorcode", None) or 0) & 0xFF


def _is_corruption(error: sqlite3.Error) -> bool:
    """SQLite found the file damaged, or a text field is no longer UTF-8 (the module
    raises that one itself, with no SQLite code: its message is the only sign)."""
    return (_sqlite_code(error) in _CORRUPT_CODES
            or isinstance(error, sqlite3.OperationalError) and "decode" in str(error))


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _companions(db: Path) -> tuple[Path, Path]:
    """SQLite's -wal and -shm files beside a database file."""
    return db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")


def _remove_db(db: Path) -> None:
    for p in (db, *_companions(db)):
        p.unlink(missing_ok=True)


def _aside_name(path: Path, suffix: str) -> Path:
    base = path.with_name(f"{path.name}.{suffix}-{int(time.time())}")
    candidate, n = base, 1
    while candidate.exists() or _companions(candidate)[0].exists():
        candidate, n = base.with_name(f"{base.name}.{n}"), n + 1
    return candidate


def _connect(db: Path, *, read_only: bool = False) -> sqlite3.Connection:
    if read_only:
        conn = sqlite3.connect(f"file:{quote(str(db))}?mode=ro", uri=True,
                               isolation_level=None, timeout=BUSY_TIMEOUT_S,
                               check_same_thread=False)
    else:
        conn = sqlite3.connect(db, isolation_level=None, timeout=BUSY_TIMEOUT_S,
                               check_same_thread=False)
    return conn


def _create_schema(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")  # executescript would commit at once: one by one
    for statement in filter(str.strip, _SCHEMA.split(";")):
        conn.execute(statement)
    conn.executemany("INSERT INTO meta(key, value) VALUES (?, ?)",
                     [("format", FORMAT_VERSION), ("last_acked_id", 0),
                      ("created", time.time())])
    conn.execute("COMMIT")


# --- the write-ahead log's tail ---------------------------------------------------------

def _wal_checksum(data: bytes, big_endian: bool, s0: int = 0, s1: int = 0
                  ) -> tuple[int, int]:
    """SQLite's WAL checksum (https://sqlite.org/fileformat2.html#walformat)."""
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def _wal_tail(wal: Path) -> tuple[str | None, bool]:
    """What the -wal holds past its last whole commit, and whether that is damage.

    SQLite replays a WAL up to its last commit frame whose cumulative checksum holds and
    ignores the rest, silently. What follows the last commit of the current round is
    either an append cut short by a crash or damage. A crash (SIGKILL or power loss)
    cuts only the last frame being written: it leaves whole uncommitted frames, then a
    partial frame at the end, or a frame that fails its checksum with nothing of the
    round after it (a frame of the log's previous round is overwritten in place, header
    first). A frame that fails its checksum although the round goes on after it was
    written whole and changed since: damage (a damaged disk, a stray write). Frames
    with older salts are leftovers of the previous round, not news. Reads the file only.
    """
    try:
        size = wal.stat().st_size
    except FileNotFoundError:
        return None, False
    if size == 0:
        return None, False
    with open(wal, "rb") as f:
        header = f.read(32)
        if len(header) < 32:
            return (f"torn write-ahead log: {size} bytes, not even its header; SQLite "
                    "ignored it"), True
        magic, _version, page_size, _ckpt, salt1, salt2, ck1, ck2 = _WAL_HEADER.unpack(
            header)
        big = magic & 1 == 1
        if magic not in _WAL_MAGIC or _wal_checksum(header[:24], big) != (ck1, ck2):
            return (f"damaged write-ahead log header ({size} bytes); SQLite ignored the "
                    "log, so commits since the last checkpoint were not replayed"), True
        frame_size = 24 + page_size
        whole, partial = divmod(size - 32, frame_size)
        current = committed = 0  # frames of this round that hold; up to the last commit
        running = (ck1, ck2)
        cut = ""  # how the last frame written was cut short
        for _ in range(whole):
            frame = f.read(frame_size)
            _page, commit, fsalt1, fsalt2, fck1, fck2 = _WAL_FRAME_HEADER.unpack(
                frame[:24])
            if (fsalt1, fsalt2) != (salt1, salt2):
                break
            running = _wal_checksum(frame[24:], big, *_wal_checksum(frame[:8], big,
                                                                     *running))
            if running != (fck1, fck2):
                after = f.read(24)
                if len(after) == 24 and _WAL_FRAME_HEADER.unpack(after)[2:4] == (salt1,
                                                                                 salt2):
                    return (f"torn write-ahead log: frame {current + 1} of {whole} fails "
                            "its checksum although the log goes on after it (a damaged "
                            f"disk or a stray write); SQLite replayed the {committed} "
                            "frame(s) up to the last whole commit before it and dropped "
                            "the rest"), True
                cut = "a garbled last frame"
                break
            current += 1
            if commit:
                committed = current
        else:
            if partial:
                cut = f"a partial last frame ({partial} of {frame_size} bytes)"
    if cut or current > committed:
        left = " and ".join(filter(None, (
            f"{current - committed} whole uncommitted frame(s)" if current > committed
            else "", cut)))
        return (f"an append cut short by a crash left {left} in the write-ahead log; "
                "SQLite dropped them (that append was never answered)"), False
    return None, False


# --- opening, checking, recovering ------------------------------------------------------

class _Damaged(Exception):
    """The file cannot be trusted as a whole: recover what reads back intact."""


@dataclass(slots=True)
class _State:
    """What the verifying scan at open finds; the running totals start from it."""
    records: int = 0
    bytes: int = 0
    next_id: int = 1
    next_seq: dict[tuple[str, str], int] = field(default_factory=dict)
    floors: dict[tuple[str, str], tuple[int, int]] = field(  # the sequences table
        default_factory=dict)


def _integrity(conn: sqlite3.Connection) -> None:
    """Raise _Damaged unless SQLite's quick_check finds the file sound. It reads every
    page: 0.7 s for a full spool in the page cache, 15 s from this machine's disk."""
    problems = [r[0] for r in conn.execute("PRAGMA quick_check(5)")]
    if problems != ["ok"]:
        raise _Damaged("SQLite's quick_check: " + "; ".join(problems))


def _check(conn: sqlite3.Connection, path: Path) -> bool:
    """Raise _Damaged unless the file holds a spool's tables (SpoolError if a newer
    one); True when it is a new, empty database that still needs its schema."""
    tables = {r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not tables:
        return True
    if not {"meta", "records", "sequences"} <= tables:
        raise _Damaged(f"not a spool: its tables are {', '.join(sorted(tables))}")
    row = conn.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
    if row is None or type(row[0]) is not int:
        raise _Damaged(f"its format version is unreadable ({row!r})")
    if row[0] > FORMAT_VERSION:
        raise SpoolError(
            f"{path}: spool format {row[0]} was written by a newer agentvisor (this one "
            f"reads format {FORMAT_VERSION}); run the newer version, or move the file "
            "aside to start an empty spool")
    return False


def _scan(conn: sqlite3.Connection) -> _State:
    """Verify every row's checksum and count what the running totals start from."""
    state = _floored(conn)
    next_seq = state.next_seq
    last = 0
    cursor = conn.execute(f"SELECT {_COLUMNS} FROM records ORDER BY id")
    while rows := cursor.fetchmany(4096):
        for row in rows:
            if not _intact(row):
                raise _Damaged(f"record id {row[0]!r} fails its checksum")
            key = (row[1], row[2])
            if row[3] >= next_seq.get(key, 1):
                next_seq[key] = row[3] + 1
            state.bytes += row[8]
        state.records += len(rows)
        last = rows[-1][0]
    acked = conn.execute("SELECT value FROM meta WHERE key = 'last_acked_id'").fetchone()
    state.next_id = max(last, acked[0] if acked and type(acked[0]) is int else 0) + 1
    return state


def _clean_state(conn: sqlite3.Connection) -> _State | None:
    """What the last clean close left (see Spool.close), or None: scan the rows."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'clean_close'").fetchone()
    if row is None or type(row[0]) is not str:
        return None
    try:
        records, size, next_id = map(int, row[0].split())
    except ValueError:
        return None
    if records <= TRUST_CLEAN_CLOSE_RECORDS:
        return None  # scanning them is cheap: the damage is found at open
    state = _floored(conn)
    state.records, state.bytes, state.next_id = records, size, next_id
    return state


def _floored(conn: sqlite3.Connection) -> _State:
    """A state whose next sequences are the floors the sequences table holds: exact
    after a clean close, and what a scan raises by the rows stored otherwise."""
    floors = _sequence_floors(conn)
    return _State(next_seq={key: exact for key, (exact, _reserved) in floors.items()},
                  floors=floors)


def _sequence_floors(conn: sqlite3.Connection) -> dict[tuple[str, str], tuple[int, int]]:
    """(host, agent) -> (next_seq, reserved) as the sequences table holds them."""
    return {(h, a): (n, r) for h, a, n, r in conn.execute(
        "SELECT host, agent, next_seq, reserved FROM sequences")}


def _readable_rows(src: sqlite3.Connection, skipped: list[str]) -> Iterator[tuple]:
    """Every row SELECT can still read, in id order, stepping over damaged pages."""
    after = -(1 << 63)
    while True:
        try:
            for row in src.execute(f"SELECT {_COLUMNS} FROM records WHERE id > ? "
                                   "ORDER BY id", (after,)):
                yield row
                after = row[0]
            return
        except sqlite3.DatabaseError:
            resume = _next_readable_id(src, after)
            start = after > -(1 << 63)
            skipped.append(f"ids {after + 1}-{resume - 1}" if start and resume
                           else f"after id {after}" if start
                           else f"before id {resume}" if resume else "all of them")
            if resume is None:
                return
            after = resume - 1


def _next_readable_id(src: sqlite3.Connection, after: int) -> int | None:
    """The first id past a damaged stretch that a seek can reach: probe one by one (a
    damaged leaf holds about ten records), then in doubling steps (a damaged subtree)."""
    step, probe = 1, max(after, 0)
    while probe < (1 << 62):
        probe = probe + step
        try:
            row = src.execute("SELECT id FROM records WHERE id > ? ORDER BY id LIMIT 1",
                              (probe,)).fetchone()
            return None if row is None else row[0]
        except sqlite3.DatabaseError:
            if probe - after > 64:
                step *= 2
    return None


def _salvage(bad: Path, fresh: Path) -> str:
    """Copy every intact row of `bad` into a new spool file `fresh`; say what was kept."""
    kept = damaged = 0
    skipped: list[str] = []
    floors: dict[tuple[str, str], int] = {}
    seq_note = ("per-agent sequences go on past every one the old file gave out (the hub "
                "sees a gap where records were lost)")
    last_acked = 0
    try:
        src = _connect(bad, read_only=True)
        # Lets SQLite read a file shorter than its header says (cut short): without it
        # every query fails; read-only, so nothing can be written through it.
        src.execute("PRAGMA writable_schema = ON")
    except sqlite3.Error as e:
        src = None
        skipped.append(f"everything (SQLite cannot open it: {e})")
    dst = _connect(fresh)
    try:
        dst.execute("PRAGMA journal_mode=WAL")
        dst.execute("PRAGMA synchronous=NORMAL")
        _create_schema(dst)
        if src is not None:
            try:
                floors = {key: max(pair) for key, pair in _sequence_floors(src).items()}
            except sqlite3.DatabaseError:
                seq_note = ("the sequence table was unreadable: each agent's next sequence "
                            "is max(seq)+1 of its recovered records, so an agent whose "
                            "records were all acked restarts at 1 and its hub drops those "
                            "pushes as duplicates until the old high-water mark is passed; "
                            "clear that agent's marks at the hub")
            try:
                row = src.execute(
                    "SELECT value FROM meta WHERE key = 'last_acked_id'").fetchone()
                if row and type(row[0]) is int:
                    last_acked = row[0]
            except sqlite3.DatabaseError:
                pass
            chunk: list[tuple] = []
            dst.execute("BEGIN IMMEDIATE")
            for row in _readable_rows(src, skipped):
                if not _intact(row):
                    damaged += 1
                    continue
                chunk.append(row)
                kept += 1
                key = (row[1], row[2])
                floors[key] = max(floors.get(key, 1), row[3] + 1)
                if len(chunk) >= _SALVAGE_CHUNK:
                    dst.executemany(_INSERT, chunk)
                    chunk.clear()
            dst.executemany(_INSERT, chunk)
            dst.executemany(_SAVE_SEQ, [(h, a, n) for (h, a), n in floors.items()])
            dst.executemany(_RESERVE_SEQ, [(h, a, n) for (h, a), n in floors.items()])
            dst.execute("UPDATE meta SET value = ? WHERE key = 'last_acked_id'",
                        (last_acked,))
            dst.execute("COMMIT")
            src.close()
    finally:
        dst.close()  # checkpoints the fresh file and deletes its -wal
    _fsync_path(fresh)
    lost = []
    if damaged:
        lost.append(f"{damaged} record(s) that failed their checksum")
    if skipped:
        lost.append("unreadable records (" + ", ".join(skipped) + ")")
    return (f"recovered {kept} record(s) into a fresh spool, oldest first"
            + (f"; lost {' and '.join(lost)}" if lost else "") + f"; {seq_note}")


def _swap_in(path: Path, done: Path, why: str) -> str:
    """Move the bad file (and its -wal) aside and the recovered one into place."""
    aside = _aside_name(path, "corrupt")
    wal, shm = _companions(path)
    moved = []
    # The -wal first: one left beside the fresh file would be replayed into it.
    if wal.exists() and wal.stat().st_size:
        os.rename(wal, _companions(aside)[0])
        moved.append(f"its write-ahead log to {_companions(aside)[0]}")
    wal.unlink(missing_ok=True)  # an empty one, as a read-only look leaves behind
    if path.exists():
        os.rename(path, aside)
        moved.insert(0, f"moved it to {aside}")
    shm.unlink(missing_ok=True)  # SQLite's index of the old -wal; rebuilt on demand
    os.rename(done, path)
    _fsync_path(path.parent)
    return f"{path}: {why}; " + (" and ".join(moved) if moved else "nothing to move")


class Spool:
    """One durable spool file. See the module docstring for the guarantees."""

    def __init__(self, path: Path | str, *, host: str, max_bytes: int = DEFAULT_MAX_BYTES,
                 sync_interval_s: float = 1.0):
        if not host:
            raise ValueError("a spool needs the host name its records come from")
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, not {max_bytes}")
        if sync_interval_s < 0:
            raise ValueError(f"sync_interval_s must be >= 0, not {sync_interval_s}")
        self.path = Path(path)
        self.host = host
        self.max_bytes = max_bytes
        self.sync_interval_s = sync_interval_s
        # What opening found and did about a torn or corrupt file (None: it was clean),
        # and whether that was damage (records may be lost: page someone) rather than
        # only the uncommitted tail of an append a crash cut short (never answered).
        self.recovered: str | None = None
        self.damaged = False
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        # No checksum or SQLite error met since open: close may leave its clean mark.
        self._trusted = False
        # Rows an open after a clean close trusted and verify_some has not read yet:
        # those with _checked_after < id <= _unchecked_through.
        self._checked_after = 0
        self._unchecked_through = 0
        try:
            self._lock_fd = self._take_lock()
            self._open()
        except OSError as e:
            self.close()
            raise SpoolError(f"{self.path}: cannot open the spool: {e} (check that the "
                             "state directory is writable by this user and not full)"
                             ) from None
        except BaseException:
            self.close()
            raise
        self._appended_total = self._acked_total = self._refused_total = 0
        self._trusted = True
        self._drain = DrainRate()
        self._unsynced = False
        self._synced_wal_inode: int | None = None

    # --- life cycle

    def _take_lock(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip()
            os.close(fd)
            raise SpoolLocked(
                f"{self.path}: already open by {holder or 'another process'} (lock "
                f"{lock}); a spool has one owner: stop that one, or give this process "
                "its own state_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, (f"pid {os.getpid()} ({' '.join(sys.argv)[:200]}) since "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n").encode(), 0)
        return fd

    def _open(self) -> None:
        notes: list[str] = []
        finished = self._finish_interrupted_recovery()
        if finished:
            notes.append(finished)
            self.damaged = True
        try:
            conn, state = self._open_checked(notes)
        except _Damaged as damage:
            self.damaged = True
            done = self.path.with_name(self.path.name + ".recovered")
            building = self.path.with_name(self.path.name + ".recovering")
            try:
                _remove_db(building)
                salvage = _salvage(self.path, building)
                _remove_db(done)
                os.rename(building, done)  # complete and fsynced: from here on, finish it
            except (sqlite3.Error, OSError) as e:
                raise SpoolError(
                    f"{self.path}: corrupt ({damage}), and copying its intact records to "
                    f"{building} failed: {e}; the file is as it was: free space in the "
                    "state directory, or move the file aside to start an empty spool"
                ) from None
            notes.append(_swap_in(self.path, done, f"corrupt ({damage})") + "; " + salvage)
            try:
                conn, state = self._open_checked(notes)
            except _Damaged as again:  # a fresh file SQLite itself wrote: the disk fails
                raise SpoolError(f"{self.path}: the recovered spool is unreadable too "
                                 f"({again}); check the disk (dmesg, smartctl)") from None
        self._conn = conn
        self._records, self._bytes = state.records, state.bytes
        self._next_id = state.next_id
        self._next_seq = state.next_seq
        # What the sequences table holds: ack writes the exact floors that changed,
        # append the reservations it passes.
        self._saved_seq = {key: exact for key, (exact, _r) in state.floors.items()}
        self._reserved = {key: reserved for key, (_e, reserved) in state.floors.items()}
        self.recovered = "; ".join(notes) or None

    def _finish_interrupted_recovery(self) -> str | None:
        building = self.path.with_name(self.path.name + ".recovering")
        done = self.path.with_name(self.path.name + ".recovered")
        _remove_db(building)  # a crash while copying: start that copy again
        if not done.exists():
            return None
        return _swap_in(self.path, done, "a recovery was interrupted by a crash "
                        "and is now finished")

    def _open_checked(self, notes: list[str]) -> tuple[sqlite3.Connection, _State]:
        """Open and verify the file at self.path, adding what it found to `notes`;
        _Damaged if it cannot be trusted.

        Verification runs on a read-only connection: closing a read-write one
        checkpoints the -wal into the file, which would change a damaged file before
        it is moved aside as found."""
        wal, _shm = _companions(self.path)
        if not self.path.exists():
            if wal.exists() and wal.stat().st_size:
                # A -wal without its database would be replayed into the new file.
                orphan = _aside_name(wal, "orphan")
                os.rename(wal, orphan)
                notes.append(f"{self.path}: missing, but its write-ahead log was there; "
                             f"moved that to {orphan} and started an empty spool")
                self.damaged = True
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        wal_note, wal_damaged = _wal_tail(wal)
        if wal_note:
            notes.append(f"{self.path}: {wal_note}")
            self.damaged = self.damaged or wal_damaged
        with open(self.path, "rb") as f:
            head = f.read(len(_SQLITE_MAGIC))
        if head and head != _SQLITE_MAGIC:
            raise _Damaged(f"not an SQLite database (it starts with {head[:8]!r})")
        conn = None
        try:
            conn = _connect(self.path, read_only=True)
            try:
                empty = _check(conn, self.path)
                clean = None if empty else _clean_state(conn)
                if clean is None:  # trusted, the pages are read back with the rows
                    _integrity(conn)
                state = _State() if empty else clean or _scan(conn)
                # Rows up to here are the ones a trusted open has not read yet.
                self._unchecked_through = state.next_id - 1 if clean else 0
            finally:
                conn.close()
            if wal_damaged:
                evidence = _aside_name(wal, "corrupt")
                evidence.write_bytes(wal.read_bytes())
                notes[-1] += f"; the log as found is kept at {evidence}"
            conn = _connect(self.path)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=" + ("FULL" if self.sync_interval_s == 0
                                                  else "NORMAL"))
            if empty:
                _create_schema(conn)
            else:
                # Taken or not, the mark is gone: from now on the totals live here, and
                # an open after a crash must read every row again.
                conn.execute("DELETE FROM meta WHERE key = 'clean_close'")
            # Start the log afresh: a tail just reported is not reported again.
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return conn, state
        except sqlite3.Error as e:
            if conn is not None:
                conn.close()
            if _is_corruption(e):
                raise _Damaged(f"SQLite: {e}") from None
            raise SpoolError(f"{self.path}: cannot open the spool: {e} (check that "
                             "the state directory exists, is writable by this user "
                             "and is not full)") from None
        except BaseException:
            if conn is not None:
                conn.close()
            raise

    def close(self) -> None:
        """Close the file (SQLite checkpoints it) and give up ownership. Idempotent.

        A spool that met no checksum or SQLite error leaves the running totals and
        every agent's next sequence in the file as it closes: the next open trusts
        them instead of reading every row (see the module docstring)."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            if self._trusted:
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    conn.executemany(_SAVE_SEQ, [(h, a, n) for (h, a), n
                                                 in self._next_seq.items()])
                    conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES "
                                 "('clean_close', ?)",
                                 (f"{self._records} {self._bytes} {self._next_id}",))
                    conn.execute("COMMIT")
                except sqlite3.Error:
                    if conn.in_transaction:  # no mark: the next open scans every row
                        conn.rollback()
            conn.close()
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            os.close(fd)  # releases the flock; the lock file stays for the next owner

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise SpoolError(f"{self.path}: the spool is closed")
        return self._conn

    # --- writing

    def append(self, pushes: Sequence[Push]) -> list[Record]:
        """Store pushes as records of this host, in one transaction: all or none.
        Raises SpoolFull (nothing stored) when they would pass max_bytes or the disk
        is full; returns once the records survive SIGKILL of this process."""
        if not pushes:
            return []
        now = time.time()
        host = self.host
        next_seq = dict.fromkeys({p.agent for p in pushes}, 0)
        for agent in next_seq:
            next_seq[agent] = self._next_seq.get((host, agent), 1)
        values: list = []
        records, size = [], 0
        id_ = self._next_id
        for p in pushes:
            body = p.body if type(p.body) is bytes else bytes(p.body)
            seq = next_seq[p.agent]
            next_seq[p.agent] = seq + 1
            t = now if p.time is None else float(p.time)
            try:
                row = _row(id_, host, p.agent, seq, t, p.method, p.path, p.content_type,
                           body)
            except (TypeError, UnicodeError) as e:
                raise ValueError(f"push from agent {p.agent!r} to {p.path!r} cannot be "
                                 f"stored: {e}; nothing of this batch was") from None
            size += row[8]
            values += row
            records.append(new_record(id_, host, p.agent, seq, t, p.method, p.path,
                                      p.content_type, body))
            id_ += 1
        reserve = [(host, agent, n + SEQ_RESERVE) for agent, n in next_seq.items()
                   if n > self._reserved.get((host, agent), 0)]
        self._store(values, size, reserve)
        self._next_id = id_
        for agent, n in next_seq.items():
            self._next_seq[(host, agent)] = n
        for h, a, reserved in reserve:
            self._reserved[(h, a)] = reserved
        return records

    def append_records(self, records: Sequence[Record]) -> list[Record]:
        """Store records as they are (host, agent, seq, time...) under new ids: the hub
        side re-spooling what it received. All or none; raises SpoolFull like append.
        Each (host, agent)'s high-water mark rises to the highest seq stored."""
        if not records:
            return []
        values: list = []
        stored, size = [], 0
        id_ = self._next_id
        marks: dict[tuple[str, str], int] = {}
        # _row() inline, with each distinct set of text fields encoded and counted once
        # per call (a batch repeats a few dozen agents): the hub's CPU per record.
        texts: dict[tuple[str, str, str, str, str], tuple[bytes, int]] = {}
        pack, crc32, make = _CRC_FIXED.pack, zlib.crc32, new_record
        for r in records:
            host, agent, seq, method, path, content_type, body = (
                r.host, r.agent, r.seq, r.method, r.path, r.content_type, r.body)
            if type(body) is not bytes:
                body = bytes(body)
            t = float(r.time)
            fields = (host, agent, method, path, content_type)
            text = texts.get(fields)
            if text is None:  # record_size() without the body; TypeError if not text
                text = texts[fields] = ("\0".join(fields).encode(),
                                        record_size(*fields, b""))
            n = len(body) + text[1]
            values += (id_, host, agent, seq, t, method, path, content_type, n,
                       crc32(body, crc32(text[0], crc32(pack(id_, seq, t, n)))), body)
            size += n
            stored.append(make(id_, host, agent, seq, t, method, path, content_type, body))
            mark = (host, agent)
            if seq > marks.get(mark, 0):
                marks[mark] = seq
            id_ += 1
        self._store(values, size)
        self._next_id = id_
        for key, seq in marks.items():
            if seq >= self._next_seq.get(key, 1):
                self._next_seq[key] = seq + 1
        return stored

    def _store(self, values: list, size: int, reserve: Sequence[tuple] = ()) -> None:
        """Insert records given as one flat list of their values (_ROW_VALUES each, in
        _COLUMNS order), and the sequence reservations, in one transaction."""
        count = len(values) // _ROW_VALUES
        if self._bytes + size > self.max_bytes:
            self._refuse(count, self._full_reason(size), self._bytes + size
                         - self.max_bytes)
        db = self._db()
        step = _ROWS_PER_INSERT * _ROW_VALUES
        whole = len(values) // step * step
        try:
            db.execute("BEGIN IMMEDIATE")
            if whole:
                db.executemany(_insert_rows(_ROWS_PER_INSERT),
                               [values[i:i + step] for i in range(0, whole, step)])
            if whole < len(values):
                db.execute(_insert_rows(count - whole // _ROW_VALUES), values[whole:])
            if reserve:
                db.executemany(_RESERVE_SEQ, reserve)
            db.execute("COMMIT")
        except sqlite3.Error as e:
            self._trusted = False
            if db.in_transaction:
                db.rollback()
            if _sqlite_code(e) == _FULL_CODE:
                self._refuse(count, f"disk full: {self.path} cannot grow ({e}); "
                             "free space in the state directory", size)
            if isinstance(e, sqlite3.InterfaceError | sqlite3.ProgrammingError):
                raise ValueError(f"cannot store a record: {e}") from None
            raise SpoolError(f"{self.path}: cannot append: {e}") from None
        except BaseException:
            if db.in_transaction:
                db.rollback()
            raise
        self._records += count
        self._bytes += size
        self._appended_total += count
        self._unsynced = True

    def _full_reason(self, size: int) -> str:
        unit, name = next((u, n) for u, n in ((1 << 20, "MiB"), (1 << 10, "KiB"), (1, "B"))
                          if self.max_bytes >= u)
        if size > self.max_bytes:
            return (f"spool full: a batch of {size / unit:.1f} {name} is larger than the "
                    f"whole spool ({self.max_bytes / unit:.4g} {name})")
        return (f"spool full: {self._bytes / unit:.1f} of {self.max_bytes / unit:.4g} "
                f"{name}")

    def _refuse(self, count: int, reason: str, excess_bytes: int) -> None:
        self._refused_total += count
        raise SpoolFull(reason, retry_after_s(excess_bytes,
                                              self._drain.rate(time.monotonic())))

    # --- draining

    @property
    def verifying(self) -> bool:
        """Whether rows an open after a clean close trusted are still unread."""
        return self._checked_after < self._unchecked_through

    def verify_some(self, limit: int = 2000) -> bool:
        """Check up to `limit` more of the rows an open after a clean close trusted
        (the owner calls this between its other work until it says True: all read).
        Raises SpoolCorrupt, and leaves no clean mark, at a row that fails its checksum
        or that SQLite cannot read: reopen the spool to recover the intact records."""
        if not self.verifying:
            return True
        try:
            rows = self._db().execute(
                f"SELECT {_COLUMNS} FROM records WHERE id > ? AND id <= ? ORDER BY id "
                "LIMIT ?", (self._checked_after, self._unchecked_through, limit)).fetchall()
        except sqlite3.Error as e:
            self._trusted = False
            if _is_corruption(e):
                raise SpoolCorrupt(f"{self.path}: checking the records after id "
                                   f"{self._checked_after} failed: {e}; close and reopen "
                                   "the spool to recover the intact records") from None
            raise SpoolError(f"{self.path}: cannot read records: {e}") from None
        for row in rows:
            if not _intact(row):
                self._trusted = False
                raise SpoolCorrupt(
                    f"{self.path}: record id {row[0]!r} fails its checksum (the file was "
                    "damaged on disk since it was last closed); close and reopen the "
                    "spool to recover the intact records")
        self._checked_after = (rows[-1][0] if len(rows) == limit
                               else self._unchecked_through)
        return not self.verifying

    def pending(self, *, limit: int = 1000, max_bytes: int = 1 << 20,
                after_id: int = 0) -> list[Record]:
        """Records not yet acked with id > after_id, oldest first: at most `limit`, and
        at most `max_bytes` (as record_size counts) unless one record alone is larger.
        Raises SpoolCorrupt rather than hand out a record that fails its checksum."""
        out: list[Record] = []
        total = 0
        cursor = self._db().execute(
            f"SELECT {_COLUMNS} FROM records WHERE id > ? ORDER BY id LIMIT ?",
            (after_id, limit))
        # _intact() inline: this loop is most of the forwarder's CPU per record.
        pack, crc32, make = _CRC_FIXED.pack, zlib.crc32, new_record
        try:
            for row in cursor:
                id_, host, agent, seq, time_, method, path, content_type, size, crc, body \
                    = row
                try:
                    intact = crc32(body, crc32(pack(id_, seq, time_, size) + "\0".join(
                        (host, agent, method, path, content_type)).encode())) == crc
                except (TypeError, struct.error, UnicodeError):  # a field of a wrong type
                    intact = False
                if not intact:
                    self._trusted = False
                    raise SpoolCorrupt(
                        f"{self.path}: record id {row[0]!r} fails its checksum (the file "
                        "was damaged on disk); close and reopen the spool to recover the "
                        "intact records")
                if out and total + size > max_bytes:
                    break
                out.append(make(id_, host, agent, seq, time_, method, path, content_type,
                                body))
                total += size
        except sqlite3.Error as e:
            self._trusted = False
            if _is_corruption(e):
                raise SpoolCorrupt(
                    f"{self.path}: reading records after id {out[-1].id if out else after_id}"
                    f" failed: {e}; close and reopen the spool to recover the intact "
                    "records") from None
            raise SpoolError(f"{self.path}: cannot read records: {e}") from None
        finally:
            cursor.close()  # an unfinished SELECT would hold back checkpoints
        return out

    def ack(self, up_to_id: int) -> int:
        """Drop every record with id <= up_to_id (a hub has them); returns how many."""
        db = self._db()
        try:
            db.execute("BEGIN IMMEDIATE")
            count, size, last = db.execute(
                "SELECT count(*), total(size), max(id) FROM records WHERE id <= ?",
                (up_to_id,)).fetchone()
            if not count:
                db.execute("COMMIT")
                return 0
            db.execute("DELETE FROM records WHERE id <= ?", (up_to_id,))
            # The floors that keep sequences from being reused once their records go.
            changed = [(h, a, n) for (h, a), n in self._next_seq.items()
                       if self._saved_seq.get((h, a)) != n]
            db.executemany(_SAVE_SEQ, changed)
            db.execute("UPDATE meta SET value = max(value, ?) WHERE key = 'last_acked_id'",
                       (last,))
            db.execute("COMMIT")
        except sqlite3.Error as e:
            self._trusted = False
            if db.in_transaction:
                db.rollback()
            raise SpoolError(f"{self.path}: cannot ack up to id {up_to_id}: {e}") from None
        except BaseException:
            if db.in_transaction:
                db.rollback()
            raise
        for h, a, n in changed:
            self._saved_seq[(h, a)] = n
        size = int(size)
        self._records -= count
        self._bytes -= size
        self._acked_total += count
        self._drain.record(size, time.monotonic())
        self._unsynced = True
        return count

    # --- durability and observation

    def sync(self) -> None:
        """Make every committed append and ack durable against power loss, now."""
        self._db()
        if not self._unsynced or self.sync_interval_s == 0:
            return
        wal, _shm = _companions(self.path)
        try:
            fd = os.open(wal, os.O_RDONLY)
        except FileNotFoundError:
            _fsync_path(self.path)  # everything is checkpointed into the file itself
        else:
            try:
                os.fsync(fd)
                inode = os.fstat(fd).st_ino
            finally:
                os.close(fd)
            if inode != self._synced_wal_inode:
                _fsync_path(self.path.parent)  # a new -wal's directory entry, once
                self._synced_wal_inode = inode
        self._unsynced = False

    def high_water(self, host: str, agent: str) -> int:
        """The highest seq ever stored for (host, agent), acked or not; 0: none yet."""
        return self._next_seq.get((host, agent), 1) - 1

    def high_waters(self) -> dict[tuple[str, str], int]:
        """Every (host, agent)'s high-water mark (the hub shares them with its peers)."""
        return {key: n - 1 for key, n in self._next_seq.items() if n > 1}

    def stats(self) -> SpoolStats:
        row = self._db().execute("SELECT time FROM records ORDER BY id LIMIT 1").fetchone()
        return SpoolStats(records=self._records, bytes=self._bytes,
                          oldest_time=row[0] if row else None, max_bytes=self.max_bytes,
                          appended_total=self._appended_total,
                          acked_total=self._acked_total,
                          refused_total=self._refused_total)
