"""The Python entry point: ``mqc.compile(model, recipe, calib=...)``.

Capture the model, seed a :class:`CompileContext` with the graph and the calibration ids, run
the pipeline the recipe asks for, and return the rewritten model with its plan and report.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from mqc.capture import capture
from mqc.errors import DataError, MqcError
from mqc.graph import GraphView
from mqc.passes import keys
from mqc.passes.base import CompileContext, Pass, PassManager
from mqc.passes.units import LayerPlan, plan_bytes
from mqc.recipe import Recipe


@dataclass
class CompiledModel:
    """A compiled HF model (still ``generate()``-able) and what was decided for it."""

    model: torch.nn.Module
    recipe: Recipe
    plan: dict[str, LayerPlan]
    context: CompileContext
    tokenizer: Any = None
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def model_bytes(self) -> int | None:
        """Whole-model bytes as the recipe's target stores the model: the plan's units plus every
        other tensor (None when the compile did not size the model)."""
        size = self.context.results.get(keys.MODEL_SIZE)
        return None if size is None else size.total_bytes(plan_bytes(self.plan))


# Results that depend only on the full-precision model, the calibration ids and the recipe fields
# that :func:`_analysis_fields` keeps: another budget can reuse them.
REUSABLE = (
    keys.UNITS,
    keys.MODEL_SIZE,
    keys.CALIB,
    keys.ACT_STATS,
    keys.HESSIANS,
    keys.SENSITIVITY,
    keys.CANDIDATES,
    keys.OUTPUT_FISHER,
    keys.COSTS,
    keys.KV_COSTS,
)


def _analysis_fields(recipe: Recipe) -> Recipe:
    """``recipe`` with the fields that only steer allocation, search and lowering set to defaults."""
    fixed = {"bits": 4.0, "budget_bytes": None, "budget_frac": None, "size": None, "pins": ()}
    fixed |= {"search": "evo", "search_generations": 0, "memory": None, "kv_quant": None}  # KV: see _kv_grids
    if recipe.sensitivity != "kl":  # RTN-delta sensitivities: both variants come out of one pass
        fixed |= {"sensitivity": "first_order", "quantizer": "rtn"}
    return dataclasses.replace(recipe, **fixed)


def _kv_grids(recipe: Recipe):
    """What measured KV costs depend on: the quantized cache's grids, window and context."""
    kv = recipe.kv_quant
    return None if kv is None else dataclasses.replace(kv, bits=None, budget_frac=None, batch=1)


def needs_calibration(recipe: Recipe) -> bool:
    from mqc.passes.kv_lowrank import required_results

    kv_reads = recipe.kv is not None and bool(required_results(recipe.kv))  # activation stats need calibration too
    kv_reads |= recipe.kv_quant is not None and recipe.kv_quant.budget_frac is not None  # PM-KVQ measures costs
    return recipe.method == "mq" or recipe.outlier_frac > 0 or recipe.uses_gptq or kv_reads


def _measured_kl_pipeline(recipe: Recipe) -> list[Pass]:
    """mq with predicted-KL costs: candidates as deployed, exact knapsack, measured-KL search."""
    from mqc.passes.act_stats import ActivationStats
    from mqc.passes.bit_alloc import AllocateBits
    from mqc.passes.candidates import Candidates, LowerCandidates
    from mqc.passes.kl_cost import OutputFisher, PredictedKL
    from mqc.passes.search import EvoSearch

    search = recipe.search == "evo" and recipe.search_generations > 0
    passes: list[Pass] = [ActivationStats(hessians=recipe.uses_gptq), Candidates(gptq=recipe.uses_gptq)]
    joint = recipe.memory is not None  # the KV cache's widths join the weights' knapsack
    passes += [OutputFisher(), PredictedKL(), AllocateBits(final=not search, joint=joint), LowerCandidates()]
    return passes + ([EvoSearch()] if search else [])


def default_pipeline(recipe: Recipe) -> list[Pass]:
    """The passes a recipe implies; the manager orders them by their contracts."""
    from mqc.passes.act_stats import ActivationStats
    from mqc.passes.outliers import SelectOutliers
    from mqc.passes.quantize import QuantizeModules, SequentialGPTQ
    from mqc.passes.uniform import UniformPlan
    from mqc.passes.units import SelectUnits

    passes: list[Pass] = [SelectUnits()]
    if recipe.method == "mq" and recipe.sensitivity == "kl":
        passes += _measured_kl_pipeline(recipe)
    else:
        calibrated = needs_calibration(recipe)
        lower = SequentialGPTQ() if recipe.uses_gptq else QuantizeModules()
        passes += [SelectOutliers(weighted=calibrated), lower]
        if calibrated:
            passes.append(ActivationStats())
        if recipe.method == "mq":
            from mqc.passes.bit_alloc import AllocateBits
            from mqc.passes.sensitivity import Sensitivity

            passes += [Sensitivity(), AllocateBits()]
        else:
            passes.append(UniformPlan())
    if recipe.kv is not None:
        from mqc.passes.kv_lowrank import KVLowRank

        passes.append(KVLowRank())
    if recipe.kv_quant is not None:
        from mqc.passes.kv_quant import KVCostsPass, KVQuant

        passes += [KVCostsPass()] if recipe.kv_quant.measured else []
        passes.append(KVQuant(recipe.kv_quant, joint=recipe.memory is not None))
    # Sibling groups are recorded here and fused when the model moves to CUDA (fuse_model): the
    # artifact keeps one module per layer, which per-layer accounting and the ONNX export read.
    from mqc.passes.fuse import FuseSiblings

    kv_cache = recipe.kv is not None or recipe.kv_quant is not None
    passes.append(FuseSiblings(rewrite=False, after=(keys.KV_REWRITTEN,) if kv_cache else ()))
    return passes


