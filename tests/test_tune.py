"""`ddptrain tune` (Optuna; every trial a real fit in a process of its own) and MLflow tracking (--mlflow), read back
with Optuna's and MLflow's own clients."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import clean_env, cli, error_lines, in_process, read_metrics

optuna = pytest.importorskip("optuna")
pytestmark = pytest.mark.slow

# a study that runs in seconds: a small table, one narrow layer, validation rows (no bagging); epochs enough that
# a trial runs for some seconds, so the pruner acts while it trains
SHARED = """[fit]
target = "diagnosis"
hidden = [16]
epochs = 40
early_stop = 0
val_fraction = 0.25
bagging = "off"
batch_size = 32
"""
# rates from far too low to high: a median pruner finds trials to stop
SPACE = """[space]
lr = { low = 1e-5, high = 0.05, log = true }
dropout = { choices = [0.0, 0.2] }
"""


@pytest.fixture
def study_files(tmp_path, tiny_csv):
    (tmp_path / "shared.toml").write_text(SHARED)
    (tmp_path / "space.toml").write_text(SPACE)
    return ["--data", str(tiny_csv), "--config", "shared.toml", "--space", "space.toml"]


def load(folder: Path, name: str = "cells"):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(folder / "journal.log")))
    return optuna.load_study(study_name=name, storage=storage)


def states(study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def test_a_six_trial_study_prunes_one_and_writes_a_best_config_that_fit_takes(tmp_path, study_files):
    done = cli("tune", *study_files, "--trials", "6", "--out", "study", "--refit", cwd=tmp_path, timeout=400)
    assert done.returncode == 0, done.stderr
    study = load(tmp_path / "study")
    counts = states(study)
    assert counts.get("PRUNED", 0) >= 1 and counts.get("COMPLETE", 0) >= 1, counts
    assert sum(counts.values()) == 6
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    for trial in pruned:  # stopped early: fewer epoch rows than the trial's 6, and it checkpointed
        rows = [r for r in read_metrics(Path(trial.user_attrs["run_folder"])) if r["kind"] == "epoch"]
        assert 1 <= len(rows) < 40
        assert (Path(trial.user_attrs["run_folder"]) / "checkpoints/last.pt").exists()
    best = study.best_trial
    best_rows = [r for r in read_metrics(Path(best.user_attrs["run_folder"])) if r["kind"] == "epoch"]
    assert best.value == min(r["val_loss"] for r in best_rows)  # the validation figure best.pt holds
    assert f"trial {best.number}: complete val_loss {best.value:.4f}" in done.stdout
    assert "pruned" in done.stdout
    # best.toml: the shared settings and the best trial's, which fit takes as they are
    toml = (tmp_path / "study/best.toml").read_text()
    assert f"lr = {json.dumps(best.params['lr'])}" in toml and 'target = "diagnosis"' in toml
    from ddptrain.config import merge, read_config_file

    taken = merge(read_config_file(tmp_path / "study/best.toml"), {})  # what fit --config makes of it
    assert taken.lr == best.params["lr"] and taken.dropout == best.params["dropout"] and taken.hidden == (16,)
    # --refit: the best settings on every training row, for the best trial's epochs
    refit_rows = [r for r in read_metrics(tmp_path / "study/refit") if r["kind"] == "epoch"]
    assert len(refit_rows) == best.user_attrs["best_epoch"] and "val_loss" not in refit_rows[-1]
    assert (tmp_path / "study/refit/checkpoints/best.pt").exists()
    # run again: the study has its trials; nothing new runs, the refit is found finished
    again = cli("tune", *study_files, "--trials", "6", "--out", "study", cwd=tmp_path, timeout=120)
    assert again.returncode == 0, again.stderr
    assert sum(states(load(tmp_path / "study")).values()) == 6


def test_a_study_killed_with_sigkill_resumes_and_loses_no_finished_trial(tmp_path, study_files):
    args = [sys.executable, "-m", "ddptrain", "tune", *study_files, "--trials", "5", "--out", "study",
            "--pruner", "none"]
    agent = subprocess.Popen(args, cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # two finished trials, a third running
        journal = tmp_path / "study/journal.log"
        if journal.exists():
            study = load(tmp_path / "study")
            if states(study).get("COMPLETE", 0) >= 2 and states(study).get("RUNNING", 0) == 1:
                break
        assert agent.poll() is None, agent.communicate()
        time.sleep(0.2)
    agent.send_signal(signal.SIGKILL)
    agent.communicate()
    before = {t.number: t.value for t in load(tmp_path / "study").trials if t.state.name == "COMPLETE"}
    assert len(before) >= 2
    resumed = cli("tune", *study_files, "--trials", "5", "--out", "study", "--pruner", "none", cwd=tmp_path,
                  timeout=400)
    assert resumed.returncode == 0, resumed.stderr
    study = load(tmp_path / "study")
    after = {t.number: t.value for t in study.trials if t.state.name == "COMPLETE"}
    assert all(after[n] == v for n, v in before.items())  # every finished trial kept, as it was
    lost = [t for t in study.trials if t.state.name == "FAIL"]
    assert [t.user_attrs.get("ended") for t in lost] == ["lost"]  # the killed agent's trial, redone
    assert len(after) == 5 and "5 complete, 0 pruned, 0 failed (5 of 5)" in resumed.stdout


def test_a_trial_asked_for_but_never_locked_is_lost_at_once(tmp_path, study_files):
    """An agent killed after Optuna gave it a trial and before it locked the trial leaves it RUNNING with no lock:
    the next agent fails it as lost at once (agents ask and lock one at a time), not counting it as running."""
    done = cli("tune", *study_files, "--trials", "1", "--out", "study", "--pruner", "none", cwd=tmp_path, timeout=200)
    assert done.returncode == 0, done.stderr
    orphan = load(tmp_path / "study").ask()  # as the killed agent left it
    resumed = cli("tune", *study_files, "--trials", "2", "--out", "study", "--pruner", "none", cwd=tmp_path,
                  timeout=200)
    assert resumed.returncode == 0, resumed.stderr
    study = load(tmp_path / "study")
    assert study.trials[orphan.number].state.name == "FAIL"
    assert study.trials[orphan.number].user_attrs.get("ended") == "lost"
    assert states(study) == {"COMPLETE": 2, "FAIL": 1}


JOURNAL_AFTER_A_KILL = """
import os, sys, time
from pathlib import Path
from optuna import create_study, load_study
from optuna.storages import JournalStorage
from ddptrain.tune import journal_backend

