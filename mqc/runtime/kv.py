"""Low-rank KV cache runtime (CSKV): a bi-branch cache of exact recent tokens and low-rank old ones.

A compiled model keeps Hugging Face's attention code; mqc hooks into the four places that code
offers, and nowhere else:

1. **Projections.** Each layer's ``k_proj``/``v_proj`` becomes a :class:`LowRankKVProj`. Its
   output is the *exact* projection ``W x + b`` (the window branch, as in CSKV), and it leaves the
   low-rank features ``c = A x`` of the same tokens in ``proj.features`` for the cache to take.
2. **Cache.** :class:`LowRankKVCache` keeps, per layer, the exact post-RoPE K/V of each row's
   first ``sinks`` tokens and of the last ``window`` tokens (the latter with their features,
   waiting to be compressed), and the features of every token in between, in fp16 or
   group-quantized per token to 2/4/8 bits with :mod:`mqc.quant`. Those K/V are rebuilt as
   ``B c + b`` (then ``k_norm`` where the family has one, then RoPE at each token's own
   position). ``update`` returns three runs of keys: exact head (the sinks), rebuilt middle,
   exact recent tokens (see :class:`Sections`).
3. **Mask.** The attention mask function registered under :data:`ATTN_IMPLEMENTATION` lets a
   query at position ``t`` see a middle key ``s`` *rebuilt* when ``t - s >= window`` and *exact*
   otherwise, and the sinks exact. Decoding one token without padding, the runs do not overlap
   and this is the ordinary causal mask; for a multi-token forward (prefill, perplexity) every
   query sees exactly what it would have seen decoding token by token, so one forward measures
   compressed decoding.
4. **Cache installation.** A forward pre-hook on the model swaps the default (empty) cache for a
   :class:`LowRankKVCache` and records the forward's position ids, so ``model(...)`` and
   ``model.generate(...)`` use the compressed cache without the caller passing anything.

The sinks are an addition to CSKV (StreamingLLM's attention sinks): the first tokens of a
sequence draw a large share of the attention of every later query, and their K/V, unlike typical
tokens', are poorly reconstructed by factors fitted on typical tokens. On SmolLM2 at rank 0.5,
keeping 4 of them exact lowered perplexity from 25.6 to 24.9 (base 23.9) untrained, and from
28.5 to 24.8 with reconstruction training, which without them made perplexity worse (2048 Brown
evaluation tokens at context 1024). They are counted after a row's left padding, so a padded
batch generates what each of its rows generates alone.

Without a cache (``use_cache=False``) the model computes exact attention: every token is then in
the window. Settings shared by all layers (window, sinks, feature bits and group size) live in
``model.config.mqc_kv``, which is saved in the artifact's ``config.json``; the ranks live in each
projection's runtime-module config.

Accounting (:func:`kv_accounting`) counts full-precision K/V at 16 bits per element (the
deployment dtype; the CPU runtime computes in float32), compressed features at their stored size
(:func:`mqc.quant.weight_bytes` of one row per token), and 4 bytes per token for the positions
that RoPE needs when rebuilding (one int32 per token for the whole model).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, prepare_padding_mask, sdpa_mask
from transformers.models.llama.modeling_llama import rotate_half

from mqc import quant
from mqc.errors import UnsupportedModelError
from mqc.recipe import KVRecipe
from mqc.runtime.modules import register_runtime_module

ATTN_IMPLEMENTATION = "mqc_lowrank_kv"
CONFIG_ATTR = "mqc_kv"
# Families whose attention is "project, [k_norm], RoPE with rotate_half, cache.update, sdpa" with a
# single rotary embedding on the decoder: the runtime rebuilds their keys exactly that way.
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma")
FEATURE_GROUP_SIZE = 32  # per-token quantization groups of the compressed features
SINK_TOKENS = KVRecipe.sink_tokens  # first tokens of a sequence kept exact (attention sinks)
REPORT_CONTEXT = 4096  # tokens of the whole-cache size that compile reports and `mqc inspect` show
FULL_BYTES = 2  # accounted bytes of one full-precision K/V element (fp16)
POSITION_BYTES = 4  # int32 position per token, shared by all layers
QUERY_CHUNK = 1024  # queries per sdpa call under a materialised mask (bounds prefill memory)


@dataclass(frozen=True)
class KVSettings:
    """What every layer's cache shares: stored as ``model.config.mqc_kv``."""

    window: int = 32
    quant_bits: int | None = None
    sinks: int = SINK_TOKENS
    group_size: int = FEATURE_GROUP_SIZE

    @classmethod
    def of(cls, config) -> KVSettings:
        data = getattr(config, CONFIG_ATTR, None)
        if data is None:
            raise UnsupportedModelError(
                "this model has no low-rank KV settings (config.mqc_kv); compile it with a kv recipe"
            )
        return cls(**data)

    def feature_bytes(self, rank: int) -> int:
        """Stored bytes of one token's features at ``rank``: codes + fp16 scales + packed zeros."""
        return quant.weight_bytes(1, rank, self.quant_bits or quant.FP16_BITS, self.group_size)


