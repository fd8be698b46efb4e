"""The fit configuration: one frozen dataclass, merged from defaults < config file < flags, validated once.

No torch here: the CLI builds and checks a config before anything heavy is imported.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

from ddptrain.errors import UsageError


class Choice(str, Enum):
    """A setting's allowed values: Typer lists, checks and completes them; the config holds the plain string."""

    def __str__(self) -> str:
        return self.value


def _choice(name: str, values: str) -> type[Choice]:
    return Choice(name, [(v, v) for v in values.split()])  # type: ignore[return-value]


# Each setting with a fixed set of values: its enum's name, then the values.
CHOICE_VALUES = """
Task auto classification regression
Activation relu gelu silu tanh
Norm none layer batch
Optimizer sgd adam adamw rmsprop
Scheduler constant cosine linear step onecycle coslog4
Loss auto cross_entropy mse huber l1
Backend auto nccl gloo
Device auto cpu cuda
Precision fp32 bf16 fp16
CommHook none fp16 bf16 powersgd
MonitorMode auto min max
NanPolicy stop skip
Monitor auto val_loss val_accuracy val_auc val_log_loss val_f1 val_balanced_accuracy val_rmse val_mae val_r2 train_loss
ClassWeight none balanced
Shuffle auto exact block
"""
(Task, Activation, Norm, Optimizer, Scheduler, Loss, Backend, Device, Precision, CommHook, MonitorMode, NanPolicy,
 Monitor, ClassWeight, Shuffle) = (_choice(*line.split(maxsplit=1)) for line in CHOICE_VALUES.strip().splitlines())

DEFAULT_VAL_FRACTION, VALIDATE_FROM_ROWS = 0.2, 1000
BAG_BELOW_ROWS = 20_000  # a table file this short is bagged by default: every row trains, out-of-fold validation
SMALL_TABLE_ROWS = 5000  # under this, a bagged regression table gets 10 models and the numeric pieces are cross-validated
CV_FOLDS = 4  # the folds of those cross-validations (crossval.py)
CV_MAX_CATEGORIES = 4  # numeric columns tried as categories there (crossval.category_candidates), each CV_FOLDS fits
DEFAULT_EPOCHS, MIN_DEFAULT_STEPS = 20, 250
DEFAULT_PATIENCE = 5
DEFAULT_ADAMW_DECAY = 0.1
DEFAULT_LABEL_SMOOTHING = 0.1  # classification (label_smoothing())
BLOCK_SHUFFLE_BYTES = 10 ** 9
MLFLOW_DEFAULT = "auto"  # --mlflow alone: MLflow's own default store
EMBED_CAP = 8  # the widest embedding a categorical column gets by default (--embedding-dim sets every width)
DATA, MODEL, OPTIM, DIST, RUN = "Data", "Model", "Optimization", "Distributed", "Run folder and logging"


def setting(default: Any, help: str, panel: str, choices: type[Choice] | None = None, fixed: bool = False,
            flags: tuple[str, ...] = ()) -> Any:
    """A FitConfig field with what the CLI and resume need to know about it, written once: its help text, its
    --help panel, its allowed values, whether a resume must keep it (`fixed`: it defines the experiment, or the
    optimizer and scheduler states carry it), and its flag spellings when they are not just --name."""
    return field(default=default, metadata={"help": help, "panel": panel, "choices": choices, "fixed": fixed,
                                            "flags": flags})


