"""k-fold bagging: folds, the masked loss, the ensemble's average, and a bagged run through fit, resume, eval,
predict and inspect (the ONNX graph of a bagged model: test_export.py; two processes: test_distributed.py)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import epoch_rows, read_metrics, real_table

from ddptrain.bagging import assign_folds, bagged_loss
from ddptrain.checkpoint import describe, load_checkpoint
from ddptrain.config import FitConfig
from ddptrain.errors import UsageError
from ddptrain.evaluate import evaluate_checkpoint, predict_to_csv
from ddptrain.model import Ensemble, ModelSpec, build_model
from ddptrain.run import fit


def test_folds_are_a_function_of_seed_and_rows_and_balanced():
    folds = assign_folds(103, 5, seed=7)
    assert torch.equal(folds, assign_folds(103, 5, seed=7)) and not torch.equal(folds, assign_folds(103, 5, seed=8))
    assert sorted(torch.bincount(folds).tolist()) == [20, 20, 21, 21, 21]


def test_a_member_learns_nothing_from_its_own_fold():
    torch.manual_seed(0)
    model = build_model(ModelSpec(3, 1, (8,), members=3)).train()
    x, y = torch.randn(12, 3), torch.randn(12)
    fold = torch.tensor([0, 1, 2] * 4)
    bagged_loss(torch.nn.MSELoss(), model(x[fold == 1]), y[fold == 1], fold[fold == 1], regression=True).backward()
    grads = [sum(float(p.grad.abs().sum()) for p in member.parameters()) for member in model.members]
    assert grads[1] == 0 and grads[0] > 0 and grads[2] > 0


def test_the_bagged_loss_of_ranks_shares_adds_up_to_the_whole_batch():
    """DDP averages the ranks' gradients: their losses must average to the one-process loss (world-size
    invariance), which a per-rank count of each member's rows would break."""
    torch.manual_seed(0)
    model = build_model(ModelSpec(3, 4, (8,), members=5)).train()
    x, y = torch.randn(40, 3), torch.randint(0, 4, (40,))
    fold = assign_folds(40, 5, seed=0)
    loss = torch.nn.CrossEntropyLoss()
    whole = bagged_loss(loss, model(x), y, fold, regression=False)
    halves = [bagged_loss(loss, model(x[r::2]), y[r::2], fold[r::2], regression=False) for r in (0, 1)]
    assert float(sum(halves).detach() / 2) == pytest.approx(float(whole.detach()), rel=1e-6)


def test_the_ensemble_averages_probabilities_and_values_and_keeps_each_members_best():
    torch.manual_seed(0)
    classify = build_model(ModelSpec(3, 4, (8,), members=3)).eval()
    x = torch.randn(6, 3)
    outs = classify.member_outputs(x)
    assert torch.allclose(torch.softmax(classify(x), dim=1), torch.softmax(outs, dim=2).mean(dim=1), atol=1e-6)
    regress = build_model(ModelSpec(3, 1, (8,), members=3)).eval()
    assert torch.allclose(regress(x), regress.member_outputs(x).mean(dim=1))
    kept = [p.detach().clone() for p in regress.members[1].parameters()]
    for p in regress.parameters():
        p.data.add_(1.0)
    regress.keep_best([True, False, True])
    moved = [p.detach().clone() for p in regress.members[0].parameters()]
    regress.use_best()  # member 1 back at its best (the initial weights), members 0 and 2 where they are
    assert all(torch.equal(a, b) for a, b in zip(kept, regress.members[1].parameters()))
    assert all(torch.equal(a, b) for a, b in zip(moved, regress.members[0].parameters()))


def bagged(tmp_path, name="run", **overrides) -> FitConfig:
    values = dict(data=str(real_table(tmp_path / "train.csv", rows=240)), target="label", epochs=6, hidden=(16,),
                  out=str(tmp_path / name), quiet=True, cache=False)
    values.update(overrides)
    return FitConfig(**values)


def test_a_small_table_is_bagged_and_its_out_of_fold_score_is_the_validation_figure(tmp_path, capsys):
    summary = fit(bagged(tmp_path, quiet=False))
    out = capsys.readouterr()
    assert "bagging: 5 models" in out.out and "out-of-fold, 5 bagged models" in out.out
    run = tmp_path / "run"
    rows = epoch_rows(run)
    assert all(len(r["member_val_loss"]) == 5 and "val_loss" in r and "val_accuracy" in r for r in rows)
    final = [r for r in read_metrics(run) if r["kind"] == "final"]
    assert len(final) == 1 and final[0]["validation"] == "out-of-fold" and final[0] == summary["final"]
    state = load_checkpoint(run / "checkpoints" / "best.pt")
    assert state["model_spec"]["members"] == 5 and state["config"]["bagging"] == "5"
    position = state["position"]
    assert len(position["member_best"]) == 5 and all(math.isfinite(v) for v in position["member_best"])
    assert "x 5 (bagged)" in describe(state)["architecture"]
    # each member's best held-out loss is where its best weights are: the final out-of-fold loss is no worse than
    # the members' records averaged over their fold sizes allow (same rows, same losses)
    assert final[0]["val_loss"] <= max(position["member_best"]) + 1e-9


