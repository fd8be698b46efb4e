"""Checkpoints: safe loading, atomic saves under a real SIGKILL, eval/predict/inspect from the file alone."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, clean_env, cli, error_lines, in_process, same_predictions

from ddptrain.checkpoint import FORMAT_NAME, load_checkpoint, save_atomic
from ddptrain.config import FitConfig
from ddptrain.run import fit


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model trained on a CSV with string labels."""
    import numpy as np

    folder = tmp_path_factory.mktemp("trained")
    rng = np.random.default_rng(0)

    def write(path, n):
        x = rng.normal(size=(n, 3))
        label = np.where(x[:, 0] + 0.5 * x[:, 1] > 0, "malignant", "benign")
        rows = [f"{i},{a:.5f},{b:.5f},{c:.5f},{d}" for i, ((a, b, c), d) in enumerate(zip(x, label))]
        path.write_text("\n".join(["id,radius,texture,smooth,diagnosis"] + rows) + "\n")

    write(folder / "train.csv", 600)
    write(folder / "test.csv", 201)
    # the id column would be a feature; train without it
    lines = (folder / "train.csv").read_text().splitlines()
    (folder / "train_noid.csv").write_text("\n".join(",".join(l.split(",")[1:]) for l in lines) + "\n")
    fit(FitConfig(data=str(folder / "train_noid.csv"), epochs=6, hidden=(16,), batch_size=32, quiet=True,
                  scheduler="constant", out=str(folder / "run")))
    return folder


def test_checkpoint_loads_with_weights_only_and_holds_everything(trained):
    state = torch.load(trained / "run/checkpoints/last.pt", weights_only=True)
    assert state["format"] == FORMAT_NAME
    for key in ("model", "model_spec", "data_spec", "optimizer", "scheduler", "scaler", "position", "rng", "config",
                "world_size", "torch_version", "ddptrain_version", "metrics"):
        assert key in state
    assert state["data_spec"]["classes"] == ["benign", "malignant"]
    assert isinstance(state["rng"][0]["torch"], torch.Tensor)


