"""The default --numeric-bins of a table without a validation split under SMALL_TABLE_ROWS rows (too small to hold
rows out, or bagged): none or AUTO_BINS pieces per number, whichever a FOLDS-fold cross-validation of the
configured model on the training rows prefers.

Numeric pieces help a table whose target turns on thresholds and hurt a noisy one (benchmarks/RESULTS.md: forced
on the 1,000-5,000-row tables, forbes-profits 0.99 -> 0.86 RMSE but schooling 0.0134 -> 0.0216; chosen by the
folds, forbes gains and schooling keeps its numbers), and such a table has no validation split to tell which it
is. The folds train plain single-process copies of the model (a few seconds under 1,000 rows, 5 to 15 at 5,000;
a bagged table up to BAG_BELOW_ROWS would take minutes, so it keeps the numbers alone) on one thread from the seed
alone, so every rank, at every world size and on every resume, makes the same choice.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ddptrain.config import SMALL_TABLE_ROWS, FitConfig
from ddptrain.data import FitData
from ddptrain.model import ModelSpec, build_fitted_model
from ddptrain.optim import build_loss, build_optimizer, build_scheduler
from ddptrain.tables import looks_like_path

FOLDS = 4
AUTO_BINS = 16


def resolve_numeric_bins(cfg: FitConfig, data: FitData, saved: int | None = None,
                         announce: Callable[[str], None] | None = None) -> tuple[FitConfig, str | None]:
    """The config with --numeric-bins decided (as given; as the resumed checkpoint's run decided, `saved`;
    cross-validated on a table read from a file with no validation split, under SMALL_TABLE_ROWS rows; else 0), and
    a line saying how when it was cross-validated. A resume keeps the saved choice: its folds would train with the
    resume's --epochs and might choose otherwise.
    `announce` is told before the folds train (seconds on a few thousand rows)."""
    if cfg.numeric_bins is not None:
        return cfg, None
    if saved is not None:
        return dataclasses.replace(cfg, numeric_bins=saved), None
    small = data.val is None and 2 * FOLDS <= len(data.train) < SMALL_TABLE_ROWS
    if not (small and looks_like_path(cfg.data) and data.spec.preprocessor.n_numeric):
        return dataclasses.replace(cfg, numeric_bins=0), None
    if announce is not None:
        announce(f"choosing numeric pieces (0 or {AUTO_BINS} per number) by {FOLDS}-fold cross-validation on the "
                 f"{len(data.train):,} training rows")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same sums in the same order on every rank and at every world size
    try:
        losses = {bins: cross_validated_loss(cfg, data, bins) for bins in (0, AUTO_BINS)}
    finally:
        torch.set_num_threads(threads)
    bins = AUTO_BINS if losses[AUTO_BINS] < losses[0] else 0  # a tie (or a NaN) keeps the plain numbers
    return dataclasses.replace(cfg, numeric_bins=bins), (
        f"numeric pieces: {bins} per number ({FOLDS}-fold cross-validation on the training rows: validation loss "
        f"{losses[0]:.4g} without pieces, {losses[AUTO_BINS]:.4g} with {AUTO_BINS}; --numeric-bins sets it)")


def cross_validated_loss(cfg: FitConfig, data: FitData, bins: int) -> float:
    """The mean held-out loss over FOLDS folds of the training rows (folds drawn from the seed)."""
    x, y = data.train.x, data.train.y
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))
    folds = [order[k::FOLDS] for k in range(FOLDS)]
    total = 0.0
    for k, held in enumerate(folds):
        kept = torch.cat([f for j, f in enumerate(folds) if j != k])
        total += _held_out_loss(cfg, data, bins, x[kept], y[kept], x[held], y[held])
    return total / FOLDS


def _held_out_loss(cfg: FitConfig, data: FitData, bins: int, x: torch.Tensor, y: torch.Tensor,
                   x_held: torch.Tensor, y_held: torch.Tensor) -> float:
    """Train the configured model (its optimizer, schedule, batch and epochs) on (x, y); its loss on the held rows."""
    task = data.spec.task
    torch.manual_seed(cfg.seed)
    model = build_fitted_model(ModelSpec.of(cfg, data.spec, bins), x)
    batch = min(cfg.batch_size, len(x))
    steps = len(x) // batch
    optimizer = build_optimizer(model.parameters(), cfg)
    scheduler = build_scheduler(optimizer, cfg, steps * cfg.epochs)
    loss_fn = build_loss(cfg, task, y, data.spec.n_outputs)
    squeeze = task == "regression"
    draw = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x), generator=draw)
        for step in range(steps):
            rows = order[step * batch:(step + 1) * batch]
            out = model(x[rows])
            loss = loss_fn(out.squeeze(1) if squeeze else out, y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    with torch.no_grad():
        out = model(x_held)
        return float(loss_fn(out.squeeze(1) if squeeze else out, y_held))
