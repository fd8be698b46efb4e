"""Arrays kept on disk and memory-mapped, so that preparing a table larger than memory works: the OS pages them in
and out, and only a few columns' worth of anonymous memory is in use at a time.

- `allocate_in(folder)`: float32 matrices as .npy files (the cache's prepared matrices), space reserved up front.
- `stage_table(source, folder)`: a table read in pieces, its number and date columns appended to files and mapped
  back, its text and boolean columns in memory; the same `Table` that `read_table` gives, without holding the
  numbers in memory.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import numpy as np

from ddptrain.console import RowProgress
from ddptrain.tables import (
    MixedTypes,
    Table,
    count_rows,
    read_pieces,
    read_table,
    shard_files,
)

Allocate = Callable[[str, tuple[int, int]], np.ndarray]  # (name, shape) -> a float32 array to fill
STAGE_PIECE_ROWS = 65536
MAPPED_KINDS = ("number", "datetime")


def allocate_in(folder: Path) -> Allocate:
    """Allocate float32 arrays as .npy files in `folder`, their space reserved up front (a full disk is an OSError
    here, not a SIGBUS when a mapped page is first written)."""
    def allocate(name: str, shape: tuple[int, int]) -> np.ndarray:
        path = folder / f"{name}.npy"
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, path.stat().st_size)
        finally:
            os.close(fd)
        return array

    return allocate


class _Disagree(Exception):
    """The pieces (or files) do not share one schema: read the table whole, which says what is wrong."""


def stage_table(source: str, folder: Path) -> Table:
    """`read_table(source)`, with the number and date columns on disk in `folder` (memory-mapped, read-only)."""
    try:
        return _stage(source, folder)
    except (MixedTypes, _Disagree):
        shutil.rmtree(folder, ignore_errors=True)
        return read_table(source)


def read_with_progress(source: str, rows: int, stderr: bool = False) -> Iterator[Table]:
    """`read_pieces`, showing rows read, rows/s and time left on rank 0 (Parquet's total from its metadata, a text
    file's estimated), and a summary line once the file is read. `stderr`: for a command whose output is its
    result (`eval --json`)."""
    total, exact = count_rows(source) or (None, True)
    progress = RowProgress(f"reading {source}", total, approximate=not exact, stderr=stderr)
    done = False
    try:
        for piece in read_pieces(source, rows):
            progress.advance(len(piece))
            yield piece
        done = True
    finally:
        progress.close(summary=done)


def _stage(source: str, folder: Path) -> Table:
    folder.mkdir(parents=True, exist_ok=True)
    first: Table | None = None
    files: dict[int, IO[bytes]] = {}
    in_memory: dict[int, list[np.ndarray]] = {}
    shards: list[tuple[str, int]] = []
    integer: set[str] = set()
    rows = 0
    pieces = read_with_progress(source, STAGE_PIECE_ROWS)
    try:
        for piece in pieces:
            if first is None:
                first, integer = piece, set(piece.integer)
                for j, kind in enumerate(piece.kinds):
                    if kind in MAPPED_KINDS:
                        files[j] = open(folder / f"column-{j}.bin", "wb")  # noqa: SIM115 (closed below)
                    else:
                        in_memory[j] = []
            elif piece.names != first.names or piece.kinds != first.kinds or any(
                    a.dtype != b.dtype for a, b in zip(piece.columns, first.columns) if a.dtype != object):
                raise _Disagree
            if not shards or shards[-1][0] != piece.path:
                shards.append((piece.path, rows))
            integer &= piece.integer
            for j, col in enumerate(piece.columns):
                if j in files:
                    files[j].write(np.ascontiguousarray(col).tobytes())
                else:
                    in_memory[j].append(col)
            rows += len(piece)
    finally:
        pieces.close()  # a failed read stops its progress at once, without the summary line
        for handle in files.values():
            handle.close()
    if first is None:
        raise _Disagree
    columns = [np.memmap(folder / f"column-{j}.bin", dtype=col.dtype, mode="r", shape=(rows,)) if j in files
               else np.concatenate(in_memory.pop(j)) for j, col in enumerate(first.columns)]
    single = len(shard_files(source)) == 1 and not Path(source).is_dir()
    return Table(first.path if single else source, first.names, columns, first.kinds, first.text, integer,
                 [] if single else shards)
