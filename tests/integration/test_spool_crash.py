"""SIGKILL a real spool writer at random moments: no answered push is ever lost.

A child process opens the spool, appends batches in a loop and prints each record once
`append` has returned (that is when ingest answers the agent); now and then it reads the
oldest records and acks them, printing them before the ack and the id after. The test
kills it (SIGKILL, 20 times, after a seeded random number of printed lines), starts it
again on the same file, and at the end reads the file itself: every answered record is
there, byte for byte, unless an ack covered it; per agent, sequences run 1, 2, 3... with
no gap and no repeat across all the crashes; and a crash never leaves a corrupt file.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
from collections import defaultdict

from sidecar.spool import Spool
from tests.integration.harness import ROOT, wait_until

KILLS = 20
HOST = "PC2"

WRITER = r'''
import random, sys
from sidecar.spool import Push, Spool

AGENTS = ("MemoryOrchestratorService", "ResourceManager", "TaskScheduler", "CacheManager")
path, run = sys.argv[1], int(sys.argv[2])
rng = random.Random(run)
spool = Spool(path, host="PC2", sync_interval_s=1.0)
print("open", "damaged" if spool.damaged else "ok", spool.recovered or "clean",
      flush=True)
i = 0
while True:
    pushes = []
    for _ in range(rng.randint(1, 16)):
        token = f"{run}-{i}"
        i += 1
        pushes.append(Push(rng.choice(AGENTS), "POST", f"/api/metrics?t={token}",
                           "application/json", (token + "|").encode() * (1 + i % 60)))
    answered = spool.append(pushes)
    sys.stdout.write("".join(f"rec {r.id} {r.agent} {r.seq} {r.path}\n" for r in answered))
    sys.stdout.flush()
    if rng.random() < 0.15:
        oldest = spool.pending(limit=rng.randint(1, 40))
        if oldest:
            sys.stdout.write("".join(f"pend {r.id} {r.agent} {r.seq} {r.path}\n"
                                     for r in oldest) + f"ack? {oldest[-1].id}\n")
            sys.stdout.flush()
            spool.ack(oldest[-1].id)
            print(f"acked {oldest[-1].id}", flush=True)
    if rng.random() < 0.05:
        spool.sync()
'''


def body_for(path: str) -> bytes:
    token = path.split("?t=", 1)[1]
    i = int(token.split("-")[1]) + 1
    return (token + "|").encode() * (1 + i % 60)


class Writer:
    """One run of the child, its stdout collected line by line as it comes."""

    def __init__(self, script, spool_path, run: int, stderr_path):
        self.lines: list[str] = []
        self.stderr_path = stderr_path
        with open(stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, str(script), str(spool_path), str(run)], cwd=ROOT,
                stdout=subprocess.PIPE, stderr=stderr,
                env={**os.environ, "PYTHONPATH": str(ROOT)})
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,),
                                        daemon=True)
        self._reader.start()

    def _read(self, stdout):
        with stdout:
            for raw in stdout:
                if raw.endswith(b"\n"):  # a line cut by the kill was never whole: skip it
                    self.lines.append(raw.decode().rstrip("\n"))

    def kill_after(self, n_lines: int) -> list[str]:
        wait_until(lambda: len(self.lines) >= n_lines or self.proc.poll() is not None,
                   30, lambda: f"{n_lines} lines from the writer")
        assert self.proc.poll() is None, self.stderr_path.read_text()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._reader.join(10)
        return self.lines


def test_sigkill_at_random_moments_loses_no_answered_push(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    spool_path = tmp_path / "state" / "spool.db"
    rng = random.Random(20250611)
    answered: dict[int, tuple[str, int, str]] = {}  # id -> (agent, seq, path)
    seen: dict[tuple[str, int], str] = {}  # (agent, seq) -> path: must never differ
    tried_ack = confirmed_ack = 0
    opens = []
    for run in range(KILLS):
        writer = Writer(script, spool_path, run, tmp_path / f"writer-{run}.log")
        lines = writer.kill_after(rng.randint(2, 250))
        for line in lines:
            kind, _, rest = line.partition(" ")
            if kind == "open":
                opens.append(rest)
            elif kind in ("rec", "pend"):
                id_, agent, seq, path = rest.split(" ")
                id_, seq = int(id_), int(seq)
                if kind == "rec":
                    assert id_ not in answered, f"id {id_} handed out twice"
                    answered[id_] = (agent, seq, path)
                assert seen.setdefault((agent, seq), path) == path, (
                    f"{agent} seq {seq} used for two pushes")
            elif kind == "ack?":
                tried_ack = max(tried_ack, int(rest))
            elif kind == "acked":
                confirmed_ack = max(confirmed_ack, int(rest))
    assert len(answered) > KILLS and confirmed_ack > 0, "the writer did too little to test"

    with Spool(spool_path, host=HOST) as spool:
        # A SIGKILL is not damage: at most an append cut short, never a corrupt file.
        assert not spool.damaged, spool.recovered
        present = {r.id: r for r in spool.pending(limit=10**9, max_bytes=1 << 62)}
    for note in opens:
        assert note.startswith("ok "), note
    assert not [p for p in spool_path.parent.iterdir() if ".corrupt-" in p.name]

    for id_, (agent, seq, path) in answered.items():
        if id_ <= confirmed_ack:
            assert id_ not in present, f"acked record {id_} came back"
        elif id_ > tried_ack:
            assert id_ in present, f"answered record {id_} ({agent} seq {seq}) was lost"
    for r in present.values():  # answered or not (killed before the print), intact
        assert (r.host, r.method, r.content_type) == (HOST, "POST", "application/json")
        assert r.body == body_for(r.path), f"record {r.id} misread"
        assert seen.setdefault((r.agent, r.seq), r.path) == r.path, (
            f"{r.agent} seq {r.seq} used for two pushes")
        if r.id in answered:
            assert answered[r.id] == (r.agent, r.seq, r.path)

    by_agent = defaultdict(set)
    for agent, seq in seen:
        by_agent[agent].add(seq)
    for agent, seqs in by_agent.items():
        assert seqs == set(range(1, max(seqs) + 1)), (
            f"{agent}: sequence gaps at {sorted(set(range(1, max(seqs) + 1)) - seqs)[:10]}")
