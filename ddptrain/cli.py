"""The Typer app: options -> FitConfig -> library call. The only module that knows Typer.

torch is imported inside the commands, so `ddptrain --help` stays fast.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from ddptrain import __version__
from ddptrain.config import FIELD_NAMES, FitConfig, merge, read_config_file, to_toml
from ddptrain.console import console
from ddptrain.errors import UsageError

app = typer.Typer(help="Train an MLP on your table with PyTorch DistributedDataParallel, on 1 process, 1 machine "
                       "or many.", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
D = FitConfig()
DATA, MODEL, OPTIM, DIST, RUN = "Data", "Model", "Optimization", "Distributed", "Run folder and logging"


def _version(value: bool) -> None:
    if value:
        console.out.print(f"ddptrain {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks (also DDPTRAIN_DEBUG=1).")] = False,
) -> None:
    """Train an MLP on your table with PyTorch DistributedDataParallel."""
    if debug:
        os.environ["DDPTRAIN_DEBUG"] = "1"  # workers started by --nproc-per-node inherit it


@app.command(no_args_is_help=False)
def fit(
    ctx: typer.Context,
    data: Annotated[str, typer.Option(help="Built-in dataset (xor, spirals, moons, blobs, regression) or a .csv/.tsv/.npz/.parquet file.", rich_help_panel=DATA)] = D.data,
    target: Annotated[Optional[str], typer.Option(help="Target column (default: the last column).", rich_help_panel=DATA)] = None,
    task: Annotated[str, typer.Option(help="auto|classification|regression (auto: from the target's values).", rich_help_panel=DATA)] = D.task,
    val_fraction: Annotated[float, typer.Option(help="Seeded validation split of the data; 0 turns validation off.", rich_help_panel=DATA)] = D.val_fraction,
    val_data: Annotated[Optional[str], typer.Option(help="A separate validation file (instead of --val-fraction).", rich_help_panel=DATA)] = None,
    n_samples: Annotated[int, typer.Option(help="Rows of a built-in dataset.", rich_help_panel=DATA)] = D.n_samples,
    n_features: Annotated[Optional[int], typer.Option(help="Features of blobs/regression.", rich_help_panel=DATA)] = None,
    n_classes: Annotated[Optional[int], typer.Option(help="Classes of blobs/spirals.", rich_help_panel=DATA)] = None,
    noise: Annotated[Optional[float], typer.Option(help="Noise of a built-in dataset.", rich_help_panel=DATA)] = None,
    hidden: Annotated[str, typer.Option(help="Hidden widths, comma-separated ('' for a linear model).", rich_help_panel=MODEL)] = ",".join(map(str, D.hidden)),
    activation: Annotated[str, typer.Option(help="relu|gelu|silu|tanh.", rich_help_panel=MODEL)] = D.activation,
    dropout: Annotated[float, typer.Option(help="Dropout probability after each hidden layer.", rich_help_panel=MODEL)] = D.dropout,
    norm: Annotated[str, typer.Option(help="none|layer|batch (batch becomes SyncBatchNorm on GPUs).", rich_help_panel=MODEL)] = D.norm,
    optimizer: Annotated[str, typer.Option(help="sgd|adam|adamw|rmsprop (sgd, adam, adamw use torch's fused kernels).", rich_help_panel=OPTIM)] = D.optimizer,
    lr: Annotated[float, typer.Option(help="Peak learning rate.", rich_help_panel=OPTIM)] = D.lr,
    momentum: Annotated[float, typer.Option(help="Momentum (sgd, rmsprop).", rich_help_panel=OPTIM)] = D.momentum,
    weight_decay: Annotated[float, typer.Option(help="Weight decay.", rich_help_panel=OPTIM)] = D.weight_decay,
    betas: Annotated[str, typer.Option(help="Adam betas, 'b1,b2'.", rich_help_panel=OPTIM)] = ",".join(map(str, D.betas)),
    scheduler: Annotated[str, typer.Option(help="constant|cosine|linear|step|onecycle, stepped per optimizer step.", rich_help_panel=OPTIM)] = D.scheduler,
    warmup_steps: Annotated[int, typer.Option(help="Linear warm-up steps before the schedule.", rich_help_panel=OPTIM)] = D.warmup_steps,
    lr_step_size: Annotated[Optional[int], typer.Option(help="Steps between decays of --scheduler step (default: a third of the run).", rich_help_panel=OPTIM)] = None,
    lr_gamma: Annotated[float, typer.Option(help="Decay factor of --scheduler step.", rich_help_panel=OPTIM)] = D.lr_gamma,
    loss: Annotated[str, typer.Option(help="auto|cross_entropy|mse|huber|l1 (auto: cross-entropy or MSE by task).", rich_help_panel=OPTIM)] = D.loss,
    seed: Annotated[int, typer.Option(help="Seed of data generation, split, data order and initial weights.", rich_help_panel=OPTIM)] = D.seed,
    epochs: Annotated[int, typer.Option(help="Epochs to train.", rich_help_panel=OPTIM)] = D.epochs,
    batch_size: Annotated[int, typer.Option(help="GLOBAL batch: each of N ranks takes batch/N rows a step.", rich_help_panel=OPTIM)] = D.batch_size,
    grad_accum: Annotated[int, typer.Option(help="Micro-steps per optimizer step; the global batch stays --batch-size.", rich_help_panel=OPTIM)] = D.grad_accum,
    clip_grad: Annotated[Optional[float], typer.Option(help="Clip the gradient norm to this value.", rich_help_panel=OPTIM)] = None,
    precision: Annotated[str, typer.Option(help="fp32|bf16|fp16 (autocast; fp16 adds a GradScaler).", rich_help_panel=OPTIM)] = D.precision,
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the DDP model.", rich_help_panel=OPTIM)] = D.compile,
    nan_policy: Annotated[str, typer.Option(help="stop|skip on a non-finite loss (skip costs a sync per step).", rich_help_panel=OPTIM)] = D.nan_policy,
    deterministic: Annotated[bool, typer.Option("--deterministic/--no-deterministic", help="torch.use_deterministic_algorithms and cuDNN/cuBLAS settings.", rich_help_panel=OPTIM)] = D.deterministic,
    backend: Annotated[str, typer.Option(help="auto|nccl|gloo (auto: NCCL on CUDA, else Gloo).", rich_help_panel=DIST)] = D.backend,
    device: Annotated[str, typer.Option(help="auto|cpu|cuda; on GPUs each process binds cuda:LOCAL_RANK.", rich_help_panel=DIST)] = D.device,
    timeout: Annotated[Optional[float], typer.Option(help="Collective timeout in seconds (torch's defaults: 30 min Gloo, 10 min NCCL).", rich_help_panel=DIST)] = None,
    bucket_cap_mb: Annotated[Optional[float], typer.Option(help="DDP gradient bucket size in MB (default: torch's 25, with a small first bucket that starts the all-reduce early).", rich_help_panel=DIST)] = None,
    static_graph: Annotated[bool, typer.Option("--static-graph/--no-static-graph", help="DDP static_graph (not with --grad-accum). Like --comm-hook and --bucket-cap-mb, it makes a 1-process run use DDP too.", rich_help_panel=DIST)] = D.static_graph,
    comm_hook: Annotated[str, typer.Option(help="none|fp16|bf16|powersgd gradient compression (torch's hooks).", rich_help_panel=DIST)] = D.comm_hook,
    nproc_per_node: Annotated[Optional[int], typer.Option(help="Start N local workers through torch's launcher (free port).", rich_help_panel=DIST)] = None,
    out: Annotated[Optional[str], typer.Option(help="Run folder (default: a new one under runs/).", rich_help_panel=RUN)] = None,
    resume: Annotated[Optional[str], typer.Option(help="A checkpoint, or 'auto': the run folder's last.pt if any.", rich_help_panel=RUN)] = None,
    log_every: Annotated[int, typer.Option(help="Steps between metric rows, progress updates and stop checks.", rich_help_panel=RUN)] = D.log_every,
    checkpoint_every: Annotated[int, typer.Option(help="Also checkpoint every N steps (0: at epoch ends only).", rich_help_panel=RUN)] = D.checkpoint_every,
    keep_last: Annotated[int, typer.Option(help="Keep this many step-stamped checkpoint copies.", rich_help_panel=RUN)] = D.keep_last,
    monitor: Annotated[str, typer.Option("--monitor", "--monitor-metric", help="Metric for best.pt and early stopping: auto (val_loss, or train_loss without validation), val_loss, val_accuracy, val_rmse, val_mae, val_r2, train_loss. Under torchrun spell it --monitor-metric (torchrun mistakes --monitor for its --monitor-interval).", rich_help_panel=RUN)] = D.monitor,
    monitor_mode: Annotated[str, typer.Option(help="auto|min|max (auto: max for accuracy and r2).", rich_help_panel=RUN)] = D.monitor_mode,
    early_stop: Annotated[int, typer.Option(help="Stop after this many epochs without improvement (0: never).", rich_help_panel=RUN)] = D.early_stop,
    quiet: Annotated[bool, typer.Option("--quiet/--no-quiet", help="Print only errors and the final summary.", rich_help_panel=RUN)] = D.quiet,
    tensorboard: Annotated[bool, typer.Option("--tensorboard/--no-tensorboard", help="Also write TensorBoard events (tensorboard extra).", rich_help_panel=RUN)] = D.tensorboard,
    config: Annotated[Optional[Path], typer.Option(help="A TOML config (or a run's config.json); flags override it.", rich_help_panel=RUN)] = None,
    print_config: Annotated[bool, typer.Option("--print-config", help="Print the resolved config as TOML and exit.", rich_help_panel=RUN)] = False,
) -> None:
    """Train an MLP with DDP. Run it plainly (1 process), with --nproc-per-node N, or under torchrun."""
    started_at = time.perf_counter()
    given = {name: value for name, value in ctx.params.items()
             if name in FIELD_NAMES and _given_on_command_line(ctx, name)}
    cfg = merge(read_config_file(config) if config else {}, given)
    if print_config:
        console.out.print(to_toml(cfg), markup=False, end="")
        return
    if nproc_per_node is not None:
        from ddptrain.launcher import launch_local, strip_option

        if nproc_per_node < 1:
            raise UsageError(f"--nproc-per-node {nproc_per_node} must be at least 1")
        argv = strip_option(sys.argv[sys.argv.index("fit") + 1:], "--nproc-per-node")
        if cfg.out is None:
            from ddptrain.launchenv import launch_env
            from ddptrain.rundir import default_out

            argv += ["--out", str(default_out(launch_env()))]
        raise typer.Exit(launch_local(nproc_per_node, argv))
    from ddptrain.run import fit as run_fit

    run_fit(cfg, started_at)


@app.command("eval")
def eval_command(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by ddptrain fit.")],
    data: Annotated[str, typer.Option(help="A file with the model's feature columns and target, or a built-in name (a fresh draw, see --seed).")],
    seed: Annotated[Optional[int], typer.Option(help="Seed of a built-in dataset (default: the training seed + 1).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
    device: Annotated[str, typer.Option(help="auto|cpu|cuda.")] = "auto",
) -> None:
    """Score a checkpoint on labelled data (one process or under torchrun; rows are sharded, sums all-reduced)."""
    from ddptrain.config import CHOICES, MAX_SEED

    if device not in CHOICES["device"]:
        raise UsageError(f"--device {device!r} is not one of: {', '.join(CHOICES['device'])}")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise UsageError(f"--seed {seed} must be an integer from 0 to {MAX_SEED} (2**63 - 1)")
    from ddptrain.evaluate import evaluate_checkpoint

    evaluate_checkpoint(checkpoint, data, seed, json_out, device)


@app.command()
def predict(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by ddptrain fit.")],
    data: Annotated[str, typer.Option(help="Input file with the model's feature columns (the target may be absent).")],
    out: Annotated[Path, typer.Option(help="Output CSV: one row per input row, in input order.")],
    id_column: Annotated[Optional[str], typer.Option(help="A column carried through to the output.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists.")] = False,
) -> None:
    """Write predictions (labels in their original names and class probabilities, or values in target units)."""
    from ddptrain.evaluate import predict_to_csv

    predict_to_csv(checkpoint, data, out, id_column, overwrite)


@app.command()
def inspect(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by ddptrain fit.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Show what a checkpoint holds: architecture, parameters, data spec, position, metrics, versions."""
    from ddptrain.evaluate import inspect_checkpoint

    inspect_checkpoint(checkpoint, json_out)


@app.command()
def plot(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (or metrics.jsonl files) to draw on shared axes.")],
    out: Annotated[Path, typer.Option(help="Output image: .png, .svg or .pdf.")] = Path("curves.png"),
) -> None:
    """Loss and accuracy (or RMSE) against step for one or several runs (needs the plot extra)."""
    from ddptrain.plot import plot_runs

    plot_runs(runs, out)


@app.command()
def env() -> None:
    """Versions, devices, backends and launcher variables: what to paste into a bug report."""
    from ddptrain.envreport import print_env

    print_env()


def _given_on_command_line(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name != "DEFAULT"


def entry() -> None:
    """The `ddptrain` command and `python -m ddptrain`: `main`, then the process ends through
    `ddptrain.dist.exit_process` where it had a process group (see there why)."""
    try:
        main()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if "ddptrain.dist" in sys.modules:
            sys.modules["ddptrain.dist"].exit_process(code)
        raise


def main() -> None:
    """Every failure becomes one `error:` line and an exit code (tracebacks with --debug)."""
    try:
        code = app(standalone_mode=False)
    except (Exception, KeyboardInterrupt) as exc:
        from ddptrain.errors import report

        code = report(exc)
    sys.exit(code or 0)
