"""Read a user's table (CSV, TSV, Parquet, Feather/Arrow, JSON lines, NPZ) into typed, named columns, with one-line
errors that point at the cell.

CSV and TSV go through pyarrow's multithreaded typed reader: each column gets a type; empty cells and the usual NA
tokens are missing; true/false columns are booleans; ISO and YYYY/MM/DD dates and timestamps are dates. Parquet and
Feather/Arrow keep their own schema; JSON lines get pyarrow's (numbers, booleans, ISO timestamps, text). The text
formats may be compressed (.gz, .bz2, .zst, .lz4: `data.csv.gz`). Every column arrives as one of four kinds:

- `number`: float64, NaN where missing (`integer` marks one whose present values are all whole numbers);
- `text`: object array of str, None where missing;
- `bool`: object array of True/False, None where missing;
- `datetime`: datetime64[s], NaT where missing.
"""

from __future__ import annotations

import csv
import difflib
import glob
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ddptrain.datasets import BUILTIN
from ddptrain.errors import DDPTrainError, UsageError

# a file's format from its name; the text formats may also be compressed
FORMATS = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".feather": "arrow", ".arrow": "arrow",
           ".jsonl": "jsonl", ".ndjson": "jsonl", ".npz": "npz"}
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".lz4": "lz4"}
TEXT_FORMATS = ("csv", "tsv", "jsonl")
SHARD_FORMATS = ("csv", "tsv", "parquet", "arrow", "jsonl")  # a table may be a folder or pattern of these
ENDINGS = (*FORMATS, *(ending + c for ending, f in FORMATS.items() if f in TEXT_FORMATS for c in COMPRESSIONS))
FORMAT_NAMES = ".csv, .tsv, .parquet, .feather, .jsonl or .npz (.csv.gz and the like for compressed text)"
SPREADSHEETS = (".xlsx", ".xlsm", ".xls", ".ods", ".numbers")
NA_TOKENS = ("", "NA", "N/A", "n/a", "NaN", "nan", "null", "NULL", "None", "?")
KINDS = ("number", "text", "bool", "datetime")


@dataclass
class Table:
    path: str
    names: list[str]
    columns: list[np.ndarray]
    kinds: list[str]
    text: bool = False  # CSV/TSV: errors name the file's line numbers
    integer: set[str] = field(default_factory=set)  # number columns whose present values are whole numbers
    shards: list[tuple[str, int]] = field(default_factory=list)  # a dataset of several files: (file, first row)
    _lines: dict[str, list[int]] = field(default_factory=dict)
    _levels: dict[str, tuple[np.ndarray, list[str]]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.columns[0]) if self.columns else 0

    def column(self, name: str) -> np.ndarray:
        return self.columns[self.names.index(name)]

    def kind(self, name: str) -> str:
        return self.kinds[self.names.index(name)]

    def missing(self, name: str) -> np.ndarray:
        """A boolean mask of the column's missing cells."""
        col, kind = self.column(name), self.kind(name)
        if kind == "number":
            return np.isnan(col)
        if kind == "datetime":
            return np.isnat(col)
        return np.equal(col, None)  # elementwise over the objects, in C

    def levels(self, name: str) -> tuple[np.ndarray, list[str]]:
        """The column as categories: each cell's index into its distinct values written as labels (`label_text`:
        1 and 1.0 are one level), -1 where missing. Made once per distinct value, not per row, and kept."""
        if name not in self._levels:
            self._levels[name] = _levels(self.column(name), self.kind(name), self.missing(name))
        return self._levels[name]

    def where(self, row: int) -> str:
        """`line N` of a text file (blank lines counted as the file has them), or `row N`."""
        shard, first = next(((f, start) for f, start in reversed(self.shards) if start <= row), (self.path, 0))
        prefix = f"{shard} " if self.shards else ""
        if not self.text:
            return f"{prefix}row {row - first}"
        lines = self._lines.setdefault(shard, data_line_numbers(Path(shard)) if Path(shard).is_file() else [])
        local = row - first
        return f"{prefix}line {lines[local]}" if local < len(lines) else f"{prefix}data row {local + 1}"

    def unknown_columns(self, flag: str, names: list[str] | tuple[str, ...]) -> UsageError:
        """The error for `flag` naming columns this table lacks: the closest column for each (a typo, another
        case, stray spaces) and the table's columns."""
        return UsageError(f"{flag}: {unknown_column_text(names, self.names)} of {self.path}; "
                          f"its columns: {column_list(self.names)}")

    def select(self, rows: np.ndarray) -> Table:
        return Table(self.path, self.names, [c[rows] for c in self.columns], self.kinds, False, self.integer)


