#!/usr/bin/env bash
# Deploy agentvisor on this PC under systemd, as root. Two ways to say what it runs:
#
#   sudo make deploy HOST=mainpc LEGACY=/opt/ai_system/main_pc_code/config/startup_config.yaml
#       The PC's own legacy file, where it is and as it is, byte for byte (the old tools
#       keep reading it), with agentvisor's settings in an overlay beside it (OVERLAY=FILE,
#       default agentvisor.yaml in the legacy file's folder; it must exist). Neither file
#       is ever copied or edited. Both are named in /etc/agentvisor/HOST.env, which the
#       unit reads (EnvironmentFile=, see agentvisor@.service): AGENTVISOR_CONFIG,
#       AGENTVISOR_OVERLAYS, and the variables the legacy file's ${NAME} placeholders read
#       from the supervisor's environment, which systemd keeps nearly empty (PYTHONPATH=
#       at least; the others it reads are listed there, commented out, to be set).
#   sudo make deploy HOST=mainpc [CONFIG=FILE]
#       A native config: config/HOST.yaml (or CONFIG=FILE), installed as
#       /etc/agentvisor/HOST.yaml.
#
# Either way, an operator's edit wins: /etc/agentvisor/HOST.env and HOST.yaml are written
# only when absent, and kept as they are from then on (remove one to have it written
# again). Then:
#   1. validates exactly what the unit will run: the config and overlays HOST.env names
#      (else HOST.yaml), with the environment systemd will give the supervisor (PATH
#      and HOST.env's variables, nothing of this shell's); stops here if it is invalid;
#   2. installs agentvisor@.service, with ExecStart pointing at this clone, wherever it is;
#   3. with NATS=1, installs config/nats-HOST.conf as /etc/agentvisor/nats.conf (kept if
#      present) and agentvisor-nats.service, starts it, waits for its port;
#   4. first deploy: enables and starts agentvisor@HOST. Deploy again (after `git pull`,
#      or an edit of the config or overlay): reloads it, so the change applies without
#      restarting the agents, and says how to restart for new code. A reload cannot
#      change the supervisor's command line or environment: when the running one was
#      started with other files or HOST.env values than the unit now gives, deploy
#      restarts the unit instead (its agents restart) and says what differed;
#   5. waits until every required agent runs (DEPLOY_WAIT_S, 60 s), then shows
#      `agentvisor status`.
#
# `make undeploy HOST=...` (--remove): stops and disables the unit, removes the unit file
# when no instance is left, keeps /etc/agentvisor (HOST.yaml, HOST.env, nats.conf) and,
# of course, the legacy file and overlay.
#
# Exit 0 when the unit runs the config with every required agent up; 1 on an invalid
# config, a kept HOST.env that names other files than LEGACY/OVERLAY, a failed start or
# reload (systemctl's message and the journal's last lines are printed) or a required
# agent still down at the deadline; 2 on bad usage or a file that is not there.
set -euo pipefail

usage() {
    echo "usage: make deploy HOST=NAME [LEGACY=FILE [OVERLAY=FILE] | CONFIG=FILE] [NATS=1]" \
         "  (NAME: mainpc, pc2, ...)" >&2
    echo "       make undeploy HOST=NAME" >&2
    exit 2
}

remove=false
if [[ "${1:-}" == --remove ]]; then
    remove=true
    shift
fi
host="${1:-}"
config="${2:-}"
with_nats="${3:-}"
legacy="${4:-}"
overlay="${5:-}"
if [[ -z "$host" || ! "$host" =~ ^[A-Za-z0-9_.-]+$ || ! "$with_nats" =~ ^[01]?$ ]]; then
    usage
fi
if [[ -n "$legacy" && -n "$config" ]]; then
    echo "deploy: LEGACY= and CONFIG= are two ways to give the config; give one" >&2
    usage
