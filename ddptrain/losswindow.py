"""The loss window: per-step losses stay on the device between sync points; every `--log-every` steps one
all-reduce carries the window's losses and the stop flag, in the background, and is read a window later.

So the ranks agree on preemption and non-finite losses at the same step without a per-step sync, and the latency
of the reduction hides behind a window of training. Checkpoints and epoch ends drain every pending reduction.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from ddptrain.dist import start_all_reduce_sum


@dataclass
class WindowResult:
    """One reduced window: every rank's per-step loss sums (in step order) and whether any rank asked to stop."""

    loss_sums: list[float]
    stop: bool
    last_step: int
    epoch: int
    step_in_epoch: int
    log: bool
    lr: float
    samples_per_s: float


@dataclass
class _Pending:
    work: Any  # torch.distributed.Work
    values: torch.Tensor
    where: tuple[int, int, int, bool, float, float]  # last_step, epoch, step_in_epoch, log, lr, samples_per_s


class LossWindow:
    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.losses: list[torch.Tensor] = []
        self.pending: list[_Pending] = []  # started all-reduces, oldest first (at most two)
        self.started = time.perf_counter()

    def restart_clock(self) -> None:
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.losses.append(loss)

    def close(self, stop_requested: bool, last_step: int, epoch: int, step_in_epoch: int, log: bool,
              lr: float) -> None:
        """Start the all-reduce of the window so far (if it has any step) with this rank's stop flag."""
        if not self.losses:
            return
        flag = torch.tensor([1.0 if stop_requested else 0.0], device=self.losses[0].device)
        values = torch.cat([torch.stack(self.losses).float(), flag])
        now = time.perf_counter()
        rate = len(self.losses) * self.batch_size / max(now - self.started, 1e-9)
        self.pending.append(_Pending(start_all_reduce_sum(values), values,
                                     (last_step, epoch, step_in_epoch, log, lr, rate)))
        self.losses, self.started = [], now

    def collect(self, wait: bool) -> list[WindowResult]:
        """Finish the reductions started before the newest one or, with `wait` or once a rank has asked to stop,
        every one. Every rank gets the same results at the same step."""
        results: list[WindowResult] = []
        while len(self.pending) > (0 if wait or any(r.stop for r in results) else 1):
            pending = self.pending.pop(0)
            pending.work.wait()
            values = pending.values.tolist()
            results.append(WindowResult(values[:-1], values[-1] > 0, *pending.where))
        return results
