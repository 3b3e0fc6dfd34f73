"""Reading qcow2: the header, the two-level cluster map, compressed clusters, snapshots.

Everything is a run lookup over the L1/L2 tables (``block_status``) plus a run read
(``read_run``); reads through the backing chain and the allocation map come from ``Disk``.
Every size in the header is checked against the file and against QEMU's own limits before a
table is read, so a hostile header cannot make us allocate or loop.

References: QEMU docs/interop/qcow2.txt.
"""

from __future__ import annotations

import array
import struct
import sys
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from imgbridge.errors import (
    InvalidImageError,
    InvalidInputError,
    MissingCompanionError,
    UnsupportedFeatureError,
)
from imgbridge.model.disk import BlockState, CheckReport, Disk, Run, merge_runs
from imgbridge.resolver import CompanionResolver
from imgbridge.source import ByteSource, read_exact

from . import _structs as S

#: L2 tables kept in memory, in bytes of table (not of guest data).
L2_CACHE_BYTES = 16 << 20


class Qcow2Disk(Disk):
    format_name = "qcow2"

    def __init__(self, source: ByteSource, resolver: CompanionResolver,
                 options: Mapping[str, str]) -> None:
        self.path = source.name
        self.header = parse_header(source)
        h = self.header
        super().__init__(h.size, host=source, filename=source.name)
        self.cluster_size = h.cluster_size
        self.extensions = read_extensions(source, h)
        self._check_features()
        self.snapshots = read_snapshots(source, h)
        self.data_source: ByteSource = source
        self.data_file_name: str | None = None
        if h.incompatible_features & S.INCOMPAT_DATA_FILE:
            self.data_file_name = self.extensions.data_file
            if not self.data_file_name:
                raise MissingCompanionError(f"{self.path}: the image uses an external data file "
                                            "but does not name it")
            self.data_source = resolver.open_source(self.data_file_name, "external data file")
        try:
            self._open_rest(resolver, options)
        except BaseException:
            if self.data_source is not source:  # the opener closes only the image itself
                self.data_source.close()
            raise

    def _open_rest(self, resolver: CompanionResolver, options: Mapping[str, str]) -> None:
        source, h = self.host_source, self.header
        self.backing_name = read_backing_name(source, h)
        self.backing_format = self.extensions.backing_format
        self._l2_cache: OrderedDict[int, array.array[int]] = OrderedDict()
        self._l2_cache_max = max(4, L2_CACHE_BYTES // h.cluster_size)
        self._decompressor = _decompressor_for(h.compression_type)
        #: The last compressed cluster inflated (its L2 entry, its bytes): small reads inside
        #: one cluster inflate it once.
        self._inflated: tuple[int, bytes] = (0, b"")
        snapshot = options.get("snapshot")
        if snapshot is not None:
            self._select_snapshot(snapshot)
        else:
            self.l1 = read_l1(source, h.l1_table_offset, h.l1_size, h, "active L1 table")
        if self.backing_name:
            if self.data_file_name and h.autoclear_features & S.AUTOCLEAR_DATA_FILE_RAW:
                raise InvalidImageError("a raw external data file cannot have a backing file",
                                        format="qcow2", path=self.path)
            self.backing = resolver.open_disk(self.backing_name, "backing file",
                                              self.backing_format or None)

    # ---- header-level checks ---------------------------------------------------------------

    def _check_features(self) -> None:
        h = self.header
        if h.crypt_method != S.CRYPT_NONE:
            method = {S.CRYPT_AES: "AES", S.CRYPT_LUKS: "LUKS"}.get(h.crypt_method,
                                                                  str(h.crypt_method))
            raise UnsupportedFeatureError(
                f"{self.path}: qcow2 encryption ({method}) is not supported; decrypt it first "
                "with qemu-img convert and its --object secret option")
        unknown = h.incompatible_features & ~S.INCOMPAT_KNOWN
        if unknown:
            names = [self.extensions.feature_names.get((0, bit), f"bit {bit}")
                     for bit in range(64) if unknown >> bit & 1]
            raise UnsupportedFeatureError(
                f"{self.path}: qcow2 incompatible feature(s) not supported: {', '.join(names)}")
        if h.compression_type not in S.COMPRESSION_NAMES:
            raise UnsupportedFeatureError(
                f"{self.path}: qcow2 compression type {h.compression_type} is not supported")
        if h.extended_l2 and h.cluster_bits < 14:
            raise InvalidImageError("extended L2 entries need clusters of 16 KiB or more",
                                    format="qcow2", path=self.path)
        if h.incompatible_features & S.INCOMPAT_DATA_FILE and h.nb_snapshots:
            raise InvalidImageError("an image with an external data file cannot have snapshots",
                                    format="qcow2", path=self.path)

    def _select_snapshot(self, wanted: str) -> None:
        matches = [s for s in self.snapshots if s.id == wanted] or \
                  [s for s in self.snapshots if s.name == wanted]
        if not matches:
            listed = ", ".join(f"{s.id} ({s.name})" for s in self.snapshots) or "none"
            raise InvalidInputError(f"{self.path}: no snapshot {wanted!r} (snapshots: {listed})")
        snap = matches[0]
        if snap.disk_size is not None:
            if snap.disk_size >= 1 << 63 or snap.l1_size < -(-snap.disk_size // (
                    self.cluster_size * self.header.l2_entries)):
                raise _bad(f"snapshot {snap.id} has a virtual size of {snap.disk_size} bytes, "
                           f"more than its L1 table of {snap.l1_size} entries maps", self.path)
            self.size = snap.disk_size
        self.l1 = read_l1(self.host_source, snap.l1_table_offset, snap.l1_size, self.header,
                          f"L1 table of snapshot {snap.id}")
        self.snapshot = snap

    @property
    def host_source(self) -> ByteSource:
        assert self.host is not None
        return self.host

    # ---- the cluster map --------------------------------------------------------------------

    def _l2_table(self, l2_offset: int) -> array.array[int]:
        table = self._l2_cache.get(l2_offset)
        if table is not None:
            self._l2_cache.move_to_end(l2_offset)
            return table
        data = read_exact(self.host_source, l2_offset, self.cluster_size, what="L2 table")
        table = array.array("Q", data)
        if sys.byteorder == "little":
            table.byteswap()
        self._l2_cache[l2_offset] = table
        if len(self._l2_cache) > self._l2_cache_max:
            self._l2_cache.popitem(last=False)
        return table

    def block_status(self, offset: int, length: int) -> Iterator[Run]:
        return merge_runs(self._map_runs(offset, length), offset)

    def _map_runs(self, offset: int, length: int) -> Iterator[Run]:
        """The runs of the L1/L2 map entry by entry, before merging."""
        cs = self.cluster_size
        per_l2 = self.header.l2_entries
        end = offset + length
        cluster = offset // cs
        while cluster * cs < end:
            l1_index, l2_index = divmod(cluster, per_l2)
            l1_entry = self.l1[l1_index] if l1_index < len(self.l1) else 0
            l2_offset = l1_entry & S.L1E_OFFSET_MASK
            if not l2_offset:  # no L2 table: the whole range it would map is unallocated
                span_end = (l1_index + 1) * per_l2
                pieces: Iterator[Run] = iter(
                    (Run(cluster * cs, (span_end - cluster) * cs, BlockState.UNALLOCATED),))
                cluster = span_end
            else:
                if l2_offset % cs:
                    raise _bad(f"L2 table offset {l2_offset:#x} is not cluster-aligned",
                               self.path, self.header.l1_table_offset + 8 * l1_index)
                last = min(per_l2, l2_index + -(-(end - cluster * cs) // cs))
                pieces = self._table_runs(self._l2_table(l2_offset), l1_index * per_l2,
                                          l2_index, last)
                cluster = l1_index * per_l2 + last
            yield from pieces

    def _table_runs(self, table: array.array[int], first_cluster: int, start: int,
                    stop: int) -> Iterator[Run]:
        """The runs of L2 entries ``start..stop`` of one table, one or more per entry."""
        if not self.header.extended_l2:
            yield from self._standard_runs(table, first_cluster, start, stop)
            return
        cs = self.cluster_size
        external = self.data_file_name is not None
        for index in range(start, stop):
            guest = (first_cluster + index) * cs
            entry, bitmap = table[2 * index], table[2 * index + 1]
            if entry & S.L2E_COMPRESSED:
                if external:
                    raise _bad("compressed cluster in an image with a data file", self.path)
                yield Run(guest, cs, BlockState.DATA, None, entry)
                continue
            host = entry & S.L2E_OFFSET_MASK
            allocated = bool(host) or (external and bool(entry & S.L2E_COPIED))
            if allocated and host % cs:
                raise _bad(f"data cluster offset {host:#x} for guest offset {guest:#x} is not "
                           "cluster-aligned", self.path)
            if not allocated and bitmap & 0xFFFF_FFFF:
                raise _bad(f"allocated subcluster in unallocated cluster at guest offset "
                           f"{guest:#x}", self.path)
            alloc_bits, zero_bits = bitmap & 0xFFFF_FFFF, bitmap >> 32
            if alloc_bits & zero_bits:
                raise _bad(f"subcluster both allocated and zero at guest offset {guest:#x}",
                           self.path)
            # Sub-clusters of an allocated cluster keep their host offset even when they read
            # as zero or from the backing file (QEMU's *_ALLOC sub-cluster types; qemu-img
            # map prints it).
            base = host if allocated else None
            if alloc_bits == 0xFFFF_FFFF:
                yield Run(guest, cs, BlockState.DATA, host)
                continue
            if not alloc_bits and zero_bits in (0, 0xFFFF_FFFF):
                yield Run(guest, cs, BlockState.ZERO if zero_bits else BlockState.UNALLOCATED,
                          base)
                continue
            sub = cs // S.SUBCLUSTERS
            for i in range(S.SUBCLUSTERS):
                at = None if base is None else base + i * sub
                if alloc_bits >> i & 1:
                    yield Run(guest + i * sub, sub, BlockState.DATA, at)
                elif zero_bits >> i & 1:
                    yield Run(guest + i * sub, sub, BlockState.ZERO, at)
                else:
                    yield Run(guest + i * sub, sub, BlockState.UNALLOCATED, at)

    def _standard_runs(self, table: array.array[int], first_cluster: int, start: int,
                       stop: int) -> Iterator[Run]:
        """``_table_runs`` for standard (8-byte) L2 entries.

        Entries that continue the one before (the next host cluster with the same flags, or
        the same unallocated or zero entry) join its run while the table is scanned: one
        ``Run`` per run of clusters, not per cluster (with 512-byte clusters, building and
        merging a ``Run`` per cluster cost most of a conversion's time).
        """
        cs = self.cluster_size
        version3 = self.header.version >= 3
        external = self.data_file_name is not None
        index = start
        while index < stop:
            entry = table[index]
            guest = (first_cluster + index) * cs
            if entry & S.L2E_COMPRESSED:
                if external:
                    raise _bad("compressed cluster in an image with a data file", self.path)
                yield Run(guest, cs, BlockState.DATA, None, entry)
                index += 1
                continue
            host = entry & S.L2E_OFFSET_MASK
            allocated = bool(host) or (external and bool(entry & S.L2E_COPIED))
            if entry & S.L2E_ZERO and not version3:  # QEMU refuses to read it too
                raise _bad(f"zero flag in the L2 entry for guest offset {guest:#x} of a "
                           "version 2 image", self.path)
            if allocated and host % cs:
                raise _bad(f"data cluster offset {host:#x} for guest offset {guest:#x} is not "
                           "cluster-aligned", self.path)
            step = cs if allocated else 0
            following = entry + step
            end = index + 1
            while end < stop and table[end] == following:
                end += 1
                following += step
            length = (end - index) * cs
            if version3 and entry & S.L2E_ZERO:
                yield Run(guest, length, BlockState.ZERO, host if allocated else None)
            elif allocated:
                yield Run(guest, length, BlockState.DATA, host)
            else:
                yield Run(guest, length, BlockState.UNALLOCATED)
            index = end

    def read_run(self, run: Run, offset: int, n: int) -> bytes:
        if run.token is not None:
            # A compressed cluster is one run of its own: decompress it, return the slice.
            cluster = self._read_compressed(run.token, offset - offset % self.cluster_size)
            start = offset % self.cluster_size
            return cluster[start:start + n]
        assert run.host_offset is not None
        data = self.data_source.read_at(run.host_offset + (offset - run.offset), n)
        if len(data) < n:  # clusters past the end of the file read as zero, as in QEMU
            data += bytes(n - len(data))
        return data

    def _read_compressed(self, entry: int, guest: int) -> bytes:
        if self._inflated[0] == entry:
            return self._inflated[1]
        host, length = S.decode_compressed(entry, self.header.cluster_bits)
        raw = self.host_source.read_at(host, length)
        try:
            data = self._decompressor(raw, self.cluster_size)
        except Exception as exc:
            raise _bad(f"compressed cluster for guest offset {guest:#x} does not decompress: "
                       f"{exc}", self.path, host) from None
        if len(data) != self.cluster_size:
            got = "more than" if len(data) > self.cluster_size else f"{len(data)} bytes, not"
            raise _bad(f"compressed cluster for guest offset {guest:#x} gives {got} "
                       f"{self.cluster_size} bytes", self.path, host)
        self._inflated = (entry, data)
        return data

    # ---- description ------------------------------------------------------------------------

    def format_specific(self) -> dict[str, Any]:
        h = self.header
        data: dict[str, Any] = {
            "compat": "0.10" if h.version == 2 else "1.1",
            "compression-type": S.COMPRESSION_NAMES[h.compression_type],
        }
        if h.version >= 3:
            data["lazy-refcounts"] = bool(h.compatible_features & S.COMPAT_LAZY_REFCOUNTS)
        if self.extensions.bitmaps:
            data["bitmaps"] = self.extensions.bitmaps
        data["refcount-bits"] = h.refcount_bits
        if self.data_file_name:
            data["data-file"] = self.data_file_name
            data["data-file-raw"] = bool(h.autoclear_features & S.AUTOCLEAR_DATA_FILE_RAW)
        if h.version >= 3:
            data["corrupt"] = bool(h.incompatible_features & S.INCOMPAT_CORRUPT)
            data["extended-l2"] = h.extended_l2
        return data

    def info(self) -> dict[str, Any]:
        out = super().info()
        if self.snapshots:
            out["snapshots"] = [s.to_json() for s in self.snapshots]
        out["cluster-size"] = self.cluster_size
        out["dirty-flag"] = bool(self.header.incompatible_features & S.INCOMPAT_DIRTY)
        return out

    def backing_reference(self) -> tuple[str, str | None] | None:
        return (self.backing_name, self.backing_format) if self.backing_name else None

    def close(self) -> None:
        if self.data_source is not self.host:
            self.data_source.close()
        super().close()

    def check(self, repair: str | None = None) -> CheckReport:
        """Rebuild every refcount from the metadata and compare, like ``qemu-img check``;
        ``repair`` ("leaks" or "all") mends what is safe to mend (see check.py)."""
        from .check import check_image  # check.py imports this module

        return check_image(self, repair)


def _decompressor_for(kind: int) -> Callable[[bytes, int], bytes]:
    if kind == S.COMPRESSION_ZSTD:
        import zstandard

        dctx = zstandard.ZstdDecompressor()

        def zstd_cluster(raw: bytes, size: int) -> bytes:
            # A compressed cluster is one zstd frame followed by padding up to the sector end.
            # Ask for one byte more than a cluster, never for the whole frame: a hostile frame
            # of a few KiB can inflate to gigabytes, and one that gives more than a cluster is
            # refused by the caller.
            with dctx.stream_reader(raw) as reader:
                out: bytes = reader.read(size + 1)
            return out

        return zstd_cluster

    def deflate_cluster(raw: bytes, size: int) -> bytes:
        # Raw deflate; stop once a cluster is produced, whatever follows in the last sector.
        return zlib.decompressobj(-15).decompress(raw, size)

    return deflate_cluster


# ---- header parsing -------------------------------------------------------------------------

def _bad(message: str, path: str, offset: int | None = None) -> InvalidImageError:
    return InvalidImageError(message, format="qcow2", path=path, offset=offset)


def parse_header(source: ByteSource) -> S.Header:
    """Parse and validate the header; refuse sizes QEMU would refuse, before any allocation."""
    path = source.name
    raw = read_exact(source, 0, S.HEADER_V2_LENGTH, what="qcow2 header")
    base = S.HeaderV2.parse(raw)
    if base.magic != S.MAGIC:
        raise _bad("not a qcow2 image (bad magic)", path, 0)
    if base.version not in (2, 3):
        raise UnsupportedFeatureError(f"{path}: qcow2 version {base.version} is not supported")
    fields = {k: v for k, v in base.items() if not k.startswith("_") and k != "magic"}
    h = S.Header(**fields)
    if h.version == 3:
        tail = S.HeaderV3Tail.parse(read_exact(source, S.HEADER_V2_LENGTH, 32,
                                               what="qcow2 v3 header"))
        h.incompatible_features = tail.incompatible_features
        h.compatible_features = tail.compatible_features
        h.autoclear_features = tail.autoclear_features
        h.refcount_order = tail.refcount_order
        h.header_length = tail.header_length
        if h.header_length < S.HEADER_V3_LENGTH or h.header_length % 8:
            raise _bad(f"header length {h.header_length} is invalid", path, 100)
        if h.header_length > S.HEADER_V3_LENGTH:
            h.compression_type = read_exact(source, S.HEADER_V3_LENGTH, 1,
                                            what="compression type")[0]
        if bool(h.incompatible_features & S.INCOMPAT_COMPRESSION) != (h.compression_type != 0):
            raise _bad("compression type field and feature bit disagree", path, 104)
    if not S.MIN_CLUSTER_BITS <= h.cluster_bits <= S.MAX_CLUSTER_BITS:
        raise _bad(f"cluster_bits {h.cluster_bits} is outside 9..21", path, 20)
    cs = h.cluster_size
    if h.header_length > cs:
        raise _bad("header is larger than a cluster", path, 100)
    if h.refcount_order > 6:
        raise _bad(f"refcount order {h.refcount_order} is above 6", path, 96)
    if h.size >= 1 << 63:
        raise _bad(f"virtual size {h.size} is absurd", path, 24)
    needed_l1 = -(-h.size // (cs * h.l2_entries))
    if h.l1_size < needed_l1:
        raise _bad(f"L1 table has {h.l1_size} entries, the disk needs {needed_l1}", path, 36)
    if h.l1_size * 8 > S.MAX_L1_BYTES:
        raise _bad(f"L1 table of {h.l1_size} entries exceeds the 32 MiB limit", path, 36)
    if h.refcount_table_clusters * cs > S.MAX_REFTABLE_BYTES:
        raise _bad("refcount table exceeds the 8 MiB limit", path, 56)
    if h.nb_snapshots > S.MAX_SNAPSHOTS:
        raise _bad(f"{h.nb_snapshots} snapshots exceed the limit of {S.MAX_SNAPSHOTS}", path, 60)
    for name, value in (("L1 table", h.l1_table_offset),
                        ("refcount table", h.refcount_table_offset),
                        ("snapshot table", h.snapshots_offset if h.nb_snapshots else 0)):
        if value % cs:
            raise _bad(f"{name} offset {value:#x} is not cluster-aligned", path)
    if h.l1_table_offset + h.l1_size * 8 > source.size and h.l1_size:
        raise _bad("L1 table lies past the end of the file (truncated image?)", path,
                   h.l1_table_offset)
    return h


class Extensions:
    """What the header extensions say; unknown extensions are skipped, as the spec allows."""

    def __init__(self) -> None:
        self.backing_format: str | None = None
        self.data_file: str | None = None
        self.feature_names: dict[tuple[int, int], str] = {}
        self.bitmaps: list[dict[str, Any]] = []
        self.bitmaps_ext: Any = None
        self.crypto: Any = None
        self.unknown: list[int] = []


def read_extensions(source: ByteSource, h: S.Header) -> Extensions:
    ext = Extensions()
    if h.version == 2 and h.backing_file_offset == S.HEADER_V2_LENGTH:
        return ext  # v2 images may put the backing name right after the header: no extensions
    pos = h.header_length
    limit = h.cluster_size
    if h.backing_file_offset and h.backing_file_offset > pos:
        limit = min(limit, h.backing_file_offset)
    seen: set[int] = set()
    while pos + 8 <= limit:
        head = S.ExtensionHeader.parse(read_exact(source, pos, 8, what="header extension"))
        if head.type == S.EXT_END:
            break
        if pos + 8 + head.length > limit:
            raise _bad(f"header extension {head.type:#x} runs past the header cluster",
                       source.name, pos)
        if head.type in seen and head.type != S.EXT_END:
            raise _bad(f"header extension {head.type:#x} appears twice", source.name, pos)
        seen.add(head.type)
        data = read_exact(source, pos + 8, head.length, what="header extension")
        if head.type == S.EXT_BACKING_FORMAT:
            ext.backing_format = data.decode("utf-8", "replace")
        elif head.type == S.EXT_DATA_FILE:
            ext.data_file = data.decode("utf-8", "replace")
        elif head.type == S.EXT_FEATURE_NAMES:
            for i in range(0, len(data) - 47, 48):
                item = S.FeatureNameEntry.parse(data[i:i + 48])
                ext.feature_names[(item.type, item.bit)] = \
                    item.name.split(b"\0")[0].decode("utf-8", "replace")
        elif head.type == S.EXT_BITMAPS:
            if len(data) < 24:
                raise _bad("bitmaps extension is too short", source.name, pos)
            ext.bitmaps_ext = S.BitmapsExtension.parse(data[:24])
            ext.bitmaps = read_bitmap_directory(source, h, ext.bitmaps_ext)
        elif head.type == S.EXT_CRYPTO:
            ext.crypto = S.CryptoExtension.parse(data[:16]) if len(data) >= 16 else None
        else:
            ext.unknown.append(head.type)
        pos += 8 + S.pad8(head.length)
    return ext


def read_bitmap_directory(source: ByteSource, h: S.Header, bext: Any) -> list[dict[str, Any]]:
    """The persistent dirty bitmaps, listed the way qemu-img info lists them."""
    if bext.nb_bitmaps > S.MAX_BITMAPS or bext.bitmap_directory_size > 64 << 20:
        raise _bad("bitmap directory is absurdly large", source.name)
    if not h.autoclear_features & S.AUTOCLEAR_BITMAPS:
        return []  # the extension is stale: QEMU ignores it too
    raw = read_exact(source, bext.bitmap_directory_offset, bext.bitmap_directory_size,
                     what="bitmap directory")
    out: list[dict[str, Any]] = []
    pos = 0
    for _ in range(bext.nb_bitmaps):
        if pos + S.BITMAP_DIR_FIXED_SIZE > len(raw):
            raise _bad("bitmap directory entry runs past the directory", source.name)
        entry = S.BitmapDirectoryEntryFixed.parse(raw[pos:pos + S.BITMAP_DIR_FIXED_SIZE])
        name_at = pos + S.BITMAP_DIR_FIXED_SIZE + entry.extra_data_size
        name = raw[name_at:name_at + entry.name_size].decode("utf-8", "replace")
        flags = [f for bit, f in ((0, "in-use"), (1, "auto")) if entry.flags >> bit & 1]
        out.append({"flags": flags, "name": name, "granularity": 1 << entry.granularity_bits})
        pos = S.pad8(name_at + entry.name_size)
    return out


def read_backing_name(source: ByteSource, h: S.Header) -> str | None:
    if not h.backing_file_offset:
        return None
    if h.backing_file_size > S.MAX_BACKING_NAME or h.backing_file_size == 0:
        raise _bad(f"backing file name length {h.backing_file_size} is invalid", source.name, 16)
    if h.backing_file_offset + h.backing_file_size > h.cluster_size:
        raise _bad("backing file name lies outside the header cluster", source.name, 8)
    raw = read_exact(source, h.backing_file_offset, h.backing_file_size,
                     what="backing file name")
    return raw.decode("utf-8", "replace")


def read_l1(source: ByteSource, offset: int, entries: int, h: S.Header,
            what: str) -> array.array[int]:
    if entries * 8 > S.MAX_L1_BYTES:
        raise _bad(f"{what} of {entries} entries exceeds the 32 MiB limit", source.name, offset)
    if entries and offset % h.cluster_size:
        raise _bad(f"{what} offset {offset:#x} is not cluster-aligned", source.name, offset)
    table = array.array("Q", read_exact(source, offset, entries * 8, what=what))
    if sys.byteorder == "little":
        table.byteswap()
    return table


def read_snapshots(source: ByteSource, h: S.Header) -> list[S.Snapshot]:
    """The snapshot table, read through a 64 KiB window and parsed with ``struct``: a table
    of 65536 entries takes a fraction of a second, and a hostile header costs no large read.
    Refused past QEMU's 64 MiB limit before the entry that would cross it is read."""
    fixed = struct.Struct(S.SNAPSHOT_FIXED_FORMAT)
    snapshots: list[S.Snapshot] = []
    pos = h.snapshots_offset
    window, window_at = b"", pos
    for _ in range(h.nb_snapshots):
        if pos + fixed.size > window_at + len(window):
            window, window_at = source.read_at(pos, 64 << 10), pos
        if pos + fixed.size > window_at + len(window):
            raise _bad(f"truncated: snapshot table entry needs {fixed.size} bytes at offset "
                       f"{pos}, the file has {source.size}", source.name, pos)
        (l1_offset, l1_size, id_size, name_size, date_sec, date_nsec, vm_clock_nsec,
         vm_state, extra_size) = fixed.unpack_from(window, pos - window_at)
        if extra_size > S.MAX_SNAPSHOT_EXTRA:
            raise _bad("snapshot extra data is too large", source.name, pos)
        entry_size = fixed.size + extra_size + id_size + name_size
        if S.pad8(pos + entry_size) - h.snapshots_offset > S.MAX_SNAPSHOT_TABLE_BYTES:
            raise _bad("snapshot table exceeds QEMU's 64 MiB limit", source.name, pos)
        var_at = pos + fixed.size
        var_len = entry_size - fixed.size
        if var_at + var_len <= window_at + len(window):
            var = window[var_at - window_at:var_at - window_at + var_len]
        else:
            var = read_exact(source, var_at, var_len, what="snapshot entry")
        extra = var[:extra_size]
        disk_size = icount = None
        if len(extra) >= 8:
            vm_state = struct.unpack(">Q", extra[0:8])[0]
        if len(extra) >= 16:
            disk_size = struct.unpack(">Q", extra[8:16])[0]
        if len(extra) >= 24:
            raw_icount = struct.unpack(">q", extra[16:24])[0]
            icount = raw_icount if raw_icount >= 0 else None
        snapshots.append(S.Snapshot(
            id=var[extra_size:extra_size + id_size].decode("utf-8", "replace"),
            name=var[extra_size + id_size:].decode("utf-8", "replace"),
            l1_table_offset=l1_offset, l1_size=l1_size, date_sec=date_sec,
            date_nsec=date_nsec, vm_clock_nsec=vm_clock_nsec, vm_state_size=vm_state,
            disk_size=disk_size, icount=icount, extra=extra, entry_size=entry_size,
        ))
        pos += S.pad8(entry_size)
    return snapshots
