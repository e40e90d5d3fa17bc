"""The measured-KL search: never over budget, and it repairs a plan the costs got wrong."""

import dataclasses

import numpy as np
import pytest
import torch

import mqc
from mqc.planning.allocate import allocate
from mqc.planning.choices import ChoiceSet
from mqc.planning.costs import CostTable
from mqc.planning.search import level_bytes, mutate, search
from mqc.planning.types import LayerPlan
from mqc.runtime.artifact import TENSORS, tensor_data_bytes


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))


def test_mutations_keep_the_budget():
    """Groups of one unit and of three tied siblings move one level at a time, never over budget."""
    groups = [(f"u{i}",) for i in range(6)] + [("q", "k", "v")]
    levels = {g: [tuple(LayerPlan(n, b, 32, 0, 8, 64, False) for n in g) for b in (2, 3, 4, 8)] for g in groups}
    budget = sum(level_bytes(levels[g][1]) for g in levels)
    rng = np.random.default_rng(0)
    state = {g: 1 for g in levels}
    moved = set()
    for _ in range(300):
        child = mutate(state, levels, budget, rng)
        moved |= {g for g in levels if child and child[g] != state[g]}
        state = child or state
        assert sum(level_bytes(levels[g][i]) for g, i in state.items()) <= budget
    assert ("q", "k", "v") in moved


def test_search_repairs_misleading_costs(calib, tmp_path, sharp_model):
    """Costs that say the lm_head does not matter and everything else does: the knapsack starves
    the lm_head, the search (which measures the model) moves bytes back and lowers the KL."""
    recipe = mqc.Recipe(method="mq", size="3.5bpw", allowed_group_sizes=(32,), search_generations=25)
    model = sharp_model()
    analysis = mqc.analyze(model, recipe, tmp_path / "analysis", calib=calib, progress=False)
    wrong = CostTable("misleading", {
        n: {c: (0.0 if n == "lm_head" else 1.0 / c[0]) for c in per} for n, per in analysis.costs.costs.items()
    }, analysis.costs.errors)  # fmt: skip
    choices = ChoiceSet.of(recipe)
    groups = choices.groups(analysis.units, analysis.shared_inputs)
    size = analysis.model_size(recipe.target)
    start = allocate(recipe, choices, analysis.units, groups, wrong, size)
    assert start.layers["lm_head"].bits == 2
    layers, report = search(analysis, start.layers, choices, groups, start.report.budget_bytes, 25, 0, progress=False)
    assert report.final_kl < 0.8 * report.start_kl and report.accepted > 0
    assert sum(e.nbytes for e in layers.values()) <= start.report.budget_bytes
    plan = dataclasses.replace(mqc.plan(analysis, recipe, search_generations=0, progress=False), layers=layers)
    out = mqc.save(mqc.lower(model, plan, analysis=analysis, progress=False), tmp_path / "a")
    on_disk = tensor_data_bytes(out / TENSORS)
    assert on_disk == size.total_bytes(sum(e.nbytes for e in layers.values())) and size.bpw(on_disk - size.fixed_bytes) <= 3.5
