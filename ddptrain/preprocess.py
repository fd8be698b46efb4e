"""Column roles and the fitted preprocessor: a table as it comes -> model inputs, the same at fit, eval and predict.

Every feature column gets a role: `numeric`, `categorical` (text, booleans; integers only when asked),
`datetime` (expanded into numeric parts) or `dropped` (a pandas index column, a text column unique in every row,
a constant or empty column), inferred from the table and overridden by --categorical/--numeric/--drop. The
`Preprocessor` is fitted on the training rows only and stored in the checkpoint as plain values:

- numeric: the median fills missing cells, a 0/1 indicator column is added where training rows had missing cells,
  values outside the training rows' range are capped to it (an MLP extrapolates linearly: one corrupt value far
  out, like a diamond 31.8 mm deep, would otherwise give a wild prediction; trees are flat there too), then
  standardization with the training mean and deviation;
- datetime: year, month, day, day of week, day of year and elapsed days, each then as numeric;
- whole numbers that repeat like codes (a commune, a school, a person's number: CODE_LEVELS values or more, each
  in CODE_REPEATS training rows on average, about equally common): numeric as above, and also a category of their
  values with an embedding of its own, so the model can learn each code's effect, which no smooth function of the
  number gives;
- categorical: a vocabulary of the training levels; levels rarer than `rare_count` (3 rows, or 0.1% of a long
  table's training rows) share the "unknown" level, which also takes levels never seen in training; missing cells
  have a level of their own; embeddings are at most EMBED_CAP wide; a text column whose distinct values number
  half its rows or more is an ID and is dropped. The codes travel in the same
  float32 matrix as the numbers (exact below 2**24) and the model embeds them (model.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ddptrain.config import CV_MAX_CATEGORIES, EMBED_CAP
from ddptrain.errors import DDPTrainError, UsageError
from ddptrain.tables import Table

ROLES = ("numeric", "categorical", "datetime", "dropped")
DATE_PARTS = ("year", "month", "day", "dayofweek", "dayofyear", "elapsed_days")
RARE_COUNT = 3  # a level seen fewer times in the training rows is "unknown" (rare_count: more on long tables)
RARE_SHARE = 0.001  # on a long table: a level in fewer than this share of the training rows is rare
ID_SHARE = 0.5  # a text column with at least this many distinct values per present cell is an ID (dropped)
MANY_LEVELS = 100  # a categorical column with this many levels gets a line in fit and describe
UNKNOWN, MISSING, FIRST_LEVEL = 0, 1, 2  # the first two codes of every categorical column; known levels follow
UNIQUE_MIN_ROWS = 20  # a text column unique in every row of a table this long is an ID or a name
# whole numbers of at least CODE_LEVELS kept levels, each value in CODE_REPEATS training rows on average and the
# values about equally often (the deviation of their counts at most CODE_EVENNESS of the mean) are codes: embedded
# too. Fewer values (a rating of 1 to 5, a weekday) an MLP tells apart from the number itself: embedded, they
# gained nothing measurable and a 1-5 rating cost one table 0.025 accuracy (RESULTS.md)
CODE_LEVELS, CODE_REPEATS, CODE_EVENNESS = 8, 5, 0.5
# whole numbers of CODE_ORDER_LEVELS values or more, RARE_COUNT rows a value on average, in no order of the values
# (a value's count correlates with its neighbour's within CODE_NEIGHBOURS of 0 and with the value's rank within
# CODE_TREND: a family's, a lecturer's or a store's number) look like ids (looks_like_ids): fit's folds try them as
# categories on a table without validation rows (crossval.py), a note names them elsewhere. Not embedded by
# default: the same rule also takes gridded quantities (a departure time, a price list) and, embedded, took
# flights' RMSE from 13.09 to 14.09 while a store-like column gained elsewhere (RESULTS.md)
CODE_ORDER_LEVELS, CODE_NEIGHBOURS, CODE_TREND = 20, 0.2, 0.3
FLOAT32_EXACT = 2 ** 24  # whole numbers up to this are exact in float32
CHUNK_ROWS = 1 << 20  # rows per step of column work (transform, checks)
MOSTLY_NUMBERS = 0.95  # a text column whose present cells are numbers this often is numeric (the rest: missing)


@dataclass(frozen=True)
class ColumnRole:
    name: str
    kind: str  # the reader's kind: number, text, bool, datetime
    role: str
    reason: str  # why (inferred, or the flag that asked)
    missing: float  # share of missing cells
    distinct: int  # distinct present values
    like_ids: bool = False  # whole numbers like ids (looks_like_ids): tried by fit's folds or named in a note


@dataclass(frozen=True)
class ColumnPlan:
    """One feature column, fitted."""

    name: str
    role: str  # numeric, categorical or datetime
    kind: str
    median: tuple[float, ...] = ()  # numeric: 1 value; datetime: one per part
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    indicator: bool = False  # a 0/1 missing-indicator column follows the values
    low: tuple[float, ...] = ()  # numeric/datetime: the training rows' range; values outside it are capped to it
    high: tuple[float, ...] = ()  # (empty in checkpoints written before caps: no caps)
    levels: tuple[str, ...] = ()  # categorical, or numeric codes: the known levels (codes 2, 3, ...)
    embedding_dim: int = 0

    @property
    def codes(self) -> bool:
        """A numeric column of whole-number codes (code_levels): its value, and a code to embed."""
        return self.role == "numeric" and bool(self.levels)

    @property
    def embedded(self) -> bool:
        """Whether the column also gives the model a code to embed: categorical, or a numeric one of codes."""
        return self.role == "categorical" or bool(self.levels)

    @property
    def width(self) -> int:
        """How many numeric columns this column becomes (categorical: none; its code goes to the embedding)."""
        if self.role == "categorical":
            return 0
        return len(self.mean) + (1 if self.indicator else 0)

    @property
    def cardinality(self) -> int:
        return len(self.levels) + FIRST_LEVEL

    def level_codes(self) -> dict[str, int]:
        """Each known level's code (after UNKNOWN and MISSING)."""
        return {level: FIRST_LEVEL + i for i, level in enumerate(self.levels)}


