from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import CountingSource, make_sparse_file

import imgbridge
from imgbridge.errors import InvalidInputError
from imgbridge.model.disk import ExtentKind
from imgbridge.output import AtomicOutput
from imgbridge.source import FileSource, SourceRun

MiB = 1 << 20




def _data_runs(path: Path) -> list[SourceRun]:
    with FileSource(path) as src:
        runs = [r for r in src.runs() if r.data]
    if len(runs) == 1 and runs[0].length == os.path.getsize(path):
        pytest.skip("this filesystem does not report holes (SEEK_HOLE)")
    return runs


def test_raw_conversion_never_reads_a_hole(tmp_path: Path) -> None:
    from imgbridge.formats.disk import raw

    src_path = make_sparse_file(tmp_path / "src.raw", 64 * MiB,
                                [(1 * MiB, b"a" * MiB), (40 * MiB, b"b" * 3 * MiB)])
    data_runs = _data_runs(src_path)
    counting = CountingSource(FileSource(src_path))
    disk = raw.RawDisk(counting)
    with AtomicOutput(str(tmp_path / "out.raw")) as out:
        raw.create(out, disk, {}, lambda done, total: None)
        out.commit()
    assert counting.reads, "the data was never read"
    for offset, n in counting.reads:
        assert any(r.offset <= offset and offset + n <= r.offset + r.length for r in data_runs), \
            f"read {offset}+{n} touches a hole"
    assert (tmp_path / "out.raw").read_bytes() == src_path.read_bytes()


def test_raw_writer_leaves_zero_blocks_as_holes(tmp_path: Path) -> None:
    # Zeros that were *written* (allocated in the source) still become holes in the output.
    src = tmp_path / "zeros-written.raw"
    src.write_bytes(bytes(4 * MiB) + b"x" * 4096 + bytes(4 * MiB))
    imgbridge.convert(src, tmp_path / "out.raw", format="raw")
    out = tmp_path / "out.raw"
    assert out.stat().st_size == src.stat().st_size
    assert out.read_bytes() == src.read_bytes()
    assert out.stat().st_blocks * 512 <= 64 * 1024


def test_raw_map_reports_holes_as_zero(tmp_path: Path) -> None:
    path = make_sparse_file(tmp_path / "s.raw", 8 * MiB, [(4 * MiB, b"z" * MiB)])
    _data_runs(path)
    extents = imgbridge.allocation_map(path, "raw")
    assert [(e.offset, e.length, e.kind) for e in extents] == [
        (0, 4 * MiB, ExtentKind.ZERO), (4 * MiB, MiB, ExtentKind.DATA),
        (5 * MiB, 3 * MiB, ExtentKind.ZERO)]


@pytest.mark.parametrize("prealloc", ["off", "falloc", "full"])
def test_raw_preallocation(tmp_path: Path, prealloc: str) -> None:
    src = make_sparse_file(tmp_path / "s.raw", 4 * MiB, [(MiB, b"q" * 4096)])
    out = tmp_path / f"{prealloc}.raw"
    imgbridge.convert(src, out, format="raw", options={"preallocation": prealloc})
    assert out.read_bytes() == src.read_bytes()
    allocated = out.stat().st_blocks * 512
    if prealloc == "off":
        assert allocated < MiB
    else:
        assert allocated >= 4 * MiB


def test_raw_rejects_an_unknown_preallocation(tmp_path: Path) -> None:
    src = make_sparse_file(tmp_path / "s.raw", MiB, [])
    with pytest.raises(InvalidInputError, match="preallocation"):
        imgbridge.convert(src, tmp_path / "o.raw", format="raw", options={"preallocation": "x"})
    assert not (tmp_path / "o.raw").exists()
    assert os.listdir(tmp_path) == ["s.raw"]


def test_raw_is_only_ever_guessed(tmp_path: Path) -> None:
    path = make_sparse_file(tmp_path / "disk.img", MiB, [(0, b"\x01" * 512)])
    info = imgbridge.inspect(path)
    assert info["format"] == "raw" and info["format-guessed"] is True
    assert "format-guessed" not in imgbridge.inspect(path, "raw")
    with pytest.raises(InvalidInputError, match="would be read as raw"):
        imgbridge.convert(path, tmp_path / "o.raw")
    imgbridge.convert(path, tmp_path / "o.raw", format="raw")
    assert (tmp_path / "o.raw").read_bytes() == path.read_bytes()
