"""fit(config): wires data -> process group -> model -> DDP -> optimizer -> Trainer, with resume."""

from __future__ import annotations

import dataclasses
import os
import random
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ddptrain import checkpoint, cudagraphs, tracking
from ddptrain.checkpoint import Position
from ddptrain.config import (
    FitConfig,
    label_smoothing,
    resolve_batch,
    resolve_epochs,
    resolve_shuffle,
    resolve_val_fraction,
)
from ddptrain.console import console
from ddptrain.bagging import assign_folds, members_of, resolve_members
from ddptrain.crossval import resolve_numbers_as_categories, resolve_numeric_bins
from ddptrain.data import FitData, prepare_fit_data
from ddptrain.dist import DistInfo, process_group, resolve_device
from ddptrain.errors import Preempted, UsageError
from ddptrain.faults import InjectedFault
from ddptrain.launchenv import launch_env
from ddptrain.model import Ensemble, ModelSpec, build_fitted_model, parameter_count
from ddptrain.optim import build_loss, build_optimizer, build_scheduler, loss_name
from ddptrain.preprocess import plan_summary
from ddptrain.rundir import (
    RunDir,
    SilentRunDir,
    check_out_dir,
    check_tensorboard,
    claim_run_folder,
    default_out,
)
from ddptrain.tables import looks_like_path
from ddptrain.parts import Parts
from ddptrain.train import Trainer


def fit(cfg: FitConfig, started_at: float | None = None) -> dict[str, Any]:
    started_at = started_at or time.perf_counter()
    console.quiet = cfg.quiet
    env = launch_env()
    if env.fault is not None:
        env.fault.maybe_fire(0)
    check_batch(cfg, env.world_size)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # must precede CUDA's first cuBLAS call
    out = Path(cfg.out) if cfg.out else default_out(env)
    resume_path = resume_checkpoint_path(cfg, out, env.restarted)
    continues = cfg.resume == "auto" or env.restarted
    if env.rank == 0:  # the rank that owns the run folder decides; the others never touch it
        check_out_dir(out, resume_path, continues)
    resumed = checkpoint.load_checkpoint(resume_path) if resume_path else None
    data_started = time.perf_counter()
    cfg, data = load_data(cfg, env.world_size, resumed.get("config", {}) if resumed else {})
    data_s = time.perf_counter() - data_started
    if cfg.tensorboard:
        check_tensorboard()
    if cfg.mlflow:
        tracking.check_mlflow(cfg.mlflow_onnx)
    if resumed:
        checkpoint.check_resumable(cfg, resumed, resume_path)
    resolve_device(cfg.device, cfg.backend, env.local_rank)  # a device this machine lacks: refused before the folder
    lock = claim_run_folder(out, resume_path, continues) if env.rank == 0 else None
    try:
        with process_group(cfg.device, cfg.backend, cfg.timeout, env) as dist:
            tracker = tracking.MlflowRun(cfg.mlflow, cfg.mlflow_experiment, out, resumed is not None, cfg.mlflow_onnx) \
                if cfg.mlflow and lock is not None else None
            run = RunDir(out, lock, cfg.tensorboard, tracker) if lock is not None else SilentRunDir(out)
            try:
                parts = build_parts(cfg, dist, data, run, env.fault)
                position = checkpoint.restore(parts, resumed, resume_path) if resumed else Position()
                run.rewind(position.global_step)
                run.write_config(cfg.to_dict())
                announce(parts, out)
                start_step = position.global_step
                summary = Trainer(parts, position, started_at, data_s).fit()
                if tracker is not None:
                    tracker.finish(summary, run.checkpoints, trained=summary["steps"] > start_step)
            except BaseException as exc:
                if tracker is not None:  # a preempted or interrupted run is continued by a resume
                    tracker.end("KILLED" if isinstance(exc, (Preempted, KeyboardInterrupt)) else "FAILED")
                raise
            finally:
                run.close()
    finally:
        if lock is not None:
            lock.release()
    summary["out"] = str(out)
    print_summary(summary, out, time.perf_counter() - started_at)
    return summary


