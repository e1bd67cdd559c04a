#!/usr/bin/env bash
# Set up the environment and run the test suite (CPU only; GPU tests skip).
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VENV:-.venv}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$VENV/bin/python" -m pytest tests --durations=25 "$@"
