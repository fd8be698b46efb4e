"""Classification metrics from all-reduced sums against their textbook definitions, and class weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ddptrain.config import FitConfig
from ddptrain.data import DataSpec, Split
from ddptrain.metrics import evaluation_sums, metrics_from_sums
from ddptrain.optim import balanced_weights, build_loss
from ddptrain.preprocess import Preprocessor


def identity_model(classes: int) -> nn.Module:
    """A model whose outputs are its inputs: the test's logits go through evaluation_sums unchanged."""
    model = nn.Linear(classes, classes)
    with torch.no_grad():
        model.weight.copy_(torch.eye(classes))
        model.bias.zero_()
    return model


def exact_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney: the share of (positive, negative) pairs ordered right, ties half."""
    pos, neg = scores[positive], scores[~positive]
    return float(((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum())
                 / (len(pos) * len(neg)))


def scored(classes: int, rows: int, seed: int, shards: int = 1):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, rows)
    logits = rng.normal(size=(rows, classes)) + 1.5 * np.eye(classes)[y]  # informative, not perfect
    spec = DataSpec("y", "classification", tuple(f"c{i}" for i in range(classes)), Preprocessor(()))
    split = Split(torch.tensor(logits, dtype=torch.float32), torch.tensor(y))
    model = identity_model(classes)
    # shards as ranks would take them: the sums add up to the one-shard sums
    sums = sum(evaluation_sums(model, split, spec, nn.CrossEntropyLoss(), rank, shards, reduce=False)
               for rank in range(shards))
    return metrics_from_sums(sums, spec), logits, y


@pytest.mark.parametrize("classes", [2, 4])
def test_classification_metrics_match_their_definitions(classes):
    metrics, logits, y = scored(classes, 3000, seed=classes, shards=3)
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    assert metrics["log_loss"] == pytest.approx(-log_p[np.arange(len(y)), y].mean(), rel=1e-5)
    pred = logits.argmax(axis=1)
    recalls = [np.mean(pred[y == c] == c) for c in range(classes)]
    assert metrics["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    f1s = []
    for c in range(classes):
        tp, fp, fn = np.sum((pred == c) & (y == c)), np.sum((pred == c) & (y != c)), np.sum((pred != c) & (y == c))
        f1s.append(2 * tp / (2 * tp + fp + fn))
    assert metrics["f1"] == pytest.approx(f1s[1] if classes == 2 else np.mean(f1s))
    ovr = [1] if classes == 2 else range(classes)
    auc = np.mean([exact_auc(log_p[:, c], y == c) for c in ovr])
    assert metrics["roc_auc"] == pytest.approx(auc, abs=2e-4)


def test_auc_of_a_perfect_and_a_useless_ranking():
    spec = DataSpec("y", "classification", ("a", "b"), Preprocessor(()))
    y = torch.tensor([0, 0, 1, 1])
    model = identity_model(2)
    perfect = Split(torch.tensor([[2.0, -2], [1, -1], [-1, 1], [-3, 3]]), y)
    assert metrics_from_sums(evaluation_sums(model, perfect, spec, nn.CrossEntropyLoss()), spec)["roc_auc"] == 1.0
    ties = Split(torch.zeros(4, 2), y)
    assert metrics_from_sums(evaluation_sums(model, ties, spec, nn.CrossEntropyLoss()), spec)["roc_auc"] == 0.5
    one_class = Split(torch.zeros(2, 2), torch.tensor([1, 1]))
    assert metrics_from_sums(evaluation_sums(model, one_class, spec, nn.CrossEntropyLoss()), spec)["roc_auc"] is None


def test_balanced_weights_are_sklearns_and_average_one():
    labels = torch.tensor([0] * 90 + [1] * 10)
    weight = balanced_weights(labels, 3)  # class 2 has no training rows
    assert weight.tolist() == pytest.approx([100 / (2 * 90), 100 / (2 * 10), 1.0])
    assert float(weight[labels].mean()) == pytest.approx(1.0)


def test_weighted_loss_adds_up_over_ranks_shares():
    """Each rank's share of a batch, as DDP averages it, gives the whole batch's loss: world-size invariance."""
    labels = torch.tensor([0] * 90 + [1] * 10)
    loss = build_loss(FitConfig(class_weight="balanced", label_smoothing=0), "classification", labels, 2)
    out, y = torch.randn(64, 2, generator=torch.Generator().manual_seed(0)), labels[torch.randperm(100)[:64]]
    halves = (loss(out[0::2], y[0::2]) + loss(out[1::2], y[1::2])) / 2
    assert float(halves) == pytest.approx(float(loss(out, y)), rel=1e-6)
    plain = build_loss(FitConfig(label_smoothing=0), "classification", labels, 2)
    assert float(loss(out, torch.zeros(64, dtype=torch.long))) == pytest.approx(
        float(plain(out, torch.zeros(64, dtype=torch.long))) * 100 / 180, rel=1e-6)


def test_class_weight_on_regression_is_a_usage_error():
    from ddptrain.errors import UsageError

    with pytest.raises(UsageError, match="--class-weight balanced"):
        build_loss(FitConfig(class_weight="balanced"), "regression")


def test_label_smoothing_trains_smoothed_and_holds_out_plain_log_loss():
    """The training loss (plain, class-weighted, or a bagged member's per-row loss) is torch's smoothed
    cross-entropy; a held-out loss is the plain log loss, so early stopping and val_log_loss mean what they say."""
    from ddptrain.errors import UsageError
    from ddptrain.optim import per_row_loss

    labels = torch.tensor([0] * 30 + [1] * 10 + [2] * 24)
    out = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    smoothed = nn.functional.cross_entropy(out, labels, label_smoothing=0.1)
    for cfg in (FitConfig(label_smoothing=0.1), FitConfig(label_smoothing=0.1, class_weight="balanced")):
        loss = build_loss(cfg, "classification", labels, 3)
        plain = build_loss(FitConfig(label_smoothing=0, class_weight=cfg.class_weight), "classification", labels, 3)
        assert float(per_row_loss(loss, out, labels, training=True).mean()) == pytest.approx(float(loss(out, labels)))
        assert torch.equal(per_row_loss(loss, out, labels), per_row_loss(plain, out, labels))
        assert float(loss(out, labels)) != pytest.approx(float(plain(out, labels)))
    assert float(build_loss(FitConfig(), "classification")(out, labels)) == pytest.approx(float(smoothed))  # default
    assert float(build_loss(FitConfig(label_smoothing=0), "classification")(out, labels)) == pytest.approx(
        float(nn.functional.cross_entropy(out, labels)))
    assert isinstance(build_loss(FitConfig(), "regression"), nn.MSELoss)  # the default leaves regression alone
    with pytest.raises(UsageError, match="--label-smoothing smooths class labels; this run is regression"):
        build_loss(FitConfig(label_smoothing=0.1), "regression")


def test_a_fit_monitors_auc_and_weighs_classes(tmp_path):
    """--monitor val_auc picks best.pt by the validation AUC (larger is better) and --class-weight balanced
    trains; both recorded in the checkpoint's config, the epoch rows carry the new metrics."""
    from conftest import epoch_rows

    from ddptrain.checkpoint import load_checkpoint
    from ddptrain.run import fit

    summary = fit(FitConfig(data="blobs", n_samples=600, n_classes=3, epochs=3, hidden=(16,), batch_size=32,
                            val_fraction=0.25, out=str(tmp_path / "run"), quiet=True, monitor="val_auc",
                            class_weight="balanced", early_stop=0))
    rows = epoch_rows(tmp_path / "run")
    assert all({"val_auc", "val_f1", "val_balanced_accuracy", "val_log_loss"} <= r.keys() for r in rows)
    assert summary["best"] == max(r["val_auc"] for r in rows)
    config = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")["config"]
    assert config["monitor"] == "val_auc" and config["class_weight"] == "balanced"
