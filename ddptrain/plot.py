"""`ddptrain plot RUN [RUN ...]`: loss and accuracy/RMSE curves from metrics.jsonl (matplotlib, `plot` extra)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ddptrain import atomic
from ddptrain.console import console
from ddptrain.errors import DDPTrainError, Interrupted
from ddptrain.signals import sigterm_as_interrupt

SUFFIXES = (".png", ".svg", ".pdf")


def read_rows(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl" if run.is_dir() else run
    if not path.is_file():
        raise DDPTrainError(f"{run}: no metrics.jsonl there; pass a run folder written by ddptrain fit")
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DDPTrainError(f"{run}: cannot read {path} ({exc}); pass a run folder written by ddptrain fit") from None
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of a killed run
        if isinstance(row, dict) and row.get("kind") in ("step", "epoch") and isinstance(row.get("step"), int):
            rows.append(row)
    if not rows:
        raise DDPTrainError(f"{run}: {path} holds no ddptrain metric rows; pass a run folder written by ddptrain "
                            "fit (or its metrics.jsonl)")
    return rows


def plot_runs(runs: list[Path], out: Path, overwrite: bool = False) -> None:
    if out.suffix.lower() not in SUFFIXES:
        raise DDPTrainError(f"--out {out}: use a .png, .svg or .pdf file name")
    atomic.check_new_file(out, overwrite, {})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DDPTrainError("plotting needs matplotlib: pip install 'ddptrain[plot]'") from None
    data = {_name(run, runs): read_rows(run) for run in runs}
    metric = "val_accuracy" if any("val_accuracy" in r for rows in data.values() for r in rows) else "val_rmse"
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, rows) in enumerate(data.items()):
        color = f"C{i}"
        steps = [r for r in rows if r.get("kind") == "step"]
        epochs = [r for r in rows if r.get("kind") == "epoch"]
        ax_loss.plot([r["step"] for r in steps], _values(steps, "train_loss"), color=color, alpha=0.35, lw=1)
        ax_loss.plot([r["step"] for r in epochs], _values(epochs, "train_loss"), color=color, marker="o", ms=3,
                     label=f"{name} train (epoch mean)")
        val = [r for r in epochs if "val_loss" in r]
        if val:
            ax_loss.plot([r["step"] for r in val], [r["val_loss"] for r in val], color=color, ls="--", marker="s",
                         ms=3, label=f"{name} validation")
        scored = [r for r in epochs if metric in r]
        if scored:
            ax_metric.plot([r["step"] for r in scored], [r[metric] for r in scored], color=color, marker="o", ms=3,
                           label=name)
    ax_loss.set(title="Loss", xlabel="optimizer step", ylabel="loss (cross-entropy or standardized)")
    ax_loss.set_yscale("log")
    label = "validation accuracy (fraction)" if metric == "val_accuracy" else "validation RMSE (target units)"
    ax_metric.set(title=label.split(" (")[0].capitalize(), xlabel="optimizer step", ylabel=label)
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("ddptrain: " + ", ".join(data))
    fig.tight_layout()
    try:
        with sigterm_as_interrupt(), atomic.replacing(out, "wb") as handle:
            fig.savefig(handle, dpi=120, format=out.suffix.lower().lstrip("."))
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; --out {out} was not written (the partial file was removed)") from None
    console.line(f"wrote {out}", force=True)


def _name(run: Path, runs: list[Path]) -> str:
    """The run folder's name, or its path where two runs share a name."""
    names = [r.resolve().name for r in runs]
    return run.resolve().name if names.count(run.resolve().name) == 1 else str(run)


def _values(rows: list[dict[str, Any]], key: str) -> list[float]:
    """A metric per row; NaN (a gap in the line) where a row has none, e.g. an epoch whose every step was skipped."""
    return [float("nan") if row.get(key) is None else row[key] for row in rows]
