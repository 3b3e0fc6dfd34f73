"""VHD: geometry and size rules, writing and reading back, differencing chains, hostile input.

Images here are written by our own writer and then damaged or re-linked byte by byte; the
interop tests (tests/interop/test_vhd_interop.py) hold the reader against qemu-img's images
and the writer against qemu-img and libyal's vhdiinfo.
"""

from __future__ import annotations

import os
import struct
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import CliResult, CountingSource, make_sparse_file
from imgbridge.formats.disk import raw, vhd
from imgbridge.formats.disk.vhd import _structs as S
from imgbridge.formats.disk.vhd import geometry, locators
from imgbridge.formats.disk.vhd.reader import VhdDisk, VhdWarning, bitmap_to_runs
from imgbridge.formats.disk.vhd.writer import plan

import imgbridge
from imgbridge.errors import (
    InvalidImageError,
    InvalidInputError,
    MissingCompanionError,
    UnsupportedFeatureError,
)
from imgbridge.model.disk import BlockState, Disk, ExtentKind, Run, iter_nonzero
from imgbridge.output import AtomicOutput
from imgbridge.registry import ProbeInput, Registry
from imgbridge.resolver import CompanionResolver
from imgbridge.source import FileSource

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
Cli = Callable[..., CliResult]
pytestmark = pytest.mark.filterwarnings("ignore::imgbridge.formats.disk.vhd.VhdWarning")