def embedding_size(cardinality: int) -> int:
    """fastai's rule of thumb for an embedding's width, capped at EMBED_CAP: uncapped, a 3,000-level column got a
    139-wide embedding, most of the model's parameters, and the model learnt the levels by heart."""
    return int(min(EMBED_CAP, round(1.6 * cardinality ** 0.56)))


def rare_count(train_rows: int) -> int:
    """How often a level must appear in the training rows to get an embedding of its own: RARE_COUNT, or a share
    of the rows (RARE_SHARE) on a longer table. A level seen a handful of times in 40,000 rows can only be
    learnt by heart; together with the other rare levels it is a level that generalises."""
    return max(RARE_COUNT, math.ceil(train_rows * RARE_SHARE))


def level_notes(table: Table, roles: list[ColumnRole], rows: np.ndarray, embedding_dim: int | None = None) -> list[str]:
    """A line for each categorical column of many levels: how many get an embedding of their own among `rows`
    (the training rows at fit; every row in describe), how many share the rare level."""
    notes, least = [], rare_count(len(rows))
    for r in roles:
        if r.role != "categorical" or r.distinct < MANY_LEVELS:
            continue
        kept = len(_vocabulary(table, r.name, rows))
        if kept == 0:  # nothing to learn a level from: say so rather than "0 ... are learnt"
            notes.append(f"column '{r.name}' has {r.distinct:,} levels, none seen in {least:,} or more rows: all "
                         "share one 'rare' level, so the column tells the model only whether a cell is missing "
                         f"(--drop {r.name} if it is an ID)")
            continue
        notes.append(f"column '{r.name}' has {r.distinct:,} levels: {kept:,} seen in {least:,} or more rows are "
                     f"learnt, the other {r.distinct - kept:,} share one 'rare' level (embedding width "
                     f"{embedding_dim or embedding_size(kept + FIRST_LEVEL)})")
    return notes


