"""``torch.library`` custom ops of the quantized runtime.

Each op has a fake (meta) implementation, so a quantized model stays exportable: under
``torch.export`` a ``QLinear`` is one opaque ``mqc::qlinear`` node that the ONNX exporter maps
to ``MatMulNBits``. The CPU implementation is the reference: dequantize with :mod:`mqc.quant`,
add the sparse outliers, then one dense matmul. A CUDA implementation that calls the fused
kernels is registered by :mod:`mqc.kernels.launch` when CuPy is importable.
"""

from __future__ import annotations

import torch

from mqc.quant import QuantizedWeight, SparseOutliers, dequantize


def dense_weight(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
    outlier_crow: torch.Tensor | None,
    outlier_col: torch.Tensor | None,
    outlier_values: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``W_hat + S`` as a dense matrix: what every implementation must agree with."""
    qw = QuantizedWeight(qweight, scales, qzeros, bits, group_size, in_features)
    weight = dequantize(qw, torch.float32)
    if outlier_values is not None and outlier_values.numel():
        sparse = SparseOutliers(outlier_crow, outlier_col, outlier_values, tuple(weight.shape))
        weight = weight + sparse.to_dense()
    return weight.to(dtype)


@torch.library.custom_op("mqc::qlinear", mutates_args=())
def qlinear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
    outlier_crow: torch.Tensor | None,
    outlier_col: torch.Tensor | None,
    outlier_values: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    weight = dense_weight(
        qweight, scales, qzeros, bits, group_size, in_features, outlier_crow, outlier_col, outlier_values, x.dtype
    )
    return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))


@qlinear.register_fake
def _(x, qweight, scales, qzeros, bits, group_size, in_features, outlier_crow, outlier_col, outlier_values, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))
