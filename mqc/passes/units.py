"""Select the weight tensors a plan may quantize, and describe each plan entry.

A *unit* is one stored weight tensor: usually one linear, but a tied embedding and ``lm_head``
are one unit (one tensor, stored and counted once). Units come from the graph's linears and
embeddings, filtered by the recipe (``skip`` patterns, ``quantize_embeddings``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass

import torch

from mqc import quant, quant_ggml
from mqc.passes import keys
from mqc.passes.base import CompileContext, Pass, PassResult
from mqc.size import model_size
from mqc.targets import GGUF, TARGETS


@dataclass(frozen=True)
class WeightUnit:
    qualname: str  # the module whose weight is quantized (lm_head for a tied pair)
    out_features: int
    in_features: int
    has_bias: bool
    transposed: bool = False  # GPT-2 Conv1D
    embedding: str | None = None  # embedding module reading this tensor (tied) or being it
    tied_choice: tuple[str, ...] = ()  # siblings that must share its format (see allocation_groups)

    @property
    def n_weights(self) -> int:
        return self.out_features * self.in_features

    def weight(self, model: torch.nn.Module) -> torch.Tensor:
        """The unit's weight as ``[out, in]`` float32 (a view, not a copy, where possible)."""
        module = model.get_submodule(self.qualname)
        weight = module.weight.detach()
        return (weight.t() if self.transposed else weight).float()


@dataclass(frozen=True)
class LayerPlan:
    """What the plan decided for one unit, and the exact bytes that costs.

    ``fmt`` names a llama.cpp type (:mod:`mqc.quant_ggml`) when the plan targets GGUF; ``bits``
    and ``group_size`` are then its code width and block (16 and 0 for F16), and the bias is
    priced as GGUF stores it, in F32. Otherwise the layer is priced as its ``target`` stores it
    (:mod:`mqc.targets`: 3-bit codes are 4-bit codes in ONNX, outliers ELL there).
    """

    qualname: str
    bits: int
    group_size: int
    n_outliers: int
    out_features: int
    in_features: int
    has_bias: bool
    fmt: str | None = None
    target: str = "torch"

    @property
    def nbytes(self) -> int:
        if self.fmt is not None:
            bias = 4 * self.out_features if self.has_bias else 0
            return quant_ggml.tensor_bytes(self.fmt, self.out_features, self.in_features) + bias
        return TARGETS[self.target].layer_bytes(
            self.out_features, self.in_features, self.bits, self.group_size, self.n_outliers, self.has_bias
        )

    @property
    def n_weights(self) -> int:
        return self.out_features * self.in_features


Choice = tuple[int, int | None] | str  # (bits, group size; None for 16-bit) or a llama.cpp type name


def choices(recipe) -> list[Choice]:
    """Every option the allocator may give a layer: (bits, group size) pairs of the widths the
    target stores natively (another width would cost the next native one's bytes at its own,
    larger error), or the recipe's llama.cpp types when it targets GGUF."""
    if recipe.target == GGUF:
        return list(recipe.gguf_choice_types)
    target = TARGETS[recipe.target]
    out: list[Choice] = [(b, g) for b in recipe.quant_bits if target.native(b) for g in recipe.group_sizes]
    return out + ([(quant.FP16_BITS, None)] if quant.FP16_BITS in recipe.allowed_bits else [])


def choice_bits(choice: Choice) -> int:
    if isinstance(choice, str):
        return quant.FP16_BITS if choice == quant_ggml.F16 else quant_ggml.TYPES[choice].bits
    return choice[0]


def choice_label(choice: Choice) -> str:
    if isinstance(choice, str):
        return choice
    bits, group = choice
    return str(bits) if group is None else f"{bits}/g{group}"


def plan_entry(unit: WeightUnit, bits: int, group_size: int, outlier_frac: float, target: str = "torch") -> LayerPlan:
    """``unit`` at ``bits`` / ``group_size``, priced as ``target`` stores it."""
    n_out = 0 if bits == quant.FP16_BITS else TARGETS[target].n_outliers(unit.out_features, unit.in_features, outlier_frac)
    return LayerPlan(
        unit.qualname, bits, group_size, n_out, unit.out_features, unit.in_features, unit.has_bias, target=target
    )


def outliers_per_row(entry: LayerPlan) -> bool:
    """Whether ``entry``'s outliers are chosen per output row (an equal count in each: ELL)."""
    return entry.fmt is None and TARGETS[entry.target].outliers_per_row


def plan_for(unit: WeightUnit, choice: Choice, recipe) -> LayerPlan:
    """The plan entry giving ``unit`` the option ``choice``."""
    if isinstance(choice, str):
        block = 0 if choice == quant_ggml.F16 else quant_ggml.TYPES[choice].block
        u = unit
        bits = choice_bits(choice)
        return LayerPlan(u.qualname, bits, block, 0, u.out_features, u.in_features, u.has_bias, choice, GGUF)
    bits, group = choice
    return plan_entry(unit, bits, group or recipe.group_size, recipe.outlier_frac, recipe.target)


