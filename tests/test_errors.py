"""Every bad input: one `error:` line naming the problem, the right exit code, no traceback, nothing changed."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import in_process, run_command

from ddptrain.cli import main

CSV = "a,b,label\n1,2,x\n3,4,y\n5,6,x\n7,8,y\n9,10,x\n11,12,y\n13,14,x\n15,16,y\n17,18,x\n19,20,y\n"


def files(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, but the run folder's lock file: a job that takes the lock writes its host and PID there."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and p.name != ".ddptrain.lock"}


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory) -> Path:
    """A finished run whose files must never change: config, metrics, checkpoints."""
    from ddptrain.config import FitConfig
    from ddptrain.run import fit

    folder = tmp_path_factory.mktemp("earlier")
    fit(FitConfig(data="xor", n_samples=200, epochs=1, hidden=(8,), batch_size=32, out=str(folder / "old"), quiet=True))
    return folder / "old"


@pytest.fixture
def workdir(tmp_path, earlier_run, monkeypatch):
    import shutil

    shutil.copytree(earlier_run, tmp_path / "old")
    (tmp_path / "data.csv").write_text(CSV)
    monkeypatch.chdir(tmp_path)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    return in_process(monkeypatch, capsys, *args)


def check(args, code, words, workdir, monkeypatch, capsys):
    before = files(workdir)
    exit_code, err = run_cli(args, monkeypatch, capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert exit_code == code, err
    assert len(errors) == 1 and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word.lower() in errors[0].lower(), (word, errors[0])
    assert "Traceback" not in err
    after = files(workdir)
    assert all(after.get(name) == content for name, content in before.items()), "an existing file changed"
    assert not (workdir / "runs").exists() and not (workdir / "new").exists(), "a run folder was made for a bad input"


def write(name: str, text: str):
    return lambda d: (d / name).write_text(text)


FIT = ["fit", "--epochs", "1", "--out", "new"]
FLAG_CASES = {
    "nnodes-alone": (["--nnodes", "2"], ["--nnodes starts workers", "--nproc-per-node"]),
    "max-restarts-alone": (["--max-restarts", "1"], ["--max-restarts starts workers", "--nproc-per-node"]),
    "nnodes-no-endpoint": (["--nproc-per-node", "1", "--nnodes", "2"], ["--nnodes 2 needs --rdzv-endpoint"]),
    "nnodes-bad": (["--nproc-per-node", "1", "--nnodes", "4:2"], ["--nnodes '4:2'", "range (1:4)"]),
    "endpoint-bad": (["--nproc-per-node", "1", "--nnodes", "2", "--rdzv-endpoint", "node0"], ["'node0'", "HOST:PORT"]),
    "rdzv-id-alone": (["--nproc-per-node", "1", "--rdzv-id", "x"], ["--rdzv-id goes with --rdzv-endpoint"]),
    "rdzv-id-bad": (["--nproc-per-node", "1", "--nnodes", "2", "--rdzv-endpoint", "h:1", "--rdzv-id", "a b"],
                    ["--rdzv-id 'a b'"]),
    "max-restarts-negative": (["--nproc-per-node", "1", "--max-restarts", "-1"], ["--max-restarts -1"]),
    "lr-zero": (["--lr", "0"], ["--lr", "> 0"]),
    "lr-negative": (["--lr", "-1"], ["--lr"]),
    "lr-nan": (["--lr", "nan"], ["--lr", "finite"]),
    "lr-inf": (["--lr", "inf"], ["--lr", "finite"]),
    "lr-text": (["--lr", "abc"], ["--lr"]),
    "hidden-abc": (["--hidden", "abc"], ["--hidden", "positive integers"]),
    "hidden-empty-item": (["--hidden", "64,,64"], ["--hidden", "positive integers"]),
    "hidden-zero": (["--hidden", "0"], ["--hidden"]),
    "hidden-negative": (["--hidden", "-5"], ["--hidden"]),
    "dropout-one": (["--dropout", "1"], ["--dropout", "[0, 1)"]),
    "dropout-negative": (["--dropout", "-0.1"], ["--dropout"]),
    "label-smoothing-one": (["--label-smoothing", "1"], ["--label-smoothing", "[0, 1)"]),
    # known only once the data says the task: still refused before the run folder is made
    "label-smoothing-regression": (["--data", "regression", "--label-smoothing", "0.1"], ["--label-smoothing", "regression"]),
    "class-weight-regression": (["--data", "regression", "--class-weight", "balanced"], ["--class-weight", "regression"]),
    "loss-task": (["--data", "regression", "--loss", "cross_entropy"], ["--loss cross_entropy", "regression"]),
    "epochs-zero": (["--epochs", "0"], ["--epochs", "at least 1"]),
    "batch-zero": (["--batch-size", "0"], ["--batch-size", "at least 1"]),
    "batch-too-large": (["--batch-size", "100000"], ["--batch-size", "training rows"]),
    "optimizer": (["--optimizer", "lion"], ["--optimizer", "'sgd', 'adam', 'adamw', 'rmsprop'"]),
    "scheduler": (["--scheduler", "poly"], ["--scheduler", "cosine"]),
    "activation": (["--activation", "elu"], ["--activation", "relu"]),
    "loss": (["--loss", "hinge"], ["--loss", "huber"]),
    "task": (["--task", "ranking"], ["--task", "classification"]),
    "optimizer-in-a-config-file": (["--config", "o.toml"], ["--optimizer 'lion'", "sgd, adam, adamw, rmsprop"]),
    "val-fraction-one": (["--val-fraction", "1"], ["--val-fraction"]),
    "val-fraction-negative": (["--val-fraction", "-0.2"], ["--val-fraction"]),
    "val-fraction-empty-split": (["--data", "xor", "--n-samples", "20", "--val-fraction", "0.01", "--batch-size", "1"],
                                 ["--val-fraction", "empty"]),
    "unknown-builtin-dataset": (["--data", "circles"], ["circles", "xor, spirals, moons, blobs, regression"]),
    "nccl-on-cpu": (["--backend", "nccl", "--device", "cpu"], ["--backend nccl", "gloo"]),
    "static-graph-with-grad-accum": (["--static-graph", "--grad-accum", "2"], ["--static-graph", "--grad-accum",
                                                                               "143580"]),
    "empty-data": (["--data", ""], ["--data is empty"]),
    "empty-target": (["--target", " "], ["--target is empty"]),
    "empty-out": (["--out", ""], ["--out is empty"]),
    "seed-negative": (["--seed", "-1"], ["--seed -1", "from 0 to"]),
    "seed-2**64": (["--seed", str(2**64)], ["--seed", "from 0 to"]),
    "timeout-inf": (["--timeout", "inf"], ["--timeout", "finite"]),
    "noise-inf": (["--noise", "inf"], ["--noise", "finite"]),
    "lr-gamma-nan": (["--lr-gamma", "nan"], ["--lr-gamma", "finite"]),
    "lr-gamma-negative": (["--lr-gamma", "-1"], ["--lr-gamma", "(0, 1]"]),
    "momentum-one": (["--momentum", "1"], ["--momentum", "[0, 1)"]),
    "weight-decay-inf": (["--weight-decay", "inf"], ["--weight-decay", "finite"]),
    "monitor-accuracy-on-regression": (["--data", "regression", "--monitor-metric", "val_accuracy"],
                                       ["--monitor val_accuracy", "regression", "val_rmse"]),
    "no-such-target": (["--data", "data.csv", "--target", "prices"], ["--target", "'prices'", "a, b, label"]),
    "mistyped-target": (["--data", "data.csv", "--target", "Lable"], ["--target: 'Lable' (did you mean 'label'?)"]),
    "monitor-r2-on-classification": (["--data", "xor", "--monitor-metric", "val_r2"],
                                     ["--monitor val_r2", "classification", "val_accuracy"]),
}


@pytest.mark.parametrize("case", FLAG_CASES, ids=str)
def test_bad_flags_exit_2(case, workdir, monkeypatch, capsys):
    args, words = FLAG_CASES[case]
    (workdir / "o.toml").write_text('optimizer = "lion"\n')
    check(FIT + args, 2, words, workdir, monkeypatch, capsys)


DATA_CASES = {
    "missing": (None, "nope.csv", [], ["nope.csv", "does not exist"]),
    "folder": (lambda d: (d / "dir.csv").mkdir(), "dir.csv", [], ["folder"]),
    "empty": (write("e.csv", ""), "e.csv", [], ["empty"]),
    "header-only": (write("h.csv", "a,b,y\n"), "h.csv", [], ["no data rows"]),
    "text-regression-target": (write("n.csv", "a,y\n1,0.5\n2,oops\n3,1.5\n"), "n.csv", ["--task", "regression"],
                               ["'y'", "line 3", "oops", "not a number"]),
    "inf-feature": (write("f.csv", "a,b,y\n1,2,0\ninf,3,1\n"), "f.csv", ["--val-fraction", "0"],
                    ["'a'", "line 3", "finite"]),
    "two-bad-columns-at-once": (write("g.csv", "a,b,y\n1,inf,0\n-inf,3,1\n"), "g.csv", ["--val-fraction", "0"],
                                ["'a' line 3", "'b' line 2"]),
    "inf-target": (write("t.csv", "a,y\n1,0.5\n2,inf\n3,1.5\n"), "t.csv", [], ["'y'", "line 3"]),
    "one-class": (write("o.csv", "a,y\n1,cat\n2,cat\n3,cat\n"), "o.csv", [], ["one class"]),
    "npz-without-xy": (lambda d: np.savez(d / "z.npz", features=np.zeros((3, 2))), "z.npz", [], ["'x'", "'y'", "features"]),
    "uneven-rows": (write("u.csv", "a,b,y\n1,2,0\n3,1\n"), "u.csv", [], ["line 3", "2 fields", "3"]),
    "bad-cell-after-blank-lines": (write("b.csv", "a,b,y\n1,2,0\n\n\n3,inf,1\n"), "b.csv", ["--val-fraction", "0"],
                                   ["'b'", "line 5", "infinite"]),
    "semicolons": (write("s.csv", "a;b;y\n1;2;0\n"), "s.csv", [], ["s.csv", "semicolons", "commas"]),
    "empty-target": (write("e2.csv", "a,y\n1,\n2,NA\n"), "e2.csv", [], ["'y'", "empty in every row"]),
    "id-like-target": (write("i.csv", "a,name\n" + "".join(f"{i},p{i}\n" for i in range(30))), "i.csv", [],
                       ["'name'", "different in every row", "--target"]),
    "float-classes": (write("fc.csv", "a,y\n" + "".join(f"{i},{i * 0.37:.3f}\n" for i in range(150))), "fc.csv",
                      ["--task", "classification"], ["'y'", "150 distinct decimal values", "--task regression"]),
    "uneven-after-blank-lines": (write("v.csv", "a,b,y\n\n1,2,0\n\n3,1\n"), "v.csv", [], ["line 5", "2 fields"]),
}


@pytest.mark.parametrize("case", DATA_CASES, ids=str)
def test_bad_data_exit_1(case, workdir, monkeypatch, capsys):
    setup, data, extra, words = DATA_CASES[case]
    if setup:
        setup(workdir)
    check(FIT + ["--data", data, *extra], 1, words, workdir, monkeypatch, capsys)


def test_unreadable_file(workdir, monkeypatch, capsys):
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    path = workdir / "secret.csv"
    path.write_text(CSV)
    path.chmod(0)
    check(FIT + ["--data", "secret.csv"], 1, ["not readable"], workdir, monkeypatch, capsys)


def test_parquet_without_the_extra(workdir, monkeypatch, capsys):
    (workdir / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    check(FIT + ["--data", "d.parquet"], 1, ["pip install pyarrow"], workdir, monkeypatch, capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
@pytest.mark.parametrize("args, words", [(["--device", "cuda"], ["--device cuda", "not available"]),
                                         (["--backend", "nccl"], ["--backend nccl", "not available"])])
def test_cuda_requested_without_cuda(args, words, workdir, monkeypatch, capsys):
    check(FIT + args, 1, words, workdir, monkeypatch, capsys)


def test_partial_torchrun_environment(workdir, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    check(FIT, 2, ["RANK", "WORLD_SIZE", "torchrun"], workdir, monkeypatch, capsys)


def test_batch_not_divisible_by_world_size(workdir, monkeypatch, capsys):
    for name, value in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(name, value)
    check(FIT + ["--batch-size", "33"], 2, ["--batch-size 33", "world size 2"], workdir, monkeypatch, capsys)


CONFIG_CASES = {
    "toml-bool-for-a-number": ("c.toml", "lr = true\n", ["'lr'", "true", "not a number"]),
    "toml-text-for-an-integer": ("c.toml", 'epochs = "3"\n', ["'epochs'", "not an integer"]),
    "toml-float-for-an-integer": ("c.toml", "epochs = 2.5\n", ["'epochs'", "not an integer"]),
    "toml-out-of-range": ("c.toml", "lr_gamma = 3.0\n", ["--lr-gamma", "(0, 1]"]),
    "json-list": ("c.json", "[1, 2]", ["c.json", "list", "not a table"]),
    "json-null-for-a-required-key": ("c.json", '{"lr": null}', ["'lr'", "null"]),
    "json-number-for-a-text": ("c.json", '{"optimizer": 3}', ["'optimizer'", "not a string"]),
}


@pytest.mark.parametrize("case", CONFIG_CASES, ids=str)
def test_bad_config_files_exit_2(case, workdir, monkeypatch, capsys):
    name, text, words = CONFIG_CASES[case]
    (workdir / name).write_text(text)
    check(["fit", "--config", name, "--out", "new"], 2, words, workdir, monkeypatch, capsys)


def test_a_runs_own_config_json_with_nulls_is_accepted(workdir):
    """A run's config.json holds null for unset optional settings: that is "unset", not an error."""
    from ddptrain.config import merge, read_config_file

    cfg = merge(read_config_file(workdir / "old/config.json"), {})
    assert cfg.target is None and cfg.hidden == (8,)


