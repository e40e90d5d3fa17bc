"""Quantized KV cache (KIVI grids, PM-KVQ widths): numerics, cache contents, decoding, allocation."""

import copy
import dataclasses
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mqc
from mqc import quant
from mqc.analysis.kv_costs import interpolated_positions, measure_costs
from mqc.errors import AnalysisError, InfeasibleBudgetError, RecipeError, UnsupportedModelError
from mqc.models import tiny_config
from mqc.passes import keys
from mqc.planning.kv import PAIRS, KVCosts, allocate_kv, base_settings
from mqc.runtime.kv import QuantKVCache, QuantKVSettings, install, kv_accounting, quant_cache_bytes
from mqc.stream.stack import LayerStack

CALIB = torch.randint(3, 256, (2, 48), generator=torch.Generator().manual_seed(0))


def ids(batch=2, length=50, seed=1):
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def stepwise_logits(model, tokens, prefill, mask=None):
    with torch.no_grad():
        out = model(tokens[:, :prefill], attention_mask=None if mask is None else mask[:, :prefill])
        cache, logits = out.past_key_values, [out.logits]
        for t in range(prefill, tokens.shape[1]):
            step_mask = None if mask is None else mask[:, : t + 1]
            logits.append(model(tokens[:, t : t + 1], past_key_values=cache, attention_mask=step_mask).logits)
    return torch.cat(logits, dim=1), cache


def mixed(layers: int, **kwargs) -> QuantKVSettings:
    k = tuple((2, 4, 8, 16)[i % 4] for i in range(layers))
    v = tuple((4, 2, 16, 8)[i % 4] for i in range(layers))
    return QuantKVSettings(k, v, **kwargs)


