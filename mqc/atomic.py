"""Outputs written so that a failure never loses the old one and ``--force`` never deletes what
mqc did not write.

Every output (an artifact directory, an ONNX export directory, a GGUF file, a report file) is
written to a temporary sibling and renamed into place only when complete: a crash or an error
leaves the previous output as it was and no half-written one. An existing output is replaced
only with ``force``, and only when it is recognisably one of ours (``ours(path)``: an artifact's
manifest, an export's ``mqc_onnx.json``, a GGUF file marked by mqc) or an empty directory;
anything else is refused even with ``force`` (``--force --out ~`` must not delete a home
directory). The check runs before any work (:func:`check_replaceable`) and again at the swap.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from mqc.errors import ArtifactError


def check_replaceable(out: Path, force: bool, ours: Callable[[Path], bool], what: str, directory: bool = True) -> None:
    """Refuse (one-line :class:`ArtifactError`) to write over ``out`` unless it is absent, or
    ``force`` is given and ``out`` is ``what`` (an output ``ours`` recognises) or, for a
    ``directory`` output, an empty directory."""
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise ArtifactError(f"{out} already exists; choose another output or pass --force to replace it")
    empty_dir = directory and out.is_dir() and not out.is_symlink() and not any(out.iterdir())
    if out.is_symlink() or not (empty_dir or ours(out)):
        raise ArtifactError(
            f"{out} exists and is not {what}; not replacing it even with --force, choose another output"
        )


@contextlib.contextmanager
def replaced_dir(out: str | os.PathLike, force: bool, ours: Callable[[Path], bool], what: str) -> Iterator[Path]:
    """A temporary directory beside ``out`` that becomes ``out`` when the block succeeds (the old
    ``out``, if any, is removed only after the new one is in place)."""
    out = Path(out)
    check_replaceable(out, force, ours, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        _swap_in(tmp, out, force, ours, what)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def replaced_file(out: str | os.PathLike, force: bool, ours: Callable[[Path], bool], what: str) -> Iterator[Path]:
    """A temporary file beside ``out`` that replaces ``out`` when the block succeeds."""
    out = Path(out)
    check_replaceable(out, force, ours, what, directory=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.tmp-")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        check_replaceable(out, force, ours, what, directory=False)  # nothing else took the name meanwhile
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file of mqc's own (a report, a benchmark result) atomically, replacing any old one."""
    with replaced_file(path, True, Path.is_file, "a file") as tmp:
        tmp.write_bytes(data)


def _swap_in(new: Path, out: Path, force: bool, ours: Callable[[Path], bool], what: str) -> None:
    """Move ``new`` to ``out``; an existing ``out`` is set aside first and put back if the move fails."""
    if not (out.exists() or out.is_symlink()):
        os.replace(new, out)
        return
    check_replaceable(out, force, ours, what)
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    try:
        os.replace(out, old / "previous")
        try:
            os.replace(new, out)
        except BaseException:
            os.replace(old / "previous", out)
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
