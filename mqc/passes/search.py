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
from mqc.passes.units import LayerPlan, WeightUnit, allocation_groups, choice_of, common_choices, plan_for

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


Level = tuple[LayerPlan, ...]  # one choice for every unit of an allocation group


def level_bytes(level: Level) -> int:
    return sum(e.nbytes for e in level)


def unit_levels(ctx: CompileContext) -> dict[tuple[str, ...], list[Level]]:
    """Each allocation group's non-dominated choices, smallest first (see module docstring); a
    group is one unit, or siblings the target fuses (:func:`mqc.passes.units.allocation_groups`)."""
    recipe, units, table = ctx.recipe, ctx[keys.UNITS], ctx[keys.CANDIDATES]
    levels = {}
    for group in allocation_groups(units):
        error = {c: sum(float(table.units[n][c].row_error.sum()) for n in group) for c in common_choices(group, units, recipe)}
        options = sorted(
            (tuple(plan_for(units[n], c, recipe) for n in group) for c in error),
            key=lambda level: (level_bytes(level), error[choice_of(level[0])]),
        )
        kept: list[Level] = []
        for level in options:
            if not kept or error[choice_of(level[0])] < error[choice_of(kept[-1][0])]:
                kept.append(level)
        levels[group] = kept
    return levels


def mutate(state: dict, levels: dict, budget: int, rng: np.random.Generator) -> dict | None:
    """Raise 1..MAX_RAISES random groups one level, then lower random others until it fits."""
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
    size = sum(level_bytes(levels[n][i]) for n, i in child.items())
    while size > budget:
        down = [n for n in names if n not in raised and child[n] > 0]
        if not down:
            return None
        name = down[int(rng.integers(len(down)))]
        size -= level_bytes(levels[name][child[name]]) - level_bytes(levels[name][child[name] - 1])
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
        for group, options in levels.items():  # the knapsack never picks a dominated choice, but ties may
            planned = sum(start_plan[n].nbytes for n in group)
            state[group] = max(i for i, level in enumerate(options) if level_bytes(level) <= planned)
        calib = ctx[keys.CALIB]
        stages = [calib[: min(n, calib.shape[0])] for n in STAGE_SEQUENCES]
        references = [reference_logprobs(ctx.model, ids) for ids in stages]
        work = PlanModel(ctx.model, ctx[keys.UNITS], ctx[keys.CANDIDATES])
        units = ctx[keys.UNITS]

        def to_plan(s) -> dict[str, LayerPlan]:
            entries = {n: e for g, i in s.items() for n, e in zip(g, levels[g][i])}
            return {n: entries[n] for n in units}


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
