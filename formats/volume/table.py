"""Find and read a disk's partition table; the partition model shared by MBR and GPT.

``read_partitions(disk)`` prefers a GPT whenever the MBR is protective (type 0xEE), falls
back to the backup GPT with a warning when the primary is damaged, and reads a plain MBR
(with its chain of logical partitions) otherwise. Hostile tables (EBR loops, absurd entry
arrays, partitions past the end of the disk) raise InvalidImageError before anything large
is allocated.

Sector size: a GPT is looked for with 512-byte logical sectors, then 4096-byte ones (the header
at LBA 1 sits at offset 512 or 4096; ``PartitionTable.sector_size`` says which was found). An
MBR carries no mark of its sector size; it is read with 512-byte sectors unless the caller (or
a disk that knows its ``logical_sector_size``) says 4096, or unless 512 fails and 4096 reads a
consistent table.

``choose_root_partition`` picks the partition that holds a system's root: the Discoverable
Partitions Specification's root type first, then the filesystems the probes found.

References: UEFI Specification 2.10, chapter 5; the UAPI group's Discoverable Partitions
Specification.
"""

from __future__ import annotations

import platform
import sys
import uuid as _uuid
from collections.abc import Iterator, Mapping, Sequence
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
    "choose_root_partition",
    "dps_arch",
    "is_root_type",
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
    """A partition to write. ``size`` in bytes (a multiple of the sector size; None: up to the
    end of the usable space); ``start`` in bytes (a multiple of 1 MiB; None: the next 1 MiB
    boundary after the previous partition)."""

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


def read_partitions(disk: Disk, sector_size: int | None = None) -> PartitionTable | None:
    """The disk's partition table, or None when it has none. ``sector_size`` (512 or 4096)
    forces the logical sector size; None finds it (see the module's docstring)."""
    from . import gpt, mbr

    if sector_size is not None and sector_size not in s.SECTOR_SIZES:
        raise InvalidInputError(f"sector size {sector_size} is not one of "
                                f"{', '.join(map(str, s.SECTOR_SIZES))}")
    if disk.size < 2 * s.SECTOR:
        return None
    sector0 = read_sectors(disk, 0, s.SECTOR, what="MBR")
    entries = mbr.parse_entries(sector0) if mbr.has_signature(sector0) else None
    if entries is not None and any(e.type == s.MBR_TYPE_GPT_PROTECTIVE for e in entries):
        return gpt.read_gpt(disk, sector_size)
    if entries is None:
        # No MBR signature: a GPT written without a protective MBR is still a GPT.
        found = gpt.find_sector_size(disk, sector_size)
        return gpt.read_gpt(disk, found) if found is not None else None
    if sector_size is not None:
        return mbr.read_mbr(disk, sector0, sector_size)
    preferred = _sector_size_hint(disk)
    try:
        return mbr.read_mbr(disk, sector0, preferred)
    except InvalidImageError as first:
        # An EBR chain that only makes sense with the other sector size is a 4Kn (or 512e)
        # disk: accept it only when that reading is consistent from end to end.
        other = s.SECTOR_SIZES[1] if preferred == s.SECTOR_SIZES[0] else s.SECTOR_SIZES[0]
        try:
            return mbr.read_mbr(disk, sector0, other)
        except InvalidImageError:
            raise first from None


def _sector_size_hint(disk: Disk) -> int:
    """The logical sector size the disk format records (VHDX does), else 512."""
    hint = disk.logical_sector_size
    return hint if hint in s.SECTOR_SIZES else s.SECTOR


def layout(parts: Sequence[NewPartition], begin: int, end: int,
           sector_size: int = s.SECTOR) -> list[tuple[int, int]]:
    """(start, size) in bytes for each new partition inside ``[begin, end)``, 1 MiB aligned,
    sizes in whole ``sector_size`` sectors."""
    placed: list[tuple[int, int]] = []
    cursor = begin
    for i, part in enumerate(parts, 1):
        start = part.start
        if start is None:
            start = align_up(cursor)
        elif start % ALIGNMENT:
            raise InvalidInputError(f"partition {i}: start {start} is not a multiple of 1 MiB")
        size = part.size
        if size is None:
            size = (end - start) // sector_size * sector_size
        check_size(i, size, sector_size)
        if start < cursor or start + size > end:
            raise InvalidInputError(
                f"partition {i} ({start}+{size}) overlaps another or does not fit in "
                f"[{begin}, {end})")
        placed.append((start, size))
        cursor = start + size
    return placed


