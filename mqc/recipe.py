"""Every knob of a compilation, as frozen dataclasses.

A recipe is the whole, reproducible description of what `mqc compile` did: it is stored in the
artifact's manifest and can be written as YAML. ``from_dict`` rejects unknown keys by name, so a
typo in a recipe file never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mqc.errors import RecipeError
from mqc.quant import FP16_BITS, GROUP_SIZES, QUANT_BITS, SUPPORTED_BITS
from mqc.quant_ggml import ALL_TYPES, F16, check_types
from mqc.size import parse_size
from mqc.targets import NAMES as TARGET_NAMES
from mqc.targets import TARGETS


@dataclass(frozen=True)
class CalibRecipe:
    """Calibration data: random windows of the calibration split (or of ``file``)."""

    n_samples: int = 32
    seq_len: int = 512
    seed: int = 0
    file: str | None = None

    def __post_init__(self) -> None:
        if self.n_samples < 1 or self.seq_len < 2:
            raise RecipeError(f"calib needs n_samples >= 1 and seq_len >= 2, got {self.n_samples} and {self.seq_len}")


@dataclass(frozen=True)
class Pin:
    """Keep layers whose qualname matches ``pattern`` (fnmatch) at ``min_bits`` or more."""

    pattern: str
    min_bits: int


@dataclass(frozen=True)
class KVRecipe:
    """Low-rank K/V cache (CSKV). ``rank`` is a fraction of the K/V width."""

    rank: float = 0.5
    method: str = "asvd"  # "svd" | "asvd" (activation-aware)
    window: int = 32
    quant_bits: int | None = None  # 2/4/8 bits for the compressed branch, None keeps fp16
    train_steps: int = 0
    budget_frac: float | None = None  # choose per-layer ranks so KV bytes <= frac of the original
    sink_tokens: int = 4  # first tokens of a sequence kept exact (StreamingLLM's attention sinks)

    def __post_init__(self) -> None:
        if self.method not in ("svd", "asvd"):
            raise RecipeError(f"unknown kv method {self.method!r}; use 'svd' or 'asvd'")
        if not 0.0 < self.rank <= 1.0:
            raise RecipeError(f"kv rank {self.rank} must be a fraction in (0, 1]")
        if self.quant_bits is not None and self.quant_bits not in (2, 4, 8):
            raise RecipeError(f"kv quant_bits {self.quant_bits} must be 2, 4 or 8")
        if self.sink_tokens < 0:
            raise RecipeError(f"kv sink_tokens ({self.sink_tokens}) must be >= 0")
        if self.window < 1 or self.train_steps < 0:
            raise RecipeError(f"kv window ({self.window}) must be >= 1 and train_steps ({self.train_steps}) >= 0")
        if self.budget_frac is not None and not 0.0 < self.budget_frac <= 1.0:
            raise RecipeError(f"kv budget_frac {self.budget_frac} must be a fraction in (0, 1]")


@dataclass(frozen=True)
class KVQuantRecipe:
    """Quantized KV cache: KIVI at one width (``bits``), or PM-KVQ per-layer key/value widths from
    2/4/8/16 chosen on measured KL for a cache of ``context`` tokens at ``budget_frac`` of the fp16
    cache's bytes there (window and sinks included). ``group``: tokens per key grid (per channel);
    ``value_group``: channels per value grid (per token). ``lower_after``: tokens older than
    ``window + lower_after`` drop to the next lower width (progressive lowering). ``interpolate``:
    measure the costs at positions spread over ``context`` (positional interpolation of the short
    calibration sequences). With neither ``bits`` nor ``budget_frac``, the recipe's ``memory``
    chooses the widths together with the weights' (for ``batch`` sequences of ``context`` tokens)."""

    bits: int | None = None
    budget_frac: float | None = None
    context: int = 4096
    group: int = 32
    value_group: int = 32
    window: int = 32
    sinks: int = 4
    lower_after: int | None = None
    interpolate: bool = True
    cost_samples: int = 2  # calibration sequences each cost is measured on
    batch: int = 1  # sequences whose caches the joint memory budget holds

    def __post_init__(self) -> None:
        if self.bits is not None and self.budget_frac is not None:
            raise RecipeError("a quantized KV cache takes bits (KIVI) or budget_frac (PM-KVQ), not both")
        if self.bits is not None and self.bits not in (2, 4, 8):
            raise RecipeError(f"KV bits {self.bits} must be 2, 4 or 8")
        if self.budget_frac is not None and not 0.0 < self.budget_frac <= 1.0:
            raise RecipeError(f"KV budget_frac {self.budget_frac} must be a fraction of the fp16 cache in (0, 1]")
        if self.context < 1 or self.cost_samples < 1 or self.batch < 1:
            raise RecipeError("KV context, cost_samples and batch must be >= 1")

    @property
    def measured(self) -> bool:
        """Whether the widths are chosen on measured costs (PM-KVQ or a joint memory budget)."""
        return self.bits is None


