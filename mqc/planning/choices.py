"""The formats a plan may give each unit, priced as the target stores them.

A :class:`ChoiceSet` is fixed by the analysis (its candidates exist for exactly these choices) and
read by the allocator, the search and the lowering. On targets that run siblings reading one
input (q/k/v, gate/up) as one fused matmul only when their formats agree (onnxruntime's
``MatMulNBits``, the CUDA GEMV; :mod:`mqc.targets`), siblings are allocated together, one choice
for all (:meth:`ChoiceSet.groups`), so that a plan never pays three launches for q/k/v.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from mqc import quant, quant_ggml
from mqc.planning.types import Choice, LayerPlan, WeightUnit, choice_bits, gguf_entry, plan_entry
from mqc.targets import GGUF, TARGETS


@dataclass(frozen=True)
class ChoiceSet:
    target: str
    bits: tuple[int, ...]  # allowed widths, 16 (float16) included when allowed
    group_sizes: tuple[int, ...]
    outlier_frac: float = 0.0
    gguf_types: tuple[str, ...] = ()  # target gguf: llama.cpp types to choose from

    @classmethod
    def of(cls, recipe) -> ChoiceSet:
        """The choices of a :class:`~mqc.recipe.Recipe`."""
        return cls(
            recipe.target, tuple(recipe.allowed_bits), recipe.group_sizes, recipe.outlier_frac, recipe.gguf_choice_types
        )

    def options(self) -> list[Choice]:
        """Every option of the set: (bits, group size) pairs of the widths the target stores natively
        (another width would cost the next native one's bytes at its own, larger error), or the
        llama.cpp types when it targets GGUF."""
        if self.target == GGUF:
            return list(self.gguf_types)
        target = TARGETS[self.target]
        out: list[Choice] = [
            (b, g) for b in self.bits if b in quant.QUANT_BITS and target.native(b) for g in self.group_sizes
        ]
        return out + ([(quant.FP16_BITS, None)] if quant.FP16_BITS in self.bits else [])

    def plan_for(self, unit: WeightUnit, choice: Choice) -> LayerPlan:
        if isinstance(choice, str):
            return gguf_entry(unit, choice)
        bits, group = choice
        return plan_entry(unit, bits, group or self.group_sizes[-1], self.outlier_frac, self.target)

    def unit_choices(self, unit: WeightUnit) -> list[Choice]:
        """The options ``unit`` can be stored in: a llama.cpp type only where its rows are whole blocks."""
        return [c for c in self.options() if not isinstance(c, str) or quant_ggml.fits(c, unit.in_features)]

    def plans(self, unit: WeightUnit) -> dict[Choice, LayerPlan]:
        return {c: self.plan_for(unit, c) for c in self.unit_choices(unit)}

    def allowed(self, unit: WeightUnit, pins: tuple = ()) -> list[Choice]:
        """The options of a unit after its pins (``min_bits``: the code width)."""
        floor = max([p.min_bits for p in pins if fnmatch.fnmatchcase(unit.qualname, p.pattern)], default=0)
        return [c for c in self.unit_choices(unit) if choice_bits(c) >= floor]

    def groups(self, units: dict[str, WeightUnit], shared_inputs: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
        """Units allocated together (one choice for all): sibling groups the target fuses, every
        other unit alone, in unit order."""
        together: dict[str, tuple[str, ...]] = {}
        if self.target in TARGETS and TARGETS[self.target].fuses_siblings:
            for group in shared_inputs:
                if all(n in units for n in group) and len({units[n].in_features for n in group}) == 1:
                    together.update({n: tuple(group) for n in group})
        return list(dict.fromkeys(together.get(name, (name,)) for name in units))

    def common(self, group: tuple[str, ...], units: dict[str, WeightUnit], pins: tuple = ()) -> list[Choice]:
        """The choices every unit of ``group`` may take (pins applied)."""
        allowed = [self.allowed(units[name], pins) for name in group]
        return [c for c in allowed[0] if all(c in other for other in allowed[1:])]
