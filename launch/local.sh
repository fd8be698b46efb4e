#!/usr/bin/env bash
# One machine, N processes: CPU (Gloo) or one process per GPU (NCCL).
# Set:  NPROC (default: the GPU count, else 2), DATA (a file or built-in name), OUT (run folder).
# Extra arguments go to `ddptrain fit`, e.g.  launch/local.sh --epochs 50 --hidden 512,512
set -euo pipefail

if command -v nvidia-smi >/dev/null 2>&1; then
  GPUS=$(nvidia-smi --list-gpus | wc -l)
else
  GPUS=0
fi
NPROC=${NPROC:-$(( GPUS > 0 ? GPUS : 2 ))}
DATA=${DATA:-spirals}
OUT=${OUT:-runs/local-$(date +%Y%m%d-%H%M%S)}

# --standalone: a private rendezvous on a free port, so two jobs on one machine never join each other.
# --local-ranks-filter 0 would show rank 0 only; ddptrain already prints from rank 0 alone.
exec torchrun --standalone --nproc_per_node="$NPROC" \
  -m ddptrain fit --data "$DATA" --out "$OUT" --resume auto "$@"
