"""Which weight tensors a plan may quantize (units), read from the graph and the model's shapes.

A tied embedding and ``lm_head`` are one unit (one tensor, stored and counted once). Units come
from the graph's linears and embeddings, filtered by the settings (``skip`` patterns, embeddings
in or out, K/V projections kept float for a low-rank cache). The inventory of every stored
tensor is kept too, so that a plan can size the whole model on any target without the model.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re

from mqc.analysis.context import AnalysisContext, AnalysisPass
from mqc.passes import keys
from mqc.passes.base import PassResult
from mqc.planning.types import WeightUnit
from mqc.size import TensorInfo, inventory


def layer_index(qualname: str, prefix: str) -> int | None:
    """The decoder layer a module belongs to (``prefix``: the layer list's qualname)."""
    match = re.match(re.escape(prefix) + r"\.(\d+)\.", qualname)
    return int(match.group(1)) if match else None


class SelectUnits(AnalysisPass):
    name = "select_units"
    requires = (keys.GRAPH,)
    produces = (keys.UNITS, keys.TENSORS)

    def analyze(self, ctx: AnalysisContext) -> PassResult:
        graph, settings, stack = ctx[keys.GRAPH], ctx.settings, ctx.stack
        model = stack.model
        input_embedding, output_embedding = model.get_input_embeddings(), model.get_output_embeddings()
        tied = output_embedding is not None and input_embedding.weight is output_embedding.weight
        skip = set(settings.skip)
        if settings.lowrank_kv:  # K/V projections become low-rank factors, stored in fp16
            skip |= {name for site in graph.kv_sites for name in (site.k_proj, site.v_proj)}
        skipped = lambda name: any(fnmatch.fnmatchcase(name, pat) for pat in skip)  # noqa: E731
        units: dict[str, WeightUnit] = {}
        for site in graph.linears.values():
            is_head = site.qualname == stack.head_name
            if skipped(site.qualname) or (is_head and not settings.embeddings):
                continue
            units[site.qualname] = WeightUnit(
                site.qualname, site.out_features, site.in_features, site.has_bias, site.transposed,
                embedding=stack.embedding_name if (is_head and tied) else None,
                layer=layer_index(site.qualname, stack.prefix),
            )  # fmt: skip
        name = stack.embedding_name
        if settings.embeddings and not tied and not skipped(name):
            vocab, hidden = input_embedding.weight.shape
            units[name] = WeightUnit(name, vocab, hidden, False, embedding=name)
        ctx.results[keys.UNITS] = units
        ctx.results[keys.TENSORS] = inventory(model)
        ctx.store.manifest["units"] = [dataclasses.asdict(u) for u in units.values()]
        ctx.store.manifest["tensors"] = [dataclasses.asdict(t) for t in ctx.results[keys.TENSORS]]
        return PassResult(False, f"{len(units)} weight tensors selected")

    def restore(self, ctx: AnalysisContext) -> None:
        ctx.results[keys.UNITS] = read_units(ctx.store.manifest)
        ctx.results[keys.TENSORS] = read_tensors(ctx.store.manifest)


def read_units(manifest: dict) -> dict[str, WeightUnit]:
    return {u["qualname"]: WeightUnit(**u) for u in manifest["units"]}


def read_tensors(manifest: dict) -> list[TensorInfo]:
    return [TensorInfo(**{**t, "names": tuple(t["names"])}) for t in manifest["tensors"]]
