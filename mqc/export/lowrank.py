"""The low-rank K/V cache (CSKV, :mod:`mqc.runtime.kv`) as graph state.

The runtime keeps, per layer, the exact post-RoPE K/V of the last ``window`` tokens and, for
older tokens, only the features ``c = A x`` (fp16), rebuilding their K/V as ``B c + b`` (then
``k_norm`` where the family has one, then RoPE at each token's position). A query at position
``t`` sees key ``s`` rebuilt when ``t - s >= window`` and exact otherwise.

The exported decode step carries the same information as four state tensors per layer::

    past_key_values.{i}.key / .value                [B, kv_heads, w, head_dim]  exact, w <= window
    past_key_values.{i}.key_features / .value_features    [B, P, rank]  fp16, every past token

Features are kept for every token, the ``window`` newest included (the runtime holds those as
"pending" features until they leave the window): that costs ``window * rank`` fp16 numbers per
layer and makes the step graph stateless apart from these tensors. Each step rebuilds K/V of
all ``T`` tokens from the features (as the runtime does for the tokens it needs) and attends
over ``[exact window; rebuilt]`` with one additive mask that selects, for each query, the exact
copy of a key inside the window and the rebuilt copy outside it. A multi-token forward (prefill)
thereby computes exactly the runtime's banded attention, and one decode step its two-section
attention. Attention is in standard ops (:mod:`mqc.export.attention`): ``GroupQueryAttention``
has no way to mix two copies of the keys.

Not exported: a quantized compressed branch (``kv.quant_bits``), which would need mqc's
per-token quantizer inside the graph; such models raise :class:`UnsupportedModelError`.
Batches must be unpadded (equal-length prompts).
"""

from __future__ import annotations

import torch

from mqc.errors import UnsupportedModelError
from mqc.export.attention import causal_bias, heads, sdpa
from mqc.export.decoder import BATCH, PAST, SEQ, TOTAL, CacheState, DecoderGraph, sliding_window
from mqc.export.graph import FLOAT, FLOAT16
from mqc.export.linear import LinearParts, fuse, linear_parts
from mqc.runtime.kv import KVSettings

WINDOW_PAST, WINDOW_PRESENT = "past_window_length", "window_length"


def _branches(prefix: str, attn: torch.nn.Module) -> LinearParts:
    """Exact k, exact v, then the down projections ``A_k``, ``A_v``: one fused float MatMul."""
    k, v = attn.k_proj, attn.v_proj
    parts = [
        linear_parts(f"{prefix}.k_proj", k),
        linear_parts(f"{prefix}.v_proj", v),
        LinearParts(f"{prefix}.k_proj.down", k.rank, k.in_features, weight=k.down.detach()),
        LinearParts(f"{prefix}.v_proj.down", v.rank, v.in_features, weight=v.down.detach()),
    ]
    return fuse(f"{prefix}.kv_lowrank_proj", parts)


