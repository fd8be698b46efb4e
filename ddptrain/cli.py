"""The Typer app: options -> FitConfig -> library call. The only module that knows Typer.

torch is imported inside the commands, so `ddptrain --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from inspect import Parameter, Signature
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperGroup

from ddptrain import __version__
from ddptrain.config import (
    COLUMN_LISTS,
    DATA,
    DIST,
    MODEL,
    OPTIM,
    RUN,
    Device,
    MLFLOW_DEFAULT,
    FitConfig,
    field_type,
    merge,
    read_config_file,
    to_toml,
)
from ddptrain.console import console
from ddptrain.errors import UsageError


class Commands(TyperGroup):
    """ddptrain's commands. Ctrl-C (or SIGTERM turned into it) inside any of them reaches `main` as an error to
    report: Typer itself would turn it into a silent exit 130."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            from ddptrain.errors import Interrupted

            raise Interrupted("interrupted") from None


app = typer.Typer(help="Train an MLP on your table with PyTorch DistributedDataParallel, on 1 process, 1 machine "
                       "or many.", cls=Commands, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, context_settings={"help_option_names": ["-h", "--help"]})
D = FitConfig()
# options whose value may be left out (`--mlflow` alone: MLflow's default store); click has no such option
OPTIONAL_VALUE = {"mlflow": MLFLOW_DEFAULT}


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


def fit(ctx: typer.Context, nproc_per_node: Optional[int], nnodes: Optional[str], rdzv_endpoint: Optional[str],
        rdzv_id: Optional[str], max_restarts: int, config: Optional[Path], print_config: bool,
        **settings: Any) -> None:
    """Train an MLP with DDP. Run it plainly (1 process), with --nproc-per-node N, or under torchrun."""
    started_at = time.perf_counter()
    given = {name: value for name, value in settings.items() if _given_on_command_line(ctx, name)}
    cfg = merge(read_config_file(config) if config else {}, given)
    if print_config:
        console.out.print(to_toml(cfg), markup=False, end="")
        return
    if max_restarts or any(value is not None for value in (nproc_per_node, nnodes, rdzv_endpoint, rdzv_id)):
        from ddptrain.launcher import Launch, launch_local

        launch = Launch.checked(nproc_per_node, nnodes, rdzv_endpoint, rdzv_id, max_restarts)
        raise typer.Exit(launch_local(launch, cfg, started_at))
    from ddptrain.run import fit as run_fit

    run_fit(cfg, started_at)



def _setting_option(f: dataclasses.Field) -> Parameter:
    """A FitConfig field as a Typer option: its type (a Choice enum lists and checks its values), help, panel and
    flags come from the field itself (config.setting)."""
    meta = f.metadata
    kind, optional = field_type(f.name)
    default, help_text, extra = getattr(D, f.name), meta["help"], {}
    if meta["choices"] is not None:
        # the choices go in the help text, which wraps, rather than in the metavar column, which a narrow
        # terminal truncates
        kind, default = meta["choices"], meta["choices"](default)
        help_text += f" One of: {', '.join(c.value for c in kind)}."
        extra["metavar"] = "NAME"
    elif f.name in ("hidden", "betas", *COLUMN_LISTS):  # comma-separated on the command line
        kind, default = str, None if default is None else ",".join(map(str, default))
    elif f.name in OPTIONAL_VALUE:
        extra["metavar"] = "[URI]"
    annotation = Optional[kind] if optional else kind
    option = typer.Option(*meta["flags"], help=help_text, rich_help_panel=meta["panel"], **extra)
    return Parameter(f.name, Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[annotation, option])


PLAN_SETTINGS = ("target", "task", "categorical", "numeric", "drop", "numbers_as_categories")

