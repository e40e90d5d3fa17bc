"""The pass framework: small pass objects with declared contracts, and a manager that checks them.

Modelled on ``torch.fx.passes.infra``: a pass states the context keys it ``requires`` and
``produces``; :class:`PassManager` orders passes so every requirement is produced first
(networkx topological sort, a cycle is an error), checks each contract before and after the
pass runs, and times every pass. A pass that changes the model (swaps modules, rounds weights,
installs a cache) says so in what it produces (``keys.WEIGHTS_LOWERED``, ``keys.KV_REWRITTEN``),
and one that must come after such a change requires it, so no order holds by list position.

The two phases that run passes have their own contexts: the analysis
(:class:`mqc.analysis.context.AnalysisContext`: a streamed float model and the analysis
directory) and the lowering (:class:`mqc.lowering.context.LoweringContext`: the model being built).
A pass can be run alone on a context that already holds its requirements.
"""

from __future__ import annotations

import resource
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import networkx as nx

from mqc.errors import PassContractError


@dataclass
class Context:
    """What a pipeline reads and writes: keyed results, and the time and memory of every pass."""

    results: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: dict[str, float] = field(default_factory=dict)  # process peak after each pass
    progress: bool = True

    def __getitem__(self, key: str) -> Any:
        return self.results[key]

    def __contains__(self, key: str) -> bool:
        return key in self.results


@dataclass(frozen=True)
class PassResult:
    changed: bool
    summary: str = ""


class Pass(ABC):
    name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()
    produces: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def run(self, ctx: Context) -> PassResult: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class PassManager:
    def __init__(self, passes: list[Pass]):
        self.passes = list(passes)

    def ordered(self, available: set[str] = frozenset()) -> list[Pass]:
        """Passes in an order where each requirement is produced before it is read."""
        producers: dict[str, Pass] = {}
        for p in self.passes:
            for key in p.produces:
                if key in producers:
                    raise PassContractError(f"{key!r} is produced by both {producers[key].name} and {p.name}")
                producers[key] = p
        dag = nx.DiGraph()
        for index, p in enumerate(self.passes):
            dag.add_node(index)
        index_of = {id(p): i for i, p in enumerate(self.passes)}
        for i, p in enumerate(self.passes):
            for key in p.requires:
                if key in producers:
                    dag.add_edge(index_of[id(producers[key])], i)
                elif key not in available:
                    raise PassContractError(
                        f"pass {p.name} requires {key!r}, which no pass in the pipeline produces "
                        "and the context does not hold"
                    )
        try:
            order = list(nx.lexicographical_topological_sort(dag))
        except nx.NetworkXUnfeasible:
            cycle = nx.find_cycle(dag)
            names = " -> ".join(self.passes[a].name for a, _ in cycle)
            raise PassContractError(f"passes form a cycle: {names}") from None
        return [self.passes[i] for i in order]

    def run(self, ctx: Context) -> dict[str, PassResult]:
        results: dict[str, PassResult] = {}
        producer_of = {key: p.name for p in self.passes for key in p.produces}
        for p in self.ordered(set(ctx.results)):
            missing = [k for k in p.requires if k not in ctx]
            if missing:
                raise PassContractError(
                    f"pass {p.name} needs {missing[0]!r}, which {producer_of.get(missing[0], 'no pass')} "
                    "should have produced"
                )
            start = time.perf_counter()
            results[p.name] = p.run(ctx)
            ctx.timings[p.name] = ctx.timings.get(p.name, 0.0) + time.perf_counter() - start
            ctx.peak_rss_mib[p.name] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            absent = [k for k in p.produces if k not in ctx]
            if absent:
                raise PassContractError(f"pass {p.name} declared {absent[0]!r} but did not produce it")
        return results
