"""The GUID Partition Table: a protective MBR, a primary header at LBA 1 with its entry array,
and a backup array and header at the end of the disk.

A primary whose header or array fails its CRC32 is *damaged*: the backup is read instead,
with a warning. A header whose CRC is right but whose fields are absurd (an entry array over
1 MiB, an entry size other than 128 * 2**n, an array or partition past the end of the disk)
is *hostile* and refused outright.

Logical sectors of 512 and 4096 bytes: the sector size is the one at whose LBA 1 (or last
LBA) an "EFI PART" header sits, 512 tried first; every LBA is scaled by it. With 4096-byte
sectors the 128-entry array takes 4 sectors, so the first usable LBA is 6.

References: UEFI Specification 2.10, 5.3 "GUID Partition Table (GPT) Disk Layout".
"""

from __future__ import annotations

import uuid
import warnings
import zlib
from collections.abc import Sequence
from typing import Any

from imgbridge.errors import InvalidImageError, InvalidInputError
from imgbridge.model.disk import Disk

from . import _structs as s
from .mbr import entry_bytes, table_bytes
from .table import NewPartition, Partition, PartitionTable, check_new_disk, layout, read_sectors

__all__ = ["find_sector_size", "has_signature", "read_gpt", "write_gpt"]

#: Entries in a new array (the UEFI minimum size: 128 * 128 bytes).
NEW_ENTRIES = s.GPT_MIN_ARRAY_BYTES // s.GPT_ENTRY_SIZE


class _Damaged(Exception):
    """A header or array that fails its signature or CRC: try the other copy."""


def _header_lbas(disk: Disk, sector_size: int) -> tuple[int, int] | None:
    """(primary LBA, backup LBA) for this sector size, or None when the disk is too small."""
    total = disk.size // sector_size
    return (1, total - 1) if total >= 3 else None


def find_sector_size(disk: Disk, forced: int | None = None) -> int | None:
    """The logical sector size whose primary or backup header position holds "EFI PART"
    (``forced`` alone is tried when given), or None."""
    for sector_size in (forced,) if forced is not None else s.SECTOR_SIZES:
        lbas = _header_lbas(disk, sector_size)
        if lbas is not None and any(disk.read_at(lba * sector_size, 8) == s.GPT_SIGNATURE
                                    for lba in lbas):
            return sector_size
    return None


def has_signature(disk: Disk) -> bool:
    return find_sector_size(disk) is not None


