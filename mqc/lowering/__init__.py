"""Lowering: the only code that changes a model. ``lower(model, plan)`` swaps every planned unit
for its runtime module, stores every other tensor as the artifact will, and installs the KV cache
the plan chose; the result generates with Hugging Face's ``generate()`` and saves as an artifact.

``model`` is a model in memory (rewritten in place) or a model directory (a skeleton filled from
its shards: the float model is never whole in memory). The passes say what they change in their
contracts (``WEIGHTS_LOWERED``, ``KV_REWRITTEN``), so the KV rewrites and the fusion record come
after the weights by contract, not by list position.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from mqc.errors import AnalysisError
from mqc.lowering.context import LoweringContext
from mqc.lowering.fuse import FuseSiblings
from mqc.lowering.kv_quant import InstallKVQuant
from mqc.lowering.weights import LowerCandidates, QuantizeModules, SequentialGPTQ
from mqc.passes import keys
from mqc.passes.base import Pass, PassManager
from mqc.planning import Plan
from mqc.stream.skeleton import open_model
from mqc.stream.source import ModuleSource


@dataclass
class CompiledModel:
    """A compiled HF model (still ``generate()``-able) and what was decided for it."""

    model: torch.nn.Module
    plan: Plan
    analysis: Any
    tokenizer: Any = None
    stats: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)  # what the lowering passes produced (keys.*)

    @property
    def recipe(self):
        return self.plan.recipe

    @property
    def model_bytes(self) -> int:
        """Whole-model bytes as the plan's target stores the model."""
        return self.plan.model_bytes


def pipeline(plan: Plan, analysis) -> list[Pass]:
    """The lowering passes a plan implies; the manager orders them by their contracts."""
    recipe = plan.recipe
    if recipe.method == "mq" and analysis.settings.candidates:
        passes: list[Pass] = [LowerCandidates()]
    elif recipe.uses_gptq:
        passes = [SequentialGPTQ()]
    else:
        passes = [QuantizeModules()]
    if recipe.kv is not None:
        from mqc.lowering.kv_lowrank import KVLowRank

        passes.append(KVLowRank(recipe.kv))
    if plan.kv is not None:
        passes.append(InstallKVQuant())
    kv_cache = recipe.kv is not None or plan.kv is not None
    # Sibling groups are recorded here and fused when the model moves to CUDA (fuse_model): the
    # artifact keeps one module per layer, which per-layer accounting and the ONNX export read.
    passes.append(FuseSiblings(rewrite=False, after=(keys.KV_REWRITTEN,) if kv_cache else ()))
    return passes


def lower(
    model: str | os.PathLike | torch.nn.Module | None,
    plan: Plan,
    *,
    analysis=None,
    tokenizer=None,
    passes: list[Pass] | None = None,
    progress: bool = True,
) -> CompiledModel:
    """``plan`` applied to ``model`` (see the module docstring); ``analysis``: the one the plan was
    made from (read from the plan's directory by default)."""
    from mqc.analysis import Analysis

    began = time.perf_counter()
    if isinstance(model, torch.nn.Module):
        target = model.eval()
        same = analysis is not None and isinstance(analysis.source, ModuleSource) and analysis.source.model is model
        source = analysis.source if same else ModuleSource(model)
        checked = same  # the analysis was made from this very model: no need to hash it again
    else:
        target, source, loaded, _ = open_model(model)
        tokenizer = tokenizer or loaded
        checked = False
    if analysis is None:
        analysis = Analysis.open(plan.analysis, source)
    elif analysis.source is None:
        analysis = dataclasses.replace(analysis, source=source)
    if plan.fingerprint != analysis.fingerprint:
        raise AnalysisError(
            f"the plan was made from another analysis than {analysis.root}; lower it with its own analysis"
        )
    if not checked and source.fingerprint != analysis.fingerprint:
        raise AnalysisError(
            f"the model is not the one {analysis.root} analysed; lower the plan onto the model it was made for"
        )
    ctx = LoweringContext(model=target, source=source, analysis=analysis, tokenizer=tokenizer, progress=progress)
    ctx.results[keys.PLAN] = plan
    if analysis.settings.calib is not None:
        ctx.results[keys.CALIB] = analysis.calib()
    if analysis.settings.stats:
        ctx.results[keys.ACT_STATS] = analysis.act_stats()
    with torch.no_grad():
        PassManager(passes if passes is not None else pipeline(plan, analysis)).run(ctx)
    stats: dict[str, Any] = {"lower_seconds": time.perf_counter() - began, "pass_seconds": dict(ctx.timings)}
    stats["fusion_groups"] = ctx.results.get(keys.FUSION_GROUPS)
    if plan.recipe.kv is not None or plan.kv is not None:  # what the cache costs, per token and at a context
        from mqc.runtime.kv import REPORT_CONTEXT, kv_accounting

        context = plan.recipe.kv_quant.context if plan.recipe.kv_quant is not None else REPORT_CONTEXT
        stats["kv"] = kv_accounting(target, context=context)
    return CompiledModel(target, plan, analysis, tokenizer, stats, ctx.results)
