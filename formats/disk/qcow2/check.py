"""qcow2 consistency check and repair, counted and worded the way ``qemu-img check`` does it.

Every reference count is rebuilt from scratch by walking the metadata — the header cluster,
the active L1 table and every snapshot's, each L2 table they reach, every data and compressed
cluster, the snapshot table, the refcount table and blocks, the bitmap directory, tables and
data, the encryption header — into a per-cluster array, and compared with the stored counts:

* stored < rebuilt (a used cluster with refcount 0 included) is a corruption, so is every
  malformed entry (reserved bits, misaligned offsets, references past the end of the file,
  metadata clusters shared with anything else) and an OFLAG_COPIED bit in the active tables
  that disagrees with "refcount == 1";
* stored > rebuilt is a leak: space wasted, no data at risk.

Memory stays O(host clusters) and bounded: counts live in chunks of 64 Ki clusters allocated
on first use, tables are streamed, each distinct L2 table is read once however many L1 entries
point at it (its clusters are counted once per reference, as QEMU counts them), and the work is
bounded by the file's size, so a hostile image cannot make the check loop or allocate wildly.

Repair (``-r leaks`` / ``-r all``) writes through its own read-write descriptor: refcount blocks
are rewritten in place from the rebuilt counts; missing or unusable refcount blocks (and, if it
is too small, the refcount table) are allocated at the end of the file. Leaks are freed only
when every reference could be resolved — otherwise the "leaked" clusters may be exactly what a
damaged table should point to, and the report says so instead of guessing. After a repair the
image is checked again from scratch and that second check is what the report counts, as
qemu-img's "double check" does.

References: QEMU docs/interop/qcow2.txt ("Host cluster management", "Cluster mapping",
"Extended L2 Entries", "Snapshots", "Bitmaps"). qemu-img check's behaviour and messages were
studied (QEMU block/qcow2-refcount.c, read for its rules only) and checked against qemu-img.
"""

from __future__ import annotations

import array
import os
import struct
import sys
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache, reduce
from itertools import compress, pairwise, repeat
from operator import add, and_, eq, gt, lshift, ne, not_, or_, rshift, truth
from typing import TYPE_CHECKING, Any

from imgbridge.concurrency import pwrite_all
from imgbridge.errors import InvalidImageError, InvalidInputError
from imgbridge.model.disk import CheckReport
from imgbridge.source import ByteSource

from . import _structs as S
from .reader import parse_header, read_extensions, read_snapshots

if TYPE_CHECKING:
    from .reader import Qcow2Disk

__all__ = ["check_image"]

#: qemu-img refuses images of more host clusters than a C int holds; so do we, before counting.
MAX_HOST_CLUSTERS = (1 << 31) - 1
#: Memory the per-cluster count arrays may take before the check is refused.
MAX_COUNT_MEMORY = 1 << 30
#: Detail lines kept in the report; the counts stay exact beyond it.
MAX_MESSAGES = 1000
#: Counts are kept in chunks of this many clusters, allocated on first use.
CHUNK_BITS = 16
CHUNK = 1 << CHUNK_BITS
#: Table entries read per pread when a table is streamed.
TABLE_PIECE = 1 << 16
#: Runs of data clusters remembered per active L2 table for the OFLAG_COPIED pass.
MAX_REMEMBERED_RUNS = 256
#: Decoded stored refcount blocks kept for random lookups (the OFLAG_COPIED pass).
STORED_CACHE_BLOCKS = 32

_LITTLE = sys.byteorder == "little"
_U32 = "I" if array.array("I").itemsize == 4 else "L"


def _bad(message: str, path: str, offset: int | None = None) -> InvalidImageError:
    return InvalidImageError(message, format="qcow2", path=path, offset=offset)


# ---- refcount block entries of any width ------------------------------------------------------

class _Codec:
    """Refcount block bytes <-> an array of counts, for widths of 1 to 64 bits.

    Sub-byte widths pack entries from the least significant bit up (the spec's rule); they are
    (un)packed with ``bytes.translate`` and big-integer ORs, so no Python loop runs per entry.
    """

    def __init__(self, refcount_order: int, cluster_size: int) -> None:
        self.bits = 1 << refcount_order
        self.max = (1 << self.bits) - 1
        self.per_block = cluster_size * 8 // self.bits
        self.typecode = {64: "Q", 32: _U32, 16: "H"}.get(self.bits, "B")
        self.itemsize = array.array(self.typecode).itemsize
        if self.bits < 8:
            per_byte = 8 // self.bits
            mask = self.max
            self._unpack = [bytes((x >> (k * self.bits)) & mask for x in range(256))
                            for k in range(per_byte)]
            self._pack = [bytes(((x & mask) << (k * self.bits)) & 0xFF for x in range(256))
                          for k in range(per_byte)]

    def zeros(self, n: int) -> array.array[int]:
        return array.array(self.typecode, bytes(n * self.itemsize))

    def decode(self, raw: bytes) -> array.array[int]:
        if self.bits >= 8:
            values = array.array(self.typecode, raw)
            if _LITTLE and self.bits > 8:
                values.byteswap()
            return values
        per_byte = 8 // self.bits
        out = bytearray(len(raw) * per_byte)
        for k, table in enumerate(self._unpack):
            out[k::per_byte] = raw.translate(table)
        return array.array("B", out)

    def encode(self, values: array.array[int]) -> bytes:
        if self.bits >= 8:
            if not (_LITTLE and self.bits > 8):
                return values.tobytes()
            swapped = array.array(self.typecode, values)
            swapped.byteswap()
            return swapped.tobytes()
        per_byte = 8 // self.bits
        raw = values.tobytes()
        if len(raw) % per_byte:
            raw += bytes(per_byte - len(raw) % per_byte)
        size = len(raw) // per_byte
        packed = 0
        for k, table in enumerate(self._pack):
            packed |= int.from_bytes(raw[k::per_byte].translate(table), "little")
        return packed.to_bytes(size, "little")


# ---- per-cluster counters ----------------------------------------------------------------------

class _Budget:
    """Memory the count arrays may still take; refusing is better than swapping."""

    def __init__(self, path: str, limit: int = MAX_COUNT_MEMORY) -> None:
        self.path = path
        self.limit = limit
        self.left = limit

    def take(self, nbytes: int) -> None:
        self.left -= nbytes
        if self.left < 0:
            raise _bad(f"checking this image would need more than {self.limit >> 20} MiB "
                       "for reference counts (its metadata points across too many clusters)",
                       self.path)


