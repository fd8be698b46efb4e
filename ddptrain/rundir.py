"""The run folder: config.json, metrics.jsonl, checkpoints/. Rank 0 gets a `RunDir`; other ranks a
`SilentRunDir` whose writes do nothing, so no other rank can write by mistake."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any

from ddptrain.checkpoint import LAST
from ddptrain.errors import DDPTrainError


def default_out() -> Path:
    """Under a launcher, `runs/run-<rendezvous id>` (the same on every rank, node and elastic restart);
    otherwise a new timestamped folder."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if "RANK" in os.environ and run_id and run_id != "none":
        return Path("runs") / f"run-{run_id}"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = Path("runs") / stamp, 1
    while path.exists():
        path, n = Path("runs") / f"{stamp}-{n}", n + 1
    return path


def check_out_dir(out: Path, resuming: bool) -> None:
    """Read-only checks, before anything is created: an earlier run is never overwritten."""
    if out.exists() and not out.is_dir():
        raise DDPTrainError(f"--out {out} is a file; pass a folder path")
    if (out / "checkpoints" / LAST).exists() and not resuming:
        raise DDPTrainError(f"--out {out} already holds a run; continue it with --resume auto or pick a new --out")
    parent = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DDPTrainError(f"--out {out} is not writable (no write permission on {parent}); pick another --out")


class SilentRunDir:
    """What ranks other than 0 hold: same interface, no effect."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.checkpoints = path / "checkpoints"

    def write_config(self, config: dict[str, Any]) -> None: ...

    def append(self, row: dict[str, Any]) -> None: ...

    def rewind(self, step: int) -> None: ...

    def close(self) -> None: ...


def check_tensorboard() -> None:
    if importlib.util.find_spec("tensorboard") is None:
        raise DDPTrainError("--tensorboard needs the tensorboard package: pip install 'ddptrain[tensorboard]'")


class RunDir(SilentRunDir):
    def __init__(self, path: Path, tensorboard: bool = False) -> None:
        super().__init__(path)
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DDPTrainError(f"cannot create --out {path} ({exc.strerror}); pick another --out") from None
        self.metrics_path = path / "metrics.jsonl"
        self._metrics = None
        self._events = None
        self._tensorboard = tensorboard
        self._resumed_at: int | None = None

    def write_config(self, config: dict[str, Any]) -> None:
        tmp = self.path / ".config.json.tmp"
        tmp.write_text(json.dumps(config, indent=2) + "\n")
        os.replace(tmp, self.path / "config.json")

    def append(self, row: dict[str, Any]) -> None:
        if self._metrics is None:
            self._metrics = open(self.metrics_path, "a", buffering=1)  # line-buffered: tail -f works
        self._metrics.write(json.dumps(row) + "\n")
        if self._tensorboard and self._events is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides what an earlier, interrupted attempt logged after the resumed step
            purge = None if self._resumed_at is None else self._resumed_at + 1
            self._events = SummaryWriter(log_dir=str(self.path / "tensorboard"), purge_step=purge)
        if self._events is not None:  # the same scalars, tagged by row kind: step/train_loss, epoch/val_loss, ...
            for key, value in row.items():
                if key not in ("kind", "step", "epoch") and isinstance(value, (int, float)):
                    self._events.add_scalar(f"{row['kind']}/{key}", value, row["step"])

    def rewind(self, step: int) -> None:
        """On resume, drop rows written after the checkpoint's step, so the log has no duplicates."""
        self._resumed_at = step if step > 0 else None
        if not self.metrics_path.exists():
            return
        rows = [line for line in self.metrics_path.read_text().splitlines() if line.strip()]
        kept = [line for line in rows if _row_step(line) <= step]
        tmp = self.path / ".metrics.jsonl.tmp"
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.metrics_path)

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._events is not None:
            self._events.close()
            self._events = None


def _row_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62  # a torn last line (a kill mid-write) is dropped
