#!/usr/bin/env bash
# Run any prefect command against the project's local server, e.g.
#   scripts/prefect.sh deployment run build-rir-dataset/weekly-refresh
#   scripts/prefect.sh flow-run ls
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/prefect-env.sh"
cd "$GEAR_ROOT"
exec prefect "$@"