@dataclass(frozen=True)
class FitConfig:
    """Every setting of a fit. Built from defaults < config file < flags; checked on every construction."""

    # data
    data: str = setting(
        "spirals", 'Built-in dataset (xor, spirals, moons, blobs, regression) or a table: a .csv, .tsv, .parquet, .feather, .jsonl or .npz file (text compressed too: .csv.gz ...), a folder of shards or a quoted glob.', DATA, fixed=True)
    target: str | None = setting(None, 'Target column (default: the last column).', DATA, fixed=True)
    task: str = setting("auto", "Task (auto: from the target's values).", DATA, choices=Task, fixed=True)
    val_fraction: float | None = setting(
        None, f'Seeded validation split of the data; 0 turns validation off (default: {DEFAULT_VAL_FRACTION} for '
              f'tables of {BAG_BELOW_ROWS:,} rows or more and built-in datasets of {VALIDATE_FROM_ROWS:,}; a smaller table '
              'file is bagged: see --bagging).', DATA, fixed=True)
    val_data: str | None = setting(None, 'A separate validation file (instead of --val-fraction).', DATA, fixed=True)
    n_samples: int = setting(4000, 'Rows of a built-in dataset.', DATA, fixed=True)
    n_features: int | None = setting(None, 'Features of blobs/regression.', DATA, fixed=True)
    n_classes: int | None = setting(None, 'Classes of blobs/spirals.', DATA, fixed=True)
    noise: float | None = setting(None, 'Noise of a built-in dataset.', DATA, fixed=True)
    categorical: tuple[str, ...] = setting((), "Columns to treat as categories (comma-separated), e.g. integer codes.",
                                           DATA, fixed=True)
    numeric: tuple[str, ...] = setting((), "Columns to treat as numbers (comma-separated).", DATA, fixed=True)
    drop: tuple[str, ...] = setting((), "Columns to leave out (comma-separated).", DATA, fixed=True)
    numbers_as_categories: tuple[str, ...] | None = setting(
        None, "Whole-number columns that look like ids (a family's or a store's number), taken as categories "
              f"(comma-separated; '' for none). Default: on a table file under {BAG_BELOW_ROWS:,} rows without "
              f"validation rows, each one a {CV_FOLDS}-fold cross-validation on the training rows prefers as "
              "categories; else none (fit names them in a note).", DATA, fixed=True)
    shuffle: str = setting(
        "auto", "Row order each epoch: exact (a permutation of all rows) or block (blocks of rows in a random "
                "order, rows shuffled within windows of blocks: near-sequential reads for tables larger than "
                "memory); auto: block when the training arrays exceed 1 GB. Both depend on seed and epoch alone.",
        DATA, choices=Shuffle, fixed=True)
    cache: bool = setting(True, "Keep a file's prepared arrays in --cache-dir, built once per machine and "
                                "memory-mapped by every rank; a rerun or resume skips the work.", DATA,
                          flags=("--cache/--no-cache",))
    cache_dir: str | None = setting(None, "Where prepared tables are kept (default: $XDG_CACHE_HOME/ddptrain or "
                                          "~/.cache/ddptrain).", DATA)
    # model
    hidden: tuple[int, ...] = setting(
        (128, 128), "Hidden widths, comma-separated ('' for a linear model).", MODEL, fixed=True)
    activation: str = setting("relu", 'Activation after each hidden layer.', MODEL, choices=Activation, fixed=True)
    embedding_dim: int | None = setting(
        None, "Width of every categorical column's embedding (default: round(1.6 * levels ** 0.56), at most "
              f"{EMBED_CAP}: a column of many levels cannot take over the model).", MODEL,
        fixed=True)
    dropout: float = setting(0.0, 'Dropout probability after each hidden layer.', MODEL, fixed=True)
    bagging: str = setting(
        "auto", "k-fold bagging: K models, each trained on all training rows but one fold and early-stopped on that "
                "fold; predictions are their average, and the out-of-fold score is the run's validation figure. A "
                f"member count (2 to 32), off, or auto: 5 for a table file under {BAG_BELOW_ROWS:,} rows without validation rows "
                f"(10 for a regression table under {SMALL_TABLE_ROWS:,}), else off.", MODEL, fixed=True)
    numeric_bins: int | None = setting(
        None, "Piecewise-linear pieces per numeric column, cut at the training rows' quantiles, fed to the first "
              "layer beside the number itself (0: the number alone; default: for a table file under "
              f"{SMALL_TABLE_ROWS:,} rows without validation rows, 0 or 16, whichever a 4-fold cross-validation on the "
              "training rows prefers; else 0).", MODEL, fixed=True)
    norm: str = setting(
        "none", 'Normalization after each hidden layer (batch becomes SyncBatchNorm on GPUs).', MODEL, choices=Norm, fixed=True)
    # optimization
    optimizer: str = setting(
        "adamw", "Optimizer (sgd, adam, adamw use torch's fused kernels).", OPTIM, choices=Optimizer, fixed=True)
    lr: float = setting(3e-3, 'Peak learning rate.', OPTIM, fixed=True)
    momentum: float = setting(0.9, 'Momentum (sgd, rmsprop).', OPTIM, fixed=True)
    weight_decay: float | None = setting(
        None, f"Weight decay (default: {DEFAULT_ADAMW_DECAY} for adamw, whose decay is decoupled from the gradient; "
              "0 for the others).", OPTIM, fixed=True)
    betas: tuple[float, float] = setting((0.9, 0.999), "Adam betas, 'b1,b2'.", OPTIM, fixed=True)
    scheduler: str = setting(
        "cosine", 'Learning-rate schedule, stepped per optimizer step (cosine: from --lr down to 0 over the run; '
                  "coslog4: RealMLP's four cosine cycles, evenly spaced in log time).",
        OPTIM, choices=Scheduler, fixed=True)
    warmup_steps: int = setting(0, 'Linear warm-up steps before the schedule.', OPTIM, fixed=True)
    lr_step_size: int | None = setting(
        None, 'Steps between decays of --scheduler step (default: a third of the run).', OPTIM, fixed=True)
    lr_gamma: float = setting(0.1, 'Decay factor of --scheduler step.', OPTIM, fixed=True)
    loss: str = setting("auto", 'Loss (auto: cross-entropy or MSE by task).', OPTIM, choices=Loss, fixed=True)
    class_weight: str = setting(
        "none", "Classification: balanced weighs each class's rows by rows / (classes x that class's rows), so "
                "every class counts alike in the loss (for imbalanced targets; scikit-learn's 'balanced').", OPTIM,
        choices=ClassWeight, fixed=True)
    label_smoothing: float | None = setting(
        None, f"Classification: train toward 1 - S on the true class and S spread over all classes (torch's "
              f"label_smoothing; default {DEFAULT_LABEL_SMOOTHING}). Validation loss and log loss stay unsmoothed.",
        OPTIM, fixed=True)
    seed: int = setting(0, 'Seed of data generation, split, data order and initial weights.', OPTIM, fixed=True)
    epochs: int | None = setting(
        None, f"Epochs to train (default: {DEFAULT_EPOCHS}, or for a small table as many as make {MIN_DEFAULT_STEPS} "
              "optimizer steps).", OPTIM)
    batch_size: int | None = setting(
        None, "GLOBAL batch: each of N ranks takes batch/N rows a step (default: 64, or for a small table a quarter of "
        "its training rows, a multiple of 8 and at least 8).", OPTIM, fixed=True)
    grad_accum: int = setting(
        1, 'Micro-steps per optimizer step; the global batch stays --batch-size.', OPTIM, fixed=True)
    clip_grad: float | None = setting(None, 'Clip the gradient norm to this value.', OPTIM)
    precision: str = setting(
        "fp32", 'Autocast precision (fp16 adds a GradScaler).', OPTIM, choices=Precision, fixed=True)
    compile: bool = setting(False, 'torch.compile the DDP model.', OPTIM, flags=('--compile/--no-compile',))
    cuda_graphs: bool | None = setting(
        None, "Replay each training step as one captured CUDA graph (GPU only; a setting that rules it out, e.g. "
              "--nan-policy skip or --precision fp16, is named and the step runs eagerly). Default: eager until "
              "measured on a GPU.", OPTIM, flags=('--cuda-graphs/--no-cuda-graphs',))
    nan_policy: str = setting(
        "stop", 'On a non-finite loss: stop, or skip the step (skip costs a sync per step).', OPTIM, choices=NanPolicy)
    deterministic: bool = setting(
        False, "Use torch's deterministic algorithms and cuDNN/cuBLAS settings.", OPTIM, flags=('--deterministic/--no-deterministic',))
    # distributed
    backend: str = setting("auto", 'Process-group backend (auto: NCCL on CUDA, else Gloo).', DIST, choices=Backend)
    device: str = setting("auto", 'Device; on GPUs each process binds cuda:LOCAL_RANK.', DIST, choices=Device)
    timeout: float | None = setting(
        None, "Collective timeout in seconds (torch's defaults: 30 min Gloo, 10 min NCCL).", DIST)
    bucket_cap_mb: float | None = setting(
        None, "DDP gradient bucket size in MB (default: torch's 25, with a small first bucket that starts the all-reduce early).", DIST)
    static_graph: bool = setting(
        False, 'DDP static_graph (not with --grad-accum). Like --comm-hook and --bucket-cap-mb, it makes a 1-process run use DDP too.', DIST, flags=('--static-graph/--no-static-graph',))
    comm_hook: str = setting("none", "Gradient compression (torch's DDP communication hooks).", DIST, choices=CommHook)
    # run folder, logging, checkpoints
    out: str | None = setting(None, 'Run folder (default: a new one under runs/).', RUN)
    resume: str | None = setting(None, "A checkpoint, or 'auto': the run folder's last.pt if any.", RUN)
    log_every: int = setting(20, 'Steps between metric rows, progress updates and stop checks.', RUN)
    checkpoint_every: int = setting(0, 'Also checkpoint every N steps (0: at epoch ends only).', RUN)
    keep_last: int = setting(0, 'Keep this many step-stamped checkpoint copies.', RUN)
    monitor: str = setting(
        "auto", 'Metric for best.pt and early stopping (auto: val_loss, or train_loss without validation). Under torchrun spell it --monitor-metric (torchrun mistakes --monitor for its --monitor-interval).', RUN, choices=Monitor, flags=('--monitor', '--monitor-metric'))
    monitor_mode: str = setting(
        "auto", 'Whether larger or smaller --monitor is better (auto: max for accuracy, auc, f1, balanced accuracy and r2).', RUN, choices=MonitorMode)
    early_stop: int | None = setting(
        None, f"Stop after this many epochs without improvement of --monitor (0: never; default: "
              f"{DEFAULT_PATIENCE} when there are validation rows, else never). best.pt keeps the best epoch.", RUN)
    quiet: bool = setting(False, 'Print only errors and the final summary.', RUN, flags=('--quiet/--no-quiet',))
    tensorboard: bool = setting(
        False, 'Also write TensorBoard events (tensorboard extra).', RUN, flags=('--tensorboard/--no-tensorboard',))
    mlflow: str | None = setting(
        None, "Track the run in MLflow (mlflow extra): the resolved config, every metric row, the summary, the "
              "checkpoints and, with the export extra, the ONNX model. A tracking URI (sqlite:///mlflow.db, "
              "http://host:5000), or --mlflow alone for MLflow's default (the MLFLOW_TRACKING_URI variable, else "
              "./mlflow.db).",
        RUN, flags=("--mlflow",))
    mlflow_experiment: str = setting("ddptrain", "The MLflow experiment of --mlflow's run.", RUN)
    mlflow_onnx: bool | None = setting(
        None, "With --mlflow: log best.pt as an ONNX model with a signature of the raw columns (default: when the "
              "export extra is installed).", RUN, flags=("--mlflow-onnx/--no-mlflow-onnx",))

    def __post_init__(self) -> None:
        for name in CHOICE_FIELDS:  # a Choice member (from Typer) is kept as its plain string
            value = getattr(self, name)
            if isinstance(value, Choice):
                object.__setattr__(self, name, value.value)
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


