"""The supervisor with real agent processes: start order, restarts, FATAL, stop."""

import signal

import psutil

from tests.integration.harness import free_port, pid_alive, wait_until

LISTENER = """
import os, socket, sys
port = int(os.environ["AGENT_PORT"])
for dep in filter(None, os.environ.get("NEEDS", "").split(",")):
    socket.create_connection(("127.0.0.1", int(dep)), timeout=1).close()  # crash if not up
srv = socket.create_server(("127.0.0.1", port))
print("listening", port, flush=True)
while True:
    srv.accept()[0].close()
"""

CRASHER = """
import sys
print("crashing", flush=True)
sys.exit(3)
"""


def listener(fleet, port, needs=(), **extra):
    return {"script_path": fleet.script("listener.py", LISTENER), "port": port,
            "env_vars": {"AGENT_PORT": str(port), "NEEDS": ",".join(map(str, needs))}, **extra}


def test_agents_start_in_dependency_order_and_report_status(fleet):
    a, b, c = free_port(), free_port(), free_port()
    fleet.write_config({
        "global_settings": {"health_checks": {"interval_seconds": 1, "timeout_seconds": 1,
                                              "retries": 3}},
        "agent_groups": {"core": {
            # Declared dependants first: order must come from dependencies, not the file.
            "Coordinator": listener(fleet, c, needs=(b,), dependencies=["Registry"],
                                    required=True),
            "Registry": listener(fleet, b, needs=(a,), dependencies=["Store"], required=True),
            "Store": listener(fleet, a, required=True),
        }},
    })
    fleet.start()
    for name in ("Store", "Registry", "Coordinator"):
        fleet.wait_state(name, "RUNNING")
    status = fleet.status()
    assert status["host"] == "TestHost"
    assert status["state"] == "ok"
    for row in status["agents"]:
        # A dependant started before its dependency would have crashed and restarted.
        assert row["restarts"] == 0, row
        assert row["healthy"] is True
        assert psutil.Process(row["pid"]).is_running()
        assert set(row) >= {"name", "state", "pid", "restarts", "healthy", "uptime_s",
                            "last_exit", "reason"}
    out = fleet.cli("status")
    assert out.returncode == 0, out.stderr
    assert "Coordinator" in out.stdout and "RUNNING" in out.stdout


def test_crash_loop_restarts_then_goes_fatal_and_operator_start_clears_it(fleet):
    fleet.write_config({"pc2_services": [{
        "name": "Crasher", "script_path": fleet.script("crasher.py", CRASHER),
        "required": True,
        "restart": {"policy": "always", "max_failures": 3, "window_s": 60,
                    "backoff": {"initial_s": 0.05, "max_s": 0.2, "jitter": 0}},
    }]})
    fleet.start()
    row = fleet.wait_state("Crasher", "FATAL")
    assert row["restarts"] == 3
    assert "FATAL" in row["reason"] and "exited with status 3" in row["last_exit"]
    out = fleet.cli("status")
    assert out.returncode == 1  # a required agent is FATAL: the host is degraded
    assert "degraded" in out.stdout
    # An operator start clears FATAL: it gets a fresh budget of restarts.
    out = fleet.cli("start", "Crasher")
    assert out.returncode == 1  # it cannot stay up, and the command says so
    row = fleet.wait_state("Crasher", "FATAL")
    assert row["restarts"] >= 6


def test_fatal_limit_holds_with_start_s_zero(fleet):
    # supervisord's startretries never triggers with startsecs=0; ours must.
    fleet.write_config({"pc2_services": [{
        "name": "Crasher", "script_path": fleet.script("crasher.py", CRASHER),
        "restart": {"start_s": 0, "max_failures": 2, "window_s": 60},
    }]})
    fleet.start()
    row = fleet.wait_state("Crasher", "FATAL")
    assert row["restarts"] == 2


