"""`eval`, `predict` and `inspect`: a checkpoint alone rebuilds the model and its data handling."""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ddptrain import atomic
from ddptrain.cache import PreparedRows, cached_rows
from ddptrain.checkpoint import describe, inference_model, load_checkpoint
from ddptrain.config import FitConfig
from ddptrain.console import console
from ddptrain.data import (
    DataSpec,
    Split,
    features,
    labelled_split,
    load_table,
    tally_notes,
    to_split,
)
from ddptrain.dist import all_reduce_sum, process_group
from ddptrain.errors import DDPTrainError, Interrupted, UsageError
from ddptrain.metrics import evaluation_sums, metrics_from_sums
from ddptrain.ondisk import read_with_progress
from ddptrain.optim import build_loss
from ddptrain.signals import sigterm_as_interrupt
from ddptrain.tables import MixedTypes, Table, label_text, looks_like_path

PREDICT_CHUNK = 65536  # rows of a piece when eval and predict read a file
T = TypeVar("T")


def _table_for(cfg: FitConfig, source: str, seed: int | None):
    """A file, or fresh rows of the built-in problem the model was trained on (seed + 1 by default, so they are not
    the training sample)."""
    return load_table(source, cfg.seed + 1 if seed is None else seed, cfg.n_samples, cfg.n_features,
                      cfg.n_classes, cfg.noise, problem_seed=cfg.seed)


def read_in_pieces(cfg: FitConfig, source: str, seed: int | None, consume: Callable[[Iterable[Table]], T],
                   restart: Callable[[], None] = lambda: None) -> T:
    """`consume(tables)` over the pieces of a file (a built-in dataset: one table); if a CSV's column types change
    after its first block, `restart()` and consume the file read whole."""
    def whole() -> Iterator[Table]:
        yield _table_for(cfg, source, seed)

    if not looks_like_path(source):
        return consume(whole())
    try:
        return consume(read_with_progress(source, PREDICT_CHUNK, stderr=True))
    except MixedTypes:
        restart()
        return consume(whole())


def prepared_rows(cfg: FitConfig, spec: DataSpec, source: str, purpose: str,
                  cache_dir: Path | None) -> PreparedRows | None:
    """A file's rows through the checkpoint's preprocessing, from the prepared-rows cache (built on first use, one
    process per machine, by reading the file in pieces); None without a cache (`cache_dir` None, a built-in
    dataset, or a folder that cannot be written): then the caller streams the file itself."""
    if cache_dir is None or not looks_like_path(source):
        return None

    def fill(append: Callable[[Any, Any], None], restart: Callable[[], None]) -> Counter[Any]:
        tally: Counter[Any] = Counter()

        def consume(tables: Iterable[Table]) -> Counter[Any]:
            for table in tables:
                if purpose == "eval":
                    split = labelled_split(spec, table, tally=tally)
                    append(split.x.numpy(), split.y.numpy())
                else:
                    x, noted = features(spec, table)
                    tally.update(noted)
                    append(x, None)
            return tally

        def again() -> None:
            tally.clear()
            restart()

        return read_in_pieces(cfg, source, None, consume, again)

    rows, _ = cached_rows(source, spec, purpose, cache_dir, fill)
    return rows


def evaluate_checkpoint(path: Path, source: str, seed: int | None, as_json: bool, device_name: str,
                        cache_dir: Path | None = None) -> dict[str, Any]:
    """Metrics of a checkpoint on labelled rows. A file's prepared rows come from the cache (`cache_dir`; built on
    first use) or, without one, the file is read in pieces, each rank scoring its share of every piece; the sums
    are all-reduced once at the end."""
    state = load_checkpoint(path)
    with process_group(device_name, "auto", None) as dist:
        model, spec, cfg = inference_model(state, dist.device, path)
        loss_fn = build_loss(cfg, spec.task)

        def score(tables: Iterable[Table]) -> tuple[torch.Tensor | None, Counter[Any]]:
            sums, tally = None, Counter()
            for table in tables:
                split = labelled_split(spec, table, tally=tally)
                if len(split):
                    part = evaluation_sums(model, split, spec, loss_fn, dist.rank, dist.world_size, reduce=False)
                    sums = part if sums is None else sums + part
            return sums, tally

        cached = prepared_rows(cfg, spec, source, "eval", cache_dir) if seed is None else None
        if cached is not None:
            split = Split(torch.from_numpy(cached.x), torch.from_numpy(cached.y))
            sums = evaluation_sums(model, split, spec, loss_fn, dist.rank, dist.world_size, reduce=False) \
                if len(split) else None
            tally = cached.tally
        else:
            sums, tally = read_in_pieces(cfg, source, seed, score)
        if sums is None:
            raise DDPTrainError(f"{source}: the target '{spec.target_name}' is empty in every row")
        if dist.world_size > 1:
            all_reduce_sum(sums)
    for note in tally_notes(spec, tally):
        console.note(note)
    metrics = metrics_from_sums(sums, spec)
    if as_json:
        console.line(json.dumps(metrics), force=True)
    else:
        print_metrics(metrics, spec, path, source)
    return metrics


