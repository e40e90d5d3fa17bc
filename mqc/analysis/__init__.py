"""The analysis: everything mqc measures of a frozen float model before any plan is made.

``analyze(model, recipe, out=DIR)`` streams the model from its shards one decoder layer at a time
(:mod:`mqc.stream`) through the analysis passes the recipe needs, saving every product in ``DIR``
as it is made (:mod:`.store`): a killed run continues from its last finished layer, and a later
run at another size reuses the directory instead of analysing again. The product is an
:class:`Analysis`: the units, the calibration digest, the activation statistics, every unit's
candidates (on disk, read when a plan needs them), their costs, the KV costs and the model's
fingerprint. Plans are made from it by :func:`mqc.planning.plan`, in seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from mqc.analysis.calibration import Calibrate
from mqc.analysis.candidates import CandidateStore
from mqc.analysis.context import AnalysisContext, AnalysisPass
from mqc.analysis.fisher import OutputFisher
from mqc.analysis.kl_cost import PredictedKL
from mqc.analysis.settings import FISHER_SEQUENCES, AnalysisSettings
from mqc.analysis.store import WHAT, AnalysisStore, is_analysis
from mqc.analysis.sweep import LayerSweep, read_energies
from mqc.analysis.units import SelectUnits, read_tensors, read_units
from mqc.atomic import check_replaceable
from mqc.capture import capture
from mqc.errors import AnalysisError, MqcError
from mqc.graph import GraphView, KVSite
from mqc.models import cache_dir, model_source
from mqc.passes import keys
from mqc.passes.base import PassManager
from mqc.planning.costs import CostTable
from mqc.planning.types import WeightUnit
from mqc.recipe import Recipe
from mqc.size import ModelSize, TensorInfo, model_size
from mqc.stream.skeleton import open_model
from mqc.stream.source import ModuleSource, ShardSource, WeightSource
from mqc.stream.stack import LayerStack
from mqc.targets import GGUF

KEEP = 3  # analyses kept in the user cache (the most recently used)


def pipeline(settings: AnalysisSettings, calib: torch.Tensor | None = None) -> list[AnalysisPass]:
    """The analysis passes ``settings`` need; the manager orders them by their contracts."""
    passes: list[AnalysisPass] = [SelectUnits()]
    if settings.calib is not None:
        passes.append(Calibrate(calib))
    if settings.stats:
        keep = FISHER_SEQUENCES if settings.candidates else settings.calib.n_samples if settings.costs else 0
        passes.append(LayerSweep(candidates=settings.candidates, keep=keep))
    if settings.candidates:
        passes += [OutputFisher(), PredictedKL()]
    elif settings.costs is not None:
        from mqc.analysis.sensitivity import Sensitivity

        passes.append(Sensitivity())
    if settings.kv_costs is not None:
        from mqc.analysis.kv_costs import MeasureKVCosts

        passes.append(MeasureKVCosts())
    return passes


@dataclass(frozen=True)
class Analysis:
    """A finished analysis (see the module docstring); the candidates stay on disk."""

    root: Path
    fingerprint: str
    settings: AnalysisSettings
    recipe: Recipe  # the recipe it was made for (its plan fields are defaults)
    config: Any  # the model's Hugging Face config
    source_spec: str | None  # "default", the model directory, or None (a model in memory)
    units: dict[str, WeightUnit]
    tensors: list[TensorInfo]
    shared_inputs: list[tuple[str, ...]]
    kv_sites: list[KVSite]
    n_layers: int
    costs: CostTable | None
    kv_costs: Any
    stages: dict[str, Any]
    store: AnalysisStore = field(compare=False, repr=False)
    source: WeightSource | None = field(default=None, compare=False, repr=False)

    @property
    def candidates(self) -> CandidateStore | None:
        if not self.settings.candidates:
            return None
        plans = {n: self.settings.choices.plans(u) for n, u in self.units.items()}
        index = {n: [tuple(f) for f in files] for n, files in self.store.manifest["candidates"].items()}
        return CandidateStore(self.store, self.units, plans, index, self.weights())

    def weights(self) -> WeightSource:
        """The float model's tensors: the source it was analysed from."""
        if self.source is not None:
            return self.source
        if self.source_spec is None:
            raise AnalysisError(f"{self.root} was made from a model in memory; pass that model (model=...) to use it")
        return _shard_source(self.source_spec)

    def model_size(self, target: str) -> ModelSize:
        return model_size(self.tensors, set(self.units), gguf=target == GGUF)

    def calib(self) -> torch.Tensor:
        return self.store.tensors("calib.safetensors")["ids"]

    def act_stats(self) -> dict[str, torch.Tensor]:
        """Per-channel input energy of every unit and K/V projection (empty without a sweep)."""
        return read_energies(self.store, self.units, self.n_layers) if self.settings.stats else {}

    def size_bytes(self) -> int:
        return self.store.size_bytes()

    @classmethod
    def open(cls, root: str | os.PathLike, source: WeightSource | None = None) -> Analysis:
        """A finished analysis directory; refuses an unfinished or damaged one by name."""
        root = Path(root)
        store = AnalysisStore.open(root)
        m = store.manifest
        missing = [name for name in m["pipeline"] if name not in m["done"]]
        if missing:
            where = f" at layer {m['progress'].get(missing[0])}" if missing[0] in m["progress"] else ""
            raise AnalysisError(
                f"{root} is unfinished (stopped in {missing[0]}{where}); run `mqc analyze` with the same arguments to finish it"
            )
        settings = AnalysisSettings.from_dict(m["settings"])
        costs = CostTable.from_dict(store.json("costs.json")) if store.has("costs.json") else None
        kv_costs = None
        if store.has("kv_costs.json"):
            from mqc.analysis.kv_costs import read_kv_costs

            kv_costs = read_kv_costs(store.json("kv_costs.json"))
        return cls(
            root=root,
            fingerprint=m["fingerprint"],
            settings=settings,
            recipe=Recipe.from_dict(m["recipe"]),
            config=AutoConfig.from_pretrained(root, local_files_only=True),
            source_spec=m["source"],
            units=read_units(m),
            tensors=read_tensors(m),
            shared_inputs=[tuple(g) for g in m["graph"]["shared_inputs"]],
            kv_sites=[KVSite(*s) for s in m["graph"]["kv_sites"]],
            n_layers=m["n_layers"],
            costs=costs,
            kv_costs=kv_costs,
            stages=m["stages"],
            store=store,
            source=source,
        )


