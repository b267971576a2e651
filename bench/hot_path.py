"""The sidecar's hot path against HAProxy: latency added, throughput, CPU per request.

What runs (all on 127.0.0.1, every process started here and stopped here):
  upstream      nginx, one worker, `return 200 "ok\\n"` with keep-alive: it must be much
                faster than any proxy in front of it, so that what we see is the proxy.
                (--varied: a different body every time, `$request_id`, so that no
                answer repeats the previous one byte for byte.)
  sidecar       `python -m sidecar.main` with two upstreams to nginx: one L4 (TCP relay),
                one L7 (HTTP/1.1 proxy), exactly as an agent's host config declares them.
  HAProxy       the peer: `nbthread 1` (one core, like the sidecar's one event loop), a
                `mode tcp` and a `mode http` frontend (`http-reuse always`, keep-alive).
  floor-L7      bench/floor_http.py: the least an HTTP/1.1 proxy on uvloop + httptools
                does (parse both ways, forward bytes as they came; no policy at all). A
                yardstick, not a peer: HAProxy -> floor is what the stack costs, floor
                -> sidecar-L7 what the sidecar's own work costs.
  wrk           `-t1 --latency`, GETs with the fields python-requests sends (the fleet's
                agents are Python programs; --bare-request for wrk's Host-only GET),
                at 1 connection (latency alone) and at 16 connections
                (saturation: 16 keep-alive connections keep one Python event loop, and
                one HAProxy thread, (nearly) busy all the time; more adds queueing).

Targets: direct (wrk -> nginx), haproxy-tcp, sidecar-L4, haproxy-http, sidecar-L7,
floor-L7.

Method, and why:
- Interleaved: one run holds every target. Each round runs every (target, connections)
  cell once, in an order rotated by one each round, so a slow minute of the machine (other
  tenants, frequency changes) lands on all targets rather than on whichever ran then.
- Medians across rounds: the latency a proxy adds at one connection (10-30 us) is the
  size of the run-to-run noise, so each figure is the median of the rounds, and the raw
  per-round numbers are kept in the JSON.
- Added latency is paired: for each round, proxy percentile minus direct percentile *of
  the same round*; the median of those differences is quoted.
- wrk's percentiles are per request (each request's own latency goes in the histogram),
  from a closed loop: at 16 connections they include queueing inside the proxy.
- CPU per request: user+system CPU time of the proxy process (and any children) over a
  saturation run, divided by the requests wrk completed in it (psutil, before and after).
- A busy machine is detected, not guessed at: for each run, the machine's busy CPU time
  minus ours and wrk's is the CPU other programs took. A run during which they took more
  than a quarter of a core is set aside and repeated once they quiet down (bounded:
  at most half the runs, at most max_wait_s of waiting); the table says how much they
  took, and warns if the kept runs were still shared.
- Ratios against a peer, not absolute numbers: this machine is small and shared (2 cores
  for wrk, proxy and nginx together), so absolute microseconds move from run to run and
  machine to machine; HAProxy measured in the same run on the same cores moves with them.
  The goals are therefore stated as sidecar / HAProxy, except CPU per request, which
  is a budget of its own.

Goals (marked met / missed in the output):
  L4: adds no more p50 / p99 latency than HAProxy mode tcp (at 1 and 16 connections),
      and >= 90 % of its throughput.
  L7: adds at most 1.2x HAProxy mode http's p50 and p99 at 16 connections, and >= 80 %
      of its throughput.
  CPU per request: <= 12 us (L4), <= 18 us (L7).

Needs the Debian packages nginx-light (or nginx), haproxy and wrk, and matplotlib
(the `bench` extra) for the plot.

Usage: .venv/bin/python bench/hot_path.py [--quick] [--rounds N] [--duration S]
                                         [--targets direct,sidecar-L7,...] [--out DIR]
Writes bench/results/hot_path.json (raw rounds, medians, machine) and hot_path.png.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

TARGETS = ("direct", "haproxy-tcp", "sidecar-L4", "haproxy-http", "sidecar-L7", "floor-L7")
# The L7 stack's floor, and the target it is the floor of.
FLOOR, FLOORED = "floor-L7", "sidecar-L7"
# Each sidecar listener and the HAProxy frontend it is compared with.
PEERS = {"sidecar-L4": "haproxy-tcp", "sidecar-L7": "haproxy-http"}
# One connection: latency with nothing queued. Sixteen: saturation. Measured on the
# 2-core machine: 32 connections gave HAProxy and the L4 relay 3-10 % more req/s, the
# L7 proxy none, and every latency doubled; at 16 the L7 proxies already keep a core
# busy (0.95-0.99), the L4 ones 0.8-0.9, wrk and nginx taking the rest of the machine.
LATENCY_CONNS = 1
SATURATION_CONNS = 16
CONNS = (LATENCY_CONNS, SATURATION_CONNS)

# wrk's durations are whole seconds.
# max_wait_s: the whole bench's budget for waiting until other programs quiet down.
FULL = {"rounds": 5, "duration_s": 5, "warmup_s": 1, "max_wait_s": 120}
QUICK = {"rounds": 2, "duration_s": 2, "warmup_s": 1, "max_wait_s": 10}
# Past this, a child that has not come up is reported as failed to start.
START_TIMEOUT_S = 20.0
# wrk itself stops after its duration; this only bounds a wedged wrk.
WRK_GRACE_S = 15.0
# A run during which other programs used more than this many cores is set aside and
# repeated once the machine is quiet (a test suite on the other core halves throughput).
QUIET_MAX_CORES = 0.25
QUIET_SAMPLE_S = 0.5
# Other programs using more than this (median over the kept runs): figures suspect.
BUSY_WARN_CORES = 0.2
# A child gets this long to exit on SIGTERM before SIGKILL.
STOP_TIMEOUT_S = 5.0


# --- the processes under test ------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Child:
    """One started program, in a session of its own so that Ctrl-C reaches only us and we
    stop it (and its children, e.g. nginx's worker) in order with its whole group."""

    def __init__(self, name: str, argv: list[str], log: Path, cwd: Path | None = None):
        self.name, self.log = name, log
        self.proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL,
                                     stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def cpu_s(self) -> float:
        """User+system CPU seconds of the program and everything it started."""
        total = 0.0
        try:
            root = psutil.Process(self.proc.pid)
            for p in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    t = p.cpu_times()
                    total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
        return total

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise SystemExit(f"{self.name} exited with {self.proc.returncode}:\n"
                             + self.log.read_text(errors="replace")[-3000:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        # The group may outlive its leader (a worker whose master died): kill what's left.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(STOP_TIMEOUT_S)


def get(port: int, path: str = "/") -> tuple[int, bytes] | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", path)
        resp = conn.getresponse()
        out = resp.status, resp.read()
        conn.close()
        return out
    except OSError:
        return None


def answers(port: int) -> bool:
    """nginx's answer comes back through `port`: a 200 whose body is a line."""
    got = get(port)
    return got is not None and got[0] == 200 and got[1].endswith(b"\n")


def wait_until(what: str, ok, children: list[Child]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ok():
        for child in children:
            child.check()
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: not up after {START_TIMEOUT_S:g} s")
        time.sleep(0.05)


def start_nginx(folder: Path, port: int, varied: bool = False) -> Child:
    """nginx answering "ok\\n", or with varied a request id (32 hex digits) that no
    other answer repeats."""
    folder.mkdir()
    body = "$request_id\\n" if varied else "ok\\n"
    # Temp paths too: Debian's compiled-in ones are under /var/lib/nginx.
    temp = " ".join(f"{k}_temp_path {folder}/{k};"
                    for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (folder / "nginx.conf").write_text(f"""\
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    {temp}
    keepalive_timeout 300s;
    keepalive_requests 100000000;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "{body}"; }}
    }}
}}
""")
    return Child("nginx", [shutil.which("nginx") or "/usr/sbin/nginx", "-p", str(folder),
                           "-e", f"{folder}/error.log", "-c", str(folder / "nginx.conf"),
                           "-g", "daemon off;"], folder / "stdout.log")


def start_haproxy(folder: Path, upstream: int, tcp_port: int, http_port: int) -> Child:
    folder.mkdir()
    cfg = folder / "haproxy.cfg"
    cfg.write_text(f"""\
global
    nbthread 1
    maxconn 4096

defaults
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    timeout http-request 10s

frontend tcp_in
    mode tcp
    bind 127.0.0.1:{tcp_port}
    default_backend tcp_nginx

backend tcp_nginx
    mode tcp
    server nginx 127.0.0.1:{upstream}

frontend http_in
    mode http
    option http-keep-alive
    bind 127.0.0.1:{http_port}
    default_backend http_nginx

backend http_nginx
    mode http
    option http-keep-alive
    http-reuse always
    server nginx 127.0.0.1:{upstream}
""")
    # -db: foreground, one process (no master-worker): its CPU is this pid's CPU.
    return Child("haproxy", [shutil.which("haproxy") or "/usr/sbin/haproxy", "-db",
                             "-f", str(cfg)], folder / "haproxy.log")


def start_sidecar(folder: Path, upstream: int, l4_port: int, l7_port: int,
                  metrics_port: int) -> Child:
    folder.mkdir()
    cfg = folder / "sidecar.yaml"
    address = f"127.0.0.1:{upstream}"
    cfg.write_text(yaml.safe_dump({
        "upstreams": {
            "Direct4": {"address": address, "protocol": "tcp", "listen": f"127.0.0.1:{l4_port}"},
            "Direct7": {"address": address, "protocol": "http", "listen": f"127.0.0.1:{l7_port}"},
        },
        "sidecar": {"metrics_listen": f"127.0.0.1:{metrics_port}"},
    }))
    return Child("sidecar", [sys.executable, "-m", "sidecar.main", "--config", str(cfg),
                             "--log-level", "warning"], folder / "sidecar.log", cwd=ROOT)


@dataclass
class Target:
    name: str
    port: int
    # The process whose CPU per request we report (for direct: nginx, the reference).
    process: Child


# --- wrk ---------------------------------------------------------------------------

_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}
_PERCENTILE = re.compile(r"^\s*(\d+)%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_REQUESTS = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h)", re.M)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_SOCKET_ERRORS = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def parse_wrk(text: str) -> dict:
    """wrk --latency's report -> percentiles (us), requests, req/s, errors."""
    percentiles = {int(p): float(v) * _US[u] for p, v, u in _PERCENTILE.findall(text)}
    requests, rps = _REQUESTS.search(text), _RPS.search(text)
    if not (requests and rps and {50, 99} <= percentiles.keys()):
        raise ValueError(f"unexpected wrk output:\n{text}")
    errors = sum(map(int, m.groups())) if (m := _SOCKET_ERRORS.search(text)) else 0
    non_2xx = int(m.group(1)) if (m := _NON_2XX.search(text)) else 0
    return {"p50_us": percentiles[50], "p99_us": percentiles[99],
            "percentiles_us": {str(k): v for k, v in sorted(percentiles.items())},
            "requests": int(requests.group(1)),
            "seconds": float(requests.group(2)) * _US[requests.group(3)] / 1e6,
            "rps": float(rps.group(1)), "socket_errors": errors, "non_2xx": non_2xx}


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent not idle since boot."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def wrk_cpu_s() -> float:
    """CPU seconds of our waited-for children: wrk's runs (the others are still running)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class Others:
    """The CPU that programs other than ours (children and wrk) use: on a shared machine
    a colleague's test run takes a core and skews every figure taken meanwhile."""

    def __init__(self, ours: list[Child]):
        self.ours = ours
        self._mark = self._now()

    def _now(self) -> tuple[float, float]:
        return (busy_cpu_s() - sum(c.cpu_s() for c in self.ours) - wrk_cpu_s(),
                time.monotonic())

    def mark(self) -> None:
        self._mark = self._now()

    def cores(self) -> float:
        """Cores they used on average since mark()."""
        cpu, t = self._now()
        return max(0.0, (cpu - self._mark[0]) / max(t - self._mark[1], 1e-3))

    def wait_quiet(self, budget_s: float) -> float:
        """Wait until they use at most QUIET_MAX_CORES, for at most budget_s; the time
        spent."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < budget_s:
            self.mark()
            time.sleep(QUIET_SAMPLE_S)
            if self.cores() <= QUIET_MAX_CORES:
                break
        return time.monotonic() - t0


# The fields python-requests sends with a GET (wrk adds Host): the fleet's agents are
# Python programs, and the request every proxy here parses should look like theirs.
# --bare-request drops them (wrk's own GET: Host alone).
AGENT_FIELDS = ("User-Agent: python-requests/2.32.3", "Accept-Encoding: gzip, deflate",
                "Accept: */*", "Connection: keep-alive")
REQUEST_FIELDS = AGENT_FIELDS


def run_wrk(target: Target, conns: int, duration_s: int, others: Others) -> dict:
    """One wrk run, with the CPU the target's process used in it and the CPU other
    programs used meanwhile."""
    cpu0, wrk0, t0 = target.process.cpu_s(), wrk_cpu_s(), time.monotonic()
    others.mark()
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conns}", f"-d{duration_s}s", "--latency",
         *(a for field in REQUEST_FIELDS for a in ("-H", field)),
         f"http://127.0.0.1:{target.port}/"],
        capture_output=True, text=True, timeout=duration_s + WRK_GRACE_S)
    cpu, wall = target.process.cpu_s() - cpu0, time.monotonic() - t0
    foreign = others.cores()
    target.process.check()
    if out.returncode != 0:
        raise SystemExit(f"wrk against {target.name} failed:\n{out.stdout}{out.stderr}")
    result = parse_wrk(out.stdout)
    if result["requests"] == 0:
        raise SystemExit(f"wrk against {target.name}: no request completed")
    result["cpu_s"] = cpu
    result["cpu_us_per_request"] = cpu * 1e6 / result["requests"]
    # Cores busy: below ~0.9 for the proxy at saturation, the proxy was not what
    # limited the run (on 2 cores, wrk and nginx take the rest of the machine).
    result["process_cores"] = cpu / wall
    result["wrk_cores"] = (wrk_cpu_s() - wrk0) / wall
    result["foreign_cpu_cores"] = foreign
    return result


# --- the figures -------------------------------------------------------------------

MEASURES = ("p50_us", "p99_us", "rps", "cpu_us_per_request", "process_cores", "wrk_cores")


def cell(runs: list[dict], target: str, conns: int) -> list[dict]:
    return sorted((r for r in runs if r["target"] == target and r["conns"] == conns),
                  key=lambda r: r["round"])


def summarize(runs: list[dict], targets: list[str]) -> dict:
    """Medians across rounds per target and connection count, and latency added over
    direct (median of the per-round differences)."""
    out: dict = {}
    for t in targets:
        out[t] = {}
        for c in CONNS:
            rows = cell(runs, t, c)
            m = {k: statistics.median(r[k] for r in rows) for k in MEASURES}
            m["errors"] = sum(r["socket_errors"] + r["non_2xx"] for r in rows)
            if t != "direct" and "direct" in targets:
                direct = {r["round"]: r for r in cell(runs, "direct", c)}
                for k in ("p50_us", "p99_us"):
                    m[f"added_{k}"] = statistics.median(
                        r[k] - direct[r["round"]][k] for r in rows)
            out[t][str(c)] = m
    return out


@dataclass(frozen=True)
class Comparison:
    layer: str
    measure: str
    unit: str
    sidecar: float
    peer: float | None  # None: an absolute budget, not a ratio
    goal: str
    met: bool | None

    @property
    def ratio(self) -> float | None:
        # A negative "added" latency is noise around zero: no meaningful ratio.
        if self.peer is None or self.peer <= 0 or self.sidecar < 0:
            return None
        return self.sidecar / self.peer


def compare(medians: dict) -> list[Comparison]:
    """Sidecar vs HAProxy per layer, with the goals where the issue sets one."""
    # (layer, sidecar, latency goal as a max ratio and the conns it applies to,
    #  throughput floor, CPU budget us)
    goals = {"sidecar-L4": ("L4", 1.0, CONNS, 0.90, 12.0),
             "sidecar-L7": ("L7", 1.2, (SATURATION_CONNS,), 0.80, 18.0)}
    out = []
    for sc, (layer, lat_max, lat_conns, tput_min, cpu_max) in goals.items():
        peer = PEERS[sc]
        if sc not in medians or peer not in medians:
            continue
        s, p = medians[sc], medians[peer]
        for c in CONNS:
            for k in ("p50_us", "p99_us"):
                added = f"added_{k}"
                if added not in s[str(c)]:
                    continue
                a, b = s[str(c)][added], p[str(c)][added]
                judged = c in lat_conns
                # Compared as differences, not ratios: at one connection the peer's
                # added latency can be near zero or even negative by noise.
                out.append(Comparison(
                    layer, f"added {k[:3]} @{c} conn", "us", a, b,
                    f"<= {lat_max:.1f}x" if judged else "",
                    (a <= lat_max * b) if judged else None))
        sat = str(SATURATION_CONNS)
        a, b = s[sat]["rps"], p[sat]["rps"]
        out.append(Comparison(layer, f"throughput @{sat} conn", "req/s", a, b,
                              f">= {tput_min:.0%}", a >= tput_min * b))
        a, b = s[sat]["cpu_us_per_request"], p[sat]["cpu_us_per_request"]
        out.append(Comparison(layer, "CPU per request", "us", a, b,
                              f"<= {cpu_max:g} us", a <= cpu_max))
    return out


# --- output ------------------------------------------------------------------------

def fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    if unit == "req/s":
        return f"{v:,.0f}"
    return f"{v:.1f}" if abs(v) < 100 else f"{v:.0f}"


def target_rows(medians: dict, targets: list[str]) -> tuple[list[str], list[list[str]]]:
    sat = str(SATURATION_CONNS)
    rows = []
    for c in CONNS:
        for k in ("p50_us", "p99_us"):
            rows.append([f"{k[:3]} latency @{c} conn (us)",
                         *(fmt(medians[t][str(c)][k]) for t in targets)])
    for c in CONNS:
        for k in ("p50_us", "p99_us"):
            rows.append([f"added {k[:3]} @{c} conn (us)",
                         *(fmt(medians[t][str(c)].get(f"added_{k}")) for t in targets)])
    rows.append([f"throughput @{sat} conn (req/s)",
                 *(fmt(medians[t][sat]["rps"], "req/s") for t in targets)])
    rows.append([f"CPU per request @{sat} conn (us; direct: nginx)",
                 *(fmt(medians[t][sat]["cpu_us_per_request"]) for t in targets)])
    rows.append([f"cores busy @{sat} conn: proxy / wrk",
                 *(f"{medians[t][sat]['process_cores']:.2f} / {medians[t][sat]['wrk_cores']:.2f}"
                   for t in targets)])
    rows.append(["wrk errors (all rounds)",
                 *(str(sum(medians[t][str(c)]["errors"] for c in CONNS)) for t in targets)])
    return ["measure", *targets], rows


def floor_lines(medians: dict) -> list[str]:
    """Where the L7 CPU per request goes: the stack's floor against HAProxy, and the
    sidecar's own work on top of the floor."""
    peer = PEERS[FLOORED]
    if not {FLOOR, FLOORED, peer} <= medians.keys():
        return []
    sat = str(SATURATION_CONNS)
    cpu = {t: medians[t][sat]["cpu_us_per_request"] for t in (FLOOR, FLOORED, peer)}
    rps = {t: medians[t][sat]["rps"] for t in (FLOOR, FLOORED, peer)}
    lines = [
        f"{FLOOR} (uvloop + httptools, no policy): {cpu[FLOOR]:.1f} us CPU per request, "
        f"{rps[FLOOR] / rps[peer]:.1%} of {peer}'s throughput; {peer}: {cpu[peer]:.1f} us.",
        f"{FLOORED} over {FLOOR}: {cpu[FLOORED] - cpu[FLOOR]:+.1f} us CPU per request for "
        f"its own work (timeouts, breaker, retry budget, metrics, pooling, Host and "
        f"hop-by-hop rewriting); {rps[FLOORED] / rps[FLOOR]:.1%} of {FLOOR}'s throughput.",
    ]
    # The latency a proxy on this stack adds with no policy at all, as a ratio to the
    # peer's: what the sidecar's own ratio should be read against.
    added = {t: medians[t][sat] for t in (FLOOR, FLOORED, peer)}
    ratios = []
    for k in ("p50_us", "p99_us"):
        key = f"added_{k}"
        if all(key in added[t] for t in added) and added[peer][key] > 0:
            ratios.append(f"{k[:3]} {added[FLOOR][key] / added[peer][key]:.2f}x "
                          f"(sidecar {added[FLOORED][key] / added[peer][key]:.2f}x)")
    if ratios:
        lines.append(f"{FLOOR}'s added latency @{sat} conn over {peer}'s: "
                     + ", ".join(ratios) + ".")
    return lines


def comparison_rows(comparisons: list[Comparison]) -> tuple[list[str], list[list[str]]]:
    rows = []
    for c in comparisons:
        met = "" if c.met is None else ("met" if c.met else "MISSED")
        if c.ratio is None:
            ratio = "-"
        else:  # throughput as the goal says it, in percent: 79.6 % is not 80 %
            ratio = f"{c.ratio:.1%}" if c.unit == "req/s" else f"{c.ratio:.2f}x"
        rows.append([c.layer, f"{c.measure} ({c.unit})", fmt(c.sidecar, c.unit),
                     fmt(c.peer, c.unit), ratio, c.goal, met])
    return ["layer", "measure", "sidecar", "HAProxy", "sidecar/HAProxy", "goal", "met"], rows


def text_table(head: list[str], rows: list[list[str]], left: int = 1) -> str:
    """Columns before `left` are words (left-aligned), the rest figures."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(  # noqa: E731
        v.ljust(w) if i < left else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
    return "\n".join([line(head), "  ".join("-" * w for w in widths),
                      *(line(r) for r in rows)])


def markdown_table(head: list[str], rows: list[list[str]], left: int = 1) -> str:
    out = ["| " + " | ".join(head) + " |",
           "|" + "|".join("---" if i < left else "---:" for i in range(len(head))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def plot(runs: list[dict], medians: dict, targets: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8),
                             gridspec_kw={"width_ratios": [1, 1, 0.8]})
    x = range(len(targets))
    colors = ["#777777", "#4c72b0", "#dd8452", "#55a868", "#c44e52"]
    for ax, c in zip(axes, CONNS):
        for j, k in enumerate(("p50_us", "p99_us")):
            med = [medians[t][str(c)][k] for t in targets]
            spread = [[m - min(r[k] for r in cell(runs, t, c)) for t, m in zip(targets, med)],
                      [max(r[k] for r in cell(runs, t, c)) - m for t, m in zip(targets, med)]]
            ax.bar([i + (j - 0.5) * 0.4 for i in x], med, 0.4, yerr=spread, capsize=3,
                   color=colors, alpha=1.0 if j == 0 else 0.55,
                   edgecolor="black", linewidth=0.5, label=k[:3])
            for i, v in zip(x, med):
                ax.annotate(f"{v:.0f}", (i + (j - 0.5) * 0.4, v), ha="center", va="bottom",
                            fontsize=7, xytext=(0, 2), textcoords="offset points",
                            bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none",
                                  "alpha": 0.8})
        ax.set_title(f"latency per request, {c} connection{'s' if c > 1 else ''}")
        # Log scale: p99 under load can be 100x p50, and both must stay readable.
        ax.set_yscale("log")
        ax.set_ylabel("us (solid p50, pale p99; whiskers: rounds' min-max)")
        ax.set_xticks(list(x), targets, rotation=20)
    sat = str(SATURATION_CONNS)
    ax = axes[2]
    med = [medians[t][sat]["rps"] for t in targets]
    ax.bar(list(x), med, 0.6, color=colors, edgecolor="black", linewidth=0.5)
    for i, v in zip(x, med):
        ax.annotate(f"{v / 1000:.1f}k", (i, v), ha="center", va="bottom", fontsize=7,
                    xytext=(0, 2), textcoords="offset points")
    ax.set_title(f"throughput, {sat} connections")
    ax.set_ylabel("requests/s")
    ax.set_xticks(list(x), targets, rotation=20)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (out.stdout + out.stderr).strip().splitlines()[0] if (out.stdout + out.stderr) else "?"


def machine() -> dict:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "sidecar"],
                           capture_output=True, text=True).stdout.strip()
    return {
        "when_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu": model, "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(), "python": sys.version.split()[0],
        "loadavg_at_start": os.getloadavg(),
        "git": commit + ("+dirty sidecar/" if dirty else ""),
        "nginx": version(["nginx", "-v"]), "haproxy": version(["haproxy", "-v"]),
        "wrk": version(["wrk", "-v"]),
        # The sidecar imports from this tree with this environment, as we do here.
        "sidecar_hot_path": "compiled" if version(
            [sys.executable, "-c", "import sidecar; print(sidecar.compiled())"]) == "True"
        else "interpreted",
    }


# --- the run -----------------------------------------------------------------------

def measure(targets: list[Target], others: Others, plan: dict,
            progress) -> tuple[list[dict], list[dict]]:
    """Every (target, connections) cell once per round, in an order rotated each round.

    A run during which other programs used more than QUIET_MAX_CORES is set aside: we
    wait for the machine to quiet down (from a budget of max_wait_s for the whole bench)
    and run that cell once more, keeping the repeat whatever it shows. Returns the kept
    runs and the set-aside ones."""
    rounds, duration_s = plan["rounds"], plan["duration_s"]
    for t in targets:  # warm-up: pools, caches, the kernel's buffers; not recorded
        run_wrk(t, SATURATION_CONNS, plan["warmup_s"], others)
    cells = [(t, c) for t in targets for c in CONNS]
    wait_left = plan["max_wait_s"]
    repeats_left = len(cells) * rounds // 2  # bounds the bench at 1.5x its plan
    runs, set_aside = [], []

    def show(rnd: int, t: Target, c: int, r: dict, tag: str = "") -> None:
        progress(f"round {rnd + 1}/{rounds} {t.name:<12} c={c:<2} "
                 f"p50 {r['p50_us']:7.0f} us  p99 {r['p99_us']:7.0f} us  "
                 f"{r['rps']:9,.0f} req/s  cpu/req {r['cpu_us_per_request']:5.1f} us "
                 f"({r['process_cores']:.2f} cores; wrk {r['wrk_cores']:.2f})  "
                 f"others {r['foreign_cpu_cores']:.2f} cores{tag}")

    for rnd in range(rounds):
        shift = rnd % len(cells)
        for t, c in cells[shift:] + cells[:shift]:
            r = {"round": rnd, "target": t.name, "conns": c,
                 **run_wrk(t, c, duration_s, others)}
            if r["foreign_cpu_cores"] > QUIET_MAX_CORES and repeats_left and wait_left > 0:
                show(rnd, t, c, r, "  (busy machine: set aside)")
                set_aside.append(r)
                repeats_left -= 1
                wait_left -= others.wait_quiet(wait_left)
                r = {"round": rnd, "target": t.name, "conns": c, "repeat": True,
                     **run_wrk(t, c, duration_s, others)}
            show(rnd, t, c, r)
            runs.append(r)
    return runs, set_aside


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"{QUICK['rounds']} rounds x {QUICK['duration_s']} s (under a minute)")
    ap.add_argument("--rounds", type=int, help=f"default {FULL['rounds']}")
    ap.add_argument("--duration", type=int, help=f"seconds per wrk run, default "
                                                 f"{FULL['duration_s']}")
    ap.add_argument("--targets", default=",".join(TARGETS),
                    help="comma-separated subset of " + ",".join(TARGETS))
    ap.add_argument("--out", type=Path, default=RESULTS,
                    help="folder for hot_path.json and hot_path.png")
    ap.add_argument("--bare-request", action="store_true",
                    help="wrk's own GET (Host alone) instead of python-requests' fields")
    ap.add_argument("--varied", action="store_true",
                    help="nginx answers every request with a different body (a request "
                         "id), so no answer repeats the one before it byte for byte")
    args = ap.parse_args()
    global REQUEST_FIELDS
    REQUEST_FIELDS = () if args.bare_request else AGENT_FIELDS
    plan = dict(QUICK if args.quick else FULL)
    plan["rounds"] = args.rounds or plan["rounds"]
    plan["duration_s"] = args.duration or plan["duration_s"]
    names = [t for t in TARGETS if t in args.targets.split(",")]
    if unknown := set(args.targets.split(",")) - set(TARGETS):
        ap.error(f"unknown targets: {', '.join(sorted(unknown))}")
    for tool in ("nginx", "haproxy", "wrk"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            raise SystemExit(f"{tool} not found: apt-get install nginx-light haproxy wrk")

    # Ctrl-C (even if our parent ignores it, as a shell's background job does) and
    # SIGTERM both take the way out through the finally below.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    children: list[Child] = []
    info = machine()
    t_start = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="hot_path.") as tmp:
            folder = Path(tmp)
            nginx_port = free_port()
            nginx = start_nginx(folder / "nginx", nginx_port, args.varied)
            children.append(nginx)
            wait_until("nginx", lambda: answers(nginx_port), children)
            ports = {"direct": nginx_port}
            owner = {"direct": nginx}
            if {"haproxy-tcp", "haproxy-http"} & set(names):
                ports["haproxy-tcp"], ports["haproxy-http"] = free_port(), free_port()
                hap = start_haproxy(folder / "haproxy", nginx_port, ports["haproxy-tcp"],
                                    ports["haproxy-http"])
                children.append(hap)
                owner["haproxy-tcp"] = owner["haproxy-http"] = hap
            if {"sidecar-L4", "sidecar-L7"} & set(names):
                ports["sidecar-L4"], ports["sidecar-L7"] = free_port(), free_port()
                metrics = free_port()
                sc = start_sidecar(folder / "sidecar", nginx_port, ports["sidecar-L4"],
                                   ports["sidecar-L7"], metrics)
                children.append(sc)
                owner["sidecar-L4"] = owner["sidecar-L7"] = sc
                wait_until("sidecar /ready", lambda: (get(metrics, "/ready") or (0,))[0] == 200,
                           children)
            if FLOOR in names:
                ports[FLOOR] = free_port()
                floor = Child(FLOOR, [sys.executable, str(ROOT / "bench" / "floor_http.py"),
                                      str(ports[FLOOR]), str(nginx_port)],
                              folder / "floor.log", cwd=ROOT)
                children.append(floor)
                owner[FLOOR] = floor
            targets = [Target(n, ports[n], owner[n]) for n in names]
            for t in targets:  # every path answers nginx's body before we time it
                wait_until(t.name, lambda t=t: answers(t.port), children)
            print(f"{len(names)} targets, {plan['rounds']} rounds x {plan['duration_s']} s "
                  f"x {len(CONNS)} connection counts, interleaved", file=sys.stderr)
            runs, set_aside = measure(targets, Others(children), plan,
                                      lambda line: print(line, file=sys.stderr, flush=True))
    finally:
        for child in reversed(children):
            child.stop()

    medians = summarize(runs, names)
    comparisons = compare(medians)
    head, rows = target_rows(medians, names)
    chead, crows = comparison_rows(comparisons)
    note = (f"median of {plan['rounds']} interleaved rounds x {plan['duration_s']} s; "
            f"sidecar hot path {info['sidecar_hot_path']}; wrk -t1, per-request latency, "
            f"{'a bare GET' if args.bare_request else 'GETs with python-requests fields'}"
            f"{', every answer different' if args.varied else ''}; "
            f"saturation = {SATURATION_CONNS} connections; "
            f"added = paired difference to direct in the same round")
    foreign = [r["foreign_cpu_cores"] for r in runs]
    busy = (f"other programs used {statistics.median(foreign):.2f} cores (median of runs; "
            f"max {max(foreign):.2f}) of the machine's {os.cpu_count()}; "
            f"{len(set_aside)} runs set aside and repeated for that")
    floor = floor_lines(medians)
    print(f"\n{note}\n{busy}\n\n{text_table(head, rows)}\n")
    if crows:
        print(text_table(chead, crows, left=2))
    if floor:
        print("\n" + "\n".join(floor))
    if statistics.median(foreign) > BUSY_WARN_CORES:
        print(f"\nWARNING: {busy}: the figures are skewed; rerun on a quiet machine.")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": info,
        "plan": {**plan, "request_fields": list(REQUEST_FIELDS), "varied": args.varied,
                 "connections": list(CONNS), "saturation_connections":
                 SATURATION_CONNS, "targets": names, "quick": args.quick,
                 "elapsed_s": round(time.monotonic() - t_start, 1)},
        "runs": runs,
        "set_aside": set_aside,
        "medians": medians,
        "foreign_cpu_cores": {"median": statistics.median(foreign), "max": max(foreign)},
        "comparisons": [{**c.__dict__, "ratio": c.ratio} for c in comparisons],
    }
    (args.out / "hot_path.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(runs, medians, names, args.out / "hot_path.png",
         f"agentvisor sidecar vs HAProxy (nbthread 1), both in front of nginx; "
         f"{info['cpus']} x {info['cpu']}, {info['when_utc']}, git {info['git']}\n{note}")
    print(f"\nJSON: {args.out / 'hot_path.json'}   plot: {args.out / 'hot_path.png'}   "
          f"({result['plan']['elapsed_s']} s)")
    print("\n<!-- bench/hot_path.py: paste into README.md -->")
    print(f"Hot path ({info['cpus']} x {info['cpu']}, {note}):\n")
    print(markdown_table(head, rows))
    if crows:
        print()
        print(markdown_table(chead, crows, left=2))
    if floor:
        print()
        print("\n".join(f"- {line}" for line in floor))
    print("<!-- end bench/hot_path.py -->")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