# -- roles ------------------------------------------------------------------------------------------------------
def infer_roles(table: Table, target: str, categorical: tuple[str, ...] = (), numeric: tuple[str, ...] = (),
                drop: tuple[str, ...] = (), numbers_as_categories: tuple[str, ...] = ()) -> list[ColumnRole]:
    """Every column but the target, with its role and why."""
    for flag, names in (("--categorical", categorical), ("--numeric", numeric), ("--drop", drop),
                        ("--numbers-as-categories", numbers_as_categories)):
        unknown = [n for n in names if n not in table.names]
        if unknown:
            raise table.unknown_columns(flag, unknown)
        if target in names:
            raise UsageError(f"{flag} names the target '{target}'; a target is not a feature")
    given = [set(categorical), set(numeric), set(drop), set(numbers_as_categories)]
    twice = sorted({n for i, a in enumerate(given) for b in given[i + 1:] for n in a & b})
    if twice:
        raise UsageError(f"{', '.join(repr(n) for n in twice)} given two roles in --categorical/--numeric/--drop/"
                         "--numbers-as-categories; give each column one")
    roles, n = [], len(table)
    for name, kind in zip(table.names, table.kinds):
        if name == target:
            continue
        missing = table.missing(name)
        values = counts = None
        if kind in ("number", "datetime"):
            present = table.column(name)[~missing]
            values, counts = np.unique(present, return_counts=True)
            distinct = len(counts)
        else:  # text and booleans: counted through their levels, not cell by cell
            present, distinct = None, len(table.levels(name)[1])
        if name in numbers_as_categories:
            role, reason = "categorical", "--numbers-as-categories"
        else:
            role, reason = _role(table, name, kind, present, distinct, n - int(missing.sum()), n, categorical,
                                 numeric, drop)
        if role == "numeric" and reason.startswith("numbers;"):  # a text column of numbers: its numbers' counts
            values, counts = _text_numbers(table, name)
        like_ids = role == "numeric" and reason.startswith("numbers") and looks_like_ids(values, counts)
        roles.append(ColumnRole(name, kind, role, reason, float(missing.mean()) if n else 0.0, distinct, like_ids))
    return roles


