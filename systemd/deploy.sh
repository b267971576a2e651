#!/usr/bin/env bash
# Deploy agentvisor on this PC under systemd: `sudo make deploy HOST=mainpc` (or pc2).
#
#   1. installs agentvisor@.service, with ExecStart pointing at this clone, wherever it is;
#   2. installs config/HOST.yaml (or CONFIG=FILE) as /etc/agentvisor/HOST.yaml, unless that
#      file exists: a config edited on the PC is never overwritten;
#   3. validates it (`agentvisor validate`), and stops here if it is invalid;
#   4. first deploy: enables and starts agentvisor@HOST. Deploy again (after `git pull`):
#      reloads it, so a changed config applies without restarting the agents, and says how
#      to restart for new code;
#   5. with NATS=1, first installs config/nats-HOST.conf as /etc/agentvisor/nats.conf
#      (kept if present) and agentvisor-nats.service, starts it, waits for its port;
#   6. waits until every required agent runs (DEPLOY_WAIT_S, 60 s), then shows
#      `agentvisor status`.
#
# `make undeploy HOST=...` (--remove): stops and disables the unit, removes the unit file
# when no instance is left, keeps the configs.
#
# Exit 0 when the unit runs the config with every required agent up; 1 on an invalid
# config, a failed start or reload (systemctl's message and the journal's last lines are
# printed) or a required agent still down at the deadline; 2 on bad usage.
set -euo pipefail

remove=false
if [[ "${1:-}" == --remove ]]; then
    remove=true
    shift
fi
host="${1:-}"
config="${2:-}"
with_nats="${3:-}"
if [[ -z "$host" || ! "$host" =~ ^[A-Za-z0-9_.-]+$ || ! "$with_nats" =~ ^[01]?$ ]]; then
    echo "usage: make deploy HOST=NAME [CONFIG=FILE] [NATS=1]   (NAME: mainpc, pc2, ...)" >&2
    echo "       make undeploy HOST=NAME" >&2
    exit 2
fi
root="$(cd "$(dirname "$0")/.." && pwd)"
config="${config:-$root/config/$host.yaml}"
agentvisor="$root/.venv/bin/agentvisor"
unit="agentvisor@$host.service"
etc_config="/etc/agentvisor/$host.yaml"
units_dir="${SYSTEMD_UNITS_DIR:-/etc/systemd/system}"

if [[ "$(id -u)" != 0 ]]; then
    echo "deploy: installs a systemd unit and /etc/agentvisor: run it as root" >&2
    exit 1
fi
if [[ ! -d /run/systemd/system ]]; then
    echo "deploy: systemd does not run this machine (PID 1); start the fleet with" \
         "'$agentvisor run --config FILE' under whatever does" >&2
    exit 1
fi

if $remove; then
    # The way back: the fleet stops (in order, sidecar last) and does not come back at
    # boot; the configs stay, so a deploy brings it back as it was.
    printf '==> stop and disable %s\n' "$unit"
    systemctl disable --now "$unit"
    # Another instance still running or enabled keeps the shared unit file.
    if ! systemctl list-units --state=active --plain --no-legend 'agentvisor@*' | grep -q . \
            && ! compgen -G "$units_dir/*.wants/agentvisor@*.service" >/dev/null; then
        rm -f "$units_dir/agentvisor@.service"
        systemctl daemon-reload
        echo "    removed $units_dir/agentvisor@.service (no instance left)"
    fi
    echo "    kept $etc_config and /etc/agentvisor/nats.conf; agentvisor-nats, if" \
         "deployed, runs on (systemctl disable --now agentvisor-nats)"
    exit 0
fi
[[ -x "$agentvisor" ]] || { echo "deploy: $agentvisor is missing: run make install" >&2; exit 1; }

step() { printf '==> %s\n' "$*"; }

# install_kept SRC DEST: copy unless DEST exists (an operator's edit wins).
install_kept() {
    if [[ -e "$2" ]]; then
        echo "    kept as it is (remove it to install $1 again)"
    else
        [[ -r "$1" ]] || { echo "deploy: no file at $1" >&2; exit 2; }
        install -m 0644 "$1" "$2"
        echo "    installed from $1"
    fi
}

step "config: $etc_config"
install -d -m 0755 /etc/agentvisor
install_kept "$config" "$etc_config"

running=false
systemctl is-active --quiet "$unit" && running=true
step "validate"
# A running fleet holds its own ports: those are not conflicts (reload checks them itself).
if $running; then
    "$agentvisor" validate --offline "$etc_config"
else
    "$agentvisor" validate "$etc_config"
fi

step "unit: $units_dir/agentvisor@.service (ExecStart from $root)"
# Written beside, then renamed: systemd never reads half a file.
sed "s#/opt/agentvisor#$root#g" "$root/systemd/agentvisor@.service" \
    > "$units_dir/.agentvisor@.service.new"
mv "$units_dir/.agentvisor@.service.new" "$units_dir/agentvisor@.service"
systemctl daemon-reload

if [[ "$with_nats" == 1 ]]; then
    # Before the supervisor: its unit is ordered after this one, and agents connect at
    # start. nats.conf is the PC's (config/nats-HOST.conf), kept if already there.
    command -v nats-server >/dev/null || [[ -x /usr/sbin/nats-server ]] || {
        echo "deploy: NATS=1 needs nats-server (Debian: apt-get install nats-server)" >&2
        exit 1; }
    step "nats: /etc/agentvisor/nats.conf, agentvisor-nats.service"
    install_kept "$root/config/nats-$host.conf" /etc/agentvisor/nats.conf
    install -m 0644 "$root/systemd/agentvisor-nats.service" "$units_dir/"
    systemctl daemon-reload
    if systemctl is-active --quiet agentvisor-nats; then
        systemctl reload agentvisor-nats  # nats-server re-reads its config on SIGHUP
    elif ! systemctl enable --now agentvisor-nats; then
        systemctl status agentvisor-nats --no-pager -l 2>/dev/null | tail -20 || true
        exit 1
    fi
    # Type=simple: "started" is not "listening". Wait for the port, briefly.
    port=$(sed -n 's/^port:[[:space:]]*\([0-9]*\).*/\1/p' /etc/agentvisor/nats.conf)
    port="${port:-4222}"
    for _ in $(seq 50); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.2
    done
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || {
        echo "deploy: agentvisor-nats runs but nothing listens on port $port" >&2; exit 1; }
    echo "    listening on port $port"
fi

if $running; then
    step "reload $unit (agents keep running; new code needs: systemctl restart $unit)"
    if ! systemctl reload "$unit"; then
        journalctl -u "$unit" -n 20 --no-pager 2>/dev/null || true
        exit 1
    fi
else
    step "enable and start $unit"
    if ! systemctl enable --now "$unit"; then
        systemctl status "$unit" --no-pager -l 2>/dev/null | tail -20 || true
        exit 1
    fi
fi

# A reload starts added agents and returns: wait (DEPLOY_WAIT_S, 60 s) until every
# required one runs, saying what it waits for every 5 s.
wait_s="${DEPLOY_WAIT_S:-60}"
step "status (waiting up to ${wait_s} s for every required agent)"
status() { "$agentvisor" status --runtime-dir /run/agentvisor "$@"; }
deadline=$((SECONDS + wait_s))
next_say=$((SECONDS + 5))
until status >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
        status || true
        echo "deploy: the unit runs, but not every required agent after ${wait_s} s" >&2
        exit 1
    fi
    if ((SECONDS >= next_say)); then
        status 2>&1 | head -1 | sed 's/^/    /'
        next_say=$((SECONDS + 5))
    fi
    sleep 0.5
done
status
