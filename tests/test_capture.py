"""Capture + GraphView on a tiny model of every supported family: the linears (with GPT-2's
transposed Conv1D), the groups sharing an input, the K/V projections, and clear failures.

Gemma2 runs eager attention (a softmax between two matmuls), the others SDPA, so both ways
:class:`~mqc.graph.GraphView` finds K/V projections are covered."""

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from mqc.capture import capture
from mqc.errors import UnsupportedModelError

# Per family: the sibling groups of one decoder layer (as name suffixes) and the K/V projections.
LLAMA_LIKE = ((("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")),
              ("self_attn.k_proj", "self_attn.v_proj"), "model.layers.{}.")  # fmt: skip
EXPECTED = {
    "llama": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "gemma": LLAMA_LIKE,
    "gemma2": LLAMA_LIKE,
    "gemma3_text": LLAMA_LIKE,
    "gpt2": ((), ("attn.c_attn", "attn.c_attn"), "transformer.h.{}."),  # fused QKV: one linear
    "opt": (
        (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),),
        ("self_attn.k_proj", "self_attn.v_proj"),
        "model.decoder.layers.{}.",
    ),
}
N_LAYERS = 2


def weight_modules(model):
    """Every nn.Linear / Conv1D of the model: what capture must find."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}


def test_linears_found_with_shapes(zoo, family):
    model, graph = zoo.pristine(family), zoo.graph(family)
    modules = weight_modules(model)
    assert set(graph.linears) == set(modules)
    for name, site in graph.linears.items():
        module = modules[name]
        conv = isinstance(module, Conv1D)
        assert site.transposed == conv  # Conv1D stores [in, out] and is captured as addmm
        expected = tuple(module.weight.shape[::-1]) if conv else tuple(module.weight.shape)
        assert (site.out_features, site.in_features) == expected
        assert site.has_bias == (module.bias is not None)
        assert graph.nx.has_node(site.node)
    assert "lm_head" in graph.linears
    assert graph.linears["lm_head"].out_features == model.config.vocab_size


def test_shared_input_groups(zoo, family):
    groups, _, prefix = EXPECTED[family]
    expected = {
        tuple(prefix.format(layer) + suffix for suffix in group) for layer in range(N_LAYERS) for group in groups
    }
    assert set(zoo.graph(family).shared_input_groups) == expected


def test_kv_sites(zoo, family):
    _, (k_suffix, v_suffix), prefix = EXPECTED[family]
    graph = zoo.graph(family)
    sdpa = [n for n in graph.graph_module.graph.nodes if n.target == torch.ops.aten.scaled_dot_product_attention.default]
    assert len(sdpa) == (0 if family == "gemma2" else N_LAYERS)
    sites = graph.kv_sites
    assert [s.layer for s in sites] == list(range(N_LAYERS))
    for site in sites:
        layer_prefix = prefix.format(site.layer)
        assert (site.k_proj, site.v_proj) == (layer_prefix + k_suffix, layer_prefix + v_suffix)


def test_embeddings_and_dynamic_sequence_length(zoo, family):
    model, graph = zoo.pristine(family), zoo.graph(family)
    embedding = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    assert embedding in graph.embeddings
    placeholders = [n for n in graph.graph_module.graph.nodes if n.op == "placeholder" and n.name == "input_ids"]
    (input_ids,) = placeholders
    batch, seq = input_ids.meta["val"].shape
    assert batch == 1 and isinstance(seq, torch.SymInt)  # one graph for every sequence length


def test_unsupported_model_type_is_named():
    from transformers import AutoModelForCausalLM, PhiConfig

    config = PhiConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError, match="model type 'phi' is not supported"):
        capture(model)


def test_export_failure_names_model_type_and_construct(zoo):
    """A construct torch.export cannot trace (data-dependent control flow) gives one clear error."""
    model = zoo.model("llama")
    mlp = model.model.layers[0].mlp
    original = mlp.forward

    def branchy(x):
        return original(x) if x.sum() > 0 else -original(x)

    mlp.forward = branchy
    with pytest.raises(UnsupportedModelError, match="cannot capture model type 'llama' with torch.export") as info:
        capture(model)
    message = str(info.value)
    assert "\n" not in message and len(message) < 500



def test_capture_leaves_the_global_rng_alone(zoo):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    capture(zoo.pristine("opt"))
    assert torch.equal(torch.rand(3), expected)