def test_on_failure_policy_leaves_a_clean_exit_alone(fleet):
    fleet.write_config({"pc2_services": [{
        "name": "OneShot", "script_path": fleet.script("oneshot.py", "print('done')\n"),
        "restart": "on-failure",
    }]})
    fleet.start()
    row = fleet.wait_state("OneShot", "EXITED")
    assert row["restarts"] == 0 and row["last_exit"] == "exited with status 0"


def test_stop_ends_the_whole_process_group_even_a_child_ignoring_sigterm(fleet):
    fleet.write_config({"pc2_services": [{
        "name": "Forker", "script_path": fleet.script("forker.py", """
            import os, signal, subprocess, sys, time
            child = subprocess.Popen([sys.executable, "-c",
                "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "print('child up', flush=True); time.sleep(1000)"])
            print("child", child.pid, flush=True)
            time.sleep(1000)
        """), "restart": {"stop_grace_s": 0.5},
    }]})
    fleet.start()
    row = fleet.wait_state("Forker", "RUNNING")
    leader = psutil.Process(row["pid"])
    child = wait_until(lambda: leader.children(), 10, "the forked child")[0]
    out = fleet.cli("stop", "Forker")
    assert out.returncode == 0, out.stderr + out.stdout
    assert "STOPPED" in out.stdout
    assert not pid_alive(leader.pid)
    wait_until(lambda: not pid_alive(child.pid), 5, "the SIGTERM-ignoring child to be killed")


def test_sigterm_stops_agents_in_reverse_order_and_exits_zero(fleet):
    record = fleet.dir / "stops.txt"
    body = f"""
        import os, signal, sys, time
        def bye(*_):
            with open({str(record)!r}, "a") as f:
                f.write(os.environ["AGENTVISOR_AGENT"] + "\\n")
            sys.exit(0)
        signal.signal(signal.SIGTERM, bye)
        while True:
            time.sleep(1)
    """
    script = fleet.script("polite.py", body)
    fleet.write_config({"pc2_services": [
        {"name": "Base", "script_path": script, "restart": {"start_s": 0.1}},
        {"name": "Middle", "script_path": script, "dependencies": ["Base"],
         "restart": {"start_s": 0.1}},
        {"name": "Top", "script_path": script, "dependencies": ["Middle"],
         "restart": {"start_s": 0.1}},
    ]})
    fleet.start()
    fleet.wait_state("Top", "RUNNING")
    pids = [fleet.agent(n)["pid"] for n in ("Base", "Middle", "Top")]
    assert fleet.stop() == 0
    assert record.read_text().split() == ["Top", "Middle", "Base"]
    assert not any(pid_alive(p) for p in pids)


def test_agents_die_with_a_killed_supervisor_and_leftovers_are_reaped_on_restart(fleet):
    fleet.write_config({"pc2_services": [{
        "name": "Forker", "script_path": fleet.script("forker.py", """
            import subprocess, sys, time
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"])
            time.sleep(1000)
        """), "restart": {"start_s": 0.1},
    }]})
    fleet.start()
    row = fleet.wait_state("Forker", "RUNNING")
    leader = psutil.Process(row["pid"])
    grandchild = wait_until(lambda: leader.children(), 10, "the forked child")[0]
    # Give the supervisor a moment to record the group: wait for its record file.
    wait_until(lambda: str(row["pid"]) in (fleet.runtime_dir / "agents.json").read_text()
               if (fleet.runtime_dir / "agents.json").exists() else False, 5, "agents.json")
    fleet.proc.send_signal(signal.SIGKILL)
    fleet.proc.wait()
    # PR_SET_PDEATHSIG: the kernel kills the agent when its supervisor dies.
    wait_until(lambda: not pid_alive(leader.pid), 5, "the agent to die with its supervisor")
    assert pid_alive(grandchild.pid)  # forked children escape PDEATHSIG...
    fleet.start()
    # ...and the next supervisor kills the group its predecessor left behind.
    wait_until(lambda: not pid_alive(grandchild.pid), 10, "the leftover to be killed")
    assert "left by a previous supervisor: killed Forker: process group" in fleet.supervisor_log()
    fleet.wait_state("Forker", "RUNNING")


