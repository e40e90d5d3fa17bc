"""Fused dequant-GEMV: the reference, the launcher's plan, a CPU emulation of qgemv.cu's index
arithmetic, compile checks of every .cu (nvcc; NVRTC when found), and GPU runs (marked ``gpu``).

Tolerances: the kernel, its emulation and :func:`qgemv_reference` all compute in fp32 and round
once to fp16, so they may differ by the summation order only: ``|out - ref| <= ATOL * max|ref| +
RTOL * |ref|`` with RTOL = 2e-3 (four fp16 ulps) and ATOL = 1e-3.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mqc import quant
from mqc.kernels import launch
from mqc.kernels.reference import qgemv_reference, qgemv_reference_siblings
from mqc.runtime.modules import QLinear

RTOL, ATOL = 2e-3, 1e-3
ROOT = Path(__file__).resolve().parents[1]
# K values that, with g in 32/64/128, reach every (bits, vector width) pair of the launcher,
# aligned (96, 256) and not (100, 180: x rows not 16-byte aligned, a partial last group).
K_VALUES = (96, 100, 180, 256)
gpu = pytest.mark.skipif(not launch.kernels_available(), reason="needs CuPy and a CUDA device")


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    out, ref = out.float().cpu(), ref.float().cpu()
    bound = ATOL * ref.abs().max() + RTOL * ref.abs()
    worst = float((out - ref).abs().sub(bound).max())
    assert worst <= 0, f"exceeds |out-ref| <= atol + rtol|ref| by {worst:.3g}"


def make_layer(n: int, k: int, bits: int, group_size: int, outlier_frac: float, seed: int = 0):
    """(QuantizedWeight, SparseOutliers | None, fp16 bias) of a random layer, made by mqc.quant."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen) / k**0.5
    mask = torch.rand(n, k, generator=gen) < outlier_frac if outlier_frac else None
    qw, sparse = quant.quantize_layer(weight, bits, group_size, mask)
    bias = (torch.randn(n, generator=gen) / 10).half()
    return qw, sparse, bias


def kernel_args(qw, sparse, bias, device) -> tuple:
    """The arguments of :func:`launch.qgemv` after x, moved to ``device``."""
    outliers = (None, None, None) if sparse is None else (sparse.crow, sparse.col, sparse.values)
    move = lambda t: None if t is None else t.to(device)
    packed = (qw.qweight, qw.scales, qw.qzeros)
    return (*map(move, packed), qw.bits, qw.group_size, qw.in_features, *map(move, outliers), move(bias))


def random_x(m: int, k: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).half()


# --------------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", quant.QUANT_BITS)
def test_reference_equals_dequantize_then_matmul(bits):
    qw, sparse, bias = make_layer(40, 100, bits, 32, 0.02)
    x = random_x(3, 100)
    expected = x.float() @ (quant.dequantize(qw) + sparse.to_dense()).T + bias.float()
    assert torch.equal(qgemv_reference(x.float(), qw, sparse, bias), expected)
    assert_close(qgemv_reference(x, qw, sparse, bias), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cpu_qlinear_op_matches_reference(dtype):
    """The CPU runtime path (dequantize in x's dtype, one matmul) agrees with the reference."""
    gen = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(24, 180, generator=gen) / 13, torch.randn(24, generator=gen)
    mask = torch.rand(24, 180, generator=gen) < 0.01
    module = QLinear.from_weight(weight, bias, 3, 64, mask)
    x = random_x(5, 180).to(dtype)
    ref = qgemv_reference(x.float(), module.quantized_weight(), module.outliers(), module.bias)
    out = module(x)
    assert out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:  # the fp16 path rounds the dense weight to fp16 first: a few fp16 ulps more
        assert_close(out, ref)


def test_sibling_reference_is_one_reference_per_sibling():
    layers = [make_layer(n, 96, 4, 32, 0.0, seed=n) for n in (16, 8)]
    x = random_x(2, 96)
    outs = qgemv_reference_siblings(x, layers)
    assert [o.shape for o in outs] == [(2, 16), (2, 8)]
    assert torch.equal(outs[1], qgemv_reference(x, *layers[1]))


# --------------------------------------------------------------------------------------------
# launch plan and an emulation of qgemv.cu
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("bits", "group_size", "k", "vec"),
    [(2, 32, 96, 2), (2, 32, 256, 4), (2, 64, 96, 4), (3, 32, 96, 1), (3, 32, 180, 2), (3, 32, 256, 4),
     (3, 64, 180, 2), (3, 128, 100, 4), (4, 32, 96, 4), (8, 128, 100, 4)],
)  # fmt: skip
def test_plan_picks_widest_vector_the_row_allows(bits, group_size, k, vec):
    plan = launch.plan_launch(50, k, bits, group_size, 1, False)
    assert plan.vec == vec
    assert plan.row_bytes == quant.n_blocks(k, group_size) * group_size * bits // 8
    assert plan.row_bytes == plan.units * launch.unit_bytes(bits, vec)
    assert plan.units <= 1 << plan.slot_shift < 2 * plan.units or plan.slot_shift == 7