# --------------------------------------------------------------------------------------------
# numerics
# --------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), groups=st.integers(1, 4), rows=st.integers(1, 5), seed=st.integers(0, 99))
def test_minmax_grid_matches_formula(bits, groups, rows, seed):
    x = torch.randn(rows, groups * 16, generator=torch.Generator().manual_seed(seed)) * 3 + 1
    packed, scale, low = quant.quantize_minmax(x, bits, 16)
    levels = 2**bits - 1
    xg = x.view(rows, groups, 16)
    lo16 = xg.amin(-1).half()
    s16 = ((xg.amax(-1) - lo16.float()) / levels).half()
    codes = ((xg - lo16.float()[..., None]) / s16.float()[..., None]).round().clamp(0, levels)
    assert torch.equal(scale, s16) and torch.equal(low, lo16)
    assert torch.equal(quant.unpack(packed, bits, groups * 16).view(rows, groups, 16).float(), codes)
    expected = (codes * s16.float()[..., None] + lo16.float()[..., None]).view(rows, -1)
    assert torch.equal(quant.dequantize_minmax(packed, scale, low, bits, 16), expected)
    assert (expected - x).abs().max() <= s16.float().max() * 0.5 + 1e-3  # within half a step (fp16 grid)
    assert packed.numel() + 2 * (scale.numel() + low.numel()) == rows * quant.minmax_bytes(groups * 16, bits, 16)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_code_planes_are_the_stream_by_plane(bits):
    packed = torch.randint(0, 256, (3, 6), dtype=torch.uint8)
    codes = quant.unpack(packed, bits, 6 * 8 // bits).float()
    planes = quant.code_planes(packed, bits)
    assert planes.shape == (8 // bits, 3, 6)
    for i in range(8 // bits):  # plane i holds the i-th code of every byte
        assert torch.equal(planes[i], codes[:, i :: 8 // bits])
    assert torch.equal(quant.codes_float(packed, bits), codes)
    out, scratch = torch.full_like(planes, -1.0), torch.empty(planes.shape, dtype=torch.uint8)
    assert torch.equal(quant.code_planes(packed, bits, out=out, scratch=scratch), planes)


# --------------------------------------------------------------------------------------------
# cache contents
# --------------------------------------------------------------------------------------------
def test_cache_contents_equal_reference_across_window_and_lowering():
    model = mqc.tiny_model("llama")
    layers = model.config.num_hidden_layers
    s = QuantKVSettings((4,) * layers, (8,) * layers, window=5, sinks=2, group=4, value_group=8,
                        lower_after=8, k_low=(2,) * layers, v_low=(4,) * layers)  # fmt: skip
    install(model, s)
    cache = QuantKVCache(model)
    layer = cache.layers[0]
    heads, d = model.config.num_key_value_heads, model.config.head_dim
    gen = torch.Generator().manual_seed(3)
    seen_k, seen_v = [], []
    for step in range(60):
        k, v = torch.randn(1, heads, 1, d, generator=gen), torch.randn(1, heads, 1, d, generator=gen)
        seen_k.append(k)
        seen_v.append(v)
        cache.begin_forward(None, None, 1, 1, k.device)
        layer.update(k, v)
        total = step + 1
        all_k, all_v = torch.cat(seen_k, 2), torch.cat(seen_v, 2)
        start = min(2, total)
        b0 = start + 4 * (max(0, total - start - 5) // 4)
        b1 = start + 4 * (max(0, total - start - 13) // 4)
        assert layer.n_exact == total - b0 and torch.equal(layer.keys[..., : layer.n_exact, :], all_k[..., b0:, :])
        assert torch.equal(layer.head_keys, all_k[..., :start, :])
        assert (layer.stages[0].tokens, layer.stages[1].tokens) == (b0 - b1, b1 - start)

        def hi(x, per_channel):  # the reference grid of stage 0 (keys per channel, values per token)
            if per_channel:
                g = x.unflatten(2, (-1, 4)).transpose(-1, -2)
                return quant.dequantize_minmax(*quant.quantize_minmax(g, 4, 4), 4, 4).transpose(-1, -2).flatten(2, 3)
            return quant.dequantize_minmax(*quant.quantize_minmax(x, 8, 8), 8, 8)

        def lo(x, per_channel):  # stage 1: re-quantized from stage 0's stored values
            y = hi(x, per_channel)
            if per_channel:
                g = y.unflatten(2, (-1, 4)).transpose(-1, -2)
                return quant.dequantize_minmax(*quant.quantize_minmax(g, 2, 4), 2, 4).transpose(-1, -2).flatten(2, 3)
            return quant.dequantize_minmax(*quant.quantize_minmax(y, 4, 8), 4, 8)

        if b0 > b1:
            keys0, values0 = layer.stages[0].decode()
            assert torch.equal(keys0, hi(all_k[..., b1:b0, :], True))
            assert torch.equal(values0, hi(all_v[..., b1:b0, :], False))
        if b1 > start:
            keys1, values1 = layer.stages[1].decode()
            assert torch.equal(keys1, lo(all_k[..., start:b1, :], True))
            assert torch.equal(values1, lo(all_v[..., start:b1, :], False))
    held = layer.nbytes()["compressed"]
    per_token = [s.token_bytes(0, k, heads, d) for k in (0, 1)]
    assert held == layer.stages[0].tokens * per_token[0] + layer.stages[1].tokens * per_token[1]


# --------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma"])
def test_one_forward_equals_stepwise_decoding(family):
    """Mixed widths and progressive lowering: a single forward sees what decoding sees (the mask),
    and the decode path that reads codes directly equals it."""
    model = mqc.tiny_model(family)
    layers = model.config.num_hidden_layers
    install(model, mixed(layers, window=6, sinks=2, group=4, value_group=8, lower_after=8,
                         k_low=(2,) * layers, v_low=(2,) * layers))  # fmt: skip
    x = ids()
    with torch.no_grad():
        once = model(x).logits
    stepped, cache = stepwise_logits(model, x, prefill=9)
    assert isinstance(cache, QuantKVCache)
    torch.testing.assert_close(stepped, once, atol=2e-5, rtol=1e-4)
    with torch.no_grad():
        exact = model(x, use_cache=False).logits
    assert (once - exact).abs().max() > 1e-3  # the cache changed something


def test_left_padded_batch():
    """Groups are aligned on the batch's sequence index: an unpadded row decodes as it would alone;
    a padded row's groups hold different tokens (documented), but its one forward and its
    token-by-token decoding still agree."""
    model = mqc.tiny_model("llama")
    install(
        model, QuantKVSettings.uniform(model.config.num_hidden_layers, 2, window=4, sinks=2, group=4, value_group=8)
    )
    x = ids(length=30)
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    batched, _ = stepwise_logits(model, x, prefill=12, mask=mask)
    alone, _ = stepwise_logits(model, x[:1], prefill=12)
    torch.testing.assert_close(batched[:1], alone, atol=2e-5, rtol=1e-4)
    with torch.no_grad():
        once = model(x, attention_mask=mask).logits
    torch.testing.assert_close(batched[1:, 5:], once[1:, 5:], atol=2e-5, rtol=1e-4)


def test_full_precision_settings_reproduce_the_original():
    original = mqc.tiny_model("llama")
    layers = original.config.num_hidden_layers
    x = ids()
    with torch.no_grad():
        reference = original(x).logits
        wide = copy.deepcopy(original)
        install(wide, QuantKVSettings.uniform(layers, 2, window=64, value_group=8))  # every token in the window
        assert torch.equal(wide(x).logits, reference)
        fp16 = copy.deepcopy(original)
        install(fp16, QuantKVSettings.uniform(layers, 16, window=4, group=4, value_group=8))
        torch.testing.assert_close(fp16(x).logits, reference, atol=2e-3, rtol=0)  # fp16 storage only
        stepped, _ = stepwise_logits(fp16, x, prefill=5)
        torch.testing.assert_close(stepped, reference, atol=2e-3, rtol=0)


def test_generate_and_artifact_round_trip(tmp_path):
    model = mqc.tiny_model("qwen2")
    kv = mqc.KVQuantRecipe(bits=4, window=4, sinks=2, group=4, value_group=8, context=256)
    compiled = mqc.compile(model, mqc.Recipe(method="rtn", bits=4, group_size=32, kv_quant=kv), progress=False)
    out = compiled.model.generate(ids(batch=1, length=6), max_new_tokens=20, do_sample=False)
    mqc.save(compiled, tmp_path / "a")
    loaded, _ = mqc.load(tmp_path / "a")
    again = loaded.generate(ids(batch=1, length=6), max_new_tokens=20, do_sample=False)
    assert torch.equal(out, again)
    assert kv_accounting(tmp_path / "a", 256) == kv_accounting(compiled.model, 256)
    assert compiled.stats["kv"]["kv_fraction"] == kv_accounting(loaded, 256)["kv_fraction"]


def test_refusals():
    with pytest.raises(RecipeError, match="needs bits"):
        mqc.Recipe(kv_quant=mqc.KVQuantRecipe())  # neither bits, budget nor a joint memory
    with pytest.raises(RecipeError, match="not both"):
        mqc.KVQuantRecipe(bits=4, budget_frac=0.2)
    with pytest.raises(RecipeError, match="mq allocation"):
        mqc.Recipe(memory="10MB", kv_quant=mqc.KVQuantRecipe())
    with pytest.raises(RecipeError, match="bits per weight"):
        mqc.Recipe(method="mq", memory="3bpw", kv_quant=mqc.KVQuantRecipe())
    with pytest.raises(RecipeError, match="only memory"):
        mqc.Recipe(method="mq", memory="10MB", size="5MB", kv_quant=mqc.KVQuantRecipe())
    with pytest.raises(RecipeError):
        mqc.KVQuantRecipe(bits=3)
    with pytest.raises(RecipeError):
        mqc.Recipe(kv=mqc.KVRecipe(), kv_quant=mqc.KVQuantRecipe(bits=4))
    with pytest.raises(RecipeError):
        QuantKVSettings((4, 5), (4, 4))
    model = mqc.tiny_model("llama")
    install(model, QuantKVSettings.uniform(model.config.num_hidden_layers, 4, value_group=20))
    with pytest.raises(UnsupportedModelError, match="value groups"):
        model(ids())


# --------------------------------------------------------------------------------------------
# allocation (PM-KVQ)
# --------------------------------------------------------------------------------------------
def test_positions_are_interpolated_over_the_context():
    p = interpolated_positions(48, 4096)
    assert p[0] == 0 and p[-1] == 4095 and bool((p.diff() > 0).all())
    assert torch.equal(interpolated_positions(48, 32), torch.arange(48))


@settings(max_examples=25, deadline=None)
@given(frac=st.floats(0.15, 1.0), seed=st.integers(0, 999), lower=st.sampled_from([None, 64]))
def test_allocation_is_the_exact_optimum_within_the_budget(frac, seed, lower):
    config = tiny_config("llama")
    layers = config.num_hidden_layers
    gen = torch.Generator().manual_seed(seed)

    def table():
        return tuple(
            dict(zip((2, 4, 8, 16), sorted(torch.rand(4, generator=gen).tolist(), reverse=True))) for _ in range(layers)
        )

    costs = KVCosts(table(), table())
    kv = mqc.KVQuantRecipe(budget_frac=frac, context=512, group=32, value_group=8, lower_after=lower)

    def fraction(pairs):
        s = base_settings(kv, layers, tuple(p[0] for p in pairs), tuple(p[1] for p in pairs))
        return quant_cache_bytes(s, config, 512)["kv_fraction"]

    def cost(pairs):
        s = base_settings(kv, layers, tuple(p[0] for p in pairs), tuple(p[1] for p in pairs))
        tokens = quant_cache_bytes(s, config, 512)["stage_tokens"]
        stages = [list(zip(s.k_bits, s.v_bits))] + ([list(zip(s.k_low, s.v_low))] if lower else [])
        return sum(n / sum(tokens) * costs.of(i, st_[i]) for st_, n in zip(stages, tokens) for i in range(layers))

    fitting = [c for c in itertools.product(PAIRS, repeat=layers) if fraction(c) <= frac]
    if not fitting:
        with pytest.raises(InfeasibleBudgetError):
            allocate_kv(costs, kv, config)
        return
    s = allocate_kv(costs, kv, config)
    chosen = tuple(zip(s.k_bits, s.v_bits))
    assert fraction(chosen) <= frac
    assert cost(chosen) <= min(cost(c) for c in fitting) + 1e-9


def test_pm_kvq_compile_measures_costs_and_fits():
    model = mqc.tiny_model("llama")
    kv = mqc.KVQuantRecipe(budget_frac=0.5, context=512, group=8, value_group=8, window=8, sinks=2)
    compiled = mqc.compile(model, mqc.Recipe(method="rtn", bits=16, kv_quant=kv), calib=CALIB, progress=False)
    plan, costs = compiled.results[keys.KV_QUANT_PLAN], compiled.analysis.kv_costs
    assert plan["at_context"]["kv_fraction"] <= 0.5
    for table in (*costs.key, *costs.value):
        assert table[16] == 0.0 and table[2] >= table[4] >= table[8] >= 0.0
    assert max(costs.value[0].values()) > 0  # measured, not zero
    assert compiled.stats["kv"]["kv_fraction"] == plan["at_context"]["kv_fraction"]
    assert compiled.model.config.mqc_kv["kind"] == "quant"


# --------------------------------------------------------------------------------------------
# one memory budget for weights and KV
# --------------------------------------------------------------------------------------------
JOINT_KV = mqc.KVQuantRecipe(context=2048, group=8, value_group=8, window=8, sinks=2, cost_samples=1)


@pytest.fixture(scope="module")
def joint():
    recipe = mqc.Recipe(method="mq", memory="0.8MB", kv_quant=JOINT_KV, search="none")
    return mqc.compile(mqc.tiny_model("llama"), recipe, calib=CALIB, progress=False)


def test_joint_budget_holds_weights_and_kv(joint):
    from mqc.report import build_report, summary_lines

    split, choice = joint.plan.joint, joint.plan.kv
    kv = quant_cache_bytes(choice, joint.model.config, 2048)["cache_bytes_after"]
    weights = joint.model_bytes
    assert split["kv_bytes"] == kv and weights + kv <= 800_000 == split["memory_bytes"]
    assert min(choice.k_bits) < 16  # the budget forced the cache below fp16
    assert tuple(joint.model.config.mqc_kv["k_bits"]) == choice.k_bits
    assert {r["kv_bits"] for r in split["fixed_kv"]} == {2, 4, 8, 16}
    fitting = [r["predicted_cost"] for r in split["fixed_kv"] if r["predicted_cost"] is not None]
    assert split["predicted_cost"] <= min(fitting) + 1e-12  # the joint optimum includes every fixed split
    lines = summary_lines(build_report(joint))
    assert any(line.startswith("memory 0.76 MiB holds weights") for line in lines)


def test_joint_budget_refused_before_analysis():
    recipe = mqc.Recipe(method="mq", memory="0.2MB", kv_quant=JOINT_KV, search="none")
    with pytest.raises(InfeasibleBudgetError, match="narrowest KV cache"):
        mqc.compile(mqc.tiny_model("llama"), recipe, calib=CALIB, progress=False)


def test_cli_flags_build_the_recipe():
    from mqc.cli import build_parser, recipe_from_args

    args = build_parser().parse_args(
        ["compile", "--out", "x", "--memory", "150MB", "--kv-context", "8192", "--kv-batch", "2"]
    )
    recipe = recipe_from_args(args)
    assert (recipe.method, recipe.memory) == ("mq", "150MB")
    assert (recipe.kv_quant.context, recipe.kv_quant.batch, recipe.kv_quant.measured) == (8192, 2, True)
    args = build_parser().parse_args(
        ["compile", "--out", "x", "--kv-mixed", "0.2", "--kv-group", "64", "--kv-lower-after", "512"]
    )
    kv = recipe_from_args(args).kv_quant
    assert (kv.budget_frac, kv.group, kv.value_group, kv.lower_after) == (0.2, 64, 64, 512)
    assert recipe_from_args(build_parser().parse_args(["compile", "--out", "x", "--kv-bits", "4"])).kv_quant.bits == 4


def test_exports_refuse_the_quantized_cache(tmp_path):
    from mqc.export import export_onnx

    model = mqc.tiny_model("llama")
    install(model, QuantKVSettings.uniform(model.config.num_hidden_layers, 4, value_group=8))
    with pytest.raises(UnsupportedModelError, match="quantized KV cache"):
        export_onnx(model, None, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()
    with pytest.raises(RecipeError, match="no mqc KV cache"):
        mqc.Recipe(method="mq", target="gguf", kv_quant=mqc.KVQuantRecipe(bits=4))


def test_joint_sweep_plans_from_one_analysis(joint):
    """Another memory from the same analysis: no second measurement of the KV costs; another
    context needs another analysis (the costs are measured at the context)."""
    recipe = mqc.Recipe(method="mq", memory="1MB", kv_quant=JOINT_KV, search="none")
    again = mqc.plan(joint.analysis, recipe, progress=False)
    assert again.joint["predicted_cost"] <= joint.plan.joint["predicted_cost"]
    other = dataclasses.replace(JOINT_KV, context=1024)
    with pytest.raises(AnalysisError, match="kv_costs.context"):
        mqc.plan(joint.analysis, dataclasses.replace(recipe, kv_quant=other))


@pytest.mark.parametrize("recipe", [
    mqc.Recipe(method="mq", size="6bpw", kv_quant=dataclasses.replace(JOINT_KV, budget_frac=0.5), search="none"),
    mqc.Recipe(method="mq", memory="0.8MB", kv_quant=JOINT_KV, search="none"),
    mqc.Recipe(bits=4, group_size=32, kv_quant=dataclasses.replace(JOINT_KV, budget_frac=0.5)),
])  # fmt: skip
def test_kv_costs_are_measured_on_the_float_model(recipe, tmp_path):
    """Whatever the weights become (PM-KVQ beside mq weights, a joint budget, uniform weights), the
    KV costs are those of the float model: facts about the model that a size sweep reuses. (They
    were once measured on the quantized weights with --kv-mixed and on float ones with --memory.)"""
    model = mqc.tiny_model("llama")
    compiled = mqc.compile(model, recipe, calib=CALIB, progress=False, analysis=tmp_path / "a")
    float_stack = LayerStack(mqc.tiny_model("llama"))
    expected = measure_costs(float_stack, CALIB[: JOINT_KV.cost_samples], JOINT_KV, progress=False)
    flat = lambda costs: [t[b] for t in (*costs.key, *costs.value) for b in (2, 4, 8, 16)]  # noqa: E731
    assert max(flat(expected)) > 0
    assert flat(compiled.analysis.kv_costs) == pytest.approx(flat(expected), rel=1e-5, abs=1e-12)
