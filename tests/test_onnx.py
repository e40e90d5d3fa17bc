"""ONNX export: graphs pass onnx.checker and onnxruntime computes what the torch runtime computes.

Parity is checked three ways on tiny models: prefill logits, the decode graph's logits for every
step of a teacher-forced continuation (tiny random models repeat tokens, so greedy equality alone
would prove little), and identical greedy tokens for 32 steps. Tolerances: with
``accuracy_level=0`` (float32 activations) the exported graph does the runtime's arithmetic up to
float32 summation order, so logits agree to ``ATOL = 1e-4`` (measured: under 1e-6 on logits of
magnitude ~1); ``accuracy_level=4`` rounds activations to int8 per block inside ``MatMulNBits``
and is held to ``ATOL_INT8`` relative to the largest logit.
"""

from __future__ import annotations

import contextlib
import copy
import json

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoModelForCausalLM

import mqc
from mqc import quant
from mqc.errors import ArtifactError, UnsupportedModelError
from mqc.export import OnnxLM, export_onnx, onnx_generate
from mqc.export import onnx as onnx_export
from mqc.export.linear import Ell, as_matmul_nbits
from mqc.models import tiny_config
from mqc.runtime.modules import QLinear

ATOL = 1e-4
ATOL_INT8 = 0.05  # of max |logit|
STEPS = 32
VOCAB = 256


def tiny(family: str, head_dim: int | None = None, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny model of ``family``; ``head_dim=32`` makes the GroupQueryAttention path apply
    (its CPU kernel needs multiples of 16; the default tiny head size, 24, takes the explicit path)."""
    config = tiny_config(family)
    if head_dim is not None:
        config.head_dim = head_dim
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()


def calib() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 64), generator=torch.Generator().manual_seed(1))


def compiled(model: torch.nn.Module, **recipe) -> mqc.CompiledModel:
    return mqc.compile(model, mqc.Recipe(**recipe), calib=calib(), progress=False)


def prompt(batch: int = 1, length: int = 12, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def generate(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy torch-runtime continuation through the model's own cache, ``[B, S + steps]``.
    (``model.generate`` with ``min_new_tokens`` would suppress the end-of-sequence token.)"""
    out = model(ids, use_cache=True)
    tokens = [ids]
    for _ in range(steps):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
        out = model(token, past_key_values=out.past_key_values, use_cache=True)
    return torch.cat(tokens, dim=1)


def assert_parity(model: torch.nn.Module, out_dir, atol: float = ATOL, relative: bool = False) -> None:
    """Prefill, teacher-forced decode steps and 32 greedy tokens agree with the torch runtime."""
    lm = OnnxLM(out_dir)
    ids = prompt(batch=2)
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    bound = atol * (np.abs(ref).max() if relative else 1.0)
    assert np.abs(lm.prefill(ids.numpy()).logits - ref).max() <= bound

    single = ids[:1]
    with torch.no_grad():
        greedy = generate(model, single, STEPS)
        full = model(greedy).logits.numpy()
    step = lm.prefill(single.numpy())
    worst = 0.0
    for t in range(single.shape[1], greedy.shape[1]):
        step = lm.step(greedy[:, t : t + 1].numpy(), step)
        worst = max(worst, float(np.abs(step.logits[:, 0] - full[:, t]).max()))
    assert worst <= bound
    tokens = lm.generate(single.numpy(), STEPS, stop_at_eos=False)
    np.testing.assert_array_equal(tokens, greedy[:, single.shape[1] :].numpy())


def export(model, tmp_path, name="onnx", accuracy_level=0, **kwargs):
    """Float32 activations by default: the setting under which parity is exact."""
    return export_onnx(model, None, tmp_path / name, accuracy_level=accuracy_level, **kwargs)


# ------------------------------------------------------------------------------------------------
# numerics of the building blocks
# ------------------------------------------------------------------------------------------------
def test_three_bit_reencodes_as_four_bit_exactly():
    weight = torch.randn(40, 100, generator=torch.Generator().manual_seed(0))
    qw = quant.quantize(weight, 3, 32)
    four = as_matmul_nbits(qw)
    assert four.bits == 4 and four.qweight.shape == (40, 4, 16)
    assert torch.equal(quant.dequantize(four), quant.dequantize(qw))


def test_ell_matches_csr():
    weight = torch.randn(30, 50, generator=torch.Generator().manual_seed(0))
    mask = torch.rand(30, 50, generator=torch.Generator().manual_seed(1)) < 0.05
    _, sparse = quant.quantize_layer(weight, 4, 32, mask)
    ell = Ell.of(sparse)
    assert ell.cols.shape[1] == int(torch.diff(sparse.crow.long()).max())
    assert torch.equal(ell.to_dense(50), sparse.to_dense())


# ------------------------------------------------------------------------------------------------
# parity on compiled tiny models
# ------------------------------------------------------------------------------------------------
def test_rtn4_explicit_attention_and_artifact_layout(tmp_path):
    """Default tiny llama (head size 24: explicit attention), tied float embedding."""
    c = compiled(mqc.tiny_model("llama"), bits=4, group_size=32)
    out = export(c, tmp_path)
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "prefill.onnx", "model.onnx.data", "genai_config.json", "mqc_onnx.json"} <= names
    for graph in ("model.onnx", "prefill.onnx"):
        onnx.checker.check_model(str(out / graph))
    decode = onnx.load(str(out / "model.onnx"), load_external_data=False)
    ops = {n.op_type for n in decode.graph.node}
    assert "MatMulNBits" in ops and "GroupQueryAttention" not in ops
    assert [i.name for i in decode.graph.input][:3] == ["input_ids", "attention_mask", "past_key_values.0.key"]
    assert json.loads((out / "genai_config.json").read_text())["search"]["past_present_share_buffer"] is False
    assert_parity(c.model, out)


