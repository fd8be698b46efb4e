"""Optimizer, learning-rate schedule and loss from the config, all torch's own."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.optim import lr_scheduler

from ddptrain.config import FitConfig, Loss, label_smoothing, weight_decay
from ddptrain.errors import UsageError

LOSSES = {Loss.cross_entropy: nn.CrossEntropyLoss, Loss.mse: nn.MSELoss, Loss.huber: nn.HuberLoss, Loss.l1: nn.L1Loss}


def build_optimizer(params, cfg: FitConfig, graphed: bool = False) -> torch.optim.Optimizer:
    """SGD, Adam and AdamW use torch's fused kernels (one kernel for all parameters, on CPU and GPU): the same update
    to float rounding, faster than the per-parameter loop (figures: benchmarks/RESULTS.md, `benchmarks/micro.py`).
    RMSprop has no fused kernel and takes torch's default. `graphed`: the step is captured in a CUDA graph, so the
    rate is a tensor on the parameters' device (the schedulers fill it in place: a replay reads the new value) and
    the step counts stay there too (`capturable`; fused SGD has none to keep)."""
    params = list(params)
    lr = torch.tensor(cfg.lr, device=params[0].device) if graphed else cfg.lr
    decay = weight_decay(cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=decay, fused=True)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=cfg.betas, weight_decay=decay, fused=True,
                                capturable=graphed)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=cfg.betas, weight_decay=decay, fused=True,
                                 capturable=graphed)
    return torch.optim.RMSprop(params, lr=lr, momentum=cfg.momentum, weight_decay=decay,
                               capturable=graphed)


def plain_rates(state: Any) -> Any:
    """An optimizer's param groups or a scheduler's state with every rate as a float (a graphed run keeps them as
    0-d tensors): checkpoints look alike whichever way they were trained."""
    if isinstance(state, torch.Tensor) and state.dim() == 0 and state.is_floating_point():
        return float(state)
    if isinstance(state, dict):
        return {k: (v if k == "params" else plain_rates(v)) for k, v in state.items()}
    if isinstance(state, list):
        return [plain_rates(v) for v in state]
    return state


def saved_optimizer(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    saved = optimizer.state_dict()
    return {**saved, "param_groups": plain_rates(saved["param_groups"])}


def load_optimizer(optimizer: torch.optim.Optimizer, saved: dict[str, Any], graphed: bool) -> None:
    """A saved state into this run's optimizer, graphed or not: `capturable` as this run has it (loading then puts
    the step counts where that setting keeps them) and the rate a float, or a tensor on the parameters' device."""
    groups = [{**g, "capturable": graphed} if "capturable" in g else g for g in plain_rates(saved["param_groups"])]
    optimizer.load_state_dict({**saved, "param_groups": groups})
    if graphed:
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), device=group["params"][0].device)


def set_rate(group: dict[str, Any], value: float) -> None:
    """A param group's rate, in place when it is a tensor (a captured graph holds that very tensor)."""
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(float(value))
    else:
        group["lr"] = float(value)


def coslog(t: float, cycles: int = 4) -> float:
    """RealMLP-TD's rate factor at fraction t of the run: 0.5 (1 - cos(2 pi log2(1 + (2^cycles - 1) t))), `cycles`
    cosine cycles from 0 up to 1 and back, each twice as long as the one before (the last half of the run is one)."""
    t = min(max(t, 0.0), 1.0)
    return 0.5 * (1.0 - math.cos(2.0 * math.pi * math.log2(1.0 + (2**cycles - 1) * t)))


