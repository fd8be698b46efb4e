"""Data formats, task inference, string labels, standardization, and the per-rank batch order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import real_table

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


@pytest.mark.parametrize("shuffle", ["exact", "block"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_global_batches_do_not_depend_on_world_size(world_size, shuffle):
    n, batch, seed, epoch = 1003, 8, 5, 2
    single = epoch_indices(n, seed, epoch, 0, 1, shuffle)
    shards = [epoch_indices(n, seed, epoch, r, world_size, shuffle) for r in range(world_size)]
    per_rank = batch // world_size
    for step in range(n // batch):
        union = torch.cat([s[step * per_rank:(step + 1) * per_rank] for s in shards])
        assert sorted(union.tolist()) == sorted(single[step * batch:(step + 1) * batch].tolist())
        assert len(set(union.tolist())) == batch  # disjoint shards
    assert not torch.equal(single, epoch_indices(n, seed, epoch + 1, 0, 1, shuffle))  # a new order each epoch


def test_block_shuffle_reads_a_few_blocks_at_a_time_and_still_mixes():
    """Every row once; each window of 16 blocks holds 16 whole blocks (near-sequential reads of a mapped table);
    the block order and the rows within a window change with the epoch, and depend on (seed, epoch) alone."""
    from ddptrain.data import SHUFFLE_WINDOW_BLOCKS, epoch_order

    short = epoch_order(64 * 100 + 37, 3, 0, "block")  # blocks of 100 rows, the last one short
    assert sorted(short.tolist()) == list(range(64 * 100 + 37))
    n = 64 * 100
    order = epoch_order(n, 3, 0, "block")
    assert sorted(order.tolist()) == list(range(n))
    assert torch.equal(order, epoch_order(n, 3, 0, "block")) and not torch.equal(order, epoch_order(n, 3, 1, "block"))
    window = 100 * SHUFFLE_WINDOW_BLOCKS
    for start in range(0, n, window):
        blocks = set((order[start:start + window] // 100).tolist())
        assert len(blocks) == SHUFFLE_WINDOW_BLOCKS  # whole blocks, and only 16 of them
    first = order[:window]
    assert not torch.equal(first, torch.sort(first).values)  # rows are mixed inside the window
    assert (order[:64] // 100).unique().numel() > 4  # a batch draws from several blocks


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


# -- real tables: roles, missing values, categories, dates, targets ------------------------------------------------
def test_a_real_table_gets_a_role_for_every_column(tmp_path):
    data = prepare_fit_data(FitConfig(data=str(real_table(tmp_path / "people.csv")), target="label"))
    roles = {r.name: (r.kind, r.role) for r in data.roles}
    assert roles == {"": ("number", "dropped"), "name": ("text", "dropped"), "city": ("text", "categorical"),
                     "joined": ("datetime", "datetime"), "since": ("datetime", "datetime"),
                     "vip": ("bool", "categorical"), "age": ("number", "numeric"), "income": ("number", "numeric")}
    pre = data.spec.preprocessor
    plans = {c.name: c for c in pre.columns}
    assert plans["age"].indicator and not plans["income"].indicator  # NA tokens are missing values
    assert plans["city"].levels == ("Lima", "Oslo", "Paris", "Rome") and plans["vip"].levels == ("false", "true")
    assert pre.n_numeric == 2 * 6 + 2 + 1  # two dates' parts, age and its indicator, income
    assert torch.isfinite(data.train.x).all()
    assert any("'name' is dropped" in note for note in data.spec.notes)
    assert any("unnamed pandas index" in note for note in data.spec.notes)
    # the same plan back from the checkpoint's plain values
    from ddptrain.data import DataSpec

    assert DataSpec.from_dict(data.spec.to_dict()).preprocessor == pre


def test_date_parts_and_the_missing_indicator(tmp_path):
    from ddptrain.preprocess import DATE_PARTS, _numeric_parts
    from ddptrain.tables import read_table

    path = tmp_path / "d.csv"
    path.write_text("when,y\n2024-02-29,1\n2024/03/01,0\n,1\n")
    table = read_table(str(path))
    parts, missing = _numeric_parts(table, "when", "datetime")
    assert dict(zip(DATE_PARTS, parts[0])) == {"year": 2024, "month": 2, "day": 29, "dayofweek": 3, "dayofyear": 60,
                                               "elapsed_days": 19782.0}
    assert parts[1][:2].tolist() == [2024, 3] and missing.tolist() == [0, 0, 1]


def test_statistics_come_from_the_training_rows_only(tmp_path):
    path = real_table(tmp_path / "p.csv")
    data = prepare_fit_data(FitConfig(data=str(path), target="label", val_fraction=0.25))
    income = next(c for c in data.spec.preprocessor.columns if c.name == "income")
    from ddptrain.data import _split_rows

    train_rows, _ = _split_rows(120, 0.25, 0)
    assert income.mean[0] == pytest.approx((1000 + 7.5 * train_rows).mean())


def test_values_outside_the_training_range_are_capped_to_it(tmp_path):
    """An MLP extrapolates linearly, so one corrupt value far out gives a wild prediction: eval and predict see a
    number or date beyond the training rows' range as that range's edge, as tree models do."""
    from ddptrain.preprocess import Preprocessor
    from ddptrain.tables import read_table

    data = prepare_fit_data(FitConfig(data=str(real_table(tmp_path / "p.csv")), target="label"))
    pre = data.spec.preprocessor
    income = next(c for c in pre.columns if c.name == "income")
    assert (income.low, income.high) == ((1000.0,), (1000 + 7.5 * 119,))
    path = tmp_path / "later.csv"
    lines = real_table(path, rows=4).read_text().splitlines()
    lines[1] = lines[1].rsplit(",", 2)[0] + ",1e9,high"  # far above
    lines[2] = lines[2].rsplit(",", 2)[0] + ",-5,low"  # below
    lines[3] = lines[3].rsplit(",", 2)[0] + f",{1000 + 7.5 * 119},low"  # the largest training value
    lines[4] = lines[4].rsplit(",", 2)[0] + ",1000,low"  # the smallest
    path.write_text("\n".join(lines) + "\n")
    x, _ = pre.transform(read_table(str(path)))
    j = pre.numeric_names().index("income")
    assert x[0, j] == x[2, j] and x[1, j] == x[3, j] and x[2, j] > x[3, j]
    old = Preprocessor.from_dict({**pre.to_dict(), "columns": [
        {k: v for k, v in c.items() if k not in ("low", "high")} for c in pre.to_dict()["columns"]]})
    x_old, _ = old.transform(read_table(str(path)))  # a checkpoint from before the caps: values as they are
    assert x_old[0, j] > 1000 * x_old[2, j]
    assert np.array_equal(np.delete(x_old, j, axis=1), np.delete(x, j, axis=1))


def test_levels_are_made_per_distinct_value_alike_for_every_kind():
    """A column as categories: one index per distinct label (1 and 1.0 one level, text as written, stripped),
    sorted, -1 where missing; what the vocabulary, the codes and the class labels are built from."""
    from ddptrain.tables import Table

    table = Table("t", ["n", "t", "b", "d"], [
        np.array([1.0, np.nan, 2.0, 1.0, 10.0]),
        np.array(["b", None, "a", " a", "b"], dtype=object),
        np.array([True, None, False, True, True], dtype=object),
        np.array(["2024-01-02", "NaT", "2024-01-02", "2023-05-01", "2023-05-01"], dtype="datetime64[s]")],
        ["number", "text", "bool", "datetime"])
    codes, texts = table.levels("n")
    assert texts == ["1", "10", "2"] and codes.tolist() == [0, -1, 2, 0, 1]
    codes, texts = table.levels("t")
    assert texts == ["a", "b"] and codes.tolist() == [1, -1, 0, 0, 1]
    codes, texts = table.levels("b")
    assert texts == ["false", "true"] and codes.tolist() == [1, -1, 0, 1, 1]
    codes, texts = table.levels("d")
    assert len(texts) == 2 and codes.tolist() == [1, -1, 1, 0, 0]


def test_unseen_and_missing_levels_at_prediction(tmp_path):
    from ddptrain.data import labelled_split
    from ddptrain.tables import read_table

    data = prepare_fit_data(FitConfig(data=str(real_table(tmp_path / "p.csv")), target="label"))
    later = real_table(tmp_path / "later.csv", rows=30, seed=1, cities=("Paris", "Kyiv", "Quito"))
    notes: list[str] = []
    split = labelled_split(data.spec, read_table(str(later)), notes=notes)
    assert len(split) == 30 and torch.isfinite(split.x).all()
    assert any("'city'" in n and "not learnt in training" in n for n in notes)
    codes = split.x[:, -2]  # city's code column (city, then vip)
    assert set(codes.tolist()) <= {0.0, 1.0, 2.0 + 2}  # unknown, missing, Paris


def test_a_regression_target_with_blank_cells_stays_regression(tmp_path):
    rows = [f"{i},{'' if i % 25 == 0 else 10 + 0.37 * i}" for i in range(100)]
    path = tmp_path / "r.csv"
    path.write_text("a,price\n" + "\n".join(rows) + "\n")
    data = prepare_fit_data(FitConfig(data=str(path)))
    assert data.spec.task == "regression"
    assert len(data.train) == 96 and data.val is None  # under 1,000 rows every row trains
    assert any("4 of 100 rows have no 'price' value" in note for note in data.spec.notes)


def test_default_epochs_give_a_small_table_enough_steps(tmp_path):
    """20 epochs, or for a small table as many as make 250 optimizer steps; as given when given; recorded."""
    import json

    from ddptrain.config import resolve_epochs
    from ddptrain.run import fit

    assert resolve_epochs(FitConfig(batch_size=32), 150).epochs == 63  # 4 steps an epoch
    assert resolve_epochs(FitConfig(batch_size=64), 100_000).epochs == 20
    assert resolve_epochs(FitConfig(batch_size=32, epochs=3), 150).epochs == 3
    fit(FitConfig(data="moons", n_samples=200, quiet=True, out=str(tmp_path / "run")))  # batch 48: 4 steps
    assert json.loads((tmp_path / "run" / "config.json").read_text())["epochs"] == 63


def test_validation_is_held_out_from_1000_rows_or_when_asked(tmp_path):
    """Under 1,000 rows every row trains (with a note saying how to hold some out); from 1,000 rows, or with
    --val-fraction, a seeded fifth validates."""
    small = prepare_fit_data(FitConfig(data="moons", n_samples=999))
    assert len(small.train) == 999 and small.val is None
    assert any("no validation split: the table has 999 rows" in note for note in small.spec.notes)
    big = prepare_fit_data(FitConfig(data="moons", n_samples=1000))
    assert (len(big.train), len(big.val)) == (800, 200)
    assert not any("no validation" in note for note in big.spec.notes)
    asked = prepare_fit_data(FitConfig(data="moons", n_samples=999, val_fraction=0.2))
    assert (len(asked.train), len(asked.val)) == (799, 200)
    assert len(prepare_fit_data(FitConfig(data="moons", n_samples=1000, val_fraction=0)).train) == 1000


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_an_empty_class_label_is_never_a_class(suffix, tmp_path):
    labels = ["cat", "dog", "", "cat", "dog"] * 12
    if suffix == "csv":
        path = tmp_path / "c.csv"
        path.write_text("a,animal\n" + "".join(f"{i},{v}\n" for i, v in enumerate(labels)))
    else:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        path = tmp_path / "c.parquet"
        pq.write_table(pa.table({"a": list(range(60)), "animal": [v or None for v in labels]}), path)
    data = prepare_fit_data(FitConfig(data=str(path)))
    assert data.spec.classes == ("cat", "dog")
    assert len(data.train) == 48


def test_parquet_keeps_its_schema(tmp_path):
    import datetime

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    n = 40
    table = pa.table({
        "when": pa.array([datetime.datetime(2022, 1, 1) + datetime.timedelta(days=i) for i in range(n)]),
        "flag": pa.array([i % 2 == 0 for i in range(n)]),
        "tier": pa.array(["gold", "silver"] * (n // 2)).dictionary_encode(),
        "x": pa.array([float(i) for i in range(n)]), "y": pa.array(["a", "b", "c", "d"] * (n // 4))})
    pq.write_table(table, tmp_path / "s.parquet")
    data = prepare_fit_data(FitConfig(data=str(tmp_path / "s.parquet")))
    assert {r.name: r.role for r in data.roles} == {"when": "datetime", "flag": "categorical",
                                                    "tier": "categorical", "x": "numeric"}


def test_overrides_and_their_mistakes(tmp_path):
    from ddptrain.errors import UsageError

    path = real_table(tmp_path / "p.csv")
    data = prepare_fit_data(FitConfig(data=str(path), target="label", categorical=("age",), drop=("since",)))
    roles = {r.name: r.role for r in data.roles}
    assert roles["age"] == "categorical" and roles["since"] == "dropped"
    with pytest.raises(UsageError, match="--numeric city: column 'city'"):
        prepare_fit_data(FitConfig(data=str(path), target="label", numeric=("city",)))
    with pytest.raises(UsageError, match="--drop: 'nope'.* is not a column"):
        prepare_fit_data(FitConfig(data=str(path), target="label", drop=("nope",)))
    with pytest.raises(UsageError, match="two roles"):
        prepare_fit_data(FitConfig(data=str(path), target="label", drop=("age",), categorical=("age",)))


def test_a_mistyped_column_gets_the_closest_name(tmp_path):
    from ddptrain.errors import UsageError
    from ddptrain.tables import column_list, unknown_column_text

    path = real_table(tmp_path / "p.csv")
    with pytest.raises(UsageError, match=r"--target: 'Lable' \(did you mean 'label'\?\) is not a column of .*p.csv; its"):
        prepare_fit_data(FitConfig(data=str(path), target="Lable"))
    with pytest.raises(UsageError, match=r"'citty' \(did you mean 'city'\?\), 'zzz' are not columns"):
        prepare_fit_data(FitConfig(data=str(path), target="label", drop=("citty", "zzz")))
    assert unknown_column_text([" AGE "], ["age", "x"]) == "' AGE ' (did you mean 'age'?) is not a column"
    assert column_list([f"c{i}" for i in range(40)], most=3) == "c0, c1, c2, ... (40 in all)"


def test_embedding_widths_follow_the_rule_or_the_flag(tmp_path):
    from ddptrain.preprocess import embedding_size

    path = real_table(tmp_path / "p.csv")
    default = prepare_fit_data(FitConfig(data=str(path), target="label")).spec.preprocessor
    assert default.embeddings == ((6, embedding_size(6)), (4, embedding_size(4)))
    fixed = prepare_fit_data(FitConfig(data=str(path), target="label", embedding_dim=5)).spec.preprocessor
    assert fixed.embeddings == ((6, 5), (4, 5))


def test_a_numeric_column_with_text_in_a_new_file_is_missing_there_with_a_note(tmp_path):
    from ddptrain.data import labelled_split
    from ddptrain.tables import read_table

    train = tmp_path / "train.csv"
    train.write_text("cyl,when,y\n" + "".join(f"{4 + i % 3},2020-01-{1 + i % 28:02d},{i % 2}\n" for i in range(40)))
    data = prepare_fit_data(FitConfig(data=str(train)))
    later = tmp_path / "later.csv"
    later.write_text("cyl,when,y\n4,2020-02-01,0\nrotary,soon,1\n6,2020/03/04,1\n")
    notes: list[str] = []
    split = labelled_split(data.spec, read_table(str(later)), notes=notes)
    assert len(split) == 3 and torch.isfinite(split.x).all()
    assert any("'cyl': 1 cells hold values that are not numbers" in n for n in notes), notes
    assert any("'when': 1 cells hold values that are not dates" in n for n in notes), notes


def test_a_text_column_of_numbers_with_a_few_words_is_numeric(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("age,y\n" + "".join(f"{'unknown' if i == 7 else 20 + i % 50},{i % 2}\n" for i in range(60)))
    data = prepare_fit_data(FitConfig(data=str(path)))
    role = data.roles[0]
    assert (role.kind, role.role) == ("text", "numeric") and "1 text cells are missing" in role.reason
    assert data.spec.preprocessor.columns[0].indicator and torch.isfinite(data.train.x).all()


@pytest.mark.parametrize("form", ["glob", "folder"])
def test_a_table_in_several_files(form, tmp_path):
    """`--data 'parts/part-*.csv'` or the folder: one table, read alike; errors name the file and its line."""
    from ddptrain.errors import DDPTrainError

    parts = tmp_path / "parts"
    parts.mkdir()
    whole = real_table(tmp_path / "whole.csv", rows=90).read_text().splitlines()
    for i in range(3):
        (parts / f"part-{i}.csv").write_text("\n".join([whole[0]] + whole[1 + 30 * i:31 + 30 * i]) + "\n")
    spec = str(parts / "part-*.csv") if form == "glob" else str(parts)
    split = prepare_fit_data(FitConfig(data=spec, target="label", val_fraction=0))
    single = prepare_fit_data(FitConfig(data=str(tmp_path / "whole.csv"), target="label", val_fraction=0))
    assert torch.equal(split.train.x, single.train.x) and torch.equal(split.train.y, single.train.y)
    bad = (parts / "part-2.csv").read_text().replace(",1000.00,", ",inf,").splitlines()
    bad[5] = bad[5].replace(bad[5].split(",")[7], "inf")
    (parts / "part-2.csv").write_text("\n".join(bad) + "\n")
    with pytest.raises(DDPTrainError, match=r"'income' .*part-2\.csv line 6 is infinite"):
        prepare_fit_data(FitConfig(data=spec, target="label", val_fraction=0))
    (parts / "part-1.csv").write_text("other,columns\n1,2\n")
    with pytest.raises(DDPTrainError, match="the same columns"):
        prepare_fit_data(FitConfig(data=spec, target="label"))


# -- the prepared-table cache ----------------------------------------------------------------------------------------
def test_the_prepared_table_is_cached_reused_and_rebuilt_when_stale_or_damaged(tmp_path, capsys):
    from ddptrain.cache import cached_fit_data

    path = real_table(tmp_path / "p.csv")
    cfg = FitConfig(data=str(path), target="label", cache_dir=str(tmp_path / "cache"), val_fraction=0.2)
    fresh = prepare_fit_data(cfg)
    first, how = cached_fit_data(cfg, lambda workspace: prepare_fit_data(cfg, workspace), tmp_path / "cache")
    assert how.startswith("prepared table cached in")
    folders = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(folders) == 1 and (folders[0] / "x_train.npy").is_file()

    def never(workspace):
        raise AssertionError("the cache should have been used")

    again, how = cached_fit_data(cfg, never, tmp_path / "cache")
    assert how.startswith("prepared table from the cache")
    assert torch.equal(again.train.x, fresh.train.x) and torch.equal(again.val.y, fresh.val.y)
    assert again.spec.preprocessor == fresh.spec.preprocessor and again.spec.notes == fresh.spec.notes
    assert [r.name for r in again.roles] == [r.name for r in fresh.roles]
    # damaged: rebuilt, never trusted
    (folders[0] / "x_train.npy").write_bytes(b"\x93NUMPY garbage")
    rebuilt, how = cached_fit_data(cfg, lambda workspace: prepare_fit_data(cfg, workspace), tmp_path / "cache")
    assert how.startswith("prepared table cached in") and torch.equal(rebuilt.train.x, fresh.train.x)
    # the file changed: another key, another build
    real_table(path, rows=130)
    changed, how = cached_fit_data(cfg, lambda workspace: prepare_fit_data(cfg, workspace), tmp_path / "cache")
    assert how.startswith("prepared table cached in") and len(changed.train) + len(changed.val) == 130
    # another setting that shapes the arrays: another key
    other = FitConfig(data=str(path), target="label", drop=("since",))
    assert cached_fit_data(other, lambda workspace: prepare_fit_data(other, workspace), tmp_path / "cache")[1].startswith("prepared table cached")



def test_a_build_removes_the_entries_of_files_that_changed_or_went(tmp_path):
    """An entry's key holds its files' size and mtime, so once a file changes its entries can never be used again:
    the next build removes them (fit's and eval/predict's alike), but not an unchanged file's, not one whose lock is
    held (being loaded), and not one whose file's folder is not there (another machine's mount)."""
    import fcntl
    import json
    import os

    from ddptrain.cache import cached_fit_data
    from ddptrain.cachefolder import SOURCES, release

    cache = tmp_path / "cache"

    def build(path, **settings):  # a job: it maps its entry until it ends
        cfg = FitConfig(data=str(path), target="label", **settings)
        try:
            return cached_fit_data(cfg, lambda workspace: prepare_fit_data(cfg, workspace), cache)[1]
        finally:
            release()

    def entries():
        return {p.name: json.loads((p / SOURCES).read_text())[0][0] for p in cache.iterdir() if p.is_dir()}

    a, b = real_table(tmp_path / "a.csv"), real_table(tmp_path / "b.csv")
    build(a), build(a, drop=("since",)), build(b)
    assert sorted(entries().values()) == sorted([str(a.resolve())] * 2 + [str(b.resolve())])
    (elsewhere := cache / ("0" * 32)).mkdir()  # an entry built on a machine that mounts /not-here
    (elsewhere / SOURCES).write_text(json.dumps([["/not-here/data.csv", 1, 1]]))
    real_table(a, rows=130)  # a changes: its two entries are dead
    held = next(name for name, source in entries().items() if source == str(b.resolve()))
    os.remove(b)  # b goes, but its entry is being loaded by another job right now
    lock = os.open(cache / f"{held}.lock", os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        how = build(a)
    finally:
        os.close(lock)
    assert how.endswith("(removed 2 older entries of files that have changed since)"), how
    assert held in entries() and sorted(entries().values()) == sorted([str(a.resolve()), str(b.resolve()),
                                                                       "/not-here/data.csv"])
    real_table(c := tmp_path / "c.csv")
    assert build(c).endswith("(removed 1 older entry of files that have changed since)")  # b's, now free
    assert held not in entries() and not (cache / f"{held}.lock").exists() and elsewhere.name in entries()

def test_a_float32_parquet_column_prepares_exactly_like_its_float64_copy(tmp_path):
    """float32 columns are kept at their width while reading (half the memory) and widened where computed on:
    statistics, splits and the prepared matrix equal those of the same values stored as float64."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 3)).astype(np.float32)
    x[::7, 1] = np.nan
    y = (x[:, 0] > 0).astype(np.int64)
    for dtype in ("float32", "float64"):
        pq.write_table(pa.table({**{f"f{j}": x[:, j].astype(dtype) for j in range(3)}, "y": y}),
                       tmp_path / f"{dtype}.parquet")
    narrow = prepare_fit_data(FitConfig(data=str(tmp_path / "float32.parquet"), target="y"))
    wide = prepare_fit_data(FitConfig(data=str(tmp_path / "float64.parquet"), target="y"))
    assert narrow.spec == wide.spec and narrow.spec.preprocessor.columns[1].indicator
    assert torch.equal(narrow.train.x, wide.train.x) and torch.equal(narrow.train.y, wide.train.y)


