"""Predicted-KL costs: second-order predictions against the KL measured on the model itself, and
the streamed plan evaluator against the lowered model."""

import copy

import pytest
import torch

import mqc
from mqc.kl import kl_sum, logprobs16, token_kl
from mqc.planning.evaluate import PlanEvaluator
from mqc.stream.stack import LayerStack


@pytest.fixture(scope="module")
def compiled(sharp_model, tmp_path_factory):
    model = sharp_model()
    calib = torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(0))
    recipe = mqc.Recipe(method="mq", size="6bpw", allowed_group_sizes=(32,), search="none")
    out = tmp_path_factory.mktemp("kl") / "analysis"
    return mqc.compile(copy.deepcopy(model), recipe, calib=calib, progress=False, analysis=out), model, calib


def fp16_plan(analysis, **changes):
    plans = analysis.candidates.plans
    plan = {n: plans[n][(16, None)] for n in analysis.units}
    return plan | {n: plans[n][c] for n, c in changes.items()}


def test_model_against_itself_has_zero_kl(compiled):
    _, model, calib = compiled
    stack = LayerStack(model)
    with stack.whole(hidden_out=True) as m:
        hidden = m(input_ids=calib[:1]).logits[0]
    head = stack.head()
    assert kl_sum(head, hidden, logprobs16(head, hidden, 256)) / hidden.shape[0] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("unit", ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.v_proj", "lm_head"])
def test_single_layer_prediction_matches_measurement(compiled, unit):
    """One unit at 3 bits, the rest fp16: predicted and measured KL within a factor of 2.5."""
    result, _, calib = compiled
    analysis = result.analysis
    plan = fp16_plan(analysis, **{unit: (3, 32)})
    (measured,) = PlanEvaluator(analysis, calib[:FISHER]).kl([plan], FISHER)
    predicted = analysis.costs.plan_cost(plan)
    assert measured > 1e-5 and predicted / 2.5 < measured < predicted * 2.5


FISHER = 16


def test_costs_fall_with_width(compiled):
    result, _, _ = compiled
    for per_choice in result.analysis.costs.costs.values():
        costs = [per_choice[(b, 32)] for b in (2, 3, 4, 8)]
        assert costs == sorted(costs, reverse=True) and per_choice[(16, None)] <= costs[-1]


def test_evaluator_measures_the_lowered_model(compiled):
    """The plan evaluator's KL (layer by layer, candidates and fp16 tensors) is the KL of the
    model the lowering builds, measured by an ordinary forward (float16 reference storage aside)."""
    result, model, calib = compiled
    ids = calib[:4]
    (measured,) = PlanEvaluator(result.analysis, ids).kl([result.plan.layers], 4)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1).reshape(-1, 256)
        logq = torch.log_softmax(result.model(input_ids=ids).logits.float(), -1).reshape(-1, 256)
    assert measured == pytest.approx(float(token_kl(logq, logp).mean()), rel=1e-3, abs=2e-6)


def test_shared_layers_give_the_same_scores(compiled):
    """A plan scored from the recorded parent's layers equals the same plan scored from scratch."""
    result, _, calib = compiled
    analysis = result.analysis
    parent = fp16_plan(analysis, **{"model.layers.1.mlp.up_proj": (4, 32)})
    children = [
        fp16_plan(analysis, **{"model.layers.1.mlp.up_proj": (4, 32), "model.layers.1.mlp.down_proj": (2, 32)}),
        fp16_plan(analysis, **{"model.layers.1.mlp.up_proj": (4, 32), "lm_head": (3, 32)}),
        fp16_plan(analysis, **{"model.layers.0.self_attn.q_proj": (2, 32)}),
    ]
    shared = PlanEvaluator(analysis, calib[:4])
    shared.kl([parent], 4, record=0)
    shared.accept()
    fresh = [PlanEvaluator(analysis, calib[:4]).kl([c], 1)[0] for c in children]
    assert shared.kl(children, 1) == pytest.approx(fresh, rel=1e-6)