def test_eval_and_predict_use_every_members_best_weights(tmp_path):
    fit(bagged(tmp_path))
    test = real_table(tmp_path / "test.csv", rows=40, seed=7)
    best, last = (tmp_path / "run" / "checkpoints" / name for name in ("best.pt", "last.pt"))
    scores = evaluate_checkpoint(best, str(test), None, True, "cpu")
    assert scores["rows"] == 40 and 0 <= scores["accuracy"] <= 1 and scores["roc_auc"] is not None
    assert evaluate_checkpoint(last, str(test), None, True, "cpu") == scores  # both load the members' bests
    predict_to_csv(best, str(test), tmp_path / "p.csv", (), overwrite=False)
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == "prediction,prob_high,prob_low" and len(lines) == 41
    probs = [float(v) for v in lines[1].split(",")[1:]]
    assert sum(probs) == pytest.approx(1.0, abs=1e-5)


def test_a_bagged_run_resumes_exactly_after_a_crash_mid_epoch(tmp_path, monkeypatch):
    fit(bagged(tmp_path, "straight", early_stop=0))
    monkeypatch.setenv("DDPTRAIN_FAIL_AT_STEP", "0:11")  # 4 steps an epoch: the crash is in the third
    with pytest.raises(RuntimeError, match="injected failure"):
        fit(bagged(tmp_path, "resumed", early_stop=0, checkpoint_every=5))
    monkeypatch.delenv("DDPTRAIN_FAIL_AT_STEP")
    assert load_checkpoint(tmp_path / "resumed/checkpoints/last.pt")["position"]["global_step"] == 10
    fit(bagged(tmp_path, "resumed", early_stop=0, checkpoint_every=5, resume="auto"))
    a = load_checkpoint(tmp_path / "straight/checkpoints/last.pt")
    b = load_checkpoint(tmp_path / "resumed/checkpoints/last.pt")
    assert a["model"].keys() == b["model"].keys() and any(k.startswith("best_") for k in a["model"])
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["position"] == b["position"]


def test_bagging_flags(tmp_path):
    single = fit(bagged(tmp_path, "off", bagging="off", epochs=2))
    assert single["final"] == {} and load_checkpoint(tmp_path / "off/checkpoints/last.pt")["model_spec"]["members"] == 1
    three = fit(bagged(tmp_path, "three", bagging="3", epochs=2, val_fraction=0.2))
    assert three["final"]["members"] == 3 and three["final"]["validation"] == "validation rows"
    state = load_checkpoint(tmp_path / "three/checkpoints/last.pt")
    assert isinstance(build_model(ModelSpec.from_dict(state["model_spec"])), Ensemble)
    for bad in ("1", "33", "five", "-2"):
        with pytest.raises(UsageError, match="--bagging"):
            FitConfig(bagging=bad)
    with pytest.raises(UsageError, match="cannot resume"):  # a fixed setting: a resume keeps it
        fit(bagged(tmp_path, "three", bagging="off", epochs=3, val_fraction=0.2, resume="auto"))


def test_a_table_file_under_20000_rows_is_bagged_on_every_row_and_a_longer_one_holds_a_fifth_out(tmp_path):
    """Bagging paid on tables of 1,316 to 5,748 rows and on four of 5,000 to 20,000 (RESULTS.md): a table file under
    BAG_BELOW_ROWS rows is bagged on every row by default; --bagging off there, a longer file and a built-in dataset
    hold a fifth out."""
    from ddptrain.bagging import resolve_members
    from ddptrain.config import BAG_BELOW_ROWS, SMALL_TABLE_ROWS, resolve_val_fraction
    from ddptrain.data import prepare_fit_data

    assert (SMALL_TABLE_ROWS, BAG_BELOW_ROWS) == (5000, 20_000)
    medium = real_table(tmp_path / "medium.csv", rows=3000)
    data = prepare_fit_data(FitConfig(data=str(medium), target="label"))
    assert len(data.train) == 3000 and data.val is None
    assert any("no validation split: the table has 3,000 rows, under 20,000" in n for n in data.spec.notes)
    assert resolve_members(FitConfig(data=str(medium)), 3000, False, True, "classification") == 5
    # a regression table: 10 models (RESULTS.md); classification keeps 5; too few rows for 10 folds of 2: 5
    assert resolve_members(FitConfig(data=str(medium)), 3000, False, True, "regression") == 10
    assert resolve_members(FitConfig(), 4999, False, True, "regression") == 10
    assert resolve_members(FitConfig(), 5000, False, True, "regression") == 5  # 10 models only under 5,000 rows
    assert resolve_members(FitConfig(), 19_999, False, True, "classification") == 5
    assert resolve_members(FitConfig(), 20_000, False, True, "regression") == 1
    assert resolve_members(FitConfig(), 999, False, True, "classification") == 5
    assert resolve_members(FitConfig(), 19, False, True, "regression") == 5
    assert resolve_members(FitConfig(), 9, False, True, "regression") == 1
    assert resolve_members(FitConfig(bagging="5"), 400, False, True, "regression") == 5  # asked for: as asked
    held = prepare_fit_data(FitConfig(data=str(medium), target="label", bagging="off"))
    assert (len(held.train), len(held.val)) == (2400, 600)
    assert resolve_val_fraction(FitConfig(), 20_000, from_file=True) == 0.2
    assert resolve_val_fraction(FitConfig(), 19_999, from_file=True) == 0.0
    assert resolve_val_fraction(FitConfig(), 3000, from_file=False) == 0.2  # built-ins: from 1,000 rows
    assert resolve_members(FitConfig(), 4000, True, True, "regression") == 1  # validation rows asked for: one model
