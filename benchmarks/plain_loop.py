"""A plain hand-written DDP loop: the data is one tensor, each rank slices its share of a per-epoch permutation.
The reference ddptrain is measured against. Run under torchrun; writes rank 0's per-epoch samples/s."""

from __future__ import annotations

import time

import torch
from torch import nn

from workload import breakdown, reference_args, report, setup


def main() -> None:
    args = reference_args()
    w = setup(args)
    per_rank = args.batch_size // w.world
    steps = len(w.x) // args.batch_size
    loss_fn = nn.CrossEntropyLoss()
    rates, cpu_rates = [], []
    for epoch in range(args.epochs):
        w.sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        g = torch.Generator().manual_seed(args.seed + epoch)
        perm = torch.randperm(len(w.x), generator=g).to(w.device)
        for step in range(steps):
            idx = perm[step * args.batch_size + w.rank * per_rank: step * args.batch_size + (w.rank + 1) * per_rank]
            with w.autocast(args.precision):
                loss = loss_fn(w.ddp(w.x[idx]), w.y[idx])
            loss.backward()
            w.opt.step()
            w.opt.zero_grad(set_to_none=True)
        w.sync()
        rates.append(steps * args.batch_size / (time.perf_counter() - start))
        cpu_rates.append(steps * args.batch_size / (time.process_time() - cpu_start))
    extra = {"cpu_samples_per_s": cpu_rates}
    if args.breakdown_steps:
        extra["breakdown_s"] = breakdown(w, per_rank, args.breakdown_steps, args.precision)
    report(args, w.rank, rates, extra)


if __name__ == "__main__":
    main()
