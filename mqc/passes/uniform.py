"""Uniform plan: every selected unit at the recipe's one width, priced as its target stores it."""

from __future__ import annotations

from mqc.passes import keys
from mqc.passes.base import CompileContext, Pass, PassResult
from mqc.passes.units import plan_average_bits, plan_entry


class UniformPlan(Pass):
    name = "uniform_plan"
    requires = (keys.UNITS,)
    produces = (keys.BIT_PLAN,)

    def run(self, ctx: CompileContext) -> PassResult:
        recipe = ctx.recipe
        bits = int(recipe.bits)
        plan = {
            name: plan_entry(unit, bits, recipe.group_size, recipe.outlier_frac, recipe.target)
            for name, unit in ctx[keys.UNITS].items()
        }
        ctx.results[keys.BIT_PLAN] = plan
        return PassResult(False, f"{len(plan)} layers at {bits} bits ({plan_average_bits(plan):.3f} avg bits)")
