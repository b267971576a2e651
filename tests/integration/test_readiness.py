"""Readiness of legacy agents with and without a health server (issue 10, item 5).

About 29 of the fleet's 77 agents name a health_check_port and never open it; the old
launcher judged them ready by a connect to their main port. Under agentvisor they must
become RUNNING and healthy the same way, `status` must say which port they are judged
by, and an agent that opens neither port must still not stay STARTING for ever.
"""

from tests.integration.harness import free_port, wait_until

# A stand-in legacy agent: listens on MAIN_PORT, and on HEALTH_PORT when set (at once, or
# once the file HEALTH_LATER names appears).
AGENT = """
import os, selectors, socket, time
sel = selectors.DefaultSelector()
def listen(port):
    srv = socket.create_server(("127.0.0.1", int(port)))
    srv.setblocking(False)
    sel.register(srv, selectors.EVENT_READ)
for key in ("MAIN_PORT", "HEALTH_PORT"):
    if os.environ.get(key):
        listen(os.environ[key])
later = os.environ.get("HEALTH_LATER")
while True:
    if later and os.path.exists(later):
        listen(os.environ["LATER_PORT"])
        later = None
    for key, _ in sel.select(timeout=0.05):
        key.fileobj.accept()[0].close()
"""

FAST_PROBES = {"interval_s": 0.1, "timeout_s": 1, "retries": 3, "start_timeout_s": 10}


def agent(fleet, port, health_port, listen_env, **extra):
    return {"script_path": fleet.script("agent.py", AGENT), "port": port,
            "health_check_port": health_port, "env_vars": listen_env,
            "health": dict(FAST_PROBES), **extra}


def test_agent_without_a_health_server_is_ready_by_its_main_port_until_it_opens_one(fleet):
    main, health, m2, h2 = free_port(), free_port(), free_port(), free_port()
    later = fleet.dir / "open-health-port"
    fleet.write_config({"agent_groups": {"core_services": {
        # Names a health port and never opens it (until told to): the common legacy case.
        "ServiceRegistry": agent(fleet, main, health, {
            "MAIN_PORT": str(main), "HEALTH_LATER": str(later), "LATER_PORT": str(health)},
            required=True),
        # A real health server: judged by it, as before.
        "RequestCoordinator": agent(fleet, m2, h2, {"MAIN_PORT": str(m2),
                                                    "HEALTH_PORT": str(h2)},
                                    required=True, dependencies=["ServiceRegistry"]),
    }}})
    fleet.start()
    row = fleet.wait_state("RequestCoordinator", "RUNNING")
    assert row["healthy"] is True and row["probe"] == f"tcp :{h2}"
    status = fleet.status()
    assert status["state"] == "ok"
    registry = fleet.agent("ServiceRegistry")
    assert (registry["state"], registry["healthy"], registry["restarts"]) == ("RUNNING", True, 0)
    assert registry["probe"] == (f"tcp :{main} (main port; nothing listens on health port "
                                 f"{health})")
    out = fleet.cli("status")
    assert out.returncode == 0, out.stderr
    assert "PROBE" in out.stdout and f"tcp :{main} (main port" in out.stdout
    assert "judged by a connect to its main port" in fleet.supervisor_log()
    # The agent opens its health port: that is what counts from the next probe on.
    later.touch()
    wait_until(lambda: fleet.agent("ServiceRegistry")["probe"] == f"tcp :{health}", 10,
               "the probe to move to the health port")
    assert fleet.agent("ServiceRegistry")["healthy"] is True


def test_agent_listening_on_neither_port_is_killed_after_its_start_timeout(fleet):
    main, health = free_port(), free_port()
    fleet.write_config({"pc2_services": [{
        "name": "Deaf", **agent(fleet, main, health, {}),
        "health": {**FAST_PROBES, "start_timeout_s": 0.5},
        "restart": {"max_failures": 1, "window_s": 60, "backoff": {"initial_s": 0.05}},
    }]})
    fleet.start()
    row = fleet.wait_state("Deaf", "FATAL")
    assert row["restarts"] == 1
    assert (f"not ready after 0.5 s: connection refused on 127.0.0.1:{main} (main port), "
            f"connection refused on 127.0.0.1:{health} (health port)") in row["reason"]
    assert "not ready after 0.5 s" in fleet.supervisor_log()
