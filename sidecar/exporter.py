"""Every agent gets a Prometheus exporter without code: `agentvisor_agent_*` on the host's
`/metrics` (the sidecar's metrics listener).

The supervisor already samples each agent's process tree (psutil: CPU, RSS, threads,
descriptors) and knows its state, restarts, health and last exit. It sends those rows to
the sidecar over the control socket after each sampling round (`{"cmd": "agents"}`);
this collector keeps the latest rows and turns them into gauges at each scrape. Rows
are data from another process: read leniently, a malformed row is skipped, never fatal.

Not on the hot path (not compiled): a scrape every few seconds, a push every 5 s.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from sidecar import samples

# The states an agent can be in (supervisor/policy/lifecycle.py): one series per state,
# 1 for the current one, so `agentvisor_agent_state{state="FATAL"} == 1` finds them.
STATES = ("STOPPED", "STARTING", "RUNNING", "BACKOFF", "STOPPING", "EXITED", "FATAL")
# Rows kept: a host has ~40 agents; anything far beyond is not a real supervisor's.
MAX_AGENTS = 1000
# One control request line is read with a 64 KiB limit, and the rows travel as a JSON
# string inside it (every quote escaped): the supervisor cuts them to this, which fits.
# A row is about 350 bytes: 77 agents take 27 KiB.
MAX_ROWS_BYTES = 40 * 1024


class AgentsCollector:
    def __init__(self, clock: Callable[[], float] = time.time):
        self._clock = clock
        self._rows: list[dict[str, Any]] = []
        self._received_at: float | None = None
        self._forwarding: dict[str, Any] | None = None

    def update(self, rows_json: str, forwarding_json: str | None = None) -> int:
        """Replace the rows (and the spool's and forwarder's state, on a host with
        store_forward) with the supervisor's latest; the number of rows kept. ValueError
        when the rows are not a JSON list."""
        try:
            rows = json.loads(rows_json)
            forwarding = json.loads(forwarding_json) if forwarding_json else None
        except RecursionError:
            raise ValueError("rows nested too deep") from None
        if not isinstance(rows, list):
            raise ValueError("rows must be a JSON list")
        self._forwarding = forwarding if isinstance(forwarding, dict) else None
        kept = [r for r in rows[:MAX_AGENTS]
                if isinstance(r, dict) and isinstance(r.get("name"), str)]
        self._rows = kept
        self._received_at = self._clock()
        return len(kept)

    def describe(self) -> Iterator[Metric]:
        return iter(_families())

    def collect(self) -> Iterator[Metric]:
        fams = _families()
        (state, up, restarts, healthy, cpu, rss, threads, fds, uptime, last_exit,
         sampled) = fams
        for row in self._rows:
            name = row["name"]
            group = row.get("group") if isinstance(row.get("group"), str) else ""
            labels = [name, group]
            current = row.get("state")
            for s in STATES:
                state.add_metric([*labels, s], 1.0 if current == s else 0.0)
            # The numbers as the hubs get them too (sidecar.samples): one mapping.
            values = samples.from_row(row)
            for key, family in (("up", up), ("restarts_total", restarts),
                                ("healthy", healthy), ("cpu_percent", cpu),
                                ("resident_memory_bytes", rss), ("threads", threads),
                                ("open_fds", fds), ("uptime_seconds", uptime)):
                if key in values:
                    family.add_metric(labels, values[key])
            if isinstance(row.get("last_exit"), str):
                last_exit.add_metric([*labels, row["last_exit"][:200]], 1.0)
        if self._received_at is not None:
            sampled.add_metric([], self._received_at)
        return iter(fams + tuple(self._spool()))

    def _spool(self) -> Iterator[Metric]:
        """store_forward's spool and forwarder (absent on a host without one)."""
        f = self._forwarding
        if f is None:
            return
        for name, key, doc in (
                ("agentvisor_spool_pending_records", "pending_records",
                 "pushes on disk not yet acked by a hub"),
                ("agentvisor_spool_pending_bytes", "pending_bytes", "bytes of those pushes"),
                ("agentvisor_spool_max_bytes", "max_bytes",
                 "the spool's bound: when full, pushes are refused with 503"),
                ("agentvisor_spool_oldest_pending_seconds", "oldest_pending_s",
                 "age of the oldest push not yet acked (0: none)")):
            value = f.get(key)
            yield GaugeMetricFamily(name, doc, value=float(value) if samples.finite(value)
                                    else 0.0)
        state = f.get("state")
        yield GaugeMetricFamily("agentvisor_forwarder_partitioned",
                                "1 while no hub answers: pushes are spooled, and drained "
                                "oldest first when one does",
                                value=1.0 if state == "partitioned" else 0.0)
        yield GaugeMetricFamily("agentvisor_spool_refusing",
                                "1 while pushes are refused (the spool is full or failing)",
                                value=1.0 if f.get("refusing") else 0.0)


def _families() -> tuple[Any, ...]:
    agent = ["agent", "group"]
    return (
        GaugeMetricFamily("agentvisor_agent_state", "1 for the agent's current state",
                          labels=[*agent, "state"]),
        GaugeMetricFamily("agentvisor_agent_up", "1 while the agent is RUNNING (ready)",
                          labels=agent),
        CounterMetricFamily("agentvisor_agent_restarts", "restarts by the supervisor",
                            labels=agent),
        GaugeMetricFamily("agentvisor_agent_healthy", "1 when its last probe passed, 0 when "
                          "failing (absent while not probed)", labels=agent),
        GaugeMetricFamily("agentvisor_agent_cpu_percent", "CPU of its process tree, % of one "
                          "CPU", labels=agent),
        GaugeMetricFamily("agentvisor_agent_resident_memory_bytes", "RSS of its process tree",
                          labels=agent),
        GaugeMetricFamily("agentvisor_agent_threads", "threads of its process tree",
                          labels=agent),
        GaugeMetricFamily("agentvisor_agent_open_fds", "open descriptors of its process tree",
                          labels=agent),
        GaugeMetricFamily("agentvisor_agent_uptime_seconds", "since its current run started",
                          labels=agent),
        GaugeMetricFamily("agentvisor_agent_last_exit_info", "how its last run ended",
                          labels=[*agent, "last_exit"]),
        GaugeMetricFamily("agentvisor_agents_sampled_timestamp_seconds",
                          "unix time of the supervisor's latest sample (stale: it stopped "
                          "sending)", labels=[]),
    )
