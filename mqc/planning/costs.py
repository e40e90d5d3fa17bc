"""The allocator's objective: what giving each unit each choice is predicted to cost."""

from __future__ import annotations

from dataclasses import dataclass, field

from mqc.planning.types import Choice, LayerPlan, choice_label, choice_of, parse_label


@dataclass
class CostTable:
    """``costs[unit][choice]``: the allocator's objective for giving ``unit`` that choice."""

    kind: str  # "predicted_kl", "first_order", "fisher"
    costs: dict[str, dict[Choice, float]] = field(default_factory=dict)
    errors: dict[str, dict[Choice, float]] = field(default_factory=dict)  # measured tr(dW H dW^T) (candidates only)

    def plan_cost(self, plan: dict[str, LayerPlan]) -> float:
        return sum(self.costs[name][choice_of(entry)] for name, entry in plan.items())

    def to_dict(self) -> dict:
        return {"kind": self.kind, "costs": _labelled(self.costs), "errors": _labelled(self.errors)}

    @classmethod
    def from_dict(cls, data: dict) -> CostTable:
        return cls(data["kind"], _parsed(data["costs"]), _parsed(data.get("errors", {})))


def _labelled(table: dict[str, dict[Choice, float]]) -> dict[str, dict[str, float]]:
    return {u: {choice_label(c): v for c, v in per.items()} for u, per in table.items()}


def _parsed(table: dict[str, dict[str, float]]) -> dict[str, dict[Choice, float]]:
    return {u: {parse_label(c): float(v) for c, v in per.items()} for u, per in table.items()}
