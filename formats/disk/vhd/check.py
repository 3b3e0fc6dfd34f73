"""Checking a VHD's metadata (qemu-img has no check for this format; this is ours).

Corruptions (exit 2): a footer whose checksum is wrong or that is missing, footer copies that
differ, a BAT entry whose block runs past the end of the file or into the end footer, blocks
that overlap each other or the metadata (footer copy, header, BAT, parent locators).
Leaks (exit 3): blocks allocated for BAT entries beyond the virtual size, which no guest
offset reaches.

A dynamic header with a wrong checksum stops the image from opening (the BAT's place and the
block size come from it, and there is no copy), so ``check`` reports that as an error (exit 1).
The image is only read: ``repair`` is refused.

References: "Virtual Hard Disk Image Format Specification" v1.0 ("Hard Disk Footer Format",
"Dynamic Disk Header Format", "Block Allocation Table and Data Blocks").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise
from typing import TYPE_CHECKING

from imgbridge.errors import UnsupportedFeatureError
from imgbridge.model.disk import CheckReport
from imgbridge.source import ByteSource

from . import _structs as S

if TYPE_CHECKING:
    from .reader import VhdDisk

#: Corruption messages listed one by one before the rest are summarised.
MAX_LISTED = 50


@dataclass
class Findings:
    """What the checks found, as detail lines; counted into a CheckReport at the end."""

    corruptions: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    image_end_offset: int | None = None


def check_disk(disk: VhdDisk, repair: str | None) -> CheckReport:
    if repair:
        raise UnsupportedFeatureError(
            "vhd: check -r (repair) is not supported; convert the image to a new VHD to "
            "rebuild its metadata")
    host = disk.host
    assert host is not None
    found = Findings()
    _check_footers(disk, host, found)
    if disk.header is not None:
        _check_blocks(disk, found)
    else:
        found.image_end_offset = disk.footer_offset + S.FOOTER_SIZE
    messages = [f"ERROR {line}" for line in found.corruptions[:MAX_LISTED]]
    if len(found.corruptions) > MAX_LISTED:
        messages.append(f"ERROR ... and {len(found.corruptions) - MAX_LISTED} more")
    messages += [f"Leaked {line}" for line in found.leaks[:MAX_LISTED]]
    return CheckReport(
        format="vhd", filename=disk.filename, corruptions=len(found.corruptions),
        leaks=len(found.leaks), image_end_offset=found.image_end_offset, messages=messages,
        notes=found.notes)


def _footer_problem(raw: bytes, at: int) -> str | None:
    if len(raw) < S.OLD_FOOTER_SIZE or raw[:8] != S.FOOTER_COOKIE:
        return f"no footer (\"conectix\" cookie) at offset {at:#x}"
    raw = raw.ljust(S.FOOTER_SIZE, b"\0")
    stored = S.Footer.unpack(raw).checksum
    computed = S.checksum(raw, S.FOOTER_CHECKSUM_AT)
    if stored != computed:
        return f"footer at offset {at:#x}: checksum {stored:#010x}, expected {computed:#010x}"
    return None


def _check_footers(disk: VhdDisk, host: ByteSource, found: Findings) -> None:
    size = host.size
    end_at = size - S.FOOTER_SIZE
    end_raw = host.read_at(end_at, S.FOOTER_SIZE)
    if end_raw[:8] != S.FOOTER_COOKIE and disk.footer_offset == size - S.OLD_FOOTER_SIZE:
        end_at, end_raw = disk.footer_offset, host.read_at(disk.footer_offset,
                                                           S.OLD_FOOTER_SIZE)
        found.notes.append("the image ends with a 511-byte footer (made before Virtual PC "
                            "2004)")
    problem = _footer_problem(end_raw, end_at)
    if problem:
        found.corruptions.append(problem)
    if disk.disk_type == S.DISK_FIXED:
        return
    head_raw = host.read_at(0, S.FOOTER_SIZE)
    head_problem = _footer_problem(head_raw, 0)
    if head_problem:
        found.corruptions.append(head_problem)
    elif not problem and head_raw != end_raw.ljust(S.FOOTER_SIZE, b"\0"):
        found.corruptions.append("the footer copy at offset 0 differs from the footer at "
                                  f"offset {end_at:#x}")


def _check_blocks(disk: VhdDisk, found: Findings) -> None:
    header = disk.header
    assert header is not None
    file_size = disk.file_size
    footer_at = disk.footer_offset if disk.footer_offset else file_size - S.FOOTER_SIZE
    # Metadata regions: (start, end, name).
    regions: list[tuple[int, int, str]] = [
        (disk.footer.data_offset, disk.footer.data_offset + S.HEADER_SIZE, "dynamic header"),
        (header.table_offset, header.table_offset + header.max_table_entries * 4, "BAT"),
    ]
    regions.append((0, S.FOOTER_SIZE, "footer copy"))
    for index, loc in enumerate(header.parent_locators):
        if loc.platform_code != S.PLATFORM_NONE and loc.platform_data_length:
            start = loc.platform_data_offset
            regions.append((start, start + loc.platform_data_length, f"parent locator {index}"))
    span = disk.bitmap_size + disk.block_size
    blocks: list[tuple[int, int, int]] = []  # (start, end, index)
    needed = -(-disk.size // disk.block_size)
    for index, entry in enumerate(disk.bat):
        if entry == S.BAT_FREE:
            continue
        start = entry * S.SECTOR
        end = start + span
        if end > footer_at:
            where = "past the end of the file" if end > file_size else "into the footer"
            found.corruptions.append(
                f"block {index}: BAT entry {entry} (offset {start:#x}) runs {where}")
            continue
        if index >= needed:
            found.leaks.append(f"block {index} at offset {start:#x}: beyond the virtual size")
        blocks.append((start, end, index))
        for r_start, r_end, name in regions:
            if start < r_end and r_start < end:
                found.corruptions.append(
                    f"block {index} at offset {start:#x} overlaps the {name}")
    blocks.sort()  # every block spans the same length: only neighbours can overlap
    for (a_start, a_end, a_index), (b_start, _, b_index) in pairwise(blocks):
        if b_start < a_end:
            found.corruptions.append(
                f"blocks {a_index} (offset {a_start:#x}) and {b_index} (offset {b_start:#x}) "
                "overlap")
    data_end = max((end for _, end, _ in blocks), default=0)
    meta_end = max(end for _, end, _ in regions)
    found.image_end_offset = max(data_end, meta_end) + S.FOOTER_SIZE

