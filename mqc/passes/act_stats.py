"""Per-input-channel activation energy ``E[x_j^2]`` of every unit, and optionally the full input
Hessians ``E[x x^T]``, from one forward pass over the calibration batches.

The energy weights quantization error by how strongly each input channel is driven (outlier
score, activation-aware SVD); the Hessians are what GPTQ and the candidates' output error need.
Both come out of the same input hooks, so a pipeline that needs both pays for one pass. Linears
that read the same tensor (q/k/v, gate/up) share one Hessian.
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
            ctx.model(input_ids=batch, use_cache=False)
        yield batch


def input_leaders(ctx: CompileContext) -> dict[str, str]:
    """unit -> the unit whose input it shares (itself when alone): one Hessian per input."""
    leader = {n: group[0] for group in ctx[keys.GRAPH].shared_input_groups for n in group}
    return {n: leader.get(n, n) for n, u in ctx[keys.UNITS].items() if u.embedding != n}


class ActivationStats(Pass):
    name = "act_stats"
    requires = (keys.CALIB, keys.UNITS, keys.GRAPH)
    produces = (keys.ACT_STATS,)

    def __init__(self, hessians: bool = False):
        """``hessians``: also keep ``E[x x^T]`` of every unit's input (``keys.HESSIANS``)."""
        if hessians:
            self.produces = type(self).produces + (keys.HESSIANS,)

    def run(self, ctx: CompileContext) -> PassResult:
        model = ctx.model
        units = ctx[keys.UNITS]
        names = {u.qualname for u in units.values() if u.embedding != u.qualname}
        # K/V projections are wanted by activation-aware SVD even when not quantized.
        names |= {n for s in ctx[keys.GRAPH].kv_sites for n in (s.k_proj, s.v_proj)}
        leaders = input_leaders(ctx) if keys.HESSIANS in self.produces else {}
        sums: dict[str, torch.Tensor] = {}
        grams: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}

        def hook(name):
            def record(module, args):
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
                counts[name] = counts.get(name, 0) + x.shape[0]
                if leaders.get(name) == name:
                    grams[name] = grams.get(name, 0) + x.T @ x

            return record

        handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in sorted(names)]
        try:
            for _ in calibration_forward(ctx, "activation stats"):
                pass
        finally:
            for h in handles:
                h.remove()
        ctx.results[keys.ACT_STATS] = {n: (sums[n] / counts[n]).cpu() for n in sums}
        if leaders:
            ctx.results[keys.HESSIANS] = {n: (grams[lead] / counts[lead]).cpu() for n, lead in leaders.items()}
        return PassResult(False, f"activation energy of {len(sums)} layers" + (", input Hessians" if leaders else ""))
