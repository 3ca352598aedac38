#!/usr/bin/env bash
# Start, stop or inspect a process worker for a work pool (default gear-local).
#
#   scripts/prefect-worker.sh start [pool]   # creates the pool if missing
#   scripts/prefect-worker.sh stop [pool]
#   scripts/prefect-worker.sh status [pool]
#   scripts/prefect-worker.sh logs [pool]
#
# The worker runs each flow run as a subprocess in the repository folder.
# Needs the server (scripts/prefect-server.sh start).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/prefect-env.sh"

cmd="${1:-status}"
POOL="${2:-gear-local}"
PIDFILE="$GEAR_PREFECT_RUN/worker-$POOL.pid"
LOGFILE="$GEAR_PREFECT_LOGS/worker-$POOL.log"

case "$cmd" in
start)
    if gear_pid_alive "$PIDFILE"; then
        echo "worker[$POOL]: already running (pid $(cat "$PIDFILE"))"
        exit 0
    fi
    cd "$GEAR_ROOT"
    if ! prefect work-pool inspect "$POOL" >/dev/null 2>&1; then
        prefect work-pool create "$POOL" --type process >/dev/null
        echo "worker[$POOL]: created process work pool $POOL"
    fi
    setsid prefect worker start --pool "$POOL" --type process \
        >>"$LOGFILE" 2>&1 </dev/null &
    echo $! >"$PIDFILE"
    # The worker logs this line once it polls the pool.
    for i in $(seq 1 240); do
        if grep -q "started!" "$LOGFILE" 2>/dev/null; then break; fi
        if ! gear_pid_alive "$PIDFILE"; then
            echo "worker[$POOL]: exited during start-up; last log lines:" >&2
            tail -n 40 "$LOGFILE" >&2
            rm -f "$PIDFILE"
            exit 1
        fi
        sleep 0.5
    done
    echo "worker[$POOL]: running (pid $(cat "$PIDFILE")); log $LOGFILE"
    ;;
stop)
    gear_stop_group "$PIDFILE" "worker[$POOL]"
    ;;
status)
    if gear_pid_alive "$PIDFILE"; then
        echo "worker[$POOL]: running (pid $(cat "$PIDFILE"))"
    else
        echo "worker[$POOL]: not running"
        exit 3
    fi
    ;;
logs)
    exec tail -n "${3:-100}" "$LOGFILE"
    ;;
*)
    echo "usage: $0 start|stop|status|logs [pool]" >&2
    exit 2
    ;;
esac