def unknown_column_text(names: list[str] | tuple[str, ...], columns: list[str]) -> str:
    """"'Age' is not a column (did you mean 'age'?)" for each name: the closest of `columns` by spelling, ignoring
    case and surrounding spaces."""
    folded = {column.strip().lower(): column for column in columns}
    parts = []
    for name in names:
        key = name.strip().lower()
        close = [folded[key]] if key in folded else difflib.get_close_matches(key, list(folded), n=1, cutoff=0.6)
        hint = f" (did you mean '{folded.get(close[0], close[0])}'?)" if close else ""
        parts.append(f"'{name}'{hint}")
    return f"{', '.join(parts)} {'is' if len(names) == 1 else 'are'} not {'a column' if len(names) == 1 else 'columns'}"


def column_list(columns: list[str], most: int = 30) -> str:
    """The columns, the first `most` of a wide table and how many more."""
    shown = ", ".join(columns[:most])
    return shown if len(columns) <= most else f"{shown}, ... ({len(columns):,} in all)"


def label_text(value: Any) -> str:
    """A cell as a category or class label: integral numbers lose '.0' (1, 1.0 and '1' are one level)."""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()


def _levels(col: np.ndarray, kind: str, missing: np.ndarray) -> tuple[np.ndarray, list[str]]:
    codes = np.full(len(col), -1, dtype=np.int32)
    if kind in ("number", "datetime"):
        values, inverse = np.unique(col[~missing], return_inverse=True)
        raw = [label_text(v) for v in values.tolist()]
        codes[~missing] = inverse.reshape(-1)
    elif kind == "text":
        pa = _pyarrow()
        encoded = pa.array(col[~missing], type=pa.string()).dictionary_encode()
        raw = [label_text(v) for v in encoded.dictionary.to_pylist()]
        codes[~missing] = encoded.indices.to_numpy(zero_copy_only=False)
    else:  # booleans (and anything else): few distinct values, found by a Python pass
        seen: dict[Any, int] = {}
        present = col[~missing].tolist()
        codes[~missing] = [seen.setdefault(v, len(seen)) for v in present]
        raw = [label_text(v) for v in seen]
    texts = sorted(set(raw))  # distinct cells may write alike (' a' and 'a', 1 and 1.0): one level
    position = {t: i for i, t in enumerate(texts)}
    remap = np.array([position[t] for t in raw] + [-1], dtype=np.int32)  # [-1]: a missing cell stays -1
    return remap[codes], texts


def numeric_table(path: str, names: list[str], columns: list[np.ndarray]) -> Table:
    """A table of numbers (built-in datasets, NPZ)."""
    cols = [np.asarray(c, dtype=np.float64) for c in columns]
    whole = {n for n, c in zip(names, cols) if np.all(np.isnan(c) | (c == np.round(c)))}
    return Table(path, names, cols, ["number"] * len(names), False, whole)


def looks_like_path(spec: str) -> bool:
    """Whether --data names files. A built-in dataset's bare name never does, whatever exists on disk (a folder
    `spirals`, or the run folder `--out spirals` that rank 0 has just made, would otherwise shadow it on some ranks
    and not others): `./spirals` is the path."""
    if spec in BUILTIN:
        return False
    return spec.lower().endswith(ENDINGS) or os.sep in spec or Path(spec).exists() or any(c in spec for c in "*?[")


def shard_files(spec: str) -> list[Path]:
    """A dataset's files: one file, a folder's table files (not .npz), or a glob pattern's matches, sorted."""
    if any(c in spec for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(spec) if Path(p).is_file())
        if not files:
            raise DDPTrainError(f"--data {spec}: no file matches the pattern; check it (quote it in the shell)")
        return files
    path = Path(spec)
    if path.is_dir() and (path / "checkpoints").is_dir() and (path / "metrics.jsonl").is_file():
        raise DDPTrainError(f"--data {spec} is a ddptrain run folder, not a table; pass the table's file or folder")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if file_format(p)[0] in SHARD_FORMATS and p.is_file())
        if not files:
            raise DDPTrainError(f"data path {path} is a folder without table files (.csv, .tsv, .parquet, .feather, "
                                ".jsonl); pass a file, or a folder of shards of one table")
        return files
    return [path]