def write_as(table, path: Path) -> Path:
    """An Arrow table as the file its name says: CSV/TSV (compressed too), Parquet, Feather, JSON lines."""
    import json

    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.feather as feather
    import pyarrow.parquet as pq

    from ddptrain.tables import file_format

    fmt, compression = file_format(path)
    with pa.output_stream(str(path), compression=compression) as out:
        if fmt in ("csv", "tsv"):
            pacsv.write_csv(table, out, pacsv.WriteOptions(delimiter="\t" if fmt == "tsv" else ","))
        elif fmt == "jsonl":
            out.write("".join(json.dumps(row, default=str) + "\n" for row in table.to_pylist()).encode())
        elif fmt == "parquet":
            pq.write_table(table, out)
        else:
            feather.write_feather(table, out)
    return path


@pytest.mark.parametrize("layout", ["csv", "parquet", "csv shards", "parquet shards", "csv.gz", "tsv.bz2 shards",
                                    "feather", "feather shards", "jsonl", "jsonl.zst shards"])
def test_a_staged_table_is_the_table_with_its_numbers_on_disk(layout, tmp_path, monkeypatch):
    """Read in pieces of 16 rows (a compressed or JSON-lines file: of 2 kB), numbers and dates appended to files and
    mapped back: the same names, kinds, values, whole-number columns and error locations (file and line) as the
    whole read; nothing in memory for them."""
    import pyarrow.csv as pacsv

    from ddptrain import ondisk, tables
    from ddptrain.tables import read_table

    monkeypatch.setattr(ondisk, "STAGE_PIECE_ROWS", 16)
    monkeypatch.setattr(tables, "STREAM_BLOCK_BYTES", 2048)
    source = real_table(tmp_path / "t.csv", rows=400)
    if layout != "csv":
        whole = pacsv.read_csv(source, convert_options=tables._convert_options())  # typed as ddptrain reads it
        (tmp_path / "d").mkdir()
        parts = [whole.slice(0, 170), whole.slice(170)] if "shards" in layout else [whole]
        ending = layout.split()[0]
        for i, part in enumerate(parts):
            write_as(part, tmp_path / f"d/{i}.{ending}")
        source = tmp_path / "d" if "shards" in layout else tmp_path / f"d/0.{ending}"
    staged = ondisk.stage_table(str(source), tmp_path / "staged")
    read = read_table(str(source))
    assert (staged.names, staged.kinds, staged.integer, staged.path) == (read.names, read.kinds, read.integer, read.path)
    for name in read.names:
        a, b = staged.column(name), read.column(name)
        assert a.dtype == b.dtype and len(a) == len(b) == 400
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f") if a.dtype != object else a.tolist() == b.tolist()
        if staged.kind(name) in ("number", "datetime"):
            assert isinstance(a, np.memmap)
    assert [staged.where(r) for r in (0, 200, 399)] == [read.where(r) for r in (0, 200, 399)]