def print_metrics(metrics: dict[str, Any], spec: DataSpec, path: Path, source: str) -> None:
    keys = ["log_loss", "accuracy", "balanced_accuracy", "f1", "roc_auc"] if spec.task == "classification" \
        else ["loss", "mse", "rmse", "mae", "r2"]
    rows = [("rows", f"{metrics['rows']:,}")] + [(key, f"{metrics[key]:.4f}") for key in keys
                                                 if metrics[key] is not None]
    console.table(f"ddptrain eval: {path} on {source}", rows, force=True)
    if spec.task != "classification":
        console.line(f"(mse, rmse, mae in the units of '{spec.target_name}'; loss in standardized units)", force=True)
        return
    from rich.table import Table

    per_class = Table(title="per class", title_justify="left")
    for column in ("class", "precision", "recall", "f1", "support"):
        per_class.add_column(column)
    for label, row in metrics["per_class"].items():
        per_class.add_row(label, f"{row['precision']:.4f}", f"{row['recall']:.4f}", f"{row['f1']:.4f}", str(row["support"]))
    console.print(per_class, force=True)
    confusion = Table(title="confusion (rows: true, columns: predicted)", title_justify="left")
    confusion.add_column("")
    for label in spec.classes:
        confusion.add_column(label)
    for label, counts in zip(spec.classes, metrics["confusion"]):
        confusion.add_row(label, *map(str, counts))
    console.print(confusion, force=True)


@torch.no_grad()
def predict_rows(model: nn.Module, split: Split, spec: DataSpec) -> torch.Tensor:
    outs = [model(split.x[i:i + PREDICT_CHUNK]).float() for i in range(0, len(split), PREDICT_CHUNK)]
    out = torch.cat(outs)
    if spec.task == "classification":
        return F.softmax(out, dim=1)
    return spec.in_target_units(out.squeeze(1))


def predict_to_csv(path: Path, source: str, out: Path, keep: tuple[str, ...] | str, overwrite: bool,
                   cache_dir: Path | None = None) -> None:
    """Predictions for every row of `source`, after the input columns named in `keep` (or "all" of them): from
    the prepared-rows cache (`cache_dir`, built on first use; not when keeping columns, which needs the file's own
    cells), or written as they are made, piece by piece."""
    atomic.check_new_file(out, overwrite, {"checkpoint": path, "--data file": Path(source)})
    state = load_checkpoint(path)
    model, spec, cfg = inference_model(state, torch.device("cpu"), path)
    if keep != "all":
        check_kept_names(spec, keep)

    tally: Counter[Any] = Counter()
    try:
        cached = prepared_rows(cfg, spec, source, "predict", None if keep else cache_dir)
        with sigterm_as_interrupt(), atomic.replacing(out, "w", newline="") as handle:
            def restart() -> None:  # the pieces so far are written again from the whole read
                handle.seek(0)
                handle.truncate()
                tally.clear()

            if cached is not None:
                tally.update({key: n for key, n in cached.tally.items() if isinstance(key, tuple)})
                rows = write_prediction_rows(handle, model, spec, cached.x)
            else:
                rows = read_in_pieces(cfg, source, None,
                                      lambda tables: write_predictions(handle, tables, model, spec, keep, tally),
                                      restart)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; --out {out} was not written (the partial file was removed)") from None
    except OSError as exc:
        raise DDPTrainError(f"could not write --out {out} ({exc.strerror}); free space or pick another path; "
                            "the partial file was removed") from None
    for note in tally_notes(spec, tally):
        console.note(note)
    console.line(f"wrote {rows:,} predictions to {out}", force=True)


