"""Seeing a run: progress on a terminal and off it, plots, TensorBoard events, the env report."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

import pytest
import torch
from conftest import clean_env, cli, epoch_rows

from ddptrain.config import FitConfig
from ddptrain.errors import DDPTrainError
from ddptrain.run import fit

QUICK = ["fit", "--data", "moons", "--n-samples", "600", "--epochs", "2", "--hidden", "16", "--log-every", "3",
         "--val-fraction", "0.2"]


def run_on_terminal(args: list[str], cwd) -> str:
    """Run the CLI with a pseudo-terminal as stdout, as a user at a shell would."""
    master, slave = pty.openpty()
    env = clean_env(COLUMNS="120", TERM="xterm-256color")
    proc = subprocess.Popen([sys.executable, "-m", "ddptrain", *args], cwd=cwd, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=120)
    os.close(master)
    assert proc.returncode == 0
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_progress_bar_on_a_terminal(tmp_path):
    screen = run_on_terminal(QUICK + ["--out", "run"], tmp_path)
    assert "━" in screen and "samples/s" in screen and "epoch 1/2" in screen  # the Rich bar
    assert "val_accuracy" in screen and "ddptrain fit: done" in screen


@pytest.mark.slow
def test_plain_lines_off_a_terminal(tmp_path):
    result = cli(*QUICK, "--out", "run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "epoch 1/2 step 3/" in result.stdout and "━" not in result.stdout.split("ddptrain fit: done")[0]
    rows = epoch_rows(tmp_path / "run")
    assert rows[0]["time_to_first_step_s"] > 0


@pytest.mark.slow
def test_quiet_prints_only_the_summary(tmp_path):
    result = cli(*QUICK, "--out", "run", "--quiet", cwd=tmp_path)
    assert result.returncode == 0
    assert "epoch 1/2" not in result.stdout and "ddptrain fit: done" in result.stdout


@pytest.mark.slow
def test_plot_two_runs(tmp_path):
    pytest.importorskip("matplotlib")
    for name, lr in (("lr-small", 0.001), ("lr-large", 0.01)):
        fit(FitConfig(data="moons", n_samples=600, epochs=3, hidden=(16,), lr=lr, out=str(tmp_path / name), quiet=True))
    result = cli("plot", "lr-small", "lr-large", "--out", "curves.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    svg = cli("plot", "lr-small", "--out", "curves.svg", cwd=tmp_path)
    assert svg.returncode == 0 and (tmp_path / "curves.svg").read_text().lstrip().startswith("<?xml")
    again = cli("plot", "lr-small", "--out", "curves.png", cwd=tmp_path)  # an existing file is kept
    assert again.returncode == 1 and (tmp_path / "curves.png").read_bytes() == png
    assert "--out curves.png already exists; pass --overwrite" in again.stderr
    replaced = cli("plot", "lr-small", "-h", cwd=tmp_path)
    assert replaced.returncode == 0 and "--overwrite" in replaced.stdout
    assert cli("plot", "lr-small", "--out", "curves.png", "--overwrite", cwd=tmp_path).returncode == 0
    assert (tmp_path / "curves.png").read_bytes() != png


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    from ddptrain.plot import plot_runs

    fit(FitConfig(data="moons", n_samples=300, epochs=1, hidden=(8,), out=str(tmp_path / "run"), quiet=True))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(DDPTrainError, match=r"pip install 'ddptrain\[plot\]'"):
        plot_runs([tmp_path / "run"], tmp_path / "x.png")


def test_tensorboard_events_hold_the_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fit(FitConfig(data="moons", n_samples=600, epochs=2, hidden=(16,), out=str(tmp_path / "run"), quiet=True,
                  tensorboard=True, log_every=3, val_fraction=0.2))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"step/train_loss", "step/lr", "epoch/train_loss", "epoch/val_loss", "epoch/val_accuracy"} <= tags
    rows = epoch_rows(tmp_path / "run")
    assert [e.value for e in events.Scalars("epoch/val_loss")] == pytest.approx([r["val_loss"] for r in rows])
    # a resume continues the same scalars without a second copy of any step
    fit(FitConfig(data="moons", n_samples=600, epochs=3, hidden=(16,), out=str(tmp_path / "run"), quiet=True,
                  tensorboard=True, log_every=3, resume="auto", val_fraction=0.2))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("epoch/val_loss")]
    assert steps == sorted(set(steps)) and len(steps) == 3


def test_when_more_local_workers_help():
    """The measured rule: CPU workers under two cores each are slower than one process; GPUs get one each."""
    from ddptrain.envreport import recommended_launch
    from ddptrain.run import crowded_cpu_note

    assert crowded_cpu_note("cpu", 2, 2) == (
        "2 workers on this machine's 2 cores leave each 1 core; on CPU one process (which uses every core) is "
        "usually faster: fewer workers, or more machines, train quicker (docs/speed.md)")
    assert "leave each 0.5 cores" in crowded_cpu_note("cpu", 4, 2)
    assert crowded_cpu_note("cpu", 2, 4) == crowded_cpu_note("cpu", 1, 1) == crowded_cpu_note("cuda", 8, 2) == ""
    assert recommended_launch(0, 16).startswith("ddptrain fit --data ... (one process uses all 16 cores")
    assert recommended_launch(4, 16).startswith("ddptrain fit --nproc-per-node 4 ")


@pytest.mark.slow
def test_env_report(tmp_path):
    result = cli("env", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for word in ("ddptrain", "torch", "python", "gloo", "cuda available", "recommended launch",
                 "--nproc-per-node workers"):
        assert word in result.stdout
    from ddptrain.envreport import env_rows

    workers = dict(env_rows())["--nproc-per-node workers"]
    assert workers.startswith("spawned" if torch.cuda.is_available() else "forked from the agent")
