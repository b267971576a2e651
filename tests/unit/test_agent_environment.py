"""What an agent's environment is built from at spawn, decided at load: a ${NAME} in the
secret store is read from its file, any other ${NAME} is the supervisor's environment,
${PWD} without a PWD (systemd sets none) is the agent's working directory, and the
legacy launch contract sits under the agent's own env_vars."""

from textwrap import dedent

import pytest

from supervisor import environment
from supervisor.config import load
from supervisor.process import SpawnError


class NoTraffic:
    """The agent intercepts nothing: no proxy variables, no upstreams."""

    def check_spawn(self, spec):
        pass

    def proxy_environment(self, spec):
        return {}

    def upstream_address(self, config, name):
        raise AssertionError("no upstream is referenced")


@pytest.fixture
def host(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "NATS_PASSWORD").write_text("s3cret\n")
    (store / "NATS_PASSWORD").chmod(0o400)
    (tmp_path / "agents").mkdir()
    (tmp_path / "agents" / "registry.py").touch()
    path = tmp_path / "startup_config.yaml"
    path.write_text(dedent("""\
        secrets: {dir: store, require_memory_fs: false}
        global_settings:
          environment: {PYTHONPATH: '${PYTHONPATH}:${PWD}/..'}
        agent_groups:
          core_services:
            ServiceRegistry:
              script_path: agents/registry.py
              port: "${PORT_OFFSET}+7200"
              cwd: agents
              env_vars: {NATS_URL: "nats://agent:${NATS_PASSWORD}@localhost:4222"}
        """))
    return load(path, check_machine=False, environ={"PYTHONPATH": "/opt/lib"},
                runtime_dir=tmp_path / "run")


def test_secrets_from_the_store_the_rest_from_the_environment_pwd_is_the_cwd(host, tmp_path, monkeypatch):
    monkeypatch.delenv("PWD", raising=False)
    spec = host.agent("ServiceRegistry")
    assert spec.secret_names == ("NATS_PASSWORD",)
    env = environment.agent_environment(host, spec, {"PYTHONPATH": "/opt/lib"}, NoTraffic())
    assert env["NATS_URL"] == "nats://agent:s3cret@localhost:4222"
    assert env["PYTHONPATH"] == f"/opt/lib:{tmp_path / 'agents'}/.."
    assert (env["AGENT_NAME"], env["AGENT_PORT"], env["AGENT_GROUP"]) == (
        "ServiceRegistry", "7200", "core_services")
    assert "HEALTH_CHECK_PORT" not in env  # none in the file: the agent's own default holds
    # A PWD the supervisor does have is used as it is.
    env = environment.agent_environment(host, spec, {"PYTHONPATH": "/x", "PWD": "/srv"}, NoTraffic())
    assert env["PYTHONPATH"] == "/x:/srv/.."


def test_a_variable_gone_from_the_environment_fails_that_spawn_with_its_name(host, monkeypatch):
    monkeypatch.delenv("PYTHONPATH", raising=False)
    with pytest.raises(SpawnError, match=r"\$\{PYTHONPATH\} in its env_vars is not set"):
        environment.agent_environment(host, host.agent("ServiceRegistry"), {}, NoTraffic())
