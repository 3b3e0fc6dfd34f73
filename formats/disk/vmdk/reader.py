"""Reading VMDK: descriptors, flat / zero / sparse extents, stream-optimized grains, deltas.

A VMDK disk is a list of extents laid end to end in guest order. The descriptor (a text file,
or a text block inside a monolithic sparse extent) names them. Flat extents are plain bytes in
a file; sparse extents map grains through a two-level table (grain directory -> grain tables
-> grains), possibly compressed, one deflate stream per grain behind a 12-byte grain marker.
``block_status`` answers per grain from those tables and merges neighbours into runs; a hole
is never read, a compressed grain is read whole, inflated once and sliced.

Every size in a header is checked against the file and against fixed limits before anything
is read or allocated, so a hostile header gives one clear error instead of a memory blow-up.

References: VMware "Virtual Disk Format 5.0" (and 1.1); QEMU ``block/vmdk.c`` for what
qemu-img accepts and reports.
"""

from __future__ import annotations

import array
import bisect
import os
import struct
import sys
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

from imgbridge.errors import (
    InvalidImageError,
    InvalidInputError,
    UnsupportedFeatureError,
)
from imgbridge.model.disk import BlockState, CheckReport, Disk, Run, merge_runs
from imgbridge.resolver import CompanionResolver
from imgbridge.source import ByteSource, RangeSource, read_exact

from . import _structs as S
from .descriptor import Descriptor, DescriptorError, ExtentLine, decode, parse

__all__ = ["FlatExtent", "SparseExtent", "VmdkDisk", "ZeroExtent", "parse_header"]

#: Grain tables kept in memory per disk, whatever its number of extents (2 KiB each): 8192
#: tables map 256 GiB of 64 KiB grains.
GT_CACHE_TABLES = 8192
#: When a delta's parentCID differs from its parent's CID, this open option reads it anyway.
IGNORE_CID = "ignore_cid"


def _bad(message: str, path: str, offset: int | None = None, *,
         hint: str | None = None) -> InvalidImageError:
    return InvalidImageError(message, format="vmdk", path=path, offset=offset, hint=hint)


# ---- the sparse extent header ----------------------------------------------------------------

def _unpack_header(raw: bytes) -> S.Header:
    h = S.SparseExtentHeader.parse(raw)
    return S.Header(
        version=h.version, flags=h.flags, capacity=h.capacity, grain_size=h.grain_size,
        descriptor_offset=h.descriptor_offset, descriptor_size=h.descriptor_size,
        num_gtes_per_gt=h.num_gtes_per_gt, rgd_offset=h.rgd_offset, gd_offset=h.gd_offset,
        overhead=h.overhead, unclean_shutdown=h.unclean_shutdown,
        compress_algorithm=h.compress_algorithm,
    )


def parse_header(source: ByteSource) -> S.Header:
    """Parse and validate a sparse extent's header, taking the footer's when gdOffset says so."""
    path = source.name
    raw = read_exact(source, 0, S.HEADER_SIZE, what="VMDK sparse extent header")
    if raw[:4] == S.COWD_MAGIC:
        raise UnsupportedFeatureError(
            f"{path}: VMDK3 / vmfsSparse (COWD) sparse extents are not supported")
    if raw[:4] != S.MAGIC:
        raise _bad("not a VMDK sparse extent (no KDMV magic)", path, 0)
    header = _unpack_header(raw)
    _check_newlines(raw, header, path, 0)
    if header.gd_offset == S.GD_AT_END:
        header = _read_footer(source, header)
    validate_header(header, source.size, path)
    return header


def _check_newlines(raw: bytes, header: S.Header, path: str, at: int) -> None:
    if not header.flags & S.FLAG_VALID_NEWLINE_DETECTOR:
        return
    if tuple(raw[73 + i:74 + i] for i in range(4)) != S.NEWLINE_CHARS:
        raise _bad("the newline-detection bytes are damaged: the file went through a text-mode "
                   "transfer (FTP ASCII mode, a line-ending conversion) and is corrupt", path,
                   at + 73)


