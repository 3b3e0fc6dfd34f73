"""VMDK against qemu-img, qemu-io and libyal's vmdkinfo.

Reading: every subformat qemu-img makes (written into by qemu-io, or converted for
streamOptimized) and a delta disk on a parent, read byte-identical to qemu-img's own raw
conversion. Writing: every subformat we make compares identical with its source under
qemu-img, passes qemu-img check, and vmdkinfo reads it with the right media size; our
streamOptimized converts back with qemu-img and ends with footer marker, footer and
end-of-stream marker.

The disk is 2 GiB + 5 MiB + 1536 bytes, so the split subformats have two extents, data
straddles the 2 GiB boundary and the last grain is partial; it is sparse, so it costs little.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import pytest
from helpers import require_tool, run_cli_process, run_tool

import imgbridge

pytestmark = pytest.mark.interop

MiB = 1 << 20
GiB = 1 << 30
SIZE = 2 * GiB + 5 * MiB + 1536
#: qemu-io writes (pattern, offset, length): aligned and unaligned to grains, across the
#: 2 GiB split, in the last partial grain.
WRITES = [
    (0x11, 0, MiB),
    (0x22, 700 * 1024 + 512, 5120),
    (0x33, 2 * GiB - 4096, 8192),
    (0x44, SIZE - 1536, 1536),
]
SUBFORMATS = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
              "twoGbMaxExtentFlat", "streamOptimized")
SPARSE_KINDS = ("monolithicSparse", "twoGbMaxExtentSparse", "streamOptimized")


def _qemu_io(fmt: str, path: Path, writes: list[tuple[int, int, int]]) -> None:
    args: list[str] = []
    for pattern, offset, length in writes:
        args += ["-c", f"write -P {pattern:#x} {offset} {length}"]
    run_tool("qemu-io", "-f", fmt, *args, path)


def _identical(a: Path, fmt_a: str, b: Path, fmt_b: str) -> None:
    result = run_tool("qemu-img", "compare", "-f", fmt_a, "-F", fmt_b, a, b, check=False)
    assert result.returncode == 0, f"{a.name} vs {b.name}: {result.stdout}{result.stderr}"


def _ours(cli: Any, *args: str | Path) -> str:
    """Our CLI, run in this process (a fresh interpreter per call would dominate the time)."""
    result = cli(*args)
    assert result.code == 0, result.err
    return str(result.out)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for tool in ("qemu-img", "qemu-io", "vmdkinfo"):
        require_tool(tool)
    return tmp_path_factory.mktemp("vmdk")


@pytest.fixture(scope="module")
def source(work: Path) -> Path:
    path = work / "source.raw"
    run_tool("qemu-img", "create", "-q", "-f", "raw", path, str(SIZE))
    _qemu_io("raw", path, WRITES)
    return path


@pytest.fixture(scope="module")
def qemu_made(work: Path, source: Path) -> dict[str, Path]:
    """One image per subformat made by qemu-img (and written into by qemu-io)."""
    made: dict[str, Path] = {}
    for subformat in SUBFORMATS:
        folder = work / f"qemu-{subformat}"
        folder.mkdir()
        path = folder / "disk.vmdk"
        if subformat == "streamOptimized":  # qemu-io cannot write a stream in place
            run_tool("qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o",
                     f"subformat={subformat}", source, path)
        else:
            run_tool("qemu-img", "create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}",
                     path, str(SIZE))
            _qemu_io("vmdk", path, WRITES)
        made[subformat] = path
    return made


@pytest.fixture(scope="module")
def ours_made(work: Path, source: Path) -> dict[str, Path]:
    """One image per subformat written by imgbridge from the same source."""
    made: dict[str, Path] = {}
    for subformat in SUBFORMATS:
        folder = work / f"ours-{subformat}"
        folder.mkdir()
        path = folder / "disk.vmdk"
        imgbridge.convert(source, path, format="raw", output_format="vmdk",
                          options={"subformat": subformat})
        made[subformat] = path
    return made


# ---- reading what qemu-img made ------------------------------------------------------------

@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_we_read_what_qemu_img_made(subformat: str, qemu_made: dict[str, Path],
                                    cli: Any) -> None:
    image = qemu_made[subformat]
    reference = image.parent / "qemu.raw"
    ours = image.parent / "ours.raw"
    run_tool("qemu-img", "convert", "-f", "vmdk", "-O", "raw", image, reference)
    _ours(cli, "convert", "-f", "vmdk", "-O", "raw", image, ours)
    assert ours.stat().st_size == SIZE
    _identical(reference, "raw", ours, "raw")
    assert "identical" in _ours(cli, "compare", "-F", "raw", image, reference)
    assert cli("check", image).code == 0


@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_inspect_json_matches_qemu_img_info(subformat: str, qemu_made: dict[str, Path],
                                            cli: Any) -> None:
    image = qemu_made[subformat]
    ours = json.loads(_ours(cli, "inspect", "--json", image))
    theirs = json.loads(run_tool("qemu-img", "info", "--output=json", image).stdout)
    for key in ("format", "virtual-size", "dirty-flag"):
        assert ours[key] == theirs[key], key
    assert ours.get("cluster-size") == theirs.get("cluster-size")
    ours_data, theirs_data = ours["format-specific"]["data"], theirs["format-specific"]["data"]
    for key in ("cid", "parent-cid", "create-type"):
        assert ours_data[key] == theirs_data[key], key
    assert len(ours_data["extents"]) == len(theirs_data["extents"])
    for mine, qemus in zip(ours_data["extents"], theirs_data["extents"], strict=True):
        for key in ("virtual-size", "cluster-size", "compressed"):
            assert mine.get(key) == qemus.get(key), key
        if qemus["format"]:  # qemu-img leaves it empty for a monolithic sparse file
            assert mine["format"] == qemus["format"]
        assert Path(mine["filename"]).name == Path(qemus["filename"]).name
    assert ours_data["adapter-type"] == "ide" and ours_data["geometry"]["sectors"] == 63


@pytest.mark.parametrize("subformat", SPARSE_KINDS)
def test_map_json_matches_qemu_img(subformat: str, qemu_made: dict[str, Path],
                                   ours_made: dict[str, Path], cli: Any) -> None:
    for image in (qemu_made[subformat], ours_made[subformat]):
        ours = json.loads(_ours(cli, "map", "--json", image))
        theirs = json.loads(run_tool("qemu-img", "map", "--output=json", image).stdout)
        assert ours == theirs, image


def test_delta_disk_reads_like_qemu_img(work: Path, cli: Any) -> None:
    folder = work / "delta"
    folder.mkdir()
    parent, child = folder / "parent.vmdk", folder / "child.vmdk"
    size = 8 * MiB + 512
    run_tool("qemu-img", "create", "-q", "-f", "vmdk", parent, str(size))
    _qemu_io("vmdk", parent, [(0x51, 0, 3 * MiB), (0x52, size - 512, 512)])
    run_tool("qemu-img", "create", "-q", "-f", "vmdk", "-b", "parent.vmdk", "-F", "vmdk",
             child)
    # Partial grains: qemu copies the rest of each grain from the parent into the child.
    _qemu_io("vmdk", child, [(0x61, 64 * 1024 + 512, 1024), (0x62, 5 * MiB, 4096)])
    reference, ours = folder / "qemu.raw", folder / "ours.raw"
    run_tool("qemu-img", "convert", "-f", "vmdk", "-O", "raw", child, reference)
    _ours(cli, "convert", "-f", "vmdk", "-O", "raw", child, ours)
    _identical(reference, "raw", ours, "raw")
    info = json.loads(_ours(cli, "inspect", "--json", child))
    theirs = json.loads(run_tool("qemu-img", "info", "--output=json", child).stdout)
    assert info["backing-filename"] == theirs["backing-filename"] == "parent.vmdk"
    assert info["format-specific"]["data"]["parent-cid"] == \
        theirs["format-specific"]["data"]["parent-cid"]
    depths = {item["depth"] for item in json.loads(_ours(cli, "map", "--json", child))}
    assert depths == {0, 1}

    # Writing to the parent changes its CID: the delta no longer matches it, and we say so.
    _qemu_io("vmdk", parent, [(0x53, 4 * MiB, 512)])
    result = run_cli_process("convert", "-f", "vmdk", "-O", "raw", child, folder / "x.raw")
    assert result.returncode == 1
    assert "parentCID" in result.stderr and "ignore_cid=on" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_check_flags_a_grain_past_the_end_like_qemu_img(work: Path, source: Path,
                                                        cli: Any) -> None:
    folder = work / "corrupt"
    folder.mkdir()
    image = folder / "disk.vmdk"
    run_tool("qemu-img", "convert", "-f", "raw", "-O", "vmdk", source, image)
    data = bytearray(image.read_bytes())
    rgd, gd = struct.unpack_from("<QQ", data, 48)
    for directory in (gd, rgd):
        table = struct.unpack_from("<I", data, directory * 512)[0]
        struct.pack_into("<I", data, table * 512, 0xFFFFFF00)  # grain 0 far past the end
    image.write_bytes(bytes(data))
    theirs = run_tool("qemu-img", "check", image, check=False)
    assert theirs.returncode != 0 and "points after EOF" in theirs.stderr + theirs.stdout
    ours = cli("check", image)
    assert ours.code == 2 and "past the end" in ours.out + ours.err


# ---- what we write, checked by qemu-img and vmdkinfo ---------------------------------------

@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_qemu_img_and_vmdkinfo_accept_what_we_write(subformat: str, source: Path,
                                                    ours_made: dict[str, Path],
                                                    cli: Any) -> None:
    image = ours_made[subformat]
    _identical(source, "raw", image, "vmdk")
    check = run_tool("qemu-img", "check", "-f", "vmdk", image, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    info = json.loads(run_tool("qemu-img", "info", "--output=json", image).stdout)
    assert info["virtual-size"] == SIZE
    assert info["format-specific"]["data"]["create-type"] == subformat
    vmdkinfo = run_tool("vmdkinfo", image).stdout
    media = re.search(r"Media size:\s+.*\((\d+) bytes\)", vmdkinfo)
    assert media is not None, vmdkinfo
    assert int(media.group(1)) == SIZE
    assert cli("check", image).code == 0
    expected = {"monolithicSparse": [], "monolithicFlat": ["disk-flat.vmdk"],
                "twoGbMaxExtentSparse": ["disk-s001.vmdk", "disk-s002.vmdk"],
                "twoGbMaxExtentFlat": ["disk-f001.vmdk", "disk-f002.vmdk"],
                "streamOptimized": []}[subformat]
    assert sorted(p.name for p in image.parent.iterdir()) == sorted(["disk.vmdk", *expected])


def test_our_stream_ends_with_footer_and_end_of_stream(source: Path,
                                                       ours_made: dict[str, Path]) -> None:
    image = ours_made["streamOptimized"]
    back = image.parent / "back.raw"
    run_tool("qemu-img", "convert", "-f", "vmdk", "-O", "raw", image, back)
    _identical(source, "raw", back, "raw")
    data = image.read_bytes()
    assert len(data) % 512 == 0
    header = data[:512]
    version, flags = struct.unpack_from("<II", header, 4)
    assert header[:4] == b"KDMV" and version == 3 and flags == 0x30001
    assert struct.unpack_from("<Q", header, 56)[0] == 0xFFFFFFFFFFFFFFFF  # GD_AT_END
    assert struct.unpack_from("<H", header, 77)[0] == 1  # deflate
    tail = data[-1536:]
    # footer marker: numSectors 1, size 0, type 3 (footer), the rest of its sector zero
    assert struct.unpack_from("<QII", tail, 0) == (1, 0, 3) and tail[16:512] == bytes(496)
    footer = tail[512:1024]
    assert footer[:4] == b"KDMV"
    gd = struct.unpack_from("<Q", footer, 56)[0]
    assert footer[:56] == header[:56] and footer[64:] == header[64:]
    assert 0 < gd < len(data) // 512
    assert struct.unpack_from("<QII", data, (gd - 1) * 512) == (1, 0, 2)  # GD marker
    assert tail[1024:] == bytes(512)  # end-of-stream: numSectors 0, size 0, type 0
    # Every grain is a zlib stream behind a marker naming its own guest sector.
    first = struct.unpack_from("<Q", header, 64)[0] * 512
    lba, size = struct.unpack_from("<QI", data, first)
    assert lba == 0 and 0 < size < 65536 and data[first + 12] == 0x78
