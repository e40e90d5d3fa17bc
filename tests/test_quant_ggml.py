"""llama.cpp block formats: bytes decode (by the gguf package) to the fitted grid, exact sizes,
never worse than round-to-nearest of the same format, GPTQ onto the fixed grids."""

import gguf
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mqc import quant_ggml as G


def _weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0, 3] = 0.8  # an outlier stretching its block
    w[1, : min(cols, 256)] = 0.0  # an all-zero (super-)block
    w[2, :32] = torch.rand(32, generator=g)  # a block of one sign
    return w


def _rtn(name, w, f):
    t = G.TYPES[name]
    return G._codes(w.reshape(w.shape[0], -1, t.sub), f.zero, f.scale, t.levels).reshape(w.shape[0], -1)


@pytest.mark.parametrize("name", list(G.TYPES))
def test_packed_bytes_decode_to_the_grid(name):
    w = _weight(8, 512, 0)
    f = G.fit(name, w, torch.rand(512) + 0.1)
    codes = _rtn(name, w, f)
    gw = G.pack(name, codes, f)
    assert gw.blocks.dtype == torch.uint8 and gw.nbytes() == G.tensor_bytes(name, 8, 512)
    decoded = gguf.quants.dequantize(gw.blocks.numpy(), G.TYPES[name].qtype)
    assert decoded.shape == (8, 512)
    np.testing.assert_allclose(decoded, G.grid_values(name, codes, f).numpy(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(G.dequantize(gw), torch.from_numpy(decoded), rtol=0, atol=0)
    torch.testing.assert_close(G.dequantize(gw, torch.tensor([5, 2])), torch.from_numpy(decoded[[5, 2]]), rtol=0, atol=0)


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(list(G.TYPES)), seed=st.integers(0, 10_000), scale=st.floats(1e-3, 10.0))
def test_encoder_never_worse_than_plain_rtn(name, seed, scale):
    w = _weight(4, 256, seed) * scale
    imp = torch.rand(256, generator=torch.Generator().manual_seed(seed)) + 0.01
    mine = G.dequantize(G.encode(w, name, importance=imp))
    plain = G.plain_fit(name, w)
    rtn = G.grid_values(name, _rtn(name, w, plain), plain)
    err = lambda a: float(((a - w) ** 2 * imp).sum())  # noqa: E731
    assert err(mine) <= err(rtn) * (1 + 1e-5) + 1e-12


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_no_worse_than_the_gguf_package_quantizer(name):
    """The package's own round-to-nearest (llama.cpp's reference for these formats)."""
    w = _weight(16, 256, 1)
    qtype = G.TYPES[name].qtype
    theirs = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype)
    mine = G.dequantize(G.encode(w, name)).numpy()
    assert ((mine - w.numpy()) ** 2).sum() <= ((theirs - w.numpy()) ** 2).sum() * (1 + 1e-5)


def test_sizes_and_row_constraints():
    assert G.tensor_bytes("Q4_K", 10, 1536) == 10 * 6 * 144
    assert G.tensor_bytes("Q8_0", 3, 576) == 3 * 18 * 34
    assert G.tensor_bytes("F16", 3, 576) == 3 * 576 * 2
    assert G.fits("Q4_0", 576) and not G.fits("Q4_K", 576) and G.fits("Q6_K", 1536)
    assert {n: G.TYPES[n].bits_per_weight for n in ("Q2_K", "Q3_K", "Q6_K")} == {"Q2_K": 2.625, "Q3_K": 3.4375, "Q6_K": 6.5625}
    with pytest.raises(ValueError, match="multiple of 256"):
        G.encode(torch.randn(2, 576), "Q3_K")
    with pytest.raises(ValueError, match="unknown llama.cpp type"):
        G.check_types(["Q4_0", "Q7_K"])


@pytest.mark.parametrize("name", ["Q3_K", "Q4_0", "Q4_K", "Q6_K"])
def test_gptq_lowers_output_error_on_the_same_grid(name):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 256, generator=g) * 0.05
    x = torch.randn(2048, 256, generator=g) @ (torch.eye(256) + 0.3 * torch.randn(256, 256, generator=g) / 16)
    h = x.T @ x / x.shape[0]
    out_err = lambda a: float(torch.einsum("ik,kl,il->", a - w, h, a - w))  # noqa: E731
    rtn = G.dequantize(G.encode(w, name, importance=torch.diag(h)))
    gptq = G.dequantize(G.encode(w, name, hessian=h))
    assert out_err(gptq) < 0.9 * out_err(rtn)
