"""Predicted-KL costs: second-order predictions against the KL measured on the model itself."""

import copy

import pytest
import torch

import mqc
from mqc.kl import mean_kl, reference_logprobs
from mqc.passes import keys
from mqc.passes.search import PlanModel


@pytest.fixture(scope="module")
def compiled(sharp_model):
    model = sharp_model()
    calib = torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(0))
    recipe = mqc.Recipe(method="mq", size="6bpw", allowed_group_sizes=(32,), search="none")
    return mqc.compile(copy.deepcopy(model), recipe, calib=calib, progress=False), model, calib


def test_model_against_itself_has_zero_kl(compiled):
    _, model, calib = compiled
    assert mean_kl(model, calib[:2], reference_logprobs(model, calib[:2])) == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("unit", ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.v_proj", "lm_head"])
def test_single_layer_prediction_matches_measurement(compiled, unit):
    """One unit at 3 bits, the rest fp16: predicted and measured KL within a factor of 2.5."""
    result, model, calib = compiled
    ctx = result.context
    work = PlanModel(model, ctx[keys.UNITS], ctx[keys.CANDIDATES])
    plan = {n: dict(ctx[keys.CANDIDATES].units[n])[(16, None)].plan for n in ctx[keys.UNITS]}
    plan[unit] = ctx[keys.CANDIDATES].units[unit][(3, 32)].plan
    measured = mean_kl(work.apply(plan), calib, reference_logprobs(model, calib))
    predicted = ctx[keys.COSTS].plan_cost(plan)
    assert measured > 1e-5 and predicted / 2.5 < measured < predicted * 2.5


def test_costs_fall_with_width(compiled):
    result, _, _ = compiled
    for per_choice in result.context[keys.COSTS].costs.values():
        costs = [per_choice[(b, 32)] for b in (2, 3, 4, 8)]
        assert costs == sorted(costs, reverse=True) and per_choice[(16, None)] <= costs[-1]
