"""The default --numeric-bins: cross-validated on a table from a file without a validation split (under 5,000
rows), 0 elsewhere, the same at any thread count (so at any world size), as given when given."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import real_table
from ddptrain.config import FitConfig, resolve_batch, resolve_epochs
from ddptrain.crossval import AUTO_BINS, resolve_numeric_bins
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
