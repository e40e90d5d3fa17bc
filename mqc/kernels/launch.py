"""Launch the fused dequantize + GEMV kernels (``cuda/qgemv.cu``) from PyTorch through CuPy.

Each kernel variant (bits, vector width, rows M, outliers) is compiled by NVRTC through a CuPy
``RawModule`` the first time it is needed and cached (in memory, and on disk by CuPy), so a
model pays only for the variants it uses. :func:`plan_launch` is pure Python (no CuPy, no GPU):
it decides the vector width, the threads per row and the grid from the layout, and the CPU tests
emulate the kernel with it.

This module also registers the ``cuda`` implementation of the ``mqc::qlinear`` custom op: up to
:data:`MAX_ROWS` fp16 activation rows go to the fused kernel; more rows (prefill), other dtypes,
or a machine without CuPy dequantize once and use one dense matmul. Importing it never needs
CuPy or a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mqc import quant
from mqc.runtime import ops

CUDA_DIR = Path(__file__).parent / "cuda"
KERNEL_FILE = CUDA_DIR / "qgemv.cu"
THREADS = 128  # qgemv.cu: THREADS
MAX_ROWS = 8  # activation rows the fused kernel takes; more rows amortise a dequantized GEMM
NVRTC_OPTIONS = ("--std=c++17",)
# Vector widths (32-bit words per load) each width may use, widest first. 4 and 8 bits always
# get 128-bit loads (their blocks are multiples of 16 bytes); 2 and 3 bits fall back when the row
# length demands it (2-bit g32 with an odd block count; 3-bit units are 12 * VEC bytes).
VECS: dict[int, tuple[int, ...]] = {2: (4, 2), 3: (4, 2, 1), 4: (4,), 8: (4,)}


def rows_per_slot(m: int, words: int) -> int:
    """Output rows each slot of threads owns (qgemv.cu: rows_per_slot)."""
    return 4 if m <= 2 and words <= 4 else 2


def unit_bytes(bits: int, vec: int) -> int:
    """Bytes one thread reads per step (qgemv.cu: Unit::BYTES)."""
    return 4 * vec * (3 if bits == 3 else 1)


@dataclass(frozen=True)
class LaunchPlan:
    """Everything the kernel is launched with, besides the tensors."""

    bits: int
    vec: int
    m: int
    outliers: bool
    n: int
    k: int
    n_blocks: int
    group_shift: int
    row_bytes: int
    zero_row_bytes: int
    units: int  # units of unit_bytes(bits, vec) per row
    slot_shift: int  # log2(threads per slot)
    rows_per_slot: int
    grid: int

    @property
    def kernel_name(self) -> str:
        return kernel_name(self.bits, self.vec, self.m, self.outliers)


def kernel_name(bits: int, vec: int, m: int, outliers: bool) -> str:
    """The C++ name expression of one instantiation, as NVRTC and CuPy look it up."""
    return f"mqc::qgemv<{bits}, {vec}, {m}, {'true' if outliers else 'false'}>"


def all_kernel_names() -> list[str]:
    """Every variant :func:`plan_launch` can choose (the compile check builds all of them)."""
    return [
        kernel_name(bits, vec, m, outliers)
        for bits, vecs in VECS.items()
        for vec in vecs
        for m in range(1, MAX_ROWS + 1)
        for outliers in (False, True)
    ]


@functools.lru_cache(maxsize=4096)  # called on every decode step: the shapes repeat
def plan_launch(n: int, k: int, bits: int, group_size: int, m: int, outliers: bool) -> LaunchPlan:
    """The launch of ``out[m, n] = x[m, k] W^T`` for a weight packed by :mod:`mqc.quant` whose
    base address is 16-byte aligned (:func:`qgemv` makes sure of that)."""
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"the fused kernel takes 1..{MAX_ROWS} rows, got {m}")
    if bits not in VECS or group_size not in quant.GROUP_SIZES:
        raise ValueError(f"no kernel for {bits} bits, group size {group_size}")
    blocks = quant.n_blocks(k, group_size)
    row_bytes = blocks * group_size * bits // 8
    vec = next(v for v in VECS[bits] if row_bytes % unit_bytes(bits, v) == 0)  # VECS[b][-1] always fits
    units = row_bytes // unit_bytes(bits, vec)
    slot_shift = min(THREADS.bit_length() - 1, (units - 1).bit_length())  # next power of two >= units
    rows = rows_per_slot(m, unit_bytes(bits, vec) // 4)
    rows_per_block = (THREADS >> slot_shift) * rows
    return LaunchPlan(
        bits=bits,
        vec=vec,
        m=m,
        outliers=outliers,
        n=n,
        k=k,
        n_blocks=blocks,
        group_shift=group_size.bit_length() - 1,
        row_bytes=row_bytes,
        zero_row_bytes=quant.packed_len(blocks, bits),
        units=units,
        slot_shift=slot_shift,
        rows_per_slot=rows,
        grid=-(-n // rows_per_block),
    )


def kernel_source() -> str:
    """``qgemv.cu`` with its local header inlined: NVRTC gets one self-contained source, and
    CuPy's on-disk cache (keyed on the source text) sees every change to either file."""
    header = (CUDA_DIR / "common.cuh").read_text()
    return KERNEL_FILE.read_text().replace('#include "common.cuh"', header)


