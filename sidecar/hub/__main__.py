"""`python -m sidecar.hub`: the hub receiver on its own, until SIGTERM.

    python -m sidecar.hub --listen 0.0.0.0:9010 --state-dir /var/lib/agentvisor \
        --deliver-to 127.0.0.1:9000 --name central --peer pc2:9010

Receives forwarded batches on --listen (or on a listening socket inherited from the
supervisor: `--fds listen=FD`), keeps them in `STATE_DIR/hub-delivery.db` with the
high-water marks, and delivers each push to the legacy hub at --deliver-to. With --peer,
it reports what it knows to the other hub every second and shows what that hub reports
(sidecar/hub/peers.py). Exit 0 after
SIGTERM/SIGINT, 2 for bad arguments, 1 when the delivery spool cannot be opened or
delivery fails on it (a restart reopens it, and recovers it if it was damaged).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from sidecar.args import address, adopt, number
from sidecar.args import inherited as args_inherited

log = logging.getLogger("agentvisor.hub")


def parser() -> argparse.ArgumentParser:
    from sidecar.hub.delivery import DEFAULT_TIMEOUT_S
    from sidecar.hub.peers import SHARE_INTERVAL_S
    from sidecar.hub.receiver import DEFAULT_MAX_BYTES, SILENT_AFTER_S

    ap = argparse.ArgumentParser(prog="python -m sidecar.hub",
                                 description=__doc__.split("\n\n")[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--listen", type=address, metavar="HOST:PORT",
                       help="where forwarders send their batches")
    where.add_argument("--fds", metavar="listen=FD",
                       help="an inherited listening socket instead of --listen")
    ap.add_argument("--state-dir", type=Path, required=True,
                    help="durable state (the delivery spool and high-water marks)")
    ap.add_argument("--deliver-to", type=address, required=True, metavar="HOST:PORT",
                    help="the local legacy hub agent")
    ap.add_argument("--name", default="", help="this hub's name in /health (e.g. central)")
    ap.add_argument("--max-bytes", type=number(int, zero_ok=False), default=DEFAULT_MAX_BYTES,
                    help="bound of the delivery spool (default %(default)s)")
    ap.add_argument("--sync-interval", type=number(float, zero_ok=True), default=1.0, metavar="S",
                    help="fsync at most this often; 0: before answering each batch")
    ap.add_argument("--deliver-timeout", type=number(float, zero_ok=False), default=DEFAULT_TIMEOUT_S,
                    metavar="S", help="per push to the legacy hub (default %(default)s)")
    ap.add_argument("--silent-after", type=number(float, zero_ok=False), default=SILENT_AFTER_S,
                    metavar="S", help="a host not heard from this long is partitioned")
    ap.add_argument("--peer", type=address, action="append", default=[], metavar="HOST:PORT",
                    help="another hub's receiver to share hosts, marks and samples with "
                         "(repeat for each); either hub then answers for the fleet")
    ap.add_argument("--share-interval", type=number(float, zero_ok=False),
                    default=SHARE_INTERVAL_S, metavar="S",
                    help="how often this hub reports to its peers (default %(default)s)")
    ap.add_argument("--log-level", default="info",
                    choices=["debug", "info", "warning", "error"])
    return ap


def inherited(ap: argparse.ArgumentParser, text: str) -> socket.socket:
    try:
        fds = args_inherited(text)
    except ValueError:
        fds = {}
    if list(fds) != ["listen"]:
        ap.error(f"--fds {text!r}: expected listen=FD")
    try:
        return adopt(fds["listen"], f"--fds {text!r}: descriptor {fds['listen']}")
    except OSError as exc:
        ap.error(str(exc))
    raise AssertionError  # ap.error exits


def bind(ap: argparse.ArgumentParser, where: tuple[str, int]) -> socket.socket:
    from sidecar.main import listen

    try:
        return listen(where)
    except OSError as exc:
        ap.error(f"--listen {where[0]}:{where[1]}: {exc.strerror or exc}")
    raise AssertionError  # ap.error exits


async def run(args, sock: socket.socket) -> int:
    from sidecar.hub.receiver import Hub
    from sidecar.spool import SpoolError

    try:
        hub = Hub(args.state_dir, args.deliver_to, name=args.name, max_bytes=args.max_bytes,
                  sync_interval_s=args.sync_interval, deliver_timeout_s=args.deliver_timeout,
                  silent_after_s=args.silent_after, peers=args.peer,
                  share_interval_s=args.share_interval)
    except (SpoolError, OSError, ValueError) as exc:  # it says what and where; no traceback
        log.error("cannot open the delivery spool: %s", exc)
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await hub.start(sock)
    stopping = asyncio.create_task(stop.wait())
    failing = asyncio.create_task(hub.wait())
    await asyncio.wait([stopping, failing], return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if failing.done():
        stopping.cancel()
        log.error("%s; exiting so that the hub is restarted", failing.result())
        code = 1
    else:
        failing.cancel()
        log.info("stopping")
    await hub.stop()
    return code


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        ap.error(f"--state-dir {args.state_dir}: {exc.strerror or exc}")
    if not os.access(args.state_dir, os.W_OK | os.X_OK):
        ap.error(f"--state-dir {args.state_dir}: not writable by this user")
    sock = inherited(ap, args.fds) if args.fds else bind(ap, args.listen)
    import uvloop

    return uvloop.run(run(args, sock))


if __name__ == "__main__":
    sys.exit(main())