def _text_numbers(table: Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A text column's distinct numbers (its cells that parse as one) and how many cells hold each."""
    codes, texts = table.levels(name)
    parsed = np.array([_to_float(t) for t in texts], dtype=np.float64)
    cells = np.bincount(codes[codes >= 0], minlength=len(texts))
    numbers = np.isfinite(parsed)
    values, inverse = np.unique(parsed[numbers], return_inverse=True)
    return values, np.bincount(inverse, cells[numbers], minlength=len(values)).astype(np.int64)


def looks_like_ids(values: np.ndarray, counts: np.ndarray) -> bool:
    """Whether a numeric column's distinct `values` (with `counts`) are whole numbers like ids: each repeating in
    RARE_COUNT rows on average (enough for an embedding of its own) and the counts in no order of the values
    (counts_in_no_order: a family's, a store's or a lecturer's number). Those equally common in CODE_REPEATS
    rows or more are codes, embedded beside the number (code_levels); the rest keep the number alone, and fit
    cross-validates them as categories on a small table (crossval.resolve_numbers_as_categories) or names them."""
    return bool(counts.sum() >= RARE_COUNT * len(counts) and counts_in_no_order(counts)
                and np.all(values == np.round(values)))


def counts_in_no_order(counts: np.ndarray) -> bool:
    """Whether the counts of a column's values, in the values' order, follow no order of the values: a name's count
    says nothing of the next name's (lag-1 correlation within CODE_NEIGHBOURS of 0) and nothing rises or falls
    with the value (Spearman's correlation within CODE_TREND), over CODE_ORDER_LEVELS values or more. A quantity's
    counts follow its density, smooth from one value to the next (ages, at-bats: 0.5 to 1)."""
    if len(counts) < CODE_ORDER_LEVELS:
        return False
    if counts.std() == 0:
        return True
    before, after = counts[:-1].astype(np.float64), counts[1:].astype(np.float64)
    neighbours = np.corrcoef(before, after)[0, 1] if before.std() > 0 and after.std() > 0 else 0.0
    trend = np.corrcoef(np.arange(len(counts)), _average_ranks(counts))[0, 1]
    return bool(abs(neighbours) <= CODE_NEIGHBOURS and abs(trend) <= CODE_TREND)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """0-based ranks, ties given their average rank (as Spearman's correlation takes them)."""
    ranks = np.empty(len(values))
    ranks[np.argsort(values, kind="stable")] = np.arange(len(values))
    _, inverse = np.unique(values, return_inverse=True)
    return (np.bincount(inverse, ranks) / np.bincount(inverse))[inverse]


def _role(table: Table, name: str, kind: str, present: np.ndarray | None, distinct: int, n_present: int, n: int,
          categorical: tuple[str, ...], numeric: tuple[str, ...], drop: tuple[str, ...]) -> tuple[str, str]:
    if name in drop:
        return "dropped", "--drop"
    if name in categorical:
        return "categorical", "--categorical"
    if name in numeric:
        if kind not in ("number", "bool") and not (kind == "text" and _not_numbers(table, name, n_present) is not None):
            raise UsageError(f"--numeric {name}: column '{name}' of {table.path} holds {kind} values; only a "
                             "column of numbers can be numeric")
        return "numeric", "--numeric"
    if (name == "" or name.startswith("Unnamed: ")) and kind == "number" and n_present == n \
            and distinct == n and np.all(present == np.round(present)):
        # pandas' to_csv writes the index unnamed; after df.sample() or a split its numbers are any distinct
        # whole numbers, and as a feature they leak the source's row order (often sorted by the target)
        return "dropped", "an unnamed pandas index column"
    if n_present == 0:
        return "dropped", "empty in every row"
    if distinct == 1 and n_present == n:
        return "dropped", "constant"
    if kind == "text":
        others = _not_numbers(table, name, n_present)
        if others is not None:
            return "numeric", f"numbers; {others} text cells are missing values"
    if kind == "text" and distinct == n and n >= UNIQUE_MIN_ROWS:
        return "dropped", "text unique in every row, like a name or an ID"
    if kind == "text" and distinct >= ID_SHARE * n_present and n >= UNIQUE_MIN_ROWS:
        return "dropped", (f"ID-like: {distinct:,} distinct values in {n_present:,} rows (most levels too rare to "
                           "learn)")
    if kind in ("text", "bool"):
        return "categorical", "text" if kind == "text" else "true/false"
    if kind == "datetime":
        return "datetime", "dates"
    return "numeric", "numbers"


def _not_numbers(table: Table, name: str, n_present: int) -> int | None:
    """How many of a text column's present cells are not numbers, when the rest are (MOSTLY_NUMBERS of them, with
    more than two distinct numbers): a column of numbers with a few marks among them; else None. Each distinct
    text is parsed once, weighed by how many cells hold it."""
    codes, texts = table.levels(name)
    parsed = np.array([_to_float(t) for t in texts], dtype=np.float64)
    counts = np.bincount(codes[codes >= 0], minlength=len(texts))
    numbers = np.isfinite(parsed)
    if counts[numbers].sum() >= MOSTLY_NUMBERS * n_present and len(np.unique(parsed[numbers])) > 2:
        return int(counts[~numbers].sum())
    return None


# -- the fitted preprocessor ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preprocessor:
    columns: tuple[ColumnPlan, ...]
    dropped: tuple[str, ...] = ()

    @property
    def feature_columns(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @property
    def n_numeric(self) -> int:
        return sum(c.width for c in self.columns)

    @property
    def embeddings(self) -> tuple[tuple[int, int], ...]:
        return tuple((c.cardinality, c.embedding_dim) for c in self.columns if c.embedded)

    def code_columns(self) -> dict[str, int]:
        """The numeric columns of codes (code_levels) and how many of their values are embedded."""
        return {c.name: len(c.levels) for c in self.columns if c.codes}

    def numeric_names(self) -> list[str]:
        names = []
        for c in self.columns:
            if c.role == "numeric":
                names.append(c.name)
            elif c.role == "datetime":
                names += [f"{c.name}.{part}" for part in DATE_PARTS]
            if c.indicator:
                names.append(f"{c.name}.missing")
        return names

    @property
    def width(self) -> int:
        """Columns of the transformed matrix: the numbers, then one code per categorical column."""
        return self.n_numeric + len(self.embeddings)

    def transform(self, table: Table, rows: np.ndarray | None = None,
                  out: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, int]]:
        """float32 [rows, width]: standardized numbers, then category codes; and how many cells of each column
        held a level unseen in training (or, for a number or date column, text that does not parse).

        `rows` picks and orders the table's rows (default: all); `out` (e.g. a memory-mapped file) receives the
        result. Filled one column at a time, so beyond `out` only a few columns' worth of memory is used."""
        rows = np.arange(len(table)) if rows is None else rows
        out = np.empty((len(rows), self.width), dtype=np.float32) if out is None else out
        unseen: dict[str, int] = {}
        j, k = 0, self.n_numeric
        for c in self.columns:
            unseen[c.name] = 0
            for start, chunk in zip(range(0, len(rows), CHUNK_ROWS), _row_chunks(rows)):
                at = slice(start, start + len(chunk))
                if c.role == "categorical":
                    out[at, k], count = _encode(table, c, chunk)
                    unseen[c.name] += count
                    continue
                values, missing = _numeric_parts(table, c.name, c.role, chunk)
                if table.kind(c.name) != c.kind and c.kind in ("number", "datetime"):
                    unseen[c.name] += int(missing.sum() - table.missing(c.name)[chunk].sum())
                for part in range(values.shape[1]):
                    filled = np.where(np.isnan(values[:, part]), c.median[part], values[:, part])
                    if c.low:
                        filled = np.clip(filled, c.low[part], c.high[part])
                    out[at, j + part] = (filled - c.mean[part]) / c.std[part]
                if c.indicator:
                    out[at, j + values.shape[1]] = missing
                if c.codes:  # a value not seen often in training is UNKNOWN, as any new number
                    out[at, k], _ = _encode(table, c, chunk)
            j += c.width
            k += c.embedded
        return out, {name: count for name, count in unseen.items() if count}

    def to_dict(self) -> dict[str, Any]:
        return {"columns": [{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(c).items()}
                            for c in self.columns], "dropped": list(self.dropped)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessor:
        columns = tuple(ColumnPlan(**{k: tuple(v) if isinstance(v, list) else v for k, v in c.items()})
                        for c in d["columns"])
        return cls(columns, tuple(d.get("dropped", ())))

    def check(self) -> None:
        """Raise ValueError if this plan (e.g. read from an edited checkpoint) is not self-consistent."""
        names = [c.name for c in self.columns]
        if len(set(names)) != len(names) or not all(isinstance(n, str) for n in names):
            raise ValueError("feature names repeat or are not strings")
        for c in self.columns:
            if c.role not in ROLES[:3]:
                raise ValueError(f"column '{c.name}' has role {c.role!r}")
            parts = len(DATE_PARTS) if c.role == "datetime" else (0 if c.role == "categorical" else 1)
            if not (len(c.mean) == len(c.std) == len(c.median) == parts):
                raise ValueError(f"column '{c.name}' has {len(c.mean)} means for {parts} values")
            if c.low and not (len(c.low) == len(c.high) == parts and all(lo <= hi for lo, hi in zip(c.low, c.high))):
                raise ValueError(f"column '{c.name}': its range has {len(c.low)} bounds for {parts} values")
            stats = (*c.mean, *c.std, *c.median, *c.low, *c.high)
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in stats):
                raise ValueError(f"column '{c.name}': the statistics must be finite numbers")
            if not all(v > 0 for v in c.std):
                raise ValueError(f"column '{c.name}': the standard deviations must be > 0")
            if c.levels and c.role == "datetime":
                raise ValueError(f"column '{c.name}': a date column has no levels")
            if c.embedded and (not isinstance(c.embedding_dim, int) or c.embedding_dim < 1
                               or len(set(c.levels)) != len(c.levels)):
                raise ValueError(f"column '{c.name}': levels repeat or the embedding width is not positive")


def plan_summary(pre: Preprocessor) -> str:
    """One phrase: how many columns of each role, and the model's input width."""
    counts = {role: sum(c.role == role for c in pre.columns) for role in ROLES[:3]}
    parts = [f"{n} {role}" for role, n in counts.items() if n] + ([f"{len(pre.dropped)} dropped"] if pre.dropped else [])
    return f"columns: {', '.join(parts)} ({pre.n_numeric} numbers + {len(pre.embeddings)} embedded)"


def fit_preprocessor(table: Table, roles: list[ColumnRole], train_rows: np.ndarray,
                     embedding_dim: int | None = None) -> Preprocessor:
    """Fit every kept column on the training rows only."""
    plans, bad = [], []
    for r in roles:
        if r.role == "dropped":
            continue
        if r.role == "categorical":
            levels = _vocabulary(table, r.name, train_rows)
            plans.append(ColumnPlan(r.name, r.role, r.kind, levels=levels,
                                    embedding_dim=embedding_dim or embedding_size(len(levels) + FIRST_LEVEL)))
            continue
        infinite = _first_infinite(table, r.name, r.role)
        if infinite is not None:
            bad.append(f"'{r.name}' {table.where(infinite)} is infinite")
            continue
        train, missing = _numeric_parts(table, r.name, r.role, train_rows)
        if np.isnan(train).all():
            median = np.zeros(train.shape[1])
        else:
            with np.errstate(all="ignore"):
                median = np.nan_to_num(np.nanmedian(train, axis=0))
        with np.errstate(all="ignore"):  # a column missing in every training row: no range, caps at the fill
            low = np.where(np.isnan(train).all(axis=0), median, np.nanmin(train, axis=0))
            high = np.where(np.isnan(train).all(axis=0), median, np.nanmax(train, axis=0))
        filled = np.where(np.isnan(train), median, train)
        std = filled.std(axis=0)
        levels = code_levels(table, r, train_rows, train)
        plans.append(ColumnPlan(r.name, r.role, r.kind, tuple(median.tolist()), tuple(filled.mean(axis=0).tolist()),
                                tuple(np.where(std > 0, std, 1.0).tolist()), bool(missing.any()),
                                low=tuple(low.tolist()), high=tuple(high.tolist()), levels=levels,
                                embedding_dim=(embedding_dim or embedding_size(len(levels) + FIRST_LEVEL)) if levels else 0))
    if bad:
        raise DDPTrainError(f"{table.path}: features must be finite: {'; '.join(bad)} (empty or NA cells are "
                            "fine: they are missing values)")
    if not plans:
        raise DDPTrainError(f"{table.path} has no feature columns left besides the target (dropped: "
                            f"{', '.join(r.name + ' (' + r.reason + ')' for r in roles) or 'none'}); keep one with "
                            "--numeric or --categorical")
    return Preprocessor(tuple(plans), tuple(r.name for r in roles if r.role == "dropped"))


def code_levels(table: Table, role: ColumnRole, train_rows: np.ndarray, train: np.ndarray) -> tuple[str, ...]:
    """The levels of a numeric column of whole numbers that repeat like codes, which the model also embeds; else
    none. Codes: CODE_LEVELS kept levels or more, CODE_REPEATS training rows a value on average, and the values
    about equally common (a commune, a state, a person in a panel, a year or month), where counts and sizes (at-bats,
    days ill) have small values far more common than large ones: embedded, those made a model worse (baseball's
    home runs 2.34 -> 2.66 RMSE). A commune number, a school or a person's number decides the target level by
    level (trees split it finely); as one smooth input an MLP cannot follow it (a 27,765-row survey: RMSE 0.48
    where LightGBM has 0.42; with the commune embedded 0.41)."""
    if role.role != "numeric" or role.kind != "number" or role.reason == "--numeric":  # asked: the number alone
        return ()
    present = train[:, 0][~np.isnan(train[:, 0])]
    if len(present) == 0 or not np.all(present == np.round(present)):
        return ()
    if np.abs(present).max() > FLOAT32_EXACT:  # served as float32 (ONNX), a bigger code would not match itself
        return ()
    counts = np.unique(present, return_counts=True)[1]
    if len(counts) < CODE_LEVELS or len(present) < CODE_REPEATS * len(counts):
        return ()
    if counts.std() > CODE_EVENNESS * counts.mean():  # a count or a size: small values far more common than large
        return ()
    levels = _vocabulary(table, role.name, train_rows)
    return levels if len(levels) >= CODE_LEVELS else ()


def code_columns(table: Table, roles: list[ColumnRole], rows: np.ndarray) -> dict[str, int]:
    """The numeric columns of codes among `rows` (describe: every row with a target; a fitted plan says its own,
    Preprocessor.code_columns), which are embedded too, and how many of their values get an embedding."""
    found = {}
    for r in roles:
        if r.role == "numeric" and r.kind == "number":  # the only candidates: read no other column
            levels = code_levels(table, r, rows, _numeric_parts(table, r.name, r.role, rows)[0])
            if levels:
                found[r.name] = len(levels)
    return found


def code_notes(codes: dict[str, int]) -> list[str]:
    """One line naming the numeric columns of codes (code_columns)."""
    if not codes:
        return []
    found = ", ".join(f"'{name}' ({count:,})" for name, count in codes.items())
    return [f"whole numbers that repeat like codes are also fed as categories, each frequent value with an embedding "
            f"of its own: {found} values; --numeric COLUMN keeps one a number alone"]


def id_candidates(roles: list[ColumnRole], codes: dict[str, int]) -> tuple[str, ...]:
    """The whole-number columns like ids (ColumnRole.like_ids) that fit cross-validates as categories on a small
    table (crossval.resolve_numbers_as_categories): the first CV_MAX_CATEGORIES not embedded as codes already."""
    return tuple(r.name for r in roles if r.like_ids and r.name not in codes)[:CV_MAX_CATEGORIES]


def id_notes(roles: list[ColumnRole], codes: dict[str, int], decided: tuple[str, ...] = ()) -> list[str]:
    """One line naming the whole-number columns that look like ids (ColumnRole.like_ids), not embedded as codes
    and not `decided` by fit's folds: as one number the model cannot give each value its own effect."""
    names = [r.name for r in roles if r.like_ids and r.name not in codes and r.name not in decided]
    if not names:
        return []
    found = ", ".join(f"'{name}'" for name in names)
    return [f"whole numbers like ids in {found}: values repeat unevenly in no order of the numbers, as a person's or a "
            "store's number does, and as one number the model cannot learn each value's effect; --categorical "
            f"{','.join(names)} if they are ids or codes, --numeric to keep them numbers"]


def _row_chunks(rows: np.ndarray) -> list[np.ndarray]:
    """`rows` in pieces of CHUNK_ROWS: column work on a long table holds a chunk's temporaries, not a column's."""
    return [rows[i:i + CHUNK_ROWS] for i in range(0, len(rows), CHUNK_ROWS)] or [rows]


def _first_infinite(table: Table, name: str, role: str) -> int | None:
    for chunk in _row_chunks(np.arange(len(table))):
        values, _ = _numeric_parts(table, name, role, chunk)
        hits = np.flatnonzero(np.isinf(values).any(axis=1))
        if len(hits):
            return int(chunk[hits[0]])
    return None


def _vocabulary(table: Table, name: str, rows: np.ndarray) -> tuple[str, ...]:
    codes, texts = table.levels(name)
    picked = codes[rows]
    counts = np.bincount(picked[picked >= 0], minlength=len(texts))
    return tuple(texts[i] for i in np.flatnonzero(counts >= rare_count(len(rows))))  # texts are sorted, so these are too


def _encode(table: Table, plan: ColumnPlan, rows: np.ndarray) -> tuple[np.ndarray, int]:
    """The rows' codes (a level unseen in training: UNKNOWN, counted) through the table's levels: one lookup per
    distinct value, then one gather."""
    codes, texts = table.levels(plan.name)
    index = plan.level_codes()
    model_code = np.array([index.get(t, UNKNOWN) for t in texts] + [MISSING], dtype=np.float32)  # -1 -> MISSING
    picked = codes[rows]
    out = model_code[picked]
    return out, int(np.count_nonzero((out == UNKNOWN) & (picked >= 0)))


def _to_date(value: Any) -> np.datetime64:
    try:
        return np.datetime64(str(value).replace("/", "-"), "s")
    except ValueError:
        return np.datetime64("NaT")


def _to_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _numeric_parts(table: Table, name: str, role: str,
                   rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """[rows, parts] float64 with NaN where missing, and the missing mask (of `rows`, default all)."""
    col, kind = table.column(name), table.kind(name)
    if rows is not None:
        col = col[rows]
    if role == "datetime":
        if kind != "datetime":  # dates in training, not here: what parses is a date, the rest missing
            col = np.array([_to_date(v) for v in col], dtype="datetime64[s]")
        missing = np.isnat(col)
        days = col.astype("datetime64[D]")
        safe = np.where(missing, np.datetime64("1970-01-01"), days)
        years = safe.astype("datetime64[Y]")
        months = safe.astype("datetime64[M]")
        parts = np.stack([
            years.astype(np.int64) + 1970.0,
            (months - years).astype(np.int64) + 1.0,
            (safe - months).astype(np.int64) + 1.0,
            ((safe.astype(np.int64) + 3) % 7).astype(np.float64),  # Monday 0, as pandas
            (safe - years).astype(np.int64) + 1.0,
            col.astype("datetime64[s]").astype(np.int64) / 86400.0,
        ], axis=1).astype(np.float64)
        parts[missing] = np.nan
        return parts, missing.astype(np.float64)
    if kind == "bool":
        values = np.array([np.nan if v is None else float(v) for v in col], dtype=np.float64)
    elif kind == "number":
        values = col.astype(np.float64)
    elif kind == "text":  # numbers in training, text here (a new file): what parses is a number, the rest missing
        values = np.array([_to_float(v) for v in col], dtype=np.float64)
    else:
        raise DDPTrainError(f"{table.path}: column '{name}' holds {kind} values; it cannot be numeric")
    missing = np.isnan(values)
    return values[:, None], missing.astype(np.float64)