# --------------------------------------------------------------------------------------------
# CuPy side: only touched when a CUDA tensor reaches the kernel
# --------------------------------------------------------------------------------------------
@functools.cache
def _cupy():
    """The ``cupy`` module when it is installed and sees a device, else None."""
    try:
        import cupy
    except ImportError:
        return None
    try:
        return cupy if cupy.cuda.runtime.getDeviceCount() > 0 else None
    except cupy.cuda.runtime.CUDARuntimeError:  # no driver, a driver too old, no device
        return None


def kernels_available() -> bool:
    """True when CUDA tensors can be sent to the fused kernels (torch sees a GPU, CuPy too)."""
    return torch.cuda.is_available() and _cupy() is not None


@functools.cache
def _kernel(name: str):
    cupy = _cupy()
    module = cupy.RawModule(code=kernel_source(), options=NVRTC_OPTIONS, name_expressions=[name])
    return module.get_function(name)


@functools.cache
def _stream(pointer: int, device: int):
    """CuPy's handle on a torch stream, so kernels queue behind torch's work (and into CUDA graphs
    torch captures). ExternalStream is deprecated in CuPy 14 but is the one API CuPy 13 has too."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return _cupy().cuda.ExternalStream(pointer, device)


def _aligned16(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0


@functools.cache
def kernel_parameters() -> tuple[str, ...]:
    """The kernel's parameter names in order, read from qgemv.cu's signature, so that the
    arguments are passed by name and a reordered signature cannot silently shift them."""
    source = KERNEL_FILE.read_text()
    signature = source[source.index("qgemv(") + len("qgemv(") : source.index(") {", source.index("qgemv("))]
    pieces = re.sub(r"//[^\n]*", "", signature).split(",")
    return tuple(re.findall(r"\w+", piece)[-1] for piece in pieces)


def kernel_arguments(
    plan: LaunchPlan,
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    outliers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    bias: torch.Tensor | None,
    out: torch.Tensor,
) -> dict[str, torch.Tensor | int | None]:
    """Every kernel argument by name: tensors (None for absent ones) and ints. Pure: the CPU
    tests feed the same dictionary to an emulation of the kernel."""
    crow, col, values = outliers if outliers is not None else (None, None, None)
    return {
        "x": x, "qweight": qweight, "scales": scales, "qzeros": qzeros,
        "crow": crow, "col": col, "values": values, "bias": bias, "out": out,
        "n": plan.n, "k": plan.k, "n_blocks": plan.n_blocks, "group_shift": plan.group_shift,
        "zero_row_bytes": plan.zero_row_bytes, "slot_shift": plan.slot_shift,
        "col_is_int32": int(col is not None and col.dtype == torch.int32),
        "x_aligned": int(plan.k % 8 == 0 and _aligned16(x)),
    }  # fmt: skip


def _as_kernel_arg(value: torch.Tensor | int | None) -> np.generic:
    if value is None or isinstance(value, torch.Tensor):
        return np.uint64(0 if value is None else value.data_ptr())
    return np.int32(value)


def qgemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
    outlier_crow: torch.Tensor | None = None,
    outlier_col: torch.Tensor | None = None,
    outlier_values: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [M, K] fp16 @ (W_hat + S)^T + bias`` in one launch on x's device and current stream."""
    if x.dtype != torch.float16 or x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(f"qgemv takes fp16 x [M, {in_features}], got {x.dtype} {tuple(x.shape)}")
    m, n = x.shape[0], qweight.shape[0]
    out = torch.empty((m, n), dtype=torch.float16, device=x.device)
    if m == 0 or n == 0:
        return out
    has_outliers = outlier_values is not None and outlier_values.numel() > 0
    plan = plan_launch(n, in_features, bits, group_size, m, has_outliers)
    # Contiguous fp16 views of everything (a model converted with .float() carries fp32 scales
    # and outlier values); a misaligned packed weight can only be a view into another buffer.
    # The locals keep any converted copy alive until the launch is queued.
    x, qzeros, scales = x.contiguous(), qzeros.contiguous(), scales.to(torch.float16).contiguous()
    qweight = qweight.contiguous()
    if not _aligned16(qweight):
        qweight = qweight.clone()
    outliers = (outlier_crow, outlier_col, outlier_values.to(torch.float16)) if has_outliers else None
    bias = None if bias is None else bias.to(torch.float16).contiguous()
    arguments = kernel_arguments(plan, x, qweight, scales, qzeros, outliers, bias, out)
    args = tuple(_as_kernel_arg(arguments[name]) for name in kernel_parameters())
    kernel = _kernel(plan.kernel_name)
    device = x.device.index if x.device.index is not None else torch.cuda.current_device()
    with _cupy().cuda.Device(device), _stream(torch.cuda.current_stream(device).cuda_stream, device):
        kernel((plan.grid,), (THREADS,), args)
    return out


