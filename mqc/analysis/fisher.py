"""Squared output gradients of every unit, from a backward pass streamed one layer at a time.

Second order around the full-precision model, the mean per-token KL of a perturbed model is
``1/2 E_t[dz_t^T F_t dz_t]`` with ``F`` the Fisher of the output distribution. Pulled back to a
unit's output ``y = W x`` this is ``1/2 E[(g^T dW x)^2]`` with ``g = d log p(y*)/dy`` for labels
``y*`` *sampled from the model itself* (the expectation over sampled labels is the Fisher; the
true labels would give the empirical Fisher, which measures something else). What the costs need
of it is ``f_n = E_t[g_{t,n}^2]`` per output channel of every unit (:mod:`mqc.analysis.kl_cost`),
and, for an embedding, ``E_t[g_t^2]`` per row read.

The backward runs from the head down: the head's gradients come from the kept last-layer outputs
(a few tokens at a time, so the vocabulary never makes a whole window's logits), then each decoder
layer is materialized again, recomputed from its kept inputs and backpropagated, handing the
gradient at its input to the layer below (what GPTQModel's layer-wise loop does forwards). After
each layer the gradient and that layer's energies are saved, so a killed run resumes there. The
embedding's rows get theirs through the same pre-layer forward that produced its output (scale
and position embeddings included), with the rows as leaves.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from mqc.analysis.context import AnalysisContext, AnalysisPass
from mqc.analysis.settings import FISHER_SEQUENCES
from mqc.memory import PeakWindow
from mqc.passes import keys
from mqc.passes.base import PassResult
from mqc.stream.stack import LayerStack, batches

GRADIENT = "fisher/gradient.safetensors"
RESULT = "fisher.safetensors"


@dataclass
class OutputFisherStats:
    out_energy: dict[str, torch.Tensor] = field(default_factory=dict)  # unit -> [out] E_t[g^2]
    embed_rows: dict[str, torch.Tensor] = field(default_factory=dict)  # unit -> [n] sorted token ids read
    embed_energy: dict[str, torch.Tensor] = field(default_factory=dict)  # unit -> [n, hidden] sum_t g^2 / T
    n_tokens: int = 0

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"{n}|out": e for n, e in self.out_energy.items()}
        out |= {f"{n}|rows": r for n, r in self.embed_rows.items()} | {
            f"{n}|embed": e for n, e in self.embed_energy.items()
        }
        return out | {"n_tokens": torch.tensor(self.n_tokens)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> OutputFisherStats:
        stats = cls(n_tokens=int(tensors["n_tokens"]))
        for key, value in tensors.items():
            name, _, kind = key.rpartition("|")
            target = {"out": stats.out_energy, "rows": stats.embed_rows, "embed": stats.embed_energy}.get(kind)
            if target is not None:
                target[name] = value
        return stats


@contextlib.contextmanager
def frozen(module: torch.nn.Module) -> Iterator[None]:
    """No parameter gradients (a model in memory may have requires_grad set): only activations'."""
    flags = {p: p.requires_grad for p in module.parameters()}
    for p in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


def _watch(modules: dict[str, torch.nn.Module], energy: dict[str, torch.Tensor]) -> list:
    """Forward hooks that add the squared gradient at each module's output to ``energy``."""

    def hook(name):
        def on_output(module, args, output):
            def accumulate(grad):
                energy[name] = energy.get(name, 0) + grad.detach().float().pow(2).reshape(-1, grad.shape[-1]).sum(0)

            output.register_hook(accumulate)

        return on_output

    return [m.register_forward_hook(hook(n)) for n, m in modules.items()]


