"""`ddptrain export`: a checkpoint -> a file that serves without ddptrain, the fitted preprocessing included.

- ONNX: one graph from the raw columns to the predictions. Inputs, one per feature column, named as the column,
  shape [rows, 1]: float32 for a numeric column (NaN: missing), string for a categorical one (the value as in the
  file; empty or an NA token: missing; a value unseen in training: the "unknown" level), int64 seconds since
  1970-01-01 UTC for a date column (-2**63, numpy's NaT: missing). Outputs: `probabilities` [rows, classes] and
  `label` [rows] (the class names) for classification, `value` [rows] in the target's units for regression.
  The numbers part (fills, standardization, date parts, embeddings, MLP, softmax) is a torch module exported by
  torch's exporter; strings become codes, and class indices names, through ONNX-ML's LabelEncoder.
- safetensors: the weights, with the model spec and the fitted preprocessing as JSON in the file's metadata.

The checkpoint is only read; the export is written atomically.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddptrain import atomic
from ddptrain.checkpoint import inference_model, load_checkpoint, saved_specs
from ddptrain.model import Ensemble
from ddptrain.console import console
from ddptrain.data import DataSpec
from ddptrain.errors import DDPTrainError, UsageError
from ddptrain.preprocess import FIRST_LEVEL, MISSING, UNKNOWN, ColumnPlan
from ddptrain.tables import NA_TOKENS

FORMATS = ("onnx", "safetensors")
OPSETS = range(18, 24)  # torch's exporter and onnxruntime both handle these
DEFAULT_OPSET = OPSETS.start  # what `export` writes unless --opset says otherwise
ML_OPSET = 3  # ai.onnx.ml: LabelEncoder with string keys and int64 values
NAT = -(2 ** 63)  # numpy's NaT as int64: a missing date
ONNX_LIMIT = 2 ** 31 - 2 ** 24  # protobuf's 2 GB, less room for the graph itself
INNER = "mlp/"  # prefix of the exported torch graph's names inside the served graph


SERVER = Path(__file__).with_name("serve_onnx.py")  # the standalone ONNX server that --server copies out


def export_checkpoint(path: Path, fmt: str, out: Path | None, opset: int, overwrite: bool,
                      server: Path | None = None) -> Path:
    """`path` as an ONNX graph or safetensors file at `out`; with `server`, a copy of the standalone onnxruntime
    server (serve_onnx.py: numpy, onnxruntime and the csv module) beside it."""
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if opset not in OPSETS:
        raise UsageError(f"--opset {opset} is not supported; pick {OPSETS.start} to {OPSETS.stop - 1}")
    if server is not None and fmt != "onnx":
        raise UsageError("--server writes an onnxruntime server: it goes with --format onnx")
    out = out if out is not None else path.with_suffix(f".{fmt}")
    atomic.check_new_file(out, overwrite, {"checkpoint": path})
    if server is not None:
        if server.resolve() == out.resolve():
            raise UsageError(f"--server {server} is the model's own --out; give the script another name")
        atomic.check_new_file(server, overwrite, {"checkpoint": path}, "--server")
    state = load_checkpoint(path)
    model, spec, _ = inference_model(state, torch.device("cpu"), path)
    payload = onnx_bytes(model, spec, opset) if fmt == "onnx" else safetensors_bytes(state, model)
    try:
        with atomic.replacing(out, "wb") as handle:
            handle.write(payload)
    except OSError as exc:
        raise DDPTrainError(f"could not write {out} ({exc.strerror}); free space or pick another path with --out") \
            from None
    console.line(f"exported {path} to {out} ({fmt}, {len(payload) / 1e6:.2f} MB)", force=True)
    if server is not None:
        try:
            with atomic.replacing(server, "w") as handle:
                handle.write(SERVER.read_text())
        except OSError as exc:
            raise DDPTrainError(f"could not write --server {server} ({exc.strerror}); pick another path") from None
        console.line(f"wrote the server to {server}: pip install onnxruntime numpy && python {server} {out} "
                     "rows.csv --out predictions.csv", force=True)
    return out


# -- safetensors -------------------------------------------------------------------------------------------------
def safetensors_bytes(state: dict[str, Any], model: nn.Module) -> bytes:
    """The model's weights by their state_dict names; metadata 'ddptrain' holds the model spec and data spec."""
    safetensors_torch = _require("safetensors.torch", "safetensors")
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()
               if not (isinstance(model, Ensemble) and name.startswith("best_"))}  # in place already: no copies
    meta = {"format": "ddptrain-export", "version": 1, **saved_specs(state), "layers": _layer_guide(model)}
    return safetensors_torch.save(tensors, metadata={"ddptrain": json.dumps(meta)})


