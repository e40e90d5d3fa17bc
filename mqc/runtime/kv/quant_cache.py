"""The quantized KV cache (KIVI grids, PM-KVQ per-layer widths and progressive lowering).

Per layer: the exact sinks, the exact newest ``window`` to ``window + group - 1`` tokens, and one
:class:`Stage` per compressed width holding the tokens in between in whole groups of ``group``
tokens (see :class:`mqc.runtime.kv.settings.QuantKVSettings` for the grids). Buffers are
preallocated and grow by doubling, so decoding never concatenates the cache.

Decoding one token attends to a stage straight from its codes: with keys ``k = s_c q + m_c`` per
channel ``c`` of a group, ``q . k = sum_c (q_c s_c) code_c + sum_c q_c m_c``, so the query is
scaled once per group and multiplied with the codes as stored (unpacked by shifts, never
scaled); values ``v = s_t code + m_t`` per token fold their scale into the attention
probabilities the same way. No dequantized copy of the cache is made.
"""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from mqc import quant
from mqc.errors import UnsupportedModelError
from mqc.runtime.kv.attention import PENDING_ATTR
from mqc.runtime.kv.layout import Sections, boundary, leading_padding
from mqc.runtime.kv.settings import QuantKVSettings, settings_of


class Workspace:
    """Per-step scratch tensors shared by every layer of a cache (layers run one after another),
    grown as needed and never freed while the cache lives."""

    def __init__(self):
        self.flat: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        size = math.prod(shape)
        flat = self.flat.get((name, dtype))
        if flat is None or flat.numel() < size or flat.device != device:
            flat = self.flat[(name, dtype)] = torch.empty(size + size // 2, dtype=dtype, device=device)
        return flat[:size].view(shape)

    def planes(self, name: str, packed: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
        """:func:`mqc.quant.code_planes` of ``packed``, written into this workspace."""
        shape = (8 // bits, *packed.shape)
        out, scratch = self.get(name, shape, dtype, packed.device), self.get(name, shape, torch.uint8, packed.device)
        return quant.code_planes(packed, bits, dtype, out, scratch)


class Stage:
    """One layer's K/V of one compressed width, ``[batch, kv_heads, groups, ...]`` in buffers with
    room for ``capacity`` groups; the live groups are ``[first, first + count)``."""

    def __init__(self, k_bits: int, v_bits: int, settings: QuantKVSettings, workspace: Workspace):
        self.k_bits, self.v_bits, self.workspace = k_bits, v_bits, workspace
        self.group, self.value_group = settings.group, settings.value_group
        self.buffers: dict[str, torch.Tensor] = {}
        self.first = self.count = 0

    @property
    def tokens(self) -> int:
        return self.count * self.group

    def _encode(self, keys: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Groups of ``[b, h, n * group, d]`` K/V as stored: ``[b, h, n, ...]``."""
        b, h, t, d = keys.shape
        k = keys.reshape(b, h, t // self.group, self.group, d)
        v = values.reshape(b, h, t // self.group, self.group, d)
        parts: dict[str, torch.Tensor] = {}
        if self.k_bits == quant.FP16_BITS:
            parts["k"] = k.to(torch.float16)
        else:
            codes, scale, low = quant.quantize_minmax(k.transpose(-1, -2), self.k_bits, self.group)
            parts.update(k=codes, k_grid=torch.cat([scale, low], -1))  # [b,h,n,d,g*bits/8], [b,h,n,d,2]
        if self.v_bits == quant.FP16_BITS:
            parts["v"] = v.to(torch.float16)
        else:
            codes, scale, low = quant.quantize_minmax(v, self.v_bits, self.value_group)
            parts.update(v=codes, v_grid=torch.stack([scale, low], -1))  # [b,h,n,g,d*bits/8], [b,h,n,g,d/vg,2]
        return parts

    def _live(self, name: str) -> torch.Tensor:
        return self.buffers[name][:, :, self.first : self.first + self.count]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Quantize and store ``[b, h, n * group, d]`` K/V after the live groups."""
        if keys.shape[-2] == 0:
            return
        parts = self._encode(keys, values)
        n = next(iter(parts.values())).shape[2]
        capacity = next(iter(self.buffers.values())).shape[2] if self.buffers else 0
        if self.first + self.count + n > capacity:
            size = max(2 * capacity, self.count + n, 4) if self.count + n > capacity // 2 else capacity
            moved = {}
            for name, new in parts.items():
                buffer = new.new_empty(*new.shape[:2], size, *new.shape[3:])
                if self.count:
                    buffer[:, :, : self.count] = self._live(name)
                moved[name] = buffer
            self.buffers, self.first = moved, 0
        end = self.first + self.count
        for name, new in parts.items():
            self.buffers[name][:, :, end : end + n] = new
        self.count += n

    def pop_front(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Remove the ``n`` oldest groups; their decoded K/V ``[b, h, n * group, d]`` (float32)."""
        keys, values = self.decode(n)
        self.first += n
        self.count -= n
        return keys, values

    def decode(self, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded K/V (float32) of the oldest ``n`` live groups (all by default)."""
        n = self.count if n is None else n
        view = {name: buf[:, :, self.first : self.first + n] for name, buf in self.buffers.items()}
        if not view:
            raise RuntimeError("empty KV stage decoded")
        if self.k_bits == quant.FP16_BITS:
            keys = view["k"].float()
        else:
            grid = view["k_grid"]
            keys = quant.dequantize_minmax(view["k"], grid[..., :1], grid[..., 1:], self.k_bits, self.group)
            keys = keys.transpose(-1, -2)
        if self.v_bits == quant.FP16_BITS:
            values = view["v"].float()
        else:
            grid = view["v_grid"]
            values = quant.dequantize_minmax(view["v"], grid[..., 0], grid[..., 1], self.v_bits, self.value_group)
        return keys.flatten(2, 3), values.flatten(2, 3)

    def scores(self, q: torch.Tensor) -> torch.Tensor:
        """``q [b, h, r, d]`` . keys of every live token: ``[b, h, r, tokens]``."""
        b, h, r, _ = q.shape
        if self.k_bits == quant.FP16_BITS:
            return q @ self._live("k").flatten(2, 3).to(q.dtype).transpose(-1, -2)
        grid = self._live("k_grid").to(q.dtype)  # [b, h, n, d, (scale, min)]
        scaled = q[:, :, None] * grid[..., 0][:, :, :, None, :]  # [b, h, n, r, d]
        planes = self.workspace.planes("k", self._live("k"), self.k_bits, q.dtype)  # [planes, b, h, n, d, g/planes]
        out = (scaled @ planes).movedim(0, -1).flatten(-2)  # [b, h, n, r, g]: token j * planes + i
        low = q @ grid[..., 1].transpose(-1, -2)  # [b, h, r, n]: the minimums' share, per group
        return (out.transpose(2, 3) + low[..., None]).reshape(b, h, r, self.tokens)

    def weighted_sum(self, p: torch.Tensor) -> torch.Tensor:
        """``p [b, h, r, tokens]`` @ values: ``[b, h, r, d]``."""
        if self.v_bits == quant.FP16_BITS:
            return p @ self._live("v").flatten(2, 3).to(p.dtype)
        b, h, r, _ = p.shape
        grid = self._live("v_grid").flatten(2, 3).to(p.dtype)  # [b, h, t, groups, (scale, min)]
        planes = self.workspace.planes("v", self._live("v"), self.v_bits, p.dtype)  # [planes, b, h, n, g, d/planes]
        planes = planes.flatten(3, 4)  # [planes, b, h, t, d/planes]
        groups = grid.shape[-2]
        weights = p[:, :, :, None, :] * grid[..., 0].transpose(-1, -2)[:, :, None]  # [b, h, r, groups, t]
        out = (weights.flatten(2, 3) @ planes).movedim(0, -1).flatten(-2)  # [b, h, r * groups, d]: channel order
        out = out.unflatten(2, (r, groups))  # [b, h, r, groups, d]
        d = out.shape[-1]
        if groups > 1:  # each channel keeps the product with its own group's scales
            group_of = torch.arange(d, device=p.device) // self.value_group
            out = out.gather(3, group_of.view(1, 1, 1, 1, d).expand(b, h, r, 1, d))
        low = (p @ grid[..., 1]).repeat_interleave(self.value_group, -1)  # [b, h, r, d]
        return out[:, :, :, 0] + low

    def nbytes(self) -> int:
        """Bytes of the live groups (what the cache holds; spare capacity not counted)."""
        return sum(self._live(name).numel() * buf.element_size() for name, buf in self.buffers.items())

    def select(self, index: torch.Tensor) -> None:
        self.buffers = {k: v.index_select(0, index.to(v.device)) for k, v in self.buffers.items()}


class QuantKVLayer(CacheLayerMixin):
    """One layer's cache: exact head (sinks) and window, and the compressed stages."""

    def __init__(self, cache: QuantKVCache, attention: torch.nn.Module, layer: int, settings: QuantKVSettings):
        super().__init__()
        self.cache, self.attention, self.layer = cache, attention, layer
        self.settings, self.lags = settings, settings.lags
        self.stages = [Stage(k, v, settings, cache.workspace) for k, v in settings.stage_bits(layer)]
        self.length = self.n_exact = 0
        self.lowered: list[tuple[torch.Tensor, torch.Tensor] | None] = []  # groups lowered by the latest update

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = self.head_keys = key_states[..., :0, :]
        self.values = self.head_values = value_states[..., :0, :]
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.length

    def sections(self, new: int) -> Sections:
        return Sections.of(self.length, new, self.settings.sinks, self.cache.head, self.lags, self.settings.group)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.sections(query_length).length, 0

    def get_max_length(self) -> int:
        return -1

    def _append_exact(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        new = keys.shape[-2]
        if self.n_exact + new > self.keys.shape[-2]:
            size = self.n_exact + new + self.settings.group
            grown_k = keys.new_empty(*keys.shape[:2], size, keys.shape[-1])
            grown_v = values.new_empty(*values.shape[:2], size, values.shape[-1])
            grown_k[..., : self.n_exact, :] = self.keys[..., : self.n_exact, :]
            grown_v[..., : self.n_exact, :] = self.values[..., : self.n_exact, :]
            self.keys, self.values = grown_k, grown_v
        self.keys[..., self.n_exact : self.n_exact + new, :] = keys
        self.values[..., self.n_exact : self.n_exact + new, :] = values
        self.n_exact += new

    def _flush(self, total: int, start: int) -> None:
        """Move whole groups out of the window into stage 0, and from each stage into the next."""
        flushed = boundary(total, start, self.lags[0], self.settings.group) - (total - self.n_exact)
        if flushed > 0:
            self.stages[0].append(self.keys[..., :flushed, :], self.values[..., :flushed, :])
            rest = self.n_exact - flushed
            self.keys[..., :rest, :] = self.keys[..., flushed : self.n_exact, :].clone()
            self.values[..., :rest, :] = self.values[..., flushed : self.n_exact, :].clone()
            self.n_exact = rest
        self.lowered = [None] * len(self.stages)
        for k in range(len(self.stages) - 1):
            stage_start = boundary(total, start, self.lags[k + 1], self.settings.group)
            older = stage_start - (boundary(total, start, self.lags[k], self.settings.group) - self.stages[k].tokens)
            if older > 0:
                keys, values = self.stages[k].pop_front(older // self.settings.group)
                self.stages[k + 1].append(keys, values)  # re-quantized from the stored value
                self.lowered[k] = (keys, values)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        sections = self.sections(key_states.shape[-2])
        to_head = sections.head - self.head_keys.shape[-2]
        if to_head > 0:
            self.head_keys = torch.cat([self.head_keys, key_states[..., :to_head, :]], dim=-2)
            self.head_values = torch.cat([self.head_values, value_states[..., :to_head, :]], dim=-2)
        sinks = max(0, sections.start - self.length)  # new tokens that are sinks in every row
        past_exact = self.n_exact
        if key_states.shape[-2] > 1:  # keep the exact copies a multi-token forward's queries see
            exact_k = torch.cat([self.keys[..., :past_exact, :], key_states[..., sinks:, :]], dim=-2)
            exact_v = torch.cat([self.values[..., :past_exact, :], value_states[..., sinks:, :]], dim=-2)
        self._append_exact(key_states[..., sinks:, :], value_states[..., sinks:, :])
        self._flush(sections.total, sections.start)
        self.length = sections.total
        if key_states.shape[-2] > 1:
            first_exact = sections.exact_start - (sections.total - exact_k.shape[-2])
            exact_k, exact_v = exact_k[..., first_exact:, :], exact_v[..., first_exact:, :]
        else:
            exact_k, exact_v = self.keys[..., : self.n_exact, :], self.values[..., : self.n_exact, :]
        self.pending = sections
        self.attention.__dict__[PENDING_ATTR] = self
        return torch.cat([self.head_keys, exact_k], dim=-2), torch.cat([self.head_values, exact_v], dim=-2)

    def with_compressed_runs(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense key layout of :class:`Sections`: head, each stage's run decoded, exact."""
        sections, head = self.pending, self.head_keys.shape[-2]
        parts_k, parts_v = [keys[..., :head, :]], [values[..., :head, :]]
        for k, (begin, end) in enumerate(sections.runs):
            if end == begin:
                continue
            stage_k, stage_v = (
                self.stages[k].decode() if self.stages[k].count else (keys[..., :0, :], values[..., :0, :])
            )
            missing = end - begin - stage_k.shape[-2]  # tokens lowered during this forward
            if missing > 0:
                lowered_k, lowered_v = self.lowered[k]
                stage_k = torch.cat([lowered_k[..., -missing:, :], stage_k], dim=-2)
                stage_v = torch.cat([lowered_v[..., -missing:, :], stage_v], dim=-2)
            parts_k.append(stage_k.to(keys.dtype))
            parts_v.append(stage_v.to(values.dtype))
        parts_k.append(keys[..., head:, :])
        parts_v.append(values[..., head:, :])
        return torch.cat(parts_k, dim=-2), torch.cat(parts_v, dim=-2)

    def decode_attention(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float):
        """Attention of one decoded token over exact and compressed keys, from the codes.
        ``query [b, heads, 1, d]``; returns ``[b, 1, heads, d]`` as HF's attention functions do."""
        b, heads, _, d = query.shape
        q = query.reshape(b, keys.shape[1], -1, d)  # [b, kv_heads, r, d]: grouped query heads
        live = [stage for stage in self.stages if stage.count]
        scores = [q @ keys.transpose(-1, -2)] + [stage.scores(q) for stage in live]
        sizes = [s.shape[-1] for s in scores]
        p = torch.softmax(torch.cat(scores, -1) * scaling, dim=-1, dtype=torch.float32).to(q.dtype)
        p_parts = p.split(sizes, -1)
        out = p_parts[0] @ values
        for stage, part in zip(live, p_parts[1:]):
            out = out + stage.weighted_sum(part)
        return out.reshape(b, heads, 1, d).transpose(1, 2)

    def reset(self) -> None:
        self.keys = self.values = self.head_keys = self.head_values = None
        self.stages = [
            Stage(k, v, self.settings, self.cache.workspace) for k, v in self.settings.stage_bits(self.layer)
        ]
        self.length = self.n_exact = 0
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if not self.is_initialized:
            return
        index = beam_idx.to(self.device)
        self.keys, self.values = self.keys.index_select(0, index), self.values.index_select(0, index)
        self.head_keys, self.head_values = (
            self.head_keys.index_select(0, index),
            self.head_values.index_select(0, index),
        )
        for stage in self.stages:
            stage.select(index)

    def nbytes(self) -> dict[str, int]:
        """Bytes held now: exact sinks and window (at their real dtype) and the compressed stages."""
        if not self.is_initialized:
            return {"window": 0, "compressed": 0}
        exact = (
            self.head_keys.numel()
            + self.head_values.numel()
            + 2 * self.n_exact * self.keys.shape[1] * self.keys.shape[-1]
        )
        return {
            "window": exact * self.keys.element_size(),
            "compressed": sum(stage.nbytes() for stage in self.stages),
        }


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention modules of a decoder, in layer order."""
    found = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "k_proj") and hasattr(m, "v_proj")]
    return sorted(found, key=lambda m: m.layer_idx)


class QuantKVCache(Cache):
    """The quantized cache of a model: one :class:`QuantKVLayer` per attention layer."""

    def __init__(self, model: torch.nn.Module):
        settings = settings_of(model.config)
        modules = attention_modules(model)
        if not isinstance(settings, QuantKVSettings) or len(modules) != settings.layers:
            raise UnsupportedModelError(
                f"quantized KV settings for {getattr(settings, 'layers', '?')} layers, the model has {len(modules)}"
            )
        head_dim = modules[0].head_dim
        if head_dim % settings.value_group or settings.value_group % 4:
            raise UnsupportedModelError(
                f"KV value groups of {settings.value_group} channels do not tile the head dimension {head_dim}; "
                "use a multiple of 4 that divides it"
            )
        self.workspace = Workspace()
        super().__init__(layers=[QuantKVLayer(self, m, i, settings) for i, m in enumerate(modules)])
        self.sinks = self.head = settings.sinks

    def begin_forward(self, position_ids, attention_mask, batch: int, new: int, device: torch.device) -> None:
        """On the first forward, the head length (sinks + the longest left padding)."""
        if self.get_seq_length() == 0:
            self.head = self.sinks + leading_padding(attention_mask)

    def nbytes(self) -> dict[str, int]:
        per_layer = [layer.nbytes() for layer in self.layers]
        return {"window": sum(p["window"] for p in per_layer), "compressed": sum(p["compressed"] for p in per_layer)}
