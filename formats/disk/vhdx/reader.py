"""Reading VHDX: headers, log replay, region table, metadata, the BAT and sector bitmaps.

Opening validates everything a read depends on, in the spec's order: the file identifier;
both headers (CRC-32C, signature, version) and the current one by sequence number; the log,
replayed in memory when it is not empty (log.py); the region table (first copy, else the
second); the metadata table and its items; and, for a differencing image, the parent through
its locator. Every size is checked against the spec's limits and the file before anything is
allocated, so a hostile header cannot make us allocate or loop.

The BAT is not loaded whole: it is read in pages on demand (a 64 TiB disk with 1 MiB blocks
has a 512 MiB BAT). A page's entries are checked when a read needs them, so a damaged entry
makes that read fail with the entry's location, while ``check`` lists every damaged entry.

Block states map to the model's three: FULLY_PRESENT is DATA; ZERO is ZERO (this layer says
zero, the parent is not asked); NOT_PRESENT, UNDEFINED and UNMAPPED are UNALLOCATED: zero
without a parent, the parent's data in a differencing image (for UNDEFINED and UNMAPPED the
spec leaves the content undefined, and the parent's is the content the guest last saw there);
PARTIALLY_PRESENT (differencing only) follows the sector bitmap, sector by sector.

References: [MS-VHDX] 2.2 (headers, region table), 2.3 (log), 2.4 (blocks, chunk ratio),
2.5 (BAT), 2.6 (metadata, parent locator); QEMU block/vhdx.c for how qemu-img reads it.
"""

from __future__ import annotations

import array
import os
import re
import sys
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from imgbridge.crc32c import crc32c_with_zeroed_field
from imgbridge.errors import (
    InvalidImageError,
    MissingCompanionError,
    UnsupportedFeatureError,
)
from imgbridge.model.disk import BlockState, CheckReport, Disk, Run
from imgbridge.resolver import CompanionResolver
from imgbridge.source import ByteSource, read_exact

from . import _structs as S
from .log import LogReplay, OverlaySource, find_active_sequence

#: BAT entries per page read on demand, and how many pages stay cached (16 MiB of table).
BAT_PAGE_ENTRIES = 8192
BAT_CACHE_PAGES = 256
#: Sector bitmaps (one per partially present block) kept in memory.
BITMAP_CACHE = 64


def _bad(message: str, path: str, offset: int | None = None) -> InvalidImageError:
    return InvalidImageError(message, format="vhdx", path=path, offset=offset)


# ---- headers ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class VhdxHeader:
    slot: int  # 0 or 1: header 1 at 64 KiB, header 2 at 128 KiB
    sequence_number: int
    file_write_guid: bytes
    data_write_guid: bytes
    log_guid: bytes
    log_version: int
    version: int
    log_length: int
    log_offset: int

    @property
    def offset(self) -> int:
        return S.HEADER_OFFSETS[self.slot]

    def same_fields(self, other: VhdxHeader) -> bool:
        return (self.sequence_number, self.file_write_guid, self.data_write_guid,
                self.log_guid, self.log_version, self.version, self.log_length,
                self.log_offset) == (other.sequence_number, other.file_write_guid,
                                     other.data_write_guid, other.log_guid, other.log_version,
                                     other.version, other.log_length, other.log_offset)


def parse_header_slot(source: ByteSource, slot: int) -> tuple[VhdxHeader | None, str]:
    """Header ``slot`` (0 or 1) if it is valid, else None and why not."""
    offset = S.HEADER_OFFSETS[slot]
    raw = source.read_at(offset, S.HEADER_SIZE)
    if len(raw) != S.HEADER_SIZE:
        return None, "truncated"
    if raw[:4] != S.HEADER_SIGNATURE:
        return None, "bad signature"
    h = S.Header.parse(raw[:S.HEADER_FIELDS_SIZE])
    if crc32c_with_zeroed_field(raw, S.CHECKSUM_OFFSET) != h.checksum:
        return None, "CRC-32C mismatch"
    if h.version != S.HEADER_VERSION:
        return None, f"version {h.version} (only {S.HEADER_VERSION} is defined)"
    return VhdxHeader(slot, h.sequence_number, h.file_write_guid, h.data_write_guid,
                      h.log_guid, h.log_version, h.version, h.log_length, h.log_offset), ""