def _read_footer(source: ByteSource, leading: S.Header) -> S.Header:
    """A stream with gdOffset = GD_AT_END keeps its real header (the footer) in the second-last
    sector, after a footer marker and before the end-of-stream marker."""
    path = source.name
    if source.size < S.HEADER_SIZE + S.STREAM_TAIL_SIZE:
        raise _bad("the header says the grain directory is at the end, but the file is too "
                   "short to hold a footer (truncated stream?)", path, 56)
    at = source.size - S.STREAM_TAIL_SIZE
    tail = read_exact(source, at, S.STREAM_TAIL_SIZE, what="stream footer")
    marker = S.MetadataMarker.parse(tail[:S.METADATA_MARKER_SIZE])
    eos = S.MetadataMarker.parse(tail[2 * S.SECTOR:2 * S.SECTOR + S.METADATA_MARKER_SIZE])
    if marker.size != 0 or marker.type != S.MARKER_FOOTER or tail[512:516] != S.MAGIC:
        raise _bad("the header says the grain directory is at the end, but the file does not "
                   "end with a footer marker, footer and end-of-stream marker (truncated or "
                   "unfinished stream?)", path, at)
    if (eos.num_sectors, eos.size, eos.type) != (0, 0, S.MARKER_EOS):
        raise _bad("the footer is not followed by an end-of-stream marker", path, at + 1024)
    raw = tail[S.SECTOR:2 * S.SECTOR]
    footer = _unpack_header(raw)
    _check_newlines(raw, footer, path, at + S.SECTOR)
    if footer.gd_offset == S.GD_AT_END:
        raise _bad("the footer's gdOffset is GD_AT_END too", path, at + S.SECTOR + 56)
    if (footer.capacity, footer.grain_size) != (leading.capacity, leading.grain_size):
        raise _bad("the footer and the header disagree on capacity or grain size", path,
                   at + S.SECTOR)
    footer.gd_at_end = True
    return footer


def validate_header(h: S.Header, file_size: int, path: str) -> None:
    """Refuse what no VMware product writes and what would make us allocate without bound."""
    if not 1 <= h.version <= 3:
        raise UnsupportedFeatureError(f"{path}: VMDK sparse extent version {h.version} is not "
                                      "supported (1 to 3 are)")
    unknown = h.flags & S.INCOMPAT_MASK & ~S.INCOMPAT_KNOWN
    if unknown:
        raise UnsupportedFeatureError(f"{path}: VMDK incompatible flags {unknown:#x} are not "
                                      "supported")
    if h.markers and not h.compressed:
        raise _bad("grain markers without compressed grains", path, 8)
    if h.compress_algorithm not in (S.COMPRESSION_NONE, S.COMPRESSION_DEFLATE):
        raise UnsupportedFeatureError(f"{path}: VMDK compression algorithm "
                                      f"{h.compress_algorithm} is not supported (deflate is)")
    if h.compressed and h.compress_algorithm != S.COMPRESSION_DEFLATE:
        raise _bad("compressed grains without a compression algorithm", path, 77)
    if h.capacity * S.SECTOR > S.MAX_CAPACITY_BYTES:
        raise _bad(f"capacity of {h.capacity} sectors is absurd (the limit is 64 TiB)", path, 12)
    gs = h.grain_size
    if gs < 1 or gs & (gs - 1) or gs > S.MAX_GRAIN_SECTORS:
        raise _bad(f"grain size of {gs} sectors is invalid (a power of two up to "
                   f"{S.MAX_GRAIN_SECTORS} sectors is required)", path, 20)
    if h.num_gtes_per_gt != S.GTES_PER_GT:
        raise _bad(f"numGTEsPerGT is {h.num_gtes_per_gt}; the format requires "
                   f"{S.GTES_PER_GT}", path, 44)
    if h.gd_entries > S.MAX_GD_ENTRIES:
        raise _bad(f"the grain directory would need {h.gd_entries} entries, above the limit "
                   f"of {S.MAX_GD_ENTRIES}", path, 12)
    if h.descriptor_size * S.SECTOR > S.MAX_DESCRIPTOR_BYTES:
        raise _bad(f"embedded descriptor of {h.descriptor_size} sectors is absurd (the limit "
                   "is 1 MiB)", path, 36)
    if h.descriptor_size and (h.descriptor_offset + h.descriptor_size) * S.SECTOR > file_size:
        raise _bad("the embedded descriptor lies past the end of the file (truncated?)", path,
                   28)
    if h.overhead * S.SECTOR > file_size and h.capacity:
        raise _bad(f"the file is {file_size} bytes, shorter than the {h.overhead * S.SECTOR} "
                   "bytes of metadata its header announces (truncated?)", path, 64)
    if not h.capacity:
        return
    directories = [("grain directory", h.gd_offset, 56)]
    if h.redundant:
        directories.append(("redundant grain directory", h.rgd_offset, 48))
    for name, sector, at in directories:
        if sector == 0:
            raise _bad(f"the {name} offset is 0, where the header itself lies", path, at)
        if (sector + h.gd_sectors) * S.SECTOR > file_size:
            raise _bad(f"the {name} at sector {sector} lies outside the {file_size}-byte file "
                       "(truncated?)", path, at)


