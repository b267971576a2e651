"""The spool (sidecar/spool.py): order, sequences, bounds, one owner, and damaged files.

Real SQLite files in tmp_path; no child processes (tests/integration/test_spool_crash.py
SIGKILLs a real writer). A damaged file is made the way disks and crashes make them:
bytes overwritten, a file cut short, garbage, a -wal torn mid-frame. Whatever survives
is compared field by field with what was appended: nothing may be misread.
"""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import struct
import subprocess
import sys
from dataclasses import FrozenInstanceError, astuple, replace
from pathlib import Path

import pytest

from sidecar import spool as spool_module
from sidecar.spool import (RECORD_OVERHEAD_BYTES, SEQ_RESERVE, DrainRate, Push, Record,
                           Spool, SpoolCorrupt, SpoolError, SpoolFull, SpoolLocked,
                           record_size, retry_after_s)

HOST = "MainPC"
ROOT = Path(__file__).resolve().parents[2]


def push(agent="ModelManagerAgent", body=b'{"cpu": 0.5}', **kw) -> Push:
    return Push(agent=agent, method=kw.pop("method", "POST"),
                path=kw.pop("path", "/api/metrics"),
                content_type=kw.pop("content_type", "application/json"), body=body, **kw)


def spool_at(tmp_path, **kw) -> Spool:
    return Spool(tmp_path / "spool.db", host=HOST, **kw)


def filled(tmp_path, n=2000, agents=("ModelManagerAgent", "TaskScheduler", "CacheManager"),
           batch=50, seed=1) -> dict[int, Record]:
    """A closed spool of n records with distinct bodies; returns them by id."""
    rng = random.Random(seed)
    kept: dict[int, Record] = {}
    with spool_at(tmp_path) as s:
        for start in range(0, n, batch):
            pushes = [push(rng.choice(agents), f"{i}:".encode() + rng.randbytes(200).hex()
                           .encode(), path=f"/api/metrics?n={i}")
                      for i in range(start, min(n, start + batch))]
            kept.update((r.id, r) for r in s.append(pushes))
    return kept


def all_records(s: Spool) -> list[Record]:
    return s.pending(limit=10**9, max_bytes=1 << 62)


def assert_intact_subset(s: Spool, original: dict[int, Record]) -> list[Record]:
    """Every record the spool holds is exactly one that was appended (nothing misread)."""
    got = all_records(s)
    for r in got:
        assert r == original[r.id], f"record {r.id} misread"
    assert [r.id for r in got] == sorted(r.id for r in got)
    return got


def assert_sequences_go_on_past(s: Spool, original: dict[int, Record]):
    """After records were lost, no agent's sequence goes back over one it had: the hub
    would drop those pushes as duplicates. A gap (up to the reservation) is fine."""
    for agent in {r.agent for r in original.values()}:
        highest = max(r.seq for r in original.values() if r.agent == agent)
        assert highest < s.append([push(agent)])[0].seq <= highest + SEQ_RESERVE + 50


def poke(db, sql: str) -> None:
    """Change the file behind the spool's back, as a bad disk or a stray writer would."""
    conn = sqlite3.connect(db)
    try:
        with conn:
            conn.execute(sql)
    finally:
        conn.close()


def overwrite_the_middle(db) -> bytes:
    """512 random bytes over the middle of the file, as a bad sector leaves it; the
    file's bytes after."""
    data = bytearray(db.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 512] = random.Random(7).randbytes(512)
    db.write_bytes(bytes(data))
    return bytes(data)


def damaged_files(tmp_path, kind: str) -> list:
    return sorted(p.name for p in tmp_path.iterdir() if f".{kind}-" in p.name)


# --- order, sequences, draining -------------------------------------------------------

def test_pending_is_oldest_first_and_ack_drops_only_up_to_the_id(tmp_path):
    with spool_at(tmp_path) as s:
        first = s.append([push(body=b"1"), push(body=b"2")])
        second = s.append([push(body=b"3")])
        assert [r.id for r in first + second] == [1, 2, 3]
        assert [r.body for r in s.pending()] == [b"1", b"2", b"3"]
        assert s.ack(2) == 2
        assert [r.body for r in s.pending()] == [b"3"]
        assert s.ack(2) == 0  # acking again is harmless: the forwarder may retry
        assert s.pending(after_id=3) == []


