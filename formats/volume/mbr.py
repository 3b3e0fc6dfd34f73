"""The MBR partition table: four primary entries, and logical partitions in an EBR chain.

Each EBR sits inside the extended partition; its first entry locates a logical partition
relative to the EBR itself, its second entry locates the next EBR relative to the start of
the extended partition.

References: UEFI Specification 2.10, 5.2.1 "Legacy Master Boot Record"; the EBR chain as
Linux and util-linux read it (see _structs.py).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Sequence
from typing import Any

from imgbridge.errors import InvalidImageError, InvalidInputError
from imgbridge.model.disk import Disk

from . import _structs as s
from .table import NewPartition, Partition, PartitionTable, layout, read_sectors

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


def read_mbr(disk: Disk, sector0: bytes) -> PartitionTable | None:
    """The MBR table in ``sector0`` (and its logical partitions), or None when sector 0
    carries the 0x55AA signature but no partition entries (a filesystem boot sector)."""
    entries = parse_entries(sector0)
    if any(e.status not in (0, s.MBR_BOOTABLE) for e in entries) or not any(map(_used, entries)):
        return None
    disk_id = struct.unpack_from("<I", sector0, s.MBR_DISK_ID_OFFSET)[0]
    table = PartitionTable("mbr", f"0x{disk_id:08x}")
    logical: list[Partition] = []
    for number, entry in enumerate(entries, 1):
        if not _used(entry):
            continue
        start, size = _checked(disk, number, entry.lba_first * s.SECTOR,
                               entry.sectors * s.SECTOR)
        extended = entry.type in s.MBR_EXTENDED_TYPES
        table.partitions.append(Partition(
            number, start, size, entry.type, bootable=entry.status == s.MBR_BOOTABLE,
            container=extended))
        if extended and not logical:
            logical = list(_logical_partitions(disk, start, size))
    table.partitions.extend(logical)
    return table


def _logical_partitions(disk: Disk, ext_start: int, ext_size: int) -> Iterator[Partition]:
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
            start, size = _checked(disk, number, ebr + this.lba_first * s.SECTOR,
                                   this.sectors * s.SECTOR)
            yield Partition(number, start, size, this.type,
                            bootable=this.status == s.MBR_BOOTABLE)
            number += 1
        if not _used(link) or link.type not in s.MBR_EXTENDED_TYPES:
            return
        ebr = ext_start + link.lba_first * s.SECTOR


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
                chs_last: bytes | None = None) -> bytes:
    last = chs(first_lba + sectors - 1) if chs_last is None else chs_last
    built: bytes = s.MbrEntry.build({"status": status, "chs_first": chs(first_lba),
                                     "type": type_, "chs_last": last, "lba_first": first_lba,
                                     "sectors": sectors})
    return built


def table_bytes(disk_id: int, entries: Sequence[bytes]) -> bytes:
    """Bytes 440..512 of sector 0: disk signature, reserved word, four entries, 0x55AA."""
    padded = list(entries) + [bytes(s.MBR_ENTRY_SIZE)] * (s.MBR_ENTRIES - len(entries))
    return struct.pack("<IH", disk_id, 0) + b"".join(padded) + s.MBR_SIGNATURE


def write_mbr(disk_size: int, partitions: Sequence[NewPartition], *,
              disk_id: int | None = None) -> list[tuple[int, bytes]]:
    """The pieces ``(offset, bytes)`` of an MBR holding up to four primary partitions,
    placed on 1 MiB boundaries. Sector 0's boot code (bytes 0..440) is left alone."""
    if disk_size % s.SECTOR or disk_size < 2 * s.ALIGNMENT_SECTORS * s.SECTOR:
        raise InvalidInputError(f"an MBR disk needs a size that is a multiple of {s.SECTOR} "
                                "and at least 2 MiB")
    if len(partitions) > s.MBR_ENTRIES:
        raise InvalidInputError("an MBR holds at most 4 primary partitions "
                                "(logical partitions are not written yet)")
    limit = min(disk_size, (1 << 32) * s.SECTOR)
    entries = []
    for part, (start, size) in zip(partitions, layout(partitions, s.SECTOR, limit), strict=True):
        if not isinstance(part.type, int) or not 0 < part.type < 256:
            raise InvalidInputError(f"MBR partition type {part.type!r} is not a byte (1..255)")
        if part.type in s.MBR_EXTENDED_TYPES or part.type == s.MBR_TYPE_GPT_PROTECTIVE:
            raise InvalidInputError(f"MBR partition type 0x{part.type:02x} is not written "
                                    "by write_mbr")
        status = s.MBR_BOOTABLE if part.bootable else 0
        entries.append(entry_bytes(status, part.type, start // s.SECTOR, size // s.SECTOR))
    if disk_id is None:
        disk_id = int.from_bytes(os.urandom(4), "little") or 1
    return [(s.MBR_DISK_ID_OFFSET, table_bytes(disk_id, entries))]
