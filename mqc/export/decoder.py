"""The decoder graphs of a Llama-family model (llama, mistral, qwen2, qwen3), fused for onnxruntime.

One builder makes both graphs of an export:

* **prefill**: ``input_ids [B, S]``, ``attention_mask [B, S]`` -> ``logits [B, S, V]`` and the
  initial cache ``present.{i}.key/value [B, kv_heads, S, head_dim]``;
* **decode step** (``model.onnx``): the same plus ``past_key_values.{i}.key/value
  [B, kv_heads, P, head_dim]`` inputs, with ``attention_mask [B, P + S]``. Any ``P`` works,
  0 included, which is how onnxruntime-genai runs its prompt through this graph.

Per layer: ``SkipSimplifiedLayerNormalization`` (residual add + RMSNorm in one op; the first
layer's norm has no residual yet and is written in standard ops that onnxruntime fuses, see
:func:`rms_norm`), the q/k/v projections (one fused ``MatMulNBits`` when their formats agree),
``GroupQueryAttention`` with the rotary embedding applied inside (``do_rotary``; the cos/sin
tables come from the model's own rotary module, so any RoPE scaling it uses is baked in
exactly), the output projection, and the SiLU-gated MLP with gate/up fused. This is the structure
onnxruntime-genai's builder emits. ``GroupQueryAttention``'s CPU kernel takes head sizes that
are multiples of 16 only; other models get the same cache through attention in standard ops
(:mod:`mqc.export.attention`).

Batches: ``GroupQueryAttention`` derives positions and the causal mask from the attention mask's
row sums, so batched prompts must be equal-length (or right-padded; padded rows' logits are then
meaningless), as in onnxruntime-genai.

Low-rank K/V layers (:mod:`mqc.runtime.kv`) have a different cache; see
:mod:`mqc.export.lowrank`, which this builder calls for them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from mqc.errors import UnsupportedModelError
from mqc.export.cache_state import BATCH, PAST, SEQ, TOTAL, CacheState, sliding_window
from mqc.export.attention import HeadShape, causal_bias, heads, new_positions, rope, sdpa
from mqc.export.embedding import emit_embedding
from mqc.export.graph import FLOAT, INT32, INT64, MS_DOMAIN, GraphBuilder, WeightStore, to_numpy
from mqc.export.linear import LinearParts, emit_linear, fuse, linear_parts
from mqc.runtime.modules import QEmbedding

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
GQA_HEAD_MULTIPLE = 16  # GroupQueryAttention's CPU kernel needs head sizes that are multiples of 16
# In the prompt graph (hundreds of rows) int8 activations are slower than float32 ones except
# with groups of 128: 512 x 576 @ 576 x 49152 took 140 / 111 / 91 ms at groups of 32 / 64 / 128
# with int8 activations and 102 to 106 ms with float32 ones (float MatMul: 88 ms; 2 threads,
# AVX-512 VNNI Xeon, onnxruntime 1.32). One row (decode) is 2.3x to 3x faster with int8 at all
# group sizes, so the decode graph keeps the export's level everywhere.
PREFILL_INT8_MIN_GROUP = 128
@dataclass(frozen=True)
class DecoderSpec:
    """The shape facts the graphs need, from the model's config."""

    model_type: str
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_eps: float
    max_positions: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> DecoderSpec:
        config = model.config
        if config.model_type not in FAMILIES:
            raise UnsupportedModelError(
                f"ONNX export supports the {', '.join(FAMILIES)} families; {config.model_type!r} is not one of them"
            )
        if config.hidden_act != "silu":
            raise UnsupportedModelError(f"ONNX export needs a SiLU-gated MLP; this model uses {config.hidden_act!r}")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            config.model_type, config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, head_dim, config.vocab_size, float(config.rms_norm_eps),
            config.max_position_embeddings,
        )  # fmt: skip

    @property
    def uses_gqa(self) -> bool:
        """Whether plain K/V layers use ``GroupQueryAttention`` (else the explicit path)."""
        return self.head_dim % GQA_HEAD_MULTIPLE == 0

    def kv_shape(self, length: str) -> list[int | str]:
        return [BATCH, self.n_kv_heads, length, self.head_dim]


