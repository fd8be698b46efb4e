"""The benchmark workload, shared by the reference loops: the same tensors ddptrain builds for
`--data blobs --n-features F --n-classes C --n-samples N --val-fraction 0` (standardized features, class ids)."""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
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
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: NCCL, one GPU per rank")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast, as ddptrain's")
    parser.add_argument("--breakdown-steps", type=int, default=0, help="also time the phases of this many steps")
    parser.add_argument("--out", required=True, help="JSON file for rank 0's per-epoch samples/s")
    return parser.parse_args()


@dataclass
class Workload:
    rank: int
    world: int
    x: torch.Tensor
    y: torch.Tensor
    ddp: nn.parallel.DistributedDataParallel
    opt: torch.optim.Optimizer
    device: torch.device

    def autocast(self, precision: str):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def sync(self) -> None:
        """Wait for queued GPU work before reading a clock (CPU work is synchronous)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def setup(args: argparse.Namespace, data_on_device: bool = True) -> Workload:
    """Process group from torchrun's variables, the data as tensors (on the GPU for --device cuda unless
    data_on_device is False), the DDP model and SGD."""
    cuda = args.device == "cuda"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    cfg = FitConfig(data="blobs", n_samples=args.rows, n_features=args.features, n_classes=args.classes,
                    val_fraction=0.0, seed=args.seed)
    data = prepare_fit_data(cfg)
    x, y = (data.train.x.to(device), data.train.y.to(device)) if data_on_device else (data.train.x, data.train.y)
    torch.manual_seed(args.seed)
    hidden = tuple(int(h) for h in args.hidden.split(","))
    model = build_model(ModelSpec(args.features, args.classes, hidden)).to(device)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device] if cuda else None,
                                              gradient_as_bucket_view=True)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    return Workload(dist.get_rank(), dist.get_world_size(), x, y, ddp, opt, device)


def report(args: argparse.Namespace, rank: int, epoch_rates: list[float], extra: dict | None = None) -> None:
    if rank == 0:
        Path(args.out).write_text(json.dumps({"samples_per_s": epoch_rates, **(extra or {})}))
    dist.barrier()
    dist.destroy_process_group()


def breakdown(w: Workload, per_rank: int, steps: int, precision: str) -> dict[str, float]:
    """Seconds per step in: data (indexing), forward+backward without sync, all-reduce wait (backward with sync
    minus without), optimizer. Each phase ends with a device sync, so on a GPU the split costs some overlap."""
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(123)
    t = {"data": 0.0, "forward_backward": 0.0, "allreduce_wait": 0.0, "optimizer": 0.0}
    for _ in range(steps):
        t0 = time.perf_counter()
        idx = torch.randint(0, len(w.x), (per_rank,), generator=g).to(w.device)
        xb, yb = w.x[idx], w.y[idx]
        w.sync()
        t1 = time.perf_counter()
        with w.ddp.no_sync(), w.autocast(precision):
            loss = loss_fn(w.ddp(xb), yb)
        loss.backward()
        w.sync()
        t2 = time.perf_counter()
        w.opt.zero_grad(set_to_none=True)
        dist.barrier()
        w.sync()
        t3 = time.perf_counter()
        with w.autocast(precision):
            loss = loss_fn(w.ddp(xb), yb)
        loss.backward()
        w.sync()
        t4 = time.perf_counter()
        w.opt.step()
        w.opt.zero_grad(set_to_none=True)
        w.sync()
        t5 = time.perf_counter()
        t["data"] += t1 - t0
        t["forward_backward"] += t2 - t1
        t["allreduce_wait"] += max((t4 - t3) - (t2 - t1), 0.0)
        t["optimizer"] += t5 - t4
    return {k: v / steps for k, v in t.items()}