_LAUNCH_OPTIONS = [
    Parameter("ctx", Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
    Parameter("nproc_per_node", Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[int], typer.Option(help="Start N workers on this machine through torch's launcher (alone: on a "
                                         "free port).", rich_help_panel=DIST)]),
    Parameter("nnodes", Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[str], typer.Option(help="With --nproc-per-node: the number of machines (or MIN:MAX), each "
                                         "running this same command.", rich_help_panel=DIST)]),
    Parameter("rdzv_endpoint", Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[str], typer.Option(help="With --nnodes: HOST:PORT where the machines meet (torch's c10d "
                                         "rendezvous; the same on every machine).", rich_help_panel=DIST)]),
    Parameter("rdzv_id", Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[str], typer.Option(help="With --rdzv-endpoint: the job's id, the same on every machine "
                                         "(default: from the endpoint; the run folder is runs/run-ID).",
                                    rich_help_panel=DIST)]),
    Parameter("max_restarts", Parameter.KEYWORD_ONLY, default=0, annotation=Annotated[
        int, typer.Option(help="With --nproc-per-node: restart a failed worker group this many times (it "
                               "resumes from the last checkpoint).", rich_help_panel=DIST)]),
    Parameter("config", Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[Path], typer.Option(help="A TOML config (or a run's config.json); flags override it.",
                                     rich_help_panel=RUN)]),
    Parameter("print_config", Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
        bool, typer.Option("--print-config", help="Print the resolved config as TOML and exit.", rich_help_panel=RUN)]),
]
# Typer reads the signature: every FitConfig setting becomes an option, written once in config.py.
# --help lists its panels in the order they first appear: what a newcomer needs (data, model, optimization, the
# run folder) before the distributed settings and the launcher's options.
HELP_PANELS = (DATA, MODEL, OPTIM, RUN, DIST)
_SETTINGS = sorted(dataclasses.fields(FitConfig), key=lambda f: HELP_PANELS.index(f.metadata["panel"]))
fit.__signature__ = Signature(_LAUNCH_OPTIONS[:1] + [_setting_option(f) for f in _SETTINGS] + _LAUNCH_OPTIONS[1:])
app.command(no_args_is_help=False)(fit)


CACHE_HELP = ("Keep the file's rows as this checkpoint prepares them in --cache-dir, so evaluating or predicting "
              "on the same file again (with this checkpoint or another of its run) skips reading it.")
CACHE_DIR_HELP = "Where prepared tables are kept (default: $XDG_CACHE_HOME/ddptrain or ~/.cache/ddptrain)."


def _rows_cache(cache: bool, cache_dir: Optional[Path]) -> Optional[Path]:
    if not cache:
        return None
    from ddptrain.cachefolder import default_cache_dir

    return cache_dir or default_cache_dir()


@app.command("eval")
def eval_command(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by ddptrain fit.")],
    data: Annotated[str, typer.Option(help="A file with the model's feature columns and target, or a built-in name (a fresh draw, see --seed).")],
    seed: Annotated[Optional[int], typer.Option(help="Seed of a built-in dataset (default: the training seed + 1).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
    device: Annotated[Device, typer.Option(help="Device to evaluate on.")] = Device("auto"),
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help=CACHE_HELP)] = True,
    cache_dir: Annotated[Optional[Path], typer.Option(help=CACHE_DIR_HELP)] = None,
) -> None:
    """Score a checkpoint on labelled data (one process or under torchrun; rows are sharded, sums all-reduced)."""
    from ddptrain.config import MAX_SEED

    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise UsageError(f"--seed {seed} must be an integer from 0 to {MAX_SEED} (2**63 - 1)")
    from ddptrain.evaluate import evaluate_checkpoint

    evaluate_checkpoint(checkpoint, data, seed, json_out, device.value, _rows_cache(cache, cache_dir))