def _head_backward(
    stack: LayerStack, last: torch.Tensor, seed: int, head_unit: str | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(gradient at the last layer's output ``[n, L, H]``, the head unit's summed squared output
    gradient ``[vocab]``), a few tokens at a time."""
    gen = torch.Generator().manual_seed(seed)
    head = stack.head()
    grad = torch.empty_like(last)
    energy: list[torch.Tensor] = []

    def add(g: torch.Tensor) -> None:
        energy.append(g.detach().pow(2).sum(0) + (energy.pop() if energy else 0))

    step = stack.token_chunk()
    for s in range(last.shape[0]):
        for start in range(0, last.shape[1], step):
            h = last[s, start : start + step].detach().clone().requires_grad_(True)
            raw = head.project(stack.tail(h)).float()
            if head_unit is not None:
                raw.register_hook(add)
            logp = torch.log_softmax(head.cap(raw), -1)
            sampled = torch.multinomial(logp.detach().exp(), 1, generator=gen)
            (-logp.gather(1, sampled).sum()).backward()
            grad[s, start : start + step] = h.grad
    return grad, (energy[0] if energy else None)


class OutputFisher(AnalysisPass):
    """Squared output gradients of every unit for labels sampled from the model (see module doc)."""

    name = "output_fisher"
    requires = (keys.UNITS, keys.CALIB, keys.LAYER_INPUTS)
    produces = (keys.OUTPUT_FISHER,)

    def analyze(self, ctx: AnalysisContext) -> PassResult:
        stack, store, units = ctx.stack, ctx.store, ctx[keys.UNITS]
        inputs = ctx[keys.LAYER_INPUTS]
        n = min(FISHER_SEQUENCES, inputs.count)
        ids = ctx[keys.CALIB][:n]
        micro = batches(ids)
        layers = stack.n_layers
        head_unit = stack.head_name if stack.head_name in units else None
        position = store.progress(self.name)
        bar = tqdm(total=layers + 2, desc="analysis: output gradients", unit="layer", disable=not ctx.progress)
        with frozen(stack.model):
            if position is None:
                began = time.perf_counter()
                with PeakWindow() as peak:
                    grad, energy = _head_backward(
                        stack, inputs.layer(layers, stack.device)[:n], ctx.settings.calib.seed, head_unit
                    )
                    tensors = {"gradient": grad} | ({} if energy is None else {f"{head_unit}|out": energy})
                    store.put_tensors(
                        "fisher/head.safetensors",
                        {k: v for k, v in tensors.items() if k != "gradient"} or {"none": torch.zeros(0)},
                    )
                    store.put_tensors(GRADIENT, {"gradient": grad})
                position = layers - 1
                store.record_step(
                    self.name,
                    position,
                    {"layer": "head", "seconds": time.perf_counter() - began, "peak_rss_bytes": peak.peak},
                )
            bar.update(1 + layers - 1 - position)
            calls = [stack.catch(b)[1] for b in micro]
            for index in range(position, -1, -1):
                began = time.perf_counter()
                with PeakWindow() as peak:
                    self._layer(ctx, index, n, micro, calls)
                store.record_step(
                    self.name,
                    index - 1,
                    {"layer": index, "seconds": time.perf_counter() - began, "peak_rss_bytes": peak.peak},
                )
                bar.update(1)
            if store.progress(self.name) == -1:
                self._embedding(ctx, micro)
                store.record_step(self.name, -2, {"layer": "embedding"})
            bar.update(1)
        bar.close()
        stats = self._collect(ctx, n * ids.shape[1])
        store.put_tensors(RESULT, stats.to_tensors())
        store.save_manifest()
        ctx.results[keys.OUTPUT_FISHER] = stats
        return PassResult(False, f"output gradients of {len(stats.out_energy)} units on {stats.n_tokens} tokens")

    def _layer(self, ctx: AnalysisContext, index: int, n: int, micro, calls) -> None:
        stack, store, units = ctx.stack, ctx.store, ctx[keys.UNITS]
        upstream = store.tensors(GRADIENT)["gradient"].to(stack.device)
        inputs = ctx[keys.LAYER_INPUTS].layer(index, stack.device)[:n]
        local = stack.layer_name(index) + "."
        mine = [name for name, u in units.items() if u.layer == index and u.embedding != name]
        energy: dict[str, torch.Tensor] = {}
        grad = torch.empty_like(inputs)
        row = 0
        with stack.layer(index) as layer:
            handles = _watch({name: layer.get_submodule(name[len(local) :]) for name in mine}, energy)
            try:
                for batch, call in zip(micro, calls):
                    size = batch.shape[0]
                    x = inputs[row : row + size].detach().clone().requires_grad_(True)
                    out = stack.run(layer, x, call[index])
                    out.backward(upstream[row : row + size])
                    grad[row : row + size] = x.grad
                    row += size
            finally:
                for handle in handles:
                    handle.remove()
        store.put_tensors(
            f"fisher/{index:04d}.safetensors", {f"{k}|out": v for k, v in energy.items()} or {"none": torch.zeros(0)}
        )
        store.put_tensors(GRADIENT, {"gradient": grad})

    def _embedding(self, ctx: AnalysisContext, micro) -> None:
        """Per-row squared gradients of the embedding rows read (a tied or untied embedding unit)."""
        stack, store, units = ctx.stack, ctx.store, ctx[keys.UNITS]
        readers = [n for n, u in units.items() if u.embedding is not None]
        if not readers:
            store.put_tensors("fisher/embedding.safetensors", {"none": torch.zeros(0)})
            return
        upstream = store.tensors(GRADIENT)["gradient"].to(stack.device)
        read, squares = [], []
        row = 0
        for batch in micro:
            hidden, _, embedding = stack.catch(batch, track=True)
            hidden.backward(upstream[row : row + batch.shape[0]])
            row += batch.shape[0]
            read += [ids.cpu() for ids, _ in embedding.looked_up]
            squares += [table.grad.pow(2).cpu() for _, table in embedding.looked_up]
        ids, where = torch.unique(torch.cat(read), return_inverse=True)
        energy = torch.zeros(ids.numel(), squares[0].shape[1]).index_add_(0, where, torch.cat(squares))
        tensors = {}
        for name in readers:
            tensors |= {f"{name}|rows": ids, f"{name}|embed": energy}
        store.put_tensors("fisher/embedding.safetensors", tensors)

    def _collect(self, ctx: AnalysisContext, n_tokens: int) -> OutputFisherStats:
        store, stack = ctx.store, ctx.stack
        stats = OutputFisherStats(n_tokens=n_tokens)
        files = ["fisher/head.safetensors", "fisher/embedding.safetensors"] + [
            f"fisher/{i:04d}.safetensors" for i in range(stack.n_layers)
        ]
        for file in files:
            for key, value in store.tensors(file).items():
                name, _, kind = key.rpartition("|")
                if kind == "out":
                    stats.out_energy[name] = value / n_tokens
                elif kind == "rows":
                    stats.embed_rows[name] = value
                elif kind == "embed":
                    stats.embed_energy[name] = value / n_tokens
        return stats

    def restore(self, ctx: AnalysisContext) -> None:
        ctx.results[keys.OUTPUT_FISHER] = OutputFisherStats.from_tensors(ctx.store.tensors(RESULT))
