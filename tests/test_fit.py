"""`fit` end to end at world size 1 (in process: the same code path torchrun workers take), and exact resume."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import epoch_rows, read_metrics

from ddptrain.checkpoint import load_checkpoint
from ddptrain.config import FitConfig
from ddptrain.data import prepare_fit_data
from ddptrain.errors import DDPTrainError, UsageError
from ddptrain.run import fit


def small(tmp_path, name="run", **overrides) -> FitConfig:
    values = dict(data="moons", n_samples=512, epochs=3, batch_size=32, hidden=(16,), out=str(tmp_path / name),
                  log_every=5, quiet=True, val_fraction=0.2, scheduler="constant")
    values.update(overrides)
    return FitConfig(**values)


def weights(run_dir, name="last.pt"):
    return load_checkpoint(run_dir / "checkpoints" / name)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_fit_writes_run_folder(tmp_path):
    cfg = small(tmp_path)
    summary = fit(cfg)
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["data"] == "moons"
    rows = read_metrics(run)
    epochs = [r for r in rows if r["kind"] == "epoch"]
    steps = [r for r in rows if r["kind"] == "step"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    for row in epochs:
        assert {"train_loss", "samples_per_s", "epoch_time_s", "epoch_cpu_s", "val_loss", "val_accuracy", "step"} <= row.keys()
        assert 0 < row["epoch_cpu_s"] and 0 < row["epoch_time_s"]
    assert all({"step", "epoch", "train_loss", "lr", "samples_per_s"} <= r.keys() for r in steps)
    per_epoch = len(prepare_fit_data(cfg).train) // cfg.batch_size  # the training rows after the seeded split
    assert [r["step"] for r in epochs] == [per_epoch, 2 * per_epoch, 3 * per_epoch]
    assert [r["step"] for r in steps] == list(range(5, 3 * per_epoch + 1, 5))
    assert summary["epochs"] == 3 and epochs[-1]["val_accuracy"] > 0.8
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert not any(k.startswith("module.") for k in state["model"])
    assert state["position"]["epoch"] == 3 and state["world_size"] == 1
    assert (run / "checkpoints" / "best.pt").exists()


def test_world_size_one_trains_the_bare_module_with_ddps_results(tmp_path, capsys):
    # A world of one has nothing to all-reduce: no DDP wrapper (it costs 14-20% a step), unless a DDP option asks for
    # one. The two give the same weights, bit for bit, with gradient accumulation and dropout in play.
    opts = dict(grad_accum=2, dropout=0.1, quiet=False, epochs=2)
    fit(small(tmp_path, "bare", **opts))
    bare_said = capsys.readouterr()
    fit(small(tmp_path, "ddp", bucket_cap_mb=25.0, **opts))  # a DDP option: DDP at world size 1
    ddp_said = capsys.readouterr()
    assert "no DDP wrapper" in bare_said.out + bare_said.err
    assert "DDP)" in ddp_said.out + ddp_said.err and "no DDP wrapper" not in ddp_said.out + ddp_said.err
    assert_same_weights(weights(tmp_path / "bare"), weights(tmp_path / "ddp"))


def test_loss_decreases_and_regression_reports_rmse(tmp_path):
    fit(small(tmp_path, data="regression", epochs=8, hidden=(32, 32), lr=0.01))
    rows = epoch_rows(tmp_path / "run")
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert "val_rmse" in rows[-1] and rows[-1]["val_rmse"] > 0


def test_existing_run_is_not_overwritten(tmp_path):
    fit(small(tmp_path, epochs=1))
    before = (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(UsageError, match="already holds a run"):
        fit(small(tmp_path, epochs=1))
    assert (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes() == before


@pytest.mark.parametrize("bins", [0, 6])
def test_resume_at_epoch_boundary_is_bit_exact(tmp_path, bins):
    fit(small(tmp_path, "straight", epochs=4, numeric_bins=bins))
    fit(small(tmp_path, "halves", epochs=2, numeric_bins=bins))
    fit(small(tmp_path, "halves", epochs=4, resume="auto", numeric_bins=bins))
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "halves"))
    rows = read_metrics(tmp_path / "halves")
    assert [r["epoch"] for r in rows if r["kind"] == "epoch"] == [1, 2, 3, 4]  # no duplicate rows
    steps = [r["step"] for r in rows if r["kind"] == "step"]
    assert steps == sorted(set(steps))


def test_resume_with_more_epochs_lays_the_schedule_out_again(tmp_path, capsys):
    """cosine (the default) plans its decay over --epochs: a resume with more epochs continues with the rate a run
    planned that long from the start would have at that step, and says so; an unchanged resume is bit-exact."""
    from ddptrain import console as console_module

    fit(small(tmp_path, "two", epochs=2, scheduler="cosine", checkpoint_every=0))
    fit(small(tmp_path, "three", epochs=3, scheduler="cosine"))
    console_module.console.quiet = False
    capsys.readouterr()
    fit(small(tmp_path, "two", epochs=3, scheduler="cosine", resume="auto", quiet=False))
    said = capsys.readouterr().err
    assert "--epochs 3 (the checkpoint's run planned 2): the cosine rate is laid out again over 3 epochs" in said
    extended = [r for r in read_metrics(tmp_path / "two") if r["kind"] == "step"]
    planned = [r for r in read_metrics(tmp_path / "three") if r["kind"] == "step"]
    resumed_at = max(r["step"] for r in extended if r["epoch"] == 2)
    later = {r["step"]: r["lr"] for r in extended if r["step"] > resumed_at}
    assert later and later == pytest.approx({r["step"]: r["lr"] for r in planned if r["step"] in later}, rel=1e-9)
    assert extended[-1]["lr"] < 0.05 * extended[0]["lr"]  # it decays to (nearly) zero at the new end


def test_resume_mid_epoch_is_bit_exact(tmp_path):
    # dropout makes the RNG state part of what must be restored
    opts = dict(epochs=3, dropout=0.2, checkpoint_every=7, keep_last=100, scheduler="cosine", optimizer="sgd", lr=0.1)
    fit(small(tmp_path, "straight", **opts))
    mid = tmp_path / "straight" / "checkpoints" / "step-00000021.pt"  # 12 steps an epoch: inside epoch 2
    assert load_checkpoint(mid)["position"]["step_in_epoch"] == 9
    fit(small(tmp_path, "resumed", resume=str(mid), **opts))
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "resumed"))


def test_block_shuffle_resumes_bit_exact_and_is_recorded(tmp_path):
    opts = dict(epochs=3, dropout=0.2, checkpoint_every=7, keep_last=100, shuffle="block")
    fit(small(tmp_path, "straight", **opts))
    fit(small(tmp_path, "resumed", resume=str(tmp_path / "straight/checkpoints/step-00000021.pt"), **opts))
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "resumed"))
    assert json.loads((tmp_path / "straight/config.json").read_text())["shuffle"] == "block"
    fit(small(tmp_path, "auto", epochs=1))  # a small table: auto is exact, recorded as decided
    assert json.loads((tmp_path / "auto/config.json").read_text())["shuffle"] == "exact"
    fit(small(tmp_path, "exact", epochs=1, shuffle="exact"))
    assert_same_weights(weights(tmp_path / "auto"), weights(tmp_path / "exact"))
    fit(small(tmp_path, "block", epochs=1, shuffle="block"))
    assert not torch.equal(weights(tmp_path / "block")["0.weight"], weights(tmp_path / "exact")["0.weight"])


def test_a_cached_table_resumes_bit_exact_in_both_shuffle_modes(tmp_path):
    """Training from the memory-mapped cache (a file's prepared arrays), stopped mid-epoch and resumed."""
    from conftest import real_table

    data = str(real_table(tmp_path / "t.csv", rows=300))
    for shuffle in ("exact", "block"):
        opts = dict(data=data, target="label", epochs=3, hidden=(8,), batch_size=24, dropout=0.2, checkpoint_every=7,
                    keep_last=100, shuffle=shuffle, quiet=True, cache_dir=str(tmp_path / "cache"))
        fit(FitConfig(out=str(tmp_path / f"straight-{shuffle}"), **opts))
        fit(FitConfig(out=str(tmp_path / f"resumed-{shuffle}"), **opts,
                      resume=str(tmp_path / f"straight-{shuffle}/checkpoints/step-00000021.pt")))
        assert_same_weights(weights(tmp_path / f"straight-{shuffle}"), weights(tmp_path / f"resumed-{shuffle}"))
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 1  # one prepared table, mapped


def test_resume_refuses_changed_settings(tmp_path):
    fit(small(tmp_path, epochs=1))
    with pytest.raises(UsageError) as err:
        fit(small(tmp_path, epochs=2, resume="auto", hidden=(8,), batch_size=64))
    assert "hidden" in str(err.value) and "batch_size" in str(err.value)


def test_a_checkpoint_from_before_label_smoothing_resumes_only_without_it(tmp_path):
    """fit records the smoothing it decided (0.1 for classification, 0 for regression), so a resume compares like
    with like; a checkpoint whose config has no label_smoothing trained without it, and resuming it under today's
    default would change the loss mid-run: the resume asks for --label-smoothing 0 (and takes it)."""
    import json

    from ddptrain.checkpoint import check_resumable

    fit(small(tmp_path, epochs=1))
    assert json.loads((tmp_path / "run/config.json").read_text())["label_smoothing"] == 0.1
    older = FitConfig(data="blobs", label_smoothing=0.0).to_dict()
    del older["label_smoothing"]
    with pytest.raises(UsageError, match=r"label_smoothing \(checkpoint 0.0, now 0.1\)"):
        check_resumable(FitConfig(data="blobs", label_smoothing=0.1), {"config": older}, tmp_path / "last.pt")
    check_resumable(FitConfig(data="blobs", label_smoothing=0.0), {"config": older}, tmp_path / "last.pt")


def test_keep_last_prunes_step_copies(tmp_path):
    fit(small(tmp_path, epochs=2, checkpoint_every=4, keep_last=2))
    copies = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*.pt"))
    assert copies == ["step-00000020.pt", "step-00000024.pt"]


@pytest.mark.parametrize("flags", [
    dict(precision="bf16"), dict(precision="fp16"), dict(grad_accum=4), dict(clip_grad=0.5),
    dict(comm_hook="fp16"), dict(comm_hook="powersgd"), dict(static_graph=True),
    dict(bucket_cap_mb=1.0), dict(norm="batch"), dict(norm="layer", activation="gelu"),
    dict(deterministic=True), dict(nan_policy="skip"), dict(compile=True),
])
def test_speed_and_model_flags_train_correctly(tmp_path, flags):
    fit(small(tmp_path, epochs=4, **flags))
    rows = epoch_rows(tmp_path / "run")
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["val_accuracy"] > 0.8


def test_grad_accum_matches_one_big_step(tmp_path):
    fit(small(tmp_path, "plain", epochs=2, optimizer="sgd", lr=0.1, momentum=0.0))
    fit(small(tmp_path, "accum", epochs=2, optimizer="sgd", lr=0.1, momentum=0.0, grad_accum=4))
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "accum")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key


