"""Quantized KV cache: KIVI at one width, or PM-KVQ's per-layer widths chosen under a KV budget.

PM-KVQ's allocation, as built here: for every layer and every key/value width in 2/4/8 bits, the
*measured* increase of the whole model's KL divergence to the exact-cache model when only that
layer's keys (or values) are stored at that width (16 bits: 0), on calibration sequences run
through the compressed cache itself (so the window, the sinks and the grids are all in the
measurement). Costs are assumed additive over layers and over keys/values, as the weight
allocator assumes over layers; the exact multiple-choice knapsack (:func:`solve_mckp`) then picks
one (key width, value width) per layer minimising the summed cost with the cache of ``context``
tokens within ``budget_frac`` of the fp16 cache's bytes (window and sinks included, counted by
:func:`mqc.runtime.kv.quant_cache_bytes`, the accounting the report shows).

Long positions: calibration sequences are short, but keys are stored after RoPE, whose rotation
grows with the position; with ``interpolate`` the costs are measured at position ids spread evenly
over ``[0, context)`` (PM-KVQ's positional interpolation), so channels that rotate slowly show the
ranges they will have deep into a long context.

Progressive lowering (``lower_after``): tokens older than ``window + lower_after`` are stored one
width lower (16 -> 8 -> 4 -> 2); the allocator prices each layer's choice by the tokens each
stage holds at ``context`` (bytes exactly, cost weighted by the same token shares).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from mqc import quant
from mqc.errors import InfeasibleBudgetError, PassContractError, RecipeError
from mqc.kl import mean_kl, reference_logprobs
from mqc.passes import keys
from mqc.passes.base import CompileContext, Pass, PassResult
from mqc.passes.bit_alloc import solve_mckp
from mqc.recipe import KVQuantRecipe
from mqc.runtime.kv import (
    KV_BITS,
    QuantKVSettings,
    check_supported,
    fp16_cache_bytes,
    install,
    kv_shape,
    quant_cache_bytes,
)
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


def interpolated_positions(length: int, context: int) -> torch.Tensor:
    """``length`` increasing positions spread evenly over ``[0, context)``."""
    if context <= length:
        return torch.arange(length)
    return torch.round(torch.linspace(0, context - 1, length)).long()


@torch.no_grad()
def measure_costs(model: torch.nn.Module, calib: torch.Tensor, kv: KVQuantRecipe, progress: bool = True) -> KVCosts:
    """Measured KL increase of each (layer, keys or values, width) alone; see the module docstring."""
    layers = kv_shape(model.config)[0]
    positions = interpolated_positions(calib.shape[1], kv.context) if kv.interpolate else torch.arange(calib.shape[1])
    reference = reference_logprobs(model, calib, positions)  # exact attention: no compressed cache yet
    widths = [b for b in KV_BITS if b != quant.FP16_BITS]
    costs = {"key": [dict.fromkeys(KV_BITS, 0.0) for _ in range(layers)]}
    costs["value"] = [dict.fromkeys(KV_BITS, 0.0) for _ in range(layers)]
    trials = [(layer, kind, bits) for layer in range(layers) for kind in ("key", "value") for bits in widths]
    for layer, kind, bits in tqdm(trials, desc="KV costs", disable=not progress):
        one = [quant.FP16_BITS] * layers
        one[layer] = bits
        install(model, base_settings(kv, layers, *((one, None) if kind == "key" else (None, one))))
        costs[kind][layer][bits] = max(0.0, mean_kl(model, calib, reference, positions))
    for table in (*costs["key"], *costs["value"]):  # a wider width never costs more (measurement noise)
        for narrow, wide in zip(KV_BITS, KV_BITS[1:]):
            table[wide] = min(table[wide], table[narrow])
    return KVCosts(tuple(costs["key"]), tuple(costs["value"]))


def stage_tokens(settings: QuantKVSettings, config, context: int) -> list[int]:
    """Tokens each compressed stage holds in a cache of ``context`` tokens."""
    return quant_cache_bytes(settings, config, context)["stage_tokens"]


def allocate(costs: KVCosts, kv: KVQuantRecipe, config) -> QuantKVSettings:
    """Per-layer (key, value) widths minimising the summed measured cost with the cache of
    ``kv.context`` tokens within ``kv.budget_frac`` of the fp16 cache (exact knapsack)."""
    layers, kv_heads, head_dim = kv_shape(config)
    template = base_settings(kv, layers)
    tokens = stage_tokens(template, config, kv.context)
    exact = quant_cache_bytes(template, config, kv.context)["exact_bytes"]
    fp16 = fp16_cache_bytes(config, kv.context)
    budget = int(kv.budget_frac * fp16) - exact
    shape = (kv.group, kv.value_group, kv_heads, head_dim)
    sizes, cost = [], []
    for layer in range(layers):
        stages = [lambda p: p] + ([lambda p: (LOWER[p[0]], LOWER[p[1]])] if kv.lower_after is not None else [])
        sizes.append([sum(round(n * token_bytes(*f(p), *shape)) for f, n in zip(stages, tokens)) for p in PAIRS])
        share = [n / max(1, sum(tokens)) for n in tokens]
        cost.append([sum(s * costs.of(layer, f(p)) for f, s in zip(stages, share)) for p in PAIRS])
    smallest = exact + sum(min(s) for s in sizes)
    if smallest > kv.budget_frac * fp16:
        raise InfeasibleBudgetError(
            f"KV budget {kv.budget_frac:.3f} of the fp16 cache at {kv.context} tokens is infeasible: the narrowest "
            f"widths need {smallest / fp16:.3f} (window and sinks included); raise the budget or the group sizes"
        )
    choices, _ = solve_mckp(cost, sizes, budget)
    chosen = [PAIRS[c] for c in choices]
    return base_settings(kv, layers, tuple(k for k, _ in chosen), tuple(v for _, v in chosen))


class KVQuant(Pass):
    """Give the model a quantized KV cache (KIVI widths, or PM-KVQ widths under a budget).

    Runs after weight quantization (it requires ``QUANTIZED``): its costs are measured on the
    model as it will run, and the model's other forward passes during compilation never see the
    compressed cache.
    """

    name = "kv_quant"
    requires = (keys.QUANTIZED,)
    produces = (keys.KV_QUANT_PLAN, keys.KV_REWRITTEN)

    def __init__(self, kv: KVQuantRecipe | None = None, costs: KVCosts | None = None):
        """``kv``: None reads ``ctx.recipe.kv_quant`` at run time. ``costs``: measured costs to
        reuse (they depend on the model, the calibration and the grids, not on the budget)."""
        self.kv, self.costs = kv, costs
        if kv is not None and kv.budget_frac is not None and costs is None:
            self.requires = (*type(self).requires, keys.CALIB)

    def run(self, ctx: CompileContext) -> PassResult:
        kv = self.kv or ctx.recipe.kv_quant
        if kv is None:
            raise RecipeError("the kv_quant pass needs recipe.kv_quant (e.g. --kv-bits 4 or --kv-mixed 0.15)")
        model = ctx.model
        check_supported(model)
        layers = kv_shape(model.config)[0]
        costs = None
        if kv.bits is not None:
            settings = base_settings(kv, layers, (kv.bits,) * layers, (kv.bits,) * layers)
        else:
            if self.costs is None and keys.CALIB not in ctx:
                raise PassContractError(f"pass {self.name} needs {keys.CALIB!r} to measure PM-KVQ's costs")
            costs = self.costs or measure_costs(model, ctx[keys.CALIB][: kv.cost_samples], kv, ctx.progress)
            settings = allocate(costs, kv, model.config)
        install(model, settings)
        sized = quant_cache_bytes(settings, model.config, kv.context)
        ctx.results[keys.KV_QUANT_PLAN] = {"settings": settings, "costs": costs, "at_context": sized}
        ctx.results[keys.KV_REWRITTEN] = True
        return PassResult(True, f"KV cache at {kv.context} tokens: {sized['kv_fraction']:.1%} of fp16")
