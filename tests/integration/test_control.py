"""The control socket and what operators do through it: reload, rollback, permissions,
systemd notifications."""

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from tests.integration.harness import ROOT, free_port, wait_until

SLEEPER = """
import time
print("up", flush=True)
while True:
    time.sleep(1000)
"""


def sleeper(fleet, **extra):
    return {"script_path": fleet.script("sleeper.py", SLEEPER), "restart": {"start_s": 0.1},
            **extra}


def test_reload_applies_only_the_difference_and_rollback_returns(fleet):
    fleet.write_config({"pc2_services": [
        {"name": "Keep", **sleeper(fleet)},
        {"name": "Change", **sleeper(fleet), "env_vars": {"MODE": "old"}},
        {"name": "Remove", **sleeper(fleet)},
    ]})
    fleet.start()
    for n in ("Keep", "Change", "Remove"):
        fleet.wait_state(n, "RUNNING")
    before = {a["name"]: a["pid"] for a in fleet.status()["agents"]}

    fleet.write_config({"pc2_services": [
        {"name": "Keep", **sleeper(fleet)},
        {"name": "Change", **sleeper(fleet), "env_vars": {"MODE": "new"}},
        {"name": "Add", **sleeper(fleet)},
    ]})
    out = fleet.cli("reload")
    assert out.returncode == 0, out.stderr
    assert "added: Add" in out.stdout and "removed: Remove" in out.stdout
    assert "changed: Change" in out.stdout
    fleet.wait_state("Add", "RUNNING")
    after = {a["name"]: a for a in fleet.status()["agents"]}
    assert set(after) == {"Keep", "Change", "Add"}
    assert after["Keep"]["pid"] == before["Keep"]  # untouched: same process
    fleet.wait_state("Change", "RUNNING")
    new_change = fleet.agent("Change")["pid"]
    assert new_change != before["Change"]
    assert open(f"/proc/{new_change}/environ", "rb").read().count(b"MODE=new") == 1
    assert not os.path.exists(f"/proc/{before['Remove']}")

    # An invalid file changes nothing and says why, with the location.
    fleet.config_path.write_text(fleet.config_path.read_text().replace(
        "name: Add", "name: Add\n  port: 70000"))
    out = fleet.cli("reload")
    assert out.returncode == 1
    assert "nothing was changed" in out.stderr and "70000" in out.stderr
    assert fleet.agent("Keep")["pid"] == before["Keep"]
    assert fleet.agent("Add")["state"] == "RUNNING"

    out = fleet.cli("rollback")
    assert out.returncode == 0, out.stderr
    fleet.wait_state("Remove", "RUNNING")
    names = {a["name"] for a in fleet.status()["agents"]}
    assert names == {"Keep", "Change", "Remove"}
    assert fleet.agent("Keep")["pid"] == before["Keep"]


def test_operator_restart_and_stop_act_and_wait(fleet):
    fleet.write_config({"pc2_services": [{"name": "Svc", **sleeper(fleet)}]})
    fleet.start()
    first = fleet.wait_state("Svc", "RUNNING")
    out = fleet.cli("restart", "Svc", "--json")
    assert out.returncode == 0, out.stderr
    row = yaml.safe_load(out.stdout)
    assert row["state"] == "RUNNING" and row["pid"] != first["pid"]
    out = fleet.cli("stop", "Svc")
    assert out.returncode == 0 and "STOPPED" in out.stdout
    assert fleet.agent("Svc")["state"] == "STOPPED"
    out = fleet.cli("start", "Nope")
    assert out.returncode == 1 and "no agent named 'Nope'" in out.stderr


def test_status_json_and_exit_code_when_no_supervisor_runs(fleet):
    out = fleet.cli("status", "--json")
    assert out.returncode == 3
    assert "no supervisor is running" in out.stderr


def test_control_socket_is_private_and_refuses_other_users(fleet):
    if os.geteuid() == 0:
        # Another user must be able to reach the socket for the peer-credential check to
        # be what refuses it: a world-traversable runtime dir outside pytest's 0700 tmp.
        fleet.runtime_dir = Path(tempfile.mkdtemp(prefix="agentvisor-test-"))
        os.chmod(fleet.runtime_dir, 0o755)
    fleet.write_config({"pc2_services": [{"name": "Svc", **sleeper(fleet)}]})
    fleet.start()
    sock = fleet.runtime_dir / "control.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    if os.geteuid() != 0 or not os.path.exists("/usr/bin/python3"):
        return  # only root can pose as another user; the mode check above still holds
    os.chmod(sock, 0o666)  # widen the mode: now only SO_PEERCRED stands in the way
    probe = subprocess.run(
        ["/usr/bin/python3", "-c",
         "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]);"
         "s.sendall(b'{\"cmd\": \"status\"}\\n'); print(s.recv(4096).decode())", str(sock)],
        capture_output=True, text=True, user=65534, group=65534, timeout=10, cwd="/")
    try:
        assert "permission denied" in probe.stdout, probe.stderr
        wait_until(lambda: "refused control connection from uid 65534" in fleet.supervisor_log(),
                   5, "the refusal in the log")
    finally:
        fleet.stop()
        shutil.rmtree(fleet.runtime_dir, ignore_errors=True)


