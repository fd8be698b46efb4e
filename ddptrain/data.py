"""Data: a table (file or built-in) -> column roles, target and task, the fitted preprocessor, tensors, and each
rank's batches.

The `DataSpec` (target, task, classes, target statistics and the fitted `Preprocessor`) travels inside every
checkpoint so that eval and predict apply exactly what training applied, to the raw file.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddptrain import datasets
from ddptrain.config import (
    BAG_BELOW_ROWS,
    CV_FOLDS,
    SMALL_TABLE_ROWS,
    VALIDATE_FROM_ROWS,
    FitConfig,
    resolve_val_fraction,
)
from ddptrain.errors import DDPTrainError, UsageError
from ddptrain.ondisk import allocate_in, stage_table
from ddptrain.preprocess import (
    ColumnPlan,
    ColumnRole,
    Preprocessor,
    code_notes,
    fit_preprocessor,
    id_candidates,
    id_notes,
    infer_roles,
    level_notes,
)
from ddptrain.tables import Table, looks_like_path, numeric_table, read_table

MAX_INTEGER_CLASSES = 20  # an integer target with at most this many distinct values is a class label
MAX_FLOAT_CLASSES = 100  # --task classification on a float target with more classes than this is a mistake


@dataclass(frozen=True)
class DataSpec:
    target_name: str
    task: str
    classes: tuple[str, ...]
    preprocessor: Preprocessor
    y_mean: float = 0.0
    y_std: float = 1.0
    notes: tuple[str, ...] = field(default=(), compare=False)  # what fit says once: drops, missing targets

    @property
    def n_outputs(self) -> int:
        return len(self.classes) if self.task == "classification" else 1

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.preprocessor.feature_columns

    def in_target_units(self, standardized: torch.Tensor) -> torch.Tensor:
        """The inverse of the target's standardization (regression): model outputs back in the target's units."""
        return standardized.double() * self.y_std + self.y_mean

    def to_dict(self) -> dict[str, Any]:
        return {"target_name": self.target_name, "task": self.task, "classes": list(self.classes),
                "preprocessor": self.preprocessor.to_dict(), "y_mean": self.y_mean, "y_std": self.y_std}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataSpec:
        if "preprocessor" in d:
            pre = Preprocessor.from_dict(d["preprocessor"])
        else:  # format 1: numeric features only, standardized
            pre = Preprocessor(tuple(ColumnPlan(name, "numeric", "number", (0.0,), (float(m),), (float(s),))
                                     for name, m, s in zip(d["feature_names"], d["x_mean"], d["x_std"])))
        return cls(d["target_name"], d["task"], tuple(d["classes"]), pre, d.get("y_mean", 0.0), d.get("y_std", 1.0))

    def check(self) -> None:
        """Raise ValueError if this spec (e.g. read from an edited checkpoint) is not self-consistent."""
        if self.task not in ("classification", "regression"):
            raise ValueError(f"task {self.task!r} is not classification or regression")
        if not all(isinstance(v, str) for v in (self.target_name, *self.classes)):
            raise ValueError("the target and classes must be strings")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("class labels repeat")
        if self.task == "classification" and len(self.classes) < 2:
            raise ValueError(f"a classification spec needs two or more classes, not {len(self.classes)}")
        numbers = (self.y_mean, self.y_std)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers):
            raise ValueError("the target statistics must be finite numbers")
        if self.y_std <= 0:
            raise ValueError("the target's standard deviation must be > 0")
        self.preprocessor.check()


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # [rows, inputs] float32: standardized numbers, then category codes
    y: torch.Tensor | None  # class ids (int64) or standardized targets (float32); None when unlabelled
    fold: torch.Tensor | None = None  # bagging: each training row's fold (int64; bagging.py)

    def __len__(self) -> int:
        return len(self.x)

    def to(self, device: torch.device) -> Split:
        return Split(*(None if t is None else t.to(device) for t in (self.x, self.y, self.fold)))


@dataclass(frozen=True)
class FitData:
    spec: DataSpec
    train: Split
    val: Split | None
    roles: tuple[ColumnRole, ...] = ()

    def to_device(self, device: torch.device) -> FitData:
        """The training rows move to the device once (the GPU holds a table this size easily)."""
        return FitData(self.spec, self.train.to(device), self.val, self.roles)


def load_table(source: str, seed: int, n_samples: int, n_features: int | None = None,
               n_classes: int | None = None, noise: float | None = None, problem_seed: int | None = None) -> Table:
    """A file path, or the name of a built-in dataset: rows drawn with `seed` from the problem that
    `problem_seed` (the training seed) poses."""
    if looks_like_path(source):
        return read_table(source)
    x, y = datasets.generate(source, n_samples, seed, n_features, n_classes, noise, problem_seed)
    names = [f"x{j}" for j in range(x.shape[1])] + ["y"]
    return numeric_table(source, names, [x[:, j] for j in range(x.shape[1])] + [y])


# -- the target ---------------------------------------------------------------------------------------------------
def infer_task(table: Table, target: str, present: np.ndarray) -> str:
    """From the present values: text and booleans are classes; whole numbers with few distinct values are classes;
    other numbers are a regression target."""
    kind = table.kind(target)
    if kind in ("text", "bool"):
        return "classification"
    if kind == "datetime":
        raise DDPTrainError(f"{table.path}: the target '{target}' holds dates; pick another --target")
    values = table.column(target)[present]
    integral = bool(np.all(values == np.round(values)))
    return "classification" if integral and len(np.unique(values)) <= MAX_INTEGER_CLASSES else "regression"


def class_labels(table: Table, target: str, rows: np.ndarray) -> tuple[list[str], np.ndarray]:
    """The distinct labels (as text) among the rows' target cells, and each row's index into them. Labels are
    made once per distinct value, not per row (a million rows hold a handful of classes)."""
    codes, texts = table.levels(target)  # 1 and 1.0 are one label
    used, inverse = np.unique(codes[rows], return_inverse=True)
    return [texts[c] for c in used], inverse.reshape(-1).astype(np.int64)  # texts are sorted, so these are too


def _sort_classes(labels: set[str]) -> tuple[str, ...]:
    try:
        return tuple(sorted(labels, key=float))
    except ValueError:
        return tuple(sorted(labels))


def encode_classes(table: Table, target: str, classes: tuple[str, ...], rows: np.ndarray) -> np.ndarray:
    distinct, inverse = class_labels(table, target, rows)
    index = {label: i for i, label in enumerate(classes)}
    unknown = [label for label in distinct if label not in index]
    if unknown:
        rows_unknown = int(np.isin(inverse, [i for i, label in enumerate(distinct) if label not in index]).sum())
        raise DDPTrainError(f"{table.path}: column '{target}' has labels the model never saw in {rows_unknown:,} "
                            f"rows: {', '.join(unknown[:5])}; it knows {', '.join(classes)}; score the rows whose "
                            "label it knows (remove the others) or train on data that has them")
    return np.array([index[label] for label in distinct], dtype=np.int64)[inverse]


def regression_target(table: Table, target: str, rows: np.ndarray) -> np.ndarray:
    if table.kind(target) not in ("number", "bool"):
        col = table.column(target)
        row = next((int(r) for r in rows if col[r] is not None and not _is_number(col[r])), int(rows[0]))
        raise DDPTrainError(f"{table.path}: the regression target '{target}' {table.where(row)} holds "
                            f"'{col[row]}', not a number; pick another --target or --task classification")
    col = table.column(target)[rows]
    values = col.astype(np.float64) if table.kind(target) == "number" else \
        np.array([np.nan if v is None else float(v) for v in col], dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise DDPTrainError(f"{table.path}: column '{target}' {table.where(int(rows[bad[0]]))} is "
                            f"{values[bad[0]]}; regression targets must be finite")
    return values


def _is_number(text: Any) -> bool:
    try:
        float(text)
        return True
    except (TypeError, ValueError):
        return False


def _split_rows(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * fraction))
    if fraction > 0 and (n_val == 0 or n_val == n):
        raise UsageError(f"--val-fraction {fraction} leaves an empty split of {n:,} rows; "
                         "use a fraction between 1/rows and 1 - 1/rows, or 0 for no validation")
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def pick_target(table: Table, target: str | None) -> str:
    name = target or table.names[-1]
    if name not in table.names:
        raise table.unknown_columns("--target", [name])
    return name


def plan_target(table: Table, target: str, task: str) -> tuple[str, tuple[str, ...], np.ndarray, list[str]]:
    """The task, the classes, the rows with a target, and notes; every trap of a target is an error here."""
    present = ~table.missing(target)
    notes = []
    if not present.any():
        raise DDPTrainError(f"{table.path}: the target '{target}' is empty in every row; pick another --target")
    if not present.all():
        notes.append(f"{int((~present).sum()):,} of {len(table):,} rows have no '{target}' value and are left out")
    rows = np.flatnonzero(present)
    task = task if task != "auto" else infer_task(table, target, present)
    if task == "regression":
        return task, (), rows, notes
    distinct, _ = class_labels(table, target, rows)
    classes = _sort_classes(set(distinct))
    if len(classes) < 2:
        raise DDPTrainError(f"{table.path}: target '{target}' has one class ({classes[0]}); "
                            "classification needs at least two (or pass --task regression)")
    if table.kind(target) == "text" and len(classes) == len(rows) and len(rows) >= 20:
        raise DDPTrainError(f"{table.path}: the target '{target}' is different in every row, like a name or an ID; "
                            "pick the column to predict with --target")
    if table.kind(target) == "number" and target not in table.integer and len(classes) > MAX_FLOAT_CLASSES:
        raise DDPTrainError(f"{table.path}: the target '{target}' holds {len(classes):,} distinct decimal values; as "
                            "classes that is a mistake: use --task regression (or auto)")
    return task, classes, rows, notes


# -- fit data ------------------------------------------------------------------------------------------------------
def table_plan(cfg: FitConfig, table: Table) -> tuple[str, str, tuple[str, ...], np.ndarray, list[str],
                                                      list[ColumnRole]]:
    """What `fit` and `describe` both decide before fitting anything: target, task, classes, rows, roles."""
    target = pick_target(table, cfg.target)
    task, classes, rows, notes = plan_target(table, target, cfg.task)
    roles = infer_roles(table, target, cfg.categorical, cfg.numeric, cfg.drop, cfg.numbers_as_categories or ())
    notes += [f"column '{r.name}' is dropped: {r.reason}" + ("" if r.reason == "--drop" else
              "; keep it with --categorical or --numeric") for r in roles if r.role == "dropped"]
    return target, task, classes, rows, notes, roles


STAGED = "staged"  # a workspace's folder of the staged table's columns


def cross_validates(cfg: FitConfig, train_rows: int, has_val: bool, below: int = SMALL_TABLE_ROWS) -> bool:
    """Whether fit makes a choice by cross-validation (crossval.py): on a table file with no validation rows,
    under `below` training rows (the numeric pieces: SMALL_TABLE_ROWS; the ids' roles: BAG_BELOW_ROWS)."""
    return not has_val and 2 * CV_FOLDS <= train_rows < below and looks_like_path(cfg.data)


def _in_memory(name: str, shape: tuple[int, int]) -> np.ndarray:
    return np.empty(shape, dtype=np.float32)


def prepare_fit_data(cfg: FitConfig, workspace: Path | None = None) -> FitData:
    """The table read, planned, split and fitted. Given a `workspace` folder (the cache's), a file's number and date
    columns are staged there on disk and the feature matrices written into memory-mapped files there, so that a
    table larger than memory can be prepared; without one, everything is in memory."""
    if workspace is None or not looks_like_path(cfg.data):
        table = load_table(cfg.data, cfg.seed, cfg.n_samples, cfg.n_features, cfg.n_classes, cfg.noise)
    else:
        table = stage_table(cfg.data, workspace / STAGED)
    allocate = allocate_in(workspace) if workspace is not None else _in_memory
    target, task, classes, rows, notes, roles = table_plan(cfg, table)
    table = table.select(rows) if len(rows) < len(table) else table
    if cfg.val_data:
        train_rows, val_rows = np.arange(len(table)), np.array([], dtype=np.int64)
    else:
        fraction = resolve_val_fraction(cfg, len(table), looks_like_path(cfg.data))
        if fraction == 0 and cfg.val_fraction is None:
            under = VALIDATE_FROM_ROWS if len(table) < VALIDATE_FROM_ROWS else BAG_BELOW_ROWS
            notes.append(f"no validation split: the table has {len(table):,} rows, under {under:,}, and "
                         "every row trains; hold some out with --val-fraction 0.2 or --val-data FILE")
        train_rows, val_rows = _split_rows(len(table), fraction, cfg.seed)
    pre = fit_preprocessor(table, roles, train_rows, cfg.embedding_dim)
    codes = pre.code_columns()
    has_val = len(val_rows) > 0 or bool(cfg.val_data)  # the ids' folds say how they decided
    decided = id_candidates(roles, codes) if cross_validates(cfg, len(train_rows), has_val, BAG_BELOW_ROWS) else ()
    notes += level_notes(table, roles, train_rows, cfg.embedding_dim) + code_notes(codes) + id_notes(roles, codes,
                                                                                                     decided)
    if task == "classification":
        y = encode_classes(table, target, classes, np.arange(len(table)))
        y_mean, y_std = 0.0, 1.0
    else:
        y = regression_target(table, target, np.arange(len(table)))
        std = float(y[train_rows].std())
        y_mean, y_std = float(y[train_rows].mean()), std if std > 0 else 1.0
    spec = DataSpec(target, task, classes, pre, y_mean, y_std, tuple(notes))

    def split(name: str, part: np.ndarray) -> Split:
        x, _ = pre.transform(table, part, allocate(name, (len(part), pre.width)))
        return to_split(spec, x, y[part])

    train = split("x_train", train_rows)
    if cfg.val_data:
        val: Split | None = labelled_split(spec, load_table(cfg.val_data, cfg.seed + 1, cfg.n_samples, cfg.n_features,
                                                            cfg.n_classes, cfg.noise, problem_seed=cfg.seed))
    else:
        val = split("x_val", val_rows) if len(val_rows) else None
    return FitData(spec, train, val, tuple(roles))


def to_split(spec: DataSpec, x: np.ndarray, y: np.ndarray | None) -> Split:
    if y is None:
        ys = None
    elif spec.task == "classification":
        ys = torch.from_numpy(y.astype(np.int64))
    else:
        ys = torch.from_numpy(((y - spec.y_mean) / spec.y_std).astype(np.float32))
    return Split(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), ys)