# -- the run folder is never damaged ---------------------------------------------------------------------------
def test_out_holding_a_run(workdir, monkeypatch, capsys):
    check(["fit", "--data", "xor", "--out", "old"], 2, ["already holds a run", "--resume auto"], workdir, monkeypatch,
          capsys)


def test_a_run_without_its_last_checkpoint_is_still_a_run(workdir, monkeypatch, capsys):
    """Without last.pt, --resume auto cannot continue the run: the advice names a checkpoint it can resume."""
    (workdir / "old/checkpoints/last.pt").unlink()
    check(["fit", "--data", "xor", "--out", "old"], 2, ["no last.pt", "--resume old/checkpoints/best.pt"], workdir,
          monkeypatch, capsys)
    check(["fit", "--data", "xor", "--n-samples", "200", "--batch-size", "32", "--hidden", "8", "--out", "old",
           "--resume", "auto"], 2, ["no last.pt", "--resume old/checkpoints/best.pt"], workdir, monkeypatch, capsys)


def test_a_run_without_checkpoints_is_not_sent_to_resume(workdir, monkeypatch, capsys):
    for path in (workdir / "old/checkpoints").iterdir():
        path.unlink()
    check(["fit", "--data", "xor", "--out", "old"], 2, ["already holds a run; it has no checkpoint to continue from, "
                                                        "or pick a new --out"], workdir, monkeypatch, capsys)


