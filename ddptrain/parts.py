"""What run.py builds for a fit and the training loop (train.py) and checkpoints (checkpoint.py) work on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ddptrain.config import FitConfig
from ddptrain.data import FitData
from ddptrain.dist import DistInfo
from ddptrain.faults import InjectedFault
from ddptrain.model import ModelSpec
from ddptrain.rundir import SilentRunDir
from ddptrain.signals import StopRequest


@dataclass
class Parts:
    """Everything run.py builds for the loop."""

    cfg: FitConfig
    dist: DistInfo
    ddp: nn.parallel.DistributedDataParallel | None  # None at world size 1 (run.wrap_ddp says why)
    forward: nn.Module  # what a step calls: the DDP module (or the bare one), or its torch.compile wrapper
    model: nn.Module  # the bare module: its parameters and state_dict
    model_spec: ModelSpec
    optimizer: torch.optim.Optimizer
    scheduler: Any  # an LRScheduler, or None for a constant rate without warm-up
    scaler: torch.amp.GradScaler | None
    loss_fn: nn.Module
    data: FitData
    run: SilentRunDir
    fault: InjectedFault | None = None  # a test's injected failure for this rank (launchenv reads it)
    graphs: bool = False  # each step replayed as a captured CUDA graph (cudagraphs.py)
    stop: StopRequest = field(default_factory=StopRequest)
