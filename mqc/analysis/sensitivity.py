"""First-order and Fisher sensitivity of every unit at every width (LLM-MQ), from a streamed backward.

For a unit with weight ``W`` and loss gradient ``G`` over the calibration set, quantizing it to
``b`` bits changes the loss by about

    first order:  | sum G * (Q_b(W) - W) |
    Fisher:       sum_batches sum (G_batch^2 * (Q_b(W) - W)^2)   (empirical Fisher, per micro-batch)

with ``Q_b`` round-to-nearest, and the loss the next-token cross-entropy of the true labels. Both
are linear in the per-batch gradient (the Fisher term in its square), so each micro-batch's weight
gradient is reduced to a handful of scalars as soon as it exists and then freed. The backward is
streamed as the output Fisher's is (:mod:`mqc.analysis.fisher`): each decoder layer recomputed from
its kept inputs with its units' weights requiring gradients; the head's gradient a block of rows
at a time (softmax normalised per token first); an embedding's from the rows its lookups read.
Each estimate is computed twice: plain, and with the unit's outliers (as the lowering would choose
them) kept exact. For a tied embedding/head the two gradients' Fisher terms are summed without
their cross term (they are never both in memory for one micro-batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from mqc import quant
from mqc.analysis.candidates import row_blocks
from mqc.analysis.context import AnalysisContext, AnalysisPass
from mqc.analysis.fisher import frozen
from mqc.passes import keys
from mqc.passes.base import PassResult
from mqc.planning.costs import CostTable
from mqc.planning.types import Choice, WeightUnit, choice_label, parse_label
from mqc.stream.stack import batches

VARIANTS = ("first_order", "fisher")
FILE = "sensitivity.json"


@dataclass
class SensitivityTable:
    """``scores[unit][variant][(bits, group)]``; variants are VARIANTS and their ``_outliers`` forms."""

    scores: dict[str, dict[str, dict[Choice, float]]] = field(default_factory=dict)
    n_tokens: int = 0

    def score(self, unit: str, bits: int, variant: str, with_outliers: bool, group_size: int | None = None) -> float:
        key = f"{variant}_outliers" if with_outliers else variant
        entry = self.scores[unit][key]
        if bits == quant.FP16_BITS:
            return entry[(bits, None)]
        if group_size is None:
            (group_size,) = {g for b, g in entry if b == bits}  # unambiguous only with one group size
        return entry[(bits, group_size)]

    def to_dict(self) -> dict:
        return {
            "n_tokens": self.n_tokens,
            "scores": {
                unit: {variant: {choice_label(c): v for c, v in values.items()} for variant, values in entry.items()}
                for unit, entry in self.scores.items()
            },
        }

    @classmethod
    def from_dict(cls, data: dict) -> SensitivityTable:
        scores = {
            unit: {variant: {parse_label(c): v for c, v in values.items()} for variant, values in entry.items()}
            for unit, entry in data["scores"].items()
        }
        return cls(scores, data["n_tokens"])

    def costs(self, variant: str, with_outliers: bool) -> CostTable:
        """The allocator's view: one variant's score for every choice."""
        key = f"{variant}_outliers" if with_outliers else variant
        return CostTable(variant, {unit: dict(entry[key]) for unit, entry in self.scores.items()})


class _Sums:
    """Per unit, (variant, choice, with outliers) -> running sum, and the deltas they weigh."""

    def __init__(self, units: dict[str, WeightUnit], options: list[Choice], outlier_frac: float, energy, target: str):
        self.units, self.options, self.outlier_frac, self.energy, self.target = (
            units,
            options,
            outlier_frac,
            energy,
            target,
        )
        self.sums: dict[str, dict[tuple[str, Choice, bool], float]] = {}

    def deltas(
        self, name: str, weight: torch.Tensor, rows: tuple[int, int] | None = None
    ) -> dict[tuple[Choice, bool], torch.Tensor]:
        """``Q(W) - W`` of every option (fp16, as the seed kept them), of rows ``rows`` of a large unit."""
        unit = self.units[name]
        out = {}
        for bits, group in self.options:
            g = group or 128
            out[((bits, group), False)] = (quant.fake_quantize(weight, bits, g) - weight).half()
            if self.outlier_frac > 0 and bits != quant.FP16_BITS:
                from mqc.planning.types import plan_entry

                entry = plan_entry(unit, bits, g, self.outlier_frac, self.target)
                count = (
                    entry.n_outliers if rows is None else quant.split_count(entry.n_outliers, unit.out_features, *rows)
                )
                approx = quant.fake_quantize(weight, bits, g)
                mask = quant.outlier_mask(weight, approx, count, self.energy.get(name), entry.outliers_per_row)
                out[((bits, group), True)] = (quant.fake_quantize(weight, bits, g, mask) - weight).half()
        return out

    def add(self, name: str, grad: torch.Tensor, deltas) -> None:
        sums = self.sums.setdefault(name, {})
        grad = grad.float()
        grad_sq = grad.pow(2)
        for (choice, outliers), delta in deltas.items():
            d = delta.float()
            for variant, value in (("first_order", (grad * d).sum()), ("fisher", (grad_sq * d.pow(2)).sum())):
                key = (variant, choice, outliers)
                sums[key] = sums.get(key, 0.0) + float(value)

    def table(self, n_tokens: int) -> SensitivityTable:
        table = SensitivityTable(n_tokens=n_tokens)
        fp16 = (quant.FP16_BITS, None)
        for name, sums in self.sums.items():
            entry: dict[str, dict[Choice, float]] = {}
            for (variant, choice, outliers), value in sums.items():
                key = f"{variant}_outliers" if outliers else variant
                entry.setdefault(key, {})[choice] = abs(value) if variant == "first_order" else value
            if self.outlier_frac > 0:  # 16-bit has no outliers: same score either way
                for variant in VARIANTS:
                    if fp16 in entry[variant]:
                        entry[f"{variant}_outliers"][fp16] = entry[variant][fp16]
            table.scores[name] = entry
        return table


class Sensitivity(AnalysisPass):
    name = "sensitivity"
    requires = (keys.UNITS, keys.CALIB, keys.LAYER_INPUTS, keys.ACT_STATS)
    produces = (keys.SENSITIVITY, keys.COSTS)

    def analyze(self, ctx: AnalysisContext) -> PassResult:
        stack, units, settings = ctx.stack, ctx[keys.UNITS], ctx.settings
        calib, inputs = ctx[keys.CALIB], ctx[keys.LAYER_INPUTS]
        micro = batches(calib)
        options = settings.choices.options()
        sums = _Sums(units, options, settings.choices.outlier_frac, ctx[keys.ACT_STATS], settings.choices.target)
        bar = tqdm(total=stack.n_layers + 2, desc="analysis: sensitivity", unit="layer", disable=not ctx.progress)
        with frozen(stack.model):
            grads = self._head(ctx, sums, micro, inputs.layer(stack.n_layers, stack.device))
            bar.update(1)
            calls = [stack.catch(b)[1] for b in micro]
            for index in range(stack.n_layers - 1, -1, -1):
                grads = self._layer(ctx, sums, index, micro, calls, inputs.layer(index, stack.device), grads)
                bar.update(1)
            self._embedding(ctx, sums, micro, grads)
            bar.update(1)
        bar.close()
        table = sums.table(int(calib.numel()))
        ctx.store.put_json(FILE, table.to_dict())
        ctx.store.save_manifest()
        self._publish(ctx, table)
        return PassResult(False, f"sensitivity of {len(units)} units x {len(options)} choices")

    def restore(self, ctx: AnalysisContext) -> None:
        self._publish(ctx, SensitivityTable.from_dict(ctx.store.json(FILE)))

    @staticmethod
    def _publish(ctx: AnalysisContext, table: SensitivityTable) -> None:
        ctx.results[keys.SENSITIVITY] = table
        ctx.results[keys.COSTS] = table.costs(ctx.settings.costs, ctx.settings.choices.outlier_frac > 0)
        ctx.store.put_json("costs.json", ctx.results[keys.COSTS].to_dict())
        ctx.store.save_manifest()

    def _head(self, ctx, sums: _Sums, micro, last: torch.Tensor) -> list[torch.Tensor]:
        """Gradients at the last layer's output per micro-batch; the head unit's sums by row blocks."""
        stack, units = ctx.stack, ctx[keys.UNITS]
        head = stack.head()
        grads, normed, lse = [], [], []
        row = 0
        micro = [b.to(stack.device) for b in micro]
        for batch in micro:  # the mean next-token cross-entropy of each micro-batch, as HF's loss
            h = last[row : row + batch.shape[0]].detach().clone().requires_grad_(True)
            row += batch.shape[0]
            f = stack.tail(h)
            logits = head(f)[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            loss.backward()
            grads.append(h.grad)
            normed.append(f.detach()[:, :-1].reshape(-1, f.shape[-1]))
            lse.append(torch.logsumexp(logits.detach(), -1).reshape(-1))
        name = stack.head_name
        if name not in units:
            return grads
        unit = units[name]
        cap = stack.softcap
        for r0, r1 in row_blocks(unit, len(sums.options)):
            weight = unit.oriented(stack.source.rows(unit.tensor_name, r0, r1)).to(stack.device)
            deltas = sums.deltas(name, weight, (r0, r1))
            for batch, f, s in zip(micro, normed, lse):
                targets = batch[:, 1:].reshape(-1)
                raw = torch.nn.functional.linear(f, weight)  # [T, rows]
                g = torch.exp(head.cap(raw) - s[:, None])  # these rows of the softmax
                inside = (targets >= r0) & (targets < r1)
                g[inside.nonzero().squeeze(1), targets[inside] - r0] -= 1.0
                if cap:  # d tanh(z / c) c / dz
                    g *= 1 - torch.tanh(raw / cap).pow(2)
                sums.add(name, (g / targets.numel()).T @ f, deltas)
        return grads

    def _layer(self, ctx, sums: _Sums, index: int, micro, calls, inputs: torch.Tensor, upstream: list[torch.Tensor]):
        stack, units = ctx.stack, ctx[keys.UNITS]
        local = stack.layer_name(index) + "."
        mine = [n for n, u in units.items() if u.layer == index and u.embedding != n]
        out, row = [], 0
        with stack.layer(index) as layer:
            params = {n: layer.get_submodule(n[len(local) :]).weight for n in mine}
            deltas = {n: sums.deltas(n, units[n].oriented(p.detach())) for n, p in params.items()}
            for p in params.values():
                p.requires_grad_(True)
            try:
                for batch, call, grad in zip(micro, calls, upstream):
                    x = inputs[row : row + batch.shape[0]].detach().clone().requires_grad_(True)
                    row += batch.shape[0]
                    weight_grads = torch.autograd.grad(stack.run(layer, x, call[index]), [x, *params.values()], grad)
                    out.append(weight_grads[0])
                    for (name, _), g in zip(params.items(), weight_grads[1:]):
                        sums.add(name, units[name].oriented(g), deltas[name])
            finally:
                for p in params.values():
                    p.requires_grad_(False)
        return out

    def _embedding(self, ctx, sums: _Sums, micro, upstream: list[torch.Tensor]) -> None:
        stack, units = ctx.stack, ctx[keys.UNITS]
        readers = [n for n, u in units.items() if u.embedding is not None]
        if not readers:
            return
        name = readers[0]
        unit = units[name]
        looked_up = []  # per micro-batch: (ids, the gradient of their rows)
        for batch, grad in zip(micro, upstream):
            hidden, _, embedding = stack.catch(batch, track=True)
            hidden.backward(grad)
            looked_up += [(ids.cpu(), table.grad.cpu()) for ids, table in embedding.looked_up]
        table = f"{stack.embedding_name}.weight"
        for r0, r1 in row_blocks(unit, len(sums.options)):
            if not any(((ids >= r0) & (ids < r1)).any() for ids, _ in looked_up):
                continue
            deltas = sums.deltas(
                name, stack.source.rows(table, r0, r1), (r0, r1)
            )  # on the CPU: the rows' gradients are there
            for ids, grad in looked_up:
                inside = (ids >= r0) & (ids < r1)
                block = torch.zeros(r1 - r0, grad.shape[1])
                block[ids[inside] - r0] = grad[inside]
                sums.add(name, block, deltas)
