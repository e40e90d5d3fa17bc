"""mqc.quant: bit-exact packing, the grid's error bounds, padding, outliers, byte accounting, and
the 2/4/8-bit layout checked against onnxruntime's MatMulNBits itself."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mqc import quant
from mqc.errors import InvalidWeightsError

BITS = st.sampled_from(quant.QUANT_BITS)
GROUPS = st.sampled_from(quant.GROUP_SIZES)
FP16_REL = 2.0**-11  # unit roundoff of fp16 (10 explicit mantissa bits)


def random_weight(seed: int, rows: int, cols: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale


def per_weight(params: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """Broadcast a per-group ``[N, n_blocks]`` tensor to ``[N, K]``."""
    return params.float().repeat_interleave(group_size, dim=1)[:, :in_features]


weights = st.builds(
    random_weight,
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(1, 6),
    cols=st.integers(1, 300),
    scale=st.sampled_from([1e-3, 0.05, 1.0, 40.0]),
)


# --------------------------------------------------------------------------------------------
# packing
# --------------------------------------------------------------------------------------------
@given(bits=BITS, rows=st.integers(1, 4), count=st.integers(1, 70), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(bits, rows, count, seed):
    codes = torch.randint(0, 1 << bits, (rows, count), generator=torch.Generator().manual_seed(seed))
    packed = quant.pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, quant.packed_len(count, bits))
    assert torch.equal(quant.unpack(packed, bits, count), codes.to(torch.uint8))


@given(bits=BITS, words=st.integers(1, 12), seed=st.integers(0, 2**31 - 1))
def test_every_byte_stream_is_a_valid_packing(bits, words, seed):
    """unpack then pack returns any whole-word byte stream unchanged: no bit is wasted or lost."""
    word_bytes, per_word = quant.word_layout(bits)
    stream = torch.randint(0, 256, (3, words * word_bytes), generator=torch.Generator().manual_seed(seed))
    stream = stream.to(torch.uint8)
    assert torch.equal(quant.pack(quant.unpack(stream, bits, words * per_word), bits), stream)


@pytest.mark.parametrize(
    "bits, codes, expected",
    [
        (2, [1, 2, 3, 0, 3], [0b00_11_10_01, 0b11]),  # lowest bits first, zero-padded last byte
        (4, [0xA, 0x5, 0xF], [0x5A, 0x0F]),
        (8, [7, 255], [7, 255]),
        # 3 bits: 8 codes in one little-endian 24-bit word, code i at bits 3i
        (3, list(range(8)), list(sum(i << (3 * i) for i in range(8)).to_bytes(3, "little"))),
    ],
)
def test_packed_bit_layout(bits, codes, expected):
    assert quant.pack(torch.tensor([codes]), bits).tolist() == [expected]


# --------------------------------------------------------------------------------------------
# quantization
# --------------------------------------------------------------------------------------------
@given(weight=weights, bits=BITS, group_size=GROUPS)
def test_dequantize_equals_fake_quantize_bit_for_bit(weight, bits, group_size):
    qw = quant.quantize(weight, bits, group_size)
    assert qw.qweight.shape == (weight.shape[0], quant.n_blocks(weight.shape[1], group_size), group_size * bits // 8)
    assert torch.equal(quant.dequantize(qw), quant.fake_quantize(weight, bits, group_size))


@given(weight=weights, bits=BITS, group_size=GROUPS)
def test_error_bounds(weight, bits, group_size):
    """|W - W_hat| <= s/2 where W lies on the grid's span, <= s everywhere; zeros stay exact."""
    qw = quant.quantize(weight, bits, group_size)
    k = weight.shape[1]
    scale = per_weight(qw.scales, group_size, k)
    zero = per_weight(quant.unpack(qw.qzeros, bits, qw.n_blocks), group_size, k)
    low, high = -zero * scale, ((1 << bits) - 1 - zero) * scale
    error = (weight - quant.dequantize(qw)).abs()
    slack = 1e-6 * weight.abs().max() + 1e-12  # float32 rounding of W / s
    inside = (weight >= low) & (weight <= high)
    assert torch.all(error[inside] <= scale[inside] / 2 + slack)
    assert torch.all(error <= scale + slack)
    assert torch.all(quant.dequantize(qw)[weight == 0] == 0)


