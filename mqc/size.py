"""One size axis: the whole model, every stored byte, as llama.cpp reports bits per weight.

A model's size is all bytes of all tensors as stored: the planned units' codes, scales, zeros,
outliers and indices (:func:`mqc.quant.layer_bytes`) plus every other tensor the artifact keeps
(norms, biases, unquantized layers and embeddings) at fp16, each shared (tied) tensor once.
Bits per weight = 8 x bytes / parameters, parameters counted once. Budgets (``--size``) are on
the same axis: ``70MB`` (10^6 bytes), ``70MiB`` (2^20 bytes), ``3.5bpw``.

The sizes are computed from a :class:`TensorInfo` inventory of the model's stored tensors, which
a model on the meta device has as well as one in memory: nothing is read to size a model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from mqc.errors import RecipeError

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]+)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Size:
    """A whole-model size target: absolute bytes or bits per weight (exactly one is set)."""

    nbytes: int | None = None
    bpw: float | None = None

    def to_bytes(self, n_params: int) -> int:
        return self.nbytes if self.nbytes is not None else int(self.bpw * n_params / 8)

    def __str__(self) -> str:
        return f"{self.bpw:g}bpw" if self.bpw is not None else f"{self.nbytes}B"


def parse_size(text: str) -> Size:
    """``"70MB"``, ``"70MiB"``, ``"3.5bpw"``, ``"123456B"`` -> :class:`Size`."""
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or (unit != "bpw" and unit not in _UNITS):
        raise RecipeError(
            f"size {text!r} not understood; give bits per weight like '3.5bpw' or bytes like '70MB', '64MiB'"
        )
    value = float(match.group(1))
    if value <= 0:
        raise RecipeError(f"size {text!r} must be positive")
    if unit == "bpw":
        if value > 32:
            raise RecipeError(f"size {text!r}: more than 32 bits per weight is larger than the float32 model")
        return Size(bpw=value)
    return Size(nbytes=int(value * _UNITS[unit]))


@dataclass(frozen=True)
class ModelSize:
    """What a model stores besides its planned units, and how many parameters it has."""

    n_params: int  # every parameter once (a tied embedding/lm_head once)
    fixed_bytes: int  # stored bytes of every tensor that no unit replaces (fp16 floats)

    def total_bytes(self, plan_bytes: int) -> int:
        return self.fixed_bytes + plan_bytes

    def bpw(self, plan_bytes: int) -> float:
        return 8.0 * self.total_bytes(plan_bytes) / self.n_params


@dataclass(frozen=True)
class TensorInfo:
    """One stored tensor (shared storage once): every name it has, and what its size depends on."""

    names: tuple[str, ...]
    numel: int
    ndim: int
    floating: bool
    element_size: int
    parameter: bool


def inventory(model: torch.nn.Module) -> list[TensorInfo]:
    """The stored tensors of ``model`` (parameters and persistent buffers; tied ones once)."""
    params = {id(p) for p in model.parameters()}
    groups: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
        tensors[id(tensor)] = tensor
    return [
        TensorInfo(tuple(names), t.numel(), t.ndim, t.is_floating_point(), t.element_size(), key in params)
        for key, names in groups.items()
        for t in [tensors[key]]
    ]


def model_size(tensors: list[TensorInfo], replaced: set[str], gguf: bool = False) -> ModelSize:
    """Parameters and fixed bytes of a model when the modules ``replaced`` become plan units.

    A replaced module's weight and bias are counted by its plan entry; every other tensor is
    stored once, float tensors as fp16, except that a GGUF file (``gguf``) keeps 1-D float
    tensors (norms, biases) in F32, as llama.cpp's converter does.
    """
    covered = {f"{m}.{t}" for m in replaced for t in ("weight", "bias")}
    n_params = sum(t.numel for t in tensors if t.parameter)
    fixed = 0
    for t in tensors:
        if covered & set(t.names):
            continue
        width = (4 if gguf and t.ndim == 1 else 2) if t.floating else t.element_size
        fixed += t.numel * width
    return ModelSize(n_params, fixed)
