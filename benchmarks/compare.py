"""Compare world sizes, and ddptrain against hand-written loops on the same work, in one run.

    python benchmarks/compare.py --world-sizes 1,2 --repeats 3
    python benchmarks/compare.py --device cuda --world-sizes 1 --hidden 8192,8192,8192,8192 --precision bf16 ...
    python benchmarks/compare.py --device cuda --world-sizes 1 --scaling strong --programs ddptrain,ddptrain-graphs,plain

Every program runs under torchrun with one thread per process, alternately, and reports its own rank-0
samples/s per epoch; epochs 2..E count (the first pays warm-up). Figures are ratios taken side by side:
ddptrain / plain loop, and each program's speedup and efficiency against world size 1. Strong scaling keeps the
global batch fixed; weak scaling keeps the per-rank batch fixed. With --device cuda every program runs over NCCL
with one GPU per rank and its data on the GPU (the DataLoader loop copies each batch from pinned memory), and the
FLOP rate is compared with the same GPU's measured matmul rate in the run's precision. Output: a Rich table, a
JSON file, a PNG plot (with the `plot` extra).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROGRAMS = ("ddptrain", "plain", "dataloader")  # and ddptrain-graphs (--device cuda): the step as a CUDA graph
console = Console(width=None if sys.stdout.isatty() else 150)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-sizes", default="1,2")
    p.add_argument("--scaling", choices=("strong", "weak", "both"), default="both")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--rows", type=int, default=65536)
    p.add_argument("--features", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--hidden", default="256,256")
    p.add_argument("--batch-size", type=int, default=256, help="global batch at world size 1")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--programs", default=",".join(PROGRAMS))
    p.add_argument("--ddptrain-args", default="", help="extra fit flags, e.g. '--comm-hook fp16'")
    p.add_argument("--out", default="benchmarks/out", help="folder for results.json and scaling.png")
    return p.parse_args()


def torchrun(world: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]


def run_program(name: str, world: int, batch: int, args: argparse.Namespace, workdir: Path) -> dict:
    """One run; returns rank 0's mean samples/s over epochs 2..E (and the phase breakdown of the plain loop)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}"}
    result_file = workdir / f"{name}-{world}-{batch}.json"
    if name.startswith("ddptrain"):
        out = Path(tempfile.mkdtemp(dir=workdir))
        cmd = torchrun(world) + ["-m", "ddptrain", "fit", "--data", "blobs", "--n-samples", str(args.rows),
                                 "--n-features", str(args.features), "--n-classes", str(args.classes),
                                 "--hidden", args.hidden, "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9",
                                 "--scheduler", "constant",  # the plain loops' work: a constant rate
                                 "--batch-size", str(batch), "--val-fraction", "0",
                                 "--epochs", str(args.epochs), "--out", str(out / "run"), "--quiet",
                                 "--device", args.device, "--precision", args.precision,
                                 *args.ddptrain_args.split()]
        if args.device == "cuda":  # ddptrain-graphs: each step a replayed CUDA graph; ddptrain: eager steps
            cmd.append("--cuda-graphs" if name == "ddptrain-graphs" else "--no-cuda-graphs")
    else:
        cmd = torchrun(world) + [str(HERE / f"{name}_loop.py"), "--rows", str(args.rows), "--features",
                                 str(args.features), "--classes", str(args.classes), "--hidden", args.hidden,
                                 "--batch-size", str(batch), "--epochs", str(args.epochs), "--out", str(result_file),
                                 "--device", args.device, "--precision", args.precision]
        if name == "plain":
            cmd += ["--breakdown-steps", "30"]
    for attempt in (1, 2):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=workdir)
        if proc.returncode == 0:
            break
        if name.startswith("ddptrain"):  # the retry writes a fresh run folder (ddptrain never overwrites one)
            shutil.rmtree(out / "run", ignore_errors=True)
        # Seen rarely on these shared machines: a Gloo worker aborting at exit ("terminate called without an
        # active exception", SIGABRT) after the work is done. One retry, said out loud.
        log = workdir.parent / f"failed-{name}-{world}-{attempt}-{os.getpid()}.log"
        log.write_text(proc.stdout + proc.stderr)
        said = [line for line in proc.stderr.splitlines() if line.startswith("error:") or "Error" in line]
        console.print(f"warning: {name} at world size {world} failed (attempt {attempt}; log {log}): "
                      f"{(said or ['?'])[0][:300]}")
    else:
        raise SystemExit(f"error: {name} at world size {world} failed twice:\n{proc.stderr[-2000:]}")
    if name.startswith("ddptrain"):
        rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
        epochs = [r for r in rows if r["kind"] == "epoch"]
        rates = [r["samples_per_s"] for r in epochs]
        cpu_rates = [r["samples_per_s"] * r["epoch_time_s"] / r["epoch_cpu_s"] for r in epochs]
        extra = {}
    else:
        data = json.loads(result_file.read_text())
        rates, cpu_rates = data.pop("samples_per_s"), data.pop("cpu_samples_per_s")
        extra = data
    # the same over rank 0's process CPU time, which does not count time the machine's other tenants held the core
    extra["cpu_samples_per_s"] = after_warmup(cpu_rates)
    return {"samples_per_s": after_warmup(rates), **extra}


