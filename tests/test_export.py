"""`ddptrain export`: ONNX served by onnxruntime in a process without torch or ddptrain agrees with `ddptrain
predict` on the raw file; safetensors loads with the safetensors package alone; refusals are one line."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, clean_env, cli, error_lines, in_process, real_table
from ddptrain.checkpoint import inference_model, load_checkpoint
from ddptrain.config import FitConfig
from ddptrain.errors import DDPTrainError, UsageError
from ddptrain.evaluate import predict_to_csv
from ddptrain.export import NAT, date_parts, export_checkpoint
from ddptrain.preprocess import _numeric_parts
from ddptrain.run import fit
from ddptrain.tables import Table

SERVE = ROOT / "ddptrain" / "serve_onnx.py"  # what `export --server` writes out


def trained(tmp_path, target="label", rows=240, **settings):
    """A run on a table with text categories, dates, booleans and empty cells (every NA token)."""
    train = real_table(tmp_path / "train.csv", rows=rows)
    fit(FitConfig(data=str(train), target=target, epochs=4, hidden=(16, 16), out=str(tmp_path / "run"),
                  quiet=True, **settings))
    # new rows: a city never seen in training (unknown level), empty cells everywhere
    test = real_table(tmp_path / "test.csv", rows=45, seed=7, cities=("Paris", "Rome", "Kyiv"))
    with test.open("a") as handle:  # and values far outside the training range: capped alike in both
        handle.write("900,person 900,Paris,2035-06-01,1990/01/15,True,150,99999.00,high\n"
                     "901,person 901,Rome,1900-01-01,2050/12/15,False,-5,-1000000,low\n")
    return tmp_path / "run" / "checkpoints" / "best.pt"


def served(model, data) -> dict:
    """onnxruntime on the raw CSV in a fresh process that imports neither torch nor ddptrain (the script asserts it)."""
    done = subprocess.run([sys.executable, str(SERVE), str(model), str(data), "--json"], capture_output=True,
                          text=True, timeout=120, env=clean_env())
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_onnx_classification_serves_the_same_labels_and_probabilities_as_predict(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    ckpt = trained(tmp_path)
    assert torch.load(ckpt, weights_only=True)["model_spec"]["members"] == 5  # a small table: the graph averages 5
    before = digest(ckpt)
    out = export_checkpoint(ckpt, "onnx", None, 18, overwrite=False)
    assert out == ckpt.with_suffix(".onnx") and digest(ckpt) == before  # the checkpoint is only read
    predict_to_csv(ckpt, str(tmp_path / "test.csv"), tmp_path / "p.csv", (), overwrite=False)
    expected = list(csv.DictReader((tmp_path / "p.csv").open()))
    got = served(out, tmp_path / "test.csv")
    assert got["label"] == [row["prediction"] for row in expected]  # every row
    probs = np.array([[float(row[f"prob_{c}"]) for c in ("high", "low")] for row in expected])
    assert np.abs(np.array(got["probabilities"]) - probs).max() < 1e-4
    assert len(set(got["label"])) == 2  # the model is not a constant, so the comparison means something


@pytest.mark.slow
@pytest.mark.parametrize("bins", [0, 8])
def test_onnx_regression_serves_values_in_target_units(tmp_path, bins):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    # the plain graph with numeric pieces; the 5 members of a small table averaged in target units without them
    ckpt = trained(tmp_path, target="income", drop=("label",), numeric_bins=bins, bagging="off" if bins else "auto")
    out = export_checkpoint(ckpt, "onnx", tmp_path / "model.onnx", 18, overwrite=False)
    test = tmp_path / "test.csv"
    lines = test.read_text().splitlines()  # the served file may lack the target, as at prediction time
    test.write_text("\n".join(",".join(line.split(",")[:-2]) for line in lines) + "\n")
    predict_to_csv(ckpt, str(test), tmp_path / "p.csv", (), overwrite=False)
    expected = np.array([float(row["prediction"]) for row in csv.DictReader((tmp_path / "p.csv").open())])
    got = np.array(served(out, test)["value"])
    assert expected.std() > 1 and np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_date_parts_in_the_graph_match_the_preprocessor():
    """The served calendar arithmetic (float64 floor division) against numpy's datetime64, across leap years,
    1970 and earlier, and missing dates."""
    days = np.arange(np.datetime64("1899-12-25"), np.datetime64("2101-01-05"), 37).astype("datetime64[s]")
    stamps = np.concatenate([days, days + np.timedelta64(13 * 3600 + 7, "s"), [np.datetime64("NaT")],
                             np.array(["2000-02-29", "2024-12-31", "1970-01-01", "1969-12-31"], dtype="datetime64[s]")])
    table = Table("t.csv", ["when"], [stamps.astype("datetime64[s]")], ["datetime"])
    expected, _ = _numeric_parts(table, "when", "datetime")
    got = date_parts(torch.from_numpy(stamps.astype(np.int64))[:, None]).numpy()
    assert stamps.astype(np.int64)[len(days) * 2] == NAT
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_allclose(got[~np.isnan(got)], expected[~np.isnan(expected)], rtol=0, atol=1e-9)


@pytest.mark.slow
def test_safetensors_holds_the_weights_and_the_whole_preprocessing(tmp_path):
    safetensors = pytest.importorskip("safetensors")
    from safetensors.numpy import load_file

    ckpt = trained(tmp_path)
    out = export_checkpoint(ckpt, "safetensors", None, 18, overwrite=False)
    tensors = load_file(str(out))
    state = torch.load(ckpt, weights_only=True)
    # a bagged model's weights as inference uses them: every member at its best epoch, no second copy
    served_weights = {k: v for k, v in inference_model(state, torch.device("cpu"))[0].state_dict().items()
                      if not k.startswith("best_")}
    assert set(tensors) == set(served_weights) and len(served_weights) < len(state["model"])
    for name, value in served_weights.items():
        np.testing.assert_array_equal(tensors[name], value.numpy())
    with safetensors.safe_open(str(out), framework="numpy") as handle:
        meta = json.loads(handle.metadata()["ddptrain"])
    assert meta["model_spec"] == state["model_spec"] and meta["data_spec"] == state["data_spec"]
    columns = {c["name"]: c for c in meta["data_spec"]["preprocessor"]["columns"]}
    assert columns["city"]["levels"] == ["Lima", "Oslo", "Paris", "Rome"] and columns["age"]["indicator"]


def test_export_refuses_clearly_and_overwrites_nothing(tmp_path, monkeypatch):
    ckpt = trained(tmp_path)
    with pytest.raises(UsageError, match="--format 'xml' is not one of onnx, safetensors"):
        export_checkpoint(ckpt, "xml", None, 18, overwrite=False)
    with pytest.raises(UsageError, match="--opset 9 is not supported"):
        export_checkpoint(ckpt, "onnx", None, 9, overwrite=False)
    taken = tmp_path / "taken.onnx"
    taken.write_text("mine")
    with pytest.raises(DDPTrainError, match="already exists; pass --overwrite"):
        export_checkpoint(ckpt, "onnx", taken, 18, overwrite=False)
    with pytest.raises(DDPTrainError, match="is the checkpoint itself"):
        export_checkpoint(ckpt, "safetensors", ckpt, 18, overwrite=True)
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(DDPTrainError, match=r"--format onnx needs the onnx package: pip install 'ddptrain\[export\]'"):
        export_checkpoint(ckpt, "onnx", tmp_path / "new.onnx", 18, overwrite=False)
    assert taken.read_text() == "mine" and not (tmp_path / "new.onnx").exists()


def test_a_feature_named_like_an_output_is_refused(tmp_path):
    pytest.importorskip("onnx")
    rows = ["probabilities,label,y"] + [f"{i % 7},{'ab'[i % 2]},{'xy'[(i // 3) % 2]}" for i in range(60)]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    fit(FitConfig(data=str(tmp_path / "t.csv"), target="y", epochs=1, hidden=(4,), out=str(tmp_path / "run"),
                  quiet=True))
    with pytest.raises(DDPTrainError, match="feature column 'label' has the name of an ONNX output"):
        export_checkpoint(tmp_path / "run/checkpoints/best.pt", "onnx", None, 18, overwrite=False)


@pytest.mark.slow
def test_the_export_command(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnx")
    ckpt = trained(tmp_path)
    done = cli("export", str(ckpt), "--format", "safetensors", "--out", str(tmp_path / "m.safetensors"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "exported" in done.stdout and (tmp_path / "m.safetensors").is_file()
    code, err = in_process(monkeypatch, capsys, "export", str(ckpt), "--format", "safetensors", "--out",
                           str(tmp_path / "m.safetensors"))
    assert code == 1 and error_lines(err) == [
        f"error: --out {tmp_path / 'm.safetensors'} already exists; pass --overwrite or pick another path"]
    code, err = in_process(monkeypatch, capsys, "export", str(ckpt), "--format", "pickle")
    assert code == 2 and len(error_lines(err)) == 1 and "Traceback" not in err, err
    # --server (the model and a standalone server beside it, served: the README walkthrough's test) refuses to
    # overwrite a file, and belongs to --format onnx
    server = tmp_path / "serve.py"
    server.write_text("mine")
    code, err = in_process(monkeypatch, capsys, "export", str(ckpt), "--out", str(tmp_path / "m2.onnx"), "--server",
                           str(server))
    assert code == 1 and error_lines(err) == [
        f"error: --server {server} already exists; pass --overwrite or pick another path"]
    assert not (tmp_path / "m2.onnx").exists()
    code, err = in_process(monkeypatch, capsys, "export", str(ckpt), "--format", "safetensors", "--server", str(server))
    assert code == 2 and "--server writes an onnxruntime server" in err
    assert server.read_text() == "mine"


@pytest.mark.slow
def test_onnx_serves_numeric_codes_as_predict_does(tmp_path):
    """A store number embedded beside its value: the graph looks each value up among the training levels as the
    preprocessor does (a new store, an empty cell and a fraction included)."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from test_levels import store_sales

    store_sales(tmp_path / "train.csv")
    fit(FitConfig(data=str(tmp_path / "train.csv"), target="sales", epochs=3, hidden=(16,), quiet=True,
                  out=str(tmp_path / "run")))
    ckpt = tmp_path / "run" / "checkpoints" / "best.pt"
    assert any(c["levels"] for c in load_checkpoint(ckpt)["data_spec"]["preprocessor"]["columns"])
    store_sales(tmp_path / "test.csv", rows=40, seed=5)
    with (tmp_path / "test.csv").open("a") as handle:
        handle.write("99,10.0,5,3,0\n,10.0,5,3,0\n3.5,10.0,5,3,0\n7,10.0,,,0\n")
    out = export_checkpoint(ckpt, "onnx", tmp_path / "m.onnx", 18, overwrite=False)
    predict_to_csv(ckpt, str(tmp_path / "test.csv"), tmp_path / "p.csv", (), overwrite=False)
    expected = np.array([float(row["prediction"]) for row in csv.DictReader((tmp_path / "p.csv").open())])
    got = np.array(served(out, tmp_path / "test.csv")["value"])
    assert len(got) == 44 and np.abs(got - expected).max() < 1e-3 * max(1.0, np.abs(expected).max())
