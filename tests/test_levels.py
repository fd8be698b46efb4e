"""Categorical columns of many levels: rare levels share one, embeddings stay narrow, ID-like text is dropped, and
fit and describe say so."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from ddptrain.config import FitConfig
from ddptrain.data import prepare_fit_data
from ddptrain.preprocess import EMBED_CAP, RARE_COUNT, RARE_SHARE, embedding_size, rare_count


def many_levels(path, rows=6000, seed=0):
    """A plane's tail number (3,000 of them, seen once to a few dozen times: nearly an ID), an airport (4 common
    levels and 40 seen a handful of times), an order id unique in most rows, a number; the label follows the
    number and the airport."""
    rng = np.random.default_rng(seed)
    airports = np.where(rng.random(rows) < 0.9, rng.choice(["JFK", "LGA", "EWR", "BOS"], rows),
                        np.char.add("small-", rng.integers(0, 40, rows).astype(str)))
    tails = np.char.add("N", (rng.zipf(1.3, rows) % 3000).astype(str))
    order = np.char.add("order-", rng.permutation(rows * 2)[:rows].astype(str))
    order[::10] = "order-0"  # not unique in every row: only the distinct-share rule catches it
    delay = rng.normal(size=rows)
    label = np.where(delay + (airports == "JFK") > 0.5, "late", "on time")
    lines = ["tail,airport,order,delay,label"] + [f"{t},{a},{o},{d:.4f},{y}" for t, a, o, d, y in
                                                 zip(tails, airports, order, delay, label)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_rare_levels_are_scaled_with_the_table():
    assert rare_count(50) == RARE_COUNT and rare_count(1_000_000) == int(np.ceil(1_000_000 * RARE_SHARE))
    assert rare_count(10_000) >= rare_count(5_000) >= RARE_COUNT


def test_embeddings_are_capped_so_no_column_dominates():
    assert embedding_size(4) == 3 and embedding_size(3000) == EMBED_CAP <= 16


def test_a_many_level_column_keeps_only_levels_seen_often_and_an_id_is_dropped(tmp_path, capsys):
    data = prepare_fit_data(FitConfig(data=str(many_levels(tmp_path / "t.csv")), target="label", cache=False))
    pre = data.spec.preprocessor
    plans = {c.name: c for c in pre.columns}
    assert "order" in pre.dropped and "order" not in plans  # ID-like: distinct values in most rows
    least = rare_count(len(data.train))
    tails = plans["tail"]
    train_codes = data.train.x[:, pre.n_numeric + [c.name for c in pre.columns if c.role == "categorical"].index("tail")]
    counts = np.bincount(train_codes.numpy().astype(int))
    assert (counts[2:] >= least).all()  # every learnt level is seen `least` times; the rest are code 0, "rare"
    assert counts[0] > 0 and len(tails.levels) < 200 and tails.embedding_dim <= EMBED_CAP
    assert {"JFK", "LGA", "EWR", "BOS"} <= set(plans["airport"].levels)
    notes = " | ".join(data.spec.notes)
    assert "column 'order' is dropped: ID-like" in notes
    assert "column 'tail' has" in notes and f"seen in {least:,} or more rows are learnt" in notes


def test_describe_flags_an_id_and_a_many_level_column(tmp_path, monkeypatch, capsys):
    from ddptrain.cli import main

    path = many_levels(tmp_path / "t.csv")
    monkeypatch.setattr(sys, "argv", ["ddptrain", "describe", str(path), "--target", "label", "--json"])
    with pytest.raises(SystemExit) as exited:
        main()
    plan = json.loads(capsys.readouterr().out)
    assert exited.value.code == 0
    roles = {c["name"]: (c["role"], c["why"]) for c in plan["columns"]}
    assert roles["order"][0] == "dropped" and roles["order"][1].startswith("ID-like")
    assert roles["tail"][0] == "categorical"
    assert any(note.startswith("column 'tail' has") and "share one 'rare' level" in note for note in plan["notes"])


def test_an_id_kept_on_purpose_is_a_category_of_rare_levels(tmp_path):
    data = prepare_fit_data(FitConfig(data=str(many_levels(tmp_path / "t.csv")), target="label", cache=False,
                                      categorical=("order",)))
    plans = {c.name: c for c in data.spec.preprocessor.columns}
    assert plans["order"].levels == ("order-0",)  # the one repeated value; every other id is rare


def test_a_column_whose_every_level_is_rare_says_so(tmp_path):
    """3,000 levels over 30,000 rows (about 10 each), none seen often enough to learn: the note says the column carries nothing
    but missingness, instead of "0 levels are learnt"."""
    from ddptrain.preprocess import level_notes, infer_roles
    from ddptrain.tables import read_table

    rng = np.random.default_rng(0)
    lines = ["tail,x,label"] + [f"N{rng.integers(0, 3000)},{rng.normal():.3f},{i % 2}" for i in range(30000)]
    path = tmp_path / "t.csv"
    path.write_text("\n".join(lines) + "\n")
    table = read_table(str(path))
    roles = infer_roles(table, "label")
    notes = level_notes(table, roles, np.arange(len(table)))
    tail = [n for n in notes if n.startswith("column 'tail'")]
    assert len(tail) == 1 and "none seen in" in tail[0] and "--drop tail" in tail[0], notes


def store_sales(path, rows=1500, seed=0, stores=30):
    """Sales by store number (1..30, each store its own offset: no smooth function of the number), a price, a
    count of whole numbers too spread out to repeat (a quantity, not a code) and a 1-5 rating (too few values to
    need an embedding)."""
    rng = np.random.default_rng(seed)
    offset = np.random.default_rng(99).normal(0, 3, stores + 1)
    store = rng.integers(1, stores + 1, rows)
    price = rng.normal(10, 2, rows)
    visitors = rng.integers(0, 100_000, rows)
    rating = rng.integers(1, 6, rows)
    sales = offset[store] + 0.5 * price + 0.1 * rating + rng.normal(0, 0.3, rows)
    cells = [f"{s},{p:.3f},{v},{r},{y:.4f}" for s, p, v, r, y in zip(store, price, visitors, rating, sales)]
    path.write_text("\n".join(["store,price,visitors,rating,sales"] + cells) + "\n")
    return path


def test_whole_numbers_that_repeat_like_codes_are_also_embedded(tmp_path):
    data = prepare_fit_data(FitConfig(data=str(store_sales(tmp_path / "sales.csv")), target="sales"))
    plans = {c.name: c for c in data.spec.preprocessor.columns}
    assert plans["store"].role == "numeric" and plans["store"].width == 1 and len(plans["store"].levels) == 30
    assert not plans["visitors"].levels and not plans["price"].levels  # too spread out to repeat; not whole
    assert not plans["rating"].levels  # 5 values: the number tells them apart
    assert data.spec.preprocessor.embeddings == ((32, embedding_size(32)),)
    assert any("repeat like codes" in n and "'store' (30)" in n for n in data.spec.notes)
    # the code follows the number: a store's rows share one code, never the UNKNOWN or MISSING one
    codes = data.train.x[:, -1].numpy()
    assert codes.min() >= 2 and len(np.unique(codes)) == 30
    # codes past float32's whole numbers (a date written 20240131) would not match themselves when served as float32
    big = store_sales(tmp_path / "big.csv")
    big.write_text("\n".join([big.read_text().splitlines()[0]] + [
        f"{20240100 + int(line.split(',')[0])}," + line.split(",", 1)[1] for line in big.read_text().splitlines()[1:]]) + "\n")
    assert not prepare_fit_data(FitConfig(data=str(big), target="sales")).spec.preprocessor.embeddings
    # --numeric asks for the number alone
    alone = prepare_fit_data(FitConfig(data=str(tmp_path / "sales.csv"), target="sales", numeric=("store",)))
    assert not alone.spec.preprocessor.embeddings
    # describe says so before any training
    from ddptrain.describe import table_description

    plan = table_description(FitConfig(data=str(tmp_path / "sales.csv"), target="sales"))
    roles = {c["name"]: (c["role"], c["why"], c.get("codes")) for c in plan["columns"]}
    assert roles["store"] == ("numeric", "numbers; 30 values repeat like codes: each also embedded", 30)
    assert roles["rating"] == ("numeric", "numbers", None) and roles["visitors"] == ("numeric", "numbers", None)
    assert any("'store' (30)" in note for note in plan["notes"])


def test_whole_numbers_like_ids_get_a_note_and_quantities_do_not(tmp_path):
    from ddptrain.describe import table_description
    from ddptrain.preprocess import CODE_ORDER_LEVELS, counts_in_no_order

    rng = np.random.default_rng(3)
    busy = rng.lognormal(0, 1, 200)  # stores, some far busier than others in no order of their numbers
    assert counts_in_no_order(np.round(busy * 20).astype(int) + 5) and counts_in_no_order(np.full(40, 7))
    falling = np.round(1000 * np.exp(-np.arange(60) / 8)).astype(int) + 1  # at-bats, days ill: small values common
    hump = np.round(500 * np.exp(-((np.arange(70) - 30) / 12) ** 2)).astype(int) + 1  # ages
    rising = np.arange(1, 41) * 3  # later years busier
    assert not any(counts_in_no_order(c) for c in (falling, hump, rising))
    assert not counts_in_no_order(np.round(busy[:CODE_ORDER_LEVELS - 1] * 20).astype(int) + 5)  # too few to tell

    # 60 lecturers rated unevenly (not even enough to be embedded as codes), an age and a count beside them
    rows, lecturers = 3000, 60
    weights = rng.lognormal(0, 1, lecturers)
    lecturer = rng.choice(np.arange(1, lecturers + 1), rows, p=weights / weights.sum())
    age = np.clip(np.round(rng.normal(40, 10, rows)), 18, 90).astype(int)
    days_ill = rng.geometric(0.15, rows)
    y = np.random.default_rng(99).normal(0, 3, lecturers + 1)[lecturer] + 0.1 * days_ill + rng.normal(0, 0.3, rows)
    path = tmp_path / "ratings.csv"
    path.write_text("lecturer,age,days_ill,y\n" + "".join(f"{a},{b},{c},{d:.4f}\n"
                                                       for a, b, c, d in zip(lecturer, age, days_ill, y)))
    counts = np.bincount(lecturer)[1:]
    assert counts.std() > 0.5 * counts.mean()  # uneven: not a code by the evenness rule
    assert not any("like ids" in n for n in prepare_fit_data(FitConfig(data=str(path), target="y")).spec.notes)
    # (3,000 rows and no validation rows: fit's folds decide, test_crossval); with validation rows, a note
    notes = prepare_fit_data(FitConfig(data=str(path), target="y", val_fraction=0.2)).spec.notes
    hint = [n for n in notes if "like ids" in n]
    assert len(hint) == 1 and "'lecturer'" in hint[0] and "'age'" not in hint[0] and "'days_ill'" not in hint[0]
    assert "--categorical lecturer" in hint[0]
    plan = table_description(FitConfig(data=str(path), target="y"))
    assert [c["name"] for c in plan["columns"] if c.get("like_ids")] == ["lecturer"]
    assert {c["name"]: c["why"] for c in plan["columns"]}["lecturer"] == "numbers; like ids (see the note)"
    assert any("like ids in 'lecturer': on a table this short fit tries each as categories" in n
               for n in plan["notes"])  # 3,000 rows: fit's folds will try it
    quiet = table_description(FitConfig(data=str(path), target="y", numbers_as_categories=()))  # decided by the flag
    assert not any("like ids" in n for n in quiet["notes"])
    assert {c["name"]: c["why"] for c in quiet["columns"]}["lecturer"] == "numbers; like ids"
    for asked in (dict(numeric=("lecturer",)), dict(categorical=("lecturer",))):  # a flag answers the note
        again = prepare_fit_data(FitConfig(data=str(path), target="y", val_fraction=0.2, **asked)).spec.notes
        assert not any("like ids" in n for n in again)


def test_a_text_column_of_numbers_with_a_label_among_them_looks_like_ids_and_numeric_takes_it(tmp_path):
    """Family numbers written as text with a few labels among them (GaltonFamilies' '136A'): numbers with a few
    text cells (missing), whose counts say ids; --numeric takes such a column (a text column of words it refuses,
    in one line) and quiets the note; --numbers-as-categories takes it as categories."""
    from ddptrain.preprocess import infer_roles
    from ddptrain.tables import read_table

    rng = np.random.default_rng(1)
    families = [f"{f:03d}" for f in range(1, 121)] + ["56A", "71B"]
    sizes = rng.integers(1, 8, size=len(families))
    cells = [f for f, k in zip(families, sizes) for _ in range(k)]
    path = tmp_path / "heights.csv"
    path.write_text("family,word,height\n" + "".join(f"{f},w{i % 3},{rng.normal(66, 3):.1f}\n"
                                                     for i, f in enumerate(cells)))
    table = read_table(str(path))
    assert dict(zip(table.names, table.kinds))["family"] == "text"
    roles = {r.name: r for r in infer_roles(table, "height")}
    labels = int(sizes[-2:].sum())
    assert roles["family"].role == "numeric" and roles["family"].reason == f"numbers; {labels} text cells are missing values"
    assert roles["family"].like_ids
    asked = {r.name: r for r in infer_roles(table, "height", numeric=("family",))}["family"]
    assert (asked.role, asked.reason, asked.like_ids) == ("numeric", "--numeric", False)
    categories = {r.name: r for r in infer_roles(table, "height", numbers_as_categories=("family",))}["family"]
    assert (categories.role, categories.reason) == ("categorical", "--numbers-as-categories")
    with pytest.raises(Exception, match="--numeric word: column 'word' .* holds text values"):
        infer_roles(table, "height", numeric=("word",))


def test_an_embedded_code_learns_what_the_number_alone_cannot(tmp_path):
    from ddptrain.run import fit

    store_sales(tmp_path / "sales.csv")
    common = dict(data=str(tmp_path / "sales.csv"), target="sales", epochs=15, hidden=(32, 32), quiet=True,
                  bagging="off")  # one model each, on a fifth held out: the codes, not the bagging, are tested
    coded = fit(FitConfig(**common, out=str(tmp_path / "coded")))
    alone = fit(FitConfig(**common, numeric=("store",), out=str(tmp_path / "alone")))
    assert coded["best"] < 0.5 * alone["best"], (coded["best"], alone["best"])  # validation loss
