"""Evaluation suite: settings numerics, agreement with the reference, the reference cache."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mqc
from mqc import quant
from mqc.errors import MqcError
from mqc.evaluation import reference as refcache
from mqc.evaluation import suite as suite_mod
from mqc.evaluation.settings import FakeQuantKVCache, Setting, applied, linear_inputs

SMALL = suite_mod.Suite("test", 192, 48, (128, 1024), 256, 3, 6, ("W",), context=64)


def _reference_rows(x: np.ndarray, bits: int, group: int, symmetric: bool) -> np.ndarray:
    """The grid of :func:`quant.fake_quantize_rows` written out per group in float32 numpy."""
    out = np.empty_like(x)
    tiny = np.finfo(np.float32).tiny
    for r in range(x.shape[0]):
        for g0 in range(0, x.shape[1], group):
            v = x[r, g0 : g0 + group]
            if symmetric:
                qmax = np.float32(2 ** (bits - 1) - 1)
                s = max(np.float32(np.abs(v).max() / qmax), tiny)
                out[r, g0 : g0 + group] = np.clip(np.round(v / s), -qmax, qmax) * s
            else:
                levels = np.float32(2**bits - 1)
                s = max(np.float32((v.max() - v.min()) / levels), tiny)
                z = np.round(-v.min() / s)
                out[r, g0 : g0 + group] = (np.clip(np.round(v / s) + z, 0, levels) - z) * s
    return out


@given(
    rows=st.integers(1, 5),
    groups=st.integers(1, 3),
    group=st.sampled_from([4, 32]),
    bits=st.sampled_from([2, 4, 8]),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1e-3, 1.0, 300.0]),
)
def test_fake_quantize_rows_equals_the_reference(rows, groups, group, bits, symmetric, seed, scale):
    x = torch.randn(rows, groups * group, generator=torch.Generator().manual_seed(seed)) * scale
    x[0, :group] = 0.0  # an all-zero group stays zero
    got = quant.fake_quantize_rows(x, bits, group, symmetric)
    np.testing.assert_array_equal(got.numpy(), _reference_rows(x.numpy(), bits, group, symmetric))
    assert torch.all(got[0, :group] == 0)
    # rounding to nearest: never more than half a step away inside the group's range
    step = (x.reshape(rows, groups, group).abs().amax(-1) / (2 ** (bits - 1) - 1)) if symmetric else None
    if symmetric:
        err = (got - x).abs().reshape(rows, groups, group).amax(-1)
        assert torch.all(err <= step * 0.5 * (1 + 1e-5) + 1e-30)


def test_fake_quantize_rows_by_hand():
    x = torch.tensor([[-1.0, 0.0, 0.6, 1.0]])
    assert quant.fake_quantize_rows(x, 4, symmetric=True)[0].tolist() == pytest.approx([-1.0, 0.0, 4 / 7, 1.0])
    assert quant.fake_quantize_rows(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), 2).tolist() == [[0.0, 1.0, 2.0, 3.0]]
    with pytest.raises(ValueError, match="multiple of the group size"):
        quant.fake_quantize_rows(torch.zeros(1, 6), 4, 4)


def test_settings_parse():
    assert Setting.parse("W+A8+KV4") == Setting("W+A8+KV4", 8, 4)
    assert Setting.parse("W") == Setting("W")
    with pytest.raises(MqcError, match="unknown setting"):
        Setting.parse("W+A3")


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_quantized_kv_cache_prefill_equals_token_by_token_decode(zoo, family):
    """Per-token grids: scoring a window at once sees what decoding it token by token would."""
    model = zoo.pristine(family)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=ids, past_key_values=FakeQuantKVCache(model.config, 4)).logits[0]
        cache = FakeQuantKVCache(model.config, 4)
        steps = [model(input_ids=ids[:, i : i + 1], past_key_values=cache).logits[0, 0] for i in range(12)]
        exact = model(input_ids=ids, use_cache=False).logits[0]
    torch.testing.assert_close(torch.stack(steps), full, atol=2e-5, rtol=1e-5)
    assert (full - exact).abs().max() > 1e-4  # and it did quantize
    assert cache.layers[0].keys.shape[-2] == 12


def test_activation_setting_quantizes_every_linear_input_but_the_head(zoo):
    model = zoo.pristine("llama")
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    seen: dict[str, torch.Tensor] = {}
    targets = linear_inputs(model)
    assert model.lm_head not in targets.values() and len(targets) == 14
    with applied(model, Setting.parse("W+A8")) as kwargs:
        assert kwargs() == {}
        handles = [m.register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0])) for n, m in targets.items()]
        with torch.no_grad():
            during = model(input_ids=ids).logits
        for h in handles:
            h.remove()
    assert set(seen) == set(targets)
    for x in seen.values():  # each token's row on its own int8 grid
        codes = x / (x.abs().amax(-1, keepdim=True) / 127)
        torch.testing.assert_close(codes, codes.round(), atol=1e-3, rtol=0)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after) and not torch.equal(before, during)  # hooks gone afterwards


def _run(model, reference, tokenizer, tmp_path, suite=SMALL, **kw):
    return suite_mod.run_suite(model, reference, tokenizer, suite, cache=tmp_path, progress=False, **kw).to_dict()


def test_model_against_itself_has_zero_kl_and_full_agreement(zoo, word_tokenizer, tmp_path):
    model = zoo.pristine("llama")
    result = _run(model, model, word_tokenizer, tmp_path, settings=["W"])
    (row,), ref = result["rows"], result["reference_row"]
    assert row["kl"] < 1e-6 and row["top1_agreement"] == 1.0 and row["greedy_agreement"] == 1.0
    assert row["ppl"] == pytest.approx(ref["ppl"], rel=1e-6)
    assert row["ppl_by_genre"] == pytest.approx(ref["ppl_by_genre"], rel=1e-6) and len(row["ppl_by_genre"]) == 15
    assert row["ppl_by_context"]["1024"] is None  # beyond the tiny model's 512 positions
    assert row["tokens"] == 189  # 192 tokens in 64-token windows: all but each window's first


def test_compressed_model_moves_away_from_its_reference(sharp_model, word_tokenizer, tmp_path):
    reference = sharp_model()
    compiled = mqc.compile(sharp_model(), mqc.Recipe(bits=2, group_size=32), calib=torch.randint(0, 256, (4, 32))).model
    result = _run(compiled, reference, word_tokenizer, tmp_path, settings=["W", "W+A4", "W+KV2"])
    w, a4, kv2 = result["rows"]
    assert 0 < w["kl"] and w["top1_agreement"] < 1 and w["ppl"] != result["reference_row"]["ppl"]
    assert a4["kl"] != w["kl"] and kv2["kl"] != w["kl"]  # each setting changes the model's outputs


def test_reference_is_cached_per_protocol(zoo, word_tokenizer, tmp_path, monkeypatch):
    model = zoo.pristine("llama")
    computed = []
    real = suite_mod._run
    monkeypatch.setattr(
        suite_mod,
        "_run",
        lambda m, t, s, setting, ref, head, writer, *a: (
            computed.append(writer is not None),
            real(m, t, s, setting, ref, head, writer, *a),
        )[1],
    )
    small = dataclasses.replace(SMALL, genres=False)  # the genres' tokenization is most of the time here
    first = _run(model, model, word_tokenizer, tmp_path, small)
    assert computed == [True, False]
    second = _run(model, model, word_tokenizer, tmp_path, small)
    assert computed == [True, False, False] and second["reference_row"] == first["reference_row"]
    _run(model, model, word_tokenizer, tmp_path, dataclasses.replace(small, context=32))  # protocol changed
    assert computed[3:] == [True, False]
    _run(model, model, word_tokenizer, tmp_path, dataclasses.replace(small, prompts=2))  # prompts changed
    assert computed[5:] == [True, False]
    changed = zoo.pristine("llama")
    with torch.no_grad():
        changed.model.norm.weight.add_(0.01)  # a different reference model
    _run(changed, changed, word_tokenizer, tmp_path, small)
    assert computed[7:] == [True, False]
    entries = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert len(entries) == refcache.KEEP  # four computed, the least recently used pruned


def test_vocabulary_mismatch_is_refused(zoo, word_tokenizer, tmp_path):
    other = mqc.tiny_model("llama")
    other.resize_token_embeddings(300)
    with pytest.raises(MqcError, match="different vocabularies"):
        _run(other, zoo.pristine("llama"), word_tokenizer, tmp_path)


def test_onnx_export_scores_like_its_artifact(sharp_model, tmp_path, word_tokenizer):
    """accuracy_level 0 computes what the torch runtime does: against the artifact as reference,
    KL ~ 0 and full agreement; the export records the artifact's source for ``mqc eval``."""
    from mqc.export.onnx import export_onnx

    compiled = mqc.compile(sharp_model(), mqc.Recipe(bits=4, group_size=32), calib=torch.randint(0, 256, (4, 32)))
    compiled.tokenizer = word_tokenizer
    art = mqc.save(compiled, tmp_path / "art")
    onnx_dir = export_onnx(*mqc.load(art), tmp_path / "onnx", accuracy_level=0)
    result = mqc.evaluate(str(onnx_dir), reference=str(art), suite=SMALL, cache=tmp_path / "ref", progress=False)
    (row,) = result.rows
    assert (
        row["setting"] == "W" and row["kl"] < 1e-6 and row["top1_agreement"] == 1.0 and row["greedy_agreement"] == 1.0
    )
    assert row["ppl"] == pytest.approx(result.reference_row["ppl"], rel=1e-4)
    with pytest.raises(MqcError, match="evaluated as exported"):
        mqc.evaluate(str(onnx_dir), reference=str(art), suite=SMALL, settings=["W+A8"], cache=tmp_path / "ref")