def test_records_carry_what_the_agent_pushed(tmp_path):
    with spool_at(tmp_path) as s:
        [r] = s.append([Push("TutorAgent", "PUT", "/api/v1/metrics?x=1", "", b"\x00\xff",
                             time=1700000000.25)])
        assert (r.host, r.agent, r.seq, r.time, r.method, r.path, r.content_type,
                r.body) == (HOST, "TutorAgent", 1, 1700000000.25, "PUT",
                            "/api/v1/metrics?x=1", "", b"\x00\xff")
        assert s.pending() == [r]


def test_sequences_count_per_agent_from_one(tmp_path):
    with spool_at(tmp_path) as s:
        got = s.append([push("A"), push("B"), push("A"), push("A"), push("B")])
        assert [(r.agent, r.seq) for r in got] == [("A", 1), ("B", 1), ("A", 2), ("A", 3),
                                                   ("B", 2)]


def test_a_sequence_is_never_reused_after_ack_and_reopen(tmp_path):
    with spool_at(tmp_path) as s:
        s.append([push("A"), push("A"), push("B")])
        s.ack(3)  # everything gone: only the floors in the sequences table remain
        assert s.stats().records == 0
    with spool_at(tmp_path) as s:
        [a, b] = s.append([push("A"), push("B")])
        assert (a.seq, b.seq) == (3, 2)
        assert a.id == 4  # ids do not restart either
        assert s.high_water(HOST, "A") == 3
    with spool_at(tmp_path) as s:  # and unacked records count after a reopen too
        [a] = s.append([push("A")])
        assert a.seq == 4
    with spool_at(tmp_path) as s:  # ...and once acked after that reopen
        s.ack(a.id)
    with spool_at(tmp_path) as s:
        assert [r.seq for r in s.append([push("A"), push("B")])] == [5, 3]


def test_pending_bounds_by_count_and_bytes_but_always_makes_progress(tmp_path):
    with spool_at(tmp_path) as s:
        s.append([push(body=b"x" * 100) for _ in range(10)])
        one = record_size(HOST, "ModelManagerAgent", "POST", "/api/metrics",
                          "application/json", b"x" * 100)
        assert len(s.pending(limit=4)) == 4
        assert len(s.pending(max_bytes=3 * one)) == 3
        assert len(s.pending(max_bytes=3 * one - 1)) == 2
        assert len(s.pending(max_bytes=1)) == 1  # a record larger than the bound still goes
        assert [r.id for r in s.pending(after_id=8)] == [9, 10]


def test_append_records_keeps_what_the_sender_gave_under_new_ids(tmp_path):
    sent = [Record(0, "PC2", "CacheManager", 41, 1700000000.5, "POST", "/m", "text/plain",
                   b"a"),
            Record(0, "PC2", "CacheManager", 42, 1700000001.5, "PATCH", "/m?2", "", b"b")]
    with spool_at(tmp_path) as s:
        s.append([push("CacheManager")])  # this host's own records share the file
        stored = s.append_records(sent)
        assert [r.id for r in stored] == [2, 3]
        for given, kept in zip(sent, stored):
            assert (kept.host, kept.agent, kept.seq, kept.time, kept.method, kept.path,
                    kept.content_type, kept.body) == (
                given.host, given.agent, given.seq, given.time, given.method, given.path,
                given.content_type, given.body)
        assert s.pending()[1:] == stored
        assert s.high_water("PC2", "CacheManager") == 42
        assert s.high_water(HOST, "CacheManager") == 1
        s.ack(3)
    with spool_at(tmp_path) as s:  # the hub's high-water marks survive acks and reopen
        assert s.high_water("PC2", "CacheManager") == 42
        assert s.high_water("PC2", "TutorAgent") == 0


