"""The sidecar's data process: `python -m sidecar.data --state-dir DIR --host NAME
--ingest AGENT=HOST:PORT ...`.

It opens the host's spool (`DIR/metrics.db`, in the state directory: it must survive a
reboot, so never the runtime directory), serves one ingest listener per agent (an agent
is known by the listener it reached), forwards the spool to the hubs, nearest first, when
`--hub` names any, makes the spool durable against power loss every `--sync-interval`
seconds, and answers `GET /ready` and `GET /status` (JSON: spool, forwarder, ingest) on
`--status`, where the supervisor also hands it each round of its agents' process samples
(`POST /samples`, see `sidecar.samples`) to spool and forward like pushes. Reads that reach an ingest listener (GET, HEAD, ...: the hub's dashboard or
health) are relayed to the proxy's listener for the upstream, `--reads-to`, so they meet
its timeouts, breaker and fallback.

Listening sockets come from the supervisor when it runs us (`--fds AGENT=FD,...`, and
`--status-fd FD`): it owns them, so while this process restarts, agents' pushes wait in
the kernel's backlog instead of being refused. Run alone, we bind them ourselves.

On SIGTERM (or SIGINT) we stop accepting, commit and answer every push already received,
give requests half-way through `--drain-s` to finish, make the spool durable, and exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import errno
import logging
import math
import signal
import socket
import sqlite3
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sidecar.args import address, adopt, inherited, number
from sidecar.main import listen
from sidecar.data.ingest import (
    DEFAULT_COMMIT_WINDOW_S,
    DEFAULT_MAX_BODY_BYTES,
    Answer,
    Ingest,
    IngestSettings,
)
from sidecar.data.reads import DEFAULT_READS_TIMEOUT_S

if TYPE_CHECKING:  # imported where used: `--help` and bad arguments stay fast
    from aiohttp import web

    from sidecar.forwarder import Forwarder
    from sidecar.spool import Spool

log = logging.getLogger("agentvisor.data")

SPOOL_FILE = "metrics.db"
# The spool is bounded by bytes; this much disk is small beside a log directory, and holds
# days of the fleet's pushes (77 agents, 1 push/s of a few hundred bytes).
DEFAULT_MAX_BYTES = 512 << 20
# Power loss may take at most this much of what was answered; SIGKILL takes nothing.
DEFAULT_SYNC_INTERVAL_S = 1.0
# Requests half-way through are given this long to finish on SIGTERM.
DEFAULT_DRAIN_S = 5.0


class DataProcess:
    """The spool, the ingest listeners, the forwarder and the status listener."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.spool: Spool = None  # type: ignore[assignment]  # open_spool() sets it first
        self.ingest: Ingest | None = None
        self.forwarder: Forwarder | None = None
        self.ready = False
        self.exit_code = 0
        self.stopping = asyncio.Event()  # SIGTERM, SIGINT, or a spool that must be reopened
        self.recovered: str | None = None
        self._tasks: list[asyncio.Task] = []
        self._sync_timer: asyncio.TimerHandle | None = None
        self._status_runner: web.AppRunner | None = None
        self.samples = {"stored": 0, "refused": 0, "malformed": 0}  # POST /samples rounds

    def open_spool(self) -> None:
        from sidecar.spool import Spool, SpoolError

        args = self.args
        path = args.state_dir / SPOOL_FILE
        try:
            args.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.spool = Spool(path, host=args.host, max_bytes=args.max_bytes,
                               sync_interval_s=args.sync_interval)
        except SpoolError as exc:  # it says where and what to do
            raise SystemExit(str(exc))
        except (OSError, sqlite3.Error) as exc:
            raise SystemExit(f"{path}: cannot open the spool: {exc} (check that the state "
                             "directory exists, is writable by this user, and has room)")
        self.recovered = self.spool.recovered
        if self.recovered:
            # Damaged: said loudly. Otherwise it is a crash's unfinished append, which
            # was never answered: worth a line, not an alarm.
            log.log(logging.ERROR if self.spool.damaged else logging.INFO,
                    "%s: %s", "the spool was damaged; opening it did this"
                    if self.spool.damaged else "spool", self.recovered)
        log.info("%s: spool open: %d records pending", path, self.spool.stats().records)

    async def start(self, sockets: dict[str, socket.socket],
                    status_sock: socket.socket | None) -> None:
        args = self.args
        hubs = list(args.hub or [])
        if hubs:
            from sidecar.forwarder import Forwarder

            self.forwarder = Forwarder(self.spool, hubs)
        self.ingest = Ingest(self.spool, IngestSettings(
            max_body_bytes=args.max_body_bytes, commit_window_s=args.commit_window,
            reads_to=args.reads_to, reads_timeout_s=args.reads_timeout),
            on_appended=self.forwarder.wake if self.forwarder is not None else None)
        answer = Answer(args.answer_status, args.answer_body.encode(),
                        args.answer_content_type)
        for agent, sock in sockets.items():
            await self.ingest.serve(agent, sock, answer)
            host, port = sock.getsockname()[:2]
            log.info("%s: ingest listening on %s:%d", agent, host, port)
        if status_sock is not None:
            await self._serve_status(status_sock)
        if self.forwarder is not None:
            self._tasks.append(asyncio.create_task(self._forward(), name="forwarder"))
        if self.spool.verifying:
            self._tasks.append(asyncio.create_task(self._verify_spool(), name="spool check"))
        if args.sync_interval > 0:  # 0: every commit is fsynced by the spool itself
            self._sync_timer = asyncio.get_running_loop().call_later(args.sync_interval,
                                                                     self._sync)
        self.ready = True
        log.info("ready: %d ingest listeners; hubs: %s; reads: %s", len(sockets),
                 ", ".join(f"{h}:{p}" for h, p in hubs) if hubs else "none (spooling only)",
                 f"relayed to the proxy at {self.ingest.reads.name}"
                 if self.ingest.reads is not None else "answered 502 (no --reads-to)")

    async def _verify_spool(self) -> None:
        """Read back the rows an open after a clean close trusted, a slice per turn of
        the loop (Spool.verify_some), so that ingest answers meanwhile."""
        from sidecar.spool import SpoolCorrupt

        try:
            while not self.spool.verify_some():
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            raise
        except SpoolCorrupt as exc:  # as in _forward: the next open recovers it
            log.error("%s; stopping so that reopening the spool recovers it", exc)
            self.exit_code = 1
            self.stopping.set()
            return
        except Exception:
            log.exception("checking the spool failed; stopping so that a restart "
                          "checks it again")
            self.exit_code = 1
            self.stopping.set()
            return
        log.info("spool: every record from before the last clean stop reads back intact")

    async def _forward(self) -> None:
        from sidecar.spool import SpoolCorrupt

        assert self.forwarder is not None  # started only with one
        try:
            await self.forwarder.run()
        except asyncio.CancelledError:
            raise
        except SpoolCorrupt as exc:
            # Opening the spool is what moves a damaged file aside and keeps every intact
            # record: exit (after answering what ingest holds) so the supervisor restarts
            # us and the next open recovers it.
            log.error("%s; stopping so that reopening the spool recovers it", exc)
            self.exit_code = 1
            self.stopping.set()
        except Exception:
            # A bug. The spool keeps every push, but nothing would be delivered until a
            # restart: exit (after answering what ingest holds) so the supervisor
            # restarts us, and the crash shows as a restart rather than as silence.
            log.exception("forwarder failed; stopping so that a restart resumes delivery "
                          "(every push is still in the spool)")
            self.exit_code = 1
            self.stopping.set()

    def _sync(self) -> None:
        try:
            self.spool.sync()
        except Exception as exc:
            log.error("spool sync failed: %s (answered pushes since the last sync are "
                      "at risk on power loss)", exc)
        self._sync_timer = asyncio.get_running_loop().call_later(self.args.sync_interval,
                                                                 self._sync)

    def status(self) -> dict:
        spool = dataclasses.asdict(self.spool.stats())
        spool["path"] = str(self.args.state_dir / SPOOL_FILE)
        spool["recovered"] = self.recovered
        forwarder = self.forwarder.status() if self.forwarder is not None else None
        return {"host": self.args.host, "ready": self.ready, "spool": spool,
                "forwarder": forwarder, "samples": dict(self.samples),
                "ingest": self.ingest.status() if self.ingest else None}

    async def _serve_status(self, sock: socket.socket) -> None:
        from aiohttp import web

        from sidecar import samples

        async def ready(_request):
            if not self.ready:
                return web.Response(status=503, text="not ready\n")
            return web.Response(text="ready\n")

        async def status(_request):
            return web.json_response(self.status())

        async def take_samples(request):
            status, answer = self.take_samples(await request.read())
            headers = {"Retry-After": str(answer.pop("retry_after"))} \
                if "retry_after" in answer else None
            return web.json_response(answer, status=status, headers=headers)

        app = web.Application(client_max_size=samples.MAX_ROUND_BYTES)
        app.add_routes([web.get("/ready", ready), web.get("/status", status),
                        web.post("/samples", take_samples)])
        self._status_runner = web.AppRunner(app, access_log=None)
        await self._status_runner.setup()
        sock.setblocking(False)
        await web.SockSite(self._status_runner, sock).start()

    def take_samples(self, body: bytes) -> tuple[int, dict]:
        """A sampling round from the supervisor (`sidecar.samples`): checked, and spooled
        as one record of the supervisor's own, timed when it was sampled. (status,
        answer)."""
        from sidecar import samples
        from sidecar.spool import Push, SpoolError, SpoolFull

        parsed = samples.parse_round(body)
        if isinstance(parsed, str):
            self.samples["malformed"] += 1
            return 400, {"error": parsed}
        when, agents = parsed
        push = Push(samples.SENDER, "POST", samples.PATH, samples.CONTENT_TYPE,
                    samples.round_body(when, agents), when)
        try:
            self.spool.append([push])
        except SpoolFull as exc:  # agents' pushes first; samples wait for a later round
            self.samples["refused"] += 1
            return 503, {"error": exc.reason,
                         "retry_after": max(1, math.ceil(exc.retry_after_s))}
        except (SpoolError, sqlite3.Error, OSError) as exc:
            self.samples["refused"] += 1
            return 503, {"error": f"spool: {exc}", "retry_after": 1}
        self.samples["stored"] += 1
        if self.forwarder is not None:
            self.forwarder.wake()
        return 200, {"stored": len(agents), "forwarding": self.forwarding()}

    def forwarding(self) -> dict:
        """The spool and the forwarder in brief, for the supervisor's `status` and the
        host's /metrics (it comes back in the answer to each round of samples)."""
        stats = self.spool.stats()
        f = self.forwarder.status() if self.forwarder is not None else None
        return {"state": f["state"] if f else "spooling only (no hubs)",
                "hub": f["hub"] if f else None,
                "partitioned_since": f["partitioned_since"] if f else None,
                "pending_records": stats.records, "pending_bytes": stats.bytes,
                "max_bytes": stats.max_bytes,
                "oldest_pending_s": f["oldest_pending_s"] if f else None,
                "refusing": self.ingest.commit.refusing if self.ingest else None}

    async def stop(self) -> None:
        """SIGTERM: stop accepting, answer what is in flight, sync, close."""
        self.ready = False
        if self.ingest is not None:
            await self.ingest.drain(self.args.drain_s)
        for task in self._tasks:
            task.cancel()  # a batch in flight is not acked: sent again next time
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._sync_timer is not None:
            self._sync_timer.cancel()
        if self._status_runner is not None:
            await self._status_runner.cleanup()
        try:
            self.spool.sync()
        except Exception as exc:
            log.error("spool sync failed at exit: %s (answered pushes since the last sync "
                      "are at risk on power loss)", exc)
            self.exit_code = 1
        self.spool.close()


