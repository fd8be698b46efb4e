"""GPU checks (NCCL, bf16, fp16 with a GradScaler, compile, exact resume with CUDA RNG, GPU checkpoints on CPU):
skipped where no CUDA device is present."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cli, epoch_rows, torchrun

from ddptrain.checkpoint import load_checkpoint
from ddptrain.config import FitConfig
from ddptrain.run import fit

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def on_gpu(tmp_path, name="run", **overrides) -> FitConfig:
    values = dict(data="spirals", n_samples=2048, epochs=8, batch_size=64, hidden=(64, 64), device="cuda",
                  out=str(tmp_path / name), log_every=5, quiet=True)
    values.update(overrides)
    return FitConfig(**values)


def final_weights(run_dir):
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


def test_nccl_bf16_fit_on_gpu(tmp_path):
    fit(on_gpu(tmp_path, precision="bf16"))
    rows = epoch_rows(tmp_path / "run")
    assert rows[-1]["val_accuracy"] > 0.85
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]


def test_fp16_with_grad_scaler_on_gpu(tmp_path):
    fit(on_gpu(tmp_path, precision="fp16"))
    assert epoch_rows(tmp_path / "run")[-1]["val_accuracy"] > 0.85
    scaler = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["scaler"]
    assert scaler is not None and scaler["scale"] > 0


def test_bf16_comm_hook_over_nccl(tmp_path):
    fit(on_gpu(tmp_path, comm_hook="bf16"))
    assert epoch_rows(tmp_path / "run")[-1]["val_accuracy"] > 0.85


def test_compile_on_gpu(tmp_path):
    fit(on_gpu(tmp_path, compile=True, epochs=3))
    rows = epoch_rows(tmp_path / "run")
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["val_accuracy"] > 0.8


def test_resume_mid_epoch_is_exact_on_gpu(tmp_path):
    # dropout draws from the CUDA generator, so its state must come back from the checkpoint too
    opts = dict(epochs=3, dropout=0.2, checkpoint_every=7, keep_last=100, scheduler="cosine")
    fit(on_gpu(tmp_path, "straight", **opts))
    mid = tmp_path / "straight" / "checkpoints" / "step-00000035.pt"  # 25 steps an epoch: inside epoch 2
    assert load_checkpoint(mid)["position"]["step_in_epoch"] == 10
    fit(on_gpu(tmp_path, "resumed", resume=str(mid), **opts))
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.slow
def test_gpu_checkpoint_evaluates_on_cpu(tmp_path):
    result = torchrun(1, "fit", "--data", "blobs", "--n-classes", "4", "--n-features", "8", "--epochs", "3",
                      "--device", "cuda", "--out", "run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "nccl" in result.stdout
    scores = {}
    for device in ("cpu", "cuda"):
        out = cli("eval", "run/checkpoints/best.pt", "--data", "blobs", "--json", "--device", device, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        scores[device] = json.loads(out.stdout)
    assert scores["cpu"]["accuracy"] == pytest.approx(scores["cuda"]["accuracy"], abs=1e-3)
    assert scores["cpu"]["loss"] == pytest.approx(scores["cuda"]["loss"], rel=1e-3)
    assert scores["cpu"]["accuracy"] > 0.9


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_nccl_two_ranks(tmp_path):
    result = torchrun(2, "fit", "--data", "spirals", "--epochs", "3", "--out", "run", "--device", "cuda", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(epoch_rows(tmp_path / "run")) == 3


def test_nproc_per_node_on_a_gpu_machine_spawns_its_workers(tmp_path):
    """ddptrain's launcher spawns (not forks) where CUDA devices are, and its workers train on cuda:LOCAL_RANK."""
    from ddptrain.launcher import start_method

    assert start_method() == "spawn"
    result = cli("fit", "--data", "spirals", "--epochs", "2", "--nproc-per-node", "1", "--device", "cuda",
                 "--out", "run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(epoch_rows(tmp_path / "run")) == 2


# -- CUDA graphs (cudagraphs.py) -------------------------------------------------------------------------------
def step_losses(run_dir):
    from conftest import read_metrics

    return [row["train_loss"] for row in read_metrics(run_dir) if row["kind"] == "step"]


@pytest.mark.parametrize("opts", [dict(), dict(optimizer="sgd", clip_grad=1.0, scheduler="constant"),
                                  dict(dropout=0.1, precision="bf16", warmup_steps=20, scheduler="linear")],
                         ids=["adam-cosine", "sgd-clip-constant", "dropout-bf16-warmup-linear"])
def test_cuda_graphs_give_the_eager_losses(tmp_path, opts):
    fit(on_gpu(tmp_path, "eager", epochs=3, cuda_graphs=False, **opts))
    fit(on_gpu(tmp_path, "graphed", epochs=3, cuda_graphs=True, **opts))
    eager, graphed = step_losses(tmp_path / "eager"), step_losses(tmp_path / "graphed")
    assert len(eager) == len(graphed) > 10
    assert graphed == pytest.approx(eager, rel=1e-4, abs=1e-6)
    a, b = final_weights(tmp_path / "eager"), final_weights(tmp_path / "graphed")
    assert all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5) for k in a)


def test_resume_mid_epoch_is_exact_with_cuda_graphs(tmp_path):
    opts = dict(epochs=3, dropout=0.2, checkpoint_every=7, keep_last=100, cuda_graphs=True)
    fit(on_gpu(tmp_path, "straight", **opts))
    mid = tmp_path / "straight" / "checkpoints" / "step-00000035.pt"
    fit(on_gpu(tmp_path, "resumed", resume=str(mid), **opts))
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_a_graphed_checkpoint_resumes_eagerly_and_back(tmp_path):
    opts = dict(epochs=2, checkpoint_every=10, keep_last=100)
    fit(on_gpu(tmp_path, "graphed", cuda_graphs=True, **opts))
    mid = str(tmp_path / "graphed" / "checkpoints" / "step-00000030.pt")
    fit(on_gpu(tmp_path, "eager", resume=mid, cuda_graphs=False, **opts))
    fit(on_gpu(tmp_path, "again", resume=mid, cuda_graphs=True, **opts))
    a, b = final_weights(tmp_path / "eager"), final_weights(tmp_path / "again")
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


@pytest.mark.parametrize("flags", [("--nan-policy", "skip"), ("--precision", "fp16"), ("--grad-accum", "2"),
                                   ("--scheduler", "onecycle")])
def test_cuda_graphs_fall_back_with_a_note(tmp_path, flags):
    result = cli("fit", "--data", "spirals", "--epochs", "1", "--device", "cuda", "--cuda-graphs", *flags,
                 "--out", "run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--cuda-graphs: off, the step runs eagerly" in result.stdout + result.stderr
    assert flags[0] in result.stdout + result.stderr