os.chdir(sys.argv[1])
create_study(study_name="cells", storage=JournalStorage(journal_backend(Path("study/journal.log"))))
# what an agent that named its journal relatively left when it was killed mid-append: a lock whose symlink does not
# resolve (its target is read from the lock's own folder), taken 40 s ago
os.symlink("study/journal.log", "study/journal.log.lock")
os.utime("study/journal.log.lock", (time.time() - 40,) * 2, follow_symlinks=False)
study = load_study(study_name="cells", storage=JournalStorage(journal_backend(Path("study/journal.log"))))
study.set_user_attr("continued", True)  # an append: it takes the lock
print(os.readlink("study/journal.log.lock") if os.path.islink("study/journal.log.lock") else "released")
"""


def test_a_journal_lock_left_by_a_killed_agent_is_taken_over_not_spun_on(tmp_path, monkeypatch):
    """Optuna takes over a stale journal lock by its symlink's target; a dangling one it spins on for ever (at full
    CPU, deaf to SIGTERM). The journal is named absolutely, and a dangling lock left by an earlier agent is removed
    once it is older than any append."""
    (tmp_path / "study").mkdir()
    done = subprocess.run([sys.executable, "-c", JOURNAL_AFTER_A_KILL, str(tmp_path)], capture_output=True, text=True,
                          timeout=60, env=clean_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "released"
    assert '"continued"' in (tmp_path / "study/journal.log").read_text()
    # the lock an agent takes now names the journal absolutely: a killed agent's resolves, and Optuna's 30 s apply
    from ddptrain.tune import journal_backend

    monkeypatch.chdir(tmp_path)
    backend = journal_backend(Path("study/journal.log"))
    backend._lock.acquire()
    try:
        assert Path(os.readlink(tmp_path / "study/journal.log.lock")) == tmp_path / "study/journal.log"
    finally:
        backend._lock.release()


def test_two_agents_sharing_one_journal_run_disjoint_trials_of_one_study(tmp_path, study_files):
    args = [sys.executable, "-m", "ddptrain", "tune", *study_files, "--trials", "4", "--out", "study",
            "--pruner", "none"]
    (tmp_path / "study").mkdir()
    agents = [subprocess.Popen([*args, "--seed", str(i)], cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [agent.communicate(timeout=400) for agent in agents]
    for agent, (out, err) in zip(agents, outputs):
        assert agent.returncode == 0, err
    ran = [{int(line.split()[1].rstrip(":")) for line in out.splitlines() if line.startswith("trial ")}
           for out, _ in outputs]
    assert ran[0] and ran[1] and not ran[0] & ran[1], ran  # both worked, never on the same trial
    study = load(tmp_path / "study")
    assert ran[0] | ran[1] == {t.number for t in study.trials}
    assert 4 <= states(study).get("COMPLETE", 0) <= 5  # two agents may both start the last trial


def test_tune_refusals_are_one_line_each(tmp_path, study_files, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def refused(*args: str, space: str | None = None) -> str:
        if space is not None:
            (tmp_path / "bad.toml").write_text(space)
        code, err = in_process(monkeypatch, capsys, "tune", *args)
        assert code == 2, err
        assert len(error_lines(err)) == 1 and len(err.strip().splitlines()) == 1, err
        return err

    base = [a if a != "space.toml" else "bad.toml" for a in study_files]
    assert "unknown setting 'dropuot'; did you mean 'dropout'?" in refused(*base, space="[space]\ndropuot = { low = 0.1, high = 0.2 }\n")
    assert "'lr' low 0.1 must be below high 0.01" in refused(*base, space="[space]\nlr = { low = 0.1, high = 0.01 }\n")
    assert "'lr' is unknown key 'hi'" in refused(*base, space="[space]\nlr = { low = 0.1, hi = 0.2 }\n")
    assert "is empty; give at least one setting" in refused(*base, space="[space]\n")
    assert "'data' is the study's, not a trial's" in refused(*base, space='[space]\ndata = { choices = ["x.csv"] }\n')
    assert "--optimizer 'lion' is not one of" in refused(*base, space='[space]\noptimizer = { choices = ["lion"] }\n')
    assert "--trials 0 must be at least 1" in refused(*study_files, "--trials", "0")
    assert "--metric 'accuracy' is not one of" in refused(*study_files, "--metric", "accuracy")
    (tmp_path / "afile").write_text("")
    assert "--storage afile/journal.log is not writable" in refused(*study_files, "--storage", "afile/journal.log",
                                                                     "--out", "s1")
    assert not (tmp_path / "s1/trials").exists() or not list((tmp_path / "s1/trials").iterdir())
    # a journal of another study: named, with how to continue it
    import optuna as op
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    op.create_study(study_name="other", storage=JournalStorage(JournalFileBackend(str(tmp_path / "j.log"))))
    before = (tmp_path / "j.log").read_bytes()
    assert "holds study 'other', not 'cells'; continue it with --study other" in refused(
        *study_files, "--storage", "j.log", "--out", "s2")
    assert (tmp_path / "j.log").read_bytes() == before  # nothing of the other study touched
    # a study continued with other settings or another space: refused, its journal untouched
    (tmp_path / "prev").mkdir()
    (tmp_path / "prev/ddptrain-study.json").write_text(json.dumps({"study": "cells"}))
    earlier = op.create_study(study_name="cells", storage=JournalStorage(JournalFileBackend(str(tmp_path / "prev/journal.log"))))
    earlier.set_user_attr("ddptrain", {"settings": {"data": "other.csv"}, "metric": "val_loss", "space": ["lr: 0.1 to 1"]})
    before = (tmp_path / "prev/journal.log").read_bytes()
    assert "study 'cells' in prev/journal.log was started with other settings and space; repeat them to continue " \
           "it, or start another --study" in refused(*study_files, "--out", "prev")
    assert (tmp_path / "prev/journal.log").read_bytes() == before
    # a fit's run folder, or a folder of other files, is not a study's
    from ddptrain.rundir import MARKER

    (tmp_path / "arun").mkdir()
    (tmp_path / "arun" / MARKER).write_text("{}")
    assert "--out arun is a fit's run folder; pick a folder of its own" in refused(*study_files, "--out", "arun")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("mine")
    assert "--out mine already holds other files" in refused(*study_files, "--out", "mine")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    # a study folder whose journal is gone: its trial folders would be taken for the new study's
    (tmp_path / "gone/trials").mkdir(parents=True)
    (tmp_path / "gone/ddptrain-study.json").write_text(json.dumps({"study": "cells"}))
    (tmp_path / "gone/trials/trial-0000.toml").write_text("")
    assert "holds trials of study 'cells', but gone/journal.log has none of them" in refused(*study_files, "--out", "gone")
    assert "--out run holds study" not in refused(*study_files, "--out", "gone")  # refused alike each time
    assert "tune needs the optuna package: pip install 'ddptrain[tune]'" in missing(monkeypatch, capsys, "optuna",
                                                                                    "tune", *study_files)
    assert "--mlflow needs the mlflow package: pip install 'ddptrain[mlflow]'" in missing(
        monkeypatch, capsys, "mlflow", "fit", "--data", "xor", "--mlflow", "--out", "r")
    assert not (tmp_path / "r").exists()


def missing(monkeypatch, capsys, package: str, *args: str) -> str:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    code, err = in_process(monkeypatch, capsys, *args)
    monkeypatch.setattr(importlib.util, "find_spec", real)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    return err


def test_a_failing_trial_is_counted_and_the_study_goes_on_and_ctrl_c_keeps_finished_trials(tmp_path, study_files):
    # a batch larger than the table's training rows fails its trial (one line in its log); the others run
    (tmp_path / "space.toml").write_text('[space]\nbatch_size = { choices = [32, 100000] }\n')
    (tmp_path / "shared.toml").write_text(SHARED.replace("batch_size = 32\n", "").replace("epochs = 40", "epochs = 3"))
    # each trial a 2-process DDP job through fit's own launcher
    done = cli("tune", *study_files, "--trials", "4", "--out", "study", "--pruner", "none", "--nproc-per-node", "2",
               cwd=tmp_path, timeout=400)
    assert done.returncode == 0, done.stderr
    study = load(tmp_path / "study")
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert "world size 2 (gloo, cpu, DDP)" in (tmp_path / "study/trials/trial-{:04d}.log".format(complete[0].number)).read_text()
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert failed and all("--batch-size 100000 is larger than the" in t.user_attrs["error"] for t in failed)
    assert all((tmp_path / f"study/trials/trial-{t.number:04d}.log").read_text().count("error:") == 1 for t in failed)
    assert states(study).get("COMPLETE", 0) >= 1 and len(study.trials) == 4
    assert f"{len(failed)} failed (4 of 4)" in done.stdout
    # Ctrl-C (SIGINT) during a trial: the trial checkpoints and stops, the study keeps its trials and says how to go on
    (tmp_path / "space.toml").write_text(SPACE)
    (tmp_path / "shared.toml").write_text(SHARED.replace("epochs = 40", "epochs = 100000"))
    agent = subprocess.Popen([sys.executable, "-m", "ddptrain", "tune", *study_files, "--trials", "3", "--out",
                              "long", "--pruner", "none"], cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "long/trials").glob("trial-0000/metrics.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.2)
    agent.send_signal(signal.SIGINT)
    out, err = agent.communicate(timeout=120)
    assert agent.returncode == 130, err
    assert error_lines(err) == ["error: interrupted: study 'cells' keeps its 0 finished trials in "
                                "long/journal.log; continue it with the same command"], err
    trial = load(tmp_path / "long").trials[0]
    assert trial.state.name == "FAIL" and trial.user_attrs["ended"] == "interrupted"
    assert (tmp_path / "long/trials/trial-0000/checkpoints/last.pt").exists()  # it checkpointed as it stopped


def test_fit_and_tune_runs_read_back_from_mlflow(tmp_path, study_files):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    fit = cli("fit", "--data", "xor", "--n-samples", "1200", "--epochs", "3", "--out", "run", "--mlflow", uri,
              "--mlflow-experiment", "tests", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr
    client = MlflowClient(tracking_uri=uri)
    run_id = json.loads((tmp_path / "run/mlflow.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["lr"] == "0.003" and run.data.params["hidden"] == "[128, 128]"
    assert run.data.params["batch_size"] == "64"  # the resolved config, as config.json has it
    history = client.get_metric_history(run_id, "epoch/val_loss")
    rows = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "epoch"]
    assert [(m.step, m.value) for m in history] == [(r["epoch"], r["val_loss"]) for r in rows]
    assert client.get_metric_history(run_id, "step/train_loss")
    assert run.data.metrics["summary/best_val_loss"] == min(r["val_loss"] for r in rows)
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "checkpoints")}
    assert {"config.json", "metrics.jsonl", "checkpoints/best.pt", "checkpoints/last.pt"} <= artifacts
    if all(__import__("importlib").util.find_spec(m) for m in ("onnx", "onnxscript")):  # the export extra
        import mlflow

        mlflow.set_tracking_uri(uri)
        models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
        assert [m.source_run_id for m in models] == [run_id]
        signature = mlflow.models.get_model_info(models[0].model_uri).signature
        assert [s.name for s in signature.inputs.inputs] == ["x0", "x1"]
        assert [s.name for s in signature.outputs.inputs] == ["probabilities", "label"]
    # resumed for more epochs: the same MLflow run, finished again
    more = cli("fit", "--data", "xor", "--n-samples", "1200", "--epochs", "4", "--out", "run", "--resume", "auto",
               "--mlflow", uri, "--mlflow-experiment", "tests", "--no-mlflow-onnx", cwd=tmp_path)
    assert more.returncode == 0, more.stderr
    assert [m.step for m in client.get_metric_history(run_id, "epoch/val_loss")] == [1, 2, 3, 4]
    # and once more, with nothing left to train: it reports the finished run and logs nothing twice
    again = cli("fit", "--data", "xor", "--n-samples", "1200", "--epochs", "4", "--out", "run", "--resume", "auto",
                "--mlflow", uri, "--mlflow-experiment", "tests", "--no-mlflow-onnx", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(client.get_metric_history(run_id, "summary/epochs")) == 2  # the first fit's and the resume's
    # tune: a run for the study, a child run for each trial (3 epochs each: no pruning is asked of 2 trials)
    (tmp_path / "shared.toml").write_text(SHARED.replace("epochs = 40", "epochs = 3"))
    tuned = cli("tune", *study_files, "--trials", "2", "--out", "study", "--mlflow", uri, "--mlflow-experiment",
                "tests", cwd=tmp_path, timeout=400)
    assert tuned.returncode == 0, tuned.stderr
    experiment = client.get_experiment_by_name("tests").experiment_id
    parents = client.search_runs([experiment], "tags.`ddptrain.study` = 'cells'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["trial-0000", "trial-0001"]
    assert all(c.data.params["monitor"] == "val_loss" and "lr" in c.data.params for c in children)
    best = min(c.data.metrics["summary/best_val_loss"] for c in children)
    assert parents[0].data.metrics["best_value"] == best


def test_a_study_on_a_terminal_shows_a_live_table_of_its_trials(tmp_path, study_files):
    from test_observe import run_on_terminal

    (tmp_path / "shared.toml").write_text(SHARED.replace("epochs = 40", "epochs = 3"))
    screen = run_on_terminal(["tune", *study_files, "--trials", "2", "--out", "study"], tmp_path)
    assert "study cells: val_loss" in screen  # the live table's title, redrawn as trials run
    for column in ("trial", "state", "val_loss", "epoch", "seconds", "settings"):
        assert column in screen
    assert "complete" in screen and "ddptrain tune: done" in screen
    assert "trial 0: complete" not in screen  # the table, not the plain lines of a log


def test_where_trials_cannot_be_forked_each_is_a_fresh_fit_command(tmp_path, study_files):
    """Where CUDA devices are (DDPTRAIN_WORKER_START=spawn stands in for them here), a trial is `python -m ddptrain
    fit --config ... --out ... --resume auto` in a fresh interpreter."""
    (tmp_path / "shared.toml").write_text(SHARED.replace("epochs = 40", "epochs = 3"))
    done = cli("tune", *study_files, "--trials", "1", "--out", "study", cwd=tmp_path, timeout=400,
               env=clean_env(DDPTRAIN_WORKER_START="spawn"))
    assert done.returncode == 0, done.stderr
    trial = load(tmp_path / "study").trials[0]
    rows = [r for r in read_metrics(Path(trial.user_attrs["run_folder"])) if r["kind"] == "epoch"]
    assert trial.state.name == "COMPLETE" and trial.value == min(r["val_loss"] for r in rows)


def test_a_trials_command_line_says_what_its_forked_run_does(tmp_path):
    """The fresh interpreter's command line (FitJob.argv) parses, with fit's own parser, to the settings the forked
    child runs with (FitJob's merge): the run folder, --resume auto, the workers and MLflow's flags."""
    import typer

    from ddptrain.cli import app, with_optional_values
    from ddptrain.config import merge, read_config_file
    from ddptrain.trial import FitJob

    (tmp_path / "trial.toml").write_text('[fit]\ndata = "t.csv"\nlr = 0.01\n')
    fit_command = typer.main.get_command(app).commands["fit"]
    for job in (FitJob(tmp_path / "trial.toml", tmp_path / "run", 2, "sqlite:///m.db", "tests", False),
                FitJob(tmp_path / "trial.toml", tmp_path / "run", None, None, "ddptrain", True)):
        argv = job.argv()
        params = fit_command.make_context("fit", with_optional_values(argv[1:])).params
        forked = merge(read_config_file(job.config), job.overrides())
        assert params["config"] == job.config and params["nproc_per_node"] == job.nproc_per_node
        for key in ("out", "resume", "mlflow", "mlflow_experiment", "mlflow_onnx"):
            assert params[key] == getattr(forked, key) or (params[key] is None and getattr(forked, key) is None), key
