"""The metrics spool against a peer: pushes accepted into it, records drained from it
after a partition, and the fleet's 15 minutes; beside nats-server with JetStream file
storage receiving the same records.

What runs (all on 127.0.0.1, every process started here, stopped here, in temp dirs):
  ingest   `python -m sidecar.data` with one agent's ingest listener and no hub (it only
           spools, as during a partition). wrk -t1 POSTs a fleet-like metrics push
           (~300 bytes of JSON, with python-requests' fields) on 16 and 64 keep-alive
           connections. Every answer must be a 200: a push is answered only once it is in
           the spool, so answers/s is pushes/s stored.
  peer     nats-server -js (file storage), and a publisher of this script (nats-py, one
           connection) sending the same push to a stream with `js.publish_async`, keeping
           16 or 64 publishes waiting for their ack (the peer of 16 and 64 connections),
           `Nats-Msg-Id` = host.agent.seq (a dedup key, like the spool's). Acked
           messages/s is its rate.
  drain    a spool filled with N records first (77 agents' pushes, through `Spool.append`
           in this process), then `python -m sidecar.data --hub` started while nothing
           listens at the hub's address (partitioned), then `python -m sidecar.hub`
           started there. Timed from the receiver answering /health to the spool having
           nothing pending. The receiver stores each batch durably (its own spool and the
           high-water marks) before the 200 that lets the forwarder ack; its delivery to a
           legacy hub points at a closed port here (deliveries wait in its spool), so what
           is timed is the hop between the two spools. records/s is counted from the
           first ack (the forwarder's retry of a hub that was down comes first: reported
           apart as `reconnect_s`).
  fleet    the drain of 15 minutes of the fleet's pushes: 77 agents x 1/s x 900 s =
           69,300 records, as an operator sees it: from the receiver up to nothing pending.

Method, as in bench/hot_path.py: ingest and peer cells are interleaved, each round in an
order rotated by one, a fresh process and store per cell, and each figure is the median of
the rounds. A run during which other programs took more than a quarter of a core is set
aside and repeated once the machine is quiet (bounded). Ratios against the peer measured in
the same run, on the same cores: the machine is small (2 cores for client, server and
everything else) and shared. Durability is not the same: the spool is durable against a
SIGKILL at every answer and fsyncs every second (`--sync-interval`); JetStream's file store
acks once the message is written to its files, and fsyncs every 2 minutes by default.

Targets (marked met / missed): ingest >= 20,000 pushes/s at 16 and at 64 connections;
drain >= 50,000 records/s; the fleet's 15 minutes drained in < 30 s.

Needs wrk and nats-server (Debian packages wrk, nats-server) and nats-py (installed with
agentvisor).

Usage: .venv/bin/python bench/spool.py [--quick] [--rounds N] [--duration S]
                                       [--drain-records N] [--only drain] [--out DIR]
Writes bench/results/spool.json (machine, plan, every run, medians, comparisons).
`--only drain` runs the drains alone (no wrk, no nats-server): N rounds of the drain and
of the fleet's, each figure the median of the rounds; writes spool-drain.json instead, so
the full run's spool.json is left as it was.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]
# One implementation of the processes, wrk's report, the busy-machine check and the tables.
import hot_path as hp  # noqa: E402

RESULTS = ROOT / "bench" / "results"

FULL = {"rounds": 3, "duration_s": 5, "warmup_s": 1, "drain_records": 300_000,
        "max_wait_s": 60}
QUICK = {"rounds": 1, "duration_s": 3, "warmup_s": 1, "drain_records": 100_000,
         "max_wait_s": 10}
CONNS = (16, 64)
# The fleet: 77 agents pushing once a second; a partition of 15 minutes.
FLEET_AGENTS = 77
FLEET_WINDOW_S = 900
FLEET_RECORDS = FLEET_AGENTS * FLEET_WINDOW_S

TARGET_INGEST_PER_S = 20_000
TARGET_DRAIN_PER_S = 50_000
TARGET_FLEET_S = 30.0

HOST = "BenchHost"
AGENT = "MemoryOrchestratorService"
# What an agent of the fleet pushes once a second, near enough in size and shape.
PUSH_BODY = json.dumps({
    "agent_name": AGENT, "host": "PC2", "timestamp": 1764530000.123, "status": "healthy",
    "metrics": {"cpu_percent": 12.5, "memory_mb": 512.3, "threads": 9,
                "requests_total": 123456, "errors_total": 12, "latency_ms_p50": 3.2,
                "latency_ms_p99": 41.7, "queue_depth": 3, "uptime_s": 86400.5},
}).encode()
PUSH_PATH = "/api/metrics"
# python-requests' fields (the fleet's agents are Python programs) with a JSON body.
PUSH_FIELDS = {"User-Agent": "python-requests/2.32.3", "Accept-Encoding": "gzip, deflate",
               "Accept": "*/*", "Connection": "keep-alive",
               "Content-Type": "application/json"}

START_TIMEOUT_S = 20.0
# A drain that has not finished in this long has failed (the fleet's target is 30 s).
DRAIN_TIMEOUT_S = 180.0
# How often the drain's end is looked for: the figures' resolution.
DRAIN_POLL_S = 0.02
PUBLISH_GRACE_S = 30.0


# --- the processes ---------------------------------------------------------------

def get_json(port: int, path: str) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return json.load(r)
    except (OSError, ValueError):
        return None


def answers(port: int, path: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def wait_for(what: str, ok, children: list[hp.Child], timeout_s: float = START_TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while not (value := ok()):
        for child in children:
            child.check()
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: not within {timeout_s:g} s")
        time.sleep(DRAIN_POLL_S)
    return value


def data_process(folder: Path, *args: str) -> tuple[hp.Child, int]:
    status = hp.free_port()
    child = hp.Child("sidecar.data", [
        sys.executable, "-m", "sidecar.data", "--state-dir", str(folder / "state"),
        "--host", HOST, "--status", f"127.0.0.1:{status}", "--log-level", "warning", *args],
        folder / "data.log", cwd=ROOT)
    wait_for("sidecar.data /ready", lambda: answers(status, "/ready"), [child])
    return child, status


def lua_script(path: Path) -> Path:
    fields = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in PUSH_FIELDS.items())
    path.write_text(f'wrk.method = "POST"\nwrk.body = [[{PUSH_BODY.decode()}]]\n{fields}\n')
    return path


def run_wrk(port: int, conns: int, duration_s: int, script: Path) -> dict:
    out = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{duration_s}s", "--latency",
                          "-s", str(script), f"http://127.0.0.1:{port}{PUSH_PATH}"],
                         capture_output=True, text=True, timeout=duration_s + hp.WRK_GRACE_S)
    if out.returncode != 0:
        raise SystemExit(f"wrk failed:\n{out.stdout}{out.stderr}")
    return hp.parse_wrk(out.stdout)


def measure_ingest(folder: Path, conns: int, plan: dict, others: hp.Others) -> dict:
    folder.mkdir(parents=True)
    port = hp.free_port()
    child, status = data_process(folder, "--ingest", f"{AGENT}=127.0.0.1:{port}")
    others.ours[:] = [child]  # its CPU is ours, not another program's
    try:
        script = lua_script(folder / "push.lua")
        run_wrk(port, conns, plan["warmup_s"], script)  # caches, the kernel's buffers
        cpu0, wrk0, t0 = child.cpu_s(), hp.wrk_cpu_s(), time.monotonic()
        others.mark()
        result = run_wrk(port, conns, plan["duration_s"], script)
        cpu, wall = child.cpu_s() - cpu0, time.monotonic() - t0
        wrk_cpu = hp.wrk_cpu_s() - wrk0  # before the child is stopped: then it counts too
        foreign = others.cores()
        child.check()
        ingest = (get_json(status, "/status") or {}).get("ingest") or {}
    finally:
        child.stop()
    if result["non_2xx"] or result["socket_errors"]:
        raise SystemExit(f"ingest at {conns} connections: {result['non_2xx']} answers not "
                         f"2xx, {result['socket_errors']} socket errors (see "
                         f"{folder / 'data.log'})")
    return {**result, "cpu_us_per_push": cpu * 1e6 / result["requests"],
            "process_cores": cpu / wall, "wrk_cores": wrk_cpu / wall,
            "foreign_cpu_cores": foreign, "accepted": ingest.get("accepted"),
            "batches": ingest.get("batches"), "largest_batch": ingest.get("largest_batch"),
            "exit": child.proc.returncode}


def measure_peer(folder: Path, inflight: int, plan: dict, others: hp.Others) -> dict:
    folder.mkdir(parents=True)
    port = hp.free_port()
    server = hp.Child("nats-server", ["nats-server", "-js", "-sd", str(folder / "js"),
                                      "-a", "127.0.0.1", "-p", str(port)],
                      folder / "nats.log")
    others.ours[:] = [server]
    try:
        wait_for("nats-server", lambda: listening(port), [server])
        cpu0, pub0, t0 = server.cpu_s(), hp.wrk_cpu_s(), time.monotonic()
        others.mark()
        out = subprocess.run(
            [sys.executable, __file__, "--publisher", str(port), str(inflight),
             str(plan["duration_s"]), str(plan["warmup_s"])],
            capture_output=True, text=True,
            timeout=plan["duration_s"] + plan["warmup_s"] + PUBLISH_GRACE_S)
        cpu, wall = server.cpu_s() - cpu0, time.monotonic() - t0
        publisher_cpu = hp.wrk_cpu_s() - pub0  # before the server is stopped and reaped
        foreign = others.cores()
        server.check()
    finally:
        server.stop()
    if out.returncode != 0:
        raise SystemExit(f"the NATS publisher failed:\n{out.stdout}{out.stderr}")
    result = json.loads(out.stdout)
    if result["failed"]:
        raise SystemExit(f"NATS: {result['failed']} publishes not acked: {result['error']}")
    return {**result, "server_cpu_us_per_msg": cpu * 1e6 / max(result["acked"], 1),
            "process_cores": cpu / wall, "publisher_cores": publisher_cpu / wall,
            "foreign_cpu_cores": foreign}


async def publish(port: int, inflight: int, duration_s: float, warmup_s: float) -> dict:
    """The peer's client: acknowledged async publishes for duration_s, `inflight` at most
    waiting for their ack; acked messages/s, counted once the last ack is in."""
    import nats

    nc = await nats.connect(f"nats://127.0.0.1:{port}")
    js = nc.jetstream(publish_async_max_pending=inflight)
    await js.add_stream(name="METRICS", subjects=["metrics.>"])  # file storage: default
    subject = f"metrics.{HOST}.{AGENT}"
    loop = asyncio.get_running_loop()
    counts = {"acked": 0, "failed": 0, "error": None}
    seq = 0

    def acked(future: asyncio.Future) -> None:
        if future.cancelled() or future.exception() is not None:
            counts["failed"] += 1
            counts["error"] = repr(future.exception()) if not future.cancelled() else "cancelled"
        else:
            counts["acked"] += 1

    async def burst(seconds: float) -> None:
        nonlocal seq
        until = loop.time() + seconds
        while loop.time() < until:
            seq += 1
            future = await js.publish_async(subject, PUSH_BODY, headers={
                "Nats-Msg-Id": f"{HOST}.{AGENT}.{seq}"})
            future.add_done_callback(acked)
        await js.publish_async_completed()

    await burst(warmup_s)
    counts.update(acked=0, failed=0)
    t0 = loop.time()
    await burst(duration_s)
    elapsed = loop.time() - t0
    await nc.close()
    return {**counts, "seconds": elapsed, "rps": counts["acked"] / elapsed,
            "inflight": inflight}


def fill(state: Path, n: int) -> float:
    """A spool with n records of the fleet's agents, as after a partition; seconds taken."""
    from sidecar.spool import Push, Spool

    state.mkdir(parents=True)
    agents = [f"Agent{i:02d}" for i in range(FLEET_AGENTS)]
    spool = Spool(state / "metrics.db", host=HOST)
    t0 = time.monotonic()
    start = time.time() - n / FLEET_AGENTS
    try:
        for first in range(0, n, 1000):
            spool.append([Push(agents[i % FLEET_AGENTS], "POST", PUSH_PATH,
                               "application/json", PUSH_BODY, start + i / FLEET_AGENTS)
                          for i in range(first, min(n, first + 1000))])
        spool.sync()
    finally:
        spool.close()
    return time.monotonic() - t0