def test_csv_pieces_cut_only_between_rows_whatever_the_quoting(tmp_path):
    """A CSV read in byte ranges gives the whole read's rows: quoted fields holding commas, doubled quotes and
    line breaks, CRLF line ends, blank lines and a byte-order mark never split a row."""
    from ddptrain.tables import read_pieces, read_table

    rows = []
    for i in range(400):
        text = ['plain', '"a, b"', '"say ""hi"""', '"two\nlines"', '"x\r\ny, ""z"""'][i % 5]
        rows.append(f"{i},{text},{i * 0.5 if i % 7 else ''}")
        if i % 37 == 0:
            rows.append("")
    body = "\ufeffid,\"note, quoted\",v\r\n" + "\r\n".join(rows) + "\r\n"
    (tmp_path / "t.csv").write_bytes(body.encode("utf-8"))
    whole = read_table(str(tmp_path / "t.csv"))
    for rows_per_piece in (1, 3, 50):
        pieces = list(read_pieces(str(tmp_path / "t.csv"), rows_per_piece))
        assert len(pieces) > 1 and sum(len(p) for p in pieces) == len(whole) == 400
        assert pieces[0].names == whole.names == ["id", "note, quoted", "v"]
        for j, name in enumerate(whole.names):
            joined = np.concatenate([p.columns[j] for p in pieces])
            if whole.kind(name) == "number":
                assert np.array_equal(joined, whole.column(name), equal_nan=True)
            else:
                assert joined.tolist() == whole.column(name).tolist()


