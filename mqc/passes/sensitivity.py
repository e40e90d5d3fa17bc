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
from mqc.passes.base import CompileContext, Pass, PassResult
from mqc.passes.outliers import outlier_mask
from mqc.passes.units import plan_entry

VARIANTS = ("first_order", "fisher")


@dataclass
class SensitivityTable:
    """``scores[unit][variant][bits]`` with ``variant`` in VARIANTS, plus ``_outliers`` variants."""

    scores: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)
    n_tokens: int = 0

    def score(self, unit: str, bits: int, variant: str, with_outliers: bool) -> float:
        key = f"{variant}_outliers" if with_outliers else variant
        return self.scores[unit][key][bits]

    def to_dict(self) -> dict:
        return {"n_tokens": self.n_tokens, "scores": self.scores}


class Sensitivity(Pass):
    name = "sensitivity"
    requires = (keys.UNITS, keys.CALIB, keys.ACT_STATS)
    produces = (keys.SENSITIVITY,)

    def run(self, ctx: CompileContext) -> PassResult:
        model, recipe, units = ctx.model, ctx.recipe, ctx[keys.UNITS]
        energy = ctx[keys.ACT_STATS]
        widths = recipe.allowed_bits
        variants_out = recipe.outlier_frac > 0
        deltas: dict[str, dict[tuple[int, bool], torch.Tensor]] = {}
        for name, unit in tqdm(units.items(), desc="quantization error", disable=not ctx.progress, leave=False):
            weight = unit.weight(model)
            quant.check_finite(weight, name)
            deltas[name] = {}
            for bits in widths:
                deltas[name][(bits, False)] = (quant.fake_quantize(weight, bits, recipe.group_size) - weight).half()
                if variants_out and bits != quant.FP16_BITS:
                    n_out = plan_entry(unit, bits, recipe.group_size, recipe.outlier_frac).n_outliers
                    mask = outlier_mask(weight, bits, recipe.group_size, n_out, energy.get(name))
                    deltas[name][(bits, True)] = (quant.fake_quantize(weight, bits, recipe.group_size, mask) - weight).half()
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
        for name, values in sums.items():
            entry: dict[str, dict[int, float]] = {}
            for (variant, (bits, with_out)), value in values.items():
                key = f"{variant}_outliers" if with_out else variant
                entry.setdefault(key, {})[bits] = abs(value) if variant == "first_order" else value
            if variants_out:  # 16-bit has no outliers: same score either way
                for variant in VARIANTS:
                    if quant.FP16_BITS in entry[variant]:
                        entry[f"{variant}_outliers"][quant.FP16_BITS] = entry[variant][quant.FP16_BITS]
            table.scores[name] = entry
        ctx.results[keys.SENSITIVITY] = table
        return PassResult(False, f"sensitivity of {len(units)} layers x {len(widths)} widths")
