"""A plan's budget in bytes of its units, and the refusal of a size no plan can reach.

Budgets are on the whole-model axis (:mod:`mqc.size`): ``size`` (bytes or bits per weight of
every stored tensor) or a joint ``memory`` shared with the KV cache, less what no unit replaces;
or, over the units alone, average ``bits``, ``budget_bytes`` or ``budget_frac`` of their fp16
bytes. Bytes are each choice's :attr:`~mqc.planning.types.LayerPlan.nbytes` (codes, scales, zeros,
outliers, bias as the target stores them): the number the artifact is checked against, so a plan
that fits here fits on disk. The smallest plan is known from the shapes alone, so an impossible
size is refused before any analysis.
"""

from __future__ import annotations

from dataclasses import dataclass

from mqc import quant
from mqc.errors import InfeasibleBudgetError
from mqc.planning.choices import ChoiceSet
from mqc.planning.types import WeightUnit
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


def unit_budget(recipe: Recipe, units: dict[str, WeightUnit], size: ModelSize) -> int:
    """The bytes the planned units may use (see the module docstring)."""
    if recipe.memory is not None:
        return parse_size(recipe.memory).to_bytes(size.n_params) - size.fixed_bytes
    if recipe.size is not None:
        return parse_size(recipe.size).to_bytes(size.n_params) - size.fixed_bytes
    if recipe.budget_bytes is not None:
        return int(recipe.budget_bytes)
    if recipe.budget_frac is not None:
        fp16 = sum(
            quant.layer_bytes(u.out_features, u.in_features, 16, recipe.group_size, 0, u.has_bias)
            for u in units.values()
        )
        return int(recipe.budget_frac * fp16)
    return int(recipe.bits * sum(u.n_weights for u in units.values()) / 8)


def smallest_plan_bytes(choices: ChoiceSet, units: dict[str, WeightUnit], pins: tuple = ()) -> int:
    """Bytes of the smallest plan the choices allow: known from the shapes alone."""
    return sum(min(choices.plan_for(u, c).nbytes for c in choices.allowed(u, pins)) for u in units.values())


def check_budget(
    recipe: Recipe, choices: ChoiceSet, units: dict[str, WeightUnit], size: ModelSize, reserved: int = 0
) -> int:
    """The units' budget in bytes, or an error naming the smallest feasible size; ``reserved``:
    bytes the budget must also hold (the narrowest KV cache of a joint memory budget)."""
    budget = unit_budget(recipe, units, size)
    smallest = smallest_plan_bytes(choices, units, recipe.pins)
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
