"""Every disk format to every disk format: the guest sees the same bytes (issue #4's matrix).

The sources are made by qemu-img from one raw disk written by qemu-io; each of our conversions
is then judged by qemu-img compare against that raw disk, so neither side of a pair is checked
only by our own reader.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import require_tool, run_tool

import imgbridge

pytestmark = pytest.mark.interop

#: (id, our format name, our -o options, qemu-img's format name, qemu-img's -o options)
VARIANTS = [
    ("raw", "raw", {}, "raw", ""),
    ("qcow2", "qcow2", {}, "qcow2", ""),
    ("qcow2-v2", "qcow2", {"compat": "0.10"}, "qcow2", "compat=0.10"),
    ("vmdk-sparse", "vmdk", {"subformat": "monolithicSparse"}, "vmdk",
     "subformat=monolithicSparse"),
    ("vmdk-flat", "vmdk", {"subformat": "monolithicFlat"}, "vmdk", "subformat=monolithicFlat"),
    ("vmdk-2gsparse", "vmdk", {"subformat": "twoGbMaxExtentSparse"}, "vmdk",
     "subformat=twoGbMaxExtentSparse"),
    ("vmdk-2gflat", "vmdk", {"subformat": "twoGbMaxExtentFlat"}, "vmdk",
     "subformat=twoGbMaxExtentFlat"),
    ("vmdk-stream", "vmdk", {"subformat": "streamOptimized"}, "vmdk",
     "subformat=streamOptimized"),
    ("vhd-dynamic", "vhd", {"subformat": "dynamic"}, "vpc", "subformat=dynamic"),
    ("vhd-fixed", "vhd", {"subformat": "fixed"}, "vpc", "subformat=fixed"),
    ("vhdx", "vhdx", {}, "vhdx", ""),
]
IDS = [v[0] for v in VARIANTS]
QEMU_FORMAT = {v[0]: v[3] for v in VARIANTS}
MiB = 1 << 20


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 MiB with data at aligned and unaligned places, explicit zeros, and holes."""
    require_tool("qemu-img")
    require_tool("qemu-io")
    path = tmp_path_factory.mktemp("matrix") / "reference.raw"
    run_tool("qemu-img", "create", "-q", "-f", "raw", path, "12M")
    for command in ("write -P 0x11 0 64k", "write -P 0x22 1M 3M", "write -P 0x33 5000 3000",
                    "write -z 2M 512k", "write -P 0x44 11M 1M", "write -P 0x55 7340544 512"):
        run_tool("qemu-io", "-f", "raw", "-c", command, path)
    return path


@pytest.fixture(scope="module")
def sources(reference: Path) -> dict[str, Path]:
    """The reference disk in every variant, each written by qemu-img."""
    folder = reference.parent / "sources"
    folder.mkdir()
    made = {}
    for ident, _, _, qfmt, qopts in VARIANTS:
        target = folder / f"{ident}.img"
        args = ["qemu-img", "convert", "-f", "raw", "-O", qfmt]
        if qopts:
            args += ["-o", qopts]
        run_tool(*args, reference, target)
        made[ident] = target
    return made


@pytest.mark.slow
@pytest.mark.parametrize("src_id", IDS)
def test_every_format_converts_to_every_format(src_id: str, sources: dict[str, Path],
                                               reference: Path, tmp_path: Path) -> None:
    source = sources[src_id]
    src_format = next(v[1] for v in VARIANTS if v[0] == src_id)
    for dst_id, dst_format, options, qfmt, _ in VARIANTS:
        target = tmp_path / f"{src_id}-to-{dst_id}.img"
        imgbridge.convert(source, target, format=src_format, output_format=dst_format,
                          options=options, sync=False)
        result = run_tool("qemu-img", "compare", "-f", qfmt, "-F", "raw", target, reference,
                          check=False)
        assert result.returncode == 0, f"{src_id} -> {dst_id}: {result.stdout}{result.stderr}"
