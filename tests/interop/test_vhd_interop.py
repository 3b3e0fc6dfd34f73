"""VHD against qemu-img, qemu-io and libyal's vhdiinfo.

Reading: images made by ``qemu-img create/convert -f vpc`` (fixed and dynamic, with and without
``force_size``) and written with ``qemu-io`` must read byte for byte as qemu-img's own raw
conversion. Writing: every VHD we write must equal its source under ``qemu-img compare``
(same content and size), open in ``qemu-img check -f vpc``, report exactly our virtual size
in ``qemu-img info`` and in vhdiinfo, for sizes a CHS geometry can and cannot express.
Differencing disks, which qemu-img can neither make nor follow, are built by hand from
dynamic VHDs qemu-img made and checked against the content they must have.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
from helpers import make_sparse_file, require_tool, run_tool
from imgbridge.formats.disk.vhd import _structs as S
from imgbridge.formats.disk.vhd import geometry

import imgbridge

pytestmark = [pytest.mark.interop,
              pytest.mark.filterwarnings("ignore::imgbridge.formats.disk.vhd.VhdWarning")]

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def _pattern(seed: int, n: int) -> bytes:
    block = bytes((seed * 29 + i * 13) % 251 + 1 for i in range(4096))
    return (block * (n // 4096 + 1))[:n]


def qemu_info(path: Path, fmt: str = "vpc") -> dict[str, object]:
    info: dict[str, object] = json.loads(
        run_tool("qemu-img", "info", "--output=json", "-f", fmt, path).stdout)
    return info


def vhdiinfo(path: Path) -> dict[str, str]:
    """vhdiinfo's "name : value" lines, with the media size in bytes."""
    out = run_tool("vhdiinfo", path).stdout
    fields = {}
    for line in out.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            fields[name.strip()] = value.strip()
    match = re.search(r"\((\d+) bytes\)", fields.get("Media size", ""))
    if match:
        fields["Media size"] = match.group(1)
    return fields


