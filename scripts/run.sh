#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: the simulated field with a live summary.
# Ctrl-C stops it. Extra arguments go to `meterstream sim`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/meterstream sim --config config/field-demo.toml "$@"