def rotary_tables(model: torch.nn.Module, spec: DecoderSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[max_positions, head_dim / 2]`` from the model's own rotary embedding."""
    positions = torch.arange(spec.max_positions)[None]
    probe = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = model.model.rotary_emb(probe, positions)
    half = spec.head_dim // 2
    return cos[0, :, :half].float(), sin[0, :, :half].float()


def table_name(model: torch.nn.Module) -> str:
    """The stored name of the embedding table: ``lm_head``'s when the two share one tensor."""
    embed, head = model.model.embed_tokens, model.get_output_embeddings()
    if isinstance(embed, QEmbedding):
        return embed.tied_to or "model.embed_tokens"
    return "lm_head" if embed.weight is getattr(head, "weight", None) else "model.embed_tokens"


def rms_norm(g: GraphBuilder, x: str, gamma: str, eps: float) -> str:
    """RMSNorm over the last axis in standard ops, in the exact pattern onnxruntime's optimizer
    fuses into ``SimplifiedLayerNormalization`` (that op is an onnxruntime extension in the
    default domain, which ``onnx.checker`` rejects, so it is not written directly)."""
    mean_square = g.op("ReduceMean", [g.op("Pow", [x, g.const(2.0, dtype="float32")]), g.const([-1])], keepdims=1)
    denominator = g.op("Sqrt", [g.op("Add", [mean_square, g.const(eps, dtype="float32")])])
    return g.op("Mul", [g.op("Div", [x, denominator]), gamma])


@dataclass(frozen=True)
class Positions:
    """int64 positions: of the new tokens ``[S]``, of every key ``[T]``, and ``T`` (scalar)."""

    new: str
    keys: str
    total: str


@dataclass
class Residual:
    """The carried residual stream: the pending sub-layer output and the running sum."""

    pending: str | None
    total: str


class DecoderGraph:
    """Builds the prefill (``with_past=False``) or decode-step graph of one model."""

    def __init__(self, model: torch.nn.Module, weights: WeightStore, accuracy_level: int, with_past: bool):
        self.model, self.spec = model, DecoderSpec.of(model)
        self.accuracy_level, self.with_past = accuracy_level, with_past
        self.g = GraphBuilder("mqc_decode" if with_past else "mqc_prefill", weights)

    # ---------------------------------------------------------------- graph
    def build(self) -> GraphBuilder:
        g, spec, model = self.g, self.spec, self.model
        ids = self.ids = g.add_input("input_ids", INT64, [BATCH, SEQ])
        self.mask = g.add_input("attention_mask", INT64, [BATCH, TOTAL if self.with_past else SEQ])
        self._mask_lengths()
        cos, sin = rotary_tables(model, spec)
        self.cos = g.weight("rotary.cos_cache", to_numpy(cos), derived=True)
        self.sin = g.weight("rotary.sin_cache", to_numpy(sin), derived=True)
        lm_head = model.get_output_embeddings()
        h = emit_embedding(g, ids, model.model.embed_tokens, table_name(model))
        stream = Residual(None, h)
        for i, layer in enumerate(model.model.layers):
            with g.scope(f"layers.{i}"):
                x = self._norm(stream, layer.input_layernorm, f"model.layers.{i}.input_layernorm")
                stream.pending = self._attention(i, layer.self_attn, x)
                x = self._norm(stream, layer.post_attention_layernorm, f"model.layers.{i}.post_attention_layernorm")
                stream.pending = self._mlp(i, layer.mlp, x)
        x = self._norm(stream, model.model.norm, "model.norm")
        logits = self.linear(x, linear_parts("lm_head", lm_head))
        g.add_output(logits, "logits", FLOAT, [BATCH, SEQ, spec.vocab_size])
        return g

    def _mask_lengths(self) -> None:
        """``seqlens_k = rowsum(mask) - 1`` (int32 [B]) and the total length (int32 scalar),
        as ``GroupQueryAttention`` takes them."""
        g = self.g
        with g.scope("attn_mask"):
            rows = g.op("ReduceSum", [self.mask, g.const([1])], keepdims=0)
            self.seqlens_k = g.op("Cast", [g.op("Sub", [rows, g.const(1)])], to=INT32)
            total = g.op("Gather", [g.op("Shape", [self.mask]), g.const(1)], axis=0)
            self.total_len = g.op("Cast", [total], to=INT32)

    def _norm(self, stream: Residual, norm: torch.nn.Module, name: str) -> str:
        """RMSNorm of the stream after adding its pending output (fused skip-norm)."""
        g, eps = self.g, self.spec.rms_eps
        gamma = g.float_weight(f"{name}.weight", norm.weight)
        with g.scope(name.rsplit(".", 1)[-1]):
            if stream.pending is None:
                return rms_norm(g, stream.total, gamma, eps)
            out, total = g.op("SkipSimplifiedLayerNormalization", [stream.pending, stream.total, gamma],
                              outputs=4, domain=MS_DOMAIN, epsilon=eps)[0::3]  # fmt: skip
            stream.pending, stream.total = None, total
            return out

    def linear(self, x: str, parts: LinearParts) -> str:
        return emit_linear(self.g, x, parts, self.level(parts))

    def level(self, parts: LinearParts) -> int:
        """``MatMulNBits``' activation type for a layer: the export's in the decode graph; in the
        prompt graph int8 activations only where they are faster on many rows, see
        :data:`PREFILL_INT8_MIN_GROUP`."""
        if self.with_past or parts.packed is None or parts.packed.group_size >= PREFILL_INT8_MIN_GROUP:
            return self.accuracy_level
        return 0

    # ---------------------------------------------------------------- attention
    def _attention(self, i: int, attn: torch.nn.Module, x: str) -> str:
        from mqc.runtime.kv import LowRankKVProj

        if isinstance(attn.k_proj, LowRankKVProj):
            from mqc.export.lowrank import emit_lowrank_attention

            out = emit_lowrank_attention(self, i, attn, x)
        elif self.spec.uses_gqa:
            out = self._gqa(i, attn, x)
        else:
            out = self._explicit_attention(i, attn, x)
        return self.linear(out, linear_parts(f"model.layers.{i}.self_attn.o_proj", attn.o_proj))

    def head_shape(self, attn: torch.nn.Module) -> HeadShape:
        return HeadShape(self.spec.n_heads, self.spec.n_kv_heads, self.spec.head_dim, float(attn.scaling))

    def qkv(self, i: int, attn: torch.nn.Module, x: str, packed: bool) -> tuple[str, str, str]:
        """Projected q, k, v with Qwen3's per-head q/k norms. One fused projection when the three
        formats agree; with ``packed`` its output is returned as q (k, v empty), else split."""
        prefix = f"model.layers.{i}.self_attn"
        parts = [linear_parts(f"{prefix}.{p}_proj", getattr(attn, f"{p}_proj")) for p in "qkv"]
        has_qk_norm = getattr(attn, "q_norm", None) is not None
        fused = None if has_qk_norm else fuse(f"{prefix}.qkv_proj", parts)
        if fused is not None:
            qkv = self.linear(x, fused)
            if packed:
                return qkv, "", ""
            return tuple(self.g.op("Split", [qkv, self.g.const([p.out_features for p in parts])], outputs=3, axis=-1))
        q, k, v = (self.linear(x, p) for p in parts)
        if has_qk_norm:
            q = self.head_norm(q, attn.q_norm, f"{prefix}.q_norm", self.spec.n_heads)
            k = self.head_norm(k, attn.k_norm, f"{prefix}.k_norm", self.spec.n_kv_heads)
        return q, k, v

    def head_norm(self, x: str, norm: torch.nn.Module, name: str, heads: int) -> str:
        """RMSNorm over each head of ``x [B, S, heads * d]``."""
        g, d = self.g, self.spec.head_dim
        split = g.op("Reshape", [x, g.const([0, 0, heads, d])])
        return g.op("Reshape", [self.last_axis_norm(split, norm, name), g.const([0, 0, heads * d])])

    def last_axis_norm(self, x: str, norm: torch.nn.Module, name: str) -> str:
        """RMSNorm of ``x`` over its last axis with ``norm``'s weight (Qwen3's per-head norms)."""
        with self.g.scope(name.rsplit(".", 1)[-1]):
            return rms_norm(self.g, x, self.g.float_weight(f"{name}.weight", norm.weight), self.spec.rms_eps)

    def query(self, i: int, attn: torch.nn.Module, x: str) -> str:
        """The projected (and, for Qwen3, normed) queries ``[B, S, H * d]`` alone."""
        prefix = f"model.layers.{i}.self_attn"
        q = self.linear(x, linear_parts(f"{prefix}.q_proj", attn.q_proj))
        if getattr(attn, "q_norm", None) is not None:
            q = self.head_norm(q, attn.q_norm, f"{prefix}.q_norm", self.spec.n_heads)
        return q

    def kv_state(self, name: str) -> CacheState:
        """The plain K/V cache tensor ``past_key_values.{name}`` / ``present.{name}``."""
        return CacheState(name, self.spec.kv_shape(PAST), self.spec.kv_shape(TOTAL if self.with_past else SEQ))

    def past_state(self, state: CacheState) -> str:
        """The state's past-cache graph input (decode graph), or "" (prefill graph)."""
        if not self.with_past:
            return ""
        return self.g.add_input(f"past_key_values.{state.name}", state.elem_type, state.past_shape)

    def present_state(self, state: CacheState, value: str) -> None:
        """Expose ``value`` as the state's graph output ``present.{name}``."""
        self.g.add_output(value, f"present.{state.name}", state.elem_type, state.present_shape)

    def with_past_state(self, state: CacheState, new: str, axis: int) -> str:
        """``new`` after the past state along ``axis`` (just ``new`` in the prefill graph)."""
        past = self.past_state(state)
        return self.g.op("Concat", [past, new], axis=axis) if past else new

    @functools.cached_property
    def positions(self) -> Positions:
        """Positions of the new tokens and of all keys (no left padding)."""
        g = self.g
        with g.scope("positions"):
            new, _, total = new_positions(g, self.ids, self.mask)
            return Positions(new, g.op("Range", [g.const(0), total, g.const(1)]), total)

    @functools.cache  # noqa: B019  (one builder per graph; cached per window)
    def bias(self, window: int | None) -> str:
        """The causal (sliding-window) additive mask of the explicit attention path."""
        with self.g.scope("causal_mask"):
            return causal_bias(self.g, self.positions.new, self.positions.keys, self.mask, window)

    def rope(self, x: str, positions: str | None = None) -> str:
        """RoPE of ``x [B, heads, S, d]`` at ``positions`` (default: the new tokens')."""
        positions = self.positions.new if positions is None else positions
        return rope(self.g, x, self.cos, self.sin, positions, self.spec.head_dim // 2)

    def _gqa(self, i: int, attn: torch.nn.Module, x: str) -> str:
        g, spec = self.g, self.spec
        q, k, v = self.qkv(i, attn, x, packed=True)
        window = sliding_window(self.model, attn)
        key, value = self.kv_state(f"{i}.key"), self.kv_state(f"{i}.value")
        inputs = [q, k, v, self.past_state(key), self.past_state(value),
                  self.seqlens_k, self.total_len, self.cos, self.sin]  # fmt: skip
        with g.scope("attn"):
            out, present_k, present_v = g.op(
                "GroupQueryAttention", inputs, outputs=3, domain=MS_DOMAIN,
                num_heads=spec.n_heads, kv_num_heads=spec.n_kv_heads, scale=float(attn.scaling),
                do_rotary=1, rotary_interleaved=0, local_window_size=-1 if window is None else window,
            )  # fmt: skip
        self.present_state(key, present_k)
        self.present_state(value, present_v)
        return out

    def _explicit_attention(self, i: int, attn: torch.nn.Module, x: str) -> str:
        """Attention in standard ops (see :mod:`mqc.export.attention`), same cache as GQA's."""
        g, shape = self.g, self.head_shape(attn)
        q, k, v = self.qkv(i, attn, x, packed=False)
        with g.scope("attn"):
            q = self.rope(heads(g, q, shape.n_heads, shape.head_dim))
            key, value = self.kv_state(f"{i}.key"), self.kv_state(f"{i}.value")
            keys = self.with_past_state(key, self.rope(heads(g, k, shape.kv_heads, shape.head_dim)), axis=2)
            values = self.with_past_state(value, heads(g, v, shape.kv_heads, shape.head_dim), axis=2)
            out = sdpa(g, q, keys, values, self.bias(sliding_window(self.model, attn)), shape)
        self.present_state(key, keys)
        self.present_state(value, values)
        return out

    # ---------------------------------------------------------------- mlp
    def _mlp(self, i: int, mlp: torch.nn.Module, x: str) -> str:
        g, prefix = self.g, f"model.layers.{i}.mlp"
        gate_parts, up_parts = (linear_parts(f"{prefix}.{p}_proj", getattr(mlp, f"{p}_proj")) for p in ("gate", "up"))
        fused = fuse(f"{prefix}.gate_up_proj", [gate_parts, up_parts])
        if fused is not None:
            width = gate_parts.out_features
            gate, up = g.op("Split", [self.linear(x, fused), g.const([width, width])], outputs=2, axis=-1)
        else:
            gate, up = self.linear(x, gate_parts), self.linear(x, up_parts)
        with g.scope("mlp"):
            hidden = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
        return self.linear(hidden, linear_parts(f"{prefix}.down_proj", mlp.down_proj))
