"""What a plan is made of: the weight tensors it may quantize (units), the format chosen for each
(a :class:`LayerPlan` with its exact bytes), and the names of the choices.

A leaf module: the analysis, the allocator, the search, the lowering and the exports all read
these types, and this module reads only the numerics and the targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mqc import quant, quant_ggml
from mqc.targets import GGUF, TARGETS

Choice = tuple[int, int | None] | str  # (bits, group size; None for 16-bit) or a llama.cpp type name


@dataclass(frozen=True)
class WeightUnit:
    """One stored weight tensor a plan may quantize: usually one linear, but a tied embedding and
    ``lm_head`` are one unit (one tensor, stored and counted once)."""

    qualname: str  # the module whose weight is quantized (lm_head for a tied pair)
    out_features: int
    in_features: int
    has_bias: bool
    transposed: bool = False  # GPT-2 Conv1D stores [in, out]
    embedding: str | None = None  # embedding module reading this tensor (tied) or being it
    layer: int | None = None  # decoder layer holding it; None for the embedding and the head

    @property
    def n_weights(self) -> int:
        return self.out_features * self.in_features

    @property
    def tensor_name(self) -> str:
        return f"{self.qualname}.weight"

    def oriented(self, weight: torch.Tensor) -> torch.Tensor:
        """A stored weight as ``[out, in]`` (GPT-2's Conv1D is transposed), float32."""
        return (weight.t() if self.transposed else weight).float()

    def stored(self, weight: torch.Tensor) -> torch.Tensor:
        """An ``[out, in]`` matrix in the orientation the module stores it."""
        return weight.t() if self.transposed else weight


@dataclass(frozen=True)
class LayerPlan:
    """What the plan decided for one unit, and the exact bytes that costs.

    ``fmt`` names a llama.cpp type (:mod:`mqc.quant_ggml`) when the plan targets GGUF; ``bits``
    and ``group_size`` are then its code width and block (16 and 0 for F16), and the bias is
    priced as GGUF stores it, in F32. Otherwise the layer is priced as its ``target`` stores it
    (:mod:`mqc.targets`: 3-bit codes are 4-bit codes in ONNX, outliers ELL there).
    """

    qualname: str
    bits: int
    group_size: int
    n_outliers: int
    out_features: int
    in_features: int
    has_bias: bool
    fmt: str | None = None
    target: str = "torch"

    @property
    def nbytes(self) -> int:
        if self.fmt is not None:
            bias = 4 * self.out_features if self.has_bias else 0
            return quant_ggml.tensor_bytes(self.fmt, self.out_features, self.in_features) + bias
        return TARGETS[self.target].layer_bytes(
            self.out_features, self.in_features, self.bits, self.group_size, self.n_outliers, self.has_bias
        )

    @property
    def n_weights(self) -> int:
        return self.out_features * self.in_features

    @property
    def outliers_per_row(self) -> bool:
        """Whether the outliers are chosen per output row (an equal count in each: ELL)."""
        return self.fmt is None and TARGETS[self.target].outliers_per_row


def choice_bits(choice: Choice) -> int:
    if isinstance(choice, str):
        return quant.FP16_BITS if choice == quant_ggml.F16 else quant_ggml.TYPES[choice].bits
    return choice[0]


def choice_label(choice: Choice) -> str:
    if isinstance(choice, str):
        return choice
    bits, group = choice
    return str(bits) if group is None else f"{bits}/g{group}"


def parse_label(label: str) -> Choice:
    """Inverse of :func:`choice_label` (the analysis stores choices by label)."""
    if label in quant_ggml.TYPES or label == quant_ggml.F16:
        return label
    bits, _, group = label.partition("/g")
    return (int(bits), int(group) if group else None)


def choice_of(entry: LayerPlan) -> Choice:
    if entry.fmt is not None:
        return entry.fmt
    return (entry.bits, None) if entry.bits == quant.FP16_BITS else (entry.bits, entry.group_size)


def plan_entry(unit: WeightUnit, bits: int, group_size: int, outlier_frac: float, target: str = "torch") -> LayerPlan:
    """``unit`` at ``bits`` / ``group_size``, priced as ``target`` stores it."""
    n_out = (
        0 if bits == quant.FP16_BITS else TARGETS[target].n_outliers(unit.out_features, unit.in_features, outlier_frac)
    )
    return LayerPlan(
        unit.qualname, bits, group_size, n_out, unit.out_features, unit.in_features, unit.has_bias, target=target
    )


def gguf_entry(unit: WeightUnit, fmt: str) -> LayerPlan:
    block = 0 if fmt == quant_ggml.F16 else quant_ggml.TYPES[fmt].block
    u = unit
    return LayerPlan(u.qualname, choice_bits(fmt), block, 0, u.out_features, u.in_features, u.has_bias, fmt, GGUF)


def plan_bytes(plan: dict[str, LayerPlan]) -> int:
    return sum(p.nbytes for p in plan.values())


def plan_average_bits(plan: dict[str, LayerPlan]) -> float:
    return quant.average_bits(plan_bytes(plan), sum(p.n_weights for p in plan.values()))
