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

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


FIELD_NAMES = tuple(f.name for f in fields(FitConfig))


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_int_list(name: str, value: Any) -> tuple[int, ...]:
    """`--hidden 256,256` (or a TOML list): positive integers; an empty string means no hidden layer."""
    if isinstance(value, (list, tuple)):
        items = [str(v) for v in value]
    else:
        text = str(value).strip()
        items = [] if text == "" else text.split(",")
    try:
        out = tuple(int(item.strip()) for item in items)
    except ValueError:
        out = ()
        items = ["bad"]
    if len(out) != len(items) or any(v < 1 for v in out):
        raise UsageError(f"{flag(name)} {value!r} is not a comma-separated list of positive integers; "
                         f"try {flag(name)} 256,256 (or '' for a linear model)")
    return out


def parse_betas(value: Any) -> tuple[float, float]:
    items = list(value) if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        betas = tuple(float(v) for v in items)
    except ValueError:
        betas = ()
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise UsageError(f"--betas {value!r} must be two numbers in [0, 1), e.g. --betas 0.9,0.999")
    return betas  # type: ignore[return-value]


def _coerce(name: str, value: Any) -> Any:
    """Bring a value from TOML/JSON/CLI to the field's type, with a one-line error if it cannot be."""
    if name == "hidden":
        return parse_int_list(name, value)
    if name == "betas":
        return parse_betas(value)
    default = getattr(FitConfig, name)
    kind = type(default) if default is not None else None
    optional_types = {"target": str, "val_data": str, "n_features": int, "n_classes": int, "noise": float,
                      "lr_step_size": int, "clip_grad": float, "bucket_cap_mb": float, "timeout": float, "out": str, "resume": str}
    kind = optional_types.get(name, kind)
    if value is None:
        return None
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise UsageError(f"{flag(name)} {value!r} is not a valid {kind.__name__}") from None


def merge(file_values: dict[str, Any], cli_values: dict[str, Any]) -> FitConfig:
    """Defaults < config file < command line. Keys may use '-' or '_'."""
    values: dict[str, Any] = {}
    for source in (file_values, cli_values):
        for raw_key, value in source.items():
            key = raw_key.replace("-", "_")
            if key not in FIELD_NAMES:
                close = difflib.get_close_matches(key, FIELD_NAMES, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(FIELD_NAMES)}"
                raise UsageError(f"unknown config key '{raw_key}'{hint}")
            values[key] = _coerce(key, value)
    return validate(FitConfig(**values))


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
    if isinstance(table.get("fit"), dict):
        table = table["fit"]
    table.pop("ddptrain_version", None)
    return table


def validate(cfg: FitConfig) -> FitConfig:
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise UsageError(f"{flag(name)} {getattr(cfg, name)!r} is not one of: {', '.join(choices)}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise UsageError(f"--lr {cfg.lr} must be a finite number > 0, e.g. --lr 0.001")
    _check(0.0 <= cfg.dropout < 1.0, f"--dropout {cfg.dropout} must be in [0, 1)")
    _check(0.0 <= cfg.val_fraction < 1.0, f"--val-fraction {cfg.val_fraction} must be in [0, 1) (0 turns validation off)")
    for name in ("epochs", "batch_size", "grad_accum", "log_every", "n_samples"):
        _check(getattr(cfg, name) >= 1, f"{flag(name)} {getattr(cfg, name)} must be at least 1")
    for name in ("checkpoint_every", "keep_last", "early_stop", "warmup_steps"):
        _check(getattr(cfg, name) >= 0, f"{flag(name)} {getattr(cfg, name)} must be 0 or more")
    _check(cfg.batch_size % cfg.grad_accum == 0,
           f"--batch-size {cfg.batch_size} is not divisible by --grad-accum {cfg.grad_accum}; pick a multiple")
    # torch's DDP crashes (an internal assert) on no_sync() under static_graph, and once past that stops all-reducing:
    # pytorch/pytorch#143580, fix pending in #187732.
    _check(not (cfg.static_graph and cfg.grad_accum > 1),
           "--static-graph cannot be combined with --grad-accum (torch's DDP breaks on no_sync under static_graph, "
           "pytorch/pytorch#143580); drop one of them")
    _check(cfg.weight_decay >= 0 and math.isfinite(cfg.weight_decay), f"--weight-decay {cfg.weight_decay} must be >= 0")
    _check(cfg.momentum >= 0 and math.isfinite(cfg.momentum), f"--momentum {cfg.momentum} must be >= 0")
    _check(cfg.clip_grad is None or cfg.clip_grad > 0, f"--clip-grad {cfg.clip_grad} must be > 0")
    _check(cfg.timeout is None or cfg.timeout > 0, f"--timeout {cfg.timeout} must be > 0 seconds")
    _check(cfg.bucket_cap_mb is None or cfg.bucket_cap_mb > 0, f"--bucket-cap-mb {cfg.bucket_cap_mb} must be > 0")
    _check(cfg.lr_step_size is None or cfg.lr_step_size >= 1, f"--lr-step-size {cfg.lr_step_size} must be >= 1")
    _check(cfg.n_features is None or cfg.n_features >= 1, f"--n-features {cfg.n_features} must be >= 1")
    _check(cfg.n_classes is None or cfg.n_classes >= 2, f"--n-classes {cfg.n_classes} must be >= 2")
    _check(cfg.noise is None or cfg.noise >= 0, f"--noise {cfg.noise} must be >= 0")
    _check(cfg.monitor in MONITORS, f"--monitor {cfg.monitor!r} is not one of: {', '.join(MONITORS)}")
    _check(not (cfg.backend == "nccl" and cfg.device == "cpu"),
           "--backend nccl needs GPUs; use --backend gloo with --device cpu")
    return cfg


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
