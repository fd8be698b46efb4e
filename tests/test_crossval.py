"""Choices cross-validated on a table from a file without a validation split (under 5,000 rows): the default
--numeric-bins (0 elsewhere) and whole-number columns like ids as categories (numbers elsewhere), the same at any
thread count (so at any world size), as given when given, kept by a resume."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import cli, in_process, real_table
from ddptrain.config import FitConfig, resolve_batch, resolve_epochs
from ddptrain.crossval import (
    AUTO_BINS,
    STEP_GAIN,
    category_candidates,
    resolve_numbers_as_categories,
    resolve_numeric_bins,
    step_gain,
)
from ddptrain.data import prepare_fit_data


def prepared(path, **settings):
    cfg = FitConfig(data=str(path), target="y", quiet=True, cache=False, val_fraction=0.0, **settings)
    data = prepare_fit_data(cfg)
    return resolve_epochs(resolve_batch(cfg, len(data.train)), len(data.train)), data


def write(path, y_of_x, rows=160, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, size=(rows, 3))
    y = y_of_x(x) + noise * rng.normal(size=rows)
    path.write_text("a,b,c,y\n" + "".join(f"{a:.5f},{b:.5f},{c:.5f},{t:.5f}\n" for (a, b, c), t in zip(x, y)))
    return path


def test_a_staircase_target_gets_pieces_and_a_noisy_line_does_not(tmp_path):
    """Thresholds (a staircase in one column) are what the pieces are for; on a noisy linear target they only add
    ways to overfit. Each choice says how it was made."""
    stairs = prepared(write(tmp_path / "stairs.csv", lambda x: np.floor(5 * x[:, 0]) * 2.0))
    line = prepared(write(tmp_path / "line.csv", lambda x: x[:, 0] + x[:, 1], rows=120, noise=1.0))
    chose_stairs, how = resolve_numeric_bins(*stairs)
    assert chose_stairs.numeric_bins == AUTO_BINS, how
    assert how.startswith(f"numeric pieces: {AUTO_BINS} per number (4-fold cross-validation on the training rows")
    chose_line, how = resolve_numeric_bins(*line)
    assert chose_line.numeric_bins == 0, how


def test_the_choice_is_the_same_at_any_thread_count_and_leaves_the_thread_count_alone(tmp_path):
    """Ranks run with 1 thread under torchrun and with all cores alone: the folds run on one thread either way."""
    cfg, data = prepared(write(tmp_path / "t.csv", lambda x: np.floor(5 * x[:, 0]), rows=200))
    before = torch.get_num_threads()
    decided = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            decided[threads] = resolve_numeric_bins(cfg, data)
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    assert decided[1] == decided[2] and decided[1][1] is not None  # the message holds both losses


def test_given_bins_big_tables_and_built_ins_are_not_cross_validated(tmp_path):
    path = real_table(tmp_path / "t.csv", rows=120)
    cfg = FitConfig(data=str(path), target="label", quiet=True, cache=False, numeric_bins=4)
    data = prepare_fit_data(cfg)
    assert resolve_numeric_bins(cfg, data) == (cfg, None)
    validated = FitConfig(data=str(path), target="label", quiet=True, cache=False, val_fraction=0.2)
    assert resolve_numeric_bins(validated, prepare_fit_data(validated))[0].numeric_bins == 0  # a validation split
    # without a validation split, under SMALL_TABLE_ROWS (5,000) the folds decide; from there (bagged up to 20,000
    # rows), 0
    from ddptrain.config import SMALL_TABLE_ROWS

    mid = prepared(write(tmp_path / "mid.csv", lambda x: np.floor(5 * x[:, 0]) * 2.0, rows=1200))
    assert resolve_numeric_bins(*mid)[0].numeric_bins == AUTO_BINS
    cfg, long = prepared(write(tmp_path / "long.csv", lambda x: np.floor(5 * x[:, 0]) * 2.0, rows=SMALL_TABLE_ROWS))
    assert resolve_numeric_bins(cfg, long) == (dataclasses.replace(cfg, numeric_bins=0), None)
    built_in = FitConfig(data="moons", n_samples=200, quiet=True, val_fraction=0.0)
    assert resolve_numeric_bins(built_in, prepare_fit_data(built_in)) == (
        dataclasses.replace(built_in, numeric_bins=0), None)


@pytest.mark.slow
def test_fit_records_the_choice_and_a_resume_keeps_it(tmp_path, capsys):
    """The choice is recorded (config.json, the checkpoint); a resume with more epochs keeps it without running
    the folds again (at another --epochs they might choose otherwise, and the weights would not fit)."""
    import json

    from ddptrain import console as console_module
    from ddptrain.checkpoint import load_checkpoint
    from ddptrain.run import fit

    path = write(tmp_path / "stairs.csv", lambda x: np.floor(5 * x[:, 0]) * 2.0)
    base = dict(data=str(path), target="y", out=str(tmp_path / "run"), early_stop=0, bagging="off")  # every epoch runs; one model
    fit(FitConfig(**base, quiet=True))
    recorded = json.loads((tmp_path / "run/config.json").read_text())
    assert recorded["numeric_bins"] == AUTO_BINS
    console_module.console.quiet = False
    capsys.readouterr()
    fit(FitConfig(**base, epochs=recorded["epochs"] + 1, resume="auto"))
    assert "numeric pieces" not in capsys.readouterr().out
    state = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    assert state["config"]["numeric_bins"] == AUTO_BINS and state["model_spec"]["bins"] == AUTO_BINS
    assert state["position"]["epoch"] == recorded["epochs"] + 1


def write_families(path, rows=480, seed=0):
    """Children's heights: each family's own effect (its number says nothing of it), a parent's height, and a
    weight in whole pounds (a quantity: the target rises with it). Families have 1 to 6 children, in no order
    (3.5 on average: too few for the codes rule, which embeds beside the number)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 7, size=rows)
    family = np.repeat(np.arange(1, len(sizes) + 1), sizes)[:rows]
    effect = rng.normal(0, 2.0, size=family.max() + 1)
    parent = rng.normal(68, 2, size=rows)
    weight = rng.integers(100, 200, size=rows)
    height = effect[family] + 0.5 * parent + 0.05 * weight + rng.normal(0, 0.3, size=rows)
    path.write_text("family,parent,weight,y\n" + "".join(f"{f},{p:.2f},{w},{h:.3f}\n"
                                                         for f, p, w, h in zip(family, parent, weight, height)))
    return path


