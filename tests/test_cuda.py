"""GPU checks (NCCL, bf16): skipped where no CUDA device is present."""

from __future__ import annotations

import pytest
import torch

from conftest import epoch_rows, torchrun

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_nccl_bf16_fit_on_gpu(tmp_path):
    from ddptrain.config import FitConfig
    from ddptrain.run import fit

    fit(FitConfig(data="spirals", epochs=5, precision="bf16", device="cuda", out=str(tmp_path / "run"), quiet=True))
    rows = epoch_rows(tmp_path / "run")
    assert rows[-1]["val_accuracy"] > 0.9


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_nccl_two_ranks(tmp_path):
    result = torchrun(2, "fit", "--data", "spirals", "--epochs", "3", "--out", "run", "--device", "cuda", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(epoch_rows(tmp_path / "run")) == 3
