"""The compiled-model artifact: a directory that ``mqc.load`` turns back into a working model.

Layout::

    manifest.json       format + version, per-module kinds and configs, the plan with bytes,
                        the recipe, the sha256 and size of the tensor file, the source model
                        (``"default"``, its directory, or null: what ``mqc eval`` compares with)
    model.safetensors   every stored tensor: packed codes, fp16 scales/zeros/outliers, and the
                        remaining float tensors (norms, 16-bit layers) in fp16
    config.json         the base model's HF config
    tokenizer files     when the model came with a tokenizer

The directory is written through :func:`mqc.atomic.replaced_dir` (a crash never leaves half an
artifact; ``force`` replaces only an artifact). Tensors that share storage (tied weights) are
stored once and listed under ``aliases``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from mqc.version import __version__
from mqc.atomic import replaced_dir
from mqc.errors import ArtifactError
from mqc.models import load_hf_model, model_source, resolve_model_dir
from mqc.runtime.modules import RUNTIME_MODULES
from mqc.stream.skeleton import parameters_on_meta

FORMAT = "mqc-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "model.safetensors"
WHAT = "an mqc artifact"
_REQUIRED = ("tensors", "modules", "aliases", "plan", "recipe", "attn_implementation", "tokenizer")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def stored_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors to write, aliases): float32 tensors become fp16, shared storage is kept once."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, tuple[int, ...]], str] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensor = tensor.detach().cpu()
        tensors[name] = (tensor.half() if tensor.dtype == torch.float32 else tensor).contiguous()
    return tensors, aliases


def tensor_data_bytes(path: str | os.PathLike) -> int:
    """Tensor bytes of a safetensors file: its size less the 8-byte length and the JSON header."""
    path = Path(path)
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return path.stat().st_size - 8 - header


def runtime_modules(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    kinds = set(RUNTIME_MODULES.values())
    return {
        name: {"kind": module.kind, "config": module.config()}
        for name, module in model.named_modules()
        if type(module) in kinds
    }


def save(compiled, out_dir: str | os.PathLike, force: bool = False, extra: dict[str, Any] | None = None) -> Path:
    """Write ``compiled`` (a :class:`mqc.api.CompiledModel`) to ``out_dir`` atomically."""
    model = compiled.model
    with replaced_dir(out_dir, force, is_artifact, WHAT) as tmp:
        tensors, aliases = stored_tensors(model)
        save_file(tensors, tmp / TENSORS, metadata={"format": FORMAT})
        model.config.save_pretrained(tmp)
        if compiled.tokenizer is not None:
            compiled.tokenizer.save_pretrained(tmp)
        plan = [{**vars(entry), "bytes": entry.nbytes} for entry in compiled.plan.layers.values()]
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "mqc_version": __version__,
            "model_type": model.config.model_type,
            "source": model_source(model),
            "attn_implementation": model.config._attn_implementation,
            "modules": runtime_modules(model),
            "aliases": aliases,
            "plan": plan,
            "accounting": {
                "plan_bytes": sum(p["bytes"] for p in plan),
                "plan_weights": sum(p["out_features"] * p["in_features"] for p in plan),
                "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
                "target": compiled.recipe.target,
                "model_bytes": compiled.model_bytes,  # planned whole-model bytes on the target
            },
            "recipe": compiled.recipe.to_dict(),
            "tokenizer": compiled.tokenizer is not None,
            "tensors": {"file": TENSORS, "sha256": sha256_of(tmp / TENSORS), "size": (tmp / TENSORS).stat().st_size},
            **(extra or {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return Path(out_dir)


def is_artifact(path: Path) -> bool:
    """Whether ``path`` is an artifact directory (what ``--force`` may replace)."""
    return path.is_dir() and (path / MANIFEST).is_file()


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The validated manifest of an artifact directory (tensor file checked against it)."""
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError(f"artifact {root} not found")
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{root} has no {MANIFEST}; it is not an mqc artifact (compile one with `mqc compile`)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{manifest_path} is corrupted ({exc.msg if hasattr(exc, 'msg') else exc}); recompile the artifact") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{manifest_path} is not an mqc manifest; recompile the artifact")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{root} has artifact format version {manifest.get('format_version')}, this mqc "
            f"({__version__}) reads version {FORMAT_VERSION}; recompile it with this mqc"
        )
    missing = [key for key in _REQUIRED if key not in manifest]
    tensors = manifest.get("tensors")
    if not missing and not (isinstance(tensors, dict) and {"file", "size", "sha256"} <= set(tensors)):
        missing = ["tensors.file/size/sha256"]
    if missing:
        raise ArtifactError(f"{manifest_path} lacks {missing[0]!r}; the artifact is incomplete, recompile it")
    if Path(tensors["file"]).name != tensors["file"]:
        raise ArtifactError(f"{manifest_path} names tensor file {tensors['file']!r} outside the artifact; recompile it")
    tensor_path = root / tensors["file"]
    if not tensor_path.is_file():
        raise ArtifactError(f"{tensor_path} is missing; the artifact is incomplete, recompile it")
    size = tensor_path.stat().st_size
    if size != manifest["tensors"]["size"]:
        raise ArtifactError(
            f"{tensor_path} has {size} bytes, the manifest says {manifest['tensors']['size']}: "
            "truncated or replaced; recompile the artifact"
        )
    if sha256_of(tensor_path) != manifest["tensors"]["sha256"]:
        raise ArtifactError(f"{tensor_path} does not match its sha256 in the manifest: corrupted; recompile the artifact")
    return manifest