def test_a_run_written_before_run_markers_is_recognised(workdir, monkeypatch, capsys):
    (workdir / "old/ddptrain-run.json").unlink()
    check(["fit", "--data", "xor", "--out", "old"], 2, ["already holds a run"], workdir, monkeypatch, capsys)


@pytest.mark.parametrize("own", [["config.json", "metrics.jsonl"], ["notes.txt"]])
def test_out_at_a_folder_that_is_not_a_run_is_refused(own, workdir, monkeypatch, capsys):
    (workdir / "mine").mkdir()
    for name in own:
        (workdir / "mine" / name).write_text('{"mine": true}\n')
    check(["fit", "--data", "xor", "--out", "mine"], 2, ["--out mine", "not a ddptrain run", own[0]], workdir,
          monkeypatch, capsys)
    check(["fit", "--data", "xor", "--out", "mine", "--resume", "auto"], 2, ["not a ddptrain run"], workdir,
          monkeypatch, capsys)


def test_resume_into_another_existing_run_is_refused(workdir, monkeypatch, capsys):
    import shutil

    shutil.copytree(workdir / "old", workdir / "other")
    check(["fit", "--data", "xor", "--n-samples", "200", "--batch-size", "32", "--hidden", "8", "--out", "other",
           "--resume", "old/checkpoints/last.pt"], 2, ["--out other holds another run", "old/checkpoints/last.pt"],
          workdir, monkeypatch, capsys)


