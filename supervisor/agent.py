"""One agent under supervision: its process, its probes, its restarts.

The rules live in `policy/lifecycle.py` (which state follows which event) and
`policy/backoff.py` (restart now, later, or give up); this class owns the clocks, the
child process and the probe loop, and turns what happens into events for those tables.

One task per agent (`_life`) loops spawn -> supervise -> decide; operator commands only
set intent (`start`, `stop`, `kill`) and wake it.

Before each spawn the agent's own ports (`port`, `health_check_port`) must be free: one
taken by another process fails this agent alone, at once and for good (FATAL, "not
started", naming the holder), instead of a crash loop, and the rest of the host starts.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import random
import signal
import socket
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Mapping

from supervisor import health, process
from supervisor.config.load import listening_ports
from supervisor.config.model import AgentSpec, ProbeKind
from supervisor.policy.backoff import Action, RestartTracker
from supervisor.policy.lifecycle import LIVE, Event, State, next_state

log = logging.getLogger("agentvisor.agent")

# Environment built per spawn; raises process.SpawnError (e.g. a missing secret).
EnvBuilder = Callable[[AgentSpec], Mapping[str, str]]
# Waits until every dependency of the agent is ready; reports what it waits for.
DependencyGate = Callable[["Agent"], Awaitable[None]]
# Called after every state change (status line for systemd, degraded host, ...).
Listener = Callable[["Agent"], None]
# Called with the new pid right after a spawn (placing it in its cgroup).
SpawnHook = Callable[["Agent", int], None]

# How often the descendants of an agent without a cgroup of its own are looked for, so
# that one its parent leaves behind (setsid, then the parent exits) is still known at
# stop. One walk of /proc per agent per period: a few milliseconds.
LINEAGE_SAMPLE_S = 5.0
# A restart comes right after the previous run's processes were SIGKILLed; the kernel
# closes their sockets as they exit, a few milliseconds later. Its own ports still bound
# that long after are held by someone else.
PORT_RELEASE_GRACE_S = 2.0
PORT_RELEASE_POLL_S = 0.02


@dataclass
class _Run:
    proc: asyncio.subprocess.Process
    started: float  # monotonic
    lineage: process.Lineage  # what a stop must end: group, cgroup, descendants seen
    kill_reason: str | None = None
    terminated_at: float | None = None  # monotonic, when SIGTERM was sent


class Agent:
    def __init__(
        self,
        spec: AgentSpec,
        *,
        build_env: EnvBuilder,
        gate: DependencyGate,
        on_change: Listener,
        on_spawn: SpawnHook | None = None,
        rng: random.Random | None = None,
    ):
        self.spec = spec
        self._build_env = build_env
        self._gate = gate
        self._on_change = on_change
        self._on_spawn = on_spawn
        self.tracker = RestartTracker(spec.restart, rng)

        # What operators see.
        self.state = State.STOPPED
        self.reason = ""
        self.restarts = 0
        self.healthy: bool | None = None
        self.last_exit: str | None = None
        self.stopped_by_operator = False
        # The port the last passing probe reached when it was not the probe's own (the
        # main port of an agent with nothing on its health port).
        self.probe_via: int | None = None

        # Synchronisation: `ready` is set exactly while RUNNING; `changed` pulses on every
        # transition so callers can wait for a condition with a deadline.
        self.ready = asyncio.Event()
        self._changed = asyncio.Event()
        self._wake = asyncio.Event()
        self._want_running = False
        self._run: _Run | None = None
        self._ended_at: float | None = None  # monotonic, when the last run's process exited
        self._life: asyncio.Task | None = None

    # --- what operators see -----------------------------------------------------------

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int | None:
        if self._run and self._run.proc.returncode is None:
            return self._run.proc.pid
        return None

    def uptime_s(self, now: float | None = None) -> float | None:
        if self._run is None or self.state not in LIVE:
            return None
        return (now if now is not None else time.monotonic()) - self._run.started

    def status(self) -> dict:
        up = self.uptime_s()
        return {
            "name": self.name,
            "group": self.spec.group,
            "required": self.spec.required,
            "state": self.state.value,
            "pid": self.pid,
            "restarts": self.restarts,
            "healthy": self.healthy,
            "probe": health.describe(self.spec.health, self.probe_via),
            "uptime_s": round(up, 1) if up is not None else None,
            "last_exit": self.last_exit,
            "reason": self.reason,
        }

    # --- intent -----------------------------------------------------------------------

    def start(self) -> None:
        """Run the agent (idempotent). An operator start clears FATAL and the backoff."""
        self.stopped_by_operator = False
        self._want_running = True
        if self.state in (State.FATAL, State.EXITED, State.STOPPED):
            self.tracker.reset()
        if self._life is None or self._life.done():
            self._life = asyncio.create_task(self._live(), name=f"agent:{self.name}")
            self._life.add_done_callback(self._life_ended)
        else:
            self._wake.set()  # cut a backoff or FATAL wait short

    async def stop(self, *, by_operator: bool = False) -> None:
        """Stop the agent and everything it started; returns once the agent is gone."""
        self.stopped_by_operator = by_operator
        self._want_running = False
        self._wake.set()
        self._notify()  # releases a start still held at the dependency gate
        if self._run is not None and self._run.proc.returncode is None:
            self._terminate(None)
        if self._life is not None and not self._life.done():
            await asyncio.wait({self._life})  # its failure, if any, is logged by _life_ended
        if self.state != State.STOPPED:
            self._transition(Event.STOP, "stopped")

    def kill(self, reason: str) -> None:
        """End the live process so that it is restarted; the exit counts as a failure."""
        if self._run is not None and self._run.proc.returncode is None and self.state in (
            State.STARTING,
            State.RUNNING,
        ):
            log.warning("%s: %s; restarting it", self.name, reason)
            self._terminate(reason)

    def replace_spec(self, spec: AgentSpec) -> None:
        """A reload changed this agent: new spec, fresh restart history."""
        self.spec = spec
        self.tracker = RestartTracker(spec.restart)

    @property
    def wants_running(self) -> bool:
        return self._want_running

    async def wait_for(self, predicate: Callable[["Agent"], bool], timeout_s: float) -> bool:
        """Wait until predicate(self) holds; False if the deadline passed first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not predicate(self):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                return predicate(self)
        return True

    # --- the life loop ----------------------------------------------------------------

    async def _live(self) -> None:
        event = Event.START
        while self._want_running:
            self.reason = "waiting for dependencies"
            await self._gate(self)
            if not self._want_running:
                break
            if event is Event.RETRY:
                self.restarts += 1
            self._transition(event, "")
            decision_event, delay = await self._one_run()
            if not self._want_running:
                break
            if decision_event is Event.EXIT_DONE:
                self._want_running = False
                break
            if decision_event is Event.EXIT_FATAL:
                retry = self.spec.restart.fatal_retry_s
                if retry is None:
                    self._want_running = False
                    break
                delay = retry
            # BACKOFF or FATAL-with-retry: wait, unless an operator or a stop wakes us.
            if delay > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), delay)
                except asyncio.TimeoutError:
                    pass
            event = Event.RETRY

    async def _one_run(self) -> tuple[Event, float]:
        """Spawn, supervise until exit, and decide what comes next."""
        started = time.monotonic()
        try:
            await self._check_ports()
            env = self._build_env(self.spec)
            cgroup = process.agent_cgroup(self.name)
            proc = await process.spawn(
                self.spec.argv, cwd=self.spec.cwd, env=env, log_path=self.spec.log_path,
                pass_fds=self.spec.pass_fds, user=self.spec.user, cgroup=cgroup,
            )
        except process.SpawnError as exc:
            log.error("%s: %s%s", self.name, exc,
                      f"; not started: `agentvisor start {self.name}` once that is fixed"
                      if exc.permanent else "")
            if exc.permanent:
                self.last_exit = "not started"
                self._transition(Event.EXIT_FATAL, str(exc))
                return Event.EXIT_FATAL, 0.0
            return self._decide(started, failed=True, description=str(exc))
        self._run = _Run(proc, started, process.Lineage(proc.pid, cgroup))
        self.reason = ""
        self.probe_via = None
        if self._on_spawn is not None:
            self._on_spawn(self, proc.pid)
        if not self._want_running:  # stopped while we were spawning
            self._terminate(None)
        self._notify()
        log.info("%s: started, pid %d", self.name, proc.pid)
        watchers = [asyncio.create_task(self._probe_loop(self._run), name=f"probe:{self.name}")]
        if cgroup is None:  # with one, the kernel keeps the lineage
            watchers.append(asyncio.create_task(self._watch_lineage(self._run.lineage),
                                                name=f"lineage:{self.name}"))
        try:
            rc = await proc.wait()
        finally:
            for task in watchers:
                task.cancel()
        # Forked children of a dead leader would hold its ports and files: end them too,
        # in its group or out of it.
        self._run.lineage.signal(signal.SIGKILL)
        self._ended_at = time.monotonic()
        self.healthy = None
        self.ready.clear()
        self.last_exit = process.describe_exit(rc)
        run, self._run = self._run, None
        if not self._want_running:
            # One line per agent on the way down: the journal shows the stop order and
            # which agent was slow to go (or needed SIGKILL, logged by _force_kill).
            took = ("" if run.terminated_at is None
                    else f" {time.monotonic() - run.terminated_at:.2f} s after SIGTERM")
            log.info("%s: stopped, %s%s", self.name, self.last_exit, took)
            self._transition(Event.GONE, "stopped")
            return Event.GONE, 0.0
        description = run.kill_reason or self.last_exit
        failed = run.kill_reason is not None or rc != 0
        log.log(logging.WARNING if failed else logging.INFO, "%s: %s", self.name, description)
        return self._decide(started, failed=failed, description=description)

    async def _check_ports(self) -> None:
        """Permanent SpawnError when the agent's own ports are taken: it would only fail
        to bind them, again and again."""
        taken = ports_taken(self.spec)
        if taken and self._ended_at is not None:
            # Not before the previous run's processes have had time to go: they are the
            # likeliest holders, and they were killed a moment ago.
            deadline = self._ended_at + PORT_RELEASE_GRACE_S
            while taken and time.monotonic() < deadline:
                await asyncio.sleep(PORT_RELEASE_POLL_S)
                taken = ports_taken(self.spec)
        if taken:
            # Who holds them: one walk of every process's sockets, off the loop.
            holders = await asyncio.to_thread(listening_ports)
            raise process.SpawnError("; ".join(_taken(port, holders.get(port))
                                               for port in taken), permanent=True)

    def _decide(self, started: float, *, failed: bool, description: str) -> tuple[Event, float]:
        now = time.monotonic()
        d = self.tracker.on_exit(now, now - started, failed, description)
        if d.action is Action.RESTART:
            self._transition(Event.EXIT_RESTART, d.reason)
            return Event.EXIT_RESTART, d.delay_s
        if d.action is Action.FATAL:
            retry = self.spec.restart.fatal_retry_s
            log.error("%s: %s%s", self.name, d.reason,
                      f"; retrying in {retry:g} s" if retry is not None else
                      "; `agentvisor start` to try again")
            self._transition(Event.EXIT_FATAL, d.reason)
            return Event.EXIT_FATAL, 0.0
        self._transition(Event.EXIT_DONE, d.reason)
        return Event.EXIT_DONE, 0.0

    def _life_ended(self, task: asyncio.Task) -> None:
        # A bug here must not leave an agent silently unsupervised: say so loudly, and
        # show it in status.
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: supervision failed", self.name, exc_info=task.exception())
            self.reason = f"supervision failed: {task.exception()!r}"
            self._notify()

    # --- probes -----------------------------------------------------------------------

    async def _probe_loop(self, run: _Run) -> None:
        check = self.spec.health
        if check.kind is ProbeKind.NONE:
            # No probe of its own (29 of the fleet's agents): alive for start_s is ready.
            await asyncio.sleep(self.spec.restart.start_s)
            self._became_ready()
            return
        deadline = run.started + check.start_timeout_s
        result = await self._probe()
        while not result.ok:
            if time.monotonic() >= deadline:
                self.kill(f"not ready after {check.start_timeout_s:g} s: {result.detail}")
                return
            self.reason = f"not ready yet: {result.detail}"
            await asyncio.sleep(check.startup_interval_s)
            result = await self._probe()
        self._became_ready()
        misses = 0
        while True:
            await asyncio.sleep(check.interval_s)
            result = await self._probe()
            if result.ok:
                if misses:
                    log.info("%s: healthy again", self.name)
                misses, self.healthy, self.reason = 0, True, ""
                continue
            misses += 1
            self.healthy = False
            self.reason = f"probe failed {misses}/{check.retries}: {result.detail}"
            self._notify()
            if misses >= check.retries:
                self.kill(f"health probe failed {misses} times: {result.detail}")
                return

    async def _probe(self) -> health.ProbeResult:
        """One probe; notes (and says, when it changes) which port the agent is judged by."""
        check = self.spec.health
        result = await health.probe(check)
        if result.ok and result.via != self.probe_via:
            if result.via is not None:
                log.info("%s: nothing listens on health port %s; judged by a connect to "
                         "its main port %d, as the old launcher did", self.name, check.port,
                         result.via)
            else:
                log.info("%s: health port %s answers; judged by it again", self.name,
                         check.port)
            self.probe_via = result.via
        return result

    async def _watch_lineage(self, lineage: process.Lineage) -> None:
        while True:
            lineage.observe()
            await asyncio.sleep(LINEAGE_SAMPLE_S)

    def _became_ready(self) -> None:
        self.healthy = True
        if self.state is State.STARTING:  # not if a stop or kill got here first
            self._transition(Event.READY, "")

    # --- plumbing ---------------------------------------------------------------------

    def _terminate(self, kill_reason: str | None) -> None:
        run = self._run
        assert run is not None
        if kill_reason is not None:
            run.kill_reason = kill_reason
            self._transition(Event.KILL, kill_reason)
        elif self.state in (State.STARTING, State.RUNNING):
            self._transition(Event.STOP, "stopping")
        run.lineage.observe()  # a setsid() child is only found through its parent
        run.lineage.signal(signal.SIGTERM)
        run.terminated_at = time.monotonic()
        asyncio.get_running_loop().call_later(
            self.spec.restart.stop_grace_s, self._force_kill, run
        )

    def _force_kill(self, run: _Run) -> None:
        if run.proc.returncode is None:
            log.warning("%s: still alive %g s after SIGTERM; SIGKILL", self.name,
                        self.spec.restart.stop_grace_s)
            run.lineage.signal(signal.SIGKILL)

    def _transition(self, event: Event, reason: str) -> None:
        new = next_state(self.state, event)
        if new is not self.state:
            log.debug("%s: %s -> %s (%s)", self.name, self.state.value, new.value, event.value)
        self.state = new
        self.reason = reason
        if new is State.RUNNING:
            self.ready.set()
        else:
            self.ready.clear()
        self._notify()

    def _notify(self) -> None:
        self._on_change(self)
        # Wake every waiter once; each re-checks its own condition.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


def ports_taken(spec: AgentSpec) -> list[int]:
    """The agent's own ports (`port`, `health_check_port`) that cannot be bound on its
    host because something listens there: a bind test with SO_REUSEADDR (so connections
    in TIME_WAIT do not count), closed at once. Other bind errors (an address that is not
    this machine's, a port below 1024 without root) are the agent's to meet and report,
    and so is a host given by name: resolving it could stall the loop."""
    address = {"": "0.0.0.0", "localhost": "127.0.0.1"}.get(spec.host, spec.host)
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    except ValueError:
        return []
    taken = []
    for port in dict.fromkeys(p for p in (spec.port, spec.health_check_port)
                              if isinstance(p, int)):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((address, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    taken.append(port)
    return taken


def _taken(port: int, holder: str | None) -> str:
    # listening_ports() says "pid N, NAME" or, for a socket whose owner we may not see,
    # "held by a process we may not see".
    if holder is None:
        return f"port {port} is taken"
    if holder.startswith("pid "):
        return f"port {port} is taken by {holder}"
    return f"port {port} is taken, {holder}"
