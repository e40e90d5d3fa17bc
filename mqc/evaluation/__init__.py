"""Evaluating a compressed model the way a user chooses between compressions (qllm-eval's axes).

``mqc.evaluate(model)`` compares a model or artifact with its full-precision reference:
perplexity, KL and top-1/greedy agreement, per-genre and long-context perplexity, under weight,
activation and KV-cache settings. :mod:`.suite` runs it, :mod:`.settings` holds the W/A/KV
settings, :mod:`.reference` caches the reference's side, :mod:`.report` prints and plots it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from mqc.errors import MqcError
from mqc.evaluation.suite import SUITES, EvalResult, Suite, run_suite

__all__ = ["SUITES", "EvalResult", "Suite", "evaluate"]


def _describe(spec) -> tuple[object, str | None, bool, int]:
    """(tokenizer, recorded source, is compressed, vocabulary) of a model spec, from its files
    alone: an artifact, an ONNX export, or a plain model directory."""
    import json

    from transformers import AutoConfig, AutoTokenizer

    from mqc.models import resolve_model_dir

    onnx_config = Path(spec) / "mqc_onnx.json"
    path = Path(spec) if onnx_config.is_file() else resolve_model_dir(spec)
    tokenizer = None
    if any(path.glob("tokenizer*")):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if onnx_config.is_file():
        meta = json.loads(onnx_config.read_text())
        genai = json.loads((path / "genai_config.json").read_text())
        return tokenizer, meta.get("source"), True, genai["model"]["vocab_size"]
    vocab = AutoConfig.from_pretrained(path, local_files_only=True).get_text_config().vocab_size
    if (path / "manifest.json").is_file():
        from mqc.runtime.artifact import read_manifest

        return tokenizer, read_manifest(path).get("source"), True, vocab
    return tokenizer, None, False, vocab


def _load(spec) -> torch.nn.Module:
    """The model of a spec: an artifact, an ONNX export (scored through onnxruntime), or a plain model."""
    if (Path(spec) / "mqc_onnx.json").is_file():
        from mqc.export.onnx import OnnxCausalLM

        return OnnxCausalLM(spec)
    from mqc.runtime.artifact import load_any

    return load_any(spec)[0]


def evaluate(
    model: str | os.PathLike | torch.nn.Module = "default",
    *,
    tokenizer=None,
    reference: str | os.PathLike | torch.nn.Module | None = None,
    suite: str | Suite = "quick",
    settings: Sequence[str] | None = None,
    eval_file: str | os.PathLike | None = None,
    texts: Sequence[str | os.PathLike] = (),
    eval_tokens: int | None = None,
    context: int | None = None,
    smooth: float | None = None,
    cache: Path | None = None,
    progress: bool = True,
) -> EvalResult:
    """Evaluate ``model`` (an artifact, an ONNX export, a local HF dir, ``"default"``, or a loaded
    module with its ``tokenizer``) against ``reference``: by default an artifact's recorded source, else the model
    itself (then only its own perplexities are informative)."""
    if isinstance(suite, str):
        if suite not in SUITES:
            raise MqcError(f"unknown suite {suite!r}; use {' or '.join(SUITES)}")
        suite = SUITES[suite]
    if context is not None and context < 3:  # BOS + 2 text tokens: the smallest window that scores one
        raise MqcError(f"context {context} is too small; give at least 3 tokens per window (default 512)")
    if eval_tokens is not None and eval_tokens < 2:
        raise MqcError(f"eval tokens {eval_tokens} is too few; score at least 2 tokens")
    overrides = {"tokens": eval_tokens, "context": context}
    suite = dataclasses.replace(suite, **{k: v for k, v in overrides.items() if v is not None})
    if settings is not None:
        from mqc.evaluation.settings import Setting

        settings = [Setting.parse(s).name for s in settings]  # refuse a typo before loading anything
    from mqc.data import check_text_file

    for file in (eval_file, *texts):
        if file:
            check_text_file(file)
    name = "model" if isinstance(model, torch.nn.Module) else str(model)
    if not isinstance(model, torch.nn.Module) and (Path(model) / "mqc_onnx.json").is_file():
        if any(s != "W" for s in settings or ["W"]):  # onnxruntime computes as exported
            raise MqcError(
                "an ONNX export is evaluated as exported (setting W); activation/KV settings need an artifact"
            )
        settings = ["W"]
    source, vocab = None, None
    loader = model
    if not isinstance(model, torch.nn.Module):
        spec = model
        loaded_tokenizer, source, compressed, vocab = _describe(spec)
        tokenizer = tokenizer or loaded_tokenizer
        if compressed and reference is None and source is None:
            raise MqcError(f"{name} does not record its source model; pass --reference MODEL_DIR (or 'default')")
        loader = functools.cache(lambda: _load(spec))
    if tokenizer is None:
        raise MqcError(f"{name} has no tokenizer; evaluation on text needs one")
    reference = reference if reference is not None else source
    if reference is None:
        ref_loader, ref_name = loader, name
    elif isinstance(reference, torch.nn.Module):
        ref_loader, ref_name = reference, "reference"
    else:
        ref_loader, ref_name = (lambda: _load(reference)), str(reference)
    return run_suite(
        loader,
        ref_loader,
        tokenizer,
        suite,
        settings=settings,
        eval_file=eval_file,
        texts=texts,
        smooth=smooth,
        names=(name, ref_name),
        cache=cache,
        progress=progress,
        vocab=vocab,
    )
