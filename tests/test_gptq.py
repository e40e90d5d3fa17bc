"""GPTQ: same packed format as RTN, lower output error on correlated inputs, exact outliers."""

import pytest
import torch

from mqc import quant


@pytest.fixture(scope="module")
def layer():
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(96, 96, generator=gen) / 10 + torch.eye(96)  # correlated input channels
    x = torch.randn(4096, 96, generator=gen) @ mix * (torch.rand(96, generator=gen) * 3 + 0.1)
    weight = torch.randn(40, 96, generator=gen)
    return weight, x, x.T @ x / x.shape[0]


def output_error(x, weight, approx):
    return float(((x @ (approx - weight).T) ** 2).mean())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_beats_rtn_on_its_objective(layer, bits):
    weight, x, hessian = layer
    rtn = quant.fake_quantize(weight, bits, 32)
    gptq = quant.fake_quantize(weight, bits, 32, hessian=hessian)
    assert output_error(x, weight, gptq) < 0.97 * output_error(x, weight, rtn)


@pytest.mark.parametrize("bits", [3, 4])
def test_packed_result_matches_fake_quantize(layer, bits):
    weight, _, hessian = layer
    mask = torch.rand(weight.shape, generator=torch.Generator().manual_seed(1)) < 0.02
    qw, sparse = quant.quantize_layer(weight, bits, 32, mask, hessian)
    runtime = quant.dequantize(qw) + sparse.to_dense()
    assert torch.equal(runtime, quant.fake_quantize(weight, bits, 32, mask, hessian))
    # the dense part is on the grid: re-quantizing it with its own scales changes nothing
    codes = quant.unpack(qw.qweight, bits, 32)
    assert int(codes.max()) <= (1 << bits) - 1


def test_dead_input_channels_are_zeroed(layer):
    weight, x, _ = layer
    x = x.clone()
    x[:, 5] = 0.0
    hessian = x.T @ x / x.shape[0]
    approx = quant.fake_quantize(weight, 4, 32, hessian=hessian)
    assert torch.all(approx[:, 5] == 0) and torch.isfinite(approx).all()