def test_short_last_group_is_padded_like_matmulnbits():
    """K = 576 at g = 128 (the default model's hidden size): 5 blocks, the last one half full."""
    weight = random_weight(0, 8, 576)
    qw = quant.quantize(weight, 4, 128)
    assert qw.qweight.shape == (8, 5, 64) and qw.scales.shape == (8, 5)
    assert qw.qzeros.shape == (8, quant.packed_len(5, 4)) == (8, 3)
    codes = quant.unpack(qw.qweight, 4, 128)
    assert torch.all(codes[:, 4, 64:] == 0)  # padding codes are 0
    # padding does not enter the short group's range: same grid as a full group of those 64 columns
    assert torch.equal(qw.scales[:, 4], quant.quantize(weight, 4, 64).scales[:, 8])
    assert quant.dequantize(qw).shape == (8, 576)


@pytest.mark.parametrize("bits", quant.QUANT_BITS)
def test_all_zero_and_constant_groups(bits):
    weight = torch.zeros(4, 96)
    weight[1, :32] = 0.3
    weight[2, 32:64] = -7.25
    weight[3] = 1e-9  # below fp16's smallest normal scale
    qw = quant.quantize(weight, bits, 32)
    w_hat = quant.dequantize(qw)
    assert torch.isfinite(qw.scales).all()
    assert torch.all(w_hat[0] == 0) and torch.all(w_hat[1, 32:] == 0)  # zero groups are exact
    # a constant group is reproduced to the precision of its fp16 scale
    assert torch.allclose(w_hat[1, :32], torch.full((32,), 0.3), rtol=FP16_REL, atol=0)
    assert torch.allclose(w_hat[2, 32:64], torch.full((32,), -7.25), rtol=FP16_REL, atol=0)
    assert torch.all((w_hat[3] - weight[3]).abs() <= 2.0**-15)  # half of the clamped scale


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_raise(bad):
    weight = random_weight(0, 4, 64)
    weight[2, 5] = bad
    for call in (
        lambda: quant.quantize(weight, 4, 32),
        lambda: quant.quantize_layer(weight, 4, 32),
        lambda: quant.fake_quantize(weight, 4, 32),
        lambda: quant.check_finite(weight, "model.layers.0.mlp.up_proj"),
    ):
        with pytest.raises(InvalidWeightsError, match="NaN/Inf"):
            call()


def test_bad_arguments_raise():
    with pytest.raises(InvalidWeightsError, match="2-D"):
        quant.quantize(torch.zeros(2, 3, 4), 4, 32)
    with pytest.raises(ValueError, match="bits"):
        quant.quantize(torch.zeros(2, 32), 5, 32)
    with pytest.raises(ValueError, match="group size"):
        quant.quantize(torch.zeros(2, 32), 4, 48)


def test_fp16_width_keeps_weights_in_fp16():
    weight = random_weight(0, 3, 40)
    assert torch.equal(quant.fake_quantize(weight, 16, 128), weight.half().float())


# --------------------------------------------------------------------------------------------
# outliers
# --------------------------------------------------------------------------------------------
def random_mask(seed: int, shape, frac: float) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < frac


@given(weight=weights, bits=BITS, group_size=GROUPS, frac=st.sampled_from([0.01, 0.1, 0.5]), seed=st.integers(0, 99))
def test_dense_plus_sparse_reproduces_masked_weights(weight, bits, group_size, frac, seed):
    mask = random_mask(seed, weight.shape, frac)
    qw, sparse = quant.quantize_layer(weight, bits, group_size, mask)
    if not mask.any():
        assert sparse is None
        return
    dense, outliers = quant.dequantize(qw), sparse.to_dense()
    assert sparse.nnz == int(mask.sum()) and torch.all(outliers[~mask] == 0)
    residual = (weight - dense)[mask]
    assert torch.all((dense + outliers - weight)[mask].abs() <= FP16_REL * residual.abs() + 2.0**-24)
    # the runtime's matrix is exactly what fake_quantize promises
    assert torch.equal(dense + outliers, quant.fake_quantize(weight, bits, group_size, mask))
    # outliers leave the group ranges: an excluded entry is equivalent to a 0 (the range holds 0)
    assert torch.equal(qw.scales, quant.quantize(torch.where(mask, 0.0, weight), bits, group_size).scales)


def test_outliers_do_not_stretch_their_group():
    weight = random_weight(0, 2, 64)
    weight[0, 3] = 500.0
    mask = torch.zeros_like(weight, dtype=torch.bool)
    mask[0, 3] = True
    qw, sparse = quant.quantize_layer(weight, 4, 32, mask)
    assert float(qw.scales[0, 0]) < 1.0  # would be ~33 with the outlier in range
    runtime = quant.dequantize(qw) + sparse.to_dense()
    assert abs(float(runtime[0, 3]) - 500.0) <= 500.0 * FP16_REL
    assert (runtime - weight)[~mask].abs().max() <= float(qw.scales.float().max())


