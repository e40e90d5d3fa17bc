"""llama.cpp's block formats: fit, encode, pack, decode and byte accounting.

:mod:`mqc.quant` owns mqc's own layout; this module is its sibling for the formats a GGUF file
stores, so that a plan made for llama.cpp is priced, quantized and written by one piece of code.
Every format quantizes a row in blocks along the input dimension, each weight being
``W_hat = s * (q - z)`` with one ``(s, z)`` per sub-block:

=======  =====  =====  ====  ==============================================================
type     block  bytes  sub   sub-block grid
=======  =====  =====  ====  ==============================================================
Q8_0     32     34     32    s = d (fp16), z = 128 (int8 codes, d = amax / 127)
Q4_0     32     18     32    s = d, z = 8
Q5_0     32     22     32    s = d, z = 16
Q4_1     32     20     32    s = d, z = -m / d (fp16 d and m: W_hat = d q + m)
Q5_1     32     24     32    as Q4_1, 5-bit codes
Q2_K     256    84     16    s = d sc, z = dmin mn / s (4-bit sc, mn; fp16 d, dmin)
Q3_K     256    110    16    s = d sc, z = 4 (signed 6-bit sc)
Q4_K     256    144    32    s = d sc, z = dmin mn / s (6-bit sc, mn)
Q5_K     256    176    32    as Q4_K, 5-bit codes
Q6_K     256    210    16    s = d sc, z = 32 (int8 sc)
=======  =====  =====  ====  ==============================================================

A row whose length is not a multiple of the block cannot be stored in that type (llama.cpp
refuses it); :func:`fits` says which types a tensor can take.

Fitting: each sub-block's range is searched over the shrink factors of
:data:`mqc.quant.CLIP_SHRINKS`, weighting the squared error of every weight by its input
column's energy (llama.cpp's importance-matrix idea), then the k-quants' sub-block scales are
rounded to their 4/6/8-bit super-block format. Per block the result is kept only where its
weighted error after that rounding beats the plain min/max grid, so the encoder is never worse
than round-to-nearest of the same format. Codes are then rounded onto the fixed grid, or placed
by GPTQ (:func:`mqc.quant.gptq_batch` with ``Grid.fixed``), which works for any block format.

Decoding is the ``gguf`` package's own dequantizer (the reference implementation of the byte
layout that llama.cpp reads); the tests check that packed bytes decode to the fitted grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch

from mqc import quant

F16 = "F16"


@dataclass(frozen=True)
class GgmlType:
    name: str
    block: int  # weights per block (a row must be a multiple of it)
    type_size: int  # bytes per block
    sub: int  # weights sharing one (s, z)
    bits: int  # code width
    kind: str  # "sym": s = d, integer z; "affine": d, m; "kmin"/"ksym": k-quant super-blocks
    scale_bits: int = 0  # k-quants: width of the sub-block scale integers

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    @property
    def zero(self) -> int:
        """The integer zero of symmetric formats (codes are stored minus it)."""
        return 1 << (self.bits - 1)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block

    @property
    def qtype(self) -> gguf.GGMLQuantizationType:
        return gguf.GGMLQuantizationType[self.name]


TYPES: dict[str, GgmlType] = {
    t.name: t
    for t in (
        GgmlType("Q2_K", 256, 84, 16, 2, "kmin", 4),
        GgmlType("Q3_K", 256, 110, 16, 3, "ksym", 6),
        GgmlType("Q4_0", 32, 18, 32, 4, "sym"),
        GgmlType("Q4_1", 32, 20, 32, 4, "affine"),
        GgmlType("Q4_K", 256, 144, 32, 4, "kmin", 6),
        GgmlType("Q5_0", 32, 22, 32, 5, "sym"),
        GgmlType("Q5_1", 32, 24, 32, 5, "affine"),
        GgmlType("Q5_K", 256, 176, 32, 5, "kmin", 6),
        GgmlType("Q6_K", 256, 210, 16, 6, "ksym", 8),
        GgmlType("Q8_0", 32, 34, 32, 8, "sym"),
    )
}
ALL_TYPES: tuple[str, ...] = tuple(TYPES) + (F16,)
_FP16_MIN_NORMAL = 2.0**-14


def check_types(names) -> tuple[str, ...]:
    bad = [n for n in names if n not in ALL_TYPES]
    if bad:
        raise ValueError(f"unknown llama.cpp type(s) {', '.join(bad)}; use some of {', '.join(ALL_TYPES)}")
    return tuple(names)


def fits(name: str, in_features: int) -> bool:
    """Whether rows of ``in_features`` weights can be stored in type ``name``."""
    return name == F16 or in_features % TYPES[name].block == 0


def tensor_bytes(name: str, out_features: int, in_features: int) -> int:
    """Exact bytes of a ``[out, in]`` tensor in type ``name`` (blocks include their scales)."""
    if name == F16:
        return 2 * out_features * in_features
    if not fits(name, in_features):
        raise ValueError(f"{name} needs rows of a multiple of {TYPES[name].block} weights, got {in_features}")
    t = TYPES[name]
    return out_features * (in_features // t.block) * t.type_size


@dataclass(frozen=True)
class GgmlWeight:
    """A weight in one llama.cpp type: the GGUF tensor data, rows of whole blocks."""

    fmt: str
    blocks: torch.Tensor  # uint8 [out, row_bytes]
    in_features: int

    @property
    def out_features(self) -> int:
        return self.blocks.shape[0]

    def nbytes(self) -> int:
        return self.blocks.numel()


def dequantize(gw: GgmlWeight, rows: torch.Tensor | None = None) -> torch.Tensor:
    """float32 ``[out, in]`` (or the selected ``rows``), decoded by the ``gguf`` package."""
    data = gw.blocks if rows is None else gw.blocks[rows]
    out = gguf.quants.dequantize(data.cpu().numpy(), TYPES[gw.fmt].qtype)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(data.shape[0], gw.in_features)


# --------------------------------------------------------------------------------------------
# fitting
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Fit:
    """A fitted grid: stored integers and floats, and the (zero, scale) per sub-block they mean."""

    d: torch.Tensor  # fp16 [N, n_blocks]: block (super-block) scale
    m: torch.Tensor | None  # fp16 [N, n_blocks]: Q4_1/Q5_1 min, k-quant dmin
    sc: torch.Tensor | None  # int32 [N, n_sub]: k-quant sub-block scale
    mn: torch.Tensor | None  # int32 [N, n_sub]: k-quant sub-block min
    zero: torch.Tensor  # float32 [N, n_sub]
    scale: torch.Tensor  # float32 [N, n_sub]


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to fp16 keeping the sign and never reaching 0 (a zero scale has no codes)."""
    sign = torch.where(x < 0, -1.0, 1.0)
    return (sign * x.abs().clamp(_FP16_MIN_NORMAL, 65504.0)).to(torch.float16)