# --------------------------------------------------------------------------------------------
# the projection
# --------------------------------------------------------------------------------------------
@register_runtime_module
class LowRankKVProj(torch.nn.Module):
    """A K or V projection that also emits the low-rank features of its input.

    ``weight``/``bias`` are the original projection (the window branch); ``down`` is ``A [rank,
    in]`` and ``up`` is ``B [out, rank]``: an old token's K/V is rebuilt as ``up @ c + bias`` from
    ``c = down @ x``. All four are fp16-rounded, which is how the artifact stores them.
    """

    kind: ClassVar[str] = "kv_lowrank"

    def __init__(self, out_features: int, in_features: int, rank: int, has_bias: bool = False):
        super().__init__()
        self.out_features, self.in_features, self.rank = out_features, in_features, rank
        self.weight = torch.nn.Parameter(torch.zeros(out_features, in_features), requires_grad=False)
        self.bias = torch.nn.Parameter(torch.zeros(out_features), requires_grad=False) if has_bias else None
        self.down = torch.nn.Parameter(torch.zeros(rank, in_features), requires_grad=False)
        self.up = torch.nn.Parameter(torch.zeros(out_features, rank), requires_grad=False)
        self.features: torch.Tensor | None = None  # c of the latest forward, taken by the cache

    @classmethod
    def from_factors(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor, up: torch.Tensor
    ) -> LowRankKVProj:
        module = cls(weight.shape[0], weight.shape[1], down.shape[0], bias is not None)
        with torch.no_grad():
            for name, value in (("weight", weight), ("bias", bias), ("down", down), ("up", up)):
                if value is not None:
                    getattr(module, name).copy_(value.detach().to(torch.float16).float())
        return module

    def config(self) -> dict[str, Any]:
        return {
            "out_features": self.out_features,
            "in_features": self.in_features,
            "rank": self.rank,
            "has_bias": self.bias is not None,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], model: torch.nn.Module) -> LowRankKVProj:
        install(model)  # a loaded artifact gets its cache hook back with its first projection
        return cls(**config)

    def rebuild(self, features: torch.Tensor) -> torch.Tensor:
        """``B c + b``: the approximate projection output of tokens known only by their features."""
        return F.linear(
            features, self.up.to(features.dtype), None if self.bias is None else self.bias.to(features.dtype)
        )

    def take_features(self) -> torch.Tensor:
        features, self.features = self.features, None
        if features is None:
            raise RuntimeError("LowRankKVProj.features is empty: the cache must update right after the projection runs")
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.features = F.linear(x, self.down.to(x.dtype))
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


@dataclass(frozen=True)
class CompressedAttention:
    """One compressed attention layer of a model: its module and projections."""

    layer: int
    attention: torch.nn.Module
    k_proj: LowRankKVProj
    v_proj: LowRankKVProj


def lowrank_sites(model: torch.nn.Module) -> list[CompressedAttention]:
    """The compressed attention layers of ``model``, in layer order."""
    sites = [
        CompressedAttention(module.layer_idx, module, module.k_proj, module.v_proj)
        for module in model.modules()
        if isinstance(getattr(module, "k_proj", None), LowRankKVProj)
    ]
    return sorted(sites, key=lambda s: s.layer)


