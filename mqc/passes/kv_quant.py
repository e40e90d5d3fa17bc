"""Quantized KV cache: KIVI at one width, or PM-KVQ's per-layer widths chosen under a KV budget.

PM-KVQ's allocation, as built here: for every layer and every key/value width in 2/4 bits (8: extrapolated), the
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

import copy
import itertools
from dataclasses import dataclass

import torch
from tqdm import tqdm

from mqc import quant
from mqc.errors import InfeasibleBudgetError, RecipeError
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
    """Measured KL increase of each (layer, keys or values, width) alone; see the module docstring.

    2 and 4 bits are measured; 8 bits is extrapolated from 4 (KL is linear in a small error's
    energy, HIGGS' linearity), which leaves 4 forwards per layer instead of 6: at 8 bits the
    measured increase sat at the noise floor anyway."""
    layers = kv_shape(model.config)[0]
    positions = interpolated_positions(calib.shape[1], kv.context) if kv.interpolate else torch.arange(calib.shape[1])
    # through the cache at those positions: exact for the reference (no compressed cache installed yet)
    forward = {"position_ids": positions, "use_cache": True}
    reference = reference_logprobs(model, calib, **forward)
    widths = (2, 4)  # 8 bits: extrapolated below
    costs = {"key": [dict.fromkeys(KV_BITS, 0.0) for _ in range(layers)]}
    costs["value"] = [dict.fromkeys(KV_BITS, 0.0) for _ in range(layers)]
    trials = [(layer, kind, bits) for layer in range(layers) for kind in ("key", "value") for bits in widths]
    for layer, kind, bits in tqdm(trials, desc="KV costs", disable=not progress):
        one = [quant.FP16_BITS] * layers
        one[layer] = bits
        install(model, base_settings(kv, layers, *((one, None) if kind == "key" else (None, one))))
        costs[kind][layer][bits] = max(0.0, mean_kl(model, calib, reference, **forward))
        if bits == 4:  # 8 bits: a 16x finer step, 256x less squared error; KL ~ linear in it there
            costs[kind][layer][8] = costs[kind][layer][4] / 256
    for table in (*costs["key"], *costs["value"]):  # a wider width never costs more (measurement noise)
        for narrow, wide in itertools.pairwise(KV_BITS):
            table[wide] = min(table[wide], table[narrow])
    return KVCosts(tuple(costs["key"]), tuple(costs["value"]))


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


def allocate(costs: KVCosts, kv: KVQuantRecipe, config) -> QuantKVSettings:
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


class KVCostsPass(Pass):
    """Measure PM-KVQ's per-layer KV costs (on a copy: the model itself is left as it was)."""

    name = "kv_costs"
    requires = (keys.CALIB,)
    produces = (keys.KV_COSTS,)

    def run(self, ctx: CompileContext) -> PassResult:
        kv = ctx.recipe.kv_quant
        if kv is None:
            raise RecipeError("the kv_costs pass needs recipe.kv_quant")
        check_supported(ctx.model)
        work = copy.deepcopy(ctx.model)
        ctx.results[keys.KV_COSTS] = measure_costs(work, ctx[keys.CALIB][: kv.cost_samples], kv, ctx.progress)
        return PassResult(False, f"{len(ctx[keys.KV_COSTS].key)} layers x keys/values x 2/4 bits measured")


class KVQuant(Pass):
    """Give the model a quantized KV cache: KIVI widths, PM-KVQ widths under a KV budget (from the
    measured costs), or the widths a joint memory budget chose with the weights'.

    Runs after weight quantization (it requires ``QUANTIZED``), so that the model's other forward
    passes during compilation never see the compressed cache.
    """

    name = "kv_quant"
    requires = (keys.QUANTIZED,)
    produces = (keys.KV_QUANT_PLAN, keys.KV_REWRITTEN)

    def __init__(self, kv: KVQuantRecipe, joint: bool = False):
        """``joint``: the widths come from the allocation of a memory budget (``KV_CHOICE``)."""
        self.kv, self.joint = kv, joint
        if joint:
            self.requires = (*type(self).requires, keys.KV_CHOICE)
        elif kv.budget_frac is not None:
            self.requires = (*type(self).requires, keys.KV_COSTS)

    def run(self, ctx: CompileContext) -> PassResult:
        kv, model = self.kv, ctx.model
        check_supported(model)
        layers = kv_shape(model.config)[0]
        if self.joint:
            settings = ctx[keys.KV_CHOICE]
        elif kv.bits is not None:
            settings = base_settings(kv, layers, (kv.bits,) * layers, (kv.bits,) * layers)
        else:
            settings = allocate(ctx[keys.KV_COSTS], kv, model.config)
        install(model, settings)
        sized = quant_cache_bytes(settings, model.config, kv.context)
        ctx.results[keys.KV_QUANT_PLAN] = {"settings": settings, "at_context": sized}
        ctx.results[keys.KV_REWRITTEN] = True
        return PassResult(True, f"KV cache at {kv.context} tokens: {sized['kv_fraction']:.1%} of fp16")
