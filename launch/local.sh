#!/usr/bin/env bash
# Single-node launch: validate the config for the world size, then torchrun.
#   NPROC=2 bash launch/local.sh CONFIG.yaml [--section.key=value ...]
# NPROC defaults to the number of GPUs, or 2 on a CPU-only machine.
set -euo pipefail
CONFIG=${1:?usage: launch/local.sh CONFIG.yaml [--section.key=value ...]}
shift
if [ -z "${NPROC:-}" ]; then
  NPROC=$(python -c "import torch; print(torch.cuda.device_count() or 2)")
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# One clear error (exit 2) instead of one per rank when the config cannot work.
python -m locmoe_train.train --check --world-size "$NPROC" --config "$CONFIG" "$@"
exec torchrun --standalone --nproc_per_node="$NPROC" -m locmoe_train.train --config "$CONFIG" "$@"
