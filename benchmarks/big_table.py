"""Issue 13's targets on a 1,000,000-row x 28-float CSV that this script writes (one sitting, same machine).

    python benchmarks/big_table.py [--rows 1000000] [--text-columns 0] [--compression gzip] [--out /tmp/ddptrain-big-table]

`--compression gzip` (or zstd, bz2) writes `big.csv.gz` instead and measures everything on it; pandas' read of
the file is reported beside pyarrow's where pandas is installed.

Measures, each in a fresh process: pyarrow.csv.read_csv on the file (time, peak RSS); `ddptrain fit` the first
time (the cache is built: time to first step from metrics.jsonl, peak PSS); the second time (a cache hit); and
`--nproc-per-node 2` on a cache hit (summed PSS of all the job's processes: torch's agent and both workers), with
`torchrun --nproc-per-node=2` beside it for comparison (its agent included too). Prints JSON with each target and
whether it holds: first fit's time to first step <= 1.5 x pyarrow's read + 4 s, its peak <= pyarrow's; second
fit's first step within 6 s of the command's start; 2 processes' summed PSS <= 1.4 x 1 process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from peak_memory import measure

ROOT = Path(__file__).resolve().parents[1]
READ = """
import resource, sys, time
if sys.argv[2] == "pandas":
    import pandas
    t = time.perf_counter(); pandas.read_csv(sys.argv[1]); t = time.perf_counter() - t
else:
    import pyarrow.csv
    t = time.perf_counter(); pyarrow.csv.read_csv(sys.argv[1]); t = time.perf_counter() - t
print(t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""
ENDINGS = {"none": "", "gzip": ".gz", "zstd": ".zst", "bz2": ".bz2"}


def write_csv(path: Path, rows: int, text_columns: int = 0, compression: str = "none") -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv

    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 28))
    score = x[:, :3].sum(axis=1)
    text = {}
    for k in range(text_columns):  # categories as a database export has them: 50, 1000, 20000, ... levels
        levels = 50 * 20 ** k
        codes = rng.integers(0, levels, rows)
        text[f"t{k}"] = pa.array(np.char.add(f"level-{k}-", codes.astype(str)))
        score += (codes % 3 - 1) * 0.5
    y = (score > 0).astype(np.int64)
    with pa.output_stream(str(path), compression=None if compression == "none" else compression) as out:
        pa.csv.write_csv(pa.table({**{f"f{j}": x[:, j] for j in range(28)}, **text, "label": y}), out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=Path("/tmp/ddptrain-big-table"))
    parser.add_argument("--text-columns", type=int, default=0, help="add text category columns (50, 1000, ... levels)")
    parser.add_argument("--compression", choices=tuple(ENDINGS), default="none", help="write big.csv.gz (gzip)...")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    data = args.out / f"big.csv{ENDINGS[args.compression]}"
    write_csv(data, args.rows, args.text_columns, args.compression)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(args.out / "cache")}
    read = subprocess.run([sys.executable, "-c", READ, str(data), "pyarrow"], capture_output=True, text=True,
                          check=True, env=env)
    read_s, read_rss = (float(v) for v in read.stdout.split())
    pandas = subprocess.run([sys.executable, "-c", READ, str(data), "pandas"], capture_output=True, text=True, env=env)
    pandas_read = ({"seconds": round(float(pandas.stdout.split()[0]), 2),
                    "peak_rss_gb": round(float(pandas.stdout.split()[1]) / 1e9, 3)} if pandas.returncode == 0 else None)
    fit = ["-m", "ddptrain", "fit", "--data", str(data), "--target", "label", "--epochs", "1", "--batch-size", "4096",
           "--hidden", "32", "--quiet"]

    def run(name: str, launcher: list[str], extra: tuple[str, ...] = ()) -> dict:
        code, seconds, pss, err = measure([sys.executable, *launcher, *fit, *extra, "--out", str(args.out / name)], env)
        if code:
            raise RuntimeError(f"{name} failed: {err[-1000:]}")
        row = next(json.loads(line) for line in (args.out / name / "metrics.jsonl").read_text().splitlines()
                   if "time_to_first_step_s" in line)
        return {"wall_s": round(seconds, 2), "time_to_first_step_s": round(row["time_to_first_step_s"], 2),
                "data_s": round(row["data_s"], 2), "peak_pss_gb": round(pss / 1e9, 3)}

    first = run("first", [])
    second = run("second", [])
    two = run("two", [], ("--nproc-per-node", "2"))
    torchrun = run("torchrun", ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"])
    result = {
        "rows": args.rows, "text_columns": args.text_columns, "compression": args.compression,
        "file_mb": round(data.stat().st_size / 1e6),
        "pyarrow_read": {"seconds": round(read_s, 2), "peak_rss_gb": round(read_rss / 1e9, 3)},
        "pandas_read": pandas_read,
        "first_fit": first, "second_fit": second, "two_processes_cache_hit": two,
        "torchrun_two_processes_cache_hit": torchrun,
        "targets": {
            "first fit: first step <= 1.5 x read + 4 s": [first["time_to_first_step_s"], round(1.5 * read_s + 4, 2),
                                                          first["time_to_first_step_s"] <= 1.5 * read_s + 4],
            "first fit: peak <= pyarrow's peak (GB)": [first["peak_pss_gb"], round(read_rss / 1e9, 3),
                                                      first["peak_pss_gb"] <= read_rss / 1e9],
            "second fit: first step within 6 s": [second["time_to_first_step_s"], 6,
                                                  second["time_to_first_step_s"] <= 6],
            "2 processes: summed PSS <= 1.4 x 1 process (GB)": [two["peak_pss_gb"], round(1.4 * second["peak_pss_gb"], 3),
                                                               two["peak_pss_gb"] <= 1.4 * second["peak_pss_gb"]],
        },
    }
    print(json.dumps(result, indent=2))
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
