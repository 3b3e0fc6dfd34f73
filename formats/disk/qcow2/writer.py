"""Writing qcow2: one streaming pass over the source disk, the metadata at the end.

The file we write is laid out like this (every piece cluster-aligned except compressed data)::

    cluster 0    header, header extensions, backing file name
    ...          data clusters in guest order (compressed data packed at byte offsets), each
                 L2 table right after the last cluster of the guest range it maps
    ...          the L1 table
    ...          the refcount table, then the refcount blocks (which count themselves too)

Why this order: the source is read once, front to back, and every host cluster is appended
as soon as it is known, so memory holds one L2 table, a few MiB of data in flight and one
byte of refcount per host cluster -- whatever the disk size. The tables that describe the
whole file (L1, refcounts, header) can only be written once everything else has its place,
so they come last; the header goes to offset 0 at the very end, into the cluster kept for it.
Everything is written to ``out.path`` (an AtomicOutput temporary), so a reader never sees a
half-written image under the final name.

With ``compress=on`` whole clusters are compressed in a thread pool (zlib, isal and zstd
release the GIL) while the results are placed strictly in guest order: compressed data is
packed at byte offsets (several compressed clusters may share a host cluster, each adding one
to its refcount), and compressed data, plain clusters and L2 tables go out through one append
buffer in large writes.

What is never allocated: a cluster the guest reads as zero. Zeros are found by comparing
4 KiB granules (or whole clusters below 4 KiB); a cluster entirely of zeros gets no host
cluster, and zero granules inside a data cluster are left as holes in the host file.

With a backing file (``backing_file=``), the source's own layer decides: ranges it leaves
UNALLOCATED stay unallocated here (they read from the backing file), ranges it says read as
zero become zero clusters (the L2 zero flag in v3; a host cluster never written, so it reads
back as zeros, in v2), so that they do not fall through to the backing file.

References: QEMU docs/interop/qcow2.txt ("Header", "Header extensions", "Feature name
table", "Host cluster management", "Cluster mapping").
"""

from __future__ import annotations

import array
import os
import struct
import sys
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

from imgbridge.concurrency import WriteBehind, prefetch
from imgbridge.errors import InternalError, InvalidInputError, UnsupportedFeatureError
from imgbridge.model.disk import MAX_IO, ZERO_GRANULE, BlockState, Disk, ExtentKind
from imgbridge.options import parse_size
from imgbridge.output import AtomicOutput
from imgbridge.progress import ProgressFn

from . import _structs as S

__all__ = ["CREATE_OPTIONS", "Settings", "create", "parse_create_options"]

CREATE_OPTIONS = {
    "compat": "0.10 (version 2) or 1.1 (version 3, the default)",
    "cluster_size": "512 to 2M, a power of two (default 64k)",
    "compression_type": "zlib (the default) or zstd (needs compat=1.1), for compressed clusters",
    "backing_file": "the backing file's name, stored as given (relative to the image's folder)",
    "backing_fmt": "the backing file's format, stored in the image",
    "refcount_bits": "1, 2, 4, 8, 16 (the default), 32 or 64; compat=0.10 allows only 16",
    "compress": "on: compress every cluster that shrinks (what convert -c sets); off (default)",
}

DEFAULT_CLUSTER_BITS = 16
#: qemu writes v3 headers 112 bytes long: the 104-byte header, the compression_type byte,
#: padding to a multiple of 8.
V3_HEADER_LENGTH = S.HEADER_V3_WITH_COMPRESSION_LENGTH

#: The names qemu puts in the feature name table (incompatible names come from _structs).
COMPAT_NAMES = {0: "lazy refcounts"}
AUTOCLEAR_NAMES = {0: "bitmaps", 1: "raw external data"}

#: isal's deflate level 2 (its default): on a 1 GiB ext4 disk, ``convert -c`` takes 1.5 s
#: against qemu-img's 11.7 s (zlib level 6) for an image 7% larger; level 3 saves only 1.5%
#: more for twice the CPU. isal honours a 4 KiB window (wbits=-12), which the tests prove by
#: inflating with a 4 KiB window in small steps.
ISAL_LEVEL = 2
ZLIB_LEVEL = 6
ZSTD_LEVEL = 3
#: QEMU inflates compressed clusters with a 4 KiB window: a larger one would break it.
DEFLATE_WBITS = -12

