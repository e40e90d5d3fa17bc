"""Plans: which format every unit gets, and which widths the KV cache keeps, under one budget.

``plan(analysis, recipe)`` is pure: it reads a finished :class:`~mqc.analysis.Analysis` (the
costs, the candidates' errors and shapes; the candidates themselves only for the measured-KL
search) and returns a :class:`Plan`, without touching a model. A uniform recipe gives every unit
one width; ``mq`` solves the exact knapsack over the costs (:mod:`.allocate`), then refines it by
measured KL at equal size (:mod:`.search`). A size sweep is one analysis and one plan per size.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mqc.errors import AnalysisError
from mqc.planning.allocate import allocate
from mqc.planning.budget import AllocationReport
from mqc.planning.choices import ChoiceSet
from mqc.planning.costs import CostTable
from mqc.planning.kv import kv_settings
from mqc.planning.search import SearchReport, search
from mqc.planning.types import LayerPlan, plan_bytes, plan_entry
from mqc.recipe import Recipe
from mqc.runtime.kv import QuantKVSettings
from mqc.size import ModelSize


@dataclass(frozen=True)
class Plan:
    """Every unit's format (exact bytes on the target), the KV widths, and how they were found."""

    layers: dict[str, LayerPlan]
    recipe: Recipe  # the recipe it answers (its analysis fields are the analysis's)
    size: ModelSize  # the model's parameters and the bytes no unit replaces, on the target
    analysis: Path
    fingerprint: str
    allocation: AllocationReport | None = None
    start: dict[str, LayerPlan] | None = None  # the knapsack plan a search began from
    search: SearchReport | None = None
    kv: QuantKVSettings | None = None
    joint: dict[str, Any] | None = None
    costs: CostTable | None = None
    seconds: float = 0.0

    @property
    def target(self) -> str:
        return self.recipe.target

    @property
    def plan_bytes(self) -> int:
        return plan_bytes(self.layers)

    @property
    def model_bytes(self) -> int:
        """Whole-model bytes as the target stores the model: the units plus every other tensor."""
        return self.size.total_bytes(self.plan_bytes)

    @property
    def bpw(self) -> float:
        return self.size.bpw(self.plan_bytes)


def recipe_for(analysis, recipe: Recipe | None = None, **overrides) -> Recipe:
    """``recipe`` (default: the analysis's own) with ``overrides``, refused with the first difference
    when the analysis cannot serve it."""
    from mqc.analysis.settings import AnalysisSettings

    recipe = recipe or analysis.recipe
    given = {k: v for k, v in overrides.items() if v is not None}
    if given:
        recipe = dataclasses.replace(recipe, **given)
    difference = analysis.settings.serves(AnalysisSettings.of(recipe))
    if difference is not None:
        raise AnalysisError(
            f"{analysis.root} was made with other analysis settings ({difference}); analyze again for this recipe"
        )
    return recipe


def plan(
    analysis,
    recipe: Recipe | None = None,
    *,
    size: str | None = None,
    pins: tuple | None = None,
    target: str | None = None,
    search_generations: int | None = None,
    progress: bool = True,
    device: str = "cpu",
) -> Plan:
    """The plan of ``recipe`` (default: the one the analysis was made for) from ``analysis``;
    ``size``, ``pins``, ``target`` and ``search_generations`` override the recipe's; ``device``:
    where the search runs the plans' layers."""
    began = time.perf_counter()
    recipe = recipe_for(analysis, recipe, size=size, pins=pins, target=target, search_generations=search_generations)
    model_size = analysis.model_size(recipe.target)
    units = analysis.units
    fields = {"recipe": recipe, "size": model_size, "analysis": analysis.root, "fingerprint": analysis.fingerprint}
    if recipe.method == "rtn":
        layers = {
            n: plan_entry(u, int(recipe.bits), recipe.group_size, recipe.outlier_frac, recipe.target)
            for n, u in units.items()
        }
        result = Plan(layers, **fields)
    else:
        choices = ChoiceSet.of(recipe)
        groups = choices.groups(units, analysis.shared_inputs)
        alloc = allocate(recipe, choices, units, groups, analysis.costs, model_size, analysis.kv_costs, analysis.config)
        layers, report = alloc.layers, None
        if recipe.search == "evo" and recipe.search_generations > 0 and analysis.settings.candidates:
            layers, report = search(
                analysis, alloc.layers, choices, groups, alloc.report.budget_bytes, recipe.search_generations,
                recipe.calib.seed, recipe.pins, progress, device,
            )  # fmt: skip
        start = alloc.layers if report is not None else None
        result = Plan(
            layers,
            allocation=alloc.report,
            start=start,
            search=report,
            kv=alloc.kv,
            joint=alloc.joint,
            costs=analysis.costs,
            **fields,
        )
    if recipe.kv_quant is not None and result.kv is None:
        result = dataclasses.replace(result, kv=kv_settings(recipe.kv_quant, analysis.kv_costs, analysis.config))
    return dataclasses.replace(result, seconds=time.perf_counter() - began)
