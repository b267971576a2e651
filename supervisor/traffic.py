"""Everything the supervisor does so that agents' traffic goes through the sidecar.

It owns the sidecar's listening sockets (bound here, inherited by the sidecar, as circus
hands sockets to its children): a sidecar that crashes and restarts leaves agents waiting
in the kernel's backlog, never refused. It builds the sidecar's spec (started first,
stopped last: every agent depends on it), the address `${upstream:NAME}` expands to, the
proxy variables of `intercept: proxy` agents, and the nftables redirects of
`intercept: transparent` agents.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import shutil
import socket
import sys
from pathlib import Path

import yaml

from sidecar.args import show
from sidecar.config import Deliver, SidecarSettings, UpstreamPolicy
from sidecar.proxy import nftables
from supervisor import process
from supervisor.config.model import (
    AgentSpec, Backoff, HealthCheck, HostConfig, Intercept, ProbeKind, RestartPolicy,
)
from supervisor.paths import SYSTEM_RUNTIME_DIR

SIDECAR = "sidecar"  # its name in status; reserved
# The data process (metrics spool and forwarding), run when an upstream is store_forward.
DATA = "sidecar-data"
# The hub receiver, run when the host config has `hub:`.
HUB = "sidecar-hub"
# Opening a spool checks every row: a full one (512 MiB) takes several seconds.
DATA_START_TIMEOUT_S = 120.0
# The nftables table of the deployed hosts' supervisor (runtime dir /run/agentvisor).
NFT_TABLE = "agentvisor"
LISTEN_BACKLOG = 1024  # agents queue here while the sidecar restarts

# The sidecar restarts at once and keeps trying: without it no agent can reach anything.
SIDECAR_RESTART = RestartPolicy(start_s=1.0, backoff=Backoff(initial_s=0.1, max_s=5.0),
                                max_failures=10, window_s=60.0, fatal_retry_s=10.0)


def table_for(runtime_dir: Path) -> str:
    """The nftables table holding the transparent redirects of the supervisor of
    runtime_dir: each runtime directory has its own supervisor (runtime_lock.py), and so
    its own table, which it alone installs and removes. A test run, or a second host
    config, on a deployed PC can then never remove production's redirects, nor two
    supervisors each other's. The deployed hosts' directory keeps the plain name
    `agentvisor` they have always had; any other is `agentvisor_` and 10 hex digits of
    the sha256 of its absolute, symlink-free path (a name nft accepts unquoted, 21
    characters, well within its limit)."""
    real = os.path.realpath(runtime_dir)
    if real == os.path.realpath(SYSTEM_RUNTIME_DIR):
        return NFT_TABLE
    return f"{NFT_TABLE}_{hashlib.sha256(real.encode()).hexdigest()[:10]}"


def remove_stale_redirects(runtime_dir: Path) -> str | None:
    """Delete the nftables table that the supervisor of runtime_dir, dead without
    stopping, left behind, so an intercepted uid's traffic is not sent to a sidecar that
    is gone. Only under runtime_dir's lock: the table is that supervisor's alone, and no
    other table is ever looked at. Returns what was done, or None when there was nothing
    (or no nft, or no root, to look with); raises nftables.NftError when the table is
    there and cannot be removed."""
    if shutil.which("nft") is None or os.geteuid() != 0:
        return None
    table = table_for(runtime_dir)
    if not nftables.exists(table):
        return None
    nftables.remove(table)
    return f"removed nftables table inet {table} (transparent redirects)"


class ListenerError(Exception):
    """A sidecar listener cannot be bound (its port is taken, say); nothing changed."""


class Traffic:
    def __init__(self, runtime_dir: Path):
        self.runtime_dir = runtime_dir
        self.table = table_for(runtime_dir)  # its transparent redirects, and no other
        self.sockets: dict[str, socket.socket] = {}
        self._requested: dict[str, tuple[str, int]] = {}
        self._redirecting = False
        # Why transparent interception cannot be set up here, if it cannot: agents that
        # need it then refuse to start (with this reason) rather than bypass the sidecar.
        self.redirect_error: str | None = None

    # --- sockets ----------------------------------------------------------------------

    @staticmethod
    def _listen(name: str, address: tuple[str, int]) -> socket.socket:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
            sock.listen(LISTEN_BACKLOG)
        except OSError as exc:
            sock.close()
            raise ListenerError(f"sidecar listener {name}: cannot bind "
                                f"{address[0]}:{address[1]}: {exc.strerror}") from None
        sock.set_inheritable(True)
        return sock

    def _bind_all(self, wanted: dict[str, tuple[str, int]]) -> None:
        """Match the listeners to `wanted`, all or nothing. A listener whose address is
        unchanged is kept (a reload must not move what agents already point at); every
        new address is bound before any old socket is closed, so a failure (the port is
        taken) leaves every listener as it was and raises ListenerError."""
        fresh: dict[str, socket.socket] = {}
        try:
            for name, address in wanted.items():
                if name not in self.sockets or self._requested.get(name) != address:
                    fresh[name] = self._listen(name, address)
        except ListenerError:
            for sock in fresh.values():
                sock.close()
            raise
        for name in set(self.sockets) - set(wanted) - {"transparent6"}:
            self._close(name)
        for name, sock in fresh.items():
            self._close(name)
            self.sockets[name] = sock
            self._requested[name] = wanted[name]

    def _close(self, name: str) -> None:
        sock = self.sockets.pop(name, None)
        self._requested.pop(name, None)
        if sock is not None:
            sock.close()

    def close(self) -> None:
        self._remove_redirects()
        for name in list(self.sockets):
            self._close(name)

    def address(self, name: str) -> tuple[str, int]:
        return self.sockets[name].getsockname()[:2]

    # --- what the supervisor asks -----------------------------------------------------

    def prepare(self, config: HostConfig) -> tuple[AgentSpec, ...]:
        """The agents to run: the sidecar first (when enabled) and every agent made to
        depend on it. Binds, keeps or closes listeners to match the config; raises
        ListenerError, with every listener left as it was, when one cannot be bound."""
        if not config.sidecar_enabled:
            self.close()
            return config.agents
        wanted = {f"upstream:{n}": p.listen for n, p in config.upstreams.items()}
        wanted["proxy"] = config.sidecar.proxy_listen
        wanted["metrics"] = config.sidecar.metrics_listen
        if any(a.intercept is Intercept.TRANSPARENT for a in config.agents):
            wanted["transparent"] = config.sidecar.transparent_listen
        metrics = store_forward(config)
        if metrics is not None:
            # An ingest listener per agent: the data process knows a push's agent by the
            # listener it reached, and agents queue in its backlog while it restarts.
            wanted.update({f"ingest:{a.name}": ("127.0.0.1", 0) for a in config.agents})
            wanted["data-status"] = ("127.0.0.1", 0)
        if config.data.hub is not None:
            wanted["hub"] = config.data.hub.listen
        self._bind_all(wanted)
        self._install_redirects(config)
        children = [self._sidecar_spec(config)]
        if metrics is not None:
            children.append(self._data_spec(config, metrics))
        own = tuple(c.name for c in children)
        agents = tuple(dataclasses.replace(a, dependencies=(*a.dependencies, *own))
                       for a in config.agents)
        # Not a dependency of any agent: a receiver that is down must not hold the fleet
        # (forwarders elsewhere keep their pushes until it is back).
        hub = (self._hub_spec(config),) if config.data.hub is not None else ()
        return (*children, *hub, *agents)

    def upstream_address(self, config: HostConfig, name: str, agent: str | None = None) -> str:
        """What ${upstream:NAME} expands to: the sidecar's listener, or (sidecar off)
        the upstream's own nearest address; for a store_forward upstream, the agent's
        own ingest listener."""
        key = f"upstream:{name}"
        ingest = f"ingest:{agent}"
        if config.upstreams[name].deliver is Deliver.STORE_FORWARD and ingest in self.sockets:
            host, port = self.address(ingest)
        elif key in self.sockets:
            host, port = self.address(key)
        else:
            host, port = config.upstreams[name].endpoints[0]
        return show((host, port))

    def check_spawn(self, spec: AgentSpec) -> None:
        """SpawnError if the agent's traffic cannot be intercepted as configured."""
        if spec.intercept is Intercept.TRANSPARENT and self.redirect_error is not None:
            raise process.SpawnError(f"transparent interception unavailable: "
                                     f"{self.redirect_error}")

    def listeners(self, config: HostConfig) -> dict[str, dict]:
        """For status: where each upstream is reached locally, and how."""
        out = {}
        for name, policy in config.upstreams.items():
            forwarded = policy.deliver is Deliver.STORE_FORWARD and "data-status" in self.sockets
            out[name] = {"listen": "per agent (spooled)" if forwarded
                         else self.upstream_address(config, name),
                         "protocol": policy.protocol.value,
                         "endpoints": [f"{h}:{p}" for h, p in policy.endpoints]}
        return out

    def proxy_environment(self, spec: AgentSpec) -> dict[str, str]:
        """HTTP_PROXY and friends for an `intercept: proxy` agent (both spellings: curl
        and requests read lower case, some tools only upper case)."""
        if spec.intercept is not Intercept.PROXY or "proxy" not in self.sockets:
            return {}
        host, port = self.address("proxy")
        url = f"http://{host}:{port}"
        # The sidecar's own listeners are reached directly, never through itself.
        own = [f"{h}:{p}" for n, (h, p) in ((n, self.address(n)) for n in self.sockets)
               if n.startswith("upstream:")]
        no_proxy = ",".join([*own, *spec.no_proxy])
        env = {}
        for key, value in (("http_proxy", url), ("https_proxy", url), ("no_proxy", no_proxy)):
            env[key] = env[key.upper()] = value
        return env

    async def ask_sidecar(self, payload: dict, timeout_s: float = 10.0) -> dict:
        """One request to the sidecar's control socket (breaker commands)."""
        path = self.runtime_dir / "sidecar.sock"
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(path)), timeout_s)
        except (OSError, asyncio.TimeoutError):
            raise LookupError("the sidecar is not running (no answer on "
                              f"{path})") from None
        try:
            writer.write(json.dumps(payload).encode() + b"\n")
            return json.loads(await asyncio.wait_for(reader.readline(), timeout_s))
        finally:
            writer.close()

    async def push_samples(self, body: bytes, timeout_s: float = 2.0) -> tuple[int, dict]:
        """One sampling round (`sidecar.samples.round_body`) to the data process, which
        spools it for the hubs: (HTTP status, its JSON answer, which carries the spool's
        and forwarder's state). LookupError without a data process."""
        if "data-status" not in self.sockets:
            raise LookupError("no data process (no store_forward upstream)")
        host, port = self.address("data-status")
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                                timeout_s)
        try:
            writer.write(b"POST /samples HTTP/1.1\r\nHost: agentvisor\r\n"
                         b"Content-Type: application/json\r\nConnection: close\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            # Connection: close: the answer is everything up to EOF (a few hundred bytes).
            answer = await asyncio.wait_for(reader.read(1 << 20), timeout_s)
        finally:
            writer.close()
        head, _, payload = answer.partition(b"\r\n\r\n")
        try:
            status = int(head.split(None, 2)[1])
        except (IndexError, ValueError):
            raise ValueError(f"not an HTTP answer: {head[:80]!r}") from None
        try:
            parsed = json.loads(payload)
        except ValueError:
            parsed = {}
        return status, parsed if isinstance(parsed, dict) else {}

    # --- transparent redirects ----------------------------------------------------------

    def _install_redirects(self, config: HostConfig) -> None:
        agents = [a for a in config.agents if a.intercept is Intercept.TRANSPARENT]
        if not agents:
            self._close("transparent6")
            self._remove_redirects()
            return
        host, port = self.address("transparent")
        # nftables sends IPv6 to [::1]:port: listen there too when the host has IPv6.
        if self._requested.get("transparent6") != ("::1", port):  # new, or moved
            self._close("transparent6")
            try:
                self.sockets["transparent6"] = self._listen("transparent6", ("::1", port))
                self._requested["transparent6"] = ("::1", port)
            except ListenerError:
                pass  # no IPv6 here: IPv4 alone is redirected
        # The sidecar's own listeners stay reachable directly (${upstream:...} values).
        exempt = tuple(sorted(self.address(n)[1] for n in self.sockets
                              if n.startswith("upstream:")))
        self.redirect_error = nftables.available()
        if self.redirect_error is not None:
            return
        try:
            redirects = [nftables.Redirect(process.identity(a.user).uid, port, exempt)
                         for a in agents]
            nftables.install(self.table, redirects)
            self._redirecting = True
        except (nftables.NftError, process.SpawnError, ValueError) as exc:
            self.redirect_error = str(exc)

    def _remove_redirects(self) -> None:
        if self._redirecting:
            try:
                nftables.remove(self.table)
            except nftables.NftError:
                pass
            self._redirecting = False

    # --- the sidecar's own spec ---------------------------------------------------------

    def _sidecar_spec(self, config: HostConfig) -> AgentSpec:
        snapshot = self._write_snapshot(config)
        # The proxy's listeners only: the data process's are handed to it alone.
        own = {n: s for n, s in self.sockets.items()
               if not n.startswith("ingest:") and n not in ("data-status", "hub")}
        fds = ",".join(f"{n}={s.fileno()}" for n, s in sorted(own.items()))
        host, port = self.address("metrics")
        settings: SidecarSettings = config.sidecar
        return AgentSpec(
            name=SIDECAR, group="agentvisor", location="sidecar",
            argv=(sys.executable, "-m", "sidecar.main", "--config", str(snapshot),
                  "--fds", fds, "--control", str(self.runtime_dir / "sidecar.sock")),
            cwd=self.runtime_dir, script_path=None, required=True,
            health=HealthCheck(ProbeKind.HTTP, host=host, port=port, path="/ready",
                               interval_s=5.0, timeout_s=2.0, retries=3, start_timeout_s=30.0,
                               startup_interval_s=0.02),
            restart=dataclasses.replace(SIDECAR_RESTART, stop_grace_s=settings.drain_s + 5.0),
            log_path=config.logs_dir / "sidecar.log",
            pass_fds=tuple(s.fileno() for s in own.values()),
        )

    def _data_spec(self, config: HostConfig, metrics: UpstreamPolicy) -> AgentSpec:
        """The data process: each agent's pushes to `metrics` arrive at its own ingest
        listener, are kept in the spool under state_dir and forwarded to the hubs; its
        reads go on to the proxy's listener for the upstream. Its settings are all in
        its argv, so a changed hub list restarts it alone, never the proxy."""
        ingest = sorted(n for n in self.sockets if n.startswith("ingest:"))
        status = self.sockets["data-status"]
        host, port = self.address("data-status")
        argv = [sys.executable, "-m", "sidecar.data", "--state-dir", str(config.state_dir),
                "--host", config.host,
                "--fds", ",".join(f"{n.split(':', 1)[1]}={self.sockets[n].fileno()}"
                                  for n in ingest),
                "--status-fd", str(status.fileno()),
                "--max-bytes", str(config.data.spool_max_mb << 20),
                "--sync-interval", f"{config.data.sync_interval_s:g}",
                "--reads-to", self.upstream_address(config, metrics.name)]
        for hub_host, hub_port in config.data.hubs:
            argv += ["--hub", show((hub_host, hub_port))]
        return AgentSpec(
            name=DATA, group="agentvisor", location="sidecar-data", argv=tuple(argv),
            cwd=self.runtime_dir, script_path=None, required=True,
            health=HealthCheck(ProbeKind.HTTP, host=host, port=port, path="/ready",
                               interval_s=5.0, timeout_s=2.0, retries=3,
                               start_timeout_s=DATA_START_TIMEOUT_S, startup_interval_s=0.05),
            restart=SIDECAR_RESTART,
            log_path=config.logs_dir / f"{DATA}.log",
            pass_fds=(status.fileno(), *(self.sockets[n].fileno() for n in ingest)),
        )

    def _hub_spec(self, config: HostConfig) -> AgentSpec:
        """The hub receiver: batches from every host's forwarder on `hub.listen`, kept in
        state_dir with the duplicate marks, delivered in order to the legacy hub."""
        hub = config.data.hub
        assert hub is not None
        sock = self.sockets["hub"]
        host, port = self.address("hub")
        probe_host = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
        argv = (sys.executable, "-m", "sidecar.hub", "--fds", f"listen={sock.fileno()}",
                "--state-dir", str(config.state_dir),
                "--deliver-to", show(hub.deliver_to),
                "--name", config.host,
                "--sync-interval", f"{config.data.sync_interval_s:g}",
                *(arg for peer in hub.peers or () for arg in ("--peer", show(peer))))
        return AgentSpec(
            name=HUB, group="agentvisor", location="hub", argv=argv, cwd=self.runtime_dir,
            script_path=None, required=True,
            health=HealthCheck(ProbeKind.HTTP, host=probe_host, port=port, path="/ready",
                               interval_s=5.0, timeout_s=2.0, retries=3,
                               start_timeout_s=DATA_START_TIMEOUT_S, startup_interval_s=0.05),
            restart=SIDECAR_RESTART,
            log_path=config.logs_dir / f"{HUB}.log",
            pass_fds=(sock.fileno(),),
        )

    def _write_snapshot(self, config: HostConfig) -> Path:
        """The sidecar reads exactly what was validated, not the file as it is now. The
        name carries a hash of the content: a changed policy is a changed spec, so a
        reload restarts the sidecar."""
        text = yaml.safe_dump(dict(config.traffic_source), sort_keys=True)
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        path = self.runtime_dir / f"sidecar-{digest}.yaml"
        if not path.exists():
            path.write_text(text)
        return path


def store_forward(config: HostConfig) -> UpstreamPolicy | None:
    """The host's metrics upstream (`deliver: store_forward`; at most one), if any."""
    return next((u for u in config.upstreams.values() if u.deliver is Deliver.STORE_FORWARD),
                None)
