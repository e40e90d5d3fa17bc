"""The low-rank K/V cache (CSKV, :mod:`mqc.runtime.kv`) as graph state.

The runtime keeps, per layer, the exact post-RoPE K/V of the first ``sinks`` tokens (attention
sinks) and of the last ``window`` tokens, and for the tokens in between only their features
``c = A x`` (fp16), rebuilding their K/V as ``B c + b`` (then ``k_norm`` where the family has one,
then RoPE at each token's position). A query at position ``t`` sees a sink exactly, and any
other key ``s`` rebuilt when ``t - s >= window``, exact otherwise.

The exported decode step carries the same information as six state tensors per layer::

    past_key_values.{i}.sink_key / .sink_value      [B, kv_heads, <= sinks, head_dim]   exact
    past_key_values.{i}.key / .value                [B, kv_heads, <= window, head_dim]  exact
    past_key_values.{i}.key_features / .value_features      [B, P, rank]   fp16, every token

Features are kept for every token, sinks and the ``window`` newest included (the runtime holds
the latter as "pending" features until they leave the window): that costs ``(sinks + window) *
rank`` fp16 numbers per layer and keeps the step graph a pure function of its state. Each step
rebuilds K/V of all ``T`` tokens from the features and attends over ``[sinks; window; rebuilt]``
with one additive mask that picks, for each query and token, the one copy the runtime would use.
So a multi-token forward (prefill) computes the runtime's banded attention, and a decode step its
sectioned attention. Attention is in standard ops (:mod:`mqc.export.attention`):
``GroupQueryAttention`` cannot mix two copies of the keys.

Not exported: a quantized compressed branch (``kv.quant_bits``), which would need mqc's
per-token quantizer inside the graph; such models raise :class:`UnsupportedModelError`. Rows must
be unpadded (equal-length prompts).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mqc.errors import UnsupportedModelError
from mqc.export.attention import HeadShape, causal_bias, heads, sdpa
from mqc.export.cache_state import BATCH, PAST, SEQ, TOTAL, CacheState, sliding_window
from mqc.export.graph import FLOAT, FLOAT16
from mqc.export.linear import LinearParts, fuse, linear_parts
from mqc.runtime.kv import KVSettings

if TYPE_CHECKING:  # the decoder graph calls this module; this module only names its type
    from mqc.export.decoder import DecoderGraph

INT64_MAX = torch.iinfo(torch.int64).max


class LowRankLayer:
    """Emits one compressed attention layer into a decoder graph."""

    def __init__(self, d: DecoderGraph, i: int, attn: torch.nn.Module):
        self.settings = KVSettings.of(d.model.config)
        if self.settings.quant_bits is not None:
            raise UnsupportedModelError(
                "ONNX export of a quantized low-rank KV branch is not supported; compile with kv quant_bits unset"
            )
        self.d, self.g, self.i, self.attn = d, d.g, i, attn
        self.prefix = f"model.layers.{i}.self_attn"
        self.shape: HeadShape = d.head_shape(attn)

    # ---------------------------------------------------------------- state
    def _exact_state(self, name: str, limit: str) -> CacheState:
        spec = self.d.spec
        return CacheState(f"{self.i}.{name}", spec.kv_shape(f"past_{limit}"), spec.kv_shape(limit))

    def _feature_state(self, name: str, rank: int) -> CacheState:
        present = TOTAL if self.d.with_past else SEQ
        return CacheState(f"{self.i}.{name}", [BATCH, PAST, rank], [BATCH, present, rank], FLOAT16)

    def _carry(self, state: CacheState, new: str, axis: int, keep: tuple[int, int] | None = None) -> tuple[str, str]:
        """(past state + ``new`` along ``axis``, its slice ``keep``): the slice (all of it if
        None) becomes the present state."""
        g = self.g
        full = self.d.with_past_state(state, new, axis)
        present = (
            full if keep is None else g.op("Slice", [full, g.const([keep[0]]), g.const([keep[1]]), g.const([axis])])
        )
        self.d.present_state(state, present)
        return full, present

    # ---------------------------------------------------------------- graph
    def _projections(self, x: str) -> tuple[str, str, str, str]:
        """Exact k, exact v and the features ``A_k x``, ``A_v x``: one fused float MatMul."""
        k, v = self.attn.k_proj, self.attn.v_proj
        parts = [
            linear_parts(f"{self.prefix}.k_proj", k),
            linear_parts(f"{self.prefix}.v_proj", v),
            LinearParts(f"{self.prefix}.k_proj.down", k.rank, k.in_features, weight=k.down.detach()),
            LinearParts(f"{self.prefix}.v_proj.down", v.rank, v.in_features, weight=v.down.detach()),
        ]
        fused = self.d.linear(x, fuse(f"{self.prefix}.kv_lowrank_proj", parts))
        widths = [p.out_features for p in parts]
        return tuple(self.g.op("Split", [fused, self.g.const(widths)], outputs=4, axis=-1))

    def _keys(self, flat: str, positions: str) -> str:
        """``[B, T, kv * d]`` -> post-(k_norm, RoPE) keys ``[B, kv, T, d]``."""
        keys = heads(self.g, flat, self.shape.kv_heads, self.shape.head_dim)
        if getattr(self.attn, "k_norm", None) is not None:
            keys = self.d.last_axis_norm(keys, self.attn.k_norm, f"{self.prefix}.k_norm")
        return self.d.rope(keys, positions)

    def _rebuild(self, features: str, proj: torch.nn.Module, name: str) -> str:
        """``B c + b`` of every token from its fp16 features: ``[B, T, out]``."""
        bias = None if proj.bias is None else proj.bias.detach()
        up = LinearParts(f"{self.prefix}.{name}.up", proj.out_features, proj.rank, weight=proj.up.detach(), bias=bias)
        return self.d.linear(self.g.op("Cast", [features], to=FLOAT), up)

    def _positions_of(self, tensor: str) -> str:
        """Positions of the newest ``tensor.shape[2]`` tokens of ``[0, T)``."""
        g, total = self.g, self.d.positions.total
        length = g.op("Gather", [g.op("Shape", [tensor]), g.const(2)], axis=0)
        return g.op("Range", [g.op("Sub", [total, length]), total, g.const(1)])

    def emit(self, x: str) -> str:
        g, d, shape, settings = self.g, self.d, self.shape, self.settings
        q = d.query(self.i, self.attn, x)
        k_new, v_new, c_k, c_v = self._projections(x)
        with g.scope("attn"):
            q = d.rope(heads(g, q, shape.n_heads, shape.head_dim))
            k_new = self._keys(k_new, d.positions.new)
            v_new = heads(g, v_new, shape.kv_heads, shape.head_dim)
            sinks = settings.sinks
            _, sink_k = self._carry(self._exact_state("sink_key", "sinks"), k_new, 2, keep=(0, sinks))
            _, sink_v = self._carry(self._exact_state("sink_value", "sinks"), v_new, 2, keep=(0, sinks))
            window_k, _ = self._carry(self._exact_state("key", "window"), k_new, 2, keep=(-settings.window, INT64_MAX))
            window_v, _ = self._carry(
                self._exact_state("value", "window"), v_new, 2, keep=(-settings.window, INT64_MAX)
            )
            feats_k, _ = self._carry(
                self._feature_state("key_features", self.attn.k_proj.rank), g.op("Cast", [c_k], to=FLOAT16), 1
            )
            feats_v, _ = self._carry(
                self._feature_state("value_features", self.attn.v_proj.rank), g.op("Cast", [c_v], to=FLOAT16), 1
            )
            all_positions = d.positions.keys
            rebuilt_k = self._keys(self._rebuild(feats_k, self.attn.k_proj, "k_proj"), all_positions)
            rebuilt_v = heads(g, self._rebuild(feats_v, self.attn.v_proj, "v_proj"), shape.kv_heads, shape.head_dim)
            keys = g.op("Concat", [sink_k, window_k, rebuilt_k], axis=2)
            values = g.op("Concat", [sink_v, window_v, rebuilt_v], axis=2)
            return sdpa(g, q, keys, values, self._bias(sink_k, window_k), shape)

    def _bias(self, sink_k: str, window_k: str) -> str:
        """One mask over ``[sinks; window; rebuilt]``: sinks exactly; other tokens exactly when
        less than ``window`` before the query, rebuilt otherwise; all under the model's own
        causal / sliding-window rule."""
        g, new = self.g, self.d.positions.new
        sliding, window, sinks = sliding_window(self.d.model, self.attn), self.settings.window, self.settings.sinks
        exact_limit = window if sliding is None else min(window, sliding)
        return g.op("Concat", [
            causal_bias(g, new, self._sink_positions(sink_k), window=sliding),
            causal_bias(g, new, self._positions_of(window_k), window=exact_limit, min_key=sinks),
            causal_bias(g, new, self.d.positions.keys, window=sliding, min_distance=window, min_key=sinks),
        ], axis=-1)  # fmt: skip

    def _sink_positions(self, sink_k: str) -> str:
        """Positions ``[0, len(sinks))`` of the sink keys."""
        g = self.g
        length = g.op("Gather", [g.op("Shape", [sink_k]), g.const(2)], axis=0)
        return g.op("Range", [g.const(0), length, g.const(1)])


def emit_lowrank_attention(d: DecoderGraph, i: int, attn: torch.nn.Module, x: str) -> str:
    """Attention of layer ``i`` over its low-rank cache; returns ``[B, S, H * d]``."""
    return LowRankLayer(d, i, attn).emit(x)
