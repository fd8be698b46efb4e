#!/usr/bin/env bash
# Run this same script on every node. torchrun's c10d rendezvous gathers the nodes.
# Set on every node:
#   NNODES          number of nodes (e.g. 2; or MIN:MAX for an elastic job)
#   NPROC_PER_NODE  processes per node (default: the GPU count, else 1)
#   RDZV_ENDPOINT   host:port of the first node, reachable from all nodes (e.g. node0:29500)
#   RUN_ID          the same id on every node (e.g. a job id); it also names the default run folder
#   OUT             a run folder on storage every node can reach (only global rank 0 writes it, but every
#                   rank reads it to resume after a restart)
#   DATA            the data file (every node reads it) or a built-in name
set -euo pipefail

: "${NNODES:?set NNODES}" "${RDZV_ENDPOINT:?set RDZV_ENDPOINT (host:port of the first node)}"
if command -v nvidia-smi >/dev/null 2>&1; then GPUS=$(nvidia-smi --list-gpus | wc -l); else GPUS=0; fi
NPROC_PER_NODE=${NPROC_PER_NODE:-$(( GPUS > 0 ? GPUS : 1 ))}
RUN_ID=${RUN_ID:-ddptrain}
OUT=${OUT:-runs/run-$RUN_ID}
DATA=${DATA:-spirals}

# --max-restarts: a failed or killed worker restarts the group; ddptrain resumes from $OUT without being asked.
exec torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" \
  --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="$RUN_ID" \
  --max-restarts="${MAX_RESTARTS:-3}" \
  -m ddptrain fit --data "$DATA" --out "$OUT" --resume auto "$@"