def measure_drain(folder: Path, n: int, others: hp.Others) -> dict:
    folder.mkdir(parents=True)
    fill_s = fill(folder / "state", n)
    hub_port, closed = hp.free_port(), hp.free_port()
    data, status = data_process(folder, "--hub", f"127.0.0.1:{hub_port}")
    others.ours[:] = [data]
    children = others.ours  # the hub joins both: its CPU is ours too
    try:
        def forwarder() -> dict:
            return (get_json(status, "/status") or {}).get("forwarder") or {}

        wait_for("the forwarder to see the hub down (partitioned)",
                 lambda: forwarder().get("state") == "partitioned", children)
        cpu0 = data.cpu_s()
        others.mark()
        hub = hp.Child("sidecar.hub", [
            sys.executable, "-m", "sidecar.hub", "--listen", f"127.0.0.1:{hub_port}",
            "--state-dir", str(folder / "hub"), "--deliver-to", f"127.0.0.1:{closed}",
            "--log-level", "warning"], folder / "hub.log", cwd=ROOT)
        children.append(hub)
        wait_for("sidecar.hub /health", lambda: answers(hub_port, "/health"), children)
        t_up = time.monotonic()
        # Its start-up (imports, opening its spool): counted in receiver_cpu_s as before,
        # and apart: on the fleet's 69,300 records it is a fifth of that or more.
        hub_start_cpu = hub.cpu_s()
        first = None  # (time, records still pending) at the first ack seen
        deadline = t_up + DRAIN_TIMEOUT_S
        while True:
            f = forwarder()
            now = time.monotonic()
            pending = f.get("pending_records", n)
            if first is None and pending < n:
                first = (now, pending)
            if pending == 0:
                break
            if now > deadline:
                raise SystemExit(f"drain of {n} records: {pending} still pending after "
                                 f"{DRAIN_TIMEOUT_S:g} s (see {folder})")
            for child in children:
                child.check()
            time.sleep(DRAIN_POLL_S)
        t_end = time.monotonic()
        cpu = data.cpu_s() - cpu0, hub.cpu_s()
        foreign = others.cores()
    finally:
        for child in reversed(children):
            child.stop()
    t_first, pending_then = first
    drained_after_first = pending_then
    span = max(t_end - t_first, DRAIN_POLL_S)
    return {"records": n, "fill_s": fill_s, "drain_s": t_end - t_up,
            "reconnect_s": t_first - t_up, "rps": drained_after_first / span,
            "sent_total": f.get("sent_total"), "duplicates": f.get("duplicates_total"),
            "batches": f.get("batches_total"), "forwarder_cpu_s": cpu[0],
            "receiver_cpu_s": cpu[1], "receiver_start_cpu_s": hub_start_cpu,
            "foreign_cpu_cores": foreign}


