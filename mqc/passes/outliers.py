"""Sparse fp16 outliers: per unit, keep the weights whose quantization hurts most.

Score of weight ``(i, j)``: ``(W_ij - Q_b(W)_ij)^2 * E[x_j^2]``, the squared quantization error
weighted by the energy of the input channel it multiplies (the expected contribution of that
error to the layer's output error, for independent inputs). Without calibration statistics the
energy is 1. The top ``n_outliers`` of the plan entry are kept; the dense part is then quantized
with them excluded from the group ranges (see :mod:`mqc.quant`).
"""

from __future__ import annotations

import torch

from mqc import quant
from mqc.passes import keys
from mqc.passes.base import CompileContext, Pass, PassResult
from mqc.passes.units import outliers_per_row


def top_mask(score: torch.Tensor, n_outliers: int, per_row: bool = False) -> torch.Tensor:
    """Boolean mask of the ``n_outliers`` highest scores of ``score [out, in]``; ``per_row``: the
    same number in every row (the ELL layout of the onnx target, see :mod:`mqc.targets`)."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if per_row:
        mask.scatter_(1, torch.topk(score, n_outliers // score.shape[0], dim=1, sorted=False).indices, True)
    else:
        mask.view(-1)[torch.topk(score.flatten(), n_outliers, sorted=False).indices] = True
    return mask


def outlier_mask(
    weight: torch.Tensor, bits: int, group_size: int, n_outliers: int, energy: torch.Tensor | None,
    per_row: bool = False,
) -> torch.Tensor | None:
    """Boolean ``[out, in]`` mask of the ``n_outliers`` highest-scoring weights (None if 0)."""
    if n_outliers == 0 or bits == quant.FP16_BITS:
        return None
    error = (weight - quant.fake_quantize(weight, bits, group_size)).pow(2)
    score = error if energy is None else error * energy.to(error.device)
    return top_mask(score, n_outliers, per_row)


class SelectOutliers(Pass):
    name = "outliers"
    requires = (keys.BIT_PLAN, keys.UNITS)
    produces = (keys.OUTLIER_MASKS,)

    def __init__(self, weighted: bool = False):
        """``weighted``: score with calibration activation energy (requires act_stats)."""
        if weighted:
            self.requires = type(self).requires + (keys.ACT_STATS,)

    def run(self, ctx: CompileContext) -> PassResult:
        units, plan = ctx[keys.UNITS], ctx[keys.BIT_PLAN]
        energy = ctx.results.get(keys.ACT_STATS, {})
        masks = {}
        for name, entry in plan.items():
            mask = outlier_mask(
                units[name].weight(ctx.model), entry.bits, entry.group_size, entry.n_outliers, energy.get(name),
                outliers_per_row(entry),
            )  # fmt: skip
            if mask is not None:
                masks[name] = mask
        ctx.results[keys.OUTLIER_MASKS] = masks
        total = sum(int(m.sum()) for m in masks.values())
        return PassResult(False, f"{total} outliers in {len(masks)} layers")