def sockets_from(args: argparse.Namespace) -> tuple[dict[str, socket.socket],
                                                     socket.socket | None]:
    fds = inherited(args.fds)
    out: dict[str, socket.socket] = {}
    for agent, fd in fds.items():
        out[agent] = adopt(fd, f"--fds {agent}={fd}")
    for agent, where in args.ingest:
        if agent not in out:  # an inherited socket wins: the supervisor owns it
            out[agent] = bind(where, f"--ingest {agent}={where[0]}:{where[1]}")
    status = None
    if args.status_fd is not None:
        status = adopt(args.status_fd, f"--status-fd {args.status_fd}")
    elif args.status is not None:
        status = bind(args.status, f"--status {args.status[0]}:{args.status[1]}")
    return out, status


def bind(where: tuple[str, int], what: str) -> socket.socket:
    try:
        return listen(where)
    except OSError as exc:
        hint = (" (another process listens there: another data process, or an agent's "
                "port?)" if exc.errno == errno.EADDRINUSE else "")
        raise OSError(f"{what}: {exc.strerror or exc}{hint}") from None


async def run(args: argparse.Namespace) -> int:
    process = DataProcess(args)
    process.open_spool()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, process.stopping.set)
    try:
        sockets, status_sock = sockets_from(args)
    except OSError as exc:
        process.spool.close()
        raise SystemExit(f"cannot listen: {exc}")
    await process.start(sockets, status_sock)
    await process.stopping.wait()
    log.info("draining")
    await process.stop()
    log.info("stopped; spool synced" if process.exit_code == 0 else "stopped")
    return process.exit_code


