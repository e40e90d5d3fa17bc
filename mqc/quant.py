"""The numerics of mqc: quantize, dequantize, pack, unpack and byte accounting.

Every other module calls these functions; nothing else in the package computes a scale, a zero
point or a packed byte. That keeps the artifact, the runtime, the CUDA kernels, the ONNX export
and the budget arithmetic in agreement by construction.

Quantization (DESIGN.md section 2): weight ``W [N out, K in]``, group-wise asymmetric uniform
quantization along K with group size ``g``. K need not be a multiple of ``g``; the last group
of a row is shorter and is stored padded to ``ceil(K/g)`` blocks exactly like onnxruntime's
``MatMulNBits`` (padding codes are 0 and never read back).

    min = min(group min, 0), max = max(group max, 0)
    s = (max - min) / (2^b - 1)      stored as fp16; the fp16 value is the one used to quantize
    z = clamp(round(-min / s), 0, 2^b - 1)
    q = clamp(round(W / s) + z, 0, 2^b - 1)
    W_hat = (q - z) * s

The range is widened to contain 0, as GPTQ and onnxruntime's quantizer do: DESIGN.md's formula
with a raw min/max clamps z for a group of one sign and the grid then misses the group's far end
(an 8-bit error of 0.35 on a short all-positive group, measured). Guards: an all-zero group gets
``s = 1``, and ``s`` never falls below fp16's smallest normal number.

Packing is one rule for every width: within a block, code ``i`` occupies bits ``[i*b, (i+1)*b)``
of a little-endian bit stream. For 2, 4 and 8 bits this is byte-for-byte onnxruntime's
``MatMulNBits`` layout (``B [N, n_blocks, g*b/8]``, low bits first). For 3 bits the stream is
cut into 24-bit words: 8 codes in 3 bytes, code ``i`` of a word at bits ``3i`` of the
little-endian 24-bit integer. Zero points are packed per row with the same rule
(``[N, ceil(n_blocks / codes_per_word) * word_bytes]``), which for 2/4/8 bits is again
``MatMulNBits``' ``zero_points`` layout.

Outliers are a per-layer sparse fp16 matrix in CSR form holding the *residual* ``W - W_hat`` at
the chosen positions, so that ``W_hat + S`` reproduces those weights to fp16 precision. The dense
part is quantized with the outliers excluded from each group's min/max, so they do not stretch
the range of their neighbours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from scipy.linalg import lapack

from mqc.errors import InvalidWeightsError

QUANT_BITS: tuple[int, ...] = (2, 3, 4, 8)
FP16_BITS = 16
SUPPORTED_BITS: tuple[int, ...] = QUANT_BITS + (FP16_BITS,)
GROUP_SIZES: tuple[int, ...] = (32, 64, 128)
_FP16_MIN_NORMAL = 2.0**-14
_CSR_ROW_PTR_BYTES = 4
_FP16_BYTES = 2


# --------------------------------------------------------------------------------------------
# bit packing
# --------------------------------------------------------------------------------------------
def word_layout(bits: int) -> tuple[int, int]:
    """(word_bytes, codes_per_word) of the packed stream: (1, 8/b) for 2/4/8 bits, (3, 8) for 3."""
    if bits not in QUANT_BITS:
        raise ValueError(f"no packed layout for {bits} bits; use one of {QUANT_BITS}")
    word_bits = math.lcm(bits, 8)
    return word_bits // 8, word_bits // bits


def packed_len(count: int, bits: int) -> int:
    """Bytes used to pack ``count`` codes of ``bits`` bits (whole words, zero-padded)."""
    word_bytes, per_word = word_layout(bits)
    return -(-count // per_word) * word_bytes


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2^bits)`` along the last dim into a uint8 little-endian stream."""
    word_bytes, per_word = word_layout(bits)
    count = codes.shape[-1]
    pad = -count % per_word
    codes = codes.to(torch.int32)
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    words = codes.reshape(*codes.shape[:-1], -1, per_word)
    shifts = torch.arange(per_word, dtype=torch.int32, device=codes.device) * bits
    word = (words << shifts).sum(-1, dtype=torch.int32)
    byte_shifts = torch.arange(word_bytes, dtype=torch.int32, device=codes.device) * 8
    out = (word.unsqueeze(-1) >> byte_shifts) & 0xFF
    return out.reshape(*codes.shape[:-1], -1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``count`` codes of the stream, as uint8."""
    word_bytes, per_word = word_layout(bits)
    raw = packed.to(torch.int32).reshape(*packed.shape[:-1], -1, word_bytes)
    byte_shifts = torch.arange(word_bytes, dtype=torch.int32, device=packed.device) * 8
    word = (raw << byte_shifts).sum(-1, dtype=torch.int32)
    shifts = torch.arange(per_word, dtype=torch.int32, device=packed.device) * bits
    codes = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :count].to(torch.uint8)


# --------------------------------------------------------------------------------------------
# quantization
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantizedWeight:
    """A packed group-quantized weight and the facts needed to read it back."""

    qweight: torch.Tensor  # uint8 [N, n_blocks, g*b/8]
    scales: torch.Tensor  # fp16  [N, n_blocks]
    qzeros: torch.Tensor  # uint8 [N, packed_len(n_blocks, b)]
    bits: int
    group_size: int
    in_features: int

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def n_blocks(self) -> int:
        return self.qweight.shape[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.qzeros))


@dataclass(frozen=True)
class SparseOutliers:
    """CSR fp16 residuals added to the dequantized dense weight."""

    crow: torch.Tensor  # int32 [N+1]
    col: torch.Tensor  # int16 (K <= 32767) or int32 [nnz]
    values: torch.Tensor  # fp16 [nnz]
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        rows = torch.repeat_interleave(
            torch.arange(self.shape[0], device=self.crow.device), torch.diff(self.crow.long())
        )
        dense = torch.zeros(self.shape, dtype=dtype, device=self.values.device)
        dense[rows, self.col.long()] = self.values.to(dtype)
        return dense

    def add_to(self, dense: torch.Tensor) -> torch.Tensor:
        """``dense`` (``[N, K]``) with the residuals added in place: no second dense matrix."""
        rows = torch.repeat_interleave(torch.arange(self.shape[0], device=self.crow.device), torch.diff(self.crow.long()))
        dense.index_put_((rows, self.col.long()), self.values.to(dense.dtype), accumulate=True)
        return dense

    def dense_rows(self, rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ``[len(rows), K]`` of selected rows, without building the whole matrix."""
        crow = self.crow.long()
        starts, counts = crow[rows], crow[rows + 1] - crow[rows]
        out_row = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), counts)
        first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        index = torch.repeat_interleave(starts, counts) + torch.arange(out_row.numel(), device=rows.device) - first
        dense = torch.zeros(rows.numel(), self.shape[1], dtype=dtype, device=self.values.device)
        dense[out_row, self.col[index].long()] = self.values[index].to(dtype)
        return dense

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.crow, self.col, self.values))


