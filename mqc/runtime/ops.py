"""``torch.library`` custom ops of the quantized runtime.

Each op has a fake (meta) implementation, so a quantized model stays exportable: under
``torch.export`` a ``QLinear`` is one opaque ``mqc::qlinear`` node that the ONNX exporter maps
to ``MatMulNBits``. The CPU implementation is the reference: dequantize with :mod:`mqc.quant`,
add the sparse outliers, then one dense matmul. Gradients flow to the input only (the packed
weights are constants), so losses can still be backpropagated through a quantized model. A CUDA implementation that calls the fused
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


def _save_for_backward(ctx, inputs, output) -> None:
    _, qweight, scales, qzeros, bits, group_size, in_features, crow, col, values, _ = inputs
    ctx.save_for_backward(qweight, scales, qzeros, crow, col, values)
    ctx.shape_args = (bits, group_size, in_features)


def _backward(ctx, grad: torch.Tensor):
    qweight, scales, qzeros, crow, col, values = ctx.saved_tensors
    bits, group_size, in_features = ctx.shape_args
    weight = dense_weight(qweight, scales, qzeros, bits, group_size, in_features, crow, col, values, grad.dtype)
    return (grad @ weight,) + (None,) * 10


qlinear.register_autograd(_backward, setup_context=_save_for_backward)