FIELD_NAMES = tuple(f.name for f in fields(FitConfig))
CHOICE_FIELDS = {f.name: f.metadata["choices"] for f in fields(FitConfig) if f.metadata["choices"]}
# Settings that define the experiment (or live in the optimizer and scheduler states): a resume that changes one of
# them is refused.
RESUME_FIXED = tuple(f.name for f in fields(FitConfig) if f.metadata["fixed"])
# fixed settings added after checkpoints existed: the value a run from before them trained with
BEFORE_IT_EXISTED = {"label_smoothing": 0.0, "numbers_as_categories": []}
FIELD_TYPES = {f.name: str(f.type) for f in fields(FitConfig)}  # annotations as text ("int", "float | None", ...)
MAX_INT = 2**63 - 1  # what torch and numpy take as an integer
MAX_SEED = MAX_INT
MAX_WIDTH = 1_000_000
MAX_BINS = 256  # --numeric-bins
MAX_MEMBERS = 32  # --bagging
MAX_BUILTIN_ROWS = 100_000_000


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_int_list(name: str, value: Any) -> tuple[int, ...]:
    """`--hidden 256,256` (or a TOML list): positive integers; an empty string means no hidden layer."""
    if isinstance(value, (list, tuple)):
        items = [v if isinstance(v, int) and not isinstance(v, bool) else "bad" for v in value]
    else:
        text = str(value).strip()
        items = [] if text == "" else text.split(",")
    try:
        out = tuple(int(str(item).strip()) for item in items)
    except ValueError:
        out = ()
        items = ["bad"]
    if len(out) != len(items) or any(not 1 <= v <= MAX_WIDTH for v in out):
        raise UsageError(f"{flag(name)} {value!r} is not a comma-separated list of positive integers (at most {MAX_WIDTH:,}); "
                         f"try {flag(name)} 256,256 (or '' for a linear model)")
    return out


