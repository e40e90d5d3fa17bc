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
* Sparse outliers (CSR fp16 residuals) add ``sum_j x[col_j] * value_j`` into output
  ``row_j`` as a segment sum in standard ops (gather, scale, running sum, difference at the
  row bounds; see :func:`_add_outliers`); the result equals the runtime's
  ``x @ (W_hat + S)^T`` up to float32 rounding.

Siblings reading the same input (q/k/v, gate/up) with the same format are concatenated along N
into one node (:func:`fuse`): the packed layout is per output row, so concatenating rows of the
blobs is lossless, and one kernel launch replaces three.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mqc import quant
from mqc.export.graph import DOUBLE, FLOAT, INT64, MS_DOMAIN, GraphBuilder, to_numpy
from mqc.runtime.modules import QLinear

MATMUL_NBITS_BITS = (2, 4, 8)


@dataclass(frozen=True)
class Outliers:
    """COO form of a layer's CSR outliers: output row, input column, fp16 residual."""

    rows: torch.Tensor  # int64 [nnz]
    cols: torch.Tensor  # int64 [nnz]
    values: torch.Tensor  # fp16 [nnz]

    @classmethod
    def of(cls, sparse: quant.SparseOutliers) -> Outliers:
        counts = torch.diff(sparse.crow.long())
        rows = torch.repeat_interleave(torch.arange(sparse.shape[0]), counts)
        return cls(rows, sparse.col.long(), sparse.values)


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
    outliers: Outliers | None = None

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
            outliers=None if sparse is None else Outliers.of(sparse),
        )  # fmt: skip
    weight = module.weight.detach()
    return LinearParts(name, weight.shape[0], weight.shape[1], weight=weight, bias=bias)


def _cat_bias(parts: list[LinearParts]) -> torch.Tensor | None:
    if all(p.bias is None for p in parts):
        return None
    return torch.cat([torch.zeros(p.out_features) if p.bias is None else p.bias.float() for p in parts])


def _cat_outliers(parts: list[LinearParts]) -> Outliers | None:
    if all(p.outliers is None for p in parts):
        return None
    rows, cols, values, offset = [], [], [], 0
    for p in parts:
        if p.outliers is not None:
            rows.append(p.outliers.rows + offset)
            cols.append(p.outliers.cols)
            values.append(p.outliers.values)
        offset += p.out_features
    return Outliers(torch.cat(rows), torch.cat(cols), torch.cat(values))


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


def emit_linear(g: GraphBuilder, x: str, parts: LinearParts, accuracy_level: int, exact_sums: bool) -> str:
    """``y = x @ W^T + b (+ outliers)`` for ``x [..., K]``; returns the name of ``y [..., N]``.
    ``exact_sums``: outlier sums in float64 (see :func:`_add_outliers`)."""
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
            y = _add_outliers(g, x, y, parts.name, parts.outliers, parts.out_features, exact_sums)
    return y


def _add_outliers(
    g: GraphBuilder, x: str, y: str, name: str, outliers: Outliers, out_features: int, exact: bool
) -> str:
    """``y[b, s, r] += sum over row r's outliers j of x[b, s, col_j] * value_j``, as a segment
    sum: the products in row order ``[nnz, B, S]``, their running sum, and per row the running
    sum at the row's end minus at its start. Tokens go last so that every gather moves whole
    rows of tokens.

    Not a scatter-add: rows hold several outliers, and ``ScatterND`` with repeated indices
    races under onnxruntime's threads (measured on the default model at mq 4.2 bits: logits
    off by up to 0.5 on a 512-token window with 2 threads, a different amount each run).
    The running sum rounds relative to its size: in float32 the same window's logits moved by
    up to 0.044 (far below the int8 activation rounding of ``accuracy_level=4``), in float64
    (``exact``, used for ``accuracy_level=0``) by 2e-4 like the rest of the graph, at a cost:
    prefill 2.4 instead of 1.5 s, decode 62 instead of 69 tokens/s on that model.
    """
    order = torch.argsort(outliers.rows, stable=True)
    rows, cols, values = outliers.rows[order], outliers.cols[order], outliers.values[order]
    counts = torch.bincount(rows, minlength=out_features)
    ends = torch.cumsum(counts, 0)  # row r's outliers are products [ends[r] - counts[r], ends[r])
    cols = _index(g, f"{name}.outlier_cols", cols)
    values = g.float_weight(f"{name}.outlier_values", values[:, None, None])
    products = g.op("Mul", [g.op("Gather", [g.op("Transpose", [x], perm=[2, 0, 1]), cols], axis=0), values])
    running = g.op("CumSum", [g.op("Cast", [products], to=DOUBLE) if exact else products, g.const(0)])
    running = g.op("Pad", [running, g.const([1, 0, 0, 0, 0, 0])])  # a zero row first: index i = sum of the first i
    hi = g.op("Gather", [running, _index(g, f"{name}.outlier_row_ends", ends)], axis=0)
    lo = g.op("Gather", [running, _index(g, f"{name}.outlier_row_starts", ends - counts)], axis=0)
    sums = g.op("Sub", [hi, lo])  # [N, B, S]
    sums = g.op("Cast", [sums], to=FLOAT) if exact else sums
    return g.op("Add", [y, g.op("Transpose", [sums], perm=[1, 2, 0])])


def _index(g: GraphBuilder, name: str, index: torch.Tensor) -> str:
    """int64 indices stored in the narrowest unsigned type that holds them, widened by a Cast
    that onnxruntime folds at load: the file keeps about the artifact's bytes per outlier (an
    fp16 value and a 16-bit column, plus 16/32-bit row bounds) instead of int64s."""
    largest = int(index.max()) if index.numel() else 0
    narrow = next(t for t in (np.uint16, np.uint32) if largest <= np.iinfo(t).max)
    return g.op("Cast", [g.weight(name, index.numpy().astype(narrow))], to=INT64)
