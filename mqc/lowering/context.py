"""What the lowering passes share: the model being built, where its float tensors come from, the
plan, and the analysis it was made from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mqc import quant_ggml
from mqc.analysis.candidates import Candidate
from mqc.passes.base import Context
from mqc.planning.types import WeightUnit
from mqc.runtime.modules import GgmlLinear, QEmbedding, QLinear
from mqc.stream.skeleton import materialize
from mqc.stream.source import RoundedSource, WeightSource
from mqc.stream.stack import embed_scale


@dataclass
class LoweringContext(Context):
    model: torch.nn.Module | None = None  # rewritten in place: a model in memory, or a skeleton being filled
    source: WeightSource | None = None  # the float model's tensors
    analysis: Any = None
    tokenizer: Any = None

    @property
    def units(self) -> dict[str, WeightUnit]:
        return self.analysis.units


def swap(model: torch.nn.Module, unit: WeightUnit, candidate: Candidate, source: WeightSource) -> None:
    """Replace ``unit``'s module by its runtime module holding ``candidate`` (a tied embedding
    then reads the new table; an untied embedding becomes its own table)."""
    name = unit.qualname
    old = model.get_submodule(name)
    bias = source.tensor(f"{name}.bias") if unit.has_bias else None
    if isinstance(candidate.weight, quant_ggml.GgmlWeight):
        module = GgmlLinear.from_ggml(candidate.weight, bias)
    else:
        module = QLinear.from_quantized(candidate.weight, candidate.outliers, bias)
    if unit.embedding == name:
        model.set_submodule(name, QEmbedding(module, None, embed_scale(old)))
        return
    model.set_submodule(name, module)
    if unit.embedding is not None:  # tied: the embedding reads lm_head's table
        model.set_submodule(unit.embedding, QEmbedding(module, name, embed_scale(model.get_submodule(unit.embedding))))


def store_rest_in_fp16(model: torch.nn.Module, source: WeightSource, prefix: str = "") -> None:
    """Every float tensor no unit replaced, as the artifact stores it (float16 values, held in
    float32): read from ``source`` into a skeleton's meta parameters (``prefix``: ``model``'s
    qualname), or rounded in place in a model in memory. Non-persistent buffers (rotary tables) are derived at load time, so they keep
    full precision."""
    materialize(model, prefix, RoundedSource(source))
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.dtype == torch.float32:
                tensor.copy_(tensor.half().float())
