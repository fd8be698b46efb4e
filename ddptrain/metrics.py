"""Evaluation: per-rank sums over a contiguous shard, all-reduced, then turned into metrics.

Sums (not means) are reduced, so N ranks give the single-process numbers and no row is counted twice.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ddptrain.data import DataSpec, Split, eval_shard
from ddptrain.dist import all_reduce_sum

EVAL_CHUNK = 65536


@torch.no_grad()
def evaluation_sums(model: nn.Module, split: Split, spec: DataSpec, loss_fn: nn.Module,
                    rank: int = 0, world_size: int = 1, reduce: bool = True) -> torch.Tensor:
    """float64 sums over this rank's shard, all-reduced across ranks (unless `reduce` is off: the caller adds up
    several pieces first).

    classification: [n, loss_sum, confusion (C*C, true-major)]; regression: [n, loss_sum, sse, sae, sy, syy]
    (errors and targets in the original units).
    """
    device = next(model.parameters()).device
    classes = spec.n_outputs
    size = 2 + (classes * classes if spec.task == "classification" else 4)
    sums = torch.zeros(size, dtype=torch.float64, device=device)
    rows = eval_shard(len(split), rank, world_size)
    was_training = model.training
    model.eval()
    for start in range(rows.start, rows.stop, EVAL_CHUNK):
        stop = min(start + EVAL_CHUNK, rows.stop)
        x, y = split.x[start:stop].to(device), split.y[start:stop].to(device)
        out = model(x).float()
        sums[0] += stop - start
        if spec.task == "classification":
            sums[1] += F.cross_entropy(out, y, reduction="sum").double()
            pairs = y * classes + out.argmax(dim=1)
            sums[2:] += torch.bincount(pairs, minlength=classes * classes).double()
        else:
            pred = out.squeeze(1)
            sums[1] += _loss_sum(loss_fn, pred, y)
            pred_u, y_u = spec.in_target_units(pred), spec.in_target_units(y)
            err = pred_u - y_u
            sums[2:] += torch.stack([(err * err).sum(), err.abs().sum(), y_u.sum(), (y_u * y_u).sum()])
    model.train(was_training)
    if world_size > 1 and reduce:
        all_reduce_sum(sums)
    return sums


def _loss_sum(loss_fn: nn.Module, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    per_row = {nn.MSELoss: F.mse_loss, nn.L1Loss: F.l1_loss}.get(type(loss_fn))
    if per_row is not None:
        return per_row(pred, y, reduction="sum").double()
    return F.huber_loss(pred, y, reduction="sum", delta=getattr(loss_fn, "delta", 1.0)).double()


def metrics_from_sums(sums: torch.Tensor, spec: DataSpec) -> dict[str, Any]:
    values = sums.cpu().tolist()
    n = values[0]
    out: dict[str, Any] = {"rows": int(n), "loss": values[1] / n}
    if spec.task == "classification":
        k = spec.n_outputs
        confusion = [[int(values[2 + i * k + j]) for j in range(k)] for i in range(k)]
        out["accuracy"] = sum(confusion[i][i] for i in range(k)) / n
        per_class = {}
        for i, label in enumerate(spec.classes):
            tp = confusion[i][i]
            predicted = sum(confusion[r][i] for r in range(k))
            actual = sum(confusion[i])
            precision = tp / predicted if predicted else 0.0
            recall = tp / actual if actual else 0.0
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
        out["per_class"] = per_class
        out["confusion"] = confusion
    else:
        sse, sae, sy, syy = values[2:]
        total = syy - sy * sy / n
        out.update(mse=sse / n, rmse=math.sqrt(sse / n), mae=sae / n, r2=1.0 - sse / total if total > 0 else 0.0)
    return out


def validation_row(metrics: dict[str, Any], spec: DataSpec) -> dict[str, float]:
    """The `val_*` fields of a metrics.jsonl epoch row."""
    row = {"val_loss": metrics["loss"]}
    if spec.task == "classification":
        row["val_accuracy"] = metrics["accuracy"]
    else:
        row["val_rmse"] = metrics["rmse"]
        row["val_mae"] = metrics["mae"]
        row["val_r2"] = metrics["r2"]
    return row
