"""VHDX: reading, writing, checking, and refusing hostile images with one clear error.

Most images here come from ``build``, a small independent VHDX builder written for the
tests from the spec's layout (it does not use the writer), so that hostile variants
(damaged headers, overlapping regions, absurd sizes, pending logs, differencing chains)
can be made exactly. Images qemu-img made are read in tests/interop/test_vhdx_interop.py.
"""

from __future__ import annotations

import hashlib
import os
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import make_sparse_file
from imgbridge.formats.disk import vhdx
from imgbridge.formats.disk.vhdx import _structs as S

import imgbridge
from imgbridge.crc32c import crc32c
from imgbridge.errors import (
    InvalidImageError,
    InvalidInputError,
    MissingCompanionError,
    UnsupportedFeatureError,
)
from imgbridge.model.disk import BlockState, Extent, ExtentKind
from imgbridge.registry import ProbeInput

MiB = 1 << 20


def _pattern(seed: int, n: int) -> bytes:
    block = bytes((seed * 37 + i * 11) % 251 + 1 for i in range(4096))
    return (block * (n // 4096 + 1))[:n]


# ---- an independent builder ------------------------------------------------------------------

def _checksummed(buf: bytearray) -> bytes:
    buf[4:8] = bytes(4)
    buf[4:8] = crc32c(bytes(buf)).to_bytes(4, "little")
    return bytes(buf)


def header_bytes(seq: int, *, data_write: bytes, log_guid: bytes = bytes(16),
                 log_offset: int = MiB, log_length: int = MiB, version: int = 1) -> bytes:
    buf = bytearray(4096)
    struct.pack_into("<4sIQ16s16s16sHHIQ", buf, 0, b"head", 0, seq, uuid.uuid4().bytes_le,
                     data_write, log_guid, 0, version, log_length, log_offset)
    return _checksummed(buf)


def region_table_bytes(entries: list[tuple[bytes, int, int, int]]) -> bytes:
    buf = bytearray(64 * 1024)
    struct.pack_into("<4sIII", buf, 0, b"regi", 0, len(entries), 0)
    for i, (guid, offset, length, required) in enumerate(entries):
        struct.pack_into("<16sQII", buf, 16 + 32 * i, guid, offset, length, required)
    return _checksummed(buf)


def parent_locator_bytes(pairs: dict[str, str]) -> bytes:
    head = S.PARENT_LOCATOR_VHDX + struct.pack("<HH", 0, len(pairs))
    table = b""
    blob = b""
    base = len(head) + 12 * len(pairs)
    for key, value in pairs.items():
        k, v = key.encode("utf-16-le"), value.encode("utf-16-le")
        table += struct.pack("<IIHH", base + len(blob), base + len(blob) + len(k), len(k),
                             len(v))
        blob += k + v
    return head + table + blob


@dataclass
class Image:
    """A VHDX to build: payload blocks by index, and what to say about everything else."""

    size: int
    block_size: int = MiB
    sector: int = 512
    physical_sector: int = 4096
    blocks: dict[int, bytes] = field(default_factory=dict)  # FULLY_PRESENT payload
    partial: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # (data, bitmap)
    states: dict[int, int] = field(default_factory=dict)  # other payload states
    bat_override: dict[int, int] = field(default_factory=dict)  # raw BAT entries by index
    parent: dict[str, str] | None = None
    data_write: bytes = field(default_factory=lambda: uuid.uuid4().bytes_le)
    extra_regions: list[tuple[bytes, int, int, int]] = field(default_factory=list)
    extra_items: list[tuple[bytes, int, bytes]] = field(default_factory=list)  # id, flags, data
    log_guid: bytes = bytes(16)
    log: bytes = b""  # the log region's content (1 MiB at 1 MiB)
    virtual_size_override: int | None = None
    block_size_override: int | None = None
    bat_length_override: int | None = None

    @property
    def chunk_ratio(self) -> int:
        return (1 << 23) * self.sector // self.block_size

    def bat_index(self, block: int) -> int:
        return block + block // self.chunk_ratio


def build(path: Path, img: Image) -> dict[str, int]:
    """Write ``img`` to ``path``; return where things went (offsets for hostile edits)."""
    bs = img.block_size
    ratio = img.chunk_ratio
    payload = -(-img.size // bs)
    if img.parent is not None:
        entries = -(-payload // ratio) * (ratio + 1)
    else:
        entries = payload + (payload - 1) // ratio if payload else 0
    bat_offset = 2 * MiB
    bat_length = img.bat_length_override or -(-max(entries * 8, 1) // MiB) * MiB
    meta_offset = bat_offset + bat_length
    data = meta_offset + MiB
    bat = [0] * entries
    chunks_with_bitmaps: dict[int, int] = {}
    content: list[tuple[int, bytes]] = []
    for block, payload_bytes in sorted(img.blocks.items()):
        bat[img.bat_index(block)] = data | S.PAYLOAD_BLOCK_FULLY_PRESENT
        content.append((data, payload_bytes))
        data += bs
    for block, (payload_bytes, bits) in sorted(img.partial.items()):
        chunk = block // ratio
        if chunk not in chunks_with_bitmaps:
            chunks_with_bitmaps[chunk] = data
            bat[chunk * (ratio + 1) + ratio] = data | S.SB_BLOCK_PRESENT
            data += MiB
        per_block = bs // img.sector // 8
        content.append((chunks_with_bitmaps[chunk] + (block % ratio) * per_block, bits))
        bat[img.bat_index(block)] = data | S.PAYLOAD_BLOCK_PARTIALLY_PRESENT
        content.append((data, payload_bytes))
        data += bs
    for block, state in img.states.items():
        bat[img.bat_index(block)] = state
    for index, raw in img.bat_override.items():
        bat[index] = raw
    items = [
        (S.FILE_PARAMETERS, 4,
         struct.pack("<II", img.block_size_override or bs, 2 if img.parent is not None else 0)),
        (S.VIRTUAL_DISK_SIZE, 6, struct.pack("<Q", img.virtual_size_override or img.size)),
        (S.PAGE83_DATA, 6, uuid.uuid4().bytes_le),
        (S.LOGICAL_SECTOR_SIZE, 6, struct.pack("<I", img.sector)),
        (S.PHYSICAL_SECTOR_SIZE, 6, struct.pack("<I", img.physical_sector)),
    ]
    if img.parent is not None:
        items.append((S.PARENT_LOCATOR, 4, parent_locator_bytes(img.parent)))
    items += img.extra_items
    table = bytearray(64 * 1024)
    struct.pack_into("<8sHH", table, 0, b"metadata", 0, len(items))
    body = b""
    for i, (item_id, flags, value) in enumerate(items):
        struct.pack_into("<16sIIII", table, 32 + 32 * i, item_id, 64 * 1024 + len(body),
                         len(value), flags, 0)
        body += value + bytes(-len(value) % 8)
    regions = [(S.BAT_REGION, bat_offset, bat_length, 1), (S.METADATA_REGION, meta_offset, MiB, 1)]
    regions += img.extra_regions
    end = max([data, meta_offset + MiB] + [r[1] + r[2] for r in img.extra_regions])
    with open(path, "wb") as f:
        f.truncate(end)
        f.write(b"vhdxfile" + "test builder".encode("utf-16-le"))
        for slot, seq in ((0, 7), (1, 8)):
            f.seek(S.HEADER_OFFSETS[slot])
            f.write(header_bytes(seq, data_write=img.data_write, log_guid=img.log_guid))
        rt = region_table_bytes(regions)
        for offset in S.REGION_TABLE_OFFSETS:
            f.seek(offset)
            f.write(rt)
        f.seek(MiB)
        f.write(img.log)
        f.seek(bat_offset)
        f.write(struct.pack(f"<{entries}Q", *bat))
        f.seek(meta_offset)
        f.write(bytes(table) + body)
        for at, piece in content:
            f.seek(at)
            f.write(piece)
    return {"bat": bat_offset, "metadata": meta_offset, "data": meta_offset + MiB, "end": end}


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def open_vhdx(path: Path) -> vhdx.VhdxDisk:
    disk = imgbridge.open(path, "vhdx")
    assert isinstance(disk, vhdx.VhdxDisk)
    return disk


def raw_copy(tmp_path: Path, name: str, size: int, runs: list[tuple[int, bytes]]) -> Path:
    return make_sparse_file(tmp_path / name, size, runs)


# ---- CRC-32C --------------------------------------------------------------------------------

def test_crc32c_check_value_and_zero_tail_shortcut() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # RFC 3720's check value
    assert crc32c(b"") == 0

    def slow(data: bytes) -> int:
        c = 0xFFFFFFFF
        for byte in data:
            c ^= byte
            for _ in range(8):
                c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        return c ^ 0xFFFFFFFF

    for head, zeros in ((b"", 5), (b"\x01", 1), (b"abc", 4093), (os.urandom(33), 65503)):
        assert crc32c(head + bytes(zeros)) == slow(head + bytes(zeros))
    first, rest = b"header", b"tail" + bytes(100)
    assert crc32c(rest, crc32c(first)) == crc32c(first + rest)


# ---- round trips through our writer ---------------------------------------------------------

@pytest.mark.parametrize("options", [
    {}, {"subformat": "fixed"}, {"block_size": "1M"}, {"subformat": "fixed", "block_size": "2M"},
    {"block_state_zero": "off", "block_size": "4M"}, {"log_size": "2M"},
])
def test_write_then_read_back(tmp_path: Path, options: dict[str, str]) -> None:
    size = 13 * MiB + 3 * 512  # not a multiple of any block size
    src = raw_copy(tmp_path, "src.raw", size, [
        (0, _pattern(1, 4096)), (MiB + 17, _pattern(2, 70000)), (5 * MiB, bytes(MiB)),
        (9 * MiB - 512, _pattern(3, MiB + 1024)), (size - 700, b"end!" * 175)])
    out = tmp_path / "out.vhdx"
    imgbridge.convert(src, out, format="raw", options=options)
    with open_vhdx(out) as disk:
        assert disk.size == size
        assert disk.read_at(0, size) == src.read_bytes()
        assert disk.check().exit_code == 0
        info = disk.info()
        assert info["format"] == "vhdx"
        assert info["cluster-size"] == disk.block_size
        specific = info["format-specific"]["data"]
        assert specific["subformat"] == options.get("subformat", "dynamic")
        assert specific["log"] == "empty"
        if "block_size" in options:
            assert disk.block_size == int(options["block_size"][:-1]) * MiB
        else:
            assert disk.block_size == 8 * MiB  # qemu-img's default up to 1 GiB
        if options.get("subformat") != "fixed":
            # 4 KiB of zeros written at 5 MiB got no block; the blocks with data did.
            zero_state = S.PAYLOAD_BLOCK_NOT_PRESENT if options.get("block_state_zero") == "off" \
                else S.PAYLOAD_BLOCK_ZERO
            states = [disk.bat_entry(disk.bat_index(b)) & 7 for b in range(disk.payload_blocks)]
            assert set(states) <= {zero_state, S.PAYLOAD_BLOCK_FULLY_PRESENT}
            expect_blocks = {b for b in range(disk.payload_blocks)
                             if any(o // disk.block_size <= b <= (o + len(d) - 1) // disk.block_size
                                    for o, d in ((0, b"x" * 4096), (MiB + 17, b"x" * 70000),
                                                 (9 * MiB - 512, b"x" * (MiB + 1024)),
                                                 (size - 700, b"x" * 700)))}
            assert {b for b, s in enumerate(states) if s == 6} == expect_blocks


def test_empty_and_tiny_disks(tmp_path: Path) -> None:
    for size in (0, 512, 1000):
        src = raw_copy(tmp_path, f"s{size}.raw", size, [])
        out = tmp_path / f"s{size}.vhdx"
        imgbridge.convert(src, out, format="raw")
        with open_vhdx(out) as disk:
            assert disk.size == -(-size // 512) * 512  # rounded up to a sector, like qemu-img
            assert disk.read_at(0, disk.size) == bytes(disk.size)
            assert list(disk.extents()) == ([] if size == 0 else [
                Extent(0, disk.size, ExtentKind.ZERO, 0, True, None)])


def test_dynamic_file_holds_only_the_data(tmp_path: Path) -> None:
    src = raw_copy(tmp_path, "big.raw", 512 * MiB, [(300 * MiB, _pattern(4, MiB))])
    out = tmp_path / "big.vhdx"
    imgbridge.convert(src, out, format="raw", options={"block_size": "1M"})
    # header section + log + BAT + metadata + one block
    assert out.stat().st_size == 5 * MiB
    with open_vhdx(out) as disk:
        assert [(e.offset, e.length, e.kind) for e in disk.extents()] == [
            (0, 300 * MiB, ExtentKind.ZERO), (300 * MiB, MiB, ExtentKind.DATA),
            (301 * MiB, 211 * MiB, ExtentKind.ZERO)]


def test_sector_bitmap_entries_stay_empty_past_a_chunk(tmp_path: Path) -> None:
    # With 1 MiB blocks a chunk is 4096 blocks: BAT entry 4096 is a sector bitmap entry,
    # which a dynamic image must leave NOT_PRESENT while the payload entries around it are ZERO.
    size = 4097 * MiB
    src = raw_copy(tmp_path, "wide.raw", size, [(4096 * MiB + 5, b"last block")])
    out = tmp_path / "wide.vhdx"
    imgbridge.convert(src, out, format="raw", options={"block_size": "1M"})
    with open_vhdx(out) as disk:
        assert disk.chunk_ratio == 4096 and disk.bat_entries == 4098
        assert disk.bat_entry(4095) == S.PAYLOAD_BLOCK_ZERO
        assert disk.bat_entry(4096) == 0
        assert disk.bat_entry(4097) & 7 == S.PAYLOAD_BLOCK_FULLY_PRESENT
        assert disk.read_at(4096 * MiB, 16) == bytes(5) + b"last block" + bytes(1)
        assert disk.check().exit_code == 0


@pytest.mark.parametrize(("key", "value", "message"), [
    ("subformat", "differencing", "subformat must be dynamic or fixed"),
    ("block_size", "3M", "power of two"),
    ("block_size", "512M", "power of two"),
    ("block_size", "lots", "must be a size"),
    ("log_size", "1536K", "multiple of 1M"),
    ("block_state_zero", "maybe", "on or off"),
])
def test_bad_create_options_are_refused(tmp_path: Path, key: str, value: str,
                                        message: str) -> None:
    src = raw_copy(tmp_path, "s.raw", MiB, [])
    with pytest.raises(InvalidInputError, match=message):
        imgbridge.convert(src, tmp_path / "o.vhdx", format="raw", options={key: value})
    assert not (tmp_path / "o.vhdx").exists()


@pytest.mark.parametrize(("text", "value"), [
    ("1M", MiB), ("2048k", 2 * MiB), ("33554432", 32 * MiB), ("0.25G", 256 * MiB),
])
def test_size_options_take_qemu_sizes(text: str, value: int) -> None:
    """block_size and log_size go through the shared qemu-style parser."""
    assert vhdx.writer.parse_size(text, "block_size") == value


def test_probe_needs_the_signature() -> None:
    assert vhdx.probe(ProbeInput(b"vhdxfile" + bytes(100), b"", "x.img", 1 << 20)) == 100
    assert vhdx.probe(ProbeInput(b"vhdxfilf" + bytes(100), b"", "x.vhdx", 1 << 20)) == 0
    assert vhdx.probe(ProbeInput(b"", b"", "dir", 0, frozenset())) == 0


def test_detected_without_a_format(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    build(path, Image(4 * MiB, blocks={1: _pattern(5, MiB)}))
    info = imgbridge.inspect(path)
    assert info["format"] == "vhdx" and info["virtual-size"] == 4 * MiB


# ---- the builder's images read as built ------------------------------------------------------

def test_builder_image_reads_with_states(tmp_path: Path) -> None:
    path = tmp_path / "s.vhdx"
    build(path, Image(6 * MiB, blocks={0: _pattern(1, MiB), 4: _pattern(2, MiB)},
                      states={1: S.PAYLOAD_BLOCK_ZERO, 2: S.PAYLOAD_BLOCK_UNMAPPED,
                              3: S.PAYLOAD_BLOCK_UNDEFINED}))
    with open_vhdx(path) as disk:
        assert disk.read_at(0, 6 * MiB) == _pattern(1, MiB) + bytes(3 * MiB) + \
            _pattern(2, MiB) + bytes(MiB)
        kinds = [(r.offset // MiB, r.length // MiB, r.state) for r in disk.layer_runs()]
        assert kinds == [(0, 1, BlockState.DATA), (1, 1, BlockState.ZERO),
                         (2, 2, BlockState.UNALLOCATED), (4, 1, BlockState.DATA),
                         (5, 1, BlockState.UNALLOCATED)]
        assert disk.check().exit_code == 0


def test_4k_logical_sectors(tmp_path: Path) -> None:
    path = tmp_path / "4k.vhdx"
    build(path, Image(8 * MiB, sector=4096, blocks={7: _pattern(6, MiB)}))
    with open_vhdx(path) as disk:
        assert disk.logical_sector_size == 4096
        assert disk.chunk_ratio == (1 << 23) * 4096 // MiB
        assert disk.read_at(7 * MiB, MiB) == _pattern(6, MiB)
        assert disk.info()["format-specific"]["data"]["logical-sector-size"] == 4096


# ---- hostile input: one clear error, nothing allocated ---------------------------------------

def _simple(tmp_path: Path, name: str = "h.vhdx") -> tuple[Path, dict[str, int]]:
    path = tmp_path / name
    where = build(path, Image(8 * MiB, blocks={2: _pattern(7, MiB)}))
    return path, where


def test_truncated_files(tmp_path: Path) -> None:
    path, where = _simple(tmp_path)
    whole = path.read_bytes()
    for cut in (4, 100_000, 300_000, where["metadata"] + 1000):
        path.write_bytes(whole[:cut])
        with pytest.raises(InvalidImageError) as err:
            imgbridge.open(path, "vhdx")
        assert "vhdx" in str(err.value) or "truncated" in str(err.value)
    # Cut inside the data: opening works, reading the block says where and why.
    path.write_bytes(whole[:where["data"] + 4096])
    with open_vhdx(path) as disk:
        with pytest.raises(InvalidImageError, match=r"past the end .*truncated"):
            disk.read_at(2 * MiB, 10)
        report = disk.check()
        assert report.exit_code == 2 and "past the end" in " ".join(report.messages)


def test_not_a_vhdx(tmp_path: Path) -> None:
    path = tmp_path / "x.vhdx"
    path.write_bytes(b"x" * MiB)
    with pytest.raises(InvalidImageError, match="vhdxfile"):
        imgbridge.open(path, "vhdx")


def test_bad_header_crc_falls_back_to_the_other_header(tmp_path: Path) -> None:
    path, _ = _simple(tmp_path)
    patch(path, S.HEADER_OFFSETS[1] + 100, b"\xff")  # header 2 (the current one) is damaged
    with open_vhdx(path) as disk:
        assert disk.header.slot == 0 and disk.header.sequence_number == 7
        assert disk.read_at(2 * MiB, MiB) == _pattern(7, MiB)
        report = disk.check()
        assert report.exit_code == 2
        assert any("header 2 is damaged (CRC-32C mismatch)" in m for m in report.messages)


def test_both_headers_bad(tmp_path: Path) -> None:
    path, _ = _simple(tmp_path)
    patch(path, S.HEADER_OFFSETS[0] + 8, b"\x01")
    patch(path, S.HEADER_OFFSETS[1], b"HEAD")
    with pytest.raises(InvalidImageError, match=r"no valid header \(header 1: CRC-32C mismatch; "
                       r"header 2: bad signature\)"):
        imgbridge.open(path, "vhdx")


def test_equal_sequence_numbers_must_mean_equal_headers(tmp_path: Path) -> None:
    path, _ = _simple(tmp_path)
    guid = uuid.uuid4().bytes_le
    patch(path, S.HEADER_OFFSETS[0], header_bytes(9, data_write=guid))
    patch(path, S.HEADER_OFFSETS[1], header_bytes(9, data_write=uuid.uuid4().bytes_le))
    with pytest.raises(InvalidImageError, match="both headers have sequence number 9"):
        imgbridge.open(path, "vhdx")


def test_region_table_copy_one_damaged(tmp_path: Path) -> None:
    path, _ = _simple(tmp_path)
    patch(path, S.REGION_TABLE_OFFSETS[0] + 20, b"\x99")
    with open_vhdx(path) as disk:
        assert disk.read_at(2 * MiB, 4) == _pattern(7, 4)
        assert any("region table copy 1 is damaged" in m for m in disk.check().messages)
    patch(path, S.REGION_TABLE_OFFSETS[1] + 20, b"\x99")
    with pytest.raises(InvalidImageError, match="no valid region table"):
        imgbridge.open(path, "vhdx")


def _with_regions(path: Path, regions: list[tuple[bytes, int, int, int]]) -> None:
    table = region_table_bytes(regions)
    for offset in S.REGION_TABLE_OFFSETS:
        patch(path, offset, table)


@pytest.mark.parametrize(("regions", "error"), [
    (lambda w: [(S.BAT_REGION, w["bat"], MiB, 1), (S.METADATA_REGION, w["bat"], MiB, 1)],
     "overlaps the BAT region"),
    (lambda w: [(S.BAT_REGION, MiB, MiB, 1), (S.METADATA_REGION, w["metadata"], MiB, 1)],
     "BAT region overlaps the log"),
    (lambda w: [(S.BAT_REGION, w["bat"], MiB, 1), (S.METADATA_REGION, 1 << 40, MiB, 1)],
     "past the end"),
    (lambda w: [(S.BAT_REGION, w["bat"] + 4096, MiB, 1),
                (S.METADATA_REGION, w["metadata"], MiB, 1)],
     "not a 1 MiB multiple"),
    (lambda w: [(S.BAT_REGION, 0, MiB, 1), (S.METADATA_REGION, w["metadata"], MiB, 1)],
     "past the header section"),
    (lambda w: [(S.METADATA_REGION, w["metadata"], MiB, 1)], "no BAT region"),
    (lambda w: [(S.BAT_REGION, w["bat"], MiB, 1), (S.BAT_REGION, w["bat"], MiB, 1),
                (S.METADATA_REGION, w["metadata"], MiB, 1)], "appears twice"),
])
def test_bad_regions(tmp_path: Path, regions, error: str) -> None:  # type: ignore[no-untyped-def]
    path, where = _simple(tmp_path)
    _with_regions(path, regions(where))
    with pytest.raises(InvalidImageError, match=error):
        imgbridge.open(path, "vhdx")


def test_unknown_regions(tmp_path: Path) -> None:
    path = tmp_path / "r.vhdx"
    strange = uuid.uuid4().bytes_le
    build(path, Image(4 * MiB, extra_regions=[(strange, 8 * MiB, MiB, 0)]))
    with open_vhdx(path) as disk:  # an unknown optional region is skipped
        assert disk.read_at(0, 4) == bytes(4)
    build(path, Image(4 * MiB, extra_regions=[(strange, 8 * MiB, MiB, 1)]))
    with pytest.raises(UnsupportedFeatureError, match=f"region {uuid.UUID(bytes_le=strange)} "
                       "is marked required"):
        imgbridge.open(path, "vhdx")


def test_unknown_metadata_items(tmp_path: Path) -> None:
    path = tmp_path / "m.vhdx"
    strange = uuid.uuid4().bytes_le
    build(path, Image(4 * MiB, extra_items=[(strange, 0, b"hello")]))
    with open_vhdx(path) as disk:
        assert any("unknown optional metadata item" in n for n in disk.check().notes)
    build(path, Image(4 * MiB, extra_items=[(strange, S.META_IS_REQUIRED, b"hello")]))
    with pytest.raises(UnsupportedFeatureError, match=r"metadata item .* is marked required"):
        imgbridge.open(path, "vhdx")


@pytest.mark.parametrize(("change", "error"), [
    ({"virtual_size_override": 1 << 60}, "exceeds the 64 TiB"),
    ({"virtual_size_override": 4 * MiB + 100}, "not a multiple of the 512-byte sector"),
    ({"block_size_override": 3 * MiB}, "block size 3145728 is not a power of two"),
    ({"block_size_override": 512 * MiB}, "not a power of two from 1 MiB to 256 MiB"),
    ({"block_size_override": 4096}, "not a power of two from 1 MiB"),
    ({"sector": 1024}, "logical sector size 1024"),
    # 60 TiB with 1 MiB blocks needs a 480 MiB BAT; the region is 1 MiB.
    ({"virtual_size_override": 60 << 40}, "BAT region .* is too small"),
])
def test_absurd_sizes_are_refused_before_allocating(tmp_path: Path, change: dict[str, int],
                                                    error: str) -> None:
    path = tmp_path / "a.vhdx"
    build(path, Image(4 * MiB, **change))  # type: ignore[arg-type]
    with pytest.raises(InvalidImageError, match=error):
        imgbridge.open(path, "vhdx")


def test_bat_entries_that_point_wrong(tmp_path: Path) -> None:
    path = tmp_path / "b.vhdx"
    where = build(path, Image(8 * MiB, blocks={0: _pattern(1, MiB)}, bat_override={
        1: (1 << 40) | 6,  # past the end of the file
        3: MiB | 6,  # inside the log
        4: 0x1000 | 2,  # reserved bits set (a ZERO block: still reads as zero)
        5: 7,  # partially present in a dynamic image
        6: 4,  # reserved state
    }))
    with open_vhdx(path) as disk:
        assert disk.read_at(0, MiB) == _pattern(1, MiB)
        with pytest.raises(InvalidImageError, match=r"payload block 1 .* past the end of the"):
            disk.read_at(MiB, 1)
        with pytest.raises(InvalidImageError, match="payload block 3 at 0x100000 overlaps the log"):
            disk.read_at(3 * MiB, 1)
        assert disk.read_at(4 * MiB, 8) == bytes(8)
        with pytest.raises(InvalidImageError, match="PARTIALLY_PRESENT, invalid in a non-diff"):
            disk.read_at(5 * MiB, 1)
        with pytest.raises(InvalidImageError, match="reserved state 4"):
            disk.read_at(6 * MiB, 1)
        report = disk.check()
        text = "\n".join(report.messages)
        assert report.exit_code == 2 and report.corruptions == 5, text
        for needle in ("BAT entry 1 (payload block 1) at 0x10000000000 ends past the end",
                       "BAT entry 3 (payload block 3) at 0x100000 overlaps the log",
                       "BAT entry 4 has reserved bits set", "BAT entry 5 (payload block 5) is "
                       "PARTIALLY_PRESENT in a dynamic image", "has reserved state 4"):
            assert needle in text
    # Every error line names the file and the offset of the BAT entry.
    with open_vhdx(path) as disk, pytest.raises(InvalidImageError) as err:
        disk.read_at(MiB, 1)
    assert err.value.offset == where["bat"] + 8 and err.value.path == str(path)


def test_overlapping_blocks_and_stray_bitmaps(tmp_path: Path) -> None:
    path = tmp_path / "o.vhdx"
    where = build(path, Image(4 * MiB, blocks={0: _pattern(1, MiB)}))
    data = where["data"]
    with open(path, "r+b") as f:
        f.seek(where["bat"] + 8)  # block 1 at the same place as block 0
        f.write(struct.pack("<Q", data | 6))
    with open_vhdx(path) as disk:
        assert disk.read_at(MiB, 16) == _pattern(1, 16)  # reads what the entry says
        report = disk.check()
        assert report.corruptions == 1
        assert "payload block 0) and BAT entry 1 (payload block 1) overlap" in report.messages[0]
    # A sector bitmap entry that is present in a dynamic image breaks the spec's rule.
    path2 = tmp_path / "sb.vhdx"
    ratio = (1 << 23) * 512 // (256 * MiB)  # 16: entry 16 is the first bitmap entry
    build(path2, Image(17 * 256 * MiB, block_size=256 * MiB,
                       bat_override={ratio: (2 * 256 * MiB) | 6}))
    with open_vhdx(path2) as disk:
        assert disk.read_at(0, 4) == bytes(4)
        assert "sector bitmap of chunk 0) is present in a dynamic image" in \
            "\n".join(disk.check().messages)


# ---- differencing images ----------------------------------------------------------------------

def _parent(tmp_path: Path, name: str = "parent.vhdx") -> tuple[Path, bytes, bytes]:
    guid = uuid.uuid4().bytes_le
    content = _pattern(20, 8 * MiB)
    path = tmp_path / name
    build(path, Image(8 * MiB, blocks={b: content[b * MiB:(b + 1) * MiB] for b in range(8)},
                      data_write=guid))
    return path, guid, content


def _linkage(guid: bytes) -> str:
    return "{" + str(uuid.UUID(bytes_le=guid)).upper() + "}"


def test_differencing_reads_through_the_parent(tmp_path: Path) -> None:
    parent, guid, base = _parent(tmp_path)
    bits = bytearray(MiB // 512 // 8)  # block 3: sectors 0-7 and 100-299 here, rest parent
    bits[0] = 0xFF
    for sector in range(100, 300):
        bits[sector // 8] |= 1 << (sector % 8)
    child_data = _pattern(30, MiB)
    child = tmp_path / "child.vhdx"
    build(child, Image(8 * MiB, blocks={1: _pattern(31, MiB)},
                       partial={3: (child_data, bytes(bits))},
                       states={5: S.PAYLOAD_BLOCK_ZERO, 6: S.PAYLOAD_BLOCK_UNMAPPED},
                       parent={"parent_linkage": _linkage(guid),
                               "relative_path": ".\\parent.vhdx",
                               "absolute_win32_path": "C:\\images\\parent.vhdx"}))
    expected = bytearray(base)
    expected[MiB:2 * MiB] = _pattern(31, MiB)
    for sector in list(range(8)) + list(range(100, 300)):
        at = 3 * MiB + sector * 512
        expected[at:at + 512] = child_data[sector * 512:(sector + 1) * 512]
    expected[5 * MiB:6 * MiB] = bytes(MiB)
    with open_vhdx(child) as disk:
        assert disk.read_at(0, 8 * MiB) == bytes(expected)
        assert disk.backing is not None and disk.backing.filename == str(parent)
        info = disk.info()
        assert info["backing-filename"] == "parent.vhdx"
        assert info["format-specific"]["data"]["subformat"] == "differencing"
        runs = [(r.offset, r.length, r.state) for r in disk.layer_runs(3 * MiB, MiB)]
        assert runs == [(3 * MiB, 8 * 512, BlockState.DATA),
                        (3 * MiB + 4096, 92 * 512, BlockState.UNALLOCATED),
                        (3 * MiB + 100 * 512, 200 * 512, BlockState.DATA),
                        (3 * MiB + 300 * 512, MiB - 300 * 512, BlockState.UNALLOCATED)]
        assert disk.check().exit_code == 0
    flat = tmp_path / "flat.raw"
    imgbridge.convert(child, flat, format="vhdx", output_format="raw")
    assert flat.read_bytes() == bytes(expected)


def test_differencing_parent_problems(tmp_path: Path) -> None:
    _, guid, _ = _parent(tmp_path)
    child = tmp_path / "child.vhdx"
    locator = {"parent_linkage": _linkage(uuid.uuid4().bytes_le), "relative_path": "parent.vhdx"}
    build(child, Image(8 * MiB, parent=locator))
    with pytest.raises(InvalidImageError, match=r"parent 'parent\.vhdx' does not match"):
        imgbridge.open(child, "vhdx")
    build(child, Image(8 * MiB, parent={"parent_linkage": _linkage(guid),
                                        "relative_path": "gone.vhdx"}))
    with pytest.raises(MissingCompanionError, match="parent disk not found"):
        imgbridge.open(child, "vhdx")
    # A parent outside the image's folder needs the caller's consent.
    inner = tmp_path / "inner"
    inner.mkdir()
    build(inner / "child.vhdx", Image(8 * MiB, parent={"parent_linkage": _linkage(guid),
                                                       "relative_path": "..\\parent.vhdx"}))
    with pytest.raises(MissingCompanionError, match="outside the image's folder"):
        imgbridge.open(inner / "child.vhdx", "vhdx")
    with imgbridge.open(inner / "child.vhdx", "vhdx", allow_outside=True) as disk:
        assert disk.backing is not None
    # has_parent without a locator, and a locator of another type.
    build(child, Image(8 * MiB, parent={"parent_linkage": _linkage(guid)}))
    with pytest.raises(MissingCompanionError, match="tried nothing"):
        imgbridge.open(child, "vhdx")
    raw = parent_locator_bytes({"parent_linkage": _linkage(guid)})
    img = Image(8 * MiB, parent={"x": "y"})
    img.extra_items = []
    where = build(child, img)
    with open(child, "r+b") as f:
        f.seek(where["metadata"] + 64 * 1024 + 48)  # the locator item follows 48 bytes of items
        f.write(uuid.uuid4().bytes_le + raw[16:])
    with pytest.raises(UnsupportedFeatureError, match="parent locator type"):
        imgbridge.open(child, "vhdx")


def test_partially_present_needs_its_bitmap(tmp_path: Path) -> None:
    _, guid, _ = _parent(tmp_path)
    child = tmp_path / "child.vhdx"
    ratio = (1 << 23) * 512 // MiB
    build(child, Image(8 * MiB, partial={2: (_pattern(1, MiB), b"\xff" * 256)},
                       bat_override={ratio: 0},
                       parent={"parent_linkage": _linkage(guid), "relative_path": "parent.vhdx"}))
    with open_vhdx(child) as disk:
        with pytest.raises(InvalidImageError, match="sector bitmap of chunk 0 is not"):
            disk.read_at(2 * MiB, 1)
        assert "its chunk's sector bitmap is not present" in "\n".join(disk.check().messages)


# ---- the log ----------------------------------------------------------------------------------

def log_entry(seq: int, guid: bytes, writes: list[tuple[int, bytes | int]], *, tail: int = 0,
              flushed: int = 0, last: int = 0, corrupt: bool = False) -> bytes:
    """One log entry: data writes (4 KiB sectors) and zero writes (lengths)."""
    count = len(writes)
    desc_sectors = S.descriptor_sectors(count)
    data = [w for w in writes if isinstance(w[1], bytes)]
    total = (desc_sectors + len(data)) * 4096
    buf = bytearray(desc_sectors * 4096)
    struct.pack_into("<4sIIIQII16sQQ", buf, 0, b"loge", 0, total, tail, seq, count, 0, guid,
                     flushed, last)
    sectors = b""
    for i, (offset, what) in enumerate(writes):
        at = 64 + 32 * i
        if isinstance(what, bytes):
            struct.pack_into("<4s4s8sQQ", buf, at, b"desc", what[4092:], what[:8], offset, seq)
            sectors += struct.pack("<4sI", b"data", seq >> 32) + what[8:4092] + \
                struct.pack("<I", seq & 0xFFFFFFFF)
        else:
            struct.pack_into("<4sIQQQ", buf, at, b"zero", 0, what, offset, seq)
    whole = bytearray(bytes(buf) + sectors)
    crc = crc32c(bytes(whole))
    struct.pack_into("<I", whole, 4, crc ^ (1 if corrupt else 0))
    return bytes(whole)


def _bat_sector_with(where: dict[str, int], entries: dict[int, int]) -> bytes:
    sector = bytearray(4096)
    for index, value in entries.items():
        struct.pack_into("<Q", sector, index * 8, value)
    return bytes(sector)


def test_pending_log_is_replayed_in_memory_only(tmp_path: Path) -> None:
    path = tmp_path / "log.vhdx"
    guid = uuid.uuid4().bytes_le
    img = Image(8 * MiB, blocks={0: _pattern(1, MiB), 1: _pattern(2, MiB)}, log_guid=guid)
    where = build(path, img)
    data = where["data"]
    # The log says: block 1 is gone (ZERO), block 5 now holds what block 1 held, and the
    # first 4 KiB of block 0 are zero.
    new_bat = _bat_sector_with(where, {0: data | 6, 1: 2, 5: (data + MiB) | 6})
    entry = log_entry(1, guid, [(where["bat"], new_bat), (data, 4096)],
                      flushed=where["end"], last=where["end"])
    img.log = entry
    build(path, img)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with open_vhdx(path) as disk:
        assert disk.read_at(0, 4096) == bytes(4096)
        assert disk.read_at(4096, MiB - 4096) == _pattern(1, MiB)[4096:]
        assert disk.read_at(MiB, MiB) == bytes(MiB)
        assert disk.read_at(5 * MiB, MiB) == _pattern(2, MiB)
        status = disk.info()["format-specific"]["data"]["log"]
        assert status.startswith("replayed in memory (1 entry")
        report = disk.check()
        assert report.exit_code == 0 and any("replayed in memory" in n for n in report.notes)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_log_sequences_and_damaged_entries(tmp_path: Path) -> None:
    path = tmp_path / "seq.vhdx"
    guid = uuid.uuid4().bytes_le
    img = Image(8 * MiB, blocks={0: _pattern(1, MiB)}, log_guid=guid)
    where = build(path, img)
    data = where["data"]
    bat = where["bat"]
    e1 = log_entry(5, guid, [(bat, _bat_sector_with(where, {0: data | 6, 2: (data) | 6}))])
    e2 = log_entry(6, guid, [(bat, _bat_sector_with(where, {0: data | 6, 3: data | 6}))])
    # A sequence of two whose head's tail points at its first entry: both are replayed, the
    # second last, so block 3 (not block 2) maps to the data.
    e2_tail = log_entry(6, guid, [(bat, _bat_sector_with(where, {0: data | 6, 3: data | 6}))],
                        tail=0)
    img.log = e1 + e2_tail
    build(path, img)
    with open_vhdx(path) as disk:
        assert disk.read_at(3 * MiB, 8) == _pattern(1, 8)
        assert disk.read_at(2 * MiB, 8) == bytes(8)
        assert disk.replay.sequence_numbers == (5, 6)
    # The head's tail points at itself: only the head is replayed (the older one was applied).
    img.log = e1 + log_entry(6, guid, [(bat, _bat_sector_with(where, {0: data | 6}))],
                             tail=len(e1))
    build(path, img)
    with open_vhdx(path) as disk:
        assert disk.replay.sequence_numbers == (6, 6)
        assert disk.read_at(2 * MiB, 8) == bytes(8)
    # A damaged CRC, a foreign log GUID, or a tail outside the sequence: nothing to replay.
    for log in (log_entry(1, guid, [(bat, bytes(4096))], corrupt=True),
                log_entry(1, uuid.uuid4().bytes_le, [(bat, bytes(4096))]),
                e2[:0] + log_entry(1, guid, [(bat, bytes(4096))], tail=8192)):
        img.log = log
        build(path, img)
        with open_vhdx(path) as disk:
            assert disk.read_at(0, 8) == _pattern(1, 8)
            assert disk.info()["format-specific"]["data"]["log"].startswith("no valid entries")
    # The newest sequence wins over an older one elsewhere in the log.
    old = log_entry(3, guid, [(bat, _bat_sector_with(where, {0: data | 6, 6: data | 6}))])
    new = log_entry(9, guid, [(bat, _bat_sector_with(where, {0: data | 6, 7: data | 6}))],
                    tail=len(old))
    img.log = old + new
    build(path, img)
    with open_vhdx(path) as disk:
        assert disk.read_at(7 * MiB, 8) == _pattern(1, 8)
        assert disk.read_at(6 * MiB, 8) == bytes(8)


def test_log_that_says_the_file_was_longer(tmp_path: Path) -> None:
    path = tmp_path / "short.vhdx"
    guid = uuid.uuid4().bytes_le
    img = Image(4 * MiB, log_guid=guid)
    where = build(path, img)
    img.log = log_entry(1, guid, [(where["bat"], bytes(4096))], flushed=where["end"] + MiB)
    build(path, img)
    with pytest.raises(InvalidImageError, match="the log says the file was"):
        imgbridge.open(path, "vhdx")


def test_huge_pending_log_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "hl.vhdx"
    guid = uuid.uuid4().bytes_le
    where = build(path, Image(4 * MiB))
    with open(path, "r+b") as f:
        f.truncate(where["end"] + 64 * MiB)
    log_offset = where["end"]
    for slot, seq in ((0, 20), (1, 21)):
        patch(path, S.HEADER_OFFSETS[slot],
              header_bytes(seq, data_write=bytes(16), log_guid=guid, log_offset=log_offset,
                           log_length=64 * MiB))
    with pytest.raises(UnsupportedFeatureError, match=r"log .*64 MiB.* must be replayed"):
        imgbridge.open(path, "vhdx")


# ---- the CLI --------------------------------------------------------------------------------

def test_cli_inspect_check_and_errors(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    path, _ = _simple(tmp_path, "c.vhdx")
    result = cli("inspect", "--json", path)
    assert result.code == 0 and '"cluster-size": 1048576' in result.out
    assert cli("check", path).code == 0
    patch(path, S.HEADER_OFFSETS[0] + 99, b"\x42")
    result = cli("check", path)
    assert result.code == 2 and "header 1 is damaged" in result.out + result.err
    patch(path, S.HEADER_OFFSETS[1] + 99, b"\x42")
    result = cli("inspect", path)
    assert result.code == 1
    assert result.err.count("\n") == 1 and "no valid header" in result.err
    assert "Traceback" not in result.err