@app.command()
def predict(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by ddptrain fit.")],
    data: Annotated[str, typer.Option(help="Input file with the model's feature columns (the target may be absent).")],
    out: Annotated[Path, typer.Option(help="Output CSV: one row per input row, in input order.")],
    keep: Annotated[Optional[str], typer.Option(
        help="Input columns carried into the output before the predictions, comma-separated (id,name), or 'all'.",
        metavar="COLUMNS")] = None,
    id_column: Annotated[Optional[str], typer.Option(help="One column carried into the output: --keep COLUMN.",
                                                     metavar="COLUMN")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists.")] = False,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help=CACHE_HELP + " Not when keeping columns.")] = True,
    cache_dir: Annotated[Optional[Path], typer.Option(help=CACHE_DIR_HELP)] = None,
) -> None:
    """Write predictions (labels in their original names and class probabilities, or values in target units)."""
    from ddptrain.evaluate import predict_to_csv

    predict_to_csv(checkpoint, data, out, kept_columns(keep, id_column), overwrite, _rows_cache(cache, cache_dir))


def kept_columns(keep: str | None, id_column: str | None) -> tuple[str, ...] | str:
    """predict's --keep and --id-column as the columns to carry (or "all"); an empty name is a mistake, not
    "no column"."""
    if id_column is not None and not id_column.strip():
        raise UsageError("--id-column '' names no column; give a column of the file (or leave the option out)")
    if keep is not None and keep.strip().lower() == "all":
        return "all"
    names = tuple(keep.split(",")) if keep is not None else ()
    if keep is not None and (not keep.strip() or any(not name.strip() for name in names)):
        raise UsageError(f"--keep '{keep}' holds an empty name; give column names separated by commas, or all")
    return names + ((id_column,) if id_column is not None and id_column not in names else ())


def describe(ctx: typer.Context, data: str, config: Optional[Path], json_out: bool, **settings: Any) -> None:
    """Show the plan `fit` would make of a table, before any training: each column's role, type, missing share and
    distinct values; the target, task and classes."""
    from ddptrain.describe import describe_table

    given = {name: value for name, value in settings.items() if _given_on_command_line(ctx, name)}
    describe_table(merge(read_config_file(config) if config else {}, {"data": data, **given}), json_out)


# the settings that decide a table's plan, as fit spells them
describe.__signature__ = Signature([
    Parameter("ctx", Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
    Parameter("data", Parameter.POSITIONAL_OR_KEYWORD, annotation=Annotated[
        str, typer.Argument(help="A .csv/.tsv/.parquet/.feather/.jsonl/.npz file (.csv.gz...), a folder or pattern of them, or a built-in name.")]),
    Parameter("config", Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[Path], typer.Option(help="A fit config (TOML or a run's config.json); flags override it.")]),
    Parameter("json_out", Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
        bool, typer.Option("--json", help="Print one JSON object.")]),
    *(_setting_option(f) for f in dataclasses.fields(FitConfig) if f.name in PLAN_SETTINGS),
])
app.command()(describe)


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by ddptrain fit.")],
    fmt: Annotated[str, typer.Option("--format", help="onnx: one graph from the raw columns to predictions "
                                        "(onnxruntime); safetensors: the weights, the preprocessing as JSON metadata.")] = "onnx",
    out: Annotated[Optional[Path], typer.Option(help="Output file (default: the checkpoint's path with .onnx or "
                                                     ".safetensors).")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset of the graph (18 to 23).")] = 18,
    server: Annotated[Optional[Path], typer.Option(
        help="Also write a standalone server of the ONNX model here (numpy and onnxruntime; no torch, no ddptrain).",
        metavar="PATH")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out (and --server) if it exists.")] = False,
) -> None:
    """Write a model that serves without ddptrain, its preprocessing included (needs the export extra)."""
    from ddptrain.export import export_checkpoint

    export_checkpoint(checkpoint, fmt, out, opset, overwrite, server)


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
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists.")] = False,
) -> None:
    """Loss and accuracy (or RMSE) against step for one or several runs (needs the plot extra)."""
    from ddptrain.plot import plot_runs

    plot_runs(runs, out, overwrite)