def test_nan_stop_names_the_step_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(DDPTrainError, match=r"non-finite (loss at step|weights after step) \d+"):
        fit(small(tmp_path, data="regression", optimizer="sgd", hidden=(), lr=1e10, checkpoint_every=1,
                  monitor="val_rmse"))
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_nan_skip_counts_skipped_steps(tmp_path):
    fit(small(tmp_path, data="regression", optimizer="sgd", hidden=(), lr=1e10, nan_policy="skip", epochs=1,
              monitor="val_rmse"))
    rows = epoch_rows(tmp_path / "run")
    assert rows[-1]["skipped_steps"] > 0


def test_early_stop(tmp_path):
    summary = fit(small(tmp_path, epochs=30, early_stop=1, monitor="val_accuracy", lr=0.05))
    assert summary["epochs"] < 30


def test_step_rows_carry_the_lr_of_their_own_step(tmp_path):
    # the loss all-reduce is read a window late; the row must still say the rate at its own step
    cfg = small(tmp_path, epochs=2, scheduler="linear", optimizer="sgd", lr=0.1)
    fit(cfg)
    total = 2 * (len(prepare_fit_data(cfg).train) // cfg.batch_size)
    steps = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(5, total + 1, 5))
    for row in steps:
        assert row["lr"] == pytest.approx(0.1 * (1 - row["step"] / total)), row


