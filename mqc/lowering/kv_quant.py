"""Give the lowered model the quantized KV cache its plan chose (KIVI, PM-KVQ, or a joint memory
budget's widths)."""

from __future__ import annotations

from mqc.lowering.context import LoweringContext
from mqc.passes import keys
from mqc.passes.base import Pass, PassResult
from mqc.runtime.kv import check_supported, install, quant_cache_bytes


class InstallKVQuant(Pass):
    """Install the plan's quantized cache. Runs after the weights are lowered, so nothing of the
    lowering ever runs through the compressed cache."""

    name = "kv_quant"
    requires = (keys.PLAN, keys.WEIGHTS_LOWERED)
    produces = (keys.KV_QUANT_PLAN, keys.KV_REWRITTEN)

    def run(self, ctx: LoweringContext) -> PassResult:
        plan, model = ctx[keys.PLAN], ctx.model
        check_supported(model)
        install(model, plan.kv)
        sized = quant_cache_bytes(plan.kv, model.config, plan.recipe.kv_quant.context)
        ctx.results[keys.KV_QUANT_PLAN] = {"settings": plan.kv, "at_context": sized}
        ctx.results[keys.KV_REWRITTEN] = True
        return PassResult(
            True, f"KV cache at {plan.recipe.kv_quant.context} tokens: {sized['kv_fraction']:.1%} of fp16"
        )
