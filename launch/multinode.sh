#!/usr/bin/env bash
# Multi-node launch: one torchrun per node, joined by torchrun's c10d rendezvous.
# Run the same command on every node (only NODE_RANK, if you set it, differs):
#   node0$ NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NPROC=8 bash launch/multinode.sh CONFIG.yaml [--section.key=value ...]
#   node1$ NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 NPROC=8 bash launch/multinode.sh CONFIG.yaml [--section.key=value ...]
# Environment:
#   NNODES        number of nodes, or MIN:MAX for an elastic range (required)
#   MASTER_ADDR   host of the rendezvous store, reachable from every node (required)
#   MASTER_PORT   its port (default 29500)
#   NPROC         processes per node (default: the node's GPUs, 1 without GPU)
#   NODE_RANK     optional: 0 makes this node host the rendezvous store, other
#                 values make it a client. Unset: torchrun hosts the store on the
#                 node whose name or address matches MASTER_ADDR. Global ranks are
#                 assigned by the rendezvous either way, contiguous per node.
#   RDZV_ID       rendezvous id shared by all nodes of one job (default:
#                 SLURM_JOB_ID, else locmoe-MASTER_PORT)
#   MAX_RESTARTS  restarts of all workers after a failure (default 0; resume
#                 from the latest checkpoint needs checkpoint.resume=auto)
# Launch/slurm.sbatch calls this script once per node.
set -euo pipefail
CONFIG=${1:?usage: launch/multinode.sh CONFIG.yaml [--section.key=value ...]}
shift
: "${NNODES:?set NNODES (number of nodes, or MIN:MAX)}"
: "${MASTER_ADDR:?set MASTER_ADDR (the rendezvous host, reachable from every node)}"
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-locmoe-$MASTER_PORT}}
if [ -z "${NPROC:-}" ]; then
  NPROC=$(python -c "import torch; print(torch.cuda.device_count() or 1)")
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# One clear error (exit 2) per node instead of one per rank when the config
# cannot work; an elastic range is checked at both ends.
MIN_NODES=${NNODES%%:*}
MAX_NODES=${NNODES##*:}
if ! [[ $MIN_NODES =~ ^[1-9][0-9]*$ && $MAX_NODES =~ ^[1-9][0-9]*$ ]] || ((MIN_NODES > MAX_NODES)); then
  echo "error: NNODES=$NNODES must be a node count (e.g. 4) or a range MIN:MAX (e.g. 2:4)." >&2
  exit 2
fi
for nodes in $(printf '%s\n' "$MIN_NODES" "$MAX_NODES" | sort -un); do
  python -m locmoe_train.train --check --world-size "$((nodes * NPROC))" --config "$CONFIG" "$@"
done

RDZV_CONF=()
ROLE="store host chosen by torchrun"
if [ -n "${NODE_RANK:-}" ]; then
  if [ "$NODE_RANK" = 0 ]; then
    RDZV_CONF=(--rdzv-conf=is_host=1) ROLE="node 0, hosts the rendezvous store"
  else
    RDZV_CONF=(--rdzv-conf=is_host=0) ROLE="node $NODE_RANK, rendezvous client"
  fi
fi
echo "multinode: $NNODES node(s) x $NPROC, rendezvous $RDZV_ID at $MASTER_ADDR:$MASTER_PORT ($ROLE)"
exec torchrun --nnodes="$NNODES" --nproc-per-node="$NPROC" \
  --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$RDZV_ID" \
  "${RDZV_CONF[@]}" --max-restarts="${MAX_RESTARTS:-0}" \
  -m locmoe_train.train --config "$CONFIG" "$@"