@pytest.mark.parametrize("family, bos", [("gemma", True), ("llama", False)])
def test_every_window_and_prompt_starts_with_bos_where_the_tokenizer_adds_one(zoo, tmp_path, family, bos):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [
        "the",
        "a",
        "of",
        "and",
        "to",
        "in",
        "is",
        "was",
        "he",
        "it",
        "that",
        "for",
        "on",
        "with",
        "as",
        "his",
        "at",
        "by",
        "jury",
        "said",
    ]
    vocab = {"<unk>": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>")
    model = zoo.pristine(family)
    firsts = []
    handle = model.register_forward_pre_hook(
        lambda m, a, kw: firsts.append(int(kw["input_ids"][0, 0])) if kw["input_ids"].shape[1] > 1 else None,
        with_kwargs=True,
    )
    try:
        _run(model, model, tokenizer, tmp_path, dataclasses.replace(SMALL, genres=False), settings=["W"])
    finally:
        handle.remove()
    assert len(firsts) > 10  # windows of both runs, long-context windows and prompts
    assert (all(f == 1 for f in firsts)) == bos and (1 not in firsts or bos)


def test_smoothing_scales_follow_smoothquant_and_divide_before_the_grid(zoo):
    from mqc.evaluation.settings import smoothing_scales

    model = zoo.pristine("llama")
    calib = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    name, module = "model.layers.0.mlp.down_proj", model.model.layers[0].mlp.down_proj
    seen = []
    handle = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    scales = smoothing_scales(model, calib, alpha=0.5)
    handle.remove()
    x_max = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen[:2]]).abs().amax(0)  # the two calibration rows
    expected = x_max.clamp(min=1e-5).sqrt() / module.weight.abs().amax(0).clamp(min=1e-5).sqrt()
    torch.testing.assert_close(scales[name], expected, rtol=1e-5, atol=0)
    raw, quantized = [], []
    before = module.register_forward_pre_hook(lambda m, a: raw.append(a[0].detach().clone()))  # runs first
    with applied(model, Setting.parse("W+A4"), scales):
        after = module.register_forward_pre_hook(lambda m, a: quantized.append(a[0].detach().clone()))
        with torch.no_grad():
            model(input_ids=calib[:1])
    before.remove()
    after.remove()
    s = scales[name]
    torch.testing.assert_close(quantized[0], quant.fake_quantize_rows(raw[0] / s, 4, symmetric=True) * s)
    assert not torch.allclose(quantized[0], quant.fake_quantize_rows(raw[0], 4, symmetric=True))  # smoothing matters