@app.command("cache")
def cache_command(
    cache_dir: Annotated[Optional[Path], typer.Option(help=CACHE_DIR_HELP)] = None,
    prune: Annotated[bool, typer.Option("--prune", help="Remove the entries of files that changed or went.")] = False,
    clear: Annotated[bool, typer.Option("--clear", help="Remove every entry (those a running job maps stay).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """List the prepared-table cache (size, last use, the files each entry was built from), or empty it."""
    from ddptrain.cachefolder import cache_command as run
    from ddptrain.cachefolder import default_cache_dir

    if prune and clear:
        raise UsageError("--prune and --clear do not go together: --clear removes the stale entries too")
    run(cache_dir or default_cache_dir(), prune, clear, json_out)


@app.command()
def tune(
    data: Annotated[Optional[str], typer.Option(help="The table (as fit's --data); or give data in --config.")] = None,
    target: Annotated[Optional[str], typer.Option(help="Target column (default: the last column).")] = None,
    config: Annotated[Optional[Path], typer.Option(help="Fit settings every trial shares (a TOML fit table, or a "
                                                        "run's config.json).")] = None,
    space: Annotated[Optional[Path], typer.Option(help="The search space (a TOML space table; default: lr, "
                                                       "width, depth, dropout, weight decay, numeric pieces, "
                                                       "embedding width; --print-space shows it).")] = None,
    trials: Annotated[int, typer.Option(help="Trials the study runs in all (finished, pruned or failed), "
                                             "whichever agent runs them.")] = 20,
    timeout: Annotated[Optional[float], typer.Option(help="Start no trial after this many seconds.")] = None,
    study: Annotated[Optional[str], typer.Option(help="The study's name (default: the data file's name).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="The study's folder: trial run folders, best.toml, refit "
                                                     "(default: tunes/STUDY).")] = None,
    storage: Annotated[Optional[Path], typer.Option(help="Optuna's journal file (default: OUT/journal.log); agents "
                                                         "on several machines share one on a shared filesystem.")] = None,
    metric: Annotated[str, typer.Option(help="The validation metric tuned (as fit's --monitor): val_loss, "
                                             "val_accuracy, val_auc, val_log_loss, val_f1, val_balanced_accuracy, "
                                             "val_rmse, val_mae or val_r2.")] = "val_loss",
    pruner: Annotated[str, typer.Option(help="Stop unpromising trials from their epoch rows: median, hyperband "
                                             "or none.")] = "median",
    seed: Annotated[int, typer.Option(help="Seed of the sampler (each trial's fit keeps --config's seed).")] = 0,
    nproc_per_node: Annotated[Optional[int], typer.Option(help="Each trial runs N workers on this machine.")] = None,
    refit: Annotated[bool, typer.Option("--refit", help="After the study, train the best settings on every "
                                                        "training row (OUT/refit).")] = False,
    mlflow: Annotated[Optional[str], typer.Option(metavar="[URI]", help="Track the study in MLflow: a run for "
                                                  "the study, a child run for each trial.")] = None,
    mlflow_experiment: Annotated[str, typer.Option(help="The MLflow experiment.")] = "ddptrain",
    print_space: Annotated[bool, typer.Option("--print-space", help="Print the search space and exit.")] = False,
) -> None:
    """Search fit's settings with Optuna: every trial a real fit (pruned from its epoch rows), the study in a
    journal file that survives crashes and that agents on several machines share."""
    from ddptrain.space import read_space

    dimensions = read_space(str(space) if space else None)
    if print_space:
        for dimension in dimensions:
            console.out.print(dimension.describe(), markup=False)
        return
    import importlib.util

    if importlib.util.find_spec("optuna") is None:
        raise UsageError("tune needs the optuna package: pip install 'ddptrain[tune]'")
    from ddptrain.tune import TuneConfig, checked

    settings = read_config_file(config) if config else {}
    settings.update({k: v for k, v in (("data", data), ("target", target)) if v is not None})
    if not settings.get("data"):
        raise UsageError("tune needs a table: --data FILE (or data = ... in --config)")
    settings = checked(settings, dimensions, trials, timeout, metric, pruner, nproc_per_node)
    name = study or Path(str(settings["data"])).name.split(".")[0] or "study"
    folder = out or Path("tunes") / name
    journal = storage or folder / "journal.log"
    run_tune = TuneConfig(settings, dimensions, trials, timeout, name, folder, journal, pruner, metric, seed,
                          nproc_per_node, refit, mlflow, mlflow_experiment)
    from ddptrain.tune import tune as tune_study

    tune_study(run_tune)


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


def flags_without_metavar(command: Any) -> Any:
    """On/off options (--overwrite, --cache/--no-cache) take no value: the help shows none, rather than `<bool>`."""
    for sub in getattr(command, "commands", {}).values():
        flags_without_metavar(sub)
    for param in getattr(command, "params", []):
        if getattr(param, "is_flag", False):
            param.metavar = ""
    make_help_option = command.get_help_option  # click makes -h/--help anew for each context

    def help_option(ctx: Any) -> Any:
        option = make_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    command.get_help_option = help_option
    return command


def with_optional_values(args: list[str]) -> list[str]:
    """`--mlflow` followed by nothing or by another option reads as `--mlflow=auto`."""
    out = []
    for i, arg in enumerate(args):
        name = arg[2:].replace("-", "_") if arg.startswith("--") else ""
        bare = name in OPTIONAL_VALUE and (i + 1 == len(args) or args[i + 1].startswith("-"))
        out.append(f"{arg}={OPTIONAL_VALUE[name]}" if bare else arg)
    return out


def main() -> None:
    """Every failure becomes one `error:` line and an exit code (tracebacks with --debug)."""
    try:
        command = flags_without_metavar(typer.main.get_command(app))
        code = command.main(args=with_optional_values(sys.argv[1:]), standalone_mode=False)
    except (Exception, KeyboardInterrupt) as exc:
        from ddptrain.report import report

        code = report(exc)
    sys.exit(code or 0)