def select_header(source: ByteSource) -> tuple[VhdxHeader, list[str]]:
    """The current header (the valid one with the higher sequence number) and a description
    of the other copy when it is damaged."""
    path = source.name
    first, why1 = parse_header_slot(source, 0)
    second, why2 = parse_header_slot(source, 1)
    damage = []
    if first is None and second is None:
        raise _bad(f"no valid header (header 1: {why1}; header 2: {why2})", path,
                   S.HEADER_OFFSETS[0])
    if first is None or second is None:
        good = first or second
        assert good is not None
        bad_slot, why = (1, why1) if first is None else (2, why2)
        damage.append(f"header {bad_slot} is damaged ({why}); the image is read through "
                      f"header {good.slot + 1}")
        return good, damage
    if first.sequence_number == second.sequence_number:
        # Microsoft's Disk2VHD writes two identical headers; anything else is ambiguous.
        if first.same_fields(second):
            return first, damage
        raise _bad(f"both headers have sequence number {first.sequence_number} but differ",
                   path, S.HEADER_OFFSETS[0])
    return (first if first.sequence_number > second.sequence_number else second), damage


def validate_log_placement(h: VhdxHeader, file_size: int, path: str) -> None:
    if h.log_version != S.LOG_VERSION:
        raise UnsupportedFeatureError(f"{path}: VHDX log version {h.log_version} is not "
                                      f"supported (only {S.LOG_VERSION} is defined)")
    if h.log_length % S.ALIGNMENT:
        raise _bad(f"log length {h.log_length} is not a multiple of 1 MiB", path, h.offset + 68)
    if h.log_length:
        if h.log_offset % S.ALIGNMENT or h.log_offset < S.HEADER_SECTION_SIZE:
            raise _bad(f"log offset {h.log_offset:#x} is not a 1 MiB multiple past the header "
                       "section", path, h.offset + 72)
        if h.log_offset + h.log_length > file_size:
            raise _bad(f"the log ({h.log_length} bytes at {h.log_offset:#x}) lies past the end "
                       f"of the {file_size}-byte file (truncated image?)", path, h.log_offset)


# ---- region table -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Region:
    guid: bytes
    offset: int
    length: int
    required: bool

    @property
    def name(self) -> str:
        return S.REGION_NAMES.get(self.guid, S.guid_text(self.guid))

    @property
    def end(self) -> int:
        return self.offset + self.length


def parse_region_table(raw: bytes) -> tuple[list[Region] | None, str]:
    if len(raw) != S.REGION_TABLE_SIZE:
        return None, "truncated"
    head = S.RegionTableHeader.parse(raw[:S.REGION_HEADER_SIZE])
    if head.signature != S.REGION_SIGNATURE:
        return None, "bad signature"
    if crc32c_with_zeroed_field(raw, S.CHECKSUM_OFFSET) != head.checksum:
        return None, "CRC-32C mismatch"
    if head.entry_count > S.MAX_REGION_ENTRIES:
        return None, f"{head.entry_count} entries (at most {S.MAX_REGION_ENTRIES})"
    regions = []
    for i in range(head.entry_count):
        at = S.REGION_HEADER_SIZE + i * S.REGION_ENTRY_SIZE
        e = S.RegionTableEntry.parse(raw[at:at + S.REGION_ENTRY_SIZE])
        regions.append(Region(e.guid, e.file_offset, e.length,
                              bool(e.required & S.REGION_REQUIRED)))
    return regions, ""


def read_region_table(source: ByteSource) -> tuple[list[Region], list[str]]:
    """The region table (copy 1, or copy 2 when copy 1 is damaged) and what is wrong with
    either copy."""
    tables = [parse_region_table(source.read_at(off, S.REGION_TABLE_SIZE))
              for off in S.REGION_TABLE_OFFSETS]
    (first, why1), (second, why2) = tables
    damage = []
    if first is None and second is None:
        raise _bad(f"no valid region table (copy 1: {why1}; copy 2: {why2})", source.name,
                   S.REGION_TABLE_OFFSETS[0])
    if first is None:
        damage.append(f"region table copy 1 is damaged ({why1}); the image is read through copy 2")
        assert second is not None
        return second, damage
    if second is None:
        damage.append(f"region table copy 2 is damaged ({why2})")
    elif first != second:
        damage.append("the two region table copies differ; copy 1 is used")
    return first, damage


