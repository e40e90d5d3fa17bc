"""Exact bit allocation under a memory budget: the multiple-choice knapsack over the cost table.

One choice per allocation group (a unit, or siblings the target fuses, :meth:`ChoiceSet.groups`),
minimising the summed cost (predicted KL, or a first-order/Fisher sensitivity) with the summed
bytes within the budget (:mod:`mqc.planning.budget`), solved exactly (:func:`solve_mckp`). With a joint
``memory`` budget the KV cache's per-layer widths join the same knapsack on their measured costs,
and the report records what each fixed KV width would have left the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mqc.errors import InfeasibleBudgetError
from mqc.planning.budget import AllocationReport, check_budget
from mqc.planning.choices import ChoiceSet
from mqc.planning.costs import CostTable
from mqc.planning.knapsack import solve_mckp
from mqc.planning.kv import KVCosts, kv_options
from mqc.planning.types import LayerPlan, WeightUnit
from mqc.recipe import Recipe
from mqc.runtime.kv import QuantKVSettings, kv_shape
from mqc.size import ModelSize


@dataclass(frozen=True)
class Allocation:
    layers: dict[str, LayerPlan]
    report: AllocationReport
    kv: QuantKVSettings | None = None  # the KV widths a joint memory budget chose
    joint: dict[str, Any] | None = None  # the split, and the fixed-KV alternatives


def allocate(
    recipe: Recipe,
    choices: ChoiceSet,
    units: dict[str, WeightUnit],
    groups: list[tuple[str, ...]],
    table: CostTable,
    size: ModelSize,
    kv_costs: KVCosts | None = None,
    config=None,
) -> Allocation:
    """The knapsack plan of ``units`` under the recipe's budget (see the module docstring)."""
    options = [choices.common(g, units, recipe.pins) for g in groups]
    costs = [[sum(table.costs[n][c] for n in g) for c in opts] for g, opts in zip(groups, options)]
    sizes = [[sum(choices.plan_for(units[n], c).nbytes for n in g) for c in opts] for g, opts in zip(groups, options)]
    budget = check_budget(recipe, choices, units, size)
    n_weights = sum(u.n_weights for u in units.values())
    kv = joint = None
    if recipe.memory is not None:
        chosen, objective, budget, kv, joint = _joint(recipe, costs, sizes, budget, kv_costs, config, size)
    else:
        chosen, objective = solve_mckp(costs, sizes, budget)
    plan = {n: choices.plan_for(units[n], opts[c]) for g, opts, c in zip(groups, options, chosen) for n in g}
    plan = {n: plan[n] for n in units}
    used = sum(e.nbytes for e in plan.values())
    report = AllocationReport(budget, used, n_weights, objective, sum(min(s) for s in sizes), "optimal")
    return Allocation(plan, report, kv, joint)


def _joint(recipe, costs, sizes, budget: int, kv_costs: KVCosts, config, size: ModelSize):
    """One knapsack over the weight groups and the KV layers; returns (weight choices, weight
    objective, the weights' share of the budget, the KV widths, the split report)."""
    kv, layers = recipe.kv_quant, kv_shape(config)[0]
    options = kv_options(kv_costs, kv, config)
    room = budget - options.exact_bytes  # units + the KV cache's compressed stages
    if sum(min(s) for s in sizes) + options.floor() - options.exact_bytes > room:
        raise InfeasibleBudgetError(
            f"memory {recipe.memory} cannot hold the smallest weights and the narrowest KV cache of "
            f"{kv.batch} x {kv.context} tokens ({options.floor():,} bytes); raise the memory or lower the context"
        )
    chosen, _ = solve_mckp(costs + options.costs, sizes + options.sizes, room)
    weights, kv_choice = chosen[: len(costs)], chosen[len(costs) :]
    kv_bytes = options.exact_bytes + sum(s[c] for s, c in zip(options.sizes, kv_choice))
    kv_cost = sum(c[i] for c, i in zip(options.costs, kv_choice))
    objective = sum(c[i] for c, i in zip(costs, weights))
    alternatives = []
    for width in (2, 4, 8, 16):  # the same memory, weights-only allocation + one fixed KV width
        index = options.pairs.index((width, width))
        fixed = options.exact_bytes + sum(s[index] for s in options.sizes)
        row = {"kv_bits": width, "kv_bytes": fixed, "weights_budget": budget - fixed}
        try:
            _, w_cost = solve_mckp(costs, sizes, budget - fixed)
            row["predicted_cost"] = w_cost + sum(c[index] for c in options.costs)
        except InfeasibleBudgetError:
            row["predicted_cost"] = None
        alternatives.append(row)
    split = {
        "memory_bytes": budget + size.fixed_bytes,
        "weights_bytes": size.fixed_bytes + budget - kv_bytes,
        "kv_bytes": kv_bytes,
        "context": kv.context,
        "batch": kv.batch,
        "predicted_cost": objective + kv_cost,
        "fixed_kv": alternatives,
    }
    return weights, objective, budget - kv_bytes, options.settings(kv, layers, kv_choice), split
