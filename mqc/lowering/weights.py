"""Lowering a plan's weights: every planned unit swapped for its runtime module, every other float
tensor stored in float16, so the model in memory is the one the artifact will reload.

Three ways to get a unit's packed weight, one pass each:

* :class:`LowerCandidates` (mq on predicted KL): the chosen candidate, read from the analysis as it
  is: no second quantization, no drift from what the costs and the search measured.
* :class:`QuantizeModules` (uniform round-to-nearest, LLM-MQ with ``quantizer=rtn``): each unit
  quantized from its float weight; with outliers, the weights whose rounding error weighted by the
  input energy is largest (:func:`mqc.quant.outlier_mask`) are kept as fp16 residuals.
* :class:`SequentialGPTQ` (uniform GPTQ, LLM-MQ with ``quantizer=gptq``): the calibration set
  streamed through the model layer by layer *as quantized so far*, each layer's Hessians measured
  on its inputs, its units quantized by GPTQ, then its outputs recomputed with the quantized layer
  (GPTQModel's and llm-compressor's sequential order). Inside a layer the inputs come from its float
  weights (GPTQ's "true sequential" off).

A large embedding or head is quantized a block of rows at a time (rows are independent).
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from mqc import quant
from mqc.analysis.candidates import joined, make_candidates, row_blocks
from mqc.analysis.sweep import input_leaders
from mqc.lowering.context import LoweringContext, store_rest_in_fp16, swap
from mqc.passes import keys
from mqc.passes.base import Pass, PassResult
from mqc.planning.types import LayerPlan, WeightUnit, choice_of
from mqc.runtime.modules import drop_dense_copies
from mqc.stream.stack import LayerStack, batches


def _planned(ctx: LoweringContext) -> list[str]:
    return [n for n, e in ctx[keys.PLAN].layers.items() if e.bits != quant.FP16_BITS]


def _finish(ctx: LoweringContext, swapped: list[str]) -> PassResult:
    store_rest_in_fp16(ctx.model, ctx.source)
    ctx.results[keys.WEIGHTS_LOWERED] = swapped
    return PassResult(True, f"{len(swapped)} modules quantized")


def float_rows(source, unit: WeightUnit):
    """``(r0, r1) -> [r1 - r0, in]`` float32 rows of a unit's weight, read from ``source``."""
    if unit.transposed:  # GPT-2's Conv1D stores [in, out]: rows of the matrix are its columns
        return lambda r0, r1: unit.oriented(source.tensor(unit.tensor_name))[r0:r1]
    return lambda r0, r1: source.rows(unit.tensor_name, r0, r1)


def quantized_unit(
    unit: WeightUnit, entry: LayerPlan, weight_rows, hessian: torch.Tensor | None, energy: torch.Tensor | None
):
    """``unit`` quantized to ``entry`` from its float rows (``weight_rows(r0, r1)`` -> ``[r, in]``),
    by row blocks; GPTQ with ``hessian``, else round-to-nearest."""
    choice = choice_of(entry)
    parts = [
        make_candidates(weight_rows(r0, r1), {choice: entry}, hessian, energy, block=(r0, r1), name=unit.qualname)[
            choice
        ]
        for r0, r1 in row_blocks(unit, 1)
    ]
    return joined(entry, unit, parts)


class LowerCandidates(Pass):
    """Swap in the chosen candidates as they are (see the module docstring)."""

    name = "lower_candidates"
    requires = (keys.PLAN,)
    produces = (keys.WEIGHTS_LOWERED,)

    def run(self, ctx: LoweringContext) -> PassResult:
        plan, table = ctx[keys.PLAN], ctx.analysis.candidates
        planned = _planned(ctx)
        for name in tqdm(planned, desc="lower", disable=not ctx.progress, leave=False):
            swap(ctx.model, ctx.units[name], table.candidate(name, choice_of(plan.layers[name])), ctx.source)
        return _finish(ctx, planned)


