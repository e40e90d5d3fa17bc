"""The exact allocator: optimal vs brute force, budget respected on disk, pins, infeasibility."""

import dataclasses
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mqc
from mqc.errors import AnalysisError, InfeasibleBudgetError
from mqc.planning.knapsack import solve_mckp
from mqc.runtime.artifact import stored_tensors


@st.composite
def knapsacks(draw):
    groups = draw(st.integers(1, 5))
    costs, sizes = [], []
    for _ in range(groups):
        options = draw(st.integers(1, 4))
        costs.append(draw(st.lists(st.floats(0, 100, allow_nan=False), min_size=options, max_size=options)))
        sizes.append(draw(st.lists(st.integers(1, 50), min_size=options, max_size=options)))
    smallest, largest = sum(map(min, sizes)), sum(map(max, sizes))
    budget = draw(st.integers(smallest, largest))
    return costs, sizes, budget


@settings(max_examples=60, deadline=None)
@given(knapsacks())
def test_solver_equals_brute_force(instance):
    costs, sizes, budget = instance
    choices, objective = solve_mckp(costs, sizes, budget)
    assert sum(sizes[g][c] for g, c in enumerate(choices)) <= budget
    best = min(
        sum(costs[g][c] for g, c in enumerate(combo))
        for combo in itertools.product(*[range(len(c)) for c in costs])
        if sum(sizes[g][c] for g, c in enumerate(combo)) <= budget
    )
    # exact up to HiGHS's tolerances, which act on costs scaled to a maximum of 1
    assert objective == pytest.approx(best, rel=1e-9, abs=1e-6 * max(max(c) for c in costs))


def test_solver_names_infeasible_minimum():
    with pytest.raises(InfeasibleBudgetError, match="smallest possible 7 bytes"):
        solve_mckp([[1.0, 2.0], [1.0]], [[3, 4], [4]], 6)


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


@settings(max_examples=6, deadline=None)
@given(
    bits=st.floats(3.2, 9.0),
    outliers=st.sampled_from([0.0, 0.01]),
    allowed=st.sampled_from([(2, 3, 4, 8, 16), (3, 4, 8), (2, 4, 16)]),
    groups=st.sampled_from([(), (32, 64), (64, 128)]),
)
def test_plan_fits_budget_on_disk(tmp_path_factory, calib, bits, outliers, allowed, groups):
    model = mqc.tiny_model("llama")
    recipe = mqc.Recipe(method="mq", bits=bits, group_size=32, outlier_frac=outliers, allowed_bits=allowed,
                        allowed_group_sizes=groups or (32,), pins=(mqc.Pin("*down_proj", 4),),
                        search_generations=2)  # fmt: skip
    try:
        compiled = mqc.compile(model, recipe, calib=calib, progress=False)
    except InfeasibleBudgetError as exc:
        assert "smallest plan" in str(exc)
        return
    plan = compiled.plan.layers
    assert all(p.bits in allowed for p in plan.values())
    assert all(p.group_size in (groups or (32,)) for p in plan.values() if p.bits != 16)
    assert all(p.bits >= 4 for n, p in plan.items() if n.endswith("down_proj"))
    n_weights = sum(p.n_weights for p in plan.values())
    # what is stored for the planned layers, read back from the written artifact
    out = mqc.save(compiled, tmp_path_factory.mktemp("a") / "art")
    tensors, aliases = stored_tensors(mqc.load(out)[0])
    names = {n: {n} | {a for a, src in aliases.items() if src == n} for n in tensors}  # a tied fp16 lm_head
    planned = lambda n: any(alias.startswith(q + ".") for alias in names[n] for q in plan)
    stored = sum(t.numel() * t.element_size() for n, t in tensors.items() if planned(n))
    assert stored == sum(p.nbytes for p in plan.values())
    assert 8 * stored / n_weights <= bits + 1e-9
    assert compiled.plan.allocation.slack_bytes >= 0


def test_tied_embedding_counted_once(calib):
    model = mqc.tiny_model("llama")  # tied embeddings
    compiled = mqc.compile(model, mqc.Recipe(method="mq", bits=5.0, group_size=32), calib=calib, progress=False)
    assert "lm_head" in compiled.plan.layers and "model.embed_tokens" not in compiled.plan.layers
    assert type(model.model.embed_tokens).__name__ == "QEmbedding"
    assert model.model.embed_tokens.table is model.lm_head


@pytest.mark.parametrize("budget", [{"bits": 1.0}, {"size": "1.5bpw"}, {"size": "10kB"}])
def test_infeasible_budget_refused_before_analysis(calib, monkeypatch, budget):
    from mqc.analysis.sweep import LayerSweep

    def analysis(*args):
        raise AssertionError("analysis ran before the infeasible budget was refused")

    monkeypatch.setattr(LayerSweep, "analyze", analysis)
    with pytest.raises(InfeasibleBudgetError, match=r"smallest plan allowed by the recipe makes \d+\.\d+ bpw"):
        mqc.compile(mqc.tiny_model("llama"), mqc.Recipe(method="mq", **budget), calib=calib, progress=False)


def test_budget_frac_and_bytes_agree(calib):
    from mqc.planning.budget import unit_budget

    model = mqc.tiny_model("llama")
    recipe = mqc.Recipe(method="mq", budget_frac=0.3, group_size=32, search="none")
    a = mqc.compile(model, recipe, calib=calib, progress=False)
    fp16 = sum(p.n_weights * 2 for p in a.plan.layers.values())
    assert a.plan.allocation.budget_bytes == int(0.3 * fp16)
    units, size = a.analysis.units, a.plan.size
    assert unit_budget(mqc.Recipe(method="mq", budget_bytes=12345), units, size) == 12345
    whole = unit_budget(mqc.Recipe(method="mq", size="60kB"), units, size)
    assert whole == 60_000 - size.fixed_bytes


def test_one_analysis_plans_every_size_as_separate_compiles_do(calib, tmp_path):
    """A size sweep plans from one analysis; each plan is what a compile of its own would make."""
    recipe = mqc.Recipe(method="mq", size="4bpw", allowed_group_sizes=(32,), outlier_frac=0.01, search_generations=3)
    analysis = mqc.analyze(mqc.tiny_model("llama"), recipe, tmp_path / "analysis", calib=calib, progress=False)
    tighter = dataclasses.replace(recipe, size="3.5bpw", pins=(mqc.Pin("*v_proj", 4),))
    fresh = mqc.compile(mqc.tiny_model("llama"), tighter, calib=calib, progress=False, analysis=tmp_path / "fresh")
    planned = mqc.plan(analysis, tighter, progress=False)
    assert {n: (p.bits, p.group_size) for n, p in planned.layers.items()} == {
        n: (p.bits, p.group_size) for n, p in fresh.plan.layers.items()
    }
    assert planned.search.final_kl == pytest.approx(fresh.plan.search.final_kl, rel=1e-6)
    with pytest.raises(AnalysisError, match="outlier_frac"):  # names what the analysis was made with
        mqc.plan(analysis, dataclasses.replace(recipe, outlier_frac=0.0))
