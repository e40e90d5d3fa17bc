"""Exact bit allocation under a memory budget: a multiple-choice knapsack solved as a MILP.

One binary ``x[l, c]`` per unit ``l`` and allowed width ``c``; ``sum_c x[l, c] = 1``;
``sum bytes[l, c] * x[l, c] <= budget``; minimise ``sum cost[l, c] * x[l, c]`` (``keys.COSTS``:
predicted KL, or a first-order/Fisher sensitivity). HiGHS
(scipy.optimize.milp) with a zero MIP gap returns a proven optimum, not a heuristic (exact up to
HiGHS's feasibility tolerances, about 1e-6 of the largest cost: choices whose costs differ by
less are ties to the solver). Bytes are
:func:`mqc.quant.layer_bytes` of each choice (codes, scales, zeros, outliers, bias): the same
number the artifact is checked against, so a plan that fits here fits on disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from mqc import quant
from mqc.errors import InfeasibleBudgetError
from mqc.passes import keys
from mqc.passes.base import CompileContext, Pass, PassResult
from mqc.passes.units import (
    Choice, LayerPlan, WeightUnit, allocation_groups, allowed_choices, choice_of, common_choices, plan_for,
)
from mqc.recipe import Recipe
from mqc.size import ModelSize, parse_size


@dataclass(frozen=True)
class AllocationReport:
    budget_bytes: int
    used_bytes: int
    n_weights: int
    objective: float
    min_feasible_bytes: int
    status: str

    @property
    def slack_bytes(self) -> int:
        return self.budget_bytes - self.used_bytes

    @property
    def budget_bits(self) -> float:
        return quant.average_bits(self.budget_bytes, self.n_weights)

    @property
    def used_bits(self) -> float:
        return quant.average_bits(self.used_bytes, self.n_weights)


@dataclass
class CostTable:
    """``costs[unit][choice]``: the allocator's objective for giving ``unit`` that choice."""

    kind: str  # "predicted_kl", "first_order", "fisher"
    costs: dict[str, dict[Choice, float]] = field(default_factory=dict)

    def plan_cost(self, plan: dict[str, LayerPlan]) -> float:
        return sum(self.costs[name][choice_of(entry)] for name, entry in plan.items())


def solve_mckp(costs: list[list[float]], sizes: list[list[int]], budget: int) -> tuple[list[int], float]:
    """Index of the chosen option per group minimising total cost with total size <= budget.

    Raises InfeasibleBudgetError when even the smallest options exceed the budget.
    """
    smallest = sum(min(s) for s in sizes)
    if smallest > budget:
        raise InfeasibleBudgetError(f"budget of {budget} bytes is below the smallest possible {smallest} bytes")
    offsets = np.cumsum([0] + [len(c) for c in costs])
    n = int(offsets[-1])
    cost = np.concatenate([np.asarray(c, dtype=np.float64) for c in costs])
    size = np.concatenate([np.asarray(s, dtype=np.float64) for s in sizes])
    scale = max(float(np.abs(cost).max()), 1e-300)  # HiGHS tolerances are absolute: work near 1
    one_each = np.zeros((len(costs), n))
    for group, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])):
        one_each[group, lo:hi] = 1.0
    constraints = [LinearConstraint(one_each, 1, 1), LinearConstraint(size[None, :], 0, budget)]
    result = milp(
        cost / scale,
        constraints=constraints,
        integrality=np.ones(n),
        bounds=Bounds(0, 1),
        options={"mip_rel_gap": 0.0, "presolve": True},
    )
    if result.status != 0 or result.x is None:
        raise InfeasibleBudgetError(f"the bit allocation solver failed: {result.message}")
    x = np.round(result.x).astype(int)
    choices = [int(np.argmax(x[lo:hi])) for lo, hi in zip(offsets[:-1], offsets[1:])]
    objective = float(sum(costs[g][c] for g, c in enumerate(choices)))
    return choices, objective


def unit_budget(recipe: Recipe, units: dict[str, WeightUnit], size: ModelSize) -> int:
    """The bytes the planned units may use: a whole-model ``size`` (or a joint ``memory``, which the
    KV cache then shares) less what no unit replaces; else average bits over the units, absolute
    unit bytes, or a fraction of their fp16 size."""
    if recipe.memory is not None:
        return parse_size(recipe.memory).to_bytes(size.n_params) - size.fixed_bytes
    if recipe.size is not None:
        return parse_size(recipe.size).to_bytes(size.n_params) - size.fixed_bytes
    if recipe.budget_bytes is not None:
        return int(recipe.budget_bytes)
    if recipe.budget_frac is not None:
        fp16 = sum(quant.layer_bytes(u.out_features, u.in_features, 16, recipe.group_size, 0, u.has_bias) for u in units.values())
        return int(recipe.budget_frac * fp16)
    return int(recipe.bits * sum(u.n_weights for u in units.values()) / 8)


def smallest_plan_bytes(recipe: Recipe, units: dict[str, WeightUnit]) -> int:
    """Bytes of the smallest plan the recipe allows: known from the shapes alone, before any analysis."""
    return sum(min(plan_for(u, c, recipe).nbytes for c in allowed_choices(u, recipe)) for u in units.values())