def load(path: str | os.PathLike, deploy_cpu: bool = False):
    """(model, tokenizer or None) of an artifact; the model generates as the compiled one did.
    ``deploy_cpu``: switched to the compressed CPU kernels (:mod:`mqc.runtime.cpu`) as it loads,
    its float16 embedding/linear tensors never widened to float32 on the way."""
    root = Path(path)
    model, tokenizer = _build(root, read_manifest(root), deploy_cpu)
    if deploy_cpu:  # here, where no reference to the loaded tensors is left but the model's
        from mqc.runtime.cpu import deploy_on_cpu

        deploy_on_cpu(model)
    return model, tokenizer


def _build(root: Path, manifest: dict[str, Any], keep_half: bool):
    """(model, tokenizer) of the artifact at ``root``; ``keep_half``: see :func:`load`."""
    config = _read_part(root, "config.json", lambda: AutoConfig.from_pretrained(root, local_files_only=True))
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, attn_implementation=manifest["attn_implementation"])
    model = model.float().eval()
    # Owned modules first: a tied embedding refers to the module that owns its table.
    records = sorted(manifest["modules"].items(), key=lambda item: bool(item[1]["config"].get("tied_to")))
    for name, record in records:
        cls = RUNTIME_MODULES.get(record["kind"])
        if cls is None:
            raise ArtifactError(f"{root} uses module kind {record['kind']!r} unknown to mqc {__version__}; upgrade mqc")
        with torch.device("meta"):
            module = cls.from_config(record["config"], model)
        model.set_submodule(name, module)
    try:
        tensors = load_file(root / manifest["tensors"]["file"])
    except SafetensorError as exc:
        raise ArtifactError(f"cannot read {root / TENSORS}: {exc}; recompile the artifact") from None
    for alias, source in manifest["aliases"].items():
        tensors[alias] = tensors[source]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise ArtifactError(f"{root}: tensors do not match the model ({what}); recompile the artifact")
    # float16 on purpose: what deploy_on_cpu holds in float16 anyway (plain embeddings and linears)
    kept_half = {
        f"{owner}.weight"
        for owner, module in model.named_modules()
        if keep_half and type(module) in (torch.nn.Linear, torch.nn.Embedding)
    }
    converted: dict[int, torch.Tensor] = {}  # one converted tensor per stored one (tied names share it)
    for name, tensor in tensors.items():
        target = expected[name]
        if target.shape != tensor.shape:
            raise ArtifactError(f"{root}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
        dtype = tensor.dtype if name in kept_half and tensor.dtype == torch.float16 else target.dtype
        tensors[name] = converted.setdefault(id(tensor), tensor.to(dtype))
    model.load_state_dict(tensors, assign=True)
    for alias, source in manifest["aliases"].items():  # tied parameters: one object again, not two views
        owner, _, attr = alias.rpartition(".")
        if isinstance(getattr(model.get_submodule(owner), attr), torch.nn.Parameter):
            setattr(model.get_submodule(owner), attr, model.get_parameter(source))
    for module in model.modules():  # the runtime modules' non-persistent buffers (empty dtype probes)
        for key, buffer in module.named_buffers(recurse=False):
            if buffer.is_meta:
                setattr(module, key, torch.empty(buffer.shape, dtype=buffer.dtype))
    if getattr(model.config, "mqc_kv", None):  # a compressed cache: its hook (low-rank projections install it too)
        from mqc.runtime.kv import install

        install(model)
    tokenizer = None
    if manifest["tokenizer"]:
        tokenizer = _read_part(root, "tokenizer", lambda: AutoTokenizer.from_pretrained(root, local_files_only=True))
    return model, tokenizer


def _read_part(root: Path, what: str, read: Callable[[], Any]) -> Any:
    """``read()``, with transformers' errors for missing or broken files turned into ArtifactError."""
    try:
        return read()
    except (OSError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ArtifactError(f"{root}: cannot read the {what} ({first}); recompile the artifact") from None


def load_any(spec: str | os.PathLike | None = None, deploy_cpu: bool = False):
    """(model, tokenizer) of an mqc artifact or of a plain model: the CLI's MODEL_OR_ARTIFACT.
    ``deploy_cpu``: an artifact comes on the compressed CPU kernels (a plain model as it is)."""
    path = resolve_model_dir(spec)
    if (path / "manifest.json").is_file():
        return load(path, deploy_cpu=deploy_cpu)
    return load_hf_model(path)