def test_gqa_outliers_quantized_tied_embedding(tmp_path):
    """GroupQueryAttention path, sparse outliers everywhere, tied GatherBlockQuantized table."""
    c = compiled(tiny("llama", head_dim=32), bits=4, group_size=32, outlier_frac=0.01, quantize_embeddings=True)
    assert c.model.lm_head.n_outliers > 0 and c.model.model.embed_tokens.tied_to == "lm_head"
    out = export(c, tmp_path)
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node]
    assert ops.count("GroupQueryAttention") == 2 and ops.count("GatherBlockQuantized") == 1
    assert ops.count("ReduceSum") == 1 + 2 * 4 + 1  # mask lengths; outliers of qkv, o, gate_up, down x 2 + lm_head
    assert_parity(c.model, out)


def test_shared_cache_buffers_match_copying_cache(tmp_path):
    """In-place cache buffers (onnxruntime-genai's share-buffer mode) give the logits of the
    copying cache, through buffer growth mid-decode and a new prefill of another batch size."""
    out = export(compiled(tiny("llama", head_dim=32), bits=4, group_size=32), tmp_path)
    shared, copying = OnnxLM(out), OnnxLM(out, share_buffer=False)
    assert shared.share_buffer and not copying.share_buffer
    shared.min_capacity = 4
    for ids in (prompt(batch=1, length=3), prompt(batch=2, length=5, seed=7)):
        a, b = shared.prefill(ids.numpy()), copying.prefill(ids.numpy())
        for _ in range(9):  # 3 + 9 tokens: 4 -> 8 -> 16; 5 + 9 tokens: 5 -> 10 -> 20
            np.testing.assert_allclose(a.logits, b.logits, rtol=0, atol=1e-5)
            token = b.logits[:, -1:].argmax(-1)
            a, b = shared.step(token, a), copying.step(token, b)
    assert next(iter(shared._buffers.values())).shape[:3] == (2, 2, 20)
    (out / "prefill.onnx").unlink()  # a folder without a prompt graph (onnxruntime-genai's): prompts run in place
    ids = prompt(batch=2).numpy()
    np.testing.assert_allclose(OnnxLM(out).prefill(ids).logits, copying.prefill(ids).logits, rtol=0, atol=1e-5)
    explicit = export(compiled(tiny("llama"), bits=4, group_size=32), tmp_path, name="explicit")
    with pytest.raises(mqc.MqcError, match="cannot share cache buffers"):
        OnnxLM(explicit, share_buffer=True)


