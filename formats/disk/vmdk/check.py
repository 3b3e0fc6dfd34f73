"""Checking VMDK metadata: grain directories, grain tables, grains, redundant copies, leaks.

For every sparse extent, each grain directory entry, grain table entry and (in a stream) each
marker is checked against the file: entries past the end, grains inside the metadata or not
aligned to a grain, grain markers that name another grain, grain tables not where their
directory says, a redundant directory or table that disagrees with the primary. Every byte
range in use is then sorted: two ranges sharing bytes are overlapping grains (corruption);
file data after the metadata that nothing refers to is a leak. qemu-img's own check only looks
for grains past the end of the file.

Memory grows with the number of allocated grains (one tuple each: ~200 MB for 1 TiB of data
in 64 KiB grains); the tables themselves are read one at a time.

References: VMware "Virtual Disk Format 5.0" ("Grain Directories and Grain Tables",
"Stream-Optimized Compressed Sparse Extents").
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from imgbridge.errors import UnsupportedFeatureError
from imgbridge.model.disk import MAX_IO, CheckReport
from imgbridge.source import ByteSource

from . import _structs as S

if TYPE_CHECKING:
    from .reader import SparseExtent, VmdkDisk

#: Messages kept per extent and kind; past this the rest are counted in one summary line.
MAX_DETAILS = 50


class _Findings:
    """Problems of one kind for one extent: all counted, the first MAX_DETAILS worded."""

    def __init__(self, label: str, prefix: str) -> None:
        self.label = label
        self.prefix = prefix
        self.count = 0
        self.items: list[str] = []

    def add(self, message: str) -> None:
        self.count += 1
        if len(self.items) < MAX_DETAILS:
            self.items.append(f"{self.prefix} {self.label}: {message}")

    def lines(self) -> list[str]:
        more = self.count - len(self.items)
        return self.items + ([f"{self.prefix} {self.label}: ... and {more} more"] if more else [])


class _Stats:
    """qemu-img check's cluster statistics, counted in grains."""

    def __init__(self) -> None:
        self.total = 0
        self.allocated = 0
        self.fragmented = 0
        self.compressed = 0


def check_disk(disk: VmdkDisk, repair: str | None) -> CheckReport:
    """Check every sparse extent of ``disk``; flat and zero extents have no metadata."""
    if repair:
        raise UnsupportedFeatureError(
            "vmdk: repairing is not supported (qemu-img cannot either); convert the image to a "
            "new one to drop leaked or damaged grains")
    report = CheckReport(format="vmdk", filename=disk.filename)
    sparse = disk.sparse_extents
    if not sparse:
        report.notes.append("the disk has only flat or zero extents: no grain tables to check")
    stats = _Stats()
    for extent in sparse:
        corruptions, leaks = check_extent(extent, stats, report.notes)
        report.corruptions += corruptions.count
        report.leaks += leaks.count
        report.messages += corruptions.lines() + leaks.lines()
        report.notes += [f"{os.path.basename(extent.filename)}: {note}"
                         for note in extent.fallbacks]
    report.total_clusters = stats.total
    report.allocated_clusters = stats.allocated
    report.fragmented_clusters = stats.fragmented
    report.compressed_clusters = stats.compressed
    return report


def check_extent(ext: SparseExtent, stats: _Stats,
                 notes: list[str]) -> tuple[_Findings, _Findings]:
    """The corruptions and leaks of one sparse extent; ``stats`` and ``notes`` are added to."""
    h = ext.header
    src = ext.host
    size = src.size
    label = os.path.basename(ext.filename)
    bad = _Findings(label, "ERROR")
    leaks = _Findings(label, "Leaked")
    stats.total += h.grains
    previous_end = -1
    sec = S.SECTOR
    gb = ext.grain_bytes
    #: (start, end, what) of every byte range in use.
    used: list[tuple[int, int, str]] = [(0, sec, "header")]
    if h.descriptor_size:
        used.append((h.descriptor_offset * sec, (h.descriptor_offset + h.descriptor_size) * sec,
                     "embedded descriptor"))
    directories = [("grain directory", h.gd_offset, ext.gd)]
    if ext.rgd is not None:
        directories.append(("redundant grain directory", h.rgd_offset, ext.rgd))
    metadata_end = h.overhead * sec
    for name, sector, _ in directories:
        used.append((sector * sec - _marker_room(h, sector), (sector + h.gd_sectors) * sec,
                     name))
    if h.gd_at_end:
        used.append((size - S.STREAM_TAIL_SIZE, size, "footer and end-of-stream marker"))

    for index in range(len(ext.gd)):
        primary = ext.gd[index]
        redundant = ext.rgd[index] if ext.rgd is not None else None
        if redundant is not None and bool(primary) != bool(redundant):
            bad.add(f"grain directory entry {index} is {primary} but the redundant directory "
                    f"says {redundant}")
        table = _table(ext, index, primary, "grain table", bad, used)
        if redundant:
            copy = _table(ext, index, redundant, "redundant grain table", bad, used)
            if table is not None and copy is not None and table != copy:
                first = next(i for i in range(S.GTES_PER_GT) if table[i] != copy[i])
                bad.add(f"redundant grain table {index} disagrees with the primary (entry "
                        f"{first}: {table[first]} against {copy[first]})")
        if table is None:
            continue
        for entry_index, entry in enumerate(table):
            if entry == 0:
                continue
            grain = index * S.GTES_PER_GT + entry_index
            where = f"grain {grain} (guest offset {grain * gb:#x})"
            if grain * h.grain_size >= h.capacity:
                bad.add(f"grain table {index} maps {where}, beyond the capacity")
                continue
            if entry == S.GTE_ZEROED and (h.zeroed_grain_gte or h.compressed):
                continue
            at = entry * sec
            if h.compressed:
                end = _grain_marker_end(ext, grain, at, bad, where)
                if end is None:
                    continue
            else:
                end = at + gb
                if entry % h.grain_size:
                    bad.add(f"{where} is at sector {entry}, not aligned to a grain")
                if at >= size:
                    bad.add(f"{where} is at offset {at:#x}, past the end of the "
                            f"{size}-byte file")
                    continue
                if end > size:
                    bad.add(f"{where} runs past the end of the file")
            if at < metadata_end:
                bad.add(f"{where} is at sector {entry}, inside the metadata")
                continue
            used.append((at, end, where))
            stats.allocated += 1
            if h.compressed:
                stats.compressed += 1
            if previous_end >= 0 and at != previous_end:
                stats.fragmented += 1
            previous_end = end

    used.sort()
    reach = 0
    reach_what = ""
    for start, end, what in used:
        if start < reach:
            bad.add(f"{what} and {reach_what} overlap in the file at offset {start:#x}")
        elif start > max(reach, metadata_end):
            # Below overHead lies metadata and its padding; past it every byte should belong
            # to a grain or a table.
            _leak(src, max(reach, metadata_end), start, leaks, notes)
        if end > reach:
            reach, reach_what = end, what
    if size > max(reach, metadata_end):
        _leak(src, max(reach, metadata_end), size, leaks, notes)
    return bad, leaks


