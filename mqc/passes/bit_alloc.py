"""Exact bit allocation under a memory budget: a multiple-choice knapsack solved as a MILP.

One binary ``x[l, c]`` per unit ``l`` and allowed width ``c``; ``sum_c x[l, c] = 1``;
``sum bytes[l, c] * x[l, c] <= budget``; minimise ``sum sensitivity[l, c] * x[l, c]``. HiGHS
(scipy.optimize.milp) with a zero MIP gap returns a proven optimum, not a heuristic (exact up to
HiGHS's feasibility tolerances, about 1e-6 of the largest cost: choices whose costs differ by
less are ties to the solver). Bytes are
:func:`mqc.quant.layer_bytes` of each choice (codes, scales, zeros, outliers, bias): the same
number the artifact is checked against, so a plan that fits here fits on disk.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from mqc import quant
from mqc.errors import InfeasibleBudgetError
from mqc.passes import keys
from mqc.passes.base import CompileContext, Pass, PassResult
from mqc.passes.sensitivity import Choice, choices
from mqc.passes.units import LayerPlan, WeightUnit, plan_entry
from mqc.recipe import Recipe


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


def budget_bytes(recipe: Recipe, units: dict[str, WeightUnit]) -> int:
    """The recipe's budget in bytes: average bits, absolute bytes, or a fraction of fp16."""
    if recipe.budget_bytes is not None:
        return int(recipe.budget_bytes)
    if recipe.budget_frac is not None:
        fp16 = sum(quant.layer_bytes(u.out_features, u.in_features, 16, recipe.group_size, 0, u.has_bias) for u in units.values())
        return int(recipe.budget_frac * fp16)
    return int(recipe.bits * sum(u.n_weights for u in units.values()) / 8)


def allowed_choices(name: str, recipe: Recipe) -> list[Choice]:
    """The (bits, group size) options of a layer after its pins."""
    floor = max([p.min_bits for p in recipe.pins if fnmatch.fnmatchcase(name, p.pattern)], default=0)
    options = choices(recipe)
    return [c for c in options if c[0] >= floor] or [max(options, key=lambda c: c[0])]


class AllocateBits(Pass):
    name = "bit_alloc"
    requires = (keys.UNITS, keys.SENSITIVITY)
    produces = (keys.BIT_PLAN, keys.ALLOCATION)

    def run(self, ctx: CompileContext) -> PassResult:
        recipe, units, table = ctx.recipe, ctx[keys.UNITS], ctx[keys.SENSITIVITY]
        with_outliers = recipe.outlier_frac > 0
        names = list(units)
        options: list[list[LayerPlan]] = [
            [plan_entry(units[n], b, g or recipe.group_size, recipe.outlier_frac) for b, g in allowed_choices(n, recipe)]
            for n in names
        ]
        costs = [
            [table.score(n, e.bits, recipe.sensitivity, with_outliers, e.group_size) for e in opts]
            for n, opts in zip(names, options)
        ]
        sizes = [[e.nbytes for e in opts] for opts in options]
        budget = budget_bytes(recipe, units)
        n_weights = sum(u.n_weights for u in units.values())
        smallest = sum(min(s) for s in sizes)
        if smallest > budget:
            raise InfeasibleBudgetError(
                f"budget {quant.average_bits(budget, n_weights):.3f} bits/weight ({budget} bytes) is infeasible: "
                f"the smallest plan allowed by the recipe needs {quant.average_bits(smallest, n_weights):.3f} bits "
                f"({smallest} bytes); raise the budget, allow lower widths or relax pins"
            )
        choices, objective = solve_mckp(costs, sizes, budget)
        plan = {n: opts[c] for n, opts, c in zip(names, options, choices)}
        used = sum(e.nbytes for e in plan.values())
        report = AllocationReport(budget, used, n_weights, objective, smallest, "optimal")
        ctx.results[keys.BIT_PLAN] = plan
        ctx.results[keys.ALLOCATION] = report
        return PassResult(
            False,
            f"{report.used_bits:.3f} of {report.budget_bits:.3f} bits used, objective {objective:.4g}",
        )
