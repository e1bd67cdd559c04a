#!/usr/bin/env bash
# Set up, prepare the embedded corpus (the Python standard library's source)
# and pre-train the quickstart GPT-MoE (LocMoE+ routing) with 2 CPU ranks (expert parallel 2).
#   bash scripts/quickstart.sh [--section.key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VENV:-.venv}
export PATH="$VENV/bin:$PATH"
locmoe-train prepare-data --output data/stdlib
NPROC=${NPROC:-2} bash launch/local.sh configs/quickstart.yaml "$@"