def emit_lowrank_attention(d: DecoderGraph, i: int, attn: torch.nn.Module, x: str) -> str:
    """Attention of layer ``i`` over its low-rank cache; returns ``[B, S, H * d]``."""
    settings = KVSettings.of(d.model.config)
    if settings.quant_bits is not None:
        raise UnsupportedModelError(
            "ONNX export of a quantized low-rank KV branch is not supported; compile with kv quant_bits unset"
        )
    g, spec, shape = d.g, d.spec, d.head_shape(attn)
    prefix = f"model.layers.{i}.self_attn"
    q = d.query(i, attn, x)
    k_proj, v_proj = attn.k_proj, attn.v_proj
    kv_width = spec.n_kv_heads * spec.head_dim
    k_new, v_new, c_k, c_v = g.op(
        "Split", [d.linear(x, _branches(prefix, attn)), g.const([kv_width, kv_width, k_proj.rank, v_proj.rank])],
        outputs=4, axis=-1,
    )  # fmt: skip
    with g.scope("attn"):
        k_new = heads(g, k_new, shape.kv_heads, shape.head_dim)
        if getattr(attn, "k_norm", None) is not None:
            k_new = d.last_axis_norm(k_new, attn.k_norm, f"{prefix}.k_norm")
        q = d.rope(heads(g, q, shape.n_heads, shape.head_dim))
        # exact window: past window + new tokens, post-RoPE
        window_k = d.with_past_state(_window_state(d, f"{i}.key"), d.rope(k_new), axis=2)
        window_v = d.with_past_state(_window_state(d, f"{i}.value"), heads(g, v_new, shape.kv_heads, shape.head_dim), axis=2)
        # features of every token, fp16 as the runtime stores them; rebuilt K/V of every token
        feats_k = d.with_past_state(_feature_state(d, f"{i}.key_features", k_proj.rank), g.op("Cast", [c_k], to=FLOAT16), axis=1)
        feats_v = d.with_past_state(_feature_state(d, f"{i}.value_features", v_proj.rank), g.op("Cast", [c_v], to=FLOAT16), axis=1)
        rebuilt_k, rebuilt_v = _rebuild(d, prefix, attn, feats_k, feats_v)
        exact_positions, all_positions = _key_positions(d, window_k)
        window = sliding_window(d.model, attn)
        exact_limit = settings.window if window is None else min(window, settings.window)
        new_positions = d.positions.new
        bias = g.op("Concat", [
            causal_bias(g, new_positions, exact_positions, None, exact_limit),
            causal_bias(g, new_positions, all_positions, None, window, rebuilt_window=settings.window),
        ], axis=-1)  # fmt: skip
        keys = g.op("Concat", [window_k, rebuilt_k], axis=2)
        values = g.op("Concat", [window_v, rebuilt_v], axis=2)
        out = sdpa(g, q, keys, values, bias, shape)
        keep = [g.const([-settings.window]), g.const([torch.iinfo(torch.int64).max]), g.const([2])]
        d.present_state(_window_state(d, f"{i}.key"), g.op("Slice", [window_k, *keep]))
        d.present_state(_window_state(d, f"{i}.value"), g.op("Slice", [window_v, *keep]))
        d.present_state(_feature_state(d, f"{i}.key_features", k_proj.rank), feats_k)
        d.present_state(_feature_state(d, f"{i}.value_features", v_proj.rank), feats_v)
    return out


def _window_state(d: DecoderGraph, name: str) -> CacheState:
    spec = d.spec
    return CacheState(name, spec.kv_shape(WINDOW_PAST), spec.kv_shape(WINDOW_PRESENT))


def _feature_state(d: DecoderGraph, name: str, rank: int) -> CacheState:
    return CacheState(name, [BATCH, PAST, rank], [BATCH, TOTAL if d.with_past else SEQ, rank], FLOAT16)


def _rebuild(d: DecoderGraph, prefix: str, attn: torch.nn.Module, feats_k: str, feats_v: str) -> tuple[str, str]:
    """Post-RoPE K and V ``[B, kv, T, d]`` of every token from its fp16 features."""
    g, spec = d.g, d.spec
    out = []
    for name, proj, feats in (("k_proj", attn.k_proj, feats_k), ("v_proj", attn.v_proj, feats_v)):
        up = LinearParts(f"{prefix}.{name}.up", proj.out_features, proj.rank, weight=proj.up.detach(),
                         bias=None if proj.bias is None else proj.bias.detach())  # fmt: skip
        out.append(heads(g, d.linear(g.op("Cast", [feats], to=FLOAT), up), spec.n_kv_heads, spec.head_dim))
    keys, values = out
    if getattr(attn, "k_norm", None) is not None:
        keys = d.last_axis_norm(keys, attn.k_norm, f"{prefix}.k_norm")
    return d.rope(keys, d.positions.keys), values


def _key_positions(d: DecoderGraph, window_k: str) -> tuple[str, str]:
    """(positions of the exact window keys, positions of all keys): the window holds the
    newest ``len(window)`` tokens of ``[0, T)``."""
    g, positions = d.g, d.positions
    length = g.op("Gather", [g.op("Shape", [window_k]), g.const(2)], axis=0)
    return g.op("Range", [g.op("Sub", [positions.total, length]), positions.total, g.const(1)]), positions.keys
