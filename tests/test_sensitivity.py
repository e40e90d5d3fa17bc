"""Sensitivity scores equal a direct autograd computation; Fisher falls with more bits."""

import pytest
import torch

import mqc
from mqc import quant
from mqc.capture import capture
from mqc.graph import GraphView
from mqc.passes import keys
from mqc.passes.act_stats import ActivationStats
from mqc.passes.base import CompileContext, PassManager
from mqc.passes.sensitivity import Sensitivity
from mqc.passes.units import SelectUnits


@pytest.fixture(scope="module")
def analysed():
    model = mqc.tiny_model("llama", seed=1)
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    recipe = mqc.Recipe(method="mq", group_size=32, allowed_group_sizes=(32,), outlier_frac=0.01, sensitivity="fisher")
    ctx = CompileContext(model, recipe, progress=False)
    ctx.results[keys.GRAPH] = GraphView(capture(model), model)
    ctx.results[keys.CALIB] = calib
    PassManager([Sensitivity(), ActivationStats(), SelectUnits()]).run(ctx)  # manager orders them
    return model, calib, ctx


def test_matches_direct_gradient(analysed):
    model, calib, ctx = analysed
    table = ctx[keys.SENSITIVITY]
    name = "model.layers.1.mlp.down_proj"
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


def test_fisher_falls_with_width_and_outliers_help(analysed):
    _, _, ctx = analysed
    table = ctx[keys.SENSITIVITY]
    for name in ctx[keys.UNITS]:
        fisher = [table.score(name, b, "fisher", False) for b in (2, 3, 4, 8, 16)]
        assert fisher == sorted(fisher, reverse=True), name
        assert table.score(name, 2, "fisher", True) < table.score(name, 2, "fisher", False)


def test_gradients_released(analysed):
    model, _, _ = analysed
    assert all(p.grad is None for p in model.parameters())
