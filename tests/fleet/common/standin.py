"""What every stand-in agent of the test fleet does: behave like the users' agents at the
edges a supervisor can see, and report what it was given.

Like the real agents, a stand-in takes its ports from `AGENT_PORT` and
`HEALTH_CHECK_PORT` (what the old launcher exported) and, when they are missing, falls
back to the defaults baked into its script (health = port + 1). That fallback is why a
port edited in `startup_config.yaml` never reached the real agents: a launcher that does
not export the variables leaves every agent on its code's default, and the test sees it
here as a bound port that differs from the evaluated one.

It serves plain HTTP on its main port (any path: 200), and, only if its script says it
has one, a health server on its health port (`GET /health`: 200). About a third of the
real agents have none although their YAML entry names a `health_check_port`. An agent
without a port just stays alive.

Once listening it writes `$FLEET_REPORT_DIR/<AGENT_NAME>.json`: the ports it bound, the
launch variables as it received them, PYTHONPATH, LOG_LEVEL, its cwd, and whether
NATS_PASSWORD arrived with the test's value (compared by SHA-256 with
`$FLEET_SECRET_SHA256`; the value itself is never written). SIGTERM: exit 0.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import signal
import sys
import threading

# The variables the old launcher gave every agent (start_system_v2.py).
LAUNCH_VARIABLES = ("AGENT_NAME", "AGENT_PORT", "HEALTH_CHECK_PORT", "AGENT_GROUP")


class _Answer(http.server.BaseHTTPRequestHandler):
    """200 for anything on the main port; on a health port, 200 for /health only."""

    health_only = False

    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.health_only and self.path.split("?")[0] != "/health":
            self.send_error(404)
            return
        body = json.dumps({"agent": self.server.agent, "status": "ok"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # a probe every few seconds is not worth a log line
        pass


class _Health(_Answer):
    health_only = True


def _port(variable: str, default: int | None) -> int | None:
    raw = os.environ.get(variable, "").strip()
    return int(raw) if raw else default


def _serve(agent: str, port: int, handler) -> int:
    try:
        server = http.server.ThreadingHTTPServer(("0.0.0.0", port), handler)
    except OSError as exc:
        # What a real agent does on a taken port: die with the error in its log.
        print(f"{agent}: cannot listen on port {port}: {exc.strerror}", file=sys.stderr, flush=True)
        sys.exit(1)
    server.agent = agent
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1]


def _secret_state() -> str:
    value = os.environ.get("NATS_PASSWORD")
    if value is None:
        return "missing"
    if "${" in value:
        return "placeholder"  # handed over unexpanded: the supervisor did not fill it
    expected = os.environ.get("FLEET_SECRET_SHA256")
    return "matches" if hashlib.sha256(value.encode()).hexdigest() == expected else "differs"


def _write_report(agent: str, report: dict) -> None:
    folder = os.environ.get("FLEET_REPORT_DIR")
    if not folder:
        return  # run by hand: nothing to report to
    path = os.path.join(folder, f"{agent}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)  # the test never reads half a report


def run_agent(name: str, default_port: int | None, *, health_server: bool,
              default_health_port: int | None = None) -> None:
    """Run the stand-in for agent `name` until SIGTERM. `default_port` is what its
    code falls back to (None: it serves no port); `health_server` whether it has one."""
    # Blocked before any server thread exists (threads inherit the mask), then waited
    # for: no window in which a SIGTERM could be missed or land in a server thread.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    agent = os.environ.get("AGENT_NAME") or name
    port = _port("AGENT_PORT", default_port)
    if default_health_port is None and default_port is not None:
        default_health_port = default_port + 1
    health_port = _port("HEALTH_CHECK_PORT", default_health_port) if health_server else None
    # The health server listens before the main port does, so that a probe finding the
    # main port open finds the health server too: an agent with one is never judged by
    # its main port for want of a few milliseconds.
    health_bound = _serve(agent, health_port, _Health) if health_port is not None else None
    bound = _serve(agent, port, _Answer) if port is not None else None
    _write_report(agent, {
        "agent": agent,
        "pid": os.getpid(),
        "port": bound,
        "health_port": health_bound,
        "health_server": health_server,
        "launch": {k: os.environ.get(k) for k in LAUNCH_VARIABLES},
        "PYTHONPATH": os.environ.get("PYTHONPATH"),
        "LOG_LEVEL": os.environ.get("LOG_LEVEL"),
        "nats_password": _secret_state(),
        "cwd": os.getcwd(),
        "script": os.path.abspath(sys.argv[0]),
    })
    print(f"{agent}: serving on {bound or '-'} (health server: {health_bound or 'none'})",
          flush=True)
    signal.sigwait({signal.SIGTERM})
    print(f"{agent}: SIGTERM, exiting", flush=True)
    sys.exit(0)
