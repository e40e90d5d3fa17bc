"""The analysis directory: everything an analysis makes, written as it is made.

Layout::

    analysis.json        format, version, the model's fingerprint, the settings, the units and
                         sizes, what is finished (``done``, ``progress`` per streamed stage), the
                         time and peak memory of every stage and layer, and the size and sha256
                         of every other file
    calib.safetensors    calibration token ids
    candidates/...       every unit at every choice, packed as deployed, one file per decoder
                         layer (or block of rows of the embedding/head)
    inputs/...           decoder-layer inputs kept for the streamed backward passes
    state.safetensors    the hidden states after the last finished layer (what a resumed sweep
                         starts from)
    *.json               costs, output Fisher summaries, KV costs

Each file is written to a temporary name and renamed into place, and only then recorded in
``analysis.json`` (itself replaced atomically): a killed run leaves a directory that resumes from
the last recorded layer. A file is checked against its recorded size when the directory is
opened and against its sha256 the first time it is read, so a truncated or corrupted file is
refused by name, never read as data.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mqc.atomic import check_replaceable, replaced_file
from mqc.errors import AnalysisError
from mqc.version import __version__

FORMAT = "mqc-analysis"
FORMAT_VERSION = 1
MANIFEST = "analysis.json"
WHAT = "an mqc analysis"
_DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def _os_error(message: str) -> int | None:
    """The errno in a safetensors I/O error's message (``... (os error 28)``)."""
    match = re.search(r"os error (\d+)", message)
    return int(match.group(1)) if match else None


