"""Partial failure stays partial, and groups start and stop together (issue 10, item 6).

A port already taken when an agent is to start fails that agent alone (FATAL, naming the
holder) and holds its dependants with the reason; the rest of the host runs. Freeing the
port and starting the agent brings its dependants up by themselves. `--group` starts a
group in dependency order and stops it dependants first, like the old launcher's.
"""

import json
import os
import socket

from tests.integration.harness import free_port, wait_until

# Listens on its port when it has one; writes "start NAME" when it starts and "stop NAME"
# when told to stop, to the file EVENTS names, so a test can read the order.
AGENT = """
import os, signal, socket, sys, time
name = os.environ["AGENTVISOR_AGENT"]
def record(what):
    with open(os.environ["EVENTS"], "a") as f:
        f.write(f"{what} {name}\\n")
def bye(*_):
    record("stop")
    sys.exit(0)
signal.signal(signal.SIGTERM, bye)
record("start")
if os.environ.get("PORT"):
    srv = socket.create_server(("0.0.0.0", int(os.environ["PORT"])))
    while True:
        srv.accept()[0].close()
while True:
    time.sleep(1)
"""


def agent(fleet, port=None, **extra):
    env = {"EVENTS": str(fleet.dir / "events"), **({"PORT": str(port)} if port else {})}
    return {"script_path": fleet.script("agent.py", AGENT), "env_vars": env,
            **({"port": port} if port else {}),
            "health": {"interval_s": 0.2, "timeout_s": 1, "start_timeout_s": 10},
            "restart": {"start_s": 0.2, "stop_grace_s": 5}, **extra}


def events(fleet) -> list[str]:
    path = fleet.dir / "events"
    return path.read_text().splitlines() if path.exists() else []


def test_a_taken_port_fails_that_agent_and_its_dependants_only(fleet):
    a, b, c = free_port(), free_port(), free_port()
    holder = socket.create_server(("127.0.0.1", a))  # someone else got there first
    try:
        fleet.write_config({"pc2_services": [
            {"name": "ServiceRegistry", **agent(fleet, a, required=True)},
            {"name": "RequestCoordinator", **agent(fleet, b, required=True),
             "dependencies": ["ServiceRegistry"]},
            {"name": "ModelManagerAgent", **agent(fleet, c, required=True)},
        ]})
        fleet.start()
        fleet.wait_state("ModelManagerAgent", "RUNNING")
        registry = fleet.wait_state("ServiceRegistry", "FATAL")
        assert registry["last_exit"] == "not started" and registry["restarts"] == 0
        taken = f"port {a} is taken by pid {os.getpid()}, "
        assert registry["reason"].startswith(taken), registry
        coordinator = wait_until(
            lambda: (lambda r: r if r["reason"].startswith("blocked") else None)(
                fleet.agent("RequestCoordinator")), 10, "the dependant to say it is blocked")
        assert coordinator["state"] == "STOPPED" and coordinator["pid"] is None
        assert coordinator["reason"] == (f"blocked: dependency ServiceRegistry is FATAL "
                                         f"({registry['reason']})")
        status = fleet.status()
        assert status["state"] == "degraded"
        assert "required not running: ServiceRegistry, RequestCoordinator" in status["summary"]
        assert "ServiceRegistry: port" in fleet.supervisor_log()
        assert "`agentvisor start ServiceRegistry` once that is fixed" in fleet.supervisor_log()
    finally:
        holder.close()
    # The operator frees the port and starts the agent; its dependant follows by itself.
    out = fleet.cli("start", "ServiceRegistry")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ServiceRegistry: RUNNING" in out.stdout
    fleet.wait_state("RequestCoordinator", "RUNNING")
    assert fleet.status()["state"] == "ok"
    assert events(fleet).index("start ServiceRegistry") < events(fleet).index(
        "start RequestCoordinator")


def test_start_of_an_agent_blocked_by_a_dependency_says_why_at_once(fleet):
    a = free_port()
    with socket.create_server(("127.0.0.1", a)):
        fleet.write_config({"pc2_services": [
            {"name": "Base", **agent(fleet, a)},
            {"name": "Top", **agent(fleet), "dependencies": ["Base"]},
        ]})
        fleet.start()
        fleet.wait_state("Base", "FATAL")
        out = fleet.cli("restart", "Top", timeout_s=8)  # no start timeout to sit out
    assert out.returncode == 1
    assert out.stdout.startswith("Top: STOPPED: blocked: dependency Base is FATAL (port")


