"""Choices a table without validation rows (too small to hold rows out, or bagged) cannot make on held-out rows,
made by a CV_FOLDS-fold cross-validation of the configured model on its training rows instead (a table file,
data.cross_validates):

- under BAG_BELOW_ROWS rows, numeric columns worth trying as categories (category_candidates: whole numbers that
  look like ids, a family's or a store's number; columns of few values whose target moves in steps; up to
  CV_MAX_CATEGORIES of them) are taken as categories where that lowers the held-out loss by CATEGORY_GAIN or
  more, tried alone and then, best first, beside those taken before (_forward_selection). As one number the model cannot give each family its own effect (GaltonFamilies' child
  heights: RMSE 1.72 as numbers, 1.49 as categories, where the boosters have 1.67), but a quantity written in
  whole numbers (a wage, a weight, a tax rate) loses its order as a category (benchmarks/RESULTS.md). The folds
  cost about what the bagged fit itself costs, and only where such columns are;
- under SMALL_TABLE_ROWS rows, --numeric-bins: none or AUTO_BINS pieces per number. Pieces help a table whose
  target turns on thresholds and hurt a noisy one (forced on the 1,000-5,000-row tables, forbes-profits 0.99 ->
  0.86 RMSE but schooling 0.0134 -> 0.0216; chosen by the folds, forbes gains and schooling keeps its numbers).

The folds train plain single-process copies of the model (a few seconds under 1,000 rows, 5 to 15 at 5,000) on
one thread from the seed alone, so every rank, at every world size, makes the same choice; a resume keeps the
choices its run made."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import torch

from ddptrain.config import BAG_BELOW_ROWS, CV_FOLDS, CV_MAX_CATEGORIES, FitConfig
from ddptrain.data import FitData, cross_validates, prepare_fit_data
from ddptrain.model import ModelSpec, build_fitted_model
from ddptrain.optim import build_loss, build_optimizer, build_scheduler
from ddptrain.preprocess import id_candidates

AUTO_BINS = 16
CATEGORY_GAIN = 0.02  # categories must lower the folds' loss by this share: a fold's loss moves 5-30% with the split
STEP_LEVELS, STEP_GAIN = 32, 0.01  # a column of few values whose target moves in steps (category_candidates)


@contextmanager
def _one_thread() -> Iterator[None]:
    """The same sums in the same order on every rank and at every world size."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def resolve_numbers_as_categories(cfg: FitConfig, given: FitConfig, data: FitData, saved: list[str] | None,
                                  prepare: Callable[[FitConfig], FitData],
                                  announce: Callable[[str], None]) -> tuple[FitConfig, FitData, float | None]:
    """The config with --numbers-as-categories decided, the data prepared for it (`prepare`, from `given`: the
    config the data was prepared from), and the folds' loss of the plain numbers when the data stays as it was
    (resolve_numeric_bins reuses it; else None). As given; as the resumed checkpoint's run decided (`saved`);
    cross-validated column by column (category_candidates) on a table file under BAG_BELOW_ROWS rows without
    validation rows (cross_validates), each line `announce`d; else none."""
    if cfg.numbers_as_categories is not None:
        return cfg, data, None
    chosen: tuple[str, ...] = ()
    plain = None
    if saved is not None:
        chosen = tuple(saved)
    elif cross_validates(cfg, len(data.train), data.val is not None, BAG_BELOW_ROWS) and \
            (candidates := category_candidates(data)):
        names = ", ".join(f"'{name}' ({why})" for name, why in candidates.items())
        announce(f"choosing numbers or categories for {names} by {CV_FOLDS}-fold cross-validation on the "
                 f"{len(data.train):,} training rows")
        with _one_thread():
            plain = cross_validated_loss(cfg, data, 0)
            chosen = _forward_selection(cfg, given, list(candidates), plain, announce)
    cfg = dataclasses.replace(cfg, numbers_as_categories=chosen)
    if not chosen:
        return cfg, data, plain
    return cfg, prepare(dataclasses.replace(given, numbers_as_categories=chosen)), None


def _forward_selection(cfg: FitConfig, given: FitConfig, candidates: list[str], plain: float,
                       announce: Callable[[str], None]) -> tuple[str, ...]:
    """The candidates taken as categories: each tried alone; those that lower the folds' loss by CATEGORY_GAIN,
    best first, each kept only if it lowers it that much again beside the ones kept before it (two columns that
    say the same, a family's number and the mother's height, are not both taken). A line for each column."""
    def loss_with(names: tuple[str, ...]) -> float:
        return cross_validated_loss(cfg, prepare_fit_data(dataclasses.replace(given, numbers_as_categories=names)), 0)

    alone = {name: loss_with((name,)) for name in candidates}
    passing = sorted((name for name in candidates if alone[name] < (1 - CATEGORY_GAIN) * plain), key=alone.get)
    chosen: tuple[str, ...] = tuple(passing[:1])
    best = alone[passing[0]] if passing else plain
    beside: dict[str, str] = {}  # how it did beside the columns taken before it
    for name in passing[1:]:
        loss = loss_with((*chosen, name))
        names = ", ".join(f"'{c}'" for c in chosen)
        beside[name] = f", then {loss:.4g} with {names} as categories too, against {best:.4g} without it"
        if loss < (1 - CATEGORY_GAIN) * best:
            chosen, best = (*chosen, name), loss
    for name in candidates:
        taken = name in chosen
        how = f"validation loss {plain:.4g} as numbers, {alone[name]:.4g} as categories" + beside.get(name, "")
        announce(f"column '{name}' is taken as {'categories' if taken else 'numbers'} ({CV_FOLDS}-fold "
                 f"cross-validation: {how}; " + (f"--numeric {name} keeps it a number)" if taken else
                                                 f"--categorical {name} makes it one)"))
    return chosen


