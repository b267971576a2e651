"""The sidecar process: `python -m sidecar.main --config FILE`.

It reads the `upstreams:` and `sidecar:` blocks of a host config (the same YAML the
supervisor reads; any other key is ignored, so it also runs on its own for a host that has
another supervisor), serves one listener per upstream (L4 or L7), the forward proxy, the
transparent listener, `/metrics` and `/ready`, and the breaker commands.

Listening sockets come from the supervisor when it runs us (`--fds name=fd,...`): it owns
them, so while we restart, agents' connections wait in the kernel's backlog instead of
being refused. Run alone, we bind them ourselves.

On SIGTERM we stop accepting and give open connections `drain_s` to finish: the
supervisor stops us after the agents, so their last calls still go through.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import signal
import socket
import sys
import time
from pathlib import Path

import yaml

from sidecar import compiled, control, yamlbounds
from sidecar.args import inherited
from sidecar.config import Protocol, SidecarSettings, parse_sidecar, parse_upstreams
from sidecar.exporter import AgentsCollector
from sidecar.routing import Router, self_loops
from sidecar.upstream import Upstream

log = logging.getLogger("agentvisor.sidecar")

# How often a draining sidecar looks at its open connections.
DRAIN_POLL_S = 0.05


def load(path: Path) -> tuple[SidecarSettings, dict[str, Upstream]]:
    """The sidecar's part of a host config; SystemExit with every problem if invalid."""
    try:
        data = yamlbounds.load(yamlbounds.read(path), str(path)) or {}
    except yamlbounds.Refused as exc:
        line = f":{exc.problem_mark.line + 1}" if exc.problem_mark else ""
        raise SystemExit(f"{path}{line}: {exc.problem}")
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SystemExit(f"{path}: {exc}")
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: not a mapping")
    policies, problems = parse_upstreams(data.get("upstreams"), resilience=data.get("resilience"))
    settings, more = parse_sidecar(data.get("sidecar"))
    problems += more + self_loops(policies, settings)
    if problems:
        raise SystemExit("\n".join(f"{path}: {p.location}: {p.message}" for p in problems))
    return settings, {name: Upstream(p) for name, p in policies.items()}


def listen(address: tuple[str, int]) -> socket.socket:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(1024)
    return sock


# Above this share of its descriptor limit the sidecar cannot be trusted to accept and
# connect: /ready says so, and the supervisor's probe restarts it (a connection storm,
# a loop through a name only DNS knows) instead of leaving it RUNNING and useless.
FD_CEILING = 0.9