def test_a_csv_whose_types_change_mid_file_is_staged_by_a_whole_read(tmp_path, monkeypatch):
    from ddptrain import ondisk
    from ddptrain.tables import read_table

    monkeypatch.setattr(ondisk, "STAGE_PIECE_ROWS", 16)
    rows = ["a,b"] + [f"{i},{i % 3}" for i in range(3000)] + ["x,1"]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    staged = ondisk.stage_table(str(tmp_path / "t.csv"), tmp_path / "staged")
    assert staged.kinds == read_table(str(tmp_path / "t.csv")).kinds == ["text", "number"]
    assert not (tmp_path / "staged").exists()


def test_a_cache_build_that_fails_or_is_interrupted_leaves_nothing_behind(tmp_path):
    """The feature matrices are written straight into the cache's files; a build that runs out of room falls back
    to memory with a note, and Ctrl-C mid-build leaves no half-written folder."""
    import errno

    from ddptrain.cache import cached_fit_data

    path = real_table(tmp_path / "p.csv")
    cfg = FitConfig(data=str(path), target="label")
    calls = []

    def no_room(workspace):
        calls.append(workspace)
        if workspace is not None:
            (workspace / "x_train.npy").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return prepare_fit_data(cfg)

    data, how = cached_fit_data(cfg, no_room, tmp_path / "cache")
    assert how == "not cached (No space left on device)" and len(calls) == 2 and len(data.train) == 120
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()] == []

    def interrupted(workspace):
        prepare_fit_data(cfg, workspace)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_fit_data(cfg, interrupted, tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()] == []

    # a builder killed outright leaves its work folder (a staged table can be large): the next one removes it
    from ddptrain.cache import cache_key

    stale = tmp_path / "cache" / f"{cache_key(cfg)}.tmp-999999"
    (stale / "staged").mkdir(parents=True)
    (stale / "staged" / "column-3.bin").write_bytes(b"x" * 1000)
    cached_fit_data(cfg, lambda workspace: prepare_fit_data(cfg, workspace), tmp_path / "cache")
    assert not stale.exists()


