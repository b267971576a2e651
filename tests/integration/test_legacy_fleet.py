"""Zero-code adoption, end to end: the users' two legacy files run as they are.

`tests/fleet/` is laid out like the users' repository: MainPC's nested
`main_pc_code/config/startup_config.yaml`, PC2's flat `pc2_code/config/startup_config.yaml`,
each with an `agentvisor.yaml` overlay beside it holding only native settings, and one
stand-in script per agent (`tests/fleet/common/standin.py`) that behaves like the real
ones: it takes its ports from AGENT_PORT / HEALTH_CHECK_PORT or falls back to defaults
baked into its code, a third of them serve no health server although their entry names
a `health_check_port`, and each reports what it was given.

For each PC this proves what an operator adopting agentvisor would check:
- `validate` accepts the legacy file alone, and with its overlay, with warnings only;
- `run` (in a network namespace of its own, so the fixed ports cannot meet anything on
  this machine) brings every agent to RUNNING and healthy, each on the port its YAML
  expression evaluates to with PORT_OFFSET set, with the secret from the store, its
  environment references expanded, and the main-port probe shown for the agents without
  a health server; SIGTERM stops everything and exits 0;
- none of the fleet's files changed (by hash);
- a copy with a port clash hidden behind an expression and a dependency cycle fails
  `validate`, naming both.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from supervisor.control.client import Unreachable, request
from tests.integration.harness import parse_json, pid_alive, wait_until

ROOT = Path(__file__).resolve().parents[2]
FLEET = ROOT / "tests" / "fleet"  # the users' repository root, as the layout implies
# Shifts every "${PORT_OFFSET}+N" port (5000-9999 in the files) to 15000-19999, clear of
# the fixed int ports: a port that moved proves the expression was evaluated.
PORT_OFFSET = 10000
# What the operator's shell has in PYTHONPATH; the files append to it.
PYTHONPATH = "/opt/ai_system/site"
ALL_RUNNING_S = 60  # ~25 agents in dependency order, on 2 busy cores
STOP_S = 30
_OFFSET_PORT = re.compile(r"\$\{PORT_OFFSET\}\+(\d+)")
_HEALTH_SERVER = re.compile(r"health_server=(True|False)")


@dataclass(frozen=True)
class Pc:
    name: str
    code_dir: str  # the folder its config and agents live in
    host: str  # the overlay's `host:`
    # The variant: (text in the file, replacement) pairs, and what validate must name.
    clash: tuple[str, str]
    clash_names: tuple[str, ...]  # the expression, its value, the port's owner
    cycle: tuple[str, str]
    cycle_names: tuple[str, ...]

    @property
    def legacy(self) -> Path:
        return FLEET / self.code_dir / "config" / "startup_config.yaml"

    @property
    def overlay(self) -> Path:
        return FLEET / self.code_dir / "config" / "agentvisor.yaml"


PCS = {
    "mainpc": Pc(
        "mainpc", "main_pc_code", "mainpc",
        # Executor's expression made to land on ModelManagerAgent's fixed int port.
        clash=('port: "${PORT_OFFSET}+5606"', 'port: "${PORT_OFFSET}+5570"'),
        clash_names=("${PORT_OFFSET}+5570", "5570", "ModelManagerAgent"),
        # The registry made to wait for the twin, which waits for the registry.
        cycle=("dependencies: []  # first to start",
               "dependencies: [SystemDigitalTwin]  # first to start"),
        cycle_names=("ServiceRegistry", "SystemDigitalTwin"),
    ),
    "pc2": Pc(
        "pc2", "pc2_code", "pc2",
        # TutoringAgent's int port turned into an expression that lands on TutorAgent's.
        clash=("port: 7131,", 'port: "${PORT_OFFSET}+7108",'),
        clash_names=("${PORT_OFFSET}+7108", "7108", "TutorAgent"),
        cycle=("dependencies: [],  # nothing: it starts first",
               "dependencies: [ContextManager],  # nothing: it starts first"),
        cycle_names=("MemoryOrchestratorService", "ContextManager"),
    ),
}


@dataclass(frozen=True)
class Agent:
    """One agent as the legacy file declares it, read by PyYAML on its own (anchors and
    merges resolved), independently of agentvisor's loader."""

    name: str
    group: str | None
    port: int | None  # evaluated
    health_check_port: int | None  # evaluated
    script: Path  # where the old launcher found it
    health_server: bool  # whether its stand-in serves one
    env_vars: dict


