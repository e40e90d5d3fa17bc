"""GGUF export: an artifact compiled with ``--target gguf`` as one file that llama.cpp runs.

Why a writer of our own rather than llama.cpp's ``convert_hf_to_gguf.py`` + ``llama-quantize``:
the artifact already holds GGUF tensor data (each :class:`~mqc.runtime.modules.GgmlLinear`'s
``blocks`` is that tensor in its planned type), and re-quantizing would replace the plan by
llama.cpp's own mix. So the planned tensors are copied byte for byte, and only what llama.cpp
needs around them is derived, following the converter's choices per family:

==============  =======  ===============================================================
model_type      arch     what differs from the plain metadata
==============  =======  ===============================================================
llama, mistral  llama    q/k rows permuted to llama.cpp's rotary layout; llama3 RoPE
                         scaling as the ``rope_freqs`` factors transformers computes
qwen2, qwen3    qwen2/3  none (q/k biases, q/k norms are ordinary tensors)
gemma, gemma2   gemma*   norm weights + 1 (Gemma's RMSNorm scales by 1 + w); the output
                         projection must be the tied embedding (llama.cpp has no other);
                         gemma2: logit soft-caps, sliding window
gemma3_text     gemma3   norms + 1, sliding window, the local layers' RoPE base
==============  =======  ===============================================================

The plain metadata is the HF config's context length, widths, head counts, head size (also the
RoPE dimension count), RMS epsilon, RoPE base and vocabulary size. Settings llama.cpp would
compute differently are refused rather than written wrong: RoPE scalings other than linear and
llama3, Gemma 2/3 query scaling other than llama.cpp's (``query_pre_attn_scalar``), gemma/gemma2
with an untied output. As in the converter, the sliding window of mistral/qwen models is not
represented (llama.cpp's llama/qwen graphs attend to the whole context), so their outputs agree
up to the window's length.

Tensors: names from ``gguf``'s :class:`~gguf.TensorNameMap` (llama.cpp's own table); a tied
embedding is stored once, as ``token_embd`` without ``output.weight`` (llama.cpp then reads the
output projection from it); 1-D tensors (norms, biases) in F32, unplanned and F16-planned
matrices in F16, planned matrices as their raw blocks with their GGML type. The q/k permutation
moves whole rows, so it applies to the blocks unchanged.

Tokenizer: derived from the artifact's own Hugging Face tokenizer, as the converter does, so one
path serves every model (for the embedded default model it reproduces the source GGUF's
tokenizer fields: tokens, types, merges, special ids, pre-tokenizer ``smollm``, chat template).
Byte-level BPE (GPT-2 style: SmolLM, Qwen, Llama 3) becomes llama.cpp's ``gpt2`` model, its
pre-tokenizer found by llama.cpp's own test (the hash of the ids of :data:`_CHKTXT`) in a small
table of known models, else ``gpt-2`` for a plain byte-level split, else ``default``.
SentencePiece-style BPE (byte fallback: Llama 2, Mistral, Gemma) becomes the ``llama`` model,
each token scored by the rank of the merge that makes it, so llama.cpp merges in the order the
Hugging Face tokenizer does. Token ids beyond the tokenizer's, up to the model's vocabulary,
are ``[PAD<i>]`` (unused). Special ids, merges and the chat template are read by
:class:`gguf.SpecialVocab` from the same files; whether BOS/EOS are added is what the tokenizer
itself does. An artifact saved without a tokenizer gets llama.cpp's ``none`` vocabulary (token
ids in, logits out).

Bytes: the tensor data written equals the plan's whole-model bytes (each planned unit's
:attr:`~mqc.planning.types.LayerPlan.nbytes` plus every other tensor as
:func:`mqc.size.model_size` counts it for a GGUF file); the file is read back and checked before
it replaces anything. Derived tensors that are no model parameter (``rope_freqs``) are apart.

Writing goes through :func:`mqc.atomic.replaced_file`: the file is renamed over ``out_file`` only
after the check, so a failed export leaves the old file intact; an existing file is replaced only
with ``force``, and only a GGUF written here (``general.quantized_by = "mqc"``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from transformers import AutoConfig

from mqc import quant_ggml
from mqc.atomic import check_replaceable, replaced_file
from mqc.errors import ArtifactError, UnsupportedModelError
from mqc.models import check_config_file, resolve_model_dir
from mqc.planning.types import LayerPlan
from mqc.runtime.artifact import MANIFEST, load_any, read_manifest
from mqc.runtime.modules import GgmlLinear, QEmbedding
from mqc.size import inventory, model_size

WHAT = "a GGUF file written by mqc"
MARKER = "mqc"  # general.quantized_by of every file written here: what --force may replace
_ARCH = gguf.MODEL_ARCH


@dataclass(frozen=True)
class _Family:
    arch: gguf.MODEL_ARCH
    rotary_rows: bool = False  # llama.cpp rotates adjacent pairs; HF's q/k rows rotate halves
    norm_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + w), llama.cpp's by the stored w
    tied_output: bool = False  # llama.cpp's graph reads the output projection from token_embd
    swa_period: int = 0  # llama.cpp's default sliding-window pattern: every n-th layer is global
    big_layers: int = 0  # the layer count at which llama.cpp scales queries by 1/sqrt(hidden/heads)


FAMILIES: dict[str, _Family] = {
    "llama": _Family(_ARCH.LLAMA, rotary_rows=True),
    "mistral": _Family(_ARCH.LLAMA, rotary_rows=True),  # llama.cpp's converter maps Mistral to llama
    "qwen2": _Family(_ARCH.QWEN2),
    "qwen3": _Family(_ARCH.QWEN3),
    "gemma": _Family(_ARCH.GEMMA, norm_offset=1.0, tied_output=True),
    "gemma2": _Family(_ARCH.GEMMA2, norm_offset=1.0, tied_output=True, swa_period=2, big_layers=46),
    "gemma3_text": _Family(_ARCH.GEMMA3, norm_offset=1.0, swa_period=6, big_layers=62),
}
_DERIVED = {f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS]}.weight"}  # not model parameters

# llama.cpp identifies a BPE pre-tokenizer by the sha256 of str(ids) of this text
# (convert_hf_to_gguf.py's get_vocab_base_pre); the table holds the models mqc is used with.
_CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
_KNOWN_PRE = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen 1.5-3
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3 embedding
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


@dataclass(frozen=True)
class GgufExport:
    """What :func:`export_gguf` wrote."""

    path: Path
    arch: str
    file_bytes: int
    tensor_bytes: int  # tensor data of the model's tensors: the plan's whole-model bytes
    n_params: int  # elements of those tensors (a tied embedding once)
    types: dict[str, int]  # GGML type -> number of tensors in it
    tokenizer: str  # "<tokenizer.ggml.model>/<tokenizer.ggml.pre>", or "none"

    @property
    def bpw(self) -> float:
        return 8.0 * self.tensor_bytes / self.n_params

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "path": str(self.path), "bpw": self.bpw}

    def summary(self) -> str:
        types = ", ".join(f"{n} {t}" for t, n in sorted(self.types.items()))
        return (
            f"exported {self.path} ({self.arch}): {self.file_bytes / 1e6:.2f} MB, tensors {self.tensor_bytes:,} bytes "
            f"(= planned), {self.bpw:.3f} bits/weight over {self.n_params:,} parameters; "
            f"{len(self.types)} tensor types ({types}); tokenizer {self.tokenizer}"
        )


def export_gguf(source: str | os.PathLike | None, out_file: str | os.PathLike, *, force: bool = False) -> GgufExport:
    """Write the artifact at ``source`` (or a local HF model directory / ``'default'``, in F16) as
    the GGUF file ``out_file`` for llama.cpp; see the module docstring."""
    out = Path(out_file)
    check_replaceable(out, force, written_here, WHAT, directory=False)  # before any work
    root = resolve_model_dir(source)
    model_type = check_config_file(root)
    family = FAMILIES.get(model_type)
    if family is None:
        raise UnsupportedModelError(
            f"{root}: model type {model_type!r} has no llama.cpp export in mqc; it exports {', '.join(FAMILIES)}"
        )
    plan = _plan(root)
    config = AutoConfig.from_pretrained(root, local_files_only=True)
    _check_config(config, family)

    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[family.arch])
    writer.add_name(root.name)
    writer.add_quantized_by(MARKER)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    derived = _add_hparams(writer, config, family)  # refuses what llama.cpp would compute otherwise
    model, tokenizer = load_any(root)
    token_model = _add_tokenizer(writer, tokenizer, root, config.vocab_size)
    with torch.no_grad():
        tensors = _tensors(model, family)
    for name, data, qtype in tensors + derived:
        writer.add_tensor(name, data, raw_dtype=qtype)
    expected = planned_bytes(model, plan)

    with replaced_file(out, force, written_here, WHAT) as tmp:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        written = _read_back(tmp, out, family, token_model)
        if written.tensor_bytes != expected:  # a bug in the writer or the accounting, not a user error
            raise RuntimeError(f"GGUF tensor data {written.tensor_bytes:,} bytes != planned {expected:,} bytes")
    return written


def planned_bytes(model: torch.nn.Module, plan: list) -> int:
    """The plan's whole-model bytes: its units' bytes plus every other tensor as
    :func:`mqc.size.model_size` counts it in a GGUF file."""
    fixed = model_size(inventory(model), {entry.qualname for entry in plan}, gguf=True).fixed_bytes
    # model_size knows a unit by its float weight; a GgmlLinear unit holds ``blocks`` instead,
    # which its plan entry already prices
    blocks = sum(m.blocks.numel() for m in model.modules() if isinstance(m, GgmlLinear))
    return sum(entry.nbytes for entry in plan) + fixed - blocks


# --------------------------------------------------------------------------------------------
# what may be written, and over what
# --------------------------------------------------------------------------------------------
def written_here(path: Path) -> bool:
    """Whether ``path`` is a GGUF file marked by mqc (what ``force`` may replace)."""
    try:
        field = gguf.GGUFReader(path).get_field(gguf.Keys.General.QUANTIZED_BY)
        return field is not None and field.contents() == MARKER
    except Exception:  # whatever fails to read as GGUF (bad magic, truncation) is not ours
        return False


def _plan(root: Path) -> list:
    """The artifact's plan entries (none for a plain model), priced as GGUF stores them; refuses
    an artifact holding mqc's own formats, which llama.cpp cannot read."""
    if not (root / MANIFEST).is_file():
        return []
    manifest = read_manifest(root)
    for name, record in manifest["modules"].items():
        config = record["config"]
        if record["kind"] == "ggml_linear" or (
            record["kind"] == "qembedding" and (config["tied_to"] or "fmt" in config["table"])
        ):
            continue
        raise ArtifactError(
            f"{root} stores {name} in mqc's own format ({record['kind']}), which llama.cpp cannot read; "
            "recompile it with `mqc compile --target gguf`"
        )
    fields = {f.name for f in dataclasses.fields(LayerPlan)}
    plan = [LayerPlan(**{k: v for k, v in entry.items() if k in fields}) for entry in manifest["plan"]]
    # a 16-bit unit of a plan in mqc's formats is a float layer, stored F16 with an F32 bias here
    return [entry if entry.fmt else dataclasses.replace(entry, fmt=quant_ggml.F16) for entry in plan]


