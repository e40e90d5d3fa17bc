"""The reference model's side of an evaluation, computed once per (model, text, protocol) and cached.

A suite compares every candidate with the same full-precision reference on the same windows;
recomputing the reference's log-probabilities for each candidate and setting would double the
run. So its results are kept under ``<cache dir>/reference/<key>/``: ``meta.json`` (protocol,
the reference's own perplexities and greedy continuations), ``logprobs.npy`` (float16
log-probabilities of every scored position, ``[rows, vocab]``, memory-mapped when read) and
``top1.npy`` (its exact argmax per row, so ties in float16 cannot move top-1 agreement).

The key hashes the reference's weights and config together with the protocol (token ids of
every text, windows, BOS, prompts, format version), so a change to any of them is a miss and a
fresh computation, never a stale hit. float16 storage changes a log-probability by at most
2^-11 of its magnitude; the KL it shifts is weighted by the probability, so it is below 1e-6
nats/token against the model itself (tested) and far below the KL of any quantized model.
Entries are written to a temporary directory and renamed into place; the least recently used
beyond :data:`KEEP` are removed (each holds ``rows x vocab x 2`` bytes: 400 MB for the quick
suite on a 49k vocabulary).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mqc.models import cache_dir

FORMAT_VERSION = 2  # 2: greedy continuations decoded as one batch
KEEP = 3
_META, _LOGPROBS, _TOP1 = "meta.json", "logprobs.npy", "top1.npy"


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of a model's config and every parameter and buffer, by name, shape, dtype and bytes."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(model.config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def protocol_key(fingerprint: str, protocol: dict[str, Any]) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, "model": fingerprint, "protocol": protocol}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def default_root() -> Path:
    return cache_dir() / "reference"


@dataclass
class Reference:
    """A finished reference: its scalar results and the stored rows of the KL windows."""

    meta: dict[str, Any]
    logprobs: np.ndarray  # float16 [rows, vocab], memory-mapped
    top1: np.ndarray  # int32 [rows]

    def rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 log-probabilities (renormalized after float16 storage) and argmax of rows [start, stop)."""
        logp = torch.from_numpy(np.asarray(self.logprobs[start:stop], dtype=np.float32))
        return torch.log_softmax(logp, -1), torch.from_numpy(np.asarray(self.top1[start:stop], dtype=np.int64))


def load(root: Path, key: str) -> Reference | None:
    entry = root / key
    try:
        meta = json.loads((entry / _META).read_text())
        logprobs = np.load(entry / _LOGPROBS, mmap_mode="r")
        top1 = np.load(entry / _TOP1, mmap_mode="r")
    except (OSError, ValueError):
        return None
    os.utime(entry / _META)  # most recently used
    return Reference(meta, logprobs, top1)


class Writer:
    """Fills a new entry's arrays row by row; :meth:`commit` renames it into place."""

    def __init__(self, root: Path, key: str, rows: int, vocab: int):
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.key = root, key
        self.tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}.tmp-"))
        self.logprobs = np.lib.format.open_memmap(
            self.tmp / _LOGPROBS, mode="w+", dtype=np.float16, shape=(rows, vocab)
        )
        self.top1 = np.lib.format.open_memmap(self.tmp / _TOP1, mode="w+", dtype=np.int32, shape=(rows,))
        self.filled = 0

    def add(self, logprobs: torch.Tensor, top1: torch.Tensor) -> None:
        stop = self.filled + logprobs.shape[0]
        self.logprobs[self.filled : stop] = logprobs.to(torch.float16).numpy()
        self.top1[self.filled : stop] = top1.to(torch.int32).numpy()
        self.filled = stop

    def commit(self, meta: dict[str, Any]) -> Reference:
        if self.filled != self.top1.shape[0]:
            raise RuntimeError(f"reference has {self.filled} of {self.top1.shape[0]} rows")
        self.logprobs.flush()
        self.top1.flush()
        del self.logprobs, self.top1
        (self.tmp / _META).write_text(json.dumps(meta))
        entry = self.root / self.key
        if entry.exists():  # another run finished the same key first: keep one
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            os.replace(self.tmp, entry)
        _prune(self.root)
        found = load(self.root, self.key)
        assert found is not None
        return found

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _prune(root: Path) -> None:
    """Remove finished entries beyond the :data:`KEEP` most recently used, and stale temporaries."""
    entries = [p for p in root.iterdir() if p.is_dir() and (p / _META).is_file() and not p.name.startswith(".")]
    entries.sort(key=lambda p: (p / _META).stat().st_mtime, reverse=True)
    for old in entries[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)
    day_ago = time.time() - 86400
    for tmp in root.glob(".*.tmp-*"):
        if tmp.stat().st_mtime < day_ago:
            shutil.rmtree(tmp, ignore_errors=True)