def validate_regions(regions: list[Region], h: VhdxHeader, file_size: int,
                     path: str) -> tuple[Region, Region]:
    """Check every region's placement and return the BAT and metadata regions.

    Regions must be 1 MiB aligned, past the header section, inside the file and overlap
    neither each other nor the log; an unknown region marked required cannot be read safely.
    """
    taken: list[tuple[int, int, str]] = []
    if h.log_length:
        taken.append((h.log_offset, h.log_offset + h.log_length, "the log"))
    found: dict[bytes, Region] = {}
    table = S.REGION_TABLE_OFFSETS[0]
    for i, region in enumerate(regions):
        where = table + S.REGION_HEADER_SIZE + i * S.REGION_ENTRY_SIZE
        name = f"{region.name} region"
        if region.guid in found:
            raise _bad(f"the {name} appears twice in the region table", path, where)
        if region.guid not in S.REGION_NAMES:
            if region.required:
                raise UnsupportedFeatureError(
                    f"{path}: the VHDX region {S.guid_text(region.guid)} is marked required "
                    "and imgbridge does not know it, so the image cannot be read safely")
            continue
        found[region.guid] = region
        if region.offset % S.ALIGNMENT or region.offset < S.HEADER_SECTION_SIZE:
            raise _bad(f"the {name} offset {region.offset:#x} is not a 1 MiB multiple past the "
                       "header section", path, where)
        if region.length == 0 or region.length % S.ALIGNMENT:
            raise _bad(f"the {name} length {region.length} is not a non-zero multiple of 1 MiB",
                       path, where)
        if region.end > file_size:
            raise _bad(f"the {name} ({region.length} bytes at {region.offset:#x}) lies past "
                       f"the end of the {file_size}-byte file (truncated image?)", path, where)
        for start, end, other in taken:
            if region.offset < end and start < region.end:
                raise _bad(f"the {name} overlaps {other}", path, where)
        taken.append((region.offset, region.end, f"the {name}"))
    for needed in (S.BAT_REGION, S.METADATA_REGION):
        if needed not in found:
            raise _bad(f"the region table has no {S.REGION_NAMES[needed]} region", path, table)
    return found[S.BAT_REGION], found[S.METADATA_REGION]


# ---- metadata ---------------------------------------------------------------------------------

@dataclass
class Metadata:
    block_size: int
    leave_blocks_allocated: bool
    has_parent: bool
    virtual_size: int
    logical_sector_size: int
    physical_sector_size: int | None
    page83: bytes | None
    parent_locator: dict[str, str] | None
    param_flags: int = 0
    notes: list[str] = field(default_factory=list)


