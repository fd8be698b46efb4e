"""A table larger than memory trains from the memory-mapped cache inside a memory cgroup (issue 13).

    sudo python benchmarks/out_of_core.py [--rows 12000000] [--features 64] [--limit-gib 1] [--out DIR]
                                          [--repeats 2] [--reuse]

Writes a Parquet table of --rows x --features float32 (+ a 0/1 target) in 1M-row pieces, builds its prepared
cache with a first `fit` outside any limit (the build still holds the table in memory: streaming statistics are
not done), then trains one epoch from the cache inside a cgroup-v1 memory cgroup of --limit-gib (page cache
included, after dropping the machine's page cache) with `--shuffle block`. The baseline is the same model and
batch on a 1M-row table of the same shape, trained in memory with `--shuffle exact`. samples/s are
`metrics.jsonl`'s epoch rows. Needs root (cgroup v1 under /sys/fs/cgroup/memory). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CGROUP = Path("/sys/fs/cgroup/memory")


def write_table(path: Path, rows: int, features: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    w = rng.normal(size=features).astype(np.float32)
    names = [f"f{i}" for i in range(features)]
    schema = pa.schema([(n, pa.float32()) for n in names] + [("y", pa.int8())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, 1_000_000):
            x = rng.normal(size=(min(1_000_000, rows - start), features)).astype(np.float32)
            y = (x @ w > 0).astype(np.int8)
            writer.write_table(pa.table([*x.T, y], schema=schema))


def fit(data: Path, out: Path, shuffle: str, cache_dir: Path, cgroup: Path | None) -> dict:
    cmd = [sys.executable, "-m", "ddptrain", "fit", "--data", str(data), "--target", "y", "--epochs", "1",
           "--batch-size", "1024", "--hidden", "64", "--val-fraction", "0", "--shuffle", shuffle, "--out", str(out),
           "--cache-dir", str(cache_dir), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    shutil.rmtree(out, ignore_errors=True)  # a fresh run folder each time (fit never overwrites a run)
    if cgroup is not None:  # the child joins the cgroup before exec: everything it maps is charged there
        cmd = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh", *cmd]
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"fit failed ({done.returncode}): {done.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epoch = [r for r in rows if r.get("kind") == "epoch"][-1]
    return {"samples_per_s": epoch["samples_per_s"], "wall_s": round(time.perf_counter() - started, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=12_000_000)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--limit-gib", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=Path("/tmp/ddptrain-out-of-core"))
    parser.add_argument("--repeats", type=int, default=2, help="alternating baseline / limited runs")
    parser.add_argument("--reuse", action="store_true", help="keep --out's tables and cache from an earlier run")
    args = parser.parse_args()
    big, small, cache = args.out / "big.parquet", args.out / "small.parquet", args.out / "cache"
    result: dict = {"rows": args.rows, "features": args.features, "limit_gib": args.limit_gib}
    if not (args.reuse and big.exists() and small.exists()):
        shutil.rmtree(args.out, ignore_errors=True)
        args.out.mkdir(parents=True)
        write_table(big, args.rows, args.features)
        write_table(small, 1_000_000, args.features)
        result["build"] = fit(big, args.out / "build", "block", cache, None)
        fit(small, args.out / "small-build", "exact", cache, None)
    result["table_gb"] = round(big.stat().st_size / 1e9, 2)
    baseline, limited, peaks, kills = [], [], [], []
    for i in range(args.repeats):
        baseline.append(fit(small, args.out / f"small-{i}", "exact", cache, None)["samples_per_s"])
        cgroup = CGROUP / f"ddptrain-ooc-{os.getpid()}-{i}"
        cgroup.mkdir()
        try:
            (cgroup / "memory.limit_in_bytes").write_text(str(int(args.limit_gib * 2 ** 30)))
            subprocess.run(["sync"], check=True)
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            limited.append(fit(big, args.out / f"limited-{i}", "block", cache, cgroup)["samples_per_s"])
            peaks.append(round(int((cgroup / "memory.max_usage_in_bytes").read_text()) / 2 ** 30, 3))
            kills.append(int((cgroup / "memory.oom_control").read_text().split()[-1]))
        finally:
            cgroup.rmdir()
    result.update({"in_memory_1m_exact_samples_per_s": [round(v) for v in baseline],
                   "in_cgroup_block_samples_per_s": [round(v) for v in limited], "cgroup_peak_gib": peaks,
                   "cgroup_oom_kills": kills,
                   "ratio_cgroup_block / in_memory_exact (paired)": [round(b / a, 3) for a, b in zip(baseline, limited)]})
    print(json.dumps(result, indent=2))
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