#: Refcounts are held as one byte per host cluster (a bytearray), so a shared host cluster of
#: packed compressed data may hold at most this many compressed clusters even when
#: refcount_bits would allow more; past it, the next one starts a fresh host cluster. Data,
#: table and header clusters always count 1.
MAX_SHARED = 255

_SKIP, _ZERO, _DATA = 0, 1, 2  #: what a guest cluster becomes: unallocated, zero, data


@dataclass(frozen=True)
class Settings:
    """The validated ``-o`` options."""

    version: int = 3
    cluster_bits: int = DEFAULT_CLUSTER_BITS
    compression_type: int = S.COMPRESSION_ZLIB
    refcount_order: int = 4
    backing_file: str | None = None
    backing_fmt: str | None = None
    compress: bool = False

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order


# ---- options --------------------------------------------------------------------------------

_ON = {"on": True, "yes": True, "true": True, "off": False, "no": False, "false": False}


def parse_create_options(options: Mapping[str, str]) -> Settings:
    """Validate every option before anything is written; one clear error for a bad value."""
    compat = options.get("compat", "1.1")
    versions = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
    if compat not in versions:
        raise InvalidInputError(f"qcow2: compat must be 0.10 or 1.1, not {compat!r}")
    version = versions[compat]

    cluster_bits = DEFAULT_CLUSTER_BITS
    if "cluster_size" in options:
        text = options["cluster_size"]
        size = parse_size(text, what="cluster_size")
        if size < 512 or size > 2 << 20 or size & (size - 1):
            raise InvalidInputError(
                f"qcow2: cluster_size must be a power of two from 512 to 2M, not {text!r}")
        cluster_bits = size.bit_length() - 1

    ctype_name = options.get("compression_type", "zlib")
    ctypes = {name: kind for kind, name in S.COMPRESSION_NAMES.items()}
    if ctype_name not in ctypes:
        raise InvalidInputError(
            f"qcow2: compression_type must be zlib or zstd, not {ctype_name!r}")
    compression_type = ctypes[ctype_name]
    if compression_type != S.COMPRESSION_ZLIB and version < 3:
        raise InvalidInputError(f"qcow2: compression_type={ctype_name} needs compat=1.1")

    refcount_order = 4
    if "refcount_bits" in options:
        text = options["refcount_bits"]
        bits = int(text) if text.strip().isdigit() else -1
        if bits not in (1, 2, 4, 8, 16, 32, 64):
            raise InvalidInputError(
                f"qcow2: refcount_bits must be 1, 2, 4, 8, 16, 32 or 64, not {text!r}")
        if version < 3 and bits != 16:
            raise InvalidInputError("qcow2: compat=0.10 allows only refcount_bits=16")
        refcount_order = bits.bit_length() - 1

    compress_text = options.get("compress", "off")
    if compress_text.lower() not in _ON:
        raise InvalidInputError(f"qcow2: compress must be on or off, not {compress_text!r}")

    backing_file = options.get("backing_file")
    backing_fmt = options.get("backing_fmt")
    if backing_file is not None:
        if not backing_file or "\0" in backing_file:
            raise InvalidInputError("qcow2: backing_file must be a non-empty file name")
        if len(backing_file.encode()) > S.MAX_BACKING_NAME:
            raise InvalidInputError(
                f"qcow2: backing_file is longer than {S.MAX_BACKING_NAME} bytes")
    if backing_fmt is not None:
        if backing_file is None:
            raise InvalidInputError("qcow2: backing_fmt needs backing_file")
        from imgbridge.registry import default_registry

        default_registry().get(backing_fmt)  # an unknown format name is refused here
    settings = Settings(
        version=version, cluster_bits=cluster_bits, compression_type=compression_type,
        refcount_order=refcount_order, backing_file=backing_file, backing_fmt=backing_fmt,
        compress=_ON[compress_text.lower()],
    )
    header_cluster(settings, 0, 0, 0, 0, 0)  # the header must fit in cluster 0
    return settings


