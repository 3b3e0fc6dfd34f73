"""Checking VHDX metadata: header and region table copies, metadata items and every BAT entry.

Opening already refuses what makes an image unreadable (no valid header or region table,
regions out of place, bad metadata). ``check`` then lists what reading survives or only
meets when a damaged block is read:

- a damaged copy of a header or of the region table (the other copy is used), or region
  table copies that differ: corruption, since the format keeps two copies exactly so that
  one can be lost;
- metadata items that overlap each other;
- every BAT entry: a state that is reserved or not valid for this kind of image, reserved
  bits set, a block before the end of the header section, past the end of the file, or
  overlapping the log, a region or another block.

VHDX has no reference counts, so unused space in the file is not a leak: qemu-img itself
leaves 4 MiB unused after the metadata region. A pending log is replayed in memory for the
check and reported as a note; writing it back is a repair, which imgbridge does not do.

References: [MS-VHDX] 2.2 (headers, region table), 2.5 (BAT entry states and the rules on
which are valid for fixed, dynamic and differencing images), 2.6.1 (metadata table).
"""

from __future__ import annotations

import itertools

from imgbridge.errors import UnsupportedFeatureError
from imgbridge.model.disk import CheckReport

from . import _structs as S
from .reader import VhdxDisk

__all__ = ["check_image"]

#: Past this many problems of one kind, the rest are counted, not listed one by one.
MAX_LISTED = 50


class _Findings:
    def __init__(self) -> None:
        self.items: dict[str, list[str]] = {}

    def add(self, kind: str, message: str) -> None:
        self.items.setdefault(kind, []).append(message)

    @property
    def count(self) -> int:
        return sum(len(messages) for messages in self.items.values())

    def lines(self) -> list[str]:
        """Detail lines worded like qemu-img's ("ERROR ...")."""
        out = []
        for messages in self.items.values():
            out += [f"ERROR {message}" for message in messages[:MAX_LISTED]]
            if len(messages) > MAX_LISTED:
                out.append(f"ERROR ... and {len(messages) - MAX_LISTED} more like the above")
        return out


def check_image(disk: VhdxDisk, repair: str | None = None) -> CheckReport:
    if repair:
        raise UnsupportedFeatureError(
            "vhdx: check cannot repair images (it only reports); 'qemu-img check -r all' "
            "replays a pending log")
    report = CheckReport(format="vhdx", filename=disk.filename)
    bad = _Findings()
    for damage in disk.damage:
        bad.add("copies", damage)
    report.notes += disk.notes
    if disk.replay.entries:
        report.notes.append(f"log: {disk.log_status()}; Hyper-V or 'qemu-img check -r all' "
                            "would write it into the file")
    _check_metadata_items(disk, bad)
    blocks_end = _check_bat(disk, bad)
    report.corruptions = bad.count
    report.messages = bad.lines()
    ends = [region.end for region in disk.regions] + [blocks_end]
    if disk.header.log_length:
        ends.append(disk.header.log_offset + disk.header.log_length)
    report.image_end_offset = max(ends)
    return report


def _check_metadata_items(disk: VhdxDisk, bad: _Findings) -> None:
    region = disk.metadata_region
    table = disk.host_source.read_at(region.offset, S.METADATA_TABLE_SIZE)
    count = S.MetadataTableHeader.parse(table[:S.METADATA_HEADER_SIZE]).entry_count
    spans = []
    for i in range(count):
        at = S.METADATA_HEADER_SIZE + i * S.METADATA_ENTRY_SIZE
        e = S.MetadataTableEntry.parse(table[at:at + S.METADATA_ENTRY_SIZE])
        if e.length:
            name = S.METADATA_NAMES.get(e.item_id, f"metadata item {S.guid_text(e.item_id)}")
            spans.append((e.offset, e.offset + e.length, name))
    spans.sort()
    for (_, end_a, name_a), (start_b, _, name_b) in itertools.pairwise(spans):
        if start_b < end_a:
            bad.add("metadata", f"metadata items {name_a} and {name_b} overlap")


def _check_bat(disk: VhdxDisk, bad: _Findings) -> int:
    """Check every BAT entry; return the end of the furthest block in the file."""
    has_parent = disk.meta.has_parent
    kind = "differencing" if has_parent else ("fixed" if disk.meta.leave_blocks_allocated
                                              else "dynamic")
    file_size = disk.host_source.size
    ratio = disk.chunk_ratio
    bs = disk.block_size
    spans: list[tuple[int, int, str]] = []
    furthest = 0
    for index in range(disk.bat_entries):
        entry = disk.bat_entry(index)
        state = entry & S.BAT_STATE_MASK
        host = (entry >> S.BAT_OFFSET_SHIFT) << S.BAT_OFFSET_SHIFT
        where = f"BAT entry {index}"
        if entry & S.BAT_RESERVED_MASK:
            bad.add("reserved", f"{where} has reserved bits set ({entry:#x})")
        if index % (ratio + 1) == ratio:  # a sector bitmap entry
            chunk = index // (ratio + 1)
            what = f"{where} (sector bitmap of chunk {chunk})"
            if state == S.SB_BLOCK_NOT_PRESENT:
                continue
            if state != S.SB_BLOCK_PRESENT:
                bad.add("state", f"{what} has reserved state {state}")
                continue
            if not has_parent:
                bad.add("state", f"{what} is present in a {kind} image, where the spec "
                        "requires every sector bitmap entry to be NOT_PRESENT")
                continue
            length = S.SECTOR_BITMAP_BLOCK_SIZE
        else:
            block = index - index // (ratio + 1)
            what = f"{where} (payload block {block})"
            if state == S.PAYLOAD_BLOCK_PARTIALLY_PRESENT and not has_parent:
                bad.add("state", f"{what} is PARTIALLY_PRESENT in a {kind} image")
                continue
            if state == 4:
                bad.add("state", f"{what} has reserved state 4")
                continue
            if state not in (S.PAYLOAD_BLOCK_FULLY_PRESENT, S.PAYLOAD_BLOCK_PARTIALLY_PRESENT):
                continue
            if state == S.PAYLOAD_BLOCK_PARTIALLY_PRESENT:
                sb = disk.bat_entry(disk.bitmap_index(block // ratio))
                if sb & S.BAT_STATE_MASK != S.SB_BLOCK_PRESENT:
                    bad.add("state", f"{what} is PARTIALLY_PRESENT but its chunk's sector "
                            "bitmap is not present")
            # The last block may stop at the disk's end (qemu-img makes such fixed images).
            length = min(bs, disk.size - block * bs)
        if host < S.HEADER_SECTION_SIZE:
            bad.add("place", f"{what} points at {host:#x}, inside the header section")
            continue
        if host + length > file_size:
            bad.add("place", f"{what} at {host:#x} ends past the end of the {file_size}-byte "
                    "file (truncated image?)")
        for start, end, name in disk.reserved[1:]:
            if host < end and start < host + length:
                bad.add("place", f"{what} at {host:#x} overlaps {name}")
        spans.append((host, host + length, what))
        furthest = max(furthest, host + length)
    spans.sort()
    reach, reacher = 0, ""  # the furthest end so far and whose it is
    for start, end, what in spans:
        if start < reach:
            bad.add("overlap", f"{reacher} and {what} overlap in the file")
        if end > reach:
            reach, reacher = end, what
    return furthest