def _layer_guide(model: nn.Module) -> list[str]:
    """What each numbered layer of the state_dict is, so another framework can rebuild the model."""
    if isinstance(model, Ensemble):  # members.<m>.<i>; the average of their outputs is the prediction
        return [f"members.{m}.{line}" for m, member in enumerate(model.members) for line in _layer_guide(member)]
    return [f"{i}: {type(layer).__name__}" for i, layer in enumerate(model)]


# -- ONNX --------------------------------------------------------------------------------------------------------
class ServingModule(nn.Module):
    """The fitted preprocessing and the MLP over one tensor per feature column (categorical: codes), as
    `Preprocessor.transform` then `predict` compute them: numbers in float64, the model in float32."""

    def __init__(self, model: nn.Module, spec: DataSpec) -> None:
        super().__init__()
        self.model, self.spec = model, spec
        self.plans = spec.preprocessor.columns
        for i, plan in enumerate(self.plans):
            if plan.role != "categorical":
                for stat in ("median", "mean", "std"):
                    self.register_buffer(f"{stat}{i}", torch.tensor([getattr(plan, stat)], dtype=torch.float64))
                infinite = [math.inf] * len(plan.mean)
                self.register_buffer(f"low{i}", torch.tensor([plan.low or [-v for v in infinite]], dtype=torch.float64))
                self.register_buffer(f"high{i}", torch.tensor([plan.high or infinite], dtype=torch.float64))
            if plan.codes:  # each level's value, for the lookup
                self.register_buffer(f"levels{i}", torch.tensor([[float(v) for v in plan.levels]], dtype=torch.float64))

    def forward(self, *columns: torch.Tensor) -> tuple[torch.Tensor, ...]:
        numbers, codes = [], []
        for i, (plan, column) in enumerate(zip(self.plans, columns)):
            if plan.role == "categorical":
                codes.append(column.double())
                continue
            values = date_parts(column) if plan.role == "datetime" else column.double()
            missing = torch.isnan(values[:, :1])
            filled = torch.where(torch.isnan(values), getattr(self, f"median{i}"), values)
            filled = torch.minimum(torch.maximum(filled, getattr(self, f"low{i}")), getattr(self, f"high{i}"))
            numbers.append((filled - getattr(self, f"mean{i}")) / getattr(self, f"std{i}"))
            if plan.indicator:
                numbers.append(missing.double())
            if plan.codes:
                codes.append(code_lookup(values, getattr(self, f"levels{i}")))
        out = self.model(torch.cat(numbers + codes, dim=1).float()).float()
        if self.spec.task == "classification":
            probabilities = torch.softmax(out, dim=1)
            return probabilities, torch.argmax(probabilities, dim=1)
        return ((out.squeeze(1).double() * self.spec.y_std + self.spec.y_mean).float(),)