def check_columns(spec: DataSpec, table: Table, allowed_extra: tuple[str, ...] = ()) -> list[str]:
    """The table's columns that the model does not use (ignored, with a note; pandas' re-saved index, a column
    added for bookkeeping); a feature missing is an error."""
    known = set(spec.feature_names) | set(spec.preprocessor.dropped) | {spec.target_name} | set(allowed_extra)
    missing = [name for name in spec.feature_names if name not in table.names]
    if missing:
        raise DDPTrainError(f"{table.path}: columns do not match the model's features (missing "
                            f"{', '.join(missing)}); it expects {', '.join(spec.feature_names)}")
    return [name for name in table.names if name not in known]


def features(spec: DataSpec, table: Table, allowed_extra: tuple[str, ...] = ()) -> tuple[np.ndarray, Counter[Any]]:
    """A new table's feature matrix through the training preprocessor, and a tally of what is worth a note: cells
    of each column unseen in training (("unseen", column)) and columns ignored (("extra", column))."""
    extra = check_columns(spec, table, allowed_extra)
    x, unseen = spec.preprocessor.transform(table)
    tally: Counter[Any] = Counter({("unseen", name): count for name, count in unseen.items()})
    tally.update({("extra", name): 1 for name in extra})
    return x, tally


def unseen_notes(spec: DataSpec, unseen: dict[str, int]) -> list[str]:
    """One note per column whose cells held a level with no embedding of its own (never seen in training, or rarer
    there than rare_count: both share the unknown level) or text where numbers or dates were."""
    roles = {c.name: c.role for c in spec.preprocessor.columns}
    return [f"column '{name}': {count:,} cells hold " + ("a level not learnt in training (absent from the training "
            "rows or too rare there; treated as unknown)"
            if roles[name] == "categorical" else f"values that are not {'dates' if roles[name] == 'datetime' else 'numbers'} "
            "(treated as missing)") for name, count in unseen.items()]


