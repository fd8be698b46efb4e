"""The checkpoint, in one place: what it holds (built from the training parts), how it is written (atomically,
with step copies and best.pt), loaded (`weights_only=True`, always) and checked for consistency, restored into a
run, rebuilt into a model for eval/predict, and described for `inspect`. No other module names its keys.

A checkpoint is a dict of tensors and plain values only; see `FORMAT_NAME` / `FORMAT_VERSION`.
"""

from __future__ import annotations

import pickle
import random
import re
import warnings
import zipfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ddptrain import __version__, atomic
from ddptrain.config import BEFORE_IT_EXISTED, RESUME_FIXED, FitConfig
from ddptrain.console import console
from ddptrain.data import DataSpec
from ddptrain.errors import DDPTrainError, UsageError
from ddptrain.model import Ensemble, ModelSpec, build_model, parameter_count
from ddptrain.rundir import BEST, LAST
from ddptrain.optim import (
    build_scheduler,
    load_optimizer,
    plain_rates,
    planned_over_epochs,
    saved_optimizer,
    set_rate,
)

if TYPE_CHECKING:
    from torch import nn

    from ddptrain.parts import Parts

FORMAT_NAME = "ddptrain.checkpoint"
FORMAT_VERSION = 2  # 2: the data spec holds the fitted preprocessor (1: numeric features only; still read)
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
    # bagging: each member's best held-out loss (NaN: none yet), its epoch, and its epochs since
    member_best: list[float] = field(default_factory=list)
    member_best_epoch: list[int] = field(default_factory=list)
    member_bad_epochs: list[int] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Position:
        ints = {f.name for f in fields(cls) if f.type == "int"}
        int_lists = {f.name for f in fields(cls) if f.type == "list[int]"}
        return cls(**{k: int(v) if k in ints else [int(i) for i in v] if k in int_lists else v for k, v in d.items()})


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


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and check a ddptrain checkpoint. Never unpickles code: weights_only=True is passed explicitly,
    which TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot override."""
    path = Path(path)
    if not path.exists():
        raise DDPTrainError(f"checkpoint {path} does not exist; check the path (runs/<name>/checkpoints/last.pt)")
    if path.is_dir():
        inside = next((p for p in (path / LAST, path / "checkpoints" / LAST) if p.exists()),
                      path / "checkpoints" / LAST)
        raise DDPTrainError(f"checkpoint {path} is a folder; pass a .pt file such as {inside}")
    if not zipfile.is_zipfile(path):  # torch.save's format (ddptrain writes no other) is a zip archive
        raise _unreadable(path, ValueError("not a zip archive"))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
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
    pre = data_spec.preprocessor
    if model_spec.in_features != pre.n_numeric:
        raise bad(f"the model takes {model_spec.in_features} inputs but the data spec makes {pre.n_numeric} numeric "
                  "features")
    if model_spec.embeddings != pre.embeddings:
        raise bad(f"the model embeds {len(model_spec.embeddings)} categorical inputs {list(model_spec.embeddings)} "
                  f"but the data spec has {list(pre.embeddings)}")
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
        if known[key].startswith("list"):
            members = model_spec.members if value else 0
            whole = known[key] == "list[int]"
            if not (isinstance(value, list) and len(value) == members and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and (not whole or v == int(v) and v >= -1)
                    for v in value)):
                raise bad(f"position.{key} is {value!r}, not {members or 'no'} numbers (one per member)")
            continue
        if known[key] == "int" and not (number and value == int(value) and value >= (-1 if key == "best_epoch" else 0)):
            raise bad(f"position.{key} is {value!r}, not a non-negative integer")
        if known[key] != "int" and not (number or (value is None and key == "best")):
            raise bad(f"position.{key} is {value!r}, not a number")


# -- writing ---------------------------------------------------------------------------------------------------
def build_state(parts: Parts, position: Position, rng: list[dict[str, Any]], metrics: dict[str, Any]) -> dict[str, Any]:
    """Everything a resume, eval, predict or inspect needs: tensors and plain values only."""
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "model": parts.model.state_dict(), "model_spec": parts.model_spec.to_dict(),
        "data_spec": parts.data.spec.to_dict(), "optimizer": saved_optimizer(parts.optimizer),
        "scheduler": plain_rates(parts.scheduler.state_dict()) if parts.scheduler is not None else None,
        "scaler": parts.scaler.state_dict() if parts.scaler else None,
        "position": asdict(position), "rng": rng, "config": parts.cfg.to_dict(),
        "world_size": parts.dist.world_size, "torch_version": str(torch.__version__), "ddptrain_version": __version__,
        "metrics": metrics,
    }


def write(parts: Parts, position: Position, rng: list[dict[str, Any]], metrics: dict[str, Any],
          improved: bool) -> None:
    """Rank 0: last.pt, then a step-stamped copy (--keep-last) and best.pt as second names of the same file."""
    folder = parts.run.checkpoints
    last = folder / LAST
    save_atomic(build_state(parts, position, rng, metrics), last)
    if parts.cfg.keep_last:
        copy_atomic(last, folder / f"step-{position.global_step:08d}.pt")
        prune_step_copies(folder, parts.cfg.keep_last)
    if improved:
        copy_atomic(last, folder / BEST)


def rng_state(device: torch.device) -> dict[str, Any]:
    """This rank's random streams (Python, torch CPU, CUDA): each rank saves its own."""
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def replan_schedule(parts: Parts, steps_done: int) -> None:
    """A new scheduler planned over this run's --epochs, brought to `steps_done` as if the run had been planned
    this long from its start (torch's schedulers are stepwise: built from the base rate, then stepped)."""
    for group in parts.optimizer.param_groups:
        set_rate(group, group.get("initial_lr", parts.cfg.lr))
    total = len(parts.data.train) // parts.cfg.batch_size * parts.cfg.epochs
    with warnings.catch_warnings():  # torch warns of a scheduler stepped before its optimizer: here on purpose
        warnings.simplefilter("ignore")
        parts.scheduler = build_scheduler(parts.optimizer, parts.cfg, total)
        for _ in range(steps_done):
            parts.scheduler.step()