def read_metadata(source: ByteSource, region: Region) -> Metadata:
    path = source.name
    table = read_exact(source, region.offset, S.METADATA_TABLE_SIZE, what="VHDX metadata table")
    head = S.MetadataTableHeader.parse(table[:S.METADATA_HEADER_SIZE])
    if head.signature != S.METADATA_SIGNATURE:
        raise _bad("the metadata table has a bad signature", path, region.offset)
    if head.entry_count > S.MAX_METADATA_ENTRIES:
        raise _bad(f"the metadata table claims {head.entry_count} entries (at most "
                   f"{S.MAX_METADATA_ENTRIES})", path, region.offset + 10)
    items: dict[bytes, bytes] = {}
    notes: list[str] = []
    for i in range(head.entry_count):
        at = S.METADATA_HEADER_SIZE + i * S.METADATA_ENTRY_SIZE
        e = S.MetadataTableEntry.parse(table[at:at + S.METADATA_ENTRY_SIZE])
        where = region.offset + at
        name = S.METADATA_NAMES.get(e.item_id, f"metadata item {S.guid_text(e.item_id)}")
        if e.item_id in items:
            raise _bad(f"{name} appears twice in the metadata table", path, where)
        if e.length and (e.offset < S.METADATA_ITEMS_MIN_OFFSET
                         or e.length > S.METADATA_ITEM_MAX_LENGTH
                         or e.offset + e.length > region.length):
            raise _bad(f"{name} ({e.length} bytes at {e.offset:#x}) lies outside the "
                       "metadata region's item area", path, where)
        if e.item_id not in S.METADATA_NAMES:
            if e.flags & S.META_IS_REQUIRED:
                raise UnsupportedFeatureError(
                    f"{path}: the VHDX metadata item {S.guid_text(e.item_id)} is marked "
                    "required and imgbridge does not know it, so the image cannot be read safely")
            notes.append(f"unknown optional metadata item {S.guid_text(e.item_id)} ignored")
            continue
        want = S.METADATA_ITEM_SIZES.get(e.item_id, 0)
        if e.length < want:
            raise _bad(f"{name} is {e.length} bytes long, it needs {want}", path, where)
        items[e.item_id] = read_exact(source, region.offset + e.offset, e.length, what=name)
    for needed in (S.FILE_PARAMETERS, S.VIRTUAL_DISK_SIZE, S.LOGICAL_SECTOR_SIZE):
        if needed not in items:
            raise _bad(f"the metadata has no {S.METADATA_NAMES[needed]} item", path,
                       region.offset)
    for wanted in (S.PHYSICAL_SECTOR_SIZE, S.PAGE83_DATA):
        if wanted not in items:
            notes.append(f"the metadata has no {S.METADATA_NAMES[wanted]} item")

    params = S.FileParameters.parse(items[S.FILE_PARAMETERS][:8])
    bs = params.block_size
    if not S.MIN_BLOCK_SIZE <= bs <= S.MAX_BLOCK_SIZE or bs & (bs - 1):
        raise _bad(f"block size {bs} is not a power of two from 1 MiB to 256 MiB", path)
    lss = int.from_bytes(items[S.LOGICAL_SECTOR_SIZE][:4], "little")
    if lss not in S.SECTOR_SIZES:
        raise _bad(f"logical sector size {lss} is neither 512 nor 4096", path)
    pss = None
    if S.PHYSICAL_SECTOR_SIZE in items:
        pss = int.from_bytes(items[S.PHYSICAL_SECTOR_SIZE][:4], "little")
        if pss not in S.SECTOR_SIZES:
            raise _bad(f"physical sector size {pss} is neither 512 nor 4096", path)
    size = int.from_bytes(items[S.VIRTUAL_DISK_SIZE][:8], "little")
    if size > S.MAX_VIRTUAL_DISK_SIZE:
        raise _bad(f"virtual disk size {size} exceeds the 64 TiB the format allows", path)
    if size % lss:
        raise _bad(f"virtual disk size {size} is not a multiple of the {lss}-byte sector", path)
    has_parent = bool(params.flags & S.PARAM_HAS_PARENT)
    if params.flags & ~(S.PARAM_HAS_PARENT | S.PARAM_LEAVE_BLOCKS_ALLOCATED):
        notes.append(f"file parameters have reserved bits set ({params.flags:#x})")
    locator = None
    if S.PARENT_LOCATOR in items:
        locator = parse_parent_locator(items[S.PARENT_LOCATOR], path)
    if has_parent and locator is None:
        raise _bad("the image has a parent but no parent locator", path)
    return Metadata(bs, bool(params.flags & S.PARAM_LEAVE_BLOCKS_ALLOCATED), has_parent, size,
                    lss, pss, items.get(S.PAGE83_DATA), locator, params.flags, notes)


