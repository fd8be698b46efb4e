"""`ddptrain tune`: an Optuna study in which every trial is a real `fit` (the same command, through the same launcher:
a trial may itself run --nproc-per-node workers), its run folder under the study's folder.

- Pruning reads the trial's epoch rows from its metrics.jsonl as they are written and reports the validation metric
  to Optuna; a trial to prune gets SIGTERM, which a fit answers by checkpointing and stopping.
- The study lives in Optuna's journal file (--storage): it survives a crash or Ctrl-C, and agents on several machines
  that share the file (and the study folder) run disjoint trials of one study. A trial whose agent died is found by
  its lock file (an flock the agent holds while the trial runs) and is redone, not counted.
- The value of a trial is its best validation figure (or a bagged run's out-of-fold one), never a test file's.

Each trial runs in a child process of its own (trial.py); the live table of trials is tuneview.py.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddptrain import atomic
from ddptrain.config import LARGER_IS_BETTER, Monitor, merge
from ddptrain.console import console
from ddptrain.errors import EXIT_PREEMPTED, DDPTrainError, Interrupted, UsageError
from ddptrain.space import Dimension, settings_of
from ddptrain.tracking import PARENT_ENV, first_line
from ddptrain.trial import FitJob, RowReader, Stopper, TrialProcess, last_error, last_value, start_method, trial_value
from ddptrain.tuneview import TrialsView

PRUNERS = ("median", "hyperband", "none")
METRICS = tuple(m.value for m in Monitor if m.value.startswith("val_"))
# decided per trial by the study (a run folder's config.json passed as --config carries them: they are left out)
STUDY_OWNS = ("out", "resume", "quiet", "mlflow", "mlflow_experiment", "mlflow_onnx", "monitor", "monitor_mode")
MARKER = "ddptrain-study.json"
POLL_S = 0.2
FAILED_IN_A_ROW = 3  # this many failed trials and none complete: the settings are wrong, not the draws
# the median pruner compares a trial with the trials before it once this many have finished, from this epoch on
PRUNE_AFTER_TRIALS, PRUNE_FROM_EPOCH = 3, 2
ASKING = "asking.lock"  # in the trials folder: held by the agent asking for a trial until it holds the trial's lock
LOST, INTERRUPTED = "lost", "interrupted"  # failed trials that are redone, not counted


@dataclass(frozen=True)
class TuneConfig:
    settings: dict[str, Any]  # the fit settings every trial shares (--config, --data, --target)
    space: tuple[Dimension, ...]
    trials: int
    timeout: float | None
    study: str
    out: Path
    storage: Path
    pruner: str
    metric: str
    seed: int
    nproc_per_node: int | None
    refit: bool
    mlflow: str | None
    mlflow_experiment: str

    @property
    def direction(self) -> str:
        return "maximize" if self.metric in LARGER_IS_BETTER else "minimize"

    def definition(self) -> dict[str, Any]:
        """What a study was started with and a continuation must repeat."""
        return {"settings": self.settings, "metric": self.metric,
                "space": [d.describe() for d in self.space]}


def checked(settings: dict[str, Any], space: tuple[Dimension, ...], trials: int, timeout: float | None,
            metric: str, pruner: str, nproc_per_node: int | None) -> dict[str, Any]:
    """The shared settings without what the study decides per trial, checked like a fit's; the other values'
    ranges. One line for each mistake."""
    if trials < 1:
        raise UsageError(f"--trials {trials} must be at least 1")
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise UsageError(f"--timeout {timeout} must be a number of seconds > 0")
    if metric not in METRICS:
        raise UsageError(f"--metric {metric!r} is not one of: {', '.join(METRICS)}")
    if pruner not in PRUNERS:
        raise UsageError(f"--pruner {pruner!r} is not one of: {', '.join(PRUNERS)}")
    if nproc_per_node is not None and nproc_per_node < 1:
        raise UsageError(f"--nproc-per-node {nproc_per_node} must be at least 1")
    dropped = sorted(k for k in settings if k.replace("-", "_") in STUDY_OWNS)
    if dropped:
        console.note(f"tune decides {', '.join(dropped)} for each trial: the --config values are left out")
    settings = {k.replace("-", "_"): v for k, v in settings.items() if k.replace("-", "_") not in STUDY_OWNS}
    both = sorted({d.name for d in space} & set(settings) | ({"hidden"} & set(settings) if any(
        d.name in ("width", "depth") for d in space) else set()))
    if both:
        raise UsageError(f"'{both[0]}' is both a shared setting (--config) and searched (--space); keep it in one")
    merge(settings, {})  # every shared setting checked as a fit checks it
    return settings


# -- the study ---------------------------------------------------------------------------------------------------

def open_study(cfg: TuneConfig) -> Any:
    """The study in its journal file: created, or continued when its definition matches."""
    import optuna
    from optuna.storages import JournalStorage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if cfg.storage.parent.resolve() != cfg.out.resolve():  # refused before the study folder is made
        check_writable(cfg.storage)
    claim_study_folder(cfg)
    check_writable(cfg.storage)
    try:
        storage = JournalStorage(journal_backend(cfg.storage))
        names = [s.study_name for s in storage.get_all_studies()]
    except Exception as exc:
        raise UsageError(f"--storage {cfg.storage} is not an Optuna journal file ({first_line(exc)}); pick a new "
                         "path") from None
    if names and cfg.study not in names:
        raise UsageError(f"--storage {cfg.storage} holds study {', '.join(repr(n) for n in names)}, not "
                         f"'{cfg.study}'; continue it with --study {names[0]}, or pick another --storage")
    trial_files = [p for p in (cfg.out / "trials").iterdir() if p.name != ASKING] if (cfg.out / "trials").is_dir() \
        else []
    if cfg.study in names:  # read, not written, until its definition is known to match
        study = optuna.load_study(study_name=cfg.study, storage=storage, pruner=build_pruner(cfg.pruner))
    elif trial_files:
        study = None
    else:  # load_if_exists: another agent may be creating it at this moment
        study = optuna.create_study(storage=storage, study_name=cfg.study, direction=cfg.direction,
                                    load_if_exists=True, pruner=build_pruner(cfg.pruner))
    # trial folders without their trials: a folder of the new numbering would be taken for the new trial's
    if study is None or (not study.trials and trial_files):
        raise UsageError(f"--out {cfg.out} holds trials of study '{cfg.study}', but {cfg.storage} has none of them "
                         "(was the journal replaced?); restore the journal, or pick a new --out")
    saved = study.user_attrs.get("ddptrain")
    if saved is None:
        study.set_user_attr("ddptrain", cfg.definition())
    elif saved != json.loads(json.dumps(cfg.definition())):
        what = [k for k in ("settings", "metric", "space") if saved.get(k) != json.loads(json.dumps(cfg.definition()[k]))]
        raise UsageError(f"study '{cfg.study}' in {cfg.storage} was started with other {' and '.join(what)}; "
                         "repeat them to continue it, or start another --study")
    return study


def journal_backend(journal: Path) -> Any:
    """Optuna's journal file, named by its absolute path. Its lock is a symlink to that name, which Optuna takes
    over after 30 s when an agent killed mid-write left it, judging by the target's mtime; a relative name leaves the
    symlink dangling (it resolves from the lock's folder), and Optuna then spins on it for ever."""
    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

    absolute = os.path.abspath(journal)
    remove_dangling_lock(Path(absolute + ".lock"))
    return JournalFileBackend(absolute, lock_obj=JournalFileSymlinkLock(absolute))


def remove_dangling_lock(lock: Path, grace_s: float = 30.0) -> None:
    """A journal lock whose target does not resolve (left by a killed agent that named the journal relatively, as
    earlier versions did) is removed once it is grace_s old: a live one is held for one append, milliseconds."""
    while lock.is_symlink() and not lock.exists():
        try:
            age = time.time() - lock.lstat().st_mtime
        except OSError:
            return  # released meanwhile
        if age < grace_s:
            time.sleep(min(1.0, grace_s - age))
            continue
        try:
            aside = lock.with_name(f"{lock.name}.{os.getpid()}.stale")
            os.rename(lock, aside)  # atomic: of two agents doing this, one wins and the other finds nothing
            os.unlink(aside)
        except OSError:
            pass
        return


def check_writable(storage: Path) -> None:
    try:
        with open(storage, "a"):
            pass
    except OSError as exc:
        raise UsageError(f"--storage {storage} is not writable ({exc.strerror}); pick a path you can write "
                         "(a shared filesystem for agents on several machines)") from None


def claim_study_folder(cfg: TuneConfig) -> None:
    """The study folder holds only studies' files: a new folder is marked; an existing one must be this study's."""
    from ddptrain.rundir import is_run_folder

    out = cfg.out
    marker = out / MARKER
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; pick a folder for the study")
    if out.is_dir() and is_run_folder(out):
        raise UsageError(f"--out {out} is a fit's run folder; pick a folder of its own for the study")
    if marker.exists():
        (out / "trials").mkdir(exist_ok=True)
        try:
            name = json.loads(marker.read_text())["study"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UsageError(f"--out {out}: {MARKER} is unreadable; pick another --out") from None
        if name != cfg.study:
            raise UsageError(f"--out {out} holds study '{name}', not '{cfg.study}'; pass --study {name} to continue "
                             "it, or pick another --out")
        return
    # another agent starting the same study at the same moment may be writing these
    ours = (cfg.storage.name, "trials", MARKER)
    if out.is_dir() and any(p.name not in ours and not p.name.startswith(f".{MARKER}") for p in out.iterdir()):
        raise UsageError(f"--out {out} already holds other files; pick a new folder for the study")
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic.write_text(marker, json.dumps({"format": "ddptrain.study", "study": cfg.study,
                                              "storage": str(cfg.storage)}, indent=2) + "\n")
        (out / "trials").mkdir(exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create --out {out} ({exc.strerror}); pick another --out") from None


def build_pruner(name: str) -> Any:
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=PRUNE_AFTER_TRIALS, n_warmup_steps=PRUNE_FROM_EPOCH)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource="auto")
    return optuna.pruners.NopPruner()


def counted(trial: Any) -> bool:
    """A trial that counts toward --trials: finished, or failed by itself (not lost with its agent, not stopped
    by Ctrl-C: those are redone)."""
    from optuna.trial import TrialState

    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and trial.user_attrs.get("ended") not in (LOST, INTERRUPTED)


def fail_lost_trials(study: Any, trials_dir: Path) -> None:
    """RUNNING trials whose agent is gone (nobody holds their lock file) are failed as lost, to be redone."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if holds_lock(trials_dir / f"{trial_name(trial.number)}.lock"):  # (called under `asking`: no agent is
            continue  # between asking for a trial and taking its lock)
        try:
            study._storage.set_trial_user_attr(trial._trial_id, "ended", LOST)
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except Exception:  # another agent failed it first
            pass


@contextmanager
def asking(trials_dir: Path) -> Iterator[None]:
    """The study's agents one at a time from asking Optuna for a trial to holding its lock (a flock on ASKING), so
    that a RUNNING trial whose lock nobody holds is known lost, whoever's it was."""
    fd = os.open(trials_dir / ASKING, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def holds_lock(lock: Path) -> bool:
    """Whether some process holds the flock on `lock`."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)  # releases the lock if this call took it


def trial_name(number: int) -> str:
    return f"trial-{number:04d}"


# -- one agent's loop --------------------------------------------------------------------------------------------

def tune(cfg: TuneConfig) -> dict[str, Any]:
    import optuna
    from optuna.trial import TrialState

    if cfg.mlflow:
        from ddptrain.tracking import check_mlflow

        check_mlflow()
    study = open_study(cfg)
    trials_dir = cfg.out / "trials"
    start = start_method()
    parent = study_mlflow_run(cfg, study) if cfg.mlflow else None
    view = TrialsView(cfg)
    started, failed_in_a_row, interrupted = time.monotonic(), 0, False
    stopper = Stopper()
    try:
        with stopper:
            while not stopper.requested:
                with asking(trials_dir):  # meanwhile no agent is between asking for a trial and locking it
                    fail_lost_trials(study, trials_dir)
                    trials = study.get_trials(deepcopy=False)
                    running = sum(t.state == TrialState.RUNNING for t in trials)
                    if sum(counted(t) for t in trials) + running >= cfg.trials:
                        break
                    if cfg.timeout is not None and time.monotonic() - started >= cfg.timeout:
                        view.note(f"--timeout {cfg.timeout:g} s reached: no new trials")
                        break
                    # seeded by the study's size: reproducible, and agents asking at other moments draw apart
                    study.sampler = optuna.samplers.TPESampler(seed=cfg.seed + len(trials))
                    trial = study.ask()
                    lock_fd = os.open(trials_dir / f"{trial_name(trial.number)}.lock", os.O_RDWR | os.O_CREAT, 0o644)
                    fcntl.flock(lock_fd, fcntl.LOCK_EX)
                state = run_trial(cfg, study, trial, lock_fd, trials_dir, start, parent, view, stopper)
                failed_in_a_row = failed_in_a_row + 1 if state == TrialState.FAIL else 0
                if failed_in_a_row >= FAILED_IN_A_ROW and not any(
                        t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
                    error = trial_error(study, trial.number)
                    raise DDPTrainError(f"{FAILED_IN_A_ROW} trials failed in a row and none completed; the last: "
                                        f"{error} (its log: {trials_dir / trial_name(trial.number)}.log)")
        interrupted = stopper.requested
    finally:
        view.close()
        if parent is not None:
            parent.end("KILLED" if interrupted else "FINISHED")
    summary = summarize(cfg, study)
    if interrupted:
        raise Interrupted(f"interrupted: study '{cfg.study}' keeps its {summary['counted']} finished trials in "
                          f"{cfg.storage}; continue it with the same command")
    view.summary(summary)
    if cfg.refit and summary["best"] is not None:
        summary["refit"] = refit(cfg, study, summary, start)
    return summary


def run_trial(cfg: TuneConfig, study: Any, trial: Any, lock_fd: int, trials_dir: Path, start: str, parent: Any,
              view: TrialsView, stopper: Stopper) -> Any:
    """One trial from start to its told state, its lock (lock_fd, taken) held throughout and closed at the end."""
    from optuna.trial import TrialState

    name = trial_name(trial.number)
    try:
        params = suggest(trial, cfg.space)
        run_folder = trials_dir / name
        settings = {**cfg.settings, **settings_of(params), "monitor": cfg.metric}
        atomic.write_text(trials_dir / f"{name}.toml", fit_toml(settings, f"trial {trial.number} of study "
                                                                          f"'{cfg.study}'"))
        trial.set_user_attr("run_folder", str(run_folder.resolve()))
        job = trial_job(cfg, trials_dir / f"{name}.toml", run_folder, tracked=parent is not None, onnx=False)
        began = time.monotonic()
        view.started(trial.number, params)
        child = TrialProcess(job, trials_dir / f"{name}.log", start,
                             {PARENT_ENV: parent.run_id} if parent is not None else {})
        stopper.child = child
        rows = RowReader(run_folder / "metrics.jsonl")
        pruned = False
        while (code := child.poll(POLL_S)) is None:
            for row in rows.new_epoch_rows():
                value = row.get(cfg.metric)
                if value is not None and math.isfinite(value) and not pruned and not stopper.requested:
                    trial.report(value, row["epoch"])
                    view.progress(trial.number, row["epoch"], value)
                    if trial.should_prune():
                        pruned = True
                        child.signal(signal.SIGTERM)  # the fit checkpoints and stops
        stopper.child = None
        for row in rows.new_epoch_rows():  # written as it ended: the pruner compares later trials with them
            value = row.get(cfg.metric)
            if value is not None and math.isfinite(value) and not pruned:
                trial.report(value, row["epoch"])
        seconds = time.monotonic() - began
        trial.set_user_attr("seconds", round(seconds, 2))
        all_rows = rows.all_rows()
        if stopper.requested:
            trial.set_user_attr("ended", INTERRUPTED)
            study.tell(trial, state=TrialState.FAIL)
            view.finished(trial.number, "interrupted", None, seconds)
            return TrialState.FAIL
        if pruned and code in (0, EXIT_PREEMPTED):
            study.tell(trial, state=TrialState.PRUNED)
            view.finished(trial.number, "pruned", last_value(all_rows, cfg.metric), seconds)
            return TrialState.PRUNED
        value, epoch = trial_value(all_rows, cfg.metric, cfg.direction)
        if code == 0 and value is not None:
            trial.set_user_attr("best_epoch", epoch)
            study.tell(trial, value)
            if parent is not None and study.best_trial.number == trial.number:
                parent.log_best(value, trial.number)
            view.finished(trial.number, "complete", value, seconds)
            return TrialState.COMPLETE
        error = last_error(trials_dir / f"{name}.log") if code != 0 else (
            f"its rows have no {cfg.metric}: the run had no validation rows (set --val-fraction or --val-data in "
            "--config)")
        trial.set_user_attr("error", error or f"exit code {code}")
        study.tell(trial, state=TrialState.FAIL)
        view.finished(trial.number, "failed", None, seconds, error)
        return TrialState.FAIL
    except BaseException:
        if trial.number is not None:
            try:
                trial.set_user_attr("ended", INTERRUPTED)
                study.tell(trial, state=TrialState.FAIL)
            except Exception:
                pass
        raise
    finally:
        os.close(lock_fd)


def suggest(trial: Any, space: tuple[Dimension, ...]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for d in space:
        if d.kind == "choice":
            params[d.name] = trial.suggest_categorical(d.name, list(d.choices))
        elif d.kind == "int":
            params[d.name] = trial.suggest_int(d.name, int(d.low), int(d.high), step=int(d.step or 1), log=d.log)
        else:
            params[d.name] = trial.suggest_float(d.name, d.low, d.high, step=d.step, log=d.log)
    return params


def fit_toml(settings: dict[str, Any], comment: str) -> str:
    lines = [f"# {comment}", "[fit]"]
    for key, value in settings.items():
        lines.append(f"{key} = {json.dumps(list(value) if isinstance(value, tuple) else value)}")
    return "\n".join(lines) + "\n"


def trial_job(cfg: TuneConfig, config: Path, out: Path, tracked: bool, onnx: bool) -> FitJob:
    return FitJob(config, out, cfg.nproc_per_node, cfg.mlflow if tracked else None, cfg.mlflow_experiment, onnx)


def trial_error(study: Any, number: int) -> str:
    trial = study.get_trials(deepcopy=False)[number]
    return str(trial.user_attrs.get("error", "no error line"))


# -- the end of a study ------------------------------------------------------------------------------------------

def summarize(cfg: TuneConfig, study: Any) -> dict[str, Any]:
    """Counts, the best trial, and best.toml (the shared settings and the best trial's: `fit --config` takes it)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    summary: dict[str, Any] = {
        "study": cfg.study, "storage": str(cfg.storage), "counted": sum(counted(t) for t in trials),
        "complete": len(complete), "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "failed": sum(t.state == TrialState.FAIL and counted(t) for t in trials), "best": None,
        "best_toml": str(cfg.out / "best.toml")}
    if not complete:
        return summary
    best = study.best_trial
    settings = {**cfg.settings, **settings_of(best.params)}
    summary["best"] = {"number": best.number, "value": best.value, "params": best.params,
                       "epoch": best.user_attrs.get("best_epoch"), "run_folder": best.user_attrs.get("run_folder"),
                       "settings": settings}
    atomic.write_text(cfg.out / "best.toml", fit_toml(settings, f"the best trial ({best.number}, {cfg.metric} "
                                                                f"{best.value:.6g}) of study '{cfg.study}'"))
    return summary


def refit(cfg: TuneConfig, study: Any, summary: dict[str, Any], start: str) -> dict[str, Any]:
    """The best settings trained on every training row for the best trial's epochs (no rows held out for
    validation); a bagged best trial already trained on every row, and its model is the answer."""
    best = summary["best"]
    run_folder = Path(best["run_folder"])
    try:
        resolved = json.loads((run_folder / "config.json").read_text())
    except (OSError, ValueError):
        resolved = {}
    if resolved.get("bagging", "off") != "off" and not resolved.get("val_fraction"):
        console.line(f"ddptrain tune: the best trial trained {resolved['bagging']} bagged models on every row: its "
                     f"model is {run_folder / 'checkpoints' / 'best.pt'} (no refit needed)", force=True)
        return {"out": str(run_folder), "code": 0}
    out = cfg.out / "refit"
    config = cfg.out / "refit.toml"
    settings = {**best["settings"], "val_fraction": 0.0, "epochs": max(1, int(best["epoch"] or 1)),
                "early_stop": 0}
    atomic.write_text(config, fit_toml(settings, f"the best trial ({best['number']}) of study '{cfg.study}', "
                                                 "on every training row"))
    console.line(f"ddptrain tune: refit: the best settings on every training row for {settings['epochs']} epochs "
                 f"into {out} (its log: {cfg.out / 'refit.log'})", force=True)
    child = TrialProcess(trial_job(cfg, config, out, tracked=True, onnx=True), cfg.out / "refit.log", start, {})
    stopper = Stopper()
    stopper.child = child
    with stopper:
        while (code := child.poll(POLL_S)) is None:
            pass
    if stopper.requested:
        raise Interrupted(f"interrupted: the refit in {out} continues with the same command")
    if code != 0:
        raise DDPTrainError(f"the refit failed: {last_error(cfg.out / 'refit.log') or f'exit code {code}'} (its "
                            f"log: {cfg.out / 'refit.log'})")
    console.line(f"ddptrain tune: refit done: {out / 'checkpoints' / 'best.pt'}", force=True)
    return {"out": str(out), "code": code}


def study_mlflow_run(cfg: TuneConfig, study: Any) -> Any:
    """The study's MLflow run (every trial's run is its child), one for all agents and continuations: its id is
    kept in the study."""
    from ddptrain.tracking import StudyRun

    return StudyRun(cfg.mlflow, cfg.mlflow_experiment, study, cfg.definition())

