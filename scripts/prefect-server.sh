#!/usr/bin/env bash
# Start, stop or inspect the project's local Prefect server (API + UI).
#
#   scripts/prefect-server.sh start [timeout_s]   # waits until /api/health answers
#   scripts/prefect-server.sh stop
#   scripts/prefect-server.sh status
#   scripts/prefect-server.sh logs
#
# State (SQLite database), the log file and the pid file live under
# GEAR_PREFECT_HOME (default <repo>/.prefect). See scripts/prefect-env.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/prefect-env.sh"

PIDFILE="$GEAR_PREFECT_RUN/server.pid"
LOGFILE="$GEAR_PREFECT_LOGS/server.log"

healthy() {
    python3 - "$PREFECT_API_URL/health" <<'PY' 2>/dev/null
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=3) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:
    sys.exit(1)
PY
}

case "${1:-status}" in
start)
    timeout="${2:-180}"
    if gear_pid_alive "$PIDFILE"; then
        echo "server: already running (pid $(cat "$PIDFILE")) at $PREFECT_UI_URL"
        exit 0
    fi
    if healthy; then
        echo "server: something else already answers at $PREFECT_API_URL; set GEAR_PREFECT_PORT" >&2
        exit 1
    fi
    cd "$GEAR_ROOT"
    # setsid: own process group, so `stop` ends the server and its children.
    setsid prefect server start --host "$GEAR_PREFECT_HOST" --port "$GEAR_PREFECT_PORT" \
        >>"$LOGFILE" 2>&1 </dev/null &
    echo $! >"$PIDFILE"
    start=$SECONDS
    until healthy; do
        if ! gear_pid_alive "$PIDFILE"; then
            echo "server: exited during start-up; last log lines:" >&2
            tail -n 40 "$LOGFILE" >&2
            rm -f "$PIDFILE"
            exit 1
        fi
        if (( SECONDS - start > timeout )); then
            echo "server: no answer at $PREFECT_API_URL/health after ${timeout}s; see $LOGFILE" >&2
            exit 1
        fi
        sleep 0.5
    done
    echo "server: up in $((SECONDS - start))s (pid $(cat "$PIDFILE")); UI $PREFECT_UI_URL; log $LOGFILE"
    ;;
stop)
    gear_stop_group "$PIDFILE" server
    ;;
status)
    if gear_pid_alive "$PIDFILE" && healthy; then
        echo "server: running (pid $(cat "$PIDFILE")) at $PREFECT_UI_URL"
    elif gear_pid_alive "$PIDFILE"; then
        echo "server: process $(cat "$PIDFILE") alive but $PREFECT_API_URL/health does not answer"
        exit 1
    else
        echo "server: not running"
        exit 3
    fi
    ;;
logs)
    exec tail -n "${2:-100}" "$LOGFILE"
    ;;
*)
    echo "usage: $0 start [timeout_s] | stop | status | logs [n]" >&2
    exit 2
    ;;
esac