def _build_in_a_process(path, cache, marker):
    """A worker of the concurrent-builders test: build or load, and record which."""
    from ddptrain.cache import cached_fit_data

    cfg = FitConfig(data=path, target="label")

    def build(workspace):
        with open(marker, "a") as handle:
            handle.write("built\n")
        return prepare_fit_data(cfg, workspace)

    data, how = cached_fit_data(cfg, build, Path(cache))
    return how.split()[2], data.train.x.sum().item()


@pytest.mark.slow
def test_concurrent_builders_build_once(tmp_path):
    """Four processes at once on one cache: one builds (under the lock), the others map its result."""
    import multiprocessing

    path = str(real_table(tmp_path / "p.csv", rows=3000))
    marker = tmp_path / "builds.txt"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        results = pool.starmap(_build_in_a_process, [(path, str(tmp_path / "cache"), str(marker))] * 4)
    assert marker.read_text() == "built\n"
    assert sorted(r[0] for r in results) == ["cached", "from", "from", "from"]
    assert len({r[1] for r in results}) == 1


def test_fit_with_and_without_the_cache(tmp_path):
    from ddptrain.run import fit

    path = str(real_table(tmp_path / "p.csv"))
    common = dict(data=path, target="label", epochs=2, hidden=(8,), quiet=True, cache_dir=str(tmp_path / "cache"))
    fit(FitConfig(out=str(tmp_path / "a"), **common))
    fit(FitConfig(out=str(tmp_path / "b"), **common))  # from the cache
    fit(FitConfig(out=str(tmp_path / "c"), cache=False, **{**common, "cache_dir": str(tmp_path / "none")}))
    from ddptrain.checkpoint import load_checkpoint

    weights = [load_checkpoint(tmp_path / run / "checkpoints/last.pt")["model"] for run in "abc"]
    assert all(torch.equal(weights[0][k], w[k]) for w in weights[1:] for k in weights[0])
    assert not (tmp_path / "none").exists()