def _run_missing(pipeline: list[Pass], ctx: CompileContext, only: set[str] | None = None) -> None:
    """Run the passes whose products the context lacks (all, or those producing ``only``)."""
    todo = [p for p in pipeline if not p.produces or not set(p.produces) <= set(ctx.results)]
    if only is not None:
        todo = [p for p in todo if set(p.produces) & only]
    PassManager(todo).run(ctx)


def compile(
    model: torch.nn.Module,
    recipe: Recipe | None = None,
    calib: torch.Tensor | None = None,
    tokenizer: Any = None,
    passes: list[Pass] | None = None,
    progress: bool = True,
    reuse: CompiledModel | None = None,
) -> CompiledModel:
    """Compile ``model`` in place according to ``recipe``.

    ``calib`` is a ``[n, seq_len]`` LongTensor of token ids; when a recipe needs calibration and
    none is given, it is drawn from the Brown calibration split (or ``recipe.calib.file``) with
    ``tokenizer``.

    ``reuse``: an earlier compile of a copy of the same full-precision model whose recipe differs
    at most in budget (size, bits, bytes, fraction or joint memory), pins, search settings and
    quantized KV cache (with LLM-MQ's RTN-delta sensitivities, also in sensitivity kind and
    quantizer); measured KV costs are reused when the cache's grids, window and context agree. Its analysis (units,
    calibration ids, activation statistics, Hessians, candidates, output gradients, costs or
    sensitivities) is taken as it is and the passes that made it do not run, so a sweep over
    sizes pays for the analysis (most of an ``mq`` compile) once.
    """
    recipe = recipe or Recipe()
    start = time.perf_counter()
    reused = {}
    if reuse is not None:
        if _analysis_fields(reuse.recipe) != _analysis_fields(recipe):
            raise MqcError(
                "reuse: the earlier compile's recipe differs in more than budget, pins or search settings; "
                "compile without reuse"
            )
        reused = {k: reuse.context.results[k] for k in REUSABLE if k in reuse.context.results}
        if _kv_grids(reuse.recipe) != _kv_grids(recipe):  # KV costs hold for one cache layout and context
            reused.pop(keys.KV_COSTS, None)
        calib = reused.get(keys.CALIB, calib)
    if calib is None and needs_calibration(recipe):
        if tokenizer is None:
            raise DataError("this recipe needs calibration data: pass calib=token ids or a tokenizer")
        from mqc.data import calibration_batches

        c = recipe.calib
        calib = calibration_batches(tokenizer, c.n_samples, c.seq_len, c.seed, c.file)
    model.eval()
    graph = GraphView(capture(model), model)
    ctx = CompileContext(model=model, recipe=recipe, progress=progress)
    ctx.results[keys.GRAPH] = graph
    if calib is not None:
        ctx.results[keys.CALIB] = calib
    ctx.results.update(reused)
    pipeline = passes if passes is not None else default_pipeline(recipe)
    if recipe.method == "mq":  # an impossible size is known from the shapes: refuse it before any analysis
        from mqc.passes.bit_alloc import check_budget

        _run_missing(pipeline, ctx, {keys.UNITS, keys.MODEL_SIZE})
        reserved = 0
        if recipe.memory is not None:  # the narrowest KV cache is known from the shapes too
            from mqc.passes.kv_quant import kv_options

            reserved = kv_options(None, recipe.kv_quant, model.config).floor()
        check_budget(recipe, ctx[keys.UNITS], ctx[keys.MODEL_SIZE], reserved)
    _run_missing(pipeline, ctx)
    stats = {"compile_seconds": time.perf_counter() - start, "pass_seconds": dict(ctx.timings)}
    if recipe.kv is not None or recipe.kv_quant is not None:  # what the cache costs, per token and at a context
        from mqc.runtime.kv import REPORT_CONTEXT, kv_accounting

        context = recipe.kv_quant.context if recipe.kv_quant is not None else REPORT_CONTEXT
        stats["kv"] = kv_accounting(model, context=context)
    return CompiledModel(model, recipe, ctx.results.get(keys.BIT_PLAN, {}), ctx, tokenizer, stats)
