"""The `agentvisor` command.

Exit codes mean the same thing for every subcommand:
  0  success (config valid, host ok, agent running)
  1  the thing asked about is not well (invalid config, host degraded, agent not running)
  2  bad usage, or a file that cannot be read
  3  no supervisor answers on the runtime directory
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_BAD, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3

DESCRIPTION = """\
Run unmodified agents under a per-host supervisor: dependency-ordered start, restarts with
backoff, health probes, resource limits, a control socket, systemd integration.
"""

EPILOG = """\
exit codes: 0 ok; 1 not ok (invalid config, degraded host, agent not running);
            2 bad usage or unreadable file; 3 no supervisor is running

examples:
  agentvisor validate /etc/agentvisor/mainpc.yaml
  agentvisor run --config /etc/agentvisor/mainpc.yaml
  agentvisor status --json
  agentvisor restart ServiceRegistry
  agentvisor start --group core_services
  agentvisor logs ServiceRegistry -f
  agentvisor breakers
  agentvisor breaker open ObservabilityHub
"""


def _runtime_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--runtime-dir", type=Path, default=None,
        help="where the supervisor's control socket is (default: $AGENTVISOR_RUNTIME_DIR, "
             "else, for run, the config's runtime_dir, else /run/agentvisor as root, else "
             "$XDG_RUNTIME_DIR/agentvisor); one supervisor per runtime dir",
    )


def _overlay_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--overlay", action="append", type=Path, default=[], metavar="FILE",
        help="a file of native settings laid over the config (repeatable, applied in "
             "order), so the legacy file stays unchanged; see supervisor/config/overlay.py",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentvisor", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("validate", help="check config files and print every problem",
                       description="Check schema, script paths, ports (in the file and "
                       "against listening sockets), dependencies and placeholders; print "
                       "every problem at once with its file, line and agent.")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    _overlay_arg(p)
    p.add_argument("--warn", action="store_true",
                   help="report errors but exit 0 (for a first look at a legacy config)")
    p.add_argument("--strict", action="store_true",
                   help="unknown keys are errors, not warnings (as `strict: true` in the file)")
    p.add_argument("--offline", action="store_true",
                   help="skip checks against this machine (listening ports), e.g. when "
                        "validating another host's config")
    p.add_argument("--json", action="store_true",
                   help="print problems as JSON, each with its severity (error or warning)")

    p = sub.add_parser("run", help="run the supervisor in the foreground (systemd's ExecStart)",
                       description="Run every agent of the host config until SIGTERM/SIGINT, "
                       "then stop them in reverse dependency order and exit 0.")
    p.add_argument("--config", "-c", type=Path, required=True, metavar="FILE")
    _overlay_arg(p)
    _runtime_dir_arg(p)
    p.add_argument("--logs-dir", type=Path, default=None,
                   help="where agents' stdout/stderr files go (overrides logs.dir)")
    p.add_argument("--strict", action="store_true",
                   help="refuse unknown keys instead of warning about them (as `strict: "
                        "true` in the file); kept for reloads")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])

    p = sub.add_parser(
        "cleanup", help="undo what a supervisor that died left behind (ExecStopPost=)",
        description="Kill the agents a supervisor that died without stopping (SIGKILL, OOM) "
        "left running, as recorded in the runtime dir, and remove their secret files and "
        "its nftables redirects (the runtime dir's own table, never another's). "
        "Every start does this too; systemd runs it after every exit of the unit. Refuses "
        "while a supervisor runs on the runtime dir (holds its lock, or answers on its "
        "control socket). Exit 0: nothing is left; "
        "1: a supervisor is running, or something could not be removed.")
    _runtime_dir_arg(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("status", help="the host's state and a row per agent")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--watch", type=float, metavar="SECONDS", default=None,
                   help="refresh every SECONDS until Ctrl-C")
    _runtime_dir_arg(p)

    for name, text in (("start", "start an agent or a group (clears FATAL) and wait until "
                                 "they run"),
                       ("stop", "stop an agent or a group, and everything they forked"),
                       ("restart", "stop, then start an agent or a group and wait until "
                                   "they run")):
        p = sub.add_parser(name, help=text, description=text + ". A group (MainPC's "
                           "agent_groups) starts in dependency order and stops dependants "
                           "first. Exit 0 only when every agent named reached the state "
                           "asked for.")
        which = p.add_mutually_exclusive_group(required=True)
        which.add_argument("name", metavar="AGENT", nargs="?")
        which.add_argument("--group", "-g", metavar="GROUP",
                           help="every agent of GROUP, like the old launcher's --group")
        p.add_argument("--json", action="store_true")
        _runtime_dir_arg(p)

    p = sub.add_parser("logs", help="print an agent's stdout/stderr file")
    p.add_argument("name", metavar="AGENT")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument("-n", "--lines", type=int, default=50, help="how many lines (default 50)")
    _runtime_dir_arg(p)

    p = sub.add_parser("breakers", help="the sidecar's circuit breakers",
                       description="Every breaker (one per upstream endpoint): state, "
                       "failures in its window, trips, rejections, last trip and why.")
    p.add_argument("--json", action="store_true")
    _runtime_dir_arg(p)

    p = sub.add_parser("breaker", help="open, close or reset a breaker by hand",
                       description="Manual override for emergencies. open: reject calls "
                       "until closed or reset. close: pass calls and ignore failures until "
                       "reset. reset: back to automatic. NAME is a breaker (Upstream or "
                       "Upstream/host:port) or an upstream (all its breakers).")
    p.add_argument("action", choices=["open", "close", "reset"])
    p.add_argument("name", metavar="NAME")
    p.add_argument("--json", action="store_true")
    _runtime_dir_arg(p)

    p = sub.add_parser("secrets", help="sealed secrets: make a host key, seal a value",
                       description="Sealed secrets are encrypted files (AES-256-GCM with a "
                       "host key) safe to commit beside the config; the supervisor unseals "
                       "them into its tmpfs store at start (secrets.sealed_dir, "
                       "secrets.key_file). Where systemd-creds exists, --systemd writes a "
                       "credential for LoadCredentialEncrypted= instead.")
    ssub = p.add_subparsers(dest="secrets_command", metavar="ACTION", required=True)
    k = ssub.add_parser("keygen", help="create a host key (32 random bytes, mode 0400)")
    k.add_argument("--key", type=Path, required=True, metavar="FILE")
    s = ssub.add_parser("seal", help="read a value on stdin, write NAME.sealed",
                        description="Reads the value on stdin (never on the command line, "
                        "where ps would show it); one trailing newline is dropped.")
    s.add_argument("name", metavar="NAME")
    s.add_argument("--key", type=Path, metavar="FILE", help="the host key (not with --systemd)")
    s.add_argument("--out", type=Path, default=Path("."), metavar="DIR",
                   help="folder for NAME.sealed (default: here)")
    s.add_argument("--systemd", action="store_true",
                   help="write NAME.cred with systemd-creds encrypt instead")

    p = sub.add_parser("scan", help="find plaintext credentials in files, processes, logs",
                       description="Audit for plaintext credentials: the patterns operators "
                       "grep for (NATS_/REDIS_/API_KEY/TOKEN assignments, scheme://user:pass@ "
                       "URLs, nats_user/nats_password keys), high-entropy values under "
                       "secret-looking keys, and known secret values (from --secrets-dir) in "
                       "command lines, environments and logs. Prints where, never the value. "
                       "Exit 1 on any finding: usable as a CI gate.")
    from supervisor import scan

    scan.add_arguments(p)

    for name, text in (("reload", "re-read the config and apply only what changed"),
                       ("rollback", "return to the config in force before the last reload")):
        p = sub.add_parser(name, help=text, description=text + "; an invalid config changes "
                           "nothing.")
        p.add_argument("--json", action="store_true")
        _runtime_dir_arg(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    handler = globals()["cmd_" + args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        return EXIT_OK


# --- validate and run -----------------------------------------------------------------


def cmd_validate(args) -> int:
    """Every error and warning of each file, in file order. Warnings (unknown legacy keys,
    a credential taken from the environment, a port already listening) are printed and
    never change the exit status: only errors do (unless --warn)."""
    from supervisor.config import ConfigUnreadable, errors, validate_file

    worst = EXIT_OK
    report = []
    exclude = _pids_of_running_supervisor()
    if args.overlay and len(args.files) > 1:
        print("agentvisor validate: --overlay is laid over one FILE; give one", file=sys.stderr)
        return EXIT_USAGE
    for path in args.files:
        try:
            config, problems = validate_file(path, overlays=args.overlay,
                                             check_machine=not args.offline,
                                             exclude_pids=exclude, strict=args.strict)
        except ConfigUnreadable as exc:
            print(exc, file=sys.stderr)
            worst = max(worst, EXIT_USAGE)
            continue
        n_errors = len(errors(problems))
        n_warnings = len(problems) - n_errors
        root = {"project_root": str(config.project_root),
                "project_root_reason": config.project_root_reason} if config else {}
        report.append({"file": str(path), "overlays": [str(o) for o in args.overlay],
                       **root, "problems": [p.__dict__ for p in problems],
                       "errors": n_errors, "warnings": n_warnings})
        if not args.json:
            for p in problems:  # a warning's line starts with "warning: "
                print(p)
            if root:  # the root every script_path was looked for under, and why
                print(f"project root: {root['project_root']} ({root['project_root_reason']})",
                      file=sys.stderr)
            counts = [_count(n_errors, "error")] if n_errors else ["valid"]
            if n_warnings:
                counts.append(_count(n_warnings, "warning"))
            print(f"{path}: {', '.join(counts)}", file=sys.stderr)
        if n_errors and not args.warn:
            worst = max(worst, EXIT_BAD)
    if args.json:
        print(json.dumps(report, indent=2))
    return worst


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"


def _pids_of_running_supervisor() -> frozenset[int]:
    """Agents of a supervisor already running here hold their own ports: not conflicts."""
    from supervisor.control.client import Unreachable, request

    try:
        status = request(_runtime_dir(None), {"cmd": "status"}, timeout_s=2.0)
    except (Unreachable, OSError, ValueError):
        return frozenset()
    from supervisor.process import descendants

    pids = set()
    for row in status.get("agents", []):
        if row.get("pid"):
            pids.add(row["pid"])
            pids.update(descendants(row["pid"]))
    return frozenset(pids)


def cmd_cleanup(args) -> int:
    from supervisor.daemon import clean_leftovers

    lock = _lock(_runtime_dir(args.runtime_dir), " and owns what it started; nothing done")
    if isinstance(lock, int):
        return lock
    with lock:
        done, problems = clean_leftovers(lock)
    if args.json:
        print(json.dumps({"done": done, "problems": problems}, indent=2))
    else:
        print("\n".join(done) if done or problems else "nothing left behind")
        for line in problems:
            print(f"agentvisor: {line}", file=sys.stderr)
    return EXIT_BAD if problems else EXIT_OK


def _lock(runtime_dir: Path, refused: str, unlockable: str = ""):
    """The runtime directory's lock, or an exit status once the refusal is printed:
    `refused` follows the lock's own words (who holds it), `unlockable` an OS error."""
    from supervisor import runtime_lock

    try:
        return runtime_lock.acquire(runtime_dir)
    except runtime_lock.AlreadyRunning as exc:
        print(f"agentvisor: {exc}{refused}", file=sys.stderr)
        return EXIT_BAD
    except OSError as exc:
        print(f"agentvisor: cannot lock runtime directory {runtime_dir}: "
              f"{exc.strerror or exc}{unlockable}",
              file=sys.stderr)
        return EXIT_USAGE


