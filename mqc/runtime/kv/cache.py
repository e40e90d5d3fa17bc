"""The low-rank cache (CSKV): exact sinks and window, low-rank features of the tokens in between.

Per layer it keeps the exact post-RoPE K/V of each row's first ``sinks`` tokens and of the last
``window`` tokens (the latter with their features, waiting to be compressed), and the features of
every token in between, in fp16 or group-quantized per token to 2/4/8 bits with
:mod:`mqc.quant`. Those K/V are rebuilt as ``B c + b`` (then ``k_norm`` where the family has one,
then RoPE at each token's own position). ``update`` returns the runs of
:class:`mqc.runtime.kv.layout.Sections`.

The sinks are an addition to CSKV (StreamingLLM's attention sinks): the first tokens of a
sequence draw a large share of the attention of every later query, and their K/V, unlike typical
tokens', are poorly reconstructed by factors fitted on typical tokens (measured in
``benchmarks/README.md``). They are counted after a row's left padding, so a padded batch
generates what each of its rows generates alone.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.models.llama.modeling_llama import rotate_half

from mqc import quant
from mqc.errors import UnsupportedModelError
from mqc.runtime.kv.layout import Sections, leading_padding
from mqc.runtime.kv.projection import CompressedAttention, lowrank_sites
from mqc.runtime.kv.settings import KVSettings


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
        return Sections.of(self.length, new, self.sinks, self.cache.head, (self.window,))

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