def category_candidates(data: FitData) -> dict[str, str]:
    """The numeric columns worth trying as categories, each with why, at most CV_MAX_CATEGORIES: whole numbers like ids
    (preprocess.id_candidates), then columns of few values (3 to STEP_LEVELS) whose target follows its values in
    steps: the means of the target at each value explain STEP_GAIN more of it than a smooth (quadratic) curve
    through the values, both adjusted for their degrees of freedom (the largest first). A month of age where 12
    means 'not yet' or a code 99 for 'unknown' is such a column; a rating or a count whose effect rises smoothly is
    not, and stays a number without folds spent on it."""
    pre = data.spec.preprocessor
    ids = id_candidates(list(data.roles), pre.code_columns())
    inferred = {r.name for r in data.roles if r.reason.startswith("numbers")}  # not --numeric: asked to be numbers
    y = data.train.y.numpy()
    targets = np.eye(len(data.spec.classes))[y] if data.spec.task == "classification" else y[:, None].astype(float)
    gains, at = {}, 0
    for plan in pre.columns:
        if plan.role == "numeric" and not plan.codes and plan.name in inferred and plan.name not in ids:
            gain = step_gain(data.train.x[:, at].numpy().astype(np.float64), targets)
            if gain >= STEP_GAIN:
                gains[plan.name] = gain
        at += plan.width
    steps = sorted(gains, key=lambda name: -gains[name])
    found = {**{name: "whole numbers like ids" for name in ids},
             **{name: "few values, the target in steps" for name in steps}}
    return dict(list(found.items())[:CV_MAX_CATEGORIES])


def step_gain(values: np.ndarray, targets: np.ndarray) -> float:
    """How much more of `targets` (rows x outputs) the mean at each of a column's values explains than a quadratic
    curve through the values, each as R^2 adjusted for its degrees of freedom; 0 outside 3 to STEP_LEVELS values."""
    levels, group = np.unique(values, return_inverse=True)
    n = len(values)
    if not 3 <= len(levels) <= STEP_LEVELS or n <= len(levels) + 1:
        return 0.0
    centred = targets - targets.mean(axis=0)
    total = float((centred ** 2).sum())
    if total == 0:
        return 0.0
    counts = np.bincount(group)
    sums = np.stack([np.bincount(group, weights=centred[:, k]) for k in range(centred.shape[1])], axis=1)
    by_level = float((sums ** 2 / counts[:, None]).sum())
    z = (values - values.mean()) / values.std()
    basis = np.stack([np.ones(n), z, z ** 2], axis=1)
    residual = centred - basis @ np.linalg.lstsq(basis, centred, rcond=None)[0]
    by_curve = total - float((residual ** 2).sum())

    def adjusted(explained: float, terms: int) -> float:
        return 1 - (1 - explained / total) * (n - 1) / (n - terms - 1)

    return adjusted(by_level, len(levels) - 1) - adjusted(by_curve, 2)


def resolve_numeric_bins(cfg: FitConfig, data: FitData, saved: int | None = None,
                         announce: Callable[[str], None] | None = None,
                         plain: float | None = None) -> tuple[FitConfig, str | None]:
    """The config with --numeric-bins decided (as given; as the resumed checkpoint's run decided, `saved`;
    cross-validated on a small table file (cross_validates); else 0), and a line saying how when it was
    cross-validated. A resume keeps the saved choice: its folds would train with the resume's --epochs and might
    choose otherwise. `announce` is told before the folds train (seconds on a few thousand rows); `plain` is the
    folds' loss without pieces when resolve_numbers_as_categories measured it on this data."""
    if cfg.numeric_bins is not None:
        return cfg, None
    if saved is not None:
        return dataclasses.replace(cfg, numeric_bins=saved), None
    if not (cross_validates(cfg, len(data.train), data.val is not None) and data.spec.preprocessor.n_numeric):
        return dataclasses.replace(cfg, numeric_bins=0), None
    if announce is not None:
        announce(f"choosing numeric pieces (0 or {AUTO_BINS} per number) by {CV_FOLDS}-fold cross-validation on the "
                 f"{len(data.train):,} training rows")
    with _one_thread():
        losses = {0: plain if plain is not None else cross_validated_loss(cfg, data, 0),
                  AUTO_BINS: cross_validated_loss(cfg, data, AUTO_BINS)}
    bins = AUTO_BINS if losses[AUTO_BINS] < losses[0] else 0  # a tie (or a NaN) keeps the plain numbers
    return dataclasses.replace(cfg, numeric_bins=bins), (
        f"numeric pieces: {bins} per number ({CV_FOLDS}-fold cross-validation on the training rows: validation loss "
        f"{losses[0]:.4g} without pieces, {losses[AUTO_BINS]:.4g} with {AUTO_BINS}; --numeric-bins sets it)")


def cross_validated_loss(cfg: FitConfig, data: FitData, bins: int) -> float:
    """The mean held-out loss over CV_FOLDS folds of the training rows (folds drawn from the seed)."""
    x, y = data.train.x, data.train.y
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))
    folds = [order[k::CV_FOLDS] for k in range(CV_FOLDS)]
    total = 0.0
    for k, held in enumerate(folds):
        kept = torch.cat([f for j, f in enumerate(folds) if j != k])
        total += _held_out_loss(cfg, data, bins, x[kept], y[kept], x[held], y[held])
    return total / CV_FOLDS


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