def test_resume_another_runs_checkpoint_into_a_new_folder(workdir, monkeypatch, capsys):
    before = files(workdir / "old")
    code, err = run_cli(["fit", "--data", "xor", "--n-samples", "200", "--batch-size", "32", "--hidden", "8",
                         "--epochs", "2", "--out", "branch", "--resume", "old/checkpoints/last.pt", "--quiet"],
                        monkeypatch, capsys)
    assert code == 0, err
    assert files(workdir / "old") == before
    assert (workdir / "branch/ddptrain-run.json").is_file() and (workdir / "branch/checkpoints/last.pt").is_file()


def test_a_held_run_folder_is_refused_naming_the_holder(workdir, monkeypatch, capsys):
    import socket

    from ddptrain.rundir import RunLock

    lock = RunLock(workdir / "old")  # another job (here: this process, on another open file) holds it
    try:
        check(["fit", "--data", "xor", "--n-samples", "200", "--batch-size", "32", "--hidden", "8", "--out", "old",
               "--resume", "auto", "--epochs", "2"], 1,
              ["--out old is in use", f"pid {os.getpid()}", socket.gethostname()], workdir, monkeypatch, capsys)
    finally:
        lock.release()


def test_out_not_writable(workdir, monkeypatch, capsys):
    (workdir / "afile").write_text("x")
    check(["fit", "--data", "xor", "--out", "afile/run"], 1, ["--out", "not writable"], workdir, monkeypatch, capsys)


