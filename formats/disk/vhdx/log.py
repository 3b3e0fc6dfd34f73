"""The VHDX log: find the active sequence of entries and replay it in memory, never on disk.

A writer (Hyper-V, qemu) updates metadata (BAT entries, sector bitmaps, metadata items)
by first appending a log entry that holds the new 4 KiB sectors, then writing them in
place. If it stops in between, the header's LogGuid is left non-zero and the metadata in
place may be stale: the spec says the log MUST be replayed before the file is read.
Writing to an image we were asked to read is not ours to do, so the replay builds an
overlay: a ``ByteSource`` that shows the file as it would be after the replay, and every
later read of the image (region table, metadata, BAT, payload) goes through it.

Finding the active sequence (MS-VHDX 2.3.3): every 4 KiB log sector may start an entry.
An entry is valid when its signature, length, sequence number, LogGuid, descriptors, data
sectors and CRC-32C all check out. Valid entries that follow each other in the circular log
with consecutive sequence numbers form a sequence; a sequence counts only when its newest
entry's Tail points at one of its own entries (the oldest not yet applied), and the active
sequence is the counting one with the highest sequence number. Its entries from the Tail to
the newest are applied in order. No valid sequence means nothing to replay (this is what a
torn first log write leaves behind, and qemu treats it the same way).

Memory stays bounded: the log region is read sector by sector, and replay keeps only the
sectors the log restores (data descriptors) and the ranges it zeroes, so at most the log's
own size. Logs larger than MAX_REPLAY_LOG are refused rather than replayed.

References: [MS-VHDX] 2.3 (Log), 2.3.1 (log entry header, descriptors, data sector),
2.3.2 (log sequence), 2.3.3 (log replay).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from imgbridge.crc32c import crc32c
from imgbridge.errors import InvalidImageError, UnsupportedFeatureError
from imgbridge.source import ByteSource

from . import _structs as S

__all__ = ["LogReplay", "OverlaySource", "MAX_REPLAY_LOG", "find_active_sequence"]

#: The largest log we replay. Hyper-V and qemu make 1 MiB logs; a log needing replay that is
#: larger than this is refused (UnsupportedFeatureError) to keep memory and time bounded.
MAX_REPLAY_LOG = 32 * S.MiB
#: Candidate entries may overlap (a stale entry's header can survive while newer entries
#: overwrote its body), so the search may read a sector more than once; a crafted log whose
#: every sector starts a log-sized entry would make that quadratic. Reading more than this
#: many times the log's size is refused as a malformed log.
SCAN_BUDGET_FACTOR = 4


@dataclass
class LogEntry:
    """One valid log entry: where it starts in the log and what it asks to write."""

    position: int  # byte offset inside the log
    length: int
    sequence_number: int
    tail: int
    flushed_file_offset: int
    last_file_offset: int
    #: (file offset, 4096 bytes) for data descriptors, (file offset, length) for zero ones.
    writes: list[tuple[int, bytes | int]] = field(default_factory=list)


@dataclass
class LogReplay:
    """The result of the log search: the entries to apply, in order (possibly none)."""

    entries: list[LogEntry]
    #: How many valid entries the log holds in all (older sequences included).
    valid_entries: int

    @property
    def sequence_numbers(self) -> tuple[int, int] | None:
        if not self.entries:
            return None
        return self.entries[0].sequence_number, self.entries[-1].sequence_number


class _LogReader:
    """Reads 4 KiB log sectors by index, wrapping around the circular log, within a budget."""

    def __init__(self, source: ByteSource, offset: int, length: int) -> None:
        self.source = source
        self.offset = offset
        self.length = length
        self.sectors = length // S.LOG_SECTOR_SIZE
        self.budget = SCAN_BUDGET_FACTOR * self.sectors + 256

    def sector(self, index: int) -> bytes:
        self.budget -= 1
        if self.budget < 0:
            raise InvalidImageError(
                "the log is malformed: its candidate entries overlap so much that searching "
                f"them would read it more than {SCAN_BUDGET_FACTOR} times over",
                format="vhdx", path=self.source.name, offset=self.offset)
        pos = self.offset + (index % self.sectors) * S.LOG_SECTOR_SIZE
        data = self.source.read_at(pos, S.LOG_SECTOR_SIZE)
        if len(data) != S.LOG_SECTOR_SIZE:
            raise InvalidImageError("truncated: the log runs past the end of the file",
                                    format="vhdx", path=self.source.name, offset=pos)
        return data


def _parse_entry(log: _LogReader, first: int, log_guid: bytes) -> LogEntry | None:
    """The valid entry starting at sector ``first``, or None (any defect makes it invalid)."""
    head = log.sector(first)
    if head[:4] != S.LOG_ENTRY_SIGNATURE:
        return None
    h = S.LogEntryHeader.parse(head[:S.LOG_ENTRY_HEADER_SIZE])
    length = h.entry_length
    if length == 0 or length % S.LOG_SECTOR_SIZE or length > log.length:
        return None
    if h.sequence_number == 0 or h.log_guid != log_guid:
        return None
    if h.tail % S.LOG_SECTOR_SIZE or h.tail >= log.length:
        return None
    total = length // S.LOG_SECTOR_SIZE
    desc_sectors = S.descriptor_sectors(h.descriptor_count)
    if desc_sectors > total:
        return None
    # The checksum covers the whole entry with its own field as zero.
    crc = crc32c(head[:S.CHECKSUM_OFFSET] + bytes(4) + head[S.CHECKSUM_OFFSET + 4:])
    desc_bytes = bytearray(head[S.LOG_ENTRY_HEADER_SIZE:])
    sectors: list[bytes] = []
    for i in range(1, total):
        sector = log.sector(first + i)
        crc = crc32c(sector, crc)
        if i < desc_sectors:
            desc_bytes += sector
        else:
            sectors.append(sector)
    if crc != h.checksum:
        return None
    entry = LogEntry(first * S.LOG_SECTOR_SIZE, length, h.sequence_number, h.tail,
                     h.flushed_file_offset, h.last_file_offset)
    data_sectors = iter(sectors)
    for i in range(h.descriptor_count):
        raw = bytes(desc_bytes[i * S.LOG_DESCRIPTOR_SIZE:(i + 1) * S.LOG_DESCRIPTOR_SIZE])
        signature = raw[:4]
        if signature == S.ZERO_DESCRIPTOR_SIGNATURE:
            zero = S.ZeroDescriptor.parse(raw)
            if zero.sequence_number != h.sequence_number or zero.file_offset % S.LOG_SECTOR_SIZE \
                    or zero.zero_length % S.LOG_SECTOR_SIZE:
                return None
            entry.writes.append((zero.file_offset, zero.zero_length))
        elif signature == S.DATA_DESCRIPTOR_SIGNATURE:
            desc = S.DataDescriptor.parse(raw)
            if desc.sequence_number != h.sequence_number or desc.file_offset % S.LOG_SECTOR_SIZE:
                return None
            data_sector = next(data_sectors, None)
            if data_sector is None or data_sector[:4] != S.DATA_SECTOR_SIGNATURE:
                return None
            ds = S.DataSector.parse(data_sector)
            if (ds.sequence_high << 32 | ds.sequence_low) != h.sequence_number:
                return None
            entry.writes.append((desc.file_offset,
                                 desc.leading_bytes + ds.data + desc.trailing_bytes))
        else:
            return None
    return entry


def find_active_sequence(source: ByteSource, log_offset: int, log_length: int,
                         log_guid: bytes) -> LogReplay:
    """Scan the log and return the active sequence's entries from its tail to its head."""
    if log_length > MAX_REPLAY_LOG:
        raise UnsupportedFeatureError(
            f"{source.name}: the VHDX log ({log_length >> 20} MiB) must be replayed, and "
            f"imgbridge replays logs of at most {MAX_REPLAY_LOG >> 20} MiB; open the image "
            "once read-write with Hyper-V or 'qemu-img check -r all' to replay it")
    log = _LogReader(source, log_offset, log_length)
    entries: dict[int, LogEntry] = {}  # by sector index
    for index in range(log.sectors):
        entry = _parse_entry(log, index, log_guid)
        if entry is not None:
            entries[index] = entry

    def successor(entry: LogEntry) -> LogEntry | None:
        nxt = entries.get(((entry.position + entry.length) % log.length) // S.LOG_SECTOR_SIZE)
        if nxt is not None and nxt.sequence_number == entry.sequence_number + 1:
            return nxt
        return None

    has_predecessor = set()
    for entry in entries.values():
        nxt = successor(entry)
        if nxt is not None:
            has_predecessor.add(nxt.position)
    best: list[LogEntry] = []
    for entry in sorted(entries.values(), key=lambda e: e.position):
        if entry.position in has_predecessor:
            continue
        chain = [entry]
        while (nxt := successor(chain[-1])) is not None and len(chain) <= len(entries):
            chain.append(nxt)
        head = chain[-1]
        starts = [i for i, e in enumerate(chain) if e.position == head.tail]
        if not starts:
            continue  # the head's tail is not in this sequence: not a complete sequence
        if not best or head.sequence_number > best[-1].sequence_number:
            best = chain[starts[0]:]
    return LogReplay(best, len(entries))


class OverlaySource(ByteSource):
    """A read-only view of ``base`` with a replayed log applied on top.

    Writes are applied in log order: a later write to the same sector wins. Data writes are
    whole 4 KiB sectors, kept in a dict; zero writes are ranges, each with the position
    (generation) of the write, so that a data sector written before a zero range is hidden
    by it and one written after shows through.
    """

    def __init__(self, base: ByteSource, replay: LogReplay) -> None:
        self._base = base
        self.name = base.name
        self._sectors: dict[int, tuple[int, bytes]] = {}  # offset -> (generation, bytes)
        self._zeros: list[tuple[int, int, int]] = []  # (start, end, generation), by start
        generation = 0
        size = base.size
        for entry in replay.entries:
            size = max(size, entry.last_file_offset)
            for offset, what in entry.writes:
                generation += 1
                if isinstance(what, bytes):
                    self._sectors[offset] = (generation, what)
                    size = max(size, offset + len(what))
                elif what:
                    self._zeros.append((offset, offset + what, generation))
                    size = max(size, offset + what)
        self._zeros.sort()
        self._zero_starts = [z[0] for z in self._zeros]
        self._size = size
        spans = [(o, o + S.LOG_SECTOR_SIZE) for o in self._sectors] + \
                [(a, b) for a, b, _ in self._zeros]
        self._lo = min((a for a, _ in spans), default=0)
        self._hi = max((b for _, b in spans), default=0)

    @property
    def size(self) -> int:
        return self._size

    @property
    def base(self) -> ByteSource:
        return self._base

    def read_at(self, offset: int, n: int) -> bytes:
        end = min(self._size, offset + n)
        if offset >= end:
            return b""
        data = self._base.read_at(offset, end - offset)
        if len(data) < end - offset:  # the replay may extend the file (LastFileOffset)
            data += bytes(end - offset - len(data))
        if end <= self._lo or offset >= self._hi:
            return data
        buf = bytearray(data)
        first = offset - offset % S.LOG_SECTOR_SIZE
        for sector in range(first, end, S.LOG_SECTOR_SIZE):
            content = self._sector_content(sector)
            if content is None:
                continue
            lo, hi = max(sector, offset), min(sector + S.LOG_SECTOR_SIZE, end)
            buf[lo - offset:hi - offset] = content[lo - sector:hi - sector]
        return bytes(buf)

    def _sector_content(self, sector: int) -> bytes | None:
        """What the replay left in the 4 KiB sector at ``sector``, or None if untouched."""
        written = self._sectors.get(sector)
        zero_generation = 0
        i = bisect.bisect_right(self._zero_starts, sector)
        for start, stop, gen in self._zeros[:i]:
            if start <= sector < stop and gen > zero_generation:
                zero_generation = gen
        if written is not None and written[0] > zero_generation:
            return written[1]
        if zero_generation:
            return bytes(S.LOG_SECTOR_SIZE)
        return None

    def close(self) -> None:
        self._base.close()
