"""Lower a bit plan onto the model: swap each planned unit for its runtime module.

After the swaps every remaining floating-point tensor (norms, 16-bit layers, unquantized
embeddings) is rounded to fp16 in place, because that is how the artifact stores it: the
compiled model in memory and the model loaded back from disk are then the same function.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from mqc import quant
from mqc.passes import keys
from mqc.passes.base import CompileContext, Pass, PassResult
from mqc.runtime.modules import QEmbedding, QLinear


def round_to_fp16(model: torch.nn.Module) -> None:
    """Round the stored float tensors; non-persistent buffers (RoPE frequencies) are derived
    at load time, not stored, so they keep full precision."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.dtype == torch.float32:
                tensor.copy_(tensor.half().float())


def _embed_scale(module: torch.nn.Module) -> float | None:
    scale = getattr(module, "embed_scale", None)
    return None if scale is None else float(scale)


class QuantizeModules(Pass):
    name = "quantize"
    requires = (keys.BIT_PLAN, keys.UNITS, keys.OUTLIER_MASKS)
    produces = (keys.QUANTIZED,)

    def __init__(self, gptq: bool = False):
        self.gptq = gptq
        if gptq:
            self.requires = type(self).requires + (keys.HESSIANS,)

    def run(self, ctx: CompileContext) -> PassResult:
        model, units, masks = ctx.model, ctx[keys.UNITS], ctx[keys.OUTLIER_MASKS]
        hessians = ctx[keys.HESSIANS] if self.gptq else {}
        swapped = []
        plan = ctx[keys.BIT_PLAN]
        for name, entry in tqdm(plan.items(), desc="quantize", disable=not ctx.progress, leave=False):
            if entry.bits == quant.FP16_BITS:
                continue
            unit = units[name]
            weight = unit.weight(model)
            quant.check_finite(weight, name)
            old = model.get_submodule(name)
            bias = getattr(old, "bias", None) if not isinstance(old, torch.nn.Embedding) else None
            qlinear = QLinear.from_weight(weight, bias, entry.bits, entry.group_size, masks.get(name), hessians.get(name))
            if unit.embedding == name:  # an untied embedding is its own table
                embedding = model.get_submodule(name)
                model.set_submodule(name, QEmbedding(qlinear, None, _embed_scale(embedding)))
            else:
                model.set_submodule(name, qlinear)
                if unit.embedding is not None:  # tied: the embedding reads lm_head's table
                    embedding = model.get_submodule(unit.embedding)
                    model.set_submodule(unit.embedding, QEmbedding(qlinear, name, _embed_scale(embedding)))
            swapped.append(name)
        round_to_fp16(model)
        ctx.results[keys.QUANTIZED] = swapped
        return PassResult(True, f"{len(swapped)} modules quantized")