def _ingest_arg(text: str) -> tuple[str, tuple[str, int]]:
    agent, sep, where = text.partition("=")
    if not sep or not agent:
        raise argparse.ArgumentTypeError(f"{text!r}: expected AGENT=HOST:PORT")
    try:
        return agent, address(where)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{agent}: {exc}") from None


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m sidecar.data",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--state-dir", type=Path, required=True,
                    help=f"durable state (the spool, {SPOOL_FILE}); not a tmpfs")
    ap.add_argument("--host", required=True, help="this host's name, carried by every record")
    ap.add_argument("--ingest", type=_ingest_arg, action="append", default=[],
                    metavar="AGENT=HOST:PORT", help="an agent's ingest listener (repeat)")
    ap.add_argument("--fds", default=None, metavar="AGENT=FD,...",
                    help="inherited listening sockets, one per agent")
    ap.add_argument("--hub", type=address, action="append", default=[], metavar="HOST:PORT",
                    help="a hub receiver, nearest first (repeat); none: spool only")
    ap.add_argument("--reads-to", type=address, default=None, metavar="HOST:PORT",
                    help="the proxy's listener for the agents' metrics upstream: reads "
                    "(GET, HEAD, ...) reaching an ingest listener are relayed there; "
                    "none: they are answered 502")
    ap.add_argument("--reads-timeout", type=number(float, zero_ok=False),
                    default=DEFAULT_READS_TIMEOUT_S, metavar="S",
                    help="a relayed read unanswered this long is answered 504 (the proxy "
                    "answers the upstream's own timeout first)")
    ap.add_argument("--status", type=address, default=None, metavar="HOST:PORT",
                    help="where to answer GET /ready and GET /status")
    ap.add_argument("--status-fd", type=int, default=None, metavar="FD",
                    help="an inherited listening socket for /ready and /status")
    ap.add_argument("--max-bytes", type=number(int, zero_ok=False), default=DEFAULT_MAX_BYTES,
                    help="the spool's bound in bytes; when full, pushes get 503")
    ap.add_argument("--sync-interval", type=number(float, zero_ok=True),
                    default=DEFAULT_SYNC_INTERVAL_S, metavar="S",
                    help="seconds of answered pushes power loss may take (0: none, at "
                    "the cost of an fsync per commit)")
    ap.add_argument("--max-body-bytes", type=number(int, zero_ok=False), default=DEFAULT_MAX_BODY_BYTES,
                    help="a larger push is answered 413")
    ap.add_argument("--commit-window", type=number(float, zero_ok=True),
                    default=DEFAULT_COMMIT_WINDOW_S,
                    metavar="S", help="how long a push may wait for others to share its "
                    "commit (0: the same event-loop iteration)")
    default = Answer()
    ap.add_argument("--answer-status", type=int, default=default.status,
                    help="what an accepted push is answered (a 2xx)")
    ap.add_argument("--answer-body", default=default.body.decode())
    ap.add_argument("--answer-content-type", default=default.content_type)
    ap.add_argument("--drain-s", type=number(float, zero_ok=True), default=DEFAULT_DRAIN_S,
                    help="on SIGTERM, how long requests half-way through may take")
    ap.add_argument("--log-level", default="info")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    problem = Answer(args.answer_status, args.answer_body.encode(),
                     args.answer_content_type).problem()
    if problem:
        ap.error(problem)
    try:
        names = set(inherited(args.fds))
    except ValueError as exc:
        ap.error(str(exc))
    if args.reads_to is not None and args.reads_to[1] == 0:
        ap.error("--reads-to: port 0; give the proxy's listener for the metrics upstream")
    seen: set[str] = set()
    for agent, _ in args.ingest:
        if agent in seen:
            ap.error(f"--ingest {agent}: given twice; one listener per agent")
        seen.add(agent)
    if not seen | names and not args.hub:
        ap.error("nothing to do: give --ingest AGENT=HOST:PORT (or --fds AGENT=FD) and/or "
                 "--hub HOST:PORT")
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvloop

    return uvloop.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