COLUMN_LISTS = ("categorical", "numeric", "drop", "numbers_as_categories")


def parse_names(name: str, value: Any) -> tuple[str, ...]:
    """`--drop id,name` (or a TOML list, for names with commas): column names."""
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, str) for v in value):
            raise UsageError(f"{flag(name)} {value!r} must be a list of column names")
        return tuple(value)
    if not isinstance(value, str):
        raise UsageError(f"{flag(name)} {value!r} must be column names, comma-separated")
    return tuple(part.strip() for part in value.split(",") if part.strip())


def parse_betas(value: Any) -> tuple[float, float]:
    items = list(value) if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        betas = tuple(float(v) for v in items if not isinstance(v, bool))
    except (TypeError, ValueError):
        betas = ()
    if len(betas) != 2 or len(items) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise UsageError(f"--betas {value!r} must be two numbers in [0, 1), e.g. --betas 0.9,0.999")
    return betas  # type: ignore[return-value]


EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string", object: "a value"}


def field_type(name: str) -> tuple[type, bool]:
    """(the field's base type, whether it may be None), read from FitConfig's own annotations."""
    text = FIELD_TYPES[name].replace(" ", "")
    optional = text.endswith("|None")
    base = text.removesuffix("|None")
    return {"str": str, "int": int, "float": float, "bool": bool}.get(base, object), optional


