"""What the analysis passes share: the float model as a stack streamed from its source, the
analysis directory their products are saved in as they are made, and the settings."""

from __future__ import annotations

import time
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

from mqc.analysis.settings import AnalysisSettings
from mqc.analysis.store import AnalysisStore
from mqc.memory import PeakWindow
from mqc.passes.base import Context, Pass, PassResult
from mqc.stream.stack import LayerStack


@dataclass
class AnalysisContext(Context):
    stack: LayerStack | None = None
    settings: AnalysisSettings | None = None
    store: AnalysisStore | None = None
    tokenizer: Any = None


class AnalysisPass(Pass):
    """A pass of the analysis: its products are saved in the analysis directory as it makes them,
    and :meth:`restore` reads them back when a later run finds the pass finished."""

    def run(self, ctx: AnalysisContext) -> PassResult:
        began = time.perf_counter()
        with PeakWindow() as peak:
            result = self.analyze(ctx)
        ctx.store.finish(self.name, time.perf_counter() - began, peak.peak, summary=result.summary)
        return result

    @abstractmethod
    def analyze(self, ctx: AnalysisContext) -> PassResult: ...

    @abstractmethod
    def restore(self, ctx: AnalysisContext) -> None:
        """Put the products of a finished run of this pass (read from ``ctx.store``) into ``ctx``."""
