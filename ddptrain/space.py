"""`tune`'s search space: fit settings and the ranges or choices a study draws them from, read from TOML and checked
against FitConfig once, before any trial runs. No torch, no optuna here.

    [space]
    lr = { low = 3e-4, high = 1e-2, log = true }      # a float setting: a range (log: drawn on a log scale)
    depth = { low = 1, high = 4 }                     # an integer setting: a range (step = 2 ...)
    width = { choices = [64, 128, 256, 512] }         # any setting: a list of values
    optimizer = { choices = ["adamw", "adam"] }

`width` and `depth` stand for `hidden` = depth layers of width units (or give `hidden` choices: ["256,128", ...]).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from ddptrain.config import FIELD_NAMES, MODEL, OPTIM, FitConfig, field_type, merge, read_table
from ddptrain.errors import UsageError

# a sensible study for this MLP when no --space is given: the rate, the shape, the regularisers, numeric pieces and
# embedding widths (RESULTS.md: the ranges around the defaults that the real-tables benchmark moved)
DEFAULT_SPACE = """
[space]
lr = { low = 3e-4, high = 1e-2, log = true }
width = { choices = [64, 128, 256, 512] }
depth = { low = 1, high = 4 }
dropout = { low = 0.0, high = 0.3 }
weight_decay = { low = 1e-4, high = 0.3, log = true }
numeric_bins = { choices = [0, 8, 16] }
embedding_dim = { choices = [4, 8, 16] }
"""
SHAPE = ("width", "depth")  # stand-ins for hidden
DEFAULT_WIDTH, DEFAULT_DEPTH = 128, 2
# settings of the data, the run folder, the machine or reproducibility are the study's, not a trial's to vary
NOT_TUNED = ("seed", "precision", "compile", "cuda_graphs", "deterministic", "nan_policy", "cache", "cache_dir")
TUNABLE = tuple(f.name for f in dataclasses.fields(FitConfig)
                if f.metadata["panel"] in (MODEL, OPTIM) and f.name not in NOT_TUNED) + ("early_stop",) + SHAPE
KEYS = {"low", "high", "log", "step", "choices"}


@dataclass(frozen=True)
class Dimension:
    """One setting of the space: a range of numbers (`low`..`high`, on a log scale or in steps) or choices."""

    name: str
    kind: str  # "float", "int" or "choice"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.name}: one of {', '.join(map(str, self.choices))}"
        scale = ", log scale" if self.log else f", step {self.step:g}" if self.step else ""
        return f"{self.name}: {self.low:g} to {self.high:g}{scale}"


def read_space(path: str | None) -> tuple[Dimension, ...]:
    """The [space] table of a TOML file (or its top-level keys), or DEFAULT_SPACE, checked."""
    table = read_table(path, "--space") if path else tomllib.loads(DEFAULT_SPACE)
    if isinstance(table.get("space"), dict):
        table = table["space"]
    return parse_space(table, f"--space {path}" if path else "the default space")


def parse_space(table: dict[str, Any], where: str) -> tuple[Dimension, ...]:
    if not table:
        raise UsageError(f"{where} is empty; give at least one setting to search, e.g. lr = {{ low = 1e-4, high = 1e-2, "
                         "log = true }")
    if "hidden" in table and any(k in table for k in SHAPE):
        raise UsageError(f"{where} has both hidden and width/depth; give one or the other")
    return tuple(dimension(key, spec, where) for key, spec in table.items())


def dimension(key: str, spec: Any, where: str) -> Dimension:
    name = key.replace("-", "_")
    if name not in TUNABLE:
        if name in FIELD_NAMES:
            raise UsageError(f"{where}: '{key}' is the study's, not a trial's, to set; put it in --config (the "
                             "settings every trial shares)")
        close = difflib.get_close_matches(name, TUNABLE, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; tunable settings: {', '.join(TUNABLE)}"
        raise UsageError(f"{where}: unknown setting '{key}'{hint}")
    if not isinstance(spec, dict) or not spec or set(spec) - KEYS:
        extra = sorted(set(spec) - KEYS) if isinstance(spec, dict) else []
        what = f"unknown key '{extra[0]}'" if extra else "not a table"
        raise UsageError(f"{where}: '{key}' is {what}; write {key} = {{ low = ..., high = ... }} or "
                         f"{key} = {{ choices = [...] }}")
    if "choices" in spec:
        choices = spec["choices"]
        if set(spec) != {"choices"} or not isinstance(choices, list) or not choices:
            raise UsageError(f"{where}: '{key}' choices must be a non-empty list, alone (no low/high)")
        values = tuple(",".join(map(str, c)) if isinstance(c, list) else c for c in choices)
        for value in values:
            check_value(name, value, where)
        return Dimension(name, "choice", choices=values)
    return number_range(name, key, spec, where)


def number_range(name: str, key: str, spec: dict[str, Any], where: str) -> Dimension:
    kind = "int" if name == "depth" or name == "width" else field_type(name)[0].__name__
    if kind not in ("int", "float"):
        raise UsageError(f"{where}: '{key}' is not a number; give it choices = [...]")
    low, high, log, step = spec.get("low"), spec.get("high"), spec.get("log", False), spec.get("step")
    numbers = (int,) if kind == "int" else (int, float)
    for label, value in (("low", low), ("high", high), ("step", step)):
        if (value is not None or label != "step") and (not isinstance(value, numbers) or isinstance(value, bool)
                                                       or not math.isfinite(value)):
            raise UsageError(f"{where}: '{key}' {label} must be {'an integer' if kind == 'int' else 'a number'}"
                             f"{'' if value is None else f', not {value!r}'}")
    if not isinstance(log, bool):
        raise UsageError(f"{where}: '{key}' log must be true or false")
    if not low < high:
        raise UsageError(f"{where}: '{key}' low {low} must be below high {high}")
    if log and (low <= 0 or step is not None):
        raise UsageError(f"{where}: '{key}' on a log scale needs low > 0 and no step")
    if step is not None and step <= 0:
        raise UsageError(f"{where}: '{key}' step must be > 0")
    for value in (low, high):
        check_value(name, value, where)
    return Dimension(name, kind, low=low, high=high, log=log, step=step)


def check_value(name: str, value: Any, where: str) -> None:
    """A value the setting's own checks accept (config.validate), or one line naming it."""
    if name in SHAPE:
        if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name == "width" else 0):
            raise UsageError(f"{where}: {name} {value!r} must be an integer of at least "
                             f"{1 if name == 'width' else 0}")
        return
    try:
        merge({name: value}, {})
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None


def settings_of(params: dict[str, Any]) -> dict[str, Any]:
    """A trial's drawn values as fit settings: width and depth become hidden."""
    settings = {k: v for k, v in params.items() if k not in SHAPE}
    if any(k in params for k in SHAPE):
        width, depth = params.get("width", DEFAULT_WIDTH), params.get("depth", DEFAULT_DEPTH)
        settings["hidden"] = ",".join([str(width)] * depth)
    return settings