# --- the run -----------------------------------------------------------------------

def measure(folder: Path, plan: dict, others: hp.Others, progress) -> tuple[list, list]:
    cells = [(kind, c) for kind in ("ingest", "peer") for c in CONNS]
    runs, set_aside = [], []
    wait_left = plan["max_wait_s"]
    repeats_left = len(cells) * plan["rounds"] // 2

    def one(rnd: int, kind: str, c: int, tag: str) -> dict:
        where = folder / f"{kind}-{c}-r{rnd}{tag}"
        r = (measure_ingest if kind == "ingest" else measure_peer)(where, c, plan, others)
        return {"round": rnd, "kind": kind, "conns": c, **r}

    def show(r: dict, note: str = "") -> None:
        extra = (f"p50 {r['p50_us']:7.0f} us  p99 {r['p99_us']:7.0f} us  "
                 f"cpu/push {r['cpu_us_per_push']:5.1f} us ({r['process_cores']:.2f} cores)"
                 if r["kind"] == "ingest" else
                 f"server {r['process_cores']:.2f} cores, publisher "
                 f"{r['publisher_cores']:.2f}")
        progress(f"round {r['round'] + 1}/{plan['rounds']} {r['kind']:<6} c={r['conns']:<2} "
                 f"{r['rps']:9,.0f}/s  {extra}  others {r['foreign_cpu_cores']:.2f} cores"
                 f"{note}")

    for rnd in range(plan["rounds"]):
        shift = rnd % len(cells)
        for kind, c in cells[shift:] + cells[:shift]:
            r = one(rnd, kind, c, "")
            if r["foreign_cpu_cores"] > hp.QUIET_MAX_CORES and repeats_left and wait_left > 0:
                show(r, "  (busy machine: set aside)")
                set_aside.append(r)
                repeats_left -= 1
                wait_left -= others.wait_quiet(wait_left)
                r = {**one(rnd, kind, c, "-again"), "repeat": True}
            show(r)
            runs.append(r)
    return runs, set_aside


