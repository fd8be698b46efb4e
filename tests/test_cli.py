"""The CLI surface: help without torch, version, config files and flag overrides."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import clean_env, cli

from ddptrain.config import tomllib


def imported_modules(*args: str) -> str:
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "ddptrain", *args], capture_output=True,
                            text=True, env=clean_env(), timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stderr


@pytest.mark.slow
def test_help_does_not_import_torch():
    for args in (["--help"], ["fit", "--help"], ["eval", "--help"]):
        trace = imported_modules(*args)
        assert not any(line.split("|")[-1].strip() == "torch" for line in trace.splitlines()), args


@pytest.mark.slow
def test_version(tmp_path):
    result = cli("--version", cwd=tmp_path)
    assert result.returncode == 0 and "ddptrain 0.1.0" in result.stdout


@pytest.mark.slow
def test_print_config_merges_file_and_flags(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('[fit]\ndata = "moons"\nhidden = [32, 16]\nlr = 0.01\nbatch-size = 128\n')
    result = cli("fit", "--config", str(config), "--lr", "0.05", "--print-config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    resolved = tomllib.loads(result.stdout)["fit"]
    assert resolved["data"] == "moons" and resolved["hidden"] == [32, 16] and resolved["batch_size"] == 128
    assert resolved["lr"] == 0.05  # the flag wins over the file


@pytest.mark.slow
def test_unknown_config_key_names_the_closest(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("[fit]\nlearning_rate = 0.1\nepochs = 2\nhiden = [4]\n")
    result = cli("fit", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert "error: unknown config key" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_run_config_json_replays(tmp_path):
    result = cli("fit", "--data", "xor", "--epochs", "1", "--n-samples", "256", "--out", "a", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    replay = cli("fit", "--config", "a/config.json", "--out", "b", "--print-config", cwd=tmp_path)
    assert replay.returncode == 0, replay.stderr
    resolved = tomllib.loads(replay.stdout)["fit"]
    assert resolved["data"] == "xor" and resolved["n_samples"] == 256 and resolved["out"] == "b"
