from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
from helpers import make_sparse_file

from imgbridge.errors import InvalidImageError, InvalidInputError
from imgbridge.source import (
    BytesSource,
    ConcatSource,
    FileSource,
    RangeSource,
    SourceRun,
    ZeroSource,
    read_exact,
)

MiB = 1 << 20


def test_file_source_reads_with_pread_semantics(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * 4)
    with FileSource(path) as src:
        assert src.size == 1024
        assert src.read_at(250, 10) == bytes([250, 251, 252, 253, 254, 255, 0, 1, 2, 3])
        assert src.read_at(1020, 100) == bytes([252, 253, 254, 255])  # short only at the end
        assert src.read_at(5000, 10) == b""


def test_file_source_sees_holes_without_reading(tmp_path: Path) -> None:
    path = make_sparse_file(tmp_path / "s", 8 * MiB, [(2 * MiB, b"x" * MiB)])
    with FileSource(path) as src:
        runs = list(src.runs())
    assert sum(r.length for r in runs) == 8 * MiB
    data = [r for r in runs if r.data]
    if len(runs) == 1:
        pytest.skip("this filesystem does not report holes (SEEK_HOLE)")
    assert data == [SourceRun(2 * MiB, MiB, True)]


def test_file_source_runs_of_a_window(tmp_path: Path) -> None:
    path = make_sparse_file(tmp_path / "s", 8 * MiB, [(2 * MiB, b"x" * MiB)])
    with FileSource(path) as src:
        runs = list(src.runs(2 * MiB + 100, 4 * MiB))
    assert runs[0].offset == 2 * MiB + 100
    assert sum(r.length for r in runs) == 4 * MiB
    assert runs[-1].offset + runs[-1].length == 6 * MiB + 100


@pytest.mark.parametrize("make", ["missing", "directory"])
def test_file_source_errors_are_one_line(tmp_path: Path, make: str) -> None:
    path = tmp_path / "x"
    if make == "directory":
        path.mkdir()
    with pytest.raises(InvalidInputError, match=r"no such file|is a directory"):
        FileSource(path)


def test_range_and_concat_sources() -> None:
    a, b = BytesSource(b"0123456789"), BytesSource(b"abcdef")
    cat = ConcatSource([a, ZeroSource(4), b])
    assert cat.size == 20
    assert cat.read_at(8, 8) == b"89\0\0\0\0ab"
    assert [r for r in cat.runs() if not r.data] == [SourceRun(10, 4, False)]
    rng = RangeSource(cat, 9, 7)
    assert rng.read_at(0, 100) == b"9\0\0\0\0ab"
    with pytest.raises(InvalidImageError):
        RangeSource(a, 5, 6)


def test_read_exact_names_what_was_truncated() -> None:
    with pytest.raises(InvalidImageError, match="header needs 16 bytes"):
        read_exact(BytesSource(b"short"), 0, 16, what="header")


def test_as_fileobj_serves_tarfile(tmp_path: Path) -> None:
    member = tmp_path / "hello.txt"
    member.write_text("hello")
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(member, arcname="hello.txt")
    with FileSource(archive) as src, tarfile.open(fileobj=src.as_fileobj()) as tar:
        extracted = tar.extractfile("hello.txt")
        assert extracted is not None and extracted.read() == b"hello"
