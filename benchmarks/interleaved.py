"""ddptrain's epoch against a plain hand-written epoch in one process, alternating epoch by epoch.

    python -m torch.distributed.run --standalone --nproc-per-node=2 benchmarks/interleaved.py --rounds 20

compare.py runs the programs as separate processes, one after the other, as issue 5 prescribes; on a shared machine
the load changes between two runs and a single ratio swings by +-15%. Here both loops train the same model (the
DDP module at world size 2 and up; at world size 1 ddptrain's bare module, so the figure is the loops' own cost and
not DDP's, which compare.py's plain loop pays at world size 1) with the same optimizer on the same tensors, inside
one process per rank, taking turns one epoch at a time (the order flips every round), so the two sides of each
ratio are measured a second apart. ddptrain's side is its own
`Trainer.run_epoch` (logging, the loss all-reduce, its epoch row; the checkpoint after the epoch is not timed, as in
metrics.jsonl); the plain side is plain_loop.py's epoch. Both wall-clock and process CPU time are reported: CPU
time does not count the time another tenant holds the core. Prints the median ratio with a 95% confidence interval
and writes a JSON file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from compare import median_ci
from plain_loop import plain_epoch

from ddptrain.checkpoint import Position
from ddptrain.config import FitConfig
from ddptrain.console import console
from ddptrain.data import prepare_fit_data
from ddptrain.dist import process_group
from ddptrain.run import build_parts
from ddptrain.rundir import RunDir, SilentRunDir, claim_run_folder
from ddptrain.train import Trainer


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20, help="pairs of epochs (one of each loop); the first is warm-up")
    p.add_argument("--rows", type=int, default=65536)
    p.add_argument("--features", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--hidden", default="256,256")
    p.add_argument("--batch-size", type=int, default=256, help="global batch")
    p.add_argument("--log-every", type=int, default=20, help="ddptrain's --log-every (its loss all-reduce)")
    p.add_argument("--out", default="benchmarks/out/interleaved.json")
    return p.parse_args()


def timed_plain_epoch(parts, epoch: int) -> tuple[float, float]:
    """plain_loop.py's epoch on ddptrain's model, optimizer and tensors: (wall s, CPU s)."""
    wall, cpu = time.perf_counter(), time.process_time()
    plain_epoch(parts.forward, parts.optimizer, parts.data.train.x, parts.data.train.y, parts.dist.rank,
                parts.dist.world_size, parts.cfg.batch_size, 1000 + epoch)
    return time.perf_counter() - wall, time.process_time() - cpu


def ddptrain_epoch(trainer: Trainer) -> tuple[float, float]:
    """ddptrain's own epoch, timed as its metrics.jsonl row is: (wall s, CPU s)."""
    trainer.run_epoch()
    return trainer.last_metrics["epoch_time_s"], trainer.last_metrics["epoch_cpu_s"]


def main() -> None:
    args = parse_args()
    console.quiet = True
    cfg = FitConfig(data="blobs", n_samples=args.rows, n_features=args.features, n_classes=args.classes,
                    hidden=tuple(int(h) for h in args.hidden.split(",")), optimizer="sgd", lr=0.05, momentum=0.9,
                    scheduler="constant",
                    batch_size=args.batch_size, val_fraction=0.0, epochs=args.rounds, log_every=args.log_every,
                    quiet=True)
    data = prepare_fit_data(cfg)
    with tempfile.TemporaryDirectory() as tmp, process_group("cpu", "gloo") as dist:
        folder = Path(tmp) / "run"
        run = RunDir(folder, claim_run_folder(folder, None, False)) if dist.is_main else SilentRunDir(folder)
        parts = build_parts(cfg, dist, data, run)
        trainer = Trainer(parts, Position(), time.perf_counter())
        rounds = []
        for r in range(args.rounds):
            sides = {}
            for name in (("ddptrain", "plain") if r % 2 == 0 else ("plain", "ddptrain")):
                sides[name] = ddptrain_epoch(trainer) if name == "ddptrain" else timed_plain_epoch(parts, r)
            rounds.append(sides)
        run.close()
    if not dist.is_main:
        return
    measured = rounds[1:]  # the first round pays warm-up
    wall = [p["plain"][0] / p["ddptrain"][0] for p in measured]  # ddptrain samples/s over plain samples/s
    cpu = [p["plain"][1] / p["ddptrain"][1] for p in measured]
    result = {"args": vars(args), "world_size": dist.world_size, "rounds": rounds,
              "wall_ratio_median": statistics.median(wall), "wall_ratio_ci95": median_ci(wall),
              "cpu_ratio_median": statistics.median(cpu), "cpu_ratio_ci95": median_ci(cpu)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    (wall_lo, wall_hi), (cpu_lo, cpu_hi) = result["wall_ratio_ci95"], result["cpu_ratio_ci95"]
    print(f"world size {dist.world_size}, {len(measured)} rounds: ddptrain / plain loop throughput, wall clock "
          f"{result['wall_ratio_median']:.3f} (95% CI {wall_lo:.3f}-{wall_hi:.3f}), CPU time "
          f"{result['cpu_ratio_median']:.3f} (95% CI {cpu_lo:.3f}-{cpu_hi:.3f}); {args.out}")


if __name__ == "__main__":
    main()
