"""Measured KL of plans to the float model on calibration sequences, one decoder layer at a time.

A plan's model is the float model with every unit's weight replaced by its chosen candidate (the
deployed weights, from the analysis directory) and every other tensor rounded to float16, as the
artifact stores it; it is run as a stack (:mod:`mqc.stream.stack`), so no plan's model is ever
whole in memory. Several plans are scored in one pass over the layers: each layer is materialized
once per distinct set of its units' choices, and a plan that agrees with the last recorded plan
up to some layer starts from that plan's hidden states there (a mutation changes a few units, so
most of the model is shared). The reference is the float model's, from the hidden states the
analysis kept, in float16 log-probabilities.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from mqc.kl import kl_sum, logprobs16
from mqc.planning.types import LayerPlan, choice_of
from mqc.stream.skeleton import build_skeleton
from mqc.stream.source import RoundedSource, loadable
from mqc.stream.stack import CALIB_BATCH, LayerStack, batches

EMBEDDING = -1  # signature position of the embedding (layer indices are 0..n-1, the head is n)
DENSE_CACHE_BYTES = 1 << 30  # dequantized candidates kept between scorings


class DenseCache:
    """Dequantized candidates, kept up to ``budget`` bytes, later layers first: every plan runs the
    layers after its first difference from the recorded one, so the last layers are run most."""

    def __init__(self, budget: int = DENSE_CACHE_BYTES):
        self.budget, self.used = budget, 0
        self.entries: dict[tuple, tuple[int, torch.Tensor]] = {}

    def get(self, key: tuple, priority: int, make) -> torch.Tensor:
        if key in self.entries:
            return self.entries[key][1]
        tensor = make()
        size = tensor.numel() * tensor.element_size()
        lower = sorted((p, k) for k, (p, _) in self.entries.items() if p < priority)
        while self.used + size > self.budget and lower:
            _, victim = lower.pop(0)
            self.used -= self.entries.pop(victim)[1].numel() * tensor.element_size()
        if self.used + size <= self.budget:
            self.entries[key] = (priority, tensor)
            self.used += size
        return tensor


class PlanEvaluator:
    """Scores plans (``dict qualname -> LayerPlan``) on token ids ``[n, L]``: the first
    calibration sequences (whose float last-layer outputs the analysis kept), or any others."""

    def __init__(self, analysis, ids: torch.Tensor, device: str = "cpu"):
        self.analysis, self.ids = analysis, ids
        self.device = device
        self.units = analysis.units
        self.candidates = analysis.candidates
        source = analysis.weights()
        config = copy.deepcopy(analysis.config)
        self.stack = LayerStack(build_skeleton(config), RoundedSource(source), device)
        self.n_layers = self.stack.n_layers
        self.vocab = self.stack.vocab_size()
        self.reference = self._reference(config, source)
        self.calls = {}  # sequences -> per micro-batch layer calls
        self.cached: tuple[list[Any], list[torch.Tensor]] | None = (
            None  # (signature, input of each layer) of the accepted plan
        )
        self.pending: tuple[list[Any], list[torch.Tensor]] | None = None
        self._head: tuple[Any, torch.Tensor] | None = None  # (choice, dense head weight) last used
        self.dense = DenseCache()
        self.readers = [n for n, u in self.units.items() if u.embedding is not None]  # units the embedding reads
        self.head_unit = self.stack.head_name if self.stack.head_name in self.units else None

    def _reference(self, config, source) -> torch.Tensor:
        """float16 log-probabilities of the float model on ``ids``: from the last-layer outputs the
        analysis kept (the first calibration sequences), else by running the float model."""
        exact = LayerStack(build_skeleton(copy.deepcopy(config)), loadable(source), self.device)
        count = self.ids.shape[0]
        calib = self.analysis.calib()
        kept = self.analysis.store.tensors(f"inputs/{self.n_layers:04d}.safetensors")["hidden"]
        with torch.no_grad():
            if count <= kept.shape[0] and torch.equal(self.ids, calib[:count]):
                last = kept[:count].to(self.device)
            else:
                last = _float_outputs(exact, self.ids)
            head = exact.head()
            return torch.stack([logprobs16(head, exact.tail(h), self.vocab) for h in last])

    # ---------------------------------------------------------------------------------------
    def signature(self, plan: dict[str, LayerPlan]) -> list[Any]:
        """Per position (embedding, each layer, head): the choices that decide it."""
        sig: list[Any] = [tuple(choice_of(plan[n]) for n in self.readers)]
        per_layer: list[list] = [[] for _ in range(self.n_layers)]
        for name, unit in self.units.items():
            if unit.layer is not None:
                per_layer[unit.layer].append((name, choice_of(plan[name])))
        sig += [tuple(x) for x in per_layer]
        sig.append(None if self.head_unit is None else choice_of(plan[self.head_unit]))
        return sig

    def _first_difference(self, sig: list[Any], count: int) -> int:
        """The first position (EMBEDDING, a layer, or n: the head) where ``sig`` leaves the recorded plan."""
        if self.cached is None or self.cached[1][0].shape[0] < count:
            return EMBEDDING
        cached = self.cached[0]
        if sig[0] != cached[0]:
            return EMBEDDING
        for layer in range(self.n_layers):
            if sig[layer + 1] != cached[layer + 1]:
                return layer
        return self.n_layers

    def _calls(self, count: int):
        if count not in self.calls:
            self.calls[count] = [self.stack.catch(b)[1] for b in batches(self.ids[:count])]
        return self.calls[count]

    def _embed(self, plan: dict[str, LayerPlan], count: int) -> torch.Tensor:
        rows = None
        if self.readers:
            name = self.readers[0]
            choice = choice_of(plan[name])
            rows = lambda ids: self.candidates.dense_rows(name, choice, ids.cpu()).to(ids.device)  # noqa: E731
        return torch.cat([self.stack.catch(b, rows=rows)[0] for b in batches(self.ids[:count])])

    def _overrides(self, layer: int, signature) -> dict[str, torch.Tensor]:
        out = {}
        for name, choice in signature:
            unit = self.units[name]
            dense = self.dense.get((name, choice), layer, lambda n=name, c=choice: self.candidates.dense(n, c))
            out[unit.tensor_name] = unit.stored(dense)
        return out

    def _head_fn(self, plan: dict[str, LayerPlan]):
        if self.head_unit is None:
            return self.stack.head()
        choice = choice_of(plan[self.head_unit])
        if self._head is None or self._head[0] != choice:
            self._head = None  # free the old weight first
            self._head = (choice, self.candidates.dense(self.head_unit, choice))
        return self.stack.head(self._head[1])

    def accept(self) -> None:
        """Later plans start from the last recorded plan's layers."""
        self.cached, self.pending = self.pending, None

    # ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def kl(self, plans: list[dict[str, LayerPlan]], count: int, record: int | None = None) -> list[float]:
        """Mean per-token KL of each plan on the first ``count`` sequences; ``record``: the index of
        a plan whose layer inputs later plans may start from once :meth:`accept` is called (it is
        scored on all of ``ids``)."""
        if record is not None and count != self.ids.shape[0]:
            raise ValueError("a recorded plan is scored on every sequence")
        sigs = [self.signature(p) for p in plans]
        starts = [self._first_difference(s, count) for s in sigs]
        calls = self._calls(count)
        hidden: dict[int, torch.Tensor] = {}
        for i, start in enumerate(starts):
            hidden[i] = self._embed(plans[i], count) if start == EMBEDDING else self.cached[1][start][:count]
        first = min(max(s, 0) for s in starts)
        inputs = list(self.cached[1][: starts[record]]) if record is not None and starts[record] > 0 else []
        for layer in range(first, self.n_layers):
            active = [i for i, s in enumerate(starts) if s <= layer]
            if record is not None and record in active:
                inputs.append(hidden[record])
            by_signature: dict[Any, list[int]] = {}
            for i in active:
                by_signature.setdefault(sigs[i][layer + 1], []).append(i)
            for signature, members in by_signature.items():
                with self.stack.layer(layer, self._overrides(layer, signature)) as module:
                    for i in members:
                        parts = hidden[i].split(CALIB_BATCH)
                        hidden[i] = torch.cat([self.stack.run(module, h, call[layer]) for h, call in zip(parts, calls)])
        if record is not None:
            inputs.append(hidden[record])
            self.pending = (sigs[record], inputs)
        reference = self.reference[:count]
        scores = [0.0] * len(plans)
        head_choice = lambda i: str(sigs[i][-1])  # noqa: E731  (plans sharing a head are scored together)
        for i in sorted(range(len(plans)), key=head_choice):
            head = self._head_fn(plans[i])
            total = sum(kl_sum(head, self.stack.tail(h), ref) for h, ref in zip(hidden[i], reference))
            scores[i] = total / (count * self.ids.shape[1])
        return scores


def _float_outputs(stack: LayerStack, ids: torch.Tensor) -> torch.Tensor:
    """The float model's last-layer outputs on ``ids [n, L]``, one layer at a time."""
    micro = batches(ids)
    catches = [stack.catch(b) for b in micro]
    hidden = [c[0] for c in catches]
    for index in range(stack.n_layers):
        with stack.layer(index) as layer:
            hidden = [stack.run(layer, h, c[1][index]) for h, c in zip(hidden, catches)]
    return torch.cat(hidden)