fi
if [[ -n "$overlay" && -z "$legacy" ]]; then
    echo "deploy: OVERLAY= is laid over a LEGACY= file; give that too" >&2
    usage
fi
root="$(cd "$(dirname "$0")/.." && pwd)"
config="${config:-$root/config/$host.yaml}"
agentvisor="$root/.venv/bin/agentvisor"
unit="agentvisor@$host.service"
etc_config="/etc/agentvisor/$host.yaml"
etc_env="/etc/agentvisor/$host.env"
units_dir="${SYSTEMD_UNITS_DIR:-/etc/systemd/system}"
# What systemd gives a service's processes besides its Environment= lines (no HOME, no
# PWD, no PYTHONPATH): what the supervisor, and so validation here, sees.
unit_path="PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

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
    kept=()
    for file in "$etc_config" "$etc_env" /etc/agentvisor/nats.conf; do
        [[ -e "$file" ]] && kept+=("$file")
    done
    echo "    kept ${kept[*]:-nothing in /etc/agentvisor} (and any legacy file and overlay" \
         "where they are); agentvisor-nats, if deployed, runs on" \
         "(systemctl disable --now agentvisor-nats)"
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

# unsafe_path PATH: why PATH cannot be written in HOST.env as it is, or nothing. systemd
# strips quotes and surrounding blanks from a value there and splits
# $AGENTVISOR_OVERLAYS at whitespace, so such characters would name another file.
unsafe_path() {
    case "$1" in
        *[[:space:][:cntrl:]\"\'\\\$\`]*)
            echo "has whitespace, a quote, a backslash, a \$ or a control character" ;;
    esac
}

# placeholder_variables LEGACY OVERLAY: a line "NAME<TAB>file:line, ..." per variable of
# the supervisor's environment that the two files' ${NAME} placeholders (env_vars,
# global_settings.environment, port expressions) read, and "!NAME<TAB>..." per
# credential that is not in their secret store: it belongs there, not in HOST.env.
# Classified by agentvisor's own config code, as `validate` does. Nothing when the files
# cannot be read: validation says why, just after.
placeholder_variables() {
    "$root/.venv/bin/python" -m supervisor.config.envfile "$@"
}

# write_env_file DEST: HOST.env for LEGACY and OVERLAY, with its comments.
write_env_file() {
    local name where variables
    variables=$(placeholder_variables "$legacy" "$overlay") || variables=""
    {
        cat <<EOF
# The environment of $unit (EnvironmentFile= in agentvisor@.service),
# written by \`make deploy\` on $(date -u +%F). Deploy keeps it as it is from then on,
# so an edit here wins (remove the file to have deploy write it again). systemd reads
# it when the unit starts: after an edit, run \`make deploy\` again (it restarts the
# unit when the running supervisor has other values) or \`systemctl restart $unit\`.
# Plain NAME=VALUE lines. Never a password or token here: those go in the secret store
# (the overlay's secrets:, or LoadCredential= in the unit).

# The legacy file, run where it is and as it is (the old tools keep reading it), and
# the overlay of agentvisor's settings laid over it. More overlays, applied in order:
# --overlay FILE --overlay FILE2 (no whitespace in these paths).
AGENTVISOR_CONFIG=$legacy
AGENTVISOR_OVERLAYS=--overlay $overlay

# The supervisor's environment, which systemd keeps to PATH: set here every variable
# that the files' \${NAME} placeholders read and that is not a secret (validation names
# any that is missing). Empty, \${PYTHONPATH} expands as under a shell that has none:
# '\${PYTHONPATH}:\${PWD}/..' gives ':<the agent's folder>/..' (\${PWD} is the agent's
# working directory).
PYTHONPATH=
# PORT_OFFSET=N would shift every "\${PORT_OFFSET}+N" port; unset, the overlay's
# port_offset (else 0) applies.
EOF
        while IFS=$'\t' read -r name where; do
            case "$name" in
                ''|PYTHONPATH) ;;
                '!'*) printf '# ${%s} (%s) is a credential: the secret store, not here.\n' \
                          "${name#!}" "$where" ;;
                *) printf '# ${%s} is read at %s: set it (validation fails until then).\n#%s=\n' \
                          "$name" "$where" "$name" ;;
            esac
        done <<<"$variables"
    } > "$1.new"
    # Written beside, then renamed: systemd never reads half a file. Root's only: it
    # holds nothing secret, but nobody else needs it.
    chmod 0600 "$1.new"
    mv "$1.new" "$1"
}