# ---- extents ---------------------------------------------------------------------------------

class _Compressed(NamedTuple):
    """Run.token of one compressed grain: which extent, where its marker sits, which grain."""

    extent: SparseExtent
    sector: int
    grain: int


class Extent:
    """One extent: ``length`` guest bytes starting at guest offset ``start`` of the disk."""

    kind = "?"

    def __init__(self, line: ExtentLine | None, start: int, length: int,
                 source: ByteSource | None, filename: str) -> None:
        self.line = line
        self.start = start
        self.length = length
        self.source = source
        self.filename = filename

    def block_status(self, offset: int, length: int) -> Iterator[Run]:
        """Runs in the extent's own coordinates (0 = its first guest byte)."""
        raise NotImplementedError

    def read(self, host: int, n: int) -> bytes:
        assert self.source is not None
        data = self.source.read_at(host, n)
        if len(data) < n:  # a grain past the end of a truncated file reads as zero, as in QEMU
            data += bytes(n - len(data))
        return data

    def info(self) -> dict[str, Any]:
        """The extent as qemu-img info lists it."""
        return {"virtual-size": self.length, "filename": self.filename, "format": self.kind}

    def close(self) -> None:
        if self.source is not None:
            self.source.close()


class ZeroExtent(Extent):
    """A ZERO extent: no file, reads as zeros."""

    kind = S.EXTENT_ZERO

    def block_status(self, offset: int, length: int) -> Iterator[Run]:
        yield Run(offset, length, BlockState.ZERO)


class FlatExtent(Extent):
    """A FLAT or VMFS extent: the guest's bytes at ``offset`` of a file; holes read as zero."""

    def __init__(self, line: ExtentLine, start: int, source: ByteSource, filename: str) -> None:
        length = line.sectors * S.SECTOR
        begin = line.offset * S.SECTOR
        if begin + length > source.size:
            raise _bad(f"the {line.type} extent {line.filename!r} needs {begin + length} bytes "
                       f"but its file has {source.size} (truncated?)", source.name)
        super().__init__(line, start, length, RangeSource(source, begin, length), filename)
        self.kind = line.type
        self._file = source
        self.base = begin

    def block_status(self, offset: int, length: int) -> Iterator[Run]:
        assert self.source is not None
        for run in self.source.runs(offset, length):
            state = BlockState.DATA if run.data else BlockState.ZERO
            yield Run(run.offset, run.length, state, self.base + run.offset, self)

    def read(self, host: int, n: int) -> bytes:
        return super().read(host - self.base, n)

    def close(self) -> None:
        self._file.close()


