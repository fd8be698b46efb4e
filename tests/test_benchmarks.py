"""Smoke test of the benchmark script at tiny sizes: it runs, and writes its table, JSON and plot."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, clean_env


@pytest.mark.slow
@pytest.mark.benchmark
def test_compare_world_sizes_smoke(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--world-sizes", "1,2",
                             "--scaling", "strong", "--repeats", "1", "--epochs", "2", "--rows", "1024",
                             "--hidden", "16", "--programs", "ddptrain,plain", "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, env=clean_env(), timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "vs plain loop" in result.stdout
    summary = json.loads((tmp_path / "out" / "results.json").read_text())["summary"]
    assert {(r["program"], r["world_size"]) for r in summary} == {("ddptrain", 1), ("ddptrain", 2), ("plain", 1), ("plain", 2)}
    assert all(r["samples_per_s"] > 0 for r in summary)
    assert any("breakdown_ms" in r for r in summary)
    assert (tmp_path / "out" / "scaling.png").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.benchmark
def test_interleaved_ab_smoke(tmp_path):
    """The in-process A/B (ddptrain's run_epoch against the plain epoch, alternating) runs at world size 2 and
    writes its ratios with confidence intervals."""
    out = tmp_path / "ab.json"
    env = clean_env(PYTHONPATH=f"{ROOT}:{ROOT / 'benchmarks'}")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             str(ROOT / "benchmarks" / "interleaved.py"), "--rounds", "4", "--rows", "2048",
                             "--hidden", "16", "--out", str(out)],
                            capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["world_size"] == 2 and len(data["rounds"]) == 4
    assert all(r["ddptrain"][0] > 0 and r["plain"][0] > 0 for r in data["rounds"])
    lo, hi = data["wall_ratio_ci95"]
    assert lo <= data["wall_ratio_median"] <= hi
    assert "ddptrain / plain loop throughput" in result.stdout


@pytest.mark.slow
@pytest.mark.benchmark
def test_micro_ab_smoke(tmp_path):
    """The three in-process A/Bs behind ddptrain's step (gather, optimizer, bare module against DDP) run and print
    every figure."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "micro.py"), "--rounds", "2"],
                            capture_output=True, text=True, env=clean_env(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = dict(line.rsplit(None, 1) for line in result.stdout.splitlines() if line.strip())
    names = {name.strip() for name in figures}
    assert {"x[idx] us", "index_select us", "SGD loop us", "SGD fused us", "bare / DDP throughput"} <= names
    assert all(float(value) > 0 for value in figures.values())


def test_median_ci_covers_the_median():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from compare import median_ci

    assert median_ci([3.0, 1.0, 2.0]) == (1.0, 3.0)  # too few values: the full range
    assert median_ci([float(v) for v in range(1, 13)]) == (3.0, 10.0)  # n = 12: the 3rd and 10th values
    assert median_ci([float(v) for v in range(1, 21)]) == (6.0, 15.0)
