"""Token embeddings as ONNX: ``GatherBlockQuantized`` over a packed table, or ``Gather``.

A tied :class:`~mqc.runtime.modules.QEmbedding` reads ``lm_head``'s packed initializers (the
same names :func:`mqc.export.linear.packed_inputs` gives them), so the table is stored once, as
in the artifact. ``GatherBlockQuantized`` takes uint8 data of 2, 4 or 8 bits packed low bits
first along the row, which is mqc's layout; a 3-bit table is re-encoded as 4-bit (exact, see
:mod:`mqc.export.linear`). A row padded to whole blocks is sliced back to the hidden size.

Outliers of a quantized table are added per gathered row from the ELL arrays its tied
``lm_head`` uses (:func:`mqc.export.linear.ell_inputs`: stored once), scatter-added into the
gathered rows (padding adds 0 at column 0).
"""

from __future__ import annotations

import torch

from mqc.export.graph import FLOAT, MS_DOMAIN, GraphBuilder
from mqc.export.linear import Ell, as_matmul_nbits, ell_inputs, packed_inputs
from mqc.runtime.modules import QEmbedding


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
    cols, values = ell_inputs(g, table_name, Ell.of(sparse))
    col, value = (g.op("Gather", [t, ids], axis=0) for t in (cols, values))
    return g.op("ScatterElements", [out, col, value], axis=-1, reduction="add")
