"""Every unit quantized at every allowed choice, as the lowering will deploy it.

The allocator prices a choice by the error of the weights that will really be stored, so each
candidate is the quantizer's actual output: act-order GPTQ on the unit's input Hessian from the
full-precision model (round-to-nearest with ``quantizer="rtn"``, and for an untied embedding,
which has no input activations). All grids of a unit share one GPTQ column loop
(:func:`mqc.quant.gptq_batch`). Candidates are kept packed (a dozen choices of the default model
take about 1 GB) and the chosen ones are swapped in unchanged by :class:`LowerCandidates`, so the
deployed model is exactly the one the costs and the search measured.

With outliers, the positions are chosen under the same quantizer that keeps them: GPTQ runs once
without outliers, the weights with the largest ``(W - W_gptq)^2 * E[x_j^2]`` become the mask, and
GPTQ runs again with them held exact.

A plan for GGUF (``target="gguf"``) has llama.cpp's types as choices: each is encoded by
:func:`mqc.quant_ggml.encode_batch` (grids fitted per block, GPTQ onto them) into the very bytes
the GGUF file will hold, and a type is offered only to units whose rows are whole blocks of it.

Each candidate also records its per-output-channel error ``diag(dW H dW^T)`` (the mean squared
error each output channel sees on calibration inputs), from which the cost models are built.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from mqc import quant, quant_ggml
from mqc.passes import keys
from mqc.passes.base import CompileContext, Pass, PassResult
from mqc.passes.quantize import QuantizeModules
from mqc.passes.outliers import top_mask
from mqc.passes.units import Choice, LayerPlan, WeightUnit, choice_of, choice_plans, outliers_per_row

# Bound on rows (over all grids) per GPTQ call: the lm_head of a 49k vocabulary at 12 grids
# would otherwise hold several GB of temporaries.
_MAX_ROWS_PER_CALL = 100_000


@dataclass(frozen=True)
class Candidate:
    plan: LayerPlan
    weight: quant.QuantizedWeight | quant_ggml.GgmlWeight | None  # None: the layer stays in fp16
    outliers: quant.SparseOutliers | None
    row_error: torch.Tensor  # [out] diag(dW H dW^T)


@dataclass
class CandidateTable:
    units: dict[str, dict[Choice, Candidate]] = field(default_factory=dict)

    def dense(self, name: str, choice: Choice, weight: torch.Tensor) -> torch.Tensor:
        """The ``[out, in]`` float32 matrix the runtime computes with for this choice."""
        cand = self.units[name][choice]
        if cand.weight is None:
            return weight.to(torch.float16).float()
        if isinstance(cand.weight, quant_ggml.GgmlWeight):
            return quant_ggml.dequantize(cand.weight)
        dense = quant.dequantize(cand.weight)
        return dense if cand.outliers is None else dense + cand.outliers.to_dense()

    def nbytes(self) -> int:
        return sum(
            (c.weight.nbytes() if c.weight else 0) + (c.outliers.nbytes() if c.outliers else 0)
            for per in self.units.values()
            for c in per.values()
        )


def row_error(delta: torch.Tensor, hessian: torch.Tensor | None) -> torch.Tensor:
    """``diag(delta H delta^T)``; the plain squared row norm without a Hessian."""
    if hessian is None:
        return delta.pow(2).sum(1)
    return ((delta @ hessian) * delta).sum(1)


def _outlier_masks(weight, hessian, grids, plans: list[LayerPlan], energy):
    first = quant.gptq_batch(weight, hessian, grids) if hessian is not None else None
    masks = []
    for i, grid in enumerate(grids):
        approx = quant._from_codes(*first[i][:3], weight.shape[1]) if first else quant.fake_quantize(weight, grid.bits, grid.group_size)
        score = (weight - approx).pow(2) * (energy if energy is not None else 1.0)
        masks.append(top_mask(score, plans[i].n_outliers, outliers_per_row(plans[i])))
    return masks


def unit_candidates(
    unit: WeightUnit,
    weight: torch.Tensor,
    plans: dict[Choice, LayerPlan],
    hessian: torch.Tensor | None,
    energy: torch.Tensor | None = None,
) -> dict[Choice, Candidate]:
    """Every option of one unit; GPTQ when ``hessian`` is given, round-to-nearest otherwise."""
    quant.check_finite(weight, unit.qualname)
    options = list(plans)
    out: dict[Choice, Candidate] = {}
    quantized = [c for c in options if plans[c].bits != quant.FP16_BITS]
    per_call = max(1, _MAX_ROWS_PER_CALL // unit.out_features)
    for start in range(0, len(quantized), per_call):
        batch = quantized[start : start + per_call]
        if isinstance(batch[0], str):  # llama.cpp types (a GGUF plan): never outliers
            importance = None if hessian is not None else energy  # encode_batch weights by diag(H) itself
            for choice, gw in zip(batch, quant_ggml.encode_batch(weight, batch, importance, hessian)):
                out[choice] = Candidate(plans[choice], gw, None, row_error(quant_ggml.dequantize(gw) - weight, hessian))
            continue
        grids = [quant.Grid(b, g) for b, g in batch]
        if any(plans[c].n_outliers for c in batch):
            masks = _outlier_masks(weight, hessian, grids, [plans[c] for c in batch], energy)
            grids = [quant.Grid(g.bits, g.group_size, m) for g, m in zip(grids, masks)]
        if hessian is not None:
            results = quant.gptq_batch(weight, hessian, grids)
        else:
            results = [quant._quantize_any(weight, g.bits, g.group_size, g.outlier_mask, None) for g in grids]
        for choice, grid, (q, z, s, target) in zip(batch, grids, results):
            qw = quant.QuantizedWeight(quant.pack(q, grid.bits), s, quant.pack(z, grid.bits), grid.bits, grid.group_size, weight.shape[1])
            sparse = None
            if grid.outlier_mask is not None and grid.outlier_mask.any():
                sparse = quant.extract_outliers(target, qw, grid.outlier_mask)
            approx = quant.dequantize(qw) + (sparse.to_dense() if sparse is not None else 0.0)
            out[choice] = Candidate(plans[choice], qw, sparse, row_error(approx - weight, hessian))
    for choice in options:
        if plans[choice].bits == quant.FP16_BITS:
            err = row_error(weight.to(torch.float16).float() - weight, hessian)
            out[choice] = Candidate(plans[choice], None, None, err)
    return {c: out[c] for c in options}


class Candidates(Pass):
    """Quantize every unit at every choice the recipe allows (see module docstring)."""

    name = "candidates"
    requires = (keys.UNITS,)
    produces = (keys.CANDIDATES,)

    def __init__(self, gptq: bool = True):
        if gptq:
            self.requires = type(self).requires + (keys.HESSIANS, keys.ACT_STATS)
        self.gptq = gptq

    def run(self, ctx: CompileContext) -> PassResult:
        recipe, units = ctx.recipe, ctx[keys.UNITS]
        hessians = ctx.results.get(keys.HESSIANS, {}) if self.gptq else {}
        energy = ctx.results.get(keys.ACT_STATS, {})
        table = CandidateTable()
        bar = tqdm(units.items(), desc="candidates (gptq)" if self.gptq else "candidates", disable=not ctx.progress)
        for name, unit in bar:
            weight = unit.weight(ctx.model)
            plans = choice_plans(unit, recipe)
            table.units[name] = unit_candidates(unit, weight, plans, hessians.get(name), energy.get(name))
        ctx.results[keys.CANDIDATES] = table
        n_choices = sum(len(per) for per in table.units.values())
        return PassResult(False, f"{len(units)} units, {n_choices} candidates, {table.nbytes() / 2**20:.0f} MiB packed")


class LowerCandidates(QuantizeModules):
    """Swap in the chosen candidates as they are: no second quantization, no drift from the costs."""

    name = "lower_candidates"
    requires = (keys.BIT_PLAN, keys.UNITS, keys.CANDIDATES)

    def run(self, ctx: CompileContext) -> PassResult:
        plan, table = ctx[keys.BIT_PLAN], ctx[keys.CANDIDATES]
        planned = [n for n, e in plan.items() if e.bits != quant.FP16_BITS]
        for name in tqdm(planned, desc="lower", disable=not ctx.progress, leave=False):
            entry = plan[name]
            cand = table.units[name][choice_of(entry)]
            self.swap(ctx, name, packed=(cand.weight, cand.outliers))
        return self.finish(ctx, planned)