def _crc(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def _header_crc(raw: bytes, size: int) -> int:
    head = bytearray(raw[:size])
    head[s.GPT_HEADER_CRC_OFFSET:s.GPT_HEADER_CRC_OFFSET + 4] = bytes(4)
    return _crc(bytes(head))


def read_gpt(disk: Disk, sector_size: int | None = None) -> PartitionTable:
    """Read the primary GPT, or the backup when the primary is damaged (with a warning).
    ``sector_size`` None finds it (512, then 4096)."""
    found = find_sector_size(disk, sector_size)
    sector = found or sector_size or s.SECTOR
    lbas = _header_lbas(disk, sector)
    if lbas is None:
        raise InvalidImageError("the disk is too small for a GPT", format="gpt",
                                path=disk.filename)
    primary_lba, backup_lba = lbas
    try:
        return _read_copy(disk, primary_lba, backup_lba + 1, sector)
    except _Damaged as primary:
        try:
            table = _read_copy(disk, backup_lba, backup_lba + 1, sector)
        except _Damaged as backup:
            sizes = f"{sector_size}-byte" if sector_size else "512- or 4096-byte"
            tried = "" if found else f" (no header with {sizes} sectors)"
            raise InvalidImageError(f"both GPT copies are damaged{tried}: primary: {primary}; "
                                    f"backup: {backup}", format="gpt",
                                    path=disk.filename) from None
        warnings.warn(f"{disk.filename}: the primary GPT is damaged ({primary}); "
                      f"read the backup at LBA {backup_lba}", stacklevel=2)
        table.from_backup = True
        return table


def _read_copy(disk: Disk, lba: int, total: int, sector: int) -> PartitionTable:
    where = "primary" if lba == 1 else "backup"
    raw = read_sectors(disk, lba * sector, sector, what=f"{where} GPT header")
    header = s.GptHeader.parse(raw)
    if header.signature != s.GPT_SIGNATURE:
        raise _Damaged(f"no 'EFI PART' signature at LBA {lba}")
    if not s.GPT_HEADER_SIZE <= header.header_size <= sector:
        raise _Damaged(f"header size {header.header_size} at LBA {lba}")
    if _header_crc(raw, header.header_size) != header.header_crc32:
        raise _Damaged(f"header CRC32 mismatch at LBA {lba}")
    if header.my_lba != lba:
        raise _Damaged(f"the header at LBA {lba} says it is at LBA {header.my_lba}")

    def hostile(message: str) -> InvalidImageError:
        return InvalidImageError(f"{where} GPT header: {message}", format="gpt",
                                 path=disk.filename, offset=lba * sector)

    esize, count = header.entry_size, header.num_entries
    if esize < s.GPT_ENTRY_SIZE or esize & (esize - 1):
        raise hostile(f"entry size {esize} is not 128 * 2**n")
    if count * esize > s.GPT_MAX_ARRAY_BYTES:
        raise hostile(f"{count} entries of {esize} bytes exceed the 1 MiB limit")
    if not (header.first_usable_lba <= header.last_usable_lba < total):
        raise hostile(f"usable LBAs {header.first_usable_lba}..{header.last_usable_lba} do "
                      f"not fit a disk of {total} sectors")
    array_bytes = count * esize
    array_sectors = -(-array_bytes // sector)
    if header.entries_lba < 1 or header.entries_lba + array_sectors > total:
        raise hostile(f"the entry array at LBA {header.entries_lba} lies past the end")
    array = read_sectors(disk, header.entries_lba * sector, array_bytes,
                         what=f"{where} GPT entry array")
    if _crc(array) != header.entries_crc32:
        raise _Damaged(f"entry array CRC32 mismatch (array at LBA {header.entries_lba})")

    table = PartitionTable(
        "gpt", str(uuid.UUID(bytes_le=header.disk_guid)).upper(), sector_size=sector,
        first_usable=header.first_usable_lba * sector,
        last_usable=header.last_usable_lba * sector)
    for index in range(count):
        entry = s.GptEntry.parse(array[index * esize:index * esize + s.GPT_ENTRY_SIZE])
        type_guid = uuid.UUID(bytes_le=entry.type_guid)
        if type_guid == s.GPT_TYPE_UNUSED:
            continue
        if entry.first_lba > entry.last_lba or entry.last_lba >= total:
            raise hostile(f"partition {index + 1} (LBA {entry.first_lba}..{entry.last_lba}) "
                          f"lies past the end of the {total}-sector disk or is reversed")
        name = entry.name.decode("utf-16-le", errors="replace").split("\x00", 1)[0]
        table.partitions.append(Partition(
            index + 1, entry.first_lba * sector,
            (entry.last_lba - entry.first_lba + 1) * sector, type_guid, name=name,
            uuid=uuid.UUID(bytes_le=entry.unique_guid), attributes=entry.attributes,
            bootable=bool(entry.attributes & s.GPT_ATTR_LEGACY_BIOS_BOOTABLE)))
    return table


# ---- writing ---------------------------------------------------------------------------------

def _entry(part: NewPartition, start: int, size: int, sector: int) -> bytes:
    if not isinstance(part.type, uuid.UUID) or part.type == s.GPT_TYPE_UNUSED:
        raise InvalidInputError(f"GPT partition type {part.type!r} is not a non-zero GUID")
    name = part.name.encode("utf-16-le")
    if len(name) > s.GPT_NAME_BYTES:
        raise InvalidInputError(f"GPT partition name {part.name!r} is longer than 36 "
                                "UTF-16 code units")
    attributes = part.attributes | (s.GPT_ATTR_LEGACY_BIOS_BOOTABLE if part.bootable else 0)
    built: bytes = s.GptEntry.build({
        "type_guid": part.type.bytes_le,
        "unique_guid": (part.uuid or uuid.uuid4()).bytes_le,
        "first_lba": start // sector,
        "last_lba": (start + size) // sector - 1,
        "attributes": attributes,
        "name": name.ljust(s.GPT_NAME_BYTES, b"\x00"),
    })
    return built


def _header(fields: dict[str, Any], sector: int) -> bytes:
    values = {"signature": s.GPT_SIGNATURE, "revision": s.GPT_REVISION,
              "header_size": s.GPT_HEADER_SIZE, "header_crc32": 0, "reserved": 0, **fields}
    raw: bytes = s.GptHeader.build(values)
    values["header_crc32"] = _crc(raw)
    full: bytes = s.GptHeader.build(values)
    return full.ljust(sector, b"\x00")


def write_gpt(disk_size: int, partitions: Sequence[NewPartition], *,
              disk_guid: uuid.UUID | None = None,
              sector_size: int = s.SECTOR) -> list[tuple[int, bytes]]:
    """The pieces ``(offset, bytes)`` of a new GPT (protective MBR, primary header and array,
    backup array and header) for a disk of ``disk_size`` bytes with ``sector_size``-byte
    logical sectors (512 or 4096), partitions on 1 MiB boundaries. Sector 0's boot code
    (bytes 0..440) is left alone."""
    check_new_disk("GPT", disk_size, sector_size)
    if len(partitions) > NEW_ENTRIES:
        raise InvalidInputError(f"a new GPT holds at most {NEW_ENTRIES} partitions")
    total = disk_size // sector_size
    array_sectors = s.GPT_MIN_ARRAY_BYTES // sector_size
    first_usable = 2 + array_sectors
    last_usable = total - 2 - array_sectors
    placed = layout(partitions, first_usable * sector_size, (last_usable + 1) * sector_size,
                    sector_size)
    array = b"".join(_entry(p, start, size, sector_size)
                     for p, (start, size) in zip(partitions, placed, strict=True))
    array = array.ljust(s.GPT_MIN_ARRAY_BYTES, b"\x00")
    guid = disk_guid or uuid.uuid4()
    common = {"first_usable_lba": first_usable, "last_usable_lba": last_usable,
              "disk_guid": guid.bytes_le, "num_entries": NEW_ENTRIES,
              "entry_size": s.GPT_ENTRY_SIZE, "entries_crc32": _crc(array)}
    backup_array_lba = total - 1 - array_sectors
    primary = _header({**common, "my_lba": 1, "alternate_lba": total - 1, "entries_lba": 2},
                      sector_size)
    backup = _header({**common, "my_lba": total - 1, "alternate_lba": 1,
                      "entries_lba": backup_array_lba}, sector_size)
    protective = entry_bytes(0, s.MBR_TYPE_GPT_PROTECTIVE, 1, min(total - 1, 0xFFFFFFFF),
                             chs_last=b"\xff\xff\xff")
    return [
        (s.MBR_DISK_ID_OFFSET, table_bytes(0, [protective])),
        (sector_size, primary),
        (2 * sector_size, array),
        (backup_array_lba * sector_size, array),
        ((total - 1) * sector_size, backup),
    ]
