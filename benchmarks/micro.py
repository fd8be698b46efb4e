"""The three choices behind ddptrain's step, each an A/B in one process on issue 5's small workload (CPU, one thread):

    python benchmarks/micro.py            # ~15 s; more --rounds for more precision

1. batch gather: `x[idx]` against `x.index_select(0, idx)` (same rows), microseconds per call;
2. optimizer step: torch's per-parameter loop, `foreach` and `fused` SGD, microseconds per step;
3. a world of one: the bare module against the DDP-wrapped one (Gloo, one rank), whole training steps alternating in
   64-step epochs, reported as the median throughput ratio.
Ratios, not absolute times: the machine is shared.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

from ddptrain.model import ModelSpec, build_model

ROWS, FEATURES, CLASSES, HIDDEN, BATCH = 65536, 32, 10, (256, 256), 256


def per_call_us(fn, calls: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def gather(x: torch.Tensor, perm: torch.Tensor, rounds: int) -> dict[str, float]:
    batches = [perm[k * BATCH:(k + 1) * BATCH] for k in range(ROWS // BATCH)]
    advanced = [per_call_us(lambda: [x[i] for i in batches], 8) / len(batches) for _ in range(rounds)]
    select = [per_call_us(lambda: [x.index_select(0, i) for i in batches], 8) / len(batches) for _ in range(rounds)]
    return {"x[idx] us": statistics.median(advanced), "index_select us": statistics.median(select)}


def optimizer_step(rounds: int) -> dict[str, float]:
    result = {}
    for kind in ("loop", "foreach", "fused"):
        model = build_model(ModelSpec(FEATURES, CLASSES, HIDDEN))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9,
                              **({"foreach": False} if kind == "loop" else {kind: True}))
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        result[f"SGD {kind} us"] = statistics.median(per_call_us(opt.step, 200) for _ in range(rounds))
    return result


def bare_vs_ddp(x: torch.Tensor, y: torch.Tensor, rounds: int) -> dict[str, float]:
    models = {}
    for name in ("bare", "ddp"):
        torch.manual_seed(0)
        model = build_model(ModelSpec(FEATURES, CLASSES, HIDDEN))
        forward = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True) if name == "ddp" else model
        models[name] = (forward, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    loss_fn, times = nn.CrossEntropyLoss(), {"bare": [], "ddp": []}
    for r in range(rounds + 1):
        for name in (("bare", "ddp") if r % 2 else ("ddp", "bare")):
            forward, opt = models[name]
            perm = torch.randperm(ROWS)
            start = time.perf_counter()
            for k in range(64):
                idx = perm[k * BATCH:(k + 1) * BATCH]
                loss_fn(forward(x.index_select(0, idx)), y.index_select(0, idx)).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    ratios = [d / b for d, b in zip(times["ddp"], times["bare"])]
    return {"bare / DDP throughput": statistics.median(ratios),
            "bare step us": statistics.median(times["bare"]) / 64 * 1e6,
            "DDP step us": statistics.median(times["ddp"]) / 64 * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = torch.randn(ROWS, FEATURES), torch.randint(0, CLASSES, (ROWS,))
    timing_rounds = max(args.rounds // 6, 3)  # each of these is already a median over many calls
    results = gather(x, torch.randperm(ROWS), timing_rounds)
    results.update(optimizer_step(timing_rounds))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # one rank: no port needed
    try:
        results.update(bare_vs_ddp(x, y, args.rounds))
    finally:
        dist.destroy_process_group()
    for key, value in results.items():
        print(f"{key:24} {value:8.3f}" if "/" in key else f"{key:24} {value:8.1f}")


if __name__ == "__main__":
    main()
