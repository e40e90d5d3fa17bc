"""A small ONNX graph builder over ``onnx.helper``: named values, shared weights, external data.

Why not ``torch.onnx``: the decoder graphs mqc exports are built from onnxruntime's fused
contrib ops (``MatMulNBits``, ``GroupQueryAttention``, ``SkipSimplifiedLayerNormalization``,
``GatherBlockQuantized``) that no tracer emits from a Hugging Face forward, and mqc's packed
blobs go into them byte for byte. Writing the graph directly is also what onnxruntime-genai's
model builder does.

Two graphs of one export (prefill and decode step) reference the same weights: every weight goes
into one :class:`WeightStore` under a stable name, and :meth:`WeightStore.write` stores each
array once in a single external-data file that both ``.onnx`` files point into.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

MS_DOMAIN = "com.microsoft"
OPSET = 21  # ONNX opset of the standard ops (ScatterND reduction="add" needs >= 16)
OPSET_IMPORTS = (helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1))
INLINE_LIMIT = 1024  # arrays of at most this many bytes stay inside the .onnx file
DATA_ALIGNMENT = 4096  # external tensors start at page offsets, so onnxruntime can mmap them

FLOAT = TensorProto.FLOAT
FLOAT16 = TensorProto.FLOAT16
DOUBLE = TensorProto.DOUBLE
INT32 = TensorProto.INT32
INT64 = TensorProto.INT64
BOOL = TensorProto.BOOL


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().contiguous().numpy()


class WeightStore:
    """Named weight arrays shared by the graphs of one export, each stored once."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self.derived: set[str] = set()  # computed for the graph (rotary tables, constants): no model tensor

    def add(self, name: str, array: np.ndarray, derived: bool = False) -> str:
        """Register ``array`` under ``name``; a second call with the same name must agree."""
        known = self.arrays.get(name)
        if derived:
            self.derived.add(name)
        if known is None:
            self.arrays[name] = array if array.flags.c_contiguous else array.copy()
        elif known.shape != array.shape or known.dtype != array.dtype:
            raise ValueError(f"weight {name!r} registered twice with different shapes")
        return name

    def tensor_proto(self, name: str, data_file: str | None, offsets: dict[str, int]) -> TensorProto:
        """The initializer of ``name``: inline when small, else a reference into ``data_file``."""
        array = self.arrays[name]
        if data_file is None or array.nbytes <= INLINE_LIMIT:
            return numpy_helper.from_array(array, name)
        proto = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        proto.data_location = TensorProto.EXTERNAL
        for key, value in (("location", data_file), ("offset", offsets[name]), ("length", array.nbytes)):
            entry = proto.external_data.add()
            entry.key, entry.value = key, str(value)
        return proto

    def model_bytes(self, names: Sequence[str]) -> int:
        """Bytes of the model's own tensors among ``names``: what a plan prices."""
        return sum(self.arrays[n].nbytes for n in set(names) - self.derived)

    def derived_bytes(self, names: Sequence[str]) -> int:
        return sum(self.arrays[n].nbytes for n in set(names) & self.derived)

    def write(self, path: Path, names: Sequence[str]) -> dict[str, int]:
        """Write the large arrays among ``names`` to ``path``; their byte offsets by name."""
        offsets: dict[str, int] = {}
        with open(path, "wb") as f:
            for name in names:
                array = self.arrays[name]
                if array.nbytes <= INLINE_LIMIT or name in offsets:
                    continue
                pad = -f.tell() % DATA_ALIGNMENT
                f.write(b"\0" * pad)
                offsets[name] = f.tell()
                f.write(array.tobytes())
        return offsets


class GraphBuilder:
    """Nodes, graph inputs/outputs and initializer references of one ONNX graph.

    ``op`` returns the names of the node's outputs, derived from the current scope, so a graph
    reads like the model code: ``h = g.op("Add", [a, b])``.
    """

    def __init__(self, name: str, weights: WeightStore):
        self.name, self.weights = name, weights
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.used_weights: dict[str, None] = {}  # insertion-ordered set
        self._scope: list[str] = []
        self._counts: dict[str, int] = {}
        self._float_values: dict[str, str] = {}

    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        """Prefix the names of the nodes made inside (``/model/layers.3/attn/MatMulNBits``)."""
        self._scope.append(name)
        try:
            yield
        finally:
            self._scope.pop()

    def _unique(self, base: str) -> str:
        count = self._counts.get(base, 0)
        self._counts[base] = count + 1
        return base if count == 0 else f"{base}_{count}"

    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        outputs: int | Sequence[str] = 1,
        domain: str = "",
        **attrs,
    ) -> str | list[str]:
        """Add a node; returns its output name (or the list of them when it has several).

        ``outputs`` is a count of fresh names, or explicit names ("" skips an optional output).
        """
        name = self._unique("/" + "/".join([*self._scope, op_type]))
        if isinstance(outputs, int):
            outputs = [f"{name}/output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs), name=name, domain=domain, **attrs))
        return outputs[0] if len(outputs) == 1 else list(outputs)

    def weight(self, name: str, array: np.ndarray, derived: bool = False) -> str:
        """An initializer (registered in the shared store) used by this graph; ``derived``: computed
        for the graph (not a model tensor, so no plan prices it)."""
        self.used_weights[self.weights.add(name, array, derived)] = None
        return name

    def stored_float(self, name: str, tensor: torch.Tensor) -> str:
        """The initializer of a float tensor: fp16 when that is exact (every float tensor of a
        compiled model is fp16-rounded), else float32. Check its type with :meth:`is_half`."""
        value = tensor.detach().float()
        half = value.half()
        return self.weight(name, to_numpy(half if torch.equal(half.float(), value) else value))

    def is_half(self, name: str) -> bool:
        return self.weights.arrays[name].dtype == np.float16

    def float_weight(self, name: str, tensor: torch.Tensor) -> str:
        """A float32 value of ``tensor``; a stored fp16 initializer gets a Cast, which
        onnxruntime folds at load (so the file keeps fp16 and compute stays float32)."""
        if name not in self._float_values:
            stored = self.stored_float(name, tensor)
            self._float_values[name] = self.op("Cast", [stored], to=FLOAT) if self.is_half(stored) else stored
        return self._float_values[name]

    def const(self, values, dtype=np.int64) -> str:
        """A small constant (shapes, axes, indices), deduplicated by value."""
        array = np.asarray(values, dtype=dtype)
        key = f"const/{array.dtype}/{list(array.shape)}/{array.ravel().tolist()}"
        return self.weight(key, array, derived=True)

    def add_input(self, name: str, elem_type: int, shape: Sequence[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def add_output(self, value: str, name: str, elem_type: int, shape: Sequence[int | str]) -> None:
        """Expose ``value`` as graph output ``name`` (an Identity renames it when needed)."""
        if value != name:
            self.op("Identity", [value], [name])
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))

    def model(self, data_file: str | None, offsets: dict[str, int], producer: str) -> onnx.ModelProto:
        initializers = [self.weights.tensor_proto(n, data_file, offsets) for n in self.used_weights]
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, initializers)
        return helper.make_model(graph, opset_imports=list(OPSET_IMPORTS), producer_name=producer, ir_version=10)
