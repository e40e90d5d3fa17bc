"""Sibling projections that read one input (q/k/v, gate/up) computed in one launch.

The packed layout of :mod:`mqc.quant` is row-separable: codes, scales, zeros and CSR outliers of
each output row are independent of every other row. Siblings with the same bit-width, group size
and input width, concatenated along the output dimension, are therefore one packed matrix, and a
single ``mqc::qlinear`` call (one fused GEMV launch on the GPU, one dequantize + matmul on the
CPU) computes all of them. That is :class:`FusedQLinear`.

The Hugging Face module still calls ``q_proj(x)``, ``k_proj(x)``, ``v_proj(x)`` one after the
other, so each sibling becomes a :class:`FusedSlice`, a view with no tensors of its own: the
first sibling to see an input runs the fused op and keeps the split outputs; the others take
theirs. The kept outputs are keyed on the input tensor itself (identity and version counter), so
a different input, an input changed in place, or a sibling asking twice always recomputes:
the result is exactly what the fused op gives for the input at hand, whatever the call order.

Stored bytes equal the siblings' bytes, except that fused CSR outliers keep one row-pointer
array (``4 * (len(siblings) - 1)`` bytes fewer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from mqc.runtime.modules import QLinear, register_runtime_module


@dataclass
class _Kept:
    """Outputs of the last fused call, until every sibling has taken its own."""

    x: torch.Tensor
    version: int | None
    outputs: tuple[torch.Tensor, ...]
    taken: set[int] = field(default_factory=set)


def _version(x: torch.Tensor) -> int | None:
    try:
        return x._version
    except RuntimeError:  # inference-mode tensors have no version counter
        return None


def fusion_key(module: QLinear) -> tuple:
    """Siblings fuse only when these agree (so the concatenation is one valid packed matrix
    with exactly the siblings' bytes)."""
    return (module.bits, module.group_size, module.in_features, module.bias is not None, module.n_outliers > 0,
            module.qweight.device, module.outlier_col.dtype if module.n_outliers else None)  # fmt: skip


@register_runtime_module
class FusedQLinear(QLinear):
    """Concatenated siblings: a :class:`QLinear` of ``sum(splits)`` rows that knows its splits."""

    kind: ClassVar[str] = "fused_qlinear"

    def __init__(
        self,
        splits: Sequence[int],
        in_features: int,
        bits: int,
        group_size: int,
        n_outliers: int = 0,
        has_bias: bool = False,
    ):
        super().__init__(sum(splits), in_features, bits, group_size, n_outliers, has_bias)
        self.splits = [int(s) for s in splits]
        self._kept: _Kept | None = None

    @classmethod
    def from_siblings(cls, siblings: Sequence[QLinear]) -> FusedQLinear:
        keys = {fusion_key(s) for s in siblings}
        if len(siblings) < 2 or len(keys) != 1:
            raise ValueError(f"cannot fuse {len(siblings)} layers with differing layouts {keys}")
        first = siblings[0]
        module = cls([s.out_features for s in siblings], first.in_features, first.bits, first.group_size,
                     sum(s.n_outliers for s in siblings), first.bias is not None)  # fmt: skip
        module.to(first.qweight.device)
        with torch.no_grad():
            for name in ("qweight", "scales", "qzeros", "bias", "outlier_col", "outlier_values"):
                if getattr(module, name) is not None:
                    getattr(module, name).copy_(torch.cat([getattr(s, name) for s in siblings]))
            if module.n_outliers:
                offsets = torch.cumsum(torch.tensor([0] + [s.n_outliers for s in siblings[:-1]]), 0)
                rows = [s.outlier_crow[1:] + int(o) for s, o in zip(siblings, offsets)]
                module.outlier_crow.copy_(torch.cat([first.outlier_crow[:1], *rows]))
        return module

    def config(self) -> dict[str, Any]:
        config = super().config()
        del config["out_features"]
        return {"splits": list(self.splits), **config}

    def sibling_output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Sibling ``index``'s output for input ``x``, from one fused call per input."""
        kept = self._kept
        if kept is None or kept.x is not x or kept.version != _version(x) or index in kept.taken:
            kept = _Kept(x, _version(x), tuple(self(x).split(self.splits, dim=-1)))
        kept.taken.add(index)
        self._kept = None if len(kept.taken) == len(self.splits) else kept
        return kept.outputs[index]

    def extra_repr(self) -> str:
        return f"splits={self.splits}, " + super().extra_repr()


@register_runtime_module
class FusedSlice(torch.nn.Module):
    """One sibling of a :class:`FusedQLinear`: reads its slice of the fused output.

    The fused module is referenced, not owned (it is registered once, on the siblings' parent),
    so its tensors are stored and counted once. ``tied_to`` is its qualified name; artifacts
    load modules with ``tied_to`` after the modules they refer to.
    """

    kind: ClassVar[str] = "fused_slice"

    def __init__(self, fused: FusedQLinear, tied_to: str, index: int):
        super().__init__()
        object.__setattr__(self, "fused", fused)  # not a submodule: owned by ``tied_to``
        self.tied_to, self.index = tied_to, index

    @property
    def in_features(self) -> int:
        return self.fused.in_features

    @property
    def out_features(self) -> int:
        return self.fused.splits[self.index]

    def config(self) -> dict[str, Any]:
        return {"tied_to": self.tied_to, "index": self.index}

    @classmethod
    def from_config(cls, config: dict[str, Any], model: torch.nn.Module) -> FusedSlice:
        return cls(model.get_submodule(config["tied_to"]), config["tied_to"], config["index"])

    def nbytes(self) -> int:
        return 0

    def to_qlinear(self) -> QLinear:
        """This sibling as a standalone :class:`QLinear` (a copy of its rows), for consumers that
        read one layer's tensors, such as the ONNX exporter."""
        fused = self.fused
        first = sum(fused.splits[: self.index])
        rows = slice(first, first + self.out_features)
        crow = fused.outlier_crow[rows.start : rows.stop + 1] if fused.n_outliers else None
        n_outliers = 0 if crow is None else int(crow[-1] - crow[0])
        module = QLinear(self.out_features, fused.in_features, fused.bits, fused.group_size, n_outliers,
                         fused.bias is not None).to(fused.qweight.device)  # fmt: skip
        with torch.no_grad():
            for name in ("qweight", "scales", "qzeros", "bias"):
                if getattr(module, name) is not None:
                    getattr(module, name).copy_(getattr(fused, name)[rows])
            if n_outliers:
                entries = slice(int(crow[0]), int(crow[-1]))
                module.outlier_crow.copy_(crow - crow[0])
                module.outlier_col.copy_(fused.outlier_col[entries])
                module.outlier_values.copy_(fused.outlier_values[entries])
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.sibling_output(x, self.index)

    def extra_repr(self) -> str:
        return f"{self.tied_to}[{self.index}], in={self.in_features}, out={self.out_features}"