def _codes(x: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, levels: int) -> torch.Tensor:
    return torch.clamp(torch.round(x / scale.unsqueeze(-1) + zero.unsqueeze(-1)), 0, levels)


def _sub_error(x, imp, zero, scale, levels):
    """Importance-weighted squared rounding error per sub-block of ``x [..., sub]``."""
    q = _codes(x, zero, scale, levels)
    return ((q - zero.unsqueeze(-1)) * scale.unsqueeze(-1) - x).pow(2).mul(imp).sum(-1)


def _search(x, imp, grid_of, levels, search: bool):
    """The (zero, scale) of ``grid_of(shrink)`` with the least weighted error per sub-block."""
    shrinks = quant.CLIP_SHRINKS if search else (1.0,)
    best = best_err = None
    for shrink in shrinks:
        zero, scale = grid_of(shrink)
        err = _sub_error(x, imp, zero, scale, levels)
        if best is None:
            best, best_err = (zero, scale), err
            continue
        better = err < best_err
        best = tuple(torch.where(better, new, old) for new, old in zip((zero, scale), best))
        best_err = torch.minimum(err, best_err)
    return best


def _extreme(x: torch.Tensor) -> torch.Tensor:
    """The signed value of largest magnitude of each group (llama.cpp's ``max`` of Q4_0/Q3_K)."""
    return torch.gather(x, -1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)