def after_warmup(epoch_rates: list[float]) -> float:
    """All samples of epochs 2..E over their total time: the harmonic mean of equal-sized epochs' rates."""
    return statistics.harmonic_mean(epoch_rates[1:] if len(epoch_rates) > 1 else epoch_rates)


def measure(args: argparse.Namespace, workdir: Path) -> list[dict]:
    worlds = [int(w) for w in args.world_sizes.split(",")]
    programs = args.programs.split(",")
    modes = ("strong", "weak") if args.scaling == "both" else (args.scaling,)
    records = []
    for mode in modes:
        for world in worlds:
            batch = args.batch_size if mode == "strong" else args.batch_size * world
            for repeat in range(args.repeats):
                order = programs[repeat % len(programs):] + programs[:repeat % len(programs)]  # alternate
                for name in order:
                    result = run_program(name, world, batch, args, workdir)
                    records.append({"mode": mode, "world_size": world, "global_batch": batch, "repeat": repeat,
                                    "program": name, **result})
                    console.print(f"{mode:6} world {world} batch {batch:5} repeat {repeat} {name:10} "
                                  f"{result['samples_per_s']:>10,.0f} samples/s")
    return records


def matmul_rate(device: str, precision: str) -> float:
    """The ceiling for one process of an MLP, in FLOP/s: this CPU's single-thread float32 matmul rate, or the GPU's
    matmul rate in the run's precision (8192-square bf16, or float32 without TF32), timed with CUDA events."""
    if device == "cuda":
        code = ("import torch; n = 8192; dt = torch.bfloat16 if %r == 'bf16' else torch.float32\n"
                "torch.backends.cuda.matmul.allow_tf32 = False\n"
                "a, b = (torch.randn(n, n, device='cuda', dtype=dt) for _ in range(2))\n"
                "for _ in range(5): a @ b\n"
                "times = []\n"
                "for _ in range(20):\n"
                "    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)\n"
                "    s.record(); a @ b; e.record(); e.synchronize(); times.append(s.elapsed_time(e) / 1000)\n"
                "print(2 * n ** 3 / sorted(times)[len(times) // 2])" % precision)
    else:
        code = ("import time, torch; torch.set_num_threads(1); a = torch.randn(1024, 1024); b = torch.randn(1024, 1024)\n"
                "for _ in range(3): a @ b\n"
                "best = min((lambda t: (a @ b, time.perf_counter() - t)[1])(time.perf_counter()) for _ in range(20))\n"
                "print(2 * 1024 ** 3 / best)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout)


def flop_fraction(row: dict, args: argparse.Namespace, peak: float) -> float:
    """Training FLOP rate per process (6 FLOPs per weight per sample: forward, input and weight gradients) as a
    fraction of the matmul rate."""
    widths = [args.features, *map(int, args.hidden.split(",")), args.classes]
    macs = sum(a * b for a, b in zip(widths, widths[1:]))
    return 6 * macs * row["samples_per_s"] / row["world_size"] / peak


def median_ci(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval for the median: the order statistics x(k) and x(n+1-k) with the
    largest k for which P(Binomial(n, 1/2) < k) <= (1 - level) / 2. With fewer than 6 values it is the full range
    (and covers less than `level`)."""
    xs, n = sorted(values), len(values)
    k, tail = 1, 0.5 ** n  # tail = P(X < k) for the next k
    while k < n // 2 and tail + math.comb(n, k) * 0.5 ** n <= (1 - level) / 2:
        tail += math.comb(n, k) * 0.5 ** n
        k += 1
    return xs[k - 1], xs[n - k]


def summarize(records: list[dict]) -> list[dict]:
    rows = []
    keys = sorted({(r["mode"], r["world_size"], r["program"]) for r in records})
    for mode, world, program in keys:
        mine = [r for r in records if (r["mode"], r["world_size"], r["program"]) == (mode, world, program)]
        rate = statistics.median(r["samples_per_s"] for r in mine)
        base = [r for r in records if (r["mode"], r["world_size"], r["program"]) == (mode, min(x["world_size"] for x in records), program)]
        speedup = rate / statistics.median(r["samples_per_s"] for r in base)
        pairs = [(r, p) for r in mine for p in records
                 if p["program"] == "plain" and (p["mode"], p["world_size"], p["repeat"]) == (mode, world, r["repeat"])]
        ratios = [r["samples_per_s"] / p["samples_per_s"] for r, p in pairs]
        cpu_ratios = [r["cpu_samples_per_s"] / p["cpu_samples_per_s"] for r, p in pairs]
        row = {"mode": mode, "world_size": world, "program": program, "samples_per_s": rate, "speedup": speedup,
               "efficiency": speedup / (world / min(x["world_size"] for x in records)),
               "vs_plain_median": statistics.median(ratios) if ratios else None, "vs_plain_all": ratios,
               "vs_plain_ci95": median_ci(ratios) if ratios else None,
               "vs_plain_cpu_median": statistics.median(cpu_ratios) if cpu_ratios else None,
               "vs_plain_cpu_ci95": median_ci(cpu_ratios) if cpu_ratios else None}
        breakdown = [r["breakdown_s"] for r in mine if "breakdown_s" in r]
        if breakdown:
            row["breakdown_ms"] = {k: 1000 * statistics.median(b[k] for b in breakdown) for k in breakdown[0]}
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    table = Table(title="ddptrain benchmark (rank-0 samples/s over epochs 2..E, median over repeats)")
    for column in ("scaling", "world", "program", "samples/s", "speedup", "efficiency",
                   "vs plain loop: median (95% CI)", "same, CPU time",
                   "of matmul peak", "step split ms (data / fwd+bwd / all-reduce / optim)"):
        table.add_column(column)
    for r in rows:
        split = r.get("breakdown_ms")
        table.add_row(r["mode"], str(r["world_size"]), r["program"], f"{r['samples_per_s']:,.0f}",
                      f"{r['speedup']:.2f}x", f"{r['efficiency']:.0%}",
                      f"{r['vs_plain_median']:.3f}x ({r['vs_plain_ci95'][0]:.2f}–{r['vs_plain_ci95'][1]:.2f})"
                      if r["vs_plain_median"] is not None and r["program"] != "plain" else "-",
                      f"{r['vs_plain_cpu_median']:.3f}x ({r['vs_plain_cpu_ci95'][0]:.2f}–{r['vs_plain_cpu_ci95'][1]:.2f})"
                      if r["vs_plain_cpu_median"] is not None and r["program"] != "plain" else "-",
                      f"{r['matmul_fraction']:.0%}",
                      " / ".join(f"{v:.2f}" for v in split.values()) if split else "")
    console.print(table)
    for r in rows:
        eager = [e for e in rows if (e["mode"], e["world_size"], e["program"]) == (r["mode"], r["world_size"], "ddptrain")]
        if r["program"] == "ddptrain-graphs" and eager:
            share = 1 - eager[0]["samples_per_s"] / r["samples_per_s"]
            console.print(f"{r['mode']} world {r['world_size']}: CUDA graphs give {r['samples_per_s'] / eager[0]['samples_per_s']:.2f}x "
                          f"the eager step; {share:.0%} of an eager step was launches and Python that a replay removes")
    for r in rows:
        if r["world_size"] > 1 and r["speedup"] < 1.0 and r["program"] == "ddptrain":
            console.print(f"[bold]{r['mode']} scaling: world size {r['world_size']} is slower than world size 1 "
                          f"({r['speedup']:.2f}x): for this model the all-reduce costs more than the compute it "
                          "splits, so more processes do not pay here.[/bold]")


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        console.print("no plot: pip install 'ddptrain[plot]' for matplotlib")
        return
    modes = sorted({r["mode"] for r in rows})
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for program in sorted({r["program"] for r in rows}):
            mine = sorted((r for r in rows if r["mode"] == mode and r["program"] == program), key=lambda r: r["world_size"])
            ax.plot([r["world_size"] for r in mine], [r["samples_per_s"] for r in mine], marker="o", label=program)
        ax.set_title(f"{mode} scaling")
        ax.set_xlabel("world size (processes)")
        ax.set_ylabel("samples/s (rank 0, epochs 2..E)")
        ax.set_xticks(sorted({r["world_size"] for r in rows}))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    console.print(f"plot: {path}")


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        records = measure(args, Path(tmp))
    rows = summarize(records)
    peak = matmul_rate(args.device, args.precision)
    for row in rows:
        row["matmul_fraction"] = flop_fraction(row, args, peak)
    print_table(rows)
    what = f"{args.precision} matmul rate of this GPU" if args.device == "cuda" else \
        "single-thread float32 matmul rate of this CPU"
    console.print(f"{what}: " + (f"{peak / 1e12:.0f} TFLOP/s" if args.device == "cuda" else f"{peak / 1e9:.1f} GFLOP/s"))
    (out / "results.json").write_text(json.dumps({"args": vars(args), "matmul_flops": peak, "summary": rows,
                                                  "runs": records}, indent=2))
    console.print(f"results: {out / 'results.json'}")
    plot(rows, out / "scaling.png")


if __name__ == "__main__":
    main()
