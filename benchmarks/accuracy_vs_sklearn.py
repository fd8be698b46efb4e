"""Accuracy check on real tables, as a new user would run it: ddptrain under torchrun vs scikit-learn.

    pip install scikit-learn && python benchmarks/accuracy_vs_sklearn.py --out benchmarks/out/accuracy

Writes CSVs of scikit-learn's bundled real datasets (digits: 1,797 rows, integer labels; breast cancer: 569 rows,
string labels benign/malignant; diabetes: 442 rows, regression), splits each 80/20 with a fixed seed into
train.csv/test.csv, trains ddptrain with 2 processes under torchrun, scores best.pt on test.csv with `ddptrain eval`
(one process and torchrun with 2 ranks), and compares with MLPClassifier (classification) or Ridge (regression)
fitted on the same train split.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

console = Console(width=150)

# name -> (loader, fit flags). Flags are what a user would pick after reading --help, nothing tuned per seed.
DATASETS = {
    "digits": ("load_digits", ["--hidden", "128,128", "--epochs", "40", "--batch-size", "64", "--lr", "0.001"]),
    "breast_cancer": ("load_breast_cancer", ["--hidden", "64,64", "--epochs", "60", "--batch-size", "32",
                                             "--lr", "0.001", "--dropout", "0.1"]),
    "diabetes": ("load_diabetes", ["--hidden", "64,64", "--epochs", "200", "--batch-size", "32", "--lr", "0.001",
                                   "--weight-decay", "0.01", "--monitor-metric", "val_rmse"]),
}


def write_csvs(name: str, folder: Path, seed: int) -> tuple[np.ndarray, ...]:
    import sklearn.datasets as skd
    from sklearn.model_selection import train_test_split

    bunch = getattr(skd, DATASETS[name][0])()
    x, y = bunch.data, bunch.target
    features = [str(f).replace(" ", "_") for f in getattr(bunch, "feature_names", [])] or \
        [f"pixel{j}" for j in range(x.shape[1])]
    if name == "digits":
        features = [f"pixel{j}" for j in range(x.shape[1])]
    if name == "breast_cancer":
        y = np.array(bunch.target_names)[y]  # 'malignant' / 'benign' strings
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=seed,
                                              stratify=None if name == "diabetes" else y)
    target = "progression" if name == "diabetes" else ("diagnosis" if name == "breast_cancer" else "digit")
    for split, xs, ys in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        with open(folder / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(features + [target])
            writer.writerows([*map(float, row), label] for row, label in zip(xs, ys))
    return x_tr, x_te, y_tr, y_te


def sklearn_score(name: str, x_tr, x_te, y_tr, y_te, seed: int) -> float:
    from sklearn.linear_model import Ridge
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if name == "diabetes":
        model = make_pipeline(StandardScaler(), Ridge(alpha=1.0)).fit(x_tr, y_tr)
        return float(np.sqrt(np.mean((model.predict(x_te) - y_te) ** 2)))
    model = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(128, 128), max_iter=500,
                                                          random_state=seed)).fit(x_tr, y_tr)
    return float(model.score(x_te, y_te))


def ddptrain_scores(name: str, folder: Path) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    fit = torchrun + ["-m", "ddptrain", "fit", "--data", "train.csv", "--out", "run", "--quiet", *DATASETS[name][1]]
    subprocess.run(fit, cwd=folder, env=env, check=True, capture_output=True, text=True)
    key = "rmse" if name == "diabetes" else "accuracy"
    scores = {}
    for label, prefix in (("eval 1 process", [sys.executable, "-m", "ddptrain"]), ("eval torchrun 2", torchrun + ["-m", "ddptrain"])):
        result = subprocess.run(prefix + ["eval", "run/checkpoints/best.pt", "--data", "test.csv", "--json"],
                                cwd=folder, env=env, check=True, capture_output=True, text=True)
        line = next(l for l in result.stdout.splitlines() if l.startswith("{"))
        scores[label] = json.loads(line)[key]
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/out/accuracy")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    table = Table(title="ddptrain (2 processes, torchrun) vs scikit-learn on held-out test.csv")
    for column in ("dataset", "rows", "metric", "ddptrain eval (1 proc)", "ddptrain eval (torchrun 2)", "scikit-learn"):
        table.add_column(column)
    results = {}
    for name in DATASETS:
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        x_tr, x_te, y_tr, y_te = write_csvs(name, folder, args.seed)
        reference = sklearn_score(name, x_tr, x_te, y_tr, y_te, args.seed)
        mine = ddptrain_scores(name, folder)
        metric = "RMSE (target units)" if name == "diabetes" else "accuracy"
        baseline = "Ridge" if name == "diabetes" else "MLPClassifier(128,128)"
        results[name] = {"metric": metric, "ddptrain": mine, baseline: reference, "rows": len(x_tr) + len(x_te)}
        table.add_row(name, str(len(x_tr) + len(x_te)), metric, f"{mine['eval 1 process']:.4f}",
                      f"{mine['eval torchrun 2']:.4f}", f"{reference:.4f} ({baseline})")
    console.print(table)
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
