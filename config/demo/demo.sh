#!/usr/bin/env bash
# `make demo`: run the demo PC's legacy startup_config.yaml, unchanged, with the overlay
# beside it (agentvisor.yaml), under the supervisor, and watch its status.
# Ctrl-C stops every agent in reverse dependency order and exits cleanly.
# DEMO_SECONDS=N stops by itself after N seconds (for scripted runs).
set -u
cd "$(dirname "$0")/../.."
BIN=.venv/bin
RUN=.demo/run
LEGACY=config/demo/main_pc_code/config/startup_config.yaml
OVERLAY=config/demo/main_pc_code/config/agentvisor.yaml
mkdir -p .demo
export AGENTVISOR_RUNTIME_DIR="$PWD/$RUN"
# The legacy file's PYTHONPATH: '${PYTHONPATH}:...' reads the supervisor's environment.
export PYTHONPATH="${PYTHONPATH:-}"

# The demo's secret store (on a PC: tmpfs or systemd credentials): one file per name,
# 0400. A fresh random value each run; it reaches agents as ${NATS_PASSWORD}, never argv.
mkdir -p -m 0700 .demo/secrets
rm -f .demo/secrets/NATS_PASSWORD
(umask 0377 && head -c 18 /dev/urandom | base64 > .demo/secrets/NATS_PASSWORD)

before=$(sha256sum "$LEGACY" | cut -d' ' -f1)
echo "== agentvisor validate $LEGACY --overlay $OVERLAY"
"$BIN/agentvisor" validate "$LEGACY" --overlay "$OVERLAY" || exit 1
echo
"$BIN/agentvisor" run --config "$LEGACY" --overlay "$OVERLAY" --runtime-dir "$RUN" \
    --logs-dir .demo/logs 2>.demo/supervisor.log &
sup=$!

stop() {
  trap - INT TERM
  echo
  echo "stopping the demo fleet (reverse dependency order)..."
  kill -TERM "$sup" 2>/dev/null
  wait "$sup"
  rc=$?
  echo "supervisor exited with status $rc; its log: .demo/supervisor.log, agents' logs: .demo/logs/"
  if [ "$(sha256sum "$LEGACY" | cut -d' ' -f1)" = "$before" ]; then
    echo "$LEGACY: unchanged (sha256 $before)"
  else
    echo "$LEGACY: CHANGED"; rc=1
  fi
  exit "$rc"
}
trap stop INT TERM

# Wait (with a deadline) for the control socket, then show status until stopped.
for _ in $(seq 100); do
  [ -S "$RUN/control.sock" ] && break
  kill -0 "$sup" 2>/dev/null || { cat .demo/supervisor.log; exit 1; }
  sleep 0.1
done
end=$(( $(date +%s) + ${DEMO_SECONDS:-1000000000} ))
while [ "$(date +%s)" -lt "$end" ]; do
  kill -0 "$sup" 2>/dev/null || { echo "supervisor died:"; tail -20 .demo/supervisor.log; exit 1; }
  [ -t 1 ] && printf '\033[2J\033[H'
  "$BIN/agentvisor" status
  echo
  # Shown once the sidecar answers (it starts first, within a second or so).
  "$BIN/agentvisor" breakers 2>/dev/null && echo
  echo "(ModelManagerAgent crashes now and then; watch it come back. Ctrl-C to stop.)"
  sleep 2
done
stop