def median_of(runs: list[dict], kind: str, conns: int, key: str) -> float:
    return statistics.median(r[key] for r in runs if r["kind"] == kind and r["conns"] == conns)


def figures(runs: list[dict], drain: dict, fleet: dict) -> tuple[list[str], list[list[str]],
                                                                  list[dict]]:
    """The table: each measure, ours, the peer's, the ratio, the target, met."""
    rows, out = [], []

    def add(measure: str, ours: float, unit: str, peer: float | None, target: str,
            met: bool) -> None:
        ratio = ours / peer if peer else None
        out.append({"measure": measure, "agentvisor": ours, "unit": unit, "peer": peer,
                    "ratio": ratio, "target": target, "met": met})
        shown = f"{ours:,.1f} s" if unit == "s" else f"{ours:,.0f}"
        rows.append([measure, shown, "-" if peer is None else f"{peer:,.0f}",
                     "-" if ratio is None else f"{ratio:.2f}x", target,
                     "met" if met else "MISSED"])

    for c in CONNS:
        ours = median_of(runs, "ingest", c, "rps")
        add(f"pushes/s into the spool, {c} connections", ours, "1/s",
            median_of(runs, "peer", c, "rps"), f">= {TARGET_INGEST_PER_S:,}",
            ours >= TARGET_INGEST_PER_S)
    peer64 = median_of(runs, "peer", CONNS[-1], "rps")
    add(f"records/s drained to a hub after a partition ({drain['records']:,})", drain["rps"],
        "1/s", peer64, f">= {TARGET_DRAIN_PER_S:,}", drain["rps"] >= TARGET_DRAIN_PER_S)
    add(f"fleet's 15 min ({FLEET_RECORDS:,} records) drained in", fleet["drain_s"], "s",
        None, f"< {TARGET_FLEET_S:g} s", fleet["drain_s"] < TARGET_FLEET_S)
    head = ["measure", "agentvisor", f"NATS JetStream (nats-py, {CONNS[-1]} in flight for "
            "the drain)", "ratio", "target", "met"]
    return head, rows, out