def test_a_second_supervisor_on_the_same_runtime_dir_is_refused(fleet):
    fleet.write_config({"pc2_services": [{"name": "Svc", **sleeper(fleet)}]})
    fleet.start()
    out = subprocess.run([sys.executable, "-m", "supervisor.cli", "run", "--config",
                          str(fleet.config_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 1
    assert "already running" in out.stderr
    assert fleet.agent("Svc")["state"] == "RUNNING"


def test_systemd_notify_ready_status_watchdog_and_agents_cannot_notify(fleet, tmp_path):
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(15)
    port = free_port()
    fleet.write_config({"pc2_services": [{
        "name": "Svc", "required": True, "port": port,
        "script_path": fleet.script("env_dump.py", f"""
            import os, socket, time
            open(os.path.join({str(tmp_path)!r}, "agent_env"), "w").write(
                "\\n".join(sorted(os.environ)))
            srv = socket.create_server(("127.0.0.1", {port}))
            while True:
                srv.accept()[0].close()
        """)}]})
    fleet.start(env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "400000"})
    seen = []
    while not any(m.startswith("READY=1") for m in seen):
        seen.append(notify.recv(4096).decode())
    # READY comes only once the required agent is up, with the status in the same message.
    assert fleet.agent("Svc")["state"] == "RUNNING"
    assert "STATUS=ok: 1 running" in seen[-1].splitlines(), seen
    while not any("WATCHDOG=1" in m for m in seen):
        seen.append(notify.recv(4096).decode())
    env_names = (tmp_path / "agent_env").read_text().split()
    assert "NOTIFY_SOCKET" not in env_names and "WATCHDOG_USEC" not in env_names
    assert "AGENTVISOR_AGENT" in env_names
    fleet.stop()
    notify.settimeout(5)
    while not any("STOPPING=1" in m for m in seen):
        seen.append(notify.recv(4096).decode())


# Requests a careless or hostile client may send: each must get an error answer.
MALFORMED = {
    "list cmd": b'{"cmd": ["status"]}\n',
    "object cmd": b'{"cmd": {"status": 1}}\n',
    "number": b"42\n",
    "null": b"null\n",
    "list": b'["status"]\n',
    "list name": b'{"cmd": "stop", "name": ["Svc"]}\n',
    "object action": b'{"cmd": "breaker", "action": {"a": 1}, "name": "Hub"}\n',
    "deep nesting": b'{"cmd": ' + b"[" * 20000 + b"]" * 20000 + b"}\n",
    "huge": b'{"cmd": "status", "pad": "' + b"x" * 300_000 + b'"}\n',
    "not UTF-8": b'{"cmd": "\xff\xfe"}\n',
    "not JSON": b"status please\n",
    "empty line": b"\n",
}


def raw_request(path, data: bytes, timeout_s: float = 10) -> dict:
    """Send bytes as they are and read one reply line, whatever else the server does: a
    server that answers a huge request early and closes makes our send fail, and the
    reply is still there to read."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout_s)
    try:
        s.connect(str(path))
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = b""
        while not reply.endswith(b"\n"):
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            reply += chunk
    finally:
        s.close()
    assert reply, f"no answer to {data[:60]!r}"
    return json.loads(reply)


def test_malformed_control_requests_get_an_error_and_the_servers_keep_answering(fleet):
    fleet.write_config({
        "upstreams": {"Hub": {"address": f"127.0.0.1:{free_port()}", "protocol": "http"}},
        "sidecar": {"metrics_listen": f"127.0.0.1:{free_port()}"},
        "pc2_services": [{"name": "Svc", **sleeper(fleet)}]})
    fleet.start()
    fleet.wait_state("Svc", "RUNNING")
    fleet.wait_state("sidecar", "RUNNING")
    sockets = {"supervisor": fleet.runtime_dir / "control.sock",
               "sidecar": fleet.runtime_dir / "sidecar.sock"}
    good = {"supervisor": b'{"cmd": "status"}\n', "sidecar": b'{"cmd": "breakers"}\n'}
    for who, path in sockets.items():
        for what, data in MALFORMED.items():
            reply = raw_request(path, data)
            assert reply["ok"] is False and reply["error"], (who, what, reply)
        assert raw_request(path, good[who])["ok"] is True, who
    assert fleet.agent("Svc")["state"] == "RUNNING"  # a list as a name stopped nothing
    assert "Traceback" not in fleet.supervisor_log()
    sidecar_log = fleet.logs_dir / "sidecar.log"
    assert "Traceback" not in (sidecar_log.read_text() if sidecar_log.exists() else "")
