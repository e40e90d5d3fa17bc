"""Where a compiled model will run, and what each mqc format occupies there.

A plan is priced in the bytes its target really stores, so that planned bytes are deployed
bytes (``--target``). mqc's own formats (2/3/4/8-bit group codes, fp16 scales, packed zeros,
CSR outliers) are stored as they are by the torch runtime and the CUDA kernels. onnxruntime's
``MatMulNBits`` has 2-, 4- and 8-bit kernels and no 3-bit one: a 3-bit layer is exported as the
same matrix in 4-bit codes (exact, see :mod:`mqc.export.linear`), so on the ``onnx`` target it
costs 4-bit bytes and a 4-bit grid of the same group size, which has less error, is never worse:
the mq allocator is not offered 3 bits there. llama.cpp (``gguf``) has its own types and is
planned over them (:mod:`mqc.quant_ggml`).
"""

from __future__ import annotations

from dataclasses import dataclass

from mqc.quant import FP16_BITS, QUANT_BITS


@dataclass(frozen=True)
class Target:
    name: str
    code_bits: tuple[int, ...]  # code widths stored as they are

    def stored_bits(self, bits: int) -> int:
        """The width a ``bits``-wide layer occupies on this target (the narrowest native one)."""
        if bits == FP16_BITS or bits in self.code_bits:
            return bits
        return min(b for b in self.code_bits if b > bits)

    def native(self, bits: int) -> bool:
        return self.stored_bits(bits) == bits


TARGETS = {
    "torch": Target("torch", QUANT_BITS),
    "cuda": Target("cuda", QUANT_BITS),
    "onnx": Target("onnx", (2, 4, 8)),
}
GGUF = "gguf"
NAMES = (*TARGETS, GGUF)