def detail_rows(runs: list[dict], drain: dict, fleet: dict) -> tuple[list[str],
                                                                       list[list[str]]]:
    """Where the figures come from: latency and CPU per push, the drains' parts."""
    rows = []
    for c in CONNS:
        rows.append([f"ingest, {c} connections",
                     f"p50 {median_of(runs, 'ingest', c, 'p50_us') / 1000:.2f} ms, "
                     f"p99 {median_of(runs, 'ingest', c, 'p99_us') / 1000:.2f} ms",
                     f"{median_of(runs, 'ingest', c, 'cpu_us_per_push'):.1f} us/push",
                     f"commits of up to "
                     f"{median_of(runs, 'ingest', c, 'largest_batch'):.0f} pushes"])
    for name, d in (("drain", drain), ("fleet", fleet)):
        rows.append([f"{name}, {d['records']:,} records",
                     f"{d['reconnect_s']:.2f} s to reconnect + "
                     f"{d['drain_s'] - d['reconnect_s']:.2f} s to drain",
                     f"forwarder {d['forwarder_cpu_s'] * 1e6 / d['records']:.1f} + receiver "
                     f"{d['receiver_cpu_s'] * 1e6 / d['records']:.1f} us/record",
                     f"{d['batches']} batches, {d['duplicates']} duplicates"])
    return ["part", "time", "CPU", "notes"], rows


