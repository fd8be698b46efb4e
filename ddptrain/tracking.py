"""MLflow tracking (--mlflow, the mlflow extra): rank 0 logs a fit's resolved config as params, its metric rows as
they are written, its summary, and as artifacts its run folder's files, checkpoints and (with the export extra) the
ONNX model with a signature of the raw columns. mlflow is imported only when asked for.

A tracking store that fails mid-run costs the tracking, not the training: one warning, and the fit goes on.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from ddptrain import __version__, atomic
from ddptrain.config import MLFLOW_DEFAULT
from ddptrain.console import console
from ddptrain.errors import DDPTrainError, UsageError

RUN_FILE = "mlflow.json"  # in the run folder: the MLflow run a resume continues
PARENT_ENV = "DDPTRAIN_MLFLOW_PARENT"  # set by `tune`: the study's run, whose child this fit's run becomes
NOT_PARAMS = ("out", "resume", "mlflow", "mlflow_experiment", "quiet")  # where and how, not what was trained


def check_mlflow(onnx: bool | None = None) -> None:
    if importlib.util.find_spec("mlflow") is None:
        raise UsageError("--mlflow needs the mlflow package: pip install 'ddptrain[mlflow]'")
    if onnx and not has_export_extra():
        raise UsageError("--mlflow-onnx needs the export extra (onnx): pip install 'ddptrain[export]', or "
                         "--no-mlflow-onnx")


def tracking_uri(store: str) -> str | None:
    """None lets MLflow decide: $MLFLOW_TRACKING_URI, else ./mlflow.db with artifacts in ./mlruns."""
    return None if store == MLFLOW_DEFAULT else store


def quiet_mlflow() -> None:
    """MLflow and the database migrations under it log at INFO on every start; a fit's terminal is for the fit."""
    for name in ("mlflow", "alembic", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


def client_for(store: str) -> Any:
    check_mlflow()
    quiet_mlflow()
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(store))


def experiment_id(client: Any, name: str, store: str) -> str:
    try:
        found = client.get_experiment_by_name(name)
        return found.experiment_id if found is not None else client.create_experiment(name)
    except Exception as exc:  # MLflow's own errors: an unreachable server, a malformed URI, a locked database
        raise DDPTrainError(f"--mlflow {store}: cannot use the tracking store ({first_line(exc)}); check the URI "
                            "or leave it out for MLflow's default (./mlflow.db)") from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def params_of(config: dict[str, Any]) -> dict[str, str]:
    """A config as MLflow params: every setting that shapes the model or its training, as text (lists as JSON)."""
    return {key: json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
            for key, value in config.items() if key not in NOT_PARAMS}