@pytest.mark.parametrize("n", [1, 7, 64, 1000])
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("k", [96, 576, 11008])
def test_grid_writes_every_row_once(n, m, k):
    plan = launch.plan_launch(n, k, 4, 128, m, False)
    slots = launch.THREADS >> plan.slot_shift
    rows = [
        (block * slots + slot) * plan.rows_per_slot + r
        for block in range(plan.grid)
        for slot in range(slots)
        for r in range(plan.rows_per_slot)
    ]
    written = sorted(row for row in rows if row < n)
    assert written == list(range(n))
    assert max(rows) < n + slots * plan.rows_per_slot  # no block is entirely idle


def test_every_vector_width_is_covered_by_the_emulation_cases():
    pairs = {
        (bits, launch.plan_launch(8, k, bits, g, 1, False).vec)
        for bits in quant.QUANT_BITS
        for g in quant.GROUP_SIZES
        for k in K_VALUES
    }
    assert pairs == {(bits, vec) for bits, vecs in launch.VECS.items() for vec in vecs}


def code_at(bits: int, w: np.ndarray, j: int) -> np.ndarray:
    """qgemv.cu code_at, vectorised over rows: the float of code j from words w [rows, WORDS]."""
    mask = (1 << bits) - 1
    bit = j * bits
    word, off = bit >> 5, bit & 31
    if off + bits <= 23:
        v = ((w[:, word] & np.uint32(mask << off)) | np.uint32(0x4B000000)).view(np.float32)
        return v * np.float32(2.0**-off) - np.float32(2.0 ** (23 - off))
    value = w[:, word] >> np.uint32(off)
    if off + bits > 32:
        value = value | (w[:, word + 1] << np.uint32(32 - off))
    return ((value & np.uint32(mask)) | np.uint32(0x4B000000)).view(np.float32) - np.float32(8388608.0)


def zero_point(bits: int, zeros: np.ndarray, group: int) -> np.ndarray:
    """qgemv.cu zero_point, vectorised over rows."""
    if bits == 3:
        p = 3 * (group >> 3)
        word = (
            zeros[:, p].astype(np.uint32)
            | zeros[:, p + 1].astype(np.uint32) << 8
            | zeros[:, p + 2].astype(np.uint32) << 16
        )
        return ((word >> (3 * (group & 7))) & 7).astype(np.float32)
    bit = group * bits
    return ((zeros[:, bit >> 3] >> (bit & 7)) & ((1 << bits) - 1)).astype(np.float32)