# -- resuming --------------------------------------------------------------------------------------------------
def check_resumable(cfg: FitConfig, state: dict[str, Any], path: Path) -> None:
    """A resume continues the same experiment: the settings that define it must match the checkpoint's."""
    saved = {**BEFORE_IT_EXISTED, **state.get("config", {})}
    now = cfg.to_dict()
    differing = [f"{key} (checkpoint {saved.get(key)!r}, now {now[key]!r})"
                 for key in RESUME_FIXED if key in saved and saved[key] != now[key]]
    if differing:
        raise UsageError(f"cannot resume {path}: these settings differ from the checkpoint's: {'; '.join(differing)}; "
                         "use the original values or start a new --out")


def restore(parts: Parts, state: dict[str, Any], path: Path) -> Position:
    """The checkpoint's training state into the built parts; a part that does not fit names itself."""
    dist = parts.dist
    part = "weights"
    try:
        parts.model.load_state_dict(state["model"])
        part = "optimizer state"
        load_optimizer(parts.optimizer, state["optimizer"], parts.graphs)
        part = "scheduler state"
        saved_epochs = state.get("config", {}).get("epochs", parts.cfg.epochs)
        replan = planned_over_epochs(parts.cfg) and saved_epochs != parts.cfg.epochs
        if parts.scheduler is not None and state.get("scheduler") and not replan:
            parts.scheduler.load_state_dict(state["scheduler"])
        part = "GradScaler state"
        if parts.scaler is not None and state.get("scaler"):
            parts.scaler.load_state_dict(state["scaler"])
        part = "position"
        position = Position.from_dict(state["position"])
        part = "world size"
        saved_world = int(state.get("world_size", dist.world_size))
        part = "random-number state"
        if saved_world == dist.world_size:
            set_rng_state(state["rng"][dist.rank], dist.device)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
        raise DDPTrainError(f"cannot resume {path}: its {part} does not fit this run ({reason}); the file was edited "
                            "or damaged; use another checkpoint") from None
    if replan and parts.scheduler is not None:
        before = float(parts.optimizer.param_groups[0]["lr"])
        replan_schedule(parts, position.global_step)
        console.note(f"--epochs {parts.cfg.epochs} (the checkpoint's run planned {saved_epochs}): the {parts.cfg.scheduler} "
                     f"rate is laid out again over {parts.cfg.epochs} epochs; at step {position.global_step} it goes "
                     f"from {before:.3g} to {float(parts.optimizer.param_groups[0]['lr']):.3g}")
    if saved_world != dist.world_size:
        console.line(f"resuming a world-size-{saved_world} checkpoint at world size {dist.world_size}: same global "
                     f"batch and data order; dropout random streams are reseeded")
        torch.manual_seed(parts.cfg.seed + 1 + dist.rank + position.global_step)
    console.line(f"resumed from {path} at epoch {position.epoch + 1}, step {position.global_step}")
    return position