def _marker_room(h: S.Header, sector: int) -> int:
    """Bytes of the metadata marker before a table at ``sector``: a stream has one before each
    table it writes after its grains (those at the front, below overHead, have none)."""
    return S.SECTOR if h.markers and sector >= h.overhead else 0


def _table(ext: SparseExtent, index: int, sector: int, name: str, bad: _Findings,
           used: list[tuple[int, int, str]]) -> list[int] | None:
    """Grain table ``index`` at ``sector`` as a list, after checking where it lies."""
    if not sector:
        return None
    h = ext.header
    at = sector * S.SECTOR
    size = ext.host.size
    if at + S.GTES_PER_GT * S.GTE_SIZE > size:
        bad.add(f"{name} {index} at sector {sector} lies past the end of the {size}-byte file")
        return None
    if at < S.SECTOR:
        bad.add(f"{name} {index} is at sector 0, over the header")
        return None
    start = at - _marker_room(h, sector)
    if start != at:
        marker = S.MetadataMarker.parse(ext.host.read_at(at - S.SECTOR, S.METADATA_MARKER_SIZE))
        if (marker.size, marker.type, marker.num_sectors) != (0, S.MARKER_GT, S.GT_SECTORS):
            bad.add(f"{name} {index} at sector {sector} is not preceded by a grain-table marker")
    used.append((start, at + S.GT_SECTORS * S.SECTOR, f"{name} {index}"))
    table = ext.read_table(sector)
    return list(table) if table is not None else None


def _grain_marker_end(ext: SparseExtent, grain: int, at: int, bad: _Findings,
                      where: str) -> int | None:
    """The end (sector-aligned) of the compressed grain whose marker is at ``at``."""
    h = ext.header
    size = ext.host.size
    if at + S.GRAIN_MARKER_SIZE > size:
        bad.add(f"{where}: its grain marker at offset {at:#x} is past the end of the file")
        return None
    if not h.markers:
        # Without markers the payload's length is not recorded: count one sector.
        return at + S.SECTOR
    marker = S.GrainMarker.parse(ext.host.read_at(at, S.GRAIN_MARKER_SIZE))
    if marker.lba != grain * h.grain_size:
        bad.add(f"{where}: the marker at offset {at:#x} is for sector {marker.lba}")
    end = at + S.GRAIN_MARKER_SIZE + int(marker.size)
    if marker.size == 0 or marker.size > 2 * ext.grain_bytes + S.SECTOR:
        bad.add(f"{where}: compressed size {marker.size} is invalid")
        return at + S.SECTOR
    if end > size:
        bad.add(f"{where}: compressed data runs past the end of the file")
    return -(-end // S.SECTOR) * S.SECTOR


def _leak(src: ByteSource, start: int, end: int, leaks: _Findings, notes: list[str]) -> None:
    """Report ``[start, end)`` as leaked when the file stores non-zero bytes there.

    Holes cost nothing; stored zeros that nothing refers to are noted, not counted: qemu-img
    7.2 leaves a grain's worth of them after a stream's last grain (it zero-fills a whole
    grain before writing the compressed one over it), and calling every such image leaky
    would hide real leaks."""
    stored = 0
    nonzero = False
    for run in src.runs(start, end - start):
        if not run.data:
            continue
        stored += run.length
        pos = run.offset
        while not nonzero and pos < run.offset + run.length:
            n = min(MAX_IO, run.offset + run.length - pos)
            nonzero = src.read_at(pos, n).count(0) != n
            pos += n
    if nonzero:
        leaks.add(f"{end - start} bytes at offset {start:#x} are stored in the file but no "
                  "grain table refers to them")
    elif stored:
        notes.append(f"{leaks.label}: {stored} bytes of zeros at offset {start:#x} belong to "
                     "no grain (padding some writers leave); not counted as a leak")