@pytest.mark.parametrize("count", [1, 49, 50, 51, 100, 2000 + 37])
def test_batches_of_any_size_read_back_and_reopen_intact(tmp_path, count):
    # Commits insert _ROWS_PER_INSERT records per statement and the rest in one more.
    sent = [Record(0, "PC2", f"Agent{n % 7}", 100 + n // 7, 1700000000.5 + n, "POST",
                   f"/m?{n % 3}", "" if n % 5 else "text/plain", b"%d" % n)
            for n in range(count)]
    with spool_at(tmp_path) as s:
        mine = s.append([push(f"Agent{n % 3}", b"%d" % n) for n in range(count)])
        stored = s.append_records(sent)
        assert all_records(s) == mine + stored
        assert [r.id for r in stored] == list(range(count + 1, 2 * count + 1))
        assert s.stats().records == 2 * count
        assert s.stats().bytes == sum(record_size(r.host, r.agent, r.method, r.path,
                                                  r.content_type, r.body)
                                      for r in mine + stored)
    with spool_at(tmp_path) as s:  # opening verifies every row's checksum
        assert s.recovered is None
        assert all_records(s) == mine + stored
        assert s.high_water("PC2", "Agent0") == max(r.seq for r in sent
                                                    if r.agent == "Agent0")


def test_records_read_back_are_ordinary_frozen_records(tmp_path):
    with spool_at(tmp_path) as s:
        (r,) = s.append([push()])
        (again,) = s.pending()
        for record in (r, again):
            assert type(record) is Record and record == Record(*astuple(record))
            assert hash(record) == hash(Record(*astuple(record)))
            with pytest.raises(FrozenInstanceError):
                record.seq = 5  # type: ignore[misc]
            assert replace(record, id=9).id == 9


def test_an_empty_batch_stores_nothing(tmp_path):
    with spool_at(tmp_path) as s:
        assert s.append([]) == [] and s.append_records([]) == []
        assert s.stats().records == 0


def test_a_bad_field_is_refused_with_nothing_stored(tmp_path):
    with spool_at(tmp_path) as s:
        with pytest.raises((TypeError, ValueError)):
            s.append([push(body=b"ok"), push(agent=None)])
        assert s.stats().records == 0
        assert s.append([push()])[0].seq == 1


# --- bounded by bytes -------------------------------------------------------------------

def test_a_full_spool_refuses_the_whole_batch_and_counts_it(tmp_path):
    size = record_size(HOST, "ModelManagerAgent", "POST", "/api/metrics",
                       "application/json", b"x" * 100)
    with spool_at(tmp_path, max_bytes=10 * size) as s:
        s.append([push(body=b"x" * 100) for _ in range(8)])
        with pytest.raises(SpoolFull) as refused:
            s.append([push(body=b"x" * 100) for _ in range(3)])
        assert refused.value.reason.startswith("spool full: ")
        assert refused.value.retry_after_s == 1.0  # nothing drained yet: the default
        stats = s.stats()
        assert (stats.records, stats.refused_total, stats.appended_total) == (8, 3, 8)
        assert [r.seq for r in s.append([push(body=b"x" * 100)] * 2)] == [9, 10]
        s.ack(5)
        assert len(s.append([push(body=b"x" * 100)] * 5)) == 5
        assert s.stats().records == 10


def test_a_batch_larger_than_the_spool_says_so(tmp_path):
    with spool_at(tmp_path, max_bytes=1000) as s:
        with pytest.raises(SpoolFull) as refused:
            s.append([push(body=b"x" * 2000)])
        assert "larger than the whole spool" in refused.value.reason


def test_spool_full_reason_reads_in_mebibytes(tmp_path):
    with spool_at(tmp_path, max_bytes=1 << 20) as s:
        s.append([push(body=b"x" * 600_000)])
        with pytest.raises(SpoolFull) as refused:
            s.append([push(body=b"x" * 600_000)])
        assert refused.value.reason == "spool full: 0.6 of 1 MiB"


def test_a_full_disk_is_refused_like_a_full_spool(tmp_path):
    with spool_at(tmp_path) as s:
        s.append([push()])
        pages = s._conn.execute("PRAGMA page_count").fetchone()[0]
        s._conn.execute(f"PRAGMA max_page_count = {pages}")  # as if the disk were full
        with pytest.raises(SpoolFull) as refused:
            s.append([push(body=b"x" * 20_000)])
        assert refused.value.reason.startswith("disk full: ")
        assert (s.stats().records, s.stats().refused_total) == (1, 1)


