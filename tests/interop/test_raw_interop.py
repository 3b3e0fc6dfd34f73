"""raw against qemu-img: conversion, allocation map and comparison agree with QEMU's own."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import CountingSource, make_sparse_file, require_tool, run_cli_process, run_tool
from imgbridge.formats.disk import raw

from imgbridge.output import AtomicOutput
from imgbridge.source import FileSource

pytestmark = pytest.mark.interop

MiB = 1 << 20
GiB = 1 << 30


def _pattern(seed: int, n: int) -> bytes:
    block = bytes((seed * 31 + i * 7) % 251 + 1 for i in range(4096))
    return (block * (n // 4096 + 1))[:n]




@pytest.fixture(scope="module")
def big_sparse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 GiB, 100 MiB of data in five runs, the rest holes (made by qemu-io, not by us)."""
    require_tool("qemu-img")
    require_tool("qemu-io")
    path = tmp_path_factory.mktemp("big") / "big.raw"
    run_tool("qemu-img", "create", "-f", "raw", path, "4G")
    layout = [(0, 4), (512, 30), (1500, 16), (3000, 40), (4096 - 10, 10)]  # (MiB offset, MiB)
    for i, (off, length) in enumerate(layout):
        run_tool("qemu-io", "-f", "raw", "-c",
                 f"write -P {0x11 + i} {off}M {length}M", path)
    return path


@pytest.mark.slow
def test_4gib_sparse_raw_to_raw(big_sparse: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy.raw"
    result = run_cli_process("convert", "-f", "raw", big_sparse, out)
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size == 4 * GiB
    allocated = out.stat().st_blocks * 512
    assert 100 * MiB <= allocated <= 104 * MiB, f"output allocates {allocated} bytes"
    assert "identical" in run_tool("qemu-img", "compare", "-f", "raw", "-F", "raw",
                                   big_sparse, out).stdout


@pytest.mark.slow
def test_4gib_conversion_reads_only_the_data(big_sparse: Path, tmp_path: Path) -> None:
    counting = CountingSource(FileSource(big_sparse))
    with AtomicOutput(str(tmp_path / "copy.raw")) as out:
        raw.create(out, raw.RawDisk(counting), {}, lambda done, total: None)
        out.commit()
    assert counting.bytes_read == 100 * MiB  # every data byte once, not one byte of a hole
    data_runs = [r for r in FileSource(big_sparse).runs() if r.data]
    for offset, n in counting.reads:
        assert any(r.offset <= offset and offset + n <= r.offset + r.length for r in data_runs)


def _sample_raws(tmp_path: Path) -> list[Path]:
    return [
        make_sparse_file(tmp_path / "empty.raw", 4 * MiB, []),
        make_sparse_file(tmp_path / "full.raw", MiB, [(0, _pattern(1, MiB))]),
        make_sparse_file(tmp_path / "holes.raw", 32 * MiB,
                         [(MiB, _pattern(2, 64 * 1024)), (3 * MiB, bytes(64 * 1024)),
                          (9 * MiB + 4096, _pattern(3, 12288)), (31 * MiB, _pattern(4, MiB))]),
        make_sparse_file(tmp_path / "odd.raw", 5 * MiB + 4096, [(5 * MiB, b"tail" * 1024)]),
    ]


def test_map_json_matches_qemu_img(tmp_path: Path) -> None:
    require_tool("qemu-img")
    for path in _sample_raws(tmp_path):
        ours = run_cli_process("map", "--json", "-f", "raw", path)
        assert ours.returncode == 0, ours.stderr
        theirs = run_tool("qemu-img", "map", "--output=json", "-f", "raw", path)
        assert json.loads(ours.stdout) == json.loads(theirs.stdout), path.name


def test_compare_agrees_with_qemu_img(tmp_path: Path) -> None:
    require_tool("qemu-img")
    base = make_sparse_file(tmp_path / "base.raw", 8 * MiB, [(MiB, _pattern(5, MiB))])
    cases = {
        "same": make_sparse_file(tmp_path / "same.raw", 8 * MiB, [(MiB, _pattern(5, MiB))]),
        "one-byte": make_sparse_file(tmp_path / "byte.raw", 8 * MiB,
                                     [(MiB, _pattern(5, MiB)), (6 * MiB + 777, b"!")]),
        "in-data": make_sparse_file(tmp_path / "indata.raw", 8 * MiB,
                                    [(MiB, _pattern(5, MiB)), (MiB + 5000, b"\0\0\0")]),
        "longer-zero": make_sparse_file(tmp_path / "longz.raw", 12 * MiB,
                                        [(MiB, _pattern(5, MiB))]),
        "longer-data": make_sparse_file(tmp_path / "longd.raw", 12 * MiB,
                                        [(MiB, _pattern(5, MiB)), (10 * MiB + 3, b"x")]),
        "shorter": make_sparse_file(tmp_path / "short.raw", 2 * MiB, [(MiB, _pattern(5, MiB))]),
    }
    for name, other in cases.items():
        ours = run_cli_process("compare", "-f", "raw", "-F", "raw", base, other)
        theirs = run_tool("qemu-img", "compare", "-f", "raw", "-F", "raw", base, other,
                          check=False)
        assert ours.returncode == theirs.returncode, (name, ours.stdout, theirs.stdout)
        if theirs.returncode == 1:
            # qemu-img reports the 512-byte sector; we report the byte inside it.
            ours_at = int(ours.stdout.split("offset ")[1].rstrip("!\n"))
            theirs_at = int(theirs.stdout.split("offset ")[1].rstrip("!\n"))
            assert ours_at // 512 * 512 == theirs_at, name
    missing = run_cli_process("compare", base, tmp_path / "nope.raw")
    assert missing.returncode == 2
    assert run_tool("qemu-img", "compare", base, tmp_path / "nope.raw", check=False).returncode == 2


def test_inspect_json_matches_qemu_img_info(tmp_path: Path) -> None:
    require_tool("qemu-img")
    path = _sample_raws(tmp_path)[2]
    ours = json.loads(run_cli_process("inspect", "--json", "-f", "raw", path).stdout)
    theirs = json.loads(run_tool("qemu-img", "info", "--output=json", "-f", "raw", path).stdout)
    for key in ("virtual-size", "format", "actual-size", "dirty-flag"):
        assert ours[key] == theirs[key], key
    assert os.path.abspath(ours["filename"]) == os.path.abspath(theirs["filename"])