def fleet_agents(legacy: Path, offset: int) -> list[Agent]:
    data = yaml.safe_load(legacy.read_text())
    if "agent_groups" in data:
        entries = [(name, group, fields) for group, agents in data["agent_groups"].items()
                   for name, fields in agents.items()]
    else:
        entries = [(fields["name"], None, fields) for fields in data["pc2_services"]]
    agents = []
    for name, group, fields in entries:
        script = FLEET / fields["script_path"]
        if not script.is_file():  # the old launcher's second try
            script = FLEET / "main_pc_code" / fields["script_path"]
        flag = _HEALTH_SERVER.search(script.read_text())
        assert flag, f"{script}: a stand-in says whether it has a health server"
        agents.append(Agent(
            name, group, evaluate(fields.get("port"), offset),
            evaluate(fields.get("health_check_port"), offset), script,
            flag.group(1) == "True", fields.get("env_vars") or {}))
    return agents


def evaluate(written, offset: int) -> int | None:
    """The port a legacy value means, for the two forms the fleet's files use."""
    if written is None or isinstance(written, int):
        return written
    match = _OFFSET_PORT.fullmatch(written)
    assert match, f"the test fleet writes ports as ints or \"${{PORT_OFFSET}}+N\", not {written!r}"
    return offset + int(match.group(1))