def test_describe_command_takes_fits_own_flags(tmp_path, monkeypatch, capsys):
    import json
    import sys

    from ddptrain.cli import main

    path = real_table(tmp_path / "p.csv")
    monkeypatch.setattr(sys, "argv", ["ddptrain", "describe", str(path), "--target", "label", "--drop", "since",
                                      "--categorical", "age", "--json"])
    with pytest.raises(SystemExit) as exited:
        main()
    plan = json.loads(capsys.readouterr().out)
    assert exited.value.code == 0
    roles = {c["name"]: (c["role"], c["why"]) for c in plan["columns"]}
    assert roles["since"] == ("dropped", "--drop") and roles["age"] == ("categorical", "--categorical")
    assert plan["target"] == "label" and plan["classes"] == ["high", "low"]


def test_read_ahead_asks_for_the_blocks_of_the_next_window_once():
    """Under --shuffle block, each window's blocks are advised (whole blocks, page-aligned) before its rows are
    used, up to one window ahead, and never twice."""
    import mmap

    from ddptrain.data import SHUFFLE_WINDOW_BLOCKS, epoch_indices, shuffle_block_rows
    from ddptrain.readahead import ReadAhead

    n, world, width = 64 * 100, 2, 1024  # rows of one page each, in page-aligned memory as a mapped file is
    x = torch.frombuffer(mmap.mmap(-1, n * width * 4), dtype=torch.float32).view(n, width)
    order = epoch_indices(n, 1, 0, 1, world, "block")
    ahead = ReadAhead(x, order, n, world)
    advised = []
    ahead.advise = lambda addr, length, advice: advised.append((addr - x.data_ptr(), length))
    block, span = shuffle_block_rows(n), 100 * SHUFFLE_WINDOW_BLOCKS // world
    assert block == 100
    for position in range(0, len(order), 80):
        ahead.before(position)
        needed = {int(r) // block for r in order[:min(len(order), position + span + 1)]}
        assert needed <= {offset // (block * width * 4) for offset, _ in advised}
        assert not {offset // (block * width * 4) for offset, _ in advised} - {int(r) // block for r in order[:position + 2 * span]}
    assert len(advised) == len(set(advised)) and all(length == block * width * 4 for _, length in advised)


def test_staging_reports_rows_as_it_reads(tmp_path, monkeypatch, capsys):
    """Off a terminal: a plain line as pieces are read (rows, rows/s, time left when Parquet says the total), and
    one at the end."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from ddptrain import ondisk
    from ddptrain.console import RowProgress, console

    monkeypatch.setattr(console, "quiet", False)  # an earlier in-process fit may have left --quiet on
    monkeypatch.setattr(ondisk, "STAGE_PIECE_ROWS", 50)
    monkeypatch.setattr(RowProgress, "PLAIN_EVERY_S", 0.0)
    pq.write_table(pacsv.read_csv(real_table(tmp_path / "t.csv", rows=200)), tmp_path / "t.parquet")
    capsys.readouterr()
    ondisk.stage_table(str(tmp_path / "t.parquet"), tmp_path / "staged")
    lines = capsys.readouterr().out.splitlines()
    source = tmp_path / "t.parquet"
    assert lines[0].startswith(f"reading {source}: 50 of 200 rows, ") and lines[0].endswith(" s left")
    assert lines[-2].startswith(f"reading {source}: 200 of 200 rows")
    assert lines[-1].startswith(f"reading {source}: 200 rows in ")
    # a text file's total is an estimate from its first megabyte, and says so
    capsys.readouterr()
    ondisk.stage_table(str(tmp_path / "t.csv"), tmp_path / "staged-csv")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"reading {tmp_path / 't.csv'}: 50 of ~200 rows, ") and lines[0].endswith(" s left")


@pytest.mark.parametrize("ending", ["csv", "csv.gz", "jsonl.zst", "parquet"])
def test_the_rows_of_a_big_file_are_estimated_within_a_few_percent(ending, tmp_path):
    """For progress: Parquet's rows exactly (its metadata), a text file's (compressed too) from its first MB."""
    import pyarrow.csv as pacsv

    from ddptrain import tables

    typed = pacsv.read_csv(real_table(tmp_path / "t.csv", rows=40_000), convert_options=tables._convert_options())
    path = write_as(typed, tmp_path / f"big.{ending}")
    rows, exact = tables.count_rows(str(path))
    assert exact == (ending == "parquet")
    assert rows == 40_000 if exact else abs(rows - 40_000) <= 0.05 * 40_000, rows


def test_pieces_of_an_empty_or_damaged_parquet_file_are_refused_like_a_whole_read(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from ddptrain.errors import DDPTrainError
    from ddptrain.tables import read_pieces, read_table

    pq.write_table(pa.table({"a": pa.array([], pa.float64())}), tmp_path / "empty.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    for name, words in (("empty", "has a header but no data rows"), ("bad", "is not a readable Parquet file")):
        path = str(tmp_path / f"{name}.parquet")
        with pytest.raises(DDPTrainError, match=words):
            list(read_pieces(path, 10))
        with pytest.raises(DDPTrainError, match=words):
            read_table(path)


def test_the_transform_in_row_chunks_equals_the_transform_in_one(tmp_path, monkeypatch):
    """Columns are filled a chunk of rows at a time (bounded temporaries on long tables): the same matrix, the same
    unseen counts, whatever the chunk."""
    from ddptrain import preprocess
    from ddptrain.tables import read_table

    data = prepare_fit_data(FitConfig(data=str(real_table(tmp_path / "train.csv", rows=150)), target="label"))
    later = read_table(str(real_table(tmp_path / "later.csv", rows=50, seed=2, cities=("Paris", "Kyiv"))))
    rows = np.arange(49, -1, -3)  # picked and reordered
    whole = data.spec.preprocessor.transform(later, rows)
    monkeypatch.setattr(preprocess, "CHUNK_ROWS", 7)
    chunked = data.spec.preprocessor.transform(later, rows)
    assert np.array_equal(whole[0], chunked[0], equal_nan=True) and whole[1] == chunked[1] and whole[1]


def test_the_index_of_a_shuffled_or_filtered_frame_is_dropped(tmp_path):
    """pandas writes the index unnamed; after df.sample() or a train/test split it is any distinct whole numbers
    (R's row names start at 1). As a feature it leaks the source's order, often sorted by the target, so it goes;
    a named column of distinct whole numbers stays, and so does an unnamed one with a repeat."""
    rng = np.random.default_rng(0)
    index = rng.permutation(500)[:120] + 1
    rows = [",x,ident,label"] + [f"{i},{rng.normal():.4f},{i * 7},{'ab'[int(i > 250)]}" for i in index]
    (tmp_path / "split.csv").write_text("\n".join(rows) + "\n")
    roles = {r.name: (r.role, r.reason) for r in prepare_fit_data(FitConfig(data=str(tmp_path / "split.csv"),
                                                                              target="label")).roles}
    assert roles[""] == ("dropped", "an unnamed pandas index column") and roles["ident"][0] == "numeric"
    rows[2] = rows[1]  # the same index twice: not an index
    (tmp_path / "repeat.csv").write_text("\n".join(rows) + "\n")
    roles = {r.name: r.role for r in prepare_fit_data(FitConfig(data=str(tmp_path / "repeat.csv"),
                                                                 target="label")).roles}
    assert roles[""] == "numeric"


@pytest.mark.slow
def test_cache_command_lists_prunes_and_clears_and_never_takes_what_is_in_use(tmp_path):
    """`ddptrain cache` lists each entry (kind, files, size, state); --prune removes the entries of files that
    changed; --clear the rest; an entry a job maps (its shared `.use` lock, held here by this process, as a running
    job holds it) stays; a --cache-dir of the user's loses nothing that is not ddptrain's."""
    import fcntl
    import json
    import os

    from conftest import clean_env, cli

    env = clean_env(XDG_CACHE_HOME=str(tmp_path / "xdg"))
    cache = tmp_path / "xdg" / "ddptrain"
    a, b = real_table(tmp_path / "a.csv"), real_table(tmp_path / "b.csv", seed=1)
    for data in (a, b):
        assert cli("fit", "--data", str(data), "--target", "label", "--epochs", "1", "--quiet", "--out",
                   f"run-{data.stem}", cwd=tmp_path, env=env).returncode == 0
    evaluated = cli("eval", "run-a/checkpoints/last.pt", "--data", str(b), cwd=tmp_path, env=env)
    assert evaluated.returncode == 0, evaluated.stderr

    def listing(*flags):
        done = cli("cache", "--json", *flags, cwd=tmp_path, env=env)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    found = listing()["entries"]
    assert sorted((e["kind"], Path(e["sources"][0]).name) for e in found) == [
        ("eval", "b.csv"), ("fit", "a.csv"), ("fit", "b.csv")]
    assert all(e["size_bytes"] > 0 and not e["stale"] and not e["in_use"] for e in found)
    shown = cli("cache", cwd=tmp_path, env=clean_env(XDG_CACHE_HOME=str(tmp_path / "xdg"), COLUMNS="60"))
    assert f"      {a.resolve()}\n" in shown.stdout  # whole, however narrow the terminal

    real_table(b, rows=130, seed=1)  # b changes: its fit and eval entries can never be used again
    b_fit = next(e["key"] for e in found if e["kind"] == "fit" and e["sources"][0].endswith("b.csv"))
    held = os.open(cache / f"{b_fit}.use", os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_SH)  # a job still trains on it
    try:
        assert {e["key"]: e["stale"] for e in listing()["entries"]} == {e["key"]: "b.csv" in e["sources"][0]
                                                                        for e in found}
        pruned = listing("--prune")
        assert [(e["kind"], e["stale"]) for e in pruned["removed"]] == [("eval", True)]
        assert {e["key"] for e in pruned["entries"]} == {e["key"] for e in found if e["kind"] == "fit"}
        cleared = cli("cache", "--clear", cwd=tmp_path, env=env)
        assert cleared.stdout.startswith("ddptrain cache: removed 1 entry") and "1 entry in use kept" in cleared.stdout
        assert [e["key"] for e in listing()["entries"]] == [b_fit] and (cache / b_fit / "meta.json").exists()
    finally:
        os.close(held)
    assert listing("--clear")["entries"] == [] and not list(cache.glob("*.lock"))

    mine = tmp_path / "mine"
    (mine / ("ab" * 16)).mkdir(parents=True)
    (mine / ("ab" * 16) / "notes.txt").write_text("mine")
    (mine / "photo.jpg").write_text("mine")
    assert cli("cache", "--clear", "--cache-dir", str(mine), cwd=tmp_path, env=env).returncode == 0
    assert (mine / ("ab" * 16) / "notes.txt").exists() and (mine / "photo.jpg").exists()
    both = cli("cache", "--prune", "--clear", cwd=tmp_path, env=env)
    assert both.returncode == 2 and both.stderr.startswith("error: --prune and --clear do not go together")


@pytest.mark.slow
def test_a_running_job_keeps_its_cache_entry_through_cache_clear(tmp_path):
    import json
    import subprocess
    import sys
    import time

    from conftest import clean_env, cli

    env = clean_env(XDG_CACHE_HOME=str(tmp_path / "xdg"))
    data = real_table(tmp_path / "a.csv", rows=2000)
    job = subprocess.Popen([sys.executable, "-m", "ddptrain", "fit", "--data", str(data), "--target", "label",
                            "--epochs", "400", "--out", "run", "--quiet"], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "config.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        cleared = json.loads(cli("cache", "--clear", "--json", cwd=tmp_path, env=env).stdout)
        assert cleared["removed"] == [] and [e["in_use"] for e in cleared["entries"]] == [True]
    finally:
        job.kill()
        job.wait()
    assert json.loads(cli("cache", "--clear", "--json", cwd=tmp_path, env=env).stdout)["entries"] == []


@pytest.mark.parametrize("ending", ["csv.gz", "tsv", "tsv.zst", "feather", "jsonl", "ndjson.gz"])
def test_every_format_prepares_like_the_csv(ending, tmp_path):
    """The same table as compressed CSV, TSV, Feather or JSON lines trains on the same arrays as its CSV."""
    import pyarrow.csv as pacsv

    from ddptrain import tables

    source = real_table(tmp_path / "t.csv", rows=300)
    typed = pacsv.read_csv(source, convert_options=tables._convert_options())
    other = write_as(typed, tmp_path / f"t.{ending}")
    a, b = (prepare_fit_data(FitConfig(data=str(path), target="label")) for path in (source, other))
    assert a.spec.preprocessor == b.spec.preprocessor and a.spec.classes == b.spec.classes
    assert [r.role for r in a.roles] == [r.role for r in b.roles]
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.train.y, b.train.y)


@pytest.mark.slow
@pytest.mark.parametrize("name, content, message", [
    ("t.csv.gz", b"\x1f\x8b\x08\x00garbage" * 50, "could not be decompressed"),
    ("t.jsonl", b'{"a": 1, "label": "x"}\n{"a": 2, "label": \n', "could not be read as JSON lines"),
    ("t.xlsx", b"PK\x03\x04", "is a spreadsheet; save the sheet as CSV (CSV UTF-8) and pass that"),
    ("t.parquet.gz", b"PAR1", "unknown format '.gz'; use .csv, .tsv, .parquet, .feather, .jsonl or .npz"),
    ("t.feather", b"not arrow at all", "is not a readable Feather/Arrow file"),
])
def test_an_unreadable_file_of_any_format_is_one_line(name, content, message, tmp_path):
    from conftest import cli, error_lines

    (tmp_path / name).write_bytes(content)
    for args in (["describe", name, "--target", "label"], ["fit", "--data", name, "--target", "label"]):
        done = cli(*args, cwd=tmp_path)
        assert done.returncode == 1 and len(error_lines(done.stderr)) == 1, done.stderr
        assert message in error_lines(done.stderr)[0] and "Traceback" not in done.stderr, done.stderr
        assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_cache_clear_on_a_read_only_cache_is_one_line(tmp_path):
    """A cache on a read-only mount (another machine's, or a shared one): listing works, clearing says why not."""
    import json
    import os
    import subprocess

    from conftest import clean_env, cli, error_lines

    env = clean_env(XDG_CACHE_HOME=str(tmp_path / "xdg"))
    data = real_table(tmp_path / "a.csv")
    assert cli("fit", "--data", str(data), "--target", "label", "--epochs", "1", "--quiet", "--out", "run",
               cwd=tmp_path, env=env).returncode == 0
    cache = tmp_path / "xdg" / "ddptrain"
    if os.geteuid() != 0 or subprocess.run(["mount", "-o", "bind,ro", str(cache), str(cache)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to make a read-only mount")
    try:
        listed = cli("cache", "--json", cwd=tmp_path, env=env)
        assert listed.returncode == 0 and len(json.loads(listed.stdout)["entries"]) == 1
        cleared = cli("cache", "--clear", cwd=tmp_path, env=env)
        assert cleared.returncode == 1 and len(error_lines(cleared.stderr)) == 1, cleared.stderr
        assert error_lines(cleared.stderr)[0].startswith(f"error: cannot remove from the cache {cache}: Read-only")
    finally:
        subprocess.run(["umount", str(cache)], check=True)
    assert len(json.loads(cli("cache", "--json", cwd=tmp_path, env=env).stdout)["entries"]) == 1


def test_eval_and_predict_report_their_reading_on_stderr(tmp_path, monkeypatch, capsys):
    """Reading a file for eval/predict shows rows, rows/s and time left like fit's staging, on standard error:
    standard output is the command's result (`eval --json` stays one JSON line)."""
    from ddptrain import evaluate
    from ddptrain.console import RowProgress, console

    monkeypatch.setattr(console, "quiet", False)
    monkeypatch.setattr(RowProgress, "PLAIN_EVERY_S", 0.0)
    monkeypatch.setattr(evaluate, "PREDICT_CHUNK", 50)
    source = str(real_table(tmp_path / "t.csv", rows=200))
    capsys.readouterr()
    rows = evaluate.read_in_pieces(FitConfig(), source, None, lambda tables: sum(len(t) for t in tables))
    assert rows == 200
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out == "" and lines[0].startswith(f"reading {source}: 50 of ~200 rows, ")
    assert lines[-1].startswith(f"reading {source}: 200 rows in ")