def emulate_kernel(bits: int, vec: int, outliers: bool, a: dict) -> None:
    """qgemv.cu<bits, vec, M, outliers> step by step on the CPU, from the very arguments the
    launcher passes (``a``, by kernel parameter name), writing ``a["out"]``: per unit (lane = unit
    mod threads per slot), 8-code chunks decoded from the raw 32-bit words, dot/sx folded at group
    and unit ends, outliers spread over lanes, then the sum over lanes, bias, one fp16 rounding.
    Tensors are read as the flat buffers behind the kernel's pointers."""
    words_per_unit = (3 if bits == 3 else 1) * vec  # Unit::WORDS
    codes_per_unit = 32 * words_per_unit // bits
    n, k, n_blocks = a["n"], a["k"], a["n_blocks"]
    group_size, tpr = 1 << a["group_shift"], 1 << a["slot_shift"]
    row_bytes = (n_blocks * bits << a["group_shift"]) >> 3
    xs = a["x"].float().numpy()
    m = xs.shape[0]
    xpad = np.zeros((m, n_blocks * group_size), np.float32)
    xpad[:, :k] = xs  # load_x8: 0 past the end of the row
    words = a["qweight"].reshape(-1).numpy()[: n * row_bytes].reshape(n, row_bytes).view("<u4")
    scales = a["scales"].reshape(-1).float().numpy()[: n * n_blocks].reshape(n, n_blocks)
    zeros = a["qzeros"].reshape(-1).numpy()[: n * a["zero_row_bytes"]].reshape(n, a["zero_row_bytes"])
    lanes = np.zeros((tpr, m, n), np.float32)
    for u in range(row_bytes // (4 * words_per_unit)):
        w = words[:, u * words_per_unit : (u + 1) * words_per_unit]
        code0 = u * codes_per_unit
        dot, sx = np.zeros((m, n), np.float32), np.zeros((m, 1), np.float32)
        for c in range(codes_per_unit // 8):
            q = np.stack([code_at(bits, w, 8 * c + j) for j in range(8)])  # [8, n]
            xv = xpad[:, code0 + 8 * c : code0 + 8 * c + 8]
            sx += xv.sum(1, keepdims=True)
            dot += xv @ q
            following = code0 + 8 * (c + 1)
            if c == codes_per_unit // 8 - 1 or following % group_size == 0:
                group = (following - 1) >> a["group_shift"]
                lanes[u % tpr] += scales[:, group] * (dot - zero_point(bits, zeros, group) * sx)
                dot[:], sx[:] = 0.0, 0.0
    if outliers:
        crow, values = a["crow"].numpy(), a["values"].float().numpy()
        col = a["col"].numpy().astype(np.int32 if a["col_is_int32"] else np.int16)
        for row in range(n):
            for e in range(crow[row], crow[row + 1]):
                lanes[(e - crow[row]) % tpr, :, row] += values[e] * xs[:, col[e]]
    bias = 0.0 if a["bias"] is None else a["bias"].float().numpy()
    a["out"].copy_(torch.from_numpy(lanes.sum(0) + bias))


def run_emulated(x, qw, sparse, bias) -> torch.Tensor:
    """The launcher's plan and arguments for CPU tensors, through :func:`emulate_kernel`."""
    n, m = qw.out_features, x.shape[0]
    plan = launch.plan_launch(n, qw.in_features, qw.bits, qw.group_size, m, sparse is not None)
    out = torch.full((m, n), float("nan"), dtype=torch.float16)
    outliers = None if sparse is None else (sparse.crow, sparse.col, sparse.values)
    args = launch.kernel_arguments(plan, x, qw.qweight, qw.scales, qw.qzeros, outliers, bias, out)
    assert tuple(args) == launch.kernel_parameters()  # every parameter, in the kernel's order
    emulate_kernel(plan.bits, plan.vec, plan.outliers, args)
    return out


@pytest.mark.parametrize("bits", quant.QUANT_BITS)
def test_emulated_decode_reproduces_unpack(bits):
    """code_at's float tricks give back exactly the codes mqc.quant packed, in every position."""
    codes = torch.randint(0, 1 << bits, (5, 768), generator=torch.Generator().manual_seed(bits))
    packed = quant.pack(codes, bits).numpy()
    words = packed.view("<u4")
    per_unit = 32 * (3 if bits == 3 else 1) // bits  # codes per 32-bit word (or per 3 words)
    span = 3 if bits == 3 else 1
    for start in range(0, words.shape[1], span):
        got = np.stack([code_at(bits, words[:, start : start + span], j) for j in range(per_unit)], 1)
        first = start // span * per_unit
        assert np.array_equal(got, codes[:, first : first + per_unit].numpy().astype(np.float32))


@pytest.mark.parametrize("bits", quant.QUANT_BITS)
@pytest.mark.parametrize("group_size", quant.GROUP_SIZES)
@pytest.mark.parametrize("k", K_VALUES)
def test_emulated_kernel_matches_reference(bits, group_size, k):
    n = 13  # not a multiple of any slot's rows: the last slot reads clamped rows
    for m, outlier_frac in ((1, 0.0), (3, 0.03)):
        qw, sparse, bias = make_layer(n, k, bits, group_size, outlier_frac, seed=k + bits)
        x = random_x(m, k, seed=group_size)
        assert_close(run_emulated(x, qw, sparse, bias), qgemv_reference(x, qw, sparse, bias))


def test_kernels_unavailable_without_a_visible_device():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    assert not launch.kernels_available()


# --------------------------------------------------------------------------------------------
# compile checks (no GPU needed)
# --------------------------------------------------------------------------------------------
def _check_cuda():
    spec = importlib.util.spec_from_file_location("check_cuda", ROOT / "tools" / "check_cuda.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def _assert_all_ok(results) -> None:
    assert results, "no .cu file was checked"
    for r in results:
        assert r.ok, f"{r.source} {r.arch} {r.compiler}: {r.log.strip()[-3000:]}"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_every_cu_compiles_with_nvcc_for_sm80_and_sm90():
    """Errors, warnings and register spills fail; a representative subset of the variants."""
    results = _check_cuda().run_checks(("sm_80", "sm_90"), full=False, nvrtc=False)
    assert {r.source for r in results} == {p.name for p in launch.CUDA_DIR.glob("*.cu")}
    _assert_all_ok(results)


def test_every_cu_compiles_with_nvrtc_as_cupy_would():
    check = _check_cuda()
    if check.find_nvrtc() is None:
        pytest.skip("no libnvrtc (set MQC_NVRTC or install cupy-cuda13x)")
    assert '#include "common.cuh"' not in launch.kernel_source()
    _assert_all_ok(check.run_checks(("sm_80", "sm_90"), full=False, nvcc=False))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_all_kernel_variants_compile():
    """All 112 variants, both archs, nvcc and (when found) NVRTC: several minutes."""
    _assert_all_ok(_check_cuda().run_checks(("sm_80", "sm_90"), full=True))


# --------------------------------------------------------------------------------------------
# on a GPU
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("bits", quant.QUANT_BITS)
@pytest.mark.parametrize("group_size", quant.GROUP_SIZES)
@pytest.mark.parametrize("k", K_VALUES + (4096,))
def test_kernel_matches_reference_on_gpu(bits, group_size, k):
    n = 300
    for m in range(1, launch.MAX_ROWS + 1):
        for outlier_frac in (0.0, 0.01):
            qw, sparse, bias = make_layer(n, k, bits, group_size, outlier_frac, seed=m)
            x = random_x(m, k, seed=k)
            ref = qgemv_reference(x, qw, sparse, bias)
            assert_close(launch.qgemv(x.cuda(), *kernel_args(qw, sparse, bias, "cuda")), ref)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 33])
def test_qlinear_op_on_gpu_uses_kernel_or_dense_path(rows):
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(200, 576, generator=gen) / 24
    mask = torch.rand(200, 576, generator=gen) < 0.005
    module = QLinear.from_weight(weight, torch.randn(200, generator=gen), 4, 128, mask)
    x = random_x(rows, 576).reshape(1, rows, 576)
    ref = qgemv_reference(x, module.quantized_weight(), module.outliers(), module.bias)
    out = module.cuda()(x.cuda())
    assert out.shape == (1, rows, 200) and out.dtype == torch.float16
    assert_close(out, ref)
