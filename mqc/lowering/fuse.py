"""Fuse sibling quantized projections that read one input into one launch (DESIGN.md section 3).

From the graph's shared-input groups (q/k/v, gate/up), the members that are :class:`QLinear`
modules with the same bit-width, group size, input width, bias and outlier presence are fused
(:func:`mqc.runtime.fused.fusion_key`); a group whose members differ (mixed precision gives q
4 bits and v 8 bits) fuses each agreeing subset of two or more. The fused module is registered
on the siblings' parent as ``fused_<leaf>_<leaf>...`` and each sibling becomes a
:class:`FusedSlice` of it, so the HF model still calls ``q_proj(x)`` and still ``generate()``s,
with unchanged outputs: fusing only concatenates rows of the packed layout.

Runs after the weights are lowered (it needs the :class:`QLinear` modules) and, when the plan has a
compressed KV cache, after that rewrite too (pass ``after=(keys.KV_REWRITTEN,)``).

Fusion is a lowering for the GPU runtime, so it can also happen later: ``FuseSiblings(rewrite=
False)`` only records the groups (artifacts then keep one record and one set of tensors per
layer, as the ONNX exporter and the per-layer byte accounting read them), and
:func:`fuse_model` fuses a loaded model just before it moves to the GPU.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from mqc.capture import capture, module_path
from mqc.graph import _PASS_THROUGH
from mqc.lowering.context import LoweringContext
from mqc.passes import keys
from mqc.passes.base import Pass, PassResult
from mqc.runtime.fused import FusedQLinear, FusedSlice, fusion_key
from mqc.runtime.modules import QEmbedding, QLinear


def _parent_and_leaf(qualname: str) -> tuple[str, str]:
    parent, _, leaf = qualname.rpartition(".")
    return parent, leaf


def fusable_groups(model: torch.nn.Module, shared_input_groups: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """The subsets of each shared-input group that can share one launch, in graph order.

    Members must be plain :class:`QLinear` modules (not a tied embedding's table, which another
    module reads row by row), share a parent module and agree on :func:`fusion_key`.
    """
    modules = dict(model.named_modules())
    tables = {id(m.table) for m in modules.values() if isinstance(m, QEmbedding)}
    fused: list[tuple[str, ...]] = []
    for group in shared_input_groups:
        subsets: dict[tuple, list[str]] = defaultdict(list)
        for name in group:
            module = modules.get(name)
            if type(module) is QLinear and id(module) not in tables:
                subsets[(_parent_and_leaf(name)[0], fusion_key(module))].append(name)
        fused += [tuple(names) for names in subsets.values() if len(names) > 1]
    return fused


def fuse_group(model: torch.nn.Module, names: tuple[str, ...]) -> str:
    """Replace the sibling QLinears ``names`` by slices of one new fused module; its qualname."""
    parent, _ = _parent_and_leaf(names[0])
    fused_name = "fused_" + "_".join(_parent_and_leaf(n)[1] for n in names)
    target = f"{parent}.{fused_name}" if parent else fused_name
    fused = FusedQLinear.from_siblings([model.get_submodule(n) for n in names])
    model.get_submodule(parent).add_module(fused_name, fused)
    for index, name in enumerate(names):
        model.set_submodule(name, FusedSlice(fused, target, index))
    return target


def shared_input_qlinears(model: torch.nn.Module) -> list[tuple[str, ...]]:
    """Groups of quantized layers reading one tensor, from a capture of a compiled model (its
    layers are ``mqc::qlinear`` ops there, which :class:`~mqc.graph.GraphView` does not list)."""
    by_input: dict[str, list[str]] = defaultdict(list)
    for node in capture(model).graph_module.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.mqc.qlinear.default:
            source = node.args[0]
            while source.op == "call_function" and source.target in _PASS_THROUGH:
                source = source.args[0]
            by_input[source.name].append(module_path(node))
    return [tuple(group) for group in by_input.values() if len(group) > 1]


def fuse_model(model: torch.nn.Module, groups: list[tuple[str, ...]] | None = None) -> list[tuple[str, ...]]:
    """Fuse a compiled (or loaded) model in place; the groups fused. Without ``groups`` they are
    found by capturing the model (seconds on the CPU). Idempotent: fused siblings are no longer
    :class:`QLinear` modules, so a second call finds nothing."""
    if groups is None:
        if not any(type(m) is QLinear for m in model.modules()):
            return []  # a float model, or one already fused: nothing to capture for
        groups = fusable_groups(model, shared_input_qlinears(model))
    for names in groups:
        fuse_group(model, names)
    return groups


class FuseSiblings(Pass):
    """Fuse every fusable shared-input group (or, with ``rewrite=False``, only find them);
    records the groups under ``FUSION_GROUPS``."""

    name = "fuse"
    requires = (keys.WEIGHTS_LOWERED,)
    produces = (keys.FUSION_GROUPS,)

    def __init__(self, rewrite: bool = True, after: tuple[str, ...] = ()):
        """``after``: extra keys to wait for (e.g. ``KV_REWRITTEN``) so later rewrites see the
        original modules."""
        self.rewrite = rewrite
        if after:
            self.requires = type(self).requires + tuple(after)

    def run(self, ctx: LoweringContext) -> PassResult:
        groups = fusable_groups(ctx.model, ctx.analysis.shared_inputs)
        if self.rewrite:
            fuse_model(ctx.model, groups)
        ctx.results[keys.FUSION_GROUPS] = groups
        layers = sum(len(g) for g in groups)
        done = "fused" if self.rewrite else "fusable (recorded, not rewritten)"
        return PassResult(
            self.rewrite and bool(groups), f"{len(groups)} groups {done}: {len(groups)} launches instead of {layers}"
        )
