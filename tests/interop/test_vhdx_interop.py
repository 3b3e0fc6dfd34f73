"""VHDX against qemu-img, qemu-io and libvhdi's vhdiinfo.

- Images qemu-img and qemu-io made (fixed and dynamic, several block sizes, sizes that are
  not a multiple of the block size, data, zero writes and discards) read byte for byte as
  qemu-img's own raw conversion, and ``inspect --json`` agrees with ``qemu-img info``.
- A log qemu left pending (a BAT update that failed half way, made with blkdebug) is replayed
  in memory: what we read equals what qemu-img reads after ``check -r all`` replayed it
  into a copy, and the image itself is not modified.
- Every VHDX we write passes ``qemu-img check`` and ``qemu-img compare`` against its source,
  and vhdiinfo reads it with the same media size.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
from helpers import require_tool, run_cli_process, run_tool

import imgbridge
from imgbridge.api import parse_options
from imgbridge.source import FileSource

pytestmark = pytest.mark.interop

MiB = 1 << 20

#: (name, qemu-img create options, size, qemu-io commands)
QEMU_IMAGES = [
    ("dyn-1m", "subformat=dynamic,block_size=1M", "40M", [
        "write -P 0x11 0 4k", "write -P 0x12 3M 2M", "write -z 10M 1M", "write -P 0x13 20M 1M",
        "write -z -u 20M 512k", "discard 3M 512k", "write -P 0x14 40956k 4k"]),
    ("dyn-default-odd", "", str(37 * MiB + 3584), [
        "write -P 0x21 1M 7M", "write -P 0x22 36M 1M", "write -P 0x23 38795264 3584"]),
    ("dyn-32m", "block_size=32M,log_size=2M", "100M", [
        "write -P 0x31 31M 2M", "write -z 64M 4M", "write -P 0x32 99M 1M"]),
    ("fixed-2m", "subformat=fixed,block_state_zero=off,block_size=2M", "9M", [
        "write -P 0x41 0 1M", "write -P 0x42 7M 2M"]),
    ("fixed-default", "subformat=fixed", "12M", ["write -P 0x51 5M 64k"]),
]


@pytest.fixture(scope="module")
def qemu_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Each image qemu made, with qemu-img's raw conversion of it."""
    require_tool("qemu-img")
    require_tool("qemu-io")
    folder = tmp_path_factory.mktemp("qemu-vhdx")
    out = {}
    for name, options, size, commands in QEMU_IMAGES:
        image = folder / f"{name}.vhdx"
        args = ["qemu-img", "create", "-q", "-f", "vhdx"]
        if options:
            args += ["-o", options]
        run_tool(*args, image, size)
        for command in commands:
            run_tool("qemu-io", "-f", "vhdx", "-c", command, image)
        expected = folder / f"{name}.qemu.raw"
        run_tool("qemu-img", "convert", "-f", "vhdx", "-O", "raw", image, expected)
        out[name] = (image, expected)
    # Made by conversion rather than by writes.
    source = folder / "source.raw"
    run_tool("qemu-img", "create", "-q", "-f", "raw", source, "70M")
    for command in ("write -P 0x61 0 1M", "write -P 0x62 33M 3M", "write -P 0x63 69M 1M"):
        run_tool("qemu-io", "-f", "raw", "-c", command, source)
    for name, options in (("conv-dyn-16m", "subformat=dynamic,block_size=16M"),
                          ("conv-fixed", "subformat=fixed,block_state_zero=off")):
        image = folder / f"{name}.vhdx"
        run_tool("qemu-img", "convert", "-f", "raw", "-O", "vhdx", "-o", options, source, image)
        out[name] = (image, source)
    return out


NAMES = [name for name, *_ in QEMU_IMAGES] + ["conv-dyn-16m", "conv-fixed"]


@pytest.mark.parametrize("name", NAMES)
def test_we_read_what_qemu_reads(qemu_images: dict[str, tuple[Path, Path]], name: str,
                                 tmp_path: Path) -> None:
    image, expected = qemu_images[name]
    ours = tmp_path / "ours.raw"
    imgbridge.convert(image, ours, format="vhdx", output_format="raw", sync=False)
    assert ours.read_bytes() == expected.read_bytes()
    compare = run_tool("qemu-img", "compare", "-f", "vhdx", "-F", "raw", image, ours,
                       check=False)
    assert compare.returncode == 0, compare.stdout + compare.stderr
    assert imgbridge.check(image, format="vhdx").exit_code == 0


@pytest.mark.parametrize("name", NAMES)
def test_inspect_agrees_with_qemu_img_info(qemu_images: dict[str, tuple[Path, Path]],
                                           name: str) -> None:
    image, _ = qemu_images[name]
    ours = run_cli_process("inspect", "--json", image)
    assert ours.returncode == 0, ours.stderr
    mine = json.loads(ours.stdout)
    theirs = json.loads(run_tool("qemu-img", "info", "--output=json", image).stdout)
    for key in ("format", "virtual-size", "cluster-size", "dirty-flag"):
        assert mine[key] == theirs[key], key
    specific = mine["format-specific"]["data"]
    assert specific["block-size"] == theirs["cluster-size"]
    assert specific["logical-sector-size"] == 512 and specific["has-parent"] is False
    assert specific["log"] == "empty"


