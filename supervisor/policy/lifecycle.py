"""An agent's lifecycle: every state and every legal transition, in one table.

Everything that changes an agent's state goes through `next_state`; the watcher in
`supervisor/agent.py` owns the process and the timers, this module owns the rules.
State names are supervisord's, which operators already know.
"""

from __future__ import annotations

import enum


class State(enum.Enum):
    STOPPED = "STOPPED"  # not running, and not meant to be (initial, or stopped by operator)
    STARTING = "STARTING"  # spawned, not yet ready (probe not passed / start_s not elapsed)
    RUNNING = "RUNNING"  # ready: dependants may start
    BACKOFF = "BACKOFF"  # exited unexpectedly, waiting to be restarted
    STOPPING = "STOPPING"  # SIGTERM sent to its process group, waiting for it to go
    EXITED = "EXITED"  # exited and the restart policy says leave it
    FATAL = "FATAL"  # failed too often too fast; waits for an operator (or fatal_retry_s)


class Event(enum.Enum):
    START = "start"  # operator or start order asks for it to run
    READY = "ready"  # readiness probe passed (or start_s elapsed with no probe)
    EXIT_RESTART = "exit_restart"  # the process went away; policy: restart after a delay
    EXIT_DONE = "exit_done"  # the process went away; policy: leave it EXITED
    EXIT_FATAL = "exit_fatal"  # the process went away; too many failures in the window
    RETRY = "retry"  # the backoff (or fatal_retry_s) delay elapsed
    STOP = "stop"  # operator, reload or shutdown asks it to stop
    KILL = "kill"  # the supervisor ends a live process to restart it (unhealthy, limits)
    GONE = "gone"  # the process went away after STOP


class IllegalTransition(Exception):
    pass


S, E = State, Event

TRANSITIONS: dict[tuple[State, Event], State] = {
    (S.STOPPED, E.START): S.STARTING,
    (S.EXITED, E.START): S.STARTING,
    (S.FATAL, E.START): S.STARTING,
    (S.BACKOFF, E.START): S.STARTING,  # operator impatience: skip the rest of the delay
    (S.STARTING, E.READY): S.RUNNING,
    (S.STARTING, E.EXIT_RESTART): S.BACKOFF,
    (S.RUNNING, E.EXIT_RESTART): S.BACKOFF,
    (S.STOPPING, E.EXIT_RESTART): S.BACKOFF,  # after KILL: restart it
    (S.STARTING, E.EXIT_DONE): S.EXITED,
    (S.RUNNING, E.EXIT_DONE): S.EXITED,
    (S.STOPPING, E.EXIT_DONE): S.EXITED,  # killed (unhealthy) under restart: never
    (S.STARTING, E.EXIT_FATAL): S.FATAL,
    (S.RUNNING, E.EXIT_FATAL): S.FATAL,
    (S.STOPPING, E.EXIT_FATAL): S.FATAL,
    (S.BACKOFF, E.RETRY): S.STARTING,
    (S.FATAL, E.RETRY): S.STARTING,
    (S.STARTING, E.STOP): S.STOPPING,
    (S.RUNNING, E.STOP): S.STOPPING,
    (S.STOPPING, E.STOP): S.STOPPING,  # a stop after KILL turns the restart into a stop
    (S.BACKOFF, E.STOP): S.STOPPED,
    (S.FATAL, E.STOP): S.STOPPED,
    (S.EXITED, E.STOP): S.STOPPED,
    (S.STOPPED, E.STOP): S.STOPPED,
    (S.STARTING, E.KILL): S.STOPPING,
    (S.RUNNING, E.KILL): S.STOPPING,
    (S.STOPPING, E.GONE): S.STOPPED,
}

# States in which the agent has a live process.
LIVE = frozenset({S.STARTING, S.RUNNING, S.STOPPING})
# States from which nothing happens without an operator (or fatal_retry_s).
AT_REST = frozenset({S.STOPPED, S.EXITED, S.FATAL})


def next_state(state: State, event: Event) -> State:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(f"{event.value} is not allowed in {state.value}") from None
