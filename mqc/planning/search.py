"""Refine the knapsack plan by measured whole-model KL at equal size (EvoPress-style).

Additive per-layer costs cannot see how errors of many layers compound; the model can. Starting
from the exact knapsack plan, a (1 + lambda) evolutionary search (EvoPress, Sieberling et al.
2024) repeatedly makes ``lambda`` offspring, each moving bytes between allocation groups: one or
more random groups go one level up (the next larger choice), random others go one level down
until the plan fits the budget again, so no plan ever exceeds it. Offspring are measured by KL to
the full-precision model on calibration tokens (:class:`~mqc.planning.evaluate.PlanEvaluator`,
streamed) in two stages (all of them on a short window set, the best one on a longer set, where it
must beat the parent to replace it). The candidates are the deployed weights, so a measured plan
is exactly the model that will be written.

A group's levels are its allowed choices sorted by bytes, keeping only those whose own output error
(the candidates' summed ``diag(dW H dW^T)``, a measured fact, not the cost model's prediction) is
below every smaller one's: a padded or otherwise dominated choice is never a step up, and a cost
model that is wrong about a unit cannot hide its larger choices from the search.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from mqc.planning.choices import ChoiceSet
from mqc.planning.costs import CostTable
from mqc.planning.evaluate import PlanEvaluator
from mqc.planning.types import LayerPlan, WeightUnit, choice_of

OFFSPRING = 6  # lambda
STAGE_SEQUENCES = (1, 4)  # calibration sequences measured per stage (all offspring, then the best)
MAX_RAISES = 3  # groups moved up by one mutation (uniform in 1..MAX_RAISES)

Level = tuple[LayerPlan, ...]  # one choice for every unit of an allocation group


@dataclass
class SearchReport:
    start_kl: float
    final_kl: float
    generations: int
    accepted: int
    evaluations: int
    seconds: float
    trace: list[float] = field(default_factory=list)  # parent KL after each generation


def level_bytes(level: Level) -> int:
    return sum(e.nbytes for e in level)


def group_levels(
    choices: ChoiceSet, units: dict[str, WeightUnit], groups: list[tuple[str, ...]], table: CostTable, pins: tuple = ()
) -> dict[tuple[str, ...], list[Level]]:
    """Each allocation group's non-dominated choices, smallest first (see module docstring)."""
    levels = {}
    for group in groups:
        error = {c: sum(table.errors[n][c] for n in group) for c in choices.common(group, units, pins)}
        options = sorted(
            (tuple(choices.plan_for(units[n], c) for n in group) for c in error),
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


def search(
    analysis,
    start: dict[str, LayerPlan],
    choices: ChoiceSet,
    groups: list[tuple[str, ...]],
    budget: int,
    generations: int,
    seed: int,
    pins: tuple = (),
    progress: bool = True,
    device: str = "cpu",
) -> tuple[dict[str, LayerPlan], SearchReport]:
    """The searched plan and its report (see the module docstring)."""
    began = time.perf_counter()
    units = analysis.units
    levels = group_levels(choices, units, groups, analysis.costs, pins)
    state = {}
    for group, options in levels.items():  # the knapsack never picks a dominated choice, but ties may
        planned = sum(start[n].nbytes for n in group)
        state[group] = max(i for i, level in enumerate(options) if level_bytes(level) <= planned)
    evaluator = PlanEvaluator(analysis, analysis.calib()[: max(STAGE_SEQUENCES)], device)
    last = max(STAGE_SEQUENCES)

    def to_plan(s) -> dict[str, LayerPlan]:
        entries = {n: e for g, i in s.items() for n, e in zip(g, levels[g][i])}
        return {n: entries[n] for n in units}

    rng = np.random.default_rng(seed)
    (parent_kl,) = evaluator.kl([to_plan(state)], last, record=0)
    evaluator.accept()
    report = SearchReport(parent_kl, parent_kl, generations, 0, 1, 0.0)
    bar = tqdm(range(generations), desc="plan: search (measured KL)", disable=not progress)
    for _ in bar:
        children = [c for c in (mutate(state, levels, budget, rng) for _ in range(OFFSPRING)) if c is not None]
        if children:
            scored = evaluator.kl([to_plan(c) for c in children], STAGE_SEQUENCES[0])
            best = children[int(np.argmin(scored))]
            (best_kl,) = evaluator.kl([to_plan(best)], last, record=0)
            report.evaluations += len(children) + 1
            if best_kl < parent_kl:
                state, parent_kl = best, best_kl
                report.accepted += 1
                evaluator.accept()
        report.trace.append(parent_kl)
        bar.set_postfix(kl=f"{parent_kl:.4f}")
    report.final_kl, report.seconds = parent_kl, time.perf_counter() - began
    plan = to_plan(state)
    assert sum(e.nbytes for e in plan.values()) <= budget  # mutations never leave the budget
    return plan, report
