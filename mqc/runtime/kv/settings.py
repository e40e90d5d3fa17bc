"""What a compressed KV cache stores, as saved in ``model.config.mqc_kv``.

Two kinds share one key layout (:mod:`mqc.runtime.kv.layout`): ``lowrank`` (CSKV: low-rank
features of old tokens, :class:`KVSettings`) and ``quant`` (KIVI / PM-KVQ: old tokens' K/V
quantized with per-layer widths, :class:`QuantKVSettings`). The defaults here are the runtime's
own; compile-time recipes pass their choices in explicitly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mqc import quant
from mqc.errors import RecipeError, UnsupportedModelError

ATTN_IMPLEMENTATION = "mqc_lowrank_kv"
CONFIG_ATTR = "mqc_kv"
# Families whose attention is "project, [k_norm], RoPE with rotate_half, cache.update, sdpa" with a
# single rotary embedding on the decoder: the runtime rebuilds their keys exactly that way.
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma")
FEATURE_GROUP_SIZE = 32  # per-token quantization groups of the compressed features
SINK_TOKENS = 4  # first tokens of a sequence kept exact (attention sinks)
REPORT_CONTEXT = 4096  # tokens of the whole-cache size that compile reports and `mqc inspect` show
FULL_BYTES = 2  # accounted bytes of one full-precision K/V element (fp16)
POSITION_BYTES = 4  # int32 position per token, shared by all layers
KV_BITS = (2, 4, 8, quant.FP16_BITS)  # widths of the quantized cache (byte-aligned codes)


@dataclass(frozen=True)
class KVSettings:
    """Low-rank cache: what every layer shares."""

    window: int = 32
    quant_bits: int | None = None
    sinks: int = SINK_TOKENS
    group_size: int = FEATURE_GROUP_SIZE
    kind = "lowrank"

    @classmethod
    def of(cls, config) -> KVSettings:
        settings = settings_of(config)
        if not isinstance(settings, cls):
            raise UnsupportedModelError("this model's KV cache is quantized, not low-rank")
        return settings

    @property
    def group(self) -> int:
        """Tokens moved from the window to the compressed branch at a time."""
        return 1

    @property
    def lags(self) -> tuple[int, ...]:
        """Age (tokens behind the newest) at which a token enters each compressed stage."""
        return (self.window,)

    def feature_bytes(self, rank: int) -> int:
        """Stored bytes of one token's features at ``rank``: codes + fp16 scales + packed zeros."""
        return quant.weight_bytes(1, rank, self.quant_bits or quant.FP16_BITS, self.group_size)

    def to_config(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class QuantKVSettings:
    """Quantized cache (KIVI grids, PM-KVQ widths).

    Keys are quantized per channel in groups of ``group`` tokens, values per token in groups of
    ``value_group`` channels (KIVI: keys have outlier channels, values do not), both on
    :func:`mqc.quant.quantize_minmax`'s grid. The ``sinks`` first tokens and the newest
    ``window`` to ``window + group - 1`` tokens stay exact; tokens leave the window ``group`` at a
    time. Per layer ``k_bits[i]``/``v_bits[i]`` in :data:`KV_BITS` (16 = fp16). With
    ``lower_after``, a group older than ``window + lower_after`` tokens is re-quantized to
    ``k_low[i]``/``v_low[i]`` bits from its stored value (PM-KVQ's progressive lowering).
    """

    k_bits: tuple[int, ...]
    v_bits: tuple[int, ...]
    window: int = 32
    sinks: int = SINK_TOKENS
    group: int = 32
    value_group: int = 32
    lower_after: int | None = None
    k_low: tuple[int, ...] | None = None
    v_low: tuple[int, ...] | None = None
    kind = "quant"

    def __post_init__(self) -> None:
        widths = [*self.k_bits, *self.v_bits, *(self.k_low or ()), *(self.v_low or ())]
        if any(b not in KV_BITS for b in widths):
            raise RecipeError(f"KV widths {sorted(set(widths))}: each must be one of {KV_BITS}")
        if len(self.k_bits) != len(self.v_bits):
            raise RecipeError("KV widths: one key and one value width per layer")
        lowered = (self.k_low, self.v_low)
        if (self.lower_after is None) != (self.k_low is None) or (self.k_low is None) != (self.v_low is None):
            raise RecipeError("progressive lowering needs lower_after, k_low and v_low together")
        if self.k_low is not None and any(len(x) != len(self.k_bits) for x in lowered):
            raise RecipeError("progressive lowering: one lowered key and value width per layer")
        if self.window < 1 or self.group < 1 or self.sinks < 0 or (self.lower_after or 0) < 0:
            raise RecipeError("KV window and group must be >= 1, sinks and lower_after >= 0")

    @classmethod
    def uniform(cls, layers: int, bits: int, **kwargs) -> QuantKVSettings:
        return cls((bits,) * layers, (bits,) * layers, **kwargs)

    @property
    def layers(self) -> int:
        return len(self.k_bits)

    @property
    def lags(self) -> tuple[int, ...]:
        if self.lower_after is None:
            return (self.window,)
        return (self.window, self.window + self.lower_after)

    def stage_bits(self, layer: int) -> list[tuple[int, int]]:
        """(key bits, value bits) of each compressed stage of ``layer``, newest first."""
        stages = [(self.k_bits[layer], self.v_bits[layer])]
        if self.lower_after is not None:
            stages.append((self.k_low[layer], self.v_low[layer]))
        return stages

    def token_bytes(self, layer: int, stage: int, kv_heads: int, head_dim: int) -> float:
        """Stored bytes per token of ``layer``'s K and V in ``stage`` (grids amortised per token)."""
        k_bits, v_bits = self.stage_bits(layer)[stage]
        return token_bytes(k_bits, v_bits, self.group, self.value_group, kv_heads, head_dim)

    def to_config(self) -> dict:
        return {**asdict(self), "kind": self.kind}


def token_bytes(k_bits: int, v_bits: int, group: int, value_group: int, kv_heads: int, head_dim: int) -> float:
    """Stored bytes per token of one layer's K (per channel, ``group`` tokens a grid) and V (per
    token, ``value_group`` channels a grid); exact for whole groups of tokens."""
    keys = quant.minmax_bytes(group * head_dim, k_bits, group) / group
    values = quant.minmax_bytes(head_dim, v_bits, value_group)
    return kv_heads * (keys + values)


def settings_of(config) -> KVSettings | QuantKVSettings:
    """The compressed-cache settings saved in a model's config."""
    data = getattr(config, CONFIG_ATTR, None)
    if data is None:
        raise UnsupportedModelError(
            "this model has no compressed KV settings (config.mqc_kv); compile it with a kv recipe"
        )
    data = dict(data)
    if data.pop("kind", KVSettings.kind) == QuantKVSettings.kind:
        tuples = ("k_bits", "v_bits", "k_low", "v_low")
        return QuantKVSettings(**{k: tuple(v) if k in tuples and v is not None else v for k, v in data.items()})
    return KVSettings(**data)
