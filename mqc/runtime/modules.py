"""Runtime modules that replace ``nn.Linear`` / GPT-2 ``Conv1D`` / ``nn.Embedding`` in an HF model.

The model stays a Hugging Face model (``generate()`` works); only the swapped modules change.
Each runtime module knows its ``kind`` and a JSON-able ``config()`` from which
``from_config`` rebuilds an empty module of the right shapes; the artifact stores one record per
swapped module and the tensors in one safetensors file, then loads them back by kind.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

from mqc import quant, quant_ggml
from mqc.runtime.ops import dense_weight


class QLinear(torch.nn.Module):
    """A group-quantized linear layer with an optional sparse fp16 outlier matrix."""

    kind: ClassVar[str] = "qlinear"

    def __init__(
        self,
        out_features: int,
        in_features: int,
        bits: int,
        group_size: int,
        n_outliers: int = 0,
        has_bias: bool = False,
    ):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.bits, self.group_size = bits, group_size
        blocks = quant.n_blocks(in_features, group_size)
        self.register_buffer("qweight", torch.zeros(out_features, blocks, group_size * bits // 8, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, blocks, dtype=torch.float16))
        self.register_buffer("qzeros", torch.zeros(out_features, quant.packed_len(blocks, bits), dtype=torch.uint8))
        if n_outliers:
            self.register_buffer("outlier_crow", torch.zeros(out_features + 1, dtype=torch.int32))
            self.register_buffer("outlier_col", torch.zeros(n_outliers, dtype=quant.index_dtype(in_features)))
            self.register_buffer("outlier_values", torch.zeros(n_outliers, dtype=torch.float16))
        else:
            self.outlier_crow = self.outlier_col = self.outlier_values = None
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16) if has_bias else None)
        self.cpu_kernel: Callable[[torch.Tensor], torch.Tensor] | None = None  # deployed CPU kernel (mqc.runtime.cpu)

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        bits: int,
        group_size: int,
        outlier_mask: torch.Tensor | None = None,
        hessian: torch.Tensor | None = None,
    ) -> "QLinear":
        """Quantize ``weight [out, in]`` (outliers at ``outlier_mask`` kept as fp16 residuals;
        GPTQ when the layer's input Hessian is given)."""
        return cls.from_quantized(*quant.quantize_layer(weight, bits, group_size, outlier_mask, hessian), bias)

    @classmethod
    def from_quantized(
        cls, qw: quant.QuantizedWeight, sparse: quant.SparseOutliers | None, bias: torch.Tensor | None
    ) -> "QLinear":
        """The module holding an already packed weight (and its outliers and bias)."""
        n_outliers = 0 if sparse is None else sparse.nnz
        module = cls(qw.out_features, qw.in_features, qw.bits, qw.group_size, n_outliers, bias is not None)
        module.qweight.copy_(qw.qweight)
        module.scales.copy_(qw.scales)
        module.qzeros.copy_(qw.qzeros)
        if n_outliers:
            module.outlier_crow.copy_(sparse.crow)
            module.outlier_col.copy_(sparse.col)
            module.outlier_values.copy_(sparse.values)
        if bias is not None:
            module.bias.copy_(bias.detach().to(torch.float16))
        return module

    def _apply(self, fn, recurse=True):
        """Let ``model.to(dtype)``/``.float()``/``.bfloat16()`` move but not cast this layer: its fp16
        scales, bias and outliers are the stored format (bf16 would drop 3 mantissa bits of every
        scale); the activations already follow the input's dtype."""
        probe = fn(torch.empty(0, dtype=torch.float16, device=self.scales.device))
        if probe.dtype == torch.float16:
            return super()._apply(fn, recurse)
        return super()._apply(lambda t: t.to(device=probe.device), recurse)

    @property
    def n_outliers(self) -> int:
        return 0 if self.outlier_values is None else self.outlier_values.numel()

    def config(self) -> dict[str, Any]:
        return dict(
            out_features=self.out_features,
            in_features=self.in_features,
            bits=self.bits,
            group_size=self.group_size,
            n_outliers=self.n_outliers,
            has_bias=self.bias is not None,
        )

    @classmethod
    def from_config(cls, config: dict[str, Any], model: torch.nn.Module) -> "QLinear":
        return cls(**config)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def quantized_weight(self) -> quant.QuantizedWeight:
        return quant.QuantizedWeight(self.qweight, self.scales, self.qzeros, self.bits, self.group_size, self.in_features)

    def outliers(self) -> quant.SparseOutliers | None:
        if not self.n_outliers:
            return None
        shape = (self.out_features, self.in_features)
        return quant.SparseOutliers(self.outlier_crow, self.outlier_col, self.outlier_values, shape)

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dense_weight(
            self.qweight, self.scales, self.qzeros, self.bits, self.group_size, self.in_features,
            self.outlier_crow, self.outlier_col, self.outlier_values, dtype,
        )  # fmt: skip

    def cached_dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """``dense_weight`` memoised until any buffer changes (in place, device or dtype).

        Unpacking every weight on every call made CPU evaluation several times slower than the
        matmuls; the CPU reference path trades one dense copy per layer for that.
        """
        stamp = (dtype, self.qweight.device, *(b._version for b in self.buffers()), *map(id, self.buffers()))
        if getattr(self, "_dense_stamp", None) != stamp:
            self._dense, self._dense_stamp = self.dense_weight(dtype), stamp
        return self._dense

    def dense_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """float32 ``[len(rows), in]`` of selected rows (an embedding lookup), outliers included."""
        qw = quant.QuantizedWeight(
            self.qweight[rows], self.scales[rows], self.qzeros[rows], self.bits, self.group_size, self.in_features
        )
        out = quant.dequantize(qw)
        sparse = self.outliers()
        return out if sparse is None else out + sparse.dense_rows(rows)

    def release_packed(self) -> None:
        """Drop the packed buffers once a deployed CPU kernel (``self.cpu_kernel``) holds the weight."""
        if self.cpu_kernel is None:
            raise RuntimeError("release_packed() needs a deployed CPU kernel first")
        for name in ("qweight", "scales", "qzeros", "outlier_crow", "outlier_col", "outlier_values"):
            if getattr(self, name) is not None:
                setattr(self, name, torch.empty(0, dtype=getattr(self, name).dtype))
        self._dense = self._dense_stamp = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and not torch.compiler.is_compiling() and not torch.compiler.is_exporting():
            if self.cpu_kernel is not None:
                return self.cpu_kernel(x)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return torch.nn.functional.linear(x, self.cached_dense_weight(x.dtype), bias)
        return torch.ops.mqc.qlinear(
            x, self.qweight, self.scales, self.qzeros, self.bits, self.group_size, self.in_features,
            self.outlier_crow, self.outlier_col, self.outlier_values, self.bias,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, g={self.group_size}, outliers={self.n_outliers}"


class QEmbedding(torch.nn.Module):
    """Token embedding that reads rows of a packed table.

    With tied embeddings the table *is* the ``lm_head`` QLinear: it is referenced, not owned, so
    the tensor is stored once and counted once. Untied, the table is an owned QLinear.
    Gemma-style ``embed_scale`` is kept.
    """

    kind: ClassVar[str] = "qembedding"

    def __init__(self, table: QLinear, tied_to: str | None, embed_scale: float | None = None):
        super().__init__()
        if tied_to is None:
            self.table = table
        else:
            object.__setattr__(self, "table", table)  # not a submodule: owned by ``tied_to``
        self.tied_to = tied_to
        self.embed_scale = embed_scale
        # The table is uint8/fp16 and ignores model.to(dtype); this empty buffer follows it, so the
        # embeddings come out in the model's dtype (else a half model silently runs in float32).
        self.register_buffer("dtype_probe", torch.empty(0), persistent=False)

    def config(self) -> dict[str, Any]:
        return dict(
            tied_to=self.tied_to,
            embed_scale=self.embed_scale,
            table=None if self.tied_to else self.table.config(),
        )

    @classmethod
    def from_config(cls, config: dict[str, Any], model: torch.nn.Module) -> "QEmbedding":
        tied_to = config["tied_to"]
        if tied_to:
            table = model.get_submodule(tied_to)
        else:
            table_cls = GgmlLinear if "fmt" in config["table"] else QLinear
            table = table_cls(**config["table"])
        return cls(table, tied_to, config["embed_scale"])

    def nbytes(self) -> int:
        return 0 if self.tied_to else self.table.nbytes()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = self.table
        out = t.dense_rows(input_ids.reshape(-1)).to(self.dtype_probe.device)
        if self.embed_scale is not None:
            out = out * self.embed_scale
        return out.reshape(*input_ids.shape, t.in_features).to(self.dtype_probe.dtype)


class GgmlLinear(torch.nn.Module):
    """A linear layer stored in one llama.cpp type: the GGUF tensor data as it will be exported.

    Compiled with ``--target gguf``, the artifact holds exactly the bytes ``mqc export --gguf``
    writes, so what mqc evaluates is what llama.cpp runs. torch has no kernels for these
    formats: the weight is decoded once (by the ``gguf`` package) and kept dense, as
    :class:`QLinear`'s CPU path does; deployment is llama.cpp's job.
    """

    kind: ClassVar[str] = "ggml_linear"

    def __init__(self, out_features: int, in_features: int, fmt: str, has_bias: bool = False):
        super().__init__()
        self.out_features, self.in_features, self.fmt = out_features, in_features, fmt
        row_bytes = quant_ggml.tensor_bytes(fmt, 1, in_features)
        self.register_buffer("blocks", torch.zeros(out_features, row_bytes, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32) if has_bias else None)

    @classmethod
    def from_ggml(cls, gw: quant_ggml.GgmlWeight, bias: torch.Tensor | None) -> "GgmlLinear":
        module = cls(gw.out_features, gw.in_features, gw.fmt, bias is not None)
        module.blocks.copy_(gw.blocks)
        if bias is not None:
            module.bias.copy_(bias.detach().float())
        return module

    def _apply(self, fn, recurse=True):
        """Move, never cast: the blocks are bytes and the bias is stored in F32, as GGUF keeps it."""
        probe = fn(torch.empty(0, device=self.blocks.device))
        return super()._apply(lambda t: t.to(device=probe.device), recurse)

    def config(self) -> dict[str, Any]:
        return dict(out_features=self.out_features, in_features=self.in_features, fmt=self.fmt, has_bias=self.bias is not None)

    @classmethod
    def from_config(cls, config: dict[str, Any], model: torch.nn.Module) -> "GgmlLinear":
        return cls(**config)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def ggml_weight(self) -> quant_ggml.GgmlWeight:
        return quant_ggml.GgmlWeight(self.fmt, self.blocks, self.in_features)

    def dense_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return quant_ggml.dequantize(self.ggml_weight(), rows.cpu()).to(self.blocks.device)

    def cached_dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The decoded weight, memoised until the blocks change (in place or by a move)."""
        stamp = (dtype, self.blocks.device, self.blocks._version, id(self.blocks))
        if getattr(self, "_dense_stamp", None) != stamp:
            self._dense = quant_ggml.dequantize(self.ggml_weight()).to(device=self.blocks.device, dtype=dtype)
            self._dense_stamp = stamp
        return self._dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, self.cached_dense_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.fmt}"


def drop_dense_copies(module: torch.nn.Module) -> None:
    """Free the dense weights the CPU reference path memoised in ``module``'s layers (a model
    lowered layer by layer would otherwise hold one float32 copy of every layer)."""
    for m in module.modules():
        if hasattr(m, "_dense"):
            m._dense = m._dense_stamp = None


RUNTIME_MODULES: dict[str, type[torch.nn.Module]] = {cls.kind: cls for cls in (QLinear, QEmbedding, GgmlLinear)}


def register_runtime_module(cls: type[torch.nn.Module]) -> type[torch.nn.Module]:
    """Class decorator: make a runtime module kind loadable from artifacts."""
    RUNTIME_MODULES[cls.kind] = cls
    return cls