def _shard_source(spec: str) -> ShardSource:
    _, source, _, _ = open_model(spec)
    return source


def default_dir(fingerprint: str, settings: AnalysisSettings) -> Path:
    key = hashlib.sha256(
        json.dumps([fingerprint, settings.to_dict()], sort_keys=True, default=str).encode()
    ).hexdigest()[:20]
    return cache_dir() / "analysis" / key


def _prune_cache(keep: Path) -> None:
    """Remove cached analyses beyond the :data:`KEEP` most recently used (never ``keep``)."""
    root = cache_dir() / "analysis"
    entries = [p for p in root.iterdir() if is_analysis(p) and p != keep] if root.is_dir() else []
    entries.sort(key=lambda p: (p / "analysis.json").stat().st_mtime, reverse=True)
    for old in entries[KEEP - 1 :]:
        shutil.rmtree(old, ignore_errors=True)


def _open_model(model, device: str | None) -> tuple[LayerStack, GraphView, object, str | None]:
    """(stack, graph, tokenizer or None, source spec) of a model spec or a model in memory; the
    graph is captured before the stack loads any tensor (on the meta device for a skeleton)."""
    if isinstance(model, torch.nn.Module):
        model.eval()
        return LayerStack(model, ModuleSource(model)), GraphView(capture(model), model), None, model_source(model)
    skeleton, source, tokenizer, _ = open_model(model)
    graph = GraphView(capture(skeleton), skeleton)
    return LayerStack(skeleton, source, device or "cpu"), graph, tokenizer, model_source(skeleton)


def check_device(device: str | None) -> None:
    """Refuse a device this machine does not have before anything is read."""
    if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise MqcError(f"device {device!r}: no CUDA device is visible; use --device cpu (the default)")