def _coerce(name: str, value: Any, strict: bool) -> Any:
    """Bring a value to the field's type, with a one-line error naming the key if it cannot be.

    `strict` (config files): the value must already have the type (`lr = true` is not 1.0, `epochs = "3"` is not
    3); command-line text has been parsed by Typer."""
    if name == "hidden":
        return parse_int_list(name, value)
    if name in COLUMN_LISTS:
        return None if value is None and field_type(name)[1] else parse_names(name, value)
    if name == "betas":
        return parse_betas(value)
    kind, optional = field_type(name)
    where = f"config key '{name}'" if strict else flag(name)
    if value is None:
        if optional:
            return None
        raise UsageError(f"{where} cannot be empty (null); give {EXPECTED[kind]} or leave the key out")
    is_bool = isinstance(value, bool)
    if kind is bool and (is_bool or not strict and str(value).lower() in ("true", "false")):
        return value if is_bool else str(value).lower() == "true"
    if kind is int and not is_bool and (isinstance(value, int) or not strict and _parses_as(int, value)):
        return int(value)
    if kind is float and not is_bool and (isinstance(value, (int, float)) or not strict and _parses_as(float, value)):
        return float(value)
    if kind is str and isinstance(value, str):
        return value
    raise UsageError(f"{where} is {value!r}, not {EXPECTED[kind]}")


def _parses_as(kind: type, value: Any) -> bool:
    try:
        kind(str(value))
        return True
    except ValueError:
        return False