def cmd_run(args) -> int:
    from supervisor.control.server import ControlError
    from supervisor.paths import runtime_dir_override

    _setup_logging(args.log_level)
    # --runtime-dir, then $AGENTVISOR_RUNTIME_DIR, beat the file's runtime_dir, as for
    # every client command; kept across reloads.
    overrides = {k: v for k, v in (("runtime_dir", runtime_dir_override(args.runtime_dir)),
                                   ("logs_dir", args.logs_dir),
                                   ("strict", args.strict or None)) if v is not None}
    runtime_dir = overrides.get("runtime_dir")
    if runtime_dir is None:
        # Only the file knows. Read without looking at this machine: the ports in use
        # may be those of the very supervisor the lock is about to find running.
        config = _load_for_run(args, overrides, check_machine=False)
        if isinstance(config, int):
            return config
        runtime_dir = config.runtime_dir
    # Before anything is touched (leftovers, the control socket, nftables): one
    # supervisor per runtime directory, and a second one leaves the first's alone.
    lock = _lock(runtime_dir, "; not starting", "; not starting")
    if isinstance(lock, int):
        return lock
    with lock:  # held until the supervisor has stopped everything
        config = _load_for_run(args, {**overrides, "runtime_dir": lock.runtime_dir})
        if isinstance(config, int):
            return config
        # Said once per start (and by each reload): the file runs as it is.
        for warning in config.warnings:
            logging.getLogger("agentvisor").warning("%s", warning)

        import uvloop

        from supervisor.daemon import Supervisor

        try:
            return uvloop.run(_run_supervisor(Supervisor, config, overrides, lock))
        except ControlError as exc:
            print(f"agentvisor: {exc}", file=sys.stderr)
            return EXIT_BAD


