#!/usr/bin/env bash
# The GPU check of issue 5 §5 as one prepared script (a lent GPU machine's time is short): what the machine is,
# the CUDA-marked tests, the small workload, and a wide bf16 MLP against the GPU's measured bf16 matmul rate.
#   OUT=benchmarks/out/gpu bash benchmarks/gpu.sh [tests] [small] [wide]     (no argument: all three)
# Every step is bounded and writes its log under $OUT, so a step that fails or runs long leaves the others' results.
set -u
OUT=${OUT:-benchmarks/out/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
STEPS=" ${*:-tests small wide} "

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$OUT/machine.txt"
$PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.get_device_name(0), 'cpus', __import__('os').cpu_count())" 2>&1 | tee -a "$OUT/machine.txt"

[[ $STEPS == *" tests "* ]] && timeout 180 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/cuda-tests.txt"

# The small workload (issue 5's), NCCL at world size 1 on the one GPU.
# ddptrain-graphs: the same with --cuda-graphs (issue 17's target: >= 5x eager ddptrain and >= 5x the plain loop).
[[ $STEPS == *" small "* ]] && timeout 200 $PY benchmarks/compare.py --device cuda --world-sizes 1 --scaling strong --repeats 2 --epochs 5 \
    --programs ddptrain,ddptrain-graphs,plain --out "$OUT/small" 2>&1 | tee "$OUT/small.txt"

# A wide MLP: 4 hidden layers of 8192 (~204M parameters), bf16 autocast, global batch 16384. ddptrain writes a
# 1.6 GB checkpoint (weights and momentum) after every epoch, outside the epoch's time.
[[ $STEPS == *" wide "* ]] && timeout 330 $PY benchmarks/compare.py --device cuda --world-sizes 1 --scaling strong --repeats 2 --epochs 4 \
    --rows 262144 --features 256 --hidden 8192,8192,8192,8192 --batch-size 16384 --precision bf16 \
    --programs ddptrain,ddptrain-graphs,plain --out "$OUT/wide" 2>&1 | tee "$OUT/wide.txt"
