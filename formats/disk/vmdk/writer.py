"""Writing VMDK: monolithicSparse, monolithicFlat, twoGbMaxExtentSparse/Flat, streamOptimized.

Every subformat stores only grains (or 4 KiB blocks, for flat files) that hold a non-zero
byte; the source is read through its allocation map, so its holes are never read.

- Sparse extents follow qemu-img's layout (header, descriptor, redundant and primary grain
  directories, every grain table preallocated, grains after the metadata), which VMware's
  hosted products and qemu-img both open. Grains are written in guest order right after the
  metadata and each grain table is written as soon as its 512 grains are done, so memory holds
  one grain table and the directory, whatever the disk size. Unwritten grain tables stay holes.
- streamOptimized is written in one sequential pass through ``out.open_sequential()`` (it
  never seeks, so it can go to a pipe), the way ESXi, vCenter and OVA/AWS import expect it:
  version 3 header with gdOffset = GD_AT_END; every non-zero grain deflated as a zlib stream
  behind its grain marker; after each run of grains its grain table behind a grain-table
  marker; then the grain directory behind its marker, a footer marker, the footer (the header
  again, with the real gdOffset) and the end-of-stream marker. qemu-img 7.2 writes the
  directory at the front and no footer or end-of-stream marker, which ESXi's OVF import
  rejects (QEMU issue #1357). Grain tables that would map no grain are not written; their
  directory entry stays 0, which every reader treats as "not allocated".

References: VMware "Virtual Disk Format 5.0" ("Hosted Sparse Extents", "Stream-Optimized
Compressed Sparse Extents"); QEMU ``block/vmdk.c`` for the layout and file names qemu-img uses.
"""

from __future__ import annotations

import array
import bisect
import os
import secrets
import struct
import sys
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

from imgbridge.concurrency import WriteBehind, prefetch
from imgbridge.errors import InvalidInputError
from imgbridge.model.disk import MAX_IO, Disk, ExtentKind, iter_nonzero
from imgbridge.output import AtomicOutput
from imgbridge.progress import ProgressFn

from . import _structs as S
from .descriptor import Descriptor, ExtentLine, emit

__all__ = ["CREATE_OPTIONS", "create"]

CREATE_OPTIONS = {
    "subformat": "monolithicSparse (the default: one sparse file), monolithicFlat (a descriptor "
                 "and one flat file), twoGbMaxExtentSparse, twoGbMaxExtentFlat (2 GiB pieces), "
                 "streamOptimized (compressed, written in one pass: for OVA, ESXi, AWS import)",
    "adapter_type": "ide (the default), lsilogic, buslogic or legacyESX: the ddb.adapterType "
                    "VMware attaches the disk with",
    "hwversion": "virtual hardware version recorded in the descriptor (default 4, as qemu-img)",
    "compress": "on: compressed grains (what convert -c asks for); implies "
                "subformat=streamOptimized, the only VMDK kind that compresses",
}

#: 64 KiB grains: what VMware and qemu-img write.
GRAIN_SECTORS = 128
#: Sectors reserved for an embedded descriptor (qemu-img's value), so it can be edited later.
DESCRIPTOR_SECTORS = 20
#: isal's deflate level: level 2 compresses ~10x faster than zlib's default at a ratio within
#: ~10% of it, and its output is an ordinary zlib stream any inflate reads.
ISAL_LEVEL = 2
ZLIB_LEVEL = 6
#: Grains handed to a compression worker at once (one read piece's worth).
BATCH_BYTES = MAX_IO


@dataclass(frozen=True)
class Options:
    subformat: str
    adapter_type: str
    hwversion: str

    @classmethod
    def parse(cls, options: Mapping[str, str]) -> Options:
        compress = options.get("compress", "off")
        if compress not in ("on", "off"):
            raise InvalidInputError(f"vmdk: compress must be on or off, not {compress!r}")
        default = "streamOptimized" if compress == "on" else "monolithicSparse"
        subformat = options.get("subformat", default)
        if compress == "on" and subformat != "streamOptimized":
            raise InvalidInputError(f"vmdk: {subformat} cannot be compressed; only "
                                    "streamOptimized VMDKs hold compressed grains")
        if subformat not in S.WRITABLE_CREATE_TYPES:
            raise InvalidInputError(f"vmdk: subformat must be one of "
                                    f"{', '.join(S.WRITABLE_CREATE_TYPES)}, not {subformat!r}")
        adapter = options.get("adapter_type", "ide")
        if adapter not in S.ADAPTER_TYPES:
            raise InvalidInputError(f"vmdk: adapter_type must be one of "
                                    f"{', '.join(S.ADAPTER_TYPES)}, not {adapter!r}")
        hwversion = options.get("hwversion", "4")
        if not hwversion.isdigit() or not 1 <= int(hwversion) <= 255:
            raise InvalidInputError(f"vmdk: hwversion must be a number from 1 to 255, not "
                                    f"{hwversion!r}")
        return cls(subformat, adapter, str(int(hwversion)))


