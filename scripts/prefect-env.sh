# Source this file (do not run it): it sets the Prefect environment for the
# current shell only, so nothing is written into a global Prefect profile
# (`prefect config set PREFECT_API_URL` would break serverless local runs).
#
#   source scripts/prefect-env.sh      # then: prefect deployment ls, ...
#
# Knobs (environment, all optional):
#   GEAR_PREFECT_HOME  state folder: database, logs, pid files (default <repo>/.prefect)
#   GEAR_PREFECT_HOST  address the server binds and clients use (default 127.0.0.1)
#   GEAR_PREFECT_PORT  server port (default 4200)
#   GEAR_PREFECT_BIN   folder holding the prefect executable (default <repo>/.venv/bin if present)

GEAR_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export GEAR_ROOT
export GEAR_PREFECT_HOME="${GEAR_PREFECT_HOME:-$GEAR_ROOT/.prefect}"
export GEAR_PREFECT_HOST="${GEAR_PREFECT_HOST:-127.0.0.1}"
export GEAR_PREFECT_PORT="${GEAR_PREFECT_PORT:-4200}"
if [ -z "${GEAR_PREFECT_BIN:-}" ]; then
    if [ -x "$GEAR_ROOT/.venv/bin/prefect" ]; then
        GEAR_PREFECT_BIN="$GEAR_ROOT/.venv/bin"
    else
        GEAR_PREFECT_BIN="$(dirname "$(command -v prefect 2>/dev/null || echo /usr/local/bin/prefect)")"
    fi
fi
export GEAR_PREFECT_BIN
export GEAR_PREFECT_LOGS="$GEAR_PREFECT_HOME/logs"
export GEAR_PREFECT_RUN="$GEAR_PREFECT_HOME/run"
mkdir -p "$GEAR_PREFECT_LOGS" "$GEAR_PREFECT_RUN"

export PREFECT_HOME="$GEAR_PREFECT_HOME"
export PREFECT_API_URL="http://$GEAR_PREFECT_HOST:$GEAR_PREFECT_PORT/api"
export PREFECT_UI_URL="http://$GEAR_PREFECT_HOST:$GEAR_PREFECT_PORT"
export PREFECT_SERVER_API_HOST="$GEAR_PREFECT_HOST"
export PREFECT_SERVER_API_PORT="$GEAR_PREFECT_PORT"
# Offline: telemetry and update checks only log connection errors.
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT=false
export DO_NOT_TRACK=1
# Models and tokenizers come from installed packages; never try a hub.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
# The project's module loggers reach the runs' logs in the UI (as prefect.toml says;
# a worker's flow runs inherit this environment).
export PREFECT_LOGGING_EXTRA_LOGGERS="${PREFECT_LOGGING_EXTRA_LOGGERS:-tasks,gear_model}"
export PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW="${PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW:-ignore}"
export PATH="$GEAR_PREFECT_BIN:$PATH"

# Helpers shared by the scripts.
gear_pid_alive() {  # gear_pid_alive <pidfile>
    [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

gear_stop_group() {  # gear_stop_group <pidfile> <label>
    local pidfile="$1" label="$2" pid i
    if ! gear_pid_alive "$pidfile"; then
        rm -f "$pidfile"
        echo "$label: not running"
        return 0
    fi
    pid="$(cat "$pidfile")"
    # Started with setsid: the pid is its process group, which also holds the
    # server's web process and the flow-run processes a worker spawned.
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
    for i in $(seq 1 40); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.25
    done
    if kill -0 "$pid" 2>/dev/null || kill -0 -- "-$pid" 2>/dev/null; then
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$pidfile"
    echo "$label: stopped (pid $pid)"
}
