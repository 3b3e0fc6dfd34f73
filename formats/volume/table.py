"""Find and read a disk's partition table; the partition model shared by MBR and GPT.

``read_partitions(disk)`` prefers a GPT whenever the MBR is protective (type 0xEE), falls
back to the backup GPT with a warning when the primary is damaged, and reads a plain MBR
(with its chain of logical partitions) otherwise. Hostile tables (EBR loops, absurd entry
arrays, partitions past the end of the disk) raise InvalidImageError before anything large
is allocated.
"""

from __future__ import annotations

import uuid as _uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from imgbridge.errors import InvalidImageError, InvalidInputError
from imgbridge.model.disk import Disk, ExtentKind
from imgbridge.source import ByteSource, RangeSource, SourceRun

from . import _structs as s

__all__ = [
    "ALIGNMENT",
    "DiskSource",
    "NewPartition",
    "Partition",
    "PartitionTable",
    "layout",
    "partition_source",
    "read_partitions",
]

#: New partitions start on 1 MiB boundaries (what fdisk, sgdisk and parted do).
ALIGNMENT = 1 << 20


@dataclass(frozen=True)
class Partition:
    """One partition. ``start`` and ``size`` are in bytes; ``type`` is the MBR type byte or
    the GPT type GUID. ``container`` marks an MBR extended partition (it holds the logical
    partitions; it is not a filesystem)."""

    number: int
    start: int
    size: int
    type: int | _uuid.UUID
    name: str = ""
    uuid: _uuid.UUID | None = None
    attributes: int = 0
    bootable: bool = False
    container: bool = False

    @property
    def end(self) -> int:
        return self.start + self.size

    @property
    def type_name(self) -> str:
        if isinstance(self.type, int):
            return s.MBR_TYPE_NAMES.get(self.type, "")
        return s.GPT_TYPE_NAMES.get(self.type, "")

    def type_str(self) -> str:
        """The type as sfdisk prints it: hex without prefix for MBR, an upper-case GUID."""
        if isinstance(self.type, int):
            return f"{self.type:x}"
        return str(self.type).upper()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "number": self.number, "start": self.start, "size": self.size,
            "type": self.type_str(), "type-name": self.type_name,
        }
        out["name"] = self.name
        out["uuid"] = str(self.uuid).upper() if self.uuid is not None else None
        if self.attributes:
            out["attributes"] = self.attributes
        if self.bootable:
            out["bootable"] = True
        return out


@dataclass
class PartitionTable:
    """A disk's partition table. ``kind`` is ``"mbr"`` or ``"gpt"``; ``disk_id`` is the MBR
    disk signature (``0x1234abcd``) or the GPT disk GUID (upper case, as sfdisk prints it).
    ``from_backup`` is True when a damaged primary GPT was replaced by its backup."""

    kind: str
    disk_id: str
    sector_size: int = s.SECTOR
    partitions: list[Partition] = field(default_factory=list)
    first_usable: int | None = None
    last_usable: int | None = None
    from_backup: bool = False

    def to_json(self) -> dict[str, Any]:
        key = "uuid" if self.kind == "gpt" else "label-id"
        out: dict[str, Any] = {"type": self.kind, key: self.disk_id,
                               "sector-size": self.sector_size}
        if self.from_backup:
            out["from-backup"] = True
        out["partitions"] = [p.to_json() for p in self.partitions]
        return out


@dataclass(frozen=True)
class NewPartition:
    """A partition to write. ``size`` in bytes (a multiple of 512; None: up to the end of the
    usable space); ``start`` in bytes (a multiple of 1 MiB; None: the next 1 MiB boundary
    after the previous partition)."""

    size: int | None
    type: int | _uuid.UUID
    name: str = ""
    uuid: _uuid.UUID | None = None
    attributes: int = 0
    bootable: bool = False
    start: int | None = None


def read_sectors(disk: Disk, offset: int, n: int, *, what: str) -> bytes:
    """Exactly ``n`` bytes at ``offset`` of the disk, or InvalidImageError."""
    if offset < 0 or offset + n > disk.size:
        raise InvalidImageError(f"{what} at offset {offset} lies past the end of the disk",
                                path=disk.filename, offset=offset)
    data = disk.read_at(offset, n)
    if len(data) != n:
        raise InvalidImageError(f"truncated {what} at offset {offset}",
                                path=disk.filename, offset=offset)
    return data


def read_partitions(disk: Disk) -> PartitionTable | None:
    """The disk's partition table, or None when it has none."""
    from . import gpt, mbr

    if disk.size < 2 * s.SECTOR:
        return None
    sector0 = read_sectors(disk, 0, s.SECTOR, what="MBR")
    entries = mbr.parse_entries(sector0) if mbr.has_signature(sector0) else None
    if entries is not None and any(e.type == s.MBR_TYPE_GPT_PROTECTIVE for e in entries):
        return gpt.read_gpt(disk)
    if entries is None:
        # No MBR signature: a GPT written without a protective MBR is still a GPT.
        return gpt.read_gpt(disk) if gpt.has_signature(disk) else None
    return mbr.read_mbr(disk, sector0)


def layout(parts: Sequence[NewPartition], begin: int, end: int) -> list[tuple[int, int]]:
    """(start, size) in bytes for each new partition inside ``[begin, end)``, 1 MiB aligned."""
    placed: list[tuple[int, int]] = []
    cursor = begin
    for i, part in enumerate(parts, 1):
        start = part.start
        if start is None:
            start = -(-cursor // ALIGNMENT) * ALIGNMENT
        elif start % ALIGNMENT:
            raise InvalidInputError(f"partition {i}: start {start} is not a multiple of 1 MiB")
        size = part.size
        if size is None:
            size = (end - start) // s.SECTOR * s.SECTOR
        if size <= 0 or size % s.SECTOR:
            raise InvalidInputError(f"partition {i}: size {size} is not a positive multiple "
                                    f"of {s.SECTOR}")
        if start < cursor or start + size > end:
            raise InvalidInputError(
                f"partition {i} ({start}+{size}) overlaps another or does not fit in "
                f"[{begin}, {end})")
        placed.append((start, size))
        cursor = start + size
    return placed


class DiskSource(ByteSource):
    """A Disk seen as a ByteSource: reads go through the disk, holes come from its extents."""

    def __init__(self, disk: Disk) -> None:
        self._disk = disk
        self.name = disk.filename or "<disk>"

    @property
    def size(self) -> int:
        return self._disk.size

    def read_at(self, offset: int, n: int) -> bytes:
        return self._disk.read_at(offset, n)

    def runs(self, offset: int = 0, length: int | None = None) -> Iterator[SourceRun]:
        end = self.size if length is None else min(self.size, offset + length)
        if offset >= end:
            return
        for ext in self._disk.extents(offset, end - offset):
            yield SourceRun(ext.offset, ext.length, ext.kind is ExtentKind.DATA)


def partition_source(disk: Disk, partition: Partition) -> ByteSource:
    """The partition's bytes as a ByteSource (a range of the disk)."""
    return RangeSource(DiskSource(disk), partition.start, partition.size)
