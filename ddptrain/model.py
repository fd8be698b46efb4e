"""The MLP, built from a plain spec (so a checkpoint can rebuild it without the training flags)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from ddptrain.config import Activation, Norm

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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        return cls(**{**d, "hidden": tuple(d["hidden"])})

    def check(self) -> None:
        """Raise ValueError if this spec (e.g. read from an edited checkpoint) cannot describe an MLP."""
        def positive_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 1

        if not all(positive_int(v) for v in (self.in_features, self.out_features, *self.hidden)):
            raise ValueError(f"widths {self.in_features}, {list(self.hidden)}, {self.out_features} must be positive "
                             "integers")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not one of {', '.join(a.value for a in ACTIVATIONS)}")
        if self.norm not in NORMS:
            raise ValueError(f"norm {self.norm!r} is not one of {', '.join(NORMS)}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout {self.dropout!r} is not in [0, 1)")


def build_model(spec: ModelSpec) -> nn.Sequential:
    """Linear -> [norm] -> activation -> [dropout] per hidden width, then a linear head.

    An empty `hidden` gives a linear model. Batch norm is swapped for SyncBatchNorm by the DDP wrapper.
    """
    layers: list[nn.Module] = []
    width = spec.in_features
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


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
