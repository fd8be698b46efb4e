"""The MLP, built from a plain spec (so a checkpoint can rebuild it without the training flags)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ddptrain.config import MAX_BINS, MAX_MEMBERS, Activation, Norm

ACTIVATIONS = {Activation.relu: nn.ReLU, Activation.gelu: nn.GELU, Activation.silu: nn.SiLU, Activation.tanh: nn.Tanh}
NORMS = tuple(norm.value for norm in Norm)


@dataclass(frozen=True)
class ModelSpec:
    in_features: int
    out_features: int
    hidden: tuple[int, ...]
    activation: str = "relu"
    dropout: float = 0.0
    norm: str = "none"
    embeddings: tuple[tuple[int, int], ...] = ()  # per categorical input: (levels, width)
    bins: int = 0  # piecewise-linear pieces per numeric input (0: the numbers alone)
    members: int = 1  # >1: an ensemble of this many MLPs (k-fold bagging), averaged at inference

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        d["embeddings"] = [list(e) for e in self.embeddings]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        return cls(**{**d, "hidden": tuple(d["hidden"]),
                      "embeddings": tuple(tuple(e) for e in d.get("embeddings", ()))})

    @classmethod
    def of(cls, cfg: Any, data_spec: Any, bins: int, members: int = 1) -> ModelSpec:
        """The MLP that `cfg` (a FitConfig) asks for over the inputs that `data_spec` (a DataSpec) prepares."""
        pre = data_spec.preprocessor
        return cls(pre.n_numeric, data_spec.n_outputs, cfg.hidden, cfg.activation, cfg.dropout, cfg.norm,
                   pre.embeddings, bins, members)

    def widths(self) -> str:
        """'first-hidden...-out', the first width after the numeric pieces and the embeddings join the inputs,
        with the pieces named: 'MLP 102-128-1 (16 pieces per number)'."""
        first = self.in_features * (1 + self.bins) + sum(w for _, w in self.embeddings)
        pieces = f" ({self.bins} pieces per number)" if self.bins and self.in_features else ""
        bagged = f" x {self.members} (bagged)" if self.members > 1 else ""
        return "-".join(str(w) for w in (first, *self.hidden, self.out_features)) + pieces + bagged

    def check(self) -> None:
        """Raise ValueError if this spec (e.g. read from an edited checkpoint) cannot describe an MLP."""
        def positive_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 1

        if not all(len(e) == 2 and positive_int(e[0]) and positive_int(e[1]) for e in self.embeddings):
            raise ValueError(f"embeddings {list(self.embeddings)} must be pairs of positive integers")
        if not (isinstance(self.in_features, int) and self.in_features >= (0 if self.embeddings else 1)):
            raise ValueError(f"in_features {self.in_features!r} is not a valid width")
        if not all(positive_int(v) for v in (self.out_features, *self.hidden)):
            raise ValueError(f"widths {self.in_features}, {list(self.hidden)}, {self.out_features} must be positive "
                             "integers")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not one of {', '.join(a.value for a in ACTIVATIONS)}")
        if not (isinstance(self.bins, int) and not isinstance(self.bins, bool) and 0 <= self.bins <= MAX_BINS):
            raise ValueError(f"bins {self.bins!r} is not an integer from 0 to {MAX_BINS}")
        if self.norm not in NORMS:
            raise ValueError(f"norm {self.norm!r} is not one of {', '.join(NORMS)}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout {self.dropout!r} is not in [0, 1)")
        if not (positive_int(self.members) and self.members <= MAX_MEMBERS):
            raise ValueError(f"members {self.members!r} is not an integer from 1 to {MAX_MEMBERS}")


class PiecewiseLinear(nn.Module):
    """Each numeric input x (the first `n_numeric` columns) is kept and joined by `bins` pieces: piece t is 0 below
    the training rows' t-th quantile, 1 above the next one, and linear between (Gorishniy et al., "On Embeddings for
    Numerical Features in Tabular Deep Learning", 2022). The next layer can then bend at each quantile, as a tree
    splits there; the edges are buffers (fitted once from the training rows, saved with the weights)."""

    def __init__(self, n_numeric: int, bins: int) -> None:
        super().__init__()
        self.n_numeric = n_numeric
        self.register_buffer("low", torch.zeros(n_numeric, bins))
        self.register_buffer("width", torch.ones(n_numeric, bins))

    @torch.no_grad()
    def fit(self, numbers: Any, max_rows: int = 100_000) -> None:
        """Edges from the quantiles of `numbers` (rows x n_numeric, array-like; evenly spaced rows when there are
        more than `max_rows`: the same edges on every rank and at every world size)."""
        import numpy as np

        rows = len(numbers)
        sample = np.asarray(numbers[np.linspace(0, rows - 1, max_rows).astype(np.int64)] if rows > max_rows
                            else numbers[:], dtype=np.float32)  # 100,000 x 64 columns: 26 MB
        edges = np.quantile(sample, np.linspace(0, 1, self.low.shape[1] + 1), axis=0).T.astype(np.float32)
        self.low.copy_(torch.from_numpy(edges[:, :-1]))
        # a piece of zero width (a value most rows share) becomes a step at that value
        self.width.copy_(torch.from_numpy(np.maximum(np.diff(edges, axis=1), 1e-6)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        numbers = x[:, :self.n_numeric]
        pieces = ((numbers.unsqueeze(-1) - self.low) / self.width).clamp(0, 1).flatten(1)
        return torch.cat([numbers, pieces, x[:, self.n_numeric:]], dim=1)


class CategoricalEmbedding(nn.Module):
    """The input's last columns are category codes (float, exact below 2**24): each goes through its own learned
    embedding; the result is the numeric columns followed by every embedding."""

    def __init__(self, n_numeric: int, embeddings: tuple[tuple[int, int], ...]) -> None:
        super().__init__()
        self.n_numeric = n_numeric
        self.tables = nn.ModuleList(nn.Embedding(levels, width) for levels, width in embeddings)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = x[:, self.n_numeric:].long()
        parts = [x[:, :self.n_numeric]] + [table(codes[:, i]) for i, table in enumerate(self.tables)]
        return torch.cat(parts, dim=1)


class Ensemble(nn.Module):
    """k MLPs of one spec (k-fold bagging, bagging.py). Training: every member's outputs, [rows, k, outputs], for
    each member's loss on its own rows. Inference: their average, inside the module so that eval, predict and the
    ONNX graph all see one model: class probabilities averaged (returned as their log, which softmax and argmax
    read as logits), regression outputs averaged.

    Each member's best epoch is kept as a flat buffer (`best_<i>`, in every checkpoint, so a resume is exact);
    `use_best` puts those weights in place, which inference_model does on loading."""

    def __init__(self, members: list[nn.Sequential], classification: bool) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.classification = classification
        for i, member in enumerate(members):
            self.register_buffer(f"best_{i}", nn.utils.parameters_to_vector(member.parameters()).detach().clone())

    def member_outputs(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(x) for member in self.members], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = self.member_outputs(x)
        if self.training:
            return outs
        if self.classification:
            return torch.logsumexp(torch.log_softmax(outs, dim=2), dim=1) - math.log(len(self.members))
        return outs.mean(dim=1)

    @torch.no_grad()
    def keep_best(self, improved: list[bool]) -> None:
        for i, (member, better) in enumerate(zip(self.members, improved)):
            if better:
                getattr(self, f"best_{i}").copy_(nn.utils.parameters_to_vector(member.parameters()))

    @torch.no_grad()
    def use_best(self) -> None:
        for i, member in enumerate(self.members):
            nn.utils.vector_to_parameters(getattr(self, f"best_{i}"), member.parameters())


def build_model(spec: ModelSpec) -> nn.Module:
    """One MLP (below), or `spec.members` of them as an Ensemble, each with its own initial weights."""
    if spec.members == 1:
        return build_mlp(spec)
    return Ensemble([build_mlp(spec) for _ in range(spec.members)], classification=spec.out_features > 1)


def build_mlp(spec: ModelSpec) -> nn.Sequential:
    """[numeric pieces] -> [categorical embeddings] -> Linear -> [norm] -> activation -> [dropout] per hidden width, then a linear head.

    An empty `hidden` gives a linear model. Batch norm is swapped for SyncBatchNorm by the DDP wrapper.
    """
    layers: list[nn.Module] = []
    width = spec.in_features
    if spec.bins and spec.in_features:
        layers.append(PiecewiseLinear(spec.in_features, spec.bins))
        width += spec.in_features * spec.bins
    if spec.embeddings:
        layers.append(CategoricalEmbedding(width, spec.embeddings))
        width += sum(w for _, w in spec.embeddings)
    for size in spec.hidden:
        layers.append(nn.Linear(width, size))
        if spec.norm == "layer":
            layers.append(nn.LayerNorm(size))
        elif spec.norm == "batch":
            layers.append(nn.BatchNorm1d(size))
        layers.append(ACTIVATIONS[spec.activation]())
        if spec.dropout > 0:
            layers.append(nn.Dropout(spec.dropout))
        width = size
    layers.append(nn.Linear(width, spec.out_features))
    return nn.Sequential(*layers)


def build_fitted_model(spec: ModelSpec, train_x: torch.Tensor) -> nn.Sequential:
    """`build_model`, with the numeric pieces' edges fitted on the training rows (a resume loads its saved edges
    over them)."""
    model = build_model(spec)
    mlps = list(model.members) if isinstance(model, Ensemble) else [model]
    if isinstance(mlps[0][0], PiecewiseLinear):
        mlps[0][0].fit(train_x.numpy()[:, :spec.in_features])
        for mlp in mlps[1:]:  # the same edges for every member
            mlp[0].load_state_dict(mlps[0][0].state_dict())
    return model


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