def _fit(t: GgmlType, w: torch.Tensor, imp: torch.Tensor, search: bool) -> _Fit:
    """Fit the grid of every sub-block of ``w [N, K]`` (``imp [N, K]`` weights the error)."""
    n = w.shape[0]
    x = w.reshape(n, -1, t.sub)
    wi = imp.reshape(n, -1, t.sub)
    if t.kind in ("sym", "ksym"):
        ext = _extreme(x)
        z = torch.full_like(ext, float(t.zero))

        # llama.cpp's choice: the extreme weight on the far negative code (Q4_0: -8), except Q8_0's
        # symmetric amax / 127
        reach = t.zero - 1 if t.bits == 8 else t.zero

        def grid(shrink):
            d = ext * shrink / -reach
            return z, (_fp16(d).float() if t.kind == "sym" else torch.where(d == 0, _FP16_MIN_NORMAL, d))

    else:
        lo, hi = x.amin(-1), x.amax(-1)
        if t.kind == "kmin":  # k-quants store a non-negative min: the range contains 0
            lo, hi = lo.clamp_max(0.0), hi.clamp_min(0.0)
        mid, half = (lo + hi) / 2, (hi - lo) / 2

        def grid(shrink):
            a, b = (lo * shrink, hi * shrink) if t.kind == "kmin" else (mid - half * shrink, mid + half * shrink)
            d = ((b - a) / t.levels).clamp_min(_FP16_MIN_NORMAL)
            if t.kind == "affine":
                d16, m16 = _fp16(d).float(), a.to(torch.float16).float()
                return -m16 / d16, d16
            return -a / d, d

    zero, scale = _search(x, wi, grid, t.levels, search)
    if t.kind == "sym":
        return _Fit(scale.to(torch.float16), None, None, None, zero, scale)
    if t.kind == "affine":
        return _Fit(scale.to(torch.float16), (-zero * scale).to(torch.float16), None, None, zero, scale)
    return _superblock(t, n, zero, scale)


def _superblock(t: GgmlType, n: int, zero: torch.Tensor, scale: torch.Tensor) -> _Fit:
    """Round k-quant sub-block scales (and mins) to integers under one fp16 scale per 256."""
    per = t.block // t.sub
    s = scale.reshape(n, -1, per)
    if t.kind == "ksym":  # signed integers; the extreme one takes the negative end, as llama.cpp's
        lo, hi = -(1 << (t.scale_bits - 1)), (1 << (t.scale_bits - 1)) - 1
        d = _fp16(_extreme(s) / lo)
        sc = torch.clamp(torch.round(s / d.float().unsqueeze(-1)), lo, hi)
        sc = torch.where(sc == 0, torch.where(s * d.float().unsqueeze(-1) >= 0, 1.0, -1.0), sc)  # never 0
        eff = (d.float().unsqueeze(-1) * sc).reshape(n, -1)
        return _Fit(d, None, sc.reshape(n, -1).int(), None, torch.full_like(eff, float(t.zero)), eff)
    top = (1 << t.scale_bits) - 1
    mins = (zero * scale).reshape(n, -1, per)  # s * z = the non-negative offset
    d = _fp16(s.amax(-1) / top)
    dmin = _fp16(mins.amax(-1) / top)
    sc = torch.clamp(torch.round(s / d.float().unsqueeze(-1)), 1, top)
    mn = torch.clamp(torch.round(mins / dmin.float().unsqueeze(-1)), 0, top)
    eff = (d.float().unsqueeze(-1) * sc).reshape(n, -1)
    offset = (dmin.float().unsqueeze(-1) * mn).reshape(n, -1)
    return _Fit(d, dmin, sc.reshape(n, -1).int(), mn.reshape(n, -1).int(), offset / eff, eff)