def test_epochs_whose_every_step_was_skipped_log_no_loss_and_never_become_best(tmp_path):
    """A huge learning rate blows the weights up after the first step; with --nan-policy skip every later step is
    skipped. Those epochs have no training loss (null, not 0.0) and cannot be the best epoch."""
    fit(small(tmp_path, data="xor", optimizer="sgd", lr=1e38, nan_policy="skip", val_fraction=0.0, epochs=3))
    rows = epoch_rows(tmp_path / "run")
    steps_per_epoch = rows[0]["step"]
    assert rows[0]["train_loss"] is not None
    assert [r["epoch_skipped_steps"] for r in rows[1:]] == [steps_per_epoch, steps_per_epoch]
    assert [r["train_loss"] for r in rows[1:]] == [None, None]
    assert load_checkpoint(tmp_path / "run/checkpoints/best.pt")["position"]["best_epoch"] == 0
    assert "NaN" not in (tmp_path / "run/metrics.jsonl").read_text()  # strict JSON


def test_resume_with_categorical_embeddings_is_bit_exact(tmp_path):
    from conftest import real_table

    data = str(real_table(tmp_path / "p.csv", rows=200))
    opts = dict(data=data, target="label", hidden=(16,), dropout=0.1, checkpoint_every=5, keep_last=100)
    fit(small(tmp_path, "straight", epochs=3, **opts))
    fit(small(tmp_path, "halves", epochs=1, **opts))
    fit(small(tmp_path, "halves", epochs=3, resume="auto", **opts))
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "halves"))
    assert any(k.startswith("0.tables.") for k in weights(tmp_path / "straight"))  # the embeddings are trained