def test_resume_with_other_architecture(workdir, monkeypatch, capsys):
    check(["fit", "--data", "xor", "--n-samples", "200", "--batch-size", "32", "--out", "old", "--resume", "auto",
           "--hidden", "16,16"], 2, ["hidden", "[8]", "[16, 16]"], workdir, monkeypatch, capsys)


def edited(change):
    """A copy of a good checkpoint with its contents edited by `change(state)`."""
    def make(path: Path, good: Path) -> None:
        state = torch.load(good, weights_only=True)
        change(state)
        torch.save(state, path)
    return make


def _more_classes(state):
    state["data_spec"]["classes"] = [*state["data_spec"]["classes"], "extra"]


def _wrong_shape(state):
    name = next(iter(state["model"]))
    state["model"][name] = torch.zeros(3, 3)


CKPT_CASES = {
    "missing": (None, ["does not exist"]),
    "truncated": (lambda p, good: p.write_bytes(good.read_bytes()[:1000]), ["not a readable torch checkpoint"]),
    "not-torch": (lambda p, good: p.write_text("plain text"), ["not a readable torch checkpoint"]),
    "foreign": (lambda p, good: torch.save({"state_dict": {}}, p), ["not a ddptrain checkpoint"]),
    "newer": (edited(lambda s: s.update(format_version=7)), ["format version 7", "upgrade"]),
    "version-text": (edited(lambda s: s.update(format_version="abc")), ["format_version 'abc'", "bad.pt"]),
    "no-model-spec": (edited(lambda s: s.pop("model_spec")), ["bad.pt", "'model_spec'", "missing"]),
    "classes-vs-outputs": (edited(_more_classes), ["bad.pt", "2 outputs", "3 classes"]),
    "weights-vs-spec": (edited(_wrong_shape), ["bad.pt", "shape (3, 3)"]),
    "features-vs-inputs": (edited(lambda s: s["data_spec"]["preprocessor"]["columns"].pop()),
                           ["bad.pt", "2 inputs", "1 numeric"]),
    "position-text": (edited(lambda s: s["position"].update(epoch="one")), ["bad.pt", "position.epoch"]),
    "spec-type": (edited(lambda s: s["model_spec"].update(hidden=["8"])), ["bad.pt", "model_spec", "widths"]),
    "metrics-list": (edited(lambda s: s.update(metrics=[1, 2])), ["bad.pt", "'metrics'"]),
    "zero-std": (edited(lambda s: s["data_spec"]["preprocessor"]["columns"][0].update(std=[0.0])),
                 ["bad.pt", "deviations must be > 0"]),
}


