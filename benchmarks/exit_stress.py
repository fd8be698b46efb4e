"""Exit stress: many consecutive finished 2-process jobs, counting any that do not exit 0.

A finished job must exit 0 every time; a worker dying of SIGABRT at interpreter teardown ("terminate called
without an active exception") made torchrun report a completed job as failed (issue 14). Each run is a short real
training under torchrun (Gloo, CPU), then its exit code and stderr are checked. Not part of CI (minutes of work).

    python benchmarks/exit_stress.py --runs 200 [--launcher torchrun|nproc-per-node] [--keep-going]
        [--out benchmarks/out/exit_stress.json]

`--launcher nproc-per-node` runs `ddptrain fit --nproc-per-node N` (workers forked from torch's agent). A job that
has not ended after 120 s counts as a failure (a hang).

Failures keep their stderr (with faulthandler's Python stacks of every thread) in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_run(folder: Path, i: int, nproc: int, launcher: str) -> tuple[int, str, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    fit = ["fit", "--data", "blobs", "--n-samples", "2000", "--epochs", "2", "--hidden", "64", "--batch-size", "64",
           "--log-every", "5", "--quiet", "--out", str(folder / f"run-{i}")]
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "ddptrain", *fit]
    else:
        cmd = [sys.executable, "-m", "ddptrain", *fit, "--nproc-per-node", str(nproc)]
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    except subprocess.TimeoutExpired as hung:
        return -1, f"hung: no exit after 120 s\n{hung.stderr or ''}", time.perf_counter() - started
    return done.returncode, done.stderr, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--launcher", choices=("torchrun", "nproc-per-node"), default="torchrun")
    parser.add_argument("--keep-going", action="store_true", help="do not stop at the first failure")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "exit_stress.json")
    args = parser.parse_args()
    failures, seconds = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            code, stderr, took = one_run(Path(tmp), i, args.nproc, args.launcher)
            seconds.append(took)
            aborted = "terminate called" in stderr or "SIGABRT" in stderr
            if code != 0 or aborted:
                failures.append({"run": i, "exit_code": code, "stderr": stderr[-6000:]})
                print(f"run {i}: exit {code}{' (abort)' if aborted else ''}", flush=True)
                if not args.keep_going:
                    break
            elif (i + 1) % 10 == 0:
                print(f"{i + 1} runs, {len(failures)} failed", flush=True)
    result = {"runs": len(seconds), "failures": len(failures), "nproc": args.nproc, "launcher": args.launcher,
              "median_run_s": sorted(seconds)[len(seconds) // 2], "failed": failures}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "failed"}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
