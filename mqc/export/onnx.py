"""ONNX export of compiled (or plain) models and greedy generation with onnxruntime alone.

``export_onnx(model, tokenizer, out_dir)`` writes a directory::

    model.onnx          decode-step graph: input_ids, attention_mask, past_key_values.* ->
                        logits, present.*; any past length, 0 included (onnxruntime-genai's entry)
    prefill.onnx        prompt graph: input_ids, attention_mask -> logits, present.*
    model.onnx.data     the weights, stored once, referenced by both graphs
    genai_config.json   onnxruntime-genai's configuration (og.Model(dir) loads the folder)
    mqc_onnx.json       what mqc exported: formats per layer, KV layout, sizes, options
    tokenizer files

The directory is written through :func:`mqc.atomic.replaced_dir`: a failed export leaves the old
one intact, and ``force`` replaces only an mqc export (never any other directory). Every graph
passes ``onnx.checker`` before the rename.

``accuracy_level`` is ``MatMulNBits``' compute type for its activations; the weights are mqc's
exact packed codes either way. The default, 4, is chosen for decode speed: onnxruntime quantizes
each block of activations to int8 on the fly and uses integer dot products (VNNI/AMX on x86,
dotprod/i8mm on Arm), as onnxruntime-genai's int4 CPU builds do. The prompt graph uses it only
for layers with groups of 128 or more, where it is also the faster choice on many rows (see
:data:`mqc.export.decoder.PREFILL_INT8_MIN_GROUP`); its other layers keep float32 activations.
The int8 rounding moves logits and greedy output can leave the torch runtime's after a few
tokens (measured per prompt by ``tools/bench_onnx.py``, see ``benchmarks/README.md``).
``accuracy_level=0`` keeps float32 activations
everywhere: logits within 2e-4 of the torch runtime and the same greedy tokens. Use it where
output must match the runtime.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import torch

from mqc.version import __version__
from mqc.atomic import check_replaceable, replaced_dir
from mqc.errors import ArtifactError, DataError, MqcError, UnsupportedModelError
from mqc.export.decoder import DecoderGraph, DecoderSpec
from mqc.export.graph import GraphBuilder, WeightStore
from mqc.models import model_source

DECODE_GRAPH = "model.onnx"
PREFILL_GRAPH = "prefill.onnx"
DATA_FILE = "model.onnx.data"
GENAI_CONFIG = "genai_config.json"
MQC_CONFIG = "mqc_onnx.json"
DEFAULT_ACCURACY_LEVEL = 4
ACCURACY_LEVELS = (0, 1, 4)
WHAT = "an mqc ONNX export"


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------
def is_export(path: Path) -> bool:
    """Whether ``path`` is an ONNX export written by mqc (what ``force`` may replace)."""
    try:
        return path.is_dir() and _read_json(path / MQC_CONFIG).get("format") == "mqc-onnx"
    except (ValueError, OSError, AttributeError):  # unreadable or not a mapping: not ours
        return False


def _unwrap(model) -> tuple[torch.nn.Module, Any]:
    """(module, tokenizer) of a CompiledModel or a plain module."""
    inner = getattr(model, "model", None)
    if isinstance(inner, torch.nn.Module) and hasattr(model, "recipe"):
        return inner, getattr(model, "tokenizer", None)
    return model, None


def export_onnx(
    model,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    *,
    force: bool = False,
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
    planned_bytes: int | None = None,
) -> Path:
    """Export ``model`` (an :class:`mqc.CompiledModel`, a model loaded by ``mqc.load``, or a plain
    Hugging Face model of a supported family) to ``out_dir`` for onnxruntime, with ``tokenizer``'s
    files (None: a CompiledModel's own tokenizer, or none); see the module
    docstring for the layout and ``accuracy_level``. ``planned_bytes``: the whole-model bytes a
    plan for the ``onnx`` target priced; the export's model tensors must be exactly that many."""
    module, own_tokenizer = _unwrap(model)
    tokenizer = tokenizer if tokenizer is not None else own_tokenizer
    if accuracy_level not in ACCURACY_LEVELS:
        raise MqcError(f"accuracy_level {accuracy_level} not supported; use one of {ACCURACY_LEVELS}")
    if (getattr(module.config, "mqc_kv", None) or {}).get("kind") == "quant":
        raise UnsupportedModelError(
            "this model has a quantized KV cache, which the ONNX export does not carry yet; "
            "export a compilation without --kv-bits / --kv-mixed / --memory"
        )
    spec = DecoderSpec.of(module)
    out = Path(out_dir)
    check_replaceable(out, force, is_export, WHAT)  # before building the graphs
    weights = WeightStore()
    with torch.no_grad():
        graphs = {
            PREFILL_GRAPH: DecoderGraph(module, weights, accuracy_level, with_past=False).build(),
            DECODE_GRAPH: DecoderGraph(module, weights, accuracy_level, with_past=True).build(),
        }
    with replaced_dir(out, force, is_export, WHAT) as tmp:
        names = list(dict.fromkeys(n for g in graphs.values() for n in g.used_weights))
        offsets = weights.write(tmp / DATA_FILE, names)
        for filename, graph in graphs.items():
            _save_graph(graph, tmp / filename, offsets)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        kv = kv_layout(module)
        if kv["kind"] == "standard":  # onnxruntime-genai knows only plain K/V caches
            (tmp / GENAI_CONFIG).write_text(json.dumps(genai_config(module, spec), indent=2))
        tensors = {"model_tensor_bytes": weights.model_bytes(names), "derived_bytes": weights.derived_bytes(names)}
        if planned_bytes is not None and tensors["model_tensor_bytes"] != planned_bytes:  # a bug, not a user error
            raise RuntimeError(f"ONNX model tensors {tensors['model_tensor_bytes']:,} bytes != planned {planned_bytes:,} bytes")
        config = mqc_config(module, spec, accuracy_level, kv, tmp, tensors)
        (tmp / MQC_CONFIG).write_text(json.dumps(config, indent=2))
    return out


def _save_graph(graph: GraphBuilder, path: Path, offsets: dict[str, int]) -> None:
    proto = graph.model(DATA_FILE, offsets, producer=f"mqc {__version__}")
    onnx.save_model(proto, path)
    onnx.checker.check_model(str(path))


def _token_ids(model: torch.nn.Module) -> tuple[Any, Any, Any]:
    """(bos, eos, pad) from the generation config where it has them, else the model config."""
    sources = [getattr(model, "generation_config", None), model.config]
    pick = lambda key: next((getattr(s, key) for s in sources if getattr(s, key, None) is not None), None)
    return pick("bos_token_id"), pick("eos_token_id"), pick("pad_token_id")


def genai_config(model: torch.nn.Module, spec: DecoderSpec) -> dict[str, Any]:
    """onnxruntime-genai's ``genai_config.json`` for the decode graph (greedy search defaults)."""
    bos, eos, pad = _token_ids(model)
    pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
    config = {
        "model": {
            "bos_token_id": bos,
            "context_length": spec.max_positions,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": DECODE_GRAPH,
                "head_size": spec.head_dim,
                "hidden_size": spec.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": spec.n_heads,
                "num_hidden_layers": spec.n_layers,
                "num_key_value_heads": spec.n_kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": spec.model_type,
            "vocab_size": spec.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": spec.max_positions,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            # GroupQueryAttention can write the new K/V into the past buffer in place; the
            # explicit-attention graph (head sizes GQA rejects) concatenates instead
            "past_present_share_buffer": spec.uses_gqa,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }
    # onnxruntime-genai rejects null ids; a missing one takes its default
    config["model"] = {key: value for key, value in config["model"].items() if value is not None}
    return config


def kv_layout(module: torch.nn.Module) -> dict[str, Any]:
    """The cache the decode graph carries: plain K/V, or mqc's low-rank K/V (window + features)."""
    from mqc.runtime.kv import KVSettings, lowrank_sites

    sites = lowrank_sites(module)
    if not sites:
        return {"kind": "standard"}
    settings = KVSettings.of(module.config)
    ranks = [{"layer": s.layer, "k_rank": s.k_proj.rank, "v_rank": s.v_proj.rank} for s in sites]
    return {"kind": "lowrank", "window": settings.window, "feature_dtype": "float16", "layers": ranks}


def _layer_formats(module: torch.nn.Module) -> dict[str, str]:
    """How each linear layer was exported, by qualname."""
    from mqc.runtime.kv import LowRankKVProj
    from mqc.runtime.modules import QLinear

    formats = {}
    for name, sub in module.named_modules():
        if isinstance(sub, QLinear):
            kind = "MatMulNBits" if sub.bits != 3 else "MatMulNBits (3-bit re-encoded as 4-bit, exact)"
            formats[name] = f"{kind} bits={sub.bits} g={sub.group_size} outliers={sub.n_outliers}"
        elif isinstance(sub, LowRankKVProj):
            formats[name] = f"MatMul float (exact window branch) + low-rank rank={sub.rank}"
        elif isinstance(sub, torch.nn.Linear):
            formats[name] = "MatMul float"
    return formats


def mqc_config(
    module: torch.nn.Module, spec: DecoderSpec, accuracy_level: int, kv: dict[str, Any], root: Path,
    tensors: dict[str, int],
) -> dict[str, Any]:
    """``mqc_onnx.json``: what was exported and how, for people and for :class:`OnnxLM`.
    ``tensors``: bytes of the model's own tensors in the graphs' initializers (what a plan for
    the ``onnx`` target prices: every stored byte of every weight, norm and scale) and of the
    derived ones (rotary tables, constants)."""
    _, eos, _ = _token_ids(module)
    return {
        "format": "mqc-onnx",
        "mqc_version": __version__,
        "model_type": spec.model_type,
        "graphs": {"prefill": PREFILL_GRAPH, "decode": DECODE_GRAPH, "weights": DATA_FILE},
        "accuracy_level": accuracy_level,
        "source": model_source(module),  # the full-precision model `mqc eval` compares with
        "eos_token_id": eos,
        "kv_cache": kv,
        "layers": _layer_formats(module),
        "bytes": {p.name: p.stat().st_size for p in sorted(root.iterdir()) if p.is_file()},
        **tensors,
    }


# --------------------------------------------------------------------------------------------
# inference
# --------------------------------------------------------------------------------------------
def providers() -> list[str]:
    """CUDA when this onnxruntime build has it (onnxruntime-gpu), then the CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


@dataclass
class Step:
    """Logits of one forward and the cache state it left."""

    logits: np.ndarray  # [B, S, V]
    state: dict[str, Any]  # past_key_values.* of the next step: OrtValues, or the shared buffers
    length: int  # tokens in the cache


class OnnxLM:
    """The two graphs of an export as onnxruntime sessions: prefill, then decode steps.

    **Shared cache buffers** (``share_buffer``, on by default where the export allows it: plain
    K/V through ``GroupQueryAttention``): the cache lives in one preallocated buffer per K/V
    tensor, ``[B, kv_heads, capacity, head_dim]``, bound through onnxruntime's I/O binding as
    both the past input and the present output, so ``GroupQueryAttention`` writes each new
    token in place; the prompt graph's cache is copied into them once. This is
    onnxruntime-genai's ``past_present_share_buffer`` mode. Without it every step allocates a
    new present cache and copies the past into it: the 4-bit default model decoded at 170 instead
    of 228 tokens/s (2 threads, idle 2-core machine, measured). The buffers belong to the session:
    a :class:`Step` is valid until the next ``prefill`` or ``step`` (decoding is linear, as in
    generation); capacity doubles when a step needs more.

    ``spinning``: onnxruntime's intra-op threads busy-wait between kernels (its default). On an
    idle machine that is faster (161 vs 113 tokens/s, same model, without shared buffers); where
    other processes compete for the cores it is slower (about half the speed measured under
    load), so turn it off there.
    """

    min_capacity = 256  # shared mode: the smallest cache buffer, in tokens

    def __init__(
        self,
        onnx_dir: str | os.PathLike,
        threads: int | None = None,
        provider_list: Sequence[str] | None = None,
        spinning: bool = True,
        share_buffer: bool | None = None,
    ):
        import onnxruntime as ort

        self._ort = ort
        self.root = Path(onnx_dir)
        if not (self.root / DECODE_GRAPH).is_file():
            raise ArtifactError(f"{self.root} has no {DECODE_GRAPH}; export one with `mqc export ARTIFACT --onnx DIR`")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        chosen = list(provider_list or providers())
        self.decode = ort.InferenceSession(str(self.root / DECODE_GRAPH), options, providers=chosen)
        prefill = self.root / PREFILL_GRAPH
        self.prefill_session = (
            ort.InferenceSession(str(prefill), options, providers=chosen) if prefill.is_file() else None
        )
        self.config = _read_json(self.root / GENAI_CONFIG)
        self.mqc_config = _read_json(self.root / MQC_CONFIG)
        self.state_inputs = [i for i in self.decode.get_inputs() if i.name.startswith("past_key_values.")]
        shareable = bool(self.config.get("search", {}).get("past_present_share_buffer")) and chosen[0].startswith("CPU")
        if share_buffer and not shareable:
            raise MqcError(
                f"{self.root} cannot share cache buffers (needs GroupQueryAttention on the CPU provider); "
                "leave share_buffer unset"
            )
        self.share_buffer = shareable if share_buffer is None else share_buffer
        self._buffers: dict[str, np.ndarray] = {}  # shared mode: the cache, [B, kv_heads, capacity, d]
        self._binding = None  # shared mode: the I/O binding of the current buffers
        logits = next(o for o in self.decode.get_outputs() if o.name == "logits")
        self._vocab = logits.shape[-1] if isinstance(logits.shape[-1], int) else self.config["model"]["vocab_size"]
        self._logits_dtype = np.float16 if logits.type == "tensor(float16)" else np.float32

    def empty_state(self, batch: int, capacity: int = 0) -> dict[str, Any]:
        """Past tensors for the decode graph: batch first, the past length (axis 2 of K/V, axis 1
        of low-rank features) ``capacity``, other symbolic dims (as onnxruntime-genai's graphs
        name the head size) from genai_config."""
        decoder = self.config.get("model", {}).get("decoder", {})
        known = {1: decoder.get("num_key_value_heads"), 3: decoder.get("head_size")}
        state = {}
        for item in self.state_inputs:
            past_axis = 2 if len(item.shape) == 4 else 1
            dims = [
                batch if i == 0 else capacity if i == past_axis else d if isinstance(d, int) else known[i]
                for i, d in enumerate(item.shape)
            ]
            dtype = np.float16 if item.type == "tensor(float16)" else np.float32
            state[item.name] = np.zeros(dims, dtype=dtype)
        return state

    def _run(self, session, ids: np.ndarray, total: int, state: dict[str, Any]) -> Step:
        """One forward. Inputs and the cache stay onnxruntime OrtValues (no copy into numpy and
        back per step); only the logits are read out."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones((ids.shape[0], total), dtype=np.int64)}
        inputs = {name: self._ort.OrtValue.ortvalue_from_numpy(value) for name, value in feeds.items()}
        names = [o.name for o in session.get_outputs()]
        outputs = session.run_with_ort_values(names, {**inputs, **state})
        next_state = {
            name.replace("present.", "past_key_values.", 1): value
            for name, value in zip(names, outputs)
            if name.startswith("present.")
        }
        return Step(outputs[names.index("logits")].numpy(), next_state, total)

    def _reserve(self, batch: int, past: int, needed: int) -> None:
        """Shared mode: buffers for ``batch`` rows holding at least ``needed`` tokens, keeping
        the first ``past`` tokens of the current ones."""
        current = next(iter(self._buffers.values()), None)
        if current is not None and current.shape[0] != batch:
            current = None  # another batch: a new prefill, nothing to keep
        if current is not None and current.shape[2] >= needed:
            return
        capacity = max(needed, 2 * current.shape[2] if current is not None else 0, self.min_capacity)
        grown = self.empty_state(batch, capacity)
        if past and current is not None:
            for name, buffer in grown.items():
                buffer[:, :, :past] = self._buffers[name][:, :, :past]
        self._buffers, self._binding = grown, None

    def _run_shared(self, ids: np.ndarray, past: int) -> Step:
        """One forward of the decode graph writing the new K/V into the shared buffers in place.
        The cache bindings are made once per buffer set; a step binds only its token ids, mask
        and a fresh logits array (onnxruntime writes into it, nothing is copied out)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        total = past + ids.shape[1]
        self._reserve(ids.shape[0], past, total)
        if self._binding is None:
            self._binding = self.decode.io_binding()
            for name, buffer in self._buffers.items():
                value = self._ort.OrtValue.ortvalue_from_numpy(buffer)  # a view: no copy
                self._binding.bind_ortvalue_input(name, value)
                self._binding.bind_ortvalue_output(name.replace("past_key_values.", "present.", 1), value)
        self._binding.bind_cpu_input("input_ids", ids)
        self._binding.bind_cpu_input("attention_mask", np.ones((ids.shape[0], total), dtype=np.int64))
        logits = np.empty((*ids.shape, self._vocab), dtype=self._logits_dtype)
        self._binding.bind_ortvalue_output("logits", self._ort.OrtValue.ortvalue_from_numpy(logits))
        self.decode.run_with_iobinding(self._binding)
        return Step(logits, self._buffers, total)

    def prefill(self, ids: np.ndarray) -> Step:
        """Run the prompt ``ids [B, S]`` from an empty cache: the prefill graph when the folder
        has one (its layers may use other activation types, see :mod:`mqc.export.decoder`),
        else the decode graph with an empty past."""
        if self.share_buffer and self.prefill_session is not None:  # the prompt graph, then its cache into the buffers
            first = self._run(self.prefill_session, ids, ids.shape[1], {})
            self._reserve(ids.shape[0], 0, ids.shape[1])
            for name, value in first.state.items():
                self._buffers[name][:, :, : ids.shape[1]] = value.numpy()
            return Step(first.logits, self._buffers, first.length)
        if self.share_buffer:
            return self._run_shared(ids, 0)
        if self.prefill_session is None:
            state = {k: self._ort.OrtValue.ortvalue_from_numpy(v) for k, v in self.empty_state(ids.shape[0]).items()}
            return self._run(self.decode, ids, ids.shape[1], state)
        return self._run(self.prefill_session, ids, ids.shape[1], {})

    def step(self, ids: np.ndarray, previous: Step) -> Step:
        """Run ``ids [B, S]`` after the cache of ``previous``."""
        if self.share_buffer:
            return self._run_shared(ids, previous.length)
        return self._run(self.decode, ids, previous.length + ids.shape[1], previous.state)

    def eos_ids(self) -> set[int]:
        eos = self.mqc_config.get("eos_token_id", self.config.get("model", {}).get("eos_token_id"))
        return set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def generate(self, ids: np.ndarray, max_new_tokens: int, stop_at_eos: bool = True) -> np.ndarray:
        """Greedy continuation ``[B, <= max_new_tokens]`` of the prompts ``ids [B, S]``."""
        eos = self.eos_ids() if stop_at_eos else set()
        result = self.prefill(ids)
        tokens: list[np.ndarray] = []
        for _ in range(max_new_tokens):
            token = result.logits[:, -1].argmax(-1)
            tokens.append(token)
            if eos and all(int(t) in eos for t in token):
                break
            if len(tokens) == max_new_tokens:
                break
            result = self.step(token[:, None], result)
        return np.stack(tokens, axis=1) if tokens else np.zeros((ids.shape[0], 0), dtype=np.int64)


class OnnxCausalLM(torch.nn.Module):
    """An export behind the interface of a Hugging Face causal LM that :mod:`mqc.evaluation`
    scores: ``model(input_ids=...)`` runs the prompt graph, and passing a returned
    ``past_key_values`` back runs a decode step after it. Evaluating the export this way measures
    what onnxruntime computes (``accuracy_level`` 4: int8 activations) on the suite's protocol."""

    def __init__(self, onnx_dir: str | os.PathLike, threads: int | None = None):
        from transformers import PretrainedConfig

        super().__init__()
        self.lm = OnnxLM(onnx_dir, threads=threads)
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # the device callers ask for
        positions = self.lm.config.get("model", {}).get("context_length")
        self.config = PretrainedConfig(vocab_size=self.lm._vocab, max_position_embeddings=positions)

    def forward(self, input_ids: torch.Tensor, past_key_values: Step | None = None, **_: Any) -> SimpleNamespace:
        ids = input_ids.cpu().numpy()
        step = self.lm.prefill(ids) if past_key_values is None else self.lm.step(ids, past_key_values)
        return SimpleNamespace(logits=torch.from_numpy(step.logits.astype(np.float32)), past_key_values=step)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _prompt_ids(onnx_dir: Path, prompt) -> np.ndarray:
    if isinstance(prompt, str):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(onnx_dir, local_files_only=True)
        except (OSError, ValueError):
            raise DataError(f"{onnx_dir} has no tokenizer files; pass token ids instead of text") from None
        ids = tokenizer(prompt)["input_ids"]
    else:
        ids = prompt.tolist() if isinstance(prompt, (torch.Tensor, np.ndarray)) else list(prompt)
    array = np.asarray(ids, dtype=np.int64)
    array = array[None] if array.ndim == 1 else array
    if array.size == 0:
        raise DataError("the prompt is empty; give at least one token")
    return array


def onnx_generate(
    onnx_dir: str | os.PathLike,
    prompt: str | Sequence[int] | torch.Tensor | np.ndarray,
    max_new_tokens: int = 32,
    stop_at_eos: bool = True,
    threads: int | None = None,
) -> list[int] | list[list[int]]:
    """Greedy decoding of ``prompt`` (text, using the exported tokenizer, or token ids ``[S]`` /
    ``[B, S]``) with onnxruntime alone; returns the new token ids (one list per prompt row for a
    2-D prompt)."""
    root = Path(onnx_dir)
    ids = _prompt_ids(root, prompt)
    out = OnnxLM(root, threads=threads).generate(ids, max_new_tokens, stop_at_eos).tolist()
    two_d = not isinstance(prompt, str) and np.asarray(prompt).ndim == 2
    return out if two_d else out[0]