def _read_back(path: Path, out: Path, family: _Family, token_model: str) -> GgufExport:
    reader = gguf.GGUFReader(path)
    model_tensors = [t for t in reader.tensors if t.name not in _DERIVED]
    return GgufExport(
        path=out,
        arch=gguf.MODEL_ARCH_NAMES[family.arch],
        file_bytes=path.stat().st_size,
        tensor_bytes=sum(int(t.n_bytes) for t in model_tensors),
        n_params=sum(int(t.n_elements) for t in model_tensors),
        types=dict(Counter(t.tensor_type.name for t in reader.tensors)),
        tokenizer=token_model,
    )


# --------------------------------------------------------------------------------------------
# hyperparameters
# --------------------------------------------------------------------------------------------
def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _check_config(config, family: _Family) -> None:
    """Refuse what llama.cpp's graph cannot express. Its gemma/gemma2 read the output projection
    from the embedding. Gemma 2/3 scale queries by ``query_pre_attn_scalar ** -0.5``; llama.cpp
    by ``1/sqrt(head_dim)`` (``1/sqrt(hidden/heads)`` at the 27B models' layer count) and reads no
    setting for it, so any other value would silently compute another model."""
    c = config
    if family.tied_output and not c.tie_word_embeddings:
        raise UnsupportedModelError(
            f"{c.model_type} with an untied output projection: llama.cpp's graph reads it from the embedding"
        )
    if not family.big_layers:
        return
    expected = c.hidden_size // c.num_attention_heads if c.num_hidden_layers == family.big_layers else _head_dim(c)
    if c.query_pre_attn_scalar != expected:
        raise UnsupportedModelError(
            f"{c.model_type}: query_pre_attn_scalar {c.query_pre_attn_scalar} is not the {expected} "
            "llama.cpp scales queries by; it cannot run this model as is"
        )