def parse_parent_locator(raw: bytes, path: str) -> dict[str, str]:
    """The parent locator's key/value pairs (UTF-16LE strings) of a VHDX parent."""
    if len(raw) < S.PARENT_LOCATOR_HEADER_SIZE:
        raise _bad("the parent locator is too short", path)
    head = S.ParentLocatorHeader.parse(raw[:S.PARENT_LOCATOR_HEADER_SIZE])
    if head.locator_type != S.PARENT_LOCATOR_VHDX:
        raise UnsupportedFeatureError(
            f"{path}: parent locator type {S.guid_text(head.locator_type)} is not supported "
            "(only VHDX parents are)")
    end = S.PARENT_LOCATOR_HEADER_SIZE + head.key_value_count * S.PARENT_LOCATOR_ENTRY_SIZE
    if end > len(raw):
        raise _bad(f"the parent locator's {head.key_value_count} entries run past the item",
                   path)
    out: dict[str, str] = {}
    for i in range(head.key_value_count):
        at = S.PARENT_LOCATOR_HEADER_SIZE + i * S.PARENT_LOCATOR_ENTRY_SIZE
        e = S.ParentLocatorEntry.parse(raw[at:at + S.PARENT_LOCATOR_ENTRY_SIZE])
        spans = ((e.key_offset, e.key_length), (e.value_offset, e.value_length))
        if any(length == 0 or length % 2 or offset < end or offset + length > len(raw)
               for offset, length in spans):
            raise _bad(f"parent locator entry {i} points outside the locator", path)
        try:
            key = raw[e.key_offset:e.key_offset + e.key_length].decode("utf-16-le")
            value = raw[e.value_offset:e.value_offset + e.value_length].decode("utf-16-le")
        except UnicodeDecodeError:
            raise _bad(f"parent locator entry {i} is not valid UTF-16", path) from None
        if key in out:
            raise _bad(f"parent locator key {key!r} appears twice", path)
        out[key] = value
    if "parent_linkage" not in out:
        raise _bad("the parent locator has no parent_linkage", path)
    return out


def parse_guid_string(text: str) -> bytes | None:
    """The on-disk bytes of a GUID written as text ("{...}" in parent locators)."""
    try:
        return uuid.UUID(text.strip().strip("{}")).bytes_le
    except ValueError:
        return None


# ---- the disk ---------------------------------------------------------------------------------