def _pattern(seed: int, n: int) -> bytes:
    block = bytes((seed * 37 + i * 11) % 251 + 1 for i in range(4096))
    return (block * (n // 4096 + 1))[:n]


def write_vhd(path: Path, size: int, runs: list[tuple[int, bytes]], **options: str) -> Path:
    """A VHD written by our writer from a sparse raw disk holding ``runs``."""
    source = make_sparse_file(path.with_suffix(".src"), size, runs)
    with FileSource(source) as src, AtomicOutput(str(path), sync=False) as out:
        vhd.create(out, raw.RawDisk(src), options, lambda done, total: None)
        out.commit()
    source.unlink()
    return path


def open_vhd(path: Path, *, allow_outside: bool = False) -> VhdDisk:
    disk = imgbridge.open(path, "vhd", allow_outside=allow_outside)
    assert isinstance(disk, VhdDisk)
    return disk


def expected(size: int, runs: list[tuple[int, bytes]]) -> bytes:
    image = bytearray(size)
    for offset, data in runs:
        image[offset:offset + len(data)] = data
    return bytes(image)


def footer_of(path: Path) -> S.Footer:
    return S.Footer.unpack(path.read_bytes()[-512:])


def header_of(path: Path) -> tuple[int, S.DynamicHeader]:
    data = path.read_bytes()
    at = S.Footer.unpack(data[-512:]).data_offset
    return at, S.DynamicHeader.unpack(data[at:at + 1024])


def bat_of(path: Path) -> list[int]:
    _, header = header_of(path)
    data = path.read_bytes()
    return list(struct.unpack_from(f">{header.max_table_entries}I", data, header.table_offset))


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def rewrite_footers(path: Path, footer: S.Footer) -> None:
    """Store ``footer`` (checksum recomputed) at the end and, for dynamic disks, at 0."""
    raw_footer = footer.pack()
    size = path.stat().st_size
    patch(path, size - 512, raw_footer)
    if footer.disk_type != S.DISK_FIXED:
        patch(path, 0, raw_footer)


def rewrite_header(path: Path, header: S.DynamicHeader) -> None:
    at = footer_of(path).data_offset
    patch(path, at, header.pack())


# ---- geometry and size rules ---------------------------------------------------------------

@pytest.mark.parametrize(("sectors", "chs"), [
    (2 * GiB // 512, (4161, 16, 63)),
    (GiB // 512, (2080, 16, 63)),  # qemu-img gives 1 GiB one more cylinder: 2081 x 16 x 63
    (6144, (90, 4, 17)),  # 3 MiB: 6120 sectors, the geometry rounds down
    (20 * MiB // 512, (602, 4, 17)),  # 40960 / 17 = 2409 cylinders x heads; 4 heads
    (300_000, (604, 16, 31)),  # 17 per track would need 18 heads: 31 per track, 16 heads
    (127 * GiB // 512, (65278, 16, 255)),  # above 65535*16*63 sectors: 255 per track
    ((3 << 40) // 512, (65535, 16, 255)),  # beyond the largest geometry: clamped
    (0, (0, 4, 17)),
])
def test_chs_follows_the_spec_appendix(sectors: int, chs: tuple[int, int, int]) -> None:
    assert tuple(geometry.chs_for(sectors)) == chs


def test_chs_never_exceeds_the_size_and_round_up_is_exact() -> None:
    for sectors in (1, 17, 4095, 6151, 1000 * 2048 + 1, GiB // 512, 65535 * 16 * 63 + 5):
        assert geometry.chs_for(sectors).sectors <= sectors
        up = geometry.chs_round_up(sectors)
        assert up >= sectors
        assert geometry.chs_for(up).sectors == up  # representable
    assert geometry.chs_round_up(GiB // 512) * 512 == 1073995776  # what qemu-img makes of 1G
    big = geometry.MAX_CHS_SECTORS + 100
    assert geometry.chs_round_up(big) == big  # nothing to round to: keep the size


def _footer(app: bytes, current: int, chs: tuple[int, int, int]) -> S.Footer:
    return S.Footer(disk_type=S.DISK_DYNAMIC, current_size=current, original_size=current,
                    cylinders=chs[0], heads=chs[1], sectors_per_track=chs[2], data_offset=512,
                    timestamp=0, creator_application=app, creator_version=0,
                    creator_host_os=b"Wi2k", unique_id=bytes(16))


@pytest.mark.parametrize(("app", "by_chs"), [
    (b"vpc ", True), (b"qemu", True), (b"qem2", False), (b"win ", False), (b"d2v ", False),
    (b"tap\0", False), (b"CTXS", False), (b"wa\0\0", False), (b"abcd", False),
])
def test_virtual_size_follows_current_qemus_creator_table(app: bytes, by_chs: bool) -> None:
    footer = _footer(app, GiB, (2080, 16, 63))
    assert geometry.virtual_size(footer) == (2080 * 16 * 63 * 512 if by_chs else GiB)


def test_maximum_geometry_means_current_size_whoever_made_it() -> None:
    footer = _footer(b"vpc ", 200 * GiB, (65535, 16, 255))
    assert geometry.virtual_size(footer) == 200 * GiB


def test_checksum_is_the_ones_complement_of_the_byte_sum() -> None:
    footer = _footer(b"win ", MiB, (30, 4, 17))
    raw_footer = footer.pack()
    total = sum(raw_footer) - sum(raw_footer[64:68])
    assert int.from_bytes(raw_footer[64:68], "big") == ~total & 0xFFFFFFFF
    assert len(raw_footer) == 512 and len(S.DynamicHeader(1536, 1, 2 * MiB).pack()) == 1024


# ---- probing ---------------------------------------------------------------------------

def test_probe_finds_the_footer_at_either_end(tmp_path: Path) -> None:
    footer = _footer(b"win ", MiB, (30, 4, 17)).pack()
    tail_only = ProbeInput(b"\0" * 4096, b"\0" * 100 + footer, "x", 8192)
    old_tail = ProbeInput(b"\0" * 4096, b"\0" * 100 + footer[:511], "x", 8191)
    head = ProbeInput(footer, b"", "x", 512)
    assert vhd.probe(tail_only) == vhd.probe(old_tail) == vhd.probe(head) == 100
    assert vhd.probe(ProbeInput(b"\0" * 512, b"\0" * 512, "disk.vhd", 512)) == 0
    assert vhd.probe(ProbeInput(b"", b"", str(tmp_path), 0, frozenset())) == 0


def test_registry_knows_vhd_and_the_vpc_alias(tmp_path: Path) -> None:
    reg = Registry(entry_points=False)
    assert reg.get("vpc").name == reg.get("VHD").name == "vhd"
    assert reg.for_output(None, str(tmp_path / "x.vhd")).name == "vhd"
    fixed = write_vhd(tmp_path / "fixed.vhd", MiB, [(0, b"x" * 512)], subformat="fixed")
    assert reg.detect(str(fixed)).spec.name == "vhd"


# ---- writing and reading back ----------------------------------------------------------

SIZES = [512, 3 * MiB + 7 * 512, 1000 * MiB + 512, 90 * 4 * 17 * 512]


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
@pytest.mark.parametrize("size", SIZES)
def test_round_trip_keeps_content_and_exact_size(tmp_path: Path, subformat: str,
                                                 size: int) -> None:
    runs = [(0, b"head" * 128)] + ([(size - 512, _pattern(1, 512))] if size > 512 else [])
    if size > 4 * MiB:
        runs += [(2 * MiB - 1000, _pattern(2, 5000)), (size // 2, _pattern(3, MiB))]
    path = write_vhd(tmp_path / "d.vhd", size, runs, subformat=subformat)
    footer = footer_of(path)
    assert footer.current_size == footer.original_size == size
    assert abs(footer.timestamp - (time.time() - 946684800)) < 60  # seconds since 2000 UTC
    assert footer.uuid.version == 4
    assert footer.creator_application == b"win " and footer.creator_host_os == b"Wi2k"
    assert tuple(geometry.chs_for(size // 512)) == (footer.cylinders, footer.heads,
                                                    footer.sectors_per_track)
    disk = open_vhd(path)
    with disk:
        assert disk.size == size
        assert disk.subformat == subformat
        for offset, data in runs:
            assert disk.read_at(offset, len(data)) == data
        if size <= 4 * MiB:
            assert disk.read_at(0, size) == expected(size, runs)
        assert disk.check().exit_code == 0
    if subformat == "fixed":
        assert path.stat().st_size == size + 512
        assert path.read_bytes()[:512] == b"head" * 128


def test_every_disk_gets_its_own_unique_id(tmp_path: Path) -> None:
    one = write_vhd(tmp_path / "one.vhd", MiB, [(0, b"same")])
    two = write_vhd(tmp_path / "two.vhd", MiB, [(0, b"same")])
    assert footer_of(one).unique_id != footer_of(two).unique_id


def test_a_size_that_is_not_whole_sectors_is_padded(tmp_path: Path) -> None:
    path = write_vhd(tmp_path / "odd.vhd", MiB + 100, [(MiB, b"z" * 100)])
    with open_vhd(path) as disk:
        assert disk.size == MiB + 512
        assert disk.read_at(MiB, 512) == b"z" * 100 + bytes(412)


def test_dynamic_layout_stores_only_blocks_with_data(tmp_path: Path) -> None:
    size = 16 * MiB
    runs = [(MiB, b"a" * 4096), (9 * MiB + 17, b"b" * 3), (2 * MiB, bytes(MiB))]
    path = write_vhd(tmp_path / "d.vhd", size, runs)
    data = path.read_bytes()
    assert data[:512] == data[-512:]  # the footer copy
    at, header = header_of(path)
    assert (at, header.table_offset, header.block_size) == (512, 1536, 2 * MiB)
    assert header.max_table_entries == 8
    bat = bat_of(path)
    allocated = [i for i, e in enumerate(bat) if e != S.BAT_FREE]
    assert allocated == [0, 4]  # block 1 held only zeros: not allocated
    for entry in (bat[0], bat[4]):
        start = entry * 512
        assert data[start:start + 512] == b"\xff" * 512  # sector bitmap: all stored
        assert (start + 512) % 4096 == 0  # data on a 4 KiB boundary of the file
    assert len(data) == bat[4] * 512 + 512 + 2 * MiB + 512
    with open_vhd(path) as disk:
        kinds = [(e.offset, e.length, e.kind) for e in disk.extents()]
        assert (2 * MiB, 6 * MiB, ExtentKind.ZERO) in kinds


def test_block_size_option(tmp_path: Path) -> None:
    path = write_vhd(tmp_path / "d.vhd", 8 * MiB, [(5 * MiB, b"q" * 10)], block_size="512K")
    _, header = header_of(path)
    assert (header.block_size, header.max_table_entries) == (512 * KiB, 16)
    assert [i for i, e in enumerate(bat_of(path)) if e != S.BAT_FREE] == [10]
    path = write_vhd(tmp_path / "big.vhd", 8 * MiB, [(5 * MiB, b"q" * 10)], block_size="16M")
    _, header = header_of(path)
    assert (header.block_size, S.bitmap_size(header.block_size)) == (16 * MiB, 4096)
    with open_vhd(path) as disk:
        assert disk.read_at(5 * MiB, 11) == b"q" * 10 + b"\0"


def test_azure_makes_a_fixed_disk_of_whole_mib(tmp_path: Path) -> None:
    path = write_vhd(tmp_path / "a.vhd", 3 * MiB + 7 * 512, [(0, b"boot")], azure="on")
    footer = footer_of(path)
    assert footer.disk_type == S.DISK_FIXED
    assert footer.current_size == 4 * MiB
    assert path.stat().st_size == 4 * MiB + 512


def test_force_size_off_rounds_up_to_a_geometry(tmp_path: Path) -> None:
    path = write_vhd(tmp_path / "c.vhd", 3 * MiB, [], force_size="off")
    footer = footer_of(path)
    assert footer.current_size == footer.chs_sectors * 512 >= 3 * MiB


@pytest.mark.parametrize(("options", "message"), [
    ({"subformat": "sparse"}, "subformat must be"),
    ({"block_size": "3M"}, "power of two"),
    ({"block_size": "256K"}, "power of two"),
    ({"block_size": "512M"}, "power of two"),
    ({"block_size": "lots"}, "size such as"),
    ({"subformat": "fixed", "block_size": "2M"}, "dynamic disks only"),
    ({"azure": "on", "subformat": "dynamic"}, "fixed disk"),
    ({"azure": "on", "force_size": "off"}, "whole MiB"),
    ({"azure": "maybe"}, "on or off"),
])
def test_bad_options_are_refused(options: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        plan(MiB, options)


@pytest.mark.parametrize(("text", "value"), [
    ("512K", 512 * KiB), ("2048k", 2 * MiB), ("2097152", 2 * MiB), ("0.5M", 512 * KiB),
    ("256M", 256 * MiB),
])
def test_block_size_takes_qemu_sizes(text: str, value: int) -> None:
    """block_size goes through the shared qemu-style parser (imgbridge.api.parse_size)."""
    assert plan(8 * MiB, {"block_size": text}).block_size == value


class HugeDisk(Disk):
    """A disk of any size that stores nothing (the writer must refuse before reading it)."""

    format_name = "test"

    def block_status(self, offset: int, length: int) -> Iterator[Run]:
        yield Run(offset, length, BlockState.ZERO)


def test_a_disk_above_2040_gib_is_refused_before_writing(tmp_path: Path) -> None:
    with AtomicOutput(str(tmp_path / "huge.vhd")) as out, \
            pytest.raises(InvalidInputError, match="2040 GiB"):
        vhd.create(out, HugeDisk(2041 * GiB), {}, lambda done, total: None)
    assert plan(2040 * GiB, {}).size == 2040 * GiB


# ---- the block map ----------------------------------------------------------------------

def test_bitmap_runs_msb_first() -> None:
    assert bitmap_to_runs(b"\xff" * 512, 4096) == [(0, 2 * MiB, True)]
    assert bitmap_to_runs(bytes(512), 4096) == [(0, 2 * MiB, False)]
    bitmap = bytes([0b1000_0001, 0xFF, 0x00, 0b0110_0000]) + bytes(508)
    assert bitmap_to_runs(bitmap, 4096) == [
        (0, 512, True), (512, 6 * 512, False), (7 * 512, 9 * 512, True),
        (16 * 512, 9 * 512, False), (25 * 512, 2 * 512, True), (27 * 512, 4069 * 512, False),
    ]
    assert bitmap_to_runs(bytes([0b0100_0000]), 2) == [(0, 512, False), (512, 512, True)]




def test_clear_bitmap_bits_are_absent_and_never_read(tmp_path: Path) -> None:
    path = write_vhd(tmp_path / "d.vhd", 4 * MiB, [(0, _pattern(4, 64 * KiB))])
    entry = bat_of(path)[0]
    # Keep sectors 8..15 only (bits of byte 1).
    patch(path, entry * 512, b"\x00\xff" + bytes(510))
    source = CountingSource(FileSource(path))
    disk = VhdDisk(source, CompanionResolver(str(path)), {})
    with disk:
        runs = list(disk.layer_runs())
        assert [(r.offset, r.length, r.state) for r in runs] == [
            (0, 4096, BlockState.UNALLOCATED), (4096, 4096, BlockState.DATA),
            (8192, 4 * MiB - 8192, BlockState.UNALLOCATED)]
        assert runs[1].host_offset == entry * 512 + 512 + 4096
        source.reads.clear()
        assert disk.read_at(0, 64 * KiB) == bytes(4096) + _pattern(4, 8192)[4096:] + \
            bytes(56 * KiB)
        assert source.reads == [(entry * 512 + 512 + 4096, 4096)]
        source.reads.clear()
        assert list(iter_nonzero(disk)) == [(4096, _pattern(4, 8192)[4096:])]
        assert source.reads == [(entry * 512 + 512 + 4096, 4096)]  # nothing else is read


def test_holes_inside_a_stored_block_are_reported_zero(tmp_path: Path) -> None:
    path = write_vhd(tmp_path / "d.vhd", 4 * MiB, [(0, b"x" * 4096), (MiB, b"y" * 4096)])
    with FileSource(path) as src:
        if len([r for r in src.runs() if not r.data]) == 0:
            pytest.skip("this filesystem does not report holes")
    with open_vhd(path) as disk:
        states = [(r.offset, r.length, r.state) for r in disk.layer_runs(0, 2 * MiB)]
        assert states[0] == (0, 4096, BlockState.DATA)
        assert (4096, MiB - 4096, BlockState.ZERO) in states


# ---- damaged and hostile images ---------------------------------------------------------

def test_a_file_too_small_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tiny.vhd"
    path.write_bytes(b"conectix" + bytes(100))
    with pytest.raises(InvalidImageError, match="too small"):
        open_vhd(path)


def test_a_file_without_a_footer_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "none.vhd"
    path.write_bytes(bytes(4096))
    with pytest.raises(InvalidImageError, match="no footer"):
        open_vhd(path)


def test_bad_fixed_footer_checksum_is_refused(tmp_path: Path) -> None:
    path = write_vhd(tmp_path / "f.vhd", MiB, [(0, b"a")], subformat="fixed")
    patch(path, MiB + 40, b"\x00\x00\x00\x00\x00\x20")  # change current_size, not the sum
    with pytest.raises(InvalidImageError, match="checksum") as info:
        open_vhd(path)
    assert info.value.offset == MiB and info.value.format == "vhd"


def test_bad_end_footer_uses_the_copy_with_a_warning(tmp_path: Path) -> None:
    path = write_vhd(tmp_path / "d.vhd", 4 * MiB, [(MiB, b"payload")])
    size = path.stat().st_size
    patch(path, size - 512 + 48, b"\x7f")  # current_size damaged, checksum now wrong
    with pytest.warns(VhdWarning, match="using the footer copy at offset 0"):
        disk = open_vhd(path)
    with disk:
        assert disk.size == 4 * MiB
        assert disk.read_at(MiB, 7) == b"payload"
        assert "using the footer copy" in disk.info()["format-specific"]["data"]["warnings"][0]
        report = disk.check()
        assert report.exit_code == 2
        assert any(m.startswith("ERROR") and "checksum" in m for m in report.messages)


def test_the_cli_prints_a_warning_as_one_line(tmp_path: Path, cli: Cli) -> None:
    path = write_vhd(tmp_path / "d.vhd", 4 * MiB, [(MiB, b"payload")])
    patch(path, path.stat().st_size - 512 + 48, b"\x7f")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        result = cli("inspect", path)
    assert result.code == 0
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imgbridge: warning: "), result.err
    assert "footer copy" in lines[0]


def test_bad_checksums_at_both_ends_are_refused(tmp_path: Path) -> None:
    path = write_vhd(tmp_path / "d.vhd", 4 * MiB, [(MiB, b"payload")])
    size = path.stat().st_size
    patch(path, size - 512 + 48, b"\x7f")
    patch(path, 48, b"\x7f")
    with pytest.raises(InvalidImageError, match="damaged too"):
        open_vhd(path)


def test_truncated_dynamic_disk_falls_back_then_stops_at_the_missing_block(
        tmp_path: Path) -> None:
    path = write_vhd(tmp_path / "d.vhd", 8 * MiB, [(0, b"first"), (6 * MiB, b"last")])
    size = path.stat().st_size
    os.truncate(path, size - 512 - MiB)  # the footer and half the last block are gone
    with pytest.warns(VhdWarning):
        disk = open_vhd(path)
    with disk:
        assert disk.read_at(0, 5) == b"first"
        with pytest.raises(InvalidImageError, match="past the end of the file"):
            disk.read_at(6 * MiB, 4)
        report = disk.check()
        assert report.exit_code == 2
        assert any("block 3" in m for m in report.messages)


def test_truncated_inside_the_bat_is_refused(tmp_path: Path) -> None:
    path = write_vhd(tmp_path / "d.vhd", 4 * GiB, [(0, b"x")])
    os.truncate(path, 1536 + 100)
    with pytest.warns(VhdWarning), pytest.raises(InvalidImageError, match="BAT"):
        open_vhd(path)


@pytest.mark.parametrize("block_size", [0, 3 * 512, 2 * MiB + 512, 256])
def test_bad_block_size_is_refused(tmp_path: Path, block_size: int) -> None:
    path = write_vhd(tmp_path / "d.vhd", 4 * MiB, [(0, b"x")])
    _, header = header_of(path)
    header.block_size = block_size
    rewrite_header(path, header)
    with pytest.raises(InvalidImageError, match="block size"):
        open_vhd(path)


def test_absurd_bat_is_refused_before_allocating(tmp_path: Path) -> None:
    path = write_vhd(tmp_path / "d.vhd", 4 * MiB, [(0, b"x")])
    _, header = header_of(path)
    header.max_table_entries = 0xFFFF_FFF0
    rewrite_header(path, header)
    source = CountingSource(FileSource(path))
    with pytest.raises(InvalidImageError, match="exceed the limit"):
        VhdDisk(source, CompanionResolver(str(path)), {})
    assert max(n for _, n in source.reads) <= 1024  # footers and the header only
    source.inner.close()


def test_bat_shorter_than_the_disk_is_refused(tmp_path: Path) -> None:
    path = write_vhd(tmp_path / "d.vhd", 4 * MiB, [(0, b"x")])
    _, header = header_of(path)
    header.max_table_entries = 1
    rewrite_header(path, header)
    with pytest.raises(InvalidImageError, match="needs 2"):
        open_vhd(path)


def test_bad_header_checksum_is_refused(tmp_path: Path) -> None:
    path = write_vhd(tmp_path / "d.vhd", 4 * MiB, [(0, b"x")])
    patch(path, 512 + 28, b"\x00\x00\x00\x03")  # max_table_entries, checksum left alone
    with pytest.raises(InvalidImageError, match="header checksum"):
        open_vhd(path)


def test_bat_entry_past_the_end(tmp_path: Path) -> None:
    path = write_vhd(tmp_path / "d.vhd", 4 * MiB, [(0, b"x"), (2 * MiB, b"y")])
    patch(path, 1536 + 4, (0x0100_0000).to_bytes(4, "big"))  # block 1 at 8 GiB
    with pytest.warns(VhdWarning, match="past the end"):
        disk = open_vhd(path)
    with disk:
        assert disk.read_at(0, 1) == b"x"
        with pytest.raises(InvalidImageError, match="block 1") as info:
            disk.read_at(2 * MiB, 1)
        assert info.value.offset == 1536 + 4
        assert disk.check().exit_code == 2


def test_unknown_disk_type_and_absurd_size(tmp_path: Path) -> None:
    path = write_vhd(tmp_path / "f.vhd", MiB, [(0, b"x")], subformat="fixed")
    footer = footer_of(path)
    footer.disk_type = 5
    rewrite_footers(path, footer)
    with pytest.raises(UnsupportedFeatureError, match="disk type 5"):
        open_vhd(path)
    footer.disk_type = S.DISK_FIXED
    footer.current_size = 4 << 40
    rewrite_footers(path, footer)
    with pytest.raises(InvalidImageError, match="2040 GiB"):
        open_vhd(path)
    footer.current_size = 2 * MiB  # larger than the data area
    rewrite_footers(path, footer)
    with pytest.raises(InvalidImageError, match="data area"):
        open_vhd(path)


def test_old_511_byte_footer_is_read(tmp_path: Path) -> None:
    path = write_vhd(tmp_path / "f.vhd", MiB, [(0, b"old!")], subformat="fixed")
    os.truncate(path, MiB + 511)  # the saved-state byte and the reserved bytes are zero
    disk = open_vhd(path)
    with disk:
        assert disk.size == MiB
        assert disk.footer_offset == MiB
        assert disk.read_at(0, 4) == b"old!"
        assert disk.check().exit_code == 0


# ---- check ------------------------------------------------------------------------------

def test_check_reports_overlaps_copies_and_leaks(tmp_path: Path) -> None:
    path = write_vhd(tmp_path / "d.vhd", 4 * MiB, [(0, b"x"), (2 * MiB, b"y")])
    with open_vhd(path) as disk:
        report = disk.check()
        assert (report.corruptions, report.leaks, report.messages) == (0, 0, [])
        assert report.image_end_offset == path.stat().st_size
        with pytest.raises(UnsupportedFeatureError, match="repair"):
            disk.check("all")
    bat = bat_of(path)
    patch(path, 1536 + 4, (bat[0] + 8).to_bytes(4, "big"))  # block 1 inside block 0
    with open_vhd(path) as disk:
        report = disk.check()
        assert report.corruptions == 1
        assert "overlap" in report.messages[0]
    patch(path, 1536 + 4, (2).to_bytes(4, "big"))  # block 1 on top of the header and BAT
    with open_vhd(path) as disk:
        report = disk.check()
        assert any("dynamic header" in m for m in report.messages)
        assert any("BAT" in m for m in report.messages)
    patch(path, 1536 + 4, bat[1].to_bytes(4, "big"))
    patch(path, 100, b"\x01")  # the copy's unique id: checksum wrong
    with open_vhd(path) as disk:
        assert any("offset 0x0" in m for m in disk.check().messages)


def test_check_reports_a_block_beyond_the_disk_as_a_leak(tmp_path: Path) -> None:
    path = write_vhd(tmp_path / "d.vhd", 4 * MiB, [(0, b"x"), (2 * MiB, b"y")])
    bat = bat_of(path)
    # Claim a 2 MiB disk: block 1 is then unreachable.
    footer = footer_of(path)
    footer.current_size = 2 * MiB
    rewrite_footers(path, footer)
    with open_vhd(path) as disk:
        report = disk.check()
        assert report.exit_code == 3, report.to_json()
        assert report.messages == [f"Leaked block 1 at offset {bat[1] * 512:#x}: beyond the "
                                   "virtual size"]


def test_check_cli_exit_codes(tmp_path: Path, cli: Cli) -> None:
    path = write_vhd(tmp_path / "d.vhd", 4 * MiB, [(0, b"x")])
    assert cli("check", "-f", "vpc", path).code == 0
    patch(path, 100, b"\x01")
    result = cli("check", path)
    assert result.code == 2, result.out


# ---- differencing disks ------------------------------------------------------------------

def utf16le(text: str) -> bytes:
    return text.encode("utf-16-le")


def mac_alias_v2(name: str, posix_path: str | None = None) -> bytes:
    """A minimal version 2 Mac OS alias record naming ``name`` (and a POSIX path)."""
    record = bytearray(150)
    record[4:6] = (150).to_bytes(2, "big")
    record[6:8] = (2).to_bytes(2, "big")
    record[50] = len(name)
    record[51:51 + len(name)] = name.encode("mac_roman")
    if posix_path is not None:
        value = posix_path.encode()
        record += struct.pack(">hH", 18, len(value)) + value + b"\0" * (len(value) & 1)
    record += struct.pack(">hH", -1, 0)
    return bytes(record)


def link_to_parent(child: Path, parent: Path | None, *,
                   locators_: list[tuple[bytes, bytes]] | None = None,
                   unicode_name: str | None = None, parent_id: bytes | None = None,
                   bitmaps: dict[int, bytes] | None = None) -> Path:
    """Turn a dynamic VHD into a differencing child, by hand.

    Locator data go after the last block (then the footer), the header gets the parent's
    unique id, name and locators, ``bitmaps`` replace the named blocks' sector bitmaps, and
    both footers get disk type 4. Checksums are recomputed.
    """
    if locators_ is None:
        locators_ = [(b"W2ru", utf16le(".\\" + parent.name))] if parent else []
    data = bytearray(child.read_bytes())
    footer = S.Footer.unpack(bytes(data[-512:]))
    at = footer.data_offset
    header = S.DynamicHeader.unpack(bytes(data[at:at + 1024]))
    body = data[:-512]
    for index, (code, blob) in enumerate(locators_):
        space = -(-len(blob) // 512) * 512
        header.parent_locators[index] = S.ParentLocator(code, space, len(blob), len(body))
        body += blob + bytes(space - len(blob))
    if parent_id is None and parent is not None:
        parent_id = S.Footer.unpack(parent.read_bytes()[-512:]).unique_id
    header.parent_unique_id = parent_id or bytes(16)
    name = unicode_name if unicode_name is not None else (parent.name if parent else "")
    header.parent_unicode_name = name.encode("utf-16-be").ljust(512, b"\0")
    bat = struct.unpack_from(f">{header.max_table_entries}I", data, header.table_offset)
    for block, bitmap in (bitmaps or {}).items():
        body[bat[block] * 512:bat[block] * 512 + len(bitmap)] = bitmap
    footer.disk_type = S.DISK_DIFFERENCING
    packed = footer.pack()
    body[0:512] = packed
    body[at:at + 1024] = header.pack()
    child.write_bytes(bytes(body) + packed)
    return child


@pytest.fixture
def chain(tmp_path: Path) -> tuple[Path, Path]:
    """parent.vhd (8 MiB of 'P' in its first 4 MiB) and child.vhd over it: block 0 stores
    sectors 0..7 ('c'), block 2 stores all of it ('C' then zeros)."""
    parent = write_vhd(tmp_path / "parent.vhd", 8 * MiB, [(0, b"P" * 4 * MiB)])
    child = write_vhd(tmp_path / "child.vhd", 8 * MiB,
                      [(0, b"c" * 4096), (4 * MiB, b"C" * 4096)])
    link_to_parent(child, parent, bitmaps={0: b"\xff" + bytes(511)})
    return parent, child


def test_differencing_reads_through_the_sector_bitmap(chain: tuple[Path, Path]) -> None:
    parent, child = chain
    disk = open_vhd(child)
    with disk:
        assert disk.subformat == "differencing"
        assert disk.backing is not None and disk.backing.filename.endswith("parent.vhd")
        assert disk.read_at(0, 8192) == b"c" * 4096 + b"P" * 4096
        assert disk.read_at(2 * MiB, 4) == b"PPPP"  # block 1 absent: the parent's
        assert disk.read_at(4 * MiB, 8192) == b"C" * 4096 + bytes(4096)  # stored zeros win
        extents = [(e.offset, e.length, e.kind, e.depth) for e in disk.extents()]
        assert extents[0] == (0, 4096, ExtentKind.DATA, 0)
        # The parent's blocks 0 and 1 are not contiguous in its file: two extents.
        assert extents[1:3] == [(4096, 2 * MiB - 4096, ExtentKind.DATA, 1),
                                (2 * MiB, 2 * MiB, ExtentKind.DATA, 1)]
        info = disk.info()
        assert info["backing-filename"] == ".\\parent.vhd".replace("\\", "/") or \
            info["backing-filename"] == "./parent.vhd"
        data = info["format-specific"]["data"]
        assert data["parent-uuid"] == str(footer_of(parent).uuid)
        assert data["parent-name"] == "parent.vhd"
        assert disk.check().exit_code == 0


@pytest.mark.parametrize("kind", ["W2ku", "MacX", "Mac", "name", "W2ku-windows"])
def test_every_locator_kind_finds_the_parent(chain: tuple[Path, Path], kind: str) -> None:
    parent, child = chain
    write_vhd(child, 8 * MiB, [(0, b"c" * 4096)])
    absolute = str(parent.resolve())
    choices = {
        "W2ku": ([(b"W2ku", utf16le(absolute))], ""),
        "MacX": ([(b"MacX", ("file://localhost" + absolute.replace(" ", "%20")).encode())], ""),
        "Mac": ([(b"Mac ", mac_alias_v2("parent.vhd"))], ""),
        "name": ([], "parent.vhd"),
        "W2ku-windows": ([(b"W2ku", utf16le("D:\\vms\\parent.vhd"))], ""),
    }
    locs, name = choices[kind]
    link_to_parent(child, parent, locators_=locs, unicode_name=name,
                   bitmaps={0: b"\xff" + bytes(511)})
    with open_vhd(child) as disk:
        assert disk.read_at(4090, 12) == b"cccccc" + b"PPPPPP"


def test_locator_decoding() -> None:
    assert locators.decode_unicode_name("ab.vhd".encode("utf-16-le") + bytes(4)) == "ab.vhd"
    assert locators.decode_unicode_name("ab.vhd".encode("utf-16-be") + bytes(4)) == "ab.vhd"
    assert locators.decode_file_url(b"file:///a%20b/c.vhd\0") == "/a b/c.vhd"
    assert locators.decode_file_url(b"http://x/c.vhd") is None
    assert locators.decode_mac_alias(mac_alias_v2("p.vhd", "Users/me/p.vhd")) == \
        ["/Users/me/p.vhd", "p.vhd"]
    found = locators.candidates("p.vhd", [(b"W2ku", utf16le("C:\\x\\p.vhd")),
                                          (b"W2ru", utf16le(".\\sub\\p.vhd"))])
    assert [c.path for c in found] == ["./sub/p.vhd", "p.vhd"]


def test_parent_with_another_unique_id_is_refused(chain: tuple[Path, Path]) -> None:
    parent, child = chain
    link_to_parent(child, parent, parent_id=uuid.uuid4().bytes)
    with pytest.raises(InvalidImageError, match="unique id"):
        open_vhd(child)


def test_missing_parent(chain: tuple[Path, Path]) -> None:
    parent, child = chain
    parent.unlink()
    with pytest.raises(MissingCompanionError, match="parent VHD not found"):
        open_vhd(child)


def test_parent_outside_the_folder(tmp_path: Path) -> None:
    outside = write_vhd(tmp_path / "parent.vhd", 4 * MiB, [(0, b"P" * 512)])
    (tmp_path / "inner").mkdir()
    child = write_vhd(tmp_path / "inner" / "child.vhd", 4 * MiB, [(3 * MiB, b"c")])
    link_to_parent(child, outside, locators_=[(b"W2ru", utf16le("..\\parent.vhd"))])
    with pytest.raises(MissingCompanionError, match="outside the image's folder"):
        open_vhd(child)
    with open_vhd(child, allow_outside=True) as disk:
        assert disk.read_at(0, 2) == b"PP"


def test_an_outside_path_gives_way_to_a_copy_beside_the_child(tmp_path: Path) -> None:
    outside = write_vhd(tmp_path / "parent.vhd", 4 * MiB, [(0, b"P" * 512)])
    (tmp_path / "inner").mkdir()
    child = write_vhd(tmp_path / "inner" / "child.vhd", 4 * MiB, [(3 * MiB, b"c")])
    link_to_parent(child, outside, locators_=[(b"W2ku", utf16le(str(outside.resolve())))])
    with pytest.raises(MissingCompanionError, match="outside the image's folder"):
        open_vhd(child)
    (tmp_path / "inner" / "parent.vhd").write_bytes(outside.read_bytes())
    disk = open_vhd(child)
    with disk:
        assert disk.parent_name == "parent.vhd"  # found by its name, next to the child
        assert disk.read_at(0, 2) == b"PP"


def test_hostile_parent_locators_are_refused(chain: tuple[Path, Path]) -> None:
    _, child = chain
    at, header = header_of(child)
    header.parent_locators[0].platform_data_length = 1 << 20
    rewrite_header(child, header)
    with pytest.raises(InvalidImageError, match="claims 1048576 bytes"):
        open_vhd(child)
    header.parent_locators[0].platform_data_length = 64
    header.parent_locators[0].platform_data_offset = 1 << 40
    rewrite_header(child, header)
    with pytest.raises(InvalidImageError, match="past the end") as info:
        open_vhd(child)
    assert info.value.offset == at + 576


def test_mac_alias_version_3_names_its_target_in_utf16() -> None:
    record = bytearray(58)
    record[6:8] = (3).to_bytes(2, "big")
    name = "p\u00e4rent.vhd"
    value = len(name).to_bytes(2, "big") + name.encode("utf-16-be")
    record += struct.pack(">hH", 14, len(value)) + value + struct.pack(">hH", -1, 0)
    assert locators.decode_mac_alias(bytes(record)) == [name]
    assert locators.decode_mac_alias(b"junk") == []


def test_parent_loops_are_refused(tmp_path: Path) -> None:
    a = write_vhd(tmp_path / "a.vhd", 4 * MiB, [(0, b"a")])
    b = write_vhd(tmp_path / "b.vhd", 4 * MiB, [(0, b"b")])
    a_id, b_id = footer_of(a).unique_id, footer_of(b).unique_id
    link_to_parent(a, b, parent_id=b_id)
    link_to_parent(b, a, parent_id=a_id)
    with pytest.raises(InvalidImageError, match="loop"):
        open_vhd(a)
    link_to_parent(a, a, parent_id=a_id)
    with pytest.raises(InvalidImageError, match="loop"):
        open_vhd(a)


# ---- writing differencing disks -----------------------------------------------------------

def test_convert_with_a_backing_file_stores_only_the_difference(tmp_path: Path) -> None:
    base_runs = [(0, b"B" * 3 * MiB), (6 * MiB, b"b" * MiB)]
    base = write_vhd(tmp_path / "base.vhd", 8 * MiB, base_runs)
    top_runs = [*base_runs, (MiB, b"T" * 4096), (6 * MiB, bytes(64 * KiB))]
    top = make_sparse_file(tmp_path / "top.raw", 8 * MiB, top_runs)
    child = tmp_path / "child.vhd"
    imgbridge.convert(top, child, format="raw", backing="base.vhd", sync=False)
    assert footer_of(child).disk_type == S.DISK_DIFFERENCING
    _, header = header_of(child)
    assert header.parent_unique_id == footer_of(base).unique_id
    assert header.parent_timestamp == int(base.stat().st_mtime) - 946684800
    assert locators.decode_unicode_name(header.parent_unicode_name) == "base.vhd"
    data = child.read_bytes()
    found = [(loc.platform_code, data[loc.platform_data_offset:loc.platform_data_offset
                                      + loc.platform_data_length])
             for loc in header.parent_locators if loc.platform_code != S.PLATFORM_NONE]
    assert found[0] == (b"W2ru", utf16le(".\\base.vhd"))
    assert found[1] == (b"MacX", b"file://" + str(base.resolve()).encode())
    bat = bat_of(child)
    assert [i for i, e in enumerate(bat) if e != S.BAT_FREE] == [0, 3]  # 1 MiB and 6 MiB
    granule = 64 * KiB // 512  # convert -B compares in 64 KiB pieces
    assert data[bat[0] * 512:bat[0] * 512 + 512] == _bits(2048, granule)
    assert data[bat[3] * 512:bat[3] * 512 + 512] == _bits(0, granule)
    disk = open_vhd(child)
    with disk:
        assert disk.read_at(0, 8 * MiB) == expected(8 * MiB, top_runs)
        assert disk.check().exit_code == 0
    # Stored zeros are marked, never written: the child holds 64 KiB of data, not 128.
    assert imgbridge.inspect(child)["actual-size"] <= 256 * KiB


def _bits(first: int, count: int) -> bytes:
    bitmap = bytearray(512)
    for sector in range(first, first + count):
        bitmap[sector // 8] |= 0x80 >> (sector % 8)
    return bytes(bitmap)


def test_create_with_a_backing_file_is_an_empty_child(tmp_path: Path) -> None:
    base = write_vhd(tmp_path / "base.vhd", 4 * MiB, [(MiB, b"parent")])
    child = tmp_path / "child.vhd"
    imgbridge.create(child, format="vhd", backing="base.vhd")
    assert set(bat_of(child)) == {S.BAT_FREE}
    disk = open_vhd(child)
    with disk:
        assert disk.size == 4 * MiB
        assert disk.read_at(MiB, 6) == b"parent"
    assert footer_of(base).disk_type == S.DISK_DYNAMIC


class Layer(Disk):
    """A layer with runs at sector-unaligned offsets, over a parent."""

    format_name = "test"

    def __init__(self, parent: Disk, runs: list[tuple[int, int, BlockState]],
                 payload: bytes) -> None:
        super().__init__(parent.size, backing=parent)
        self.runs, self.payload = runs, payload

    def block_status(self, offset: int, length: int) -> Iterator[Run]:
        for start, n, state in self.runs:
            if start + n > offset and start < offset + length:
                yield Run(start, n, state, start if state is BlockState.DATA else None)

    def read_run(self, run: Run, offset: int, n: int) -> bytes:
        return self.payload[offset:offset + n]


def test_partly_covered_sectors_keep_the_parents_bytes(tmp_path: Path) -> None:
    base = write_vhd(tmp_path / "base.vhd", 4 * MiB, [(0, b"p" * 8192)])
    parent = open_vhd(base)
    size = 4 * MiB
    D, Z, U = BlockState.DATA, BlockState.ZERO, BlockState.UNALLOCATED
    layer = Layer(parent, [(0, 100, U), (100, 600, D), (700, 300, U), (1000, 3100, Z),
                           (4100, size - 4100, U)], b"L" * 8192)
    want = layer.read_at(0, 8192)
    assert want == b"p" * 100 + b"L" * 600 + b"p" * 300 + bytes(3100) + b"p" * 4092
    child = tmp_path / "child.vhd"
    with AtomicOutput(str(child), sync=False) as out:
        vhd.create(out, layer, {"backing_file": "base.vhd"}, lambda done, total: None)
        out.commit()
    parent.close()
    data = child.read_bytes()
    bat = bat_of(child)
    assert data[bat[0] * 512:bat[0] * 512 + 2] == bytes([0b1111_1111, 0b1000_0000])
    disk = open_vhd(child)
    with disk:
        assert disk.read_at(0, 8192) == want


@pytest.mark.parametrize(("options", "message"), [
    ({"backing_file": "p.vhd", "subformat": "fixed"}, "never fixed"),
    ({"backing_file": "p.vhd", "azure": "on"}, "never fixed"),
    ({"backing_file": "p.vhd", "backing_fmt": "qcow2"}, "must be a VHD"),
    ({"backing_file": "p.vhd", "force_size": "off"}, "parent's size"),
    ({"backing_fmt": "vhd"}, "without backing_file"),
])
def test_bad_differencing_options(options: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        plan(MiB, options)


def test_a_parent_that_is_not_a_vhd_or_of_another_size(tmp_path: Path) -> None:
    base = make_sparse_file(tmp_path / "base.raw", 4 * MiB, [(0, b"x")])
    with pytest.raises(InvalidInputError, match="must be a VHD"):
        imgbridge.create(tmp_path / "c.vhd", format="vhd", backing="base.raw",
                         backing_format="raw")
    write_vhd(tmp_path / "base.vhd", 4 * MiB, [(0, b"x")])
    with pytest.raises(InvalidInputError, match="parent's size"):
        imgbridge.create(tmp_path / "c.vhd", 8 * MiB, format="vhd", backing="base.vhd")
    assert base.exists() and not (tmp_path / "c.vhd").exists()


# ---- through the library and the CLI -----------------------------------------------------

def test_inspect_json_keys(tmp_path: Path, cli: Cli) -> None:
    import json

    path = write_vhd(tmp_path / "d.vhd", 3 * MiB + 7 * 512, [(0, b"x")])
    result = cli("inspect", "--json", path)
    assert result.code == 0, result.err
    info = json.loads(result.out)
    assert info["format"] == "vhd"
    assert info["virtual-size"] == 3 * MiB + 7 * 512
    assert info["cluster-size"] == 2 * MiB
    data = info["format-specific"]["data"]
    assert data["subformat"] == "dynamic" and data["creator-app"] == "win "
    assert data["current-size"] == 3 * MiB + 7 * 512
    assert data["chs"] == {"cylinders": 90, "heads": 4, "sectors-per-track": 17}
    assert data["chs-size"] == 90 * 4 * 17 * 512
    assert data["size-from"] == "current-size"
    assert uuid.UUID(data["uuid"]) == footer_of(path).uuid


def test_hostile_image_gives_one_error_line(tmp_path: Path, cli: Cli) -> None:
    path = write_vhd(tmp_path / "d.vhd", 4 * MiB, [(0, b"x")])
    _, header = header_of(path)
    header.block_size = 3000
    rewrite_header(path, header)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = cli("inspect", path)
    assert result.code == 1
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imgbridge: error: ")
    assert "block size 3000" in lines[0] and "vhd" in lines[0]