def create(out: AtomicOutput, disk: Disk, options: Mapping[str, str],
           progress: ProgressFn) -> None:
    """Write ``disk`` as a VMDK of the chosen subformat into ``out``."""
    opts = Options.parse(options)
    capacity = -(-disk.size // S.SECTOR)
    if capacity * S.SECTOR > S.MAX_CAPACITY_BYTES:
        raise InvalidInputError(f"vmdk: a {disk.size}-byte disk exceeds the 64 TiB we write")
    if capacity == 0 and opts.subformat not in ("monolithicSparse", "streamOptimized"):
        raise InvalidInputError(f"vmdk: an empty disk cannot be written as {opts.subformat} "
                                "(an extent line needs at least one sector)")
    prefix, postfix = _name_parts(out)
    progress(0, disk.size)
    if opts.subformat == "streamOptimized":
        write_stream(out, disk, opts, f"{prefix}{postfix}", progress)
    elif opts.subformat == "monolithicSparse":
        _write_monolithic_sparse(out, disk, opts, f"{prefix}{postfix}", progress)
    elif opts.subformat == "twoGbMaxExtentSparse":
        _write_split_sparse(out, disk, opts, prefix, postfix, progress)
    else:
        _write_flat(out, disk, opts, prefix, postfix, progress)
    progress(disk.size, disk.size)


def _name_parts(out: AtomicOutput) -> tuple[str, str]:
    """qemu-img's naming: ``disk.vmdk`` -> (``disk``, ``.vmdk``), so extents are
    ``disk-flat.vmdk``, ``disk-s001.vmdk``, ``disk-f001.vmdk``."""
    target = getattr(out, "target", None)
    target = target if isinstance(target, str) else None
    unnamed = not target or target == "-" or target.startswith("<")  # a pipe: "<stdout>"
    base = "disk.vmdk" if target is None or unnamed else os.path.basename(target)
    if any(c in base for c in '"\r\n'):
        raise InvalidInputError(f"vmdk: {base!r} cannot be named in a descriptor (it holds a "
                                "quote or a line break); choose another file name")
    stem, dot, ext = base.rpartition(".")
    return (stem, dot + ext) if dot and stem else (base, "")


def _new_cid() -> int:
    while True:
        cid = secrets.randbits(32)
        if cid not in S.RESERVED_CIDS:
            return cid


def _descriptor(opts: Options, size: int, extents: list[ExtentLine]) -> str:
    heads = 16 if opts.adapter_type == "ide" else 255
    # qemu-img's geometry (63 sectors a track, 16 heads for IDE, 255 otherwise), with the
    # cylinders capped at the 16-bit maximum VMware uses for large disks.
    cylinders = min(size // (63 * heads * S.SECTOR), 65535)
    desc = Descriptor(
        create_type=opts.subformat, cid=_new_cid(), parent_cid=S.NO_PARENT_CID,
        extents=extents,
        ddb={
            "virtualHWVersion": opts.hwversion,
            "geometry.cylinders": str(cylinders),
            "geometry.heads": str(heads),
            "geometry.sectors": "63",
            "adapterType": opts.adapter_type,
            "toolsVersion": "2147483647",
        },
    )
    return emit(desc)


# ---- grains of the source ----------------------------------------------------------------------

def nonzero_grains(disk: Disk, grain_bytes: int, start: int = 0,
                   end: int | None = None) -> Iterator[list[tuple[int, bytes]]]:
    """Batches of ``(grain index, bytes)`` for every grain in ``[start, end)`` holding a non-zero
    byte, in order. Only the source's data extents are read (in pieces up to 4 MiB); a grain
    at the disk's end may be shorter than ``grain_bytes``."""
    stop = disk.size if end is None else min(end, disk.size)
    per_read = max(1, BATCH_BYTES // grain_bytes)
    zero = bytes(grain_bytes)
    for first, last in _data_grain_ranges(disk, grain_bytes, start, stop):
        grain = first
        while grain < last:
            count = min(per_read, last - grain)
            chunk = disk.read_at(grain * grain_bytes, count * grain_bytes)
            batch: list[tuple[int, bytes]] = []
            for i in range(count):
                piece = chunk[i * grain_bytes:(i + 1) * grain_bytes]
                if not piece:
                    break
                if piece != (zero if len(piece) == grain_bytes else bytes(len(piece))):
                    batch.append((grain + i, piece))
            del chunk  # the grains are copies: do not hold the piece too while suspended
            if batch:
                yield batch
            grain += count


def _data_grain_ranges(disk: Disk, grain_bytes: int, start: int,
                       stop: int) -> Iterator[tuple[int, int]]:
    """Merged ranges of grain indexes touched by the source's data extents."""
    pending: tuple[int, int] | None = None
    if stop <= start:
        return
    for ext in disk.extents(start, stop - start):
        if ext.kind is not ExtentKind.DATA:
            continue
        first = max(ext.offset, start) // grain_bytes
        last = -(-min(ext.end, stop) // grain_bytes)
        if pending is not None and first <= pending[1]:
            pending = (pending[0], max(pending[1], last))
            continue
        if pending is not None:
            yield pending
        pending = (first, last)
    if pending is not None:
        yield pending


# ---- hosted sparse extents -----------------------------------------------------------------------

class SparseWriter:
    """One hosted sparse extent file, filled grain by grain in guest order.

    The layout is fixed up front (so the header and both directories are written first and
    never move); grains go right after the metadata, contiguous, in large writes; a grain
    table is written when the next grain falls outside it.
    """

    def __init__(self, path: str, capacity: int, descriptor: str | None) -> None:
        gs = GRAIN_SECTORS
        grains = -(-capacity // gs)
        self.gt_count = -(-grains // S.GTES_PER_GT)
        gd_sectors = -(-self.gt_count * S.GTE_SIZE // S.SECTOR)
        desc_sectors = 0
        desc_bytes = b""
        if descriptor is not None:
            desc_bytes = descriptor.encode()
            desc_sectors = max(DESCRIPTOR_SECTORS, -(-len(desc_bytes) // S.SECTOR))
        rgd = 1 + desc_sectors
        gd = rgd + gd_sectors + self.gt_count * S.GT_SECTORS
        overhead = -(-(gd + gd_sectors + self.gt_count * S.GT_SECTORS) // gs) * gs
        self.header = S.Header(
            version=1, flags=S.FLAG_VALID_NEWLINE_DETECTOR | S.FLAG_REDUNDANT_GRAIN_TABLE,
            capacity=capacity, grain_size=gs, descriptor_offset=1 if desc_sectors else 0,
            descriptor_size=desc_sectors, num_gtes_per_gt=S.GTES_PER_GT, rgd_offset=rgd,
            gd_offset=gd, overhead=overhead, unclean_shutdown=0,
            compress_algorithm=S.COMPRESSION_NONE,
        )
        self.rgt_base = rgd + gd_sectors
        self.gt_base = gd + gd_sectors
        self.grain_bytes = gs * S.SECTOR
        self.next_sector = overhead
        self.fd = os.open(path, os.O_WRONLY | getattr(os, "O_BINARY", 0))
        self.writer = WriteBehind(self.fd)
        self.gt_index = -1
        self.gt = array.array("I", bytes(S.GTES_PER_GT * S.GTE_SIZE))
        self._pending: list[bytes] = []
        self._pending_at = overhead
        self._pending_bytes = 0
        # Header, descriptor, and both directories pointing at the preallocated tables.
        self.writer.write(0, self.header.pack())
        if desc_bytes:
            self.writer.write(S.SECTOR, desc_bytes)
        for directory, base in ((rgd, self.rgt_base), (gd, self.gt_base)):
            table = array.array("I", range(base, base + self.gt_count * S.GT_SECTORS,
                                           S.GT_SECTORS))
            self.writer.write(directory * S.SECTOR, _le_bytes(table))

    def add(self, grain: int, data: bytes) -> None:
        """Store grain ``grain`` (grains must come in increasing order)."""
        gt_index, entry = divmod(grain, S.GTES_PER_GT)
        if gt_index != self.gt_index:
            self._flush_table()
            self.gt_index = gt_index
        if self.next_sector + GRAIN_SECTORS > S.MAX_SPARSE_FILE_SECTORS:
            raise InvalidInputError("vmdk: the data passes 2 TiB, which a sparse extent's "
                                    "32-bit grain tables cannot address",
                                    hint="use -o subformat=twoGbMaxExtentSparse")
        self.gt[entry] = self.next_sector
        if len(data) < self.grain_bytes:
            data += bytes(self.grain_bytes - len(data))
        self._pending.append(data)
        self._pending_bytes += len(data)
        self.next_sector += GRAIN_SECTORS
        if self._pending_bytes >= MAX_IO:
            self._flush_grains()

    def _flush_grains(self) -> None:
        if self._pending:
            self.writer.write(self._pending_at * S.SECTOR, b"".join(self._pending))
        self._pending = []
        self._pending_bytes = 0
        self._pending_at = self.next_sector

    def _flush_table(self) -> None:
        if self.gt_index < 0:
            return
        data = _le_bytes(self.gt)
        for base in (self.rgt_base, self.gt_base):
            self.writer.write((base + self.gt_index * S.GT_SECTORS) * S.SECTOR, data)
        self.gt = array.array("I", bytes(S.GTES_PER_GT * S.GTE_SIZE))

    def finish(self) -> None:
        """Write what is pending and set the file's size (unwritten tables stay holes)."""
        try:
            self._flush_grains()
            self._flush_table()
            self.writer.close()
            os.ftruncate(self.fd, self.next_sector * S.SECTOR)
        finally:
            os.close(self.fd)

    def abort(self) -> None:
        try:
            self.writer.close()
        except Exception:
            pass  # already failing: the first error is the one to report
        os.close(self.fd)


def _le_bytes(table: array.array[int]) -> bytes:
    if sys.byteorder != "little":
        table = array.array("I", table)
        table.byteswap()
    return table.tobytes()


def _fill_sparse(writer: SparseWriter, disk: Disk, start: int, end: int,
                 progress: ProgressFn) -> None:
    first_grain = start // writer.grain_bytes
    try:
        for batch in prefetch(nonzero_grains(disk, writer.grain_bytes, start, end)):
            for grain, data in batch:
                writer.add(grain - first_grain, data)
            progress(min(disk.size, (batch[-1][0] + 1) * writer.grain_bytes), disk.size)
    except BaseException:
        writer.abort()
        raise
    writer.finish()


def _write_monolithic_sparse(out: AtomicOutput, disk: Disk, opts: Options, name: str,
                             progress: ProgressFn) -> None:
    capacity = -(-disk.size // S.SECTOR)
    text = _descriptor(opts, disk.size, [ExtentLine("RW", capacity, S.EXTENT_SPARSE, name)])
    _fill_sparse(SparseWriter(out.path, capacity, text), disk, 0, disk.size, progress)


def _split_sizes(size: int) -> list[int]:
    return [min(S.SPLIT_BYTES, size - at) for at in range(0, size, S.SPLIT_BYTES)] or [0]


def _write_split_sparse(out: AtomicOutput, disk: Disk, opts: Options, prefix: str,
                        postfix: str, progress: ProgressFn) -> None:
    lines: list[ExtentLine] = []
    start = 0
    for index, length in enumerate(_split_sizes(disk.size), start=1):
        name = f"{prefix}-s{index:03d}{postfix}"
        sectors = -(-length // S.SECTOR)
        if sectors:
            lines.append(ExtentLine("RW", sectors, S.EXTENT_SPARSE, name))
            _fill_sparse(SparseWriter(out.companion(name), sectors, None), disk, start,
                         start + length, progress)
        start += length
    _write_text(out.path, _descriptor(opts, disk.size, lines))


def _write_text(path: str, text: str) -> None:
    with open(path, "wb") as f:
        f.write(text.encode())


# ---- flat extents ----------------------------------------------------------------------------

def _write_flat(out: AtomicOutput, disk: Disk, opts: Options, prefix: str, postfix: str,
                progress: ProgressFn) -> None:
    """monolithicFlat and twoGbMaxExtentFlat: the guest's bytes in plain files, zeros as holes."""
    capacity_bytes = -(-disk.size // S.SECTOR) * S.SECTOR
    if opts.subformat == "monolithicFlat":
        pieces = [(f"{prefix}-flat{postfix}", capacity_bytes)]
    else:
        pieces = [(f"{prefix}-f{i:03d}{postfix}", -(-n // S.SECTOR) * S.SECTOR)
                  for i, n in enumerate(_split_sizes(disk.size), start=1) if n]
    files = _FlatFiles([(out.companion(name), length) for name, length in pieces])
    try:
        for offset, data in prefetch(iter_nonzero(disk)):
            files.write(offset, data)
            progress(offset + len(data), disk.size)
    except BaseException:
        files.abort()
        raise
    files.close()
    lines = [ExtentLine("RW", length // S.SECTOR, S.EXTENT_FLAT, name, 0)
             for name, length in pieces]
    _write_text(out.path, _descriptor(opts, disk.size, lines))


class _FlatFiles:
    """Flat extent files laid end to end; one is open at a time (data comes in guest order),
    so a disk of a thousand 2 GiB pieces does not hold a thousand descriptors."""

    def __init__(self, files: list[tuple[str, int]]) -> None:
        self.files = files
        self.starts: list[int] = []
        pos = 0
        for path, length in files:
            with open(path, "r+b") as f:
                f.truncate(length)  # the full size, as holes: what qemu-img creates too
            self.starts.append(pos)
            pos += length
        self.index = -1
        self.fd = -1
        self.writer: WriteBehind | None = None

    def write(self, offset: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            index = bisect.bisect_right(self.starts, offset + pos) - 1
            if index != self.index:
                self._switch(index)
            assert self.writer is not None
            local = offset + pos - self.starts[index]
            take = min(len(data) - pos, self.files[index][1] - local)
            self.writer.write(local, data if take == len(data) else data[pos:pos + take])
            pos += take

    def _switch(self, index: int) -> None:
        self.close()
        self.fd = os.open(self.files[index][0], os.O_WRONLY | getattr(os, "O_BINARY", 0))
        self.writer = WriteBehind(self.fd)
        self.index = index

    def close(self) -> None:
        try:
            if self.writer is not None:
                self.writer.close()
        finally:
            self.writer = None
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1

    def abort(self) -> None:
        try:
            self.close()
        except Exception:
            pass  # already failing: the first error is the one to report


# ---- streamOptimized -------------------------------------------------------------------------

def _compressor() -> Callable[[bytes], bytes]:
    try:
        from isal import isal_zlib
    except ImportError:  # isal has no wheel for this platform: zlib's output is the same kind
        return lambda data: zlib.compress(data, ZLIB_LEVEL)
    return lambda data: bytes(isal_zlib.compress(data, ISAL_LEVEL))


def _compress_batch(batch: list[tuple[int, bytes]], capacity_bytes: int,
                    compress: Callable[[bytes], bytes]) -> list[tuple[int, bytes]]:
    """Each grain as it goes on disk: grain marker, zlib stream, zeros to the sector's end.

    The last grain of a disk whose size is not a multiple of the grain holds only the bytes
    up to the capacity (as VMware and qemu-img write it)."""
    gb = GRAIN_SECTORS * S.SECTOR
    out: list[tuple[int, bytes]] = []
    for grain, data in batch:
        expected = min(gb, capacity_bytes - grain * gb)
        if len(data) < expected:
            data += bytes(expected - len(data))
        payload = compress(data)
        blob = struct.pack("<QI", grain * GRAIN_SECTORS, len(payload)) + payload
        out.append((grain, blob + bytes(-len(blob) % S.SECTOR)))
    return out


class _SectorStream:
    """A write-only stream that counts the sectors written (it never seeks or asks tell())."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.sector = 0

    def write(self, data: bytes) -> None:
        assert len(data) % S.SECTOR == 0
        self.stream.write(data)
        self.sector += len(data) // S.SECTOR


def write_stream(out: AtomicOutput, disk: Disk, opts: Options, name: str,
                 progress: ProgressFn, *, threads: int | None = None) -> None:
    """streamOptimized in one sequential pass through ``out.open_sequential()``."""
    capacity = -(-disk.size // S.SECTOR)
    text = _descriptor(opts, disk.size, [ExtentLine("RW", capacity, S.EXTENT_SPARSE, name)])
    desc_bytes = text.encode()
    desc_sectors = max(DESCRIPTOR_SECTORS, -(-len(desc_bytes) // S.SECTOR))
    overhead = -(-(1 + desc_sectors) // GRAIN_SECTORS) * GRAIN_SECTORS
    header = S.Header(
        version=3, flags=S.FLAG_VALID_NEWLINE_DETECTOR | S.FLAG_COMPRESSED | S.FLAG_MARKERS,
        capacity=capacity, grain_size=GRAIN_SECTORS, descriptor_offset=1,
        descriptor_size=desc_sectors, num_gtes_per_gt=S.GTES_PER_GT, rgd_offset=0,
        gd_offset=S.GD_AT_END, overhead=overhead, unclean_shutdown=0,
        compress_algorithm=S.COMPRESSION_DEFLATE,
    )
    gd = array.array("I", bytes(header.gd_entries * S.GTE_SIZE))
    gb = GRAIN_SECTORS * S.SECTOR
    workers = threads or max(1, min(8, os.cpu_count() or 1))
    compress = _compressor()
    with out.open_sequential() as raw_stream:
        stream = _SectorStream(raw_stream)
        stream.write(header.pack(gd_offset=S.GD_AT_END))
        stream.write(desc_bytes + bytes(desc_sectors * S.SECTOR - len(desc_bytes)))
        stream.write(bytes((overhead - 1 - desc_sectors) * S.SECTOR))
        gt = array.array("I", bytes(S.GTES_PER_GT * S.GTE_SIZE))
        gt_index = -1

        def flush_table() -> None:
            if gt_index < 0:
                return
            stream.write(S.metadata_marker(S.MARKER_GT, S.GT_SECTORS))
            gd[gt_index] = stream.sector
            stream.write(_le_bytes(gt))

        with ThreadPoolExecutor(workers, thread_name_prefix="imgbridge-deflate") as pool:
            in_flight: deque[Future[list[tuple[int, bytes]]]] = deque()
            batches = prefetch(nonzero_grains(disk, gb))

            def drain(limit: int) -> Iterator[list[tuple[int, bytes]]]:
                while len(in_flight) > limit:
                    yield in_flight.popleft().result()

            def consume(done: list[tuple[int, bytes]]) -> None:
                nonlocal gt_index, gt
                for grain, blob in done:
                    index, entry = divmod(grain, S.GTES_PER_GT)
                    if index != gt_index:
                        flush_table()
                        gt = array.array("I", bytes(S.GTES_PER_GT * S.GTE_SIZE))
                        gt_index = index
                    if stream.sector + len(blob) // S.SECTOR > S.MAX_SPARSE_FILE_SECTORS:
                        raise InvalidInputError(
                            "vmdk: the compressed stream passes 2 TiB, which its 32-bit grain "
                            "tables cannot address")
                    gt[entry] = stream.sector
                    stream.write(blob)
                progress(min(disk.size, (done[-1][0] + 1) * gb), disk.size)

            try:
                for batch in batches:
                    in_flight.append(pool.submit(_compress_batch, batch, capacity * S.SECTOR,
                                                 compress))
                    for done in drain(workers + 1):
                        consume(done)
                for done in drain(0):
                    consume(done)
            finally:
                for future in in_flight:
                    future.cancel()
                close = getattr(batches, "close", None)
                if close is not None:
                    close()
        flush_table()
        stream.write(S.metadata_marker(S.MARKER_GD, header.gd_sectors))
        gd_sector = stream.sector
        gd_bytes = _le_bytes(gd)
        stream.write(gd_bytes + bytes(header.gd_sectors * S.SECTOR - len(gd_bytes)))
        stream.write(S.metadata_marker(S.MARKER_FOOTER, 1))
        stream.write(header.pack(gd_offset=gd_sector))
        stream.write(S.metadata_marker(S.MARKER_EOS, 0))