def file_format(path: Path) -> tuple[str | None, str | None]:
    """(format, compression) from the file's name: ('csv', None) for a.csv, ('tsv', 'gzip') for a.tsv.gz; None for
    a name ddptrain does not read."""
    name = path.name.lower()
    compression = next((c for ending, c in COMPRESSIONS.items() if name.endswith(ending)), None)
    if compression is not None:
        name = name[:name.rindex(".")]
    fmt = FORMATS.get(os.path.splitext(name)[1])
    if compression is not None and fmt not in TEXT_FORMATS:
        return None, compression
    return fmt, compression


def read_table(path_str: str) -> Table:
    files = shard_files(path_str)
    if len(files) == 1 and not Path(path_str).is_dir():
        return _read_file(files[0])
    return _read_shards(path_str, files)


class MixedTypes(Exception):
    """A streamed CSV column changed type after its first block (e.g. numbers, then text): read it whole."""


def read_pieces(path_str: str, rows: int) -> Iterator[Table]:
    """The table in pieces of about `rows` rows, in file order, without holding it whole: Parquet by row batches,
    CSV/TSV by byte ranges (types inferred on the first; MixedTypes if a later one disagrees), NPZ whole."""
    pa = _pyarrow()
    for f in shard_files(path_str):
        _check_file(f)
        fmt, compression = file_format(f)
        if fmt == "npz":
            yield _read_file(f)
        elif fmt == "arrow":
            yield from _ipc_pieces(f, rows)
        elif fmt == "jsonl" or compression is not None:
            yield from _streamed_pieces(f, fmt, compression)
        elif fmt == "parquet":
            try:
                # pre_buffer off: by default pyarrow buffers the whole file ahead (3.5 GB for a 3.5 GB file)
                parquet = pa.parquet.ParquetFile(f, pre_buffer=False, buffer_size=1 << 20)
                batches = parquet.iter_batches(batch_size=rows)
            except Exception as exc:
                raise DDPTrainError(f"data file {f} is not a readable Parquet file ({exc})") from None
            if parquet.metadata.num_rows == 0:
                raise DDPTrainError(f"data file {f} has a header but no data rows")
            for batch in batches:
                yield _from_arrow(pa.Table.from_batches([batch]), str(f), text=False)
        else:
            yield from _csv_pieces(f, rows)


def count_rows(path_str: str) -> tuple[int, bool] | None:
    """The dataset's rows, for progress: (n, True) from Parquet's metadata (no data read); (about n, False) for
    text, judged from each file's first megabyte (decompressed); None where neither works (Feather, NPZ, a file
    the reader will complain about)."""
    pa = _pyarrow()
    total, exact = 0, True
    try:
        for f in shard_files(path_str):
            fmt, compression = file_format(f)
            if fmt == "parquet":
                total += pa.parquet.ParquetFile(f).metadata.num_rows
            elif fmt in TEXT_FORMATS:
                total += max(0, _estimate_lines(f, compression) - (fmt != "jsonl"))  # less the header
                exact = False
            else:
                return None
    except Exception:  # noqa: BLE001 -- a damaged file: the reader will say so
        return None
    return total, exact


def _estimate_lines(path: Path, compression: str | None) -> int:
    """The file's lines: counted in its first megabyte (8 MB decompressed for a compressed file, whose reader takes
    the file in chunks: the share read is known to a chunk), scaled by the share of the file those took (exact
    when the sample is the whole file)."""
    pa = _pyarrow()
    size = path.stat().st_size
    with pa.OSFile(str(path)) as raw:
        stream = pa.CompressedInputStream(raw, compression) if compression else raw
        sample = stream.read(8 << 20 if compression else 1 << 20)
        consumed = raw.tell()
    lines = sample.count(b"\n") + (bool(sample) and not sample.endswith(b"\n"))
    return lines if consumed >= size or not sample else round(lines * size / max(consumed, 1))


