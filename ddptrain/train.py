"""The training loop over built objects: train_step, run_epoch, validate, save.

Losses go through the loss window (losswindow.py): one background all-reduce per `--log-every` steps carries them
and the stop flag; checkpoints and epoch ends wait for all of them, so what is saved and logged is complete.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Any

import torch

from ddptrain import checkpoint
from ddptrain.checkpoint import Position
from ddptrain.config import early_stop_patience, monitor_metric, monitor_mode
from ddptrain.console import EpochProgress
from ddptrain.cudagraphs import GraphedStep
from ddptrain.data import epoch_indices
from ddptrain.dist import gather_objects
from ddptrain.errors import DDPTrainError, Preempted
from ddptrain.losswindow import LossWindow, WindowResult
from ddptrain.bagging import bagged_loss, member_losses, track_members
from ddptrain.metrics import evaluation_sums, metrics_from_sums, validation_row
from ddptrain.model import Ensemble
from ddptrain.parts import Parts
from ddptrain.readahead import ReadAhead
from ddptrain.rundir import LAST


class Trainer:
    def __init__(self, parts: Parts, position: Position, started_at: float, data_s: float = 0.0) -> None:
        self.parts = parts
        self.position = position
        self.started_at = started_at
        self.data_s = data_s  # reading and preparing the table (or mapping its cache), this process
        cfg, dist = parts.cfg, parts.dist
        self.rank_batch = cfg.batch_size // dist.world_size
        self.micro_batch = self.rank_batch // cfg.grad_accum
        self.steps_per_epoch = len(parts.data.train) // cfg.batch_size
        self.autocast = (torch.autocast(dist.device.type, dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float16)
                         if cfg.precision != "fp32" else nullcontext())
        self.window = LossWindow(cfg.batch_size)
        self.progress = EpochProgress(cfg.epochs)
        self.last_metrics: dict[str, Any] = {}
        self.regression = parts.data.spec.task == "regression"
        self.checks_grad_norm = cfg.clip_grad is not None or cfg.nan_policy == "skip"
        self.no_sync = parts.ddp.no_sync if parts.ddp is not None else nullcontext  # bare module: nothing to hold back
        self.time_to_first_step: float | None = None
        self.reported_start = False
        self.stopped_early = False
        self.bagged = isinstance(parts.model, Ensemble)
        self.members = len(parts.model.members) if self.bagged else 1
        self.final: dict[str, Any] = {}
        self.graphed = GraphedStep(self._captured_step, lambda: parts.optimizer.zero_grad(set_to_none=True)) \
            if parts.graphs else None

    # -- one optimizer step -------------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor, fold: torch.Tensor | None = None) -> torch.Tensor:
        """One optimizer step on this rank's batch (`fold`: its rows' folds when bagging); returns its loss
        (bagging: the members' mean), detached, still on the device."""
        if self.graphed is not None:
            loss = self.graphed(x, y)
            if self.parts.scheduler is not None:  # on the host, outside the graph: it fills the rate tensor
                self.parts.scheduler.step()
            return loss
        accum = self.parts.cfg.grad_accum
        if accum == 1:
            loss = self._forward_backward(x, y, 1, fold)
        else:
            losses = []
            for k in range(accum):
                micro = slice(k * self.micro_batch, (k + 1) * self.micro_batch)
                # Gradients are all-reduced only on the last micro-step (no_sync on the others).
                with self.no_sync() if k < accum - 1 else nullcontext():
                    losses.append(self._forward_backward(x[micro], y[micro], accum,
                                                         None if fold is None else fold[micro]))
            loss = torch.stack(losses).sum()
        if not self._finish_step():
            self.position.skipped_steps += 1
            self.position.epoch_skipped_steps += 1
        return loss

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor, accum: int,
                          fold: torch.Tensor | None = None) -> torch.Tensor:
        p = self.parts
        with self.autocast:
            out = p.forward(x)
            if fold is None:
                loss = p.loss_fn(out.squeeze(1) if self.regression else out, y)
            else:
                loss = bagged_loss(p.loss_fn, out, y, fold, self.regression)
        if accum > 1:
            loss = loss / accum
        (p.scaler.scale(loss) if p.scaler else loss).backward()
        return loss.detach() / self.members

    def _captured_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The step that cudagraphs.GraphedStep captures: no host sync (cudagraphs.blockers rules out the settings
        that need one), the gradients left for it to clear before the capture, the scheduler stepped by train_step
        outside the graph."""
        loss = self._forward_backward(x, y, 1)
        self._finish_step(zero_grad=False, schedule=False)
        return loss

    def _finish_step(self, zero_grad: bool = True, schedule: bool = True) -> bool:
        p = self.parts
        if p.scaler:
            p.scaler.unscale_(p.optimizer)
        if self.checks_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(p.model.parameters(), p.cfg.clip_grad or math.inf)
            # Gradients are already all-reduced, so every rank sees the same norm and skips alike.
            if p.cfg.nan_policy == "skip" and not p.scaler and not torch.isfinite(norm).item():
                p.optimizer.zero_grad(set_to_none=True)
                return False
        if p.scaler:
            p.scaler.step(p.optimizer)
            p.scaler.update()
        else:
            p.optimizer.step()
        if schedule and p.scheduler is not None:
            p.scheduler.step()
        if zero_grad:
            p.optimizer.zero_grad(set_to_none=True)
        return True

    # -- epochs -------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        self.parts.stop.install()
        try:
            while self.position.epoch < self.parts.cfg.epochs:
                if self.run_epoch():
                    self.stopped_early = True
                    break
        finally:
            self.parts.stop.uninstall()
            self.progress.close()
        if self.bagged:
            self.final = self.final_evaluation()
        return self.summary()

    def run_epoch(self) -> bool:
        p, pos = self.parts, self.position
        t0 = time.perf_counter()  # the epoch's time counts everything in it, its order too
        self.window.restart_clock()
        cpu0 = time.process_time()
        train = p.data.train
        order = epoch_indices(len(train), p.cfg.seed, pos.epoch, p.dist.rank, p.dist.world_size,
                              p.cfg.shuffle).to(train.x.device)
        if pos.step_in_epoch == 0:
            pos.epoch_loss_sum, pos.epoch_loss_steps, pos.epoch_skipped_steps = 0.0, 0, 0
        first_step = pos.step_in_epoch
        self.progress.start_epoch(pos.epoch, self.steps_per_epoch, first_step)
        ahead = ReadAhead(train.x, order, len(train), p.dist.world_size) \
            if p.cfg.shuffle == "block" and train.x.device.type == "cpu" else None
        for step in range(first_step, self.steps_per_epoch):
            if ahead is not None:
                ahead.before(step * self.rank_batch)
            idx = order[step * self.rank_batch:(step + 1) * self.rank_batch]
            # index_select, not train.x[idx]: the same rows, without advanced indexing's overhead (benchmarks/micro.py)
            fold = train.fold.index_select(0, idx) if train.fold is not None else None
            self.window.add(self.train_step(train.x.index_select(0, idx), train.y.index_select(0, idx), fold))
            pos.step_in_epoch, pos.global_step = step + 1, pos.global_step + 1
            if pos.global_step == 1:
                self.time_to_first_step = time.perf_counter() - self.started_at
            if p.fault is not None:
                p.fault.maybe_fire(pos.global_step)
            on_log = pos.global_step % p.cfg.log_every == 0
            on_ckpt = p.cfg.checkpoint_every and pos.global_step % p.cfg.checkpoint_every == 0
            if (on_log or on_ckpt) and step + 1 < self.steps_per_epoch:
                stop = self.flush(log=on_log, wait=on_ckpt)
                if on_ckpt or stop:
                    self.save()
                if stop:
                    self.preempted()
        stop = self.flush(log=pos.global_step % p.cfg.log_every == 0, wait=True)
        p.dist.synchronize()  # the epoch's time includes its last optimizer step on a GPU
        row = self.epoch_row(self.steps_per_epoch - first_step, time.perf_counter() - t0, time.process_time() - cpu0)
        row.update(self.validate())
        improved, early_stop = self.track_best(row)
        pos.epoch, pos.step_in_epoch = pos.epoch + 1, 0
        self.last_metrics = row
        p.run.append(row)
        self.save(improved)
        self.progress.end_epoch(row)
        if stop:
            self.preempted()
        return early_stop

    def epoch_row(self, steps_done: int, elapsed: float, cpu: float) -> dict[str, Any]:
        pos = self.position
        # None (JSON null) when no step of the epoch had a finite loss: there is no mean to report
        train_loss = pos.epoch_loss_sum / pos.epoch_loss_steps if pos.epoch_loss_steps else None
        row = {"kind": "epoch", "epoch": pos.epoch + 1, "step": pos.global_step, "train_loss": train_loss,
               "samples_per_s": steps_done * self.parts.cfg.batch_size / elapsed, "epoch_time_s": elapsed,
               "epoch_cpu_s": cpu}  # this process's CPU time, all threads: far below wall time means starved
        if pos.skipped_steps:
            row["skipped_steps"] = pos.skipped_steps
            row["epoch_skipped_steps"] = pos.epoch_skipped_steps
        if self.time_to_first_step is not None and not self.reported_start:
            row["time_to_first_step_s"] = self.time_to_first_step  # from the command's start to the first step's end
            row["data_s"] = self.data_s
            self.reported_start = True
        return row

    def flush(self, log: bool, wait: bool = False) -> bool:
        """Close the loss window and account for the windows whose reduction has finished (all of them with `wait`,
        so the checkpoint that follows holds every loss). Returns whether any rank asked to stop."""
        p, pos = self.parts, self.position
        self.window.close(p.stop.requested, pos.global_step, pos.epoch, pos.step_in_epoch, log,
                          float(p.optimizer.param_groups[0]["lr"]))  # a graphed run's rate is a tensor
        stop = False
        for result in self.window.collect(wait):
            self._account(result)
            stop |= result.stop
        return stop

    def _account(self, result: WindowResult) -> None:
        """A reduced window into the epoch's loss, a step row, and the non-finite-loss policy."""
        p, pos = self.parts, self.position
        losses = result.loss_sums
        finite = [v / p.dist.world_size for v in losses if math.isfinite(v)]
        if len(finite) < len(losses) and p.cfg.nan_policy == "stop":
            bad = result.last_step - len(losses) + 1 + next(i for i, v in enumerate(losses) if not math.isfinite(v))
            raise DDPTrainError(f"non-finite loss at step {bad} (epoch {result.epoch + 1}); the last good checkpoint "
                                "is kept; lower --lr, add --clip-grad, or use --nan-policy skip")
        pos.epoch_loss_sum += sum(finite)
        pos.epoch_loss_steps += len(finite)
        if result.log:
            row = {"kind": "step", "step": result.last_step, "epoch": result.epoch + 1,
                   "train_loss": sum(finite) / len(finite) if finite else None, "lr": result.lr,
                   "samples_per_s": result.samples_per_s}
            p.run.append(row)
            self.progress.update(row, result.step_in_epoch, self.steps_per_epoch)

    def validate(self) -> dict[str, Any]:
        """The validation rows' metrics; when bagging, each member's loss on its own fold too and, without
        validation rows, the out-of-fold metrics as the val_* ones."""
        p = self.parts
        row: dict[str, Any] = {}
        if self.bagged:
            row["member_val_loss"] = member_losses(p.model, p.data.train, p.loss_fn, self.regression, p.dist.rank,
                                                   p.dist.world_size)
        if p.data.val is not None or self.bagged:
            split = p.data.val if p.data.val is not None else p.data.train
            sums = evaluation_sums(p.model, split, p.data.spec, p.loss_fn, p.dist.rank, p.dist.world_size,
                                   out_of_fold=p.data.val is None)
            row.update(validation_row(metrics_from_sums(sums, p.data.spec), p.data.spec))
        return row

    def track_best(self, row: dict[str, Any]) -> tuple[bool, bool]:
        """Decided from all-reduced metrics, hence identically on every rank."""
        cfg, pos = self.parts.cfg, self.position
        if self.bagged:
            return self.track_members(row)
        patience = early_stop_patience(cfg, self.parts.data.val is not None)
        value = row.get(monitor_metric(cfg, self.parts.data.val is not None))
        if pos.epoch_skipped_steps == self.steps_per_epoch:  # nothing was learned: never the best epoch
            value = None
        if value is None or not math.isfinite(value):
            pos.bad_epochs += 1
            return False, bool(patience) and pos.bad_epochs >= patience
        improved = self.better(value)
        if improved:
            pos.best, pos.best_epoch, pos.bad_epochs = value, pos.epoch, 0
        else:
            pos.bad_epochs += 1
        return improved, bool(patience) and pos.bad_epochs >= patience

    def better(self, value: float) -> bool:
        best = self.position.best
        return best is None or (value < best if monitor_mode(self.parts.cfg) == "min" else value > best)

    def track_members(self, row: dict[str, Any]) -> tuple[bool, bool]:
        """Bagging: each member keeps its best epoch by its own fold's loss; best.pt is rewritten whenever one
        improves (inference uses every member's best weights); the run stops early once none has improved for
        the patience."""
        improved = track_members(self.parts.model, row["member_val_loss"], self.position)
        value = row.get(monitor_metric(self.parts.cfg, True))
        if value is not None and math.isfinite(value) and self.better(value):
            self.position.best, self.position.best_epoch = value, self.position.epoch
        patience = early_stop_patience(self.parts.cfg, True)
        return any(improved), bool(patience) and min(self.position.member_bad_epochs) >= patience

    def final_evaluation(self) -> dict[str, Any]:
        """Bagging, after the last epoch: every member's best weights in place, the out-of-fold metrics (without
        validation rows) or the validation rows' metrics of that ensemble: the run's validation figure."""
        p = self.parts
        p.model.use_best()
        split = p.data.val if p.data.val is not None else p.data.train
        sums = evaluation_sums(p.model, split, p.data.spec, p.loss_fn, p.dist.rank, p.dist.world_size,
                               out_of_fold=p.data.val is None)
        row = {"kind": "final", "epoch": self.position.epoch, "members": self.members,
               "validation": "validation rows" if p.data.val is not None else "out-of-fold",
               **validation_row(metrics_from_sums(sums, p.data.spec), p.data.spec)}
        p.run.append(row)
        return row

    def preempted(self) -> None:
        raise Preempted(f"preempted by {self.parts.stop.signal_name or 'a signal on another rank'} at step "
                        f"{self.position.global_step}; checkpoint saved to {self.parts.run.checkpoints / LAST}; "
                        "continue with --resume auto")

    # -- checkpoints --------------------------------------------------------------------------------------
    def save(self, improved: bool = False) -> None:
        # Parameters are identical on every rank, so all ranks agree here; a checkpoint never holds inf/NaN.
        if not all(torch.isfinite(t).all() for t in self.parts.model.parameters()):
            raise DDPTrainError(f"non-finite weights after step {self.position.global_step}; the last good checkpoint is "
                                "kept; lower --lr, add --clip-grad, or use --nan-policy skip")
        rng = gather_objects(checkpoint.rng_state(self.parts.dist.device))  # a collective: every rank calls save
        if not self.parts.dist.is_main:
            return
        checkpoint.write(self.parts, self.position, rng, self.last_metrics, improved)

    def summary(self) -> dict[str, Any]:
        pos = self.position
        return {"epochs": pos.epoch, "steps": pos.global_step, "best": pos.best, "best_epoch": pos.best_epoch + 1,
                "time_to_first_step_s": self.time_to_first_step, "data_s": self.data_s, "last": self.last_metrics,
                "skipped_steps": pos.skipped_steps, "stopped_early": self.stopped_early,
                "monitor": monitor_metric(self.parts.cfg, self.parts.data.val is not None or self.bagged),
                "final": self.final, "patience": early_stop_patience(self.parts.cfg, self.parts.data.val is not None
                                                                     or self.bagged)}
