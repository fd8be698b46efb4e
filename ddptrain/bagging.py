"""k-fold bagging, the default for a small table (no validation split): k members (model.Ensemble), member m trained
on the training rows outside fold m and early-stopped on fold m. Every row trains k-1 members, predictions are the
members' average, and each row's out-of-fold prediction (by the member that never trained on it) gives the run's
honest validation figure.

The folds are a function of the seed and the row count alone, and a member's loss is divided by a constant (its
expected share of the global batch), not by its rows in this rank's share: the same gradients at every world size.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ddptrain.checkpoint import Position
from ddptrain.config import BAG_BELOW_ROWS, SMALL_TABLE_ROWS, FitConfig
from ddptrain.data import Split, eval_shard
from ddptrain.dist import all_reduce_sum
from ddptrain.metrics import EVAL_CHUNK
from ddptrain.model import Ensemble
from ddptrain.optim import per_row_loss

DEFAULT_MEMBERS = 5
# a regression table gets more members: each trains on 90% of the rows, not 80%, and the average of more members has
# a lower expected squared error (never a higher one). Measured (RESULTS.md): 10 members on the 20 regression tables
# under 5,000 rows, better on 15; on the 12 classification tables better on 3, worse on 5 (accuracy has no such
# guarantee), so they keep 5; from SMALL_TABLE_ROWS to BAG_BELOW_ROWS rows 5 (measured with 5; 10 would double a
# fit that already takes 2-4x one model's time there)
REGRESSION_MEMBERS = 10
FOLD_SEED = 0x6B666F6C64  # folds drawn apart from the split and the data order


def resolve_members(cfg: FitConfig, train_rows: int, has_validation: bool, from_file: bool, task: str) -> int:
    """--bagging as a member count (1: off). auto: DEFAULT_MEMBERS for a table file under BAG_BELOW_ROWS rows
    without validation rows (every row trains, out-of-fold validation), REGRESSION_MEMBERS for a regression table
    under SMALL_TABLE_ROWS; else off."""
    if cfg.bagging == "off":
        return 1
    if cfg.bagging != "auto":
        return int(cfg.bagging)
    small = from_file and not has_validation and train_rows < BAG_BELOW_ROWS
    if not small:
        return 1
    if task == "regression" and 2 * REGRESSION_MEMBERS <= train_rows < SMALL_TABLE_ROWS:
        return REGRESSION_MEMBERS
    return DEFAULT_MEMBERS if train_rows >= 2 * DEFAULT_MEMBERS else 1


def members_of(cfg: FitConfig) -> int:
    """The member count of a resolved config (1: one model)."""
    return int(cfg.bagging) if cfg.bagging.isdigit() else 1


def assign_folds(rows: int, members: int, seed: int) -> torch.Tensor:
    """Each training row's fold (int64): a seeded permutation dealt round-robin, so folds differ by one row at most."""
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed ^ FOLD_SEED))
    fold = torch.empty(rows, dtype=torch.int64)
    fold[order] = torch.arange(rows) % members
    return fold


def bagged_loss(loss_fn: nn.Module, out: torch.Tensor, y: torch.Tensor, fold: torch.Tensor,
                regression: bool) -> torch.Tensor:
    """The sum over members of each member's mean loss on the batch's rows outside its fold. `out`: [rows, k,
    outputs]. The mean divides by the rows a member expects, (k-1)/k of the batch, so shares of a batch add up."""
    rows, k = out.shape[0], out.shape[1]
    flat = out.flatten(0, 1)
    per_row = per_row_loss(loss_fn, flat.squeeze(1) if regression else flat, y.repeat_interleave(k),
                           training=True).view(rows, k)
    trains = fold[:, None] != torch.arange(k, device=fold.device)
    return (per_row * trains).sum() * k / (rows * (k - 1))


@torch.no_grad()
def member_losses(model: Ensemble, split: Split, loss_fn: nn.Module, regression: bool, rank: int,
                  world_size: int) -> list[float]:
    """Each member's mean loss on its own fold (the rows it never trained on), all-reduced."""
    k = len(model.members)
    device = next(model.parameters()).device
    sums = torch.zeros(2 * k, dtype=torch.float64, device=device)  # loss sums, then row counts
    rows = eval_shard(len(split), rank, world_size)
    was_training = model.training
    model.eval()
    for at in range(rows.start, rows.stop, EVAL_CHUNK):
        end = min(at + EVAL_CHUNK, rows.stop)
        x, y, fold = (t[at:end].to(device) for t in (split.x, split.y, split.fold))
        out = model.member_outputs(x)[torch.arange(end - at, device=device), fold].float()
        per_row = per_row_loss(loss_fn, out.squeeze(1) if regression else out, y, weighted=False)
        sums[:k] += torch.bincount(fold, weights=per_row.double(), minlength=k)
        sums[k:] += torch.bincount(fold, minlength=k).double()
    model.train(was_training)
    if world_size > 1:
        all_reduce_sum(sums)
    values = sums.tolist()
    return [values[i] / values[k + i] if values[k + i] else math.nan for i in range(k)]


def track_members(model: Ensemble, losses: list[float], position: Position) -> list[bool]:
    """Which members' held-out losses improved this epoch; their weights become their best (model.keep_best) and
    the position's per-member records move on. Decided from all-reduced losses: alike on every rank."""
    k = len(losses)
    if not position.member_best:
        position.member_best, position.member_best_epoch, position.member_bad_epochs = [math.nan] * k, [-1] * k, [0] * k
    improved = [math.isfinite(loss) and (math.isnan(best) or loss < best)
                for loss, best in zip(losses, position.member_best)]
    for i, better in enumerate(improved):
        if better:
            position.member_best[i], position.member_best_epoch[i], position.member_bad_epochs[i] = \
                losses[i], position.epoch, 0
        else:
            position.member_bad_epochs[i] += 1
    model.keep_best(improved)
    return improved
