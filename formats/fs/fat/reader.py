"""FAT12, FAT16 and FAT32 as a file tree: boot sector, FAT chains, directories with long names.

The FAT type is decided by the count of data clusters as fatgen103 says (under 4085: FAT12,
else FAT16) and by the BPB's shape for FAT32 (a zero 16-bit FAT size), as Linux and fsck.fat
decide it: mkfs.fat -F 32 writes FAT32 volumes of fewer than 65525 clusters. The type string
is informational and never read. FAT12/16 keep the root directory in a fixed region after the
FATs; FAT32 keeps it in a cluster chain like any other directory.

Names: a run of VFAT long-name entries (UTF-16, 13 units each, last one first) belongs to the
short entry that follows it only when every ordinal is in sequence and every checksum equals
the short name's; otherwise the entries are orphans (left by a driver that knew no long names)
and the short name is used. Short names are decoded from code page 437 and shown in lower case
where Windows NT's case flags say so (0x08 base, 0x10 extension), as Linux and mtools show
them. Deleted entries, the volume label entry and the ``.``/``..`` entries are skipped; a name
that is ``.``, ``..``, empty or holds ``/`` or NUL is hostile.

Metadata: directories 0755, files 0644 (0444 with the read-only attribute), owner 0:0. FAT
stores local time with no zone; it is read as UTC (what ``mtools`` and a Linux mount with
the default ``tz`` do), ``mtime`` from the write date and time (2-second steps), ``crtime``
from the creation date and time plus its 10 ms field, ``atime`` from the access date.

Hostile images fail with one ``InvalidImageError`` line and never hang: a BPB whose FATs do
not fit in the volume or do not cover its clusters, a cluster chain that loops (each walk
tracks the clusters it visited), points at a free, bad or out-of-range cluster or ends before
the file's size; a directory larger than the 65536 entries FAT allows, or whose clusters
belong to another directory too (which is how a directory loop looks on disk). A file's chain
is walked when the file is opened, so listing a tree costs directory reads alone; a file's
start cluster is checked while listing.

References: Microsoft "FAT: General Overview of On-Disk Format" (fatgen103, 1.03), sections
"Boot Sector and BPB", "FAT Type Determination", "FAT Data Structure", "FAT Directory
Structure", "FAT Long Directory Entries" and "Name Matching In Short & Long Names".
"""

from __future__ import annotations

import array
import bisect
import calendar
import functools
import io
import itertools
import sys
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from imgbridge.errors import InvalidImageError
from imgbridge.model.fs import Filesystem
from imgbridge.model.tree import Entry, EntryType
from imgbridge.source import ByteSource, CursorFile, read_exact

from . import _structs as s

__all__ = ["FatFilesystem", "FatGeometry", "parse_boot_sector"]

FORMAT = "vfat"
#: FAT32 tables are read in pages of this many entries, a bounded number of them kept.
_PAGE_ENTRIES = 1 << 16
_CACHED_PAGES = 64
#: The largest single read when streaming a file.
_MAX_READ = 4 << 20
_NS = 1_000_000_000


@dataclass(frozen=True)
class FatGeometry:
    """The layout a boot sector describes, in bytes where it matters."""

    fat_bits: int
    bytes_per_sector: int
    cluster_size: int
    total_sectors: int
    fat_offset: int  # of the FAT in use (the active one when mirroring is off)
    root_dir_offset: int  # FAT12/16 only
    root_dir_bytes: int  # FAT12/16 only
    data_offset: int
    cluster_count: int
    root_cluster: int  # FAT32 only
    volume_id: int | None
    label: str

    @property
    def size(self) -> int:
        return self.total_sectors * self.bytes_per_sector

    @property
    def last_cluster(self) -> int:
        return self.cluster_count + s.FIRST_CLUSTER - 1

    def cluster_offset(self, cluster: int) -> int:
        return self.data_offset + (cluster - s.FIRST_CLUSTER) * self.cluster_size


def _bad(message: str, source: ByteSource | None = None, offset: int | None = None
         ) -> InvalidImageError:
    return InvalidImageError(message, format=FORMAT,
                             path=source.name if source is not None else None, offset=offset)


