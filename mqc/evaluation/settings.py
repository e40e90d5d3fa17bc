"""Weight/activation/KV settings of the evaluation (qllm-eval's W, W+A, W+KV axes).

A setting runs the model as it is (its weights are whatever was compiled: "W") and optionally
fake-quantizes, on the fly, the input of every linear layer but the output head (per-token
symmetric int8/int4, ``+A8``/``+A4``) and every key/value entering the KV cache (``+KV4`` etc.:
per token, asymmetric, groups of 32 channels within a head, post-RoPE keys as the cache holds
them; every cached token, with no full-precision recent window, so it bounds a KIVI-style cache
from below). Per-token grids use only the token's own values, so a whole window scored at once
sees exactly what token-by-token decoding would.

Optional SmoothQuant-style smoothing (``smooth=alpha``) divides each input channel by
``s_j = max|x_j|^alpha / max|W_j|^(1-alpha)`` before the activation grid and multiplies it back
after, which is what folding ``s`` into the weights computes, without requantizing them; the
channel maxima come from calibration windows.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.pytorch_utils import Conv1D

from mqc import quant
from mqc.errors import MqcError

KV_GROUP = 32
_SETTING = re.compile(r"^W(?:\+A(?P<act>4|8))?(?:\+KV(?P<kv>2|4|8))?$")
SETTINGS = ("W", "W+A8", "W+A4", "W+KV4")


@dataclass(frozen=True)
class Setting:
    name: str
    act_bits: int | None = None
    kv_bits: int | None = None

    @classmethod
    def parse(cls, name: str) -> Setting:
        match = _SETTING.match(name.strip())
        if not match:
            raise MqcError(f"unknown setting {name!r}; use W, W+A8, W+A4, W+KV2/4/8 or W+A8+KV4")
        act, kv = match.group("act"), match.group("kv")
        return cls(name.strip(), int(act) if act else None, int(kv) if kv else None)


class FakeQuantKVCache(DynamicCache):
    """A dynamic cache whose keys and values are rounded to ``bits`` as they are stored."""

    def __init__(self, config, bits: int):
        super().__init__(config=config)
        self.bits = bits

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        head = key_states.shape[-1]
        group = KV_GROUP if head % KV_GROUP == 0 else head
        key_states = quant.fake_quantize_rows(key_states, self.bits, group)
        value_states = quant.fake_quantize_rows(value_states, self.bits, group)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def linear_inputs(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The modules whose input an activation setting quantizes: every linear but the output head."""
    head = model.get_output_embeddings()
    return {
        name: m
        for name, m in model.named_modules()
        if m is not head
        and not list(m.children())
        and (isinstance(m, torch.nn.Linear | Conv1D) or (hasattr(m, "in_features") and hasattr(m, "out_features")))
    }


def _weight_input_max(module: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """``max_i |W[i, j]|`` per input channel ``j``, probed through the module itself (identity rows
    in, bias subtracted) so that every runtime format, fused or packed, answers the same way."""
    n = module.nx if isinstance(module, Conv1D) else module.in_features
    eye = torch.eye(n, device=device)
    return (module(eye) - module(torch.zeros_like(eye[:1]))).abs().amax(-1).float()


@torch.no_grad()
def smoothing_scales(model: torch.nn.Module, calib: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
    """Per-linear SmoothQuant scales from the input channel maxima over ``calib [n, L]``."""
    modules = linear_inputs(model)
    amax: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable:
        def record(module, args):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
            amax[name] = torch.maximum(amax[name], x) if name in amax else x

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        for row in calib:
            model(input_ids=row[None].to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    scales = {}
    for name, m in modules.items():
        w_max = _weight_input_max(m, amax[name].device).clamp(min=1e-5)
        scales[name] = (amax[name].clamp(min=1e-5) ** alpha / w_max ** (1 - alpha)).clamp(min=1e-5)
    return scales


@contextmanager
def applied(
    model: torch.nn.Module, setting: Setting, smooth: dict[str, torch.Tensor] | None = None
) -> Iterator[Callable[[], dict[str, Any]]]:
    """Run ``model`` under ``setting`` inside the block; yields a function giving the forward's
    extra keyword arguments (a fresh cache per sequence for KV settings)."""
    from mqc.runtime.kv import lowrank_sites

    if setting.kv_bits and lowrank_sites(model):
        raise MqcError(f"{setting.name}: this model already has a compressed (low-rank) KV cache; evaluate it with W")
    handles = []
    if setting.act_bits:
        bits = setting.act_bits

        def hook(name: str) -> Callable:
            scale = None if smooth is None else smooth[name]

            def fake_quant(module, args):
                x = args[0]
                if scale is None:
                    return (quant.fake_quantize_rows(x, bits, symmetric=True), *args[1:])
                s = scale.to(x.device, x.dtype)
                return (quant.fake_quantize_rows(x / s, bits, symmetric=True) * s, *args[1:])

            return fake_quant

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in linear_inputs(model).items()]
    config = model.config

    def forward_kwargs() -> dict[str, Any]:
        return {"past_key_values": FakeQuantKVCache(config, setting.kv_bits)} if setting.kv_bits else {}

    try:
        yield forward_kwargs
    finally:
        for h in handles:
            h.remove()
