"""Read a user's table (CSV, TSV, NPZ, Parquet) into named columns, with one-line errors that point at the cell."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddptrain.errors import DDPTrainError

SUFFIXES = (".csv", ".tsv", ".npz", ".parquet")


@dataclass(frozen=True)
class Table:
    path: str
    names: list[str]
    columns: list[np.ndarray]  # one array per column: numeric, or str (object) for text files
    text: bool  # True for CSV/TSV: errors name the file's line numbers
    line_numbers: tuple[int, ...] = ()  # CSV/TSV: each data row's line in the file (blank lines skipped)

    def __len__(self) -> int:
        return len(self.columns[0]) if self.columns else 0

    def where(self, row: int) -> str:
        if self.text:
            return f"line {self.line_numbers[row] if self.line_numbers else row + 2}"
        return f"row {row}"

    def column(self, name: str) -> np.ndarray:
        return self.columns[self.names.index(name)]


def looks_like_path(spec: str) -> bool:
    return spec.lower().endswith(SUFFIXES) or os.sep in spec or Path(spec).exists()


def read_table(path_str: str) -> Table:
    path = Path(path_str)
    if not path.exists():
        raise DDPTrainError(f"data file {path} does not exist; check the path")
    if path.is_dir():
        raise DDPTrainError(f"data path {path} is a folder; pass a .csv, .tsv, .npz or .parquet file")
    if not os.access(path, os.R_OK):
        raise DDPTrainError(f"data file {path} is not readable; check its permissions")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DDPTrainError(f"data file {path}: unknown format '{suffix}'; use .csv, .tsv, .npz or .parquet")
    if path.stat().st_size == 0:
        raise DDPTrainError(f"data file {path} is empty; it needs a header row and data rows")
    if suffix == ".npz":
        return _read_npz(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    return _read_delimited(path, "\t" if suffix == ".tsv" else ",")


def _read_delimited(path: Path, delimiter: str) -> Table:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle, delimiter=delimiter)
            numbered = [(reader.line_num, row) for row in reader if row]  # blank lines skipped, line numbers kept
            rows = [row for _, row in numbered]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DDPTrainError(f"data file {path} is not readable as text ({exc}); save it as UTF-8 CSV") from None
    if not rows:
        raise DDPTrainError(f"data file {path} is empty; it needs a header row and data rows")
    header, body = [name.strip() for name in rows[0]], rows[1:]
    if not body:
        raise DDPTrainError(f"data file {path} has a header but no data rows")
    if len(set(header)) != len(header) or any(not name for name in header):
        raise DDPTrainError(f"data file {path}: the header needs distinct, non-empty column names")
    lines = tuple(line for line, _ in numbered[1:])
    for line, row in zip(lines, body):
        if len(row) != len(header):
            raise DDPTrainError(f"data file {path}: line {line} has {len(row)} fields but the header has "
                                f"{len(header)}; fix that row")
    grid = np.array(body, dtype=object)
    return Table(str(path), header, [np.char.strip(grid[:, j].astype(str)) for j in range(len(header))], True, lines)


def _read_npz(path: Path) -> Table:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except Exception as exc:  # zipfile/numpy raise several kinds for a damaged file
        raise DDPTrainError(f"data file {path} is not a readable .npz archive ({exc})") from None
    x = arrays.get("x", arrays.get("X"))
    if x is None or "y" not in arrays:
        raise DDPTrainError(f"data file {path} needs arrays 'x' (or 'X') and 'y'; it has: "
                            f"{', '.join(arrays) or 'none'}")
    y = arrays["y"]
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise DDPTrainError(f"data file {path}: 'x' must be [rows, features] and 'y' [rows]; "
                            f"got {list(x.shape)} and {list(y.shape)}")
    if len(x) == 0:
        raise DDPTrainError(f"data file {path} has no rows")
    if not np.issubdtype(x.dtype, np.number):
        raise DDPTrainError(f"data file {path}: 'x' must be numeric, not {x.dtype}")
    names = [f"x{j}" for j in range(x.shape[1])] + ["y"]
    return Table(str(path), names, [x[:, j] for j in range(x.shape[1])] + [y], False)


def _read_parquet(path: Path) -> Table:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DDPTrainError("reading .parquet needs pyarrow: pip install 'ddptrain[parquet]'") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise DDPTrainError(f"data file {path} is not a readable Parquet file ({exc})") from None
    if table.num_rows == 0:
        raise DDPTrainError(f"data file {path} has a header but no data rows")
    columns = []
    for name in table.column_names:
        values = table.column(name).to_numpy(zero_copy_only=False)
        columns.append(values.astype(str) if values.dtype == object else values)
    return Table(str(path), list(table.column_names), columns, False)


def numeric_column(table: Table, name: str) -> np.ndarray:
    """A feature column as float64; a non-number, NaN or infinity is an error naming the column and row."""
    col = table.column(name)
    if np.issubdtype(col.dtype, np.number) or col.dtype == bool:
        values = col.astype(np.float64)
    else:
        values = np.empty(len(col), dtype=np.float64)
        for i, cell in enumerate(col):
            try:
                values[i] = float(cell)
            except ValueError:
                raise DDPTrainError(f"{table.path}: column '{name}' {table.where(i)} holds '{cell}', not a number; "
                                    "features must be numeric (drop or encode that column)") from None
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise DDPTrainError(f"{table.path}: column '{name}' {table.where(int(bad[0]))} is {col[bad[0]]}; "
                            "features and regression targets must be finite (fill or drop that row)")
    return values