# --------------------------------------------------------------------------------------------
# the key layout shared by the cache and the mask
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sections:
    """Keys returned for ``new`` queries after ``past`` cached tokens (``total = past + new``).

    Three runs of keys, in this order:

    * head ``[0, head)``: exact, the sinks of every row (the first ``sinks`` tokens after a row's
      left padding, so ``head = sinks + longest left padding``);
    * rebuilt ``[rebuilt_start, rebuilt_end)``: tokens past the sinks that some query sees
      rebuilt (``window`` or more before the last query);
    * exact ``[exact_start, total)``: tokens less than ``window`` before some query.

    Runs overlap only for ``new > 1`` or with left padding; otherwise the keys are simply
    ``[0, total)`` in order. Which copy of a token a query sees is the mask's business.
    """

    total: int
    head: int
    rebuilt_start: int
    rebuilt_end: int
    exact_start: int

    @classmethod
    def of(cls, past: int, new: int, window: int, sinks: int, head: int) -> Sections:
        total = past + new
        start = min(sinks, total)
        return cls(total, min(head, total), start, max(start, total - window), max(start, past - window + 1))

    @property
    def rebuilt(self) -> int:
        return self.rebuilt_end - self.rebuilt_start

    @property
    def length(self) -> int:
        return self.head + self.rebuilt + self.total - self.exact_start

    def sequence_index(self, kv: torch.Tensor) -> torch.Tensor:
        """Sequence position of each returned key index."""
        after_head = kv - self.head
        rebuilt = self.rebuilt_start + after_head
        exact = self.exact_start + after_head - self.rebuilt
        return torch.where(kv < self.head, kv, torch.where(after_head < self.rebuilt, rebuilt, exact))


def leading_padding(padding: torch.Tensor | None) -> int:
    """Longest run of padding at the start of a row of a 2-D mask (True = token)."""
    if padding is None:
        return 0
    return int((~padding.bool()).long().cumprod(-1).sum(-1).max())


def lowrank_kv_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    config=None,
    **kwargs,
) -> torch.Tensor | None:
    """The mask for the cache's key runs (see :class:`Sections`); plain ``sdpa_mask`` otherwise.

    A key copy is visible to query ``t`` of row ``b`` when the model's own mask function (causal,
    sliding window) and the padding allow its token ``s``, and: a head copy, if ``s`` is one of the
    row's sinks; a rebuilt copy, if ``s`` is not a sink and ``t - s >= window``; an exact copy, if
    ``s`` is not a sink and ``t - s < window``.
    """
    total = int(q_offset) + q_length
    if kv_offset or kv_length == total:  # keys are [0, total) in order: an ordinary cache or none
        return sdpa_mask(
            batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
            mask_function=mask_function, attention_mask=attention_mask, **kwargs,
        )  # fmt: skip
    settings = KVSettings.of(config)
    window, padding = settings.window, prepare_padding_mask(attention_mask, total, 0)
    head = settings.sinks + leading_padding(padding)
    sections = Sections.of(int(q_offset), q_length, window, settings.sinks, head)
    if kv_length != sections.length:
        raise RuntimeError(f"low-rank KV mask: {kv_length} keys, the cache layout has {sections.length}")
    positions = None if padding is None else padding.long().cumsum(-1) - 1  # of each row's tokens

    def runs(batch_idx, head_idx, q_idx, kv_idx):
        s = sections.sequence_index(kv_idx)
        sink = (s if positions is None else positions[batch_idx, s]) < settings.sinks
        recent = q_idx - s < window
        in_head, in_rebuilt = kv_idx < sections.head, kv_idx < sections.head + sections.rebuilt
        copy = torch.where(in_head, sink, ~sink & torch.where(in_rebuilt, ~recent, recent))
        allowed = mask_function(batch_idx, head_idx, q_idx, s) & copy
        return allowed if padding is None else allowed & padding[batch_idx, s]

    kwargs.update(allow_is_causal_skip=False, use_vmap=False)
    return sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=0,
        mask_function=runs, attention_mask=None, **kwargs,
    )  # fmt: skip


