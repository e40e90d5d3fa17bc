"""Per-candidate costs that predict the whole model's KL divergence to the full-precision model.

With the output Fisher of :mod:`mqc.analysis.fisher` (``f_n = E_t[g_{t,n}^2]`` per output channel),
keeping the diagonal in the output channels and treating ``g`` and the unit's input ``x`` as
independent (K-FAC's factorisation) gives, per unit and candidate,

    cost = 1/2 * sum_n f_n * diag(dW H dW^T)_n,    H = E[x x^T]

where ``diag(dW H dW^T)`` is the candidate's recorded row error (:mod:`mqc.analysis.candidates`).
An embedding row read at token ``t`` perturbs the embedding output directly, so its term is
``1/2 E_t[sum_j g_{t,j}^2 dW[tok_t, j]^2]``, accumulated per vocabulary row read; a tied
embedding/lm_head pays both terms. Costs add over units: they are the allocator's objective, in
nats per token. Each candidate's summed row error is kept too: the search ranks a unit's choices by
it.
"""

from __future__ import annotations

from mqc.analysis.context import AnalysisContext, AnalysisPass
from mqc.passes import keys
from mqc.passes.base import PassResult
from mqc.planning.costs import CostTable
from mqc.stream.stack import source_rows

COSTS_FILE = "costs.json"


class PredictedKL(AnalysisPass):
    """Cost of every candidate: its predicted KL contribution (see module docstring)."""

    name = "predicted_kl"
    requires = (keys.UNITS, keys.CANDIDATES, keys.OUTPUT_FISHER)
    produces = (keys.COSTS,)

    def analyze(self, ctx: AnalysisContext) -> PassResult:
        units, table, fisher = ctx[keys.UNITS], ctx[keys.CANDIDATES], ctx[keys.OUTPUT_FISHER]
        costs = CostTable("predicted_kl")
        for name in units:
            energy = fisher.out_energy.get(name)
            rows = fisher.embed_rows.get(name)
            float_rows = None if rows is None else source_rows(table.source, units[name].tensor_name)(rows)
            costs.costs[name], costs.errors[name] = {}, {}
            for choice in table.plans[name]:
                error = table.row_error(name, choice)
                cost = 0.0 if energy is None else 0.5 * float((energy * error).sum())
                if rows is not None:
                    delta = table.dense_rows(name, choice, rows) - float_rows
                    cost += 0.5 * float((fisher.embed_energy[name] * delta.pow(2)).sum())
                costs.costs[name][choice] = cost
                costs.errors[name][choice] = float(error.sum())
        ctx.store.put_json(COSTS_FILE, costs.to_dict())
        ctx.store.save_manifest()
        ctx.results[keys.COSTS] = costs
        return PassResult(False, f"predicted KL of {len(costs.costs)} units")

    def restore(self, ctx: AnalysisContext) -> None:
        ctx.results[keys.COSTS] = CostTable.from_dict(ctx.store.json(COSTS_FILE))