class _ClusterCounts:
    """A saturating counter per host cluster, in chunks allocated on first use.

    ``limit`` is one past the highest cluster ever counted: qemu-img compares refcounts up to
    ``max(clusters in the file, limit)``.
    """

    def __init__(self, typecode: str, maximum: int, budget: _Budget) -> None:
        self.typecode = typecode
        self.max = maximum
        self.budget = budget
        self.chunks: dict[int, array.array[int]] = {}
        self.limit = 0
        self._zero_chunk = array.array(typecode, bytes(CHUNK * array.array(typecode).itemsize))

    def _chunk(self, index: int) -> array.array[int]:
        chunk = self.chunks.get(index)
        if chunk is None:
            self.budget.take(CHUNK * self._zero_chunk.itemsize)
            chunk = self.chunks[index] = array.array(self.typecode, self._zero_chunk)
        return chunk

    def get(self, cluster: int) -> int:
        chunk = self.chunks.get(cluster >> CHUNK_BITS)
        return 0 if chunk is None else chunk[cluster & (CHUNK - 1)]

    def add(self, cluster: int, n: int) -> int:
        """Count ``n`` more references; return how many did not fit (refcount overflow)."""
        chunk = self._chunk(cluster >> CHUNK_BITS)
        if cluster >= self.limit:
            self.limit = cluster + 1
        i = cluster & (CHUNK - 1)
        value = chunk[i] + n
        if value > self.max:
            chunk[i] = self.max
            return value - self.max
        chunk[i] = value
        return 0

    def sub(self, cluster: int, n: int) -> None:
        chunk = self.chunks.get(cluster >> CHUNK_BITS)
        if chunk is not None:
            i = cluster & (CHUNK - 1)
            chunk[i] = max(0, chunk[i] - n)

    def slice(self, start: int, stop: int) -> array.array[int]:
        """The counts of clusters ``start..stop-1`` (zeros where nothing was counted)."""
        parts: list[array.array[int]] = []
        pos = start
        while pos < stop:
            index = pos >> CHUNK_BITS
            lo = pos & (CHUNK - 1)
            hi = min(CHUNK, lo + (stop - pos))
            chunk = self.chunks.get(index, self._zero_chunk)
            parts.append(chunk[lo:hi])
            pos += hi - lo
        if len(parts) == 1:
            return parts[0]
        out = array.array(self.typecode)
        for part in parts:
            out.extend(part)
        return out

    def blocks_in_use(self, per_block: int) -> set[int]:
        """Indexes of the refcount blocks whose range holds a non-zero count."""
        out: set[int] = set()
        for index, chunk in self.chunks.items():
            base = index << CHUNK_BITS
            if per_block >= CHUNK:
                if any(chunk):
                    out.add(base // per_block)
                continue
            for lo in range(0, CHUNK, per_block):
                if any(chunk[lo:lo + per_block]):
                    out.add((base + lo) // per_block)
        return out


_MASK_TABLES: dict[int, bytes] = {}


def _byte_mask(m: int) -> bytes:
    """The ``bytes.translate`` table mapping every byte to ``byte & m``."""
    table = _MASK_TABLES.get(m)
    if table is None:
        table = _MASK_TABLES[m] = bytes(x & m for x in range(256))
    return table


def _any_bits(raw: bytes, mask: int) -> bool:
    """Whether any big-endian u64 in ``raw`` has a bit of ``mask`` set, tested a byte column
    at a time at memcpy speed (no Python integer is made per entry)."""
    for k in range(8):
        m = (mask >> (8 * (7 - k))) & 0xFF
        if m:
            column = raw[k::8].translate(_byte_mask(m))
            if column.count(0) != len(column):
                return True
    return False


def _u64s(raw: bytes) -> array.array[int]:
    """Big-endian u64s as an array of ints."""
    table = array.array("Q", raw)
    if _LITTLE:
        table.byteswap()
    return table


def _last_nonzero(values: array.array[int]) -> int:
    """Index of the last non-zero element, -1 if none (found at memcmp speed)."""
    raw = values.tobytes().rstrip(b"\0")
    return (len(raw) - 1) // values.itemsize if raw else -1


def _differences(a: array.array[int], b: array.array[int], step: int = 4096) -> Iterator[int]:
    """Indexes where two equally long arrays differ; equal stretches are skipped in C."""
    for lo in range(0, len(a), step):
        if a[lo:lo + step] != b[lo:lo + step]:
            for i in range(lo, min(lo + step, len(a))):
                if a[i] != b[i]:
                    yield i


# ---- what the check reads ----------------------------------------------------------------------

@dataclass
class _SnapshotEntry:
    index: int
    id: str
    name: str
    l1_offset: int
    l1_size: int
    extra_size: int


class _Image:
    """The parts of a qcow2 file the check needs, read through one byte source."""

    def __init__(self, source: ByteSource, header: S.Header, extensions: Any) -> None:
        self.source = source
        self.path = source.name
        self.h = header
        self.ext = extensions
        self.cs = header.cluster_size
        self.bits = header.cluster_bits
        self.file_size = source.size
        self.file_clusters = -(-self.file_size // self.cs)
        self.data_file = bool(header.incompatible_features & S.INCOMPAT_DATA_FILE)
        self.codec = _Codec(header.refcount_order, self.cs)
        self.snapshots, self.snapshots_size = _read_snapshot_table(source, header)

    @classmethod
    def reread(cls, source: ByteSource) -> _Image:
        """Parse the header again (after a repair moved the refcount table, say)."""
        header = parse_header(source)
        return cls(source, header, read_extensions(source, header))

    def read(self, offset: int, n: int) -> bytes:
        """``n`` bytes at ``offset``; what lies past the end of the file reads as zeros (QEMU's
        file driver does the same, so a table cut short is walked the way qemu-img walks it)."""
        data = self.source.read_at(offset, n)
        return data if len(data) == n else data + bytes(n - len(data))

    def u64_table(self, offset: int, count: int) -> array.array[int]:
        return _u64s(self.read(offset, 8 * count))

    def u64_pieces(self, offset: int, count: int
                   ) -> Iterator[tuple[int, bytes, array.array[int]]]:
        """A big-endian u64 table streamed in pieces: ``(index of the first entry, its bytes,
        its entries)``. Holes in the file (the filesystem says where), whatever lies past its
        end and all-zero pieces hold no entry worth a look, and are skipped."""
        for run in self.source.runs(offset, 8 * count):
            if not run.data:
                continue
            first = (run.offset - offset) // 8
            stop = min(count, -(-(run.offset + run.length - offset) // 8))
            for base in range(first, stop, TABLE_PIECE):
                n = min(TABLE_PIECE, stop - base)
                raw = self.source.read_at(offset + 8 * base, 8 * n)
                if raw.count(0) == len(raw):
                    continue
                raw += bytes(8 * n - len(raw))
                yield base, raw, _u64s(raw)


def _read_snapshot_table(source: ByteSource, h: S.Header) -> tuple[list[_SnapshotEntry], int]:
    """The snapshot entries' L1 tables and the table's byte size (without the last entry's
    padding, which is how qemu-img sizes it when it counts the table's clusters)."""
    snapshots = read_snapshots(source, h)
    entries = [_SnapshotEntry(i, sn.id, sn.name, sn.l1_table_offset, sn.l1_size, len(sn.extra))
               for i, sn in enumerate(snapshots)]
    size = sum(S.pad8(sn.entry_size) for sn in snapshots[:-1])
    if snapshots:
        size += snapshots[-1].entry_size
    return entries, size


class _StoredRefcounts:
    """Random lookups of the refcounts stored in the image (a few decoded blocks cached)."""

    def __init__(self, img: _Image, reftable: array.array[int]) -> None:
        self.img = img
        self.reftable = reftable
        self._cache: OrderedDict[int, array.array[int]] = OrderedDict()

    def _block(self, index: int) -> array.array[int] | None:
        """Decoded block ``index``; an empty array when it is not allocated, None when its
        offset is not cluster-aligned (qemu-img cannot read it either)."""
        if index >= len(self.reftable):
            return array.array(self.img.codec.typecode)
        offset = self.reftable[index] & S.REFT_OFFSET_MASK
        if not offset:
            return array.array(self.img.codec.typecode)
        if offset % self.img.cs:
            return None
        block = self._cache.get(index)
        if block is None:
            block = self.img.codec.decode(self.img.read(offset, self.img.cs))
            self._cache[index] = block
            if len(self._cache) > STORED_CACHE_BLOCKS:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(index)
        return block

    def get(self, cluster: int) -> int | None:
        """The stored refcount, or None when its refcount block cannot be read."""
        index, i = divmod(cluster, self.img.codec.per_block)
        block = self._block(index)
        if block is None:
            return None
        return block[i] if block else 0

    def values(self, cluster: int, n: int) -> array.array[int] | None:
        """The stored refcounts of ``n`` clusters from ``cluster`` on (None: unreadable)."""
        codec = self.img.codec
        out = array.array(codec.typecode)
        while n > 0:
            index, i = divmod(cluster, codec.per_block)
            k = min(n, codec.per_block - i)
            block = self._block(index)
            if block is None:
                return None
            out.extend(block[i:i + k] if block else codec.zeros(k))
            cluster += k
            n -= k
        return out


# ---- the check ---------------------------------------------------------------------------------

class _Findings:
    """Counts and detail lines; the lines stop at MAX_MESSAGES, the counts never do."""

    def __init__(self) -> None:
        self.corruptions = 0
        self.leaks = 0
        self.check_errors = 0
        self.messages: list[str] = []
        self.notes: list[str] = []
        self._omitted = 0

    def say(self, line: str) -> None:
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(line)
        else:
            self._omitted += 1

    def corruption(self, line: str, n: int = 1) -> None:
        self.corruptions += n
        self.say(line)

    def leak(self, line: str) -> None:
        self.leaks += 1
        self.say(line)

    def error(self, line: str, n: int = 1) -> None:
        self.check_errors += n
        self.say(line)

    def note(self, line: str) -> None:
        if line not in self.notes:
            self.notes.append(line)

    def all_messages(self) -> list[str]:
        if not self._omitted:
            return list(self.messages)
        return [*self.messages, f"... and {self._omitted} more lines like these"]


@dataclass
class _Metadata:
    """Clusters one metadata structure occupies, and how many references it should have."""

    first: int
    last: int
    expected: int
    what: str


class _Checker:
    """One pass over the image: rebuild the counts, compare, check OFLAG_COPIED."""

    def __init__(self, img: _Image) -> None:
        self.img = img
        self.f = _Findings()
        codec = img.codec
        self.counts = _ClusterCounts(codec.typecode, codec.max, _Budget(img.path))
        #: L2 table cluster -> references from every L1 table / from the active one.
        self.l2_total: dict[int, int] = {}
        self.l2_active: dict[int, int] = {}
        self.metadata: list[_Metadata] = []
        #: Why some references could not be followed (leaks are then not freed).
        self.unresolved: list[str] = []
        #: Misaligned preallocated zero clusters: (L2 table cluster, entry index, references).
        self.prealloc_fixes: list[tuple[int, int, int]] = []
        #: Active L2 table -> (runs of (first cluster, count) it maps, whether all of its
        #: entries have OFLAG_COPIED set or none has): lets the OFLAG_COPIED pass check the
        #: table against the stored refcounts a run at a time without reading it again.
        self.oflag_runs: dict[int, tuple[list[tuple[int, int]], bool]] = {}
        self.reftable = array.array("Q")
        #: Refcount table entries whose block was counted (valid, inside the file).
        self.counted_refblocks: set[int] = set()
        self.rebuild = False
        self.highest = 0
        self.allocated = self.fragmented = self.compressed = 0
        self._overflow_hint = False

    # -- counting ---------------------------------------------------------------------------------

    @property
    def nb_clusters(self) -> int:
        """How far refcounts are compared: the file, or further if something points there."""
        return max(self.img.file_clusters, self.counts.limit)

    def _inc(self, cluster: int, n: int) -> None:
        over = self.counts.add(cluster, n)
        if over:
            self.f.corruption(f"ERROR: overflow cluster offset=0x{cluster << self.img.bits:x}",
                              over)
            if not self._overflow_hint:
                self._overflow_hint = True
                self.f.say("Use qemu-img amend to increase the refcount entry width or qemu-img "
                           "convert to create a clean copy if the image cannot be opened for "
                           "writing")

    def _ref(self, offset: int, size: int, n: int = 1) -> bool:
        """Count ``n`` references to every cluster ``[offset, offset+size)`` touches.

        Like qemu-img, a region may end less than a cluster past the end of the file (the last
        cluster may be partly written); anything further is a corruption and is not counted.
        """
        if size <= 0:
            return True
        img = self.img
        if offset + size - img.file_size >= img.cs:
            self.f.corruption("ERROR: counting reference for region exceeding the end of the "
                              f"file by one cluster or more: offset 0x{offset:x} size 0x{size:x}",
                              n)
            return False
        first, last = offset >> img.bits, (offset + size - 1) >> img.bits
        if last == first:
            self._inc(first, n)
        else:
            self._inc_run(first, last - first + 1, n)
        return True

    def _meta(self, offset: int, size: int, expected: int, what: str) -> None:
        if size > 0 and offset + size - self.img.file_size < self.img.cs:
            self.metadata.append(_Metadata(offset >> self.img.bits,
                                           (offset + size - 1) >> self.img.bits, expected, what))

    def _unresolved(self, why: str) -> None:
        if len(self.unresolved) < 10:
            self.unresolved.append(why)

    def calculate(self) -> None:
        """Rebuild every refcount from the metadata (qemu-img's order, qemu-img's rules)."""
        img, h, cs = self.img, self.img.h, self.img.cs
        if img.file_clusters > MAX_HOST_CLUSTERS:
            raise _bad(f"the file holds {img.file_clusters} clusters, more than the "
                       f"{MAX_HOST_CLUSTERS} a check can count", img.path)
        self._ref(0, cs)
        self._meta(0, cs, 1, "image header")
        self._walk_l1_tables()
        self._walk_l2_tables()
        if h.nb_snapshots:
            self._ref(h.snapshots_offset, img.snapshots_size)
            self._meta(h.snapshots_offset, img.snapshots_size, 1, "snapshot table")
        if h.version >= 3:
            # Version 3 requires the VM state size and disk size in every entry's extra data.
            for sn in img.snapshots:
                if sn.extra_size < 16:
                    self.f.corruption(f"ERROR snapshot table entry {sn.index} is incomplete")
        reftable_bytes = h.refcount_table_clusters * cs
        self._ref(h.refcount_table_offset, reftable_bytes)
        self._meta(h.refcount_table_offset, reftable_bytes, 1, "refcount table")
        crypto = img.ext.crypto
        if crypto is not None and h.crypt_method != S.CRYPT_LUKS:
            # QEMU refuses to open such an image; its "header area" means nothing.
            raise _bad("a full disk encryption header extension without LUKS encryption",
                       img.path)
        if crypto is not None and crypto.length:
            self._ref(crypto.offset, crypto.length)
            self._meta(crypto.offset, crypto.length, 1, "encryption header")
        self._walk_bitmaps()
        self.reftable = img.u64_table(h.refcount_table_offset, reftable_bytes // 8)
        self._check_refblocks()
        self._check_overlaps()

    def _walk_l1_tables(self) -> None:
        img, h = self.img, self.img.h
        # Identical L1 tables (same offset and size) are walked once with their multiplicity.
        groups: dict[tuple[int, int], list[int]] = {(h.l1_table_offset, h.l1_size): [1, 1]}
        names = {(h.l1_table_offset, h.l1_size): "active L1 table"}
        if img.data_file and img.snapshots:
            self.f.corruption(f"ERROR {len(img.snapshots)} snapshots in image with data file")
        for sn in img.snapshots:
            where = f"snapshot {sn.id} ({sn.name})"
            if sn.l1_offset % img.cs:
                self.f.corruption(f"ERROR {where} l1_offset={sn.l1_offset:#x}: L1 table is not "
                                  "cluster aligned; snapshot table entry corrupted")
                self._unresolved(f"the L1 table of {where} is not cluster-aligned")
                continue
            if sn.l1_size > S.MAX_L1_BYTES // 8:
                self.f.corruption(f"ERROR {where} l1_size={sn.l1_size:#x}: L1 table is too "
                                  "large; snapshot table entry corrupted")
                self._unresolved(f"the L1 table of {where} is too large")
                continue
            key = (sn.l1_offset, sn.l1_size)
            groups.setdefault(key, [0, 0])[0] += 1
            names.setdefault(key, f"L1 table of {where}")
        # In a sound image L1 tables never overlap, so together they fit in the file; more
        # means overlapping tables built to make the walk quadratic.
        in_file = sum(max(0, min(8 * size, img.file_size - offset)) for offset, size in groups)
        if in_file > img.file_size:
            raise _bad(f"the L1 tables overlap: together they cover {in_file} bytes of a "
                       f"{img.file_size}-byte file", img.path)
        for (offset, size), (mult, active) in groups.items():
            self._walk_l1(offset, size, mult, bool(active), names[(offset, size)])

    def _walk_l1(self, offset: int, size: int, mult: int, active: bool, what: str) -> None:
        if not size:
            return
        img, cs = self.img, self.img.cs
        if not self._ref(offset, 8 * size, mult):
            self._unresolved(f"the {what} lies past the end of the file")
        self._meta(offset, 8 * size, mult, what)
        for base, raw, table in img.u64_pieces(offset, size):
            l2_offsets = self._l1_piece_fast(raw, table)
            if l2_offsets is not None:
                for l2, n in l2_offsets.items():
                    self._add_l2(l2 >> img.bits, n * mult, n if active else 0)
                continue
            for i, entry in enumerate(table):
                if not entry:
                    continue
                if entry & S.L1E_RESERVED_MASK:
                    self.f.corruption(f"ERROR found L1 entry with reserved bits set: {entry:x}",
                                      mult)
                l2 = entry & S.L1E_OFFSET_MASK
                if not l2:
                    self.f.corruption(f"ERROR {what} entry {base + i} has flags but no L2 table "
                                      f"offset: {entry:x}", mult)
                    continue
                counted = self._ref(l2, cs, mult)
                if l2 % cs:
                    self.f.corruption(f"ERROR l2_offset={l2:x}: Table is not cluster aligned; "
                                      "L1 entry corrupted", mult)
                    self._unresolved(f"the L2 table at {l2:#x} ({what} entry {base + i}) is "
                                     "not cluster-aligned")
                    continue
                if not counted:
                    self._unresolved(f"the L2 table at {l2:#x} lies past the end of the file")
                    continue
                self.l2_total[l2 >> img.bits] = self.l2_total.get(l2 >> img.bits, 0) + mult
                if active:
                    self.l2_active[l2 >> img.bits] = self.l2_active.get(l2 >> img.bits, 0) + 1

    def _l1_piece_fast(self, raw: bytes, table: array.array[int]) -> Counter[int] | None:
        """The L2 table offsets of a piece of an L1 table and how often each appears, when
        every non-zero entry is a plain, aligned offset inside the file (no message to give);
        None otherwise (the entry-by-entry walk then words what is wrong)."""
        img = self.img
        if _any_bits(raw, S.L1E_RESERVED_MASK | (S.L1E_OFFSET_MASK & (img.cs - 1))):
            return None
        cleared = bytearray(raw)
        cleared[0::8] = bytes(len(raw) // 8)  # OFLAG_COPIED; no reserved bit is set
        offsets = list(filter(None, _u64s(bytes(cleared))))
        if len(offsets) != len(table) - table.count(0) or max(offsets) >= img.file_size:
            return None  # an entry with flags but no offset, or a table past the end
        return Counter(offsets)

    def _add_l2(self, cluster: int, refs: int, active_refs: int) -> None:
        """``refs`` references to the L2 table in ``cluster`` (``active_refs`` of them from
        the active L1 table): the table is counted now and walked once, later."""
        self._inc(cluster, refs)
        self.l2_total[cluster] = self.l2_total.get(cluster, 0) + refs
        if active_refs:
            self.l2_active[cluster] = self.l2_active.get(cluster, 0) + active_refs

    def _walk_l2_tables(self) -> None:
        """Count what every distinct L2 table references, times the references to the table.

        Allocation and fragmentation are counted on the tables of the active L1, per table,
        as qemu-img counts them.
        """
        img = self.img
        extended = img.h.extended_l2
        for l2_cluster in sorted(self.l2_total):
            mult = self.l2_total[l2_cluster]
            active = self.l2_active.get(l2_cluster, 0)
            raw = img.read(l2_cluster << img.bits, img.cs)
            if raw.count(0) == len(raw):
                if active:
                    self.oflag_runs[l2_cluster] = ([], True)
                continue
            bitmaps: array.array[int] | None = None
            if extended:
                words = memoryview(raw).cast("Q")
                raw, bitmaps = words[0::2].tobytes(), _u64s(words[1::2].tobytes())
            entries = _u64s(raw)
            stats = self._table_fast(l2_cluster, raw, entries, bitmaps, mult, active)
            if stats is None:
                stats = self._table_slow(l2_cluster, entries, bitmaps, mult)
            allocated, fragmented, compressed = stats
            self.allocated += active * allocated
            self.fragmented += active * fragmented
            self.compressed += active * compressed

    def _table_fast(self, l2_cluster: int, raw: bytes, entries: array.array[int],
                    bitmaps: array.array[int] | None, mult: int,
                    active: int) -> tuple[int, int, int] | None:
        """The common tables, counted without a Python loop per entry; None if this table
        needs the entry-by-entry walk (anything unusual, and every message, comes from it).

        ``raw`` holds the entries big-endian, so flags are tested a byte column at a time.
        Standard tables: every allocated entry is a cluster-aligned offset inside the file, so
        the data clusters form a few contiguous runs, counted run by run (and remembered for
        the OFLAG_COPIED pass). Compressed tables: every entry compressed, each touching one
        or two host clusters, tallied with a C-level Counter.
        """
        img = self.img
        if img.data_file:
            return None
        cs = img.cs
        if bitmaps is not None:
            alloc_bits = map(and_, bitmaps, repeat(S.L2_BITMAP_ALL_ALLOC))
            if any(map(and_, map(rshift, bitmaps, repeat(32)), bitmaps)) \
                    or any(compress(alloc_bits, map(not_, map(and_, entries,
                                                              repeat(S.L2E_OFFSET_MASK))))):
                return None
        if not _any_bits(raw, S.L2E_COMPRESSED | S.L2E_STD_RESERVED_MASK
                         | (S.L2E_OFFSET_MASK & (cs - 1))):
            # Without reserved bits, clearing each entry's first (flags) and last (zero flag)
            # byte leaves its host offset: done on the bytes, no Python integer per entry.
            cleared = bytearray(raw)
            cleared[0::8] = cleared[7::8] = bytes(len(raw) // 8)
            offsets_all = _u64s(bytes(cleared))
            offsets = list(filter(None, offsets_all))
            if not offsets:
                if active:
                    self.oflag_runs[l2_cluster] = ([], True)
                return 0, 0, 0
            if max(offsets) >= img.file_size:
                return None
            # breaks[j] is true where offsets[j+1] does not follow offsets[j]
            breaks = list(map(ne, offsets[1:], map(add, offsets, repeat(cs))))
            starts = [0, *compress(range(1, len(offsets)), breaks), len(offsets)]
            runs = [(offsets[first] >> img.bits, stop - first)
                    for first, stop in pairwise(starts)]
            for cluster, n in runs:
                self._inc_run(cluster, n, mult)
            if active and len(runs) <= MAX_REMEMBERED_RUNS:
                copied = bytes(compress(raw[0::8].translate(_byte_mask(0x80)), offsets_all))
                unset = copied.count(0)
                if unset in (0, len(copied)):
                    self.oflag_runs[l2_cluster] = (runs, not unset)
            return len(offsets), sum(breaks), 0
        if bitmaps is not None and any(bitmaps):
            return None
        used = list(filter(None, entries))
        if _any_bits(raw, S.L2E_COPIED) \
                or not reduce(and_, used, S.L2E_COMPRESSED) & S.L2E_COMPRESSED:
            return None
        offset_mask, csize_shift = S.compressed_layout(img.bits)
        hosts = list(map(and_, used, repeat(offset_mask)))
        extra = map(and_, map(rshift, used, repeat(csize_shift)),
                    repeat((1 << (img.bits - 8)) - 1))
        # The last byte: the host offset's sector, plus the additional sectors, minus one.
        lasts = list(map(add, map(or_, hosts, repeat(511)), map(lshift, extra, repeat(9))))
        if max(lasts) + 1 - img.file_size >= cs:
            return None
        first_clusters = list(map(rshift, hosts, repeat(img.bits)))
        last_clusters = list(map(rshift, lasts, repeat(img.bits)))
        if any(map(gt, last_clusters, map(add, first_clusters, repeat(1)))):
            return None  # a cluster spanning three host clusters: let the slow walk count it
        tally = Counter(first_clusters)
        tally.update(compress(last_clusters, map(ne, last_clusters, first_clusters)))
        for cluster, n in sorted(tally.items()):
            self._inc(cluster, n * mult)
        if active:
            self.oflag_runs[l2_cluster] = ([], True)  # compressed entries have no OFLAG_COPIED
        return len(used), len(used), len(used)

    def _inc_run(self, cluster: int, n: int, mult: int) -> None:
        """Count ``mult`` references to ``n`` clusters from ``cluster`` on; stretches never
        counted before (the usual case) are filled in one slice assignment."""
        counts = self.counts
        while n > 0:
            chunk = counts._chunk(cluster >> CHUNK_BITS)
            lo = cluster & (CHUNK - 1)
            k = min(n, CHUNK - lo)
            if mult <= counts.max and not any(chunk[lo:lo + k]):
                chunk[lo:lo + k] = array.array(counts.typecode, [mult]) * k
                counts.limit = max(counts.limit, cluster + k)
            else:
                for c in range(cluster, cluster + k):
                    self._inc(c, mult)
            cluster += k
            n -= k

    def _table_slow(self, l2_cluster: int, entries: array.array[int],
                    bitmaps: array.array[int] | None, mult: int) -> tuple[int, int, int]:
        """Walk one L2 table entry by entry, with qemu-img's checks and messages."""
        img, f = self.img, self.f
        cs, bits, file_size = img.cs, img.bits, img.file_size
        extended, data_file = bitmaps is not None, img.data_file
        offset_mask_c, _ = S.compressed_layout(bits)
        allocated = fragmented = compressed = 0
        next_contiguous = 0
        pairs = zip(entries, bitmaps if bitmaps is not None else repeat(0), strict=False)
        for index, (entry, bitmap) in enumerate(pairs):
            if not entry and not bitmap:
                continue
            if entry & S.L2E_COMPRESSED:
                if entry & S.L2E_COPIED:
                    f.corruption(f"ERROR: coffset=0x{entry & offset_mask_c:x}: copied flag "
                                 "must never be set for compressed clusters", mult)
                    entry &= ~S.L2E_COPIED
                if data_file:
                    f.corruption(f"ERROR compressed cluster {index} with data file, "
                                 f"entry=0x{entry:x}", mult)
                    continue
                if bitmap:
                    f.corruption(f"ERROR compressed cluster {index} with non-zero "
                                 f"subcluster allocation bitmap, entry=0x{entry:x}", mult)
                    continue
                host, length = S.decode_compressed(entry, bits)
                if not self._ref(host, length, mult):
                    self._unresolved(f"a compressed cluster at {host:#x} lies past the end "
                                     "of the file")
                allocated += 1
                compressed += 1
                fragmented += 1  # compressed clusters are fragmented by nature
                continue
            if entry & S.L2E_STD_RESERVED_MASK:
                f.corruption(f"ERROR found l2 entry with reserved bits set: {entry:x}", mult)
            host = entry & S.L2E_OFFSET_MASK
            if entry & S.L2E_ZERO and not extended:
                if not host:
                    continue  # a plain zero cluster
            elif not host and not (data_file and entry & S.L2E_COPIED):
                if bitmap & S.L2_BITMAP_ALL_ALLOC:
                    f.corruption("ERROR: Unallocated cluster has non-zero subcluster "
                                 "allocation map", mult)
                continue
            # A standard cluster, or a zero cluster that keeps a preallocated host cluster.
            if (bitmap >> 32) & bitmap:
                f.corruption(f"ERROR offset={host:x}: Allocated cluster has corrupted "
                             "subcluster allocation bitmap", mult)
            if host & (cs - 1):
                if extended:
                    holds_data = bool(bitmap & S.L2_BITMAP_ALL_ALLOC)
                else:
                    holds_data = not entry & S.L2E_ZERO
                if holds_data:
                    f.corruption(f"ERROR offset={host:x}: Data cluster is not properly "
                                 "aligned; L2 entry corrupted.", mult)
                    self._unresolved(f"a data cluster offset {host:#x} is not aligned")
                else:
                    f.corruption(f"ERROR offset={host:x}: Preallocated cluster is not "
                                 "properly aligned; L2 entry corrupted.", mult)
                    self.prealloc_fixes.append((l2_cluster, index, mult))
            allocated += 1
            if next_contiguous and host != next_contiguous:
                fragmented += 1
            next_contiguous = host + cs
            if data_file:
                continue  # clusters of an external data file are not refcounted
            if not host & (cs - 1) and host < file_size:
                self._inc(host >> bits, mult)
            elif not self._ref(host, cs, mult):
                self._unresolved(f"a data cluster at {host:#x} lies past the end of the file")
        return allocated, fragmented, compressed

    def _walk_bitmaps(self) -> None:
        """The bitmap directory, each bitmap table and the clusters they point at.

        Without the autoclear bit the extension is stale and qemu-img ignores it; so do we.
        """
        img, cs = self.img, self.img.cs
        bext = img.ext.bitmaps_ext
        if bext is None or not img.h.autoclear_features & S.AUTOCLEAR_BITMAPS \
                or not bext.nb_bitmaps:
            return
        dir_offset, dir_size = bext.bitmap_directory_offset, bext.bitmap_directory_size
        if not self._ref(dir_offset, dir_size):
            self._unresolved("the bitmap directory lies past the end of the file")
            return
        self._meta(dir_offset, dir_size, 1, "bitmap directory")
        if dir_offset % cs or dir_size > 64 << 20:
            self.f.corruption(f"ERROR bitmap directory at {dir_offset:#x} is invalid")
            self._unresolved("the bitmap directory is invalid")
            return
        raw = img.read(dir_offset, dir_size)
        pos = 0
        for _ in range(bext.nb_bitmaps):
            if pos + S.BITMAP_DIR_FIXED_SIZE > len(raw):
                self.f.corruption("ERROR bitmap directory entry runs past the directory")
                self._unresolved("the bitmap directory is truncated")
                return
            entry = S.BitmapDirectoryEntryFixed.parse(raw[pos:pos + S.BITMAP_DIR_FIXED_SIZE])
            name_at = pos + S.BITMAP_DIR_FIXED_SIZE + entry.extra_data_size
            name = raw[name_at:name_at + entry.name_size].decode("utf-8", "replace")
            pos = S.pad8(name_at + entry.name_size)
            self._walk_bitmap(name, entry.bitmap_table_offset, entry.bitmap_table_size,
                              entry.granularity_bits)

    def _walk_bitmap(self, name: str, offset: int, size: int, granularity_bits: int) -> None:
        cs = self.img.cs
        # One bit per granule of the virtual disk, in clusters: the table needs no more
        # entries (a larger one would only make a hostile image expensive to walk).
        granules = -(-self.img.h.size // (1 << granularity_bits))
        needed = -(-granules // (8 * cs))
        if not offset or offset % cs or not size or size > needed:
            self.f.corruption(f"ERROR bitmap '{name}': bitmap table offset {offset:#x} "
                              f"(size {size}) is invalid")
            self._unresolved(f"the table of bitmap '{name}' is invalid")
            return
        if not self._ref(offset, 8 * size):
            self._unresolved(f"the table of bitmap '{name}' lies past the end of the file")
            return
        self._meta(offset, 8 * size, 1, f"table of bitmap '{name}'")
        for _, _, table in self.img.u64_pieces(offset, size):
            for entry in table:
                if not entry:
                    continue
                host = entry & S.BME_OFFSET_MASK
                if entry & S.BME_RESERVED_MASK or (host and (host % cs or
                                                             entry & S.BME_FLAG_ALL_ONES)):
                    self.f.corruption(f"ERROR bitmap '{name}': bitmap table entry {entry:#x} "
                                      "is invalid")
                    continue
                if host and self._ref(host, cs):
                    self._meta(host, cs, 1, f"data of bitmap '{name}'")

    def _check_refblocks(self) -> None:
        """Count the refcount blocks and check that each has a refcount of exactly one."""
        img, cs, counts = self.img, self.img.cs, self.counts
        for index, entry in enumerate(self.reftable):
            if not entry:
                continue
            offset = entry & S.REFT_OFFSET_MASK
            cluster = offset >> img.bits
            if entry & S.REFT_RESERVED_MASK:
                self.f.corruption(f"ERROR refcount table entry {index} has reserved bits set")
                self.rebuild = True
                continue
            if offset % cs:
                self.f.corruption(f"ERROR refcount block {index} is not cluster aligned; "
                                  "refcount table entry corrupted")
                self.rebuild = True
                continue
            if cluster >= self.nb_clusters:
                self.f.corruption(f"ERROR refcount block {index} is outside image")
                self.rebuild = True
                continue
            self._inc(cluster, 1)
            self.counted_refblocks.add(index)
            if counts.get(cluster) != 1:
                self.f.corruption(f"ERROR refcount block {index} "
                                  f"refcount={counts.get(cluster)}")
                self.rebuild = True

    def _check_overlaps(self) -> None:
        """A metadata cluster referenced more often than its structure accounts for is shared
        with something else: a data cluster, another table. Refcounts cannot tell (both may be
        right), so this is looked at on its own. Refcount blocks are covered above."""
        counts, bits = self.counts, self.img.bits
        for meta in self.metadata:
            for cluster in range(meta.first, meta.last + 1):
                if counts.get(cluster) > meta.expected:
                    self.f.corruption(f"ERROR cluster {cluster} (offset {cluster << bits:#x}) of "
                                      f"the {meta.what} is also used by other data or metadata "
                                      f"(reference={counts.get(cluster)})")
        for cluster, refs in self.l2_total.items():
            if counts.get(cluster) > refs:
                self.f.corruption(f"ERROR cluster {cluster} (offset {cluster << bits:#x}) holds "
                                  "an L2 table and is also used by other data or metadata "
                                  f"(reference={counts.get(cluster)})")

    # -- comparing --------------------------------------------------------------------------------

    def stored_block(self, index: int, n: int) -> array.array[int] | None:
        """The first ``n`` stored refcounts of block ``index`` (None: unreadable block)."""
        codec = self.img.codec
        entry = self.reftable[index] if index < len(self.reftable) else 0
        offset = entry & S.REFT_OFFSET_MASK
        if not offset:
            return codec.zeros(n)
        if offset % self.img.cs:
            return None
        return codec.decode(self.img.read(offset, self.img.cs))[:n]

    def candidate_blocks(self) -> list[int]:
        """Refcount blocks worth comparing: those stored and those covering counted clusters."""
        per_block = self.img.codec.per_block
        blocks = {i for i, entry in enumerate(self.reftable) if entry}
        blocks |= self.counts.blocks_in_use(per_block)
        return sorted(b for b in blocks if b * per_block < self.nb_clusters)

    def compare(self) -> None:
        per_block, nb = self.img.codec.per_block, self.nb_clusters
        for index in self.candidate_blocks():
            start = index * per_block
            n = min(per_block, nb - start)
            stored = self.stored_block(index, n)
            if stored is None:
                self.f.error(f"Can't get refcount for clusters {start}..{start + n - 1}: "
                             f"refcount block {index} is not cluster aligned", n)
                continue
            rebuilt = self.counts.slice(start, start + n)
            last = max(_last_nonzero(stored), _last_nonzero(rebuilt))
            if last >= 0:
                self.highest = max(self.highest, start + last)
            if stored == rebuilt:
                continue
            for i in _differences(stored, rebuilt):
                have, want = stored[i], rebuilt[i]
                if have == 0:
                    self.rebuild = True
                if have < want:
                    self.f.corruption(f"ERROR cluster {start + i} refcount={have} "
                                      f"reference={want}")
                else:
                    self.f.leak(f"Leaked cluster {start + i} refcount={have} reference={want}")

    # -- OFLAG_COPIED ----------------------------------------------------------------------------

    def check_oflag(self, stored: _StoredRefcounts, writer: _Writer | None) -> int:
        """Bit 63 of active L1 and L2 entries must say "refcount == 1" (of the *stored* count).

        With ``writer`` the bits are set right; returns how many were.
        """
        img, cs, bits, h = self.img, self.img.cs, self.img.bits, self.img.h
        fixed = 0
        verb = "Repairing" if writer else "ERROR"
        for base, raw, table in img.u64_pieces(h.l1_table_offset, h.l1_size):
            if self._l1_flags_agree(raw, table, stored):
                continue
            for i, entry in enumerate(table):
                l2 = entry & S.L1E_OFFSET_MASK
                if not l2:
                    continue
                refcount = stored.get(l2 >> bits)
                if refcount is None or (refcount == 1) == bool(entry & S.L2E_COPIED):
                    continue
                self.f.say(f"{verb} OFLAG_COPIED L2 cluster: l1_index={base + i} "
                           f"l1_entry={entry:x} refcount={refcount}")
                if writer is None:
                    self.f.corruptions += 1
                    continue
                entry = entry | S.L2E_COPIED if refcount == 1 else entry & ~S.L2E_COPIED
                writer.write(h.l1_table_offset + 8 * (base + i), struct.pack(">Q", entry))
                fixed += 1
        extended = h.extended_l2
        for l2_cluster in sorted(self.l2_active):
            if self._runs_agree(l2_cluster, stored):
                continue
            table = img.u64_table(l2_cluster << bits, cs // 8)
            step = 2 if extended else 1
            if self._copied_flags_agree(table[0::step], stored):
                continue
            dirty = 0
            for pos in range(0, len(table), step):
                entry = table[pos]
                host = entry & S.L2E_OFFSET_MASK
                if not entry or entry & S.L2E_COMPRESSED:
                    continue
                if not host and not (img.data_file and entry & S.L2E_COPIED):
                    continue  # unallocated or a plain zero cluster
                refcount = 1 if img.data_file else stored.get(host >> bits)
                if refcount is None or (refcount == 1) == bool(entry & S.L2E_COPIED):
                    continue
                self.f.say(f"{verb} OFLAG_COPIED data cluster: l2_entry={entry:x} "
                           f"refcount={refcount}")
                if writer is None:
                    self.f.corruptions += self.l2_active[l2_cluster]
                    continue
                table[pos] = entry | S.L2E_COPIED if refcount == 1 else entry & ~S.L2E_COPIED
                dirty += 1
            if not dirty or writer is None:
                continue
            if self.counts.get(l2_cluster) != self.l2_total[l2_cluster]:
                # The table shares its cluster with something else: writing it could destroy
                # that (qemu-img's metadata overlap check refuses too).
                self.f.error("ERROR: Could not write L2 table; metadata overlap check failed")
                self.f.corruptions += dirty
                continue
            if _LITTLE:
                table.byteswap()
            writer.write(l2_cluster << bits, table.tobytes())
            fixed += dirty
        return fixed

    def _l1_flags_agree(self, raw: bytes, table: array.array[int],
                        stored: _StoredRefcounts) -> bool:
        """True when no entry of this piece of the active L1 table has a wrong OFLAG_COPIED
        bit, found per distinct (L2 table, flag) pair rather than per entry."""
        cleared = bytearray(raw)
        cleared[0::8] = bytes(len(raw) // 8)
        offsets = _u64s(bytes(cleared))
        flags = raw[0::8].translate(_byte_mask(0x80))
        pairs = Counter(compress(zip(offsets, flags, strict=True), offsets))
        for offset, flag in pairs:
            if not offset & S.L1E_OFFSET_MASK:
                continue
            refcount = stored.get((offset & S.L1E_OFFSET_MASK) >> self.img.bits)
            if refcount is not None and (refcount == 1) != bool(flag):
                return False
        return True

    def _runs_agree(self, l2_cluster: int, stored: _StoredRefcounts) -> bool:
        """The OFLAG_COPIED test from what the counting pass remembered of a table: all its
        entries flagged and every stored refcount 1, or none flagged and none 1."""
        remembered = self.oflag_runs.get(l2_cluster)
        if remembered is None:
            return False
        runs, all_copied = remembered
        for cluster, n in runs:
            values = stored.values(cluster, n)
            if values is None:
                return False
            if all_copied and values != array.array(values.typecode, [1]) * n:
                return False
            if not all_copied and 1 in values:
                return False
        return True

    def _copied_flags_agree(self, entries: array.array[int], stored: _StoredRefcounts) -> bool:
        """True when no entry of this table can have a wrong OFLAG_COPIED bit: the check of
        a whole table at C speed (the entry-by-entry walk finds and words any mismatch)."""
        img = self.img
        standard = list(compress(entries, map(not_, map(and_, entries,
                                                       repeat(S.L2E_COMPRESSED)))))
        if img.data_file:  # every allocated cluster has an implicit refcount of 1
            offsets = list(map(and_, standard, repeat(S.L2E_OFFSET_MASK)))
            with_offset = list(compress(standard, offsets))
            return all(map(and_, with_offset, repeat(S.L2E_COPIED)))
        used = list(compress(standard, map(and_, standard, repeat(S.L2E_OFFSET_MASK))))
        if not used:
            return True
        clusters = list(map(rshift, map(and_, used, repeat(S.L2E_OFFSET_MASK)),
                            repeat(img.bits)))
        breaks = list(map(ne, clusters[1:], map(add, clusters, repeat(1))))
        starts = [0, *compress(range(1, len(clusters)), breaks), len(clusters)]
        refcounts = array.array(img.codec.typecode)
        for first, stop in pairwise(starts):
            run = stored.values(clusters[first], stop - first)
            if run is None:
                return False
            refcounts.extend(run)
        copied = list(map(truth, map(and_, used, repeat(S.L2E_COPIED))))
        return list(map(eq, refcounts, repeat(1))) == copied

    def report(self) -> CheckReport:
        img = self.img
        return CheckReport(
            format="qcow2", filename=img.path,
            corruptions=self.f.corruptions, leaks=self.f.leaks,
            check_errors=self.f.check_errors,
            image_end_offset=(self.highest + 1) * img.cs,
            total_clusters=-(-img.h.size // img.cs),
            allocated_clusters=self.allocated, fragmented_clusters=self.fragmented,
            compressed_clusters=self.compressed,
            messages=self.f.all_messages(), notes=list(self.f.notes))


# ---- repair ------------------------------------------------------------------------------------

class _Writer(ByteSource):
    """The image opened read-write for a repair, and read back through the same descriptor.

    It is opened only for a repair, after checking it is the very file the check read, and it
    takes the byte-range locks QEMU uses (bytes 100-299) so that a repair never races a running
    VM: if QEMU has the image open, the repair is refused.
    """

    def __init__(self, path: str, checked: ByteSource) -> None:
        self.name = path
        try:
            self.fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
        except OSError as exc:
            raise InvalidInputError(f"{path}: cannot open for repair: {exc.strerror}") from None
        try:
            fileno = getattr(checked, "fileno", None)
            if isinstance(fileno, int):
                mine, theirs = os.fstat(self.fd), os.fstat(fileno)
                if (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino):
                    raise InvalidInputError(f"{path}: the file was replaced during the check")
            self._lock(path)
        except BaseException:
            os.close(self.fd)
            raise
        self.wrote = False
        self.before_first_write: list[tuple[int, bytes]] = []

    def _lock(self, path: str) -> None:
        try:
            import fcntl
        except ImportError:  # no POSIX record locks here (Windows): QEMU uses none either
            return
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 200, 100, os.SEEK_SET)
        except OSError:
            raise InvalidInputError(
                f"{path}: the image is in use (another process, such as QEMU, holds a lock "
                "on it); stop it before repairing") from None

    @property
    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def read_at(self, offset: int, n: int) -> bytes:
        # Past the end reads as nothing, as FileSource does (an offset a damaged table gives
        # may be too large for pread itself).
        if n <= 0 or offset >= self.size:
            return b""
        parts: list[bytes] = []
        while n > 0:
            chunk = os.pread(self.fd, n, offset)
            if not chunk:
                break
            parts.append(chunk)
            offset += len(chunk)
            n -= len(chunk)
        return b"".join(parts)

    def write(self, offset: int, data: bytes) -> None:
        if not self.wrote:
            # The spec's rule: unknown autoclear bits are cleared before anything is written.
            self.wrote = True
            for at, raw in self.before_first_write:
                pwrite_all(self.fd, raw, at)
        pwrite_all(self.fd, data, offset)

    def sync(self) -> None:
        os.fsync(self.fd)

    def punch(self, offset: int, length: int) -> None:
        """Give the space of clusters nothing uses back to the filesystem (qemu-img check
        discards the clusters it frees the same way). The bytes then read as zeros; where
        the system cannot punch holes they simply stay, which is just as consistent."""
        fallocate = _fallocate()
        if fallocate is not None:
            fallocate(self.fd, _PUNCH_HOLE_KEEP_SIZE, offset, length)

    def close(self) -> None:
        os.close(self.fd)


#: FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE (Linux <linux/falloc.h>).
_PUNCH_HOLE_KEEP_SIZE = 0x02 | 0x01


@lru_cache(maxsize=1)
def _fallocate() -> Callable[[int, int, int, int], int] | None:
    """libc's fallocate(2), which the os module does not offer with flags; None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        function = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    result: Callable[[int, int, int, int], int] = function
    return result


class _RefcountRepair:
    """Make the stored refcounts agree with the rebuilt ones, as far as it is safe.

    ``-r leaks`` lowers counts that are too high; ``-r all`` also raises counts that are too
    low, gives a refcount block to every range that needs one (new blocks, and if needed a new,
    larger refcount table, go at the end of the file), drops refcount table entries that are
    unusable, and turns misaligned preallocated zero clusters into plain zero clusters (they
    read as zeros either way). Leaked counts are kept when some reference could not be
    followed (``free_leaks`` is False).
    """

    def __init__(self, chk: _Checker, writer: _Writer, mode: str) -> None:
        self.chk = chk
        self.img = chk.img
        self.w = writer
        self.fix_errors = mode == "all"
        self.free_leaks = not chk.unresolved
        self.leaks_fixed = 0
        self.corruptions_fixed = 0
        #: Clusters the comparison looked at; allocations made here lie beyond.
        self.nb = chk.nb_clusters
        self.reftable = array.array("Q", chk.reftable)
        self.next_free = 0
        #: Runs [first cluster, count] whose refcount this repair took to zero.
        self.freed: list[list[int]] = []

    def run(self) -> None:
        chk, img = self.chk, self.img
        per_block = img.codec.per_block
        if chk.f.leaks and not self.free_leaks:
            chk.f.note("leaked clusters were not freed: " + "; ".join(chk.unresolved) +
                       ", so the leaked clusters may hold what those entries should point to")
        if self.fix_errors:
            self._fix_preallocated()
        usable, unusable = self._classify_refblocks()
        new_blocks: dict[int, int] = {}
        new_table: tuple[int, int] | None = None
        if self.fix_errors:
            planned = self._plan(usable)
            if planned is None:
                return
            new_blocks, new_table = planned
        elif unusable or any(b not in usable for b in chk.counts.blocks_in_use(per_block)):
            chk.f.note("some refcounts are missing or unusable; only -r all can repair them")
        # 1. New refcount blocks and a new refcount table, in clusters nothing uses yet.
        for index, cluster in sorted(new_blocks.items()):
            start = index * per_block
            old = self._stored_view(index)
            final = chk.counts.slice(start, start + per_block)
            self._merge(old, final, start)
            self.w.write(cluster << img.bits, img.codec.encode(final))
            self.reftable = _set_entry(self.reftable, index, cluster << img.bits)
        if self.fix_errors:
            for index in unusable:
                if index not in new_blocks:
                    self.reftable[index] = 0
                self.corruptions_fixed += 1
        if new_table is not None:
            table_cluster, table_clusters = new_table
            table = array.array("Q", self.reftable)
            table.extend(repeat(0, table_clusters * img.cs // 8 - len(table)))
            if _LITTLE:
                table.byteswap()
            self.w.write(table_cluster << img.bits, table.tobytes())
        if self.w.wrote:
            self.w.sync()
        # 2. Blocks that stay where they are, corrected in place.
        for index in sorted(usable):
            self._fix_block_in_place(index, usable[index])
        # 3. The table: corrected in place, or replaced through the header.
        if new_table is None:
            for index, entry in enumerate(self.reftable):
                if index >= len(chk.reftable) or entry != chk.reftable[index]:
                    self.w.write(img.h.refcount_table_offset + 8 * index,
                                 struct.pack(">Q", entry))
        else:
            self._switch_table(new_table, {**usable, **new_blocks})
        if self.w.wrote:
            self.w.sync()
        # 5. What nothing uses any more goes back to the filesystem, as QEMU discards it.
        for cluster, n in self.freed:
            self.w.punch(cluster << img.bits, n << img.bits)

    def _switch_table(self, new_table: tuple[int, int], blocks: dict[int, int]) -> None:
        """Point the header at the new refcount table, then free the old one's clusters."""
        chk, img, h = self.chk, self.img, self.img.h
        per_block = img.codec.per_block
        table_cluster, table_clusters = new_table
        self.w.sync()
        self.w.write(S.HDR_REFCOUNT_TABLE_OFFSET,
                     struct.pack(">QI", table_cluster << img.bits, table_clusters))
        self.w.sync()
        # 4. Only now is the old table unused. A crash before this point leaves at most a
        #    leak, never a refcount that is too low.
        first = h.refcount_table_offset >> img.bits
        for cluster in range(first, first + h.refcount_table_clusters):
            chk.counts.sub(cluster, 1)
            index, i = divmod(cluster, per_block)
            if index in blocks:
                value = chk.counts.get(cluster)
                at = blocks[index] << img.bits
                block = img.codec.decode(img.read(at, img.cs))
                block[i] = value
                self.w.write(at, img.codec.encode(block))
                if not value:
                    self._free(cluster)

    def _free(self, cluster: int) -> None:
        """Remember a cluster whose refcount this repair took to zero (runs, in order)."""
        if self.freed and self.freed[-1][0] + self.freed[-1][1] == cluster:
            self.freed[-1][1] += 1
        else:
            self.freed.append([cluster, 1])

    def _fix_preallocated(self) -> None:
        """Misaligned preallocated zero clusters become plain zero clusters (qemu-img's fix)."""
        chk, img = self.chk, self.img
        extended = img.h.extended_l2
        entry_size = 16 if extended else 8
        for l2_cluster, index, mult in chk.prealloc_fixes:
            if chk.counts.get(l2_cluster) != chk.l2_total[l2_cluster]:
                continue  # the table shares its cluster with something: do not write into it
            at = (l2_cluster << img.bits) + index * entry_size
            entry, bitmap = struct.unpack(">QQ", img.read(at, 16))
            host = entry & S.L2E_OFFSET_MASK
            if extended:  # allocated subclusters would read as zeros: say so explicitly
                new = struct.pack(">QQ", 0, (bitmap | (bitmap << 32)) & ~S.L2_BITMAP_ALL_ALLOC
                                  & 0xFFFF_FFFF_FFFF_FFFF)
            else:
                new = struct.pack(">Q", S.L2E_ZERO)
            chk.f.say(f"Repairing offset={host:x}: Preallocated cluster is not properly "
                      "aligned; L2 entry corrupted.")
            self.w.write(at, new)
            for cluster in range(host >> img.bits, ((host + img.cs - 1) >> img.bits) + 1):
                chk.counts.sub(cluster, mult)
            self.corruptions_fixed += mult

    def _classify_refblocks(self) -> tuple[dict[int, int], set[int]]:
        """Refcount table entries usable in place (index -> cluster) and the others: reserved
        bits, misaligned, outside the file, or sharing their cluster with something else."""
        chk, img = self.chk, self.img
        usable: dict[int, int] = {}
        unusable: set[int] = set()
        for index, entry in enumerate(chk.reftable):
            if not entry:
                continue
            cluster = (entry & S.REFT_OFFSET_MASK) >> img.bits
            if index in chk.counted_refblocks and cluster < img.file_clusters \
                    and chk.counts.get(cluster) == 1:
                usable[index] = cluster
                continue
            unusable.add(index)
            if self.fix_errors and index in chk.counted_refblocks:
                chk.counts.sub(cluster, 1)  # counted as a refcount block, which it stops being
        return usable, unusable

    def _alloc(self, n: int) -> int:
        cluster = self.next_free
        self.next_free += n
        for c in range(cluster, cluster + n):
            self.chk.counts.add(c, 1)
        return cluster

    def _plan(self, usable: dict[int, int]) -> tuple[dict[int, int], tuple[int, int] | None] | None:
        """Allocate the refcount blocks and table the counts need; None if it cannot be done.

        Each allocation may itself need a refcount block, and a larger table may need more
        blocks: repeat until nothing more is needed (each round covers many more clusters than
        it takes, so this ends quickly).
        """
        chk, img = self.chk, self.img
        per_block = img.codec.per_block
        self.next_free = max(img.file_clusters, chk.counts.limit)
        new_blocks: dict[int, int] = {}
        pending = sorted(b for b in chk.counts.blocks_in_use(per_block) if b not in usable)
        new_table: tuple[int, int] | None = None
        capacity = img.h.refcount_table_clusters * img.cs // 8
        while True:
            while pending:
                index = pending.pop()
                if index in usable or index in new_blocks:
                    continue
                cluster = self._alloc(1)
                new_blocks[index] = cluster
                pending.append(cluster // per_block)
            top = max([*usable, *new_blocks], default=-1) + 1
            room = capacity if new_table is None else new_table[1] * img.cs // 8
            if top <= room:
                return new_blocks, new_table
            if new_table is not None:  # outgrown: give its clusters back, take more
                for c in range(new_table[0], new_table[0] + new_table[1]):
                    chk.counts.sub(c, 1)
            clusters = -(-(top + 1) * 8 // img.cs)
            if clusters * img.cs > S.MAX_REFTABLE_BYTES:
                chk.f.note("refcounts were not repaired: the refcount table would exceed "
                           "QEMU's 8 MiB limit")
                return None
            start = self._alloc(clusters)
            new_table = (start, clusters)
            pending.extend({c // per_block for c in range(start, start + clusters)})

    def _stored_view(self, index: int) -> array.array[int]:
        """What the comparison read for block ``index`` (zeros when it could not be read)."""
        per_block = self.img.codec.per_block
        stored = self.chk.stored_block(index, per_block)
        return stored if stored is not None else self.img.codec.zeros(per_block)

    def _merge(self, old: array.array[int], new: array.array[int], start: int) -> None:
        """Settle, in ``new`` (the rebuilt counts), each difference with what was stored,
        within the clusters the comparison covered, and count what changes as fixed."""
        n = max(0, min(len(old), self.nb - start))
        for i in _differences(old[:n], new[:n]):
            have, want = old[i], new[i]
            if have > want and self.free_leaks:
                self.leaks_fixed += 1
            elif have < want and self.fix_errors:
                self.corruptions_fixed += 1
            else:
                new[i] = have
                if have < want:
                    self.chk.f.note("refcounts that are too low were not repaired: that needs "
                                    "-r all")
                continue
            self.chk.f.say(f"Repairing cluster {start + i} refcount={have} reference={want}")
            if not want:
                self._free(start + i)

    def _fix_block_in_place(self, index: int, cluster: int) -> None:
        """Rewrite one refcount block where it is; clusters allocated by this repair (past
        what the comparison covered) get their count too."""
        chk, img = self.chk, self.img
        per_block = img.codec.per_block
        start = index * per_block
        n = max(0, min(per_block, chk.nb_clusters - start))
        old = img.codec.decode(img.read(cluster << img.bits, img.cs))
        new = array.array(old.typecode, old)
        new[:n] = chk.counts.slice(start, start + n)
        self._merge(old, new, start)
        if new != old:
            self.w.write(cluster << img.bits, img.codec.encode(new))


def _set_entry(table: array.array[int], index: int, value: int) -> array.array[int]:
    if index >= len(table):
        table.extend(repeat(0, index + 1 - len(table)))
    table[index] = value
    return table


# ---- entry point -------------------------------------------------------------------------------

def check_image(disk: Qcow2Disk, repair: str | None) -> CheckReport:
    """Check ``disk``'s metadata; ``repair`` ("leaks" or "all") mends what is safe to mend.

    Without ``repair`` nothing is written: the file is only read through the disk's own
    read-only source.
    """
    if repair not in (None, "leaks", "all"):
        raise InvalidInputError(f"repair must be 'leaks' or 'all', not {repair!r}")
    source = disk.host_source
    if repair is None:
        chk = _Checker(_Image(source, disk.header, disk.extensions))
        chk.calculate()
        chk.compare()
        chk.check_oflag(_StoredRefcounts(chk.img, chk.reftable), None)
        return chk.report()
    writer = _Writer(disk.path, source)
    try:
        return _repair(disk, writer, repair)
    finally:
        writer.close()


def _repair(disk: Qcow2Disk, writer: _Writer, mode: str) -> CheckReport:
    h = disk.header
    if h.version >= 3 and h.autoclear_features & ~S.AUTOCLEAR_KNOWN:
        writer.before_first_write.append(
            (S.HDR_AUTOCLEAR_FEATURES, struct.pack(">Q", h.autoclear_features
                                                   & S.AUTOCLEAR_KNOWN)))
    chk = _Checker(_Image(writer, h, disk.extensions))
    chk.calculate()
    chk.compare()
    fixer = _RefcountRepair(chk, writer, mode)
    fixer.run()
    # qemu-img mends OFLAG_COPIED with -r leaks only when nothing else is left to mend.
    left = (chk.f.corruptions - fixer.corruptions_fixed) + (chk.f.leaks - fixer.leaks_fixed) \
        + chk.f.check_errors
    oflag_writer = writer if mode == "all" or left <= 0 else None
    img = _Image.reread(writer) if writer.wrote else chk.img
    stored = _StoredRefcounts(img, img.u64_table(img.h.refcount_table_offset,
                                                 img.h.refcount_table_clusters * img.cs // 8))
    oflag_fixed = chk.check_oflag(stored, oflag_writer)
    corruptions_fixed = fixer.corruptions_fixed + oflag_fixed
    if writer.wrote:
        writer.sync()
        # The double check: the report describes the image as it now is.
        again = _Checker(_Image.reread(writer))
        again.calculate()
        again.compare()
        again.check_oflag(_StoredRefcounts(again.img, again.reftable), None)
        report = again.report()
        report.messages = chk.f.all_messages() + report.messages
        report.notes = list(dict.fromkeys(chk.f.notes + report.notes))
    else:
        report = chk.report()
    report.leaks_fixed = fixer.leaks_fixed
    report.corruptions_fixed = corruptions_fixed
    if report.corruptions:
        # Reserved bits, entries pointing nowhere, overlapping tables...: mending those means
        # deciding what the image should have said, which a repair must not guess.
        report.notes.append(f"{report.corruptions} errors were left as they are: mending them "
                            "safely takes more than refcounts (see the ERROR lines)")
    if not report.corruptions and not report.check_errors:
        _mark_clean(writer, h)
    return report


def _mark_clean(writer: _Writer, h: S.Header) -> None:
    """Clear the dirty and corrupt bits once nothing is left to mend (what qemu-img does)."""
    if h.version < 3:
        return
    raw = writer.read_at(S.HDR_INCOMPATIBLE_FEATURES, 8)
    if len(raw) != 8:
        return
    features = struct.unpack(">Q", raw)[0]
    cleared = features & ~(S.INCOMPAT_DIRTY | S.INCOMPAT_CORRUPT)
    if cleared != features:
        writer.write(S.HDR_INCOMPATIBLE_FEATURES, struct.pack(">Q", cleared))
        writer.sync()
