"""The calibration sweep: the float model run one decoder layer at a time over every calibration
sequence, measuring each layer's inputs and quantizing its units while the layer is loaded.

Per decoder layer: its weights come from the source, every micro-batch of the calibration runs
through it (the per-channel input energy ``E[x_j^2]`` of every linear and, for candidates, the
input Hessian ``E[x x^T]`` of every distinct input are accumulated by hooks: q/k/v share one,
gate/up share one), its units' candidates are made and written, its inputs for the backward
passes are kept, and the hidden states after it are saved, so that a killed sweep resumes at the
next layer. The weights are then released: peak memory is one layer, its Hessians and the
calibration activations, whatever the depth. After the last layer the tail (final norm) runs and
the head is measured and quantized a block of rows at a time (an untied embedding too, from its
rows: it has no input Hessian).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from mqc.analysis.candidates import CandidateStore, make_candidates, row_blocks, to_tensors
from mqc.analysis.context import AnalysisContext, AnalysisPass
from mqc.analysis.store import AnalysisStore
from mqc.memory import PeakWindow
from mqc.passes import keys
from mqc.passes.base import PassResult
from mqc.planning.types import WeightUnit
from mqc.stream.stack import batches

STATE = "state.safetensors"


def input_file(index: int) -> str:
    return f"inputs/{index:04d}.safetensors"


@dataclass(frozen=True)
class LayerInputs:
    """Inputs of every decoder layer (``n_layers``: the last layer's output, before the tail) for
    the first ``count`` calibration sequences, kept in the analysis directory."""

    store: AnalysisStore
    count: int
    n_layers: int

    def layer(self, index: int, device: torch.device | str = "cpu") -> torch.Tensor:
        return self.store.tensors(input_file(index))["hidden"].to(device)


class _Stats:
    """Forward pre-hooks that accumulate input energy and (for ``gram`` names) input Hessians."""

    def __init__(self, modules: dict[str, torch.nn.Module], gram: set[str]):
        self.sums: dict[str, torch.Tensor] = {}
        self.grams: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.handles = [m.register_forward_pre_hook(self._hook(n, n in gram)) for n, m in modules.items()]

    def _hook(self, name: str, gram: bool):
        def record(module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            self.sums[name] = self.sums.get(name, 0) + x.pow(2).sum(0)
            self.counts[name] = self.counts.get(name, 0) + x.shape[0]
            if gram:
                self.grams[name] = self.grams.get(name, 0) + x.T @ x

        return record

    def add(self, name: str, x: torch.Tensor, gram: bool) -> None:
        """Accumulate an input that no module hook sees (the head's, after the tail)."""
        x = x.detach().float().reshape(-1, x.shape[-1])
        self.sums[name] = self.sums.get(name, 0) + x.pow(2).sum(0)
        self.counts[name] = self.counts.get(name, 0) + x.shape[0]
        if gram:
            self.grams[name] = self.grams.get(name, 0) + x.T @ x

    def energy(self, name: str) -> torch.Tensor:
        return self.sums[name] / self.counts[name]

    def hessian(self, name: str) -> torch.Tensor:
        return self.grams[name] / self.counts[name]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def input_leaders(units: dict[str, WeightUnit], shared_inputs: list[tuple[str, ...]]) -> dict[str, str]:
    """unit -> the unit whose input it shares (itself when alone): one Hessian per input."""
    leader = {n: group[0] for group in shared_inputs for n in group}
    return {n: leader.get(n, n) for n, u in units.items() if u.embedding != n}


class LayerSweep(AnalysisPass):
    """Activation statistics (and, with ``candidates``, every unit's candidates) in one streamed
    pass over the calibration set; keeps the first ``keep`` sequences' layer inputs."""

    name = "sweep"
    requires = (keys.UNITS, keys.CALIB, keys.GRAPH)
    produces = (keys.ACT_STATS, keys.LAYER_INPUTS)

    def __init__(self, candidates: bool, keep: int):
        self.candidates, self.keep = candidates, keep
        if candidates:
            self.produces = (*type(self).produces, keys.CANDIDATES)

    # ---------------------------------------------------------------------------------------
    def analyze(self, ctx: AnalysisContext) -> PassResult:
        stack, store, units, graph = ctx.stack, ctx.store, ctx[keys.UNITS], ctx[keys.GRAPH]
        calib = ctx[keys.CALIB]
        micro = batches(calib)
        keep = min(self.keep, calib.shape[0])
        leaders = input_leaders(units, graph.shared_input_groups)
        start = store.progress(self.name, 0)
        heads = [u for u in units.values() if u.layer is None]
        bar = tqdm(total=stack.n_layers + len(heads), initial=min(start, stack.n_layers), desc="analysis: layers",
                   unit="layer", disable=not ctx.progress)  # fmt: skip
        catches = [stack.catch(ids) for ids in micro]
        calls = [c[1] for c in catches]
        hidden = (
            [c[0] for c in catches]
            if start == 0
            else list(store.tensors(STATE)["hidden"].to(stack.device).split(micro[0].shape[0]))
        )
        del catches
        store.manifest.setdefault("candidates", {})
        for index in range(start, stack.n_layers):
            began = time.perf_counter()
            with PeakWindow() as peak:
                hidden = self._layer(ctx, index, hidden, [c[index] for c in calls], leaders, keep)
            store.record_step(
                self.name,
                index + 1,
                {"layer": index, "seconds": time.perf_counter() - began, "peak_rss_bytes": peak.peak},
            )
            bar.update(1)
        if not store.has(input_file(stack.n_layers)):
            store.put_tensors(input_file(stack.n_layers), {"hidden": torch.cat(hidden)[:keep].contiguous()})
            store.save_manifest()
        with torch.no_grad():
            final = [stack.tail(h) for h in hidden]
        del hidden
        for unit in heads:
            began = time.perf_counter()
            with PeakWindow() as peak:
                self._rows_unit(ctx, unit, final)
            store.record_step(
                f"{self.name}.{unit.qualname}",
                True,
                {"unit": unit.qualname, "seconds": time.perf_counter() - began, "peak_rss_bytes": peak.peak},
            )
            bar.update(1)
        bar.close()
        self.restore(ctx)
        return PassResult(False, f"{stack.n_layers} layers" + (", candidates of every unit" if self.candidates else ""))

    def _layer(self, ctx, index, hidden, calls, leaders, keep) -> list[torch.Tensor]:
        stack, store, units, graph = ctx.stack, ctx.store, ctx[keys.UNITS], ctx[keys.GRAPH]
        mine = {n: u for n, u in units.items() if u.layer == index and u.embedding != n}
        names = set(mine) | {
            n for s in graph.kv_sites for n in (s.k_proj, s.v_proj) if n.startswith(stack.layer_name(index) + ".")
        }
        gptq = self.candidates and ctx.settings.quantizer == "gptq"
        gram = {leaders[n] for n in mine} if gptq else set()
        store.put_tensors(input_file(index), {"hidden": torch.cat(hidden)[:keep].contiguous()})
        with stack.layer(index) as layer, torch.no_grad():
            local = stack.layer_name(index) + "."
            stats = _Stats({n: layer.get_submodule(n[len(local) :]) for n in sorted(names)}, gram)
            try:
                outputs = [stack.run(layer, h, call) for h, call in zip(hidden, calls)]
            finally:
                stats.remove()
            tensors = {f"{n}|energy": stats.energy(n) for n in names}
            if self.candidates:
                for name, unit in mine.items():
                    weight = unit.oriented(layer.get_submodule(name[len(local) :]).weight)
                    plans = ctx.settings.choices.plans(unit)
                    hessian = stats.hessian(leaders[name]) if gptq else None
                    tensors.update(
                        to_tensors(name, make_candidates(weight, plans, hessian, stats.energy(name), name=name))
                    )
        file = f"layers/{index:04d}.safetensors"
        store.put_tensors(file, tensors)
        for name, unit in mine.items():
            store.manifest["candidates"][name] = [(file, 0, unit.out_features)]
        store.put_tensors(STATE, {"hidden": torch.cat(outputs)})
        return outputs

    def _rows_unit(self, ctx, unit: WeightUnit, final: list[torch.Tensor]) -> None:
        """The head (inputs: the tail's outputs) or an untied embedding (no inputs), by row blocks."""
        stack, store, name = ctx.stack, ctx.store, unit.qualname
        stats = _Stats({}, set())
        reads_hidden = unit.embedding != name
        if reads_hidden:
            for f in final:
                stats.add(name, f, self.candidates and ctx.settings.quantizer == "gptq")
        energy = stats.energy(name) if reads_hidden else None
        tensors = {} if energy is None else {f"{name}|energy": energy}
        store.put_tensors(f"units/{name}.safetensors", tensors)
        files = []
        if self.candidates:
            plans = ctx.settings.choices.plans(unit)
            hessian = stats.hessian(name) if reads_hidden and ctx.settings.quantizer == "gptq" else None
            for r0, r1 in row_blocks(unit, len(plans)):
                file = f"units/{name}/{r0:09d}.safetensors"
                if not store.has(file):
                    weight = unit.oriented(stack.source.rows(unit.tensor_name, r0, r1)).to(stack.device)
                    cands = make_candidates(weight, plans, hessian, energy, block=(r0, r1), name=name)
                    store.put_tensors(file, to_tensors(name, cands))
                    store.save_manifest()
                files.append((file, r0, r1))
        store.manifest["candidates"][name] = files
        store.save_manifest()

    # ---------------------------------------------------------------------------------------
    def restore(self, ctx: AnalysisContext) -> None:
        """Put the sweep's products (read back from the directory) into ``ctx``."""
        store, units, stack = ctx.store, ctx[keys.UNITS], ctx.stack
        ctx.results[keys.ACT_STATS] = read_energies(store, units, stack.n_layers)
        count = min(self.keep, ctx[keys.CALIB].shape[0])
        ctx.results[keys.LAYER_INPUTS] = LayerInputs(store, count, stack.n_layers)
        if self.candidates:
            plans = {n: ctx.settings.choices.plans(u) for n, u in units.items()}
            index = {n: [tuple(f) for f in files] for n, files in store.manifest["candidates"].items()}
            ctx.results[keys.CANDIDATES] = CandidateStore(store, units, plans, index, stack.source)


def read_energies(store: AnalysisStore, units: dict[str, WeightUnit], n_layers: int) -> dict[str, torch.Tensor]:
    """The input energy the sweep saved for every unit and K/V projection."""
    energy: dict[str, torch.Tensor] = {}
    files = [f"layers/{i:04d}.safetensors" for i in range(n_layers)]
    files += [f"units/{u.qualname}.safetensors" for u in units.values() if u.layer is None]
    for file in files:
        found = store.tensors(file, [k for k in store.keys(file) if k.endswith("|energy")])
        energy.update({k.rsplit("|", 1)[0]: v for k, v in found.items()})
    return energy
