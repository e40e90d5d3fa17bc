"""The CPU deployment form of a loaded model: weights stay compressed in memory.

The torch runtime's reference CPU path (:meth:`QLinear.forward` without a kernel) multiplies by a
memoised dense float32 copy of every quantized weight: exact, fast for evaluation, and larger
in memory than the float model. :func:`deploy_on_cpu` turns a loaded model into what
``mqc generate`` and ``mqc bench decode`` run instead:

* every 2/3/4-bit layer becomes torch's packed int4 CPU layout
  (``aten._weight_int4pack_mm_for_cpu``, which computes ``(c - 8) s + m`` per group). Any
  asymmetric grid of at most 4 bits is such a grid with the same scale: codes ``q``, integer
  zero ``z``, ``s (q - z) = (c - 8) s`` for ``c = q + 8 - z`` (within [0, 15] up to 3 bits; at 4
  bits the shift is clamped and a float ``m`` takes the rest). The matrix is the artifact's with
  bfloat16 scales, and the activations are rounded to bfloat16 (about 3 significant digits: the
  tradeoff of onnxruntime's int8 accuracy_level 4, milder). Inputs whose width is not a whole
  number of groups are zero-padded.
* 8-bit layers, shapes the int4 kernel refuses (rows not a multiple of 16), 16-bit layers and a
  float embedding/``lm_head`` are held in float16 (the artifact stores them so, or holds an
  8-bit code that float16 represents to 11 bits) and multiplied in float16.
* sparse outliers are a float32 CSR product added to the result.

The packed buffers a layer no longer needs are released (an embedding table keeps its own, for
row lookups), so the process holds about one compressed copy of the model. A deployed model is
for inference: it cannot be saved or exported again (load the artifact for that).
"""

from __future__ import annotations

import contextlib
import ctypes
from dataclasses import dataclass

import torch

from mqc import quant
from mqc.runtime.modules import QEmbedding, QLinear

INT4_GROUPS = (32, 64, 128, 256)  # group sizes the int4 CPU kernel takes
INT4_ROWS = 16  # it needs a multiple of 16 output rows
INNER_K_TILES = 2
CONVERT_ROWS = 512  # rows converted at a time (bounds the temporaries of an lm_head)


@dataclass
class Int4Kernel:
    """``y = x W^T`` with ``W`` in torch's packed int4 CPU layout and bfloat16 scales/zeros."""

    weight: torch.Tensor  # uint8, the layout of aten._convert_weight_to_int4pack_for_cpu
    scales_and_zeros: torch.Tensor  # bfloat16 [n_blocks, N, 2]
    group_size: int
    in_features: int
    padded: int  # in_features rounded up to whole groups

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        if self.padded > self.in_features:
            rows = torch.nn.functional.pad(rows, (0, self.padded - self.in_features))
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.weight, self.group_size, self.scales_and_zeros)
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size() + self.scales_and_zeros.numel() * 2


@dataclass
class HalfKernel:
    """``y = x W^T`` with ``W`` and the activations in float16."""

    weight: torch.Tensor  # float16 [N, K]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.to(torch.float16), self.weight).to(x.dtype)

    def nbytes(self) -> int:
        return self.weight.numel() * 2


@dataclass
class CpuLinear:
    """A deployed QLinear's computation: its kernel, then outliers and bias in float32."""

    kernel: Int4Kernel | HalfKernel
    outliers: torch.Tensor | None  # float32 sparse CSR [N, K]
    bias: torch.Tensor | None  # float32 [N]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.kernel(x)
        if self.outliers is not None:
            rows = x.reshape(-1, x.shape[-1]).to(torch.float32)
            y = y + (self.outliers @ rows.T).T.reshape(y.shape).to(y.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def nbytes(self) -> int:
        sparse = (
            0
            if self.outliers is None
            else sum(
                t.numel() * t.element_size()
                for t in (self.outliers.crow_indices(), self.outliers.col_indices(), self.outliers.values())
            )
        )
        return self.kernel.nbytes() + sparse + (0 if self.bias is None else self.bias.numel() * 4)


def int4_kernel(module: QLinear) -> Int4Kernel | None:
    """The int4 CPU form of ``module``, or None where the kernel does not apply. Converted a slice
    of rows at a time (the layout is row-separable), so an ``lm_head`` needs no full-size int32
    temporaries."""
    bits, group, rows = module.bits, module.group_size, module.out_features
    if bits > 4 or group not in INT4_GROUPS or rows % INT4_ROWS:
        return None
    blocks = quant.n_blocks(module.in_features, group)
    packed, scales_and_zeros = [], []
    for start in range(0, rows, CONVERT_ROWS):
        part = slice(start, min(start + CONVERT_ROWS, rows))
        codes = quant.unpack(module.qweight[part], bits, group).reshape(-1, blocks, group).to(torch.int32)
        zeros = quant.unpack(module.qzeros[part], bits, blocks).to(torch.int32)
        shift = _code_shift(codes, zeros)
        codes = (codes + shift[..., None]).reshape(-1, blocks * group)
        packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, INNER_K_TILES))
        scales = module.scales[part].float()
        scales_and_zeros.append(torch.stack([scales, scales * (8 - zeros - shift)], -1).to(torch.bfloat16))
    table = torch.cat(scales_and_zeros).transpose(0, 1).contiguous()  # [n_blocks, N, 2]
    return Int4Kernel(torch.cat(packed), table, group, module.in_features, blocks * group)