def merge(file_values: dict[str, Any], cli_values: dict[str, Any]) -> FitConfig:
    """Defaults < config file < command line. Keys may use '-' or '_'."""
    values: dict[str, Any] = {}
    for source, strict in ((file_values, True), (cli_values, False)):
        for raw_key, value in source.items():
            key = raw_key.replace("-", "_")
            if key not in FIELD_NAMES:
                close = difflib.get_close_matches(key, FIELD_NAMES, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(FIELD_NAMES)}"
                raise UsageError(f"unknown config key '{raw_key}'{hint}")
            values[key] = _coerce(key, value, strict)
    return FitConfig(**values)


def read_table(path: str | Path, option: str) -> dict[str, Any]:
    """A TOML file's table, or a JSON file's object (a run folder's config.json), or one line naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{option} {path}: no such file; pass a .toml file" +
                         (" or a run folder's config.json" if option == "--config" else ""))
    try:
        if path.suffix == ".json":
            table = json.loads(path.read_text())
        else:
            table = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{option} {path}: cannot parse it ({exc}); fix the file's syntax") from None
    if not isinstance(table, dict):
        raise UsageError(f"{option} {path}: the file holds a {type(table).__name__}, not a table of settings; "
                         "write key = value lines (TOML) or one JSON object")
    return table


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A TOML file (a [fit] table or top-level keys), or a run folder's config.json."""
    table = read_table(path, "--config")
    if isinstance(table.get("fit"), dict):
        table = table["fit"]
    table.pop("ddptrain_version", None)
    return table


