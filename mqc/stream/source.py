"""Where a model's float tensors come from: its safetensors shards, read on demand, or a model
already in memory.

The analysis and the lowering never hold the whole float model: they ask a :class:`WeightSource`
for one tensor (or a block of rows) at a time, as GPTQModel's lazy loader and llm-compressor's
sequential pipeline do. A shard source reads a tensor through safetensors' memory map and
converts it to float32; nothing stays mapped between reads, so the pages it touched leave the
process with the tensor.

Names are the model's state-dict names. A checkpoint may store a tied tensor once (``lm_head``
reads ``embed_tokens``) or under names without the base model's prefix (older GPT-2 files); both
are resolved when the source is opened, so a missing tensor or shard is refused before any work.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from mqc.atomic import write_bytes
from mqc.errors import UnsupportedModelError
from mqc.models import cache_dir

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_HASH_BLOCK = 1 << 24


class WeightSource(ABC):
    """Float tensors of a model by state-dict name; float tensors come as float32."""

    @abstractmethod
    def tensor(self, name: str) -> torch.Tensor: ...

    @abstractmethod
    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of a 2-D tensor, without reading the others."""

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]: ...

    @property
    @abstractmethod
    def fingerprint(self) -> str:
        """A hash of the config and every tensor's bytes: what an analysis is made for."""

    resident = False  # True: the tensors are the model's own, in memory (nothing to load or free)


def _as_float(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.is_floating_point() else tensor


class ModuleSource(WeightSource):
    """The state dict of a model in memory (views, no copies). ``resident``: the stack runs that
    model itself; otherwise it fills a skeleton of it from these tensors (a copy that can be
    rewritten, as a compressed KV cache does, without touching the model)."""

    def __init__(self, model: torch.nn.Module, resident: bool = True):
        self.model, self.resident = model, resident
        self.state = model.state_dict(keep_vars=True)
        self._fingerprint: str | None = None

    def tensor(self, name: str) -> torch.Tensor:
        return _as_float(self.state[name].detach())

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return _as_float(self.state[name].detach()[start:stop])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = module_fingerprint(self.model)
        return self._fingerprint


def loadable(source: WeightSource) -> WeightSource:
    """``source`` as one a skeleton is filled from (a model in memory is read, not run): the same
    tensors, as they were when the source was made."""
    if not source.resident:
        return source
    view = copy.copy(source)
    view.resident = False
    return view


def module_fingerprint(model: torch.nn.Module) -> str:
    """Hash of a model's config and every parameter and buffer, by name, shape, dtype and bytes."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(model.config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def shard_files(directory: Path) -> dict[str, Path]:
    """checkpoint key -> shard file of a model directory; refuses a missing or unreadable shard."""
    index = directory / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UnsupportedModelError(
                f"{index} is not a readable safetensors index ({exc}); re-save the model"
            ) from None
        files = {key: directory / name for key, name in weight_map.items()}
        for path in sorted(set(files.values())):
            if not path.is_file():
                raise UnsupportedModelError(
                    f"{directory} is missing the shard {path.name} that {INDEX} lists; copy the whole model directory"
                )
        return files
    single = [directory / SINGLE] if (directory / SINGLE).is_file() else sorted(directory.glob("*.safetensors"))
    if not single:
        raise UnsupportedModelError(
            f"{directory} has no safetensors weights (mqc streams them from model.safetensors or shards); "
            "re-save the model with save_pretrained(dir, safe_serialization=True)"
        )
    files = {}
    for path in single:
        for key in _open(path).keys():
            files[key] = path
    return files


def _open(path: Path):
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as exc:
        raise UnsupportedModelError(
            f"shard {path} is unreadable ({exc}); it is truncated or corrupted, copy it again"
        ) from None


class ShardSource(WeightSource):
    """Tensors of a local Hugging Face model directory, read from its safetensors shards on demand."""

    def __init__(
        self, directory: str | os.PathLike, names: Iterable[str], aliases: dict[str, list[str]], prefix: str = ""
    ):
        """``names``: the state-dict names the model needs; ``aliases``: for each, the other names
        of the same tensor (tied weights); ``prefix``: the base model's attribute (``model``,
        ``transformer``), which some checkpoints leave out of their keys."""
        self.directory = Path(directory)
        files = shard_files(self.directory)
        for path in sorted(set(files.values())):  # every header parses and the data it describes is there
            with _open(path):
                pass
        self.location: dict[str, tuple[Path, str]] = {}
        for name in names:
            key = self._resolve(name, [name, *aliases.get(name, ())], files, prefix)
            self.location[name] = (files[key], key)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._fingerprint: str | None = None

    def _resolve(self, name: str, candidates: list[str], files: dict[str, Path], prefix: str) -> str:
        for candidate in candidates:
            forms = [candidate]
            if prefix and candidate.startswith(prefix + "."):
                forms.append(candidate[len(prefix) + 1 :])
            for form in forms:
                if form in files:
                    return form
        raise UnsupportedModelError(
            f"{self.directory}: tensor {name!r} is in none of its safetensors files; the checkpoint is "
            "incomplete or for another architecture"
        )

    def _read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        path, key = self.location[name]
        try:
            with _open(path) as handle:
                if rows is None:
                    tensor = handle.get_tensor(key)
                else:
                    tensor = handle.get_slice(key)[rows[0] : rows[1]]
                return _as_float(tensor).contiguous()
        except SafetensorError as exc:
            raise UnsupportedModelError(
                f"cannot read {key!r} from {path} ({exc}); the shard is corrupted, copy it again"
            ) from None

    def tensor(self, name: str) -> torch.Tensor:
        return self._read(name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._read(name, (start, stop))

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._shapes:
            path, key = self.location[name]
            with _open(path) as handle:
                self._shapes[name] = tuple(handle.get_slice(key).get_shape())
        return self._shapes[name]

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = directory_fingerprint(self.directory, sorted({p for p, _ in self.location.values()}))
        return self._fingerprint


def directory_fingerprint(directory: Path, shards: list[Path]) -> str:
    """Hash of ``config.json`` and every byte of the shards, remembered per (file, size, mtime) in
    the user cache: hashing an 8B model's 16 GB takes half a minute, so it is done once."""
    memo_path = cache_dir() / "fingerprints.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    digest = hashlib.blake2b(digest_size=16)
    digest.update((directory / "config.json").read_bytes())
    changed = False
    for path in shards:
        stat = path.stat()
        key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        if key not in memo:
            file_digest = hashlib.blake2b(digest_size=16)
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(_HASH_BLOCK), b""):
                    file_digest.update(block)
            memo[key] = file_digest.hexdigest()
            changed = True
        digest.update(memo[key].encode())
    if changed:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(memo_path, json.dumps(memo).encode())
    return digest.hexdigest()


class RoundedSource(WeightSource):
    """Another source's tensors with every float tensor rounded to float16 (and back to float32):
    what an artifact stores for every tensor no plan quantizes."""

    def __init__(self, inner: WeightSource):
        self.inner = inner

    @staticmethod
    def _round(t: torch.Tensor) -> torch.Tensor:
        return t.half().float() if t.is_floating_point() else t

    def tensor(self, name: str) -> torch.Tensor:
        return self._round(self.inner.tensor(name))

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._round(self.inner.rows(name, start, stop))

    def shape(self, name: str) -> tuple[int, ...]:
        return self.inner.shape(name)

    @property
    def fingerprint(self) -> str:
        return self.inner.fingerprint