@pytest.mark.parametrize("case", CKPT_CASES, ids=str)
@pytest.mark.parametrize("command", ["eval", "predict", "inspect"])
def test_bad_checkpoints(case, command, workdir, monkeypatch, capsys):
    make, words = CKPT_CASES[case]
    if make:
        make(workdir / "bad.pt", workdir / "old/checkpoints/last.pt")
    args = {"eval": ["--data", "xor"], "predict": ["--data", "data.csv", "--out", "p.csv"], "inspect": []}[command]
    check([command, "bad.pt", *args], 1, words, workdir, monkeypatch, capsys)


@pytest.mark.parametrize("text, words", [
    ("a,b,y\n1,2,0\n", ["missing x0, x1", "it expects x0, x1"]),
    ("x0,x1,y\n0.1,0.2,0\n0.3,0.4,7\n", ["labels the model never saw", "7"]),
])
def test_eval_data_that_does_not_fit_the_checkpoint(text, words, workdir, monkeypatch, capsys):
    (workdir / "other.csv").write_text(text)
    check(["eval", "old/checkpoints/last.pt", "--data", "other.csv"], 1, words, workdir, monkeypatch, capsys)


@pytest.mark.parametrize("out, words", [("nowhere/p.csv", ["nowhere", "does not exist"]),
                                        ("data.csv", ["already exists", "--overwrite"])])
def test_predict_output_problems(out, words, workdir, monkeypatch, capsys):
    check(["predict", "old/checkpoints/last.pt", "--data", "xor", "--out", out], 1, words, workdir, monkeypatch, capsys)


def test_predict_to_a_folder_with_overwrite(workdir, monkeypatch, capsys):
    (workdir / "preds").mkdir()
    check(["predict", "old/checkpoints/last.pt", "--data", "xor", "--out", "preds", "--overwrite"], 1,
          ["--out preds is a folder"], workdir, monkeypatch, capsys)
    assert list((workdir / "preds").iterdir()) == [] and not list(workdir.glob(".preds*"))


@pytest.mark.parametrize("target", ["old/checkpoints/last.pt", "data.csv"])
def test_predict_never_overwrites_its_own_inputs(target, workdir, monkeypatch, capsys):
    check(["predict", "old/checkpoints/last.pt", "--data", "data.csv", "--out", target, "--overwrite"], 1,
          ["is the", "itself"], workdir, monkeypatch, capsys)


@pytest.mark.parametrize("change, words", [
    (lambda s: s.update(rng=[]), ["random-number state"]),
    (lambda s: s["optimizer"]["param_groups"].append(dict(s["optimizer"]["param_groups"][0])), ["optimizer state"]),
    (lambda s: s.update(world_size="two"), ["world size"]),
])
def test_resume_from_a_checkpoint_whose_state_does_not_fit(change, words, workdir, monkeypatch, capsys):
    edited(change)(workdir / "old/checkpoints/last.pt", workdir / "old/checkpoints/last.pt")
    check(["fit", "--data", "xor", "--n-samples", "200", "--batch-size", "32", "--hidden", "8", "--out", "old",
           "--resume", "auto", "--epochs", "2"], 1, ["cannot resume old/checkpoints/last.pt", *words], workdir,
          monkeypatch, capsys)


@pytest.mark.parametrize("args, words", [(["--device", "tpu"], ["--device", "'tpu'", "'auto', 'cpu', 'cuda'"]),
                                         (["--seed", "-3"], ["--seed -3", "from 0"])])