def test_unhealthy_agent_is_restarted_with_the_reason(fleet):
    port = free_port()
    flag = fleet.dir / "hang"
    fleet.write_config({"pc2_services": [{
        "name": "Flaky", "port": port,
        "script_path": fleet.script("flaky.py", f"""
            import os, socket, time
            srv = socket.create_server(("127.0.0.1", {port}))
            srv.settimeout(0.05)
            while not os.path.exists({str(flag)!r}):
                try:
                    srv.accept()[0].close()
                except socket.timeout:
                    pass
            srv.close()      # stops answering but stays alive: only a probe notices
            time.sleep(1000)
        """),
        "health": {"interval_s": 0.1, "timeout_s": 0.5, "retries": 3},
        "restart": {"backoff": {"initial_s": 0.05}},
    }]})
    fleet.start()
    first = fleet.wait_state("Flaky", "RUNNING")
    flag.touch()
    wait_until(lambda: fleet.agent("Flaky")["restarts"] >= 1, 10, "a restart")
    flag.unlink()
    row = fleet.wait_state("Flaky", "RUNNING")
    assert row["pid"] != first["pid"]
    assert "health probe failed 3 times" in fleet.supervisor_log()


def test_memory_limit_restarts_the_agent(fleet):
    fleet.write_config({
        "resource_interval_s": 0.1,
        "pc2_services": [{
            "name": "Leaky", "resource_limits": {"memory_mb": 60},
            "restart": {"start_s": 0.1, "backoff": {"initial_s": 0.05}},
            "script_path": fleet.script("leaky.py", """
                import time
                hog = bytearray(120 * 1024 * 1024)   # touch every page so it is resident
                for i in range(0, len(hog), 4096):
                    hog[i] = 1
                time.sleep(1000)
            """),
        }]})
    fleet.start()
    wait_until(lambda: fleet.agent("Leaky")["restarts"] >= 1, 15, "a restart for memory")
    assert "over limit 60 MB" in fleet.supervisor_log()


def test_logs_go_to_a_file_per_agent_and_the_cli_shows_them(fleet):
    fleet.write_config({"pc2_services": [{
        "name": "Talker", "restart": {"start_s": 0.1},
        "script_path": fleet.script("talker.py", """
            import sys, time
            print("hello from stdout")
            print("hello from stderr", file=sys.stderr)
            time.sleep(1000)
        """),
    }]})
    fleet.start()
    fleet.wait_state("Talker", "RUNNING")
    log = fleet.logs_dir / "Talker.log"
    wait_until(lambda: log.exists() and "stderr" in log.read_text(), 5, "the log file")
    out = fleet.cli("logs", "Talker")
    assert out.returncode == 0
    assert "hello from stdout" in out.stdout and "hello from stderr" in out.stdout


def test_an_agent_waiting_for_a_failed_dependency_says_so_and_stops_at_once(fleet):
    fleet.write_config({"pc2_services": [
        {"name": "Broken", "script_path": fleet.script("crasher.py", CRASHER),
         "restart": {"max_failures": 0}},
        {"name": "Dependant", "script_path": fleet.script("listener.py", LISTENER),
         "dependencies": ["Broken"]},
    ]})
    fleet.start()
    fleet.wait_state("Broken", "FATAL")
    row = wait_until(lambda: (lambda r: r if r["reason"].startswith("blocked") else None)(
        fleet.agent("Dependant")), 5, "the dependant to say it is blocked")
    assert row["state"] == "STOPPED" and row["pid"] is None
    assert row["reason"] == f"blocked: dependency Broken is FATAL ({fleet.agent('Broken')['reason']})"
    out = fleet.cli("stop", "Dependant", timeout_s=10)
    assert out.returncode == 0, out.stdout + out.stderr
    assert fleet.stop(timeout_s=10) == 0
