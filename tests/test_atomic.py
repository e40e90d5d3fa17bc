"""mqc.atomic: outputs replace old ones only whole, and --force only replaces what mqc wrote."""

from __future__ import annotations

from pathlib import Path

import pytest

from mqc.atomic import check_replaceable, replaced_dir, replaced_file, write_bytes
from mqc.errors import ArtifactError


def ours(path: Path) -> bool:
    return (path / "OURS").is_file() if path.is_dir() else path.read_bytes().startswith(b"OURS")


def make_ours(path: Path, payload: str = "old") -> Path:
    path.mkdir()
    (path / "OURS").write_text(payload)
    return path


def test_new_directory_appears_whole(tmp_path):
    with replaced_dir(tmp_path / "out", False, ours, "ours") as tmp:
        (tmp / "OURS").write_text("new")
        assert not (tmp_path / "out").exists()
    assert (tmp_path / "out" / "OURS").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_existing_output_needs_force(tmp_path):
    out = make_ours(tmp_path / "out")
    with pytest.raises(ArtifactError, match="already exists.*--force"):
        with replaced_dir(out, False, ours, "ours"):
            pytest.fail("the block must not run")
    with replaced_dir(out, True, ours, "ours") as tmp:
        (tmp / "OURS").write_text("new")
    assert (out / "OURS").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("kind", ["foreign_dir", "foreign_file", "symlink"])
def test_force_refuses_what_is_not_ours(tmp_path, kind):
    out = tmp_path / "out"
    if kind == "foreign_dir":
        out.mkdir()
        (out / "thesis.tex").write_text("years of work")
    elif kind == "foreign_file":
        out.write_text("years of work")
    else:
        make_ours(tmp_path / "real")
        out.symlink_to(tmp_path / "real")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(ArtifactError, match="not ours; not replacing it even with --force"):
        with replaced_dir(out, True, ours, "ours"):
            pytest.fail("the block must not run")
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_empty_directory_may_be_replaced_but_not_by_a_file(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    check_replaceable(out, True, ours, "ours")
    with pytest.raises(ArtifactError, match="not ours"):
        check_replaceable(out, True, ours, "ours", directory=False)


@pytest.mark.parametrize("existing", [False, True])
def test_failure_inside_the_block_keeps_the_old_output(tmp_path, existing):
    out = make_ours(tmp_path / "out") if existing else tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with replaced_dir(out, True, ours, "ours") as tmp:
            (tmp / "OURS").write_text("half")
            raise RuntimeError("boom")
    assert (out / "OURS").read_text() == "old" if existing else not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["out"] if existing else [])


def test_output_that_appears_meanwhile_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ArtifactError, match="not ours"):
        with replaced_dir(out, True, ours, "ours") as tmp:
            (tmp / "OURS").write_text("new")
            out.mkdir()
            (out / "thesis.tex").write_text("someone else's")
    assert (out / "thesis.tex").read_text() == "someone else's"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_files(tmp_path):
    out = tmp_path / "model.bin"
    with replaced_file(out, False, ours, "ours") as tmp:
        tmp.write_bytes(b"OURS v1")
    with pytest.raises(RuntimeError):
        with replaced_file(out, True, ours, "ours") as tmp:
            tmp.write_bytes(b"OURS v2, half")
            raise RuntimeError
    assert out.read_bytes() == b"OURS v1"
    with replaced_file(out, True, ours, "ours") as tmp:
        tmp.write_bytes(b"OURS v2")
    assert out.read_bytes() == b"OURS v2"
    write_bytes(tmp_path / "report.json", b"{}")
    write_bytes(tmp_path / "report.json", b"[]")
    assert (tmp_path / "report.json").read_bytes() == b"[]"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin", "report.json"]