def n_blocks(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


def check_finite(weight: torch.Tensor, name: str | None = None) -> None:
    """Refuse NaN/Inf weights: quantizing them would silently poison every group they touch."""
    if not torch.isfinite(weight).all():
        bad = int((~torch.isfinite(weight)).sum())
        what = f"layer {name!r}" if name else f"a weight of shape {tuple(weight.shape)}"
        raise InvalidWeightsError(f"{what} has {bad} NaN/Inf weights; repair or re-export the checkpoint first")


def _check_args(weight: torch.Tensor, bits: int, group_size: int) -> None:
    if weight.ndim != 2:
        raise InvalidWeightsError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    if bits not in QUANT_BITS:
        raise ValueError(f"cannot quantize to {bits} bits; use one of {QUANT_BITS}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group size {group_size} not supported; use one of {GROUP_SIZES}")
    check_finite(weight)


def _grouped(weight: torch.Tensor, group_size: int, fill: float) -> torch.Tensor:
    """[N, K] -> [N, n_blocks, g], padding the short last group with ``fill``."""
    rows, cols = weight.shape
    pad = -cols % group_size
    if pad:
        weight = torch.nn.functional.pad(weight, (0, pad), value=fill)
    return weight.reshape(rows, -1, group_size)


CLIP_SHRINKS = tuple(1.0 - 0.05 * i for i in range(9))  # range fractions tried by the clip search
# GPTQ searches the grid of each group at these widths and below. Measured on four layers of the
# default model (layers 0/10/20/29, output error tr(dW H dW^T) against min-max grids): 2-bit g64
# -22..30%, 3-bit g64 -5..9%, 3-bit g128 -13..17%, but 4-bit g64 -2..+7% (that model's weights
# were a 4-bit grid already).
CLIP_MAX_BITS = 3


def _params(
    wg: torch.Tensor, kg: torch.Tensor, levels: int, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(zero, fp16 scale) per group of ``wg [..., g]``; ``kg`` marks the entries that set the range.

    With ``importance`` (``[..., g]`` weights of the squared error, e.g. the input energy of each
    column), each group's range is also shrunk by every factor of :data:`CLIP_SHRINKS` and the
    grid with the least weighted rounding error is kept: at 2-3 bits clipping a few extreme
    weights buys a finer step for all the others.
    """
    w_min = torch.where(kg, wg, torch.inf).amin(-1)
    w_max = torch.where(kg, wg, -torch.inf).amax(-1)
    empty = ~kg.any(-1)  # a group made only of outliers/padding: any grid will do
    # The range always contains 0 (as in GPTQ and onnxruntime's quantizer): otherwise a group of
    # one sign gets z clamped to the edge and the grid no longer reaches the group's far end.
    w_min = torch.where(empty, 0.0, w_min).clamp_max(0.0)
    w_max = torch.where(empty, 0.0, w_max).clamp_min(0.0)
    if importance is None:
        return _grid(w_min, w_max, levels)
    weight = importance * kg  # [..., g]: what a squared error costs; 0 for outliers and padding
    work = torch.empty_like(wg)
    best = best_err = None
    for shrink in CLIP_SHRINKS:
        zero, scale16 = _grid(w_min * shrink, w_max * shrink, levels)
        scale, offset = scale16.float().unsqueeze(-1), zero.unsqueeze(-1)
        # ((clamp(round(w / s) + z, 0, L) - z) * s - w)^2, in place: this loop is memory-bound
        torch.div(wg, scale, out=work).round_().add_(offset).clamp_(0, levels).sub_(offset).mul_(scale)
        err = work.sub_(wg).square_().mul_(weight).sum(-1)
        if best is None:
            best, best_err = (zero, scale16), err
            continue
        better = err < best_err
        best = (torch.where(better, zero, best[0]), torch.where(better, scale16, best[1]))
        best_err = torch.minimum(err, best_err)
    return best


def _grid(w_min: torch.Tensor, w_max: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (w_max - w_min) / levels
    scale = torch.where(scale == 0, 1.0, scale)
    scale16 = scale.clamp(_FP16_MIN_NORMAL, 65504.0).to(torch.float16)
    zero = torch.clamp(torch.round(-w_min / scale16.float()), 0, levels)
    return zero, scale16


def _encode(w: torch.Tensor, zero: torch.Tensor, scale16: torch.Tensor, levels: int) -> torch.Tensor:
    """Codes of ``w`` on the grid (zero, scale); ``zero``/``scale16`` broadcast over the last dim."""
    return torch.clamp(torch.round(w / scale16.float().unsqueeze(-1)) + zero.unsqueeze(-1), 0, levels)


def _codes(
    weight: torch.Tensor, bits: int, group_size: int, outlier_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest (q [N, nb, g] int32, z [N, nb] int32, s [N, nb] fp16) of a weight.

    Padding and outlier positions are excluded from min/max; padding codes are set to 0.
    """
    _check_args(weight, bits, group_size)
    levels = (1 << bits) - 1
    w = weight.float()
    keep = torch.ones_like(w, dtype=torch.bool) if outlier_mask is None else ~outlier_mask
    wg = _grouped(w, group_size, 0.0)
    kg = _grouped(keep.float(), group_size, 0.0).bool()
    zero, scale16 = _params(wg, kg, levels)
    q = _encode(wg, zero, scale16, levels)
    valid = _grouped(torch.ones_like(w), group_size, 0.0).bool()
    q = torch.where(valid, q, 0.0)
    return q.to(torch.int32), zero.to(torch.int32), scale16


def _inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """(``U``, the damping added): the upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1 =
    U^T U`` (dead inputs' zero diagonal set to 1 first), damping more if needed.

    With ``J`` the exchange matrix and ``J H J = L L^T``, ``U = J L^-1 J``: one Cholesky and one
    triangular inverse (LAPACK ``trtri``), in float32 (``U`` within about 1e-7 of its largest
    entry of a float64 computation), instead of a Cholesky, a full inverse and a second Cholesky
    in float64, which took most of a large layer's GPTQ time."""
    h = torch.flip(hessian.float(), (0, 1))
    diagonal = torch.diag(h).clone()
    diagonal[diagonal == 0] = 1.0  # dead inputs: their columns are zeroed, any pivot will do
    mean_diag = diagonal.mean()
    for factor in (1, 10, 100, 1000):
        h.diagonal().copy_(diagonal + damp * factor * mean_diag)
        chol, info = torch.linalg.cholesky_ex(h)
        if info == 0:
            del h
            lam = float(damp * factor * mean_diag)
            if chol.device.type != "cpu":  # on a GPU the triangular solve is the fast path
                eye = torch.eye(chol.shape[0], device=chol.device)
                return torch.flip(torch.linalg.solve_triangular(chol, eye, upper=False), (0, 1)), lam
            inverse, info = lapack.strtri(chol.numpy(), lower=1, overwrite_c=1)
            if info == 0:
                return torch.flip(torch.from_numpy(inverse), (0, 1)), lam
    raise InvalidWeightsError("the calibration Hessian is not positive definite even after damping; use more calibration data")


GPTQ_BLOCK = 64  # columns updated one by one before the rest of the matrix sees their errors (one matmul)
GPTQ_CHUNK_ELEMENTS = 1 << 26  # [K, rows] working matrix of one column loop (256 MB of float32); rows are independent


@dataclass(frozen=True)
class Grid:
    """One quantization target of a layer: width, group size and optional outlier positions.

    ``fixed`` is a grid fitted elsewhere, ``(zero, scale)`` float32 ``[N, n_blocks]`` with
    ``W_hat = (q - zero) * scale`` and ``q`` in ``[0, 2^bits)``: llama.cpp's block formats
    (:mod:`mqc.quant_ggml`) have fractional zeros, negative scales and 5/6-bit codes, and GPTQ
    only needs to round onto them.
    """

    bits: int
    group_size: int
    outlier_mask: torch.Tensor | None = None
    fixed: tuple[torch.Tensor, torch.Tensor] | None = None


class GPTQResult(NamedTuple):
    """One grid's GPTQ output in the layout of :func:`_codes`, and what its error cost."""

    q: torch.Tensor  # uint8 [N, n_blocks, g]
    zero: torch.Tensor  # int32 [N, n_blocks] (a fixed grid's own float zeros)
    scale: torch.Tensor  # fp16 [N, n_blocks] (a fixed grid's own float scales)
    target: torch.Tensor | None  # float32 [N, K] with outliers (their final values); None: the codes
    loss: torch.Tensor  # float64 [N]: GPTQ's summed column losses, diag(dW H_d dW^T) under the damped Hessian
    damping: float  # what H_d added to the diagonal (dead inputs: 1 more)


def gptq_row_error(result: GPTQResult, weight: torch.Tensor, dense: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """``diag(dW H dW^T)`` of a GPTQ result (``dense``: its dequantized matrix) from the losses the
    column loop summed, without the ``[N, K] @ [K, K]`` product per candidate: GPTQ's losses add up
    to the error under the damped Hessian ``H + damping I`` (dead inputs' zero diagonal set to 1,
    their weights to 0), so the undamped error is that less the damping's share. Exact but for
    float rounding; a grid with outliers (whose stored residuals are rounded to fp16 after the
    loop) is measured by the product instead."""
    dead = torch.diag(hessian) == 0
    delta = dense - torch.where(dead, 0.0, weight.float())
    if result.target is not None:
        return ((delta @ hessian) * delta).sum(1)
    damped = delta.double().pow(2)
    extra = result.damping * damped.sum(1) + damped[:, dead].sum(1)
    return (result.loss - extra).clamp_min(0.0).float()


@dataclass(frozen=True)
class _GridParams:
    zero: torch.Tensor  # float32 [N, n_blocks]
    scale: torch.Tensor  # float32 [N, n_blocks] (the stored fp16 values, or a fixed grid's own)
    keep: torch.Tensor | None  # bool [N, K] in the permuted column order; None: no outliers
    levels: int
    group_size: int


def gptq_batch(
    weight: torch.Tensor, hessian: torch.Tensor, grids: list[Grid], damp: float = 0.01
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """GPTQ (Frantar et al. 2022) of one weight for several grids at once.

    Columns are quantized one by one, each column's error pushed onto the not-yet-quantized
    columns through the inverse Hessian of the layer's inputs. Columns go in decreasing order of
    the Hessian's diagonal ("act order": the inputs with the most energy are rounded first, while
    the most columns are left to absorb their error), and every group's grid is fitted to the
    group's original weights before any update ("static groups"), so the stored layout stays one
    grid per group of consecutive columns. Outlier positions are taken as exact (no error to push);
    their final updated values are part of ``target``, the matrix the runtime must reproduce
    (dense part + outlier residuals). At :data:`CLIP_MAX_BITS` and below each group's range is
    chosen by a clip search weighted by the input energy ``diag(H)`` (see :func:`_params`).

    Rows are independent given the Hessian, so the rows of every grid are stacked into one matrix
    and share the column loop (the allocator needs a dozen candidates of every layer; one loop per
    candidate made the Python overhead dominate), in chunks of at most
    :data:`GPTQ_CHUNK_ELEMENTS`. The matrix is kept transposed so that a column is a contiguous
    row, and every update is in place (``addr_``/``addmm_``): a temporary per block made the loop
    memory-bound. Returns per grid ``(q [N, nb, g] uint8, z [N, nb] int32, s [N, nb] fp16,
    target)`` in the layout of :func:`_codes` (a ``fixed`` grid's own float ``z, s``); ``target
    [N, K]`` float32 only for a grid with outliers (else None: the target is the dequantized codes);
    and the summed column losses (:class:`GPTQResult`, :func:`gptq_row_error`).
    """
    for grid in grids:
        if grid.fixed is None:
            _check_args(weight, grid.bits, grid.group_size)
        else:
            check_finite(weight)
    rows, cols = weight.shape
    w = weight.float().clone()
    w[:, torch.diag(hessian) == 0] = 0.0
    order = torch.argsort(torch.diag(hessian), descending=True, stable=True)
    hinv, damping = _inverse_hessian_factor(hessian[order][:, order], damp)
    params, stored = [], []
    energy = torch.diag(hessian).float().expand(rows, cols)
    for grid in grids:
        levels = (1 << grid.bits) - 1
        keep = None if grid.outlier_mask is None else ~grid.outlier_mask
        if grid.fixed is not None:
            zero, scale = grid.fixed
            stored.append((zero, scale))
            params.append(_GridParams(zero.float(), scale.float(), None if keep is None else keep[:, order], levels, grid.group_size))
            continue
        importance = _grouped(energy, grid.group_size, 0.0) if grid.bits <= CLIP_MAX_BITS else None
        kept = torch.ones_like(w, dtype=torch.bool) if keep is None else keep
        zero, scale16 = _params(_grouped(w, grid.group_size, 0.0), _grouped(kept.float(), grid.group_size, 0.0).bool(), levels, importance)
        stored.append((zero.to(torch.int32), scale16))
        params.append(_GridParams(zero, scale16.float(), None if keep is None else keep[:, order], levels, grid.group_size))
    w_perm = w[:, order]
    del w
    device = weight.device
    codes = [torch.empty(rows, cols, dtype=torch.uint8, device=device) for _ in grids]
    targets = [None if p.keep is None else torch.empty(rows, cols, device=device) for p in params]
    losses = [torch.zeros(rows, dtype=torch.float64, device=device) for _ in grids]
    per_chunk = max(1, GPTQ_CHUNK_ELEMENTS // cols)
    pieces = [(g, r0, min(r0 + per_chunk, rows)) for g in range(len(grids)) for r0 in range(0, rows, per_chunk)]
    chunk: list[tuple[int, int, int]] = []
    for piece in pieces + [None]:
        if piece is not None and sum(r1 - r0 for _, r0, r1 in chunk) + piece[2] - piece[1] <= per_chunk:
            chunk.append(piece)
            continue
        if chunk:
            _gptq_chunk(chunk, params, w_perm, order, hinv, codes, targets, losses)
        chunk = [piece] if piece is not None else []
    restore = torch.argsort(order)
    results = []
    for grid, (zero, scale), q, target, loss in zip(grids, stored, codes, targets, losses):
        q = _grouped(q[:, restore], grid.group_size, 0)  # padding codes 0, as in _codes
        results.append(GPTQResult(q, zero, scale, None if target is None else target[:, restore], loss, damping))
    return results


def _gptq_chunk(chunk, params: list[_GridParams], w_perm, order, hinv, codes, targets, losses) -> None:
    """GPTQ's column loop over the stacked rows ``chunk`` ((grid, first row, end row) pieces)."""
    cols = w_perm.shape[1]
    wt = torch.cat([w_perm[r0:r1] for _, r0, r1 in chunk]).T.contiguous()  # [K, R]
    device = wt.device
    qt = torch.empty(wt.shape, dtype=torch.uint8, device=device)
    outliers = any(params[g].keep is not None for g, _, _ in chunk)
    tt = torch.empty_like(wt) if outliers else None
    levels = torch.cat([torch.full((r1 - r0,), float(params[g].levels), device=device) for g, r0, r1 in chunk])
    code = torch.empty(wt.shape[1], device=device)
    value = torch.empty(wt.shape[1], device=device)
    loss = torch.zeros(wt.shape[1], dtype=torch.float64, device=device)
    for i1 in range(0, cols, GPTQ_BLOCK):
        i2 = min(i1 + GPTQ_BLOCK, cols)

        def per_column(field: str) -> torch.Tensor:  # [i2 - i1, R] of a per-group field
            parts = [getattr(params[g], field)[r0:r1][:, order[i1:i2] // params[g].group_size] for g, r0, r1 in chunk]
            return torch.cat(parts).T.contiguous()

        zt, st = per_column("zero"), per_column("scale")
        # round(x/s) + z for the integer zeros of mqc's grids (unchanged ties), round(x/s + z) for fractional ones
        zi = zt.floor()
        zf = zt - zi
        keep = None
        if outliers:
            keep = torch.cat(
                [params[g].keep[r0:r1, i1:i2] if params[g].keep is not None else torch.ones(r1 - r0, i2 - i1, dtype=torch.bool, device=device) for g, r0, r1 in chunk]
            ).T.contiguous()
        errors = torch.empty(i2 - i1, wt.shape[1], device=device)
        block = wt[i1:i2]
        for j in range(i2 - i1):
            i = i1 + j
            column = block[j]
            torch.div(column, st[j], out=code)
            code.add_(zf[j]).round_().add_(zi[j]).clamp_min_(0.0)
            torch.minimum(code, levels, out=code)
            torch.sub(code, zt[j], out=value).mul_(st[j])
            if keep is not None:
                value = torch.where(keep[j], value, column)
                tt[i] = value
            qt[i] = code
            err = errors[j]
            torch.sub(column, value, out=err).div_(hinv[i, i])
            if j + 1 < i2 - i1:
                block[j + 1 :].addr_(hinv[i, i + 1 : i2], err, alpha=-1.0)
        loss += errors.double().pow(2).sum(0)
        if i2 < cols:
            wt[i2:].addmm_(hinv[i1:i2, i2:].T, errors, alpha=-1.0)
    start = 0
    for g, r0, r1 in chunk:
        n = r1 - r0
        codes[g][r0:r1] = qt[:, start : start + n].T
        if targets[g] is not None:
            targets[g][r0:r1] = tt[:, start : start + n].T
        losses[g][r0:r1] = loss[start : start + n]
        start += n


def _gptq_codes(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    outlier_mask: torch.Tensor | None,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ of one weight on one grid: see :func:`gptq_batch`."""
    return gptq_batch(weight, hessian, [Grid(bits, group_size, outlier_mask)], damp)[0][:4]


def _from_codes(q: torch.Tensor, zero: torch.Tensor, scale16: torch.Tensor, in_features: int):
    w = (q.float() - zero.float().unsqueeze(-1)) * scale16.float().unsqueeze(-1)
    return w.reshape(w.shape[0], -1)[:, :in_features]


def _quantize_any(weight, bits, group_size, outlier_mask, hessian):
    """(q, z, s, target): GPTQ when a Hessian is given, else round-to-nearest (target = weight)."""
    if hessian is None:
        return (*_codes(weight, bits, group_size, outlier_mask), weight.float())
    return _gptq_codes(weight, hessian, bits, group_size, outlier_mask)


def fake_quantize(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    outlier_mask: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
) -> torch.Tensor:
    """The matrix the runtime computes with (float32), without packing.

    Equal bit for bit to ``dequantize(qw) + outliers.to_dense()`` of :func:`quantize_layer`:
    outlier positions carry their fp16-rounded residual on top of the dense part.
    """
    if bits == FP16_BITS:
        return weight.to(torch.float16).float()
    q, z, s, target = _quantize_any(weight, bits, group_size, outlier_mask, hessian)
    dense = _from_codes(q, z, s, weight.shape[1])
    if outlier_mask is None:
        return dense
    residual = (target - dense).to(torch.float16).float()
    return dense + torch.where(outlier_mask, residual, 0.0)


def _pack_codes(q, z, s, bits: int, group_size: int, in_features: int) -> QuantizedWeight:
    return QuantizedWeight(pack(q, bits), s, pack(z, bits), bits, group_size, in_features)


def quantize(weight: torch.Tensor, bits: int, group_size: int, outlier_mask=None) -> QuantizedWeight:
    """Round-to-nearest quantize and pack ``W [N, K]``. Outlier positions only leave the min/max
    computation; :func:`quantize_layer` also returns their residuals."""
    return _pack_codes(*_codes(weight, bits, group_size, outlier_mask), bits, group_size, weight.shape[1])


def quantize_layer(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    outlier_mask: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
) -> tuple[QuantizedWeight, SparseOutliers | None]:
    """Packed dense part and CSR outliers of a layer; GPTQ when ``hessian`` (``X^T X`` of the
    layer's inputs) is given, round-to-nearest otherwise."""
    q, z, s, target = _quantize_any(weight, bits, group_size, outlier_mask, hessian)
    qw = _pack_codes(q, z, s, bits, group_size, weight.shape[1])
    if outlier_mask is None or not outlier_mask.any():  # no outliers: store no CSR at all
        return qw, None
    return qw, extract_outliers(target, qw, outlier_mask)


DEQUANTIZE_ELEMENTS = 1 << 24  # weights unpacked at a time: the temporaries are a few times the output's rows


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense ``W_hat [N, K]`` of a packed weight, a block of rows at a time (a 128k-row head
    would otherwise make several times its float32 size in int32 and float temporaries)."""
    out = torch.empty(qw.out_features, qw.in_features, dtype=dtype, device=qw.qweight.device)
    step = max(1, DEQUANTIZE_ELEMENTS // max(1, qw.in_features))
    for r0 in range(0, qw.out_features, step):
        r1 = min(r0 + step, qw.out_features)
        q = unpack(qw.qweight[r0:r1], qw.bits, qw.group_size)
        z = unpack(qw.qzeros[r0:r1], qw.bits, qw.n_blocks)
        out[r0:r1] = _from_codes(q, z, qw.scales[r0:r1], qw.in_features)
    return out


def extract_outliers(weight: torch.Tensor, qw: QuantizedWeight, mask: torch.Tensor) -> SparseOutliers:
    """CSR of the fp16 residuals ``W - W_hat`` at ``mask``."""
    residual = weight.float() - dequantize(qw)
    rows, cols = mask.nonzero(as_tuple=True)  # row-major order, as CSR needs
    counts = torch.bincount(rows, minlength=weight.shape[0])
    crow = torch.zeros(weight.shape[0] + 1, dtype=torch.int32, device=weight.device)
    crow[1:] = torch.cumsum(counts, 0)
    return SparseOutliers(
        crow=crow,
        col=cols.to(index_dtype(weight.shape[1])),
        values=residual[rows, cols].to(torch.float16),
        shape=tuple(weight.shape),
    )


def index_dtype(in_features: int) -> torch.dtype:
    return torch.int16 if in_features <= torch.iinfo(torch.int16).max else torch.int32


# --------------------------------------------------------------------------------------------
# outlier selection
# --------------------------------------------------------------------------------------------
def top_mask(score: torch.Tensor, n_outliers: int, per_row: bool = False) -> torch.Tensor:
    """Boolean mask of the ``n_outliers`` highest scores of ``score [out, in]``; ``per_row``: the
    same number in every row (the ELL layout of the onnx target, see :mod:`mqc.targets`)."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if per_row:
        mask.scatter_(1, torch.topk(score, n_outliers // score.shape[0], dim=1, sorted=False).indices, True)
    else:
        mask.view(-1)[torch.topk(score.flatten(), n_outliers, sorted=False).indices] = True
    return mask


def outlier_mask(
    weight: torch.Tensor, approx: torch.Tensor, n_outliers: int, energy: torch.Tensor | None, per_row: bool = False
) -> torch.Tensor | None:
    """The ``n_outliers`` weights whose quantization (to ``approx``) hurts most: score
    ``(W_ij - approx_ij)^2 * E[x_j^2]``, the squared error weighted by the energy of the input
    channel it multiplies (its expected share of the layer's output error for independent inputs;
    energy 1 without calibration). None when no outliers are kept."""
    if n_outliers == 0:
        return None
    score = (weight - approx).pow(2)
    if energy is not None:
        score = score * energy.to(score.device)
    return top_mask(score, n_outliers, per_row)


def split_count(total: int, rows: int, start: int, stop: int) -> int:
    """The share of ``total`` (outliers of a ``rows``-row matrix) of rows ``[start, stop)``: the
    shares of consecutive blocks add up to ``total`` exactly."""
    return total * stop // rows - total * start // rows


# --------------------------------------------------------------------------------------------
# byte accounting (the one function the budget and the artifact check are held to)
# --------------------------------------------------------------------------------------------
def weight_bytes(out_features: int, in_features: int, bits: int, group_size: int) -> int:
    """Bytes of the dense part: packed codes + fp16 scales + packed zeros, or fp16 weights."""
    if bits == FP16_BITS:
        return out_features * in_features * _FP16_BYTES
    blocks = n_blocks(in_features, group_size)
    codes = blocks * group_size * bits // 8
    return out_features * (codes + blocks * _FP16_BYTES + packed_len(blocks, bits))


def outlier_bytes(out_features: int, in_features: int, n_outliers: int) -> int:
    """CSR bytes: int32 row pointers, int16/int32 column indices, fp16 values (0 if none)."""
    if n_outliers == 0:
        return 0
    idx = torch.empty((), dtype=index_dtype(in_features)).element_size()
    return (out_features + 1) * _CSR_ROW_PTR_BYTES + n_outliers * (idx + _FP16_BYTES)


def ell_outlier_bytes(out_features: int, in_features: int, per_row: int) -> int:
    """ELL bytes (``per_row`` column indices and fp16 values in every row; ONNX exports)."""
    idx = 2 if in_features <= 2**16 else 4  # uint16 column indices where they fit
    return out_features * per_row * (idx + _FP16_BYTES)


def layer_bytes(
    out_features: int,
    in_features: int,
    bits: int,
    group_size: int,
    n_outliers: int = 0,
    has_bias: bool = False,
) -> int:
    """Every byte a layer stores: dense part, outliers, fp16 bias."""
    bias = out_features * _FP16_BYTES if has_bias else 0
    return (
        weight_bytes(out_features, in_features, bits, group_size)
        + outlier_bytes(out_features, in_features, n_outliers)
        + bias
    )


def n_outliers_for(out_features: int, in_features: int, outlier_frac: float) -> int:
    """Outlier count of a layer for a fraction of its weights (rounded down)."""
    return int(out_features * in_features * outlier_frac)


def average_bits(total_bytes: int, n_weights: int) -> float:
    return 8.0 * total_bytes / n_weights


# --------------------------------------------------------------------------------------------
# activations and KV cache (evaluation settings: values are quantized and used at once, never stored)
# --------------------------------------------------------------------------------------------
def fake_quantize_rows(x: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = False) -> torch.Tensor:
    """``x`` rounded to nearest on a grid per group of ``group_size`` along the last dim (None: the
    whole row), in ``x``'s dtype.

    Symmetric: ``s = max|x| / (2^(b-1) - 1)``, codes in ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (per-token
    int8/int4 activations, as W8A8 kernels take them). Asymmetric: the group's own min/max,
    ``s = (max - min) / (2^b - 1)``, ``z = round(-min / s)`` (a KV cache per token, as KIVI's
    values). Scales stay float32: these are the numerics of a kernel's registers, not of a
    stored format. A group that is all zeros stays zeros.
    """
    size = x.shape[-1]
    group = group_size or size
    if size % group:
        raise ValueError(f"last dim {size} is not a multiple of the group size {group}")
    xg = x.float().reshape(-1, size // group, group)
    tiny = torch.finfo(torch.float32).tiny
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = (xg.abs().amax(-1, keepdim=True) / qmax).clamp(min=tiny)
        out = (xg / scale).round().clamp(-qmax, qmax) * scale
    else:
        levels = 2**bits - 1
        lo, hi = xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
        scale = ((hi - lo) / levels).clamp(min=tiny)
        zero = (-lo / scale).round()
        out = (((xg / scale).round() + zero).clamp(0, levels) - zero) * scale
    return out.reshape(x.shape).to(x.dtype)


# --------------------------------------------------------------------------------------------
# KV-cache numerics (KIVI): min/max grids without the weights' zero-containing range
# --------------------------------------------------------------------------------------------
def quantize_minmax(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed codes, fp16 scale, fp16 minimum) of ``x`` per group of ``group_size`` along the
    last dim, ``x_hat = code * scale + minimum`` (KIVI's grid).

    Unlike weights, a cache group's range is not widened to contain 0: keys of one channel often
    sit far from 0 (widening cost 1-2 bits there). The fp16 scale and minimum are the ones the
    codes are computed with, so the dequantized values are reproducible from what is stored.
    Codes: ``[..., packed_len(n, bits)]`` with :func:`pack`; scale/minimum ``[..., n / g]``.
    """
    size = x.shape[-1]
    if size % group_size:
        raise ValueError(f"last dim {size} is not a multiple of the group size {group_size}")
    levels = (1 << bits) - 1
    xg = x.float().reshape(*x.shape[:-1], size // group_size, group_size)
    lo16 = xg.amin(-1).to(torch.float16)
    scale16 = ((xg.amax(-1) - lo16.float()) / levels).clamp(_FP16_MIN_NORMAL, 65504.0).to(torch.float16)
    codes = torch.clamp(torch.round((xg - lo16.float().unsqueeze(-1)) / scale16.float().unsqueeze(-1)), 0, levels)
    return pack(codes.reshape(x.shape).to(torch.int32), bits), scale16, lo16


def code_planes(
    packed: torch.Tensor,
    bits: int,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """The codes of a 2/4/8-bit :func:`pack` stream as ``[8/bits, *packed.shape]`` of ``dtype``:
    plane ``i`` holds the ``i``-th code of every byte (stream position ``j * 8/bits + i`` is
    ``planes[i, ..., j]``).

    This is the cache's per-step path: each plane is one contiguous widening, and the consumer
    multiplies every plane with the other operand at once, putting the small product back in
    stream order instead of the codes (interleaving the codes cost more than the shifts and the
    conversion together on the CPU, measured). ``out`` (``dtype``) and ``scratch`` (uint8), both
    of the result's shape, are written instead of allocating: a fresh multi-MB tensor per step
    costs page faults.
    """
    per_byte, mask = 8 // bits, (1 << bits) - 1
    if out is None:
        out = torch.empty(per_byte, *packed.shape, dtype=dtype, device=packed.device)
        scratch = torch.empty(per_byte, *packed.shape, dtype=torch.uint8, device=packed.device)
    if bits == 8:
        return out.copy_(packed[None])
    for i in range(per_byte):
        if i == per_byte - 1:
            torch.bitwise_right_shift(packed, i * bits, out=scratch[i])
        elif i == 0:
            torch.bitwise_and(packed, mask, out=scratch[i])
        else:
            torch.bitwise_and(torch.bitwise_right_shift(packed, i * bits), mask, out=scratch[i])
    return out.copy_(scratch)


def codes_float(packed: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """All codes of a 2/4/8-bit :func:`pack` stream as ``dtype``, in stream order."""
    return code_planes(packed, bits, dtype).movedim(0, -1).flatten(-2)


def dequantize_minmax(
    packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """float32 ``x_hat`` of :func:`quantize_minmax`."""
    codes = codes_float(packed, bits)
    xg = codes.reshape(*codes.shape[:-1], -1, group_size)
    out = xg * scale.float().unsqueeze(-1) + minimum.float().unsqueeze(-1)
    return out.flatten(-2)


def minmax_bytes(count: int, bits: int, group_size: int) -> int:
    """Stored bytes of ``count`` values on :func:`quantize_minmax`'s grid (fp16: 2 per value)."""
    if bits == FP16_BITS:
        return count * _FP16_BYTES
    return packed_len(count, bits) + (count // group_size) * 2 * _FP16_BYTES
