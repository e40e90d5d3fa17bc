"""Input statistics of every unit from the calibration batches: ``E[x_j^2]`` and, for GPTQ,
``E[x x^T]``.

The energy vector weights quantization error by how strongly each input channel is driven: the
outlier score and activation-aware SVD read it. The second-moment matrix is GPTQ's Hessian.
One forward pass over the calibration set with input hooks. Linears that read the same tensor
(q/k/v, gate/up) get one shared matrix, computed once per batch.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from mqc.passes import keys
from mqc.passes.base import CompileContext, Pass, PassResult

CALIB_BATCH = 4


def calibration_forward(ctx: CompileContext, desc: str):
    """Yield each calibration micro-batch after running it through the model (no grad)."""
    calib = ctx[keys.CALIB]
    device = next(ctx.model.parameters()).device
    for start in tqdm(range(0, calib.shape[0], CALIB_BATCH), desc=desc, disable=not ctx.progress, leave=False):
        batch = calib[start : start + CALIB_BATCH].to(device)
        with torch.no_grad():
            ctx.model(input_ids=batch)
        yield batch


class ActivationStats(Pass):
    name = "act_stats"
    requires = (keys.CALIB, keys.UNITS, keys.GRAPH)
    produces = (keys.ACT_STATS,)

    def __init__(self, hessians: bool = False):
        self.hessians = hessians
        if hessians:
            self.produces = type(self).produces + (keys.HESSIANS,)

    def run(self, ctx: CompileContext) -> PassResult:
        model = ctx.model
        units = ctx[keys.UNITS]
        names = {u.qualname for u in units.values() if u.embedding != u.qualname}
        # K/V projections are wanted by activation-aware SVD even when not quantized.
        names |= {n for s in ctx[keys.GRAPH].kv_sites for n in (s.k_proj, s.v_proj)}
        leader = {n: group[0] for group in ctx[keys.GRAPH].shared_input_groups for n in group}
        hessian_names = {u.qualname for u in units.values() if u.embedding != u.qualname} if self.hessians else set()
        hessian_sources = {leader.get(n, n) for n in hessian_names}
        names |= hessian_sources
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        second: dict[str, torch.Tensor] = {}  # source (a shared input's first reader) -> sum x x^T

        def hook(name):
            def record(module, args):
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
                counts[name] = counts.get(name, 0) + x.shape[0]
                if name in hessian_sources:
                    second[name] = second.get(name, 0) + x.T @ x

            return record

        handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in sorted(names)]
        try:
            for _ in calibration_forward(ctx, "activation stats"):
                pass
        finally:
            for h in handles:
                h.remove()
        ctx.results[keys.ACT_STATS] = {n: (sums[n] / counts[n]).cpu() for n in sums}
        if self.hessians:
            shared = {n: (h / counts[n]).cpu() for n, h in second.items()}
            ctx.results[keys.HESSIANS] = {n: shared[leader.get(n, n)] for n in hessian_names}
        return PassResult(False, f"activation energy of {len(sums)} layers")