def check_budget(recipe: Recipe, units: dict[str, WeightUnit], size: ModelSize, reserved: int = 0) -> int:
    """The units' budget in bytes, or an error naming the smallest feasible size; ``reserved``:
    bytes the budget must also hold (the narrowest KV cache of a joint memory budget)."""
    budget = unit_budget(recipe, units, size)
    smallest = smallest_plan_bytes(recipe, units)
    if reserved and smallest + reserved > budget:
        raise InfeasibleBudgetError(
            f"memory {recipe.memory} cannot hold the smallest weights ({size.total_bytes(smallest):,} bytes) and the "
            f"narrowest KV cache ({reserved:,} bytes); raise the memory or lower the context"
        )
    if smallest > budget:
        n_weights = sum(u.n_weights for u in units.values())
        whole = size.total_bytes(smallest)
        raise InfeasibleBudgetError(
            f"budget {size.bpw(budget):.3f} bits/weight for the whole model ({size.total_bytes(max(budget, 0)):,} bytes) "
            f"is infeasible: the smallest plan allowed by the recipe makes {size.bpw(smallest):.3f} bpw ({whole:,} bytes, "
            f"{quant.average_bits(smallest, n_weights):.3f} bits over the quantized tensors); "
            "raise the size, allow lower widths or relax pins"
        )
    return budget


class AllocateBits(Pass):
    """The exact knapsack over the cost table. ``final=False``: its plan is a search's start."""

    name = "bit_alloc"
    requires = (keys.UNITS, keys.COSTS, keys.MODEL_SIZE)
    produces = (keys.BIT_PLAN, keys.ALLOCATION)

    def __init__(self, final: bool = True, joint: bool = False):
        """``joint``: a memory budget (``recipe.memory``) shared with the KV cache, whose per-layer
        widths join the same knapsack on their measured costs (``KV_COSTS``)."""
        self.joint = joint
        self.produces = (keys.BIT_PLAN if final else keys.START_PLAN, keys.ALLOCATION)
        if joint:
            self.requires = (*type(self).requires, keys.KV_COSTS)
            self.produces = (*self.produces, keys.KV_CHOICE, keys.JOINT_SPLIT)

    def run(self, ctx: CompileContext) -> PassResult:
        recipe, units, table = ctx.recipe, ctx[keys.UNITS], ctx[keys.COSTS]
        groups = allocation_groups(units)  # one choice per group (siblings the target fuses)
        options = [common_choices(g, units, recipe) for g in groups]
        costs = [[sum(table.costs[n][c] for n in g) for c in opts] for g, opts in zip(groups, options)]
        sizes = [[sum(plan_for(units[n], c, recipe).nbytes for n in g) for c in opts] for g, opts in zip(groups, options)]
        budget = check_budget(recipe, units, ctx[keys.MODEL_SIZE])
        n_weights = sum(u.n_weights for u in units.values())
        if self.joint:
            chosen, objective, budget = self._joint(ctx, costs, sizes, budget)
        else:
            chosen, objective = solve_mckp(costs, sizes, budget)
        plan = {n: plan_for(units[n], opts[c], recipe) for g, opts, c in zip(groups, options, chosen) for n in g}
        plan = {n: plan[n] for n in units}
        used = sum(e.nbytes for e in plan.values())
        report = AllocationReport(budget, used, n_weights, objective, sum(min(s) for s in sizes), "optimal")
        ctx.results[self.produces[0]] = plan
        ctx.results[keys.ALLOCATION] = report  # a joint budget_bytes is the weights' share: the search keeps it
        return PassResult(
            False,
            f"{report.used_bits:.3f} of {report.budget_bits:.3f} bits used, objective {objective:.4g}",
        )


    def _joint(self, ctx: CompileContext, costs, sizes, budget: int) -> tuple[list[int], float, int]:
        """One knapsack over the weight groups and the KV layers; returns (weight choices,
        weight objective, the weights' share of the budget). Records the KV widths, the split and
        what each fixed KV width would have left the weights (predicted costs, same solver)."""
        from mqc.passes.kv_quant import kv_options

        kv, layers = ctx.recipe.kv_quant, len(ctx[keys.KV_COSTS].key)
        options = kv_options(ctx[keys.KV_COSTS], kv, ctx.model.config)
        room = budget - options.exact_bytes  # units + the KV cache's compressed stages
        if sum(min(s) for s in sizes) + options.floor() - options.exact_bytes > room:
            raise InfeasibleBudgetError(
                f"memory {ctx.recipe.memory} cannot hold the smallest weights and the narrowest KV cache of "
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
        ctx.results[keys.KV_CHOICE] = options.settings(kv, layers, kv_choice)
        ctx.results[keys.JOINT_SPLIT] = {
            "memory_bytes": budget + ctx[keys.MODEL_SIZE].fixed_bytes,
            "weights_bytes": ctx[keys.MODEL_SIZE].fixed_bytes + budget - kv_bytes,
            "kv_bytes": kv_bytes,
            "context": kv.context,
            "batch": kv.batch,
            "predicted_cost": objective + kv_cost,
            "fixed_kv": alternatives,
        }
        return weights, objective, budget - kv_bytes
