"""Data: a table (file or built-in) -> task, labels, standardized tensors, and each rank's batches.

The `DataSpec` (feature names, statistics, task, labels) travels inside every checkpoint so that eval and
predict apply exactly what training applied.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ddptrain import datasets
from ddptrain.config import FitConfig
from ddptrain.errors import DDPTrainError, UsageError
from ddptrain.tables import Table, looks_like_path, numeric_column, read_table

MAX_INTEGER_CLASSES = 20  # an integer target with at most this many distinct values is a class label


@dataclass(frozen=True)
class DataSpec:
    feature_names: tuple[str, ...]
    target_name: str
    task: str
    classes: tuple[str, ...]
    x_mean: tuple[float, ...]
    x_std: tuple[float, ...]
    y_mean: float = 0.0
    y_std: float = 1.0

    @property
    def n_outputs(self) -> int:
        return len(self.classes) if self.task == "classification" else 1

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataSpec:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def check(self) -> None:
        """Raise ValueError if this spec (e.g. read from an edited checkpoint) is not self-consistent."""
        if self.task not in ("classification", "regression"):
            raise ValueError(f"task {self.task!r} is not classification or regression")
        names = (*self.feature_names, self.target_name, *self.classes)
        if not all(isinstance(v, str) for v in names):
            raise ValueError("feature names, target and classes must be strings")
        if len(set(self.feature_names)) != len(self.feature_names):
            raise ValueError("feature names repeat")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("class labels repeat")
        if self.task == "classification" and len(self.classes) < 2:
            raise ValueError(f"a classification spec needs two or more classes, not {len(self.classes)}")
        n = len(self.feature_names)
        if len(self.x_mean) != n or len(self.x_std) != n:
            raise ValueError(f"{n} features but {len(self.x_mean)} means and {len(self.x_std)} deviations")
        numbers = (*self.x_mean, *self.x_std, self.y_mean, self.y_std)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers):
            raise ValueError("the standardization statistics must be finite numbers")
        if not all(v > 0 for v in (*self.x_std, self.y_std)):
            raise ValueError("the standard deviations must be > 0")


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # [rows, features], standardized float32
    y: torch.Tensor | None  # class ids (int64) or standardized targets (float32); None when unlabelled

    def __len__(self) -> int:
        return len(self.x)

    def to(self, device: torch.device) -> Split:
        return Split(self.x.to(device), None if self.y is None else self.y.to(device))


@dataclass(frozen=True)
class FitData:
    spec: DataSpec
    train: Split
    val: Split | None

    def to_device(self, device: torch.device) -> FitData:
        """The training rows move to the device once (the GPU holds a table this size easily)."""
        return FitData(self.spec, self.train.to(device), self.val)


def load_table(source: str, seed: int, n_samples: int, n_features: int | None = None,
               n_classes: int | None = None, noise: float | None = None, problem_seed: int | None = None) -> Table:
    """A file path, or the name of a built-in dataset: rows drawn with `seed` from the problem that
    `problem_seed` (the training seed) poses."""
    if looks_like_path(source):
        return read_table(source)
    x, y = datasets.generate(source, n_samples, seed, n_features, n_classes, noise, problem_seed)
    names = [f"x{j}" for j in range(x.shape[1])] + ["y"]
    return Table(source, names, [x[:, j] for j in range(x.shape[1])] + [y], False)


def normalize_labels(raw: np.ndarray) -> np.ndarray:
    """Class labels as strings; integral numbers lose their '.0' so `1`, `1.0` and 1 are one class."""
    out = []
    for value in raw.tolist():
        text = str(value).strip()
        try:
            number = float(text)
            if number.is_integer() and not isinstance(value, bool):
                text = str(int(number))
        except ValueError:
            pass
        out.append(text)
    return np.array(out, dtype=object)


def _sort_classes(labels: set[str]) -> tuple[str, ...]:
    try:
        return tuple(sorted(labels, key=float))
    except ValueError:
        return tuple(sorted(labels))


def infer_task(raw: np.ndarray) -> str:
    if raw.dtype == bool:
        return "classification"
    if np.issubdtype(raw.dtype, np.number):
        numbers = raw.astype(np.float64)
    else:
        try:
            numbers = np.array([float(v) for v in raw], dtype=np.float64)
        except ValueError:
            return "classification"  # text labels, e.g. benign/malignant
    integral = np.all(np.isfinite(numbers)) and np.all(numbers == np.round(numbers))
    return "classification" if integral and len(np.unique(numbers)) <= MAX_INTEGER_CLASSES else "regression"


def encode_classes(table: Table, target: str, classes: tuple[str, ...]) -> np.ndarray:
    labels = normalize_labels(table.column(target))
    index = {label: i for i, label in enumerate(classes)}
    unknown = sorted({label for label in labels if label not in index})
    if unknown:
        raise DDPTrainError(f"{table.path}: column '{target}' has labels the model never saw: "
                            f"{', '.join(unknown[:5])}; it knows {', '.join(classes)}")
    return np.array([index[label] for label in labels], dtype=np.int64)


def _features(table: Table, names: tuple[str, ...]) -> np.ndarray:
    return np.stack([numeric_column(table, name) for name in names], axis=1)


def _split_rows(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * fraction))
    if fraction > 0 and (n_val == 0 or n_val == n):
        raise UsageError(f"--val-fraction {fraction} leaves an empty split of {n} rows; "
                         "use a fraction between 1/rows and 1 - 1/rows, or 0 for no validation")
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def prepare_fit_data(cfg: FitConfig) -> FitData:
    table = load_table(cfg.data, cfg.seed, cfg.n_samples, cfg.n_features, cfg.n_classes, cfg.noise)
    target = cfg.target or table.names[-1]
    if target not in table.names:
        raise DDPTrainError(f"--target '{target}' is not a column of {table.path}; its columns: "
                            f"{', '.join(table.names)}")
    features = tuple(name for name in table.names if name != target)
    if not features:
        raise DDPTrainError(f"{table.path} has no feature columns besides the target '{target}'")
    x = _features(table, features)
    task = cfg.task if cfg.task != "auto" else infer_task(table.column(target))
    if task == "classification":
        classes = _sort_classes(set(normalize_labels(table.column(target))))
        if len(classes) < 2:
            raise DDPTrainError(f"{table.path}: target '{target}' has one class ({classes[0]}); "
                                "classification needs at least two (or pass --task regression)")
        y = encode_classes(table, target, classes)
    else:
        classes = ()
        y = numeric_column(table, target)
    if cfg.val_data:
        train_rows, val_rows = np.arange(len(table)), np.array([], dtype=np.int64)
    else:
        train_rows, val_rows = _split_rows(len(table), cfg.val_fraction, cfg.seed)
    x_mean, x_std = x[train_rows].mean(axis=0), _safe_std(x[train_rows])
    y_mean, y_std = (0.0, 1.0) if task == "classification" else (float(y[train_rows].mean()), float(_safe_std(y[train_rows])))
    spec = DataSpec(features, target, task, classes, tuple(x_mean.tolist()), tuple(x_std.tolist()), y_mean, y_std)
    train = _to_split(spec, x[train_rows], y[train_rows])
    if cfg.val_data:
        val: Split | None = labelled_split(spec, load_table(cfg.val_data, cfg.seed + 1, cfg.n_samples, cfg.n_features,
                                                            cfg.n_classes, cfg.noise, problem_seed=cfg.seed))
    else:
        val = _to_split(spec, x[val_rows], y[val_rows]) if len(val_rows) else None
    return FitData(spec, train, val)


def _safe_std(a: np.ndarray) -> np.ndarray:
    std = a.std(axis=0)
    return np.where(std > 0, std, 1.0)


def _to_split(spec: DataSpec, x: np.ndarray, y: np.ndarray | None) -> Split:
    xs = (x - np.array(spec.x_mean)) / np.array(spec.x_std)
    if y is None:
        ys = None
    elif spec.task == "classification":
        ys = torch.from_numpy(y.astype(np.int64))
    else:
        ys = torch.from_numpy(((y - spec.y_mean) / spec.y_std).astype(np.float32))
    return Split(torch.from_numpy(xs.astype(np.float32)), ys)


def check_columns(spec: DataSpec, table: Table, allowed_extra: tuple[str, ...] = ()) -> None:
    missing = [name for name in spec.feature_names if name not in table.names]
    extra = [name for name in table.names
             if name not in spec.feature_names and name != spec.target_name and name not in allowed_extra]
    if missing or extra:
        detail = "; ".join(part for part in (
            f"missing {', '.join(missing)}" if missing else "",
            f"unexpected {', '.join(extra)}" if extra else "") if part)
        raise DDPTrainError(f"{table.path}: columns do not match the model's features ({detail}); "
                            f"it expects {', '.join(spec.feature_names)}")


def labelled_split(spec: DataSpec, table: Table, require_target: bool = True,
                   allowed_extra: tuple[str, ...] = ()) -> Split:
    """Rows of a new table, standardized with the training statistics; targets encoded when present."""
    check_columns(spec, table, allowed_extra)
    x = _features(table, spec.feature_names)
    if spec.target_name not in table.names:
        if require_target:
            raise DDPTrainError(f"{table.path} has no target column '{spec.target_name}' to score against")
        return _to_split(spec, x, None)
    if spec.task == "classification":
        y = encode_classes(table, spec.target_name, spec.classes)
    else:
        y = numeric_column(table, spec.target_name)
    return _to_split(spec, x, y)


def epoch_indices(n_rows: int, seed: int, epoch: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's rows for one epoch, a function of (seed, epoch) alone.

    Exactly torch's DistributedSampler(shuffle=True, drop_last=True) order (tested against it), computed as
    tensors rather than a Python list. One seeded permutation is interleaved across ranks, so the union of the
    ranks' step-s slices is the permutation's s-th global batch whatever the world size.
    """
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    order = torch.randperm(n_rows, generator=generator)
    return order[: n_rows // world_size * world_size][rank::world_size].contiguous()


def eval_shard(n_rows: int, rank: int, world_size: int) -> slice:
    """A contiguous, non-overlapping share of the rows: every row counted exactly once."""
    return slice(rank * n_rows // world_size, (rank + 1) * n_rows // world_size)