def validate(cfg: FitConfig) -> None:
    """Types and ranges of every setting, whoever built the config (CLI, file, checkpoint, test, benchmark)."""
    for name in FIELD_NAMES:
        value = getattr(cfg, name)
        if name in ("hidden", "betas", *COLUMN_LISTS):
            if value is None and field_type(name)[1]:
                continue
            if not isinstance(value, tuple):
                raise UsageError(f"{flag(name)} {value!r} must be a tuple")
            parse = {"hidden": parse_int_list, "betas": lambda _n, v: parse_betas(v)}.get(name, parse_names)
            parse(name, value)
            continue
        kind, optional = field_type(name)
        if value is None and optional:
            continue
        ok = isinstance(value, (int, float) if kind is float else kind) and (kind is bool or not isinstance(value, bool))
        _check(ok, f"{flag(name)} {value!r} is not {EXPECTED[kind]}")
        if kind is float:
            _check(math.isfinite(value), f"{flag(name)} {value} must be a finite number")
        if kind is int and name != "seed":
            _check(-MAX_INT <= value <= MAX_INT, f"{flag(name)} {value} is out of range (at most {MAX_INT})")
    for name, choices in CHOICE_FIELDS.items():
        allowed = [c.value for c in choices]
        if getattr(cfg, name) not in allowed:
            raise UsageError(f"{flag(name)} {getattr(cfg, name)!r} is not one of: {', '.join(allowed)}")
    for name in ("data", "target", "val_data", "out", "resume", "mlflow"):  # given, a name or a path is never blank
        value = getattr(cfg, name)
        _check(value is None or value.strip() != "", f"{flag(name)} is empty; give a value or leave the flag out")
    _check(cfg.mlflow_experiment.strip() != "", "--mlflow-experiment is empty; give a name or leave the flag out")
    _check(cfg.lr > 0, f"--lr {cfg.lr} must be a finite number > 0, e.g. --lr 0.001")
    _check(0 <= cfg.seed <= MAX_SEED, f"--seed {cfg.seed} must be an integer from 0 to {MAX_SEED} (2**63 - 1)")
    _check(cfg.bagging in ("auto", "off") or (cfg.bagging.isascii() and cfg.bagging.isdigit() and 2 <= int(cfg.bagging) <= MAX_MEMBERS),
           f"--bagging {cfg.bagging!r} must be a member count from 2 to {MAX_MEMBERS}, off or auto")
    _check(cfg.numeric_bins is None or 0 <= cfg.numeric_bins <= MAX_BINS, f"--numeric-bins {cfg.numeric_bins} must be from 0 to {MAX_BINS}")
    _check(0.0 <= cfg.dropout < 1.0, f"--dropout {cfg.dropout} must be in [0, 1)")
    _check(cfg.label_smoothing is None or 0.0 <= cfg.label_smoothing < 1.0,
           f"--label-smoothing {cfg.label_smoothing} must be in [0, 1)")
    _check(cfg.val_fraction is None or 0.0 <= cfg.val_fraction < 1.0, f"--val-fraction {cfg.val_fraction} must be in [0, 1) (0 turns validation off)")
    _check(cfg.batch_size is None or cfg.batch_size >= 1, f"--batch-size {cfg.batch_size} must be at least 1")
    for name in ("epochs", "grad_accum", "log_every", "n_samples"):
        _check(getattr(cfg, name) is None or getattr(cfg, name) >= 1,
               f"{flag(name)} {getattr(cfg, name)} must be at least 1")
    _check(cfg.n_samples <= MAX_BUILTIN_ROWS, f"--n-samples {cfg.n_samples} must be at most {MAX_BUILTIN_ROWS:,} "
                                              "(built-in datasets are generated in memory)")
    for name in ("checkpoint_every", "keep_last", "early_stop", "warmup_steps"):
        _check(getattr(cfg, name) is None or getattr(cfg, name) >= 0, f"{flag(name)} {getattr(cfg, name)} must be 0 or more")
    _check(cfg.batch_size is None or cfg.batch_size % cfg.grad_accum == 0,
           f"--batch-size {cfg.batch_size} is not divisible by --grad-accum {cfg.grad_accum}; pick a multiple")
    # torch's DDP crashes (an internal assert) on no_sync() under static_graph, and once past that stops all-reducing:
    # pytorch/pytorch#143580, fix pending in #187732.
    _check(not (cfg.static_graph and cfg.grad_accum > 1),
           "--static-graph cannot be combined with --grad-accum (torch's DDP breaks on no_sync under static_graph, "
           "pytorch/pytorch#143580); drop one of them")
    _check(cfg.weight_decay is None or cfg.weight_decay >= 0, f"--weight-decay {cfg.weight_decay} must be >= 0")
    _check(0 <= cfg.momentum < 1, f"--momentum {cfg.momentum} must be in [0, 1)")
    _check(0 < cfg.lr_gamma <= 1, f"--lr-gamma {cfg.lr_gamma} must be in (0, 1] (the factor each step decay "
                                  "multiplies the learning rate by)")
    _check(cfg.clip_grad is None or cfg.clip_grad > 0, f"--clip-grad {cfg.clip_grad} must be > 0")
    _check(cfg.timeout is None or cfg.timeout > 0, f"--timeout {cfg.timeout} must be a finite number > 0 (seconds)")
    _check(cfg.bucket_cap_mb is None or cfg.bucket_cap_mb > 0, f"--bucket-cap-mb {cfg.bucket_cap_mb} must be > 0")
    _check(cfg.lr_step_size is None or cfg.lr_step_size >= 1, f"--lr-step-size {cfg.lr_step_size} must be >= 1")
    _check(cfg.n_features is None or 1 <= cfg.n_features <= MAX_WIDTH,
           f"--n-features {cfg.n_features} must be from 1 to {MAX_WIDTH}")
    _check(cfg.embedding_dim is None or 1 <= cfg.embedding_dim <= MAX_WIDTH,
           f"--embedding-dim {cfg.embedding_dim} must be from 1 to {MAX_WIDTH}")
    _check(cfg.n_classes is None or 2 <= cfg.n_classes <= MAX_WIDTH,
           f"--n-classes {cfg.n_classes} must be from 2 to {MAX_WIDTH}")
    _check(cfg.noise is None or cfg.noise >= 0, f"--noise {cfg.noise} must be a finite number >= 0")
    _check(not (cfg.backend == "nccl" and cfg.device == "cpu"),
           "--backend nccl needs GPUs; use --backend gloo with --device cpu")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


DEFAULT_BATCH = 64


def resolve_val_fraction(cfg: FitConfig, rows: int, from_file: bool) -> float:
    """As given, or 0.2 for a table of 1,000 rows or more and 0 below: a few hundred rows are too few both to give
    a fifth away and to pick a best epoch on (scikit-learn's models hold nothing out at this size either). A table
    file under BAG_BELOW_ROWS rows that is bagged (--bagging auto) holds nothing out either: its folds validate."""
    if cfg.val_fraction is not None:
        return cfg.val_fraction
    if from_file and cfg.bagging == "auto" and rows < BAG_BELOW_ROWS:
        return 0.0
    return DEFAULT_VAL_FRACTION if rows >= VALIDATE_FROM_ROWS else 0.0


