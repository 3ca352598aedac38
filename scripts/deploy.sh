#!/usr/bin/env bash
# Create the work pools and register the deployments of prefect.yaml.
#
#   scripts/deploy.sh                      # every deployment in prefect.yaml
#   scripts/deploy.sh train-gear/train     # only the named ones (flow/deployment)
#
# Needs the server (scripts/prefect-server.sh start). Re-running updates the
# deployments and the pools in place.
#   gear-local  process pool, Prefect's default job template (CPU, this machine)
#   gear-gpu    process pool whose job variables carry the GPU layout
#               (scripts/work-pools/gear-gpu.json); it runs only where a
#               worker serves it: scripts/prefect-worker.sh start gear-gpu
# GEAR_PREFECT_PROJECT: folder holding prefect.yaml and the flows (default: the repo).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/prefect-env.sh"
PROJECT="${GEAR_PREFECT_PROJECT:-$GEAR_ROOT}"
cd "$PROJECT"

if ! prefect work-pool inspect gear-local >/dev/null 2>&1; then
    prefect work-pool create gear-local --type process >/dev/null
    echo "deploy: created work pool gear-local (process)"
fi
prefect work-pool create gear-gpu --type process --overwrite \
    --base-job-template "$GEAR_ROOT/scripts/work-pools/gear-gpu.json" >/dev/null
echo "deploy: work pool gear-gpu (process, GPU job variables) up to date"

# Without a pull: section a non-interactive deploy records this folder as the
# flow runs' working directory, so workers on this machine run this checkout.
if [ "$#" -eq 0 ]; then
    prefect --no-prompt deploy --all --prefect-file "$PROJECT/prefect.yaml"
else
    args=()
    for name in "$@"; do args+=(--name "$name"); done
    prefect --no-prompt deploy "${args[@]}" --prefect-file "$PROJECT/prefect.yaml"
fi