def assert_identical(a: Path, b: Path, fmt_a: str = "raw", fmt_b: str = "raw") -> None:
    """Same size and, by qemu-img compare, the same content. (``compare -s`` would also
    demand the same allocation, which a conversion need not keep.)"""
    assert qemu_info(a, fmt_a)["virtual-size"] == qemu_info(b, fmt_b)["virtual-size"]
    result = run_tool("qemu-img", "compare", "-f", fmt_a, "-F", fmt_b, a, b, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- reading what qemu-img and qemu-io made ------------------------------------------------

@pytest.fixture(scope="module")
def qemu_made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """VHDs made by qemu-img, from a reference raw disk and by qemu-io writing into them."""
    require_tool("qemu-img")
    require_tool("qemu-io")
    folder = tmp_path_factory.mktemp("qemu-made")
    reference = folder / "reference.raw"
    run_tool("qemu-img", "create", "-q", "-f", "raw", reference, "12M")
    for command in ("write -P 0x11 0 64k", "write -P 0x22 1M 3M", "write -P 0x33 5000 3000",
                    "write -z 2M 512k", "write -P 0x44 11M 1M", "write -P 0x55 7340544 512"):
        run_tool("qemu-io", "-f", "raw", "-c", command, reference)
    made = {}
    for name, options in (("dynamic", "subformat=dynamic"), ("fixed", "subformat=fixed"),
                          ("dynamic-force", "subformat=dynamic,force_size=on"),
                          ("fixed-force", "subformat=fixed,force_size=on")):
        made[name] = folder / f"{name}.vhd"
        run_tool("qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", options, reference,
                 made[name])
    # Written in place by qemu-io: unaligned sectors, a write across a block boundary, a
    # block written only with zeros.
    for name, options, size in (("qemu-io-dynamic", "subformat=dynamic", "20M"),
                                ("qemu-io-fixed", "subformat=fixed", "5M")):
        made[name] = folder / f"{name}.vhd"
        run_tool("qemu-img", "create", "-q", "-f", "vpc", "-o", options, made[name], size)
        for command in ("write -P 0x61 512 1024", "write -P 0x62 2000k 200k",
                        "write -P 0x63 4607k 1k", "write -z 3M 4k"):
            run_tool("qemu-io", "-f", "vpc", "-c", command, made[name])
    return made


QEMU_MADE = ["dynamic", "fixed", "dynamic-force", "fixed-force", "qemu-io-dynamic",
             "qemu-io-fixed"]


@pytest.mark.parametrize("name", QEMU_MADE)
def test_we_read_qemu_images_as_qemu_img_does(qemu_made: dict[str, Path], name: str,
                                              tmp_path: Path) -> None:
    image = qemu_made[name]
    theirs, ours = tmp_path / "theirs.raw", tmp_path / "ours.raw"
    run_tool("qemu-img", "convert", "-f", "vpc", "-O", "raw", image, theirs)
    imgbridge.convert(image, ours, format="vhd", output_format="raw", sync=False)
    assert_identical(theirs, ours)
    info = imgbridge.inspect(image, format="vpc")
    qinfo = qemu_info(image)
    assert info["virtual-size"] == qinfo["virtual-size"]
    assert info.get("cluster-size") == qinfo.get("cluster-size")
    assert info["format"] == "vhd"
    assert imgbridge.inspect(image)["format"] == "vhd"  # detected, fixed ones by their tail
    assert imgbridge.check(image, format="vhd").exit_code == 0


def test_creator_table_matches_qemu_img(qemu_made: dict[str, Path]) -> None:
    """'qemu' images are sized by CHS, 'qem2' (force_size) ones by current_size."""
    for name, app in (("dynamic", "qemu"), ("dynamic-force", "qem2")):
        data = imgbridge.inspect(qemu_made[name])["format-specific"]["data"]
        assert data["creator-app"] == app
        assert data["size-from"] == ("chs" if app == "qemu" else "current-size")


# ---- writing what qemu-img and vhdiinfo read ----------------------------------------------

def _source(folder: Path, size: int) -> Path:
    """A sparse raw disk of ``size`` with data at its start, across a 2 MiB block boundary,
    in the middle and in its last sector."""
    runs = [(0, _pattern(1, 64 * KiB)), (size - 512, _pattern(2, 512))]
    if size > 4 * MiB:
        runs += [(2 * MiB - 4096, _pattern(3, 12 * KiB)), (size // 2 // 512 * 512,
                                                           _pattern(4, MiB))]
    return make_sparse_file(folder / f"src-{size}.raw", size, runs)


SIZES = {
    "1GiB": GiB,  # not CHS-representable: qemu-img itself would make it 1 GiB + 248 KiB
    "1000MiB+512": 1000 * MiB + 512,
    "3MiB+7sectors": 3 * MiB + 7 * 512,
    "chs-exact": 90 * 4 * 17 * 512,  # exactly 90/4/17
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("sources")
    return {name: _source(folder, size) for name, size in SIZES.items()}


def check_written(source: Path, image: Path, size: int, disk_type: str) -> None:
    """Everything an independent reader can say about a VHD we wrote."""
    assert qemu_info(image)["virtual-size"] == size
    if source.stat().st_size == size:
        assert_identical(source, image, "raw", "vpc")
    else:  # padded: the extra bytes must read as zero
        result = run_tool("qemu-img", "compare", "-f", "raw", "-F", "vpc", source, image,
                          check=False)
        assert result.returncode == 0, result.stdout
    # qemu-img has no check for vpc: exit 63 says it opened the image and had nothing to do.
    checked = run_tool("qemu-img", "check", "-f", "vpc", image, check=False)
    assert checked.returncode == 63, checked.stderr
    assert "does not support checks" in checked.stderr
    fields = vhdiinfo(image)
    assert fields["Media size"] == str(size)
    assert fields["Disk type"] == disk_type
    report = imgbridge.check(image, format="vhd")
    assert report.exit_code == 0, report.messages


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
@pytest.mark.parametrize("size_name", list(SIZES))
def test_qemu_img_and_vhdiinfo_read_exactly_our_size(sources: dict[str, Path], tmp_path: Path,
                                                     subformat: str, size_name: str) -> None:
    require_tool("vhdiinfo")
    size = SIZES[size_name]
    image = tmp_path / "ours.vhd"
    imgbridge.convert(sources[size_name], image, format="raw",
                      options={"subformat": subformat}, sync=False)
    check_written(sources[size_name], image, size, subformat.capitalize())


def test_block_size_and_force_size_off(sources: dict[str, Path], tmp_path: Path) -> None:
    require_tool("vhdiinfo")
    source = sources["1000MiB+512"]
    small_blocks = tmp_path / "512k.vhd"
    imgbridge.convert(source, small_blocks, format="raw",
                      options={"block_size": "512K"}, sync=False)
    check_written(source, small_blocks, 1000 * MiB + 512, "Dynamic")
    assert qemu_info(small_blocks)["cluster-size"] == 512 * KiB
    # force_size=off: the size qemu-img itself gives a disk of this size.
    rounded = tmp_path / "rounded.vhd"
    imgbridge.convert(source, rounded, format="raw", options={"force_size": "off"},
                      sync=False)
    made_by_qemu = tmp_path / "qemu.vhd"
    run_tool("qemu-img", "create", "-q", "-f", "vpc", made_by_qemu, str(1000 * MiB + 512))
    expected = qemu_info(made_by_qemu)["virtual-size"]
    assert isinstance(expected, int) and expected > 1000 * MiB + 512
    check_written(source, rounded, expected, "Dynamic")


def test_azure_disk(sources: dict[str, Path], tmp_path: Path) -> None:
    require_tool("vhdiinfo")
    image = tmp_path / "azure.vhd"
    imgbridge.convert(sources["1000MiB+512"], image, format="raw", options={"azure": "on"},
                      sync=False)
    size = 1001 * MiB  # rounded up to a whole MiB
    assert image.stat().st_size == size + 512
    check_written(sources["1000MiB+512"], image, size, "Fixed")
    footer = _tail_footer(image)
    assert footer.disk_type == S.DISK_FIXED
    assert footer.current_size == footer.original_size == size


def _tail_footer(path: Path) -> S.Footer:
    with open(path, "rb") as f:
        f.seek(-512, 2)
        return S.Footer.unpack(f.read())


def test_a_qcow2_source_converts_to_vhd(tmp_path: Path) -> None:
    """Through the whole pipeline: qemu-img's qcow2 in, our VHD out, judged by qemu-img."""
    require_tool("qemu-io")
    qcow2 = tmp_path / "src.qcow2"
    run_tool("qemu-img", "create", "-q", "-f", "qcow2", qcow2, "20M")
    run_tool("qemu-io", "-f", "qcow2", "-c", "write -P 0x77 3M 3M", qcow2)
    image = tmp_path / "out.vhd"
    imgbridge.convert(qcow2, image, sync=False)
    assert qemu_info(image)["virtual-size"] == 20 * MiB
    assert_identical(qcow2, image, "qcow2", "vpc")


# ---- differencing disks, built by hand from qemu-img's dynamic VHDs ----------------------

def make_differencing(child: Path, parent: Path, bitmaps: dict[int, bytes]) -> None:
    """Turn the dynamic VHD ``child`` (made by qemu-img) into a differencing disk over
    ``parent``, the way Hyper-V lays one out:

    1. copy the parent footer's unique id into the child header's parent_unique_id, and the
       parent's file name (UTF-16BE) into parent_unicode_name;
    2. append a W2ru parent locator (".\\parent.vhd", UTF-16LE) after the last block, where
       the end footer was, and point parent locator entry 0 at it;
    3. replace the sector bitmaps of the blocks in ``bitmaps`` (qemu-img sets every bit when
       it allocates a block; a differencing disk marks only the sectors it stores);
    4. set disk type 4 in both footer copies, recompute both checksums, and write the footer
       again at the new end of the file.
    """
    data = bytearray(child.read_bytes())
    footer = S.Footer.unpack(bytes(data[:512]))
    header_at = footer.data_offset
    header = S.DynamicHeader.unpack(bytes(data[header_at:header_at + 1024]))
    parent_footer = S.Footer.unpack(parent.read_bytes()[:512])
    header.parent_unique_id = parent_footer.unique_id
    header.parent_unicode_name = parent.name.encode("utf-16-be").ljust(512, b"\0")
    body = data[:-512]
    locator = (".\\" + parent.name).encode("utf-16-le")
    header.parent_locators[0] = S.ParentLocator(b"W2ru", 512, len(locator), len(body))
    body += locator.ljust(512, b"\0")
    bat = struct.unpack_from(f">{header.max_table_entries}I", data, header.table_offset)
    for block, bitmap in bitmaps.items():
        assert bat[block] != S.BAT_FREE, f"qemu-io did not allocate block {block}"
        body[bat[block] * 512:bat[block] * 512 + len(bitmap)] = bitmap
    footer.disk_type = S.DISK_DIFFERENCING
    packed = footer.pack()
    body[:512] = packed
    body[header_at:header_at + 1024] = header.pack()
    child.write_bytes(bytes(body) + packed)


def _bits(first_sector: int, count: int, size: int = 512) -> bytes:
    bitmap = bytearray(size)
    for sector in range(first_sector, first_sector + count):
        bitmap[sector // 8] |= 0x80 >> (sector % 8)
    return bytes(bitmap)


def test_differencing_chain_built_from_qemu_images(tmp_path: Path) -> None:
    require_tool("qemu-io")
    require_tool("vhdiinfo")
    parent = tmp_path / "parent.vhd"
    run_tool("qemu-img", "create", "-q", "-f", "vpc", parent, "8M")
    run_tool("qemu-io", "-f", "vpc", "-c", "write -P 0x50 0 6M", parent)
    child = tmp_path / "child.vhd"
    run_tool("qemu-img", "create", "-q", "-f", "vpc", child, "8M")
    for command in ("write -P 0x63 1M 64k",  # block 0: sectors 2048..2175
                    "write -P 0x64 2M 4k"):  # block 1: all of it stays the child's
        run_tool("qemu-io", "-f", "vpc", "-c", command, child)
    assert qemu_info(child)["virtual-size"] == qemu_info(parent)["virtual-size"]
    make_differencing(child, parent, {0: _bits(2048, 128)})
    # What the guest must see: the parent, then the child's sectors over it. Block 1 keeps
    # qemu-img's full bitmap, so its unwritten sectors read as the child's zeros.
    expected = tmp_path / "expected.raw"
    run_tool("qemu-img", "convert", "-f", "vpc", "-O", "raw", parent, expected)
    with open(expected, "r+b") as f:
        f.seek(MiB)
        f.write(b"\x63" * 64 * KiB)
        f.seek(2 * MiB)
        f.write(b"\x64" * 4 * KiB + bytes(2 * MiB - 4 * KiB))
    ours = tmp_path / "ours.raw"
    imgbridge.convert(child, ours, format="vhd", output_format="raw", sync=False)
    assert_identical(expected, ours)
    info = imgbridge.inspect(child)
    assert info["format-specific"]["data"]["subformat"] == "differencing"
    assert info["backing-filename"] == "./parent.vhd"
    assert imgbridge.check(child).exit_code == 0
    # libvhdi, an independent reader, accepts the hand-made child and its parent link.
    fields = vhdiinfo(child)
    assert fields["Disk type"] == "Differential"
    assert fields["Parent identifier"] == str(S.Footer.unpack(parent.read_bytes()[:512]).uuid)
    assert fields["Parent filename"] == "parent.vhd"


def test_we_write_a_differencing_child_over_a_qemu_img_parent(tmp_path: Path) -> None:
    """convert -B: the child holds only what differs; vhdiinfo follows its parent link."""
    require_tool("qemu-io")
    require_tool("vhdiinfo")
    parent = tmp_path / "parent.vhd"
    run_tool("qemu-img", "create", "-q", "-f", "vpc", parent, "8M")  # CHS-sized by qemu-img
    run_tool("qemu-io", "-f", "vpc", "-c", "write -P 0x50 0 6M", parent)
    top = tmp_path / "top.raw"
    run_tool("qemu-img", "convert", "-f", "vpc", "-O", "raw", parent, top)
    for command in ("write -P 0x71 512k 4k", "write -z 5M 64k", "write -P 0x72 7M 100k"):
        run_tool("qemu-io", "-f", "raw", "-c", command, top)
    child = tmp_path / "child.vhd"
    imgbridge.convert(top, child, format="raw", backing="parent.vhd", sync=False)
    ours = tmp_path / "ours.raw"
    imgbridge.convert(child, ours, output_format="raw", sync=False)
    assert_identical(top, ours)
    fields = vhdiinfo(child)
    assert fields["Disk type"] == "Differential"
    assert fields["Media size"] == str(qemu_info(parent)["virtual-size"])
    assert fields["Parent identifier"] == str(S.Footer.unpack(parent.read_bytes()[:512]).uuid)
    assert fields["Parent filename"] == "parent.vhd"
    # qemu-img cannot follow the parent, but opens the child and reads the same size.
    assert qemu_info(child)["virtual-size"] == qemu_info(parent)["virtual-size"]
    # 4 KiB + 64 KiB of zeros + 100 KiB, compared in 64 KiB pieces: three blocks touched.
    assert imgbridge.inspect(child)["actual-size"] < MiB


def test_creator_rule_is_what_qemu_img_needs(tmp_path: Path) -> None:
    """Why 'win ': this qemu-img sizes an unknown creator by CHS, so an honest creator code
    would lose the end of any disk whose size no geometry expresses."""
    image = tmp_path / "d.vhd"
    make_sparse_file(tmp_path / "src.raw", GiB, [(0, b"x")])
    imgbridge.convert(tmp_path / "src.raw", image, format="raw", sync=False)
    assert qemu_info(image)["virtual-size"] == GiB
    data = bytearray(image.read_bytes())
    footer = S.Footer.unpack(bytes(data[:512]))
    footer.creator_application = b"imgb"
    packed = footer.pack()
    data[:512] = packed
    data[-512:] = packed
    image.write_bytes(bytes(data))
    version = re.search(r"version (\d+)\.", run_tool("qemu-img", "--version").stdout)
    assert version is not None
    # QEMU 10.0 made current_size the default for unknown creators; before, CHS.
    want = GiB if int(version.group(1)) >= 10 else geometry.chs_for(GiB // 512).sectors * 512
    assert qemu_info(image)["virtual-size"] == want