def _load_for_run(args, overrides: dict, check_machine: bool = True):
    """The host config `run` starts, or its exit status once the problems are printed."""
    from supervisor.config import ConfigError, ConfigUnreadable, load

    try:
        return load(args.config, overlays=args.overlay, check_machine=check_machine,
                    **overrides)
    except ConfigUnreadable as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:
        for p in exc.problems:
            print(p, file=sys.stderr)
        print(f"{args.config}: {len(exc.problems)} problem(s); not starting", file=sys.stderr)
        return EXIT_BAD


async def _run_supervisor(cls, config, overrides, lock) -> int:
    return await cls(config, lock=lock, overrides=overrides).run()


def _setup_logging(level: str) -> None:
    # Under systemd the journal stamps every line itself.
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr)


# --- client commands ------------------------------------------------------------------


def _runtime_dir(arg: Path | None) -> Path:
    from supervisor.paths import runtime_dir

    return runtime_dir(arg)


def _ask(args, payload: dict) -> dict | int:
    """Send a request; an int is an exit code after the error has been printed."""
    from supervisor.control.client import Unreachable, request

    try:
        reply = request(_runtime_dir(args.runtime_dir), payload)
    except Unreachable as exc:
        print(f"agentvisor: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if not reply.get("ok"):
        if getattr(args, "json", False):
            print(json.dumps(reply, indent=2))
        else:
            print(f"agentvisor: {reply.get('error')}", file=sys.stderr)
            for line in reply.get("problems", []):
                print(f"  {line}", file=sys.stderr)
        return EXIT_BAD
    return reply


def cmd_status(args) -> int:
    while True:
        reply = _ask(args, {"cmd": "status"})
        if isinstance(reply, int):
            return reply
        reply.pop("ok", None)
        if args.json:
            print(json.dumps(reply, indent=2))
        else:
            if args.watch:
                print("\033[2J\033[H", end="")
            print(render_status(reply))
        if not args.watch:
            return EXIT_OK if reply["state"] == "ok" else EXIT_BAD
        time.sleep(args.watch)


def cmd_start(args) -> int:
    return _agent_command(args, "start")


def cmd_stop(args) -> int:
    return _agent_command(args, "stop")


def cmd_restart(args) -> int:
    return _agent_command(args, "restart")


def _agent_command(args, verb: str) -> int:
    """start/stop/restart of one AGENT or of a --group: a line per agent, exit 0 only
    when every one of them reached the state asked for."""
    target = {"group": args.group} if args.group is not None else {"name": args.name}
    reply = _ask(args, {"cmd": verb, **target})
    if isinstance(reply, int):
        return reply
    rows = reply["agents"] if args.group is not None else [reply["agent"]]
    wanted = "STOPPED" if verb == "stop" else "RUNNING"
    there = sum(row["state"] == wanted for row in rows)
    if args.json:
        print(json.dumps({"group": reply["group"], "agents": rows} if args.group is not None
                         else rows[0], indent=2))
    else:
        for row in rows:
            detail = f" (pid {row['pid']})" if row["pid"] else ""
            # "STOPPED: stopped" would say nothing twice.
            why = (f": {row['reason']}" if row["reason"]
                   and row["reason"] != row["state"].lower() else "")
            print(f"{row['name']}: {row['state']}{detail}{why}")
        if args.group is not None:
            print(f"group {reply['group']}: {there} of {len(rows)} {wanted}")
    return EXIT_OK if there == len(rows) else EXIT_BAD


def cmd_logs(args) -> int:
    reply = _ask(args, {"cmd": "logs", "name": args.name})
    if isinstance(reply, int):
        return reply
    path = Path(reply["path"])
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        if not args.follow:
            print(f"agentvisor: {path} does not exist yet (the agent has not written)",
                  file=sys.stderr)
            return EXIT_BAD
        f = None
    out = sys.stdout.buffer
    if f is not None:
        out.write(b"".join(_last_lines(f, args.lines)))
        out.flush()
    if not args.follow:
        return EXIT_OK
    return _follow(path, f, out)


def _last_lines(f, n: int) -> list[bytes]:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    block, data = 65536, b""
    pos = size
    while pos > 0 and data.count(b"\n") <= n:
        pos = max(0, pos - block)
        f.seek(pos)
        data = f.read(size - pos)
    f.seek(size)
    return data.splitlines(keepends=True)[-n:] if n > 0 else []


def _follow(path: Path, f, out) -> int:
    """tail -F: survives the file being created late, truncated or replaced."""
    while True:
        if f is not None:
            chunk = f.read()
            if chunk:
                out.write(chunk)
                out.flush()
                continue
        try:
            st = path.stat()
        except FileNotFoundError:
            st = None
        if st is not None and (f is None or os.fstat(f.fileno()).st_ino != st.st_ino
                               or st.st_size < f.tell()):
            if f is not None:
                f.close()
            f = open(path, "rb")
            continue
        time.sleep(0.2)


def cmd_secrets(args) -> int:
    from supervisor import sealed

    try:
        if args.secrets_command == "keygen":
            sealed.generate_key(args.key)
            print(f"wrote {args.key} (mode 0400): keep it out of the repository")
            return EXIT_OK
        value = sys.stdin.buffer.read()
        if value.endswith(b"\n"):
            value = value[:-1]
        if not value:
            print("agentvisor: no value on stdin", file=sys.stderr)
            return EXIT_USAGE
        if args.systemd:
            out = args.out / f"{args.name}.cred"
            sealed.seal_with_systemd_creds(args.name, value, out)
        else:
            if args.key is None:
                print("agentvisor: --key FILE is needed (or --systemd)", file=sys.stderr)
                return EXIT_USAGE
            out = sealed.seal_to_file(args.name, value, sealed.load_key(args.key), args.out)
        print(f"wrote {out}")
        return EXIT_OK
    except sealed.SealError as exc:
        print(f"agentvisor: {exc}", file=sys.stderr)
        return EXIT_BAD
    except OSError as exc:
        print(f"agentvisor: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE


def cmd_scan(args) -> int:
    from supervisor import scan

    return scan.run(args)


def cmd_breakers(args) -> int:
    reply = _ask(args, {"cmd": "breakers"})
    if isinstance(reply, int):
        return reply
    rows = reply["breakers"]
    # The sidecar cuts a long list (thousands of undeclared destinations) to what one
    # reply holds; declared upstreams and open breakers come first, so what is left out
    # is closed breakers of destinations nobody declared.
    omitted = reply.get("omitted", 0)
    note = (f"{omitted} more breaker{'s' if omitted != 1 else ''} not shown: closed, "
            "of undeclared destinations (all of them: the sidecar's /breakers)")
    if args.json:
        print(json.dumps(rows, indent=2))
        if omitted:
            print(f"agentvisor: {note}", file=sys.stderr)
        return EXIT_OK
    print(render_breakers(rows))
    if omitted:
        print(f"\n{note}")
    return EXIT_OK


def cmd_breaker(args) -> int:
    reply = _ask(args, {"cmd": "breaker", "action": args.action, "name": args.name})
    if isinstance(reply, int):
        return reply
    if args.json:
        print(json.dumps(reply["breakers"]))
    else:
        verb = {"open": "opened", "close": "closed", "reset": "reset"}[args.action]
        print(f"{verb}: {', '.join(reply['breakers'])}")
    return EXIT_OK


def cmd_reload(args) -> int:
    return _config_command(args, "reload")


def cmd_rollback(args) -> int:
    return _config_command(args, "rollback")


def _config_command(args, verb: str) -> int:
    reply = _ask(args, {"cmd": verb})
    if isinstance(reply, int):
        return reply
    reply.pop("ok", None)
    if args.json:
        print(json.dumps(reply, indent=2))
        return EXIT_OK
    for key in ("added", "removed", "changed"):
        if reply[key]:
            print(f"{key}: {', '.join(reply[key])}")
    print(f"unchanged: {len(reply['unchanged'])} agents left running")
    return EXIT_OK


# --- rendering ------------------------------------------------------------------------


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    for unit, size, sub, subsize in (("d", 86400, "h", 3600), ("h", 3600, "m", 60),
                                     ("m", 60, "s", 1)):
        if s >= size:
            return f"{s // size}{unit}{(s % size) // subsize}{sub}"
    return f"{s}s"


def render_status(status: dict) -> str:
    agents = status["agents"]
    head = (f"{status['host']}: {status['summary']}  "
            f"(supervisor pid {status['pid']}, up {human_duration(status['uptime_s'])})")
    with_group = any(a.get("group") for a in agents)
    cols = (["GROUP"] if with_group else []) + [
        "NAME", "STATE", "PID", "UPTIME", "RESTARTS", "HEALTH", "PROBE", "CPU%", "RSS MB",
        "LAST EXIT", "REASON"]
    rows = []
    for a in agents:
        health = {True: "ok", False: "FAILING", None: "-"}[a["healthy"]]
        row = ([a.get("group") or "-"] if with_group else []) + [
            a["name"] + ("*" if a.get("required") else ""), a["state"],
            str(a["pid"] or "-"), human_duration(a["uptime_s"]), str(a["restarts"]), health,
            _short_probe(a.get("probe")), _num(a.get("cpu_percent")), _num(a.get("rss_mb")),
            a["last_exit"] or "-", a["reason"] or ""]
        rows.append(row)
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c)
              for i, c in enumerate(cols)]
    lines = [head, ""] + ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()
                          for r in [cols] + rows]
    if any(a.get("required") for a in agents):
        lines.append("\n* required: the host is degraded while it is not RUNNING")
    upstreams = status.get("upstreams") or {}
    if upstreams:
        lines.append("\nupstreams (${upstream:NAME} -> sidecar listener -> endpoints):")
        width = max(map(len, upstreams))
        for name, u in upstreams.items():
            lines.append(f"  {name:<{width}}  {u['listen']:<21}  {u['protocol']:<4}  "
                         + ", ".join(u["endpoints"]))
    if status.get("metrics"):
        lines.append("\n" + render_metrics(status["metrics"]))
    return "\n".join(lines)