def parse_boot_sector(sector: bytes) -> FatGeometry:
    """The geometry of a FAT boot sector, or InvalidImageError saying what is wrong with it.

    Checks what makes a boot sector a FAT one and not, say, an MBR (which ends in 55AA too
    but has no BPB): the jump, the signature, power-of-two sector and cluster sizes, reserved
    sectors, one or two FATs, a legal media byte, and FATs that fit the volume and cover
    every cluster it has.
    """
    if len(sector) < 512:
        raise _bad("too small for a FAT boot sector")
    if sector[s.BOOT_SIGNATURE_OFFSET:s.BOOT_SIGNATURE_OFFSET + 2] != s.BOOT_SIGNATURE:
        raise _bad("no boot sector signature (55AA at offset 510)")
    if sector[0] not in s.JUMP_OPCODES:
        raise _bad(f"boot sector starts with {sector[0]:#04x}, not a jump instruction")
    bpb = s.Bpb.parse(sector)
    bps = bpb.bytes_per_sector
    if bps not in s.SECTOR_SIZES:
        raise _bad(f"{bps} bytes per sector is not 512, 1024, 2048 or 4096")
    if bpb.sectors_per_cluster not in s.SECTORS_PER_CLUSTER:
        raise _bad(f"{bpb.sectors_per_cluster} sectors per cluster is not a power of two")
    if bpb.reserved_sectors == 0:
        raise _bad("no reserved sectors (the boot sector itself is one)")
    if bpb.num_fats not in (1, 2):
        raise _bad(f"{bpb.num_fats} FATs (a FAT volume has one or two)")
    if bpb.media != 0xF0 and bpb.media < 0xF8:
        raise _bad(f"media byte {bpb.media:#04x} is not a FAT media descriptor")
    total = bpb.total_sectors_16 or bpb.total_sectors_32
    fat32_shape = bpb.fat_size_16 == 0
    ext32 = s.ExtBpb32.parse(sector[s.EXT_BPB_OFFSET:])
    fat_sectors = ext32.fat_size_32 if fat32_shape else bpb.fat_size_16
    if total == 0 or fat_sectors == 0:
        raise _bad("the BPB gives no sector count or no FAT size")
    root_dir_sectors = -(-bpb.root_entries * s.DIR_ENTRY_SIZE // bps)
    metadata = bpb.reserved_sectors + bpb.num_fats * fat_sectors + root_dir_sectors
    if metadata >= total:
        raise _bad(f"the reserved sectors, {bpb.num_fats} FATs of {fat_sectors} sectors and the "
                   f"root directory end past the {total}-sector volume")
    clusters = (total - metadata) // bpb.sectors_per_cluster
    if clusters == 0:
        raise _bad("the volume has no data cluster")
    # A FAT32 BPB (no 16-bit FAT size, no fixed root directory) makes a FAT32 volume whatever
    # its cluster count: mkfs.fat -F 32 writes such volumes under 65525 clusters, and Linux
    # and fsck.fat read them as FAT32. Between FAT12 and FAT16 the count decides.
    if fat32_shape:
        bits = 32
        if bpb.root_entries:
            raise _bad("the BPB is a FAT32 one but gives a fixed root directory")
    else:
        bits = 12 if clusters <= s.FAT12_MAX_CLUSTERS else 16
        if clusters > s.FAT16_MAX_CLUSTERS:
            raise _bad(f"{clusters} clusters are more than FAT16 can number, but the BPB is a "
                       "FAT12/16 one")
        if not bpb.root_entries:
            raise _bad(f"{clusters} clusters make a FAT{bits} volume, but the BPB gives no "
                       "root directory")
    if bits == 32 and clusters > s.FAT32_MAX_CLUSTERS:
        raise _bad(f"{clusters} clusters are more than FAT32 can number")
    if fat_sectors * bps * 8 // bits < clusters + s.FIRST_CLUSTER:
        raise _bad(f"a FAT of {fat_sectors} sectors cannot map the volume's {clusters} clusters")
    fat_index = 0
    root_cluster = 0
    if bits == 32:
        if ext32.ext_flags & s.EXT_FLAGS_NO_MIRROR:
            fat_index = ext32.ext_flags & s.EXT_FLAGS_ACTIVE_FAT
            if fat_index >= bpb.num_fats:
                raise _bad(f"the active FAT is number {fat_index}, of {bpb.num_fats}")
        root_cluster = ext32.root_cluster
        if not s.FIRST_CLUSTER <= root_cluster < clusters + s.FIRST_CLUSTER:
            raise _bad(f"the root directory cluster {root_cluster} is outside the volume")
        boot_signature, volume_id, raw_label = (ext32.boot_signature, ext32.volume_id,
                                                ext32.label)
    else:
        ext16 = s.ExtBpb16.parse(sector[s.EXT_BPB_OFFSET:])
        boot_signature, volume_id, raw_label = (ext16.boot_signature, ext16.volume_id,
                                                ext16.label)
    has_id = boot_signature in (0x28, s.EXTENDED_BOOT_SIGNATURE)
    label = ""
    if boot_signature == s.EXTENDED_BOOT_SIGNATURE and raw_label != s.NO_NAME_LABEL:
        label = _decode_label(raw_label)
    fat_offset = (bpb.reserved_sectors + fat_index * fat_sectors) * bps
    root_dir_offset = (bpb.reserved_sectors + bpb.num_fats * fat_sectors) * bps
    return FatGeometry(
        fat_bits=bits,
        bytes_per_sector=bps,
        cluster_size=bps * bpb.sectors_per_cluster,
        total_sectors=total,
        fat_offset=fat_offset,
        root_dir_offset=root_dir_offset,
        root_dir_bytes=bpb.root_entries * s.DIR_ENTRY_SIZE,
        data_offset=metadata * bps,
        cluster_count=clusters,
        root_cluster=root_cluster,
        volume_id=volume_id if has_id else None,
        label=label,
    )


def _decode_label(raw: bytes) -> str:
    if raw[:1] == bytes([s.ENTRY_KANJI_E5]):
        raw = b"\xe5" + raw[1:]
    return raw.decode(s.SHORT_NAME_CODEPAGE).rstrip(" ")


# ---- the FAT ---------------------------------------------------------------------------------


class _FatTable:
    """Lookups in the FAT in use. FAT12/16 tables (128 KiB at most) are read whole; FAT32
    tables, up to a gigabyte, are read in pages with a bounded cache."""

    def __init__(self, source: ByteSource, geometry: FatGeometry) -> None:
        self._source = source
        self._geo = geometry
        self._entries = geometry.cluster_count + s.FIRST_CLUSTER
        self._small: array.array[int] | None = None
        self._pages: OrderedDict[int, array.array[int]] = OrderedDict()
        if geometry.fat_bits == 16:
            raw = read_exact(source, geometry.fat_offset, self._entries * 2, what="the FAT")
            self._small = _native(array.array("H", raw))
        elif geometry.fat_bits == 12:
            raw = read_exact(source, geometry.fat_offset, -(-self._entries * 3 // 2),
                             what="the FAT")
            raw += b"\x00"  # the last even entry's 16-bit read may reach one byte past
            table = array.array("H", bytes(2 * self._entries))
            for n in range(self._entries):
                at = n * 3 // 2
                pair = raw[at] | raw[at + 1] << 8
                table[n] = pair >> 4 if n & 1 else pair & 0xFFF
            self._small = table

    def get(self, cluster: int) -> int:
        if self._small is not None:
            return self._small[cluster]
        page_no, index = divmod(cluster, _PAGE_ENTRIES)
        page = self._pages.get(page_no)
        if page is None:
            page = self._read_page(page_no)
            self._pages[page_no] = page
            if len(self._pages) > _CACHED_PAGES:
                self._pages.popitem(last=False)
        else:
            self._pages.move_to_end(page_no)
        return page[index] & s.FAT32_ENTRY_MASK

    def _read_page(self, page_no: int) -> array.array[int]:
        first = page_no * _PAGE_ENTRIES
        count = min(_PAGE_ENTRIES, self._entries - first)
        raw = read_exact(self._source, self._geo.fat_offset + first * 4, count * 4,
                         what="the FAT")
        return _native(array.array("I", raw))

    def run_length(self, cluster: int, limit: int) -> int:
        """How many links from ``cluster`` on go straight to the next cluster (c to c + 1),
        at most ``limit``: a contiguous file costs a few slice comparisons, not a lookup per
        cluster. May stop early (a FAT32 entry with its reserved bits set); never overshoots."""
        limit = min(limit, self._geo.last_cluster - cluster)
        done = 0
        chunk = 16
        while done < limit:
            first = cluster + done
            table, index = self._table_at(first)
            size = min(chunk, limit - done, len(table) - index)
            got = table[index:index + size]
            if got == array.array(table.typecode, range(first + 1, first + size + 1)):
                done += size
                chunk = min(chunk * 2, _PAGE_ENTRIES)
                continue
            return done + next(j for j in range(size) if got[j] != first + j + 1)
        return done

    def _table_at(self, cluster: int) -> tuple[array.array[int], int]:
        """The array holding ``cluster``'s entry and the entry's index in it."""
        if self._small is not None:
            return self._small, cluster
        page_no, index = divmod(cluster, _PAGE_ENTRIES)
        self.get(cluster)  # loads the page into the cache
        return self._pages[page_no], index

    def free_clusters(self) -> int:
        """How many data clusters are free, counted over the whole table in pages."""
        first, end = s.FIRST_CLUSTER, self._entries
        if self._small is not None:
            return self._small[first:end].count(0)
        free = 0
        for start in range(0, end, _PAGE_ENTRIES):
            count = min(_PAGE_ENTRIES, end - start)
            raw = bytearray(read_exact(self._source, self._geo.fat_offset + start * 4, count * 4,
                                       what="the FAT"))
            # The top four bits of a FAT32 entry are reserved: a free entry may have them set.
            # (A zero entry is zero in either byte order, so no swap is needed to count them.)
            raw[3::4] = raw[3::4].translate(_LOW_NIBBLE)
            free += array.array("I", bytes(raw))[max(0, first - start):].count(0)
        return free


_LOW_NIBBLE = bytes(b & 0x0F for b in range(256))


def _native(table: array.array[int]) -> array.array[int]:
    if sys.byteorder == "big":
        table.byteswap()
    return table


# ---- directories -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Child:
    name: str
    is_dir: bool
    attributes: int
    cluster: int
    size: int
    mtime: int
    crtime: int | None
    atime: int | None


def _dos_days(date: int) -> int:
    """Days since 1970-01-01 of a DOS date, tolerant as Linux is: month and day 0 count as 1,
    and out-of-range values carry over instead of failing."""
    year = s.DOS_EPOCH_YEAR + (date >> 9)
    month = max(1, (date >> 5) & 0x0F)
    day = max(1, date & 0x1F)
    years_ahead, month_index = divmod(month - 1, 12)
    first = calendar.timegm((year + years_ahead, month_index + 1, 1, 0, 0, 0))
    return first // 86400 + day - 1


def _dos_time(date: int, time: int) -> int:
    """Seconds since the epoch of a DOS date and time, read as UTC."""
    seconds = (time >> 11) * 3600 + ((time >> 5) & 0x3F) * 60 + (time & 0x1F) * 2
    return _dos_days(date) * 86400 + seconds


def lfn_checksum(short_name: bytes) -> int:
    """The checksum a long name's entries carry of the 11-byte short name they belong to."""
    total = 0
    for byte in short_name:
        total = (((total & 1) << 7) + (total >> 1) + byte) & 0xFF
    return total


def _short_name(raw: bytes, nt_flags: int) -> str:
    if raw[0] == s.ENTRY_KANJI_E5:
        raw = b"\xe5" + raw[1:]
    base = raw[:8].decode(s.SHORT_NAME_CODEPAGE).rstrip(" ")
    ext = raw[8:].decode(s.SHORT_NAME_CODEPAGE).rstrip(" ")
    if nt_flags & s.NT_LOWER_BASE:
        base = base.lower()
    if nt_flags & s.NT_LOWER_EXT:
        ext = ext.lower()
    return f"{base}.{ext}" if ext else base


def _lfn_units(entry: bytes) -> bytes:
    return entry[1:11] + entry[14:26] + entry[28:32]


def _decode_long_name(parts: list[bytes]) -> str:
    units = b"".join(reversed(parts))  # stored last part first
    end = len(units)
    for i in range(0, len(units), 2):
        if units[i:i + 2] == b"\x00\x00":
            end = i
            break
    # A lone surrogate cannot become a UTF-8 tree path: it is shown as U+FFFD.
    return units[:end].decode("utf-16-le", errors="replace")


class _LongName:
    """Collects a run of long-name entries until the short entry they describe."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.checksum = -1
        self.next_ordinal = 0

    def reset(self) -> None:
        self.parts = []
        self.next_ordinal = 0

    def add(self, entry: bytes) -> None:
        ordinal = entry[0] & s.LFN_ORDINAL_MASK
        checksum = entry[13]
        if entry[0] & s.LFN_LAST:
            if not 1 <= ordinal <= s.LFN_MAX_ENTRIES:
                self.reset()
                return
            self.parts = [_lfn_units(entry)]
            self.checksum = checksum
            self.next_ordinal = ordinal - 1
        elif self.parts and ordinal == self.next_ordinal and ordinal and \
                checksum == self.checksum:
            self.parts.append(_lfn_units(entry))
            self.next_ordinal = ordinal - 1
        else:
            self.reset()

    def take(self, short_name: bytes) -> str | None:
        """The long name for this short entry, if a complete, matching one was collected."""
        name = None
        if self.parts and self.next_ordinal == 0 and lfn_checksum(short_name) == self.checksum:
            name = _decode_long_name(self.parts)
        self.reset()
        return name


def parse_directory(data: bytes, *, where: str, fat32: bool
                    ) -> tuple[list[_Child], str | None]:
    """The live entries of a directory's bytes and its volume label entry (root only)."""
    children: list[_Child] = []
    label: str | None = None
    long_name = _LongName()
    for pos in range(0, len(data) - s.DIR_ENTRY_SIZE + 1, s.DIR_ENTRY_SIZE):
        raw = data[pos:pos + s.DIR_ENTRY_SIZE]
        first = raw[0]
        if first == s.ENTRY_END:
            break
        if first == s.ENTRY_DELETED:
            long_name.reset()
            continue
        attributes = raw[11]
        if attributes & s.ATTR_LONG_NAME_MASK == s.ATTR_LONG_NAME:
            long_name.add(raw)
            continue
        (name11, attributes, nt_flags, crt_tenth, crt_time, crt_date, acc_date, clus_hi,
         wrt_time, wrt_date, clus_lo, size) = s.DirEntry.unpack(raw)
        if attributes & s.ATTR_VOLUME_ID:
            long_name.reset()
            if not attributes & s.ATTR_DIRECTORY and label is None:
                label = _decode_label(name11)
            continue
        if name11 in (s.DOT_NAME, s.DOTDOT_NAME):
            long_name.reset()
            continue
        name = long_name.take(name11) or _short_name(name11, nt_flags)
        if name in ("", ".", "..") or "/" in name or "\x00" in name:
            raise _bad(f"{where or '/'}: an entry is named {name!r}")
        crtime = None
        if crt_date:
            crtime = _dos_time(crt_date, crt_time) * _NS + min(crt_tenth, 199) * 10_000_000
        children.append(_Child(
            name=name,
            is_dir=bool(attributes & s.ATTR_DIRECTORY),
            attributes=attributes,
            cluster=(clus_hi << 16 | clus_lo) if fat32 else clus_lo,
            size=size,
            mtime=_dos_time(wrt_date, wrt_time) * _NS,
            crtime=crtime,
            atime=_dos_days(acc_date) * 86400 * _NS if acc_date else None,
        ))
    return children, label


# ---- reading files ---------------------------------------------------------------------------


class _ChainFile(CursorFile):
    """A file's bytes: ``runs`` of (source offset, length), contiguous clusters merged."""

    def __init__(self, source: ByteSource, runs: tuple[tuple[int, int], ...], size: int,
                 path: str) -> None:
        super().__init__(size)
        self._source = source
        self._runs = runs
        self._path = path
        self._starts: list[int] = []
        logical = 0
        for _, length in runs:
            self._starts.append(logical)
            logical += length

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self._size - self._pos, _MAX_READ)
        if want <= 0:
            return 0
        index = bisect.bisect_right(self._starts, self._pos) - 1
        host, length = self._runs[index]
        inside = self._pos - self._starts[index]
        n = min(want, length - inside)
        data = read_exact(self._source, host + inside, n, what=f"the data of {self._path}")
        memoryview(buffer)[:n] = data
        self._pos += n
        return n


# ---- the filesystem --------------------------------------------------------------------------


class FatFilesystem(Filesystem):
    """A FAT12/16/32 volume read from ``source`` (a whole file or one partition)."""

    format_name = FORMAT

    def __init__(self, source: ByteSource) -> None:
        self._source = source
        head = source.read_at(0, 4096)
        try:
            self.geometry = parse_boot_sector(head)
        except InvalidImageError as exc:
            raise _bad(f"not a FAT volume: {exc.message}", source) from None
        geo = self.geometry
        if geo.data_offset > source.size:
            raise _bad(f"truncated: the data area starts at {geo.data_offset}, past the "
                       f"{source.size}-byte source", source)
        self._fat = _FatTable(source, geo)
        self._eoc, self._bad_mark = s.FAT_MARKS[geo.fat_bits]
        self._root_label: str | None = None
        self._root_read = False

    # ---- chains --------------------------------------------------------------------------

    def _next(self, cluster: int, where: str) -> int:
        """The cluster after ``cluster`` in its chain; 0 at the end of the chain."""
        value = self._fat.get(cluster)
        if value >= self._eoc:
            return 0
        if value == self._bad_mark:
            raise _bad(f"{where}: its cluster chain runs into a bad cluster")
        if value < s.FIRST_CLUSTER:
            raise _bad(f"{where}: its cluster chain runs into a free cluster after {cluster}")
        if value > self.geometry.last_cluster:
            raise _bad(f"{where}: its cluster chain points to cluster {value}, past the last "
                       f"cluster {self.geometry.last_cluster}")
        return value

    def _check_start(self, cluster: int, where: str) -> None:
        if not s.FIRST_CLUSTER <= cluster <= self.geometry.last_cluster:
            raise _bad(f"{where}: starts at cluster {cluster}, outside the volume's clusters "
                       f"2..{self.geometry.last_cluster}")

    def _runs(self, clusters: list[int]) -> tuple[tuple[int, int], ...]:
        """Byte runs of the source for a list of clusters, contiguous ones merged."""
        geo = self.geometry
        runs: list[tuple[int, int]] = []
        for cluster in clusters:
            offset = geo.cluster_offset(cluster)
            if runs and runs[-1][0] + runs[-1][1] == offset:
                runs[-1] = (runs[-1][0], runs[-1][1] + geo.cluster_size)
            else:
                runs.append((offset, geo.cluster_size))
        return tuple(runs)

    def _file_runs(self, start: int, size: int, where: str) -> tuple[tuple[int, int], ...]:
        """The runs holding a file's ``size`` bytes; the chain must be at least that long.

        The chain is walked a run of contiguous clusters at a time, so time and memory grow
        with the file's fragments, not its clusters. The clusters seen are kept as sorted,
        disjoint intervals: a chain that comes back to one of them loops. Clusters past
        ``size`` are not followed (fsck's business)."""
        if size == 0:
            return ()
        geo = self.geometry
        self._check_start(start, where)
        needed = -(-size // geo.cluster_size)
        starts, ends = [start], [start]  # the visited intervals, by first cluster
        current = 0  # the interval the walk is in
        runs: list[list[int]] = [[geo.cluster_offset(start), geo.cluster_size]]
        cluster, count = start, 1
        while count < needed:
            ahead = self._fat.run_length(cluster, needed - count)
            if ahead:
                last = cluster + ahead
                before = bisect.bisect_right(starts, last) - 1
                if before != current:
                    raise _bad(f"{where}: its cluster chain loops back to cluster "
                               f"{starts[before]}")
                ends[current] = last
                runs[-1][1] += ahead * geo.cluster_size
                cluster, count = last, count + ahead
                continue
            following = self._next(cluster, where)
            if following == 0:
                raise _bad(f"{where}: {size} bytes, but its cluster chain holds only "
                           f"{count} clusters of {geo.cluster_size} bytes")
            current = bisect.bisect_right(starts, following)
            if current and ends[current - 1] >= following:
                raise _bad(f"{where}: its cluster chain loops back to cluster {following}")
            starts.insert(current, following)
            ends.insert(current, following)
            runs.append([geo.cluster_offset(following), geo.cluster_size])
            cluster, count = following, count + 1
        runs[-1][1] -= needed * geo.cluster_size - size
        return tuple((offset, length) for offset, length in runs)

    def _open_file(self, start: int, size: int, path: str) -> BinaryIO:
        # The chain is walked when the file is opened, not when the tree is listed, so a
        # listing costs directory reads alone.
        runs = self._file_runs(start, size, path)
        return io.BufferedReader(_ChainFile(self._source, runs, size, path),
                                 buffer_size=1 << 20)

    def _read_directory(self, start: int, where: str, dir_clusters: set[int]) -> bytes:
        """A subdirectory's (or the FAT32 root's) bytes, following its chain to the end."""
        geo = self.geometry
        self._check_start(start, where)
        limit = -(-s.MAX_DIR_ENTRIES * s.DIR_ENTRY_SIZE // geo.cluster_size)
        clusters: list[int] = []
        cluster = start
        while cluster:
            if cluster in dir_clusters:
                raise _bad(f"{where}: its cluster {cluster} belongs to another directory or "
                           "comes twice in its chain (a directory loop)")
            dir_clusters.add(cluster)
            clusters.append(cluster)
            if len(clusters) > limit:
                raise _bad(f"{where}: the directory is larger than FAT's "
                           f"{s.MAX_DIR_ENTRIES} entries")
            cluster = self._next(cluster, where)
        return b"".join(read_exact(self._source, offset, length, what=f"directory {where}")
                        for offset, length in self._runs(clusters))

    def _read_root(self, dir_clusters: set[int]) -> list[_Child]:
        geo = self.geometry
        if geo.fat_bits == 32:
            data = self._read_directory(geo.root_cluster, "/", dir_clusters)
        else:
            data = read_exact(self._source, geo.root_dir_offset, geo.root_dir_bytes,
                              what="the root directory")
        children, label = parse_directory(data, where="", fat32=geo.fat_bits == 32)
        self._root_label = label
        self._root_read = True
        return children

    # ---- the contract --------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        geo = self.geometry
        if not self._root_read:
            self._read_root(set())
        label = self._root_label if self._root_label is not None else geo.label
        uuid = None
        if geo.volume_id is not None:
            uuid = f"{geo.volume_id >> 16:04X}-{geo.volume_id & 0xFFFF:04X}"
        used = (geo.cluster_count - self._fat.free_clusters()) * geo.cluster_size
        return {
            "type": FORMAT,
            "fat-bits": geo.fat_bits,
            "label": label,
            "uuid": uuid,
            "size": geo.size,
            "used": used,
            "cluster-size": geo.cluster_size,
            "sector-size": geo.bytes_per_sector,
            "clusters": geo.cluster_count,
        }

    def entries(self) -> Iterator[Entry]:
        geo = self.geometry
        dir_clusters: set[int] = set()
        yield Entry("", EntryType.DIR, mode=0o755)
        stack: list[tuple[str, Iterator[_Child]]] = [
            ("", iter(self._sorted(self._read_root(dir_clusters), "")))]
        while stack:
            parent, pending = stack[-1]
            child = next(pending, None)
            if child is None:
                stack.pop()
                continue
            path = f"{parent}/{child.name}" if parent else child.name
            if child.is_dir:
                yield Entry(path, EntryType.DIR, mode=0o755, mtime=child.mtime,
                            crtime=child.crtime, atime=child.atime)
                if child.cluster == 0:
                    raise _bad(f"{path}: the directory points to the root (a directory loop)")
                data = self._read_directory(child.cluster, path, dir_clusters)
                children, _ = parse_directory(data, where=path, fat32=geo.fat_bits == 32)
                stack.append((path, iter(self._sorted(children, path))))
                continue
            if child.size:
                self._check_start(child.cluster, path)
            mode = 0o444 if child.attributes & s.ATTR_READ_ONLY else 0o644
            yield Entry(path, EntryType.FILE, mode=mode, size=child.size, mtime=child.mtime,
                        crtime=child.crtime, atime=child.atime,
                        opener=functools.partial(self._open_file, child.cluster, child.size,
                                                 path))

    @staticmethod
    def _sorted(children: list[_Child], where: str) -> list[_Child]:
        ordered = sorted(children, key=lambda child: child.name.encode("utf-8"))
        for before, after in itertools.pairwise(ordered):
            if before.name == after.name:
                raise _bad(f"{where or '/'}: two entries are named {before.name!r}")
        return ordered