@pytest.mark.slow
def test_pickle_payload_is_refused_and_never_runs(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": FORMAT_NAME, "format_version": 1, "x": Payload()}, evil)
    monkeypatch.chdir(tmp_path)
    for command in (["inspect"], ["eval", "--data", "xor"], ["predict", "--data", "xor", "--out", "p.csv"]):
        for forced in ("0", "1"):  # torch reads TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD at each load
            monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", forced)
            code, err = in_process(monkeypatch, capsys, command[0], "evil.pt", *command[1:])
            assert code == 1
            lines = error_lines(err)
            assert len(lines) == 1 and "Traceback" not in err
            # the verdict is in the message itself, not in a path that happens to hold the word
            assert lines[0].startswith("error: checkpoint evil.pt was refused: it holds pickled objects"), lines
            assert not marker.exists() and not (tmp_path / "p.csv").exists()


def as_in_a_terminal(command: list[str], **popen) -> subprocess.Popen:
    """Start `command` with Ctrl-C's default action even where this suite runs in the background (`cmd &` starts
    with SIGINT ignored, which children inherit, and Python then installs no KeyboardInterrupt handler): a handled
    signal is reset to the default at exec, an ignored one is not."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(command, **popen)
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_during_predict_removes_the_partial_file_and_says_so(sig, trained, tmp_path):
    """A real SIGINT (or a scheduler's SIGTERM) while predictions are being written: exit 130, one line, no
    temporary file, --out untouched."""
    import numpy as np

    rows = 400_000
    x = np.random.default_rng(1).normal(size=(rows, 3))
    big = tmp_path / "big.csv"
    with open(big, "w") as handle:
        handle.write("radius,texture,smooth\n")
        np.savetxt(handle, x, fmt="%.5f", delimiter=",")
    out = tmp_path / "preds.csv"
    out.write_text("an earlier file the user keeps\n")
    proc = as_in_a_terminal([sys.executable, "-m", "ddptrain", "predict", str(trained / "run/checkpoints/last.pt"),
                             "--data", str(big), "--out", str(out), "--overwrite"], cwd=tmp_path, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".preds.csv.tmp-*")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert error_lines(err) == [f"error: interrupted; --out {out} was not written (the partial file was removed)"]
    assert out.read_text() == "an earlier file the user keeps\n"
    assert not list(tmp_path.glob(".preds.csv.tmp-*"))



@pytest.mark.slow
def test_ctrl_c_during_eval_says_so_and_leaves_no_cache_entry(trained, tmp_path):
    """A real SIGINT while `eval` prepares its rows into the cache: one `error: interrupted` line and exit 130
    (Typer alone would exit 130 in silence), and no half-built cache entry left behind."""
    import numpy as np

    rows = 400_000
    x = np.random.default_rng(1).normal(size=(rows, 3))
    label = np.where(x[:, 0] > 0, "malignant", "benign")
    big = tmp_path / "big.csv"
    with open(big, "w") as handle:
        handle.write("radius,texture,smooth,diagnosis\n")
        handle.writelines(f"{a:.5f},{b:.5f},{c:.5f},{d}\n" for (a, b, c), d in zip(x, label))
    cache = tmp_path / "cache"
    proc = as_in_a_terminal([sys.executable, "-m", "ddptrain", "eval", str(trained / "run/checkpoints/last.pt"),
                             "--data", str(big), "--cache-dir", str(cache)], cwd=tmp_path, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(cache.glob("*/*.tmp-*")) + list(cache.glob("*.tmp-*")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert error_lines(err) == ["error: interrupted"], err
    assert "Traceback" not in err
    assert not list(cache.rglob("*.tmp-*"))

SAVER = """
import sys, torch
from pathlib import Path
from ddptrain.checkpoint import save_atomic
path = Path(sys.argv[1])
i = 0
print("ready", flush=True)
while True:
    i += 1
    save_atomic({"i": i, "w": torch.full((2_000_000,), float(i))}, path)
"""


@pytest.mark.slow
def test_sigkill_during_save_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_atomic({"i": 0, "w": torch.zeros(2_000_000)}, path)
    for delay in (0.05, 0.13, 0.27, 0.4, 0.61):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], stdout=subprocess.PIPE, env=clean_env(),
                                cwd=ROOT)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = torch.load(path, weights_only=True)
        assert torch.all(state["w"] == float(state["i"]))
    # the torn temporary files never replace the checkpoint
    assert all(p.name == "last.pt" or p.name.startswith(".last.pt.tmp") for p in tmp_path.iterdir())


@pytest.mark.slow
def test_eval_json_and_direct_computation_agree(trained):
    with_id = cli("eval", "run/checkpoints/last.pt", "--data", "test.csv", "--json", "--no-cache", cwd=trained)
    # the test file has an id column the model never saw as a feature: ignored, with one note naming it
    assert with_id.returncode == 0, with_id.stderr
    assert with_id.stderr.count("note: column 'id' of the file is not used by the model and ignored") == 1
    lines = (trained / "test.csv").read_text().splitlines()
    (trained / "test_noid.csv").write_text("\n".join(",".join(l.split(",")[1:]) for l in lines) + "\n")
    result = cli("eval", "run/checkpoints/last.pt", "--data", "test_noid.csv", "--json", cwd=trained)
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert json.loads(with_id.stdout) == metrics
    # the same numbers computed by hand from the checkpoint
    from ddptrain.checkpoint import inference_model
    from ddptrain.data import labelled_split, load_table

    model, spec, _ = inference_model(load_checkpoint(trained / "run/checkpoints/last.pt"), torch.device("cpu"))
    split = labelled_split(spec, load_table(str(trained / "test_noid.csv"), 0, 0))
    with torch.no_grad():
        logits = model(split.x)
    assert metrics["rows"] == 201
    assert metrics["accuracy"] == pytest.approx((logits.argmax(1) == split.y).float().mean().item())
    assert metrics["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, split.y).item(), rel=1e-5)
    assert metrics["accuracy"] > 0.9
    assert set(metrics["per_class"]) == {"benign", "malignant"}


@pytest.mark.slow
def test_predict_speaks_the_original_labels(trained):
    out = trained / "pred.csv"
    result = cli("predict", "run/checkpoints/last.pt", "--data", "test.csv", "--out", str(out), "--id-column", "id",
                 cwd=trained)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(out.open()))
    truth = list(csv.DictReader((trained / "test.csv").open()))
    assert [r["id"] for r in rows] == [t["id"] for t in truth]  # input order kept
    assert set(r["prediction"] for r in rows) <= {"benign", "malignant"}
    assert all(abs(float(r["prob_benign"]) + float(r["prob_malignant"]) - 1) < 1e-4 for r in rows)
    agree = sum(r["prediction"] == t["diagnosis"] for r, t in zip(rows, truth)) / len(rows)
    assert agree > 0.9
    again = cli("predict", "run/checkpoints/last.pt", "--data", "test.csv", "--out", str(out), "--id-column", "id",
                cwd=trained)
    assert again.returncode == 1 and "already exists" in again.stderr


def _predict(ckpt, data, out, chunk, monkeypatch, keep=()):
    from ddptrain import evaluate

    monkeypatch.setattr(evaluate, "PREDICT_CHUNK", chunk)
    evaluate.predict_to_csv(ckpt, str(data), out, keep, overwrite=True)
    return out.read_text()


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_predict_in_pieces_writes_what_predict_whole_writes(suffix, tmp_path, monkeypatch, capsys):
    """A file read in pieces of 7 rows (several shards too) gives the same file as one piece: the same rows, labels
    and kept columns, and probabilities equal to their last printed digit (a matrix product's rounding may
    differ with the number of rows it multiplies); the id column rides along and unseen levels are counted once
    over all pieces."""
    from conftest import real_table
    from ddptrain.tables import read_table

    fit(FitConfig(data=str(real_table(tmp_path / "train.csv", rows=150)), target="label", epochs=2, hidden=(8,),
                  quiet=True, out=str(tmp_path / "run")))
    ckpt = tmp_path / "run/checkpoints/last.pt"
    new = real_table(tmp_path / "new.csv", rows=40, seed=3, cities=("Paris", "Kyiv"))
    if suffix == "parquet":
        pq = pytest.importorskip("pyarrow.parquet")
        import pyarrow.csv as pacsv

        (tmp_path / "shards").mkdir()
        whole = pacsv.read_csv(new)
        pq.write_table(whole.slice(0, 25), tmp_path / "shards/a.parquet")
        pq.write_table(whole.slice(25), tmp_path / "shards/b.parquet")
        new = tmp_path / "shards"
    capsys.readouterr()
    one = _predict(ckpt, new, tmp_path / "one.csv", 10 ** 6, monkeypatch, keep=("name",))
    notes_one = capsys.readouterr().err
    pieces = _predict(ckpt, new, tmp_path / "pieces.csv", 7, monkeypatch, keep=("name",))
    notes_pieces = capsys.readouterr().err
    assert same_predictions(pieces, one), (pieces, one)
    assert len(one.splitlines()) == 41 and one.splitlines()[1].startswith("person 0,")
    assert notes_pieces == notes_one and notes_one.count("column 'city'") == 1 and len(read_table(str(new))) == 40


def test_predict_keeps_input_columns_as_the_file_has_them(tmp_path, monkeypatch, capsys):
    """--keep carries named input columns (or all) before the predictions, cells as the file wrote them: whole
    numbers without '.0', dates in ISO form, missing cells empty; the same file in pieces. Empty names, unknown
    columns and a name that clashes with predict's own columns are one usage line each."""
    from conftest import REAL_HEADER, real_table
    from ddptrain.errors import UsageError

    fit(FitConfig(data=str(real_table(tmp_path / "train.csv", rows=150)), target="label", epochs=2, hidden=(8,),
                  quiet=True, out=str(tmp_path / "run")))
    ckpt = tmp_path / "run/checkpoints/last.pt"
    new = real_table(tmp_path / "new.csv", rows=30, seed=3)
    source = list(csv.reader(new.open()))
    header = source[0]
    rows = list(csv.DictReader(io.StringIO(_predict(ckpt, new, tmp_path / "a.csv", 7, monkeypatch, keep="all"))))
    assert list(rows[0])[:len(header)] == header and list(rows[0])[len(header):] == ["prediction", "prob_high", "prob_low"]
    assert len(rows) == 30
    for row, cells in zip(rows, source[1:]):
        for name, cell in zip(header, cells):
            written = row[name]
            if name in ("joined", "since"):  # dates: ISO, whatever the file's spelling
                assert written == ("" if not cell else cell.replace("/", "-"))
            elif name == "vip":
                assert written == cell.lower()
            elif name == "age":  # every NA token is a missing cell
                assert written == (cell if cell.isdigit() else "")
            elif name == "income":  # the number, without trailing zeros
                assert float(written) == float(cell) and not written.endswith(".00")
            else:
                assert written == cell, (name, cell, written)
    some = _predict(ckpt, new, tmp_path / "b.csv", 10 ** 6, monkeypatch, keep=("label", "name"))
    assert some.splitlines()[0] == "label,name,prediction,prob_high,prob_low"
    assert [r["prediction"] for r in csv.DictReader(io.StringIO(some))] == [r["prediction"] for r in rows]
    capsys.readouterr()
    for args, message in ((["--keep", "name,"], "--keep 'name,' holds an empty name"),
                          (["--id-column", ""], "--id-column '' names no column"),
                          (["--keep", "Name"], "--keep: 'Name' (did you mean 'name'?) is not a column"),
                          (["--keep", "name,name"], "--keep names 'name' twice")):
        code, err = in_process(monkeypatch, capsys, "predict", str(ckpt), "--data", str(new), "--out",
                               str(tmp_path / "c.csv"), *args)
        assert code == 2 and message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "c.csv").exists()
    clash = tmp_path / "clash.csv"
    clash.write_text(new.read_text().replace(REAL_HEADER, REAL_HEADER.replace("name", "prediction", 1), 1))
    with pytest.raises(UsageError, match="the input column 'prediction' would share its name"):
        _predict(ckpt, clash, tmp_path / "d.csv", 7, monkeypatch, keep="all")


def test_eval_in_pieces_scores_what_eval_whole_scores(tmp_path, monkeypatch, capsys):
    """Pieces of 9 rows, one of them without any target: the same metrics as one piece, and one note per kind."""
    from conftest import real_table
    from ddptrain import evaluate

    fit(FitConfig(data=str(real_table(tmp_path / "train.csv", rows=150)), target="label", epochs=2, hidden=(8,),
                  quiet=True, out=str(tmp_path / "run")))
    new = real_table(tmp_path / "new.csv", rows=60, seed=3, cities=("Paris", "Kyiv"))
    lines = new.read_text().splitlines()
    lines[1:10] = [line.rsplit(",", 1)[0] + "," for line in lines[1:10]]  # a first piece without any label
    new.write_text("\n".join(lines) + "\n")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow.csv as pacsv

    pq.write_table(pacsv.read_csv(new), tmp_path / "new.parquet")  # row batches of exactly 9
    new = tmp_path / "new.parquet"
    ckpt = tmp_path / "run/checkpoints/last.pt"
    results = []
    for chunk in (10 ** 6, 9):
        monkeypatch.setattr(evaluate, "PREDICT_CHUNK", chunk)
        capsys.readouterr()
        results.append((evaluate.evaluate_checkpoint(ckpt, str(new), None, True, "cpu"), capsys.readouterr().err))
    (whole, notes_whole), (pieces, notes_pieces) = results
    assert whole["rows"] == 51 and pieces["loss"] == pytest.approx(whole["loss"], rel=1e-6)  # summed in pieces
    assert pieces["log_loss"] == pytest.approx(whole["log_loss"], rel=1e-6)
    assert {k: v for k, v in pieces.items() if "loss" not in k} == {k: v for k, v in whole.items() if "loss" not in k}
    assert notes_pieces == notes_whole and notes_whole.count("9 of 60 rows have no 'label' value") == 1


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_eval_and_predict_keep_a_files_prepared_rows_and_trust_only_a_sound_cache(task, tmp_path, monkeypatch,
                                                                                   capsys):
    """The first eval (or predict) of a file writes its rows as the checkpoint prepares them to the cache; the
    next one maps them: the same metrics, notes and predictions as reading the file, byte for byte. A changed
    file gets a new entry; a damaged one is rebuilt; --id-column reads the file itself."""
    from conftest import real_table
    from ddptrain import evaluate

    monkeypatch.setattr(evaluate, "PREDICT_CHUNK", 11)
    target, drop = ("label", ()) if task == "classification" else ("income", ("label",))
    fit(FitConfig(data=str(real_table(tmp_path / "train.csv", rows=150)), target=target, drop=drop, epochs=2,
                  hidden=(8,), quiet=True, out=str(tmp_path / "run")))
    ckpt = tmp_path / "run/checkpoints/last.pt"
    new = real_table(tmp_path / "new.csv", rows=60, seed=3, cities=("Paris", "Kyiv"))
    lines = new.read_text().splitlines()
    lines[1:4] = [",".join(line.split(",")[:-2 if task == "regression" else -1] + [""] +
                           ([line.split(",")[-1]] if task == "regression" else [])) for line in lines[1:4]]
    new.write_text("\n".join(lines) + "\n")  # three rows without a target: not scored, one note
    cache = tmp_path / "cache"

    def both(cache_dir):
        capsys.readouterr()
        metrics = evaluate.evaluate_checkpoint(ckpt, str(new), None, True, "cpu", cache_dir)
        out = tmp_path / f"p{len(list(tmp_path.glob('p*.csv')))}.csv"
        evaluate.predict_to_csv(ckpt, str(new), out, (), False, cache_dir)
        return metrics, out.read_text(), capsys.readouterr().err

    plain = both(None)
    assert not cache.exists()
    first = both(cache)
    entries = sorted(p for p in cache.iterdir() if p.is_dir())
    assert len(entries) == 2 and all((e / "x.bin").exists() for e in entries)  # one for eval, one for predict
    stamps = [e.stat().st_mtime_ns for e in entries]
    again = both(cache)
    assert [e.stat().st_mtime_ns for e in entries] == stamps  # mapped, not rebuilt
    for got in (first, again):
        assert got[0]["rows"] == plain[0]["rows"] == 57
        numbers = {k for k, v in plain[0].items() if isinstance(v, float)}  # sums taken in other pieces
        assert {k: got[0][k] for k in numbers} == pytest.approx({k: plain[0][k] for k in numbers}, rel=1e-6)
        assert {k: v for k, v in got[0].items() if k not in numbers} == \
            {k: v for k, v in plain[0].items() if k not in numbers}
        assert same_predictions(got[1], plain[1]) and got[2] == plain[2]
    assert "3 of 60 rows have no" in plain[2] and "column 'city'" in plain[2]
    (entries[0] / "meta.json").write_text("{")  # damaged: rebuilt, never trusted
    assert same_predictions(both(cache)[1], plain[1])
    new.write_text(new.read_text() + lines[5] + "\n")  # the file changed: a new entry, the new row counted
    assert both(cache)[1].count("\n") == plain[1].count("\n") + 1
    out = tmp_path / "ids.csv"
    evaluate.predict_to_csv(ckpt, str(new), out, ("name",), False, cache)
    assert out.read_text().splitlines()[1].startswith("person 0,")


def test_predict_reads_a_csv_whole_when_its_types_change_after_the_first_block(tmp_path, monkeypatch, capsys):
    """Numbers in the first block, text further down: the streamed read gives up and the file is read whole, as
    before; the text cells are missing values, counted in one note."""
    rows = ["a,b,y"] + [f"{i % 13},{i % 7},{'xy'[i % 2]}" for i in range(300)]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    fit(FitConfig(data=str(tmp_path / "t.csv"), target="y", epochs=1, hidden=(4,), quiet=True,
                  out=str(tmp_path / "run")))
    late = ["a,b"] + [f"{i % 13},{i % 7}" for i in range(3000)] + ["oops,1"]
    (tmp_path / "late.csv").write_text("\n".join(late) + "\n")
    capsys.readouterr()
    text = _predict(tmp_path / "run/checkpoints/last.pt", tmp_path / "late.csv", tmp_path / "p.csv", 50, monkeypatch)
    assert len(text.splitlines()) == 3002
    assert "column 'a': 1 cells hold values that are not numbers (treated as missing)" in capsys.readouterr().err


@pytest.mark.slow
def test_inspect(trained):
    result = cli("inspect", "run/checkpoints/last.pt", "--json", cwd=trained)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    # a 600-row table file: 4-fold cross-validation chose 16 pieces per number (3 numbers -> 3 x 17 inputs), and
    # it is bagged: 5 models
    assert info["architecture"].startswith("MLP 51-16-2 (16 pieces per number) x 5 (bagged), relu")
    assert info["parameters"] == 5 * (51 * 16 + 16 + 16 * 2 + 2)  # the edges and best weights are buffers
    assert info["classes"] == ["benign", "malignant"] and info["epochs_done"] == 6 and info["world_size"] == 1


@pytest.mark.slow
def test_regression_eval_and_predict_in_target_units(tmp_path):
    import numpy as np

    rng = np.random.default_rng(3)
    x = rng.normal(size=(500, 2))
    y = 1000 + 80 * x[:, 0] - 30 * x[:, 1] + rng.normal(0, 5, size=500)
    rows = ["a,b,price"] + [f"{p:.5f},{q:.5f},{t:.4f}" for (p, q), t in zip(x, y)]
    (tmp_path / "train.csv").write_text("\n".join(rows[:401]) + "\n")
    (tmp_path / "test.csv").write_text("\n".join([rows[0]] + rows[401:]) + "\n")
    fit(FitConfig(data=str(tmp_path / "train.csv"), epochs=40, hidden=(32,), batch_size=32, lr=0.01, quiet=True,
                  out=str(tmp_path / "run")))
    result = cli("eval", "run/checkpoints/best.pt", "--data", "test.csv", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert {"loss", "mse", "rmse", "mae", "r2"} <= metrics.keys() and metrics["rows"] == 100
    out = tmp_path / "pred.csv"
    predicted = cli("predict", "run/checkpoints/best.pt", "--data", "test.csv", "--out", str(out), cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr
    pred = np.array([float(r["prediction"]) for r in csv.DictReader(out.open())])
    truth = y[400:]
    rmse = float(np.sqrt(np.mean((pred - truth) ** 2)))
    assert metrics["rmse"] == pytest.approx(rmse, rel=1e-3)  # eval's RMSE is in the target's units
    assert rmse < 20 and metrics["r2"] > 0.95  # noise is 5; a mean predictor would be ~85


@pytest.mark.slow
@pytest.mark.parametrize("data, extra, metric", [
    ("blobs", ("--n-classes", "4", "--n-features", "8"), "accuracy"),
    ("regression", ("--n-features", "4"), "r2"),
])
def test_eval_on_a_builtin_draws_fresh_rows_of_the_same_problem(tmp_path, data, extra, metric):
    # blobs' centres and the regression's weights come from the training seed; eval's rows from seed + 1
    trained = cli("fit", "--data", data, *extra, "--epochs", "6", "--hidden", "32", "--scheduler", "constant",
                  "--out", "run", "--quiet", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    val = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    result = cli("eval", "run/checkpoints/best.pt", "--data", data, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    fresh = json.loads(result.stdout)
    assert fresh[metric] > (0.95 if metric == "accuracy" else 0.8)
    assert fresh[metric] == pytest.approx(val[f"val_{metric}"], abs=0.05)
