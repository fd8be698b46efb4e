"""Checkpoint files: atomic writes, safe loads (`weights_only=True`, always), format and consistency checks, the
training `Position` they carry, retention.

A checkpoint is a dict of tensors and plain values only; see `FORMAT_NAME` / `FORMAT_VERSION`.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ddptrain import atomic
from ddptrain.errors import DDPTrainError
from ddptrain.model import ModelSpec, build_model

FORMAT_NAME = "ddptrain.checkpoint"
FORMAT_VERSION = 1
LAST = "last.pt"
BEST = "best.pt"
STEP_COPY = re.compile(r"^step-(\d+)\.pt$")


@dataclass
class Position:
    """Where training stands; saved in every checkpoint so a resume continues mid-epoch exactly."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    epoch_loss_sum: float = 0.0
    epoch_loss_steps: int = 0
    epoch_skipped_steps: int = 0  # optimizer steps of this epoch skipped for a non-finite gradient
    best: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    skipped_steps: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Position:
        ints = {f.name for f in fields(cls) if f.type == "int"}
        return cls(**{k: int(v) if k in ints else v for k, v in d.items()})


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """torch.save through a temporary file renamed over `path`: a crash leaves the old file or the new one."""
    try:
        with atomic.replacing(path, "wb") as handle:
            torch.save(state, handle)
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write (disk full) as RuntimeError
        reason = getattr(exc, "strerror", None) or "the write failed: disk full or a file-size limit?"
        raise DDPTrainError(f"could not write checkpoint {path} ({reason}); free space or pick another "
                            "--out; the previous checkpoint is intact") from None


copy_atomic = atomic.link_or_copy


def prune_step_copies(folder: Path, keep: int) -> None:
    copies = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_COPY.match(p.name)))
    for _, path in copies[: max(len(copies) - keep, 0)]:
        path.unlink(missing_ok=True)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a ddptrain checkpoint. Never unpickles code: weights_only=True is passed explicitly,
    which TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot override."""
    path = Path(path)
    if not path.exists():
        raise DDPTrainError(f"checkpoint {path} does not exist; check the path (runs/<name>/checkpoints/last.pt)")
    if path.is_dir():
        raise DDPTrainError(f"checkpoint {path} is a folder; pass a .pt file such as {path / 'checkpoints' / LAST}")
    if not zipfile.is_zipfile(path):  # torch.save's format (ddptrain writes no other) is a zip archive
        raise _unreadable(path, ValueError("not a zip archive"))
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # torch's safe unpickler raises this type for any object it will not build: code, or classes it
        # does not know. Nothing was executed.
        raise DDPTrainError(f"checkpoint {path} was refused: it holds pickled objects that torch's safe loader "
                            "(weights_only) does not accept, which could run code; only checkpoints of tensors "
                            "and plain values written by ddptrain fit load") from None
    except Exception as exc:  # torch raises many kinds for a torn or foreign file
        raise _unreadable(path, exc) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_NAME:
        raise DDPTrainError(f"{path} is a torch file but not a ddptrain checkpoint; pass one written by ddptrain fit")
    version = state.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise DDPTrainError(f"checkpoint {path}: its format_version {version!r} is not a positive integer; the "
                            "file was edited or damaged; use another checkpoint")
    if version > FORMAT_VERSION:
        raise DDPTrainError(f"checkpoint {path} has format version {version}, newer than this "
                            f"ddptrain reads ({FORMAT_VERSION}); upgrade ddptrain")
    check_contents(state, path)
    return state


def _unreadable(path: Path, exc: Exception) -> DDPTrainError:
    reason = (str(exc).splitlines() or [type(exc).__name__])[0][:100]
    return DDPTrainError(f"checkpoint {path} is not a readable torch checkpoint: truncated, damaged or another "
                         f"format ({reason}); use another checkpoint (a step-*.pt copy or best.pt)")


def find_resume_checkpoint(run_dir: Path) -> Path | None:
    last = run_dir / "checkpoints" / LAST
    return last if last.exists() else None


def check_contents(state: dict[str, Any], path: Path) -> None:
    """A checkpoint's parts must agree with each other before anything is built from them: the model spec with
    the tensors' shapes, the data spec with the model's inputs and outputs, the position with plain integers.
    An edited or foreign file fails here with one line naming the file and the inconsistency."""
    def bad(what: str) -> DDPTrainError:
        return DDPTrainError(f"checkpoint {path} is inconsistent: {what}; the file was edited or damaged; use "
                             "another checkpoint (a step-*.pt copy or best.pt)")

    for key, kind in (("model", dict), ("model_spec", dict), ("data_spec", dict), ("config", dict),
                      ("position", dict)):
        if not isinstance(state.get(key), kind):
            raise bad(f"its '{key}' entry is missing or not a {kind.__name__}")
    if not isinstance(state.get("metrics", {}), dict):
        raise bad("its 'metrics' entry is not a dict")
    from ddptrain.data import DataSpec

    try:
        model_spec = ModelSpec.from_dict(state["model_spec"])
        model_spec.check()
    except (TypeError, ValueError, KeyError) as exc:
        raise bad(f"model_spec: {exc}") from None
    try:
        data_spec = DataSpec.from_dict(state["data_spec"])
        data_spec.check()
    except (TypeError, ValueError, KeyError) as exc:
        raise bad(f"data_spec: {exc}") from None
    n_features = len(data_spec.feature_names)
    if model_spec.in_features != n_features:
        raise bad(f"the model takes {model_spec.in_features} inputs but the data spec names {n_features} features")
    if model_spec.out_features != data_spec.n_outputs:
        what = f"{len(data_spec.classes)} classes" if data_spec.task == "classification" else "a regression target"
        raise bad(f"the model has {model_spec.out_features} outputs but the data spec has {what}")
    expected = {name: tuple(t.shape) for name, t in build_model(model_spec).state_dict().items()}
    weights = state["model"]
    if set(weights) != set(expected):
        odd = sorted(set(weights) ^ set(expected))
        raise bad(f"its weights do not match the model spec (tensors {', '.join(odd[:4])})")
    for name, shape in expected.items():
        tensor = weights[name]
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise bad(f"tensor '{name}' has shape {got} but the model spec needs {shape}")
    known = {f.name: f.type for f in fields(Position)}
    for key, value in state["position"].items():
        if key not in known:
            raise bad(f"its position has an unknown entry '{key}'")
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if known[key] == "int" and not (number and value == int(value) and value >= (-1 if key == "best_epoch" else 0)):
            raise bad(f"position.{key} is {value!r}, not a non-negative integer")
        if known[key] != "int" and not (number or (value is None and key == "best")):
            raise bad(f"position.{key} is {value!r}, not a number")
