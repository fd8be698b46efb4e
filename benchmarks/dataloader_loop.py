"""The textbook loop: TensorDataset + DataLoader + DistributedSampler. A second reference point.
On a GPU the data stays in pinned host memory and each batch is copied over, as the textbook does."""

from __future__ import annotations

import time

from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from workload import reference_args, report, setup


def main() -> None:
    args = reference_args()
    w = setup(args, data_on_device=False)
    dataset = TensorDataset(w.x, w.y)
    sampler = DistributedSampler(dataset, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=args.batch_size // w.world, sampler=sampler, drop_last=True,
                        pin_memory=w.device.type == "cuda")
    loss_fn = nn.CrossEntropyLoss()
    rates, cpu_rates = [], []
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        w.sync()
        start, cpu_start, seen = time.perf_counter(), time.process_time(), 0
        for xb, yb in loader:
            xb, yb = xb.to(w.device, non_blocking=True), yb.to(w.device, non_blocking=True)
            with w.autocast(args.precision):
                loss = loss_fn(w.ddp(xb), yb)
            loss.backward()
            w.opt.step()
            w.opt.zero_grad(set_to_none=True)
            seen += len(xb) * w.world
        w.sync()
        rates.append(seen / (time.perf_counter() - start))
        cpu_rates.append(seen / (time.process_time() - cpu_start))
    report(args, w.rank, rates, {"cpu_samples_per_s": cpu_rates})


if __name__ == "__main__":
    main()