def check_size(settings: Settings, size: int) -> int:
    """The virtual size qcow2 stores (rounded up to 512 bytes, as qemu does), if it fits."""
    size = -(-size // 512) * 512
    cs = settings.cluster_size
    l1_size = -(-size // (cs * (cs // 8)))
    if l1_size * 8 > S.MAX_L1_BYTES:
        raise InvalidInputError(
            f"qcow2: a {size}-byte disk needs an L1 table over QEMU's 32 MiB limit with "
            f"{cs}-byte clusters", hint="use a larger cluster_size")
    return size


# ---- the header cluster ---------------------------------------------------------------------

def _feature_table() -> bytes:
    names = [(0, bit, name) for bit, name in sorted(S.INCOMPAT_NAMES.items())]
    names += [(1, bit, name) for bit, name in sorted(COMPAT_NAMES.items())]
    names += [(2, bit, name) for bit, name in sorted(AUTOCLEAR_NAMES.items())]
    return b"".join(
        S.FeatureNameEntry.build(dict(type=kind, bit=bit, name=name.encode().ljust(46, b"\0")))
        for kind, bit, name in names)


def header_cluster(settings: Settings, size: int, l1_size: int, l1_offset: int,
                   reftable_offset: int, reftable_clusters: int) -> bytes:
    """The bytes of cluster 0: header, extensions, end marker, then the backing file name.

    The feature name table is optional (it only helps tools that do not know a feature);
    like qemu, we leave it out when it would not fit beside a long backing name in a small
    cluster. InvalidInputError when even the rest does not fit.
    """
    backing = settings.backing_file.encode() if settings.backing_file is not None else b""
    v3 = settings.version >= 3
    header = S.Header(
        version=settings.version, backing_file_offset=0,
        backing_file_size=len(backing), cluster_bits=settings.cluster_bits, size=size,
        crypt_method=S.CRYPT_NONE, l1_size=l1_size, l1_table_offset=l1_offset,
        refcount_table_offset=reftable_offset, refcount_table_clusters=reftable_clusters,
        nb_snapshots=0, snapshots_offset=0,
        incompatible_features=(S.INCOMPAT_COMPRESSION
                               if settings.compression_type != S.COMPRESSION_ZLIB else 0),
        refcount_order=settings.refcount_order,
        header_length=V3_HEADER_LENGTH if v3 else S.HEADER_V2_LENGTH,
        compression_type=settings.compression_type,
    )
    extensions = b""
    if settings.backing_fmt:
        extensions += S.pack_extension(S.EXT_BACKING_FORMAT, settings.backing_fmt.encode())
    end = S.pack_extension(S.EXT_END, b"")
    features = S.pack_extension(S.EXT_FEATURE_NAMES, _feature_table()) if v3 else b""
    for table in (features, b""):
        name_at = header.header_length + len(extensions) + len(table) + len(end)
        if name_at + len(backing) <= settings.cluster_size:
            break
    else:
        raise InvalidInputError(
            f"qcow2: the backing file name does not fit in a {settings.cluster_size}-byte "
            "header cluster", hint="use a larger cluster_size or a shorter name")
    if backing:
        header.backing_file_offset = name_at
    return bytes(header.pack() + extensions + table + end + backing)


# ---- compression ----------------------------------------------------------------------------

def make_compressor(compression_type: int) -> Callable[[bytes], bytes]:
    """A thread-safe function compressing one cluster the way QEMU decompresses it.

    zlib: raw deflate with a 4 KiB window (QEMU inflates with wbits=-12), by isal when it is
    installed (same format, several times faster), else by zlib. zstd: one frame per cluster.
    zlib, isal and zstd release the GIL, so a thread pool compresses clusters in parallel.
    """
    if compression_type == S.COMPRESSION_ZSTD:
        import zstandard

        local = threading.local()  # a ZstdCompressor must not be shared between threads

        def zstd_cluster(data: bytes) -> bytes:
            cctx = getattr(local, "cctx", None)
            if cctx is None:
                cctx = local.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
            out: bytes = cctx.compress(data)
            return out

        return zstd_cluster
    if compression_type != S.COMPRESSION_ZLIB:
        raise UnsupportedFeatureError(f"qcow2: compression type {compression_type} cannot "
                                      "be written")
    try:
        from isal import isal_zlib
    except ImportError:  # isal is a dependency, but a platform without its wheel still works
        def zlib_cluster(data: bytes) -> bytes:
            # compressobj, not compress(): Python 3.10's zlib.compress takes no wbits.
            deflate = zlib.compressobj(ZLIB_LEVEL, zlib.DEFLATED, DEFLATE_WBITS)
            return deflate.compress(data) + deflate.flush()

        return zlib_cluster

    def isal_cluster(data: bytes) -> bytes:
        out: bytes = isal_zlib.compress(data, ISAL_LEVEL, DEFLATE_WBITS)
        return out

    return isal_cluster


# ---- reading the source ---------------------------------------------------------------------

class _Event(NamedTuple):
    """``span`` guest clusters from ``first``, in guest order, as the reading thread hands
    them over.

    ``kind`` _SKIP: leave unallocated; _ZERO: zero clusters; _DATA: ``data`` holds the
    clusters' bytes (shorter at the disk's end), ``touched`` the ranges of clusters that are not
    all zeros (absolute cluster numbers, ``[start, stop)``) and ``pieces`` the non-zero
    ``(guest offset, bytes)`` runs to write (None when compressing, which needs whole clusters).
    """

    first: int
    span: int
    kind: int
    data: bytes = b""
    touched: tuple[tuple[int, int], ...] = ()
    pieces: tuple[tuple[int, bytes], ...] | None = None


def _source_kinds(disk: Disk, backing_mode: bool) -> Iterator[tuple[int, int, int]]:
    """``(offset, length, kind)`` runs of the source, in guest order.

    Without a backing file the output must stand alone: the guest-visible map decides, and
    whatever reads as zero is skipped. With one, the source's own layer decides, so ranges it
    leaves to its backing file stay unallocated and its zeros stay explicit.
    """
    if backing_mode:
        for run in disk.layer_runs():
            kind = (_DATA if run.state is BlockState.DATA
                    else _ZERO if run.state is BlockState.ZERO else _SKIP)
            yield run.offset, run.length, kind
    else:
        for ext in disk.extents():
            yield ext.offset, ext.length, _DATA if ext.kind is ExtentKind.DATA else _SKIP


def _mix(a: int, b: int) -> int:
    """The kind of a cluster two runs share. Data wins; a cluster that is partly zero and
    partly left to the backing file cannot be said in one L2 entry, so it is read (through the
    source's backing chain) and stored as data."""
    if a == b:
        return a
    return _DATA


def cluster_spans(kinds: Iterator[tuple[int, int, int]], cs: int, max_data: int
                  ) -> Iterator[tuple[int, int, int]]:
    """Turn byte runs into ``(first cluster, count, kind)`` spans, merged, in order.

    Data spans are cut at ``max_data`` clusters, so each is read soon after the source
    reported it (a view that had to read to answer, like ``DiffDisk``, still holds it).
    """
    pending: list[int] = []  # [first, count, kind] of the span not yet yielded
    partial: int | None = None  # the kind so far of a cluster a run ended inside
    last_end = 0

    def emit(first: int, count: int, kind: int) -> Iterator[tuple[int, int, int]]:
        nonlocal pending
        if pending and pending[2] == kind and pending[0] + pending[1] == first:
            pending[1] += count
        else:
            if pending:
                yield pending[0], pending[1], pending[2]
            pending = [first, count, kind]
        while pending[2] == _DATA and pending[1] >= max_data:
            yield pending[0], max_data, _DATA
            pending = [pending[0] + max_data, pending[1] - max_data, _DATA]
        if not pending[1]:
            pending = []

    for offset, length, kind in kinds:
        end = offset + length
        last_end = end
        cluster = offset // cs
        if offset % cs:
            partial = kind if partial is None else _mix(partial, kind)
            if end < (cluster + 1) * cs:
                continue
            yield from emit(cluster, 1, partial)
            partial = None
            cluster += 1
        whole_end = end // cs
        if whole_end > cluster:
            yield from emit(cluster, whole_end - cluster, kind)
        if end % cs:
            partial = kind
    if partial is not None:
        yield from emit((last_end - 1) // cs, 1, partial)
    if pending:
        yield pending[0], pending[1], pending[2]


def _split(first: int, data: bytes, cs: int, granule: int, zero: bytes,
           want_pieces: bool) -> tuple[tuple[tuple[int, int], ...],
                                       tuple[tuple[int, bytes], ...] | None]:
    """The non-zero cluster ranges of a cluster-aligned chunk, and its non-zero pieces.

    Granules are aligned to the chunk's start, which is a cluster boundary; slicing bytes and
    comparing runs at memcmp speed (memoryview comparison does not).
    """
    n = len(data)
    base = first * cs
    clusters = -(-n // cs)
    if zero[:64] not in data:  # no 64 zero bytes in a row: no zero granule can hide here
        return ((first, first + clusters),), ((base, data),) if want_pieces else None
    if data == bytes(n):
        return (), () if want_pieces else None
    pieces: list[tuple[int, bytes]] = []
    ranges: list[list[int]] = []
    start = -1
    pos = 0
    while pos < n:
        nxt = min(n, pos + granule)
        piece = data[pos:nxt]
        if piece == zero or (nxt - pos != granule and piece == bytes(nxt - pos)):
            if start >= 0:
                pieces.append((base + start, data[start:pos]))
                start = -1
        else:
            if start < 0:
                start = pos
            cluster = first + pos // cs
            if ranges and ranges[-1][1] >= cluster:
                ranges[-1][1] = cluster + 1
            else:
                ranges.append([cluster, cluster + 1])
        pos = nxt
    if start >= 0:
        pieces.append((base + start, data[start:]))
    touched = tuple((a, b) for a, b in ranges)
    return touched, tuple(pieces) if want_pieces else None


def read_events(disk: Disk, settings: Settings) -> Iterator[_Event]:
    """The source as cluster events: spans to skip or zero, and data read in big chunks."""
    cs = settings.cluster_size
    granule = min(ZERO_GRANULE, cs)
    zero = bytes(granule)
    per_chunk = max(1, MAX_IO // cs)
    backing_mode = settings.backing_file is not None
    for first, count, kind in cluster_spans(_source_kinds(disk, backing_mode), cs, per_chunk):
        if kind != _DATA:
            yield _Event(first, count, kind)
            continue
        pos = first
        while pos < first + count:
            n = min(per_chunk, first + count - pos)
            data = disk.read_at(pos * cs, n * cs)
            touched, pieces = _split(pos, data, cs, granule, zero, not settings.compress)
            yield _Event(pos, n, _DATA, data, touched, pieces)
            pos += n


# ---- the writer -----------------------------------------------------------------------------

def _be64(table: array.array[int]) -> bytes:
    """A table of 64-bit entries as big-endian bytes (the array itself is left as it is)."""
    if sys.byteorder == "little":
        table = array.array("Q", table)
        table.byteswap()
    return table.tobytes()


def pack_refcounts(counts: bytes | bytearray, bits: int) -> bytes:
    """Refcount entries of ``bits`` bits each, big-endian; below 8 bits, entry 0 sits in the
    least significant bits of its byte (the spec's rule for sub-byte widths)."""
    if bits == 8:
        return bytes(counts)
    if bits > 8:
        code = {16: "H", 32: "I", 64: "Q"}[bits]
        return struct.pack(f">{len(counts)}{code}", *counts)
    per_byte = 8 // bits
    padded = bytes(counts) + bytes(-len(counts) % per_byte)
    packed = list(padded[0::per_byte])
    for j in range(1, per_byte):
        shift = j * bits
        column = padded[j::per_byte]
        packed = [acc | value << shift for acc, value in zip(packed, column, strict=True)]
    return bytes(packed)


class _Builder:
    """Appends host clusters, fills one L2 table at a time, counts references.

    ``end`` is the first free byte of the host file: everything below it is in use and
    counted in ``refcounts`` (one byte per host cluster, so ``len(refcounts)`` is always
    ``ceil(end / cluster_size)``).
    """

    def __init__(self, fd: int, settings: Settings, size: int) -> None:
        self.s = settings
        self.cs = cs = settings.cluster_size
        self.size = size
        self.l2_entries = cs // 8
        self.l1_size = -(-size // (cs * self.l2_entries))
        self.l1 = array.array("Q", bytes(8 * self.l1_size))
        self.table: array.array[int] | None = None
        self.table_index = -1
        self.refcounts = bytearray(b"\x01")  # cluster 0: the header
        self.end = cs
        self.fd = fd
        self.writer = WriteBehind(fd)
        self.zero_flag = settings.version >= 3
        self.max_shared = min((1 << settings.refcount_bits) - 1, MAX_SHARED)
        # The most host clusters a refcount table within QEMU's 8 MiB limit can describe
        # (less a margin for the refcount structures themselves).
        per_block = cs * 8 // settings.refcount_bits
        table_clusters = S.MAX_REFTABLE_BYTES // cs
        self.max_clusters = (S.MAX_REFTABLE_BYTES // 8) * per_block - table_clusters - \
            (S.MAX_REFTABLE_BYTES // 8)
        self.offset_mask, _ = S.compressed_layout(settings.cluster_bits)
        self._buf = bytearray()  # appended bytes (compressing) not yet handed to the writer
        self._buf_at = 0

    # ---- host allocation ------------------------------------------------------------------

    def _room(self, clusters: int) -> None:
        if clusters > self.max_clusters:
            raise InvalidInputError(
                f"qcow2: the image would need a refcount table over QEMU's 8 MiB limit "
                f"({self.cs}-byte clusters, refcount_bits={self.s.refcount_bits})",
                hint="use a larger cluster_size or smaller refcount_bits")

    def alloc(self, n: int) -> int:
        """Reserve ``n`` fresh, contiguous host clusters (refcount 1); return the offset."""
        first = len(self.refcounts)  # the first cluster nothing uses yet
        self._room(first + n)
        self.refcounts += b"\x01" * n
        self.end = (first + n) * self.cs
        return first * self.cs

    def append_compressed(self, blob: bytes) -> int:
        """Pack one compressed cluster after the previous one; its L2 entry."""
        cs = self.cs
        pos = self.end
        if pos % cs and self.refcounts[pos // cs] >= self.max_shared:
            pos = len(self.refcounts) * cs  # the shared cluster is full: start a fresh one
        if pos > self.offset_mask:
            raise UnsupportedFeatureError(
                f"qcow2: compressed data beyond host offset {self.offset_mask:#x} cannot be "
                f"addressed with {cs}-byte clusters")
        first, last = pos // cs, (pos + len(blob) - 1) // cs
        self._room(last + 1)
        if first < len(self.refcounts):  # shares the partly used cluster: one more user
            self.refcounts[first] += 1
            first += 1
        self.refcounts += b"\x01" * (last + 1 - first)
        self.append(pos, blob)
        self.end = pos + len(blob)
        return S.encode_compressed(pos, len(blob), self.s.cluster_bits)

    def place_cluster(self, data: bytes) -> int:
        """A fresh cluster holding ``data`` (an L2 table, or a cluster that did not shrink).

        When compressing, it joins the append buffer, so that compressed data, plain clusters
        and tables reach the file in few large writes; otherwise its zero runs stay holes.
        """
        offset = self.alloc(1)
        if self.s.compress:
            self.append(offset, data)
        else:
            self.write_table(offset, data)
        return offset

    def append(self, pos: int, data: bytes) -> None:
        """Queue ``data`` for host offset ``pos``, at or after the buffer's end.

        A gap shorter than a cluster is the unused tail of the buffer's last (already counted)
        cluster, before an aligned cluster or after a shared cluster filled up: it is written as
        zeros so that the buffer stays one write. A longer gap (clusters allocated but never
        written, such as v2 zero clusters) ends the buffer.
        """
        if self._buf:
            gap = pos - (self._buf_at + len(self._buf))
            if 0 < gap < self.cs:
                self._buf += bytes(gap)
            elif gap:
                self._flush_buffer()
        if not self._buf:
            self._buf_at = pos
        self._buf += data
        if len(self._buf) >= MAX_IO:
            self._flush_buffer()

    def _flush_buffer(self) -> None:
        if self._buf:
            buf, self._buf = self._buf, bytearray()
            self.writer.write(self._buf_at, bytes(buf))

    # ---- the L2 table being filled --------------------------------------------------------

    def advance(self, cluster: int) -> None:
        """Write the current L2 table once the guest has moved past its range."""
        if self.table is not None and cluster // self.l2_entries != self.table_index:
            self._flush_table()

    def write_table(self, offset: int, data: bytes) -> None:
        """Write a metadata table, leaving its 4 KiB runs of zeros as holes: with big clusters
        most of an L1, L2 or refcount cluster is zeros (the file's size is set at the end)."""
        zero = bytes(ZERO_GRANULE)
        start = -1
        for pos in range(0, len(data), ZERO_GRANULE):
            if data[pos:pos + ZERO_GRANULE] == zero[:len(data) - pos]:
                if start >= 0:
                    self.writer.write(offset + start, data[start:pos])
                    start = -1
            elif start < 0:
                start = pos
        if start >= 0:
            self.writer.write(offset + start, data[start:])

    def _flush_table(self) -> None:
        assert self.table is not None
        offset = self.place_cluster(_be64(self.table))
        self.l1[self.table_index] = offset | S.L2E_COPIED
        self.table = None

    def _table_for(self, index: int) -> array.array[int]:
        """The L2 table of L1 entry ``index`` (indexes only grow: the previous one is done)."""
        if index != self.table_index or self.table is None:
            if self.table is not None:
                self._flush_table()
            self.table = array.array("Q", bytes(self.cs))
            self.table_index = index
        return self.table

    def set_one(self, cluster: int, value: int) -> None:
        index, slot = divmod(cluster, self.l2_entries)
        self._table_for(index)[slot] = value

    def set_run(self, first: int, count: int, value: int, step: int) -> None:
        """L2 entries ``first..first+count-1`` := value, value + step, ..."""
        while count > 0:
            index, slot = divmod(first, self.l2_entries)
            table = self._table_for(index)
            n = min(count, self.l2_entries - slot)
            if step:
                table[slot:slot + n] = array.array("Q", range(value, value + n * step, step))
            else:
                table[slot:slot + n] = array.array("Q", [value]) * n
            value += n * step
            first += n
            count -= n

    def zero_span(self, first: int, count: int) -> None:
        """Clusters that must read as zero and not fall through to the backing file."""
        if self.zero_flag:
            self.set_run(first, count, S.L2E_ZERO, 0)
        else:  # v2 has no zero flag: real clusters, never written, read back as zeros
            self.set_run(first, count, self.alloc(count) | S.L2E_COPIED, self.cs)

    # ---- events ---------------------------------------------------------------------------

    def store_plain(self, event: _Event) -> None:
        """Data clusters stored as they are; zero granules inside them stay holes."""
        touched = event.touched
        total = sum(stop - start for start, stop in touched)
        host = self.alloc(total) if total else 0  # one contiguous block for the chunk
        where: list[tuple[int, int, int]] = []  # (first cluster, stop, host offset)
        pos = event.first
        for start, stop in touched:
            if start > pos and self.s.backing_file is not None:
                self.zero_span(pos, start - pos)
            self.set_run(start, stop - start, host | S.L2E_COPIED, self.cs)
            where.append((start, stop, host))
            host += (stop - start) * self.cs
            pos = stop
        end = event.first + event.span
        if pos < end and self.s.backing_file is not None:
            self.zero_span(pos, end - pos)
        assert event.pieces is not None
        i = 0
        for offset, piece in event.pieces:
            cluster = offset // self.cs
            while where[i][1] <= cluster:
                i += 1
            start, _, block = where[i]
            self.writer.write(block + offset - start * self.cs, piece)

    def store_compressed(self, event: _Event, blobs: list[bytes | None]) -> None:
        """Compressed clusters packed in order; those that did not shrink stored plain."""
        cs = self.cs
        pos = event.first
        index = 0
        for start, stop in event.touched:
            if start > pos and self.s.backing_file is not None:
                self.zero_span(pos, start - pos)
            for cluster in range(start, stop):
                blob = blobs[index]
                index += 1
                if blob is not None:
                    self.set_one(cluster, self.append_compressed(blob))
                    continue
                at = (cluster - event.first) * cs
                self.set_one(cluster, self.place_cluster(event.data[at:at + cs]) | S.L2E_COPIED)
            pos = stop
        end = event.first + event.span
        if pos < end and self.s.backing_file is not None:
            self.zero_span(pos, end - pos)

    # ---- the end ---------------------------------------------------------------------------

    def finish(self) -> None:
        """Last L2 table, L1 table, refcounts (counting themselves), then the header."""
        cs = self.cs
        if self.table is not None:
            self._flush_table()
        self._flush_buffer()
        l1_offset = 0
        if self.l1_size:
            l1_offset = self.alloc(-(-self.l1_size * 8 // cs))
            self.write_table(l1_offset, _be64(self.l1))
        # The refcount table and blocks sit after everything else and count themselves, so
        # their number depends on itself: grow both until they cover every cluster.
        used = len(self.refcounts)
        per_block = cs * 8 // self.s.refcount_bits
        blocks = table = 0
        while True:
            need_blocks = -(-(used + table + blocks) // per_block)
            need_table = -(-need_blocks * 8 // cs)
            if (need_blocks, need_table) == (blocks, table):
                break
            blocks, table = need_blocks, need_table
        if table * cs > S.MAX_REFTABLE_BYTES:
            self._room(1 << 62)  # raises: over QEMU's limit
        table_offset = self.alloc(table + blocks)
        if len(self.refcounts) != used + table + blocks:
            raise InternalError("qcow2 writer: refcount structures miscounted")
        reftable = array.array("Q", bytes(table * cs))
        for i in range(blocks):
            block_offset = table_offset + (table + i) * cs
            reftable[i] = block_offset
            counts = self.refcounts[i * per_block:(i + 1) * per_block]
            self.write_table(block_offset, pack_refcounts(counts, self.s.refcount_bits))
        self.write_table(table_offset, _be64(reftable))
        self.writer.write(0, header_cluster(self.s, self.size, self.l1_size, l1_offset,
                                            table_offset, table))
        # Every cluster counted must lie inside the file, even where only holes were left.
        os.ftruncate(self.fd, len(self.refcounts) * cs)


def create(out: AtomicOutput, disk: Disk, options: Mapping[str, str],
           progress: ProgressFn) -> None:
    """Write ``disk`` as qcow2 into ``out.path``, in one pass over the source."""
    settings = parse_create_options(options)
    size = check_size(settings, disk.size)
    fd = os.open(out.path, os.O_WRONLY | getattr(os, "O_BINARY", 0))
    try:
        builder = _Builder(fd, settings, size)
        with builder.writer:
            progress(0, disk.size)
            if settings.compress:
                _compressed_pass(builder, disk, settings, progress)
            else:
                with _closing(prefetch(read_events(disk, settings))) as events:
                    for event in events:
                        _handle(builder, event, None)
                        progress(min(disk.size,
                                     (event.first + event.span) * settings.cluster_size),
                                 disk.size)
            builder.finish()
        progress(disk.size, disk.size)
    finally:
        os.close(fd)


@contextmanager
def _closing(events: Iterator[_Event]) -> Iterator[Iterator[_Event]]:
    """Close the prefetching generator on the way out, so that its reading thread stops at
    once when writing fails, instead of when the generator is collected."""
    try:
        yield events
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()


def _handle(builder: _Builder, event: _Event, blobs: list[bytes | None] | None) -> None:
    builder.advance(event.first)
    if event.kind == _ZERO:
        builder.zero_span(event.first, event.span)
    elif event.kind == _DATA:
        if blobs is None:
            builder.store_plain(event)
        else:
            builder.store_compressed(event, blobs)


def _compressed_pass(builder: _Builder, disk: Disk, settings: Settings,
                     progress: ProgressFn) -> None:
    """Compress chunks in a thread pool; place the results strictly in guest order."""
    cs = settings.cluster_size
    compress = make_compressor(settings.compression_type)

    def job(event: _Event) -> list[bytes | None]:
        out: list[bytes | None] = []
        for start, stop in event.touched:
            for cluster in range(start, stop):
                at = (cluster - event.first) * cs
                data = event.data[at:at + cs]
                if len(data) < cs:  # the disk's last cluster: compressed whole, zero-padded
                    data += bytes(cs - len(data))
                blob = compress(data)
                out.append(blob if len(blob) < cs else None)
        return out

    workers = max(2, os.cpu_count() or 2)
    window = 2 * workers
    pending: deque[tuple[_Event, Future[list[bytes | None]] | None]] = deque()
    in_flight = 0

    def settle() -> None:
        nonlocal in_flight
        event, future = pending.popleft()
        blobs = None
        if future is not None:
            blobs = future.result()
            in_flight -= 1
        # A data chunk that turned out all zeros had no job: it has no blobs to place.
        _handle(builder, event, blobs if blobs is not None else [])
        progress(min(disk.size, (event.first + event.span) * cs), disk.size)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imgbridge-qcow2-c") as pool:
        try:
            with _closing(prefetch(read_events(disk, settings))) as events:
                for event in events:
                    future = None
                    if event.kind == _DATA and event.touched:
                        future = pool.submit(job, event)
                        in_flight += 1
                    pending.append((event, future))
                    while in_flight > window:
                        settle()
            while pending:
                settle()
        finally:
            for _, future in pending:
                if future is not None:
                    future.cancel()