def test_pending_log_left_by_qemu(tmp_path: Path) -> None:
    """qemu writes a BAT update to its log, then fails to write it in place (blkdebug)."""
    require_tool("qemu-img")
    require_tool("qemu-io")
    image = tmp_path / "log.vhdx"
    run_tool("qemu-img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M", image, "16M")
    run_tool("qemu-io", "-f", "vhdx", "-c", "write -P 0x11 0 1M", image)
    # The BAT starts at 2 MiB (sector 4096) in qemu-img's layout with a 1 MiB log.
    config = tmp_path / "blkdebug.conf"
    config.write_text('[inject-error]\nevent = "pwritev"\niotype = "write"\n'
                      'sector = "4096"\nerrno = "5"\nonce = "on"\n')
    spec = json.dumps({"driver": "vhdx", "file": {
        "driver": "blkdebug", "config": str(config),
        "image": {"driver": "file", "filename": str(image)}}})
    failed = run_tool("qemu-io", "-c", "write -P 0x22 3M 1M", f"json:{spec}", check=False)
    assert "Input/output error" in failed.stdout + failed.stderr
    refused = run_tool("qemu-img", "convert", "-f", "vhdx", "-O", "raw", image,
                       tmp_path / "x.raw", check=False)
    assert refused.returncode != 0 and "log that needs to be replayed" in refused.stderr
    before = hashlib.sha256(image.read_bytes()).hexdigest()

    ours = tmp_path / "ours.raw"
    result = run_cli_process("convert", "-f", "vhdx", "-O", "raw", image, ours)
    assert result.returncode == 0, result.stderr
    info = json.loads(run_cli_process("inspect", "--json", image).stdout)
    assert info["format-specific"]["data"]["log"].startswith("replayed in memory (1 entry")
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before  # never written

    replayed = tmp_path / "replayed.vhdx"
    shutil.copy(image, replayed)
    run_tool("qemu-img", "check", "-q", "-r", "all", "-f", "vhdx", replayed, check=False)
    expected = tmp_path / "expected.raw"
    run_tool("qemu-img", "convert", "-f", "vhdx", "-O", "raw", replayed, expected)
    assert ours.read_bytes() == expected.read_bytes()
    assert ours.read_bytes()[3 * MiB:4 * MiB] == b"\x22" * MiB  # the logged block


# ---- what we write ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    require_tool("qemu-img")
    require_tool("qemu-io")
    folder = tmp_path_factory.mktemp("vhdx-sources")
    layouts = {
        # a size that is no multiple of any block size, data across block boundaries
        "odd": (37 * MiB + 3584, ["write -P 0x71 0 4k", "write -P 0x72 1020k 8k",
                                  "write -P 0x73 8M 9M", "write -z 20M 1M",
                                  "write -P 0x74 38795264 3584"]),
        "sparse": (300 * MiB, ["write -P 0x75 150M 1M", "write -P 0x76 299M 1M"]),
    }
    out = {}
    for name, (size, commands) in layouts.items():
        path = folder / f"{name}.raw"
        run_tool("qemu-img", "create", "-q", "-f", "raw", path, str(size))
        for command in commands:
            run_tool("qemu-io", "-f", "raw", "-c", command, path)
        out[name] = path
    # Not a multiple of 512: we round up to a sector, as qemu-img does.
    unaligned = folder / "unaligned.raw"
    unaligned.write_bytes(b"\x77" * 5_000_001)
    out["unaligned"] = unaligned
    return out


WRITE_OPTIONS = [
    "", "subformat=fixed", "block_size=1M", "subformat=fixed,block_size=1M", "block_size=32M",
    "subformat=dynamic,block_state_zero=off,block_size=2M", "log_size=3M,block_size=256M",
]


def _vhdiinfo(path: Path) -> dict[str, str]:
    text = run_tool("vhdiinfo", path).stdout
    return {k.strip(): v.strip() for k, _, v in
            (line.partition(":") for line in text.splitlines() if ":" in line)}


@pytest.mark.parametrize("options", WRITE_OPTIONS)
@pytest.mark.parametrize("source", ["odd", "sparse", "unaligned"])
def test_qemu_img_checks_and_compares_what_we_write(sources: dict[str, Path], source: str,
                                                    options: str, tmp_path: Path) -> None:
    src = sources[source]
    out = tmp_path / "out.vhdx"
    imgbridge.convert(src, out, format="raw", options=parse_options(options),
                      sync=False)
    check = run_tool("qemu-img", "check", "-f", "vhdx", out, check=False)
    assert check.returncode == 0 and "No errors were found" in check.stdout, check.stdout
    compare = run_tool("qemu-img", "compare", "-f", "raw", "-F", "vhdx", src, out, check=False)
    assert compare.returncode == 0, compare.stdout + compare.stderr
    info = json.loads(run_tool("qemu-img", "info", "--output=json", out).stdout)
    size = -(-src.stat().st_size // 512) * 512
    assert info["virtual-size"] == size
    wanted = re.search(r"block_size=(\d+)M", options)
    assert info["cluster-size"] == (int(wanted.group(1)) * MiB if wanted else 8 * MiB)
    # Only the data is stored: the file holds little more than the source's data.
    data = sum(run.length for run in FileSource(src).runs() if run.data)
    assert out.stat().st_blocks * 512 <= data + 8 * MiB
    assert imgbridge.check(out, format="vhdx").exit_code == 0

    require_tool("vhdiinfo")
    seen = _vhdiinfo(out)
    assert seen["Format"].startswith("VHDX")
    assert re.search(r"\((\d+) bytes\)", seen["Media size"]).group(1) == str(size)  # type: ignore[union-attr]
    assert seen["Disk type"] == ("Fixed" if "fixed" in options else "Dynamic")
