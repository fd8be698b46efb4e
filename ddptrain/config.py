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
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ddptrain.errors import UsageError

CHOICES: dict[str, tuple[str, ...]] = {
    "task": ("auto", "classification", "regression"),
    "activation": ("relu", "gelu", "silu", "tanh"),
    "norm": ("none", "layer", "batch"),
    "optimizer": ("sgd", "adam", "adamw", "rmsprop"),
    "scheduler": ("constant", "cosine", "linear", "step", "onecycle"),
    "loss": ("auto", "cross_entropy", "mse", "huber", "l1"),
    "backend": ("auto", "nccl", "gloo"),
    "device": ("auto", "cpu", "cuda"),
    "precision": ("fp32", "bf16", "fp16"),
    "comm_hook": ("none", "fp16", "bf16", "powersgd"),
    "monitor_mode": ("auto", "min", "max"),
    "nan_policy": ("stop", "skip"),
}

MONITORS = ("auto", "val_loss", "val_accuracy", "val_rmse", "val_mae", "val_r2", "train_loss")

# Settings that define the experiment: a resume that changes one of them is refused.
RESUME_FIXED = (
    "data", "target", "task", "val_fraction", "val_data", "n_samples", "n_features", "n_classes", "noise",
    "hidden", "activation", "dropout", "norm", "optimizer", "loss", "batch_size", "grad_accum", "seed",
    # the optimizer and scheduler states carry these, so a changed value would be silently ignored
    "lr", "momentum", "weight_decay", "betas", "scheduler", "warmup_steps", "lr_step_size", "lr_gamma", "precision",
)


@dataclass(frozen=True)
class FitConfig:
    # data
    data: str = "spirals"
    target: str | None = None
    task: str = "auto"
    val_fraction: float = 0.2
    val_data: str | None = None
    n_samples: int = 4000
    n_features: int | None = None
    n_classes: int | None = None
    noise: float | None = None
    # model
    hidden: tuple[int, ...] = (128, 128)
    activation: str = "relu"
    dropout: float = 0.0
    norm: str = "none"
    # optimization
    optimizer: str = "adam"
    lr: float = 3e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    scheduler: str = "constant"
    warmup_steps: int = 0
    lr_step_size: int | None = None
    lr_gamma: float = 0.1
    loss: str = "auto"
    seed: int = 0
    epochs: int = 20
    batch_size: int = 64
    grad_accum: int = 1
    clip_grad: float | None = None
    precision: str = "fp32"
    compile: bool = False
    nan_policy: str = "stop"
    deterministic: bool = False
    # distributed
    backend: str = "auto"
    device: str = "auto"
    timeout: float | None = None
    bucket_cap_mb: float | None = None  # None: torch's default (25 MB, and a 1 MB first bucket)
    static_graph: bool = False
    comm_hook: str = "none"
    # run folder, logging, checkpoints
    out: str | None = None
    resume: str | None = None
    log_every: int = 20
    checkpoint_every: int = 0
    keep_last: int = 0
    monitor: str = "auto"
    monitor_mode: str = "auto"
    early_stop: int = 0
    quiet: bool = False
    tensorboard: bool = False

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


FIELD_NAMES = tuple(f.name for f in fields(FitConfig))
FIELD_TYPES = {f.name: str(f.type) for f in fields(FitConfig)}  # annotations as text ("int", "float | None", ...)
MAX_INT = 2**63 - 1  # what torch and numpy take as an integer
MAX_SEED = MAX_INT
MAX_WIDTH = 1_000_000
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
    if kind is int and not is_bool and (isinstance(value, int) or not strict and _is_int_text(value)):
        return int(value)
    if kind is float and not is_bool and (isinstance(value, (int, float)) or not strict and _is_float_text(value)):
        return float(value)
    if kind is str and isinstance(value, str):
        return value
    raise UsageError(f"{where} is {value!r}, not {EXPECTED[kind]}")


def _is_int_text(value: Any) -> bool:
    try:
        int(str(value))
        return True
    except ValueError:
        return False


def _is_float_text(value: Any) -> bool:
    try:
        float(str(value))
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


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A TOML file (a [fit] table or top-level keys), or a run folder's config.json."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--config {path}: no such file; pass a .toml file or a run folder's config.json")
    try:
        if path.suffix == ".json":
            table = json.loads(path.read_text())
        else:
            table = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"--config {path}: cannot parse it ({exc}); fix the file's syntax") from None
    if not isinstance(table, dict):
        raise UsageError(f"--config {path}: the file holds a {type(table).__name__}, not a table of settings; "
                         "write key = value lines (TOML) or one JSON object")
    if isinstance(table.get("fit"), dict):
        table = table["fit"]
    table.pop("ddptrain_version", None)
    return table