class QuantizeModules(Pass):
    """Round-to-nearest lowering from the float weights, outliers scored by the input energy."""

    name = "quantize"
    requires = (keys.PLAN,)
    produces = (keys.WEIGHTS_LOWERED,)

    def run(self, ctx: LoweringContext) -> PassResult:
        plan, units = ctx[keys.PLAN], ctx.units
        energy = ctx.analysis.act_stats() if plan.recipe.outlier_frac > 0 else {}
        planned = _planned(ctx)
        for name in tqdm(planned, desc="quantize", disable=not ctx.progress, leave=False):
            unit = units[name]
            rows = float_rows(ctx.source, unit)
            swap(ctx.model, unit, quantized_unit(unit, plan.layers[name], rows, None, energy.get(name)), ctx.source)
        return _finish(ctx, planned)


class SequentialGPTQ(Pass):
    """GPTQ lowering, one decoder layer at a time on the model as quantized so far (see the module
    docstring); an untied embedding (no input activations) is rounded to nearest."""

    name = "sequential_gptq"
    requires = (keys.PLAN, keys.CALIB)
    produces = (keys.WEIGHTS_LOWERED,)

    def run(self, ctx: LoweringContext) -> PassResult:
        plan, units = ctx[keys.PLAN], ctx.units
        planned = set(_planned(ctx))
        energy = ctx.analysis.act_stats() if plan.recipe.outlier_frac > 0 else {}
        leaders = input_leaders(units, ctx.analysis.shared_inputs)
        stack = LayerStack(ctx.model, ctx.source)
        micro = batches(ctx[keys.CALIB])
        catches = [stack.catch(ids) for ids in micro]
        hidden, calls = [c[0] for c in catches], [c[1] for c in catches]
        swapped = []
        for index in tqdm(range(stack.n_layers), desc="gptq", disable=not ctx.progress, leave=False):
            mine = [n for n, u in units.items() if u.layer == index and n in planned]
            local = stack.layer_name(index) + "."
            with stack.layer(index) as layer, torch.no_grad():
                readers = sorted({leaders[n] for n in mine})
                grams = _grams({n: layer.get_submodule(n[len(local) :]) for n in readers}, hidden, calls, index, stack)
                packed = {}
                for name in mine:
                    unit = units[name]
                    weight = unit.oriented(layer.get_submodule(name[len(local) :]).weight)
                    packed[name] = quantized_unit(
                        unit,
                        plan.layers[name],
                        lambda r0, r1, w=weight: w[r0:r1],
                        grams[leaders[name]],
                        energy.get(name),
                    )
            for name in mine:
                swap(ctx.model, units[name], packed[name], ctx.source)
                swapped.append(name)
            layer = stack.layers[index]
            store_rest_in_fp16(layer, ctx.source, stack.layer_name(index))
            with torch.no_grad():
                hidden = [stack.run(layer, h, call[index]) for h, call in zip(hidden, calls)]
            drop_dense_copies(layer)
        final = [stack.tail(h) for h in hidden]
        for name in [n for n, u in units.items() if u.layer is None and n in planned]:
            unit = units[name]
            hessian = None
            if unit.embedding != name:  # the head reads the tail's outputs
                total = sum(f.reshape(-1, f.shape[-1]).T @ f.reshape(-1, f.shape[-1]) for f in final)
                hessian = total / sum(f.shape[0] * f.shape[1] for f in final)
            swap(
                ctx.model,
                unit,
                quantized_unit(unit, plan.layers[name], float_rows(ctx.source, unit), hessian, energy.get(name)),
                ctx.source,
            )
            swapped.append(name)
        return _finish(ctx, swapped)


def _grams(modules, hidden, calls, index, stack) -> dict[str, torch.Tensor]:
    """``E[x x^T]`` of each module's input over every micro-batch (one forward of the layer)."""
    totals: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def record(module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            totals[name] = totals.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        for h, call in zip(hidden, calls):
            stack.run(stack.layers[index], h, call[index])
    finally:
        for handle in handles:
            handle.remove()
    return {n: totals[n] / counts[n] for n in totals}
