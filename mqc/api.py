"""The Python entry point: ``mqc.compile(model, recipe)`` = analyze, plan, lower.

A compile is the three phases in order: :func:`mqc.analyze` (streamed, saved in a directory,
reused when it exists), :func:`mqc.plan` (pure, seconds) and :func:`mqc.lower` (the only phase
that changes a model). Call them apart to plan several sizes from one analysis.
"""

from __future__ import annotations

import os

import torch

from mqc.analysis import Analysis, analyze
from mqc.lowering import CompiledModel, lower
from mqc.planning import plan
from mqc.recipe import Recipe


def compile(
    model: str | os.PathLike | torch.nn.Module | None,
    recipe: Recipe | None = None,
    calib: torch.Tensor | None = None,
    tokenizer=None,
    progress: bool = True,
    analysis: Analysis | str | os.PathLike | None = None,
) -> CompiledModel:
    """Compile ``model`` (a model in memory, compiled in place, or a model directory) for
    ``recipe``. ``calib``: ``[n, seq_len]`` calibration token ids (default: drawn from the Brown
    calibration split, or ``recipe.calib.file``, with ``tokenizer``). ``analysis``: a finished
    analysis to plan from, or the directory to analyse into (default: the user cache)."""
    recipe = recipe or Recipe()
    if not isinstance(analysis, Analysis):
        analysis = analyze(
            model, recipe, analysis, tokenizer=tokenizer, calib=calib, progress=progress, budgets=(recipe,)
        )
    chosen = plan(analysis, recipe, progress=progress)
    return lower(model, chosen, analysis=analysis, tokenizer=tokenizer, progress=progress)
