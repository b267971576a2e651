"""The legacy launch contract with real agents: what the old launcher exported to every
agent (AGENT_NAME, AGENT_PORT, HEALTH_CHECK_PORT, AGENT_GROUP, then the agent's own
env_vars over them), with ports written as expressions and ${NAME} taken from the
supervisor's environment. Real agents read their ports from these variables: without
them a port edited in the YAML never reaches the agent."""

import json

from tests.integration.harness import free_port, wait_until

# Writes the variables it was given to a file named after it, then idles.
ECHO = """
import json, os, sys, time
names = ("AGENT_NAME", "AGENT_PORT", "HEALTH_CHECK_PORT", "AGENT_GROUP", "FROM_ENV",
         "AGENTVISOR_AGENT")
got = {n: os.environ[n] for n in names if n in os.environ}
with open(os.path.join(os.environ["OUT"], os.environ["AGENTVISOR_AGENT"] + ".json"), "w") as f:
    json.dump(got, f)
while True:
    time.sleep(1000)
"""


def test_every_agent_gets_the_four_variables_and_its_own_env_vars_win(fleet):
    port, health = free_port(), free_port()
    out = fleet.dir / "out"
    out.mkdir()
    script = fleet.script("echo.py", ECHO)
    no_probe = {"type": "none"}  # what is tested is the environment, not readiness
    fleet.write_config({
        "global_settings": {"environment": {"OUT": str(out)}},
        "agent_groups": {"core_services": {
            "ServiceRegistry": {
                "script_path": script, "health": no_probe,
                "port": f"${{PORT_OFFSET}}+{port - 1000}",  # PORT_OFFSET is 1000 below
                "health_check_port": health,
                "env_vars": {"FROM_ENV": "${LEGACY_HOME}/agents"},
            },
            "RequestCoordinator": {
                "script_path": script, "health": no_probe,
                "port": free_port(),
                # Its own env_vars win over the contract, as with the old launcher.
                "env_vars": {"AGENT_GROUP": "custom", "HEALTH_CHECK_PORT": "1"},
            },
        }},
        "pc2_services": [{"name": "MemoryDecayManager", "script_path": script, "health": no_probe}],
    })
    fleet.start(env={"PORT_OFFSET": "1000", "LEGACY_HOME": "/opt/legacy"})

    def seen(name):
        path = out / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() and path.stat().st_size else None

    registry = wait_until(lambda: seen("ServiceRegistry"), 15, "ServiceRegistry's environment")
    assert registry == {
        "AGENT_NAME": "ServiceRegistry", "AGENTVISOR_AGENT": "ServiceRegistry",
        "AGENT_PORT": str(port), "HEALTH_CHECK_PORT": str(health),
        "AGENT_GROUP": "core_services", "FROM_ENV": "/opt/legacy/agents",
    }
    coordinator = wait_until(lambda: seen("RequestCoordinator"), 15, "RequestCoordinator's environment")
    assert (coordinator["AGENT_GROUP"], coordinator["HEALTH_CHECK_PORT"]) == ("custom", "1")
    assert "FROM_ENV" not in coordinator
    # A flat list has no group, and an agent without ports gets no port variables.
    decay = wait_until(lambda: seen("MemoryDecayManager"), 15, "MemoryDecayManager's environment")
    assert decay == {"AGENT_NAME": "MemoryDecayManager", "AGENTVISOR_AGENT": "MemoryDecayManager"}
