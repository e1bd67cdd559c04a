#!/usr/bin/env bash
# Multi-node launch: run this same command on every node.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 NPROC=8 \
#     bash launch/multinode.sh CONFIG.yaml [--section.key=value ...]
# NODE_RANK differs per node (0..NNODES-1); MASTER_ADDR is reachable from all
# nodes. MAX_RESTARTS (default 0) restarts the job's workers after a failure.
set -euo pipefail
CONFIG=${1:?usage: launch/multinode.sh CONFIG.yaml [--section.key=value ...]}
shift
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
MASTER_PORT=${MASTER_PORT:-29500}
if [ -z "${NPROC:-}" ]; then
  NPROC=$(python -c "import torch; print(torch.cuda.device_count() or 1)")
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python -m locmoe_train.train --check --world-size "$((NNODES * NPROC))" --config "$CONFIG" "$@"
exec torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC" \
  --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
  --max_restarts="${MAX_RESTARTS:-0}" \
  -m locmoe_train.train --config "$CONFIG" "$@"