class VhdxDisk(Disk):
    format_name = "vhdx"

    def __init__(self, source: ByteSource, resolver: CompanionResolver,
                 options: Mapping[str, str]) -> None:
        self.path = path = source.name
        self.raw_source = source
        ident = read_exact(source, S.FILE_ID_OFFSET, 8, what="VHDX file identifier")
        if ident != S.FILE_SIGNATURE:
            raise _bad("not a VHDX image (no 'vhdxfile' signature)", path, 0)
        self.creator = _creator(source)
        #: Damage that reading survives (a bad copy of a header or region table): ``check``
        #: reports it as corruption. ``notes`` are remarks that are not damage.
        self.damage: list[str] = []
        self.notes: list[str] = []
        self.header, damage = select_header(source)
        self.damage += damage
        h = self.header
        validate_log_placement(h, source.size, path)
        self.replay = LogReplay([], 0)
        host: ByteSource = source
        if h.log_guid != S.ZERO_GUID and h.log_length:
            self.replay = find_active_sequence(source, h.log_offset, h.log_length, h.log_guid)
            if self.replay.entries:
                flushed = self.replay.entries[-1].flushed_file_offset
                if flushed > source.size:
                    raise _bad(f"the log says the file was {flushed} bytes when it was flushed, "
                               f"it is {source.size} now (truncated image?)", path, h.log_offset)
                host = OverlaySource(source, self.replay)
        self.regions, damage = read_region_table(host)
        self.damage += damage
        self.bat_region, self.metadata_region = validate_regions(self.regions, h, host.size,
                                                                 path)
        self.meta = read_metadata(host, self.metadata_region)
        self.notes += self.meta.notes
        m = self.meta
        super().__init__(m.virtual_size, host=host, filename=path)
        self.block_size = m.block_size
        self.logical_sector_size = m.logical_sector_size
        self.sectors_per_block = m.block_size // m.logical_sector_size
        self.chunk_ratio = S.SECTORS_PER_BITMAP_BLOCK * m.logical_sector_size // m.block_size
        self.payload_blocks = -(-m.virtual_size // m.block_size)
        if m.has_parent:
            chunks = -(-self.payload_blocks // self.chunk_ratio)
            self.bat_entries = chunks * (self.chunk_ratio + 1)
        else:
            self.bat_entries = self.payload_blocks + \
                max(0, self.payload_blocks - 1) // self.chunk_ratio
        if self.bat_entries * S.BAT_ENTRY_SIZE > self.bat_region.length:
            raise _bad(f"the BAT region ({self.bat_region.length} bytes) is too small for the "
                       f"{self.bat_entries} entries a {m.virtual_size}-byte disk with "
                       f"{m.block_size}-byte blocks needs", path, self.bat_region.offset)
        # Everything a payload block must not overlap: header section, log, regions.
        self.reserved: list[tuple[int, int, str]] = [(0, S.HEADER_SECTION_SIZE,
                                                      "the header section")]
        if h.log_length:
            self.reserved.append((h.log_offset, h.log_offset + h.log_length, "the log"))
        for region in self.regions:
            self.reserved.append((region.offset, region.end, f"the {region.name} region"))
        self._bat_pages: OrderedDict[int, array.array[int]] = OrderedDict()
        self._bitmaps: OrderedDict[int, bytes] = OrderedDict()
        self.parent_name: str | None = None
        if m.has_parent:
            self._open_parent(resolver)

    # ---- parent ------------------------------------------------------------------------------

    def _open_parent(self, resolver: CompanionResolver) -> None:
        locator = self.meta.parent_locator
        assert locator is not None
        candidates = []
        if locator.get("relative_path"):
            candidates.append(_posix_path(locator["relative_path"]))
        for key in ("absolute_win32_path", "volume_path"):
            value = locator.get(key, "")
            if value.startswith("/"):  # written by a POSIX tool: usable as it is
                candidates.append(value)
        tried: list[str] = []
        outside: MissingCompanionError | None = None
        for name in candidates:
            try:
                resolver.path(name, "parent disk")
            except MissingCompanionError as exc:
                tried.append(name)
                if "outside" in str(exc) and outside is None:
                    outside = exc
                continue
            parent = resolver.open_disk(name, "parent disk", "vhdx")
            try:
                self._check_linkage(parent, name)
            except BaseException:
                parent.close()
                raise
            self.backing = parent
            self.parent_name = name
            return
        if outside is not None:
            raise outside
        paths = ", ".join(f"{k}={v!r}" for k, v in locator.items() if k.endswith("path"))
        raise MissingCompanionError(
            f"{self.path}: parent disk not found (tried {', '.join(map(repr, tried)) or 'nothing'}"
            f"; the locator holds {paths or 'no path'})",
            hint="put the parent beside the image under its relative_path name")

    def _check_linkage(self, parent: Disk, name: str) -> None:
        """The parent must be the very image this one was made from (its DataWriteGuid)."""
        assert self.meta.parent_locator is not None
        if not isinstance(parent, VhdxDisk):
            raise _bad(f"parent {name!r} is not a VHDX image", self.path)
        wanted = [parse_guid_string(self.meta.parent_locator.get(key, ""))
                  for key in ("parent_linkage", "parent_linkage2")]
        if parent.header.data_write_guid not in [w for w in wanted if w is not None]:
            raise _bad(
                f"parent {name!r} does not match: its DataWriteGuid is "
                f"{S.guid_text(parent.header.data_write_guid)}, this image expects "
                f"{self.meta.parent_locator['parent_linkage']} (the parent changed after "
                "this differencing image was made)", self.path)

    # ---- the BAT -----------------------------------------------------------------------------

    @property
    def host_source(self) -> ByteSource:
        assert self.host is not None
        return self.host

    def bat_entry(self, index: int) -> int:
        page = index // BAT_PAGE_ENTRIES
        table = self._bat_pages.get(page)
        if table is None:
            first = page * BAT_PAGE_ENTRIES
            count = min(BAT_PAGE_ENTRIES, self.bat_entries - first)
            raw = read_exact(self.host_source, self.bat_region.offset + first * S.BAT_ENTRY_SIZE,
                             count * S.BAT_ENTRY_SIZE, what="VHDX BAT")
            table = array.array("Q", raw)
            if sys.byteorder == "big":
                table.byteswap()
            self._bat_pages[page] = table
            if len(self._bat_pages) > BAT_CACHE_PAGES:
                self._bat_pages.popitem(last=False)
        else:
            self._bat_pages.move_to_end(page)
        return table[index % BAT_PAGE_ENTRIES]

    def bat_index(self, block: int) -> int:
        """The BAT index of payload block ``block`` (a sector bitmap entry follows each chunk)."""
        return block + block // self.chunk_ratio

    def bitmap_index(self, chunk: int) -> int:
        return chunk * (self.chunk_ratio + 1) + self.chunk_ratio

    def block_host(self, block: int, entry: int, needed: int, what: str = "payload block") -> int:
        """The file offset of a block whose first ``needed`` bytes must lie in the file."""
        host = (entry >> S.BAT_OFFSET_SHIFT) << S.BAT_OFFSET_SHIFT
        where = self.bat_region.offset + self.bat_index(block) * S.BAT_ENTRY_SIZE \
            if what == "payload block" else None
        for start, end, name in self.reserved:
            if host < end and start < host + needed:
                raise _bad(f"{what} {block} at {host:#x} overlaps {name}", self.path, where)
        if host + needed > self.host_source.size:
            raise _bad(f"{what} {block} at {host:#x} lies past the end of the "
                       f"{self.host_source.size}-byte file (truncated image?)", self.path, where)
        return host

    # ---- block status ------------------------------------------------------------------------

    def block_status(self, offset: int, length: int) -> Iterator[Run]:
        bs = self.block_size
        end = min(self.size, offset + length)
        pending: Run | None = None
        block = offset // bs
        while block * bs < end:
            for run in self._block_runs(block):
                if run.offset + run.length <= offset or run.offset >= end:
                    continue  # a partially present block yields runs outside the range
                if pending is not None and pending.state is run.state \
                        and pending.offset + pending.length == run.offset \
                        and _hosts_follow(pending, run):
                    pending = pending._replace(length=pending.length + run.length)
                    continue
                if pending is not None:
                    yield pending
                pending = run
            block += 1
        if pending is not None:
            yield pending

    def _block_runs(self, block: int) -> Iterator[Run]:
        bs = self.block_size
        guest = block * bs
        n = min(bs, self.size - guest)
        index = self.bat_index(block)
        entry = self.bat_entry(index)
        state = entry & S.BAT_STATE_MASK
        if state == S.PAYLOAD_BLOCK_FULLY_PRESENT:
            yield Run(guest, n, BlockState.DATA, self.block_host(block, entry, n))
        elif state == S.PAYLOAD_BLOCK_ZERO:
            yield Run(guest, n, BlockState.ZERO)
        elif state in (S.PAYLOAD_BLOCK_NOT_PRESENT, S.PAYLOAD_BLOCK_UNDEFINED,
                       S.PAYLOAD_BLOCK_UNMAPPED, S.PAYLOAD_BLOCK_UNMAPPED_V095):
            yield Run(guest, n, BlockState.UNALLOCATED)
        elif state == S.PAYLOAD_BLOCK_PARTIALLY_PRESENT and self.meta.has_parent:
            host = self.block_host(block, entry, n)
            yield from _bitmap_runs(self._sector_bitmap(block), guest, n, host,
                                    self.logical_sector_size)
        else:
            raise _bad(f"BAT entry {index} (payload block {block}) has state "
                       f"{S.PAYLOAD_STATE_NAMES[state]}, invalid in a "
                       f"{'differencing' if self.meta.has_parent else 'non-differencing'} "
                       "image", self.path, self.bat_region.offset + index * S.BAT_ENTRY_SIZE)

    def _sector_bitmap(self, block: int) -> bytes:
        """The bits of ``block``'s sectors (1 = stored here, 0 = ask the parent)."""
        cached = self._bitmaps.get(block)
        if cached is not None:
            self._bitmaps.move_to_end(block)
            return cached
        chunk = block // self.chunk_ratio
        index = self.bitmap_index(chunk)
        entry = self.bat_entry(index)
        if entry & S.BAT_STATE_MASK != S.SB_BLOCK_PRESENT:
            raise _bad(f"payload block {block} is partially present but the sector bitmap of "
                       f"chunk {chunk} is not", self.path,
                       self.bat_region.offset + index * S.BAT_ENTRY_SIZE)
        host = self.block_host(chunk, entry, S.SECTOR_BITMAP_BLOCK_SIZE, "sector bitmap block")
        nbytes = self.sectors_per_block // 8
        at = host + (block % self.chunk_ratio) * nbytes
        bits = read_exact(self.host_source, at, nbytes, what="sector bitmap")
        self._bitmaps[block] = bits
        if len(self._bitmaps) > BITMAP_CACHE:
            self._bitmaps.popitem(last=False)
        return bits

    def read_run(self, run: Run, offset: int, n: int) -> bytes:
        assert run.host_offset is not None
        # block_host() checked that the block lies in the file, so the read is never short.
        return read_exact(self.host_source, run.host_offset + (offset - run.offset), n,
                          what="payload block")

    # ---- description -------------------------------------------------------------------------

    @property
    def subformat(self) -> str:
        if self.meta.has_parent:
            return "differencing"
        return "fixed" if self.meta.leave_blocks_allocated else "dynamic"

    def log_status(self) -> str:
        if self.header.log_guid == S.ZERO_GUID or not self.header.log_length:
            return "empty"
        if not self.replay.entries:
            return "no valid entries (nothing to replay)"
        first, last = self.replay.sequence_numbers or (0, 0)
        count = len(self.replay.entries)
        return (f"replayed in memory ({count} entr{'y' if count == 1 else 'ies'}, "
                f"sequence {first}..{last}; the file was not modified)")

    def format_specific(self) -> dict[str, Any]:
        m = self.meta
        data: dict[str, Any] = {
            "subformat": self.subformat,
            "block-size": m.block_size,
            "logical-sector-size": m.logical_sector_size,
        }
        if m.physical_sector_size is not None:
            data["physical-sector-size"] = m.physical_sector_size
        data["has-parent"] = m.has_parent
        data["log"] = self.log_status()
        if m.page83 is not None:
            data["virtual-disk-id"] = S.guid_text(m.page83)
        data["data-write-guid"] = S.guid_text(self.header.data_write_guid)
        if self.creator:
            data["creator"] = self.creator
        return data

    def info(self) -> dict[str, Any]:
        out = super().info()
        out["cluster-size"] = self.block_size
        return out

    def backing_reference(self) -> tuple[str, str | None] | None:
        return None if self.parent_name is None else (self.parent_name, "vhdx")

    def check(self, repair: str | None = None) -> CheckReport:
        from .check import check_image

        return check_image(self, repair)


def _creator(source: ByteSource) -> str:
    raw = source.read_at(8, S.CREATOR_BYTES)
    raw = raw[:len(raw) - len(raw) % 2]
    text = raw.decode("utf-16-le", "replace")
    return text.split("\0", 1)[0].strip()


def _posix_path(windows_path: str) -> str:
    """A relative path as Hyper-V writes it (".\\parent.vhdx") in POSIX form."""
    path = windows_path.replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    return os.path.normpath(path) if path else path


def _hosts_follow(a: Run, b: Run) -> bool:
    if a.host_offset is None or b.host_offset is None:
        return a.host_offset is None and b.host_offset is None
    return a.host_offset + a.length == b.host_offset


_FULL_BYTES = re.compile(rb"\x00+|\xff+")


def _bitmap_runs(bits: bytes, guest: int, n: int, host: int, sector: int) -> Iterator[Run]:
    """Runs of one partially present block: set bits are stored here, clear ones are not.

    Whole 0x00 / 0xff bytes are found by a regular expression (C speed); only the mixed bytes
    between them are looked at bit by bit.
    """
    limit = -(-n // sector)  # sectors inside the virtual disk

    def emit(first: int, count: int, stored: bool) -> Iterator[Run]:
        count = min(count, limit - first)
        if count <= 0:
            return
        start = first * sector
        length = min(count * sector, n - start)
        if stored:
            yield Run(guest + start, length, BlockState.DATA, host + start)
        else:
            yield Run(guest + start, length, BlockState.UNALLOCATED)

    def mixed(byte_index: int) -> Iterator[Run]:
        byte = bits[byte_index]
        bit = 0
        while bit < 8:
            value = byte >> bit & 1
            stop = bit
            while stop < 8 and (byte >> stop & 1) == value:
                stop += 1
            yield from emit(byte_index * 8 + bit, stop - bit, bool(value))
            bit = stop

    pos = 0  # byte index in bits
    for match in _FULL_BYTES.finditer(bits):
        for byte_index in range(pos, match.start()):
            yield from mixed(byte_index)
        yield from emit(match.start() * 8, (match.end() - match.start()) * 8,
                        match.group()[0] == 0xFF)
        pos = match.end()
    for byte_index in range(pos, len(bits)):
        yield from mixed(byte_index)