def lowrank_kv_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA over the sections the cache returned, in query chunks when the mask is materialised.

    A prefill's banded mask has ``2T - window`` keys per query; chunking the queries keeps the
    attention weights of a 4k-token prefill in a few hundred MB instead of gigabytes.
    """
    q_length = query.shape[2]
    if attention_mask is None or q_length <= QUERY_CHUNK:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outputs = [
        sdpa_attention_forward(
            module, query[:, :, i : i + QUERY_CHUNK], key, value, attention_mask[:, :, i : i + QUERY_CHUNK], **kwargs
        )[0]
        for i in range(0, q_length, QUERY_CHUNK)
    ]
    return torch.cat(outputs, dim=1), None


AttentionInterface.register(ATTN_IMPLEMENTATION, lowrank_kv_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, lowrank_kv_mask)


# --------------------------------------------------------------------------------------------
# the cache
# --------------------------------------------------------------------------------------------
class FeatureStore:
    """Features of one projection's old tokens ``[batch, tokens, rank]``: fp16, or quantized per
    token in groups along the rank with :func:`mqc.quant.quantize` (codes, fp16 scales, zeros)."""

    def __init__(self, rank: int, settings: KVSettings):
        self.rank, self.bits, self.group_size = rank, settings.quant_bits, settings.group_size
        self.parts: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return next(iter(self.parts.values())).shape[1] if self.parts else 0

    def _encode(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.bits is None:
            return {"values": features.to(torch.float16)}
        batch, tokens, rank = features.shape
        qw = quant.quantize(features.reshape(batch * tokens, rank).float(), self.bits, self.group_size)
        return {
            name: tensor.reshape(batch, tokens, *tensor.shape[1:])
            for name, tensor in (("qweight", qw.qweight), ("scales", qw.scales), ("qzeros", qw.qzeros))
        }

    def append(self, features: torch.Tensor) -> None:
        if features.shape[1] == 0:
            return
        new = self._encode(features)
        self.parts = new if not self.parts else {k: torch.cat([self.parts[k], v], dim=1) for k, v in new.items()}

    def read(self, dtype: torch.dtype) -> torch.Tensor:
        """All stored features, decoded to ``dtype``."""
        if self.bits is None:
            return self.parts["values"].to(dtype)
        batch, tokens = self.parts["scales"].shape[:2]
        flat = {k: v.flatten(0, 1) for k, v in self.parts.items()}
        qw = quant.QuantizedWeight(
            flat["qweight"], flat["scales"], flat["qzeros"], self.bits, self.group_size, self.rank
        )
        return quant.dequantize(qw).reshape(batch, tokens, self.rank).to(dtype)

    def select(self, index: torch.Tensor) -> None:
        self.parts = {k: v.index_select(0, index.to(v.device)) for k, v in self.parts.items()}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())


class LowRankKVLayer(CacheLayerMixin):
    """One layer's bi-branch cache: exact head (sinks) and window K/V (+ the window's pending
    features) and compressed features of the tokens in between (see :class:`Sections`)."""

    def __init__(self, cache: LowRankKVCache, site: CompressedAttention, settings: KVSettings):
        super().__init__()
        self.cache, self.site, self.window, self.sinks = cache, site, settings.window, settings.sinks
        self.length = 0
        self.head_dim = site.attention.head_dim
        self.k_store = FeatureStore(site.k_proj.rank, settings)
        self.v_store = FeatureStore(site.v_proj.rank, settings)
        self.pending_k: torch.Tensor | None = None  # features of the window tokens [b, w, r_k]
        self.pending_v: torch.Tensor | None = None
        self.head_keys: torch.Tensor | None = None  # exact K/V of the head run [b, h, head, d]
        self.head_values: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = self.head_keys = key_states[..., :0, :]
        self.values = self.head_values = value_states[..., :0, :]
        self.pending_k = key_states.new_zeros(key_states.shape[0], 0, self.site.k_proj.rank)
        self.pending_v = key_states.new_zeros(key_states.shape[0], 0, self.site.v_proj.rank)
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.length

    def sections(self, new: int) -> Sections:
        return Sections.of(self.length, new, self.window, self.sinks, self.cache.head)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.sections(query_length).length, 0

    def get_max_length(self) -> int:
        return -1

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        sections = self.sections(key_states.shape[-2])
        features_k, features_v = self.site.k_proj.take_features(), self.site.v_proj.take_features()
        to_head = sections.head - self.head_keys.shape[-2]
        self.head_keys = torch.cat([self.head_keys, key_states[..., :to_head, :]], dim=-2)
        self.head_values = torch.cat([self.head_values, value_states[..., :to_head, :]], dim=-2)
        sinks = max(0, sections.rebuilt_start - self.length)  # new tokens that are sinks in every row
        exact_k = torch.cat([self.keys, key_states[..., sinks:, :]], dim=-2)
        exact_v = torch.cat([self.values, value_states[..., sinks:, :]], dim=-2)
        pending_k = torch.cat([self.pending_k, features_k[:, sinks:]], dim=1)
        pending_v = torch.cat([self.pending_v, features_v[:, sinks:]], dim=1)
        evict = max(0, exact_k.shape[-2] - self.window)
        self.k_store.append(pending_k[:, :evict])
        self.v_store.append(pending_v[:, :evict])
        self.keys, self.values = exact_k[..., evict:, :], exact_v[..., evict:, :]
        self.pending_k, self.pending_v = pending_k[:, evict:], pending_v[:, evict:]
        self.length = sections.total
        first_exact = sections.exact_start - (sections.total - exact_k.shape[-2])
        parts_k, parts_v = [self.head_keys], [self.head_values]
        if sections.rebuilt:
            old_k, old_v = self._rebuild(sections)
            parts_k.append(old_k)
            parts_v.append(old_v)
        parts_k.append(exact_k[..., first_exact:, :])
        parts_v.append(exact_v[..., first_exact:, :])
        return torch.cat(parts_k, dim=-2), torch.cat(parts_v, dim=-2)

    def _heads(self, flat: torch.Tensor) -> torch.Tensor:
        """[b, t, heads*d] -> [b, t, heads, d]"""
        return flat.reshape(*flat.shape[:2], -1, self.head_dim)

    def _rebuild(self, sections: Sections) -> tuple[torch.Tensor, torch.Tensor]:
        """Post-RoPE K and V of the compressed tokens, as the attention module would have made them."""
        if len(self.k_store) != sections.rebuilt:
            raise RuntimeError(
                f"layer {self.site.layer}: {len(self.k_store)} compressed tokens, the layout expects {sections.rebuilt}"
            )
        keys = self._heads(self.site.k_proj.rebuild(self.k_store.read(self.dtype)))
        k_norm = getattr(self.site.attention, "k_norm", None)
        if k_norm is not None:
            keys = k_norm(keys)
        keys = keys.transpose(1, 2)
        cos, sin = self.cache.rope(sections.rebuilt_start, sections.rebuilt_end, keys)
        keys = keys * cos + rotate_half(keys) * sin
        values = self._heads(self.site.v_proj.rebuild(self.v_store.read(self.dtype))).transpose(1, 2)
        return keys, values

    def reset(self) -> None:
        self.keys = self.values = self.pending_k = self.pending_v = self.head_keys = self.head_values = None
        self.k_store.parts, self.v_store.parts = {}, {}
        self.length = 0
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if not self.is_initialized:
            return
        index = beam_idx.to(self.device)
        self.keys, self.values = self.keys.index_select(0, index), self.values.index_select(0, index)
        self.pending_k, self.pending_v = self.pending_k.index_select(0, index), self.pending_v.index_select(0, index)
        self.head_keys, self.head_values = (
            self.head_keys.index_select(0, index),
            self.head_values.index_select(0, index),
        )
        self.k_store.select(index)
        self.v_store.select(index)

    def nbytes(self) -> dict[str, int]:
        """Bytes this layer holds now, by branch (the exact branch counted at its real dtype)."""
        exact = (self.head_keys, self.head_values, self.keys, self.values, self.pending_k, self.pending_v)
        window = sum(t.numel() * t.element_size() for t in exact)
        return {
            "window": window if self.is_initialized else 0,
            "compressed": self.k_store.nbytes() + self.v_store.nbytes(),
        }


class LowRankKVCache(Cache):
    """The bi-branch cache of a compiled model: one :class:`LowRankKVLayer` per compressed layer.

    Also keeps each token's position (int32 ``[batch, tokens]``): rebuilt keys get RoPE at the
    position their token had, whatever left padding did to the position ids; and the length of the
    head run (sinks + the longest left padding of the first forward).
    """

    def __init__(self, model: torch.nn.Module):
        settings = KVSettings.of(model.config)
        sites = lowrank_sites(model)
        if not sites:
            raise UnsupportedModelError("the model has no low-rank K/V projections; compile it with a kv recipe")
        if [s.layer for s in sites] != list(range(len(sites))):
            raise UnsupportedModelError("low-rank KV needs every attention layer compressed, in order")
        super().__init__(layers=[LowRankKVLayer(self, site, settings) for site in sites])
        self.rotary = model.base_model.rotary_emb
        self.sinks = settings.sinks
        self.head = settings.sinks
        self.positions: torch.Tensor | None = None
        self._rope_memo: tuple[tuple[int, int, int], torch.Tensor, torch.Tensor] | None = None

    def begin_forward(
        self,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        batch: int,
        new: int,
        device: torch.device,
    ) -> None:
        """Record the positions of the ``new`` tokens of the coming forward (the model's own
        default, ``past + arange(new)``, when none are given) and, on the first, the head length."""
        past = self.get_seq_length()
        if past == 0:
            self.head = self.sinks + leading_padding(attention_mask)
        if position_ids is None:
            position_ids = torch.arange(past, past + new, device=device)[None]
        position_ids = position_ids.to(torch.int32).expand(batch, new)
        self.positions = position_ids if self.positions is None else torch.cat([self.positions, position_ids], dim=1)
        self._rope_memo = None

    def rope(self, start: int, end: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[b, 1, end - start, d]`` of tokens ``[start, end)``; computed once per forward."""
        if self.positions is None or self.positions.shape[1] < end:
            raise RuntimeError("LowRankKVCache has no positions for this forward; use it through the compiled model")
        key = (start, end, self.positions.shape[1])
        if self._rope_memo is None or self._rope_memo[0] != key:
            cos, sin = self.rotary(like, self.positions[:, start:end].long())
            self._rope_memo = (key, cos.unsqueeze(1), sin.unsqueeze(1))
        return self._rope_memo[1].to(like.dtype), self._rope_memo[2].to(like.dtype)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.positions is not None:
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))
            self._rope_memo = None

    def nbytes(self) -> dict[str, int]:
        """Bytes held now: exact sinks and window (real dtype), compressed features, positions."""
        per_layer = [layer.nbytes() for layer in self.layers]
        positions = 0 if self.positions is None else self.positions.numel() * self.positions.element_size()
        return {
            "window": sum(p["window"] for p in per_layer),
            "compressed": sum(p["compressed"] for p in per_layer),
            "positions": positions,
        }