def is_analysis(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


class AnalysisStore:
    """Reads and writes one analysis directory (see the module docstring)."""

    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.root = root
        self.manifest = manifest
        self._verified: set[str] = set()

    # ---------------------------------------------------------------------------------------
    # opening
    # ---------------------------------------------------------------------------------------
    @classmethod
    def create(cls, root: str | Path, header: dict[str, Any], force: bool = False) -> AnalysisStore:
        """A fresh directory (``force``: replacing an analysis of ours, never anything else)."""
        root = Path(root)
        check_replaceable(root, force, is_analysis, WHAT)
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "mqc_version": __version__,
            **header,
            "done": [],
            "progress": {},
            "stages": {},
            "files": {},
            "created": time.time(),
        }
        store = cls(root, manifest)
        store.save_manifest()
        return store

    @classmethod
    def open(cls, root: str | Path) -> AnalysisStore:
        """An existing directory, checked: format, version and every recorded file's size."""
        root = Path(root)
        path = root / MANIFEST
        if not root.is_dir():
            raise AnalysisError(f"analysis {root} not found; make one with `mqc analyze MODEL --out {root}`")
        if not path.is_file():
            raise AnalysisError(f"{root} has no {MANIFEST}; it is not an mqc analysis")
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise AnalysisError(f"{path} is corrupted ({exc}); delete {root} and analyze again") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise AnalysisError(f"{path} is not an mqc analysis manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise AnalysisError(
                f"{root} is analysis format {manifest.get('format_version')}, this mqc reads {FORMAT_VERSION}; analyze again"
            )
        store = cls(root, manifest)
        for name, record in manifest.get("files", {}).items():
            file = root / name
            if not file.is_file():
                raise AnalysisError(
                    f"{file} is missing; the analysis is incomplete, run `mqc analyze` again to redo it"
                )
            if file.stat().st_size != record["size"]:
                raise AnalysisError(
                    f"{file} has {file.stat().st_size} bytes, the analysis recorded {record['size']}: truncated; "
                    f"delete {root} and analyze again"
                )
        return store

    # ---------------------------------------------------------------------------------------
    # the manifest
    # ---------------------------------------------------------------------------------------
    def save_manifest(self) -> None:
        self._write(MANIFEST, lambda tmp: tmp.write_text(json.dumps(self.manifest, indent=1, default=str)))

    def is_done(self, stage: str) -> bool:
        return stage in self.manifest["done"]

    def finish(self, stage: str, seconds: float, peak_rss: int, **facts: Any) -> None:
        self.manifest["stages"].setdefault(stage, {}).update(seconds=seconds, peak_rss_bytes=peak_rss, **facts)
        if stage not in self.manifest["done"]:
            self.manifest["done"].append(stage)
        self.save_manifest()

    def progress(self, stage: str, default: Any = None) -> Any:
        return self.manifest["progress"].get(stage, default)

    def record_step(self, stage: str, progress: Any, step: dict[str, Any]) -> None:
        """A streamed stage's step is finished: its files are written; remember where to resume."""
        self.manifest["progress"][stage] = progress
        self.manifest["stages"].setdefault(stage, {}).setdefault("steps", []).append(step)
        self.save_manifest()

    def steps(self, stage: str) -> list[dict[str, Any]]:
        return self.manifest["stages"].get(stage, {}).get("steps", [])

    # ---------------------------------------------------------------------------------------
    # files
    # ---------------------------------------------------------------------------------------
    def _write(self, name: str, write) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with replaced_file(path, True, Path.is_file, "a file") as tmp:
                write(tmp)
        except (OSError, SafetensorError) as exc:
            code = exc.errno if isinstance(exc, OSError) else _os_error(str(exc))
            if code in _DISK_FULL:
                free = shutil.disk_usage(self.root).free
                raise AnalysisError(
                    f"cannot write {path}: {os.strerror(code)} ({free / 2**20:.0f} MiB free); free space and run the "
                    "same command again: the analysis resumes from its last finished step"
                ) from None
            raise

    def _record(self, name: str) -> None:
        path = self.root / name
        self.manifest["files"][name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
        self._verified.add(name)

    def put_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Write a safetensors file (recorded in the manifest at the next :meth:`save_manifest`)."""
        contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        self._write(name, lambda tmp: save_file(contiguous, tmp))
        self._record(name)

    def put_json(self, name: str, data: Any) -> None:
        self._write(name, lambda tmp: tmp.write_text(json.dumps(data, default=str)))
        self._record(name)

    def _check(self, name: str) -> Path:
        path = self.root / name
        record = self.manifest["files"].get(name)
        if record is None or not path.is_file():
            raise AnalysisError(f"{path} is missing from the analysis; delete {self.root} and analyze again")
        if name not in self._verified:
            if path.stat().st_size != record["size"] or _sha256(path) != record["sha256"]:
                raise AnalysisError(
                    f"{path} does not match its recorded sha256: corrupted; delete {self.root} and analyze again"
                )
            self._verified.add(name)
        return path

    def tensors(
        self, name: str, keys: list[str] | None = None, missing_ok: bool = False
    ) -> dict[str, torch.Tensor | None]:
        """Tensors of a file (all, or ``keys``; ``missing_ok``: an absent key is None), memory-mapped
        until touched."""
        path = self._check(name)
        try:
            with safe_open(path, framework="pt") as handle:
                present = set(handle.keys())
                wanted = keys if keys is not None else sorted(present)
                out = {}
                for key in wanted:
                    if key in present:
                        out[key] = handle.get_tensor(key)
                    elif missing_ok:
                        out[key] = None
                    else:
                        raise AnalysisError(f"{path} lacks {key!r}; delete {self.root} and analyze again")
                return out
        except SafetensorError as exc:
            raise AnalysisError(f"cannot read {path} ({exc}); delete {self.root} and analyze again") from None

    def keys(self, name: str) -> list[str]:
        path = self._check(name)
        with safe_open(path, framework="pt") as handle:
            return list(handle.keys())

    def json(self, name: str) -> Any:
        path = self._check(name)
        return json.loads(path.read_text())

    def has(self, name: str) -> bool:
        return name in self.manifest["files"]

    def remove(self, prefix: str) -> None:
        """Forget and delete every file under ``prefix`` (inputs no later stage reads)."""
        for name in [n for n in self.manifest["files"] if n.startswith(prefix)]:
            del self.manifest["files"][name]
            (self.root / name).unlink(missing_ok=True)
        self.save_manifest()

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())