def test_a_restart_does_not_trip_over_its_own_dying_child(fleet):
    # The first run forks a child that holds the agent's port, then crashes: the child
    # is killed with the rest of the agent, and the restart must find the port free.
    port = free_port()
    fleet.write_config({"pc2_services": [{
        "name": "Forker", "port": port,
        "health": {"interval_s": 0.2, "timeout_s": 1, "start_timeout_s": 10},
        "restart": {"backoff": {"initial_s": 0, "jitter": 0}},
        "script_path": fleet.script("forker.py", f"""
            import os, socket, sys, time
            marker = {str(fleet.dir / "crashed-once")!r}
            srv = socket.create_server(("0.0.0.0", {port}))
            if not os.path.exists(marker):
                if os.fork() == 0:      # the child keeps the listening socket
                    time.sleep(1000)
                open(marker, "w").close()
                sys.exit(1)
            while True:
                srv.accept()[0].close()
        """),
    }]})
    fleet.start()
    row = wait_until(lambda: (lambda r: r if r["restarts"] >= 1 and r["state"] in (
        "RUNNING", "FATAL") else None)(fleet.agent("Forker")), 15, "the restart")
    assert row["state"] == "RUNNING", row
    assert "is taken" not in fleet.supervisor_log()


GROUPS = {"core_services": ["ServiceRegistry", "RequestCoordinator"],
          "gpu_infrastructure": ["ModelManagerAgent"]}


def two_groups(fleet):
    fleet.write_config({"agent_groups": {
        # Dependant first in the file: the order must come from the dependencies.
        "core_services": {
            "RequestCoordinator": {**agent(fleet, free_port()),
                                   "dependencies": ["ServiceRegistry"]},
            "ServiceRegistry": agent(fleet, free_port()),
        },
        "gpu_infrastructure": {"ModelManagerAgent": agent(fleet)},
    }})


def test_group_stop_start_and_restart_in_dependency_order(fleet):
    two_groups(fleet)
    fleet.start()
    for name in ("RequestCoordinator", "ServiceRegistry", "ModelManagerAgent"):
        fleet.wait_state(name, "RUNNING")
    other = fleet.agent("ModelManagerAgent")["pid"]
    (fleet.dir / "events").unlink()

    out = fleet.cli("stop", "--group", "core_services")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines() == ["RequestCoordinator: STOPPED", "ServiceRegistry: STOPPED",
                                       "group core_services: 2 of 2 STOPPED"]
    assert events(fleet) == ["stop RequestCoordinator", "stop ServiceRegistry"]
    assert fleet.agent("ModelManagerAgent")["pid"] == other  # another group: untouched

    out = fleet.cli("start", "--group", "core_services")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines()[-1] == "group core_services: 2 of 2 RUNNING"
    assert events(fleet)[2:] == ["start ServiceRegistry", "start RequestCoordinator"]

    before = {n: fleet.agent(n)["pid"] for n in GROUPS["core_services"]}
    out = fleet.cli("restart", "-g", "core_services", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    reply = json.loads(out.stdout)
    assert reply["group"] == "core_services"
    rows = {r["name"]: r for r in reply["agents"]}
    assert set(rows) == set(GROUPS["core_services"])
    assert all(r["state"] == "RUNNING" and r["pid"] != before[n] for n, r in rows.items())
    assert events(fleet)[4:] == ["stop RequestCoordinator", "stop ServiceRegistry",
                                 "start ServiceRegistry", "start RequestCoordinator"]
    assert fleet.agent("ModelManagerAgent")["pid"] == other


def test_unknown_group_lists_the_groups_there_are(fleet):
    two_groups(fleet)
    fleet.start()
    out = fleet.cli("start", "--group", "core")
    assert out.returncode == 1
    assert "no group named 'core'" in out.stderr
    assert "core_services, gpu_infrastructure" in out.stderr
    # AGENT and --group: one of them, not both.
    assert fleet.cli("stop", "ServiceRegistry", "--group", "core_services").returncode == 2
    assert fleet.cli("stop").returncode == 2


def test_a_flat_list_host_has_no_groups_and_says_so(fleet):
    fleet.write_config({"pc2_services": [{"name": "MemoryOrchestratorService",
                                          **agent(fleet)}]})
    fleet.start()
    out = fleet.cli("stop", "--group", "core_services")
    assert out.returncode == 1
    assert "flat list without groups" in out.stderr
    assert fleet.agent("MemoryOrchestratorService")["state"] in ("STARTING", "RUNNING")
