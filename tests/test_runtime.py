"""Runtime: QLinear / QEmbedding compute what mqc.quant says, a QLinear stays one opaque
``mqc::qlinear`` node under torch.export, and the uniform pipeline rewrites tiny models of several
families into models that still generate.

The end-to-end reference for a compiled model is the original model with every planned weight
replaced by ``quant.fake_quantize`` and every other float tensor rounded to fp16 (as stored).
"""

import copy
import math

import pytest
import torch
from transformers.pytorch_utils import Conv1D

import mqc
from mqc import quant
from mqc.capture import capture
from mqc.passes import keys
from mqc.runtime.modules import QEmbedding, QLinear

QLINEAR_OP = torch.ops.mqc.qlinear.default


def random_weight(seed: int, rows: int, cols: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def random_mask(seed: int, shape, frac: float = 0.03) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < frac


# --------------------------------------------------------------------------------------------
# QLinear and the custom op
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", quant.QUANT_BITS)
@pytest.mark.parametrize("with_outliers, with_bias", [(False, False), (True, True)])
def test_qlinear_forward_matches_dequantized_matmul(bits, with_outliers, with_bias):
    weight = random_weight(0, 40, 200)  # K = 200: the last group of 32 is short
    bias = random_weight(1, 1, 40)[0] if with_bias else None
    mask = random_mask(2, weight.shape) if with_outliers else None
    layer = QLinear.from_weight(weight, bias, bits, 32, mask)
    qw, sparse = quant.quantize_layer(weight, bits, 32, mask)
    dense = quant.dequantize(qw).double() + (sparse.to_dense().double() if with_outliers else 0)
    x = random_weight(3, 6, 200).reshape(2, 3, 200)
    expected = x.double() @ dense.T + (bias.half().double() if with_bias else 0)
    torch.testing.assert_close(layer(x), expected.float(), rtol=1e-5, atol=1e-5)
    assert layer.n_outliers == (int(mask.sum()) if with_outliers else 0)
    assert layer.nbytes() == quant.layer_bytes(40, 200, bits, 32, layer.n_outliers, with_bias)


def test_qlinear_config_rebuilds_the_same_buffers():
    layer = QLinear.from_weight(random_weight(0, 24, 96), torch.zeros(24), 3, 64, random_mask(1, (24, 96)))
    empty = QLinear.from_config(layer.config(), model=None)
    shapes = {name: (b.shape, b.dtype) for name, b in layer.named_buffers()}
    assert shapes == {name: (b.shape, b.dtype) for name, b in empty.named_buffers()}
    empty.load_state_dict(layer.state_dict())
    x = random_weight(2, 5, 96)
    assert torch.equal(empty(x), layer(x))


def test_custom_op_passes_opcheck():
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of mqc::qlinear
    (with every optional tensor given; the bare form is exported in the end-to-end tests)."""
    layer = QLinear.from_weight(random_weight(0, 24, 64), random_weight(1, 1, 24)[0], 4, 32, random_mask(2, (24, 64)))
    x = random_weight(3, 6, 64).reshape(2, 3, 64).requires_grad_()
    args = (x, layer.qweight, layer.scales, layer.qzeros, 4, 32, 64,
            layer.outlier_crow, layer.outlier_col, layer.outlier_values, layer.bias)  # fmt: skip
    torch.library.opcheck(QLINEAR_OP, args)


def test_gradients_flow_to_the_input():
    layer = QLinear.from_weight(random_weight(0, 24, 64), random_weight(1, 1, 24)[0], 3, 32, random_mask(2, (24, 64)))
    x = random_weight(3, 5, 64).requires_grad_()
    (layer(x) ** 2).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    (torch.nn.functional.linear(x_ref, layer.dense_weight(), layer.bias.float()) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


class TwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = QLinear.from_weight(random_weight(0, 48, 96), random_weight(1, 1, 48)[0], 4, 32, random_mask(2, (48, 96)))
        self.act = torch.nn.GELU()

    def forward(self, x):
        return self.act(self.proj(x))


def test_torch_export_keeps_qlinear_one_opaque_node():
    module = TwoLayer().eval()
    x = random_weight(3, 8, 96)
    batch = torch.export.Dim("batch", min=2, max=64)
    program = torch.export.export(module, (x,), dynamic_shapes=({0: batch},), strict=False)
    targets = [n.target for n in program.graph_module.graph.nodes if n.op == "call_function"]
    assert targets.count(QLINEAR_OP) == 1
    unpacked = {torch.ops.aten.linear.default, torch.ops.aten.mm.default, torch.ops.aten.matmul.default,
                torch.ops.aten.addmm.default, torch.ops.aten.bitwise_right_shift.Tensor}  # fmt: skip
    assert not unpacked & set(targets)  # no dequantization or matmul leaked into the graph
    (node,) = [n for n in program.graph_module.graph.nodes if n.target == QLINEAR_OP]
    assert tuple(node.meta["val"].shape)[1:] == (48,)  # the fake implementation's output shape
    assert isinstance(node.meta["val"].shape[0], torch.SymInt)
    x_other = random_weight(4, 5, 96)
    assert torch.equal(program.module()(x_other), module(x_other))


# --------------------------------------------------------------------------------------------
# QEmbedding
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("embed_scale", [None, math.sqrt(96)])
def test_qembedding_reads_rows_of_its_table(embed_scale):
    table = QLinear.from_weight(random_weight(0, 50, 96), None, 3, 32, random_mask(1, (50, 96), 0.05))
    ids = torch.tensor([[3, 7, 3], [49, 0, 12]])  # repeated ids take the CSR row gather path twice
    expected = table.dense_weight()[ids] * (embed_scale or 1.0)
    owned = QEmbedding(table, tied_to=None, embed_scale=embed_scale)
    torch.testing.assert_close(owned(ids), expected, rtol=1e-6, atol=0)
    assert owned.nbytes() == table.nbytes() and {n for n, _ in owned.named_buffers()} >= {"table.qweight"}


def test_tied_qembedding_references_the_head():
    holder = torch.nn.Module()
    holder.lm_head = QLinear.from_weight(random_weight(0, 50, 96), None, 4, 32)
    holder.embed = QEmbedding.from_config({"tied_to": "lm_head", "embed_scale": None, "table": None}, holder)
    assert holder.embed.table is holder.lm_head and holder.embed.nbytes() == 0
    assert not holder.embed.state_dict() and all(k.startswith("lm_head.") for k in holder.state_dict())
    ids = torch.tensor([1, 49, 1])
    assert torch.equal(holder.embed(ids), holder.lm_head.dense_weight()[ids])


# --------------------------------------------------------------------------------------------
# the uniform pipeline end to end
# --------------------------------------------------------------------------------------------
def reference_model(pristine, compiled):
    """The pristine model with each planned weight fake-quantized, other float tensors in fp16;
    outliers where their score (rounding error x input energy) is largest."""
    ref = copy.deepcopy(pristine)
    units, energy = compiled.analysis.units, compiled.analysis.act_stats()
    with torch.no_grad():
        for tensor in ref.state_dict().values():
            if tensor.dtype == torch.float32:
                tensor.copy_(tensor.half().float())
        for name, entry in compiled.plan.layers.items():
            unit = units[name]
            weight = unit.oriented(pristine.get_submodule(name).weight.detach())
            approx = quant.fake_quantize(weight, entry.bits, entry.group_size)
            mask = quant.outlier_mask(weight, approx, entry.n_outliers, energy.get(name), entry.outliers_per_row)
            fake = quant.fake_quantize(weight, entry.bits, entry.group_size, mask)
            ref.get_submodule(name).weight.copy_(unit.stored(fake))
    return ref


class Compiled:
    """Compile each (family, recipe) once per module; tests share the results read-only."""

    def __init__(self, zoo, token_ids):
        self.zoo, self.token_ids, self.cache = zoo, token_ids, {}

    def __call__(self, family: str, bits: int, **recipe):
        key = (family, bits, tuple(sorted(recipe.items())))
        if key not in self.cache:
            model = self.zoo.model(family)
            result = mqc.compile(model, mqc.Recipe(bits=bits, group_size=32, **recipe), calib=self.token_ids, progress=False)
            self.cache[key] = result
        return self.cache[key]


@pytest.fixture(scope="module")
def compiled(zoo, token_ids):
    return Compiled(zoo, token_ids)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


CASES = [("llama", 2), ("llama", 3), ("llama", 4), ("llama", 8), ("gpt2", 4), ("qwen2", 3), ("opt", 8)]


def weight_modules(model) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}


@pytest.mark.parametrize("family, bits", CASES)
def test_uniform_compile_swaps_every_linear_but_the_head(zoo, compiled, token_ids, family, bits):
    pristine = zoo.pristine(family)
    result = compiled(family, bits)
    model = result.model
    swapped = {n for n, m in model.named_modules() if isinstance(m, QLinear)}
    assert swapped == weight_modules(pristine) - {"lm_head"} == set(result.results[keys.WEIGHTS_LOWERED]) == set(result.plan.layers)
    assert all((e.bits, e.group_size, e.n_outliers) == (bits, 32, 0) for e in result.plan.layers.values())
    # lm_head and the embeddings are untouched by default (only rounded to fp16, as stored)
    assert type(model.lm_head) is type(pristine.lm_head)
    assert type(model.get_input_embeddings()) is type(pristine.get_input_embeddings())
    assert torch.equal(model.lm_head.weight, pristine.lm_head.weight.half().float())
    for name in swapped:
        original = pristine.get_submodule(name)
        weight = original.weight.T if isinstance(original, Conv1D) else original.weight
        layer = model.get_submodule(name)
        assert torch.equal(layer.dense_weight(), quant.fake_quantize(weight.detach(), bits, 32)), name
        if original.bias is not None:
            assert torch.equal(layer.bias, original.bias.detach().half())
    torch.testing.assert_close(logits(model, token_ids), logits(reference_model(pristine, result), token_ids),
                               rtol=1e-4, atol=1e-4)  # fmt: skip


@pytest.mark.parametrize("family, bits", [("llama", 4), ("gpt2", 4)])
def test_compiled_model_generates(compiled, token_ids, family, bits):
    model = compiled(family, bits).model
    prompt = token_ids[:1]
    out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, prompt.shape[1] + 6) and torch.equal(out[:, : prompt.shape[1]], prompt)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), out)
    # the greedy tokens are the argmax of a full forward over the generated prefix
    assert torch.equal(logits(model, out[:, :-1])[0, prompt.shape[1] - 1 :].argmax(-1), out[0, prompt.shape[1] :])


def test_error_shrinks_with_bits_and_8_bits_is_close(zoo, compiled, token_ids):
    original = logits(zoo.pristine("llama"), token_ids)
    errors = {b: float((logits(compiled("llama", b).model, token_ids) - original).abs().max()) for b in (2, 3, 4, 8)}
    assert errors[8] < errors[4] < errors[3] < errors[2]
    assert errors[8] <= 0.02 * float(original.abs().max())


def test_export_of_a_compiled_model_has_one_op_per_qlinear(compiled):
    model = compiled("llama", 4).model
    nodes = [n for n in capture(model).graph_module.graph.nodes if n.op == "call_function"]
    assert sum(n.target == QLINEAR_OP for n in nodes) == 14  # 7 linears x 2 layers
    assert sum(n.target == torch.ops.aten.linear.default for n in nodes) == 1  # lm_head


def test_tied_embedding_quantized_with_its_head_keeps_gemma_scale(zoo, compiled, token_ids):
    pristine = zoo.pristine("gemma")
    result = compiled("gemma", 4, quantize_embeddings=True)
    model = result.model
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, QEmbedding) and embedding.tied_to == "lm_head"
    assert embedding.table is model.lm_head and isinstance(model.lm_head, QLinear)
    assert embedding.embed_scale == pytest.approx(math.sqrt(96), rel=1e-7)
    assert not [k for k in model.state_dict() if k.startswith("model.embed_tokens")]  # stored once
    ids = token_ids[:1]
    expected = model.lm_head.dense_weight()[ids] * embedding.embed_scale
    torch.testing.assert_close(embedding(ids), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(logits(model, token_ids), logits(reference_model(pristine, result), token_ids),
                               rtol=1e-4, atol=1e-4)  # fmt: skip


def test_untied_embedding_with_outliers_owns_its_table(zoo, compiled, token_ids):
    pristine = zoo.pristine("qwen2")
    result = compiled("qwen2", 4, quantize_embeddings=True, outlier_frac=0.02)
    model = result.model
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, QEmbedding) and embedding.tied_to is None
    assert embedding.table is not model.lm_head and embedding.table.n_outliers > 0
    assert {"model.embed_tokens.table.qweight", "model.embed_tokens.table.outlier_values"} <= set(model.state_dict())
    assert set(result.plan.layers) == weight_modules(pristine) | {"model.embed_tokens"}
    assert torch.equal(embedding(token_ids), embedding.table.dense_weight()[token_ids])
    torch.testing.assert_close(logits(model, token_ids), logits(reference_model(pristine, result), token_ids),
                               rtol=1e-4, atol=1e-4)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compiled_model_follows_model_to_dtype(compiled, token_ids, dtype):
    """Quantized buffers keep their storage types; activations, embeddings included, follow the model."""
    model = copy.deepcopy(compiled("llama", 4, quantize_embeddings=True).model)
    reference, dense = logits(model, token_ids), model.lm_head.dense_weight()
    model.to(dtype)
    assert model.lm_head.qweight.dtype == torch.uint8 and model.lm_head.scales.dtype == torch.float16
    assert torch.equal(model.lm_head.dense_weight(), dense)  # the quantized weights did not change
    assert model.get_input_embeddings()(token_ids).dtype == dtype
    out = logits(model, token_ids)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), reference, rtol=0.1, atol=0.1)  # half-precision activations