install -d -m 0755 /etc/agentvisor
if [[ -n "$legacy" ]]; then
    # Absolute, symlinks kept: the project root is inferred from where the file is.
    legacy=$(realpath --no-symlinks -- "$legacy")
    overlay=$(realpath --no-symlinks -- "${overlay:-$(dirname "$legacy")/agentvisor.yaml}")
    step "config: $legacy, overlay $overlay (both stay where they are, unchanged)"
    [[ -f "$legacy" && -r "$legacy" ]] || {
        echo "deploy: no file at $legacy (LEGACY=)" >&2
        exit 2; }
    [[ -f "$overlay" && -r "$overlay" ]] || {
        echo "deploy: no overlay at $overlay: write agentvisor's settings for this PC there" \
             "(host:, secrets:, agents: ...; config/demo/main_pc_code/config/agentvisor.yaml" \
             "is an example), or name the file with OVERLAY=FILE" >&2
        exit 2; }
    for path in "$legacy" "$overlay"; do
        why=$(unsafe_path "$path")
        [[ -z "$why" ]] || {
            echo "deploy: $path $why, which $etc_env cannot carry: move or link the" \
                 "file to a plainer path" >&2
            exit 2; }
    done
    step "environment: $etc_env"
    if [[ -e "$etc_env" ]]; then
        echo "    kept as it is (remove it to have deploy write it again)"
    else
        write_env_file "$etc_env"
        echo "    written: AGENTVISOR_CONFIG, AGENTVISOR_OVERLAYS, PYTHONPATH= and the" \
             "variables to set; an edit there wins (kept from now on)"
    fi
else
    step "config: $etc_config"
    install_kept "$config" "$etc_config"
fi

