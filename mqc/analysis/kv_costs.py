"""PM-KVQ's per-layer KV costs, measured on the float model through the compressed cache itself.

For every layer and every key/value width in 2/4 bits (8: extrapolated), the increase of the whole
model's KL divergence to the exact-cache model when only that layer's keys (or values) are stored
at that width (16 bits: 0), on calibration sequences run through the quantized cache, so the
window, the sinks and the grids are all in the measurement. Always the float model: a cost is a
fact about the model, reused at every size (:mod:`mqc.planning.kv` allocates from it).

Long positions: calibration sequences are short, but keys are stored after RoPE, whose rotation
grows with the position; with ``interpolate`` the costs are measured at position ids spread evenly
over ``[0, context)`` (PM-KVQ's positional interpolation), so channels that rotate slowly show the
ranges they will have deep into a long context.

The cache is installed on a skeleton of the model (its tensors read from the same source, layer by
layer as each forward reaches it), never on the model itself.
"""

from __future__ import annotations

import copy
import itertools

import torch
from tqdm import tqdm

from mqc import quant
from mqc.analysis.context import AnalysisContext, AnalysisPass
from mqc.kl import kl_sum, logprobs16
from mqc.passes import keys
from mqc.passes.base import PassResult
from mqc.planning.kv import KVCosts, base_settings
from mqc.runtime.kv import KV_BITS, check_supported, install, kv_shape
from mqc.stream.skeleton import build_skeleton
from mqc.stream.source import loadable
from mqc.stream.stack import LayerStack

FILE = "kv_costs.json"


def interpolated_positions(length: int, context: int) -> torch.Tensor:
    """``length`` increasing positions spread evenly over ``[0, context)``."""
    if context <= length:
        return torch.arange(length)
    return torch.round(torch.linspace(0, context - 1, length)).long()


def read_kv_costs(data: dict) -> KVCosts:
    return KVCosts.from_dict(data)


class MeasureKVCosts(AnalysisPass):
    """Measure PM-KVQ's per-layer KV costs (see the module docstring)."""

    name = "kv_costs"
    requires = (keys.CALIB,)
    produces = (keys.KV_COSTS,)

    def analyze(self, ctx: AnalysisContext) -> PassResult:
        kv = ctx.settings.kv_costs
        stack = ctx.stack
        source = loadable(stack.source)
        work = build_skeleton(copy.deepcopy(stack.config), stack.config._attn_implementation)
        check_supported(work)
        costs = measure_costs(LayerStack(work, source), ctx[keys.CALIB][: kv.cost_samples], kv, ctx.progress)
        ctx.store.put_json(FILE, costs.to_dict())
        ctx.store.save_manifest()
        ctx.results[keys.KV_COSTS] = costs
        return PassResult(False, f"{len(costs.key)} layers x keys/values x 2/4 bits measured")

    def restore(self, ctx: AnalysisContext) -> None:
        ctx.results[keys.KV_COSTS] = read_kv_costs(ctx.store.json(FILE))


@torch.no_grad()
def measure_costs(stack: LayerStack, calib: torch.Tensor, kv, progress: bool = True) -> KVCosts:
    """Measured KL increase of each (layer, keys or values, width) alone; see the module docstring.

    2 and 4 bits are measured; 8 bits is extrapolated from 4 (KL is linear in a small error's
    energy, HIGGS' linearity), which leaves 4 forwards per layer instead of 6: at 8 bits the
    measured increase sat at the noise floor anyway."""
    model = stack.model
    layers = kv_shape(model.config)[0]
    positions = interpolated_positions(calib.shape[1], kv.context) if kv.interpolate else torch.arange(calib.shape[1])
    forward = {"position_ids": positions[None], "use_cache": True}  # exact for the reference: no compressed cache yet
    head, vocab = stack.head(), stack.vocab_size()

    def hidden(ids: torch.Tensor) -> torch.Tensor:
        with stack.whole(hidden_out=True) as m:
            return m(input_ids=ids[None], **forward).logits[0]

    reference = [logprobs16(head, hidden(ids), vocab) for ids in calib]
    widths = (2, 4)  # 8 bits: extrapolated below
    costs = {"key": [dict.fromkeys(KV_BITS, 0.0) for _ in range(layers)]}
    costs["value"] = [dict.fromkeys(KV_BITS, 0.0) for _ in range(layers)]
    trials = [(layer, kind, bits) for layer in range(layers) for kind in ("key", "value") for bits in widths]
    for layer, kind, bits in tqdm(trials, desc="analysis: KV costs", disable=not progress):
        one = [quant.FP16_BITS] * layers
        one[layer] = bits
        install(model, base_settings(kv, layers, *((one, None) if kind == "key" else (None, one))))
        total = sum(kl_sum(head, hidden(ids), ref) for ids, ref in zip(calib, reference))
        costs[kind][layer][bits] = max(0.0, total / calib.numel())
        if bits == 4:  # 8 bits: a 16x finer step, 256x less squared error; KL ~ linear in it there
            costs[kind][layer][8] = costs[kind][layer][4] / 256
    for table in (*costs["key"], *costs["value"]):  # a wider width never costs more (measurement noise)
        for narrow, wide in itertools.pairwise(KV_BITS):
            table[wide] = min(table[wide], table[narrow])
    return KVCosts(tuple(costs["key"]), tuple(costs["value"]))
