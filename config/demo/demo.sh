#!/usr/bin/env bash
# `make demo`: run the demo fleet under the supervisor and watch its status.
# Ctrl-C stops every agent in reverse dependency order and exits cleanly.
# DEMO_SECONDS=N stops by itself after N seconds (for scripted runs).
set -u
cd "$(dirname "$0")/../.."
BIN=.venv/bin
RUN=.demo/run
mkdir -p .demo
export AGENTVISOR_RUNTIME_DIR="$PWD/$RUN"

"$BIN/agentvisor" validate config/demo/demo.yaml || exit 1
"$BIN/agentvisor" run --config config/demo/demo.yaml --runtime-dir "$RUN" \
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
