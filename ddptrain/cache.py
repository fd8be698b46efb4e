"""The prepared-table cache: a file's fitted preprocessing, applied once per machine and kept as memory-mappable
arrays, so a rerun (or another rank, or a resume) skips the work and every rank of a machine maps one copy.

Keyed by the data files' identity (path, size, modification time) and every setting that shapes the prepared
arrays. One process builds it under a file lock while the others wait; the folder appears by an atomic rename, so a
reader never sees half of it; anything stale or damaged is rebuilt, never trusted. Each entry lists its files'
identities, so a build removes the entries whose files have since changed or gone: their keys cannot come up again.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from ddptrain import __version__
from ddptrain.cachefolder import SOURCES, hold, prune_changed
from ddptrain.config import FitConfig
from ddptrain.data import STAGED, DataSpec, FitData, Split
from ddptrain.errors import DDPTrainError
from ddptrain.preprocess import ColumnRole
from ddptrain.tables import looks_like_path, shard_files

CACHE_FORMAT = 6  # raised whenever the prepared arrays or their roles change for the same file and settings (2: range
# caps; 3: numeric codes embedded; 5: roles say like_ids; 6: like_ids from 3 rows a value, text numbers too; 4 was an
# experiment's, never to be read as this one's)
ARRAYS = ("x_train", "y_train", "x_val", "y_val")
T = TypeVar("T")


def _file_identities(sources: list[str]) -> list[list[Any]] | None:
    """[path, size, mtime_ns] of every file of the sources; None if one is not a file (a built-in, or a path the
    reader will complain about)."""
    files = []
    try:
        for source in sources:
            if not looks_like_path(source):
                return None
            for f in shard_files(source):
                stat = f.stat()
                files.append([str(f.resolve()), stat.st_size, stat.st_mtime_ns])
    except (OSError, DDPTrainError):
        return None
    return files


def _digest(what: dict[str, Any]) -> str:
    blob = json.dumps({"format": CACHE_FORMAT, "ddptrain": __version__, **what}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _fit_entry(cfg: FitConfig) -> tuple[str, list[list[Any]]] | None:
    """(key, file identities); None for data that is not a file (built-ins are generated in a blink)."""
    files = _file_identities([cfg.data] + ([cfg.val_data] if cfg.val_data else []))
    if files is None:
        return None
    settings = {k: cfg.to_dict()[k] for k in ("target", "task", "val_fraction", "seed", "categorical", "numeric",
                                              "drop", "numbers_as_categories", "embedding_dim", "n_samples",
                                              "n_features", "n_classes", "noise")}
    settings["bagging_auto"] = cfg.bagging == "auto"  # decides whether a short table file holds rows out
    return _digest({"files": files, "settings": settings}), files


def cache_key(cfg: FitConfig) -> str | None:
    entry = _fit_entry(cfg)
    return None if entry is None else entry[0]


def cached_fit_data(cfg: FitConfig, build: Callable[[Path | None], FitData],
                    cache_dir: Path) -> tuple[FitData, str]:
    """The prepared data from the cache, building it first if needed: `build(workspace)` prepares the table with its
    number columns staged on disk and its matrices written into memory-mapped files in `workspace` (or all in
    memory, given None). Returns the data and what happened."""
    entry = _fit_entry(cfg)
    if entry is None:
        return build(None), ""  # a built-in dataset: drawn from its seed, nothing to cache
    data, how = _locked(cache_dir, entry, _load, lambda tmp: _save(build(tmp), tmp))
    return (data, how) if data is not None else (build(None), how)


def _locked(cache_dir: Path, entry: tuple[str, list[list[Any]]], load: Callable[[Path], T | None],
            fill: Callable[[Path], None]) -> tuple[T | None, str]:
    """`load(folder)` of the cache entry (key, file identities), first built by `fill(tmp)` and published by an
    atomic rename if it is missing, stale or damaged. One process builds it under a file lock (per machine, and per
    filesystem that honours flock) while the others wait. None, with the reason, where no cache can be kept (the
    caller then works without one). A build then removes the entries of files that changed since."""
    key, files = entry
    folder = cache_dir / key
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock = os.open(cache_dir / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return None, f"not cached ({cache_dir} is not writable)"
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for stale in cache_dir.glob(f"{key}.tmp-*"):  # a builder killed outright (SIGKILL, power): under the lock,
            shutil.rmtree(stale, ignore_errors=True)  # no one else is building this key, so its leftovers go
        found = load(folder)
        if found is not None:
            hold(cache_dir, key)  # before the build lock goes: `ddptrain cache --clear` must not take it from us
            return found, f"prepared table from the cache {folder}"
        tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            fill(tmp)
            (tmp / SOURCES).write_text(json.dumps(files))
            shutil.rmtree(folder, ignore_errors=True)  # a stale or damaged one
            os.rename(tmp, folder)
        except OSError as exc:  # no room or no permission: no cache is fine, the data fits in memory
            shutil.rmtree(tmp, ignore_errors=True)
            return None, f"not cached ({exc.strerror or exc})"
        except BaseException:  # Ctrl-C mid-build: leave no half-written folder behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        found, how = load(folder), f"prepared table cached in {folder}"
        if found is not None:
            hold(cache_dir, key)
    finally:
        os.close(lock)
    removed = prune_changed(cache_dir, keep=key)
    return found, how + (f" (removed {removed} older entr{'y' if removed == 1 else 'ies'} of files that have "
                         "changed since)" if removed else "")


# -- eval and predict: a file's rows through a checkpoint's preprocessing ---------------------------------------
@dataclasses.dataclass
class PreparedRows:
    """A file's feature matrix (all rows for predict; the rows with a target for eval), its targets (eval), and
    what `labelled_split` counted (rows, unscored, unseen values per column)."""

    x: np.ndarray
    y: np.ndarray | None
    tally: Counter[Any]


def _rows_entry(source: str, spec: DataSpec, purpose: str) -> tuple[str, list[list[Any]]] | None:
    files = _file_identities([source])
    return None if files is None else (_digest({"files": files, "spec": spec.to_dict(), "purpose": purpose}), files)


def cached_rows(source: str, spec: DataSpec, purpose: str, cache_dir: Path,
                fill: Callable[[Callable[[np.ndarray, np.ndarray | None], None], Callable[[], None]], Counter[Any]],
                ) -> tuple[PreparedRows | None, str]:
    """The prepared rows of `source` for `purpose` (eval or predict) from the cache, built first if needed:
    `fill(append, restart)` reads the file piece by piece, calling `append(x, y)` per piece (and `restart()` if it
    must start over from a whole read), and returns its tally."""
    entry = _rows_entry(source, spec, purpose)
    if entry is None:
        return None, "not cached (not a file)"
    width = spec.preprocessor.n_numeric + len(spec.preprocessor.embeddings)

    def build(tmp: Path) -> None:
        rows = 0
        y_dtype: str | None = None
        with open(tmp / "x.bin", "wb") as xs, open(tmp / "y.bin", "wb") as ys:
            def append(x: np.ndarray, y: np.ndarray | None) -> None:
                nonlocal rows, y_dtype
                xs.write(np.ascontiguousarray(x, dtype=np.float32).tobytes())
                if y is not None:
                    y_dtype = str(y.dtype)
                    ys.write(np.ascontiguousarray(y).tobytes())
                rows += len(x)

            def restart() -> None:  # a CSV whose types changed mid-file: the whole read starts over
                nonlocal rows
                rows = 0
                xs.seek(0), xs.truncate(), ys.seek(0), ys.truncate()

            tally = fill(append, restart)
        meta = {"format": CACHE_FORMAT, "purpose": purpose, "rows": rows, "width": width, "y_dtype": y_dtype,
                "tally": [[list(k) if isinstance(k, tuple) else k, n] for k, n in tally.items()]}
        (tmp / "meta.json").write_text(json.dumps(meta))

    def load(folder: Path) -> PreparedRows | None:
        if not folder.is_dir():
            return None
        try:
            meta = json.loads((folder / "meta.json").read_text())
            if meta.get("format") != CACHE_FORMAT or meta["width"] != width:
                raise ValueError("another cache format")
            rows = meta["rows"]
            x = np.memmap(folder / "x.bin", dtype=np.float32, mode="c", shape=(rows, width)) if rows else \
                np.zeros((0, width), dtype=np.float32)
            y = None
            if meta["y_dtype"] is not None:
                y = np.memmap(folder / "y.bin", dtype=meta["y_dtype"], mode="c", shape=(rows,)) if rows else \
                    np.zeros(0, dtype=meta["y_dtype"])
            tally = Counter({tuple(k) if isinstance(k, list) else k: n for k, n in meta["tally"]})
            return PreparedRows(x, y, tally)
        except (OSError, ValueError, KeyError, TypeError):  # damaged or foreign: rebuild it
            shutil.rmtree(folder, ignore_errors=True)
            return None

    return _locked(cache_dir, entry, load, build)


def _save(data: FitData, tmp: Path) -> None:
    """Complete `tmp` (the feature matrices are already there); `_locked` publishes it."""
    arrays = {"x_train": data.train.x, "y_train": data.train.y,
              "x_val": data.val.x if data.val is not None else None,
              "y_val": data.val.y if data.val is not None else None}
    for name, tensor in arrays.items():
        if tensor is not None and not (tmp / f"{name}.npy").exists():
            np.save(tmp / f"{name}.npy", tensor.numpy())
    meta = {"format": CACHE_FORMAT, "spec": data.spec.to_dict(), "notes": list(data.spec.notes),
            "roles": [dataclasses.asdict(r) for r in data.roles], "arrays": [k for k, v in arrays.items() if v is not None]}
    (tmp / "meta.json").write_text(json.dumps(meta))
    shutil.rmtree(tmp / STAGED, ignore_errors=True)  # the staged table's columns served the build only


def _load(folder: Path) -> FitData | None:
    """The cached data, memory-mapped; None (and the folder removed) when missing, stale or damaged."""
    if not folder.is_dir():
        return None
    try:
        meta: dict[str, Any] = json.loads((folder / "meta.json").read_text())
        if meta.get("format") != CACHE_FORMAT:
            raise ValueError("another cache format")
        spec = dataclasses.replace(DataSpec.from_dict(meta["spec"]), notes=tuple(meta["notes"]))
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="c") for name in meta["arrays"]}
        width = spec.preprocessor.n_numeric + len(spec.preprocessor.embeddings)
        for x, y in (("x_train", "y_train"), ("x_val", "y_val")):
            if x in arrays and (arrays[x].shape[1:] != (width,) or len(arrays[x]) != len(arrays[y])):
                raise ValueError(f"{x} has shape {arrays[x].shape}, not [rows, {width}]")
        train = Split(torch.from_numpy(arrays["x_train"]), torch.from_numpy(arrays["y_train"]))
        val = (Split(torch.from_numpy(arrays["x_val"]), torch.from_numpy(arrays["y_val"]))
               if "x_val" in arrays else None)
        roles = tuple(ColumnRole(**r) for r in meta["roles"])
        return FitData(spec, train, val, roles)
    except (OSError, ValueError, KeyError, TypeError):  # damaged or foreign: rebuild it
        shutil.rmtree(folder, ignore_errors=True)
        return None
