"""Attention in standard ONNX ops: rotary embedding, masks, grouped scaled-dot-product attention.

``GroupQueryAttention`` is the fast path, but it needs a head size that is a multiple of 16 and a
plain causal cache. This module is the path for everything else, written so that it computes what
Hugging Face's SDPA attention computes, in the same order where it matters:

* RoPE as ``x * cos + rotate_half(x) * sin`` with the model's own cos/sin tables;
* grouped heads without copying K/V: queries ``[B, kv_heads, groups, S, d]`` against keys
  ``[B, kv_heads, 1, T, d]`` (query head ``h`` reads K/V head ``h // groups``, like ``repeat_kv``);
* an additive mask from the key positions, the query positions, the sliding window and the
  attention mask (masked entries get float32's lowest value, as in transformers, so that a fully
  masked row stays finite).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mqc.export.graph import BOOL, GraphBuilder

NEG = float(np.finfo(np.float32).min)


@dataclass(frozen=True)
class HeadShape:
    """Attention heads of a layer: query heads, K/V heads, head size, softmax scale."""

    n_heads: int
    kv_heads: int
    head_dim: int
    scale: float

    @property
    def groups(self) -> int:
        return self.n_heads // self.kv_heads


def new_positions(g: GraphBuilder, ids: str, mask: str) -> tuple[str, str, str]:
    """(positions of the new tokens ``[S]``, past length, total length) as int64, from the shapes
    of ``input_ids [B, S]`` and ``attention_mask [B, P + S]`` (no left padding)."""
    total = g.op("Gather", [g.op("Shape", [mask]), g.const(1)], axis=0)
    new = g.op("Gather", [g.op("Shape", [ids]), g.const(1)], axis=0)
    past = g.op("Sub", [total, new])
    return g.op("Range", [past, total, g.const(1)]), past, total


def rope(g: GraphBuilder, x: str, cos: str, sin: str, positions: str, half: int) -> str:
    """``x * cos + rotate_half(x) * sin`` for ``x [B, heads, S, d]`` at ``positions [S]``;
    ``cos``/``sin`` are the ``[max_positions, d/2]`` tables (duplicated to ``d`` here)."""
    cos_p = g.op("Gather", [cos, positions], axis=0)  # [S, d/2]
    sin_p = g.op("Gather", [sin, positions], axis=0)
    cos_full = g.op("Concat", [cos_p, cos_p], axis=-1)
    sin_full = g.op("Concat", [sin_p, sin_p], axis=-1)
    first, second = g.op("Split", [x, g.const([half, half])], outputs=2, axis=-1)
    rotated = g.op("Concat", [g.op("Neg", [second]), first], axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos_full]), g.op("Mul", [rotated, sin_full])])


def heads(g: GraphBuilder, x: str, n_heads: int, head_dim: int) -> str:
    """``[B, S, n * d]`` -> ``[B, n, S, d]``."""
    return g.op("Transpose", [g.op("Reshape", [x, g.const([0, 0, n_heads, head_dim])])], perm=[0, 2, 1, 3])


def causal_bias(
    g: GraphBuilder,
    q_positions: str,
    k_positions: str,
    mask: str | None = None,
    window: int | None = None,
    min_distance: int | None = None,
    min_key: int | None = None,
) -> str:
    """Additive mask ``[B or 1, 1, 1, S, T]``: 0 where query ``q`` may see key ``k``, else NEG.

    Visible: ``k <= q``; and ``q - k < window`` (sliding window, or the exact window of a
    low-rank cache); ``q - k >= min_distance`` (the rebuilt copies of a low-rank cache);
    ``k >= min_key`` (keys past the attention sinks); the attention mask is 1 at ``k``
    (``mask`` is indexed by key position, so only for keys ``[0, T)`` in order).
    """
    q = g.op("Unsqueeze", [q_positions, g.const([1])])  # [S, 1]
    k = g.op("Unsqueeze", [k_positions, g.const([0])])  # [1, T]
    distance = g.op("Sub", [q, k])  # [S, T]: q - k
    visible = g.op("GreaterOrEqual", [distance, g.const(0)])
    conditions = [
        (window, lambda: g.op("Less", [distance, g.const(window)])),
        (min_distance, lambda: g.op("GreaterOrEqual", [distance, g.const(min_distance)])),
        (min_key, lambda: g.op("GreaterOrEqual", [k, g.const(min_key)])),
    ]
    for value, condition in conditions:
        if value is not None:
            visible = g.op("And", [visible, condition()])
    if mask is not None:
        padding = g.op("Cast", [g.op("Unsqueeze", [mask, g.const([1])])], to=BOOL)  # [B, 1, T]
        visible = g.op("And", [visible, padding])  # [B, S, T]
    else:
        visible = g.op("Unsqueeze", [visible, g.const([0])])
    bias = g.op("Where", [visible, g.const(0.0, dtype="float32"), g.const(NEG, dtype="float32")])
    return g.op("Unsqueeze", [bias, g.const([1, 2])])  # [B, 1, 1, S, T]


def grouped_scores(g: GraphBuilder, q: str, keys: str, shape: HeadShape) -> str:
    """``scale * q k^T`` as ``[B, kv_heads, groups, S, T]`` for ``q [B, H, S, d]``, ``keys [B, kv, T, d]``."""
    q5 = g.op("Reshape", [q, g.const([0, shape.kv_heads, shape.groups, -1, shape.head_dim])])
    k5 = g.op("Unsqueeze", [g.op("Transpose", [keys], perm=[0, 1, 3, 2]), g.const([2])])
    return g.op("Mul", [g.op("MatMul", [q5, k5]), g.const(shape.scale, dtype="float32")])


def attend(g: GraphBuilder, probs: str, values: str) -> str:
    """``probs [B, kv, groups, S, T] @ values [B, kv, T, d]`` -> ``[B, kv, groups, S, d]``."""
    return g.op("MatMul", [probs, g.op("Unsqueeze", [values, g.const([2])])])


def merge_heads(g: GraphBuilder, out5: str, shape: HeadShape) -> str:
    """``[B, kv, groups, S, d]`` -> ``[B, S, H * d]``."""
    out = g.op("Transpose", [out5], perm=[0, 3, 1, 2, 4])
    return g.op("Reshape", [out, g.const([0, 0, shape.n_heads * shape.head_dim])])


def sdpa(g: GraphBuilder, q: str, keys: str, values: str, bias: str, shape: HeadShape) -> str:
    """Softmax attention of post-RoPE ``q [B, H, S, d]`` over ``keys``/``values [B, kv, T, d]``;
    returns ``[B, S, H * d]``."""
    scores = g.op("Add", [grouped_scores(g, q, keys, shape), bias])
    return merge_heads(g, attend(g, g.op("Softmax", [scores], axis=-1), values), shape)
