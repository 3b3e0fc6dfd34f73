"""The MBR partition table: four primary entries, and logical partitions in an EBR chain.

Each EBR sits inside the extended partition; its first entry locates a logical partition
relative to the EBR itself, its second entry locates the next EBR relative to the start of
the extended partition. All LBAs count logical sectors (512 or 4096 bytes).

Writing follows what util-linux sfdisk writes for ``label: dos`` with an extended partition:
with more than four partitions, the first three are primary and the fourth entry is an
extended partition (type 0x05) from the next 1 MiB boundary to the end of the disk; each
logical partition starts on a 1 MiB boundary with its EBR 1 MiB before it.

References: UEFI Specification 2.10, 5.2.1 "Legacy Master Boot Record"; the EBR chain as
Linux and util-linux read and write it (see _structs.py).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Sequence
from typing import Any

from imgbridge.errors import InvalidImageError, InvalidInputError
from imgbridge.model.disk import Disk

from . import _structs as s
from .table import (
    ALIGNMENT,
    NewPartition,
    Partition,
    PartitionTable,
    align_up,
    check_new_disk,
    check_size,
    layout,
    read_sectors,
)

__all__ = ["has_signature", "parse_entries", "read_mbr", "write_mbr"]


def has_signature(sector: bytes) -> bool:
    return sector[s.MBR_SIGNATURE_OFFSET:s.MBR_SIGNATURE_OFFSET + 2] == s.MBR_SIGNATURE


def parse_entries(sector: bytes, count: int = s.MBR_ENTRIES) -> list[Any]:
    return [s.MbrEntry.parse(sector[s.MBR_TABLE_OFFSET + i * s.MBR_ENTRY_SIZE:])
            for i in range(count)]


def _used(entry: Any) -> bool:
    return bool(entry.type != s.MBR_TYPE_EMPTY and entry.sectors)


def _checked(disk: Disk, number: int, start: int, size: int) -> tuple[int, int]:
    if start + size > disk.size:
        raise InvalidImageError(
            f"MBR partition {number} ({start}+{size} bytes) lies past the end of the "
            f"{disk.size}-byte disk", format="mbr", path=disk.filename, offset=start)
    return start, size


def read_mbr(disk: Disk, sector0: bytes, sector_size: int = s.SECTOR) -> PartitionTable | None:
    """The MBR table in ``sector0`` (and its logical partitions), LBAs counted in
    ``sector_size`` sectors, or None when sector 0 carries the 0x55AA signature but no
    partition entries (a filesystem boot sector)."""
    entries = parse_entries(sector0)
    if any(e.status not in (0, s.MBR_BOOTABLE) for e in entries) or not any(map(_used, entries)):
        return None
    disk_id = struct.unpack_from("<I", sector0, s.MBR_DISK_ID_OFFSET)[0]
    table = PartitionTable("mbr", f"0x{disk_id:08x}", sector_size=sector_size)
    logical: list[Partition] = []
    for number, entry in enumerate(entries, 1):
        if not _used(entry):
            continue
        start, size = _checked(disk, number, entry.lba_first * sector_size,
                               entry.sectors * sector_size)
        extended = entry.type in s.MBR_EXTENDED_TYPES
        table.partitions.append(Partition(
            number, start, size, entry.type, bootable=entry.status == s.MBR_BOOTABLE,
            container=extended))
        if extended and not logical:
            logical = list(_logical_partitions(disk, start, size, sector_size))
    table.partitions.extend(logical)
    return table


def _logical_partitions(disk: Disk, ext_start: int, ext_size: int,
                        sector_size: int) -> Iterator[Partition]:
    """Walk the EBR chain; refuse loops, EBRs outside the extended partition, long chains."""
    seen: set[int] = set()
    ebr = ext_start
    number = s.FIRST_LOGICAL_NUMBER
    while True:
        if ebr in seen:
            raise InvalidImageError(f"the EBR chain loops back to offset {ebr}",
                                    format="mbr", path=disk.filename, offset=ebr)
        if len(seen) >= s.MAX_LOGICAL_PARTITIONS:
            raise InvalidImageError(
                f"the EBR chain is longer than {s.MAX_LOGICAL_PARTITIONS} links",
                format="mbr", path=disk.filename, offset=ebr)
        if not ext_start <= ebr < ext_start + ext_size:
            raise InvalidImageError(f"an EBR at offset {ebr} lies outside the extended "
                                    "partition", format="mbr", path=disk.filename, offset=ebr)
        seen.add(ebr)
        sector = read_sectors(disk, ebr, s.SECTOR, what="EBR")
        if not has_signature(sector):
            raise InvalidImageError(f"the EBR at offset {ebr} has no 0x55AA signature",
                                    format="mbr", path=disk.filename, offset=ebr)
        this, link = parse_entries(sector, 2)
        if _used(this):
            start, size = _checked(disk, number, ebr + this.lba_first * sector_size,
                                   this.sectors * sector_size)
            yield Partition(number, start, size, this.type,
                            bootable=this.status == s.MBR_BOOTABLE)
            number += 1
        if not _used(link) or link.type not in s.MBR_EXTENDED_TYPES:
            return
        ebr = ext_start + link.lba_first * sector_size


# ---- writing ---------------------------------------------------------------------------------

#: The CHS geometry every partitioning tool uses for LBA disks, and the "too far" marker.
_HEADS, _SECTORS_PER_TRACK = 255, 63
CHS_BEYOND = b"\xfe\xff\xff"


def chs(lba: int) -> bytes:
    """The 3-byte CHS address of ``lba`` (head, sector|cylinder high bits, cylinder low)."""
    if lba >= 1024 * _HEADS * _SECTORS_PER_TRACK:
        return CHS_BEYOND
    cylinder, rest = divmod(lba, _HEADS * _SECTORS_PER_TRACK)
    head, sector = divmod(rest, _SECTORS_PER_TRACK)
    return bytes([head, ((cylinder >> 2) & 0xC0) | (sector + 1), cylinder & 0xFF])


def entry_bytes(status: int, type_: int, first_lba: int, sectors: int,
                chs_last: bytes | None = None, *, base_lba: int = 0) -> bytes:
    """One 16-byte entry. ``first_lba`` is stored as given; the CHS fields address the
    absolute sector ``base_lba + first_lba`` (EBR entries store LBAs relative to a base)."""
    absolute = base_lba + first_lba
    last = chs(absolute + sectors - 1) if chs_last is None else chs_last
    built: bytes = s.MbrEntry.build({"status": status, "chs_first": chs(absolute),
                                     "type": type_, "chs_last": last, "lba_first": first_lba,
                                     "sectors": sectors})
    return built


def table_bytes(disk_id: int, entries: Sequence[bytes]) -> bytes:
    """Bytes 440..512 of sector 0: disk signature, reserved word, four entries, 0x55AA."""
    padded = list(entries) + [bytes(s.MBR_ENTRY_SIZE)] * (s.MBR_ENTRIES - len(entries))
    return struct.pack("<IH", disk_id, 0) + b"".join(padded) + s.MBR_SIGNATURE


def _checked_type(number: int, part: NewPartition) -> int:
    if not isinstance(part.type, int) or not 0 < part.type < 256:
        raise InvalidInputError(f"MBR partition {number}: type {part.type!r} is not a byte "
                                "(1..255)")
    if part.type in s.MBR_EXTENDED_TYPES or part.type == s.MBR_TYPE_GPT_PROTECTIVE:
        raise InvalidInputError(f"MBR partition {number}: type 0x{part.type:02x} is not "
                                "written by write_mbr (the extended partition is made for you)")
    return part.type


def write_mbr(disk_size: int, partitions: Sequence[NewPartition], *,
              disk_id: int | None = None, sector_size: int = s.SECTOR,
              extended: bool | None = None) -> list[tuple[int, bytes]]:
    """The pieces ``(offset, bytes)`` of an MBR for a disk of ``disk_size`` bytes with
    ``sector_size``-byte logical sectors, partitions on 1 MiB boundaries. Sector 0's boot code
    (bytes 0..440) is left alone.

    ``extended``: None puts partitions 4.. into an extended partition when there are more than
    four; True always does (partitions 4.. become logical partitions 5..; at least four are
    needed); False refuses more than four. A logical partition's ``start``, when given, leaves
    the 1 MiB before it for its EBR."""
    check_new_disk("MBR", disk_size, sector_size)
    if extended is None:
        extended = len(partitions) > s.MBR_ENTRIES
    if not extended and len(partitions) > s.MBR_ENTRIES:
        raise InvalidInputError("an MBR holds at most 4 primary partitions "
                                "(pass extended=True for logical partitions)")
    if extended and len(partitions) < s.MBR_ENTRIES:
        raise InvalidInputError("logical partitions follow three primary ones: "
                                "extended=True needs at least 4 partitions")
    limit = min(disk_size, (1 << 32) * sector_size)
    primaries = partitions[:s.MBR_ENTRIES - 1] if extended else partitions
    entries = []
    pieces: list[tuple[int, bytes]] = []
    placed = layout(primaries, sector_size, limit, sector_size)
    for number, (part, (start, size)) in enumerate(zip(primaries, placed, strict=True), 1):
        status = s.MBR_BOOTABLE if part.bootable else 0
        entries.append(entry_bytes(status, _checked_type(number, part), start // sector_size,
                                   size // sector_size))
    if extended:
        ext_start = align_up(placed[-1][0] + placed[-1][1])
        if ext_start + 2 * ALIGNMENT > limit:
            raise InvalidInputError("no room is left for the extended partition after "
                                    f"partition {len(primaries)}")
        ext_lba, ext_sectors = ext_start // sector_size, (limit - ext_start) // sector_size
        entries.append(entry_bytes(0, s.MBR_TYPE_EXTENDED_DEFAULT, ext_lba, ext_sectors))
        pieces = _ebr_chain(partitions[len(primaries):], ext_start, limit, sector_size)
    if disk_id is None:
        disk_id = int.from_bytes(os.urandom(4), "little") or 1
    return [(s.MBR_DISK_ID_OFFSET, table_bytes(disk_id, entries)), *pieces]


def _ebr_chain(logicals: Sequence[NewPartition], ext_start: int, limit: int,
               sector_size: int) -> list[tuple[int, bytes]]:
    """One EBR sector per logical partition, each linked to the next. An EBR's first entry
    locates its logical partition relative to the EBR; its second entry locates the next EBR
    (and spans it up to the end of that EBR's logical partition) relative to ``ext_start``."""
    if len(logicals) > s.MAX_LOGICAL_PARTITIONS:
        raise InvalidInputError(f"at most {s.MAX_LOGICAL_PARTITIONS} logical partitions are "
                                "written (readers refuse longer EBR chains)")
    ext_lba = ext_start // sector_size
    spans: list[tuple[int, int, int]] = []  # (EBR offset, logical start, logical size)
    cursor = ext_start
    for number, part in enumerate(logicals, s.FIRST_LOGICAL_NUMBER):
        if part.start is None:
            start = align_up(cursor) + ALIGNMENT
        elif part.start % ALIGNMENT:
            raise InvalidInputError(f"partition {number}: start {part.start} is not a "
                                    "multiple of 1 MiB")
        else:
            start = part.start
        ebr = start - ALIGNMENT
        size = part.size if part.size is not None else (limit - start) // sector_size * sector_size
        check_size(number, size, sector_size)
        if ebr < cursor or start + size > limit:
            raise InvalidInputError(
                f"partition {number} ({start}+{size}, its EBR 1 MiB before it) overlaps "
                f"another or does not fit in the extended partition [{ext_start}, {limit})")
        spans.append((ebr, start, size))
        cursor = start + size
    pieces = []
    for index, ((ebr, start, size), part) in enumerate(zip(spans, logicals, strict=True)):
        ebr_lba = ebr // sector_size
        status = s.MBR_BOOTABLE if part.bootable else 0
        type_ = _checked_type(s.FIRST_LOGICAL_NUMBER + index, part)
        entries = [entry_bytes(status, type_, (start - ebr) // sector_size,
                               size // sector_size, base_lba=ebr_lba)]
        if index + 1 < len(spans):
            next_ebr, next_start, next_size = spans[index + 1]
            entries.append(entry_bytes(
                0, s.MBR_TYPE_EXTENDED_DEFAULT, next_ebr // sector_size - ext_lba,
                (next_start + next_size - next_ebr) // sector_size, base_lba=ext_lba))
        sector = bytes(s.MBR_DISK_ID_OFFSET) + table_bytes(0, entries)
        pieces.append((ebr, sector.ljust(sector_size, b"\x00")))
    return pieces