def _code_shift(codes: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Per group, the integer ``k`` added to the codes so that the kernel's ``(q + k - 8) s + m``
    needs the smallest float zero ``m = s (8 - z - k)``: ``k = 8 - z`` (``m = 0``: the grid exactly,
    always possible up to 3 bits), clamped where a 4-bit code would leave [0, 15]. A large ``m``
    would cancel against ``(q + k - 8) s`` after both are rounded to bfloat16."""
    low, high = -codes.amin(-1), 15 - codes.amax(-1)
    return torch.minimum(torch.maximum(8 - zeros, low), high)


def cpu_linear(module: QLinear) -> CpuLinear:
    kernel = int4_kernel(module)
    if kernel is None:
        qw = module.quantized_weight()
        kernel = HalfKernel(quant.dequantize(qw).to(torch.float16))
    sparse = module.outliers()
    outliers = None
    if sparse is not None:
        outliers = torch.sparse_csr_tensor(
            sparse.crow.long(), sparse.col.long(), sparse.values.float(), sparse.shape
        )  # fmt: skip
    bias = None if module.bias is None else module.bias.float()
    return CpuLinear(kernel, outliers, bias)


class HalfLinear(torch.nn.Module):
    """A float linear layer held in float16 (a deployed 16-bit layer or float ``lm_head``)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.kernel = HalfKernel(weight)
        self.bias = None if bias is None else bias.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.kernel(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class HalfEmbedding(torch.nn.Module):
    """A float embedding held in float16; rows come out in float32."""

    def __init__(self, weight: torch.Tensor, padding_idx: int | None = None):
        super().__init__()
        self.weight16, self.padding_idx = weight, padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight16[ids].float()


@dataclass(frozen=True)
class Deployment:
    """What :func:`deploy_on_cpu` did: layers per form and the bytes the weights hold now."""

    int4_layers: int
    half_layers: int
    weight_bytes: int


def deploy_on_cpu(model: torch.nn.Module) -> Deployment:
    """Switch ``model`` (CPU, loaded by :func:`mqc.load`) to compressed CPU kernels in place;
    see the module docstring."""
    tables = {id(m.table) for m in model.modules() if isinstance(m, QEmbedding)}
    int4 = half = held = 0
    halves: dict[int, torch.Tensor] = {}  # one float16 copy per float tensor (a tied pair shares it)

    def as_half(weight: torch.Tensor) -> torch.Tensor:
        if weight.data_ptr() not in halves:
            halves[weight.data_ptr()] = weight.detach().to(torch.float16)
        return halves[weight.data_ptr()]

    # largest first: its conversion temporaries are then allocated before anything else is held
    modules = sorted(model.named_modules(), key=lambda item: -_packed_bytes(item[1]))
    for name, module in modules:
        if isinstance(module, QLinear):
            module.cpu_kernel = cpu_linear(module)
            int4 += isinstance(module.cpu_kernel.kernel, Int4Kernel)
            half += isinstance(module.cpu_kernel.kernel, HalfKernel)
            held += module.cpu_kernel.nbytes()
            if id(module) in tables:
                held += module.nbytes()  # row lookups read the packed table
            else:
                module.release_packed()
                _return_freed_memory()
        elif type(module) is torch.nn.Embedding:  # subclasses (Gemma's scaled embedding) stay as they are
            model.set_submodule(name, HalfEmbedding(as_half(module.weight), module.padding_idx))
        elif type(module) is torch.nn.Linear:
            model.set_submodule(name, HalfLinear(as_half(module.weight), module.bias))
            half += 1
    held += sum(w.numel() * 2 for w in halves.values())
    _return_freed_memory()
    return Deployment(int4, half, held)


def _packed_bytes(module: torch.nn.Module) -> int:
    return module.nbytes() if isinstance(module, QLinear) else 0


def _return_freed_memory() -> None:
    """Hand the heap memory of the released buffers back to the OS (glibc keeps freed blocks for
    reuse, so the process would stay as large as before the conversion)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