def analyze(
    model: str | os.PathLike | torch.nn.Module | None = None,
    recipe: Recipe | None = None,
    out: str | os.PathLike | None = None,
    *,
    tokenizer=None,
    calib: torch.Tensor | None = None,
    force: bool = False,
    progress: bool = True,
    budgets: tuple[Recipe, ...] = (),
    device: str | None = None,
) -> Analysis:
    """Analyse ``model`` (a local model directory, ``None``/``"default"`` for the embedded model,
    or a model in memory) for ``recipe`` into ``out`` (default: a directory in the user cache, keyed
    by the model's fingerprint and the analysis settings). An existing analysis of the same model and
    settings is finished or reused; one of another model, or with other settings, is refused by
    name (``force`` starts it over). ``budgets``: recipes whose sizes are refused now, from the
    shapes alone, if no plan can meet them (before any expensive pass). ``device``: where a model
    directory's layers are run (``"cuda"``: one layer at a time on the GPU; a model in memory runs
    where it is)."""
    recipe = recipe or Recipe(method="mq")
    settings = AnalysisSettings.of(recipe)
    if out is not None and not is_analysis(Path(out)):  # refused before the model is even opened
        check_replaceable(Path(out), force, is_analysis, WHAT)
    check_device(device)
    stack, graph, loaded_tokenizer, spec = _open_model(model, device)
    tokenizer = tokenizer or loaded_tokenizer
    fingerprint = stack.source.fingerprint
    root = Path(out) if out is not None else default_dir(fingerprint, settings)
    passes = pipeline(settings, calib)
    store = _resume(root, fingerprint, settings, force)
    if store is None:
        header = {
            "fingerprint": fingerprint,
            "settings": settings.to_dict(),
            "recipe": recipe.to_dict(),
            "source": spec,
            "model_type": stack.config.model_type,
            "n_layers": stack.n_layers,
            "pipeline": [p.name for p in passes],
        }
        store = AnalysisStore.create(root, header, force=force)
        stack.config.save_pretrained(root)
        store.manifest["graph"] = {
            "shared_inputs": [list(g) for g in graph.shared_input_groups],
            "kv_sites": [[s.layer, s.k_proj, s.v_proj] for s in graph.kv_sites],
        }
        store.save_manifest()
    if out is None:
        _prune_cache(root)
    ctx = AnalysisContext(stack=stack, settings=settings, store=store, tokenizer=tokenizer, progress=progress)
    ctx.results[keys.GRAPH] = graph
    todo = []
    for p in PassManager(passes).ordered({keys.GRAPH}):
        if store.is_done(p.name):
            p.restore(ctx)
        else:
            todo.append(p)
    units = [p for p in todo if isinstance(p, SelectUnits)]
    PassManager(units).run(ctx)
    for budget in budgets:
        check_feasible(budget, ctx[keys.UNITS], ctx[keys.TENSORS], stack.config)
    PassManager([p for p in todo if p not in units]).run(ctx)
    os.utime(root / "analysis.json")  # most recently used
    source = stack.source if stack.source.resident else None
    analysis = Analysis.open(root, source)
    return analysis


def check_feasible(recipe: Recipe, units: dict[str, WeightUnit], tensors: list[TensorInfo], config) -> None:
    """Refuse a size no plan of ``recipe`` can meet, from the shapes alone."""
    if recipe.method != "mq":
        return
    from mqc.planning.budget import check_budget
    from mqc.planning.choices import ChoiceSet
    from mqc.planning.kv import kv_options

    reserved = kv_options(None, recipe.kv_quant, config).floor() if recipe.memory is not None else 0
    check_budget(
        recipe, ChoiceSet.of(recipe), units, model_size(tensors, set(units), gguf=recipe.target == GGUF), reserved
    )


def _resume(root: Path, fingerprint: str, settings: AnalysisSettings, force: bool) -> AnalysisStore | None:
    """The store to continue in ``root``, or None to create one."""
    if not is_analysis(root) or force:
        return None
    store = AnalysisStore.open(root)
    if store.manifest["fingerprint"] != fingerprint:
        raise AnalysisError(
            f"{root} is an analysis of another model (fingerprint {store.manifest['fingerprint'][:12]}, this model "
            f"{fingerprint[:12]}); choose another directory, or pass --force to start it over"
        )
    saved = AnalysisSettings.from_dict(store.manifest["settings"])
    finished = all(name in store.manifest["done"] for name in store.manifest["pipeline"])
    difference = saved.serves(settings) if finished else saved.difference(settings)
    if difference is not None:
        state = "was made" if finished else "was started"
        raise AnalysisError(
            f"{root} {state} with other analysis settings ({difference}); choose another directory, "
            "or pass --force to start it over"
        )
    return store