@pytest.mark.parametrize("group_size", [32, 128])
def test_prompt_graph_uses_int8_activations_only_for_large_groups(tmp_path, group_size):
    out = export(compiled(tiny("llama", head_dim=32), bits=4, group_size=group_size), tmp_path, accuracy_level=4)
    for graph, expected in (("model.onnx", 4), ("prefill.onnx", 4 if group_size >= 128 else 0)):
        nodes = onnx.load(str(out / graph), load_external_data=False).graph.node
        levels = {a.i for n in nodes if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
        assert levels == {expected}, graph


@pytest.mark.parametrize("target", ["torch", "onnx"])
def test_outliers_are_exact_in_ell_form(tmp_path, target):
    """Many outliers (20% of the weights) over 2 x 256 tokens on 2 threads: every output sums its
    own row's products (Gather, Mul, ReduceSum: no running sum, no scatter, which raced under
    onnxruntime's threads on the default model), so float32 activations reproduce the runtime to
    float32 rounding. On the onnx target every row has the same count: ELL without padding, and
    the outlier arrays hold exactly the plan's bytes."""
    c = compiled(tiny("llama", head_dim=32), bits=4, group_size=32, outlier_frac=0.2, target=target)
    out = export(c, tmp_path, accuracy_level=0)
    for graph in ("model.onnx", "prefill.onnx"):
        ops = {n.op_type for n in onnx.load(str(out / graph), load_external_data=False).graph.node}
        assert "ReduceSum" in ops and "CumSum" not in ops and not {op for op in ops if op.startswith("Scatter")}
    lm = OnnxLM(out, threads=2)
    ids = prompt(batch=2, length=256)
    with torch.no_grad():
        ref = c.model(ids).logits.numpy()
    assert np.abs(lm.prefill(ids.numpy()).logits - ref).max() <= ATOL
    layers = [m for m in c.model.modules() if isinstance(m, QLinear) and m.n_outliers]
    counts = {tuple(torch.diff(m.outlier_crow.long()).unique().tolist()) for m in layers}
    if target == "onnx":
        assert all(len(per_row) == 1 for per_row in counts)  # the same count in every row
        assert json.loads((out / "mqc_onnx.json").read_text())["model_tensor_bytes"] == c.model_bytes
    else:
        assert any(len(per_row) > 1 for per_row in counts)  # global top-k: padded when exported


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_other_widths_with_outliers(tmp_path, bits):
    c = compiled(tiny("llama", head_dim=32), bits=bits, group_size=64, outlier_frac=0.01, quantize_embeddings=True)
    assert_parity(c.model, export(c, tmp_path))


def test_mixed_widths_and_float_layers(tmp_path):
    """Every width in one model (siblings of different formats are not fused) and 16-bit layers."""
    model = tiny("qwen2", head_dim=32)
    widths = iter([2, 3, 4, 8, 16] * 10)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            bits = next(widths)
            if bits == quant.FP16_BITS:
                module.weight.data = module.weight.data.half().float()
            else:
                model.set_submodule(name, QLinear.from_weight(module.weight.detach(), module.bias, bits, 32))
    out = export(model, tmp_path)
    formats = json.loads((out / "mqc_onnx.json").read_text())["layers"]
    assert formats["model.layers.0.self_attn.k_proj"].startswith("MatMulNBits (3-bit")
    assert_parity(model, out)


@pytest.mark.parametrize(
    "family, recipe",
    [
        ("qwen2", dict(bits=3, group_size=32, quantize_embeddings=True)),  # biases, untied embedding
        ("llama", dict(method="mq", size="5bpw", allowed_bits=(2, 3, 4, 8, 16), search="none")),
    ],
)
def test_planned_bytes_are_deployed_bytes(tmp_path, family, recipe):
    """Target onnx prices every layer as MatMulNBits stores it: the export's model tensors are the
    plan's whole-model bytes exactly (the exporter checks it); target torch prices 3-bit codes as
    3-bit, which the ONNX file stores as 4-bit."""
    model = tiny(family, head_dim=32)
    on_onnx = compiled(copy.deepcopy(model), target="onnx", **recipe)
    assert all(e.target == "onnx" for e in on_onnx.plan.layers.values())
    out = export_onnx(on_onnx, None, tmp_path / "onnx", planned_bytes=on_onnx.model_bytes)
    config = json.loads((out / "mqc_onnx.json").read_text())
    assert config["model_tensor_bytes"] == on_onnx.model_bytes
    assert 0 < config["derived_bytes"] < sum(config["bytes"].values())
    n_params = sum(p.numel() for p in model.parameters())
    if recipe.get("method") == "mq":  # 3 bits are not offered on onnx; the budget holds in ONNX bytes
        assert all(e.bits != 3 for e in on_onnx.plan.layers.values()) and on_onnx.model_bytes <= 5 * n_params / 8
        # siblings share one format, so every q/k/v and gate/up pair is one MatMulNBits node
        formats = {n: (e.bits, e.group_size) for n, e in on_onnx.plan.layers.items()}
        for layer in range(model.config.num_hidden_layers):
            prefix = f"model.layers.{layer}."
            assert len({formats[prefix + f"self_attn.{p}_proj"] for p in "qkv"}) == 1
            assert formats[prefix + "mlp.gate_proj"] == formats[prefix + "mlp.up_proj"]
        nodes = onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node
        quantized = [e for e in on_onnx.plan.layers.values() if e.bits != 16]
        if len(quantized) == len(on_onnx.plan.layers):
            assert sum(n.op_type == "MatMulNBits" for n in nodes) == 4 * model.config.num_hidden_layers + 1
    on_torch = compiled(copy.deepcopy(model), **recipe)
    has_3bit = any(e.bits == 3 for e in on_torch.plan.layers.values())
    if recipe.get("method") != "mq":
        assert has_3bit and on_torch.model_bytes < on_onnx.model_bytes
    with pytest.raises(RuntimeError, match="!= planned") if has_3bit else contextlib.nullcontext():
        export_onnx(on_torch, None, tmp_path / "torch", planned_bytes=on_torch.model_bytes)


def test_untied_quantized_embedding_with_bias(tmp_path):
    """Qwen2: q/k/v biases, an untied embedding that owns its packed table."""
    c = compiled(tiny("qwen2", head_dim=32), bits=4, group_size=32, outlier_frac=0.01, quantize_embeddings=True)
    assert c.model.model.embed_tokens.tied_to is None
    assert_parity(c.model, export(c, tmp_path))


@pytest.mark.parametrize("head_dim", [24, 32])
def test_mistral_sliding_window(tmp_path, head_dim):
    """A window shorter than the test sequences: GQA's local_window_size and the explicit mask."""
    c = compiled(tiny("mistral", head_dim=head_dim, sliding_window=8), bits=4, group_size=32)
    assert_parity(c.model, export(c, tmp_path))


def test_qwen3_qk_norms(tmp_path):
    from transformers import Qwen3Config

    sizes = {"hidden_size": 96, "intermediate_size": 160, "num_hidden_layers": 2, "max_position_embeddings": 512}
    config = Qwen3Config(vocab_size=VOCAB, num_attention_heads=4, num_key_value_heads=2, head_dim=32, **sizes)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()
    for name, param in model.named_parameters():
        if "norm" in name:  # make the norms matter
            param.data.uniform_(0.5, 1.5)
    c = compiled(model, bits=8, group_size=32)
    assert_parity(c.model, export(c, tmp_path))


def test_lowrank_kv_cache_state(tmp_path):
    """The low-rank cache (window 8 < test lengths) is the decode graph's state."""
    c = compiled(mqc.tiny_model("llama"), bits=4, group_size=32, kv=mqc.KVRecipe(rank=0.5, method="svd", window=8))
    out = export(c, tmp_path)
    lm = OnnxLM(out)
    assert {i.name for i in lm.state_inputs} >= {"past_key_values.0.key_features", "past_key_values.1.value"}
    assert not (out / "genai_config.json").exists()  # onnxruntime-genai cannot carry this cache
    with torch.no_grad():  # the test would not notice exact attention otherwise
        ids = prompt(length=24)
        assert (c.model(ids).logits - c.model(ids, use_cache=False).logits).abs().max() > 100 * ATOL
    assert_parity(c.model, out)


def test_float_model_and_int8_activations(tmp_path):
    """An uncompiled model exports as float MatMuls; accuracy_level=4 stays close."""
    model = tiny("llama", head_dim=32)
    assert_parity(model, export(model, tmp_path, "float"))
    c = compiled(model, bits=4, group_size=32)
    assert_parity(c.model, export(c, tmp_path, "int8", accuracy_level=4), atol=ATOL_INT8, relative=True)


# ------------------------------------------------------------------------------------------------
# user-facing behaviour
# ------------------------------------------------------------------------------------------------
def test_refuses_overwrite_and_unsupported_models(tmp_path):
    model = tiny("llama", head_dim=32)
    out = export(model, tmp_path)
    with pytest.raises(ArtifactError, match="already exists"):
        export(model, tmp_path)
    export(model, tmp_path, force=True)
    assert (out / "model.onnx").is_file() and not list(tmp_path.glob(".onnx.*"))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        export(mqc.tiny_model("gpt2"), tmp_path, "gpt2")
    assert not (tmp_path / "gpt2").exists()


def test_force_never_replaces_a_directory_that_is_not_an_export(tmp_path):
    model = tiny("llama", head_dim=32)
    precious = tmp_path / "onnx"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    for target in (precious, tmp_path / "artifact_like"):
        if target != precious:
            target.mkdir()
            (target / "manifest.json").write_text("{}")  # an artifact is not an export either
        with pytest.raises(ArtifactError, match="not an mqc ONNX export"):
            export(model, tmp_path, target.name, force=True)
    assert (precious / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact_like", "onnx"]


def test_failed_export_keeps_the_old_one(tmp_path, monkeypatch):
    model = tiny("llama", head_dim=32)
    out = export(model, tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(onnx_export, "_save_graph", broken)
    with pytest.raises(OSError, match="disk full"):
        export(model, tmp_path, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporaries left


def test_onnx_generate_text_prompt(tmp_path, word_tokenizer):
    model = tiny("llama", head_dim=32)
    out = export_onnx(model, word_tokenizer, tmp_path / "onnx", accuracy_level=0)
    text = "the jury said that he was at the"
    tokens = onnx_generate(out, text, max_new_tokens=5, stop_at_eos=False)
    ids = torch.tensor([word_tokenizer(text)["input_ids"]])
    with torch.no_grad():
        expected = generate(model, ids, 5)[0, ids.shape[1] :]
    assert tokens == expected.tolist()


@pytest.mark.parametrize("head_dim", [24, 32])
def test_loads_in_onnxruntime_genai(tmp_path, head_dim):
    """The folder drops into onnxruntime-genai as is (both cache modes: shared GQA buffers for
    head size 32, concatenated caches for 24) and generates the runtime's greedy tokens."""
    og = pytest.importorskip("onnxruntime_genai")
    c = compiled(tiny("qwen2", head_dim=head_dim), bits=4, group_size=32, quantize_embeddings=True)
    model = og.Model(str(export(c, tmp_path)))
    ids = prompt()
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + 16, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids.numpy().astype(np.int32))
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    assert tokens == generate(c.model, ids, 16)[0, ids.shape[1] :].tolist()


@pytest.mark.slow
def test_default_model_greedy_matches_runtime(tmp_path):
    """The embedded default model at 4 bits: 32 greedy tokens identical to the torch runtime."""
    model, tokenizer = mqc.load_hf_model()
    c = mqc.compile(
        model, mqc.Recipe(bits=4, group_size=128, quantize_embeddings=True), tokenizer=tokenizer, progress=False
    )
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = generate(c.model, ids, STEPS)[0, ids.shape[1] :]
    for level in (0, 4):
        out = export_onnx(c, tokenizer, tmp_path / f"acc{level}", accuracy_level=level)
        assert onnx_generate(out, ids[0], STEPS, stop_at_eos=False) == expected.tolist()