def _csv_pieces(path: Path, rows: int) -> Iterator[Table]:
    """A CSV/TSV file in byte ranges of about `rows` rows, each cut at a line end outside quotes and parsed by
    pyarrow's multithreaded reader (its streaming reader is single-threaded, ~4x slower): the speed of a whole
    read, the memory of one piece. Types come from the first piece; a later piece that disagrees is MixedTypes."""
    pa = _pyarrow()
    delimiter = _delimiter(path)
    header = _header(path, delimiter)
    parse = pa.csv.ParseOptions(delimiter=delimiter)
    size = path.stat().st_size
    types: dict[str, object] = {}
    with path.open("rb") as handle:
        fd = handle.fileno()
        start = _header_end(fd, size)
        piece_bytes = _piece_bytes(fd, start, size, rows)
        while start < size:
            chunk = _next_piece(fd, start, size, piece_bytes)
            end = start + len(chunk)
            convert = _convert_options(types)
            try:
                arrow = pa.csv.read_csv(pa.BufferReader(chunk), parse_options=parse, convert_options=convert,
                                        read_options=pa.csv.ReadOptions(column_names=header, encoding="utf8"))
            except pa.ArrowInvalid as exc:
                if types and ("conversion error" in str(exc) or "In CSV column" in str(exc)):
                    raise MixedTypes(str(exc)) from None
                raise _parse_error(path, delimiter, len(header), exc) from None
            del chunk
            if not types:
                if arrow.num_rows == 0 and end >= size:
                    raise DDPTrainError(f"data file {path} has a header but no data rows")
                types = {f.name: f.type for f in arrow.schema if not pa.types.is_null(f.type)}
            start = end
            if arrow.num_rows:
                yield _from_arrow(arrow, str(path), text=True)
    if not types:  # nothing after the header (a header without a line end, or only blank lines)
        raise DDPTrainError(f"data file {path} has a header but no data rows")


STREAM_BLOCK_BYTES = 1 << 24  # pieces of a compressed or JSON-lines file: 16 MB of text each


def _streamed_pieces(path: Path, fmt: str, compression: str | None) -> Iterator[Table]:
    """A compressed CSV/TSV or a JSON-lines file through pyarrow's streaming reader, 16 MB of text a piece (a
    compressed file cannot be cut into byte ranges). Types come from the first piece; MixedTypes if a later one
    disagrees."""
    pa = _pyarrow()
    if fmt == "jsonl" and not hasattr(pa.json, "open_json"):  # pyarrow < 15: no streaming JSON reader
        yield _read_file(path)
        return
    stream = pa.input_stream(str(path), compression=compression)
    try:
        if fmt == "jsonl":
            reader = pa.json.open_json(stream, read_options=pa.json.ReadOptions(block_size=STREAM_BLOCK_BYTES))
        else:
            delimiter = _delimiter(path)
            header = _header(path, delimiter)
            reader = pa.csv.open_csv(stream, read_options=pa.csv.ReadOptions(
                column_names=header, skip_rows=1, encoding="utf8", block_size=STREAM_BLOCK_BYTES),
                parse_options=pa.csv.ParseOptions(delimiter=delimiter), convert_options=_convert_options())
        rows = 0
        for batch in _batches(reader):
            rows += batch.num_rows
            if batch.num_rows:
                yield _from_arrow(pa.Table.from_batches([batch]), str(path), text=fmt != "jsonl")
    except _LaterBlock as exc:
        raise MixedTypes(str(exc)) from None
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as exc:
        raise _read_error(path, fmt, exc) from None
    finally:
        stream.close()
    if rows == 0:
        raise DDPTrainError(f"data file {path} has a header but no data rows")


class _LaterBlock(Exception):
    """A streamed file's block after the first failed to convert with the first's types."""


def _batches(reader) -> Iterator[Any]:
    """The reader's record batches; an ArrowInvalid after the first is _LaterBlock (types that changed)."""
    first = True
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except Exception as exc:
            if first:
                raise
            raise _LaterBlock(str(exc)) from None
        first = False
        yield batch


def _ipc_pieces(path: Path, rows: int) -> Iterator[Table]:
    """A Feather (v2) / Arrow IPC file batch by batch, memory-mapped, each batch in slices of `rows` (pandas writes
    one batch for a whole table); a Feather v1 file is read whole."""
    pa = _pyarrow()
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
    except (pa.ArrowInvalid, OSError):
        yield _from_arrow(_arrow_columnar(path), str(path), text=False)
        return
    total = 0
    for i in range(reader.num_record_batches):
        batch = reader.get_batch(i)
        for start in range(0, batch.num_rows, rows):
            total += min(rows, batch.num_rows - start)
            yield _from_arrow(pa.Table.from_batches([batch.slice(start, rows)]), str(path), text=False)
    if total == 0:
        raise DDPTrainError(f"data file {path} has a header but no data rows")


