"""Sensitivity scores equal a direct autograd computation; Fisher falls with more bits."""

import pytest
import torch

import mqc
from mqc import quant
from mqc.analysis.sensitivity import SensitivityTable


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """The streamed analysis (layer by layer, head by row blocks) of LLM-MQ's sensitivities."""
    model = mqc.tiny_model("llama", seed=1)
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    recipe = mqc.Recipe(method="mq", group_size=32, allowed_group_sizes=(32,), outlier_frac=0.01, sensitivity="fisher")
    out = tmp_path_factory.mktemp("sens") / "analysis"
    analysis = mqc.analyze(model, recipe, out, calib=calib, progress=False)
    table = SensitivityTable.from_dict(analysis.store.json("sensitivity.json"))
    return model, calib, analysis, table


@pytest.mark.parametrize("name", ["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj"])
def test_matches_direct_gradient(analysed, name):
    model, calib, _, table = analysed
    weight = model.get_submodule(name).weight
    grads = []
    for start in range(0, calib.shape[0], 4):  # same micro-batches as the pass
        batch = calib[start : start + 4]
        grads.append(torch.autograd.grad(model(input_ids=batch, labels=batch).loss, weight)[0])
    for bits in (2, 4, 8):
        delta = (quant.fake_quantize(weight.detach(), bits, 32) - weight.detach()).half().float()
        first = abs(float(sum((g * delta).sum() for g in grads)))
        fisher = float(sum((g.pow(2) * delta.pow(2)).sum() for g in grads))
        assert table.score(name, bits, "first_order", False) == pytest.approx(first, rel=1e-3, abs=1e-9)
        assert table.score(name, bits, "fisher", False) == pytest.approx(fisher, rel=1e-3, abs=1e-12)


def test_head_rows_match_the_direct_gradient_of_an_untied_head(tmp_path):
    """The head's gradient, made a block of rows at a time from the softmax, is autograd's."""
    model = mqc.tiny_model("qwen2", seed=1)  # untied embedding and head
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    recipe = mqc.Recipe(method="mq", group_size=32, allowed_group_sizes=(32,), sensitivity="fisher")
    analysis = mqc.analyze(model, recipe, tmp_path / "a", calib=calib, progress=False)
    table = SensitivityTable.from_dict(analysis.store.json("sensitivity.json"))
    for name in ("lm_head", "model.embed_tokens"):
        weight = model.get_submodule(name).weight
        grad = torch.autograd.grad(model(input_ids=calib, labels=calib).loss, weight)[0]
        delta = (quant.fake_quantize(weight.detach(), 3, 32) - weight.detach()).half().float()
        assert table.score(name, 3, "first_order", False) == pytest.approx(abs(float((grad * delta).sum())), rel=1e-3)
        assert table.score(name, 3, "fisher", False) == pytest.approx(float((grad.pow(2) * delta.pow(2)).sum()), rel=1e-3)


def test_fisher_falls_with_width_and_outliers_help(analysed):
    _, _, analysis, table = analysed
    assert analysis.costs.kind == "fisher"
    for name in analysis.units:
        fisher = [table.score(name, b, "fisher", False) for b in (2, 3, 4, 8, 16)]
        assert fisher == sorted(fisher, reverse=True), name
        assert table.score(name, 2, "fisher", True) < table.score(name, 2, "fisher", False)


def test_gradients_released(analysed):
    model, _, _, _ = analysed
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # as it was given
