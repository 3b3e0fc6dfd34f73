"""qcow2 writing against QEMU: every image imgbridge writes must pass ``qemu-img check`` (no
errors, no leaks) and ``qemu-img compare`` against its source, and read back as QEMU says.

The matrix: compat 0.10 and 1.1; clusters of 512 B, 64 KiB and 2 MiB; refcount_bits 1, 16 and
64; ``-c`` with zlib and zstd. Then zero runs (never allocated: ``qemu-img map`` shows no data
and the file stays small), overlays made by ``imgbridge create`` and then written by
``qemu-io`` (QEMU allocating into our metadata), ``convert -B`` (only the difference stored,
the rest read from the base), a raw image made by ``create``, and libyal's qcowinfo as a third
opinion on what it supports (it refuses zstd, naming the incompatible feature bit we set).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from helpers import require_tool, run_cli_process, run_tool

pytestmark = pytest.mark.interop

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SIZE = 24 * MiB

#: qemu-io writes of the source: runs off cluster boundaries, written zeros inside data, the
#: last sector. Python adds a run of random bytes (incompressible) and one of text.
SOURCE_WRITES = [
    "write -P 0x11 0 100k",
    "write -P 0x22 1028k 300k",
    "write -z 1088k 128k",  # two whole clusters of zeros inside the data
    "write -z 1260k 5k",    # zeros inside a data cluster: the cluster is stored
    "write -P 0x33 3M 2M",
    "write -P 0x44 6M 1536",
    "write -P 0x00 8M 1M",  # zeros that are really written: still never stored
    f"write -P 0x55 {SIZE - 512} 512",
]
RANDOM_AT, TEXT_AT = 10 * MiB, 14 * MiB


def _text(n: int) -> bytes:
    out = b"".join(b"%08d: the quick brown fox jumps over the lazy dog\n" % i
                   for i in range(n // 58 + 1))
    return out[:n]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_tool("qemu-img")
    require_tool("qemu-io")
    path = tmp_path_factory.mktemp("src") / "src.raw"
    run_tool("qemu-img", "create", "-q", "-f", "raw", path, str(SIZE))
    args: list[str] = []
    for write in SOURCE_WRITES:
        args += ["-c", write]
    run_tool("qemu-io", "-f", "raw", *args, path)
    with open(path, "r+b") as f:
        f.seek(RANDOM_AT)
        f.write(os.urandom(MiB + 3000))
        f.seek(TEXT_AT)
        f.write(_text(2 * MiB))
    return path


def ib(*args: str | os.PathLike[str], cwd: Path | None = None) -> None:
    result = run_cli_process(*args, cwd=cwd)
    assert result.returncode == 0, result.stderr


def qemu_check(path: Path) -> dict[str, Any]:
    """qemu-img check must find the image clean: no corruption, no leak, no check error."""
    result = run_tool("qemu-img", "check", "--output=json", path, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    assert report.get("check-errors", 0) == 0
    assert report.get("corruptions", 0) == 0
    assert report.get("leaks", 0) == 0
    return report


def qemu_same(a: Path, a_fmt: str, b: Path, b_fmt: str = "qcow2") -> None:
    result = run_tool("qemu-img", "compare", "-f", a_fmt, "-F", b_fmt, a, b, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def qemu_info(path: Path) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(
        run_tool("qemu-img", "info", "--output=json", path).stdout)
    return info


def qemu_map(path: Path) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = json.loads(
        run_tool("qemu-img", "map", "--output=json", path).stdout)
    return items


def covering(items: list[dict[str, Any]], start: int, length: int) -> list[dict[str, Any]]:
    return [i for i in items if i["start"] < start + length and start < i["start"] + i["length"]]


CASES = {
    "v3": ("compat=1.1", False),
    "v2": ("compat=0.10", False),
    "512-v3": ("cluster_size=512", False),
    "512-v2": ("compat=0.10,cluster_size=512", False),
    "2M-v3": ("cluster_size=2M", False),
    "2M-v2": ("compat=0.10,cluster_size=2M", False),
    "refcount1": ("refcount_bits=1", False),
    "refcount1-512": ("refcount_bits=1,cluster_size=512", False),
    "refcount64": ("refcount_bits=64", False),
    "zlib": ("", True),
    "zlib-v2": ("compat=0.10", True),
    "zlib-512": ("cluster_size=512", True),
    "zlib-refcount1": ("refcount_bits=1,cluster_size=4k", True),
    "zstd": ("compression_type=zstd", True),
    "zstd-2M": ("compression_type=zstd,cluster_size=2M", True),
}


@pytest.mark.parametrize("case", CASES)
def test_qemu_checks_and_compares_what_we_write(source: Path, tmp_path: Path,
                                                case: str) -> None:
    options, compress = CASES[case]
    out = tmp_path / "out.qcow2"
    args: list[str | os.PathLike[str]] = ["convert", "-f", "raw", "-O", "qcow2", source, out]
    if options:
        args += ["-o", options]
    if compress:
        args.append("-c")
    ib(*args)
    report = qemu_check(out)
    qemu_same(source, "raw", out)
    wanted = dict(kv.split("=") for kv in options.split(",") if kv)
    info = qemu_info(out)
    data = info["format-specific"]["data"]
    assert info["virtual-size"] == SIZE
    assert info["cluster-size"] == {"512": 512, "2M": 2 * MiB, "4k": 4096}.get(
        wanted.get("cluster_size", ""), 64 * KiB)
    assert data["compat"] == wanted.get("compat", "1.1")
    assert data["refcount-bits"] == int(wanted.get("refcount_bits", "16"))
    assert data.get("compression-type", "zlib") == wanted.get("compression_type", "zlib")
    stats = report.get("compressed-clusters", 0)
    assert (stats > 0) == compress, report
    if compress and info["cluster-size"] < MiB:  # the random run did not shrink: plain
        assert stats < report["allocated-clusters"]
    _qcowinfo_agrees(out, zstd=wanted.get("compression_type") == "zstd")


def _qcowinfo_agrees(path: Path, *, zstd: bool) -> None:
    """libyal's reader: the version and size it prints, or (zstd, which it does not know) a
    refusal that names the compression-type incompatible feature bit."""
    require_tool("qcowinfo")
    result = run_tool("qcowinfo", path, check=False)
    if zstd:
        assert result.returncode != 0
        assert "unsupported incompatible features flags: 0x00000008" in \
            result.stdout + result.stderr
        return
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"({SIZE} bytes)" in result.stdout


def test_zero_runs_are_not_allocated(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.qcow2"
    ib("convert", "-f", "raw", source, out)
    items = qemu_map(out)
    # Never written, written with -z, and written as zeros: no data, nothing present.
    for start, length in ((2 * MiB, MiB), (1088 * KiB, 128 * KiB), (8 * MiB, MiB),
                          (TEXT_AT + 2 * MiB, 4 * MiB)):
        for item in covering(items, start, length):
            assert not item["data"] and not item["present"], item
    written = sum(i["length"] for i in items if i["data"])
    assert written < 9 * MiB
    assert out.stat().st_size < written + 2 * MiB


@pytest.mark.slow
def test_a_big_sparse_disk_stays_small(tmp_path: Path) -> None:
    src = tmp_path / "big.raw"
    run_tool("qemu-img", "create", "-q", "-f", "raw", src, "64G")
    run_tool("qemu-io", "-f", "raw", "-c", "write -P 0x77 1G 1M", "-c",
             f"write -P 0x78 {64 * GiB - MiB} 1M", src)
    out = tmp_path / "big.qcow2"
    ib("convert", "-f", "raw", src, out)
    report = qemu_check(out)
    assert out.stat().st_size < 4 * MiB
    assert report["image-end-offset"] == out.stat().st_size
    assert [i["length"] for i in qemu_map(out) if i["data"]] == [MiB, MiB]
    qemu_same(src, "raw", out)


# ---- overlays: imgbridge create, written by qemu-io; convert -B --------------------------------

OVERLAY_WRITES = [
    "write -P 0x91 64k 64k",      # a whole cluster over base data
    "write -P 0x92 3100k 10k",    # part of a cluster: QEMU copies the rest from the base
    "write -z 3M 128k",           # zeros that must hide the base (a zero cluster in v3)
    "write -P 0x93 20M 1M",       # where the base has nothing
]


@pytest.fixture(scope="module")
def base(source: Path) -> Path:
    """The base image, made by qemu-img (not by us)."""
    path = source.parent / "base.qcow2"
    if not path.exists():
        run_tool("qemu-img", "convert", "-f", "raw", "-O", "qcow2", source, path)
    return path


def _expected(source: Path, tmp_path: Path) -> Path:
    """The source with the overlay's writes applied by qemu-io, as a raw file."""
    expected = tmp_path / "expected.raw"
    shutil.copyfile(source, expected)
    args: list[str] = []
    for write in OVERLAY_WRITES:
        args += ["-c", write]
    run_tool("qemu-io", "-f", "raw", *args, expected)
    return expected


