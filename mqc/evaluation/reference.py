"""The reference model's side of an evaluation, computed once per (model, text, protocol) and cached.

A suite compares every candidate with the same full-precision reference on the same windows;
recomputing the reference for each candidate and setting would double the run. So its results
are kept under ``<cache dir>/reference/<key>/``: ``meta.json`` (protocol, the reference's own
perplexities and greedy continuations), ``hidden.npy`` (float32 hidden states entering the head
at every scored position, ``[rows, hidden]``, memory-mapped when read) and ``top1.npy`` (its
argmax per row). The log-probabilities are recomputed from the hidden states by the reference's
own head, a few rows at a time, when a candidate is compared: exact, and an entry is
``rows x hidden x 4`` bytes (16 MB for the quick suite at a hidden size of 1024), where storing
``[rows, vocab]`` log-probabilities took 2 GB for a 262k vocabulary and held them in memory.

The key hashes the reference's weights and config together with the protocol (token ids of
every text, windows, BOS, prompts, format version), so a change to any of them is a miss and a
fresh computation, never a stale hit. Entries are written to a temporary directory and renamed
into place; the least recently used beyond :data:`KEEP` are removed.
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

FORMAT_VERSION = 3  # 3: hidden states, the head recomputes the log-probabilities
KEEP = 3
_META, _HIDDEN, _TOP1 = "meta.json", "hidden.npy", "top1.npy"


def protocol_key(fingerprint: str, protocol: dict[str, Any]) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, "model": fingerprint, "protocol": protocol}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def default_root() -> Path:
    return cache_dir() / "reference"


@dataclass
class Reference:
    """A finished reference: its scalar results and the stored rows of the KL windows."""

    meta: dict[str, Any]
    hidden: np.ndarray  # float32 [rows, hidden], memory-mapped
    top1: np.ndarray  # int32 [rows]

    def rows(self, start: int, stop: int, head) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 log-probabilities (``head``: the reference's) and argmax of rows [start, stop)."""
        hidden = torch.from_numpy(np.array(self.hidden[start:stop], dtype=np.float32))
        with torch.no_grad():
            logp = torch.log_softmax(head(hidden).float(), -1)
        return logp, torch.from_numpy(np.asarray(self.top1[start:stop], dtype=np.int64))


def load(root: Path, key: str) -> Reference | None:
    entry = root / key
    try:
        meta = json.loads((entry / _META).read_text())
        hidden = np.load(entry / _HIDDEN, mmap_mode="r")
        top1 = np.load(entry / _TOP1, mmap_mode="r")
    except (OSError, ValueError):
        return None
    os.utime(entry / _META)  # most recently used
    return Reference(meta, hidden, top1)


class Writer:
    """Fills a new entry's arrays row by row; :meth:`commit` renames it into place."""

    def __init__(self, root: Path, key: str, rows: int, hidden: int):
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.key = root, key
        self.tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}.tmp-"))
        self.hidden = np.lib.format.open_memmap(self.tmp / _HIDDEN, mode="w+", dtype=np.float32, shape=(rows, hidden))
        self.top1 = np.lib.format.open_memmap(self.tmp / _TOP1, mode="w+", dtype=np.int32, shape=(rows,))
        self.filled = 0

    def add(self, hidden: torch.Tensor, top1: torch.Tensor) -> None:
        stop = self.filled + hidden.shape[0]
        self.hidden[self.filled : stop] = hidden.float().numpy()
        self.top1[self.filled : stop] = top1.to(torch.int32).numpy()
        self.filled = stop

    def commit(self, meta: dict[str, Any]) -> Reference:
        if self.filled != self.top1.shape[0]:
            raise RuntimeError(f"reference has {self.filled} of {self.top1.shape[0]} rows")
        self.hidden.flush()
        self.top1.flush()
        del self.hidden, self.top1
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