class GrainTableCache:
    """The grain tables a disk keeps in memory, shared by all its sparse extents so that a
    disk split into thousands of extents holds GT_CACHE_TABLES tables at most, not that many
    per extent. Thread-safe: a converter may ask for block status while another thread
    reads."""

    def __init__(self, capacity: int = GT_CACHE_TABLES) -> None:
        self._tables: OrderedDict[tuple[int, int], array.array[int]] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int]) -> array.array[int] | None:
        with self._lock:
            table = self._tables.get(key)
            if table is not None:
                self._tables.move_to_end(key)
            return table

    def put(self, key: tuple[int, int], table: array.array[int]) -> None:
        with self._lock:
            self._tables[key] = table
            if len(self._tables) > self._capacity:
                self._tables.popitem(last=False)


class SparseExtent(Extent):
    """A hosted sparse extent (monolithicSparse, twoGbMaxExtentSparse, streamOptimized)."""

    kind = S.EXTENT_SPARSE

    def __init__(self, line: ExtentLine | None, start: int, source: ByteSource,
                 filename: str, header: S.Header | None = None,
                 cache: GrainTableCache | None = None) -> None:
        self.header = header or parse_header(source)
        h = self.header
        length = h.capacity * S.SECTOR if line is None else line.sectors * S.SECTOR
        super().__init__(line, start, length, source, filename)
        self.path = source.name
        if line is not None and line.sectors != h.capacity:
            raise _bad(f"the descriptor gives extent {line.filename!r} {line.sectors} sectors "
                       f"but its header says {h.capacity}", source.name, 12)
        self.grain_bytes = h.grain_bytes
        self.gd = self._read_directory(h.gd_offset, "grain directory")
        self.rgd = (self._read_directory(h.rgd_offset, "redundant grain directory")
                    if h.redundant else None)
        self._gt_cache = cache if cache is not None else GrainTableCache()
        self._last_grain: tuple[int, bytes] | None = None
        #: Grain tables read from the redundant directory because the primary one was bad.
        self.fallbacks: list[str] = []

    def _read_directory(self, sector: int, what: str) -> array.array[int]:
        h = self.header
        table = array.array("I")
        if not h.capacity:
            return table
        raw = read_exact(self.host, sector * S.SECTOR, h.gd_entries * S.GTE_SIZE, what=what)
        table.frombytes(raw)
        if sys.byteorder != "little":
            table.byteswap()
        return table

    @property
    def host(self) -> ByteSource:
        assert self.source is not None
        return self.source

    def info(self) -> dict[str, Any]:
        out = super().info()
        if self.header.compressed:
            out["compressed"] = True
        out["cluster-size"] = self.grain_bytes
        return out

    # ---- grain tables ---------------------------------------------------------------------

    def gt_location(self, index: int, redundant: bool = False) -> int:
        """The sector of grain table ``index`` (0 when it is not allocated)."""
        table = self.rgd if redundant else self.gd
        assert table is not None
        return table[index] if index < len(table) else 0

    def read_table(self, sector: int) -> array.array[int] | None:
        """Grain table at ``sector``, or None when it lies outside the file."""
        size = S.GTES_PER_GT * S.GTE_SIZE
        if sector * S.SECTOR + size > self.host.size:
            return None
        table = array.array("I", self.host.read_at(sector * S.SECTOR, size))
        if sys.byteorder != "little":
            table.byteswap()
        return table

    def grain_table(self, index: int) -> array.array[int] | None:
        """Grain table ``index`` (None: not allocated); the redundant copy stands in for a
        primary table that lies outside the file."""
        sector = self.gt_location(index)
        if not sector:
            return None
        key = (id(self), sector)
        table = self._gt_cache.get(key)
        if table is not None:
            return table
        table = self.read_table(sector)
        if table is None and self.rgd is not None and self.gt_location(index, True):
            table = self.read_table(self.gt_location(index, True))
            if table is not None:
                self.fallbacks.append(f"grain table {index}: primary at sector {sector} lies "
                                      "outside the file; read the redundant copy")
        if table is None:
            raise _bad(f"grain table {index} at sector {sector} lies outside the "
                       f"{self.host.size}-byte file (truncated?)", self.path,
                       self.header.gd_offset * S.SECTOR + index * S.GTE_SIZE)
        self._gt_cache.put(key, table)
        return table

    # ---- block status ----------------------------------------------------------------------

    def block_status(self, offset: int, length: int) -> Iterator[Run]:
        return merge_runs(self._map_runs(offset, length), offset)

    def _map_runs(self, offset: int, length: int) -> Iterator[Run]:
        """The grain tables, grain by grain, before merging."""
        gb = self.grain_bytes
        span = S.GTES_PER_GT
        end = min(offset + length, self.length)
        grain = offset // gb
        last = -(-end // gb)
        while grain < last:
            gt_index, first = divmod(grain, span)
            table = self.grain_table(gt_index)
            stop = min(last, (gt_index + 1) * span)
            base = gt_index * span
            if table is None or not any(table[first:stop - base]):
                pieces: Iterator[Run] = iter(
                    (Run(grain * gb, (stop - grain) * gb, BlockState.UNALLOCATED),))
            else:
                pieces = self._table_runs(table, base, first, stop - base)
            grain = stop
            # The last grain may pass the extent's end; Disk.layer_runs clips it.
            yield from pieces

    def _table_runs(self, table: array.array[int], base: int, first: int,
                    stop: int) -> Iterator[Run]:
        """Runs for entries ``first..stop`` of one grain table (grain ``base`` is entry 0).

        Neighbouring entries of one kind become one run in this loop (one Run per run, not
        per grain): unallocated, zeroed, uncompressed grains stored one after the other.
        A compressed grain is a run of its own."""
        gb = self.grain_bytes
        gs = self.header.grain_size
        zeroed_gte = self.header.zeroed_grain_gte or self.header.compressed
        compressed = self.header.compressed
        index = first
        while index < stop:
            entry = table[index]
            start = index
            index += 1
            if entry == 0:
                while index < stop and table[index] == 0:
                    index += 1
                yield Run((base + start) * gb, (index - start) * gb, BlockState.UNALLOCATED)
            elif entry == S.GTE_ZEROED and zeroed_gte:
                # VMware writes 1 (a sector inside the header area) only as the zeroed-grain
                # entry; QEMU reads it as data at sector 1 only when the flag is unset.
                while index < stop and table[index] == S.GTE_ZEROED:
                    index += 1
                yield Run((base + start) * gb, (index - start) * gb, BlockState.ZERO)
            elif compressed:
                yield Run((base + start) * gb, gb, BlockState.DATA, None,
                          _Compressed(self, entry, base + start))
            else:
                expect = entry + gs
                while index < stop and table[index] == expect:
                    index += 1
                    expect += gs
                yield Run((base + start) * gb, (index - start) * gb, BlockState.DATA,
                          entry * S.SECTOR, self)

    # ---- compressed grains -----------------------------------------------------------------

    def grain_data(self, token: _Compressed) -> bytes:
        """A compressed grain, inflated (the last one of the extent may be shorter)."""
        cached = self._last_grain
        if cached is not None and cached[0] == token.sector:
            return cached[1]
        data = self._inflate(token)
        self._last_grain = (token.sector, data)
        return data

    def _inflate(self, token: _Compressed) -> bytes:
        h = self.header
        at = token.sector * S.SECTOR
        gb = self.grain_bytes
        expected = min(gb, self.length - token.grain * gb)
        head = self.host.read_at(at, S.SECTOR)
        if h.markers:
            if len(head) < S.GRAIN_MARKER_SIZE:
                raise _bad(f"grain {token.grain}: its marker lies past the end of the file "
                           "(truncated?)", self.path, at)
            marker = S.GrainMarker.parse(head[:S.GRAIN_MARKER_SIZE])
            if marker.lba != token.grain * h.grain_size:
                raise _bad(f"grain {token.grain}: the grain table points at a marker for "
                           f"sector {marker.lba}, not {token.grain * h.grain_size}", self.path,
                           at)
            # Deflate never expands a grain by more than a small fraction: refuse a bigger
            # size before reading that much.
            if marker.size == 0 or marker.size > 2 * gb + S.SECTOR:
                raise _bad(f"grain {token.grain}: compressed size {marker.size} is invalid",
                           self.path, at + 8)
            payload = self._bytes(head, at, S.GRAIN_MARKER_SIZE, marker.size)
            if len(payload) < marker.size:
                raise _bad(f"grain {token.grain}: compressed data runs past the end of the "
                           "file (truncated?)", self.path, at)
            data = _inflate_grain(payload, gb)
        else:
            # Without markers VMware prefixes the payload with its 4-byte size, QEMU stores it
            # bare: try the prefixed form when its size is plausible, then the bare one.
            data = None
            size = struct.unpack("<I", head[:4])[0] if len(head) >= 4 else 0
            if 0 < size <= 2 * gb + S.SECTOR:
                data = _inflate_grain(self._bytes(head, at, 4, size), gb)
            if data is None:
                data = _inflate_grain(self._bytes(head, at, 0, 2 * gb + S.SECTOR), gb)
        if data is None:
            raise _bad(f"grain {token.grain}: compressed data does not inflate to a grain",
                       self.path, at)
        if len(data) < expected:
            raise _bad(f"grain {token.grain}: inflates to {len(data)} bytes, not {expected}",
                       self.path, at)
        return data

    def _bytes(self, head: bytes, at: int, start: int, n: int) -> bytes:
        """``n`` bytes from ``at + start``, reusing the sector already read when it has them."""
        if start + n <= len(head):
            return head[start:start + n]
        if start >= len(head):
            return self.host.read_at(at + start, n)
        return head[start:] + self.host.read_at(at + len(head), start + n - len(head))


def _inflate_grain(payload: bytes, grain_bytes: int) -> bytes | None:
    """Inflate one grain: a zlib stream (what VMware and qemu-img write) or raw deflate (what
    some other writers emit), told apart by the zlib header check. None if it is neither."""
    attempts: tuple[int, ...]
    if len(payload) >= 2 and payload[0] & 0x0F == 8 and (payload[0] << 8 | payload[1]) % 31 == 0:
        attempts = (zlib.MAX_WBITS, -zlib.MAX_WBITS)
    else:
        attempts = (-zlib.MAX_WBITS,)
    for wbits in attempts:
        inflater = zlib.decompressobj(wbits)
        try:
            data = inflater.decompress(payload, grain_bytes)
        except zlib.error:
            continue
        if inflater.unconsumed_tail:  # more than a grain: not a grain
            return None
        return data
    return None


# ---- the disk --------------------------------------------------------------------------------

class VmdkDisk(Disk):
    """A VMDK disk: its descriptor, its extents in guest order, and its parent if a delta."""

    format_name = "vmdk"

    def __init__(self, source: ByteSource, resolver: CompanionResolver,
                 options: Mapping[str, str]) -> None:
        self.path = source.name
        self.extent_list: list[Extent] = []
        self._gt_cache = GrainTableCache()
        self.descriptor: Descriptor | None = None
        self.cid: int | None = None
        self.parent_cid = S.NO_PARENT_CID
        self.create_type = ""
        self._main = source
        super().__init__(0, host=None, filename=source.name)
        try:
            head = source.read_at(0, 4)
            if head == S.COWD_MAGIC:
                raise UnsupportedFeatureError(
                    f"{self.path}: VMDK3 / vmfsSparse (COWD) sparse extents are not supported")
            if head == S.MAGIC:
                self._open_monolithic(source)
            else:
                self._open_descriptor_file(source, resolver)
            self._starts = [e.start for e in self.extent_list]
            self.size = sum(e.length for e in self.extent_list)
            self._open_parent(resolver, options)
        except BaseException:
            self._close_extents()
            if self.backing is not None:
                self.backing.close()
            raise

    # ---- opening ---------------------------------------------------------------------------

    def _open_monolithic(self, source: ByteSource) -> None:
        extent = SparseExtent(None, 0, source, source.name, cache=self._gt_cache)
        h = extent.header
        self.extent_list.append(extent)
        if h.descriptor_size:
            raw = read_exact(source, h.descriptor_offset * S.SECTOR,
                             h.descriptor_size * S.SECTOR, what="embedded descriptor")
            self.descriptor = self._parse(raw, h.descriptor_offset * S.SECTOR)
        default = "streamOptimized" if h.compressed else "monolithicSparse"
        self.create_type = self.descriptor.create_type if self.descriptor else default
        if self.descriptor is not None:
            self._take_ids(self.descriptor)

    def _open_descriptor_file(self, source: ByteSource, resolver: CompanionResolver) -> None:
        if source.size > S.MAX_DESCRIPTOR_BYTES:
            raise _bad(f"not a VMDK: no sparse extent magic, and at {source.size} bytes too "
                       "large to be a descriptor file", source.name, 0)
        raw = source.read_at(0, source.size)
        if b"\0" in raw.rstrip(b"\0"):
            raise _bad("not a VMDK: no sparse extent magic, and binary data where a text "
                       "descriptor should be", source.name, raw.index(b"\0"))
        desc = self._parse(raw, 0)
        self.descriptor = desc
        self.create_type = desc.create_type
        self._take_ids(desc)
        if desc.create_type in S.DEVICE_CREATE_TYPES:
            raise UnsupportedFeatureError(
                f"{self.path}: {S.DEVICE_CREATE_TYPES[desc.create_type]} are not supported")
        if not desc.extents:
            raise _bad("the descriptor lists no extents", source.name)
        start = 0
        for number, line in enumerate(desc.extents, start=1):
            self.extent_list.append(self._open_extent(line, start, number, resolver))
            start += line.sectors * S.SECTOR

    def _open_extent(self, line: ExtentLine, start: int, number: int,
                     resolver: CompanionResolver) -> Extent:
        what = f"extent {number}"
        if line.type in S.UNSUPPORTED_EXTENTS:
            raise UnsupportedFeatureError(
                f"{self.path}: {what} uses {S.UNSUPPORTED_EXTENTS[line.type]}, which are not "
                "supported")
        if line.type not in (S.EXTENT_FLAT, S.EXTENT_VMFS, S.EXTENT_SPARSE, S.EXTENT_ZERO):
            raise UnsupportedFeatureError(f"{self.path}: {what} has the unknown type "
                                          f"{line.type!r}")
        if line.access == "NOACCESS":
            raise UnsupportedFeatureError(f"{self.path}: {what} is NOACCESS: VMware forbids "
                                          "reading it")
        if line.type == S.EXTENT_ZERO:
            return ZeroExtent(line, start, line.sectors * S.SECTOR, None, "")
        assert line.filename is not None
        path = resolver.path(line.filename, f"VMDK {what}")
        if os.path.realpath(path) == os.path.realpath(self.path):
            raise _bad(f"{what} names the descriptor file itself", self.path)
        extent_source = resolver.open_source(line.filename, f"VMDK {what}")
        # Named as qemu-img names it: the descriptor's folder, as given, joined to the name.
        shown = line.filename if os.path.isabs(line.filename) else os.path.join(
            os.path.dirname(self.path), line.filename)
        try:
            if line.type == S.EXTENT_SPARSE:
                return SparseExtent(line, start, extent_source, shown, cache=self._gt_cache)
            return FlatExtent(line, start, extent_source, shown)
        except BaseException:
            extent_source.close()
            raise

    def _parse(self, raw: bytes, offset: int) -> Descriptor:
        try:
            return parse(decode(raw))
        except DescriptorError as exc:
            raise _bad(str(exc), self.path, offset) from None

    def _take_ids(self, desc: Descriptor) -> None:
        self.cid = desc.cid
        self.parent_cid = desc.parent_cid

    def _open_parent(self, resolver: CompanionResolver, options: Mapping[str, str]) -> None:
        desc = self.descriptor
        if desc is None or desc.parent_hint is None:
            return
        ignore = options.get(IGNORE_CID, "off")
        if ignore not in ("on", "off"):
            raise InvalidInputError(f"vmdk: {IGNORE_CID} must be on or off, not {ignore!r}")
        parent = resolver.open_disk(desc.parent_hint, "parent disk (parentFileNameHint)", "vmdk")
        self.backing = parent
        parent_cid = getattr(parent, "cid", None)
        if parent_cid != desc.parent_cid and ignore == "off":
            shown = "none" if parent_cid is None else f"{parent_cid:08x}"
            raise _bad(
                f"parentCID {desc.parent_cid:08x} does not match the CID {shown} of the parent "
                f"{desc.parent_hint!r}: the parent changed after this delta was made, so the "
                "delta's grains no longer sit on the data they were written over", self.path,
                hint=f"read it anyway with the open option {IGNORE_CID}=on (library: "
                     f"imgbridge.open(path, options={{'{IGNORE_CID}': 'on'}})) if you know the "
                     "parent's change is harmless")

    # ---- block status and reads ------------------------------------------------------------

    def block_status(self, offset: int, length: int) -> Iterator[Run]:
        end = offset + length
        i = max(0, bisect.bisect_right(self._starts, offset) - 1)
        while i < len(self.extent_list) and offset < end:
            ext = self.extent_list[i]
            local = offset - ext.start
            take = min(end, ext.start + ext.length) - offset
            if take > 0:
                for run in ext.block_status(local, take):
                    length_in = min(run.length, ext.length - run.offset)
                    yield Run(ext.start + run.offset, length_in, run.state, run.host_offset,
                              run.token)
                offset = ext.start + ext.length
            i += 1

    def read_run(self, run: Run, offset: int, n: int) -> bytes:
        token = run.token
        if isinstance(token, _Compressed):
            grain = token.extent.grain_data(token)
            start = offset - token.extent.start - token.grain * token.extent.grain_bytes
            return grain[start:start + n]
        assert isinstance(token, Extent) and run.host_offset is not None
        return token.read(run.host_offset + (offset - run.offset), n)

    # ---- description -----------------------------------------------------------------------

    @property
    def sparse_extents(self) -> list[SparseExtent]:
        return [e for e in self.extent_list if isinstance(e, SparseExtent)]

    def format_specific(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "cid": self.cid if self.cid is not None else 0,
            "parent-cid": self.parent_cid,
            "create-type": self.create_type,
            "extents": [e.info() for e in self.extent_list],
        }
        ddb = self.descriptor.ddb if self.descriptor else {}
        if "adapterType" in ddb:
            data["adapter-type"] = ddb["adapterType"]
        if "virtualHWVersion" in ddb:
            data["hardware-version"] = ddb["virtualHWVersion"]
        geometry = {key: ddb[f"geometry.{key}"] for key in ("cylinders", "heads", "sectors")
                    if f"geometry.{key}" in ddb}
        if geometry:
            data["geometry"] = {k: int(v) if v.isdigit() else v for k, v in geometry.items()}
        return data

    def info(self) -> dict[str, Any]:
        out = super().info()
        sparse = self.sparse_extents
        if sparse:
            out["cluster-size"] = sparse[0].grain_bytes
        return out

    def backing_reference(self) -> tuple[str, str | None] | None:
        desc = self.descriptor
        if desc is None or desc.parent_hint is None:
            return None
        return desc.parent_hint, "vmdk"

    def actual_size(self) -> int | None:
        """Allocated bytes of the descriptor and every extent file (as qemu-img sums them)."""
        files = {os.path.realpath(self.filename)}
        files.update(os.path.realpath(e.filename) for e in self.extent_list if e.filename)
        total = 0
        for name in files:
            try:
                st = os.stat(name)
            except OSError:
                return None
            blocks = getattr(st, "st_blocks", None)
            total += blocks * 512 if blocks is not None else st.st_size
        return total

    def check(self, repair: str | None = None) -> CheckReport:
        from .check import check_disk

        return check_disk(self, repair)

    def _close_extents(self) -> None:
        for ext in self.extent_list:
            if ext.source is not self._main:
                ext.close()
        self.extent_list = []

    def close(self) -> None:
        self._close_extents()
        self._main.close()
        super().close()
