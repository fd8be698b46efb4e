"""A plain hand-written DDP loop: the data is one tensor, each rank slices its share of a per-epoch permutation.
The reference ddptrain is measured against. Run under torchrun; writes rank 0's per-epoch samples/s."""

from __future__ import annotations

import time

import torch
from torch import nn

from workload import breakdown, reference_args, report, setup


def main() -> None:
    args = reference_args()
    rank, world, x, y, ddp, opt = setup(args)
    per_rank = args.batch_size // world
    steps = len(x) // args.batch_size
    loss_fn = nn.CrossEntropyLoss()
    rates = []
    for epoch in range(args.epochs):
        start = time.perf_counter()
        g = torch.Generator().manual_seed(args.seed + epoch)
        perm = torch.randperm(len(x), generator=g)
        for step in range(steps):
            idx = perm[step * args.batch_size + rank * per_rank: step * args.batch_size + (rank + 1) * per_rank]
            loss = loss_fn(ddp(x[idx]), y[idx])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        rates.append(steps * args.batch_size / (time.perf_counter() - start))
    extra = {"breakdown_s": breakdown(ddp, opt, x, y, rank, world, per_rank, args.breakdown_steps)} \
        if args.breakdown_steps else {}
    report(args, rank, rates, extra)


if __name__ == "__main__":
    main()