@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 8), cols=st.integers(1, 100), picks=st.integers(0, 12))
def test_dense_rows_equals_rows_of_to_dense(seed, rows, cols, picks):
    weight = random_weight(seed, rows, cols)
    mask = random_mask(seed, weight.shape, 0.2)
    mask[0, 0] = True
    _, sparse = quant.quantize_layer(weight, 4, 32, mask)
    chosen = torch.randint(0, rows, (picks,), generator=torch.Generator().manual_seed(seed))  # repeats too
    assert torch.equal(sparse.dense_rows(chosen), sparse.to_dense()[chosen])


# --------------------------------------------------------------------------------------------
# byte accounting
# --------------------------------------------------------------------------------------------
@given(weight=weights, bits=BITS, group_size=GROUPS)
def test_packed_bytes_equal_accounted_bytes(weight, bits, group_size):
    n, k = weight.shape
    assert quant.quantize(weight, bits, group_size).nbytes() == quant.weight_bytes(n, k, bits, group_size)


@given(weight=weights, frac=st.sampled_from([0.0, 0.02, 0.3]), seed=st.integers(0, 99))
def test_outlier_bytes_equal_accounted_bytes(weight, frac, seed):
    mask = random_mask(seed, weight.shape, frac)
    _, sparse = quant.quantize_layer(weight, 3, 64, mask)
    stored = 0 if sparse is None else sparse.nbytes()
    assert stored == quant.outlier_bytes(*weight.shape, int(mask.sum()))


def test_wide_layers_use_int32_column_indices():
    for cols, index_bytes in ((32767, 2), (32768, 4)):
        weight = random_weight(0, 1, cols)
        mask = torch.zeros_like(weight, dtype=torch.bool)
        mask[0, -3:] = True
        _, sparse = quant.quantize_layer(weight, 4, 128, mask)
        assert sparse.col.element_size() == index_bytes
        assert sparse.nbytes() == quant.outlier_bytes(1, cols, 3) == 2 * 4 + 3 * (index_bytes + 2)


def test_layer_bytes_and_average_bits():
    # 4 bits, g128, K=576: 5 blocks of 64 code bytes + 5 fp16 scales + 3 zero bytes per row
    assert quant.weight_bytes(10, 576, 4, 128) == 10 * (5 * 64 + 5 * 2 + 3)
    assert quant.weight_bytes(10, 576, 16, 128) == 10 * 576 * 2
    assert quant.layer_bytes(10, 576, 4, 128, n_outliers=7, has_bias=True) == (
        quant.weight_bytes(10, 576, 4, 128) + quant.outlier_bytes(10, 576, 7) + 10 * 2
    )
    assert quant.average_bits(quant.weight_bytes(64, 256, 8, 32), 64 * 256) == 8 + 8 * (2 + 1) / 32


# --------------------------------------------------------------------------------------------
# onnxruntime MatMulNBits reads our packed blobs as they are
# --------------------------------------------------------------------------------------------
def matmulnbits(x: torch.Tensor, qw: quant.QuantizedWeight) -> np.ndarray:
    """Run ``x @ W^T`` with one onnxruntime MatMulNBits node fed our qweight/scales/zero points."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    n, k = qw.out_features, qw.in_features

    def initializer(name, dtype, tensor):
        return helper.make_tensor(name, dtype, list(tensor.shape), tensor.contiguous().numpy().tobytes(), raw=True)

    inits = [
        initializer("B", TensorProto.UINT8, qw.qweight),
        initializer("scales", TensorProto.FLOAT, qw.scales.float().reshape(-1)),
        initializer("zero_points", TensorProto.UINT8, qw.qzeros.reshape(-1)),
    ]
    node = helper.make_node(
        "MatMulNBits", ["A", "B", "scales", "zero_points"], ["Y"], domain="com.microsoft",
        K=k, N=n, bits=qw.bits, block_size=qw.group_size,
    )  # fmt: skip
    graph = helper.make_graph(
        [node], "qlinear",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [x.shape[0], n])],
        inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"A": x.numpy()})[0]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("in_features, group_size", [(200, 32), (576, 128)])
def test_layout_is_onnxruntime_matmulnbits(bits, in_features, group_size):
    weight = random_weight(1, 24, in_features) + 0.3  # skewed groups: zero points far from the middle
    qw = quant.quantize(weight, bits, group_size)
    zeros = quant.unpack(qw.qzeros, bits, qw.n_blocks)
    assert len(zeros.unique()) > 1  # the zero points are really exercised
    x = random_weight(2, 3, in_features)
    expected = (x.double() @ quant.dequantize(qw).double().T).float()
    got = torch.from_numpy(matmulnbits(x, qw))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