def _block_error(t: GgmlType, w, imp, fit: _Fit) -> torch.Tensor:
    n = w.shape[0]
    err = _sub_error(w.reshape(n, -1, t.sub), imp.reshape(n, -1, t.sub), fit.zero, fit.scale, t.levels)
    return err.reshape(n, -1, t.block // t.sub).sum(-1)


def _choose(t: GgmlType, take: torch.Tensor, a: _Fit, b: _Fit) -> _Fit:
    """``a`` where ``take [N, n_blocks]``, else ``b``, field by field."""
    per = t.block // t.sub
    sub_take = take.repeat_interleave(per, dim=1)

    def pick(x, y):
        if x is None:
            return None
        return torch.where(take if x.shape == take.shape else sub_take, x, y)

    return _Fit(*(pick(getattr(a, f), getattr(b, f)) for f in ("d", "m", "sc", "mn", "zero", "scale")))


def fit(name: str, weight: torch.Tensor, importance: torch.Tensor | None = None) -> _Fit:
    """The grid of ``weight [N, K]`` in type ``name``: searched, never worse than min/max per block."""
    t = TYPES[name]
    w = weight.float()
    if not fits(name, w.shape[1]):
        raise ValueError(f"{name} needs rows of a multiple of {t.block} weights, got {w.shape[1]}")
    imp = torch.ones_like(w) if importance is None else importance.float().expand_as(w)
    plain = _fit(t, w, imp, search=False)
    searched = _fit(t, w, imp, search=True)
    return _choose(t, _block_error(t, w, imp, searched) < _block_error(t, w, imp, plain), searched, plain)


def plain_fit(name: str, weight: torch.Tensor) -> _Fit:
    """Round-to-nearest's grid: min/max (or extreme) per sub-block, no search, no importance."""
    w = weight.float()
    return _fit(TYPES[name], w, torch.ones_like(w), search=False)


# --------------------------------------------------------------------------------------------
# packing
# --------------------------------------------------------------------------------------------
def _interleave(c: torch.Tensor, h: int, s: int, p: int, width: int) -> torch.Tensor:
    """Bytes where byte ``hh*p + i`` holds, at bit ``ss*width``, element ``hh*s*p + ss*p + i``."""
    shifts = (torch.arange(s, dtype=torch.int32) * width).view(1, 1, s, 1)
    return (c.reshape(c.shape[0], h, s, p) << shifts).sum(2).reshape(c.shape[0], -1)


def _half_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(x.shape[0], 2).int()


def _kscales(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: eight 6-bit scales and mins in 12 bytes."""
    lo = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    mid = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return torch.cat([lo, mid, hi], 1)


def _q3scales(sc: torch.Tensor) -> torch.Tensor:
    """Q3_K: sixteen signed 6-bit scales, stored plus 32, in 12 bytes."""
    u = sc + 32
    low = (u[:, :8] & 15) | ((u[:, 8:] & 15) << 4)
    return torch.cat([low, _interleave(u >> 4 & 3, 1, 4, 4, 2)], 1)


def _pack_blocks(t: GgmlType, c: torch.Tensor, f: _Fit, b: int) -> torch.Tensor:
    """One block column ``b`` of every row: codes ``c [N, block]`` -> bytes ``[N, type_size]``."""
    per = t.block // t.sub
    d = _half_bytes(f.d[:, b])
    if t.kind == "sym" and t.bits == 8:
        return torch.cat([d, (c - t.zero) & 0xFF], 1)
    if t.kind in ("sym", "affine"):
        head = [d] if t.kind == "sym" else [d, _half_bytes(f.m[:, b])]
        low = _interleave(c & 15, 1, 2, 16, 4)
        high = [_interleave(c >> 4, 4, 8, 1, 1)] if t.bits == 5 else []
        return torch.cat(head + high + [low], 1)
    sc = f.sc[:, b * per : (b + 1) * per]
    if t.name == "Q2_K":
        scales = sc | (f.mn[:, b * per : (b + 1) * per] << 4)
        return torch.cat([scales, _interleave(c, 2, 4, 32, 2), d, _half_bytes(f.m[:, b])], 1)
    if t.name == "Q3_K":
        return torch.cat([_interleave(c >> 2, 1, 8, 32, 1), _interleave(c & 3, 2, 4, 32, 2), _q3scales(sc), d], 1)
    if t.name in ("Q4_K", "Q5_K"):
        head = [d, _half_bytes(f.m[:, b]), _kscales(sc, f.mn[:, b * per : (b + 1) * per])]
        high = [_interleave(c >> 4, 1, 8, 32, 1)] if t.bits == 5 else []
        return torch.cat(head + high + [_interleave(c & 15, 4, 2, 32, 4)], 1)
    # Q6_K
    return torch.cat([_interleave(c & 15, 2, 2, 64, 4), _interleave(c >> 4, 2, 4, 32, 2), sc & 0xFF, d], 1)


def pack(name: str, codes: torch.Tensor, f: _Fit) -> GgmlWeight:
    """GGUF tensor data of codes ``[N, K]`` (in ``[0, levels]``) on the fitted grid ``f``."""
    t = TYPES[name]
    c = codes.reshape(codes.shape[0], -1).int()
    parts = [_pack_blocks(t, c[:, b * t.block : (b + 1) * t.block], f, b) for b in range(c.shape[1] // t.block)]
    return GgmlWeight(name, torch.cat(parts, 1).to(torch.uint8).contiguous(), c.shape[1])


def grid_values(name: str, codes: torch.Tensor, f: _Fit) -> torch.Tensor:
    """``s * (q - z)`` of codes ``[N, K]``: what the packed bytes decode to (up to float rounding)."""
    t = TYPES[name]
    n = codes.shape[0]
    q = codes.reshape(n, -1, t.sub).float()
    return ((q - f.zero.unsqueeze(-1)) * f.scale.unsqueeze(-1)).reshape(n, -1)


# --------------------------------------------------------------------------------------------
# encoding
# --------------------------------------------------------------------------------------------
def encode_batch(
    weight: torch.Tensor,
    names: list[str],
    importance: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
) -> list[GgmlWeight]:
    """``weight [N, K]`` in each type of ``names``: GPTQ onto the fitted grids when ``hessian``
    (``E[x x^T]`` of the layer's input) is given, round-to-nearest otherwise. ``importance``
    (``[K]``, default ``diag(hessian)``) weights the grid fit."""
    w = weight.float()
    quant.check_finite(w)
    if importance is None and hessian is not None:
        importance = torch.diag(hessian).float()
    fits_ = [fit(name, w, importance) for name in names]
    if hessian is None:
        codes = [_codes(w.reshape(w.shape[0], -1, TYPES[n].sub), f.zero, f.scale, TYPES[n].levels) for n, f in zip(names, fits_)]
    else:
        grids = [quant.Grid(TYPES[n].bits, TYPES[n].sub, fixed=(f.zero, f.scale)) for n, f in zip(names, fits_)]
        codes = [result.q for result in quant.gptq_batch(w, hessian, grids)]
    return [pack(n, q.reshape(w.shape[0], -1), f) for n, q, f in zip(names, codes, fits_)]


def encode(weight, name, importance=None, hessian=None) -> GgmlWeight:
    """One type of :func:`encode_batch`."""
    return encode_batch(weight, [name], importance, hessian)[0]