def code_lookup(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """float64 [rows, 1] -> each value's code among `levels` [1, L] as Preprocessor.transform gives it (a known
    level FIRST_LEVEL + its index, a missing value MISSING, any other UNKNOWN), float64 [rows, 1]."""
    hit = (values == levels).double()  # [rows, L]: at most one 1 a row (levels are distinct)
    index = torch.arange(levels.shape[1], dtype=torch.float64, device=values.device)[None, :]
    known = hit.sum(dim=1, keepdim=True)
    code = torch.where(known > 0, (hit * index).sum(dim=1, keepdim=True) + FIRST_LEVEL,
                       torch.full_like(known, float(UNKNOWN)))
    return torch.where(torch.isnan(values), torch.full_like(code, float(MISSING)), code)


def date_parts(seconds: torch.Tensor) -> torch.Tensor:
    """int64 seconds since 1970-01-01 [rows, 1] -> float64 [rows, 6]: year, month, day, day of week (Monday 0),
    day of year, elapsed days; NaN where the input is NaT. Calendar arithmetic after Howard Hinnant's
    civil_from_days, in float64 with floor division (exact for any date a table holds)."""
    missing = seconds == NAT
    s = torch.where(missing, torch.zeros_like(seconds), seconds).double()

    def fdiv(a: torch.Tensor, b: float) -> torch.Tensor:
        return torch.floor(a / b)

    days = fdiv(s, 86400.0)
    z = days + 719468.0
    era = fdiv(z, 146097.0)
    doe = z - era * 146097.0
    yoe = fdiv(doe - fdiv(doe, 1460.0) + fdiv(doe, 36524.0) - fdiv(doe, 146096.0), 365.0)
    doy = doe - (365.0 * yoe + fdiv(yoe, 4.0) - fdiv(yoe, 100.0))
    mp = fdiv(5.0 * doy + 2.0, 153.0)
    day = doy - fdiv(153.0 * mp + 2.0, 5.0) + 1.0
    month = mp + torch.where(mp < 10.0, 3.0, -9.0)
    year = yoe + era * 400.0 + (month <= 2.0).double()
    before = year - 1.0  # January 1st of `year`, by days_from_civil
    era1 = fdiv(before, 400.0)
    yoe1 = before - era1 * 400.0
    jan1 = era1 * 146097.0 + yoe1 * 365.0 + fdiv(yoe1, 4.0) - fdiv(yoe1, 100.0) + 306.0 - 719468.0
    weekday = days + 3.0 - 7.0 * fdiv(days + 3.0, 7.0)
    parts = torch.cat([year, month, day, weekday, days - jan1 + 1.0, s / 86400.0], dim=1)
    return torch.where(missing, torch.full_like(parts, math.nan), parts)


def serving_inputs(spec: DataSpec, rows: int = 2) -> tuple[torch.Tensor, ...]:
    """Example tensors of the ServingModule's inputs, one per feature column."""
    kinds = {"categorical": torch.int64, "datetime": torch.int64, "numeric": torch.float32}
    return tuple(torch.zeros(rows, 1, dtype=kinds[p.role]) for p in spec.preprocessor.columns)


def category_keys(plan: ColumnPlan) -> tuple[list[str], list[int]]:
    """The strings a categorical input may hold and their codes: the levels (and the spellings the reader takes
    for them), and the missing-value tokens; anything else is UNKNOWN."""
    keys: dict[str, int] = {}
    for token in NA_TOKENS:
        keys[token] = MISSING
    for level, code in plan.level_codes().items():
        spellings = [level]
        if plan.kind == "bool":
            spellings += [level.capitalize(), level.upper()]
        elif plan.kind == "number" and level.lstrip("-").isdigit():
            spellings.append(f"{level}.0")
        for text in spellings:
            keys[text] = code  # a level spelled like an NA token (a Parquet string "NA") is a level
    return list(keys), list(keys.values())


def onnx_bytes(model: nn.Module, spec: DataSpec, opset: int) -> bytes:
    onnx = _require("onnx", "onnx")
    _require("onnxscript", "onnx")  # torch's exporter needs it
    from onnx import TensorProto, helper

    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if weight_bytes > ONNX_LIMIT:
        raise DDPTrainError(f"the model's weights take {weight_bytes / 1e9:.1f} GB, more than one ONNX file holds "
                            "(2 GB); export --format safetensors instead")
    columns = list(spec.feature_names)
    classification = spec.task == "classification"
    outputs = ["probabilities", "label"] if classification else ["value"]
    clash = sorted(set(columns) & set(outputs)) + [c for c in columns if c.startswith(INNER)]
    if clash:
        raise DDPTrainError(f"feature column {clash[0]!r} has the name of an ONNX output or of the graph's inner "
                            "names; rename the column, retrain, or export --format safetensors")
    inner = _torch_graph(ServingModule(model, spec).eval(), spec, opset, onnx)
    nodes, graph_inputs = [], []
    for i, (name, plan) in enumerate(zip(columns, spec.preprocessor.columns)):
        target = f"{INNER}in{i}"
        if plan.role == "categorical":
            keys, codes = category_keys(plan)
            graph_inputs.append(helper.make_tensor_value_info(name, TensorProto.STRING, ["rows", 1]))
            nodes.append(helper.make_node("LabelEncoder", [name], [target], name=f"{INNER}codes{i}",
                                          domain="ai.onnx.ml", keys_strings=keys, values_int64s=codes,
                                          default_int64=UNKNOWN))
        else:
            dtype = TensorProto.INT64 if plan.role == "datetime" else TensorProto.FLOAT
            graph_inputs.append(helper.make_tensor_value_info(name, dtype, ["rows", 1]))
            nodes.append(helper.make_node("Identity", [name], [target], name=f"{INNER}input{i}"))
    nodes += list(inner.graph.node)
    if classification:
        nodes.append(helper.make_node("Identity", [f"{INNER}out0"], ["probabilities"], name=f"{INNER}probabilities"))
        nodes.append(helper.make_node("LabelEncoder", [f"{INNER}out1"], ["label"], name=f"{INNER}label",
                                      domain="ai.onnx.ml", keys_int64s=list(range(len(spec.classes))),
                                      values_strings=list(spec.classes), default_string=""))
        graph_outputs = [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["rows", len(spec.classes)]),
                         helper.make_tensor_value_info("label", TensorProto.STRING, ["rows"])]
    else:
        nodes.append(helper.make_node("Identity", [f"{INNER}out0"], ["value"], name=f"{INNER}value"))
        graph_outputs = [helper.make_tensor_value_info("value", TensorProto.FLOAT, ["rows"])]
    graph = helper.make_graph(nodes, "ddptrain", graph_inputs, graph_outputs, initializer=list(inner.graph.initializer),
                              doc_string=f"ddptrain {spec.task} model for target {spec.target_name!r}")
    imports = {o.domain: o.version for o in inner.opset_import}
    imports["ai.onnx.ml"] = ML_OPSET
    served = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in imports.items()],
                               producer_name="ddptrain", functions=list(inner.functions))
    served.ir_version = inner.ir_version
    helper.set_model_props(served, {"ddptrain.target": spec.target_name, "ddptrain.task": spec.task,
                                    "ddptrain.classes": json.dumps(list(spec.classes)),
                                    "ddptrain.data_spec": json.dumps(spec.to_dict())})
    onnx.checker.check_model(served, full_check=True)
    return served.SerializeToString()


def _torch_graph(module: ServingModule, spec: DataSpec, opset: int, onnx: Any) -> Any:
    """The ServingModule through torch's exporter, every name under INNER, rows a dynamic dimension."""
    import logging
    import warnings

    example = serving_inputs(spec)
    n_out = 2 if spec.task == "classification" else 1
    rows = torch.export.Dim("rows", min=1)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # notes such as "torchvision is not installed"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, example, input_names=[f"in{i}" for i in range(len(example))],
            output_names=[f"out{i}" for i in range(n_out)], opset_version=opset, dynamo=True, verbose=False,
            dynamic_shapes=(tuple({0: rows} for _ in example),), external_data=False, report=False)
    return onnx.compose.add_prefix(program.model_proto, INNER)


def _require(module: str, fmt: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DDPTrainError(f"--format {fmt} needs the {module.split('.')[0]} package: pip install "
                            "'ddptrain[export]'") from None
