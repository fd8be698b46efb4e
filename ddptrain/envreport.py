"""`ddptrain env`: what to paste into a bug report."""

from __future__ import annotations

import os
import platform
import sys

import torch
import torch.distributed as torch_dist

from ddptrain import __version__
from ddptrain.console import console
from ddptrain.launchenv import LAUNCHER_VARS

EXTRA_VARS = ("LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
              "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "NCCL_DEBUG", "SLURM_JOB_ID", "SLURM_NTASKS")


def env_rows() -> list[tuple[str, str]]:
    cuda = torch.cuda.is_available()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    nccl = torch_dist.is_nccl_available()
    nccl_version = ".".join(map(str, torch.cuda.nccl.version())) if cuda and nccl else "-"
    launcher = {name: os.environ[name] for name in LAUNCHER_VARS + EXTRA_VARS if name in os.environ}
    from ddptrain.run import usable_cores

    cores = usable_cores()
    return [
        ("ddptrain", __version__), ("torch", torch.__version__), ("python", sys.version.split()[0]),
        ("os", f"{platform.system()} {platform.release()} ({platform.machine()})"),
        ("cuda available", f"{cuda} (CUDA {torch.version.cuda})" if cuda else "False"),
        ("gpus", ", ".join(gpus) or "-"), ("nccl", f"{nccl} (version {nccl_version})"),
        ("gloo", str(torch_dist.is_gloo_available())),
        ("cpu count", f"{os.cpu_count()} ({cores} usable by this process)" if cores != os.cpu_count()
         else str(os.cpu_count())),
        ("torch threads", str(torch.get_num_threads())),
        ("launcher variables", ", ".join(f"{k}={v}" for k, v in launcher.items()) or "none set"),
        ("--nproc-per-node workers", _worker_start()),
        ("recommended launch", recommended_launch(len(gpus), cores)),
    ]


def recommended_launch(gpus: int, cores: int) -> str:
    """One worker per GPU; on CPU one process, which uses every core (more local workers split the cores and add an
    all-reduce a step: 2 workers on 2 cores ran at 0.3x one process; docs/speed.md)."""
    if gpus:
        return f"ddptrain fit --nproc-per-node {gpus} --data ... (one worker per GPU, NCCL)"
    return (f"ddptrain fit --data ... (one process uses all {cores} cores; on CPU more local workers are slower: "
            "use them for a DDP reference, or --nnodes for more machines)")


def _worker_start() -> str:
    from ddptrain.errors import UsageError
    from ddptrain.launcher import start_method

    try:
        method = start_method()
    except UsageError as exc:
        return str(exc)
    return {"fork": "forked from the agent (one copy of torch a machine)",
            "spawn": "spawned (fresh interpreters)"}[method] + (
        " (DDPTRAIN_WORKER_START)" if os.environ.get("DDPTRAIN_WORKER_START") else "")


def print_env() -> None:
    console.table("ddptrain env", env_rows(), force=True)