def load_data(cfg: FitConfig, world_size: int, saved: dict[str, Any]) -> tuple[FitConfig, FitData]:
    """The prepared data, and the config with its validation share, shuffle, batch, epochs, ids' roles and numeric
    pieces decided and checked against the data (`saved`: a resumed checkpoint's config, whose choices a resume
    keeps)."""
    if looks_like_path(cfg.data):
        console.line(f"ddptrain fit: reading {cfg.data} ...")  # a big table takes a while: say what is happening
    given = cfg
    data = prepare(cfg)
    if cfg.val_fraction is None and not cfg.val_data:  # recorded as decided, so a resume compares like with like
        rows = len(data.train) + (len(data.val) if data.val is not None else 0)
        cfg = dataclasses.replace(cfg, val_fraction=resolve_val_fraction(cfg, rows, looks_like_path(cfg.data)))
    cfg = resolve_shuffle(cfg, data.train.x.numel() * data.train.x.element_size())
    if cfg.batch_size is None:
        cfg = resolve_batch(cfg, len(data.train))
        check_batch(cfg, world_size)
    if cfg.batch_size > len(data.train):
        raise UsageError(f"--batch-size {cfg.batch_size} is larger than the {len(data.train):,} training rows; "
                         "lower it or add data")
    cfg = resolve_epochs(cfg, len(data.train))
    cfg, data, plain = resolve_numbers_as_categories(cfg, given, data,
                                                 saved.get("numbers_as_categories", []) if saved else None, prepare,
                                                 fit_line)
    cfg, how = resolve_numeric_bins(cfg, data, saved.get("numeric_bins"), fit_line, plain)
    if how:
        console.line(f"ddptrain fit: {how}")
    cfg, data = resolve_bagging(cfg, data, saved)
    check_monitor(cfg, data)
    loss_name(cfg, data.spec.task)
    cfg = dataclasses.replace(cfg, label_smoothing=label_smoothing(cfg, data.spec.task))  # recorded as decided
    return cfg, data


def fit_line(text: str) -> None:
    console.line(f"ddptrain fit: {text}")


def resolve_bagging(cfg: FitConfig, data: FitData, saved: dict[str, Any]) -> tuple[FitConfig, FitData]:
    """The config with --bagging decided (a resume of a run from before bagging existed keeps one model), and the
    training rows with their folds when bagging."""
    given = saved.get("bagging", "off") if saved else cfg.bagging
    members = resolve_members(dataclasses.replace(cfg, bagging=given if cfg.bagging == "auto" else cfg.bagging),
                              len(data.train), data.val is not None, looks_like_path(cfg.data), data.spec.task)
    cfg = dataclasses.replace(cfg, bagging=str(members) if members > 1 else "off")
    if members == 1:
        return cfg, data
    if len(data.train) < 2 * members:
        raise UsageError(f"--bagging {members} needs at least {2 * members} training rows, not {len(data.train):,}; "
                         "lower it or use --bagging off")
    console.line(f"ddptrain fit: bagging: {members} models, each trained on {members - 1} of {members} folds of the "
                 f"{len(data.train):,} training rows and early-stopped on the other; predictions average them "
                 "(--bagging off trains one model)")
    folds = assign_folds(len(data.train), members, cfg.seed)
    return cfg, dataclasses.replace(data, train=dataclasses.replace(data.train, fold=folds))


def prepare(cfg: FitConfig) -> FitData:
    """The prepared data, through the per-machine cache unless --no-cache."""
    if not cfg.cache:
        return prepare_fit_data(cfg)
    from ddptrain.cache import cached_fit_data
    from ddptrain.cachefolder import default_cache_dir

    folder = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    data, how = cached_fit_data(cfg, lambda workspace: prepare_fit_data(cfg, workspace), folder)
    if how:
        console.line(f"ddptrain fit: {how}")
    return data


def check_batch(cfg: FitConfig, world_size: int) -> None:
    if cfg.batch_size is not None and cfg.batch_size % (world_size * cfg.grad_accum):
        raise UsageError(f"--batch-size {cfg.batch_size} (the global batch) is not divisible by world size "
                         f"{world_size} x --grad-accum {cfg.grad_accum}; use a multiple of "
                         f"{world_size * cfg.grad_accum}")


def resume_checkpoint_path(cfg: FitConfig, out: Path, restarted: bool) -> Path | None:
    """--resume PATH, --resume auto (the run folder's last.pt if any), and elastic restarts, whose workers continue
    the run folder without being asked (like auto)."""
    if cfg.resume == "auto" or (cfg.resume is None and restarted):
        return checkpoint.find_resume_checkpoint(out)
    return Path(cfg.resume) if cfg.resume else None


