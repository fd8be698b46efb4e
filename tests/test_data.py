"""Data formats, task inference, string labels, standardization, and the per-rank batch order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddptrain.config import FitConfig
from ddptrain.data import epoch_indices, eval_shard, infer_task, prepare_fit_data


def write_table(path, header, rows, sep=","):
    path.write_text("\n".join([sep.join(header)] + [sep.join(map(str, r)) for r in rows]) + "\n")
    return path


@pytest.mark.parametrize("values, task", [
    (np.array(["benign", "malignant", "benign"], dtype=object), "classification"),
    (np.array(["true", "false", "true"], dtype=object), "classification"),
    (np.array([0, 1, 2, 1, 0]), "classification"),
    (np.array(["1", "2", "2"], dtype=object), "classification"),
    (np.array([0.5, 1.25, 3.0]), "regression"),
    (np.arange(100), "regression"),  # too many distinct integers for class labels
])
def test_task_inference(values, task):
    from ddptrain.tables import Table, numeric_table

    table = (Table("t.csv", ["y"], [values], ["text"]) if values.dtype == object
             else numeric_table("t.csv", ["y"], [values]))
    assert infer_task(table, "y", ~table.missing("y")) == task


def test_csv_with_string_labels(tiny_csv):
    data = prepare_fit_data(FitConfig(data=str(tiny_csv), val_fraction=0.25))
    spec = data.spec
    assert spec.task == "classification" and spec.classes == ("benign", "malignant")
    assert spec.feature_names == ("radius", "texture", "smooth") and spec.target_name == "diagnosis"
    assert len(data.train) == 300 and len(data.val) == 100
    assert data.train.y.dtype == torch.int64
    # standardized with the training split's own statistics
    assert torch.allclose(data.train.x.mean(0), torch.zeros(3), atol=1e-5)
    assert torch.allclose(data.train.x.std(0, unbiased=False), torch.ones(3), atol=1e-4)


def test_tsv_target_column_and_forced_task(tmp_path):
    rows = [(i, i % 3, float(i) * 0.5) for i in range(60)]
    path = write_table(tmp_path / "t.tsv", ["a", "label", "b"], rows, sep="\t")
    data = prepare_fit_data(FitConfig(data=str(path), target="label"))
    assert data.spec.task == "classification" and data.spec.classes == ("0", "1", "2")
    assert data.spec.feature_names == ("a", "b")
    forced = prepare_fit_data(FitConfig(data=str(path), target="label", task="regression"))
    assert forced.spec.task == "regression"


def test_regression_targets_standardized_and_kept_in_spec(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 2))
    y = 1000 + 50 * x[:, 0]
    np.savez(tmp_path / "r.npz", X=x, y=y)
    data = prepare_fit_data(FitConfig(data=str(tmp_path / "r.npz"), val_fraction=0))
    assert data.spec.task == "regression" and data.val is None
    assert abs(data.spec.y_mean - y.mean()) < 1e-9 and abs(data.spec.y_std - y.std()) < 1e-9
    assert abs(float(data.train.y.mean())) < 1e-5


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"f1": [0.1 * i for i in range(50)], "f2": [float(i % 7) for i in range(50)],
                      "kind": ["a" if i % 2 else "b" for i in range(50)]})
    pq.write_table(table, tmp_path / "d.parquet")
    data = prepare_fit_data(FitConfig(data=str(tmp_path / "d.parquet")))
    assert data.spec.classes == ("a", "b") and data.spec.feature_names == ("f1", "f2")


@pytest.mark.parametrize("name", ["xor", "spirals", "moons", "blobs", "regression"])
def test_builtin_datasets_are_seeded(name):
    a = prepare_fit_data(FitConfig(data=name, n_samples=300, seed=3))
    b = prepare_fit_data(FitConfig(data=name, n_samples=300, seed=3))
    c = prepare_fit_data(FitConfig(data=name, n_samples=300, seed=4))
    assert torch.equal(a.train.x, b.train.x) and not torch.equal(a.train.x, c.train.x)
    assert a.spec.task == ("regression" if name == "regression" else "classification")


@pytest.mark.parametrize("world_size", [2, 4])
def test_global_batches_do_not_depend_on_world_size(world_size):
    n, batch, seed, epoch = 103, 8, 5, 2
    single = epoch_indices(n, seed, epoch, 0, 1)
    shards = [epoch_indices(n, seed, epoch, r, world_size) for r in range(world_size)]
    per_rank = batch // world_size
    for step in range(n // batch):
        union = torch.cat([s[step * per_rank:(step + 1) * per_rank] for s in shards])
        assert sorted(union.tolist()) == sorted(single[step * batch:(step + 1) * batch].tolist())
        assert len(set(union.tolist())) == batch  # disjoint shards
    assert not torch.equal(single, epoch_indices(n, seed, epoch + 1, 0, 1))  # a new order each epoch


@pytest.mark.parametrize("n, world", [(100, 1), (103, 2), (1000, 3), (7, 4)])
def test_epoch_order_is_torchs_distributed_sampler(n, world):
    from torch.utils.data import DistributedSampler

    for rank in range(world):
        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=11, drop_last=True)
        sampler.set_epoch(3)
        assert epoch_indices(n, 11, 3, rank, world).tolist() == list(sampler)


def test_eval_shards_cover_every_row_once():
    for n in (10, 11, 1):
        rows = [i for r in range(3) for i in range(n)[eval_shard(n, r, 3)]]
        assert rows == list(range(n))


def test_builtin_problem_is_fixed_by_the_problem_seed_and_rows_by_the_seed():
    from ddptrain.datasets import generate

    x0, y0 = generate("blobs", 2000, seed=0, n_features=5, n_classes=3)
    x1, y1 = generate("blobs", 2000, seed=1, n_features=5, n_classes=3, problem_seed=0)
    assert not np.array_equal(x0, x1)  # other rows
    centres0 = np.stack([x0[y0 == k].mean(0) for k in range(3)])
    centres1 = np.stack([x1[y1 == k].mean(0) for k in range(3)])
    assert np.allclose(centres0, centres1, atol=0.2)  # the same problem
    x2, y2 = generate("blobs", 2000, seed=1, n_features=5, n_classes=3)
    assert not np.allclose(np.stack([x2[y2 == k].mean(0) for k in range(3)]), centres0, atol=0.2)