def test_byte_accounting_is_restored_at_reopen(tmp_path):
    with spool_at(tmp_path, max_bytes=50_000) as s:
        s.append([push(body=bytes(1000)) for _ in range(20)])
        s.ack(5)
        before = s.stats()
    with spool_at(tmp_path, max_bytes=50_000) as s:
        after = s.stats()
        assert (after.records, after.bytes, after.oldest_time) == (
            before.records, before.bytes, before.oldest_time)
        assert after.bytes == 15 * (1000 + RECORD_OVERHEAD_BYTES + len(
            HOST + "ModelManagerAgent" + "POST" + "/api/metrics" + "application/json"))
        with pytest.raises(SpoolFull):  # the bound holds across the restart
            s.append([push(body=bytes(1000)) for _ in range(40)])


def marked(db) -> bool:
    """Whether the file carries a clean close's mark (see Spool.close)."""
    conn = sqlite3.connect(db)
    try:
        return conn.execute(
            "SELECT count(*) FROM meta WHERE key = 'clean_close'").fetchone()[0] == 1
    finally:
        conn.close()


def what_it_says(s: Spool) -> tuple:
    """What a reopened spool tells and does next: its totals, every mark, and the ids
    and sequences it gives the next pushes."""
    stats = s.stats()
    marks = s.high_waters()
    nexts = [(r.id, r.agent, r.seq) for r in s.append(
        [push(agent) for agent in ("ModelManagerAgent", "TaskScheduler", "NewAgent")])]
    return stats.records, stats.bytes, stats.oldest_time, marks, nexts


def test_a_clean_close_lets_the_next_open_trust_its_totals(tmp_path, monkeypatch):
    # The open after a clean close skips the rows' scan: it must come to what the scan
    # would have, after appends, acks, and records stored under the sender's seqs.
    monkeypatch.setattr(spool_module, "TRUST_CLEAN_CLOSE_RECORDS", 100)
    live = tmp_path / "live"
    original = filled(live, n=600)
    with spool_at(live) as s:
        s.ack(250)
        s.append_records([replace(original[300], host="PC2", seq=5000)])
        s.append([push("TaskScheduler") for _ in range(7)])
    assert marked(live / "spool.db")
    shutil.copytree(live, tmp_path / "scanned")
    poke(tmp_path / "scanned" / "spool.db", "DELETE FROM meta WHERE key = 'clean_close'")
    with spool_at(live) as s:
        assert not marked(live / "spool.db")  # taken: a crash from here on scans again
        assert s.verifying
        trusted = what_it_says(s)
        while not s.verify_some(limit=100):  # and every row it trusted reads back
            pass
        assert not s.verifying
    with spool_at(tmp_path / "scanned") as s:
        assert not s.verifying
        assert what_it_says(s) == trusted
    assert trusted[0] == 600 - 250 + 1 + 7


def test_pages_overwritten_after_a_clean_close_are_found_by_the_read_back(
        tmp_path, monkeypatch):
    # A trusted open reads no page (not even quick_check's pass): the read-back does.
    monkeypatch.setattr(spool_module, "TRUST_CLEAN_CLOSE_RECORDS", 100)
    original = filled(tmp_path)
    overwrite_the_middle(tmp_path / "spool.db")
    with spool_at(tmp_path) as s:
        assert s.recovered is None and s.verifying
        with pytest.raises(SpoolCorrupt):
            while not s.verify_some(limit=100):
                pass
    with spool_at(tmp_path) as s:
        assert "corrupt" in s.recovered and s.damaged
        kept = assert_intact_subset(s, original)
        assert len(original) * 0.9 < len(kept) < len(original)


def test_a_small_spool_is_read_in_full_even_after_a_clean_close(tmp_path):
    # Below TRUST_CLEAN_CLOSE_RECORDS the rows' scan costs little: damage is found at
    # open, as always.
    original = filled(tmp_path, n=300)
    assert marked(tmp_path / "spool.db")
    change_a_payload(tmp_path / "spool.db", original[150].body)
    with spool_at(tmp_path) as s:
        assert "record id 150 fails its checksum" in s.recovered and not s.verifying


