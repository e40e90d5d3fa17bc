"""Every unit quantized at every allowed choice, as the lowering will deploy it, kept on disk.

The allocator prices a choice by the error of the weights that will really be stored, so each
candidate is the quantizer's actual output: act-order GPTQ on the unit's input Hessian from the
full-precision model (round-to-nearest with ``quantizer="rtn"``, and for an untied embedding,
which has no input activations). All grids of a unit share one GPTQ column loop
(:func:`mqc.quant.gptq_batch`). The chosen candidates are swapped in unchanged by the lowering,
so the deployed model is exactly the one the costs and the search measured.

With outliers, the positions are chosen under the same quantizer that keeps them: GPTQ runs once
without outliers, the weights with the largest ``(W - W_gptq)^2 * E[x_j^2]`` become the mask, and
GPTQ runs again with them held exact.

A plan for GGUF (``target="gguf"``) has llama.cpp's types as choices: each is encoded by
:func:`mqc.quant_ggml.encode_batch` (grids fitted per block, GPTQ onto them) into the very bytes
the GGUF file will hold, and a type is offered only to units whose rows are whole blocks of it.

Each candidate also records its per-output-channel error ``diag(dW H dW^T)`` (the mean squared
error each output channel sees on calibration inputs), from which the cost models are built.

Rows of a weight are independent given its Hessian, so a large embedding or head is quantized a
block of rows at a time (:func:`row_blocks`) and each block is its own file; outliers are shared
out between blocks exactly (:func:`mqc.quant.split_count`), so the plan's counts still hold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mqc import quant, quant_ggml
from mqc.analysis.store import AnalysisStore
from mqc.planning.types import Choice, LayerPlan, WeightUnit, choice_label
from mqc.stream.source import WeightSource
from mqc.stream.stack import source_rows

BLOCK_ELEMENTS = 1 << 27  # weights x choices quantized at a time (a row block of an embedding or head)
_FIELDS = ("qweight", "scales", "qzeros")
_OUTLIER_FIELDS = ("crow", "col", "values")


@dataclass(frozen=True)
class Candidate:
    plan: LayerPlan
    weight: quant.QuantizedWeight | quant_ggml.GgmlWeight | None  # None: the layer stays in fp16
    outliers: quant.SparseOutliers | None
    row_error: torch.Tensor  # [out] diag(dW H dW^T)


def row_error(delta: torch.Tensor, hessian: torch.Tensor | None) -> torch.Tensor:
    """``diag(delta H delta^T)``; the plain squared row norm without a Hessian."""
    if hessian is None:
        return delta.pow(2).sum(1)
    return ((delta @ hessian) * delta).sum(1)


def row_blocks(unit: WeightUnit, n_choices: int) -> list[tuple[int, int]]:
    """Row ranges quantized together: the whole unit, unless it is larger than :data:`BLOCK_ELEMENTS`
    weights over ``n_choices`` choices (a single choice counts as 8: rounding makes a few
    temporaries of the block's size)."""
    rows = max(1, BLOCK_ELEMENTS // max(1, unit.in_features * max(n_choices, 8)))
    return [(r0, min(r0 + rows, unit.out_features)) for r0 in range(0, unit.out_features, rows)]


def _dense(qw: quant.QuantizedWeight, sparse: quant.SparseOutliers | None) -> torch.Tensor:
    dense = quant.dequantize(qw)
    return dense if sparse is None else sparse.add_to(dense)


def make_candidates(
    weight: torch.Tensor,
    plans: dict[Choice, LayerPlan],
    hessian: torch.Tensor | None,
    energy: torch.Tensor | None = None,
    block: tuple[int, int] | None = None,
    name: str | None = None,
) -> dict[Choice, Candidate]:
    """Every option of one unit's rows ``block`` (``weight`` holds just those rows); GPTQ when
    ``hessian`` is given, round-to-nearest otherwise."""
    quant.check_finite(weight, name)
    rows = plans[next(iter(plans))].out_features
    start, stop = block or (0, rows)
    counts = {c: quant.split_count(p.n_outliers, rows, start, stop) for c, p in plans.items()}
    out: dict[Choice, Candidate] = {}
    quantized = [c for c, p in plans.items() if p.bits != quant.FP16_BITS]
    if quantized and isinstance(quantized[0], str):  # llama.cpp types (a GGUF plan): never outliers
        importance = None if hessian is not None else energy  # encode_batch weights by diag(H) itself
        for choice, gw in zip(quantized, quant_ggml.encode_batch(weight, quantized, importance, hessian)):
            out[choice] = Candidate(plans[choice], gw, None, row_error(quant_ggml.dequantize(gw) - weight, hessian))
    elif quantized:
        grids = [quant.Grid(*c) for c in quantized]
        if any(counts[c] for c in quantized):
            first = quant.gptq_batch(weight, hessian, grids) if hessian is not None else None
            masks = []
            for i, (choice, grid) in enumerate(zip(quantized, grids)):
                approx = (
                    quant._from_codes(*first[i][:3], weight.shape[1])
                    if first
                    else quant.fake_quantize(weight, grid.bits, grid.group_size)
                )
                masks.append(quant.outlier_mask(weight, approx, counts[choice], energy, plans[choice].outliers_per_row))
            grids = [quant.Grid(g.bits, g.group_size, m) for g, m in zip(grids, masks)]
        if hessian is not None:
            results = quant.gptq_batch(weight, hessian, grids)
        else:
            results = [quant._quantize_any(weight, g.bits, g.group_size, g.outlier_mask, None) for g in grids]
        for choice, grid, result in zip(quantized, grids, results):
            q, z, s, target = result[:4]
            qw = quant.QuantizedWeight(
                quant.pack(q, grid.bits), s, quant.pack(z, grid.bits), grid.bits, grid.group_size, weight.shape[1]
            )
            sparse = None
            if grid.outlier_mask is not None and grid.outlier_mask.any():
                sparse = quant.extract_outliers(target, qw, grid.outlier_mask)
            dense = _dense(qw, sparse)
            if isinstance(result, quant.GPTQResult) and sparse is None:  # the column loop's losses: no [N, K] @ [K, K]
                error = quant.gptq_row_error(result, weight, dense, hessian)
            else:
                error = row_error(dense - weight, hessian)
            out[choice] = Candidate(plans[choice], qw, sparse, error)
    for choice, plan in plans.items():
        if plan.bits == quant.FP16_BITS and plan.fmt in (None, quant_ggml.F16):
            out[choice] = Candidate(plan, None, None, row_error(weight.to(torch.float16).float() - weight, hessian))
    return {c: out[c] for c in plans}


def to_tensors(unit: str, candidates: dict[Choice, Candidate]) -> dict[str, torch.Tensor]:
    """A unit's candidates as named tensors (``unit|choice|field``) for one safetensors file."""
    out: dict[str, torch.Tensor] = {}
    for choice, cand in candidates.items():
        key = f"{unit}|{choice_label(choice)}|"
        out[key + "row_error"] = cand.row_error
        if isinstance(cand.weight, quant_ggml.GgmlWeight):
            out[key + "blocks"] = cand.weight.blocks
        elif cand.weight is not None:
            out.update({key + f: getattr(cand.weight, f) for f in _FIELDS})
        if cand.outliers is not None:
            out.update(
                {key + "crow": cand.outliers.crow, key + "col": cand.outliers.col, key + "values": cand.outliers.values}
            )
    return out


def _as_parts(cand: Candidate) -> dict[str, torch.Tensor | None]:
    weight, sparse = cand.weight, cand.outliers
    part = dict.fromkeys(("blocks", *_FIELDS, *_OUTLIER_FIELDS))
    part["row_error"] = cand.row_error
    if isinstance(weight, quant_ggml.GgmlWeight):
        part["blocks"] = weight.blocks
    elif weight is not None:
        part.update({f: getattr(weight, f) for f in _FIELDS})
    if sparse is not None:
        part.update(crow=sparse.crow, col=sparse.col, values=sparse.values)
    return part


def joined(plan: LayerPlan, unit: WeightUnit, parts: list[dict[str, torch.Tensor | None] | Candidate]) -> Candidate:
    """One candidate from the candidates (or their stored tensors) of consecutive row blocks."""
    parts = [_as_parts(p) if isinstance(p, Candidate) else p for p in parts]
    errors = torch.cat([p["row_error"] for p in parts])
    if parts[0]["blocks"] is not None:
        weight = quant_ggml.GgmlWeight(plan.fmt, torch.cat([p["blocks"] for p in parts]), unit.in_features)
        return Candidate(plan, weight, None, errors)
    if parts[0]["qweight"] is None:
        return Candidate(plan, None, None, errors)
    qw = quant.QuantizedWeight(
        *(torch.cat([p[f] for p in parts]) for f in _FIELDS), plan.bits, plan.group_size, unit.in_features
    )
    sparse = None
    if any(p["crow"] is not None for p in parts):
        index = quant.index_dtype(unit.in_features)
        crows, cols, values, offset = [torch.zeros(1, dtype=torch.int32)], [], [], 0
        for p in parts:  # a block that drew no outliers stores no CSR
            if p["crow"] is None:
                crows.append(torch.full((p["row_error"].numel(),), offset, dtype=torch.int32))
                continue
            crows.append(p["crow"][1:] + offset)
            cols.append(p["col"].to(index))
            values.append(p["values"])
            offset += int(p["crow"][-1])
        sparse = quant.SparseOutliers(
            torch.cat(crows), torch.cat(cols), torch.cat(values), (unit.out_features, unit.in_features)
        )
    return Candidate(plan, qw, sparse, errors)


class CandidateStore:
    """The candidates of an analysis directory, read (memory-mapped) when asked for.

    ``index[unit]``: the files holding it, with their row ranges. A 16-bit choice has no stored
    weight: it is the float weight rounded to fp16, read from ``source``.
    """

    def __init__(
        self,
        store: AnalysisStore,
        units: dict[str, WeightUnit],
        plans: dict[str, dict[Choice, LayerPlan]],
        index: dict[str, list[tuple[str, int, int]]],
        source: WeightSource | None = None,
    ):
        self.store, self.units, self.plans, self.index, self.source = store, units, plans, index, source

    def _parts(self, name: str, choice: Choice, fields: tuple[str, ...]) -> list[dict[str, torch.Tensor]]:
        key = f"{name}|{choice_label(choice)}|"
        parts = []
        for file, _, _ in self.index[name]:
            found = self.store.tensors(file, [key + f for f in fields], missing_ok=True)
            parts.append({f: found[key + f] for f in fields})
        return parts

    def row_error(self, name: str, choice: Choice) -> torch.Tensor:
        return torch.cat([p["row_error"] for p in self._parts(name, choice, ("row_error",))])

    def candidate(self, name: str, choice: Choice) -> Candidate:
        parts = self._parts(name, choice, ("row_error", "blocks", *_FIELDS, *_OUTLIER_FIELDS))
        return joined(self.plans[name][choice], self.units[name], parts)

    def float_weight(self, name: str) -> torch.Tensor:
        unit = self.units[name]
        return unit.oriented(self.source.tensor(unit.tensor_name))

    def dense(self, name: str, choice: Choice) -> torch.Tensor:
        """The ``[out, in]`` float32 matrix the runtime computes with for this choice."""
        cand = self.candidate(name, choice)
        if cand.weight is None:
            return self.float_weight(name).to(torch.float16).float()
        if isinstance(cand.weight, quant_ggml.GgmlWeight):
            return quant_ggml.dequantize(cand.weight)
        return _dense(cand.weight, cand.outliers)

    def dense_rows(self, name: str, choice: Choice, rows: torch.Tensor) -> torch.Tensor:
        """float32 ``[len(rows), in]`` of selected rows (sorted ids: an embedding lookup)."""
        cand = self.candidate(name, choice)
        unit = self.units[name]
        if cand.weight is None:  # an embedding table is [vocab, hidden] as stored
            return source_rows(self.source, unit.tensor_name)(rows).half().float()
        if isinstance(cand.weight, quant_ggml.GgmlWeight):
            return quant_ggml.dequantize(cand.weight, rows)
        qw = cand.weight
        picked = quant.QuantizedWeight(
            qw.qweight[rows], qw.scales[rows], qw.qzeros[rows], qw.bits, qw.group_size, qw.in_features
        )
        out = quant.dequantize(picked)
        return out if cand.outliers is None else out + cand.outliers.dense_rows(rows)