# env_file_pairs FILE: the NAME=VALUE assignments systemd's EnvironmentFile= takes from
# FILE, one a line: blank lines and lines starting with # or ; skipped, blanks around
# the name and before the value dropped, and one pair of quotes around the value.
env_file_pairs() {
    local line name value
    while IFS= read -r line || [[ -n "$line" ]]; do
        line="${line#"${line%%[![:space:]]*}"}"
        [[ -z "$line" || "$line" == [#\;]* || "$line" != *=* ]] && continue
        name="${line%%=*}"
        name="${name%"${name##*[![:space:]]}"}"
        value="${line#*=}"
        value="${value#"${value%%[![:space:]]*}"}"
        value="${value%"${value##*[![:space:]]}"}"
        if [[ "$value" =~ ^\"(.*)\"$ || "$value" =~ ^\'(.*)\'$ ]]; then
            value="${BASH_REMATCH[1]}"
        fi
        [[ "$name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] && printf '%s=%s\n' "$name" "$value"
    done < "$1"
}

# What the unit will run, as systemd puts it together: Environment=AGENTVISOR_CONFIG=
# /etc/agentvisor/HOST.yaml, HOST.env (if any) over it, then ExecStart=`run --config
# ${AGENTVISOR_CONFIG} $AGENTVISOR_OVERLAYS`, the latter split at whitespace.
unit_env=()
[[ -e "$etc_env" ]] && mapfile -t unit_env < <(env_file_pairs "$etc_env")
run_config="$etc_config"
run_overlays=""
for pair in ${unit_env[@]+"${unit_env[@]}"}; do
    case "$pair" in
        AGENTVISOR_CONFIG=*) run_config="${pair#*=}" ;;
        AGENTVISOR_OVERLAYS=*) run_overlays="${pair#*=}" ;;
    esac
done
read -r -a overlay_args <<<"$run_overlays" || true
run_args=(--config "$run_config" ${overlay_args[@]+"${overlay_args[@]}"})
if [[ -n "$legacy" ]] && { [[ "$run_config" != "$legacy" ]] ||
        ! grep -qxF -- "$overlay" <<<"$(printf '%s\n' "${run_args[@]}")"; }; then
    # The kept file is the operator's word: say so rather than run something else.
    echo "deploy: $etc_env (kept: an operator's edit wins) has the unit run" \
         "'${run_args[*]}', not $legacy with --overlay $overlay: edit" \
         "AGENTVISOR_CONFIG and AGENTVISOR_OVERLAYS there, or remove the file to have" \
         "deploy write it again" >&2
    exit 1
fi
if [[ -e "$etc_env" && -z "$legacy" && "$run_config" != "$etc_config" ]]; then
    echo "    $etc_env sets AGENTVISOR_CONFIG: the unit runs that, not $etc_config"
fi

running=false
systemctl is-active --quiet "$unit" && running=true
step "validate: ${run_args[*]}${unit_env[*]+ (with $etc_env)}"
# Nothing of this shell's environment: a ${NAME} it happens to have would pass here and
# fail under systemd. A running fleet holds its own ports: those are not conflicts
# (reload checks them itself).
validate=(env -i "$unit_path" "AGENTVISOR_CONFIG=$etc_config" ${unit_env[@]+"${unit_env[@]}"}
          "$agentvisor" validate)
$running && validate+=(--offline)
valid=true
problems=$("${validate[@]}" "$run_config" ${overlay_args[@]+"${overlay_args[@]}"}) || valid=false
[[ -z "$problems" ]] || printf '%s\n' "$problems"
if ! $valid; then
    # validate's own advice is "Environment= in its systemd unit": under deploy, the
    # place is HOST.env.
    if [[ -e "$etc_env" ]] && grep -q "supervisor's environment" <<<"$problems"; then
        echo "deploy: a variable of the supervisor's environment that a \${NAME} reads" \
             "goes in $etc_env (a credential: in the secret store)" >&2
    fi
    exit 1
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

# started_otherwise: what the running supervisor was started with that the unit would
# not give it now (its command line, or a HOST.env value), one line each; nothing if
# the same. Only these need a restart: a reload re-reads the files themselves.
started_otherwise() {
    local pid have environ
    pid=$(systemctl show -p MainPID --value "$unit")
    [[ "$pid" =~ ^[1-9][0-9]*$ && -r "/proc/$pid/cmdline" ]] || return 0
    environ=$(tr '\0' '\n' < "/proc/$pid/environ") || environ=""
    # Its arguments after `run` (the interpreter and the script come first).
    have=$(tr '\0' '\n' < "/proc/$pid/cmdline" | sed '1,/^run$/d')
    if [[ "$have" != "$(printf '%s\n' "${run_args[@]}")" ]]; then
        echo "it runs '$(paste -sd' ' <<<"$have")'; the unit now gives '${run_args[*]}'"
    fi
    for pair in ${unit_env[@]+"${unit_env[@]}"}; do
        grep -qxF -- "$pair" <<<"$environ" ||
            echo "its ${pair%%=*} is not the one $etc_env sets"
    done
}

if $running && otherwise=$(started_otherwise) && [[ -n "$otherwise" ]]; then
    step "restart $unit (a reload cannot change what the supervisor was started with;" \
         "its agents restart)"
    sed 's/^/    /' <<<"$otherwise"
    if ! systemctl restart "$unit"; then
        journalctl -u "$unit" -n 20 --no-pager 2>/dev/null || true
        exit 1
    fi
elif $running; then
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
