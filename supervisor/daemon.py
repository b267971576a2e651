"""The per-host supervisor: owns every agent of one host, in order.

It starts agents as their dependencies become ready, stops them in reverse dependency
order, applies a changed config by difference (reload) and can go back (rollback), watches
resource use, and tells systemd how things stand. Each agent's own lifecycle is in
`agent.py`; the operator's commands arrive through `control/`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import time
from pathlib import Path

from sidecar import samples
from sidecar.control import bounded
from sidecar.exporter import MAX_ROWS_BYTES as EXPORT_ROWS_BYTES
from sidecar.proxy import nftables
from supervisor import config as cfgmod
from supervisor import environment, process, secrets
from supervisor.agent import Agent
from supervisor.config.model import AgentSpec, HostConfig
from supervisor.control.server import ControlServer
from supervisor.policy import order
from supervisor.paths import GROUPS_FILE, SECRETS_DIR, SOCKET_FILE
from supervisor.policy.lifecycle import AT_REST, LIVE, State
from supervisor import resources
from supervisor.resources import ResourceSampler, check_limits
from supervisor.runtime_lock import RuntimeLock
from supervisor.systemd import Notifier
from supervisor.traffic import DATA, SIDECAR, ListenerError, Traffic, remove_stale_redirects

# `agentvisor run`'s exit status when a listener cannot be bound: the same as for a bad
# config, a failure systemd's Restart=on-failure retries.
EXIT_NOT_STARTED = 1

log = logging.getLogger("agentvisor")


def clean_leftovers(lock: RuntimeLock) -> tuple[list[str], list[str]]:
    """Undo what the supervisor of lock's runtime directory left behind when it died
    without stopping (SIGKILL, OOM): its agents' process groups, recorded there, their
    secret files, and its nftables redirects (its own table: traffic.table_for). Returns
    a line per thing done and a line per thing that could not be undone. Run at every
    start and by `agentvisor cleanup` (systemd's ExecStopPost=), both holding the
    runtime directory's lock: whoever holds it is the only supervisor there, so
    everything recorded there is a dead one's."""
    runtime_dir = lock.runtime_dir
    assert lock.held, "clean_leftovers without the runtime directory's lock"
    done = [f"killed {line}" for line in process.kill_leftovers(runtime_dir / GROUPS_FILE)]
    problems = []
    folders = secrets.agent_folders(runtime_dir)
    for folder in folders:
        folder.remove()
    if folders:
        done.append(f"removed the secret files of {len(folders)} agent"
                    f"{'s' if len(folders) > 1 else ''} ({runtime_dir / SECRETS_DIR})")
    try:
        redirects = remove_stale_redirects(runtime_dir)
    except nftables.NftError as exc:
        problems.append(f"could not remove the nftables redirects: {exc}")
    else:
        if redirects is not None:
            done.append(redirects)
    return done, problems


class Supervisor:
    def __init__(self, config: HostConfig, *, lock: RuntimeLock,
                 overrides: dict | None = None, notifier: Notifier | None = None):
        self.config = config
        # Held for the supervisor's whole life (its caller releases it): the proof that
        # everything in runtime_dir, and its nftables table, is this supervisor's.
        if not lock.held or lock.runtime_dir != config.runtime_dir:
            raise ValueError(f"the supervisor of {config.runtime_dir} needs that "
                             f"directory's lock (given: {lock.runtime_dir})")
        self.runtime_lock = lock
        self.previous: HostConfig | None = None  # what `rollback` returns to
        self._overrides = overrides or {}  # CLI --runtime-dir/--logs-dir, kept across reloads
        self.notifier = notifier or Notifier()
        self.agents: dict[str, Agent] = {}
        self._base_env = environment.base_environment()
        self._changed = asyncio.Event()  # pulses on any agent's transition
        self._stopping = False
        self._ready_sent = False
        self._settle_expired = False  # see _settle_deadline
        self._started_at = time.monotonic()
        self._sampler = ResourceSampler()
        self._usage: dict = {}  # pid -> last resources.Usage
        self._sampled: set[int] = set()
        # A delegated cgroup v2 (systemd Delegate=yes) lets the kernel hold memory_mb;
        # without one, the sampling loop enforces it alone.
        self._cgroup_root = resources.cgroup_v2_dir()
        self._warned: set[tuple[str, str]] = set()
        self._export_cut_said = False
        self._samples_refused_said = False
        # The spool and forwarder as the data process last said (each sampling round).
        self._forwarding: dict | None = None
        self._lock = asyncio.Lock()  # one reload/rollback/shutdown at a time
        self._control = ControlServer(self.socket_path, self,
                                      allowed_gid=_group_id(config.control_group))
        self.traffic = Traffic(config.runtime_dir)
        self._tasks: list[asyncio.Task] = []
        self._groups_dirty = False

    @property
    def socket_path(self) -> Path:
        return self.config.runtime_dir / SOCKET_FILE

    # --- running ----------------------------------------------------------------------

    async def run(self) -> int:
        """Start everything, serve until SIGTERM/SIGINT, stop everything; exit status."""
        cfg = self.config
        cfg.logs_dir.mkdir(parents=True, exist_ok=True)
        # Under the runtime directory's lock, so whatever is recorded there is a dead
        # supervisor's; the same goes for the stale control socket that
        # ControlServer.start() removes below.
        done, problems = clean_leftovers(self.runtime_lock)
        for line in done:
            log.warning("left by a previous supervisor: %s", line)
        for line in problems:
            log.error("left by a previous supervisor: %s", line)
        try:
            unsealed = secrets.unseal_into_store(cfg.secrets)
            if unsealed:
                log.info("unsealed %d secrets into %s", len(unsealed), cfg.secrets.dir)
        except secrets.SecretError as exc:
            # Agents that need them go FATAL with their own reason; the rest run.
            log.error("sealed secrets not unsealed: %s", exc)
        await self._control.start()
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, done.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self._reload_quietly()))
        self._tasks = [
            asyncio.create_task(self._resource_loop(), name="resources"),
            asyncio.create_task(self._groups_loop(), name="groups"),
            asyncio.create_task(self._secrets_loop(), name="secrets"),
        ]
        if self.notifier.watchdog_interval_s:
            self._tasks.append(asyncio.create_task(self._watchdog_loop(), name="watchdog"))
        log.info("%s: supervising %d agents (control socket %s)", cfg.host, len(cfg.agents),
                 self.socket_path)
        try:
            specs = self.traffic.prepare(cfg)
        except ListenerError as exc:
            # Said once, plainly: systemd retries (Restart=on-failure) in case the port
            # was only briefly taken, and the journal shows this line each time.
            log.error("%s; not starting", exc)
            await self.shutdown()
            return EXIT_NOT_STARTED
        self._add_agents(specs)
        self._refresh_status()  # a host with no required agents is ready at once
        loop.call_later(self._settle_deadline_s(), self._settle_deadline)
        await done.wait()
        log.info("shutting down: stopping agents in reverse dependency order")
        await self.shutdown()
        return 0

    async def shutdown(self) -> None:
        async with self._lock:
            self._stopping = True
            self.notifier.stopping()
            await self._stop_agents(list(self.agents))
            for t in self._tasks:
                t.cancel()
            await self._control.close()
            self.traffic.close()
            try:
                (self.config.runtime_dir / GROUPS_FILE).unlink()
            except OSError:
                pass

    def _add_agents(self, specs) -> None:
        for spec in specs:
            agent = Agent(spec, build_env=self._env_for, gate=self._gate,
                          on_change=self._agent_changed, on_spawn=self._place_in_cgroup)
            self.agents[spec.name] = agent
        for spec in specs:
            self.agents[spec.name].start()

    def _place_in_cgroup(self, agent: Agent, pid: int) -> None:
        memory_mb = agent.spec.limits.memory_mb
        if self._cgroup_root is None or memory_mb is None:
            return
        try:
            resources.add_process(
                resources.set_memory_max(self._cgroup_root, agent.name, memory_mb), pid)
        except (OSError, ValueError) as exc:
            log.warning("cannot set cgroup memory.max for %s (%s): memory limits are "
                        "enforced by sampling only", agent.name, exc)
            self._cgroup_root = None

    def _env_for(self, spec: AgentSpec):
        return environment.agent_environment(self.config, spec, self._base_env, self.traffic)

    async def _gate(self, agent: Agent) -> None:
        """Hold an agent until every dependency is RUNNING (ready). It starts by itself
        when they are, even after an operator's `start` of a dependency that had failed.
        During shutdown it holds the agent until its own stop comes: never a start then."""
        while agent.wants_running:
            if not self._stopping and not self._explain_wait(agent):
                return
            changed = self._changed
            await changed.wait()

    def _explain_wait(self, agent: Agent) -> list[str]:
        """The dependencies `agent` waits for, and its reason saying so: "waiting for A"
        while A may still come up by itself, "blocked: dependency A is FATAL (why)" when
        A (or what A waits for) needs an operator first."""
        waiting = self._waiting_for(agent)
        if waiting:
            blocked = self._blocked(agent)
            agent.reason = blocked or "waiting for " + ", ".join(waiting)
        return waiting

    def _waiting_for(self, agent: Agent) -> list[str]:
        return [d for d in agent.spec.dependencies
                if d in self.agents and not self.agents[d].ready.is_set()]

    def _blocked(self, agent: Agent) -> str | None:
        """Why `agent`, held at its gate, cannot start until an operator acts; None when
        each dependency it waits for may still become ready by itself."""
        found = self._stuck_dependency(agent, frozenset())
        if found is None:
            return None
        name, stuck = found
        why = f" ({stuck.reason})" if stuck.reason and stuck.state is not State.STOPPED else ""
        if stuck.name == name:
            return f"blocked: dependency {name} is {stuck.state.value}{why}"
        return (f"blocked: dependency {name} waits for {stuck.name}, which is "
                f"{stuck.state.value}{why}")

    def _stuck_dependency(self, agent: Agent, seen: frozenset[str]) -> tuple[str, Agent] | None:
        """(the dependency `agent` waits for, the agent at the end of that chain that
        needs an operator: FATAL, EXITED, or stopped), or None."""
        for name in self._waiting_for(agent):
            dep = self.agents[name]
            if dep.state is State.FATAL or (dep.state in AT_REST and not dep.wants_running):
                return name, dep
            if dep.state is State.STOPPED and name not in seen:  # held at its own gate
                inner = self._stuck_dependency(dep, seen | {agent.name})
                if inner is not None:
                    return name, inner[1]
        return None

    def _settled(self, agent: Agent) -> bool:
        """Nothing more will happen to `agent` without an operator (or it is RUNNING):
        what a `start` waits for. Wanted running, FATAL is not settled: an operator's
        start has not reached it yet, or it will try again (fatal_retry_s)."""
        if agent.state is State.RUNNING:
            return True
        if agent.state in AT_REST and not agent.wants_running:
            return True
        return agent.state is State.STOPPED and self._blocked(agent) is not None

    async def wait_settled(self, agents: list[Agent], timeout_s: float) -> None:
        """Until every one of `agents` is settled, or timeout_s has passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not all(self._settled(a) for a in agents):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except asyncio.TimeoutError:
                break
        for a in agents:  # their reasons as of now, not as of their gate's last look
            if a.state is State.STOPPED and a.wants_running:
                self._explain_wait(a)

    async def _stop_agents(self, names: list[str], *, by_operator: bool = False) -> None:
        """Stop the named agents, dependants before what they depend on."""
        deps = {n: self.agents[n].spec.dependencies for n in names}
        for layer in order.stop_order(deps):
            await asyncio.gather(*(self.agents[n].stop(by_operator=by_operator)
                                   for n in layer))

    # --- groups (the old launcher's --group) --------------------------------------------

    def groups(self) -> list[str]:
        """The config's agent groups (MainPC's agent_groups keys), in file order."""
        return list(dict.fromkeys(a.group for a in self.config.agents if a.group))

    def group(self, name: str) -> list[Agent]:
        """The agents of group `name`; LookupError naming the groups there are."""
        members = [self.agents[a.name] for a in self.config.agents
                   if a.group == name and a.name in self.agents]
        if members:
            return members
        groups = self.groups()
        if not groups:
            raise LookupError(f"no group named {name!r}: {self.config.host}'s agents are a "
                              "flat list without groups; name the agents one at a time")
        raise LookupError(f"no group named {name!r} on {self.config.host}; its groups: "
                          + ", ".join(groups))

    def start_timeout_s(self, agents: list[Agent]) -> float:
        """How long a start of `agents` may take: their longest start timeout once per
        layer of their dependency chain (each layer starts only once the one before is
        ready)."""
        names = {a.name for a in agents}
        depth = len(order.start_layers({a.name: [d for d in a.spec.dependencies if d in names]
                                        for a in agents}))
        longest = max((a.spec.health.start_timeout_s for a in agents), default=0.0)
        return max(depth, 1) * longest

    async def stop_by_operator(self, agents: list[Agent]) -> None:
        """An operator's stop of `agents`: dependants first; returns once every one (and
        all it forked) is gone. They stay stopped until an operator starts them."""
        await self._stop_agents([a.name for a in agents], by_operator=True)

    def _settle_deadline_s(self) -> float:
        # The longest a first start can take along the deepest dependency chain; past
        # it, READY goes out whatever state the host is in.
        depth = len(order.start_layers({n: a.spec.dependencies for n, a in self.agents.items()}))
        longest = max((a.spec.health.start_timeout_s for a in self.agents.values()
                       if a.spec.required),
                      default=0.0)
        return depth * longest + 1.0

    def _settle_deadline(self) -> None:
        self._settle_expired = True
        self._refresh_status()

    def _agent_changed(self, agent: Agent) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        if agent.spec.secret_files_env and agent.state not in LIVE:
            # Its secret files live exactly as long as it does.
            secrets.agent_folder(self.config.runtime_dir, agent.name).remove()
        self._groups_dirty = True
        self._refresh_status()

    def _refresh_status(self) -> None:
        """Tell systemd how the host stands; READY=1 once it has settled."""
        if self._stopping:
            return
        summary = self.summary()
        line = self.status_line(summary)
        if not self._ready_sent and summary["state"] != "starting":
            self._ready_sent = True
            self.notifier.ready(status=line)
            log.info("ready: %s", line)
        else:
            self.notifier.status(line)

    # --- what operators see -----------------------------------------------------------

    def summary(self) -> dict:
        """Host state: starting until every required agent is ready or has given up;
        then ok, or degraded naming the required agents that are not running."""
        counts: dict[str, int] = {}
        for a in self.agents.values():
            counts[a.state.value] = counts.get(a.state.value, 0) + 1
        required = [a for a in self.agents.values() if a.spec.required]
        down = [a for a in required if a.state is not State.RUNNING]
        # Still starting while every required agent that is not up is on its first
        # attempt; one that has failed once, or waits for a dependency that did and needs
        # an operator, makes the host degraded (and READY is sent: systemd restarting the
        # whole supervisor would not help it).
        first_try = all(a.last_exit is None and a.wants_running
                        and not (a.state is State.STOPPED and self._blocked(a))
                        for a in down)
        if self._stopping:
            state = "stopping"
        elif not down:
            state = "ok"
        elif first_try and not self._ready_sent and not self._settle_expired:
            state = "starting"
        else:
            state = "degraded"
        return {"state": state, "counts": counts, "required_down": [a.name for a in down]}

    @staticmethod
    def status_line(summary: dict) -> str:
        parts = [f"{n} {s.lower()}" for s, n in sorted(summary["counts"].items())]
        line = f"{summary['state']}: " + ", ".join(parts)
        if summary["required_down"]:
            line += "; required not running: " + ", ".join(summary["required_down"])
        return line

    def status(self) -> dict:
        summary = self.summary()
        agents = []
        for a in self.agents.values():
            row = a.status()
            usage = self._usage.get(a.pid) if a.pid else None
            row["rss_mb"] = round(usage.rss_mb, 1) if usage else None
            row["cpu_percent"] = round(usage.cpu_percent, 1) if usage else None
            row["threads"] = usage.threads if usage else None
            row["fds"] = usage.fds if usage else None
            agents.append(row)
        return {
            "host": self.config.host,
            "state": summary["state"],
            "summary": self.status_line(summary),
            "config": str(self.config.source),
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self._started_at, 1),
            "agents": agents,
            "upstreams": self.traffic.listeners(self.config),
            "runtime_dir": str(self.config.runtime_dir),
            "nftables_table": self.traffic.table,  # transparent redirects, when any
            **({"metrics": self._metrics_status()} if DATA in self.agents else {}),
        }

    def _metrics_status(self) -> dict:
        """store_forward's spool and forwarder, as the data process said at the last
        sampling round; its state alone when it is not running."""
        data = self.agents[DATA]
        if data.state is not State.RUNNING or self._forwarding is None:
            return {"state": f"data process {data.state.value}"}
        return dict(self._forwarding)

    def agent(self, name: str) -> Agent:
        try:
            return self.agents[name]
        except KeyError:
            raise LookupError(f"no agent named {name!r} on {self.config.host}") from None

    # --- reload and rollback ----------------------------------------------------------

    async def load_current_file(self) -> HostConfig:
        """Re-read the config file; the agents' own listening ports are not conflicts.
        Read and checked in a thread: a file slow to read or to parse must not stall the
        loop that feeds systemd's watchdog and answers `status`."""
        pids = set()
        for a in self.agents.values():
            if a.pid:
                pids.add(a.pid)
                pids.update(process.descendants(a.pid))
        return await asyncio.to_thread(cfgmod.load, self.config.source,
                                       overlays=self.config.overlays,
                                       exclude_pids=frozenset(pids), **self._overrides)

    async def reload(self) -> dict:
        """Re-read the config and apply only the difference; an invalid file changes
        nothing (ConfigError propagates to the caller with every problem)."""
        self.notifier.reloading()
        try:
            try:
                new = await self.load_current_file()
            except (cfgmod.ConfigError, cfgmod.ConfigUnreadable) as exc:
                log.error("reload refused, nothing changed:\n%s", exc)
                raise
            for warning in new.warnings:
                log.warning("%s", warning)
            return await self.apply(new)
        finally:
            self.notifier.ready()  # refused or applied, the reload is over for systemd

    async def _reload_quietly(self) -> None:
        # SIGHUP (systemctl reload without the CLI): problems are logged by reload().
        try:
            await self.reload()
        except (cfgmod.ConfigError, cfgmod.ConfigUnreadable, ListenerError):
            pass

    async def rollback(self) -> dict:
        if self.previous is None:
            raise LookupError("nothing to roll back to: no reload has been applied")
        return await self.apply(self.previous)

    async def apply(self, new: HostConfig) -> dict:
        async with self._lock:
            old = self.config
            new = self._keep_runtime(new, old)
            old_specs = {a.name: a.spec for a in self.agents.values()}
            try:
                new_specs = {a.name: a for a in self.traffic.prepare(new)}
            except ListenerError as exc:
                log.error("config not applied, nothing changed: %s", exc)
                raise
            removed = [n for n in old_specs if n not in new_specs]
            added = [n for n in new_specs if n not in old_specs]
            changed = [n for n in new_specs if n in old_specs and new_specs[n] != old_specs[n]]
            self.previous, self.config = old, new
            # Stop first, so a port moved from a removed agent to a new one is free.
            await self._stop_agents(removed + changed)
            for n in removed:
                del self.agents[n]
            for n in changed:
                self.agents[n].replace_spec(new_specs[n])
            # Keep the file's order so start gates see every new dependency.
            self._add_agents([new_specs[n] for n in added])
            for n in changed:
                self.agents[n].start()
            self.agents = {n: self.agents[n] for n in new_specs}
            result = {"added": added, "removed": removed, "changed": changed,
                      "unchanged": sorted(set(new_specs) - set(added) - set(changed))}
            log.info("config applied: %s", ", ".join(f"{k} {len(v)}" for k, v in result.items()))
            return result

    @staticmethod
    def _keep_runtime(new: HostConfig, old: HostConfig) -> HostConfig:
        # The control socket lives in runtime_dir; moving it under a running supervisor
        # would strand every client, so a changed runtime_dir waits for a restart.
        if new.runtime_dir != old.runtime_dir:
            log.warning("runtime_dir changed to %s: takes effect at the next start",
                        new.runtime_dir)
            new = dataclasses.replace(new, runtime_dir=old.runtime_dir)
        return new

    # --- background loops -------------------------------------------------------------

    async def _resource_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.resource_interval_s)
            live = {a.pid: a for a in self.agents.values() if a.pid}
            # One /proc scan per round for all agents and their descendants.
            self._usage = {pid: u for pid, u in self._sampler.sample_many(live).items() if u}
            for pid, usage in self._usage.items():
                agent = live[pid]
                for verdict in check_limits(usage, agent.spec.limits):
                    if verdict.enforced:
                        agent.kill(verdict.message)
                    elif (agent.name, verdict.kind) not in self._warned:
                        log.warning("%s: %s", agent.name, verdict.message)
                        self._warned.add((agent.name, verdict.kind))
            for pid in self._sampled - set(live):
                self._sampler.forget(pid)
            self._sampled = set(live)
            await self._export_agents()

    async def _export_agents(self) -> None:
        """Hand this round's rows to the data process, which spools them for the hubs
        (`sidecar.samples`) and answers with the spool's and forwarder's state, then both
        to the sidecar, which serves them as agentvisor_agent_* and agentvisor_spool_* on
        the host's /metrics (every agent an exporter, without code). Best effort: a
        process that is restarting gets the next round's."""
        agents = self.status()["agents"]
        data = self.agents.get(DATA)
        if data is not None and data.state is State.RUNNING:
            body = samples.round_body(time.time(), {
                row["name"]: samples.from_row(row) for row in agents})
            try:
                status, answer = await self.traffic.push_samples(body)
            except (LookupError, OSError, ValueError, asyncio.TimeoutError) as exc:
                status, reason = 0, str(exc) or type(exc).__name__
            else:
                reason = f"HTTP {status}: {answer.get('error', '')}"
                forwarding = answer.get("forwarding")
                if isinstance(forwarding, dict):
                    self._forwarding = forwarding
            if status != 200 and not self._samples_refused_said:
                # Once until it works again: a full spool refuses every round.
                log.warning("samples: this round was not spooled for the hubs (%s); "
                            "rounds are tried every %g s", reason,
                            self.config.resource_interval_s)
            self._samples_refused_said = status != 200
        sidecar = self.agents.get(SIDECAR)
        if sidecar is not None and sidecar.state is State.RUNNING:
            rows, left_out = bounded(agents, EXPORT_ROWS_BYTES)
            if left_out and not self._export_cut_said:
                log.warning("exporter: %d agents' rows left out (more than one control "
                            "request holds)", left_out)
                self._export_cut_said = True
            request = {"cmd": "agents", "rows": json.dumps(rows)}
            if DATA in self.agents:
                request["forwarding"] = json.dumps(self._metrics_status())
            try:
                await self.traffic.ask_sidecar(request, timeout_s=2.0)
            except (LookupError, OSError, ValueError, asyncio.TimeoutError) as exc:
                log.debug("exporter: rows not handed to the sidecar: %s", exc)

    async def _groups_loop(self) -> None:
        # Written at most once a second, off the restart path.
        path = self.config.runtime_dir / GROUPS_FILE
        while True:
            await asyncio.sleep(1.0)
            if not self._groups_dirty:
                continue
            self._groups_dirty = False
            records = [r for a in self.agents.values() if a.pid and a.state in LIVE
                       for r in [process.record_for(a.name, a.pid)] if r]
            try:
                process.write_records(path, records)
            except OSError as exc:
                log.warning("cannot record agent process groups in %s: %s", path, exc)

    async def _secrets_loop(self) -> None:
        """Notice rotated secret files (one stat each per poll) and apply each agent's
        on_change policy; agents that failed for a missing or unsafe secret are tried
        again as soon as the file changes."""
        seen: dict[str, tuple | None] = {}
        while True:
            names = secrets.names_in(a.spec for a in self.agents.values())
            changed = set()
            for name in names:
                now = secrets.fingerprint(self.config.secrets, name)
                if name in seen and seen[name] != now:
                    changed.add(name)
                seen[name] = now
            if changed:
                log.info("secrets changed: %s", ", ".join(sorted(changed)))
                await self._apply_rotation(changed)
            await asyncio.sleep(self.config.secrets.poll_s)

    async def _apply_rotation(self, changed: set[str]) -> None:
        users = [a for a in self.agents.values()
                 if secrets.referenced(a.spec) & changed and a.wants_running
                 or (a.state is State.FATAL and a.last_exit == "not started"
                     and secrets.referenced(a.spec) & changed)]
        # One at a time, each only once the previous is ready again: a bad new secret
        # takes down one agent, not the fleet.
        for agent in users:
            policy = agent.spec.on_secret_change
            if agent.state is State.FATAL:
                agent.start()
            elif policy == "ignore":
                continue
            elif policy.startswith("signal:") and agent.pid:
                if agent.spec.secret_files_env:  # rewrite its files before it re-reads them
                    self._env_for(agent.spec)
                sig = getattr(signal, "SIG" + policy.split(":", 1)[1], signal.SIGHUP)
                log.info("%s: secret changed; sending %s", agent.name, sig.name)
                os.kill(agent.pid, sig)
                continue
            else:
                log.info("%s: secret changed; restarting it", agent.name)
                await agent.stop()
                agent.start()
            await agent.wait_for(lambda a: a.state is State.RUNNING
                                 or (a.state in (State.FATAL, State.EXITED)),
                                 agent.spec.health.start_timeout_s)

    async def _watchdog_loop(self) -> None:
        # Pinged from the event loop itself: if the loop wedges, systemd restarts us.
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(self.notifier.watchdog_interval_s)


def _group_id(name: str | None) -> int | None:
    if name is None:
        return None
    import grp

    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        log.warning("control.group %r does not exist: only root and this user may use "
                    "the control socket", name)
        return None