def test_a_family_number_is_taken_as_categories_and_a_whole_number_quantity_is_not(tmp_path):
    """Both columns look like ids (whole numbers, repeating unevenly in no order of the numbers); the folds tell
    them apart: each family's effect is learnt as a category, the weight's slope only as a number. The data comes
    back prepared with the family as a category, and each column's line says how it was decided."""
    path = write_families(tmp_path / "families.csv")
    cfg, data = prepared(path)
    assert [r.name for r in data.roles if r.like_ids] == ["family", "weight"]
    lines = []
    decided, redone, plain = resolve_numbers_as_categories(cfg, cfg, data, None, prepare_fit_data, lines.append)
    assert decided.numbers_as_categories == ("family",), lines
    assert lines[0] == ("choosing numbers or categories for 'family' (whole numbers like ids), 'weight' (whole "
                        "numbers like ids) by 4-fold cross-validation on the 480 training rows")
    assert lines[1].startswith("column 'family' is taken as categories (4-fold cross-validation: validation loss ")
    assert lines[1].endswith("; --numeric family keeps it a number)")
    assert lines[2].startswith("column 'weight' is taken as numbers") and lines[2].endswith(
        "--categorical weight makes it one)")
    roles = {c.name: c.role for c in redone.spec.preprocessor.columns}
    assert roles == {"family": "categorical", "parent": "numeric", "weight": "numeric"}
    assert plain is None  # measured on the numbers; the pieces' folds run again on the prepared categories
    assert resolve_numeric_bins(decided, redone)[0].numeric_bins in (0, AUTO_BINS)


def test_a_column_of_few_values_whose_target_moves_in_steps_is_tried_and_a_smooth_one_is_not(tmp_path):
    """A month whose effect jumps from one value to the next (a code 12 for 'not yet', a season) is tried as
    categories and taken; a 1-5 rating whose effect rises smoothly is not even tried (no folds spent on it)."""
    rng = np.random.default_rng(0)
    rows = 400
    weights = np.arange(1, 13) ** 2.0  # later months far more common: not a code column (those are embedded already)
    month = rng.choice(np.arange(1, 13), size=rows, p=weights / weights.sum())
    rating = rng.integers(1, 6, size=rows)
    effect = np.array([0, 3, -2, 4, 0, -3, 5, 1, -4, 2, -1, 3, -5.0])
    y = effect[month] + 0.8 * rating + rng.normal(0, 0.5, size=rows)
    path = tmp_path / "steps.csv"
    path.write_text("month,rating,y\n" + "".join(f"{m},{r},{t:.3f}\n" for m, r, t in zip(month, rating, y)))
    cfg, data = prepared(path)
    targets = data.train.y.numpy()[:, None].astype(np.float64)
    gains = {name: step_gain(data.train.x[:, k].numpy().astype(np.float64), targets)
             for k, name in enumerate(("month", "rating"))}
    assert gains["month"] > 0.5 and gains["rating"] < STEP_GAIN, gains
    assert step_gain(np.arange(rows, dtype=np.float64) % 2, targets) == 0.0  # two values: nothing between them
    assert category_candidates(data) == {"month": "few values, the target in steps"}
    lines = []
    decided, redone, _ = resolve_numbers_as_categories(cfg, cfg, data, None, prepare_fit_data, lines.append)
    assert decided.numbers_as_categories == ("month",), lines
    assert lines[0].startswith("choosing numbers or categories for 'month' (few values, the target in steps) by ")
    assert {c.name: c.role for c in redone.spec.preprocessor.columns} == {"month": "categorical", "rating": "numeric"}


