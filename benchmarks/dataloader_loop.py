"""The textbook loop: TensorDataset + DataLoader + DistributedSampler. A second reference point."""

from __future__ import annotations

import time

from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from workload import reference_args, report, setup


def main() -> None:
    args = reference_args()
    rank, world, x, y, ddp, opt = setup(args)
    dataset = TensorDataset(x, y)
    sampler = DistributedSampler(dataset, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=args.batch_size // world, sampler=sampler, drop_last=True)
    loss_fn = nn.CrossEntropyLoss()
    rates = []
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        start, seen = time.perf_counter(), 0
        for xb, yb in loader:
            loss = loss_fn(ddp(xb), yb)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            seen += len(xb) * world
        rates.append(seen / (time.perf_counter() - start))
    report(args, rank, rates)


if __name__ == "__main__":
    main()