def labelled_split(spec: DataSpec, table: Table, require_target: bool = True,
                   allowed_extra: tuple[str, ...] = (), notes: list[str] | None = None,
                   tally: Counter[Any] | None = None) -> Split:
    """Rows of a new table through the training preprocessor; targets encoded when present (rows without one are
    left out when scoring). What is worth a line (unseen levels, rows left out) is counted into `tally` (over
    several pieces of a file) and, given `notes`, said there for this table alone."""
    counts: Counter[Any] = Counter(rows=len(table))
    if spec.target_name in table.names and require_target:
        present = ~table.missing(spec.target_name)
        if not present.any() and tally is None:
            raise DDPTrainError(f"{table.path}: the target '{spec.target_name}' is empty in every row")
        if not present.all():
            counts["unscored"] = int((~present).sum())
            table = table.select(np.flatnonzero(present))
    x, noted = features(spec, table, allowed_extra)
    counts.update(noted)
    if notes is not None:
        notes += tally_notes(spec, counts)
    if tally is not None:
        tally.update(counts)
    if spec.target_name not in table.names or not require_target:
        if require_target:
            raise DDPTrainError(f"{table.path} has no target column '{spec.target_name}' to score against")
        return to_split(spec, x, None)
    rows = np.arange(len(table))
    if spec.task == "classification":
        y = encode_classes(table, spec.target_name, spec.classes, rows)
    else:
        y = regression_target(table, spec.target_name, rows)
    return to_split(spec, x, y)