TASK_MONITORS = {"classification": ("val_accuracy", "val_auc", "val_log_loss", "val_f1", "val_balanced_accuracy"),
                 "regression": ("val_rmse", "val_mae", "val_r2")}


def check_monitor(cfg: FitConfig, data: FitData) -> None:
    """The monitored metric must exist in this run's rows, or best.pt and early stopping would never act."""
    task = data.spec.task
    other = "regression" if task == "classification" else "classification"
    if cfg.monitor in TASK_MONITORS[other]:
        raise UsageError(f"--monitor {cfg.monitor} is a {other} metric but this run is {task} (target "
                         f"'{data.spec.target_name}'); use val_loss, train_loss or {', '.join(TASK_MONITORS[task])}")
    if cfg.monitor.startswith("val_") and data.val is None and cfg.bagging == "off":  # bagged: out-of-fold
        raise UsageError(f"--monitor {cfg.monitor} needs validation data; set --val-fraction or --val-data, "
                         "bag (--bagging K), or use --monitor train_loss (or auto)")


def build_parts(cfg: FitConfig, dist: DistInfo, data: FitData, run: SilentRunDir,
                fault: InjectedFault | None = None) -> Parts:
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    spec = ModelSpec.of(cfg, data.spec, cfg.numeric_bins, members_of(cfg))
    model: nn.Module = build_fitted_model(spec, data.train.x)
    if cfg.norm == "batch" and dist.world_size > 1:
        if dist.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            console.warn("--norm batch on CPU: torch's SyncBatchNorm needs GPUs, so each rank normalizes with its "
                         "own batch's statistics")
    model = model.to(dist.device)
    ddp = wrap_ddp(model, cfg, dist)
    module = ddp if ddp is not None else model
    forward = compile_model(module, dist.device) if cfg.compile else module
    graphs, graphs_note = cudagraphs.resolve(cfg, dist.device.type, dist.world_size)
    if graphs_note:
        console.note(graphs_note)
    optimizer = build_optimizer(model.parameters(), cfg, graphed=graphs)
    steps_per_epoch = len(data.train) // cfg.batch_size
    constant = cfg.scheduler == "constant" and cfg.warmup_steps == 0
    scheduler = None if constant else build_scheduler(optimizer, cfg, steps_per_epoch * cfg.epochs)
    scaler = torch.amp.GradScaler(dist.device.type) if cfg.precision == "fp16" else None
    # Each rank draws its own dropout masks, from a stream fixed by (seed, rank).
    torch.manual_seed(cfg.seed + 1 + dist.rank)
    random.seed(cfg.seed + dist.rank)
    loss_fn = build_loss(cfg, data.spec.task, data.train.y, data.spec.n_outputs).to(dist.device)
    return Parts(cfg, dist, ddp, forward, model, spec, optimizer, scheduler, scaler, loss_fn,
                 data.to_device(dist.device), run, fault, graphs=graphs)


def wrap_ddp(model: nn.Module, cfg: FitConfig, dist: DistInfo) -> DistributedDataParallel | None:
    """DistributedDataParallel whenever there is more than one process. A world of one has nothing to all-reduce,
    and DDP's hooks and its one-rank all-reduce cost a noticeable share of a small MLP's step (benchmarks/RESULTS.md),
    so it trains the bare module, as Lightning and Accelerate do, with the same results; unless a DDP option is given
    (--comm-hook, --static-graph, --bucket-cap-mb), which asks for DDP, e.g. to try a hook before scaling out."""
    wants_ddp = cfg.comm_hook != "none" or cfg.static_graph or cfg.bucket_cap_mb is not None
    if dist.world_size == 1 and not wants_ddp:
        return None
    if isinstance(model, Ensemble):  # the members' best weights change at epoch ends alike on every rank
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, [name for name, _ in model.named_buffers() if name.startswith("best_")])
    ddp = DistributedDataParallel(model, device_ids=[dist.device] if dist.device.type == "cuda" else None,
                                  bucket_cap_mb=cfg.bucket_cap_mb, gradient_as_bucket_view=True,
                                  static_graph=cfg.static_graph)
    register_comm_hook(ddp, cfg.comm_hook, dist.backend)
    return ddp


def register_comm_hook(ddp: DistributedDataParallel, name: str, backend: str) -> None:
    if name == "none":
        return
    if name == "bf16" and backend != "nccl":
        raise UsageError("--comm-hook bf16 needs NCCL (CUDA GPUs); on Gloo use --comm-hook fp16")
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if name == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif name == "bf16":
        ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
    else:
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=1, start_powerSGD_iter=10)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)


