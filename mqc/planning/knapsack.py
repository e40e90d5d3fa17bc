"""The exact multiple-choice knapsack every allocation in mqc is solved by (HiGHS MILP).

One binary ``x[g, c]`` per group ``g`` and option ``c``; ``sum_c x[g, c] = 1``;
``sum sizes[g, c] * x[g, c] <= budget``; minimise ``sum costs[g, c] * x[g, c]``. HiGHS
(``scipy.optimize.milp``) with a zero MIP gap returns a proven optimum, not a heuristic (exact up
to HiGHS's feasibility tolerances, about 1e-6 of the largest cost: options whose costs differ by
less are ties to the solver).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from mqc.errors import InfeasibleBudgetError


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