def machine() -> dict:
    info = hp.machine()
    for key in ("nginx", "haproxy", "sidecar_hot_path"):
        info.pop(key, None)
    info["nats_server"] = hp.version(["nats-server", "--version"])
    # Not "nats_py": `agentvisor scan` (make test's credential gate) reads a NATS_* key
    # with a value as a credential assignment.
    try:
        from importlib.metadata import version
        info["peer_client"] = f"nats-py {version('nats-py')}"
    except Exception:
        info["peer_client"] = "nats-py ?"
    return info


def cpu_per_record(d: dict) -> tuple[float, float, float]:
    """Forwarder, receiver, and receiver without its start-up: CPU us per record."""
    n = d["records"]
    return (d["forwarder_cpu_s"] * 1e6 / n, d["receiver_cpu_s"] * 1e6 / n,
            (d["receiver_cpu_s"] - d["receiver_start_cpu_s"]) * 1e6 / n)


def drains_only(plan: dict, out: Path) -> int:
    """`--only drain`: the drain and the fleet's drain, plan["rounds"] times each,
    alternating; medians of records/s and of CPU per record."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t_start = time.monotonic()
    runs: dict[str, list[dict]] = {"drain": [], "fleet": []}
    sizes = {"drain": plan["drain_records"], "fleet": FLEET_RECORDS}
    with tempfile.TemporaryDirectory(prefix="bench_spool.") as tmp:
        others = hp.Others([])
        for rnd in range(plan["rounds"]):
            for name, n in sizes.items():
                d = measure_drain(Path(tmp) / f"{name}-r{rnd}", n, others)
                runs[name].append(d)
                fwd, rcv, rcv_run = cpu_per_record(d)
                print(f"round {rnd + 1}/{plan['rounds']} {name:<5} {n:>7,} records: "
                      f"{d['rps']:9,.0f} records/s, {d['drain_s']:.2f} s in all "
                      f"({d['reconnect_s']:.2f} s to reconnect); CPU forwarder "
                      f"{fwd:.1f} + receiver {rcv:.1f} ({rcv_run:.1f} after its start-up) "
                      f"us/record; others {d['foreign_cpu_cores']:.2f} cores",
                      file=sys.stderr, flush=True)
    medians = {}
    for name, rs in runs.items():
        per = [cpu_per_record(d) for d in rs]
        medians[name] = {
            "records": sizes[name],
            "rps": statistics.median(d["rps"] for d in rs),
            "drain_s": statistics.median(d["drain_s"] for d in rs),
            "forwarder_us_per_record": statistics.median(p[0] for p in per),
            "receiver_us_per_record": statistics.median(p[1] for p in per),
            "receiver_us_per_record_after_start": statistics.median(p[2] for p in per),
            "foreign_cpu_cores": statistics.median(d["foreign_cpu_cores"] for d in rs)}
    print()
    for name, m in medians.items():
        met = (m["rps"] >= TARGET_DRAIN_PER_S if name == "drain"
               else m["drain_s"] < TARGET_FLEET_S)
        print(f"{name}: median of {plan['rounds']}: {m['rps']:,.0f} records/s, "
              f"{m['drain_s']:.2f} s in all; CPU forwarder "
              f"{m['forwarder_us_per_record']:.1f} + receiver "
              f"{m['receiver_us_per_record']:.1f} "
              f"({m['receiver_us_per_record_after_start']:.1f} after its start-up) "
              f"us/record; others {m['foreign_cpu_cores']:.2f} cores; target "
              f"{'met' if met else 'MISSED'}")
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine(),
              "plan": {**plan, "only": "drain", "fleet_records": FLEET_RECORDS,
                       "push_bytes": len(PUSH_BODY),
                       "elapsed_s": round(time.monotonic() - t_start, 1)},
              "runs": runs, "medians": medians}
    (out / "spool-drain.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nJSON: {out / 'spool-drain.json'}   ({result['plan']['elapsed_s']} s)")
    return 0 if medians["drain"]["rps"] >= TARGET_DRAIN_PER_S else 1


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--publisher":  # the peer's client, run by us
        port, inflight, duration_s, warmup_s = sys.argv[2:6]
        import uvloop

        print(json.dumps(uvloop.run(publish(int(port), int(inflight), float(duration_s),
                                            float(warmup_s)))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"{QUICK['rounds']} round x {QUICK['duration_s']} s, a "
                         f"{QUICK['drain_records']:,}-record drain (about a minute)")
    ap.add_argument("--rounds", type=int, help=f"default {FULL['rounds']}")
    ap.add_argument("--duration", type=int,
                    help=f"seconds per ingest and peer run, default {FULL['duration_s']}")
    ap.add_argument("--drain-records", type=int,
                    help=f"records in the spool before the drain, default "
                         f"{FULL['drain_records']:,}")
    ap.add_argument("--only", choices=("drain",),
                    help="drain: only the drains (the drain and the fleet's, --rounds "
                         "times each, medians), into spool-drain.json")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for spool.json")
    args = ap.parse_args()
    plan = dict(QUICK if args.quick else FULL)
    plan["rounds"] = args.rounds or plan["rounds"]
    plan["duration_s"] = args.duration or plan["duration_s"]
    plan["drain_records"] = args.drain_records or plan["drain_records"]
    if args.only == "drain":
        return drains_only(plan, args.out)
    for tool in ("wrk", "nats-server"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            raise SystemExit(f"{tool} not found: apt-get install wrk nats-server")

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    info = machine()
    t_start = time.monotonic()
    progress = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="bench_spool.") as tmp:
        folder = Path(tmp)
        others = hp.Others([])
        print(f"ingest and peer: {plan['rounds']} rounds x {plan['duration_s']} s x "
              f"{len(CONNS)} connection counts, interleaved; then the drains",
              file=sys.stderr)
        runs, set_aside = measure(folder, plan, others, progress)
        drain = measure_drain(folder / "drain", plan["drain_records"], others)
        progress(f"drain  {drain['records']:,} records: {drain['rps']:,.0f} records/s after "
                 f"the first ack ({drain['reconnect_s']:.2f} s to reconnect; "
                 f"{drain['drain_s']:.2f} s in all)")
        fleet = measure_drain(folder / "fleet", FLEET_RECORDS, others)
        progress(f"fleet  {FLEET_RECORDS:,} records drained in {fleet['drain_s']:.2f} s "
                 f"({fleet['reconnect_s']:.2f} s of it to reconnect)")

    head, rows, comparisons = figures(runs, drain, fleet)
    dhead, drows = detail_rows(runs, drain, fleet)
    foreign = [r["foreign_cpu_cores"] for r in runs]
    note = (f"median of {plan['rounds']} interleaved rounds x {plan['duration_s']} s; "
            f"wrk -t1 POSTs of a {len(PUSH_BODY)}-byte JSON push with python-requests' "
            f"fields; NATS: one nats-py connection, js.publish_async with as many acks "
            f"awaited as connections; drain: {drain['reconnect_s']:.2f} s to reconnect to "
            f"the hub, then {drain['rps']:,.0f} records/s")
    busy = (f"other programs used {statistics.median(foreign):.2f} cores (median of runs; "
            f"max {max(foreign):.2f}) of the machine's {os.cpu_count()}; "
            f"{len(set_aside)} runs set aside and repeated for that")
    print(f"\n{note}\n{busy}\n\n{hp.text_table(head, rows)}\n\n{hp.text_table(dhead, drows, left=4)}")
    if statistics.median(foreign) > hp.BUSY_WARN_CORES:
        print(f"\nWARNING: {busy}: the figures are skewed; rerun on a quiet machine.")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"machine": info,
              "plan": {**plan, "connections": list(CONNS), "push_bytes": len(PUSH_BODY),
                       "fleet_records": FLEET_RECORDS, "quick": args.quick,
                       "elapsed_s": round(time.monotonic() - t_start, 1)},
              "runs": runs, "set_aside": set_aside, "drain": drain, "fleet": fleet,
              "foreign_cpu_cores": {"median": statistics.median(foreign),
                                    "max": max(foreign)},
              "comparisons": comparisons}
    (args.out / "spool.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nJSON: {args.out / 'spool.json'}   ({result['plan']['elapsed_s']} s)")
    print("\n<!-- bench/spool.py: paste into README.md -->")
    print(f"Metrics spool ({info['cpus']} x {info['cpu']}, {note}):\n")
    print(hp.markdown_table(head, rows))
    print()
    print(hp.markdown_table(dhead, drows, left=4))
    print("<!-- end bench/spool.py -->")
    return 0 if all(c["met"] for c in comparisons) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