def test_a_spool_killed_after_a_clean_open_is_read_in_full_again(tmp_path, monkeypatch):
    # The mark is gone once the spool is open (trusted or not): a writer killed later
    # leaves totals that only the rows can tell.
    monkeypatch.setattr(spool_module, "TRUST_CLEAN_CLOSE_RECORDS", 50)
    filled(tmp_path, n=100)
    script = (f"import os, sys; sys.path.insert(0, {str(ROOT)!r})\n"
              "from sidecar.spool import Spool, Push\n"
              f"s = Spool({str(tmp_path / 'spool.db')!r}, host={HOST!r})\n"
              "s.append([Push('TaskScheduler', 'POST', '/m', '', b'x') for _ in range(40)])\n"
              "os._exit(9)\n")
    killed = subprocess.run([sys.executable, "-c", script], timeout=60)
    assert killed.returncode == 9
    with spool_at(tmp_path) as s:
        assert s.stats().records == 140
        assert s.append([push("TaskScheduler")])[0].id == 141


def test_stats_say_what_is_stored_and_what_happened(tmp_path):
    with spool_at(tmp_path, max_bytes=1 << 20) as s:
        assert s.stats().oldest_time is None
        s.append([push(time=100.0), push(time=200.0), push(time=300.0)])
        s.ack(1)
        stats = s.stats()
        assert (stats.records, stats.oldest_time, stats.max_bytes, stats.appended_total,
                stats.acked_total, stats.refused_total) == (2, 200.0, 1 << 20, 3, 1, 0)


def test_retry_after_follows_the_drain_rate():
    assert retry_after_s(1000, None) == 1.0
    assert retry_after_s(10_000, 1000.0) == 10.0
    assert retry_after_s(10, 1000.0) == 1.0  # no sooner than a second
    assert retry_after_s(10**9, 1.0) == 60.0  # no later than a minute
    drain = DrainRate(window_s=30.0)
    drain.record(5000, now=10.0)
    assert drain.rate(10.5) is None  # one ack says nothing of speed
    drain.record(5000, now=12.0)
    assert drain.rate(12.0) == 5000.0
    assert drain.rate(100.0) is None  # a partition: nothing drained lately


# --- one owner ------------------------------------------------------------------------

def test_a_second_opener_is_refused_and_told_who_holds_it(tmp_path):
    with spool_at(tmp_path) as s:
        s.append([push()])
        with pytest.raises(SpoolLocked) as refused:
            spool_at(tmp_path)
        message = str(refused.value)
        assert str(tmp_path / "spool.db") in message and "already open by pid" in message
        assert s.append([push()])[0].seq == 2  # the owner is not disturbed
    with spool_at(tmp_path) as s:  # closing hands it on
        assert s.stats().records == 2


def test_a_closed_spool_says_so(tmp_path):
    s = spool_at(tmp_path)
    s.close()
    s.close()
    with pytest.raises(SpoolError, match="closed"):
        s.append([push()])


def test_a_spool_from_a_newer_agentvisor_is_refused_and_left_alone(tmp_path):
    spool_at(tmp_path).close()
    poke(tmp_path / "spool.db", "UPDATE meta SET value = 99 WHERE key = 'format'")
    with pytest.raises(SpoolError, match="format 99 .* newer agentvisor"):
        spool_at(tmp_path)
    assert damaged_files(tmp_path, "corrupt") == []


def test_clean_open_reports_nothing(tmp_path):
    filled(tmp_path, n=100)
    with spool_at(tmp_path) as s:
        assert s.recovered is None


def test_sync_fsyncs_the_log_once_per_change(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_ino),
                                                 real_fsync(fd)))
    with spool_at(tmp_path) as s:
        s.append([push()])
        s.sync()
        wal = (tmp_path / "spool.db-wal").stat().st_ino
        assert wal in synced
        synced.clear()
        s.sync()
        assert synced == []  # nothing new: nothing to wait for
        s.ack(1)
        s.sync()
        assert synced == [wal]  # an ack is made durable too (the dir only the first time)