def descriptors_full() -> str:
    """Why this process cannot serve for lack of descriptors; "" when it can."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        used = len(os.listdir("/proc/self/fd"))
    except OSError:
        return ""
    if soft != resource.RLIM_INFINITY and used >= soft * FD_CEILING:
        return f"descriptors: {used} of {soft} open"
    return ""


def parse_fds(text: str | None) -> dict[str, socket.socket]:
    """'upstream:Hub=5,proxy=6' -> sockets wrapping the inherited descriptors."""
    return {name: socket.socket(fileno=fd) for name, fd in inherited(text).items()}


class Sidecar:
    def __init__(self, settings: SidecarSettings, upstreams: dict[str, Upstream],
                 inherited: dict[str, socket.socket], control_path: Path | None):
        self.settings = settings
        self.router = Router(upstreams)
        self.inherited = inherited
        self.control_path = control_path
        self.servers: list[asyncio.AbstractServer] = []
        # The supervisor's agent rows, as agentvisor_agent_* on /metrics.
        self.agents = AgentsCollector()
        self.ready = False
        self._metrics_runner = None

    def _socket(self, name: str, address: tuple[str, int] | None) -> socket.socket | None:
        sock = self.inherited.pop(name, None)
        if sock is None and address is not None:
            sock = listen(address)
        if sock is not None:
            sock.setblocking(False)
            self.router.serving(sock.getsockname()[1])
        return sock

    async def start(self) -> None:
        from sidecar.proxy import http, tcp, transparent

        loop = asyncio.get_running_loop()
        for name, up in self.router.upstreams.items():
            sock = self._socket(f"upstream:{name}", up.policy.listen)
            factory = (http.serve_upstream(up) if up.policy.protocol is Protocol.HTTP
                       else tcp.serve_upstream(up))
            self.servers.append(await loop.create_server(factory, sock=sock, backlog=1024))
            log.info("%s: listening on %s:%d (%s)", name, *sock.getsockname()[:2],
                     up.policy.protocol.value)
        proxy = self._socket("proxy", self.settings.proxy_listen)
        self.servers.append(await loop.create_server(http.serve_forward(self.router.http),
                                                     sock=proxy, backlog=1024))
        # The transparent listener only exists when the supervisor set up redirects (or
        # an operator asked for one explicitly): nothing else could reach it.
        for name in ("transparent", "transparent6"):
            redirected = self._socket(name, None)
            if redirected is not None:
                self.servers.append(await loop.create_server(
                    transparent.serve_transparent(self.router.tcp), sock=redirected,
                    backlog=1024))
        await self._serve_metrics(self._socket("metrics", self.settings.metrics_listen))
        if self.control_path is not None:
            self.servers.append(await control.serve(self.control_path, self.router.all,
                                                    self.agents.update))
        self.ready = True

    async def _serve_metrics(self, sock: socket.socket) -> None:
        from aiohttp import web
        from prometheus_client import CollectorRegistry

        from sidecar.metrics import CONTENT_TYPE, SidecarCollector, render

        registry = CollectorRegistry(auto_describe=False)
        registry.register(SidecarCollector(self.router.all))
        registry.register(self.agents)

        async def metrics(_request):
            return web.Response(body=render(registry), headers={"Content-Type": CONTENT_TYPE})

        async def ready(_request):
            if not self.ready:
                return web.Response(status=503, text="starting\n")
            full = descriptors_full()
            if full:  # the supervisor's probe fails, and it restarts us
                return web.Response(status=503, text=full + "\n")
            return web.Response(status=200, text="ready\n")

        async def breakers(_request):
            return web.json_response(control.breaker_rows(self.router.all(), time.monotonic()))

        app = web.Application()
        app.add_routes([web.get("/metrics", metrics), web.get("/ready", ready),
                        web.get("/breakers", breakers)])
        self._metrics_runner = web.AppRunner(app, access_log=None)
        await self._metrics_runner.setup()
        await web.SockSite(self._metrics_runner, sock).start()

    async def drain(self) -> None:
        """Stop accepting; let open connections finish for at most drain_s."""
        self.ready = False
        for server in self.servers:
            server.close()
        deadline = time.monotonic() + self.settings.drain_s
        while time.monotonic() < deadline:
            active = sum(up.stats.active for up in self.router.all())
            if active == 0:
                break
            await asyncio.sleep(DRAIN_POLL_S)
        else:
            log.warning("drain: %d connections still open after %g s; closing them",
                        sum(up.stats.active for up in self.router.all()), self.settings.drain_s)
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()


async def run(args) -> int:
    settings, upstreams = load(args.config)
    sidecar = Sidecar(settings, upstreams, parse_fds(args.fds), args.control)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await sidecar.start()
    # Which hot path runs is the first thing to know when CPU per request looks wrong.
    log.info("ready: %d upstreams; hot path %s", len(upstreams),
             "compiled (mypyc)" if compiled() else "interpreted (run `make install` to "
             "compile it, unless AGENTVISOR_PURE_PYTHON=1 is meant)")
    await stop.wait()
    log.info("draining")
    await sidecar.drain()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sidecar.main", description=__doc__.split(
        "\n\n")[0])
    ap.add_argument("--config", type=Path, required=True,
                    help="a host config; its upstreams: and sidecar: blocks are used")
    ap.add_argument("--fds", default=None, help="inherited listening sockets, name=fd,...")
    ap.add_argument("--control", type=Path, default=None,
                    help="unix socket for breaker commands")
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvloop

    return uvloop.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
