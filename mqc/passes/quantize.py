"""Lower a bit plan onto the model: swap each planned unit for its runtime module.

After the swaps every remaining floating-point tensor (norms, 16-bit layers, unquantized
embeddings) is rounded to fp16 in place, because that is how the artifact stores it: the
compiled model in memory and the model loaded back from disk are then the same function.
"""

from __future__ import annotations

import re

import torch
from tqdm import tqdm

from mqc import quant, quant_ggml
from mqc.passes import keys
from mqc.passes.act_stats import CALIB_BATCH
from mqc.passes.base import CompileContext, Pass, PassResult
from mqc.runtime.modules import GgmlLinear, QEmbedding, QLinear


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
    """Round-to-nearest lowering: every planned unit quantized from its own weights."""

    name = "quantize"
    requires = (keys.BIT_PLAN, keys.UNITS, keys.OUTLIER_MASKS)
    produces = (keys.QUANTIZED,)

    def run(self, ctx: CompileContext) -> PassResult:
        planned = [n for n, e in ctx[keys.BIT_PLAN].items() if e.bits != quant.FP16_BITS]
        for name in tqdm(planned, desc="quantize", disable=not ctx.progress, leave=False):
            self.swap(ctx, name, hessian=None)
        return self.finish(ctx, planned)

    @staticmethod
    def swap(ctx: CompileContext, name: str, hessian: torch.Tensor | None = None, packed=None) -> None:
        """Replace unit ``name`` by its runtime module: quantized here, or ``packed`` as given
        (a ``(QuantizedWeight, SparseOutliers | None)`` pair already made for it, or a
        ``(GgmlWeight, None)`` pair of a GGUF plan)."""
        model, unit, entry = ctx.model, ctx[keys.UNITS][name], ctx[keys.BIT_PLAN][name]
        old = model.get_submodule(name)
        bias = None if isinstance(old, torch.nn.Embedding) else getattr(old, "bias", None)
        if packed is None:
            weight = unit.weight(model)
            quant.check_finite(weight, name)
            packed = quant.quantize_layer(weight, entry.bits, entry.group_size, ctx[keys.OUTLIER_MASKS].get(name), hessian)
        if isinstance(packed[0], quant_ggml.GgmlWeight):
            qlinear = GgmlLinear.from_ggml(packed[0], bias)
        else:
            qlinear = QLinear.from_quantized(*packed, bias)
        if unit.embedding == name:  # an untied embedding is its own table
            model.set_submodule(name, QEmbedding(qlinear, None, _embed_scale(old)))
            return
        model.set_submodule(name, qlinear)
        if unit.embedding is not None:  # tied: the embedding reads lm_head's table
            embedding = model.get_submodule(unit.embedding)
            model.set_submodule(unit.embedding, QEmbedding(qlinear, name, _embed_scale(embedding)))

    @staticmethod
    def finish(ctx: CompileContext, swapped: list[str]) -> PassResult:
        round_to_fp16(ctx.model)
        ctx.results[keys.QUANTIZED] = swapped
        return PassResult(True, f"{len(swapped)} modules quantized")


class _StopForward(Exception):
    """Raised by a hook once the inputs it needs are seen: the rest of the forward is wasted work."""


class SequentialGPTQ(QuantizeModules):
    """GPTQ lowering, one decoder block at a time, in execution order.

    Each block's Hessians ``E[x x^T]`` (one per distinct input: q/k/v share one, gate/up share
    one) are measured on calibration batches flowing through the model *as quantized so far*,
    so a block compensates the error of the blocks before it; each forward stops as soon as the
    block's last input has been seen. Inside a block the inputs come from its full-precision
    weights (GPTQ's "true sequential" off), which needs one partial forward per block instead
    of one per linear. Untied embeddings (no input activations) fall back to round-to-nearest.
    """

    requires = QuantizeModules.requires + (keys.CALIB, keys.GRAPH)

    def run(self, ctx: CompileContext) -> PassResult:
        plan, units = ctx[keys.BIT_PLAN], ctx[keys.UNITS]
        graph = ctx[keys.GRAPH]
        leader = {n: group[0] for group in graph.shared_input_groups for n in group}
        swapped = []
        for block in tqdm(self.blocks(ctx, plan), desc="gptq", disable=not ctx.progress, leave=False):
            readers = list(dict.fromkeys(leader.get(n, n) for n in block if units[n].embedding != n))
            hessians = self.hessians(ctx, readers) if readers else {}
            for name in block:
                self.swap(ctx, name, hessians.get(leader.get(name, name)))
                swapped.append(name)
        return self.finish(ctx, swapped)

    @staticmethod
    def blocks(ctx: CompileContext, plan) -> list[list[str]]:
        """Planned units grouped by decoder block (the first index in the qualname), in graph order."""
        order = {qualname: i for i, qualname in enumerate(ctx[keys.GRAPH].linears)}
        names = sorted((n for n, e in plan.items() if e.bits != quant.FP16_BITS), key=lambda n: order.get(n, -1))
        blocks: dict[str, list[str]] = {}
        for name in names:
            index = re.search(r"\.(\d+)\.", name)
            blocks.setdefault(index.group(1) if index else name, []).append(name)
        return list(blocks.values())

    @staticmethod
    def hessians(ctx: CompileContext, readers: list[str]) -> dict[str, torch.Tensor]:
        """``E[x x^T]`` of each reader's input; the forward stops after the last reader."""
        model, calib = ctx.model, ctx[keys.CALIB]
        totals: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        seen: set[str] = set()

        def hook(name):
            def record(module, args):
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                totals[name] = totals.get(name, 0) + x.T @ x
                counts[name] = counts.get(name, 0) + x.shape[0]
                seen.add(name)
                if len(seen) == len(readers):
                    raise _StopForward

            return record

        handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in readers]
        device = next(model.parameters()).device
        try:
            for start in range(0, calib.shape[0], CALIB_BATCH):
                seen.clear()
                try:
                    with torch.no_grad():
                        model(input_ids=calib[start : start + CALIB_BATCH].to(device), use_cache=False)
                except _StopForward:
                    pass
        finally:
            for handle in handles:
                handle.remove()
        return {n: (totals[n] / counts[n]).cpu() for n in totals}