def _add_hparams(w: gguf.GGUFWriter, config, family: _Family) -> list[tuple[str, np.ndarray, None]]:
    """The architecture's metadata; returns the derived tensors it needs (``rope_freqs``)."""
    c = config
    head_dim = _head_dim(c)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    derived = _add_rope(w, c, family, head_dim)
    if family.arch == _ARCH.GEMMA2:
        if c.attn_logit_softcapping is None or c.final_logit_softcapping is None:
            raise UnsupportedModelError(
                "gemma2 without logit soft-capping: llama.cpp always caps; it cannot run this model"
            )
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    if family.arch == _ARCH.GEMMA3:
        if c.attn_logit_softcapping is not None:
            raise UnsupportedModelError("gemma3 with attention soft-capping: llama.cpp's gemma3 has none")
        if c.final_logit_softcapping is not None:
            w.add_final_logit_softcapping(c.final_logit_softcapping)
    if family.swa_period:
        _add_sliding_window(w, c, family)
    return derived


def _add_rope(w: gguf.GGUFWriter, config, family: _Family, head_dim: int) -> list[tuple[str, np.ndarray, None]]:
    params = config.rope_parameters
    full, local = (
        (params["full_attention"], params.get("sliding_attention")) if "full_attention" in params else (params, None)
    )
    w.add_rope_freq_base(full["rope_theta"])
    w.add_rope_dimension_count(head_dim)
    if local is not None:
        if local.get("rope_type", "default") != "default":
            raise UnsupportedModelError(
                f"RoPE scaling on sliding-window layers ({local['rope_type']!r}): llama.cpp has none"
            )
        w.add_rope_freq_base_swa(local["rope_theta"])
    kind = full.get("rope_type", "default")
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(full["factor"])
    elif kind == "llama3" and family.arch == _ARCH.LLAMA:
        return [(next(iter(_DERIVED)), _llama3_factors(config, full["rope_theta"], head_dim), None)]
    elif kind != "default":
        raise UnsupportedModelError(
            f"RoPE scaling {kind!r} has no llama.cpp export in mqc (it writes linear, and llama3 for llama/mistral)"
        )
    return []