# --------------------------------------------------------------------------------------------
# installation on a model
# --------------------------------------------------------------------------------------------
def _token_shape(args: tuple, kwargs: dict) -> tuple[int, int, torch.device]:
    ids = kwargs.get("input_ids", args[0] if args else None)
    tokens = ids if ids is not None else kwargs["inputs_embeds"]
    return tokens.shape[0], tokens.shape[1], tokens.device


def _use_lowrank_cache(model: torch.nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: give the forward a :class:`LowRankKVCache` where HF would use a fresh
    ``DynamicCache``, and tell the cache this forward's positions."""
    use_cache = kwargs.get("use_cache")
    if use_cache is False or (use_cache is None and not model.config.use_cache):
        return None
    past = kwargs.get("past_key_values")
    fresh = type(past) is DynamicCache and past.get_seq_length() == 0 and not getattr(past, "_is_user_defined", False)
    if past is None or fresh:
        past = kwargs["past_key_values"] = LowRankKVCache(model)
    if isinstance(past, LowRankKVCache):
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
            f"low-rank KV cache does not support model type {model_type!r} (it rebuilds keys with one rotary "
            f"embedding and SDPA); supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def install(model: torch.nn.Module, settings: KVSettings | None = None) -> None:
    """Make ``model`` use the low-rank cache: settings in its config, the registered attention,
    and the cache hook (idempotent)."""
    check_supported(model)
    if settings is not None:
        setattr(model.config, CONFIG_ATTR, asdict(settings))
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if not any(hook is _use_lowrank_cache for hook in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(_use_lowrank_cache, with_kwargs=True)


# --------------------------------------------------------------------------------------------
# accounting
# --------------------------------------------------------------------------------------------
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
    if not projections:
        return None
    settings = KVSettings.of(config)
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


def kv_summary_lines(accounting: dict[str, Any]) -> list[str]:
    """Human-readable lines of :func:`kv_accounting` for ``mqc compile`` reports and ``mqc inspect``."""
    a = accounting
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
