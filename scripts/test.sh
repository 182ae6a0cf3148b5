#!/usr/bin/env bash
# Set up (scripts/setup.sh --test) and run the whole test suite, slow scenario tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
exec .venv/bin/python -m pytest "$@"