@dataclass(frozen=True)
class Recipe:
    """What to compile.

    ``method="rtn"``: every selected layer at ``bits`` (an integer width): the uniform baseline.
    ``method="mq"``: per-layer widths and group sizes under a budget, given as a whole-model
    ``size`` (``"70MB"``, ``"3.5bpw"``: every byte of every tensor, see :mod:`mqc.size`), or over
    the quantized tensors only as ``bits`` (average bits per weight), ``budget_bytes`` or
    ``budget_frac`` (of their fp16 size); at most one of the last three with ``size``.

    mq defaults are the configuration measured best on the default model
    (``benchmarks/README.md``): act-order GPTQ candidates at 2/3/4/8 bits x groups of 32/64/128
    or fp16, costs that predict the KL divergence to the full-precision model
    (``sensitivity="kl"``), the exact knapsack, then a search on measured KL (``search="evo"``).
    ``quantizer=None`` means GPTQ for mq and round-to-nearest for rtn.
    """

    method: str = "rtn"
    bits: float = 4.0
    group_size: int = 128
    budget_bytes: int | None = None
    budget_frac: float | None = None
    allowed_bits: tuple[int, ...] = SUPPORTED_BITS
    allowed_group_sizes: tuple[int, ...] = ()  # group sizes to choose from; (): all for mq, group_size for rtn
    pins: tuple[Pin, ...] = ()
    quantize_embeddings: bool | None = None  # None: False for rtn, True for mq
    skip: tuple[str, ...] = ()
    outlier_frac: float = 0.0
    sensitivity: str = "kl"  # "kl" (predicted KL) | "first_order" | "fisher" (LLM-MQ, RTN deltas)
    quantizer: str | None = None  # "rtn" | "gptq"; None: gptq for mq, rtn for the uniform method
    size: str | None = None  # whole-model size budget for mq: "70MB", "64MiB", "3.5bpw"
    search: str = "evo"  # mq: "evo" refines the knapsack plan on measured KL; "none" keeps it
    search_generations: int = 10
    target: str = "torch"  # where it runs (mqc.targets): "torch", "cuda", "onnx" price mqc's formats as stored there; "gguf": llama.cpp's types
    gguf_types: tuple[str, ...] = ()  # target gguf: the types to choose from; (): all of them
    calib: CalibRecipe = field(default_factory=CalibRecipe)
    kv: KVRecipe | None = None
    kv_quant: KVQuantRecipe | None = None
    memory: str | None = None  # joint budget: whole model + quantized KV cache of kv_quant.batch x context tokens

    def __post_init__(self) -> None:
        if self.kv is not None and self.kv_quant is not None:
            raise RecipeError("choose one KV cache: low-rank (kv) or quantized (kv_quant)")
        self._check_memory()
        if self.method not in ("rtn", "mq"):
            raise RecipeError(f"unknown method {self.method!r}; use 'rtn' or 'mq'")
        if self.group_size not in GROUP_SIZES:
            raise RecipeError(f"group_size {self.group_size} not supported; use one of {GROUP_SIZES}")
        if self.method == "rtn" and self.bits not in SUPPORTED_BITS:
            raise RecipeError(
                f"rtn needs one width in {SUPPORTED_BITS}, got {self.bits}; "
                "for a fractional average use --method mq"
            )
        bad = [b for b in self.allowed_bits if b not in SUPPORTED_BITS]
        if bad or not self.allowed_bits:
            raise RecipeError(f"allowed_bits {self.allowed_bits} must be a non-empty subset of {SUPPORTED_BITS}")
        if not self.bits > 0:
            raise RecipeError(f"bits {self.bits} must be positive")
        bad_g = [g for g in self.allowed_group_sizes if g not in GROUP_SIZES]
        if bad_g:
            raise RecipeError(f"allowed_group_sizes {self.allowed_group_sizes} must be a subset of {GROUP_SIZES}")
        if sum(x is not None for x in (self.budget_bytes, self.budget_frac, self.size)) > 1:
            raise RecipeError("give at most one of size, budget_bytes and budget_frac")
        if self.size is not None:
            parse_size(self.size)
            if self.method != "mq":
                raise RecipeError(f"size {self.size!r} needs --method mq; a uniform width has one size per --bits")
        if self.search not in ("evo", "none"):
            raise RecipeError(f"unknown search {self.search!r}; use 'evo' or 'none'")
        if self.search_generations < 0:
            raise RecipeError(f"search_generations {self.search_generations} must be >= 0")
        if self.budget_bytes is not None and self.budget_bytes <= 0:
            raise RecipeError(f"budget_bytes {self.budget_bytes} must be positive")
        if self.budget_frac is not None and not 0.0 < self.budget_frac <= 1.0:
            raise RecipeError(f"budget_frac {self.budget_frac} must be a fraction of the fp16 size in (0, 1]")
        if not 0.0 <= self.outlier_frac < 0.5:
            raise RecipeError(f"outlier_frac {self.outlier_frac} must be in [0, 0.5)")
        if self.sensitivity not in ("kl", "first_order", "fisher"):
            raise RecipeError(f"unknown sensitivity {self.sensitivity!r}; use 'kl', 'first_order' or 'fisher'")
        if self.quantizer not in (None, "rtn", "gptq"):
            raise RecipeError(f"unknown quantizer {self.quantizer!r}; use 'rtn' or 'gptq'")
        if self.target not in TARGET_NAMES:
            raise RecipeError(f"unknown target {self.target!r}; use one of {', '.join(TARGET_NAMES)}")
        if self.target in TARGETS and self.method == "mq":
            native = [b for b in self.allowed_bits if b == FP16_BITS or TARGETS[self.target].native(b)]
            if not native:
                raise RecipeError(
                    f"target {self.target!r} stores none of the allowed widths {self.allowed_bits} natively "
                    f"(it stores {TARGETS[self.target].code_bits} and 16); allow one of them"
                )
        try:
            check_types(self.gguf_types)
        except ValueError as exc:
            raise RecipeError(str(exc)) from None
        if self.gguf_types and self.target != "gguf":
            raise RecipeError("gguf_types only apply with target 'gguf'")
        if self.target == "gguf":
            if self.method != "mq" or self.sensitivity != "kl":
                raise RecipeError("target 'gguf' plans with --method mq and the predicted-KL costs (sensitivity 'kl')")
            if self.outlier_frac or self.kv is not None or self.kv_quant is not None:
                raise RecipeError("target 'gguf' stores llama.cpp types only: no outliers (outlier_frac 0) and no mqc KV cache")
        for pin in self.pins:
            if pin.min_bits not in SUPPORTED_BITS:
                raise RecipeError(f"pin {pin.pattern!r}: min_bits {pin.min_bits} not in {SUPPORTED_BITS}")
            if pin.min_bits > max(self.allowed_bits):
                raise RecipeError(
                    f"pin {pin.pattern!r} asks for at least {pin.min_bits} bits but the widest allowed width is "
                    f"{max(self.allowed_bits)}; allow a wider width or lower the pin"
                )

    def _check_memory(self) -> None:
        kv = self.kv_quant
        if self.memory is None:
            if kv is not None and kv.bits is None and kv.budget_frac is None:
                raise RecipeError("a quantized KV cache needs bits (KIVI), budget_frac (PM-KVQ) or a joint memory budget")
            return
        if parse_size(self.memory).nbytes is None:
            raise RecipeError(f"memory {self.memory!r} must be bytes (like '150MB'), not bits per weight")
        if self.method != "mq" or self.sensitivity != "kl" or self.target == "gguf":
            raise RecipeError("a joint memory budget is an mq allocation on KL costs (--method mq, not target gguf)")
        if kv is None or kv.bits is not None or kv.budget_frac is not None:
            raise RecipeError("a joint memory budget chooses the KV widths itself: give kv_quant without bits or budget_frac")
        if any(x is not None for x in (self.size, self.budget_bytes, self.budget_frac)):
            raise RecipeError("memory replaces size, budget_bytes and budget_frac: give only memory")

    @property
    def embeddings_included(self) -> bool:
        if self.quantize_embeddings is None:
            return self.method == "mq"
        return self.quantize_embeddings

    @property
    def uses_gptq(self) -> bool:
        return (self.quantizer or ("gptq" if self.method == "mq" else "rtn")) == "gptq"

    @property
    def group_sizes(self) -> tuple[int, ...]:
        """Group sizes a plan may use (the allocator's choice set for mq: all of them by default)."""
        default = GROUP_SIZES if self.method == "mq" else (self.group_size,)
        return tuple(sorted(set(self.allowed_group_sizes))) or default

    @property
    def gguf_choice_types(self) -> tuple[str, ...]:
        """The llama.cpp types a GGUF plan chooses from (F16 only if 16 bits are allowed)."""
        names = self.gguf_types or ALL_TYPES
        return tuple(n for n in names if n != F16 or FP16_BITS in self.allowed_bits)

    @property
    def quant_bits(self) -> tuple[int, ...]:
        return tuple(b for b in self.allowed_bits if b in QUANT_BITS)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        return _build(cls, data, "recipe")

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file {path} not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise RecipeError(f"recipe file {path} is not valid YAML: {exc}".splitlines()[0]) from None
        if not isinstance(data, dict):
            raise RecipeError(f"recipe file {path} must hold a mapping of keys to values")
        return cls.from_dict(data)


def _build(cls: type, data: Any, where: str) -> Any:
    """Instantiate a (nested) dataclass from plain data, naming any unknown key."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise RecipeError(f"unknown key {unknown[0]!r} in {where}; known keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _convert(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    return cls(**kwargs)


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return _convert(inner[0], value, where)
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else _build(hint, value, where)
    if origin is tuple:
        (item, *_rest) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where} must be a list")
        return tuple(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise RecipeError(f"{where} must be {hint.__name__}, got {value!r}")
    return value