def render_metrics(m: dict, now: float | None = None) -> str:
    """store_forward's spool and forwarder in one line."""
    state = m.get("state") or "-"
    if "pending_records" not in m:  # the data process is not running
        return f"metrics spool: {state}"
    since = m.get("partitioned_since")
    if state == "partitioned":
        age = (now if now is not None else time.time()) - since if since else None
        text = f"metrics spool: PARTITIONED for {human_duration(age)}, no hub answers"
    else:
        text = f"metrics spool: {state}" + (f" to hub {m['hub']}" if m.get("hub") else "")
    text += (f"; {m['pending_records']:,} pushes pending "
             f"({(m.get('pending_bytes') or 0) / 1e6:.1f} of "
             f"{(m.get('max_bytes') or 0) / 1e6:.0f} MB)")
    if m.get("oldest_pending_s") is not None:
        text += f", oldest {human_duration(m['oldest_pending_s'])}"
    if m.get("refusing"):
        text += f"; REFUSING pushes: {m['refusing']}"
    return text


def render_breakers(rows: list[dict]) -> str:
    if not rows:
        return "no breakers: no upstreams are declared, or no traffic has passed yet"
    cols = ["BREAKER", "STATE", "FORCED", "FAILURES", "TRIPS", "REJECTED", "TRIPPED", "REASON"]
    table = []
    for r in rows:
        tripped = (time.strftime("%H:%M:%S", time.localtime(r["tripped_at"]))
                   if r.get("tripped_at") else "-")
        state = r["state"].upper()
        if r.get("open_remaining_s"):
            state += f" ({r['open_remaining_s']:.0f}s)"
        table.append([r["name"], state, r.get("forced") or "-", str(r["failures_in_window"]),
                      str(r["trips"]), str(r["rejections"]), tripped, r.get("trip_reason") or ""])
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(t, widths)).rstrip()
                     for t in [cols] + table)


def _short_probe(probe: str | None) -> str:
    """The table's PROBE cell: `tcp :7210 (main port)`; --json has the whole sentence."""
    if not probe:
        return "-"
    return probe.split(";", 1)[0] + ")" if "; " in probe and probe.endswith(")") else probe


def _num(v) -> str:
    return "-" if v is None else f"{v:g}"


if __name__ == "__main__":
    sys.exit(main())