def tally_notes(spec: DataSpec, tally: Counter[Any]) -> list[str]:
    """The notes of a `labelled_split` tally: rows left out for want of a target, then unseen values."""
    notes = []
    if tally["unscored"]:
        notes.append(f"{tally['unscored']} of {tally['rows']} rows have no '{spec.target_name}' value and are not "
                     "scored")
    extra = [key[1] for key in tally if isinstance(key, tuple) and key[0] == "extra"]
    if extra:
        notes.append(f"column{'s' if len(extra) > 1 else ''} {', '.join(repr(n) for n in extra)} of the file "
                     f"{'are' if len(extra) > 1 else 'is'} not used by the model and ignored")
    return notes + unseen_notes(spec, {key[1]: n for key, n in tally.items()
                                       if isinstance(key, tuple) and key[0] == "unseen"})


SHUFFLE_BLOCK_ROWS = 4096  # at most; a small table's blocks are smaller, so its order still has blocks
SHUFFLE_WINDOW_BLOCKS = 16


def shuffle_block_rows(n_rows: int) -> int:
    return max(1, min(SHUFFLE_BLOCK_ROWS, n_rows // 64))


def epoch_order(n_rows: int, seed: int, epoch: int, shuffle: str = "exact") -> torch.Tensor:
    """The epoch's global row order, a function of (seed, epoch) alone.

    exact: one seeded permutation of all rows (torch's DistributedSampler order). block: blocks of contiguous rows
    (SHUFFLE_BLOCK_ROWS, or n_rows // 64 for a small table) in a seeded random order, then the rows of each window
    of SHUFFLE_WINDOW_BLOCKS consecutive blocks shuffled among themselves: a step reads from a few blocks, an epoch
    reads the table window by window, so a memory-mapped table larger than memory is read near-sequentially.
    """
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    if shuffle == "exact":
        return torch.randperm(n_rows, generator=generator)
    block = shuffle_block_rows(n_rows)
    blocks = torch.randperm(-(-n_rows // block), generator=generator)
    rows = (blocks[:, None] * block + torch.arange(block)).flatten()
    rows = rows[rows < n_rows]  # the last block may be short
    ends = torch.cumsum((n_rows - blocks * block).clamp(max=block), 0)[SHUFFLE_WINDOW_BLOCKS - 1::SHUFFLE_WINDOW_BLOCKS]
    start = 0
    for end in [*ends.tolist(), n_rows]:  # each window: whole blocks, its rows shuffled among themselves
        rows[start:end] = rows[start:end][torch.randperm(end - start, generator=generator)]
        start = end
    return rows


def epoch_indices(n_rows: int, seed: int, epoch: int, rank: int, world_size: int,
                  shuffle: str = "exact") -> torch.Tensor:
    """This rank's rows for one epoch, a function of (seed, epoch) alone.

    The global order (`epoch_order`; with exact, torch's DistributedSampler(shuffle=True, drop_last=True) order,
    tested against it) is interleaved across ranks, so the union of the ranks' step-s slices is the order's s-th
    global batch whatever the world size.
    """
    order = epoch_order(n_rows, seed, epoch, shuffle)
    return order[: n_rows // world_size * world_size][rank::world_size].contiguous()


def eval_shard(n_rows: int, rank: int, world_size: int) -> slice:
    """A contiguous, non-overlapping share of the rows: every row counted exactly once."""
    return slice(rank * n_rows // world_size, (rank + 1) * n_rows // world_size)
