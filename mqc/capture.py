"""Capture a Hugging Face causal LM as a torch.fx graph with torch.export.

``torch.fx.symbolic_trace`` fails on current transformers models, so the model is exported
(non-strict) through a thin wrapper ``(input_ids, attention_mask) -> logits`` with a dynamic
sequence length. The exported ``graph_module`` is a plain FX graph whose ``nn_module_stack``
metadata ties each ``aten.linear`` / ``aten.addmm`` node to the module that produced it; that
is what :mod:`mqc.graph` analyses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mqc.errors import UnsupportedModelError
from mqc.models import check_supported

_WRAPPER_ATTR = "model"


class _LogitsWrapper(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


@dataclass(frozen=True)
class Captured:
    graph_module: torch.fx.GraphModule
    model_type: str


def module_path(node: torch.fx.Node) -> str | None:
    """Qualname (relative to the HF model) of the innermost module that emitted ``node``."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    # Non-strict export names paths from the wrapper ("model.model.layers.0..."); strict mode
    # prefixes "L['self']". Strip whatever leads up to the wrapper's attribute.
    marker = f"{_WRAPPER_ATTR}."
    index = path.find(marker)
    return path[index + len(marker) :] if index >= 0 else path


def capture(model: torch.nn.Module, example_len: int = 16, max_len: int = 4096) -> Captured:
    """Export ``model`` with a dynamic sequence length in ``[2, max_len]``."""
    config = model.config
    check_supported(config)
    limit = min(max_len, getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", max_len))
    # Fixed example ids: the values do not shape the graph, and drawing them would shift the
    # caller's global RNG stream (compile must not change what a seeded script samples next).
    ids = (torch.arange(example_len, device=next(model.parameters()).device) % config.vocab_size)[None]
    seq = torch.export.Dim("seq", min=2, max=limit)
    try:
        with torch.no_grad():
            program = torch.export.export(
                _LogitsWrapper(model),
                (ids, torch.ones_like(ids)),
                strict=False,
                dynamic_shapes=({1: seq}, {1: seq}),
            )
    except Exception as exc:  # export raises many types; all mean "this model does not capture"
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(
            f"cannot capture model type {config.model_type!r} with torch.export: "
            f"{type(exc).__name__}: {first}"
        ) from exc
    return Captured(graph_module=program.graph_module, model_type=config.model_type)
