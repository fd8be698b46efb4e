"""Optimizer, learning-rate schedule and loss from the config, all torch's own."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim import lr_scheduler

from ddptrain.config import FitConfig, Loss
from ddptrain.errors import UsageError

LOSSES = {Loss.cross_entropy: nn.CrossEntropyLoss, Loss.mse: nn.MSELoss, Loss.huber: nn.HuberLoss, Loss.l1: nn.L1Loss}


def build_optimizer(params, cfg: FitConfig, capturable: bool = False) -> torch.optim.Optimizer:
    """SGD, Adam and AdamW use torch's fused kernels (one kernel for all parameters, on CPU and GPU): the same update
    to float rounding, faster than the per-parameter loop (figures: benchmarks/RESULTS.md, `benchmarks/micro.py`).
    RMSprop has no fused kernel and takes torch's default. `capturable`: the step may be captured in a CUDA graph
    (its step counts stay on the device; fused SGD is capturable as it is)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=True)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=True,
                                capturable=capturable)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=True,
                                 capturable=capturable)
    return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               capturable=capturable)


def with_capturable(state: dict, capturable: bool) -> dict:
    """A saved optimizer state for this run's optimizer: its groups' `capturable` as this run has it, so a checkpoint
    moves between graphed and eager runs (loading then puts the step counts where that setting keeps them)."""
    groups = [{**g, "capturable": capturable} if "capturable" in g else g for g in state["param_groups"]]
    return {**state, "param_groups": groups}


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: FitConfig, total_steps: int) -> lr_scheduler.LRScheduler:
    """Stepped once per optimizer step. `--warmup-steps` ramps linearly from lr/100 before the main schedule."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    main_steps = max(total_steps - warmup, 1)
    if cfg.scheduler == "onecycle":
        # OneCycle has its own warm-up phase: --warmup-steps sets its length (default 30% of the run).
        pct = warmup / total_steps if warmup else 0.3
        return lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=max(total_steps, 2), pct_start=pct)
    if cfg.scheduler == "cosine":
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=main_steps)
    elif cfg.scheduler == "linear":
        main = lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=main_steps)
    elif cfg.scheduler == "step":
        main = lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step_size or max(main_steps // 3, 1), gamma=cfg.lr_gamma)
    else:
        main = lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if not warmup:
        return main
    ramp = lr_scheduler.LinearLR(optimizer, start_factor=0.01, end_factor=1.0, total_iters=warmup)
    return lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


def build_loss(cfg: FitConfig, task: str) -> nn.Module:
    name = cfg.loss if cfg.loss != "auto" else ("cross_entropy" if task == "classification" else "mse")
    if (name == "cross_entropy") != (task == "classification"):
        raise UsageError(f"--loss {name} does not fit a {task} task; use "
                         f"{'cross_entropy' if task == 'classification' else 'mse, huber or l1'} (or auto)")
    return LOSSES[Loss(name)]()