def _piece_bytes(fd: int, start: int, size: int, rows: int) -> int:
    """Bytes of about `rows` lines, judged from the lines at the start of the data."""
    sample = os.pread(fd, 1 << 16, start)
    lines = max(1, sample.count(b"\n"))
    return max(256, rows * max(1, len(sample) // lines))


def _header_end(fd: int, size: int) -> int:
    """The offset just past the header line: its first line end outside quotes (blank lines before it skipped)."""
    start, odd, length = 0, 0, 1 << 16
    while start < size:
        chunk = os.pread(fd, length, start)
        at = 0
        while (cut := chunk.find(b"\n", at)) >= 0:
            odd ^= chunk.count(b'"', at, cut) & 1
            if not odd and chunk[:cut].strip(b"\r\n\xef\xbb\xbf \t"):
                return start + cut + 1
            at = cut + 1
        odd ^= chunk.count(b'"', at) & 1
        start += len(chunk)
    return size


def _next_piece(fd: int, start: int, size: int, length: int) -> bytes:
    """The bytes from `start` (outside quotes) to just past the last line end within `length` bytes that is
    outside quotes (an even number of '"' before it), reading further while there is none; the rest at the end."""
    while True:
        if start + length >= size:
            return os.pread(fd, size - start, start)
        chunk = os.pread(fd, length, start)
        cut = chunk.rfind(b"\n")
        odd = chunk.count(b'"', 0, max(cut, 0)) & 1
        while cut >= 0 and odd:
            before = chunk.rfind(b"\n", 0, cut)
            odd ^= chunk.count(b'"', max(before, 0), cut) & 1
            cut = before
        if cut >= 0:
            return chunk[:cut + 1] if cut + 1 < len(chunk) else chunk
        length *= 2  # a quoted field longer than the piece (or no line end yet): look further


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DDPTrainError(f"data file {path} does not exist; check the path")
    if not os.access(path, os.R_OK):
        raise DDPTrainError(f"data file {path} is not readable; check its permissions")
    if file_format(path)[0] is None:
        suffix = path.suffix.lower()
        if suffix in SPREADSHEETS:
            raise DDPTrainError(f"data file {path} is a spreadsheet; save the sheet as CSV (CSV UTF-8) and pass that")
        raise DDPTrainError(f"data file {path}: unknown format '{suffix}'; use {FORMAT_NAMES}")
    if path.stat().st_size == 0:
        raise DDPTrainError(f"data file {path} is empty; it needs a header row and data rows")


def _read_shards(spec: str, files: list[Path]) -> Table:
    """Several files of one table (same format, same columns in the same order), read alike and stacked."""
    formats = {file_format(f)[0] for f in files}
    if len(formats) != 1 or not formats <= set(SHARD_FORMATS):
        names = sorted({f.suffix.lower() for f in files})
        raise DDPTrainError(f"--data {spec}: the files mix formats ({', '.join(names)}); a dataset of several "
                            "files needs one format: .csv, .tsv, .parquet, .feather or .jsonl (each may be compressed)")
    pa = _pyarrow()
    arrows, shards, start = [], [], 0
    for f in files:
        _check_file(f)
        table = _arrow_table(f)
        if arrows and table.column_names != arrows[0].column_names:
            raise DDPTrainError(f"--data {spec}: {f} has columns {', '.join(table.column_names)} but {files[0]} has "
                                f"{', '.join(arrows[0].column_names)}; the files of one table need the same columns")
        arrows.append(table)
        shards.append((str(f), start))
        start += table.num_rows
    try:
        combined = pa.concat_tables(arrows, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DDPTrainError(f"--data {spec}: the files' column types do not agree ({str(exc).splitlines()[0]})") from None
    arrows.clear()  # `combined` alone holds the columns now, so converting releases them one by one
    result = _from_arrow(combined, spec, text=formats <= {"csv", "tsv"})
    result.shards = shards
    return result


def _delimiter(path: Path) -> str:
    return "\t" if file_format(path)[0] == "tsv" else ","


def _read_file(path: Path) -> Table:
    _check_file(path)
    fmt = file_format(path)[0]
    if fmt == "npz":
        return _read_npz(path)
    return _from_arrow(_arrow_table(path), str(path), text=fmt in ("csv", "tsv"))


def _arrow_table(path: Path):
    """The whole file as an Arrow table (any format but NPZ)."""
    fmt = file_format(path)[0]
    if fmt in ("parquet", "arrow"):
        return _arrow_columnar(path)
    if fmt == "jsonl":
        return _arrow_json(path)
    return _arrow_delimited(path, _delimiter(path))


def _open_text(path: Path, errors: str = "strict") -> io.TextIOBase:
    """The file as text, decompressed if its name says so (for the header and error line numbers)."""
    compression = file_format(path)[1]
    if compression is None:
        return path.open(newline="", encoding="utf-8-sig", errors=errors)
    pa = _pyarrow()
    return io.TextIOWrapper(io.BufferedReader(pa.input_stream(str(path), compression=compression)), newline="",
                            encoding="utf-8-sig", errors=errors)


def _read_error(path: Path, fmt: str | None, exc: BaseException) -> DDPTrainError:
    first = (str(exc).splitlines() or [type(exc).__name__])[0]
    if fmt == "jsonl":
        return DDPTrainError(f"data file {path} could not be read as JSON lines ({first}); each line must be one "
                             "JSON object")
    if isinstance(exc, UnicodeDecodeError) or "utf" in first.lower():
        return DDPTrainError(f"data file {path} is not readable as text ({first}); save it as UTF-8")
    if isinstance(exc, OSError) or "compress" in first.lower():
        return DDPTrainError(f"data file {path} could not be decompressed ({first}); check the file")
    return _parse_error(path, _delimiter(path), len(_header(path, _delimiter(path))), exc)


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.csv
        import pyarrow.feather
        import pyarrow.json
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DDPTrainError("reading tables needs pyarrow: pip install pyarrow") from None
    return pyarrow


def _arrow_delimited(path: Path, delimiter: str):
    pa = _pyarrow()
    header = _header(path, delimiter)
    read = pa.csv.ReadOptions(column_names=header, skip_rows=1, encoding="utf8")
    compression = file_format(path)[1]
    source = pa.input_stream(str(path), compression=compression) if compression else path
    try:
        table = pa.csv.read_csv(source, read_options=read, convert_options=_convert_options(),
                                parse_options=pa.csv.ParseOptions(delimiter=delimiter))
    except pa.ArrowInvalid as exc:
        raise _parse_error(path, delimiter, len(header), exc) from None
    except OSError as exc:  # a damaged compressed file
        raise _read_error(path, "csv", exc) from None
    if table.num_rows == 0:
        raise DDPTrainError(f"data file {path} has a header but no data rows")
    return table


def _convert_options(types: dict[str, object] | None = None):
    pa = _pyarrow()
    return pa.csv.ConvertOptions(
        column_types=types or None, null_values=list(NA_TOKENS), strings_can_be_null=True, true_values=["true", "True", "TRUE"],
        false_values=["false", "False", "FALSE"], timestamp_parsers=[pa.csv.ISO8601, "%Y/%m/%d"])


def _header(path: Path, delimiter: str) -> list[str]:
    try:
        with _open_text(path) as handle:
            header = next((row for row in csv.reader(handle, delimiter=delimiter) if row), None)
    except OSError as exc:
        if file_format(path)[1] is None:
            raise DDPTrainError(f"data file {path} could not be read ({exc.strerror or exc})") from None
        raise DDPTrainError(f"data file {path} could not be decompressed ({exc}); check the file") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DDPTrainError(f"data file {path} is not readable as text ({exc}); save it as UTF-8 CSV") from None
    if header is None:
        raise DDPTrainError(f"data file {path} is empty; it needs a header row and data rows")
    if len(header) == 1 and delimiter == "," and (";" in header[0] or "\t" in header[0]):
        other = "semicolons" if ";" in header[0] else "tabs"
        raise DDPTrainError(f"data file {path}: its header is one column '{header[0]}' holding {other}; ddptrain "
                            f"reads comma-separated .csv ({'save it with commas' if other == 'semicolons' else 'name it .tsv'})")
    names = [name.strip() for name in header]
    named = [n for n in names if n]
    if len(set(named)) != len(named) or names.count("") > 1 or (names and names[0] != "" and "" in names):
        raise DDPTrainError(f"data file {path}: the header needs distinct, non-empty column names (only a "
                            "pandas index column, first, may be unnamed)")
    return names


def _numbered_rows(path: Path, delimiter: str) -> list[tuple[int, list[str]]]:
    """Each data row (after the header) with its line in the file, blank lines skipped as the readers skip them.
    Only read when an error needs a line number."""
    with _open_text(path, errors="replace") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        return [(reader.line_num, row) for row in reader if row][1:]


def data_line_numbers(path: Path) -> list[int]:
    return [line for line, _ in _numbered_rows(path, _delimiter(path))]


def _parse_error(path: Path, delimiter: str, width: int, exc: Exception) -> DDPTrainError:
    for line, row in _numbered_rows(path, delimiter):
        if len(row) != width:
            return DDPTrainError(f"data file {path}: line {line} has {len(row)} fields but the header has {width}; "
                                 "fix that row")
    first = (str(exc).splitlines() or [""])[0]
    if "utf" in first.lower():
        return DDPTrainError(f"data file {path} is not readable as text ({first}); save it as UTF-8 CSV")
    return DDPTrainError(f"data file {path} could not be parsed ({first}); check its quoting and delimiters")


def _from_arrow(table, path: str, text: bool) -> Table:
    pa = _pyarrow()
    import pyarrow.compute as pc
    import pyarrow.types as pat

    names, columns, kinds, integer = [], [], [], set()
    for name in table.column_names:
        col = table.column(0)
        table = table.remove_column(0)  # each column's Arrow memory goes as it is converted: never two copies
        kind = col.type
        if pat.is_dictionary(kind):
            col, kind = col.cast(kind.value_type), kind.value_type
        if pat.is_boolean(kind):
            values, tag = np.array(col.to_pylist(), dtype=object), "bool"
        elif pat.is_float32(kind):  # kept at its width (float32 -> float64 is exact wherever it is computed on)
            values, tag = col.to_numpy(zero_copy_only=False).astype(np.float32), "number"
        elif pat.is_integer(kind) or pat.is_floating(kind) or pat.is_decimal(kind):
            values = col.cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
            tag = "number"
            if pat.is_integer(kind):
                integer.add(name)
        elif pat.is_timestamp(kind) or pat.is_date(kind):
            if pat.is_timestamp(kind) and kind.tz is not None:
                col = pc.cast(col, pa.timestamp(kind.unit))
            values, tag = col.cast(pa.timestamp("s")).to_numpy(zero_copy_only=False).astype("datetime64[s]"), "datetime"
        elif pat.is_string(kind) or pat.is_large_string(kind) or pat.is_null(kind):
            trimmed = pc.utf8_trim_whitespace(col.cast(pa.string()))  # in Arrow, not one Python call per cell
            trimmed = pc.if_else(pc.equal(trimmed, ""), pa.scalar(None, pa.string()), trimmed)
            values, tag = np.asarray(trimmed.to_numpy(zero_copy_only=False), dtype=object), "text"
        else:
            values = np.array([None if v is None else str(v) for v in col.to_pylist()], dtype=object)
            tag = "text"
        names.append(str(name))
        columns.append(values)
        kinds.append(tag)
        del col
    pa.default_memory_pool().release_unused()
    return Table(path, names, columns, kinds, text, integer)


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
    if np.issubdtype(y.dtype, np.number) or y.dtype == bool:
        return numeric_table(str(path), names, [x[:, j] for j in range(x.shape[1])] + [y.astype(np.float64)])
    table = numeric_table(str(path), names[:-1], [x[:, j] for j in range(x.shape[1])])
    table.names.append("y")
    table.columns.append(np.array([str(v) for v in y.tolist()], dtype=object))
    table.kinds.append("text")
    return table


def _arrow_columnar(path: Path):
    """A Parquet or Feather/Arrow file whole, in its own schema."""
    pa = _pyarrow()
    parquet = file_format(path)[0] == "parquet"
    try:
        table = pa.parquet.read_table(path) if parquet else pa.feather.read_table(str(path))
    except Exception as exc:
        raise DDPTrainError(f"data file {path} is not a readable {'Parquet' if parquet else 'Feather/Arrow'} file "
                            f"({exc})") from None
    if table.num_rows == 0:
        raise DDPTrainError(f"data file {path} has a header but no data rows")
    return table


def _arrow_json(path: Path):
    pa = _pyarrow()
    try:
        table = pa.json.read_json(pa.input_stream(str(path), compression=file_format(path)[1]))
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as exc:
        raise _read_error(path, "jsonl", exc) from None
    if table.num_rows == 0:
        raise DDPTrainError(f"data file {path} has no rows")
    return table
