"""The CPU deployment form (mqc.runtime.cpu): int4 kernels hold exactly the artifact's grid, every
layer kind computes what the dense reference does (to the kernels' bfloat16/float16 rounding),
and a deployed model keeps one compressed copy of its weights."""

from __future__ import annotations

import pytest
import torch

import mqc
from mqc import quant
from mqc.runtime import cpu
from mqc.runtime.modules import QEmbedding, QLinear


def rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size, in_features", [(32, 96), (64, 96), (128, 256)])  # 96 / 64: zero-padded
def test_int4_kernel_is_the_artifact_grid(bits, group_size, in_features):
    """The kernel's matrix is mqc's grid ``s (q - z)`` with bfloat16 scales (up to 3 bits exactly; at
    4 bits a small float zero takes what the code shift cannot), its activations bfloat16."""
    layer = QLinear.from_weight(rand(0, 48, in_features), None, bits, group_size)
    kernel = cpu.int4_kernel(layer)
    assert kernel is not None and kernel.padded % group_size == 0
    blocks = quant.n_blocks(in_features, group_size)
    q = quant.unpack(layer.qweight, bits, group_size).float().reshape(48, blocks, group_size)
    z = quant.unpack(layer.qzeros, bits, blocks).float()
    grid = ((q - z[..., None]) * bf16(layer.scales.float())[..., None]).reshape(48, -1)[:, :in_features]
    x = rand(1, 2, 5, in_features)
    expected = (bf16(x).double() @ grid.double().T).float()
    scale = expected.abs().max()
    assert (kernel(x) - expected).abs().max() <= (2**-8 if bits < 4 else 2**-6) * scale  # the bfloat16 output
    exact = x @ layer.dense_weight().T
    assert (kernel(x) - exact).abs().max() <= 0.01 * exact.abs().max()


def test_other_layers_fall_back_to_float16():
    """8-bit codes and row counts the int4 kernel refuses (not a multiple of 16) are float16."""
    for layer in (QLinear.from_weight(rand(0, 48, 96), None, 8, 32), QLinear.from_weight(rand(0, 40, 96), None, 4, 32)):
        assert cpu.int4_kernel(layer) is None
        deployed = cpu.cpu_linear(layer)
        assert isinstance(deployed.kernel, cpu.HalfKernel)
        x = rand(1, 3, 96)
        torch.testing.assert_close(deployed(x), layer(x), rtol=5e-3, atol=5e-3)


@pytest.mark.parametrize("bits", [3, 8])
def test_outliers_and_bias(bits):
    weight, bias = rand(0, 64, 96), rand(1, 64)
    mask = torch.rand(weight.shape, generator=torch.Generator().manual_seed(2)) < 0.03
    layer = QLinear.from_weight(weight, bias, bits, 32, mask)
    x = rand(3, 2, 7, 96)
    expected = layer(x)  # the dense reference path, outliers and fp16 bias included
    deployed = cpu.cpu_linear(layer)
    assert deployed.outliers is not None and deployed.bias is not None
    assert (deployed(x) - expected).abs().max() <= 0.02 * expected.abs().max()
    without = cpu.CpuLinear(deployed.kernel, None, deployed.bias)
    assert (without(x) - expected).abs().max() > 10 * (deployed(x) - expected).abs().max()  # outliers matter


@pytest.mark.parametrize("family, recipe", [
    ("llama", dict(bits=3, group_size=32, quantize_embeddings=True, outlier_frac=0.01)),  # tied packed table
    ("qwen2", dict(bits=4, group_size=64)),  # biases, float embedding and lm_head held in float16
])  # fmt: skip
def test_deployed_model_matches_the_reference(zoo, token_ids, tmp_path, family, recipe):
    compiled = mqc.compile(zoo.model(family), mqc.Recipe(**recipe), calib=token_ids, progress=False)
    out = mqc.save(compiled, tmp_path / "artifact")
    model, _ = mqc.load(out)
    ids = token_ids[:2, :24]
    with torch.no_grad():
        reference = model(ids).logits
        deployment = cpu.deploy_on_cpu(model)
        logits = model(ids).logits
    assert (logits - reference).abs().max() <= 0.03 * reference.abs().max()
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9
    qlinears = [m for m in model.modules() if isinstance(m, QLinear)]
    assert deployment.int4_layers + deployment.half_layers >= len(qlinears)
    tables = {id(m.table) for m in model.modules() if isinstance(m, QEmbedding)}
    for m in qlinears:  # one compressed copy: the packed buffers are gone except an embedding table's
        assert m.cpu_kernel is not None and (m.qweight.numel() > 0) == (id(m) in tables)
    assert not any(type(m) in (torch.nn.Linear, torch.nn.Embedding) for m in model.modules())
    on_load, _ = mqc.load(out, deploy_cpu=True)  # deployed while loading: float16 never widened
    with torch.no_grad():
        assert torch.equal(on_load(ids).logits, logits)
    assert all(p.dtype != torch.float32 or p.dim() == 1 for p in on_load.parameters())  # only norms in float32
    artifact_bytes = mqc.runtime.artifact.read_manifest(out)["accounting"]["tensor_bytes"]
    assert deployment.weight_bytes <= 2.5 * artifact_bytes  # 3-bit codes take 4 bits; float16 copies of floats


def test_release_needs_a_kernel():
    with pytest.raises(RuntimeError, match="deployed CPU kernel"):
        QLinear.from_weight(rand(0, 16, 32), None, 4, 32).release_packed()
