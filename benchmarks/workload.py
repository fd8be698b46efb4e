"""The benchmark workload, shared by the reference loops: the same tensors ddptrain builds for
`--data blobs --n-features F --n-classes C --n-samples N --val-fraction 0` (standardized features, class ids)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ddptrain.config import FitConfig
from ddptrain.data import prepare_fit_data
from ddptrain.model import ModelSpec, build_model


def reference_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=65536)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--hidden", default="256,256")
    parser.add_argument("--batch-size", type=int, default=256, help="global batch")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--breakdown-steps", type=int, default=0, help="also time the phases of this many steps")
    parser.add_argument("--out", required=True, help="JSON file for rank 0's per-epoch samples/s")
    return parser.parse_args()


def setup(args: argparse.Namespace):
    """Process group from torchrun's variables, the data as tensors, the DDP model and SGD."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = FitConfig(data="blobs", n_samples=args.rows, n_features=args.features, n_classes=args.classes,
                    val_fraction=0.0, seed=args.seed)
    data = prepare_fit_data(cfg)
    torch.manual_seed(args.seed)
    hidden = tuple(int(h) for h in args.hidden.split(","))
    model = build_model(ModelSpec(args.features, args.classes, hidden))
    ddp = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    return rank, world, data.train.x, data.train.y, ddp, opt


def report(args: argparse.Namespace, rank: int, epoch_rates: list[float], extra: dict | None = None) -> None:
    if rank == 0:
        Path(args.out).write_text(json.dumps({"samples_per_s": epoch_rates, **(extra or {})}))
    dist.barrier()
    dist.destroy_process_group()


def breakdown(ddp, opt, x, y, rank, world, per_rank, steps) -> dict[str, float]:
    """Seconds per step in: data (indexing), forward+backward without sync, all-reduce wait (backward with sync
    minus without), optimizer. On CPU every op is synchronous, so wall-clock splits are meaningful."""
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(123)
    t = {"data": 0.0, "forward_backward": 0.0, "allreduce_wait": 0.0, "optimizer": 0.0}
    for _ in range(steps):
        t0 = time.perf_counter()
        idx = torch.randint(0, len(x), (per_rank,), generator=g)
        xb, yb = x[idx], y[idx]
        t1 = time.perf_counter()
        with ddp.no_sync():
            loss_fn(ddp(xb), yb).backward()
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        dist.barrier()
        t3 = time.perf_counter()
        loss_fn(ddp(xb), yb).backward()
        t4 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        t["data"] += t1 - t0
        t["forward_backward"] += t2 - t1
        t["allreduce_wait"] += max((t4 - t3) - (t2 - t1), 0.0)
        t["optimizer"] += t5 - t4
    return {k: v / steps for k, v in t.items()}