def write_prediction_rows(handle: Any, model: nn.Module, spec: DataSpec, x: Any) -> int:
    """Header and one row per row of a prepared matrix, a chunk at a time."""
    writer = write_header(handle, spec, ())
    for start in range(0, len(x), PREDICT_CHUNK):
        result = predict_rows(model, to_split(spec, x[start:start + PREDICT_CHUNK], None), spec).tolist()
        write_result_rows(writer, spec, [[]] * len(result), result)
    return len(x)


def output_names(spec: DataSpec) -> list[str]:
    """The columns predict writes after the kept ones."""
    return ["prediction"] + ([f"prob_{label}" for label in spec.classes] if spec.task == "classification" else [])


def check_kept_names(spec: DataSpec, keep: tuple[str, ...]) -> None:
    """Kept columns must not share a name with predict's own columns (nor be named twice): a reader of the file
    could not tell them apart."""
    clash = [name for name in keep if name in output_names(spec)]
    if clash:
        raise UsageError(f"--keep: the input column '{clash[0]}' would share its name with predict's own "
                         f"'{clash[0]}' column; rename it in the file, or keep other columns")
    twice = sorted({name for name in keep if keep.count(name) > 1})
    if twice:
        raise UsageError(f"--keep names '{twice[0]}' twice; name each column once")


def write_header(handle: Any, spec: DataSpec, kept: list[str]) -> Any:
    writer = csv.writer(handle)
    writer.writerow(list(kept) + output_names(spec))
    return writer


def kept_cells(table: Table, name: str) -> list[str]:
    """A column's cells as text, as the file had them: whole numbers without '.0', dates in ISO form (no time
    where there is none), missing cells empty."""
    kind, gone = table.kind(name), table.missing(name)
    if kind == "datetime":
        return ["" if g else t for t, g in zip(np.datetime_as_string(table.column(name), unit="auto").tolist(), gone)]
    return ["" if g else label_text(value) for value, g in zip(table.column(name).tolist(), gone)]


def write_result_rows(writer: Any, spec: DataSpec, lead: list[list[str]], result: list[Any]) -> None:
    for first, row in zip(lead, result):
        if spec.task == "classification":
            best = max(range(len(row)), key=row.__getitem__)
            writer.writerow(first + [spec.classes[best]] + [f"{p:.6f}" for p in row])
        else:
            writer.writerow(first + [f"{row:.6g}"])


def write_predictions(handle: Any, tables: Iterable[Table], model: nn.Module, spec: DataSpec,
                      keep: tuple[str, ...] | str, tally: Counter[Any]) -> int:
    """Header, then one row per input row (the kept input columns first), piece by piece; counts what is worth a
    note (unseen values, ignored columns) into `tally`. Returns the rows."""
    writer = None
    rows = 0
    for table in tables:
        kept = list(table.names) if keep == "all" else list(keep)
        if writer is None:
            if keep == "all":
                check_kept_names(spec, tuple(kept))
            writer = write_header(handle, spec, kept)
        unknown = [name for name in kept if name not in table.names]
        if unknown:
            raise table.unknown_columns("--keep", unknown)
        x, noted = features(spec, table, tuple(kept))
        tally.update(noted)
        result = predict_rows(model, to_split(spec, x, None), spec).tolist()
        lead = [list(cells) for cells in zip(*(kept_cells(table, name) for name in kept))] if kept else [[]] * len(result)
        write_result_rows(writer, spec, lead, result)
        rows += len(result)
    if writer is None:  # no rows at all: the header alone
        write_header(handle, spec, [] if keep == "all" else list(keep))
    return rows


def inspect_checkpoint(path: Path, as_json: bool) -> dict[str, Any]:
    info = describe(load_checkpoint(path))
    if as_json:
        console.line(json.dumps(info), force=True)
        return info
    rows = []
    for key, value in info.items():
        if isinstance(value, list):
            value = ", ".join(map(str, value)) if value else "-"
        elif isinstance(value, dict):
            value = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items()) or "-"
        rows.append((key, str(value)))
    console.table(f"ddptrain inspect: {path}", rows, force=True)
    return info
