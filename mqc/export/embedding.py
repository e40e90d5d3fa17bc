"""Token embeddings as ONNX: ``GatherBlockQuantized`` over a packed table, or ``Gather``.

A tied :class:`~mqc.runtime.modules.QEmbedding` reads ``lm_head``'s packed initializers (the
same names :func:`mqc.export.linear.packed_inputs` gives them), so the table is stored once, as
in the artifact. ``GatherBlockQuantized`` takes uint8 data of 2, 4 or 8 bits packed low bits
first along the row, which is mqc's layout; a 3-bit table is re-encoded as 4-bit (exact, see
:mod:`mqc.export.linear`). A row padded to whole blocks is sliced back to the hidden size.

Outliers of a quantized table are added per gathered row. CSR rows have different lengths, which
ONNX cannot gather, so the export pads them to the longest row (ELL: ``[V, P]`` column indices
and values, padding adds 0 at column 0) and scatter-adds the gathered rows. The padding costs
``V * P * 4`` bytes (int16 columns would need a Cast per lookup; int32 keeps the graph simple).
"""

from __future__ import annotations

import torch

from mqc.export.graph import FLOAT, MS_DOMAIN, GraphBuilder, to_numpy
from mqc.export.linear import as_matmul_nbits, packed_inputs
from mqc.quant import SparseOutliers
from mqc.runtime.modules import QEmbedding


def to_ell(sparse: SparseOutliers) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR -> (columns int32 [V, P], fp16 values [V, P]) padded with (0, 0.0) to the longest row."""
    counts = torch.diff(sparse.crow.long())
    width = max(int(counts.max()), 1)
    rows = torch.repeat_interleave(torch.arange(sparse.shape[0]), counts)
    slot = torch.arange(rows.numel()) - torch.repeat_interleave(sparse.crow[:-1].long(), counts)
    cols = torch.zeros(sparse.shape[0], width, dtype=torch.int32)
    values = torch.zeros(sparse.shape[0], width, dtype=torch.float16)
    cols[rows, slot] = sparse.col.to(torch.int32)
    values[rows, slot] = sparse.values
    return cols, values


def emit_embedding(g: GraphBuilder, ids: str, module: torch.nn.Module, table_name: str) -> str:
    """``[B, S, hidden]`` float32 embeddings of ``ids``; ``table_name`` names the stored table
    (the ``lm_head`` qualname when tied, so both read one initializer)."""
    with g.scope("embed_tokens"):
        if isinstance(module, QEmbedding):
            out = _gather_packed(g, ids, module, table_name)
            scale = module.embed_scale
        else:
            stored = g.stored_float(f"{table_name}.weight", module.weight)
            out = g.op("Gather", [stored, ids], axis=0)
            out = g.op("Cast", [out], to=FLOAT) if g.is_half(stored) else out
            scale = getattr(module, "embed_scale", None)
        if scale is not None:
            out = g.op("Mul", [out, g.const(float(scale), dtype="float32")])
    return out


def _gather_packed(g: GraphBuilder, ids: str, module: QEmbedding, table_name: str) -> str:
    table = module.table
    qw = as_matmul_nbits(table.quantized_weight())
    qweight, scales, qzeros = packed_inputs(g, table_name, qw)
    flat = g.op("Reshape", [qweight, g.const([qw.out_features, -1])])
    out = g.op(
        "GatherBlockQuantized", [flat, ids, scales, qzeros], domain=MS_DOMAIN,
        bits=qw.bits, block_size=qw.group_size, gather_axis=0, quantize_axis=1,
    )  # fmt: skip
    if qw.n_blocks * qw.group_size != qw.in_features:
        out = g.op("Slice", [out, g.const([0]), g.const([qw.in_features]), g.const([-1])])
    sparse = table.outliers()
    if sparse is None:
        return out
    cols, values = to_ell(sparse)
    col = g.op("Gather", [g.weight(f"{table_name}.outlier_ell_cols", to_numpy(cols)), ids], axis=0)
    value = g.op(
        "Cast",
        [g.op("Gather", [g.weight(f"{table_name}.outlier_ell_values", to_numpy(values)), ids], axis=0)],
        to=FLOAT,
    )
    return g.op("ScatterElements", [out, col, value], axis=-1, reduction="add")
