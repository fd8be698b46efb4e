"""One trial of a `tune` study: the `fit` it runs (FitJob), the child process that runs it (forked from the agent,
which has imported what a fit imports, as the launcher forks its workers; or a fresh `python -m ddptrain fit` where
CUDA devices are), the rows it writes as they grow, and the agent's Ctrl-C passed on to it once."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from ddptrain.config import merge
from ddptrain.console import console


@dataclass(frozen=True)
class FitJob:
    """One `fit` a study runs: its settings file, its run folder (resumed if it is there), its workers and its
    MLflow tracking; as a command line (a fresh interpreter) or as a config (a forked child)."""

    config: Path
    out: Path
    nproc_per_node: int | None
    mlflow: str | None
    mlflow_experiment: str
    mlflow_onnx: bool

    def overrides(self) -> dict[str, Any]:
        given: dict[str, Any] = {"out": str(self.out), "resume": "auto"}
        if self.mlflow:
            given.update(mlflow=self.mlflow, mlflow_experiment=self.mlflow_experiment, mlflow_onnx=self.mlflow_onnx)
        return given

    def argv(self) -> list[str]:
        argv = ["fit", "--config", str(self.config)]
        for key, value in self.overrides().items():
            flag = "--" + key.replace("_", "-")
            argv += [flag if value else f"--no-{flag[2:]}"] if isinstance(value, bool) else [flag, str(value)]
        if self.nproc_per_node is not None:
            argv += ["--nproc-per-node", str(self.nproc_per_node)]
        return argv

    def run(self) -> int:
        """In this process, as `ddptrain fit` runs: the exit code; a failure is the job's one error line."""
        from ddptrain.config import read_config_file
        from ddptrain.report import report

        started = time.perf_counter()
        try:
            cfg = merge(read_config_file(self.config), self.overrides())
            if self.nproc_per_node is not None:
                from ddptrain.launcher import Launch, launch_local

                return launch_local(Launch.checked(self.nproc_per_node, None, None, None, 0), cfg, started)
            from ddptrain.run import fit

            fit(cfg, started)
            return 0
        except (Exception, KeyboardInterrupt) as exc:
            return report(exc)


class RowReader:
    """A trial's metrics.jsonl as it grows: whole lines only (a line being written is read next time)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.rows = path, 0, []

    def _read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                chunk = handle.read()
        except OSError:
            return []
        complete = chunk[:chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        new = []
        for line in complete.decode("utf-8", "replace").splitlines():
            try:
                new.append(json.loads(line))
            except ValueError:
                continue
        self.rows += new
        return new

    def new_epoch_rows(self) -> list[dict[str, Any]]:
        return [r for r in self._read() if r.get("kind") == "epoch"]

    def all_rows(self) -> list[dict[str, Any]]:
        self._read()
        return self.rows


def trial_value(rows: list[dict[str, Any]], metric: str, direction: str) -> tuple[float | None, int | None]:
    """A bagged run's final (out-of-fold) figure, else the best epoch's: what best.pt holds."""
    final = [r for r in rows if r.get("kind") == "final" and isinstance(r.get(metric), (int, float))]
    if final:
        return float(final[-1][metric]), int(final[-1].get("epoch", 0))
    epochs = [(float(r[metric]), int(r["epoch"])) for r in rows if r.get("kind") == "epoch"
              and isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
    if not epochs:
        return None, None
    pick = max if direction == "maximize" else min
    return pick(epochs, key=lambda ve: ve[0])


def last_value(rows: list[dict[str, Any]], metric: str) -> float | None:
    values = [r[metric] for r in rows if r.get("kind") == "epoch" and isinstance(r.get(metric), (int, float))]
    return float(values[-1]) if values else None


def last_error(log: Path) -> str | None:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    return errors[-1] if errors else None


def start_method() -> str:
    """fork (from this process, which has imported what a fit imports) where the launcher would fork its workers;
    else a fresh interpreter."""
    import importlib

    from ddptrain.launcher import WORKER_MODULES, start_method as launcher_start

    method = launcher_start()
    if method == "fork":
        for name in (*WORKER_MODULES, "ddptrain.launcher", "ddptrain.report"):
            importlib.import_module(name)
    return method


class TrialProcess:
    """A FitJob in a child process of its own session (signals reach it from this agent only, once), its output in
    the trial's log; it gets SIGTERM if this agent dies."""

    def __init__(self, job: FitJob, log: Path, start: str, env: dict[str, str]) -> None:
        self.code: int | None = None
        log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        agent = os.getpid()
        if start == "fork":
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            self.pid = os.fork()
            if self.pid == 0:
                run_child(job, log_fd, agent, env)  # never returns
            os.close(log_fd)
            self.popen = None
        else:
            self.popen = subprocess.Popen([sys.executable, "-m", "ddptrain", *job.argv()], stdout=log_fd,
                                          stderr=subprocess.STDOUT, start_new_session=True,
                                          env={**os.environ, **env})
            self.pid = self.popen.pid
            os.close(log_fd)

    def poll(self, wait_s: float) -> int | None:
        """The exit code once the process has ended (waiting up to wait_s for it), else None."""
        if self.code is not None:
            return self.code
        deadline = time.monotonic() + wait_s
        while True:
            if self.popen is not None:
                self.code = self.popen.poll()
            else:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.code = os.waitstatus_to_exitcode(status)
            if self.code is not None or time.monotonic() >= deadline:
                return self.code
            time.sleep(min(0.05, wait_s))

    def signal(self, signum: int) -> None:
        if self.code is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass


def run_child(job: FitJob, log_fd: int, agent: int, env: dict[str, str]) -> None:
    """In the forked child: the job as `ddptrain fit` runs it, then exit with its code."""
    code = 1
    try:
        os.setsid()
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        os.environ.update(env)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from ddptrain.launcher import stop_with

        stop_with(agent)
        console.__init__()  # fresh terminals (the log): none of the agent's live view
        code = job.run()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            dist = sys.modules.get("ddptrain.dist")
            if dist is not None and dist.HAD_PROCESS_GROUP:
                dist.exit_process(code)  # as `ddptrain fit` ends after a process group (never returns)
            os._exit(code)


class Stopper:
    """Ctrl-C or SIGTERM during a study: passed on once to the running trial (which checkpoints and stops), then
    the study ends with what it has; a second one is passed on too (the trial aborts)."""

    def __init__(self) -> None:
        self.requested = False
        self.child: TrialProcess | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> Stopper:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        if self.child is not None:
            self.child.signal(signum)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