def fleet_hashes() -> dict[str, str]:
    """sha256 of every file of the fleet: the legacy files and overlays above all, and
    proof that nothing (a __pycache__, a log) was written into the repository."""
    return {str(p.relative_to(FLEET)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(FLEET.rglob("*")) if p.is_file()}


@pytest.fixture(params=sorted(PCS))
def pc(request) -> Pc:
    return PCS[request.param]


@pytest.fixture
def unchanged(pc):
    """The fleet's files are byte for byte the same after the test as before it."""
    before = fleet_hashes()
    assert pc.legacy.name in {Path(k).name for k in before}
    yield
    after = fleet_hashes()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"files of the test fleet changed (added, removed or edited): {changed}"


def clean_environment(**extra: str) -> dict[str, str]:
    """This process's environment without what would change the outcome, plus extra."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PORT_OFFSET", "NATS_PASSWORD", "CREDENTIALS_DIRECTORY",
                        "NOTIFY_SOCKET")
           and not k.startswith("AGENTVISOR_")}
    # The operator's shell: PYTHONPATH and PWD are what the files' ${...} refer to.
    env.update(PYTHONPATH=PYTHONPATH, PWD=str(ROOT), PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


def validate(legacy: Path, *args: str, env: dict[str, str]) -> tuple[int, dict, str]:
    """`agentvisor validate --offline --json`: (exit status, the file's report, stderr).
    The report's problems are errors and warnings, each with its severity."""
    done = subprocess.run(
        [sys.executable, "-m", "supervisor.cli", "validate", str(legacy), "--offline",
         "--json", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip(), (
        f"validate printed no report (exit {done.returncode}): {done.stderr}")
    report = parse_json(done.stdout)
    assert len(report) == 1, report
    return done.returncode, report[0], done.stderr


def errors(problems: list[dict]) -> list[dict]:
    return [p for p in problems if p.get("severity", "error") != "warning"]


def show(problems: list[dict]) -> str:
    return "\n".join(f"{p.get('severity', 'error')}: {p['file']}:{p['line']} "
                     f"{p['location']} ({p['agent']}): {p['message']}" for p in problems)


# --- validate ---------------------------------------------------------------------


def test_validate_accepts_the_legacy_file_as_it_is(pc, unchanged):
    """The file alone, as an operator first tries it: PORT_OFFSET unset (0), PYTHONPATH
    and NATS_PASSWORD in the environment. Valid; what it says is warnings, among them the
    keys agentvisor ignores and the credential taken from the environment."""
    secret = secrets.token_urlsafe(18)
    code, report, stderr = validate(pc.legacy, env=clean_environment(NATS_PASSWORD=secret))
    problems = report["problems"]
    assert code == 0 and not errors(problems), (
        f"validate {pc.legacy} exited {code}:\n{show(problems)}\n{stderr}")
    messages = [p["message"] for p in problems]
    assert any("unknown key" in m for m in messages), (
        "the keys agentvisor has no use for (features, docker_groups, pc2_network, ...) are "
        f"said once each as warnings:\n{show(problems)}")
    assert any("NATS_PASSWORD" in m for m in messages), (
        f"the credential taken from the environment is a warning:\n{show(problems)}")
    assert secret not in json.dumps(problems) + stderr


def test_validate_accepts_it_with_its_overlay(pc, unchanged):
    """The legacy file with the overlay beside it: still valid with warnings only, the
    secret now declared in the store (no NATS_PASSWORD in the environment needed), and
    project_root inferred from the layout."""
    code, report, stderr = validate(pc.legacy, "--overlay", str(pc.overlay),
                                    env=clean_environment())
    problems = report["problems"]
    assert code == 0 and not errors(problems), (
        f"validate {pc.legacy} --overlay {pc.overlay} exited {code}:\n{show(problems)}\n{stderr}")
    assert report.get("project_root") == str(FLEET), (
        f"the root inferred from <root>/{pc.code_dir}/config/, and said: {report}")


def test_a_hidden_clash_and_a_cycle_fail_validation(pc, unchanged, tmp_path):
    """A copy of the fleet where one port expression evaluates to another agent's int
    port and two agents depend on each other: exit 1, and the output names the
    expression, its value, the agent that holds the port, and the cycle."""
    copy = tmp_path / "fleet"
    shutil.copytree(FLEET, copy)
    legacy = copy / pc.legacy.relative_to(FLEET)
    text = legacy.read_text()
    for old, new in (pc.clash, pc.cycle):
        assert text.count(old) == 1, f"{old!r} is written once in {pc.legacy}"
        text = text.replace(old, new)
    legacy.write_text(text)
    secret = secrets.token_urlsafe(18)
    code, report, stderr = validate(legacy, env=clean_environment(NATS_PASSWORD=secret))
    problems = report["problems"]
    assert code == 1, f"validate exited {code}:\n{show(problems)}\n{stderr}"
    found = errors(problems)
    clash = [p for p in found if all(n in p["message"] for n in pc.clash_names)]
    assert clash, f"an error names {pc.clash_names}:\n{show(found)}"
    cycle = [p for p in found if "cycle" in p["message"]
             and all(n in p["message"] for n in pc.cycle_names)]
    assert cycle, f"an error names the cycle {pc.cycle_names}:\n{show(found)}"
    assert len(found) == 2, f"those two, and nothing else, are wrong:\n{show(found)}"


# --- run --------------------------------------------------------------------------


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root for a network namespace of its own (unshare --net)"
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def _status(runtime_dir: Path) -> dict | None:
    try:
        return request(runtime_dir, {"cmd": "status"}, timeout_s=10)
    except (Unreachable, OSError):
        return None


def test_the_fleet_runs_unchanged(pc, unchanged, tmp_path):
    """`run --config <legacy> --overlay <overlay>`, in a network namespace of its own,
    with PORT_OFFSET set and the secret in a store folder: every agent RUNNING and
    healthy on its evaluated ports, with what the old launcher gave it; SIGTERM stops
    them all and exits 0."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    agents = fleet_agents(pc.legacy, PORT_OFFSET)
    declared = {a.name for a in agents}
    runtime_dir, logs_dir, reports = tmp_path / "run", tmp_path / "logs", tmp_path / "reports"
    reports.mkdir()
    # The store: a folder with one file per secret, mode 0400. tmp_path is on disk, which a
    # real host's store must not be: this test's own overlay allows it.
    store = tmp_path / "secrets"
    store.mkdir(mode=0o700)
    secret = secrets.token_urlsafe(18)
    (store / "NATS_PASSWORD").write_text(secret)
    (store / "NATS_PASSWORD").chmod(0o400)
    test_overlay = tmp_path / "test-overlay.yaml"
    test_overlay.write_text(yaml.safe_dump(
        {"secrets": {"dir": str(store), "require_memory_fs": False}}))
    env = clean_environment(
        PORT_OFFSET=str(PORT_OFFSET), FLEET_REPORT_DIR=str(reports),
        FLEET_SECRET_SHA256=hashlib.sha256(secret.encode()).hexdigest())
    log_path = tmp_path / "supervisor.log"
    command = [
        # A fresh network namespace: the fleet's fixed ports are free there, whatever
        # runs on this machine; the control socket is a file, reachable from here.
        "unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
        sys.executable, "-m", "supervisor.cli", "run",
        "--config", str(pc.legacy), "--overlay", str(pc.overlay), "--overlay", str(test_overlay),
        "--runtime-dir", str(runtime_dir), "--logs-dir", str(logs_dir), "--log-level", "debug",
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    pids: set[int] = set()

    def log_text() -> str:
        return log_path.read_text(errors="replace")[-6000:]

    def states() -> str:
        status = _status(runtime_dir)
        if status is None:
            return f"no answer from the supervisor (exit {proc.poll()}); its log:\n{log_text()}"
        rows = status["agents"]
        missing = sorted(declared - {a["name"] for a in rows})
        return "\n".join([f"not listed: {missing}"] * bool(missing) + [
            f"{a['name']}: {a['state']} healthy={a['healthy']} {a.get('reason') or ''}"
            for a in rows if a["state"] != "RUNNING" or not a["healthy"]])

    try:
        def all_up():
            assert proc.poll() is None, f"the supervisor exited {proc.returncode}:\n{log_text()}"
            status = _status(runtime_dir)
            if status is None:
                return None
            rows = [a for a in status["agents"] if a["name"] in declared]
            # The sidecar is the supervisor's own first child, listed with the agents.
            up = (len(rows) == len(agents) and all(a["healthy"] for a in rows)
                  and all(a["state"] == "RUNNING" for a in status["agents"]))
            return status if up else None

        status = wait_until(all_up, ALL_RUNNING_S, lambda: "every agent RUNNING and healthy:\n"
                            + states())
        assert status["host"] == pc.host, "the overlay's host: is the host's name"
        pids.update(a["pid"] for a in status["agents"] if a["name"] in declared)
        # Every agent has reported (it writes its report once listening, before the probe
        # can pass), so the reports are complete here.
        found = {p.stem: json.loads(p.read_text()) for p in reports.glob("*.json")}
        assert sorted(found) == sorted(a.name for a in agents)
        for agent in agents:
            _check_report(agent, found[agent.name], pc, secret)
            pids.add(found[agent.name]["pid"])
        # What status --json, the operator's view, says about how each is judged.
        shown = subprocess.run(
            [sys.executable, "-m", "supervisor.cli", "status", "--json",
             "--runtime-dir", str(runtime_dir)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        rows = {a["name"]: a for a in parse_json(shown.stdout)["agents"]}
        for agent in agents:
            _check_probe(agent, rows[agent.name])
        for pid in pids:  # the secret is in the environment of those that use it, never argv
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            assert secret not in cmdline
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        for report in reports.glob("*.json"):  # agents the status never showed, too
            pids.add(json.loads(report.read_text())["pid"])
        survivors = [pid for pid in pids if pid_alive(pid)]
        for pid in survivors:  # never leave the fleet behind, whatever failed
            os.kill(pid, signal.SIGKILL)
    assert code == 0, f"the supervisor exited {code} on SIGTERM:\n{log_text()}"
    assert not survivors, f"agents still running after the supervisor exited: {survivors}"
    everything = log_path.read_text(errors="replace")
    for path in logs_dir.rglob("*"):
        if path.is_file():
            everything += path.read_text(errors="replace")
    assert "Traceback" not in everything, everything[-6000:]
    assert secret not in everything, "the secret's value never reaches a log"


def _check_report(agent: Agent, report: dict, pc: Pc, secret: str) -> None:
    """What the agent itself says it was given."""
    where = f"{agent.name} ({pc.name})"
    launch = report["launch"]
    assert launch["AGENT_NAME"] == agent.name, where
    if agent.port is not None:
        assert launch["AGENT_PORT"] == str(agent.port), (
            f"{where}: AGENT_PORT is the evaluated port ({report})")
        assert report["port"] == agent.port, f"{where}: listens on its evaluated port"
    else:
        assert report["port"] is None, f"{where}: has no port and opens none"
    if agent.health_check_port is not None:
        assert launch["HEALTH_CHECK_PORT"] == str(agent.health_check_port), where
        if agent.health_server:
            assert report["health_port"] == agent.health_check_port, where
    if agent.group is not None:  # MainPC's agent_groups
        assert launch["AGENT_GROUP"] == agent.group, where
    if "NATS_PASSWORD" in agent.env_vars:
        assert report["nats_password"] == "matches", (
            f"{where}: NATS_PASSWORD is the store's value, filled at spawn "
            f"(got: {report['nats_password']})")
    pythonpath = report["PYTHONPATH"] or ""
    assert "${" not in pythonpath and pythonpath.startswith(PYTHONPATH + ":"), (
        f"{where}: '${{PYTHONPATH}}:${{PWD}}/..' is expanded from the environment: {pythonpath!r}")
    expected_level = agent.env_vars.get("LOG_LEVEL", "INFO")  # its own env_vars win
    assert report["LOG_LEVEL"] == expected_level, where
    assert report["script"] == str(agent.script), f"{where}: ran the script the old launcher ran"
    assert report["cwd"] == str(FLEET), f"{where}: runs in the project root"
    assert secret not in json.dumps(report)


def _check_probe(agent: Agent, row: dict) -> None:
    """An agent without a health server is judged by its main port, and status says so."""
    probe = row.get("probe") or ""
    where = f"{agent.name}: probe {probe!r}"
    if agent.port is None and agent.health_check_port is None:
        assert probe == "none", where
    elif agent.health_server:
        assert f":{agent.health_check_port}" in probe and "main port" not in probe, where
    else:
        assert f":{agent.port}" in probe and "main port" in probe, where
