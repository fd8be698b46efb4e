"""A plain hand-written DDP loop: the data is one tensor, each rank slices its share of a per-epoch permutation.
The reference ddptrain is measured against. Run under torchrun; writes rank 0's per-epoch samples/s."""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch
from torch import nn
from workload import breakdown, reference_args, report, setup


def plain_epoch(ddp: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, rank: int,
                world: int, batch: int, seed: int, autocast=nullcontext) -> None:
    """One epoch of the reference loop (`batch` is the global batch); interleaved.py runs this same function."""
    per_rank, loss_fn = batch // world, nn.CrossEntropyLoss()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).to(x.device)
    for step in range(len(x) // batch):
        idx = perm[step * batch + rank * per_rank: step * batch + (rank + 1) * per_rank]
        with autocast():
            loss = loss_fn(ddp(x[idx]), y[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def main() -> None:
    args = reference_args()
    w = setup(args)
    samples = len(w.x) // args.batch_size * args.batch_size
    rates, cpu_rates = [], []
    for epoch in range(args.epochs):
        w.sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        plain_epoch(w.ddp, w.opt, w.x, w.y, w.rank, w.world, args.batch_size, args.seed + epoch,
                    lambda: w.autocast(args.precision))
        w.sync()
        rates.append(samples / (time.perf_counter() - start))
        cpu_rates.append(samples / (time.process_time() - cpu_start))
    extra = {"cpu_samples_per_s": cpu_rates}
    if args.breakdown_steps:
        extra["breakdown_s"] = breakdown(w, args.batch_size // w.world, args.breakdown_steps, args.precision)
    report(args, w.rank, rates, extra)


if __name__ == "__main__":
    main()