@pytest.mark.parametrize("options", ["compat=1.1", "compat=0.10", "cluster_size=512",
                                     "cluster_size=2M,refcount_bits=1"])
def test_overlay_made_by_create_takes_qemu_io_writes(source: Path, base: Path, tmp_path: Path,
                                                     options: str) -> None:
    local_base = tmp_path / "base.qcow2"
    os.link(base, local_base)
    top = tmp_path / "top.qcow2"
    ib("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "-o", options, top,
       cwd=tmp_path)
    info = qemu_info(top)
    assert info["backing-filename"] == "base.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    assert info["virtual-size"] == SIZE
    qemu_check(top)
    qemu_same(base, "qcow2", top)
    args: list[str] = []
    for write in OVERLAY_WRITES:
        args += ["-c", write]
    run_tool("qemu-io", "-f", "qcow2", *args, top)
    qemu_check(top)
    qemu_same(_expected(source, tmp_path), "raw", top)


def test_create_names_the_base_relative_to_the_overlay(base: Path, tmp_path: Path) -> None:
    (tmp_path / "vm").mkdir()
    os.link(base, tmp_path / "vm" / "base.qcow2")
    ib("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "vm/top.qcow2", "1G", cwd=tmp_path)
    info = qemu_info(tmp_path / "vm" / "top.qcow2")
    assert info["backing-filename"] == "base.qcow2"
    assert info["virtual-size"] == GiB
    qemu_check(tmp_path / "vm" / "top.qcow2")
    qemu_same(base, "qcow2", tmp_path / "vm" / "top.qcow2")  # the rest reads as zero


@pytest.mark.parametrize(("options", "compress"), [("compat=1.1", False),
                                                   ("compat=0.10", False),
                                                   ("compat=1.1", True)])
def test_convert_with_base_stores_only_the_difference(source: Path, base: Path, tmp_path: Path,
                                                      options: str, compress: bool) -> None:
    os.link(base, tmp_path / "base.qcow2")
    top = tmp_path / "top.qcow2"
    run_tool("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    args: list[str] = []
    for write in OVERLAY_WRITES:
        args += ["-c", write]
    run_tool("qemu-io", "-f", "qcow2", *args, top)
    diff = tmp_path / "diff.qcow2"
    cmd = ["convert", "-B", "base.qcow2", "-o", options, "top.qcow2", "diff.qcow2"]
    ib(*([*cmd, "-c"] if compress else cmd), cwd=tmp_path)
    qemu_check(diff)
    qemu_same(top, "qcow2", diff)
    info = qemu_info(diff)
    assert (info["backing-filename"], info["backing-filename-format"]) == \
        ("base.qcow2", "qcow2")
    items = qemu_map(diff)
    stored = sum(i["length"] for i in items if i["depth"] == 0 and i["present"])
    assert stored <= 1536 * KiB  # the four writes, in whole clusters, and nothing else
    for item in covering(items, 4 * MiB, 4 * MiB):  # untouched: read from the base
        assert item["depth"] >= 1, item
    zero_hiding = covering(items, 3 * MiB, 128 * KiB)
    if options == "compat=1.1":  # the zero flag, not data
        assert all(i["depth"] == 0 and i["zero"] and i["present"] for i in zero_hiding)


def test_convert_a_raw_file_against_a_raw_base(source: Path, tmp_path: Path) -> None:
    shutil.copyfile(source, tmp_path / "base.raw")
    changed = _expected(source, tmp_path)
    ib("convert", "-f", "raw", "-B", "base.raw", "-F", "raw", changed.name, "diff.qcow2",
       cwd=tmp_path)
    diff = tmp_path / "diff.qcow2"
    qemu_check(diff)
    qemu_same(changed, "raw", diff)
    assert qemu_info(diff)["backing-filename-format"] == "raw"
    assert sum(i["length"] for i in qemu_map(diff) if i["depth"] == 0) <= 1536 * KiB


def test_create_raw_is_sparse(tmp_path: Path) -> None:
    ib("create", "-q", "-f", "raw", tmp_path / "x.raw", "1G")
    assert qemu_info(tmp_path / "x.raw")["virtual-size"] == GiB
    assert (tmp_path / "x.raw").stat().st_blocks == 0
    ib("create", "-q", "-f", "qcow2", tmp_path / "x.qcow2", "1G")
    qemu_check(tmp_path / "x.qcow2")
    qemu_same(tmp_path / "x.raw", "raw", tmp_path / "x.qcow2")
