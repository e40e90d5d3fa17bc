"""Per-layer costs that predict the whole model's KL divergence to the full-precision model.

Second order around the full-precision model, the mean per-token KL of a perturbed model is
``1/2 E_t[dz_t^T F_t dz_t]`` with ``F`` the Fisher of the output distribution. Pulled back to a
unit's output ``y = W x`` this is ``1/2 E[(g^T dW x)^2]`` with ``g = d log p(y*)/dy`` for labels
``y*`` *sampled from the model itself* (the expectation over sampled labels is the Fisher; the
true labels would give the empirical Fisher, which measures something else). Keeping the
diagonal in the output channels and treating ``g`` and ``x`` as independent (K-FAC's
factorisation) gives, per unit and candidate,

    cost = 1/2 * sum_n f_n * diag(dW H dW^T)_n,    f_n = E_t[g_{t,n}^2],  H = E[x x^T]

where ``diag(dW H dW^T)`` is the candidate's recorded row error (``mqc.passes.candidates``).
An embedding row read at token ``t`` perturbs the embedding output directly, so its term is
``1/2 E_t[sum_j g_{t,j}^2 dW[tok_t, j]^2]``, accumulated per vocabulary row; a tied
embedding/lm_head pays both terms. Costs add over units: they are the allocator's objective,
in nats per token. All units' ``f`` come from a few backward passes, whatever the number of
candidates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from mqc.passes import keys
from mqc.passes.base import CompileContext, Pass, PassResult
from mqc.passes.bit_alloc import CostTable

FISHER_SEQUENCES = 16  # calibration sequences used for the output gradients (of the compile's set)
# One sequence per backward: autograd keeps every layer's activations (about 70 kB per token on the
# default model), so four sequences of 512 tokens held 4 GB more than one.
FISHER_BATCH = 1


@dataclass
class OutputFisherStats:
    out_energy: dict[str, torch.Tensor] = field(default_factory=dict)  # unit -> [out] E_t[g^2]
    embed_energy: dict[str, torch.Tensor] = field(default_factory=dict)  # unit -> [vocab, hidden] sum_t g^2 / T
    n_tokens: int = 0


class OutputFisher(Pass):
    """Squared output gradients of every unit for labels sampled from the model (see module doc)."""

    name = "output_fisher"
    requires = (keys.UNITS, keys.CALIB)
    produces = (keys.OUTPUT_FISHER,)

    def run(self, ctx: CompileContext) -> PassResult:
        model, units = ctx.model, ctx[keys.UNITS]
        calib = ctx[keys.CALIB][:FISHER_SEQUENCES]
        stats = OutputFisherStats()
        embedding = model.get_input_embeddings()
        readers = {u.embedding: n for n, u in units.items() if u.embedding is not None}
        tokens: list[torch.Tensor] = []

        def watch_output(name):
            def hook(module, args, output):
                def accumulate(grad):
                    g2 = grad.detach().float().pow(2).reshape(-1, grad.shape[-1]).sum(0)
                    stats.out_energy[name] = stats.out_energy.get(name, 0) + g2

                output.register_hook(accumulate)

            return hook

        def watch_embedding(module, args, output):
            output = output.detach().requires_grad_(True)  # the graph starts here: no weight grads
            ids = tokens[-1].reshape(-1)

            def accumulate(grad):
                g2 = grad.detach().float().pow(2).reshape(-1, grad.shape[-1])
                for name in readers.values():
                    table = stats.embed_energy.setdefault(name, torch.zeros(embedding.weight.shape[0], g2.shape[1]))
                    table.index_add_(0, ids, g2)

            output.register_hook(accumulate)
            return output

        handles = [embedding.register_forward_hook(watch_embedding)]
        handles += [model.get_submodule(n).register_forward_hook(watch_output(n)) for n, u in units.items() if u.embedding != n]
        gen = torch.Generator().manual_seed(ctx.recipe.calib.seed)
        device = next(model.parameters()).device
        requires_grad = {p: p.requires_grad for p in model.parameters()}
        for p in requires_grad:
            p.requires_grad_(False)
        try:
            for start in tqdm(range(0, calib.shape[0], FISHER_BATCH), desc="output fisher", disable=not ctx.progress, leave=False):
                batch = calib[start : start + FISHER_BATCH].to(device)
                tokens.append(batch)
                logits = model(input_ids=batch, use_cache=False).logits.float()
                logp = torch.log_softmax(logits, -1)
                sampled = torch.multinomial(logp.detach().exp().reshape(-1, logp.shape[-1]).cpu(), 1, generator=gen)
                (-logp.reshape(-1, logp.shape[-1]).gather(1, sampled.to(device)).sum()).backward()
                stats.n_tokens += batch.numel()
        finally:
            for h in handles:
                h.remove()
            for p, flag in requires_grad.items():
                p.requires_grad_(flag)
        stats.out_energy = {n: (e / stats.n_tokens).cpu() for n, e in stats.out_energy.items()}
        stats.embed_energy = {n: e / stats.n_tokens for n, e in stats.embed_energy.items()}
        ctx.results[keys.OUTPUT_FISHER] = stats
        return PassResult(False, f"output gradients of {len(stats.out_energy)} units on {stats.n_tokens} tokens")


class PredictedKL(Pass):
    """Cost of every candidate: its predicted KL contribution (see module docstring)."""

    name = "predicted_kl"
    requires = (keys.UNITS, keys.CANDIDATES, keys.OUTPUT_FISHER)
    produces = (keys.COSTS,)

    def run(self, ctx: CompileContext) -> PassResult:
        units, table, fisher = ctx[keys.UNITS], ctx[keys.CANDIDATES], ctx[keys.OUTPUT_FISHER]
        costs = CostTable("predicted_kl")
        for name, per_choice in table.units.items():
            energy = fisher.out_energy.get(name)
            rows = fisher.embed_energy.get(name)
            weight = units[name].weight(ctx.model) if rows is not None else None
            costs.costs[name] = {}
            for choice, cand in per_choice.items():
                cost = 0.0 if energy is None else 0.5 * float((energy * cand.row_error).sum())
                if rows is not None:
                    delta = table.dense(name, choice, weight) - weight
                    cost += 0.5 * float((rows * delta.pow(2)).sum())
                costs.costs[name][choice] = cost
        ctx.results[keys.COSTS] = costs
        return PassResult(False, f"predicted KL of {len(costs.costs)} units")
