"""Linear layers as ONNX: packed weights to ``MatMulNBits``, float ones to ``MatMul``, outliers
as a gather / scale / segment sum.

* 2/4/8-bit :class:`~mqc.runtime.modules.QLinear` blobs are ``MatMulNBits``' inputs byte for
  byte (``B [N, n_blocks, g*b/8]``, zero points packed the same way; see :mod:`mqc.quant`). The
  fp16 scales become float32 scales, which is exact.
* 3 bits have no ``MatMulNBits`` kernel. Every 3-bit code is also a 4-bit code and the scale and
  zero point stay the same, so the layer is re-encoded as 4-bit with :func:`mqc.quant.pack`:
  the result is *exactly* the same matrix, stored in 4/3 the bytes for its codes.
* Float layers (16-bit layers of a plan, or an uncompiled model) are ``MatMul`` against the
  stored ``[N, K]`` weight through a ``Transpose`` that onnxruntime folds at load, so a tied
  embedding can ``Gather`` the very same initializer.
* Sparse outliers (fp16 residuals) are stored as ELL (:class:`Ell`: per output row the same
  number of column indices and values; rows with fewer are padded with zeros, which a plan for
  the ``onnx`` target never needs, see :mod:`mqc.targets`) and added as ``Gather`` of the
  activations, ``Mul``, ``ReduceSum`` over each row's products (:func:`_add_outliers`): every
  output sums its own few products, so the result equals the runtime's ``x @ (W_hat + S)^T``
  up to float32 rounding whatever the number of outliers.

Siblings reading the same input (q/k/v, gate/up) with the same format are concatenated along N
into one node (:func:`fuse`): the packed layout is per output row, so concatenating rows of the
blobs is lossless, and one kernel launch replaces three.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mqc import quant
from mqc.export.graph import INT64, MS_DOMAIN, GraphBuilder, to_numpy
from mqc.runtime.modules import QLinear

MATMUL_NBITS_BITS = (2, 4, 8)


@dataclass(frozen=True)
class Ell:
    """Outliers as ELL: ``cols [N, P]`` (int64) and fp16 ``values [N, P]``, padded with (0, 0)."""

    cols: torch.Tensor
    values: torch.Tensor

    @classmethod
    def of(cls, sparse: quant.SparseOutliers) -> Ell:
        counts = torch.diff(sparse.crow.long())
        width = max(int(counts.max()), 1)
        rows = torch.repeat_interleave(torch.arange(sparse.shape[0]), counts)
        slot = torch.arange(rows.numel()) - torch.repeat_interleave(sparse.crow[:-1].long(), counts)
        cols = torch.zeros(sparse.shape[0], width, dtype=torch.int64)
        values = torch.zeros(sparse.shape[0], width, dtype=torch.float16)
        cols[rows, slot] = sparse.col.long()
        values[rows, slot] = sparse.values
        return cls(cols, values)

    @classmethod
    def empty(cls, rows: int) -> Ell:
        return cls(torch.zeros(rows, 0, dtype=torch.int64), torch.zeros(rows, 0, dtype=torch.float16))

    def to_dense(self, in_features: int) -> torch.Tensor:
        dense = torch.zeros(self.cols.shape[0], in_features)
        return dense.scatter_add_(1, self.cols, self.values.float())


def ell_inputs(g: GraphBuilder, name: str, ell: Ell) -> tuple[str, str]:
    """(int64 columns, float32 values) of a layer's ELL outliers, stored as uint16 (or uint32)
    columns and fp16 values, each widened by a Cast that onnxruntime folds at load: the file holds
    the bytes the onnx target prices (:func:`mqc.quant.ell_outlier_bytes`). An embedding reads the
    same initializers as its tied ``lm_head``."""
    return _index(g, f"{name}.outlier_cols", ell.cols), g.float_weight(f"{name}.outlier_values", ell.values)


@dataclass(frozen=True)
class LinearParts:
    """A linear layer (or fused siblings) in the form the graph stores it: exactly one of
    ``packed`` (2/4/8 bits) and ``weight`` (float ``[N, K]``), plus optional bias and outliers."""

    name: str
    out_features: int
    in_features: int
    packed: quant.QuantizedWeight | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    outliers: Ell | None = None

    @property
    def fuse_key(self) -> tuple:
        """Parts with equal keys can be concatenated along N."""
        if self.packed is None:
            return ("float", self.in_features)
        return ("nbits", self.packed.bits, self.packed.group_size, self.in_features)


def as_matmul_nbits(qw: quant.QuantizedWeight) -> quant.QuantizedWeight:
    """``qw`` itself for 2/4/8 bits; a 3-bit weight re-encoded losslessly as 4-bit."""
    if qw.bits in MATMUL_NBITS_BITS:
        return qw
    codes = quant.unpack(qw.qweight, qw.bits, qw.group_size)
    zeros = quant.unpack(qw.qzeros, qw.bits, qw.n_blocks)
    return quant.QuantizedWeight(
        quant.pack(codes, 4), qw.scales, quant.pack(zeros, 4), 4, qw.group_size, qw.in_features
    )


def linear_parts(name: str, module: torch.nn.Module) -> LinearParts:
    """The parts of a ``QLinear`` or of any module with a float ``weight [N, K]`` (``nn.Linear``,
    the exact branch of a low-rank K/V projection)."""
    bias = getattr(module, "bias", None)
    bias = None if bias is None else bias.detach()
    if isinstance(module, QLinear):
        sparse = module.outliers()
        return LinearParts(
            name, module.out_features, module.in_features,
            packed=as_matmul_nbits(module.quantized_weight()),
            bias=bias,
            outliers=None if sparse is None else Ell.of(sparse),
        )  # fmt: skip
    weight = module.weight.detach()
    return LinearParts(name, weight.shape[0], weight.shape[1], weight=weight, bias=bias)


def _cat_bias(parts: list[LinearParts]) -> torch.Tensor | None:
    if all(p.bias is None for p in parts):
        return None
    return torch.cat([torch.zeros(p.out_features) if p.bias is None else p.bias.float() for p in parts])


def _cat_outliers(parts: list[LinearParts]) -> Ell | None:
    """Siblings' ELL rows stacked, padded to the widest (equal widths on the onnx target)."""
    if all(p.outliers is None for p in parts):
        return None
    ells = [p.outliers or Ell.empty(p.out_features) for p in parts]
    width = max(e.cols.shape[1] for e in ells)
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
    return Ell(torch.cat([pad(e.cols) for e in ells]), torch.cat([pad(e.values) for e in ells]))