def unit_choices(unit: WeightUnit, recipe) -> list[Choice]:
    """The options ``unit`` can be stored in: a llama.cpp type only where its rows are whole blocks."""
    return [c for c in choices(recipe) if not isinstance(c, str) or quant_ggml.fits(c, unit.in_features)]


def allowed_choices(unit: WeightUnit, recipe) -> list[Choice]:
    """The options of a unit after its pins (``min_bits``: the code width)."""
    floor = max([p.min_bits for p in recipe.pins if fnmatch.fnmatchcase(unit.qualname, p.pattern)], default=0)
    return [c for c in unit_choices(unit, recipe) if choice_bits(c) >= floor]


def choice_plans(unit: WeightUnit, recipe) -> dict[Choice, LayerPlan]:
    """The plan entry of every option ``unit`` can take (pins not applied)."""
    return {c: plan_for(unit, c, recipe) for c in unit_choices(unit, recipe)}


def choice_of(entry: LayerPlan) -> Choice:
    if entry.fmt is not None:
        return entry.fmt
    return (entry.bits, None) if entry.bits == quant.FP16_BITS else (entry.bits, entry.group_size)


def allocation_groups(units: dict[str, WeightUnit]) -> list[tuple[str, ...]]:
    """Units allocated together, one choice for all: siblings that read the same input where the
    target runs them as one fused matmul only when their formats agree (onnxruntime's
    ``MatMulNBits``, the CUDA GEMV; :mod:`mqc.targets`), so that a plan never pays three launches
    for q/k/v; every other unit alone."""
    groups = dict.fromkeys(u.tied_choice or (name,) for name, u in units.items())
    return list(groups)


def common_choices(group: tuple[str, ...], units: dict[str, WeightUnit], recipe) -> list[Choice]:
    """The choices every unit of ``group`` may take (pins applied)."""
    allowed = [allowed_choices(units[name], recipe) for name in group]
    return [c for c in allowed[0] if all(c in other for other in allowed[1:])]


def plan_bytes(plan: dict[str, LayerPlan]) -> int:
    return sum(p.nbytes for p in plan.values())


def plan_average_bits(plan: dict[str, LayerPlan]) -> float:
    return quant.average_bits(plan_bytes(plan), sum(p.n_weights for p in plan.values()))


class SelectUnits(Pass):
    """Which tensors are candidates: every graph linear and (if asked) the embeddings."""

    name = "select_units"
    requires = (keys.GRAPH,)
    produces = (keys.UNITS, keys.MODEL_SIZE)

    def run(self, ctx: CompileContext) -> PassResult:
        graph, recipe, model = ctx[keys.GRAPH], ctx.recipe, ctx.model
        input_embedding = model.get_input_embeddings()
        output_embedding = model.get_output_embeddings()
        emb_name = next((n for n, m in model.named_modules() if m is input_embedding), None)
        head_name = next((n for n, m in model.named_modules() if m is output_embedding), None)
        tied = (
            input_embedding is not None
            and output_embedding is not None
            and input_embedding.weight.data_ptr() == output_embedding.weight.data_ptr()
        )
        skip = set(recipe.skip)
        if recipe.kv is not None:  # K/V projections become low-rank factors, stored in fp16
            skip |= {name for site in graph.kv_sites for name in (site.k_proj, site.v_proj)}
        skipped = lambda name: any(fnmatch.fnmatchcase(name, pat) for pat in skip)  # noqa: E731
        units: dict[str, WeightUnit] = {}
        for site in graph.linears.values():
            is_head = site.qualname == head_name
            if skipped(site.qualname) or (is_head and not recipe.embeddings_included):
                continue
            units[site.qualname] = WeightUnit(
                site.qualname, site.out_features, site.in_features, site.has_bias, site.transposed,
                embedding=emb_name if (is_head and tied) else None,
            )  # fmt: skip
        if recipe.embeddings_included and not tied and emb_name and not skipped(emb_name):
            vocab, hidden = input_embedding.weight.shape
            units[emb_name] = WeightUnit(emb_name, vocab, hidden, False, embedding=emb_name)
        if recipe.method == "mq" and recipe.target in TARGETS and TARGETS[recipe.target].fuses_siblings:
            for group in graph.shared_input_groups:
                if all(n in units for n in group) and len({units[n].in_features for n in group}) == 1:
                    for n in group:
                        units[n] = dataclasses.replace(units[n], tied_choice=tuple(group))
        ctx.results[keys.UNITS] = units
        ctx.results[keys.MODEL_SIZE] = model_size(model, set(units), gguf=recipe.target == GGUF)
        return PassResult(False, f"{len(units)} weight tensors selected")
