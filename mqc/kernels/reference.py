"""The result the fused GEMV kernels must match, in plain torch.

``out = fp16( x W_hat^T + x S^T + bias )`` with ``W_hat`` from :func:`mqc.quant.dequantize`,
``S`` the CSR outliers, and every product and sum in fp32: the kernel's own arithmetic (fp32
accumulation over exact ``(q - z) * s``), up to the order of the additions. Tests hold the kernel
to ``|out - ref| <= atol + rtol * |ref|`` against this function (tests/test_kernels.py).

This is deliberately not the CPU runtime path of ``mqc::qlinear``: that one rounds the dense
weight to the activation dtype before its matmul, as a fast fp16 GEMM would, so it is itself a
few fp16 ulps away from the exact result this reference defines.
"""

from __future__ import annotations

import torch

from mqc.quant import QuantizedWeight, SparseOutliers, dequantize


def qgemv_reference(
    x: torch.Tensor,
    qw: QuantizedWeight,
    outliers: SparseOutliers | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [..., K] -> [..., N]`` in x's dtype, computed in fp32 from the packed weight."""
    weight = dequantize(qw, torch.float32)
    if outliers is not None and outliers.nnz:
        weight = weight + outliers.to_dense(torch.float32)
    out = x.float() @ weight.T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def qgemv_reference_siblings(
    x: torch.Tensor,
    siblings: list[tuple[QuantizedWeight, SparseOutliers | None, torch.Tensor | None]],
) -> list[torch.Tensor]:
    """One output per sibling projection of the same input: what a fused sibling launch returns."""
    return [qgemv_reference(x, qw, sparse, bias) for qw, sparse, bias in siblings]
