"""What a decode graph carries between steps: the names of the dynamic axes, one cache tensor's
state, and a layer's sliding window (shared by the decoder graph and the low-rank attention it
calls)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mqc.export.graph import FLOAT

BATCH, SEQ, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"


def sliding_window(model: torch.nn.Module, attention: torch.nn.Module) -> int | None:
    """The layer's sliding window in Hugging Face's sense (a query sees key ``k`` when
    ``q - k < window``), or None for full attention. ``GroupQueryAttention``'s
    ``local_window_size`` has the same meaning (checked by the parity tests)."""
    if hasattr(attention, "sliding_window"):
        return attention.sliding_window
    return getattr(model.config, "sliding_window", None) if model.config.model_type == "mistral" else None


@dataclass(frozen=True)
class CacheState:
    """One tensor of the cache a decode step carries: ``past_key_values.{name}`` in,
    ``present.{name}`` out."""

    name: str
    past_shape: list[int | str]
    present_shape: list[int | str]
    elem_type: int = FLOAT