def test_a_zero_sync_interval_makes_every_commit_durable(tmp_path):
    with spool_at(tmp_path, sync_interval_s=0) as s:
        assert s._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    with spool_at(tmp_path) as s:
        assert s._conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL


def test_a_path_that_cannot_be_a_spool_is_an_error_to_fix_not_damage(tmp_path):
    (tmp_path / "spool.db").mkdir()
    with pytest.raises(SpoolError, match="cannot open the spool"):
        spool_at(tmp_path)
    assert (tmp_path / "spool.db").is_dir()
    assert damaged_files(tmp_path, "corrupt") == []


# --- damaged files ----------------------------------------------------------------------

def test_bytes_overwritten_in_the_middle_are_caught_and_the_rest_kept(tmp_path):
    original = filled(tmp_path)
    data = overwrite_the_middle(tmp_path / "spool.db")
    with spool_at(tmp_path) as s:
        assert s.recovered and "corrupt" in s.recovered and s.damaged
        [aside] = damaged_files(tmp_path, "corrupt")
        assert (tmp_path / aside).read_bytes() == data  # kept as found
        assert aside in s.recovered
        kept = assert_intact_subset(s, original)
        assert len(original) * 0.9 < len(kept) < len(original)
        assert f"recovered {len(kept)} record(s)" in s.recovered
        assert_sequences_go_on_past(s, original)
    with spool_at(tmp_path) as s:
        assert s.recovered is None and not s.damaged  # recovered once, clean from then on


def change_a_payload(db, victim: bytes) -> None:
    """Three bytes of one record's body changed in place: SQLite has no page checksums,
    so only the record's own CRC can see this."""
    data = db.read_bytes()
    at = data.index(victim)
    db.write_bytes(data[:at] + victim[:-3] + b"999" + data[at + len(victim):])


def test_a_payload_changed_on_disk_after_a_crash_is_caught_at_open(tmp_path):
    original = filled(tmp_path, n=300)
    db = tmp_path / "spool.db"
    poke(db, "DELETE FROM meta WHERE key = 'clean_close'")  # as a crash leaves it
    change_a_payload(db, original[150].body)
    with spool_at(tmp_path) as s:
        assert "record id 150 fails its checksum" in s.recovered
        assert "lost 1 record(s) that failed their checksum" in s.recovered
        kept = assert_intact_subset(s, original)
        assert [r.id for r in kept] == [i for i in sorted(original) if i != 150]


def test_a_payload_changed_on_disk_after_a_clean_close_is_found_by_the_check(
        tmp_path, monkeypatch):
    # A big spool closed cleanly opens without reading its rows: its owner reads them
    # then (verify_some), and the open after the damage they find recovers the rest.
    monkeypatch.setattr(spool_module, "TRUST_CLEAN_CLOSE_RECORDS", 100)
    original = filled(tmp_path, n=300)
    change_a_payload(tmp_path / "spool.db", original[150].body)
    with spool_at(tmp_path) as s:
        assert s.recovered is None and s.verifying  # quick_check cannot see it
        assert [r.id for r in s.pending(limit=149)] == list(range(1, 150))
        with pytest.raises(SpoolCorrupt, match="record id 150 fails its checksum"):
            while not s.verify_some(limit=40):
                pass
    with spool_at(tmp_path) as s:  # that close left no mark: every row is read
        assert "lost 1 record(s) that failed their checksum" in s.recovered
        kept = assert_intact_subset(s, original)
        assert [r.id for r in kept] == [i for i in sorted(original) if i != 150]


def test_a_record_damaged_while_open_stops_pending_until_reopened(tmp_path):
    original = filled(tmp_path, n=20)
    with spool_at(tmp_path) as s:
        poke(tmp_path / "spool.db", "UPDATE records SET body = x'00' WHERE id = 3")
        assert [r.id for r in s.pending(limit=2)] == [1, 2]
        with pytest.raises(SpoolCorrupt, match="record id 3 fails its checksum"):
            s.pending()
    with spool_at(tmp_path) as s:
        assert "lost 1 record(s)" in s.recovered
        assert [r.id for r in assert_intact_subset(s, original)] == [
            i for i in range(1, 21) if i != 3]


