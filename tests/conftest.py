"""Shared helpers: run the real CLI in real processes (torchrun for several ranks, Gloo on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
    """`python -m ddptrain ARGS` as a user would run it."""
    return subprocess.run([sys.executable, "-m", "ddptrain", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env or clean_env())


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "ddptrain", *args]


def torchrun(nproc: int, *args: str, cwd: Path, timeout: float = 240,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_cmd(nproc, *args), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env or clean_env())


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def epoch_rows(run_dir: Path) -> list[dict]:
    return [row for row in read_metrics(run_dir) if row["kind"] == "epoch"]


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


def pytest_configure(config):
    """Prepared-table caches of the tests go to a folder of their own, not the user's ~/.cache."""
    import tempfile

    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="ddptrain-test-cache-")


_EXIT_STATUS: list[int] = []


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """In-process tests that build DDP leave torch's leaked Gloo threads in pytest's own process; leave it the way
    ddptrain's command does (`ddptrain.dist.exit_process`), so pytest cannot die of SIGABRT at teardown."""
    import sys

    dist = sys.modules.get("ddptrain.dist")
    if dist is not None and dist.HAD_PROCESS_GROUP and _EXIT_STATUS:
        dist.exit_process(_EXIT_STATUS[-1])
