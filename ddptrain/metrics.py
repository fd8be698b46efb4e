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
from ddptrain.optim import per_row_loss

EVAL_CHUNK = 65536
# ROC AUC from histograms of each class's log-odds (sums again, so shards and pieces add up): AUC_BINS bins over
# [-AUC_LOGIT, AUC_LOGIT]; two scores in one bin count as a tie. Bins 1/32 wide in log-odds put the AUC within
# ~1e-4 of the exact rank statistic on the tests' tables. One histogram for two classes (the second class's
# score), one per class (one-vs-rest, macro-averaged) up to AUC_MAX_CLASSES classes, none above.
AUC_BINS, AUC_LOGIT, AUC_MAX_CLASSES = 1024, 16.0, 64


def auc_classes(spec: DataSpec) -> list[int]:
    """The classes whose one-vs-rest AUC the sums carry."""
    k = spec.n_outputs
    return [1] if k == 2 else (list(range(k)) if k <= AUC_MAX_CLASSES else [])


@torch.no_grad()
def evaluation_sums(model: nn.Module, split: Split, spec: DataSpec, loss_fn: nn.Module,
                    rank: int = 0, world_size: int = 1, reduce: bool = True, out_of_fold: bool = False) -> torch.Tensor:
    """float64 sums over this rank's shard, all-reduced across ranks (unless `reduce` is off: the caller adds up
    several pieces first). `out_of_fold`: an Ensemble's out-of-fold predictions of its training rows.

    classification: [n, loss_sum, confusion (C*C, true-major), per AUC class: its negatives' then its positives'
    log-odds histogram (2 * AUC_BINS)]; regression: [n, loss_sum, sse, sae, sy, syy] (errors and targets in the
    original units).
    """
    device = next(model.parameters()).device
    classes = spec.n_outputs
    scored = auc_classes(spec) if spec.task == "classification" else []
    size = 2 + (classes * classes + 2 * AUC_BINS * len(scored) if spec.task == "classification" else 4)
    sums = torch.zeros(size, dtype=torch.float64, device=device)
    rows = eval_shard(len(split), rank, world_size)
    was_training = model.training
    model.eval()
    for start in range(rows.start, rows.stop, EVAL_CHUNK):
        stop = min(start + EVAL_CHUNK, rows.stop)
        x, y = split.x[start:stop].to(device), split.y[start:stop].to(device)
        if out_of_fold:  # each row scored by the one member that never trained on it (bagging.py)
            out = model.member_outputs(x)[torch.arange(stop - start, device=device),
                                          split.fold[start:stop].to(device)].float()
        else:
            out = model(x).float()
        sums[0] += stop - start
        if spec.task == "classification":
            sums[1] += F.cross_entropy(out, y, reduction="sum").double()
            pairs = y * classes + out.argmax(dim=1)
            sums[2:2 + classes * classes] += torch.bincount(pairs, minlength=classes * classes).double()
            if scored:
                sums[2 + classes * classes:] += _logit_histograms(out, y, scored)
        else:
            pred = out.squeeze(1)
            sums[1] += per_row_loss(loss_fn, pred, y).sum().double()
            pred_u, y_u = spec.in_target_units(pred), spec.in_target_units(y)
            err = pred_u - y_u
            sums[2:] += torch.stack([(err * err).sum(), err.abs().sum(), y_u.sum(), (y_u * y_u).sum()])
    model.train(was_training)
    if world_size > 1 and reduce:
        all_reduce_sum(sums)
    return sums


def _logit_histograms(out: torch.Tensor, y: torch.Tensor, scored: list[int]) -> torch.Tensor:
    """Per scored class: counts of its log-odds among the rows of other classes, then among its own rows."""
    log_p = torch.log_softmax(out.double(), dim=1)[:, scored]
    log_rest = torch.log(-torch.expm1(log_p.clamp(max=-1e-300)))  # log(1 - p), finite where p rounds to 1
    odds = (log_p - log_rest).clamp(-AUC_LOGIT, AUC_LOGIT)
    bins = ((odds + AUC_LOGIT) * (AUC_BINS / (2 * AUC_LOGIT))).long().clamp(max=AUC_BINS - 1)
    positive = (y[:, None] == torch.tensor(scored, device=y.device)).long()
    column = torch.arange(len(scored), device=y.device)[None, :]
    flat = (column * 2 + positive) * AUC_BINS + bins
    return torch.bincount(flat.flatten(), minlength=2 * AUC_BINS * len(scored)).double()


def auc_from_histograms(negatives: list[float], positives: list[float]) -> float | None:
    """The probability that a positive row scores above a negative one (ties count half); None without both."""
    n_neg, n_pos = sum(negatives), sum(positives)
    if not n_neg or not n_pos:
        return None
    below, wins = 0.0, 0.0
    for neg, pos in zip(negatives, positives):
        wins += pos * (below + 0.5 * neg)
        below += neg
    return wins / (n_neg * n_pos)


def metrics_from_sums(sums: torch.Tensor, spec: DataSpec) -> dict[str, Any]:
    values = sums.cpu().tolist()
    n = values[0]
    out: dict[str, Any] = {"rows": int(n), "loss": values[1] / n}
    if spec.task == "classification":
        k = spec.n_outputs
        confusion = [[int(values[2 + i * k + j]) for j in range(k)] for i in range(k)]
        out["accuracy"] = sum(confusion[i][i] for i in range(k)) / n
        out["log_loss"] = out["loss"]  # the unweighted cross-entropy, whatever loss trained
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
        present = [row for row in per_class.values() if row["support"]]
        out["balanced_accuracy"] = sum(row["recall"] for row in present) / len(present)
        # binary: the second class's F1 (scikit-learn's pos_label=1 for 0/1 and false/true); else the macro mean
        out["f1"] = per_class[spec.classes[1]]["f1"] if k == 2 else sum(r["f1"] for r in per_class.values()) / k
        histograms = values[2 + k * k:]
        aucs = [auc_from_histograms(histograms[2 * i * AUC_BINS:(2 * i + 1) * AUC_BINS],
                                    histograms[(2 * i + 1) * AUC_BINS:(2 * i + 2) * AUC_BINS])
                for i in range(len(auc_classes(spec)))]
        aucs = [a for a in aucs if a is not None]
        out["roc_auc"] = sum(aucs) / len(aucs) if aucs else None
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
        row["val_log_loss"] = metrics["log_loss"]
        row["val_balanced_accuracy"] = metrics["balanced_accuracy"]
        row["val_f1"] = metrics["f1"]
        if metrics["roc_auc"] is not None:
            row["val_auc"] = metrics["roc_auc"]
    else:
        row["val_rmse"] = metrics["rmse"]
        row["val_mae"] = metrics["mae"]
        row["val_r2"] = metrics["r2"]
    return row