def align_up(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


def check_size(number: int, size: int, sector_size: int) -> None:
    if size <= 0 or size % sector_size:
        raise InvalidInputError(f"partition {number}: size {size} is not a positive multiple "
                                f"of the {sector_size}-byte sector")


def check_new_disk(kind: str, disk_size: int, sector_size: int) -> None:
    """Refuse a sector size other than 512 or 4096 and a disk too small for a 1 MiB-aligned
    partition."""
    if sector_size not in s.SECTOR_SIZES:
        raise InvalidInputError(f"sector size {sector_size} is not one of "
                                f"{', '.join(map(str, s.SECTOR_SIZES))}")
    if disk_size % sector_size or disk_size < 2 * ALIGNMENT:
        raise InvalidInputError(f"a{'n' if kind == 'MBR' else ''} {kind} disk needs a size "
                                f"that is a multiple of {sector_size} and at least 2 MiB")


# ---- the root partition ----------------------------------------------------------------------

#: Filesystems a Linux root lives on, as the filesystem probes name them.
LINUX_ROOT_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4"})


def dps_arch(machine: str | None = None, byteorder: str | None = None) -> str | None:
    """The Discoverable Partitions Specification's name (sfdisk's spelling: "x86-64",
    "ARM-64", ...) of the architecture ``machine`` (default: this host's
    ``platform.machine()``), or None when the DPS has no root type for it. ``byteorder``
    (default: this host's) tells MIPS's two byte orders apart, which ``machine`` may not."""
    machine = (machine if machine is not None else platform.machine()).lower()
    byteorder = byteorder or sys.byteorder
    if machine in ("mips", "mips64", "mipsel", "mips64el"):
        width = "64" if machine.startswith("mips64") else "32"
        little = machine.endswith("el") or byteorder == "little"
        return f"MIPS-{width} {'LE' if little else 'BE'}"
    if machine.startswith("arm") and machine != "arm64":
        return "ARM"
    return s.MACHINE_DPS_ARCH.get(machine)


def is_root_type(type_: int | _uuid.UUID) -> bool:
    """True for a GPT type that the DPS defines as a root partition (of any architecture)."""
    return type_ in _DPS_ROOT_TYPE_SET


_DPS_ROOT_TYPE_SET = frozenset(s.DPS_ROOT_TYPES.values())


def choose_root_partition(table: PartitionTable, fs_types: Mapping[int, str | None], *,
                          arch: str | None = None) -> Partition | None:
    """The partition that most likely holds the root filesystem.

    In order: the first partition of the DPS root type for ``arch`` (a DPS architecture name,
    default: this host's), then the first of any other DPS root type (within each, partitions
    flagged "no-auto", attribute bit 63, come after those without it), else the largest partition
    whose filesystem (``fs_types[number]``, as the probes name it) is ext2/3/4, else the
    largest with any recognised filesystem, else None. Extended containers are never chosen;
    ties go to the lower partition number."""
    candidates = [p for p in table.partitions if not p.container]
    wanted = s.DPS_ROOT_TYPES.get(arch if arch is not None else dps_arch() or "")
    roots = [p for p in candidates if is_root_type(p.type)]
    if roots:
        return min(roots, key=lambda p: (p.type != wanted,
                                         bool(p.attributes & s.GPT_ATTR_DPS_NO_AUTO),
                                         p.number))
    for accepted in (LINUX_ROOT_FILESYSTEMS, None):
        found = [p for p in candidates if fs_types.get(p.number) is not None
                 and (accepted is None or fs_types[p.number] in accepted)]
        if found:
            return max(found, key=lambda p: (p.size, -p.number))
    return None


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
