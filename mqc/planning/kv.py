"""The quantized KV cache's half of a plan: per-layer key/value widths (KIVI at one width, PM-KVQ
under a KV budget, or chosen with the weights' under one joint memory budget).

PM-KVQ's allocation, as built here: for every layer and every key/value width, the measured
increase of the whole model's KL divergence when only that layer's keys (or values) are stored at
that width (:mod:`mqc.analysis.kv_costs`, on the float model). Costs are assumed additive over
layers and over keys/values, as the weight allocator assumes over layers; the exact
multiple-choice knapsack then picks one (key width, value width) per layer minimising the summed
cost with the cache of ``context`` tokens within ``budget_frac`` of the fp16 cache's bytes there
(window and sinks included, counted by :func:`mqc.runtime.kv.quant_cache_bytes`, the accounting
the report shows).

Progressive lowering (``lower_after``): tokens older than ``window + lower_after`` are stored one
width lower (16 -> 8 -> 4 -> 2); each layer's choice is priced by the tokens each stage holds at
``context`` (bytes exactly, cost weighted by the same token shares).
"""

from __future__ import annotations

from dataclasses import dataclass

from mqc import quant
from mqc.errors import InfeasibleBudgetError
from mqc.planning.knapsack import solve_mckp
from mqc.recipe import KVQuantRecipe
from mqc.runtime.kv import KV_BITS, QuantKVSettings, fp16_cache_bytes, kv_shape, quant_cache_bytes
from mqc.runtime.kv.settings import token_bytes

LOWER = {16: 8, 8: 4, 4: 2, 2: 2}  # progressive lowering: the next width down
PAIRS = tuple((k, v) for k in KV_BITS for v in KV_BITS)


@dataclass(frozen=True)
class KVCosts:
    """Measured KL increase per layer and width, for keys and for values."""

    key: tuple[dict[int, float], ...]
    value: tuple[dict[int, float], ...]

    def of(self, layer: int, pair: tuple[int, int]) -> float:
        return self.key[layer][pair[0]] + self.value[layer][pair[1]]

    def to_dict(self) -> dict:
        return {
            "key": [{str(b): v for b, v in t.items()} for t in self.key],
            "value": [{str(b): v for b, v in t.items()} for t in self.value],
        }

    @classmethod
    def from_dict(cls, data: dict) -> KVCosts:
        def tables(rows):
            return tuple({int(b): float(v) for b, v in t.items()} for t in rows)

        return cls(tables(data["key"]), tables(data["value"]))


def base_settings(kv: KVQuantRecipe, layers: int, k_bits=None, v_bits=None) -> QuantKVSettings:
    """The recipe's settings with per-layer widths (fp16 everywhere by default)."""
    k_bits = k_bits or (quant.FP16_BITS,) * layers
    v_bits = v_bits or (quant.FP16_BITS,) * layers
    lowered = {} if kv.lower_after is None else {
        "lower_after": kv.lower_after,
        "k_low": tuple(LOWER[b] for b in k_bits),
        "v_low": tuple(LOWER[b] for b in v_bits),
    }  # fmt: skip
    return QuantKVSettings(
        tuple(k_bits), tuple(v_bits), window=kv.window, sinks=kv.sinks, group=kv.group,
        value_group=kv.value_group, **lowered,
    )  # fmt: skip


@dataclass(frozen=True)
class KVOptions:
    """The KV half of a knapsack: per layer, one option per (key bits, value bits) pair."""

    pairs: tuple[tuple[int, int], ...]
    sizes: list[list[int]]  # bytes of the layer's compressed stages at the context, x batch
    costs: list[list[float]]  # measured KL increase, weighted by the tokens each stage holds
    exact_bytes: int  # sinks and window at fp16, x batch: the same for every choice

    def settings(self, kv: KVQuantRecipe, layers: int, choices: list[int]) -> QuantKVSettings:
        chosen = [self.pairs[c] for c in choices]
        return base_settings(kv, layers, tuple(k for k, _ in chosen), tuple(v for _, v in chosen))

    def floor(self) -> int:
        """Bytes of the narrowest cache."""
        return self.exact_bytes + sum(min(s) for s in self.sizes)


def kv_options(costs: KVCosts | None, kv: KVQuantRecipe, config) -> KVOptions:
    """Sizes (exact, from the accounting's token counts) and costs of every layer's choices for a
    cache of ``kv.batch`` x ``kv.context`` tokens; ``costs`` None prices sizes only."""
    layers, kv_heads, head_dim = kv_shape(config)
    template = base_settings(kv, layers)
    sized = quant_cache_bytes(template, config, kv.context)
    tokens = sized["stage_tokens"]
    shape = (kv.group, kv.value_group, kv_heads, head_dim)
    stages = [lambda p: p] + ([lambda p: (LOWER[p[0]], LOWER[p[1]])] if kv.lower_after is not None else [])
    share = [n / max(1, sum(tokens)) for n in tokens]
    sizes, cost = [], []
    for layer in range(layers):
        sizes.append(
            [kv.batch * sum(round(n * token_bytes(*f(p), *shape)) for f, n in zip(stages, tokens)) for p in PAIRS]
        )
        cost.append(
            [0.0 if costs is None else sum(s * costs.of(layer, f(p)) for f, s in zip(stages, share)) for p in PAIRS]
        )
    return KVOptions(PAIRS, sizes, cost, kv.batch * sized["exact_bytes"])


def allocate_kv(costs: KVCosts, kv: KVQuantRecipe, config) -> QuantKVSettings:
    """Per-layer (key, value) widths minimising the summed measured cost with the cache of
    ``kv.context`` tokens within ``kv.budget_frac`` of the fp16 cache (exact knapsack)."""
    options = kv_options(costs, kv, config)
    fp16 = kv.batch * fp16_cache_bytes(config, kv.context)
    if options.floor() > kv.budget_frac * fp16:
        raise InfeasibleBudgetError(
            f"KV budget {kv.budget_frac:.3f} of the fp16 cache at {kv.context} tokens is infeasible: the narrowest "
            f"widths need {options.floor() / fp16:.3f} (window and sinks included); raise the budget or the group sizes"
        )
    choices, _ = solve_mckp(options.costs, options.sizes, int(kv.budget_frac * fp16) - options.exact_bytes)
    return options.settings(kv, kv_shape(config)[0], choices)


def kv_settings(kv: KVQuantRecipe, costs: KVCosts | None, config) -> QuantKVSettings:
    """The cache a recipe asks for on its own: KIVI at ``kv.bits``, or PM-KVQ under ``kv.budget_frac``."""
    layers = kv_shape(config)[0]
    if kv.bits is not None:
        return base_settings(kv, layers, (kv.bits,) * layers, (kv.bits,) * layers)
    return allocate_kv(costs, kv, config)