def fuse(name: str, parts: list[LinearParts]) -> LinearParts | None:
    """Siblings concatenated along N into one layer, or None if their formats differ."""
    if len({p.fuse_key for p in parts}) != 1:
        return None
    first = parts[0]
    packed = weight = None
    if first.packed is not None:
        qws = [p.packed for p in parts]
        packed = quant.QuantizedWeight(
            torch.cat([q.qweight for q in qws]), torch.cat([q.scales for q in qws]), torch.cat([q.qzeros for q in qws]),
            first.packed.bits, first.packed.group_size, first.in_features,
        )  # fmt: skip
    else:
        weight = torch.cat([p.weight for p in parts])
    out_features = sum(p.out_features for p in parts)
    return LinearParts(name, out_features, first.in_features, packed, weight, _cat_bias(parts), _cat_outliers(parts))


def packed_inputs(g: GraphBuilder, name: str, qw: quant.QuantizedWeight) -> tuple[str, str, str]:
    """Inputs (B, scales, zero_points) of a packed weight, shared by MatMulNBits and
    GatherBlockQuantized. The scales must have the graph's io type (float32); they are stored as
    mqc's fp16 scales with a Cast that onnxruntime folds at load, so the file holds the bytes
    mqc accounts for and the computation uses the same values."""
    return (
        g.weight(f"{name}.qweight", to_numpy(qw.qweight)),
        g.float_weight(f"{name}.scales", qw.scales),
        g.weight(f"{name}.qzeros", to_numpy(qw.qzeros)),
    )


def emit_linear(g: GraphBuilder, x: str, parts: LinearParts, accuracy_level: int) -> str:
    """``y = x @ W^T + b (+ outliers)`` for ``x [..., K]``; returns the name of ``y [..., N]``."""
    with g.scope(parts.name):
        bias = None if parts.bias is None else g.float_weight(f"{parts.name}.bias", parts.bias)
        if parts.packed is not None:
            qw = parts.packed
            inputs = [x, *packed_inputs(g, parts.name, qw)]
            if bias is not None:
                inputs += ["", bias]  # g_idx unused
            y = g.op(
                "MatMulNBits", inputs, domain=MS_DOMAIN,
                K=qw.in_features, N=qw.out_features, bits=qw.bits, block_size=qw.group_size,
                accuracy_level=accuracy_level,
            )  # fmt: skip
        else:
            w_t = g.op("Transpose", [g.float_weight(f"{parts.name}.weight", parts.weight)], perm=[1, 0])
            y = g.op("MatMul", [x, w_t])
            if bias is not None:
                y = g.op("Add", [y, bias])
        if parts.outliers is not None:
            y = _add_outliers(g, x, y, parts.name, parts.outliers)
    return y


def _add_outliers(g: GraphBuilder, x: str, y: str, name: str, ell: Ell) -> str:
    """``y[..., r] += sum_p x[..., cols[r, p]] * values[r, p]``: one ``Gather`` of the activations
    ``[..., N, P]``, a ``Mul`` and a ``ReduceSum`` over ``P``. Each output adds only its own row's
    products, so the rounding is that of a ``P``-term float32 sum. (The earlier form, a running
    sum over all outliers of the layer differenced at row bounds, rounded relative to the running
    total: logits moved by up to 0.044 on the default model. A scatter-add races under
    onnxruntime's threads when rows repeat.)"""
    cols, values = ell_inputs(g, name, ell)
    products = g.op("Mul", [g.op("Gather", [x, cols], axis=-1), values])
    return g.op("Add", [y, g.op("ReduceSum", [products, g.const([-1])], keepdims=0)])


def _index(g: GraphBuilder, name: str, index: torch.Tensor) -> str:
    """int64 indices stored in the narrowest unsigned type that holds them, widened by a Cast
    that onnxruntime folds at load."""
    largest = int(index.max()) if index.numel() else 0
    narrow = next(t for t in (np.uint16, np.uint32) if largest <= np.iinfo(t).max)
    return g.op("Cast", [g.weight(name, index.numpy().astype(narrow))], to=INT64)