def test_a_truncated_file_is_moved_aside_and_its_readable_part_kept(tmp_path):
    original = filled(tmp_path)
    db = tmp_path / "spool.db"
    with open(db, "r+b") as f:
        f.truncate(db.stat().st_size // 2)
    with spool_at(tmp_path) as s:
        assert s.recovered and "corrupt" in s.recovered
        assert len(damaged_files(tmp_path, "corrupt")) == 1
        kept = assert_intact_subset(s, original)
        assert len(kept) < len(original)
        assert_sequences_go_on_past(s, original)


def test_a_file_of_garbage_is_moved_aside_and_a_fresh_spool_started(tmp_path):
    garbage = random.Random(3).randbytes(100_000)
    (tmp_path / "spool.db").write_bytes(garbage)
    with spool_at(tmp_path) as s:
        assert "not an SQLite database" in s.recovered
        assert "recovered 0 record(s)" in s.recovered
        assert "sequence table was unreadable" in s.recovered  # the operator must know
        [aside] = damaged_files(tmp_path, "corrupt")
        assert (tmp_path / aside).read_bytes() == garbage
        assert s.append([push()])[0].seq == 1


def test_a_database_that_is_not_a_spool_is_moved_aside(tmp_path):
    poke(tmp_path / "spool.db", "CREATE TABLE readings(x)")
    with spool_at(tmp_path) as s:
        assert "not a spool: its tables are readings" in s.recovered
        assert s.append([push()])[0].id == 1


def crash_copy(s: Spool, into):
    """The files as a SIGKILL at this moment would leave them (the -wal not checkpointed)."""
    into.mkdir()
    for name in ("spool.db", "spool.db-wal"):
        shutil.copy(s.path.with_name(name), into / name)
    return into


def wal_frames(wal) -> tuple[int, int]:
    page_size = struct.unpack(">I", wal.read_bytes()[8:12])[0]
    return (wal.stat().st_size - 32) // (24 + page_size), 24 + page_size


def crashed_spool(tmp_path, seed: int, batches=10, per_batch=5):
    """A spool's files as a crash leaves them, and the records of each commit."""
    rng = random.Random(seed)
    with spool_at(tmp_path / "live") as s:
        commits = [s.append([push(body=rng.randbytes(700)) for _ in range(per_batch)])
                   for _ in range(batches)]
        crashed = crash_copy(s, tmp_path / "crashed")
    return crashed, commits


def test_a_wal_cut_mid_frame_reads_only_whole_commits(tmp_path):
    # What a SIGKILL (or power loss) in the middle of a commit's write leaves.
    crashed, commits = crashed_spool(tmp_path, seed=5)
    wal = crashed / "spool.db-wal"
    with open(wal, "r+b") as f:
        f.truncate(wal.stat().st_size - 1000)
    with spool_at(crashed) as s:
        assert "an append cut short by a crash left" in s.recovered
        assert "a partial last frame (3120 of 4120 bytes)" in s.recovered
        assert not s.damaged  # a crash is not damage: nothing answered was lost
        assert damaged_files(crashed, "corrupt") == []
        early = [r for c in commits[:-1] for r in c]
        assert all_records(s) == early  # the cut commit is gone, nothing half-read
        # Its sequences were never answered; the next append takes them again.
        assert s.append([push()])[0].seq == commits[-1][0].seq
    with spool_at(crashed) as s:
        assert s.recovered is None  # reported once


def test_a_garbled_last_frame_is_a_crash_too(tmp_path):
    crashed, commits = crashed_spool(tmp_path, seed=9)
    wal = crashed / "spool.db-wal"
    frames, frame_size = wal_frames(wal)
    with open(wal, "r+b") as f:  # a frame overwritten in place, header first
        f.seek(32 + (frames - 1) * frame_size + 500)
        f.write(b"\x00" * 100)
    with spool_at(crashed) as s:
        assert "a garbled last frame" in s.recovered
        assert damaged_files(crashed, "corrupt") == []
        assert all_records(s) == [r for c in commits[:-1] for r in c]


def test_a_wal_damaged_mid_log_is_reported_kept_as_found_and_cut_there(tmp_path):
    crashed, commits = crashed_spool(tmp_path, seed=6)
    wal = crashed / "spool.db-wal"
    frames, frame_size = wal_frames(wal)
    with open(wal, "r+b") as f:
        f.seek(32 + (frames // 2) * frame_size + 100)
        f.write(b"\xff" * 8)
    damaged = wal.read_bytes()
    with spool_at(crashed) as s:
        assert (f"torn write-ahead log: frame {frames // 2 + 1} of {frames} fails its "
                "checksum although the log goes on after it") in s.recovered
        assert s.damaged
        [evidence] = damaged_files(crashed, "corrupt")
        assert evidence.startswith("spool.db-wal.corrupt-") and evidence in s.recovered
        assert (crashed / evidence).read_bytes() == damaged
        records = [r for c in commits for r in c]
        kept = all_records(s)
        assert 0 < len(kept) < len(records) and kept == records[:len(kept)]


def test_an_append_cut_short_before_its_commit_frame_is_dropped(tmp_path):
    crashed, commits = crashed_spool(tmp_path, seed=8, batches=2, per_batch=30)
    wal = crashed / "spool.db-wal"
    frames, frame_size = wal_frames(wal)
    with open(wal, "r+b") as f:  # whole frames, but the commit frame never written
        f.truncate(32 + (frames - 1) * frame_size)
    with spool_at(crashed) as s:
        assert "whole uncommitted frame(s)" in s.recovered
        assert damaged_files(crashed, "corrupt") == []
        assert all_records(s) == commits[0]


def test_an_interrupted_recovery_is_finished_at_the_next_open(tmp_path):
    original = filled(tmp_path, n=50)
    # A crash after the recovered copy was complete but before it replaced the bad file.
    shutil.copy(tmp_path / "spool.db", tmp_path / "spool.db.recovered")
    (tmp_path / "spool.db").write_bytes(b"garbage" * 100)
    (tmp_path / "spool.db.recovering").write_bytes(b"a copy cut short")
    with spool_at(tmp_path) as s:
        assert "a recovery was interrupted by a crash and is now finished" in s.recovered
        assert all_records(s) == sorted(original.values(), key=lambda r: r.id)
    assert not (tmp_path / "spool.db.recovering").exists()
    assert not (tmp_path / "spool.db.recovered").exists()
    [aside] = damaged_files(tmp_path, "corrupt")
    assert (tmp_path / aside).read_bytes() == b"garbage" * 100


def test_text_that_is_no_longer_utf8_is_damage_not_a_crash(tmp_path):
    original = filled(tmp_path, n=20)
    with spool_at(tmp_path) as s:
        poke(tmp_path / "spool.db", "UPDATE records SET path = CAST(x'2fff' AS TEXT) "
             "WHERE id = 5")
        with pytest.raises(SpoolCorrupt, match="after id 4"):
            s.pending()
    with spool_at(tmp_path) as s:
        assert "corrupt" in s.recovered
        assert [r.id for r in assert_intact_subset(s, original)] == [
            i for i in range(1, 21) if i != 5]


def test_a_push_that_cannot_be_stored_names_its_agent(tmp_path):
    with spool_at(tmp_path) as s:
        with pytest.raises(ValueError, match="push from agent 'TutorAgent'"):
            s.append([push(), push("TutorAgent", path="/m?\udcff")])
        assert s.stats().records == 0


def test_a_log_without_its_database_is_not_replayed_into_a_new_one(tmp_path):
    with spool_at(tmp_path / "live") as s:
        s.append([push(body=b"old")])
        crashed = crash_copy(s, tmp_path / "crashed")
    (crashed / "spool.db").unlink()  # an operator removed the file, not its -wal
    with spool_at(crashed) as s:
        assert "missing, but its write-ahead log was there" in s.recovered
        assert all_records(s) == []
        assert [p.name for p in crashed.iterdir() if ".orphan-" in p.name]
