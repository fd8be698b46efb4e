"""Smoke test of the benchmark script at tiny sizes: it runs, and writes its table, JSON and plot."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT, clean_env


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