class MlflowRun:
    """One fit's MLflow run, driven by rank 0's run folder: `log_params` with config.json, `log_row` with each
    metrics.jsonl row, `finish` at the end. A resume of the run folder continues the same MLflow run."""

    def __init__(self, store: str, experiment: str, out: Path, resuming: bool, onnx: bool | None = None) -> None:
        self.store, self.out = store, out
        self.onnx = has_export_extra() if onnx is None else onnx  # log the ONNX model at the end
        self.client = client_for(store)
        self.failed = False
        self.finished_before = False  # a resumed run that had ended FINISHED (its files are logged)
        saved = self._saved_run() if resuming else None
        if saved is not None:
            self.run_id = saved
            self.finished_before = self.client.get_run(saved).info.status == "FINISHED"
            self.client.update_run(self.run_id, status="RUNNING")
            return
        tags = {"ddptrain.version": __version__, "ddptrain.run_folder": str(out.resolve())}
        parent = os.environ.get(PARENT_ENV)
        if parent:
            tags["mlflow.parentRunId"] = parent
        exp = experiment_id(self.client, experiment, store)
        try:
            self.run_id = self.client.create_run(exp, run_name=out.name, tags=tags).info.run_id
        except Exception as exc:
            raise DDPTrainError(f"--mlflow {store}: cannot create a run ({first_line(exc)})") from None
        atomic.write_text(out / RUN_FILE, json.dumps({"store": store, "experiment": experiment,
                                                      "run_id": self.run_id}, indent=2) + "\n")
        console.line(f"ddptrain fit: MLflow run {self.run_id} in experiment '{experiment}'")

    def _saved_run(self) -> str | None:
        try:
            saved = json.loads((self.out / RUN_FILE).read_text())
            if saved.get("store") != self.store:
                return None
            self.client.get_run(saved["run_id"])
            return saved["run_id"]
        except Exception:  # no file, another store, a run deleted since: a new run
            return None

    def _safely(self, what: str, call: Any, *args: Any, **kwargs: Any) -> None:
        if self.failed:
            return
        try:
            call(*args, **kwargs)
        except Exception as exc:
            self.failed = True
            console.warn(f"MLflow tracking stopped: could not {what} ({first_line(exc)}); the fit goes on and its "
                         f"run folder has everything")

    def log_params(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        try:
            logged = self.client.get_run(self.run_id).data.params
        except Exception:
            logged = {}
        # a resume may change a setting that does not define the run (--epochs); MLflow keeps a param's first value
        params = [Param(k, v) for k, v in params_of(config).items() if k not in logged]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self._safely("log the config", self.client.log_batch, self.run_id, params=params[start:start + 100])

    def log_row(self, row: dict[str, Any]) -> None:
        """A metrics row: epoch rows at their epoch (epoch/val_loss ...), step rows at their optimizer step
        (step/train_loss ...), the bagged ensemble's final row as final/..."""
        from mlflow.entities import Metric

        kind = row.get("kind", "step")
        at = int(row.get("epoch", 0)) if kind in ("epoch", "final") else int(row.get("step", 0))
        now = int(time.time() * 1000)
        metrics = [Metric(f"{kind}/{key}", float(value), now, at) for key, value in row.items()
                   if key not in ("kind", "step", "epoch") and isinstance(value, (int, float))
                   and not isinstance(value, bool) and value == value]  # NaN: not a number to plot
        if metrics:
            self._safely("log metrics", self.client.log_batch, self.run_id, metrics=metrics)

    def finish(self, summary: dict[str, Any], checkpoints: Path, trained: bool) -> None:
        """The summary as metrics, the run folder's files and checkpoints as artifacts, the ONNX model where the
        export extra is installed; the run ends FINISHED. A finished run run again (`--resume auto` with nothing
        left to train) logs nothing twice."""
        from mlflow.entities import Metric

        if self.finished_before and not trained:
            self.end("FINISHED")
            return
        now = int(time.time() * 1000)
        values = {"epochs": summary["epochs"], "steps": summary["steps"], "best_epoch": summary["best_epoch"]}
        if summary.get("best") is not None:
            values[f"best_{summary['monitor']}"] = summary["best"]
        metrics = [Metric(f"summary/{k}", float(v), now, 0) for k, v in values.items() if v is not None]
        self._safely("log the summary", self.client.log_batch, self.run_id, metrics=metrics)
        for name in ("config.json", "metrics.jsonl"):
            if (self.out / name).exists():
                self._safely(f"upload {name}", self.client.log_artifact, self.run_id, str(self.out / name))
        for name in ("best.pt", "last.pt"):
            if (checkpoints / name).exists():
                self._safely(f"upload {name}", self.client.log_artifact, self.run_id, str(checkpoints / name),
                             "checkpoints")
        best = checkpoints / "best.pt"
        if best.exists() and not self.failed and self.onnx:
            self._safely("log the ONNX model", log_onnx_model, self.store, self.run_id, best)
        self.end("FINISHED")

    def end(self, status: str) -> None:
        """FINISHED, FAILED, or KILLED (a preempted or interrupted run, which a resume continues)."""
        try:  # even after a failed upload: the store may well take this
            self.client.set_terminated(self.run_id, status=status)
        except Exception:
            pass


def has_export_extra() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxscript"))


def log_onnx_model(store: str, run_id: str, checkpoint_path: Path) -> None:
    """best.pt as the ONNX graph `export` writes (preprocessing inside), logged as the run's MLflow model "model"
    with a signature of the raw columns: one [rows, 1] input per column (text as string, times as int64, numbers
    as float32) and the outputs."""
    import mlflow
    import mlflow.onnx
    import numpy as np
    import onnx
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from ddptrain.checkpoint import inference_model, load_checkpoint
    from ddptrain.export import DEFAULT_OPSET, onnx_bytes

    state = load_checkpoint(checkpoint_path)
    model, spec, _ = inference_model(state, torch.device("cpu"), checkpoint_path)
    kinds = {"categorical": np.dtype(object), "datetime": np.dtype(np.int64)}
    inputs = Schema([TensorSpec(kinds.get(plan.role, np.dtype(np.float32)), (-1, 1), name)
                     for name, plan in zip(spec.feature_names, spec.preprocessor.columns)])
    if spec.task == "classification":
        outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, len(spec.classes)), "probabilities"),
                          TensorSpec(np.dtype(object), (-1,), "label")])
    else:
        outputs = Schema([TensorSpec(np.dtype(np.float32), (-1,), "value")])
    graph = onnx.load_from_string(onnx_bytes(model, spec, DEFAULT_OPSET))
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri(store) or previous)
    try:
        with mlflow.start_run(run_id=run_id):
            mlflow.onnx.log_model(graph, name="model", signature=ModelSignature(inputs=inputs, outputs=outputs))
    finally:
        mlflow.set_tracking_uri(previous)


class StudyRun:
    """A `tune` study's MLflow run: its definition as params, the best value so far as a metric at each trial's
    number; every trial's fit logs a run of its own under it (PARENT_ENV). One for every agent and continuation of
    the study: its id is kept in the study."""

    def __init__(self, store: str, experiment: str, study: Any, definition: dict[str, Any]) -> None:
        self.client = client_for(store)
        saved = study.user_attrs.get("mlflow_run_id")
        self.run_id = None
        if saved:
            try:
                self.client.get_run(saved)
                self.run_id = saved
                self.client.update_run(saved, status="RUNNING")
            except Exception:  # another store, or deleted since
                self.run_id = None
        if self.run_id is None:
            exp = experiment_id(self.client, experiment, store)
            try:
                self.run_id = self.client.create_run(exp, run_name=study.study_name, tags={
                    "ddptrain.version": __version__, "ddptrain.study": study.study_name}).info.run_id
                from mlflow.entities import Param

                params = {"metric": definition["metric"], "space": json.dumps(definition["space"]),
                          **{f"shared.{k}": v for k, v in params_of(definition["settings"]).items()}}
                self.client.log_batch(self.run_id, params=[Param(k, v[:6000]) for k, v in params.items()])
            except Exception as exc:
                raise DDPTrainError(f"--mlflow {store}: cannot create the study's run ({first_line(exc)})") from None
            study.set_user_attr("mlflow_run_id", self.run_id)

    def log_best(self, value: float, trial_number: int) -> None:
        try:
            self.client.log_metric(self.run_id, "best_value", value, step=trial_number)
        except Exception as exc:
            console.warn(f"MLflow: could not log the study's best value ({first_line(exc)})")

    def end(self, status: str) -> None:
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception:
            pass
