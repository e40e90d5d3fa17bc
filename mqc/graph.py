"""A networkx view of a captured graph: the facts the passes plan with.

Found from the graph, not from module names, so that any supported family works the same way:
* every quantizable linear (``aten.linear`` or GPT-2 Conv1D's ``aten.addmm``) and its module;
* groups of linears that read the same input (q/k/v, gate/up): candidates for fused launches;
* the K and V projections of each attention op: the nearest linear ancestors of the key and
  value operands of ``scaled_dot_product_attention`` (or, for eager attention, of the two
  matmuls around the softmax).
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass

import networkx as nx
import torch

from mqc.capture import Captured, module_path
from mqc.errors import UnsupportedModelError

_LINEAR = torch.ops.aten.linear.default
_ADDMM = torch.ops.aten.addmm.default
_EMBEDDING = torch.ops.aten.embedding.default
_SDPA = torch.ops.aten.scaled_dot_product_attention.default
_SOFTMAX = {torch.ops.aten.softmax.int, torch.ops.aten._softmax.default}
_MATMUL = {torch.ops.aten.matmul.default, torch.ops.aten.bmm.default}
_PASS_THROUGH = {
    torch.ops.aten.view.default,
    torch.ops.aten.reshape.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.contiguous.default,
    torch.ops.aten.clone.default,
    torch.ops.aten.to.dtype,
    torch.ops.aten._to_copy.default,
}


@dataclass(frozen=True)
class LinearSite:
    """One quantizable linear as the graph sees it."""

    qualname: str
    node: str
    out_features: int
    in_features: int
    transposed: bool  # GPT-2 Conv1D stores weight as [in, out]
    has_bias: bool


@dataclass(frozen=True)
class KVSite:
    """The K and V projections feeding one attention op."""

    layer: int
    k_proj: str
    v_proj: str


class GraphView:
    """Read-only analysis of a captured FX graph."""

    def __init__(self, captured: Captured, model: torch.nn.Module):
        self.graph_module = captured.graph_module
        self.model_type = captured.model_type
        self.nx = nx.DiGraph()
        nodes = list(self.graph_module.graph.nodes)
        for node in nodes:
            self.nx.add_node(node.name, fx=node)
            for src in node.all_input_nodes:
                self.nx.add_edge(src.name, node.name)
        modules = dict(model.named_modules())
        self.linears: dict[str, LinearSite] = {}
        self._linear_by_node: dict[str, str] = {}
        for node in nodes:
            if node.op == "call_function" and node.target in (_LINEAR, _ADDMM):
                site = self._linear_site(node, modules)
                if site is not None and site.qualname not in self.linears:
                    self.linears[site.qualname] = site
                    self._linear_by_node[node.name] = site.qualname
        self.embeddings = sorted(
            {module_path(n) for n in nodes if n.op == "call_function" and n.target == _EMBEDDING} - {None}
        )
        self.shared_input_groups = self._shared_input_groups(nodes)
        self.kv_sites = self._kv_sites(nodes)

    def _linear_site(self, node: torch.fx.Node, modules: dict) -> LinearSite | None:
        qualname = module_path(node)
        module = modules.get(qualname)
        weight = getattr(module, "weight", None)
        if weight is None or weight.ndim != 2:
            return None
        transposed = node.target == _ADDMM
        out_f, in_f = (weight.shape[1], weight.shape[0]) if transposed else tuple(weight.shape)
        bias = getattr(module, "bias", None)
        return LinearSite(qualname, node.name, out_f, in_f, transposed, bias is not None)

    def _source(self, node: torch.fx.Node) -> torch.fx.Node:
        """Walk up through views and casts to the tensor a linear really reads."""
        while node.op == "call_function" and node.target in _PASS_THROUGH:
            node = node.args[0]
        return node

    def _linear_input(self, node: torch.fx.Node) -> torch.fx.Node:
        return self._source(node.args[1] if node.target == _ADDMM else node.args[0])

    def _shared_input_groups(self, nodes) -> list[tuple[str, ...]]:
        by_input: dict[str, list[str]] = defaultdict(list)
        for node in nodes:
            qualname = self._linear_by_node.get(node.name)
            if qualname is not None:
                by_input[self._linear_input(node).name].append(qualname)
        return [tuple(group) for group in by_input.values() if len(group) > 1]

    def nearest_linears(self, node: torch.fx.Node) -> list[str]:
        """Linears reached walking backwards from ``node`` without passing through a linear."""
        found, seen, queue = [], {node.name}, deque([node])
        while queue:
            current = queue.popleft()
            qualname = self._linear_by_node.get(current.name)
            if qualname is not None:
                found.append(qualname)
                continue
            for src in current.all_input_nodes:
                if src.name not in seen:
                    seen.add(src.name)
                    queue.append(src)
        return found

    def _kv_sites(self, nodes) -> list[KVSite]:
        pairs: list[tuple[torch.fx.Node, torch.fx.Node]] = []
        for node in nodes:
            if node.op != "call_function":
                continue
            if node.target == _SDPA:
                pairs.append((node.args[1], node.args[2]))
            elif node.target in _SOFTMAX:
                scores = self._upstream_matmul(node)
                probs_v = self._downstream_matmul(node)
                if scores is not None and probs_v is not None:
                    pairs.append((scores.args[1], probs_v.args[1]))
        sites = []
        for layer, (key, value) in enumerate(pairs):
            k_lin, v_lin = self.nearest_linears(key), self.nearest_linears(value)
            if len(k_lin) != 1 or len(v_lin) != 1:
                raise UnsupportedModelError(
                    f"{self.model_type}: attention {layer} has key/value projections {k_lin}/{v_lin}; "
                    "expected exactly one linear each"
                )
            sites.append(KVSite(layer, k_lin[0], v_lin[0]))
        return sites

    def _downstream_matmul(self, node: torch.fx.Node) -> torch.fx.Node | None:
        """Follow the softmax through casts and dropout to the matmul with V."""
        for _ in range(8):
            users = [u for u in node.users if u.target != torch.ops.aten._assert_tensor_metadata.default]
            if len(users) != 1:
                return None
            node = users[0]
            if node.target in _MATMUL:
                return node
        return None

    def _upstream_matmul(self, node: torch.fx.Node) -> torch.fx.Node | None:
        current = node.args[0]
        while current.op == "call_function" and current.target not in _MATMUL:
            tensors = [a for a in current.args if isinstance(a, torch.fx.Node)]
            if not tensors:
                return None
            current = tensors[0]
        return current if current.op == "call_function" else None
