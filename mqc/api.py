"""The Python entry point: ``mqc.compile(model, recipe, calib=...)``.

Capture the model, seed a :class:`CompileContext` with the graph and the calibration ids, run
the pipeline the recipe asks for, and return the rewritten model with its plan and report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from mqc.capture import capture
from mqc.errors import DataError
from mqc.graph import GraphView
from mqc.passes import keys
from mqc.passes.base import CompileContext, Pass, PassManager
from mqc.passes.units import LayerPlan
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


def needs_calibration(recipe: Recipe) -> bool:
    return recipe.method == "mq" or recipe.outlier_frac > 0 or recipe.uses_gptq or (recipe.kv is not None and recipe.kv.method == "asvd")


def default_pipeline(recipe: Recipe) -> list[Pass]:
    """The passes a recipe implies; the manager orders them by their contracts."""
    from mqc.passes.act_stats import ActivationStats
    from mqc.passes.outliers import SelectOutliers
    from mqc.passes.quantize import QuantizeModules, SequentialGPTQ
    from mqc.passes.uniform import UniformPlan
    from mqc.passes.units import SelectUnits

    calibrated = needs_calibration(recipe)
    lower = SequentialGPTQ() if recipe.uses_gptq else QuantizeModules()
    passes: list[Pass] = [SelectUnits(), SelectOutliers(weighted=calibrated), lower]
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
    # Sibling groups are recorded here and fused when the model moves to CUDA (fuse_model): the
    # artifact keeps one module per layer, which per-layer accounting and the ONNX export read.
    from mqc.passes.fuse import FuseSiblings

    passes.append(FuseSiblings(rewrite=False, after=(keys.KV_REWRITTEN,) if recipe.kv is not None else ()))
    return passes


def compile(
    model: torch.nn.Module,
    recipe: Recipe | None = None,
    calib: torch.Tensor | None = None,
    tokenizer: Any = None,
    passes: list[Pass] | None = None,
    progress: bool = True,
) -> CompiledModel:
    """Compile ``model`` in place according to ``recipe``.

    ``calib`` is a ``[n, seq_len]`` LongTensor of token ids; when a recipe needs calibration and
    none is given, it is drawn from the Brown calibration split (or ``recipe.calib.file``) with
    ``tokenizer``.
    """
    recipe = recipe or Recipe()
    start = time.perf_counter()
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
    PassManager(passes if passes is not None else default_pipeline(recipe)).run(ctx)
    stats = {"compile_seconds": time.perf_counter() - start, "pass_seconds": dict(ctx.timings)}
    return CompiledModel(model, recipe, ctx.results.get(keys.BIT_PLAN, {}), ctx, tokenizer, stats)