def compile_model(module: nn.Module, device: torch.device) -> nn.Module:
    """torch.compile of the DDP module (DDP-aware: Dynamo splits graphs at bucket boundaries) or the bare one."""
    import shutil

    if not torch._dynamo.is_dynamo_supported():
        raise UsageError("--compile: torch.compile does not support this Python/platform; run without --compile")
    if device.type == "cpu" and not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
        raise UsageError("--compile on CPU needs a C++ compiler (g++ or clang++) on PATH; install one or run "
                         "without --compile")
    try:
        return torch.compile(module)
    except Exception as exc:
        raise UsageError(f"--compile is not supported here ({str(exc).splitlines()[0]}); run without --compile") from None


def usable_cores() -> int:
    """The cores this process may run on (its affinity: a container's or SLURM's share, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def crowded_cpu_note(device: str, local_workers: int, cores: int) -> str:
    """A note when CPU workers on one machine have under two cores each: there, more workers were slower than one
    process (2 workers on 2 cores: 0.3x one process's samples/s; docs/speed.md), which uses every core already."""
    if device != "cpu" or local_workers < 2 or cores >= 2 * local_workers:
        return ""
    share = f"{cores / local_workers:.2g} core{'s' if cores != local_workers else ''}"
    return (f"{local_workers} workers on this machine's {cores} core{'s' if cores != 1 else ''} leave each {share}; "
            "on CPU one process (which uses every core) is usually faster: fewer workers, or more machines, "
            "train quicker (docs/speed.md)")


def announce(parts: Parts, out: Path) -> None:
    cfg, dist, spec = parts.cfg, parts.dist, parts.data.spec
    val = f" / {len(parts.data.val):,} val" if parts.data.val is not None else ""
    task = f"classification, {len(spec.classes)} classes" if spec.task == "classification" else "regression"
    wrapper = "DDP" if parts.ddp is not None else "no DDP wrapper: one process"
    for note in spec.notes:
        console.note(note)
    crowded = crowded_cpu_note(dist.device.type, int(os.environ.get("LOCAL_WORLD_SIZE", "1")), usable_cores())
    if crowded:
        console.note(crowded)
    console.line(f"ddptrain fit: world size {dist.world_size} ({dist.backend}, {dist.device.type}, {wrapper}); "
                 f"{len(parts.data.train):,} train{val} rows; target '{spec.target_name}' ({task}); "
                 f"{plan_summary(spec.preprocessor)}; "
                 f"MLP {parts.model_spec.widths()}, {parameter_count(parts.model):,} parameters; global batch {cfg.batch_size} "
                 f"({cfg.batch_size // dist.world_size} per rank); out {out}")


def print_summary(summary: dict[str, Any], out: Path, total_s: float) -> None:
    last = summary["last"]
    rows = [("epochs", str(summary["epochs"])), ("steps", str(summary["steps"]))]
    rows += [(key, f"{value:.4f}") for key, value in last.items()
             if key.startswith(("train_loss", "val_")) and isinstance(value, float)]
    final = summary["final"]
    if summary["best"] is not None and not final:
        rows.append((f"best {summary['monitor']}", f"{summary['best']:.4f} (epoch {summary['best_epoch']}: best.pt)"))
    if final:
        scores = ", ".join(f"{key.removeprefix('val_')} {value:.4f}" for key, value in final.items()
                           if key.startswith("val_") and key != "val_log_loss")
        rows.append((f"{final['validation']}, {final['members']} bagged models", scores))
    if summary["stopped_early"]:
        what = "no model's fold loss improved" if final else f"no better {summary['monitor']}"
        rows.append(("stopped early", f"{what} in the last {summary['patience']} epochs (--early-stop)"))
    if "samples_per_s" in last:
        rows.append(("throughput (last epoch)", f"{last['samples_per_s']:,.0f} samples/s"))
    if summary["time_to_first_step_s"] is not None:
        rows.append(("time to first step", f"{summary['time_to_first_step_s']:.2f} s (data {summary['data_s']:.2f} s)"))
    if summary["skipped_steps"]:
        rows.append(("skipped steps (non-finite)", str(summary["skipped_steps"])))
    rows += [("total time", f"{total_s:.1f} s"), ("checkpoints", str(out / "checkpoints")),
             ("metrics", str(out / "metrics.jsonl"))]
    console.table("ddptrain fit: done", rows, force=True)