# -- reading for eval, predict, inspect ------------------------------------------------------------------------
def inference_model(state: dict[str, Any], device: torch.device,
                    path: Path | None = None) -> tuple[nn.Module, DataSpec, FitConfig]:
    """The model (eval mode, on `device`), data spec and training config of a checked checkpoint."""
    spec = DataSpec.from_dict(state["data_spec"])
    model = build_model(ModelSpec.from_dict(state["model_spec"]))
    model.load_state_dict(state["model"])
    if isinstance(model, Ensemble):
        model.use_best()  # every member at its best epoch
    cfg_values = {k: tuple(v) if isinstance(v, list) else v for k, v in state["config"].items()
                  if k in FitConfig.__dataclass_fields__}
    try:
        cfg = FitConfig(**cfg_values)
    except UsageError as exc:
        raise DDPTrainError(f"checkpoint {path or ''} is inconsistent: its training config is invalid ({exc}); the "
                            "file was edited or damaged; use another checkpoint") from None
    return model.to(device).eval(), spec, cfg


def saved_specs(state: dict[str, Any]) -> dict[str, Any]:
    """The model spec and data spec of a checked checkpoint as plain values (what an export's metadata carries
    so that another framework can rebuild the model and its inputs)."""
    return {"model_spec": state["model_spec"], "data_spec": state["data_spec"]}


def describe(state: dict[str, Any]) -> dict[str, Any]:
    """What `inspect` shows: architecture, parameters, data spec, position, metrics, versions."""
    model_spec = ModelSpec.from_dict(state["model_spec"])
    spec = DataSpec.from_dict(state["data_spec"])
    position = state.get("position", {})
    return {
        "format": f"{state['format']} v{state['format_version']}",
        "architecture": f"MLP {model_spec.widths()}, {model_spec.activation}, norm {model_spec.norm}, dropout "
                        f"{model_spec.dropout}",
        "parameters": parameter_count(build_model(model_spec)),
        "task": spec.task, "target": spec.target_name, "features": list(spec.feature_names),
        "columns": [f"{c.name} ({c.role}" + (f", {len(c.levels):,} levels, embedding {c.embedding_dim}" if c.levels or
                                               c.role == "categorical" else "") + (", missing indicator" if c.indicator
                                                                                   else "") + ")"
                    for c in spec.preprocessor.columns],
        "dropped": [name or "(unnamed)" for name in spec.preprocessor.dropped],
        "classes": list(spec.classes), "epochs_done": position.get("epoch"), "step": position.get("global_step"),
        "step_in_epoch": position.get("step_in_epoch"), "world_size": state.get("world_size"),
        "metrics": state.get("metrics", {}), "torch_version": state.get("torch_version"),
        "ddptrain_version": state.get("ddptrain_version"),
    }
