"""KV-cache bytes: what a compressed cache holds at a context, next to the fp16 cache.

Full-precision K/V are counted at 16 bits per element (the deployment dtype; the CPU runtime
computes in float32). Low-rank features count at their stored size (:func:`mqc.quant.weight_bytes`
of one row per token) plus 4 bytes per token for the positions RoPE needs when rebuilding (one
int32 per token for the whole model). Quantized K/V count codes, fp16 scales and minimums of
whole groups (:func:`mqc.quant.minmax_bytes`); a token is in the stage the cache's layout puts it
in at that context (:func:`mqc.runtime.kv.layout.boundary`).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

import torch

from mqc.runtime.kv.layout import boundary
from mqc.runtime.kv.projection import LowRankKVProj
from mqc.runtime.kv.settings import FULL_BYTES, POSITION_BYTES, QuantKVSettings, settings_of


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a decoder's attention."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def fp16_cache_bytes(config, context: int) -> int:
    """Bytes of an fp16 K/V cache of ``context`` tokens."""
    layers, kv_heads, head_dim = kv_shape(config)
    return context * layers * 2 * kv_heads * head_dim * FULL_BYTES


def quant_cache_bytes(settings: QuantKVSettings, config, context: int) -> dict[str, Any]:
    """Bytes of a quantized cache of ``context`` tokens: exact sinks and window, each stage."""
    layers, kv_heads, head_dim = kv_shape(config)
    start = min(settings.sinks, context)
    ends = [boundary(context, start, lag, settings.group) for lag in settings.lags]
    exact_tokens = start + context - ends[0]
    stage_tokens = [end - (ends[k + 1] if k + 1 < len(ends) else start) for k, end in enumerate(ends)]
    exact = exact_tokens * layers * 2 * kv_heads * head_dim * FULL_BYTES
    stages = [
        sum(round(n * settings.token_bytes(layer, k, kv_heads, head_dim)) for layer in range(layers))
        for k, n in enumerate(stage_tokens)
    ]
    total = exact + sum(stages)
    fp16 = fp16_cache_bytes(config, context)
    return {
        "context": context,
        "exact_tokens": exact_tokens,
        "stage_tokens": stage_tokens,
        "exact_bytes": exact,
        "stage_bytes": stages,
        "cache_bytes_before": fp16,
        "cache_bytes_after": total,
        "kv_fraction": total / fp16,
    }


def _projections(source: torch.nn.Module | str | os.PathLike) -> tuple[dict[str, dict[str, int]], Any]:
    """({qualname: {"rank", "out_features"}} of the low-rank K/V projections, HF config) of a
    model, or of an artifact directory from its manifest and config alone (no weights read)."""
    if isinstance(source, torch.nn.Module):
        found = {
            name: {"rank": m.rank, "out_features": m.out_features}
            for name, m in source.named_modules()
            if isinstance(m, LowRankKVProj)
        }
        return found, source.config
    from transformers import AutoConfig

    from mqc.runtime.artifact import read_manifest

    records = read_manifest(source)["modules"].items()
    found = {name: r["config"] for name, r in records if r["kind"] == LowRankKVProj.kind}
    return found, AutoConfig.from_pretrained(source, local_files_only=True)


def kv_accounting(source: torch.nn.Module | str | os.PathLike, context: int | None = None) -> dict[str, Any] | None:
    """KV-cache bytes per token per attention layer before (fp16 K/V) and after (compressed
    features), and, with ``context``, the bytes of a whole cache of that many tokens (sinks,
    window, features, positions) before and after.

    ``source``: a compiled model or an artifact directory. None when it has no low-rank K/V.
    See the module docstring for what is counted.
    """
    projections, config = _projections(source)
    settings = settings_of(config) if getattr(config, "mqc_kv", None) else None
    if isinstance(settings, QuantKVSettings):
        return quant_kv_accounting(settings, config, context)
    if not projections:
        return None
    attentions: dict[str, dict[str, dict[str, int]]] = {}
    for name, proj in projections.items():
        parent, role = name.rsplit(".", 1)
        attentions.setdefault(parent, {})[role] = proj
    rows = []
    for attention, pair in attentions.items():
        k, v = pair["k_proj"], pair["v_proj"]
        before = (k["out_features"] + v["out_features"]) * FULL_BYTES
        rows.append(
            {
                "attention": attention,
                "k_rank": k["rank"],
                "v_rank": v["rank"],
                "k_width": k["out_features"],
                "v_width": v["out_features"],
                "bytes_per_token_before": before,
                "bytes_per_token_after": settings.feature_bytes(k["rank"]) + settings.feature_bytes(v["rank"]),
                "window_bytes_per_token": before + (k["rank"] + v["rank"]) * FULL_BYTES,
            }
        )
    before = sum(r["bytes_per_token_before"] for r in rows)
    after = sum(r["bytes_per_token_after"] for r in rows)
    result: dict[str, Any] = {
        **asdict(settings),
        "layers": rows,
        "bytes_per_token_before": before,
        "bytes_per_token_after": after,
        "position_bytes_per_token": POSITION_BYTES,
        "reduction": 1.0 - (after + POSITION_BYTES) / before,
    }
    if context is not None:
        sinks = min(context, settings.sinks)
        in_window = min(context - sinks, settings.window)
        compressed = context - sinks - in_window
        total = sum(sinks * r["bytes_per_token_before"] + in_window * r["window_bytes_per_token"] for r in rows)
        total += compressed * after + context * POSITION_BYTES
        result.update(context=context, cache_bytes_before=context * before, cache_bytes_after=total)
        result["reduction_at_context"] = 1.0 - total / (context * before)
    return result


def quant_kv_accounting(settings: QuantKVSettings, config, context: int | None) -> dict[str, Any]:
    """:func:`kv_accounting` of a quantized cache."""
    layers, kv_heads, head_dim = kv_shape(config)
    before = layers * 2 * kv_heads * head_dim * FULL_BYTES
    after = sum(settings.token_bytes(layer, 0, kv_heads, head_dim) for layer in range(layers))
    result: dict[str, Any] = {
        **settings.to_config(),
        "bytes_per_token_before": before,
        "bytes_per_token_after": after,
        "reduction": 1.0 - after / before,
    }
    if context is not None:
        sized = quant_cache_bytes(settings, config, context)
        result.update(sized, reduction_at_context=1.0 - sized["kv_fraction"])
    return result


def kv_summary_lines(accounting: dict[str, Any]) -> list[str]:
    """Human-readable lines of :func:`kv_accounting` for ``mqc compile`` reports and ``mqc inspect``."""
    a = accounting
    if a.get("kind") == QuantKVSettings.kind:
        return _quant_summary_lines(a)
    bits = f"{a['quant_bits']}-bit (g{a['group_size']})" if a["quant_bits"] else "fp16"
    k_ranks = [r["k_rank"] / r["k_width"] for r in a["layers"]]
    v_ranks = [r["v_rank"] / r["v_width"] for r in a["layers"]]
    ranks = (
        f"low-rank KV cache: {len(a['layers'])} layers, K rank {min(k_ranks):.2f}-{max(k_ranks):.2f}, "
        f"V rank {min(v_ranks):.2f}-{max(v_ranks):.2f} of width, {bits} features, "
        f"window {a['window']}, {a['sinks']} sink tokens"
    )
    per_token = (
        f"KV bytes per token (all layers): {a['bytes_per_token_before']:,} fp16 -> "
        f"{a['bytes_per_token_after']:,} + {a['position_bytes_per_token']} position "
        f"({a['reduction']:.1%} smaller beyond the window)"
    )
    lines = [ranks, per_token]
    if "context" in a:
        lines.append(
            f"KV cache at {a['context']:,} tokens: {a['cache_bytes_before'] / 2**20:.2f} MiB -> "
            f"{a['cache_bytes_after'] / 2**20:.2f} MiB ({a['reduction_at_context']:.1%} smaller)"
        )
    return lines


def _quant_summary_lines(a: dict[str, Any]) -> list[str]:
    widths = sorted(set(a["k_bits"])), sorted(set(a["v_bits"]))
    layout = (
        f"quantized KV cache: {len(a['k_bits'])} layers, key bits {widths[0]} (per channel, groups of "
        f"{a['group']} tokens), value bits {widths[1]} (per token, groups of {a['value_group']}), "
        f"window {a['window']}, {a['sinks']} sink tokens"
    )
    per_token = (
        f"KV bytes per token (all layers): {a['bytes_per_token_before']:,} fp16 -> "
        f"{a['bytes_per_token_after']:,.0f} ({a['reduction']:.1%} smaller beyond the window)"
    )
    lines = [layout, per_token]
    if a.get("lower_after") is not None:
        lines.append(
            f"tokens older than {a['window'] + a['lower_after']:,} are lowered to key bits "
            f"{sorted(set(a['k_low']))}, value bits {sorted(set(a['v_low']))}"
        )
    if "context" in a:
        lines.append(
            f"KV cache at {a['context']:,} tokens: {a['cache_bytes_before'] / 2**20:.2f} MiB -> "
            f"{a['cache_bytes_after'] / 2**20:.2f} MiB ({a['reduction_at_context']:.1%} smaller)"
        )
    return lines
