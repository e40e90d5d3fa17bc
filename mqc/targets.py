"""Where a compiled model will run, and what each mqc format occupies there.

A plan is priced in the bytes its target really stores, so that planned bytes are deployed
bytes (``--target``). mqc's own formats (2/3/4/8-bit group codes, fp16 scales, packed zeros,
CSR outliers) are stored as they are by the torch runtime and the CUDA kernels. onnxruntime's
``MatMulNBits`` has 2-, 4- and 8-bit kernels and no 3-bit one: a 3-bit layer is exported as the
same matrix in 4-bit codes (exact, see :mod:`mqc.export.linear`), so on the ``onnx`` target it
costs 4-bit bytes and a 4-bit grid of the same group size, which has less error, is never worse:
the mq allocator is not offered 3 bits there.

Sparse outliers are CSR on the torch and CUDA targets (row pointers, column indices, fp16
values). onnxruntime has no sparse product that is both fast and exact, so an ONNX export
stores them as ELL (per output row, the same number of column indices and fp16 values: one
``Gather`` of the activations, a ``Mul`` and a ``ReduceSum`` over each row's few products, see
:mod:`mqc.export.linear`). On the ``onnx`` target every row keeps the same count of outliers
(its highest-scoring weights), so the ELL arrays have no padding and no row pointers: priced
exactly.

Siblings that read one input (q/k/v, gate/up) run as one fused matmul on onnxruntime and on the
CUDA kernels, but only when their formats agree; otherwise each is its own launch, and a mixed
plan decodes slower than a uniform one of the same size. On those targets the allocator gives
siblings one choice (:meth:`mqc.planning.choices.ChoiceSet.groups`). llama.cpp (``gguf``) has its
own types and is planned over them (:mod:`mqc.quant_ggml`).
"""

from __future__ import annotations

from dataclasses import dataclass

from mqc import quant
from mqc.quant import FP16_BITS, QUANT_BITS


@dataclass(frozen=True)
class Target:
    name: str
    code_bits: tuple[int, ...]  # code widths stored as they are
    outliers_per_row: bool = False  # ELL: the same outlier count in every output row, no row pointers
    fuses_siblings: bool = False  # q/k/v, gate/up run as one matmul when their formats agree

    def stored_bits(self, bits: int) -> int:
        """The width a ``bits``-wide layer occupies on this target (the narrowest native one)."""
        if bits == FP16_BITS or bits in self.code_bits:
            return bits
        return min(b for b in self.code_bits if b > bits)

    def native(self, bits: int) -> bool:
        return self.stored_bits(bits) == bits

    def n_outliers(self, out_features: int, in_features: int, frac: float) -> int:
        """Outliers a layer keeps for a fraction of its weights (ELL: a whole count per row)."""
        if self.outliers_per_row:
            return out_features * int(in_features * frac)
        return quant.n_outliers_for(out_features, in_features, frac)

    def layer_bytes(
        self, out_features: int, in_features: int, bits: int, group_size: int, n_outliers: int, has_bias: bool
    ) -> int:
        """Every byte of a layer as this target stores it."""
        dense = quant.layer_bytes(out_features, in_features, self.stored_bits(bits), group_size, 0, has_bias)
        if not self.outliers_per_row:
            return dense + quant.outlier_bytes(out_features, in_features, n_outliers)
        return dense + quant.ell_outlier_bytes(out_features, in_features, n_outliers // max(out_features, 1))


TARGETS = {
    "torch": Target("torch", QUANT_BITS),
    "cuda": Target("cuda", QUANT_BITS, fuses_siblings=True),
    "onnx": Target("onnx", (2, 4, 8), outliers_per_row=True, fuses_siblings=True),
}
GGUF = "gguf"
NAMES = (*TARGETS, GGUF)
