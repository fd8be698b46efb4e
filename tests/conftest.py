"""Shared helpers: run the real CLI in real processes (torchrun for several ranks, Gloo on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import forkserver

ROOT = Path(__file__).resolve().parents[1]

# Each xdist worker runs its in-process fits on one thread: two workers of two threads each on two cores spend a
# third of the inner loop's CPU time contending for the cores (set before any test module imports torch).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                        "TORCHELASTIC_RESTART_COUNT", "DDPTRAIN_DEBUG", "DDPTRAIN_FAIL_AT_STEP")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["XDG_CACHE_HOME"] = os.environ["XDG_CACHE_HOME"]  # the session's own (pytest_configure), never ~/.cache
    env.update(extra)
    return env


def cli(*args: str, cwd: Path, timeout: float = 240, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m ddptrain ARGS` as a user would run it: a process of its own, forked from a server that has
    imported torch (tests/forkserver.py), its output captured."""
    return forkserver.run(list(args), cwd, env or clean_env(), timeout)


def run_command(argv: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run(argv, capture_output=True, text=True), a `python -m ddptrain` command through cli's fork
    server."""
    if argv[:3] == [sys.executable, "-m", "ddptrain"]:
        return forkserver.run(argv[3:], cwd, env, timeout)
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def in_process(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """`ddptrain ARGS` in this process (a refusal needs no fresh interpreter): its exit code and stderr."""
    from ddptrain.cli import main

    monkeypatch.setattr(sys, "argv", ["ddptrain", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    return exited.value.code, capsys.readouterr().err


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "ddptrain", *args]


def nproc_cmd(nproc: int, command: str, *args: str) -> list[str]:
    """The same job through `ddptrain fit --nproc-per-node` (workers forked from torch's agent)."""
    return [sys.executable, "-m", "ddptrain", command, "--nproc-per-node", str(nproc), *args]


# a job of several local ranks, as a user starts it either way
LAUNCHERS = {"torchrun": torchrun_cmd, "nproc-per-node": nproc_cmd}


def torchrun(nproc: int, *args: str, cwd: Path, timeout: float = 240,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_cmd(nproc, *args), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env or clean_env())


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def epoch_rows(run_dir: Path) -> list[dict]:
    return [row for row in read_metrics(run_dir) if row["kind"] == "epoch"]


def same_predictions(a: str, b: str) -> bool:
    """Two predictions files agree: the same header, rows, labels and kept cells, and numbers equal to their last
    printed digit (a float32 matrix product may round differently with the rows it multiplies together, or with
    where in memory they lie: a memory-mapped cache or a piece of the file)."""
    import csv
    import io

    rows_a, rows_b = (list(csv.reader(io.StringIO(text))) for text in (a, b))
    if len(rows_a) != len(rows_b) or rows_a[:1] != rows_b[:1]:
        return False
    for cell_a, cell_b in zip((c for r in rows_a for c in r + ["|"]), (c for r in rows_b for c in r + ["|"])):
        if cell_a == cell_b:
            continue
        try:
            x, y = float(cell_a), float(cell_b)
        except ValueError:
            return False
        if abs(x - y) > 1.5e-6 * max(1.0, abs(x)):
            return False
    return True


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture
def tiny_csv(tmp_path: Path) -> Path:
    """A small labelled CSV with string class labels."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3))
    label = np.where(x[:, 0] + 0.5 * x[:, 1] > 0, "malignant", "benign")
    path = tmp_path / "cells.csv"
    lines = ["radius,texture,smooth,diagnosis"] + [f"{a:.5f},{b:.5f},{c:.5f},{d}" for (a, b, c), d in zip(x, label)]
    path.write_text("\n".join(lines) + "\n")
    return path


REAL_HEADER = ",name,city,joined,since,vip,age,income,label"
NA = ["", "NA", "N/A", "null", "NaN", "None", "?"]


def real_table(path, rows=120, seed=0, cities=("Paris", "Rome", "Oslo", "Lima")):
    """As pandas' to_csv writes it: an unnamed index column, a name per row, text with empty cells, ISO and
    YYYY/MM/DD dates, True/False with gaps, numbers with every NA token; the label follows city and age."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lines = [REAL_HEADER]
    for i in range(rows):
        city = cities[i % len(cities)] if i % 9 else ""
        age = int(rng.integers(18, 80))
        age_cell = NA[i % len(NA)] if i % 5 == 0 else str(age)
        vip = ["True", "False", ""][i % 3]
        label = "high" if (city in ("Paris", "Oslo")) ^ (age > 50) else "low"
        lines.append(f"{i},person {i},{city},2021-{1 + i % 12:02d}-{1 + i % 28:02d},2019/{1 + i % 12:02d}/15,{vip},"
                     f"{age_cell},{1000 + 7.5 * i:.2f},{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def shared_root(tmp_path_factory) -> Path:
    """A folder every xdist worker of this test session sees (the session's base temp folder)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def shared_run(root: Path, command: list[str], name: str = "run") -> tuple[Path, str]:
    """The run folder `name` and the stdout of `command`, run once per test session in a folder of its own,
    whichever test asks first (the others wait on a lock and read it): for reference runs that several tests
    compare against, identical in each. Callers read it and copy what they change."""
    import fcntl
    import hashlib
    import shutil

    key = hashlib.sha256(json.dumps([command, name]).encode()).hexdigest()[:16]
    folder = root / f"shared-{key}"
    with open(root / f"shared-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "stdout.txt").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            done = run_command(command, folder, clean_env(), 240)
            assert done.returncode == 0, done.stderr[-3000:]
            (folder / "stdout.txt").write_text(done.stdout)
    return folder / name, (folder / "stdout.txt").read_text()


def pytest_configure(config):
    """Prepared-table caches of the tests go to a folder of their own, not the user's ~/.cache."""
    import tempfile

    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="ddptrain-test-cache-")


# the longest tests (20-50 s on 2 cores: the README walkthrough, the world-size benchmark's smoke run when asked
# for, the faults that also run a reference job, MLflow read back) start first, so the two xdist workers finish
# together
LONGEST = ("test_the_readme_walkthrough_runs_as_written", "test_compare_world_sizes_smoke",
           "test_sigterm_checkpoints_exits_promptly", "test_elastic_restart_after_sigkill",
           "test_nproc_per_node_launches_workers_on_free_ports", "test_fit_and_tune_runs_read_back_from_mlflow")


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: not item.name.startswith(LONGEST))  # stable: the rest keep their order


_EXIT_STATUS: list[int] = []


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))
    forkserver.stop()


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """In-process tests that build DDP leave torch's leaked Gloo threads in pytest's own process; leave it the way
    ddptrain's command does (`ddptrain.dist.exit_process`), so pytest cannot die of SIGABRT at teardown."""
    import sys

    if hasattr(config, "workerinput"):  # an xdist worker: its controller needs the channel closed normally
        return
    dist = sys.modules.get("ddptrain.dist")
    if dist is not None and dist.HAD_PROCESS_GROUP and _EXIT_STATUS:
        dist.exit_process(_EXIT_STATUS[-1])