def planned_over_epochs(cfg: FitConfig) -> bool:
    """Whether the rate schedule is laid out over the run's length (--epochs), not per step alone: a resume with
    other --epochs lays it out again."""
    return cfg.scheduler in ("cosine", "linear", "onecycle", "coslog4") or (cfg.scheduler == "step"
                                                                            and not cfg.lr_step_size)


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
    elif cfg.scheduler == "coslog4":
        main = lr_scheduler.LambdaLR(optimizer, lambda step: coslog(step / main_steps))
    elif cfg.scheduler == "step":
        main = lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step_size or max(main_steps // 3, 1), gamma=cfg.lr_gamma)
    else:
        main = lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if not warmup:
        return main
    ramp = lr_scheduler.LinearLR(optimizer, start_factor=0.01, end_factor=1.0, total_iters=warmup)
    return lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


class WeightedCrossEntropy(nn.Module):
    """Cross-entropy with a weight per class, summed and divided by the rows (not by their weights, as torch's
    weighted mean is): a rank's share of a batch then adds up to the whole batch's loss, so the gradient is the same
    at every world size. Balanced weights average 1 over the training rows, so the loss keeps its usual scale."""

    def __init__(self, weight: torch.Tensor, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.label_smoothing = label_smoothing

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out, y, weight=self.weight.to(out.dtype), reduction="sum",
                                           label_smoothing=self.label_smoothing) / len(y)


def per_row_loss(loss_fn: nn.Module, pred: torch.Tensor, y: torch.Tensor, weighted: bool = True,
                 training: bool = False) -> torch.Tensor:
    """`loss_fn`'s loss of each row (no reduction); `weighted=False` leaves class weights out (the log loss);
    `training` applies label smoothing, which a held-out loss leaves out."""
    functional = nn.functional
    smoothing = getattr(loss_fn, "label_smoothing", 0.0) if training else 0.0
    if isinstance(loss_fn, WeightedCrossEntropy):
        return functional.cross_entropy(pred, y, weight=loss_fn.weight.to(pred.dtype) if weighted else None,
                                        reduction="none", label_smoothing=smoothing)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return functional.cross_entropy(pred, y, reduction="none", label_smoothing=smoothing)
    if isinstance(loss_fn, nn.HuberLoss):
        return functional.huber_loss(pred, y, reduction="none", delta=loss_fn.delta)
    per_row = {nn.MSELoss: functional.mse_loss, nn.L1Loss: functional.l1_loss}[type(loss_fn)]
    return per_row(pred, y, reduction="none")


def balanced_weights(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """scikit-learn's 'balanced': rows / (classes x the class's rows); a class without training rows weighs 1."""
    counts = torch.bincount(labels.cpu(), minlength=classes).double()
    present = int((counts > 0).sum())
    weight = torch.where(counts > 0, len(labels) / (present * counts.clamp(min=1)), torch.ones_like(counts))
    return weight.float()


def loss_name(cfg: FitConfig, task: str) -> str:
    """The loss --loss, --label-smoothing and --class-weight give for `task`; a usage error where they do not fit
    it (fit asks before it claims the run folder, so a refused run leaves nothing behind)."""
    name = cfg.loss if cfg.loss != "auto" else ("cross_entropy" if task == "classification" else "mse")
    if (name == "cross_entropy") != (task == "classification"):
        raise UsageError(f"--loss {name} does not fit a {task} task; use "
                         f"{'cross_entropy' if task == 'classification' else 'mse, huber or l1'} (or auto)")
    if label_smoothing(cfg, task) and task != "classification":
        raise UsageError("--label-smoothing smooths class labels; this run is regression: leave it out")
    if cfg.class_weight == "balanced" and task != "classification":
        raise UsageError("--class-weight balanced weighs classes; this run is regression: leave it out")
    return name


def build_loss(cfg: FitConfig, task: str, train_labels: torch.Tensor | None = None, classes: int = 0) -> nn.Module:
    """The training loss; with --class-weight balanced, weighed by `train_labels` (the training rows' class ids)."""
    name = loss_name(cfg, task)
    smoothing = label_smoothing(cfg, task)
    if cfg.class_weight == "balanced" and train_labels is not None:
        return WeightedCrossEntropy(balanced_weights(train_labels, classes), smoothing)
    if name == "cross_entropy":
        return nn.CrossEntropyLoss(label_smoothing=smoothing)
    return LOSSES[Loss(name)]()