# --------------------------------------------------------------------------------------------
# the ``cuda`` implementation of mqc::qlinear
# --------------------------------------------------------------------------------------------
def _dense_linear(x, qweight, scales, qzeros, bits, group_size, in_features, crow, col, values, bias):
    """Dequantize once, then one dense matmul in x's dtype (the op's default implementation)."""
    weight = ops.dense_weight(qweight, scales, qzeros, bits, group_size, in_features, crow, col, values, x.dtype)
    return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))


_enabled = True


@contextlib.contextmanager
def fused_kernels(enabled: bool):
    """Turn the fused kernels off (every CUDA call dequantizes, then matmuls) or on, for A/B runs."""
    global _enabled
    previous, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = previous


@ops.qlinear.register_kernel("cuda")
def _qlinear_cuda(x, qweight, scales, qzeros, bits, group_size, in_features, crow, col, values, bias):
    rows = x.numel() // max(x.shape[-1], 1)
    if not _enabled or x.dtype != torch.float16 or not 1 <= rows <= MAX_ROWS or _cupy() is None:
        return _dense_linear(x, qweight, scales, qzeros, bits, group_size, in_features, crow, col, values, bias)
    out = qgemv(
        x.reshape(rows, x.shape[-1]), qweight, scales, qzeros, bits, group_size, in_features, crow, col, values, bias
    )
    return out.reshape(*x.shape[:-1], qweight.shape[0])