def validate(cfg: FitConfig) -> None:
    """Types and ranges of every setting, whoever built the config (CLI, file, checkpoint, test, benchmark)."""
    for name in FIELD_NAMES:
        value = getattr(cfg, name)
        if name in ("hidden", "betas"):
            if not isinstance(value, tuple):
                raise UsageError(f"{flag(name)} {value!r} must be a tuple")
            (parse_int_list if name == "hidden" else lambda _n, v: parse_betas(v))(name, value)
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
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise UsageError(f"{flag(name)} {getattr(cfg, name)!r} is not one of: {', '.join(choices)}")
    _check(cfg.lr > 0, f"--lr {cfg.lr} must be a finite number > 0, e.g. --lr 0.001")
    _check(0 <= cfg.seed <= MAX_SEED, f"--seed {cfg.seed} must be an integer from 0 to {MAX_SEED} (2**63 - 1)")
    _check(0.0 <= cfg.dropout < 1.0, f"--dropout {cfg.dropout} must be in [0, 1)")
    _check(0.0 <= cfg.val_fraction < 1.0, f"--val-fraction {cfg.val_fraction} must be in [0, 1) (0 turns validation off)")
    for name in ("epochs", "batch_size", "grad_accum", "log_every", "n_samples"):
        _check(getattr(cfg, name) >= 1, f"{flag(name)} {getattr(cfg, name)} must be at least 1")
    _check(cfg.n_samples <= MAX_BUILTIN_ROWS, f"--n-samples {cfg.n_samples} must be at most {MAX_BUILTIN_ROWS:,} "
                                              "(built-in datasets are generated in memory)")
    for name in ("checkpoint_every", "keep_last", "early_stop", "warmup_steps"):
        _check(getattr(cfg, name) >= 0, f"{flag(name)} {getattr(cfg, name)} must be 0 or more")
    _check(cfg.batch_size % cfg.grad_accum == 0,
           f"--batch-size {cfg.batch_size} is not divisible by --grad-accum {cfg.grad_accum}; pick a multiple")
    # torch's DDP crashes (an internal assert) on no_sync() under static_graph, and once past that stops all-reducing:
    # pytorch/pytorch#143580, fix pending in #187732.
    _check(not (cfg.static_graph and cfg.grad_accum > 1),
           "--static-graph cannot be combined with --grad-accum (torch's DDP breaks on no_sync under static_graph, "
           "pytorch/pytorch#143580); drop one of them")
    _check(cfg.weight_decay >= 0, f"--weight-decay {cfg.weight_decay} must be >= 0")
    _check(0 <= cfg.momentum < 1, f"--momentum {cfg.momentum} must be in [0, 1)")
    _check(0 < cfg.lr_gamma <= 1, f"--lr-gamma {cfg.lr_gamma} must be in (0, 1] (the factor each step decay "
                                  "multiplies the learning rate by)")
    _check(cfg.clip_grad is None or cfg.clip_grad > 0, f"--clip-grad {cfg.clip_grad} must be > 0")
    _check(cfg.timeout is None or cfg.timeout > 0, f"--timeout {cfg.timeout} must be a finite number > 0 (seconds)")
    _check(cfg.bucket_cap_mb is None or cfg.bucket_cap_mb > 0, f"--bucket-cap-mb {cfg.bucket_cap_mb} must be > 0")
    _check(cfg.lr_step_size is None or cfg.lr_step_size >= 1, f"--lr-step-size {cfg.lr_step_size} must be >= 1")
    _check(cfg.n_features is None or 1 <= cfg.n_features <= MAX_WIDTH,
           f"--n-features {cfg.n_features} must be from 1 to {MAX_WIDTH}")
    _check(cfg.n_classes is None or 2 <= cfg.n_classes <= MAX_WIDTH,
           f"--n-classes {cfg.n_classes} must be from 2 to {MAX_WIDTH}")
    _check(cfg.noise is None or cfg.noise >= 0, f"--noise {cfg.noise} must be a finite number >= 0")
    _check(cfg.monitor in MONITORS, f"--monitor {cfg.monitor!r} is not one of: {', '.join(MONITORS)}")
    _check(not (cfg.backend == "nccl" and cfg.device == "cpu"),
           "--backend nccl needs GPUs; use --backend gloo with --device cpu")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


def monitor_metric(cfg: FitConfig, has_validation: bool) -> str:
    """'auto' follows val_loss when there is validation data, else train_loss."""
    if cfg.monitor != "auto":
        return cfg.monitor
    return "val_loss" if has_validation else "train_loss"


def monitor_mode(cfg: FitConfig) -> str:
    """'auto' means larger is better for accuracy and R^2, smaller for losses and errors."""
    if cfg.monitor_mode != "auto":
        return cfg.monitor_mode
    return "max" if cfg.monitor in ("val_accuracy", "val_r2") else "min"


def to_toml(cfg: FitConfig) -> str:
    """The resolved config as a TOML [fit] table (unset optional values are left out)."""
    lines = ["[fit]"]
    for key, value in cfg.to_dict().items():
        if value is None:
            continue
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"
