"""CUDA graphs for the training step: a captured optimizer step replayed with one launch (issue 17).

A tabular MLP's step is microseconds of GPU arithmetic behind ~30 kernel launches, so on a GPU it runs at the speed
of Python. Under `--cuda-graphs`, after WARMUP_STEPS eager steps on a side stream (DDP sets up its buckets over its
first iterations), one step is captured (forward, loss, backward with DDP's all-reduce, gradient clipping and the
optimizer's capturable kernels) and every later step copies its batch into the captured input buffers and replays
the graph. The rows, their order and the arithmetic are those of the eager step.

The rate is a 0-d tensor on the device that torch's schedulers fill in place after each replay (the schedule
stays torch's; reading it costs one small host sync per step), and checkpoints hold it as a float either way.
`resolve` decides from the config alone, before anything is built, and says why when a setting rules graphs out;
`--no-cuda-graphs` (or a CPU run) trains eagerly as before. Not yet measured on a GPU: `auto` stays eager until the
CUDA-marked tests (tests/test_cuda.py) have passed on one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ddptrain.config import FitConfig

WARMUP_STEPS = 11  # torch's CUDA-graph notes ask for 11 eager iterations before capturing a DDP step
AUTO_ENABLES = False  # what `auto` does on a CUDA device where nothing rules graphs out (eager until measured)


def blockers(cfg: FitConfig, world_size: int) -> list[str]:
    """The settings of `cfg` that a captured step cannot honour, each as a phrase that says why."""
    reasons = []
    if cfg.nan_policy == "skip":
        reasons.append("--nan-policy skip reads every step's gradient norm on the host")
    if cfg.precision == "fp16":
        reasons.append("--precision fp16's GradScaler checks for overflow on the host each step (bf16 needs no scaler)")
    if cfg.grad_accum > 1:
        reasons.append("--grad-accum's micro-steps are not captured")
    if cfg.bagging not in ("auto", "off"):
        reasons.append("--bagging's per-row fold masks are not captured")
    if cfg.compile:
        reasons.append("--compile hands the step to torch.compile")
    if cfg.scheduler == "onecycle":
        reasons.append("--scheduler onecycle also changes the momentum every step, which a captured step holds fixed")
    if cfg.comm_hook == "powersgd":
        reasons.append("--comm-hook powersgd keeps host-side state that changes every step")
    if cfg.norm == "batch" and world_size > 1:
        reasons.append("--norm batch across GPUs (SyncBatchNorm) exchanges batch sizes with the host")
    return reasons


def resolve(cfg: FitConfig, device_type: str, world_size: int) -> tuple[bool, str | None]:
    """Whether this run's steps are graphed, and a note to print when the answer is not what was asked for (or
    when `auto` on a GPU stays eager because of a setting)."""
    if cfg.cuda_graphs is False:
        return False, None
    if device_type != "cuda":
        return False, ("--cuda-graphs needs a CUDA device; this run is on the CPU and trains eagerly"
                       if cfg.cuda_graphs else None)
    if cfg.cuda_graphs is None and not AUTO_ENABLES:
        return False, None
    reasons = blockers(cfg, world_size)
    if reasons:
        asked = "--cuda-graphs" if cfg.cuda_graphs else "CUDA graphs (auto)"
        return False, f"{asked}: off, the step runs eagerly: {'; '.join(reasons)}"
    return True, None


class GraphedStep:
    """`step(x, y) -> loss` run eagerly WARMUP_STEPS times on a side stream, then captured once and replayed.

    `step` must be free of host synchronisation (no .item(), no data-dependent Python branches) and must leave the
    gradients in place (`zero_grad` happens here, before the capture, as torch's whole-network recipe does)."""

    def __init__(self, step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], zero_grad: Callable[[], None],
                 warmup: int = WARMUP_STEPS) -> None:
        self.step, self.zero_grad, self.warmup = step, zero_grad, warmup
        self.done = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.x = self.y = self.loss = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.graph is None and self.done < self.warmup:
            self.done += 1
            return self._on_side_stream(x, y)
        if self.graph is None:
            self._capture(x, y)
        self.x.copy_(x, non_blocking=True)
        self.y.copy_(y, non_blocking=True)
        self.graph.replay()
        return self.loss.clone()

    def _on_side_stream(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            loss = self.step(x, y)
            self.zero_grad()
        torch.cuda.current_stream().wait_stream(side)
        return loss

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x.clone(), y.clone()
        self.zero_grad()  # the captured backward allocates the gradients from the graph's pool, once
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.loss = self.step(self.x, self.y)
        self.graph = graph
