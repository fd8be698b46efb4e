"""Real torchrun jobs with Gloo process groups on CPU: invariance, rank-0 output, eval sharding, failures."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import clean_env, cli, epoch_rows, error_lines, read_metrics, run_command, shared_run, torchrun

from ddptrain.checkpoint import load_checkpoint

COMMON = ["--data", "blobs", "--n-samples", "1000", "--n-features", "6", "--n-classes", "3", "--hidden", "32,32",
          "--batch-size", "64", "--epochs", "3", "--optimizer", "sgd", "--lr", "0.05", "--log-every", "5",
          "--scheduler", "constant"]  # a resume that adds epochs continues the same rate


def one_process_run(root) -> Path:
    """COMMON trained on one process (once per test session; copy it before changing it)."""
    return shared_run(root, [sys.executable, "-m", "ddptrain", "fit", *COMMON, "--out", "run", "--quiet"])[0]


@pytest.mark.slow
@pytest.mark.parametrize("shuffle", ["exact", "block"])
def test_loss_does_not_depend_on_world_size(tmp_path, shuffle):
    one = cli("fit", *COMMON, "--shuffle", shuffle, "--out", "ws1", cwd=tmp_path)
    two = cli("fit", *COMMON, "--shuffle", shuffle, "--out", "ws2", "--nproc-per-node", "2", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    rows1, rows2 = epoch_rows(tmp_path / "ws1"), epoch_rows(tmp_path / "ws2")
    assert len(rows1) == len(rows2) == 3
    for a, b in zip(rows1, rows2):
        for key in ("train_loss", "val_loss", "val_accuracy"):
            assert math.isclose(a[key], b[key], rel_tol=1e-4), (key, a[key], b[key])
    w1 = load_checkpoint(tmp_path / "ws1/checkpoints/last.pt")["model"]
    w2 = load_checkpoint(tmp_path / "ws2/checkpoints/last.pt")["model"]
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)
    # rank 0 alone prints: the header and the summary appear once
    assert two.stdout.count("ddptrain fit: world size 2") == 1
    assert two.stdout.count("ddptrain fit: done") == 1
    steps = [r["step"] for r in read_metrics(tmp_path / "ws2") if r["kind"] == "step"]
    assert steps == sorted(set(steps))  # one writer: no row twice


@pytest.mark.slow
def test_a_bagged_small_table_trains_alike_on_1_and_2_processes(tmp_path):
    """Bagging's folds, masked losses, per-member fold losses and out-of-fold metrics at world sizes 1 and 2 (the
    forked workers of --nproc-per-node), and eval of the two checkpoints."""
    from conftest import nproc_cmd, real_table

    real_table(tmp_path / "train.csv", rows=240)
    real_table(tmp_path / "test.csv", rows=40, seed=7)
    args = ["--data", "train.csv", "--target", "label", "--epochs", "4", "--hidden", "16", "--early-stop", "0"]
    one = cli("fit", *args, "--out", "ws1", cwd=tmp_path)
    two = run_command(nproc_cmd(2, "fit", *args, "--out", "ws2"), tmp_path, clean_env(), 240)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("bagging: 5 models") == 1
    rows1, rows2 = epoch_rows(tmp_path / "ws1"), epoch_rows(tmp_path / "ws2")
    assert len(rows1) == len(rows2) == 4
    for a, b in zip(rows1, rows2):
        for key in ("train_loss", "val_loss", "val_accuracy"):
            assert math.isclose(a[key], b[key], rel_tol=1e-4), (key, a[key], b[key])
        assert all(math.isclose(x, y, rel_tol=1e-4) for x, y in zip(a["member_val_loss"], b["member_val_loss"]))
    scores = [json.loads(cli("eval", f"ws{n}/checkpoints/best.pt", "--data", "test.csv", "--json",
                             cwd=tmp_path).stdout) for n in (1, 2)]
    assert math.isclose(scores[0]["loss"], scores[1]["loss"], rel_tol=1e-4)


@pytest.mark.slow
def test_nproc_per_node_launches_workers_on_free_ports(tmp_path):
    # two jobs at once on one machine: each gets its own rendezvous port
    args = ["fit", "--data", "xor", "--n-samples", "400", "--epochs", "2", "--nproc-per-node", "2", "--quiet"]
    # workers forked from the agent (CPU machines' default) and spawned (where CUDA devices are)
    jobs = [subprocess.Popen([sys.executable, "-m", "ddptrain", *args, "--out", f"job{i}"], cwd=tmp_path,
                             env=clean_env(DDPTRAIN_WORKER_START=method), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
            for i, method in enumerate(("fork", "spawn"))]
    from ddptrain.run import usable_cores

    for job in jobs:
        out, err = job.communicate(timeout=240)
        assert job.returncode == 0, err
        # on a machine with under two cores a worker, rank 0 says once that one process is usually faster
        assert err.count("2 workers on this machine's") == (1 if usable_cores() < 4 else 0), err
    for i in range(2):
        state = load_checkpoint(tmp_path / f"job{i}/checkpoints/last.pt")
        assert state["world_size"] == 2 and len(epoch_rows(tmp_path / f"job{i}")) == 2
    # either way, its workers train exactly as torchrun's
    reference = torchrun(2, *args[:args.index("--nproc-per-node")], "--quiet", "--out", "tr", cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr
    a, b, c = (load_checkpoint(tmp_path / f"{name}/checkpoints/last.pt")["model"] for name in ("job0", "job1", "tr"))
    assert a.keys() == b.keys() == c.keys() and all(torch.equal(a[k], c[k]) and torch.equal(b[k], c[k]) for k in a)


@pytest.mark.slow
def test_eval_under_torchrun_equals_one_process(tmp_path, shared_root):
    ckpt = str(one_process_run(shared_root) / "checkpoints/last.pt")
    # 1001 rows do not divide by 2: each row must still count once
    import numpy as np
    rng = np.random.default_rng(7)
    x = rng.normal(size=(1001, 6))
    y = rng.integers(0, 3, size=1001)
    lines = ["x0,x1,x2,x3,x4,x5,y"] + [",".join(f"{v:.6f}" for v in row) + f",{label}" for row, label in zip(x, y)]
    (tmp_path / "test.csv").write_text("\n".join(lines) + "\n")
    args = ["eval", ckpt, "--data", "test.csv", "--json"]
    single, double = cli(*args, cwd=tmp_path), torchrun(2, *args, cwd=tmp_path)
    assert single.returncode == 0 and double.returncode == 0, single.stderr + double.stderr
    a = json.loads(single.stdout.strip().splitlines()[-1])
    b = json.loads(next(l for l in double.stdout.splitlines() if l.startswith("{")))
    assert a["rows"] == b["rows"] == 1001
    assert a["confusion"] == b["confusion"]
    assert math.isclose(a["loss"], b["loss"], rel_tol=1e-6) and a["accuracy"] == b["accuracy"]
    assert len([l for l in double.stdout.splitlines() if l.startswith("{")]) == 1


@pytest.mark.slow
def test_one_rank_raising_ends_the_job_with_its_message_once(tmp_path):
    env = clean_env(DDPTRAIN_FAIL_AT_STEP="1:7")
    result = torchrun(2, "fit", *COMMON, "--out", "run", "--timeout", "60", cwd=tmp_path, env=env, timeout=240)
    assert result.returncode != 0
    # promptly: the peer sees the closed connection at once, well before the 60 s --timeout would end it
    # (timed from the start of training, when config.json is written, not from process start-up)
    assert time.time() - (tmp_path / "run/config.json").stat().st_mtime < 50
    errors = error_lines(result.stderr)
    assert errors == ["error: [rank 1] RuntimeError: injected failure at step 7 (DDPTRAIN_FAIL_AT_STEP) "
                      "(rerun with --debug for the traceback)"], result.stderr[-3000:]
    assert "ddptrain/train.py" not in result.stderr  # no worker traceback (torchrun's own summary aside)


@pytest.mark.slow
def test_bad_input_under_torchrun_is_reported_once(tmp_path):
    result = torchrun(2, "fit", "--data", "missing.csv", cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert error_lines(result.stderr) == ["error: data file missing.csv does not exist; check the path"]
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_resume_at_another_world_size(tmp_path, shared_root):
    shutil.copytree(one_process_run(shared_root), tmp_path / "run")
    more = list(COMMON)
    more[more.index("--epochs") + 1] = "5"
    resumed = cli("fit", *more, "--out", "run", "--resume", "auto", "--nproc-per-node", "2", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    notes = [line for line in resumed.stdout.splitlines() if "world-size-1 checkpoint at world size 2" in line]
    assert len(notes) == 1
    straight = cli("fit", *more, "--out", "straight", "--quiet", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    a = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    b = load_checkpoint(tmp_path / "straight/checkpoints/last.pt")
    assert a["position"]["epoch"] == 5 and a["world_size"] == 2
    assert all(torch.allclose(a["model"][k], b["model"][k], atol=1e-4) for k in a["model"])
    assert [r["epoch"] for r in epoch_rows(tmp_path / "run")] == [1, 2, 3, 4, 5]


@pytest.mark.slow
@pytest.mark.parametrize("shuffle, more", [("exact", []), ("block", ["--numeric-bins", "4"])])
def test_a_real_table_trains_alike_on_1_and_2_processes_and_predicts_from_the_raw_file(tmp_path, shuffle, more):
    """Text categories, dates, booleans and empty cells, with only --target: the same losses at world sizes 1 and
    2, then eval and predict on a raw test file with a level never seen in training (and with numeric pieces,
    whose edges every rank fits alike)."""
    from conftest import real_table

    real_table(tmp_path / "train.csv", rows=240)
    real_table(tmp_path / "test.csv", rows=40, seed=7, cities=("Paris", "Rome", "Kyiv"))
    args = ["fit", "--data", "train.csv", "--target", "label", "--epochs", "3", "--batch-size", "32", "--lr", "0.01",
            "--val-fraction", "0.2", "--shuffle", shuffle, *more]  # from the memory-mapped prepared-table cache
    one = cli(*args, "--out", "ws1", cwd=tmp_path)
    two = cli(*args, "--out", "ws2", "--nproc-per-node", "2", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert "target 'label' (classification, 2 classes)" in one.stdout
    assert "note: column 'name' is dropped" in one.stderr and two.stderr.count("note: column 'name'") == 1
    for a, b in zip(epoch_rows(tmp_path / "ws1"), epoch_rows(tmp_path / "ws2")):
        for key in ("train_loss", "val_loss", "val_accuracy"):
            assert math.isclose(a[key], b[key], rel_tol=1e-4), (key, a[key], b[key])
    scored = cli("eval", "ws2/checkpoints/last.pt", "--data", "test.csv", "--json", cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["rows"] == 40
    assert "column 'city'" in scored.stderr and "not learnt in training" in scored.stderr
    predicted = cli("predict", "ws2/checkpoints/last.pt", "--data", "test.csv", "--out", "p.csv", cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == "prediction,prob_high,prob_low" and len(lines) == 41


@pytest.mark.slow
def test_a_builtin_name_is_never_shadowed_by_a_folder_and_a_run_folder_is_never_data(tmp_path):
    """`--data spirals --out spirals` under 2 processes: rank 0 makes the run folder `spirals` while rank 1 reads
    `--data`; both must still take the built-in (a race that failed about one run in three). A folder of that
    name made beforehand does not shadow it either, and a run folder given as --data is one error line."""
    (tmp_path / "moons").mkdir()
    for data, launch in (("spirals", "torchrun"), ("moons", "nproc-per-node")):  # each launcher once
        args = ("fit", "--data", data, "--out", data, "--epochs", "1", "--n-samples", "400")
        done = torchrun(2, *args, cwd=tmp_path) if launch == "torchrun" else \
            cli(*args, "--nproc-per-node", "2", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert "2 classes" in done.stdout
    refused = cli("fit", "--data", "./spirals", "--out", "again", cwd=tmp_path)
    assert refused.returncode == 1
    assert error_lines(refused.stderr) == ["error: --data ./spirals is a ddptrain run folder, not a table; pass the "
                                           "table's file or folder"]
