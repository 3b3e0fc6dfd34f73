"""qcow2 check and repair on images built here byte by byte (no QEMU needed).

The builder lays out the smallest sound image — header, refcount table, one refcount block,
L1 table, L2 table, data clusters — so each test can break exactly one thing. The same checks
on images QEMU made, and QEMU's verdict on ours, are in tests/interop/test_qcow2_check_interop.py.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import CliResult
from hypothesis import given, settings
from hypothesis import strategies as st
from imgbridge.formats.disk.qcow2 import _structs as S
from imgbridge.formats.disk.qcow2.check import _Budget, _ClusterCounts, _Codec

import imgbridge
from imgbridge.errors import InvalidImageError

Cli = Callable[..., CliResult]
COPIED = S.L2E_COPIED


@dataclass
class Layout:
    """Where the builder put things (cluster indexes) and the refcounts it stored."""

    path: Path
    cs: int
    order: int
    l1: int
    l2: int
    data: list[int]
    refcounts: dict[int, int] = field(default_factory=dict)

    def offset(self, cluster: int) -> int:
        return cluster * self.cs

    def patch(self, offset: int, data: bytes) -> None:
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(data)

    def set_l1(self, index: int, entry: int) -> None:
        self.patch(self.offset(self.l1) + 8 * index, struct.pack(">Q", entry))

    def set_l2(self, index: int, entry: int) -> None:
        self.patch(self.offset(self.l2) + 8 * index, struct.pack(">Q", entry))

    def set_refcount(self, cluster: int, value: int) -> None:
        codec = _Codec(self.order, self.cs)
        with open(self.path, "r+b") as f:
            f.seek(2 * self.cs)
            block = codec.decode(f.read(self.cs))
            block[cluster] = value
            f.seek(2 * self.cs)
            f.write(codec.encode(block))


def build(path: Path, *, cluster_bits: int = 16, order: int = 4, data: int = 3,
          l1_entries: int = 1, size: int = 64 << 20, version: int = 3) -> Layout:
    """A sound image: cluster 0 header, 1 refcount table, 2 refcount block, then the L1
    table (``l1_entries`` entries, entry 0 used), one L2 table and ``data`` data clusters
    mapped at guest clusters 0, 1, 2, ..."""
    cs = 1 << cluster_bits
    l1_entries = max(l1_entries, -(-size // (cs * cs // 8)))
    l1_clusters = max(1, -(-8 * l1_entries // cs))
    l1 = 3
    l2 = l1 + l1_clusters
    data_clusters = [l2 + 1 + i for i in range(data)]
    end = l2 + 1 + data
    header = S.Header(
        version=version, backing_file_offset=0, backing_file_size=0, cluster_bits=cluster_bits,
        size=size, crypt_method=0, l1_size=l1_entries, l1_table_offset=l1 * cs,
        refcount_table_offset=cs, refcount_table_clusters=1, nb_snapshots=0,
        snapshots_offset=0, refcount_order=order,
        header_length=S.HEADER_V3_LENGTH if version == 3 else S.HEADER_V2_LENGTH)
    image = bytearray(end * cs)
    image[:header.header_length] = header.pack()
    image[cs:cs + 8] = struct.pack(">Q", 2 * cs)
    codec = _Codec(order, cs)
    refcounts = {c: 1 for c in range(end)}
    block = codec.zeros(codec.per_block)
    for c, n in refcounts.items():
        block[c] = n
    image[2 * cs:3 * cs] = codec.encode(block)
    image[l1 * cs:l1 * cs + 8] = struct.pack(">Q", COPIED | l2 * cs)
    for i, c in enumerate(data_clusters):
        image[l2 * cs + 8 * i:l2 * cs + 8 * i + 8] = struct.pack(">Q", COPIED | c * cs)
        image[c * cs:(c + 1) * cs] = bytes([0x41 + i]) * cs
    path.write_bytes(bytes(image))
    return Layout(path, cs, order, l1, l2, data_clusters, refcounts)


def check_json(cli: Cli, path: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    result = cli("check", "--json", *args, path)
    return result.code, json.loads(result.out), result.err


@pytest.fixture
def image(tmp_path: Path) -> Layout:
    return build(tmp_path / "disk.qcow2")


# ---- the refcount codec and the count array ----------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(order=st.integers(0, 6), data=st.data())
def test_codec_round_trips_every_width(order: int, data: st.DataObject) -> None:
    codec = _Codec(order, 512)
    pattern = data.draw(st.lists(st.integers(0, codec.max), min_size=1, max_size=67))
    values = (pattern * codec.per_block)[:codec.per_block]  # a whole block, odd period
    array_values = codec.zeros(codec.per_block)
    for i, v in enumerate(values):
        array_values[i] = v
    raw = codec.encode(array_values)
    assert len(raw) == 512
    assert codec.decode(raw).tolist() == values


@pytest.mark.parametrize(("order", "raw", "expected"), [
    (0, b"\x05", [1, 0, 1, 0, 0, 0, 0, 0]),  # bit 0 is the least significant (the spec's rule)
    (1, b"\x1b", [3, 2, 1, 0]),
    (2, b"\x21", [1, 2]),
    (4, b"\x01\x02", [0x0102]),
    (6, b"\x00\x00\x00\x00\x00\x00\x01\x00", [256]),
])
def test_codec_bit_order(order: int, raw: bytes, expected: list[int]) -> None:
    assert _Codec(order, 512).decode(raw).tolist() == expected


def test_cluster_counts_saturate_and_report_overflow() -> None:
    counts = _ClusterCounts("B", 1, _Budget("x"))
    assert counts.add(70000, 1) == 0
    assert counts.add(70000, 3) == 3  # refcount_bits=1: one reference fits, three do not
    assert counts.get(70000) == 1 and counts.limit == 70001
    assert list(counts.chunks) == [70000 >> 16]  # only the touched chunk exists
    assert counts.slice(69999, 70002).tolist() == [0, 1, 0]
    assert counts.blocks_in_use(4096) == {70000 // 4096}


def test_cluster_counts_refuse_beyond_the_memory_budget() -> None:
    counts = _ClusterCounts("H", 0xFFFF, _Budget("img", limit=3 * (2 << 16)))
    for i in range(3):
        counts.add(i << 16, 1)
    with pytest.raises(InvalidImageError, match="would need more than"):
        counts.add(3 << 16, 1)


# ---- sound images ----------------------------------------------------------------------------

@pytest.mark.parametrize("order", range(7))
@pytest.mark.parametrize("cluster_bits", [9, 16])
def test_built_image_is_clean(cli: Cli, tmp_path: Path, order: int, cluster_bits: int) -> None:
    layout = build(tmp_path / "d.qcow2", cluster_bits=cluster_bits, order=order)
    code, report, err = check_json(cli, layout.path)
    assert code == 0, err
    assert report == {
        "filename": str(layout.path), "format": "qcow2", "check-errors": 0,
        "image-end-offset": (layout.data[-1] + 1) * layout.cs,
        "total-clusters": (64 << 20) // layout.cs, "allocated-clusters": 3,
    }


def test_human_output_is_qemu_like(cli: Cli, image: Layout) -> None:
    result = cli("check", image.path)
    assert result.code == 0
    assert result.out.splitlines() == [
        "No errors were found on the image.",
        "3/1024 = 0.29% allocated, 0.00% fragmented, 0.00% compressed clusters",
        f"Image end offset: {(image.data[-1] + 1) * image.cs}",
    ]


# ---- what a check must find --------------------------------------------------------------------

def test_leak_exit_3_and_details_on_stderr(cli: Cli, image: Layout) -> None:
    image.set_refcount(0, 2)  # the header claims two references
    result = cli("check", image.path)
    assert result.code == 3
    assert "Leaked cluster 0 refcount=2 reference=1" in result.err
    assert result.out.startswith("1 leaked clusters were found on the image.\n"
                                 "This means waste of disk space, but no harm to data.\n")


def test_used_cluster_with_refcount_zero_is_corruption(cli: Cli, image: Layout) -> None:
    image.set_refcount(image.data[0], 0)
    code, report, err = check_json(cli, image.path)
    assert code == 2 and report["corruptions"] == 2  # the refcount, and OFLAG_COPIED with it
    assert f"ERROR cluster {image.data[0]} refcount=0 reference=1" in err
    assert "ERROR OFLAG_COPIED data cluster" in err
    human = cli("check", image.path).out
    assert "2 errors were found on the image.\nData may be corrupted, or further writes to " \
           "the image may corrupt it.\n" in human


def test_reserved_bits_in_l1_and_l2(cli: Cli, image: Layout) -> None:
    image.set_l1(0, COPIED | image.offset(image.l2) | 1 << 60)
    image.set_l2(1, COPIED | image.offset(image.data[1]) | 1 << 57)
    code, _report, err = check_json(cli, image.path)
    assert code == 2
    assert "ERROR found L1 entry with reserved bits set" in err
    assert "ERROR found l2 entry with reserved bits set" in err


def test_misaligned_and_past_the_end_offsets(cli: Cli, image: Layout) -> None:
    image.set_l2(0, COPIED | image.offset(image.data[0]) + 0x200)
    image.set_l2(1, COPIED | 1 << 40)
    code, _report, err = check_json(cli, image.path)
    assert code == 2
    assert "Data cluster is not properly aligned" in err
    assert "exceeding the end of the file by one cluster or more: offset 0x10000000000" in err


def test_l2_table_that_is_also_a_data_cluster(cli: Cli, image: Layout) -> None:
    """Refcounts alone cannot see this overlap when the stored count says 2 (as two
    references would need): the check looks at metadata clusters on their own."""
    image.set_l2(0, image.offset(image.l2))  # data cluster 0 is the L2 table itself
    image.set_refcount(image.l2, 2)
    image.set_refcount(image.data[0], 0)
    image.set_l1(0, image.offset(image.l2))  # refcount 2: no OFLAG_COPIED
    code, _report, err = check_json(cli, image.path)
    assert code == 2
    assert f"ERROR cluster {image.l2} (offset {image.offset(image.l2):#x}) holds an L2 table " \
           "and is also used by other data or metadata (reference=2)" in err


def test_oflag_copied_must_match_refcount_one(cli: Cli, image: Layout) -> None:
    image.set_l2(1, image.offset(image.data[1]))  # refcount 1 but no OFLAG_COPIED
    code, report, err = check_json(cli, image.path)
    assert code == 2 and report["corruptions"] == 1
    assert f"ERROR OFLAG_COPIED data cluster: l2_entry={image.offset(image.data[1]):x} " \
           "refcount=1" in err
    code, report, err = check_json(cli, image.path, "-r", "all")
    assert code == 0 and report["corruptions-fixed"] == 1, err
    assert check_json(cli, image.path)[0] == 0


def test_refcount_block_offset_not_aligned_is_an_error(cli: Cli, image: Layout) -> None:
    image.patch(image.cs, struct.pack(">Q", 2 * image.cs + 0x200))
    code, report, err = check_json(cli, image.path)
    assert code == 1 and report["check-errors"] > 0  # unreadable refcounts, as in qemu-img
    assert "ERROR refcount block 0 is not cluster aligned" in err
    code, report, err = check_json(cli, image.path, "-r", "all")
    assert code == 0, err
    assert check_json(cli, image.path)[0] == 0


def test_refcount_block_beyond_any_file_offset_is_repaired(cli: Cli, image: Layout) -> None:
    """Bit 63 is part of a refcount table entry's offset: a flipped bit there points past
    anything a file can hold. The check reads such a block as zeros (past the end of the
    file); the repair, which reads through its own descriptor, must do the same instead of
    failing with an internal error."""
    image.patch(image.cs, struct.pack(">Q", 1 << 63 | 2 * image.cs))
    code, report, err = check_json(cli, image.path)
    assert code == 2 and report["corruptions"] > 0, err
    assert "ERROR refcount block 0 is outside image" in err
    code, report, err = check_json(cli, image.path, "-r", "all")
    assert code == 0 and "internal error" not in err, err
    assert check_json(cli, image.path)[0] == 0


# ---- never written without -r ------------------------------------------------------------------

def test_check_without_repair_never_writes(cli: Cli, image: Layout) -> None:
    image.set_refcount(image.data[0], 0)
    image.set_refcount(0, 3)
    os.utime(image.path, ns=(1_000_000_000, 1_000_000_000))
    before = image.path.read_bytes()
    assert cli("check", image.path).code == 2
    assert cli("check", "--json", image.path).code == 2
    assert image.path.read_bytes() == before
    assert image.path.stat().st_mtime_ns == 1_000_000_000


# ---- repair ------------------------------------------------------------------------------------

def test_repair_leaks(cli: Cli, image: Layout) -> None:
    image.set_refcount(0, 2)
    code, report, err = check_json(cli, image.path, "-r", "leaks")
    assert code == 0 and report["leaks-fixed"] == 1 and "leaks" not in report, err
    assert "Repairing cluster 0 refcount=2 reference=1" in err
    assert check_json(cli, image.path)[0] == 0


def test_repair_leaks_leaves_low_refcounts_and_says_so(cli: Cli, image: Layout) -> None:
    image.set_refcount(image.data[0], 0)
    code, report, _ = check_json(cli, image.path, "-r", "leaks")
    assert code == 2
    assert any("-r all" in note for note in report["notes"])
    code, report, err = check_json(cli, image.path, "-r", "all")
    assert code == 0 and report["corruptions-fixed"] == 1, err
    assert check_json(cli, image.path)[0] == 0


def test_missing_refcount_block_is_allocated_at_the_end(cli: Cli, image: Layout) -> None:
    size = image.path.stat().st_size
    image.patch(image.cs, bytes(8))  # the refcount table forgets block 0
    code, report, err = check_json(cli, image.path)
    assert code == 2 and report["corruptions"] >= 8
    code, report, err = check_json(cli, image.path, "-r", "all")
    assert code == 0, err
    assert image.path.stat().st_size == size + image.cs  # one new refcount block
    assert check_json(cli, image.path)[0] == 0
    with imgbridge.open(image.path) as disk:
        assert disk.read_at(0, 3 * image.cs) == b"A" * image.cs + b"B" * image.cs + \
            b"C" * image.cs


def test_refcount_table_too_small_is_moved(cli: Cli, tmp_path: Path) -> None:
    """A data cluster beyond what the refcount table can cover: -r all needs a bigger table,
    written at the end of the file before the header points at it."""
    image = build(tmp_path / "d.qcow2", cluster_bits=9)  # the table covers 64 x 256 clusters
    far = 20000
    image.patch(far * image.cs, b"Z" * image.cs)
    image.set_l2(0, COPIED | far * image.cs)
    code, _report, err = check_json(cli, image.path, "-r", "all")
    assert code == 0, err
    with imgbridge.open(image.path) as disk:
        assert disk.header.refcount_table_offset > far * image.cs
        assert disk.header.refcount_table_clusters == 2
        assert disk.read_at(0, image.cs) == b"Z" * image.cs
    assert check_json(cli, image.path)[0] == 0


def test_unresolvable_reference_keeps_leaks(cli: Cli, image: Layout) -> None:
    """An L2 entry pointing past the end: its old cluster now looks leaked, but may be what
    the entry should point to, so it is not freed, and the report says why."""
    image.set_l2(0, COPIED | 1 << 40)
    code, report, _err = check_json(cli, image.path, "-r", "all")
    assert code == 2
    assert report["leaks"] == 1 and report["corruptions"] == 1
    assert any("not freed" in note and "past the end" in note
               for note in report["notes"])


def test_repair_clears_the_dirty_bit(cli: Cli, image: Layout) -> None:
    image.patch(S.HDR_INCOMPATIBLE_FEATURES, struct.pack(">Q", S.INCOMPAT_DIRTY))
    image.set_refcount(image.data[2], 0)  # what lazy refcounts leave behind
    assert cli("check", image.path).code == 2
    assert cli("check", "-r", "all", image.path).code == 0
    with imgbridge.open(image.path) as disk:
        assert not disk.header.incompatible_features & S.INCOMPAT_DIRTY


def test_repair_refuses_an_unknown_mode(image: Layout) -> None:
    with imgbridge.open(image.path) as disk, pytest.raises(imgbridge.InvalidInputError):
        disk.check("everything")


# ---- hostile images ----------------------------------------------------------------------------

def test_l1_at_the_limit_all_pointing_at_one_l2(cli: Cli, tmp_path: Path) -> None:
    """4 Mi L1 entries (QEMU's 32 MiB limit) that all name the same L2 table: the table is
    read once and counted 4 Mi times (an overflow, so a corruption), quickly."""
    entries = S.MAX_L1_BYTES // 8
    image = build(tmp_path / "d.qcow2", l1_entries=entries, size=1 << 40)
    image.patch(image.offset(image.l1), struct.pack(">Q", COPIED | image.offset(image.l2))
                * entries)
    start = time.monotonic()
    code, _report, err = check_json(cli, image.path)
    assert code == 2
    assert "ERROR: overflow cluster" in err
    assert time.monotonic() - start < 60


def test_snapshots_sharing_one_l1_table(cli: Cli, tmp_path: Path) -> None:
    """4096 snapshot entries naming the same L1 table of 1 Mi entries, all pointing at one
    L2 table: walked naively that is 4 Gi entries; grouped, the table is walked once."""
    image = build(tmp_path / "d.qcow2", l1_entries=1 << 20)
    image.patch(image.offset(image.l1), struct.pack(">Q", COPIED | image.offset(image.l2))
                * (1 << 20))
    count = 4096
    entry = S.SnapshotEntryFixed.build(dict(
        l1_table_offset=image.offset(image.l1), l1_size=1 << 20, id_str_size=1, name_size=1,
        date_sec=0, date_nsec=0, vm_clock_nsec=0, vm_state_size=0, extra_data_size=16)) \
        + bytes(16) + b"1x"
    table = (entry + bytes(S.pad8(len(entry)) - len(entry))) * count
    offset = image.path.stat().st_size
    image.patch(offset, table)
    image.patch(60, struct.pack(">IQ", count, offset))
    start = time.monotonic()
    code, _report, err = check_json(cli, image.path)
    assert code == 2  # shared far beyond what 16-bit refcounts can count
    assert "ERROR: overflow cluster" in err
    assert time.monotonic() - start < 60


def test_snapshot_entry_struct_format_matches_the_construct() -> None:
    raw = bytes(range(1, 41))
    parsed = S.SnapshotEntryFixed.parse(raw)
    assert struct.unpack(S.SNAPSHOT_FIXED_FORMAT, raw) == (
        parsed.l1_table_offset, parsed.l1_size, parsed.id_str_size, parsed.name_size,
        parsed.date_sec, parsed.date_nsec, parsed.vm_clock_nsec, parsed.vm_state_size,
        parsed.extra_data_size)


def test_overlapping_l1_tables_are_refused(cli: Cli, tmp_path: Path) -> None:
    """Snapshot L1 tables of the largest size, each one cluster further into the file: in a
    sound image L1 tables never overlap, so they never add up to more than the file."""
    image = build(tmp_path / "d.qcow2", data=8)
    entries = b""
    for k in (1, 2, 3):
        entry = S.SnapshotEntryFixed.build(dict(
            l1_table_offset=k * image.cs, l1_size=S.MAX_L1_BYTES // 8, id_str_size=1,
            name_size=1, date_sec=0, date_nsec=0, vm_clock_nsec=0, vm_state_size=0,
            extra_data_size=16)) + bytes(16) + str(k).encode() + b"x"
        entries += entry + bytes(S.pad8(len(entry)) - len(entry))
    offset = image.path.stat().st_size
    image.patch(offset, entries)
    image.patch(60, struct.pack(">IQ", 3, offset))
    result = cli("check", image.path)
    assert result.code == 1
    assert result.err.count("\n") == 1 and "the L1 tables overlap" in result.err


def test_refcount_table_over_the_limit_is_refused(cli: Cli, image: Layout) -> None:
    image.patch(56, struct.pack(">I", (S.MAX_REFTABLE_BYTES // image.cs) + 1))
    result = cli("check", image.path)
    assert result.code == 1 and result.err.count("\n") == 1
    assert "refcount table exceeds the 8 MiB limit" in result.err


def test_too_many_host_clusters_are_refused_before_counting(cli: Cli, tmp_path: Path) -> None:
    image = build(tmp_path / "d.qcow2", cluster_bits=9)
    with open(image.path, "r+b") as f:
        f.truncate((1 << 31) * 512 + 512)  # sparse: 2 Gi + 1 clusters of 512 bytes
    result = cli("check", image.path)
    assert result.code == 1 and result.err.count("\n") == 1
    assert "more than the 2147483647 a check can count" in result.err
