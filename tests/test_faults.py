"""Faults with real processes and real signals: preemption, elastic restarts, multi-node rendezvous."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import clean_env, error_lines, read_metrics, torchrun_cmd
from ddptrain.checkpoint import load_checkpoint

# ~20 steps an epoch; small enough for CI, long enough to be interrupted mid-run
LONG = ["fit", "--data", "blobs", "--n-samples", "6000", "--n-features", "8", "--n-classes", "4", "--hidden", "64,64",
        "--batch-size", "256", "--epochs", "6", "--optimizer", "sgd", "--lr", "0.05", "--log-every", "2",
        "--checkpoint-every", "5", "--val-fraction", "0.1"]


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def wait_for_steps(run_dir: Path, steps: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if (run_dir / "metrics.jsonl").exists():
            rows = [r for r in read_metrics(run_dir) if r["kind"] == "step"]
            if rows and rows[-1]["step"] >= steps:
                return
        time.sleep(0.05)
    raise AssertionError("training did not progress")


def weights(path: Path) -> dict:
    return load_checkpoint(path)["model"]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def kill_leftovers():
    """A failed test must not leave a job (and its workers) running into the next one."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(args, cwd=cwd, env=env or clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    STARTED.append(proc)
    return proc


def straight_run(tmp_path: Path) -> dict:
    result = subprocess.run(torchrun_cmd(2, *LONG, "--out", "straight", "--quiet"), cwd=tmp_path, env=clean_env(),
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    return weights(tmp_path / "straight/checkpoints/last.pt")


def test_sigterm_checkpoints_exits_promptly_and_resumes_exactly(tmp_path):
    reference = straight_run(tmp_path)
    proc = start(torchrun_cmd(2, *LONG, "--out", "run"), tmp_path)
    wait_for_steps(tmp_path / "run", 12, proc)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 25
    assert proc.returncode != 0
    assert "preempted by SIGTERM" in err, err[-2000:]
    assert len([line for line in error_lines(err) if "preempted" in line]) == 1
    state = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    assert 0 < state["position"]["global_step"] < 6 * 21
    resumed = subprocess.run(torchrun_cmd(2, *LONG, "--out", "run", "--resume", "auto", "--quiet"), cwd=tmp_path,
                             env=clean_env(), capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert same_weights(reference, weights(tmp_path / "run/checkpoints/last.pt"))


def test_signal_to_one_worker_stops_every_rank_at_the_same_step(tmp_path):
    proc = start(torchrun_cmd(2, *LONG, "--out", "run"), tmp_path)
    wait_for_steps(tmp_path / "run", 8, proc)
    workers = sorted(children(proc.pid))
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGTERM)  # the scheduler signals one process only
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "preempted by" in err, err[-2000:]
    state = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    assert state["position"]["step_in_epoch"] > 0 or state["position"]["epoch"] > 0


def test_elastic_restart_after_sigkill_finishes_with_the_same_weights(tmp_path):
    reference = straight_run(tmp_path)
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=2",
            "-m", "ddptrain", *LONG, "--out", "run"]
    proc = start(args, tmp_path)
    wait_for_steps(tmp_path / "run", 30, proc)
    victim = sorted(children(proc.pid))[1]
    os.kill(victim, signal.SIGKILL)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert "resumed from" in out
    assert same_weights(reference, weights(tmp_path / "run/checkpoints/last.pt"))
    epochs = [r["epoch"] for r in read_metrics(tmp_path / "run") if r["kind"] == "epoch"]
    assert epochs == list(range(6))


def test_spent_restart_budget_exits_non_zero_naming_the_rank(tmp_path):
    env = clean_env(DDPTRAIN_FAIL_AT_STEP="1:3")
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
            "-m", "ddptrain", *LONG, "--out", "run"]
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    assert "error: [rank 1] RuntimeError: injected failure at step 3" in result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_agents_on_loopback_train_like_one_agent_with_two_processes(tmp_path):
    short = LONG[:LONG.index("--epochs")] + ["--epochs", "2"] + LONG[LONG.index("--epochs") + 2:]
    single = subprocess.run(torchrun_cmd(2, *short, "--out", "one", "--quiet"), cwd=tmp_path, env=clean_env(),
                            capture_output=True, text=True, timeout=240)
    assert single.returncode == 0, single.stderr
    port = free_port()
    agents = [start([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                     "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-nodes",
                     f"--node-rank={i}", "-m", "ddptrain", *short, "--out", "two", "--quiet"], tmp_path)
              for i in range(2)]
    for agent in agents:
        out, err = agent.communicate(timeout=240)
        assert agent.returncode == 0, err[-3000:]
    a, b = weights(tmp_path / "one/checkpoints/last.pt"), weights(tmp_path / "two/checkpoints/last.pt")
    assert same_weights(a, b)


def test_stuck_peer_becomes_an_error_within_the_timeout(tmp_path):
    env = clean_env(DDPTRAIN_FAIL_AT_STEP="1:4:hang")  # rank 1 stops answering at step 4
    start_time = time.monotonic()
    result = subprocess.run(torchrun_cmd(2, *LONG, "--out", "run", "--timeout", "5"), cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start_time
    assert result.returncode != 0
    assert elapsed < 60, elapsed
    assert error_lines(result.stderr) == [
        "error: a collective timed out: another rank is stuck or gone (the limit is --timeout); check the other "
        "ranks' logs"], result.stderr[-3000:]


SINGLE = ["-m", "ddptrain", *LONG]


def test_ctrl_c_once_checkpoints_and_exits_75(tmp_path):
    proc = start([sys.executable, *SINGLE, "--out", "run"], tmp_path)
    wait_for_steps(tmp_path / "run", 6, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    assert error_lines(err) and "preempted by SIGINT" in error_lines(err)[0]
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["position"]["global_step"] >= 6


def replaced(args: list[str], **values: str) -> list[str]:
    out = list(args)
    for flag, value in values.items():
        out[out.index("--" + flag.replace("_", "-")) + 1] = value
    return out


def test_second_ctrl_c_aborts_at_once(tmp_path):
    # long epochs and a long --log-every: the first Ctrl-C waits for the next sync point, the second must not
    slow = replaced(SINGLE, n_samples="60000", batch_size="8", log_every="100000", checkpoint_every="100000")
    proc = start([sys.executable, *slow, "--out", "run"], tmp_path)
    deadline = time.monotonic() + 60
    while not (tmp_path / "run" / "config.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert time.monotonic() - sent < 5
    assert proc.returncode == 130