def test_given_or_saved_ids_and_tables_with_validation_rows_are_not_cross_validated(tmp_path):
    path = write_families(tmp_path / "families.csv")
    cfg, data = prepared(path)
    told = []
    for given in ((), ("weight",)):
        asked = dataclasses.replace(cfg, numbers_as_categories=given)
        assert resolve_numbers_as_categories(asked, asked, data, None, prepare_fit_data, told.append) == (asked, data, None)
    saved, redone, _ = resolve_numbers_as_categories(cfg, cfg, data, ["weight"], prepare_fit_data, told.append)
    assert told == [] and saved.numbers_as_categories == ("weight",)  # a resume: its run's choice, no folds
    assert {c.name: c.role for c in redone.spec.preprocessor.columns}["weight"] == "categorical"
    validated = FitConfig(data=str(path), target="y", quiet=True, cache=False, val_fraction=0.2)
    data = prepare_fit_data(validated)
    assert resolve_numbers_as_categories(validated, validated, data, None, prepare_fit_data, told.append)[0] \
        .numbers_as_categories == () and told == []
    assert any("like ids in 'family', 'weight'" in n for n in data.spec.notes)  # no folds: the note names them


@pytest.mark.slow
def test_fit_takes_the_family_as_categories_eval_reads_it_and_a_resume_keeps_it(tmp_path, monkeypatch, capsys):
    """From the command line, on 2 processes: the choice is announced, recorded (config.json), applied by eval
    and predict to the raw file, and kept by a resume (no folds); the flag sets it, '' for none; a mistake in it
    is one line, exit 2."""
    import json

    path = write_families(tmp_path / "families.csv")
    run = tmp_path / "run"
    done = cli("fit", "--data", str(path), "--target", "y", "--out", str(run), "--bagging", "off",
               "--nproc-per-node", "2", cwd=tmp_path)  # each rank makes the same choice; rank 0 says it, once
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("column 'family' is taken as categories") == 1
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["numbers_as_categories"] == ["family"]
    scored = cli("eval", str(run / "checkpoints/best.pt"), "--data", str(path), "--json", cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout.strip().splitlines()[-1])["r2"] > 0.5
    predicted = cli("predict", str(run / "checkpoints/best.pt"), "--data", str(path), "--out",
                    str(tmp_path / "p.csv"), cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr
    again = cli("fit", "--data", str(path), "--target", "y", "--out", str(run), "--bagging", "off", "--no-cache",
                "--epochs", str(recorded["epochs"] + 1), "--resume", "auto", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "choosing numbers or categories" not in again.stdout
    assert json.loads((run / "config.json").read_text())["numbers_as_categories"] == ["family"]
    none = cli("fit", "--data", str(path), "--target", "y", "--out", str(tmp_path / "none"), "--bagging", "off",
               "--no-cache", "--epochs", "1", "--numbers-as-categories", "", cwd=tmp_path)
    assert none.returncode == 0 and "choosing numbers or categories" not in none.stdout, none.stderr
    assert json.loads((tmp_path / "none/config.json").read_text())["numbers_as_categories"] == []
    for bad, said in ((("--numbers-as-categories", "famly"), "--numbers-as-categories: 'famly' (did you mean 'family'?)"),
                      (("--numbers-as-categories", "family", "--numeric", "family"), "'family' given two roles")):
        code, err = in_process(monkeypatch, capsys, "fit", "--data", str(path), "--target", "y", "--out",
                               str(tmp_path / "bad"), *bad)
        assert code == 2 and len(err.strip().splitlines()) == 1 and said in err, err
        assert not (tmp_path / "bad").exists()