def test_eval_flags_are_checked(args, words, workdir, monkeypatch, capsys):
    check(["eval", "old/checkpoints/last.pt", "--data", "xor", *args], 2, words, workdir, monkeypatch, capsys)


def test_a_config_in_a_checkpoint_that_does_not_validate(workdir, monkeypatch, capsys):
    edited(lambda s: s["config"].update(lr=-1.0))(workdir / "bad.pt", workdir / "old/checkpoints/last.pt")
    check(["eval", "bad.pt", "--data", "xor"], 1, ["bad.pt", "training config is invalid", "--lr"], workdir,
          monkeypatch, capsys)


def test_plot_of_a_data_file_is_an_error(workdir, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    check(["plot", "data.csv", "--out", "c.png"], 1, ["data.csv", "no ddptrain metric rows"], workdir, monkeypatch,
          capsys)
    assert not (workdir / "c.png").exists()


def test_user_text_with_rich_markup_is_shown_literally(workdir, monkeypatch, capsys):
    """Column names and paths like `speed [m/s]` or `[/x]` are printed as they are, never read as markup."""
    (workdir / "m.csv").write_text("speed [m/s],[bold]x[/bold],label\n" +
                                   "".join(f"{i % 7},{i % 3},{'[red]a' if i % 2 else 'b[/]'}\n" for i in range(64)))
    code, err = run_cli(["fit", "--data", "m.csv", "--epochs", "1", "--batch-size", "16", "--out", "[/odd]run"],
                        monkeypatch, capsys)
    assert code == 0, err
    for command in (["inspect"], ["eval", "--data", "m.csv"]):
        monkeypatch.setattr(sys, "argv", ["ddptrain", command[0], "[/odd]run/checkpoints/last.pt", *command[1:]])
        with pytest.raises(SystemExit) as exited:
            main()
        shown = capsys.readouterr()
        assert exited.value.code == 0, shown.err
        assert "[/odd]run" in shown.out
        assert ("speed [m/s]" in shown.out) if command[0] == "inspect" else ("[red]a" in shown.out)


def test_user_text_in_tables_is_literal(capsys):
    from ddptrain.console import console

    console.table("[/odd]", [("speed [m/s]", "[bold]x[/bold]")], force=True)
    out = capsys.readouterr().out
    assert "[/odd]" in out and "speed [m/s]" in out and "[bold]x[/bold]" in out


def test_traceback_with_debug(workdir, monkeypatch, capsys):
    # --debug sets DDPTRAIN_DEBUG for the workers it may start; monkeypatch restores this process's (unset) after
    monkeypatch.setenv("DDPTRAIN_DEBUG", "0")
    exit_code, err = run_cli(["--debug", "fit", "--data", "nope.csv"], monkeypatch, capsys)
    assert exit_code == 1 and "Traceback" in err and "error: data file nope.csv" in err


@pytest.mark.slow
def test_disk_full_during_checkpoint_keeps_the_previous_one(tmp_path):
    """A file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored) makes the checkpoint write fail like a full disk."""
    import resource
    import signal
    import subprocess

    from conftest import clean_env

    from ddptrain.checkpoint import load_checkpoint

    args = [sys.executable, "-m", "ddptrain", "fit", "--data", "xor", "--n-samples", "256", "--hidden", "128,128",
            "--batch-size", "32", "--optimizer", "sgd", "--quiet", "--out", "run"]
    env = clean_env(PYTHONDONTWRITEBYTECODE="1")
    first = run_command(args + ["--epochs", "1"], tmp_path, env, 120)
    assert first.returncode == 0, first.stderr
    last = tmp_path / "run/checkpoints/last.pt"
    before = last.read_bytes()
    assert len(before) > 100_000

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

    full = subprocess.run(args + ["--epochs", "3", "--resume", "auto"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120, preexec_fn=limit_file_size)
    assert full.returncode == 1
    errors = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "could not write checkpoint" in errors[0] and "intact" in errors[0], full.stderr
    assert "Traceback" not in full.stderr
    assert last.read_bytes() == before
    assert load_checkpoint(last)["position"]["epoch"] == 1
    assert not any(p.name.startswith(".last.pt.tmp") for p in last.parent.iterdir())
