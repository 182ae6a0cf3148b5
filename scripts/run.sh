#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: `meterstream demo`, the whole head-end on
# loopback (embedded broker, simulated field, collectors, worker, JSON API, payment stream).
# Ctrl-C stops it. Extra arguments go to `meterstream demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/meterstream demo --config config/demo.toml "$@"