def test_describe_shows_the_plan_fit_uses(tmp_path, capsys):
    from conftest import real_table

    from ddptrain.describe import describe_table

    path = str(real_table(tmp_path / "p.csv"))
    cfg = FitConfig(data=path, target="label", categorical=("age",), out=str(tmp_path / "run"), epochs=1)
    plan = describe_table(cfg, as_json=True)
    assert json.loads(capsys.readouterr().out) == plan
    fit(cfg)
    state = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    kept = {c["name"]: c["role"] for c in state["data_spec"]["preprocessor"]["columns"]}
    assert kept == {c["name"]: c["role"] for c in plan["columns"] if c["role"] != "dropped"}
    assert state["data_spec"]["preprocessor"]["dropped"] == [c["name"] for c in plan["columns"]
                                                             if c["role"] == "dropped"]
    assert (plan["target"], plan["task"], tuple(plan["classes"])) == ("label", "classification", ("high", "low"))


def test_a_format_1_checkpoint_still_evaluates(tmp_path):
    """Checkpoints written before the preprocessor (numeric features, standardization only) keep working."""
    from ddptrain.checkpoint import inference_model

    fit(small(tmp_path, epochs=1))
    state = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    pre = state["data_spec"].pop("preprocessor")
    state["data_spec"].update(feature_names=[c["name"] for c in pre["columns"]],
                              x_mean=[c["mean"][0] for c in pre["columns"]], x_std=[c["std"][0] for c in pre["columns"]])
    state["format_version"] = 1
    old = tmp_path / "v1.pt"
    torch.save(state, old)
    model, spec, _ = inference_model(load_checkpoint(old), torch.device("cpu"))
    assert spec.feature_names == ("x0", "x1") and spec.preprocessor.n_numeric == 2


def test_the_default_batch_fits_a_small_table_and_resumes(tmp_path):
    """64 rows a step, or for a small table a quarter of its training rows (a multiple of 8, so the same at world
    sizes 1, 2, 4 and 8); config.json records the batch used, and a resume with the default agrees."""
    cfg = FitConfig(data="xor", n_samples=100, epochs=1, hidden=(8,), out=str(tmp_path / "run"), quiet=True)
    assert cfg.batch_size is None
    fit(cfg)
    assert json.loads((tmp_path / "run/config.json").read_text())["batch_size"] == 24  # 100 rows, no validation
    fit(FitConfig(data="xor", n_samples=100, epochs=2, hidden=(8,), out=str(tmp_path / "run"), quiet=True,
                  resume="auto"))
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["position"]["epoch"] == 2
    big = FitConfig(data="xor", n_samples=1000, epochs=1, hidden=(8,), out=str(tmp_path / "big"), quiet=True)
    fit(big)
    assert json.loads((tmp_path / "big/config.json").read_text())["batch_size"] == 64


def test_time_spent_on_the_data_is_in_the_metrics_and_the_summary(tmp_path):
    summary = fit(small(tmp_path, epochs=2))
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    first = [r for r in rows if "time_to_first_step_s" in r]
    assert len(first) == 1 and 0 < first[0]["data_s"] < first[0]["time_to_first_step_s"]
    assert summary["data_s"] == first[0]["data_s"]