def _llama3_factors(config, base: float, head_dim: int) -> np.ndarray:
    """llama.cpp's ``rope_freqs``: the divisor of each default frequency, as transformers scales them."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    default = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).double() / head_dim))
    return (default / scaled.double()).float().numpy()


def _add_sliding_window(w: gguf.GGUFWriter, config, family: _Family) -> None:
    """The window, and which layers use it where that is not llama.cpp's default pattern."""
    sliding = [t == "sliding_attention" for t in config.layer_types]
    if family.arch == _ARCH.GEMMA3 and not any(sliding):
        return  # without a window llama.cpp's gemma3 attends globally everywhere
    w.add_sliding_window(config.sliding_window)
    period = family.swa_period
    if sliding != [i % period < period - 1 for i in range(len(sliding))]:
        w.add_sliding_window_pattern(sliding)


# --------------------------------------------------------------------------------------------
# tensors
# --------------------------------------------------------------------------------------------
def _rotary_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order taking HF's q/k layout (each head's halves rotate together) to llama.cpp's
    (adjacent pairs rotate): row ``(h, j, i)`` is HF's ``(h, i, j)``, as the converter permutes."""
    return np.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).transpose(0, 2, 1).reshape(-1)


def _embeddings(model: torch.nn.Module) -> tuple[str, str, bool]:
    """(input embedding qualname, output projection qualname, tied)."""
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    if isinstance(emb, QEmbedding):
        tied = emb.tied_to is not None
    else:
        tied = isinstance(out, torch.nn.Linear) and out.weight.data_ptr() == emb.weight.data_ptr()
    return names[id(emb)], names[id(out)], tied


