"""First-order and Fisher sensitivity of every unit at every candidate width (LLM-MQ).

For a unit with weight ``W`` and loss gradient ``G`` over the calibration set, quantizing it to
``b`` bits changes the loss by about

    first order:  | sum G * (Q_b(W) - W) |
    Fisher:       sum_batches sum (G_batch^2 * (Q_b(W) - W)^2)   (empirical Fisher, per micro-batch)

Both are linear in the per-batch gradient (the Fisher term in its square), so each micro-batch's
gradient is reduced to a handful of scalars the moment it is accumulated (a post-accumulate-grad
hook) and then freed: no gradient outlives its own backward step, and no two layers' gradients
need to be summed across batches. What is kept is ``Q_b(W) - W`` per unit and width, in fp16
(for the default model about 1.1 GB per variant), computed once. Each estimate is computed twice:
plain, and with the unit's outliers (as the outlier pass would choose them) kept exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from mqc import quant
from mqc.passes import keys
from mqc.passes.act_stats import CALIB_BATCH
from mqc.passes.bit_alloc import CostTable
from mqc.passes.base import CompileContext, Pass, PassResult
from mqc.passes.outliers import outlier_mask
from mqc.passes.units import Choice, choice_label, choices, outliers_per_row, plan_entry

VARIANTS = ("first_order", "fisher")


@dataclass
class SensitivityTable:
    """``scores[unit][variant][(bits, group)]``; variants are VARIANTS and their ``_outliers`` forms."""

    scores: dict[str, dict[str, dict[Choice, float]]] = field(default_factory=dict)
    n_tokens: int = 0

    def score(self, unit: str, bits: int, variant: str, with_outliers: bool, group_size: int | None = None) -> float:
        key = f"{variant}_outliers" if with_outliers else variant
        entry = self.scores[unit][key]
        if bits == quant.FP16_BITS:
            return entry[(bits, None)]
        if group_size is None:
            (group_size,) = {g for b, g in entry if b == bits}  # unambiguous only with one group size
        return entry[(bits, group_size)]

    def to_dict(self) -> dict:
        return {
            "n_tokens": self.n_tokens,
            "scores": {
                unit: {variant: {choice_label(c): v for c, v in values.items()} for variant, values in entry.items()}
                for unit, entry in self.scores.items()
            },
        }


def cost_table(table: SensitivityTable, recipe, units) -> CostTable:
    """The allocator's view of a sensitivity table: the recipe's variant for every choice."""
    with_outliers = recipe.outlier_frac > 0
    costs = CostTable(recipe.sensitivity)
    for name in units:
        costs.costs[name] = {(b, g): table.score(name, b, recipe.sensitivity, with_outliers, g) for b, g in choices(recipe)}
    return costs


class Sensitivity(Pass):
    name = "sensitivity"
    requires = (keys.UNITS, keys.CALIB, keys.ACT_STATS)
    produces = (keys.SENSITIVITY, keys.COSTS)

    def run(self, ctx: CompileContext) -> PassResult:
        model, recipe, units = ctx.model, ctx.recipe, ctx[keys.UNITS]
        energy = ctx[keys.ACT_STATS]
        options = choices(recipe)
        variants_out = recipe.outlier_frac > 0
        deltas: dict[str, dict[tuple[Choice, bool], torch.Tensor]] = {}
        for name, unit in tqdm(units.items(), desc="quantization error", disable=not ctx.progress, leave=False):
            weight = unit.weight(model)
            quant.check_finite(weight, name)
            deltas[name] = {}
            for bits, group in options:
                deltas[name][((bits, group), False)] = (quant.fake_quantize(weight, bits, group or recipe.group_size) - weight).half()
                if variants_out and bits != quant.FP16_BITS:
                    entry = plan_entry(unit, bits, group, recipe.outlier_frac, recipe.target)
                    mask = outlier_mask(weight, bits, group, entry.n_outliers, energy.get(name), outliers_per_row(entry))
                    deltas[name][((bits, group), True)] = (quant.fake_quantize(weight, bits, group, mask) - weight).half()
        sums = {name: {(v, k): 0.0 for v in VARIANTS for k in d} for name, d in deltas.items()}

        params = {name: model.get_submodule(name).weight for name in units}
        requires_grad = {p: p.requires_grad for p in model.parameters()}

        def reducer(name: str, transposed: bool):
            def hook(param: torch.Tensor) -> None:
                grad = param.grad.float()
                grad = grad.t() if transposed else grad
                grad_sq = grad.pow(2)
                for key, delta in deltas[name].items():
                    d = delta.float()
                    sums[name][("first_order", key)] += float((grad * d).sum())
                    sums[name][("fisher", key)] += float((grad_sq * d.pow(2)).sum())
                param.grad = None

            return hook

        handles = []
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            for name, p in params.items():
                p.requires_grad_(True)
                handles.append(p.register_post_accumulate_grad_hook(reducer(name, units[name].transposed)))
            calib = ctx[keys.CALIB]
            device = next(model.parameters()).device
            batches = range(0, calib.shape[0], CALIB_BATCH)
            for start in tqdm(batches, desc="sensitivity (grad)", disable=not ctx.progress, leave=False):
                batch = calib[start : start + CALIB_BATCH].to(device)
                model(input_ids=batch, labels=batch).loss.backward()
        finally:
            for h in handles:
                h.remove()
            for p, flag in requires_grad.items():
                p.requires_grad_(flag)
                p.grad = None
        table = SensitivityTable(n_tokens=int(ctx[keys.CALIB].numel()))
        fp16 = (quant.FP16_BITS, None)
        for name, values in sums.items():
            entry: dict[str, dict[Choice, float]] = {}
            for (variant, (choice, with_out)), value in values.items():
                key = f"{variant}_outliers" if with_out else variant
                entry.setdefault(key, {})[choice] = abs(value) if variant == "first_order" else value
            if variants_out:  # 16-bit has no outliers: same score either way
                for variant in VARIANTS:
                    if fp16 in entry[variant]:
                        entry[f"{variant}_outliers"][fp16] = entry[variant][fp16]
            table.scores[name] = entry
        ctx.results[keys.SENSITIVITY] = table
        ctx.results[keys.COSTS] = cost_table(table, recipe, units)
        return PassResult(False, f"sensitivity of {len(units)} layers x {len(options)} choices")
