"""Refine the knapsack plan by measured whole-model KL at equal size (EvoPress-style).

Additive per-layer costs cannot see how errors of many layers compound; the model can. Starting
from the exact knapsack plan, a (1 + lambda) evolutionary search (EvoPress, Sieberling et al.
2024) repeatedly makes ``lambda`` offspring, each moving bytes between layers: one or more
random units go one level up (the next larger choice), random others go one level down until
the plan fits the budget again, so no plan ever exceeds it. Offspring are measured by KL to the
full-precision model on calibration tokens in two stages (all of them on a short window set,
the best one on a longer set, where it must beat the parent to replace it). The candidates are
the deployed weights, so a measured plan is exactly the model that will be written.

A unit's levels are its allowed choices sorted by bytes, keeping only those whose own output error
(the candidate's ``diag(dW H dW^T)``, a measured fact, not the cost model's prediction) is below
every smaller one's: a padded or otherwise dominated choice is never a step up, and a cost model
that is wrong about a unit cannot hide its larger choices from the search.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from mqc.kl import mean_kl, reference_logprobs
from mqc.passes import keys
from mqc.passes.base import CompileContext, Pass, PassResult
from mqc.passes.candidates import CandidateTable
from mqc.passes.quantize import round_to_fp16
from mqc.passes.units import LayerPlan, WeightUnit, allowed_choices, choice_of, plan_for

OFFSPRING = 6  # lambda
STAGE_SEQUENCES = (1, 4)  # calibration sequences measured per stage (all offspring, then the best)
MAX_RAISES = 3  # units moved up by one mutation (uniform in 1..MAX_RAISES)


@dataclass
class SearchReport:
    start_kl: float
    final_kl: float
    generations: int
    accepted: int
    evaluations: int
    seconds: float
    trace: list[float] = field(default_factory=list)  # parent KL after each generation


class PlanModel:
    """A float copy of the full-precision model whose unit weights can be set to any plan's candidates."""

    def __init__(self, model: torch.nn.Module, units: dict[str, WeightUnit], table: CandidateTable):
        self.model = copy.deepcopy(model)
        round_to_fp16(self.model)  # as the lowering stores every other tensor
        self.units, self.table = units, table
        self.original = {n: u.weight(model) for n, u in units.items()}  # views: the model is not changed
        self.applied: dict[str, tuple] = {}

    def apply(self, plan: dict[str, LayerPlan]) -> torch.nn.Module:
        with torch.no_grad():
            for name, entry in plan.items():
                choice = choice_of(entry)
                if self.applied.get(name) == choice:
                    continue
                dense = self.table.dense(name, choice, self.original[name])
                unit = self.units[name]
                param = self.model.get_submodule(name).weight
                param.copy_(dense.t() if unit.transposed else dense)
                self.applied[name] = choice
        return self.model


def unit_levels(ctx: CompileContext) -> dict[str, list[LayerPlan]]:
    """Each unit's non-dominated choices, smallest first (see module docstring)."""
    recipe, units, table = ctx.recipe, ctx[keys.UNITS], ctx[keys.CANDIDATES]
    levels = {}
    for name, unit in units.items():
        error = {c: float(cand.row_error.sum()) for c, cand in table.units[name].items()}
        options = sorted(
            (plan_for(unit, c, recipe) for c in allowed_choices(unit, recipe)),
            key=lambda e: (e.nbytes, error[choice_of(e)]),
        )
        kept: list[LayerPlan] = []
        for entry in options:
            if not kept or error[choice_of(entry)] < error[choice_of(kept[-1])]:
                kept.append(entry)
        levels[name] = kept
    return levels


def mutate(state: dict[str, int], levels, budget: int, rng: np.random.Generator) -> dict[str, int] | None:
    """Raise 1..MAX_RAISES random units one level, then lower random others until it fits."""
    child = dict(state)
    names = list(levels)
    raised = set()
    for _ in range(int(rng.integers(1, MAX_RAISES + 1))):
        up = [n for n in names if child[n] < len(levels[n]) - 1]
        if not up:
            break
        name = up[int(rng.integers(len(up)))]
        child[name] += 1
        raised.add(name)
    size = sum(levels[n][i].nbytes for n, i in child.items())
    while size > budget:
        down = [n for n in names if n not in raised and child[n] > 0]
        if not down:
            return None
        name = down[int(rng.integers(len(down)))]
        size -= levels[name][child[name]].nbytes - levels[name][child[name] - 1].nbytes
        child[name] -= 1
    return child if child != state else None


class EvoSearch(Pass):
    name = "search"
    requires = (keys.START_PLAN, keys.ALLOCATION, keys.UNITS, keys.CANDIDATES, keys.CALIB)
    produces = (keys.BIT_PLAN, keys.SEARCH)

    def run(self, ctx: CompileContext) -> PassResult:
        start = time.perf_counter()
        recipe, budget = ctx.recipe, ctx[keys.ALLOCATION].budget_bytes
        levels = unit_levels(ctx)
        start_plan = ctx[keys.START_PLAN]
        state = {}
        for name, entry in start_plan.items():  # the knapsack never picks a dominated choice, but ties may
            sizes = [e.nbytes for e in levels[name]]
            state[name] = max(i for i, s in enumerate(sizes) if s <= entry.nbytes)
        calib = ctx[keys.CALIB]
        stages = [calib[: min(n, calib.shape[0])] for n in STAGE_SEQUENCES]
        references = [reference_logprobs(ctx.model, ids) for ids in stages]
        work = PlanModel(ctx.model, ctx[keys.UNITS], ctx[keys.CANDIDATES])
        to_plan = lambda s: {n: levels[n][i] for n, i in s.items()}  # noqa: E731

        def fitness(s, stage):
            return mean_kl(work.apply(to_plan(s)), stages[stage], references[stage])

        rng = np.random.default_rng(recipe.calib.seed)
        parent_kl = fitness(state, 1)
        report = SearchReport(parent_kl, parent_kl, recipe.search_generations, 0, 1, 0.0)
        bar = tqdm(range(recipe.search_generations), desc="search (measured KL)", disable=not ctx.progress)
        for _ in bar:
            children = [c for c in (mutate(state, levels, budget, rng) for _ in range(OFFSPRING)) if c is not None]
            if children:
                scored = [(fitness(c, 0), i) for i, c in enumerate(children)]
                best = children[min(scored)[1]]
                best_kl = fitness(best, 1)
                report.evaluations += len(children) + 1
                if best_kl < parent_kl:
                    state, parent_kl = best, best_kl
                    report.accepted += 1
            report.trace.append(parent_kl)
            bar.set_postfix(kl=f"{parent_kl:.4f}")
        report.final_kl, report.seconds = parent_kl, time.perf_counter() - start
        plan = to_plan(state)
        assert sum(e.nbytes for e in plan.values()) <= budget  # mutations never leave the budget
        ctx.results[keys.BIT_PLAN] = plan
        ctx.results[keys.SEARCH] = report
        return PassResult(False, f"KL {report.start_kl:.4f} -> {report.final_kl:.4f} in {report.generations} generations")
