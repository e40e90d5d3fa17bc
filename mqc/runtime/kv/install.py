"""Making a model use its compressed cache: settings in its config, the registered attention, and
a forward pre-hook that swaps HF's default (empty) cache for the compressed one, so that
``model(...)`` and ``model.generate(...)`` use it without the caller passing anything. Without a
cache (``use_cache=False``) the model computes exact attention."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from mqc.errors import UnsupportedModelError
from mqc.runtime.kv.cache import LowRankKVCache
from mqc.runtime.kv.quant_cache import QuantKVCache
from mqc.runtime.kv.settings import (
    ATTN_IMPLEMENTATION,
    CONFIG_ATTR,
    SUPPORTED_MODEL_TYPES,
    KVSettings,
    QuantKVSettings,
    settings_of,
)

COMPRESSED_CACHES = (LowRankKVCache, QuantKVCache)


def _token_shape(args: tuple, kwargs: dict) -> tuple[int, int, torch.device]:
    ids = kwargs.get("input_ids", args[0] if args else None)
    tokens = ids if ids is not None else kwargs["inputs_embeds"]
    return tokens.shape[0], tokens.shape[1], tokens.device


def _use_compressed_cache(model: torch.nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: give the forward the model's compressed cache where HF would use a fresh
    ``DynamicCache``, and tell the cache this forward's positions."""
    use_cache = kwargs.get("use_cache")
    if use_cache is False or (use_cache is None and not model.config.use_cache):
        return None
    past = kwargs.get("past_key_values")
    fresh = type(past) is DynamicCache and past.get_seq_length() == 0 and not getattr(past, "_is_user_defined", False)
    if past is None or fresh:
        kind = QuantKVCache if isinstance(settings_of(model.config), QuantKVSettings) else LowRankKVCache
        past = kwargs["past_key_values"] = kind(model)
    if isinstance(past, COMPRESSED_CACHES):
        batch, new, device = _token_shape(args, kwargs)
        mask = kwargs.get("attention_mask")
        past.begin_forward(
            kwargs.get("position_ids"), mask if mask is not None and mask.ndim == 2 else None, batch, new, device
        )
    return args, kwargs


def check_supported(model: torch.nn.Module) -> None:
    model_type = model.config.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"compressed KV cache does not support model type {model_type!r} (it rebuilds keys with one rotary "
            f"embedding and SDPA); supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def install(model: torch.nn.Module, settings: KVSettings | QuantKVSettings | None = None) -> None:
    """Make ``model`` use its compressed cache (idempotent); ``settings`` replace the saved ones."""
    check_supported(model)
    if settings is not None:
        setattr(model.config, CONFIG_ATTR, settings.to_config())
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if not any(hook is _use_compressed_cache for hook in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(_use_compressed_cache, with_kwargs=True)
