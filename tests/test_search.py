"""The measured-KL search: never over budget, and it repairs a plan the costs got wrong."""

import dataclasses

import pytest
import torch

import mqc
from mqc.passes import keys
from mqc.passes.base import PassManager
from mqc.passes.bit_alloc import AllocateBits, CostTable
from mqc.passes.search import EvoSearch, mutate
from mqc.runtime.artifact import TENSORS, tensor_data_bytes


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))


def test_mutations_keep_the_budget():
    """Groups of one unit and of three tied siblings move one level at a time, never over budget."""
    import numpy as np

    from mqc.passes.search import level_bytes
    from mqc.passes.units import LayerPlan

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
    compiled = mqc.compile(sharp_model(), dataclasses.replace(recipe, search="none"), calib=calib, progress=False)
    ctx = compiled.context
    wrong = CostTable("misleading", {
        n: {c: (0.0 if n == "lm_head" else 1.0 / c[0]) for c in per} for n, per in ctx[keys.COSTS].costs.items()
    })  # fmt: skip
    model = sharp_model()
    run = mqc.api.CompileContext(model=model, recipe=recipe, progress=False)
    run.results.update({k: ctx.results[k] for k in (keys.GRAPH, keys.UNITS, keys.MODEL_SIZE, keys.CALIB, keys.CANDIDATES)})
    run.results[keys.COSTS] = wrong
    from mqc.passes.candidates import LowerCandidates

    PassManager([AllocateBits(final=False), EvoSearch(), LowerCandidates()]).run(run)
    start, report = run[keys.START_PLAN], run[keys.SEARCH]
    assert start["lm_head"].bits == 2
    assert report.final_kl < 0.8 * report.start_kl and report.accepted > 0
    plan = run[keys.BIT_PLAN]
    budget = run[keys.ALLOCATION].budget_bytes
    assert sum(e.nbytes for e in plan.values()) <= budget
    size = run[keys.MODEL_SIZE]
    out = mqc.save(mqc.api.CompiledModel(model, recipe, plan, run), tmp_path / "a")
    on_disk = tensor_data_bytes(out / TENSORS)
    assert on_disk == size.total_bytes(sum(e.nbytes for e in plan.values())) and size.bpw(on_disk - size.fixed_bytes) <= 3.5
