#!/usr/bin/env bash
# The main job: install what is missing, then a live-migration demo on a lab of real OVS
# chassis, reporting the measured downtime. Extra arguments go to `ferry demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/ferry demo "$@"