def _tensors(model: torch.nn.Module, family: _Family) -> list[tuple[str, np.ndarray, gguf.GGMLQuantizationType | None]]:
    """(GGUF name, data, raw GGML type of byte data or None) of every stored tensor, each once."""
    config = model.config
    name_map = gguf.get_tensor_name_map(family.arch, config.num_hidden_layers)
    emb_name, out_name, tied = _embeddings(model)
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    out: dict[str, tuple[str, np.ndarray, gguf.GGMLQuantizationType | None]] = {}
    for key, tensor in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        hf = f"{owner}.weight" if leaf == "blocks" else key
        hf = hf.replace(f"{emb_name}.table.", f"{emb_name}.")  # an untied embedding's own table
        if tied and hf == f"{out_name}.weight":
            hf = f"{emb_name}.weight"
        if hf in out:  # the tied embedding/output, stored once
            continue
        name = name_map.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UnsupportedModelError(f"{key}: llama.cpp's {gguf.MODEL_ARCH_NAMES[family.arch]} has no tensor for it")
        if leaf == "blocks":
            data, qtype = tensor.cpu().numpy(), quant_ggml.TYPES[model.get_submodule(owner).fmt].qtype
        else:
            value = tensor.detach().cpu().float()
            if family.norm_offset and hf.endswith("norm.weight"):
                value = value + family.norm_offset
            data, qtype = value.numpy().astype(np.float32 if value.ndim == 1 else np.float16), None
        rotary = re.fullmatch(r"blk\.\d+\.(attn_q|attn_k)\.(weight|bias)", name)
        if family.rotary_rows and rotary:
            data = np.ascontiguousarray(data[_rotary_rows(data.shape[0], heads[rotary.group(1)])])
        out[hf] = (name, data, qtype)
    return list(out.values())


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------
def _add_tokenizer(w: gguf.GGUFWriter, tokenizer, root: Path, vocab_size: int) -> str:
    """The vocabulary llama.cpp tokenizes with; returns ``"<model>/<pre>"`` (or ``"none"``)."""
    if tokenizer is None:
        w.add_tokenizer_model("none")  # llama.cpp: vocab_size dummy tokens, ids in
        return "none"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    bpe = spec.get("model", {})
    spm = bool(bpe.get("byte_fallback"))
    if bpe.get("type") != "BPE" or not (spm or (spec.get("decoder") or {}).get("type") == "ByteLevel"):
        raise UnsupportedModelError(
            f"{root}: its tokenizer ({bpe.get('type') or type(tokenizer).__name__}) has no llama.cpp vocabulary; "
            "mqc exports byte-level BPE and SentencePiece-style BPE tokenizers"
        )
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise UnsupportedModelError(
            f"{root}: the tokenizer has ids up to {max(vocab.values())}, the model {vocab_size} embedding rows"
        )
    text_of = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    rank = _merge_ranks(bpe.get("merges", [])) if spm else {}
    tokens, types, scores = [], [], []
    for i in range(vocab_size):
        text = text_of.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(text)
            if i in added:
                types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
            elif spm and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
                types.append(gguf.TokenType.BYTE)
            else:
                types.append(gguf.TokenType.NORMAL)
        scores.append(-float(rank.get(text, 0)))  # SentencePiece merges the highest score first
    model_name = "llama" if spm else "gpt2"
    pre = "default" if spm else _bpe_pre(tokenizer, spec)
    w.add_tokenizer_model(model_name)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if spm:
        w.add_token_scores(scores)
        w.add_add_space_prefix(_prepends_space(spec))
    special = gguf.SpecialVocab(root, load_merges=not spm, n_vocab=vocab_size)
    special.add_special_token.update(_adds_bos_eos(tokenizer))
    special.add_to_gguf(w, quiet=True)
    return f"{model_name}/{pre}"


def _merge_ranks(merges: list) -> dict[str, int]:
    """Token -> 1 + rank of the first merge that makes it (merges are "a b" or [a, b])."""
    ranks: dict[str, int] = {}
    for r, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        ranks.setdefault(left + right, r + 1)
    return ranks


def _bpe_pre(tokenizer, spec: dict[str, Any]) -> str:
    digest = hashlib.sha256(str(tokenizer.encode(_CHKTXT)).encode()).hexdigest()
    if digest in _KNOWN_PRE:
        return _KNOWN_PRE[digest]
    pre = spec.get("pre_tokenizer") or {}
    plain = pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")
    return "gpt-2" if plain else "default"


def _prepends_space(spec: dict[str, Any]) -> bool:
    """Whether the tokenizer puts "▁" before the text (a Prepend normalizer or Metaspace's scheme)."""
    normalizer = spec.get("normalizer") or {}
    pre = spec.get("pre_tokenizer") or {}
    steps = normalizer.get("normalizers", [normalizer]) + pre.get("pretokenizers", [pre])
    return any(
        s.get("type") == "Prepend" or (s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") != "never")
        for s in steps
    )


def _adds_bos_eos(tokenizer) -> dict[str, bool]:
    """Whether encoding text adds BOS / EOS, as the tokenizer itself does."""
    ids = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {
        "bos": bos is not None and ids[0] == bos and plain[0] != bos,
        "eos": eos is not None and ids[-1] == eos and plain[-1] != eos,
    }