def resolve_shuffle(cfg: FitConfig, train_bytes: int) -> FitConfig:
    """The config with its shuffle decided: as given, or block for training arrays over BLOCK_SHUFFLE_BYTES (the
    table's size alone decides, so a resume anywhere decides alike)."""
    if cfg.shuffle != "auto":
        return cfg
    return dataclasses.replace(cfg, shuffle="block" if train_bytes > BLOCK_SHUFFLE_BYTES else "exact")


def resolve_batch(cfg: FitConfig, train_rows: int) -> FitConfig:
    """The config with its global batch decided: as given, or 64 (a quarter of a small table's training rows,
    rounded down to a multiple of 8, at least 8: the same at world sizes 1, 2, 4 and 8)."""
    if cfg.batch_size is not None:
        return cfg
    return dataclasses.replace(cfg, batch_size=min(DEFAULT_BATCH, max(8, train_rows // 4 // 8 * 8)))


def resolve_epochs(cfg: FitConfig, train_rows: int) -> FitConfig:
    """The config with its epochs decided (after the batch): as given, or 20, or for a small table enough epochs
    for MIN_DEFAULT_STEPS optimizer steps. A 150-row table at a quarter of its rows a batch makes 4 steps an epoch:
    20 epochs were 80 steps, too few to train (the real-tables benchmark, RESULTS.md); the table's size alone
    decides, so a resume decides alike."""
    if cfg.epochs is not None:
        return cfg
    steps = max(1, train_rows // cfg.batch_size)
    return dataclasses.replace(cfg, epochs=max(DEFAULT_EPOCHS, math.ceil(MIN_DEFAULT_STEPS / steps)))


def weight_decay(cfg: FitConfig) -> float:
    """As given, or DEFAULT_ADAMW_DECAY for AdamW (decoupled: each step shrinks the weights by lr x decay, which
    regularises a long run and barely touches a short one) and 0 for the others (an L2 term in their gradient)."""
    if cfg.weight_decay is not None:
        return cfg.weight_decay
    return DEFAULT_ADAMW_DECAY if cfg.optimizer == "adamw" else 0.0


def label_smoothing(cfg: FitConfig, task: str) -> float:
    """As given, or DEFAULT_LABEL_SMOOTHING for classification (on the real-tables benchmark it was level or better
    on each of 13 classification tables; benchmarks/RESULTS.md); regression has no labels to smooth."""
    if cfg.label_smoothing is not None:
        return cfg.label_smoothing
    return DEFAULT_LABEL_SMOOTHING if task == "classification" else 0.0


def early_stop_patience(cfg: FitConfig, has_validation: bool) -> int:
    """As given, or DEFAULT_PATIENCE epochs with validation rows (0, never, without: a training loss that stops
    falling says nothing of overfitting)."""
    if cfg.early_stop is not None:
        return cfg.early_stop
    return DEFAULT_PATIENCE if has_validation else 0


def monitor_metric(cfg: FitConfig, has_validation: bool) -> str:
    """'auto' follows val_loss when there is validation data, else train_loss."""
    if cfg.monitor != "auto":
        return cfg.monitor
    return "val_loss" if has_validation else "train_loss"


LARGER_IS_BETTER = ("val_accuracy", "val_auc", "val_f1", "val_balanced_accuracy", "val_r2")


def monitor_mode(cfg: FitConfig) -> str:
    """'auto' means larger is better for accuracy and R^2, smaller for losses and errors."""
    if cfg.monitor_mode != "auto":
        return cfg.monitor_mode
    return "max" if cfg.monitor in LARGER_IS_BETTER else "min"


def to_toml(cfg: FitConfig) -> str:
    """The resolved config as a TOML [fit] table (unset optional values are left out)."""
    lines = ["[fit]"]
    for key, value in cfg.to_dict().items():
        if value is None:
            continue
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"
