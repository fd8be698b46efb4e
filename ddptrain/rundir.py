"""The run folder: its rules (whose folder it is, who may write it: marker and lock), config.json, metrics.jsonl,
checkpoints/. Rank 0 gets a `RunDir`; other ranks a `SilentRunDir` whose writes do nothing, so no other rank can
write by mistake."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from ddptrain import __version__, atomic
from ddptrain.errors import DDPTrainError, UsageError
from ddptrain.launchenv import LaunchEnv

LAST = "last.pt"  # checkpoints/: the newest state, which --resume continues from
BEST = "best.pt"  # checkpoints/: the epoch with the best --monitor


def default_out(env: LaunchEnv) -> Path:
    """Under a launcher, `runs/run-<rendezvous id>` (the same on every rank, node and elastic restart);
    otherwise a new timestamped folder."""
    if env.launched and env.run_id:
        return Path("runs") / f"run-{env.run_id}"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = Path("runs") / stamp, 1
    while path.exists():
        path, n = Path("runs") / f"{stamp}-{n}", n + 1
    return path


MARKER = "ddptrain-run.json"  # written first: this folder is a ddptrain run
LOCK = ".ddptrain.lock"  # an OS lock on it is held by the job that writes the folder
OWN_FILES = {MARKER, LOCK}


def is_run_folder(out: Path) -> bool:
    """A ddptrain run: its marker, or (a run written before markers existed) a config.json of fit settings beside
    checkpoints/."""
    if (out / MARKER).is_file():
        return True
    try:
        config = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and {"data", "batch_size", "seed"} <= set(config) and (out / "checkpoints").is_dir()


def check_out_dir(out: Path, resume: Path | None, resume_auto: bool) -> None:
    """Read-only, before anything is created: a fit writes into a new or empty folder, or continues its own run.

    `resume`: the checkpoint this fit starts from, if any; `resume_auto`: --resume auto or an elastic restart, which
    continue whatever run `out` holds."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; pass a folder path")
    parent = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DDPTrainError(f"--out {out} is not writable (no write permission on {parent}); pick another --out")
    if not out.exists():
        return
    theirs = sorted(p.name for p in out.iterdir() if p.name not in OWN_FILES)
    if not theirs:
        return
    if not is_run_folder(out):
        shown = ", ".join(theirs[:3]) + (", ..." if len(theirs) > 3 else "")
        raise UsageError(f"--out {out} is a folder that is not a ddptrain run (it holds {shown}); ddptrain writes "
                         "only into a new or empty folder, or continues its own run; pick another --out")
    if resume is not None and not _inside(resume, out):
        raise UsageError(f"--out {out} holds another run, which resuming {resume} there would overwrite; resume "
                         f"into the checkpoint's own run folder, or start from it in a new --out")
    if resume is not None:
        return
    kept = sorted(p.name for p in (out / "checkpoints").glob("*.pt")) if (out / "checkpoints").is_dir() else []
    if LAST not in kept and kept:  # --resume auto has nothing to take: say what can be resumed
        raise UsageError(f"--out {out} holds checkpoints but no {LAST} to continue from ({', '.join(kept[:3])}); "
                         f"resume from one explicitly, e.g. --resume {out / 'checkpoints' / kept[-1]}, or pick a new "
                         "--out")
    if not resume_auto:
        advice = "continue it with --resume auto" if LAST in kept else "it has no checkpoint to continue from"
        raise UsageError(f"--out {out} already holds a run; {advice}, or pick a new --out")


def _inside(path: Path, folder: Path) -> bool:
    return folder.resolve() in path.resolve().parents


class RunLock:
    """An exclusive OS lock (flock) on the run folder's lock file, held for the job's life.

    The kernel releases it when the holder exits by any means, SIGKILL included, so a crashed job never leaves a
    stale lock, and an elastic restart of the same job takes it again. A second job fails at once, naming the
    holder's host and PID.
    """

    def __init__(self, out: Path) -> None:
        import fcntl
        import socket

        self.path = out / LOCK
        try:
            out.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise DDPTrainError(f"cannot create --out {out} ({exc.strerror}); pick another --out") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self._fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(self._fd)
            raise DDPTrainError(f"--out {out} is in use by another ddptrain job ({holder}); wait for it to end "
                                "or pick another --out") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = -1


def claim_run_folder(out: Path, resume: Path | None, resume_auto: bool) -> RunLock:
    """Take the folder's lock, check it again under the lock (another job may have written it since the first
    look), and write the run marker if it is new."""
    lock = RunLock(out)
    try:
        check_out_dir(out, resume, resume_auto)
        if not (out / MARKER).exists():
            atomic.write_text(out / MARKER, json.dumps({"format": "ddptrain.run", "format_version": 1,
                                                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                        "ddptrain_version": __version__}, indent=2) + "\n")
    except OSError as exc:
        lock.release()
        raise DDPTrainError(f"cannot write to --out {out} ({exc.strerror}); free space or pick another --out") from None
    except BaseException:
        lock.release()
        raise
    return lock


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
    """Rank 0's run folder, claimed (locked, marked) by `claim_run_folder`; `close` releases the lock."""

    def __init__(self, path: Path, lock: RunLock, tensorboard: bool = False, tracker: Any = None) -> None:
        super().__init__(path)
        self.lock = lock
        self.tracker = tracker  # an MLflow run (tracking.MlflowRun) that sees config.json and every row
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
        atomic.write_text(self.path / "config.json", json.dumps(config, indent=2) + "\n")
        if self.tracker is not None:
            self.tracker.log_params(config)

    def append(self, row: dict[str, Any]) -> None:
        if self._metrics is None:
            self._metrics = open(self.metrics_path, "a", buffering=1)  # line-buffered: tail -f works
        # strict JSON: a non-finite value (a NaN validation loss) is written as null
        row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
        self._metrics.write(json.dumps(row, allow_nan=False) + "\n")
        if self._tensorboard and self._events is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides what an earlier, interrupted attempt logged after the resumed step
            purge = None if self._resumed_at is None else self._resumed_at + 1
            self._events = SummaryWriter(log_dir=str(self.path / "tensorboard"), purge_step=purge)
        if self.tracker is not None:
            self.tracker.log_row(row)
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
        atomic.write_text(self.metrics_path, "".join(line + "\n" for line in kept))

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._events is not None:
            self._events.close()
            self._events = None
        self.lock.release()


def _row_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62  # a torn last line (a kill mid-write) is dropped
