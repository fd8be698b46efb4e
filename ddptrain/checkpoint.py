"""Checkpoint files: atomic writes, safe loads (`weights_only=True`, always), format checks, retention.

A checkpoint is a dict of tensors and plain values only; see `FORMAT_NAME` / `FORMAT_VERSION`.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from ddptrain.errors import DDPTrainError

FORMAT_NAME = "ddptrain.checkpoint"
FORMAT_VERSION = 1
LAST = "last.pt"
BEST = "best.pt"
STEP_COPY = re.compile(r"^step-(\d+)\.pt$")


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same folder, fsync it, rename it over `path`, fsync the folder.

    A crash at any instant leaves either the old file or the new one, never a torn one.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write (disk full) as RuntimeError
        tmp.unlink(missing_ok=True)
        reason = getattr(exc, "strerror", None) or "the write failed: disk full or a file-size limit?"
        raise DDPTrainError(f"could not write checkpoint {path} ({reason}); free space or pick another "
                            "--out; the previous checkpoint is intact") from None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_atomic(src: Path, dst: Path) -> None:
    """`dst` becomes a second name for `src`'s current contents (a hard link where the filesystem allows)."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        tmp.write_bytes(src.read_bytes())
    os.replace(tmp, dst)


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
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc):
            raise DDPTrainError(f"checkpoint {path} holds pickled objects that could run code; refused without "
                                "loading it (only ddptrain checkpoints of tensors and plain values load)") from None
        raise _unreadable(path, exc) from None
    except Exception as exc:  # torch raises many kinds for a torn or foreign file
        raise _unreadable(path, exc) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_NAME:
        raise DDPTrainError(f"{path} is a torch file but not a ddptrain checkpoint; pass one written by ddptrain fit")
    if int(state.get("format_version", 0)) > FORMAT_VERSION:
        raise DDPTrainError(f"checkpoint {path} has format version {state['format_version']}, newer than this "
                            f"ddptrain reads ({FORMAT_VERSION}); upgrade ddptrain")
    return state


def _unreadable(path: Path, exc: Exception) -> DDPTrainError:
    reason = (str(exc).splitlines() or [type(exc).__name__])[0][:100]
    return DDPTrainError(f"checkpoint {path} is not a readable torch checkpoint: truncated, damaged or another "
                         f"format ({reason}); use another checkpoint (a step-*.pt copy or best.pt)")


def find_resume_checkpoint(run_dir: Path) -> Path | None:
    last = run_dir / "checkpoints" / LAST
    return last if last.exists() else None
