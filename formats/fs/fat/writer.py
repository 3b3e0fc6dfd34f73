"""Write a file tree as a FAT32 volume (an EFI system partition), as a virtual raw disk.

``build_fat32`` lays the whole volume out from the tree's metadata, then serves it as a
read-only ``Disk``: the boot sectors, FATs and directories come from memory (the FAT itself is
computed on demand, so a large volume costs no large table), and each file's bytes are read
from its entry's opener only when that part of the disk is read. Writing the disk out is the
raw writer's job, which leaves the free space as holes.

The layout is mkfs.fat's: 32 reserved sectors (more when a cluster is larger, so the data
area starts on a cluster boundary) with the FSInfo sector at 1 and backup copies of the boot
and FSInfo sectors at 6 and 7, two FATs, media byte 0xF8, the root directory at cluster 2, and
Microsoft's cluster size for the volume size (512 bytes up to 260 MiB, 4 KiB up to 8 GiB, 8 KiB
to 16 GiB, 16 KiB to 32 GiB, 32 KiB above). FAT32 needs at least 65525 clusters, so a volume
is at least about 33 MiB (with 512-byte clusters). Directories are stored first, then every
file in one contiguous run, in tree order; the output is a function of the tree and options.

What FAT can hold, and what happens to the rest:

- names: a name that fits 8.3 in one case ("EFI", "boot.efi") is one short entry (lower case
  through Windows NT's case flags); any other name gets VFAT long-name entries and a unique
  short alias ("LONGNA~1.TXT", numbered in tree order). Names FAT cannot hold (the characters
  ``"*:<>?\\|``, control characters, a trailing dot or space, more than 255 UTF-16 units) and
  names that differ only in case in one directory are refused;
- times: mtime is the write date and time (2-second steps, rounded down), crtime the creation
  date and time with its 10 ms field (mtime when the entry has none), atime the access date
  (mtime's when none); they are written as UTC. FAT dates cover 1980-01-01 to 2107-12-31:
  earlier times are written as 1980-01-01 00:00:00, later ones as 2107-12-31 23:59:58;
- mode: a file whose mode has no write bit gets the read-only attribute; owners, other mode
  bits and xattrs are dropped (FAT has no place for them);
- hardlinks become independent copies of their target's content;
- symlinks, devices, fifos and sockets raise ``UnsupportedFeatureError`` naming the path, or
  are left out with ``skip_unsupported``; so are names FAT cannot hold.

The volume id, unless given, is derived from a hash of the tree's metadata (paths, types,
sizes, modes, times) and the options, so the same tree gives the same bytes.

References: Microsoft "FAT: General Overview of On-Disk Format" (fatgen103, 1.03): "Boot
Sector and BPB", "FAT32 FSInfo Sector Structure", "FAT Directory Structure", "FAT Long
Directory Entries", "The Basis-Name Generation Algorithm", "The Numeric-Tail Generation
Algorithm"; dosfstools mkfs.fat (layout choices, checked with its output, never its code).
"""

from __future__ import annotations

import array
import bisect
import hashlib
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import BinaryIO

from imgbridge.errors import InvalidInputError, UnsupportedFeatureError
from imgbridge.model.disk import BlockState, Disk, Run
from imgbridge.model.tree import Entry, EntryType
from imgbridge.options import parse_size, parse_switch
from imgbridge.output import AtomicOutput
from imgbridge.progress import ProgressFn

from . import _structs as s
from .reader import lfn_checksum

__all__ = ["CREATE_OPTIONS", "Fat32Image", "build_fat32", "create"]

CREATE_OPTIONS = {
    "size": "volume size (64M, 1G...); default: the content plus 10% (at least 1 MiB) of "
            "headroom, and never under FAT32's minimum of about 33 MiB",
    "label": "volume label, up to 11 characters (stored in upper case)",
    "volume_id": "volume serial number as blkid shows it (ABCD-1234) or as hex; default: "
                 "derived from the tree, so the output is reproducible",
    "cluster_size": "bytes per cluster, 512..32768, a power of two; default: by volume size "
                    "as mkfs.fat chooses",
    "skip_unsupported": "on: leave out what FAT cannot hold (symlinks, devices, fifos, "
                        "sockets, unrepresentable names); off (default): refuse them",
}

SECTOR = 512
RESERVED_SECTORS = 32
FSINFO_SECTOR = 1
BACKUP_BOOT_SECTOR = 6
NUM_FATS = 2
MEDIA = 0xF8
ROOT_CLUSTER = s.FIRST_CLUSTER
FAT32_MIN_CLUSTERS = s.FAT16_MAX_CLUSTERS + 1
MAX_CLUSTER_SIZE = 32768
#: A directory entry's size field is 32 bits.
MAX_FILE_SIZE = 0xFFFFFFFF
MiB = 1 << 20
#: Microsoft's FAT32 cluster sizes by volume size (fatgen103's DskTableFAT32), as mkfs.fat.
_CLUSTER_TABLE = ((260 * MiB, 512), (8 << 30, 4096), (16 << 30, 8192), (32 << 30, 16384))
_NS = 1_000_000_000
#: 1980-01-01 and 2107-12-31 23:59:58 in seconds since the epoch (UTC).
_DOS_MIN = 315532800
_DOS_MAX = 4354819198
#: Characters a short name may hold besides A-Z and 0-9 (fatgen103, ASCII only).
_SHORT_EXTRA = frozenset("$%'-_@~`!(){}^#&")
#: Characters no FAT name may hold (besides control characters).
_FORBIDDEN = frozenset('"*/:<>?\\|')
#: A tiny boot program for the jump to land on: int 18h (boot failed: the BIOS tries the next
#: device), then halt in a loop.
_BOOT_CODE = b"\xcd\x18\xeb\xfe"
_UNSUPPORTED = {
    EntryType.SYMLINK: "a symbolic link",
    EntryType.CHAR: "a character device",
    EntryType.BLOCK: "a block device",
    EntryType.FIFO: "a fifo",
    EntryType.SOCKET: "a socket",
}


@dataclass(eq=False)
class _Node:
    """A directory or file of the volume being built."""

    name: str
    entry: Entry | None  # None: a directory the tree implies but does not describe
    is_dir: bool
    children: dict[str, _Node] = field(default_factory=dict)
    link_target: str = ""  # a hardlink waiting to be resolved
    content: Entry | None = None  # the FILE whose bytes this file holds
    short_name: bytes = b""
    nt_flags: int = 0
    long_name: bool = False
    first_cluster: int = 0
    clusters: int = 0

    @property
    def size(self) -> int:
        return self.content.size if self.content is not None else 0


# ---- names -----------------------------------------------------------------------------------


def _check_name(name: str) -> str | None:
    """Why FAT cannot hold ``name``, or None when it can."""
    if any(ch in _FORBIDDEN or ord(ch) < 0x20 for ch in name):
        return "holds a character FAT names cannot hold"
    if name.endswith((".", " ")):
        return "ends in a dot or a space, which FAT drops"
    try:
        units = len(name.encode("utf-16-le")) // 2
    except UnicodeEncodeError:
        return "is not valid Unicode"
    if units > s.LFN_MAX_UNITS:
        return f"is {units} UTF-16 units long, FAT allows {s.LFN_MAX_UNITS}"
    return None


def _is_short_char(ch: str) -> bool:
    return ch.isascii() and (ch.isalnum() or ch in _SHORT_EXTRA)


def _single_case(part: str) -> bool:
    return part == part.upper() or part == part.lower()


def _exact_short(name: str) -> tuple[bytes, int] | None:
    """The short entry of a name that is 8.3 already, in one case per part, else None."""
    base, dot, ext = name.partition(".")
    if not 1 <= len(base) <= 8 or len(ext) > 3 or (dot and not ext) or "." in ext:
        return None
    if not all(_is_short_char(ch) for ch in base + ext):
        return None
    if not (_single_case(base) and _single_case(ext)):
        return None
    flags = (s.NT_LOWER_BASE if base != base.upper() else 0) | (
        s.NT_LOWER_EXT if ext != ext.upper() else 0)
    return _pack_short(base.upper(), ext.upper()), flags


def _pack_short(base: str, ext: str) -> bytes:
    return base.ljust(8).encode("ascii") + ext.ljust(3).encode("ascii")


def _basis(name: str) -> tuple[str, str, bool]:
    """fatgen103's basis name: (base, extension, lossy)."""
    stripped = name.replace(" ", "").lstrip(".")
    lossy = stripped != name
    if "." in stripped:
        base_part, ext_part = stripped.rsplit(".", 1)
    else:
        base_part, ext_part = stripped, ""
    if "." in base_part:
        base_part = base_part.replace(".", "")
        lossy = True

    def convert(part: str) -> str:
        nonlocal lossy
        out = []
        for ch in part:
            if _is_short_char(ch):
                out.append(ch.upper())
            else:
                out.append("_")
                lossy = True
        return "".join(out)

    base, ext = convert(base_part), convert(ext_part)
    if len(base) > 8 or len(ext) > 3:
        lossy = True
    base, ext = base[:8], ext[:3]
    if not base:
        base, lossy = "_", True
    return base, ext, lossy


def _assign_short_names(directory: _Node) -> None:
    """Give each child a unique short name, in a fixed order so the output is reproducible:
    exact 8.3 names first, then case-only conversions, then numeric tails in tree order."""
    taken: set[bytes] = set()
    pending: list[_Node] = []
    for child in _sorted_children(directory):
        exact = _exact_short(child.name)
        if exact is None:
            pending.append(child)
            continue
        child.short_name, child.nt_flags = exact
        taken.add(child.short_name)
    tails: list[tuple[_Node, str, str]] = []
    for child in pending:
        child.long_name = True
        base, ext, lossy = _basis(child.name)
        candidate = _pack_short(base, ext)
        if not lossy and candidate not in taken:
            child.short_name = candidate
            taken.add(candidate)
        else:
            tails.append((child, base, ext))
    # Numbers only grow per basis, so thousands of names sharing one ("file0001.txt"...)
    # cost one probe each, not a scan from ~1 every time.
    next_number: dict[tuple[str, str], int] = {}
    for child, base, ext in tails:
        number = next_number.get((base, ext), 1)
        while True:
            tail = f"~{number}"
            if len(tail) > 7:
                raise InvalidInputError(f"{child.name}: no unique short name is left")
            candidate = _pack_short(base[:8 - len(tail)] + tail, ext)
            number += 1
            if candidate not in taken:
                break
        next_number[(base, ext)] = number
        child.short_name = candidate
        taken.add(candidate)


def _lfn_entries(name: str, checksum: int) -> list[bytes]:
    units = name.encode("utf-16-le")
    per = s.LFN_CHARS_PER_ENTRY * 2
    count = -(-len(units) // per)
    if len(units) % per:
        units += b"\x00\x00"
        units += b"\xff" * (count * per - len(units))
    entries = []
    for ordinal in range(count, 0, -1):
        part = units[(ordinal - 1) * per:ordinal * per]
        flag = s.LFN_LAST if ordinal == count else 0
        entries.append(s.LfnEntry.pack(ordinal | flag, part[:10], s.ATTR_LONG_NAME, 0,
                                       checksum, part[10:22], 0, part[22:26]))
    return entries


# ---- times -----------------------------------------------------------------------------------


def dos_datetime(ns: int) -> tuple[int, int, int]:
    """(date, time, 10 ms count) of a time in nanoseconds, clamped to FAT's 1980..2107."""
    seconds, fraction = divmod(ns, _NS)
    if seconds < _DOS_MIN:
        seconds, fraction = _DOS_MIN, 0
    elif seconds > _DOS_MAX:
        seconds, fraction = _DOS_MAX, 0
    t = time.gmtime(seconds)
    date = (t.tm_year - s.DOS_EPOCH_YEAR) << 9 | t.tm_mon << 5 | t.tm_mday
    clock = t.tm_hour << 11 | t.tm_min << 5 | t.tm_sec // 2
    return date, clock, (t.tm_sec % 2) * 100 + fraction // 10_000_000


# ---- the volume ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    total_sectors: int
    sectors_per_cluster: int
    reserved_sectors: int
    fat_sectors: int
    cluster_count: int

    @property
    def cluster_size(self) -> int:
        return self.sectors_per_cluster * SECTOR

    @property
    def data_offset(self) -> int:
        return (self.reserved_sectors + NUM_FATS * self.fat_sectors) * SECTOR

    def cluster_offset(self, cluster: int) -> int:
        return self.data_offset + (cluster - s.FIRST_CLUSTER) * self.cluster_size


def _layout(total_sectors: int, cluster_size: int) -> _Layout:
    """The smallest FAT that maps every cluster, reserved sectors and FATs rounded to whole
    clusters so the data area is cluster-aligned, as mkfs.fat aligns it."""
    spc = cluster_size // SECTOR
    reserved = -(-RESERVED_SECTORS // spc) * spc
    per_sector = SECTOR // 4
    available = max(0, total_sectors - reserved)
    fat = -(-(available // spc + s.FIRST_CLUSTER) // per_sector)
    fat = -(-fat // spc) * spc
    # The first estimate counts the FATs' own sectors as clusters; shrink while it still fits.
    while fat > spc and (fat - spc) * per_sector >= \
            max(0, available - NUM_FATS * (fat - spc)) // spc + s.FIRST_CLUSTER:
        fat -= spc
    clusters = max(0, available - NUM_FATS * fat) // spc
    return _Layout(total_sectors, spc, reserved, fat, clusters)


def _default_cluster_size(size: int) -> int:
    for limit, cluster in _CLUSTER_TABLE:
        if size <= limit:
            return cluster
    return MAX_CLUSTER_SIZE


def _minimum_size(cluster_size: int, clusters: int) -> int:
    """The smallest volume (whole MiB) with ``clusters`` clusters and FAT32's minimum."""
    want = max(clusters, FAT32_MIN_CLUSTERS)
    spc = cluster_size // SECTOR
    sectors = RESERVED_SECTORS + want * spc
    while _layout(sectors, cluster_size).cluster_count < want:
        sectors += max(spc, (want - _layout(sectors, cluster_size).cluster_count) * spc // 2)
    return -(-sectors * SECTOR // MiB) * MiB


class Fat32Image(Disk):
    """A FAT32 volume laid out in memory: ``build_fat32``'s result, read like any disk."""

    format_name = "vfat"

    def __init__(self, layout: _Layout, regions: list[tuple[int, int, object]],
                 chain_ends: array.array[int], last_cluster: int) -> None:
        super().__init__(layout.total_sectors * SECTOR, filename="<fat32>")
        self.layout = layout
        self._regions = [region for region in regions if region[1] > 0]
        self._starts = [start for start, _, _ in self._regions]
        self._chain_ends = chain_ends
        self._last_cluster = last_cluster
        self._lock = threading.Lock()
        self._stream: tuple[_Node, BinaryIO, int] | None = None

    def block_status(self, offset: int, length: int) -> Iterator[Run]:
        index = bisect.bisect_right(self._starts, offset) - 1
        end = offset + length
        while index < len(self._regions):
            start, size, token = self._regions[index]
            if start >= end:
                return
            if token is None:
                yield Run(start, size, BlockState.ZERO)
            else:
                # The run reaching read_run may be clipped: the token keeps the region's start.
                yield Run(start, size, BlockState.DATA, None, (start, token))
            index += 1

    def read_run(self, run: Run, offset: int, n: int) -> bytes:
        region_start, token = run.token
        relative = offset - region_start
        if isinstance(token, bytes):
            data = token[relative:relative + n]
        elif isinstance(token, _FatCopy):
            data = self._fat_bytes(relative, n)
        else:
            assert isinstance(token, _Node)
            data = self._file_bytes(token, relative, n)
        return data + bytes(n - len(data)) if len(data) < n else data

    def _fat_bytes(self, offset: int, n: int) -> bytes:
        first = offset // 4
        last = min(-(-(offset + n) // 4), self._last_cluster + 1)
        if first >= last:
            return b""
        table = array.array("I", range(first + 1, last + 1))
        for index in range(bisect.bisect_left(self._chain_ends, first),
                           bisect.bisect_left(self._chain_ends, last)):
            table[self._chain_ends[index] - first] = s.FAT32_END_OF_CHAIN
        if first == 0:
            table[0] = s.FAT32_ENTRY0_BASE | MEDIA
        if first <= 1 < last:
            table[1 - first] = s.FAT32_END_OF_CHAIN
        if sys.byteorder == "big":
            table.byteswap()
        skip = offset - first * 4
        return table.tobytes()[skip:skip + n]

    def _file_bytes(self, node: _Node, offset: int, n: int) -> bytes:
        size = node.size
        n = min(n, size - offset)
        if n <= 0:
            return b""
        assert node.content is not None
        with self._lock:
            stream = None
            if self._stream is not None and self._stream[0] is node:
                _, stream, position = self._stream
                if position != offset:
                    stream = self._position(node, stream, offset)
            else:
                self._close_stream()
                stream = self._position(node, node.content.open(), offset)
            data = stream.read(n)
            if len(data) < n:
                raise InvalidInputError(
                    f"{node.content.path}: its content ends before its size of {size} bytes "
                    "(did the file change while it was written?)")
            if offset + n == size and stream.read(1):
                raise InvalidInputError(
                    f"{node.content.path}: its content is longer than its size of {size} "
                    "bytes (did the file change while it was written?)")
            self._stream = (node, stream, offset + n)
            return data

    def _position(self, node: _Node, stream: BinaryIO, offset: int) -> BinaryIO:
        """``stream`` at ``offset``: seeked, or reopened and read up to it if it cannot seek."""
        if stream.tell() == offset if stream.seekable() else offset == 0:
            return stream
        if stream.seekable():
            stream.seek(offset)
            return stream
        stream.close()
        assert node.content is not None
        stream = node.content.open()
        left = offset
        while left > 0:
            skipped = len(stream.read(min(left, 1 << 20)))
            if not skipped:
                break
            left -= skipped
        return stream

    def _close_stream(self) -> None:
        if self._stream is not None:
            self._stream[1].close()
            self._stream = None

    def close(self) -> None:
        with self._lock:
            self._close_stream()
        super().close()


class _FatCopy:
    """The token of a FAT's allocated part (its bytes are computed, not stored)."""


def _resolve_tree(tree: Iterable[Entry], skip_unsupported: bool) -> _Node:
    root = _Node("", None, True)
    nodes: dict[str, _Node] = {"": root}
    folded: dict[tuple[int, str], str] = {}
    skipped: set[str] = set()  # left out with skip_unsupported: links to them go too

    def refuse(path: str, why: str) -> None:
        if skip_unsupported:
            return
        raise UnsupportedFeatureError(f"{path}: {why}; FAT cannot hold it",
                                      hint="pass skip_unsupported=on to leave such entries out")

    def place(path: str, entry: Entry | None, is_dir: bool) -> _Node | None:
        parent_path, _, name = path.rpartition("/")
        parent = nodes.get(parent_path)
        if parent is None:
            if not parent_path:
                parent = root
            else:
                parent = place(parent_path, None, True)
                if parent is None:
                    return None
        if not parent.is_dir:
            raise InvalidInputError(f"{path}: its parent {parent_path} is not a directory")
        why = _check_name(name)
        if why is not None:
            refuse(path, f"the name {why}")
            return None
        key = (id(parent), name.casefold())
        other = folded.get(key)
        if other is not None and other != path:
            raise InvalidInputError(
                f"{path} and {other} differ only in case; FAT names ignore case")
        folded[key] = path
        node = _Node(name, entry, is_dir)
        parent.children[name] = node
        nodes[path] = node
        return node

    for entry in tree:
        kind = entry.type
        if kind in (EntryType.WHITEOUT, EntryType.OPAQUE):
            raise InvalidInputError(f"{entry.path}: a {kind.value} belongs in a layer; "
                                    "flatten the layers first")
        if kind in _UNSUPPORTED:
            refuse(entry.path, f"is {_UNSUPPORTED[kind]}")
            continue
        if entry.path == "":
            root.entry = entry
            continue
        existing = nodes.get(entry.path)
        if existing is not None:
            if existing.is_dir and kind is EntryType.DIR and existing.entry is None:
                existing.entry = entry
                continue
            raise InvalidInputError(f"{entry.path}: appears twice in the tree")
        if kind is EntryType.FILE and entry.size > MAX_FILE_SIZE:
            refuse(entry.path, f"is {entry.size} bytes, over FAT32's limit of "
                               f"{MAX_FILE_SIZE} (4 GiB - 1)")
            skipped.add(entry.path)
            continue
        node = place(entry.path, entry, kind is EntryType.DIR)
        if node is None:
            skipped.add(entry.path)
            continue
        if kind is EntryType.FILE:
            node.content = entry
        elif kind is EntryType.HARDLINK:
            node.link_target = entry.link_target

    for path, node in list(nodes.items()):
        target = node
        for _ in range(64):
            if not target.link_target:
                break
            if target.link_target in skipped:
                parent = nodes[path.rpartition("/")[0]]
                del parent.children[node.name], nodes[path]
                break
            found = nodes.get(target.link_target)
            if found is None or found.is_dir:
                raise InvalidInputError(f"{path}: hardlink to {target.link_target}, which is "
                                        "not a file in the tree")
            target = found
        if target.link_target and path in nodes:
            raise InvalidInputError(f"{path}: its hardlinks form a loop")
        node.content = target.content
    return root


def _walk(root: _Node) -> Iterator[_Node]:
    """Every node in tree order: pre-order, children by the bytes of their UTF-8 names."""
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        if node.is_dir:
            stack.extend(sorted(node.children.values(),
                                key=lambda child: child.name.encode("utf-8"), reverse=True))


def _sorted_children(node: _Node) -> list[_Node]:
    return sorted(node.children.values(), key=lambda child: child.name.encode("utf-8"))


def _dir_entry_count(node: _Node, has_label: bool) -> int:
    is_root = node.name == ""
    count = (1 if has_label else 0) if is_root else 2  # the label, or "." and ".."
    for child in node.children.values():
        count += 1
        if child.long_name:
            count += -(-len(child.name.encode("utf-16-le")) // (2 * s.LFN_CHARS_PER_ENTRY))
    return count


def _label_bytes(label: str) -> bytes:
    text = label.upper()
    if len(text) > 11 or not all(_is_short_char(ch) or ch == " " for ch in text):
        extra = "".join(sorted(_SHORT_EXTRA))
        raise InvalidInputError(
            f"label {label!r}: up to 11 characters of A-Z, 0-9, space and {extra}")
    return text.ljust(11).encode("ascii")


def build_fat32(tree: Iterable[Entry], *, size: int | None = None, label: str = "",
                volume_id: int | None = None, cluster_size: int | None = None,
                timestamp: int | None = None, skip_unsupported: bool = False) -> Fat32Image:
    """Lay ``tree`` out as a FAT32 volume and return it as a read-only virtual disk.

    ``size`` in bytes (a multiple of 512; default: content plus headroom), ``label`` up to
    11 characters, ``volume_id`` the 32-bit serial (default: derived from the tree),
    ``cluster_size`` a power of two 512..32768 (default: by volume size, as mkfs.fat),
    ``timestamp`` (ns) the time of the label entry and of directories the tree implies
    without describing (default: the root entry's mtime, else 1980-01-01). File content is
    read from the entries' openers only when the returned disk is read.
    """
    label11 = _label_bytes(label) if label.strip() else b""
    if cluster_size is not None and (cluster_size < SECTOR or cluster_size > MAX_CLUSTER_SIZE
                                     or cluster_size & (cluster_size - 1)):
        raise InvalidInputError(f"cluster size {cluster_size}: a power of two from {SECTOR} to "
                                f"{MAX_CLUSTER_SIZE} bytes")
    if size is not None and (size <= 0 or size % SECTOR):
        raise InvalidInputError(f"size {size}: a positive multiple of {SECTOR} bytes")
    root = _resolve_tree(tree, skip_unsupported)
    if timestamp is None:
        timestamp = root.entry.mtime if root.entry is not None else _DOS_MIN * _NS

    directories: list[_Node] = []
    files: list[_Node] = []
    for node in _walk(root):
        if node.is_dir:
            _assign_short_names(node)
            directories.append(node)
            if _dir_entry_count(node, bool(label11)) > s.MAX_DIR_ENTRIES:
                raise InvalidInputError(
                    f"{node.name or '/'}: more than FAT's {s.MAX_DIR_ENTRIES} directory entries "
                    "(long names take several)")
        elif node.size:
            files.append(node)
    dir_bytes = {id(node): _dir_entry_count(node, bool(label11)) * s.DIR_ENTRY_SIZE
                 for node in directories}

    def clusters_needed(cluster: int) -> int:
        total = sum(max(1, -(-dir_bytes[id(node)] // cluster)) for node in directories)
        return total + sum(-(-node.size // cluster) for node in files)

    layout = _choose_layout(size, cluster_size, clusters_needed)
    cluster = layout.cluster_size

    next_cluster = ROOT_CLUSTER
    chain_ends = array.array("I")
    for node in [*directories, *files]:
        count = max(1, -(-dir_bytes[id(node)] // cluster)) if node.is_dir else \
            -(-node.size // cluster)
        node.first_cluster, node.clusters = next_cluster, count
        next_cluster += count
        chain_ends.append(next_cluster - 1)
    last_cluster = next_cluster - 1

    parents: dict[int, _Node] = {}
    for node in directories:
        for child in node.children.values():
            parents[id(child)] = node
    regions: list[tuple[int, int, object]] = []
    for node in directories:
        data = _directory_bytes(node, parents.get(id(node)), label11, timestamp)
        regions.append((layout.cluster_offset(node.first_cluster), node.clusters * cluster,
                        data))
    for node in files:
        regions.append((layout.cluster_offset(node.first_cluster), node.clusters * cluster,
                        node))

    if volume_id is None:
        volume_id = _derive_volume_id(root, layout, label11, timestamp)
    free = layout.cluster_count - (last_cluster - s.FIRST_CLUSTER + 1)
    head = _reserved_area(layout, volume_id, label11, free,
                          last_cluster + 1 if free else s.FSINFO_UNKNOWN)
    fat_used = (last_cluster + 1) * 4
    layout_regions: list[tuple[int, int, object]] = [(0, len(head), head)]
    fat_token = _FatCopy()
    for copy in range(NUM_FATS):
        start = (layout.reserved_sectors + copy * layout.fat_sectors) * SECTOR
        layout_regions.append((start, fat_used, fat_token))
        layout_regions.append((start + fat_used, layout.fat_sectors * SECTOR - fat_used, None))
    position = layout.data_offset
    for start, length, token in regions:
        layout_regions.append((start, length, token))
        position = start + length
    disk_size = layout.total_sectors * SECTOR
    if position < disk_size:
        layout_regions.append((position, disk_size - position, None))
    return Fat32Image(layout, layout_regions, chain_ends, last_cluster)


def _choose_layout(size: int | None, cluster_size: int | None,
                   clusters_needed: Callable[[int], int]) -> _Layout:
    if size is not None:
        cluster = cluster_size or _default_cluster_size(size)
        layout = _layout(size // SECTOR, cluster)
        needed = clusters_needed(cluster)
        if layout.cluster_count < FAT32_MIN_CLUSTERS or layout.cluster_count < needed:
            least = _minimum_size(cluster, needed)
            raise InvalidInputError(
                f"a FAT32 volume of {size} bytes with {cluster}-byte clusters is too small: "
                f"this tree needs at least {least} bytes ({least // MiB} MiB)",
                hint="give a larger size, or leave it out to size the volume automatically")
        if layout.cluster_count > s.FAT32_MAX_CLUSTERS or layout.total_sectors > 0xFFFFFFFF:
            raise InvalidInputError(f"a FAT32 volume of {size} bytes is too large")
        return layout
    cluster = cluster_size or SECTOR
    for _ in range(8):
        data = clusters_needed(cluster) * cluster
        wanted = data + max(MiB, data // 10)
        volume = _minimum_size(cluster, -(-wanted // cluster))
        if cluster_size is not None or _default_cluster_size(volume) == cluster:
            return _layout(volume // SECTOR, cluster)
        cluster = _default_cluster_size(volume)
    return _layout(volume // SECTOR, cluster)


def _short_entry(name11: bytes, attributes: int, nt_flags: int, entry: Entry | None,
                 fallback_ns: int, cluster: int, size: int) -> bytes:
    mtime = entry.mtime if entry is not None else fallback_ns
    crtime = entry.crtime if entry is not None and entry.crtime is not None else mtime
    atime = entry.atime if entry is not None and entry.atime is not None else mtime
    wrt_date, wrt_time, _ = dos_datetime(mtime)
    crt_date, crt_time, crt_tenth = dos_datetime(crtime)
    acc_date, _, _ = dos_datetime(atime)
    return s.DirEntry.pack(name11, attributes, nt_flags, crt_tenth, crt_time, crt_date,
                           acc_date, cluster >> 16, wrt_time, wrt_date, cluster & 0xFFFF, size)


def _directory_bytes(node: _Node, parent: _Node | None, label11: bytes, timestamp: int
                     ) -> bytes:
    parts: list[bytes] = []
    if parent is None:
        if label11:
            parts.append(_short_entry(label11, s.ATTR_VOLUME_ID, 0, None, timestamp, 0, 0))
    else:
        parts.append(_short_entry(s.DOT_NAME, s.ATTR_DIRECTORY, 0, node.entry, timestamp,
                                  node.first_cluster, 0))
        # ".." of a directory in the root names cluster 0, even on FAT32 (fatgen103).
        up = 0 if parent.name == "" else parent.first_cluster
        parts.append(_short_entry(s.DOTDOT_NAME, s.ATTR_DIRECTORY, 0, node.entry, timestamp,
                                  up, 0))
    for child in _sorted_children(node):
        if child.long_name:
            parts.extend(_lfn_entries(child.name, lfn_checksum(child.short_name)))
        if child.is_dir:
            attributes = s.ATTR_DIRECTORY
        else:
            attributes = s.ATTR_ARCHIVE
            mode = child.entry.mode if child.entry is not None else 0o644
            if not mode & 0o222:
                attributes |= s.ATTR_READ_ONLY
        parts.append(_short_entry(child.short_name, attributes, child.nt_flags, child.entry,
                                  timestamp, child.first_cluster, child.size))
    return b"".join(parts)


def _derive_volume_id(root: _Node, layout: _Layout, label11: bytes, timestamp: int) -> int:
    digest = hashlib.sha256()
    digest.update(repr((layout, label11, timestamp)).encode())
    for node in _walk(root):
        entry = node.entry
        facts = (node.name, node.is_dir, node.size, node.first_cluster,
                 None if entry is None else (entry.mode, entry.mtime, entry.crtime, entry.atime))
        digest.update(repr(facts).encode("utf-8", "surrogateescape"))
    return int.from_bytes(digest.digest()[:4], "little")


def _reserved_area(layout: _Layout, volume_id: int, label11: bytes, free: int,
                   next_free: int) -> bytes:
    bpb = s.Bpb.build({
        "jump": b"\xeb\x58\x90", "oem_name": b"MSWIN4.1", "bytes_per_sector": SECTOR,
        "sectors_per_cluster": layout.sectors_per_cluster,
        "reserved_sectors": layout.reserved_sectors, "num_fats": NUM_FATS, "root_entries": 0,
        "total_sectors_16": 0, "media": MEDIA, "fat_size_16": 0, "sectors_per_track": 63,
        "num_heads": 255, "hidden_sectors": 0, "total_sectors_32": layout.total_sectors,
    })
    ext = s.ExtBpb32.build({
        "fat_size_32": layout.fat_sectors, "ext_flags": 0, "fs_version": 0,
        "root_cluster": ROOT_CLUSTER, "fsinfo_sector": FSINFO_SECTOR,
        "backup_boot_sector": BACKUP_BOOT_SECTOR, "drive_number": 0x80,
        "boot_signature": s.EXTENDED_BOOT_SIGNATURE, "volume_id": volume_id,
        "label": label11 or s.NO_NAME_LABEL, "fs_type": b"FAT32   ",
    })
    boot = bytearray(SECTOR)
    header = bpb + ext
    boot[:len(header)] = header
    boot[s.FAT32_BOOT_CODE_OFFSET:s.FAT32_BOOT_CODE_OFFSET + len(_BOOT_CODE)] = _BOOT_CODE
    boot[s.BOOT_SIGNATURE_OFFSET:s.BOOT_SIGNATURE_OFFSET + 2] = s.BOOT_SIGNATURE
    fsinfo = s.FsInfo.build({"free_count": free, "next_free": next_free})
    area = bytearray(layout.reserved_sectors * SECTOR)
    for base in (0, BACKUP_BOOT_SECTOR * SECTOR):
        area[base:base + SECTOR] = boot
        area[base + FSINFO_SECTOR * SECTOR:base + (FSINFO_SECTOR + 1) * SECTOR] = fsinfo
    return bytes(area)


# ---- the registry's entry point --------------------------------------------------------------


def _parse_volume_id(text: str) -> int:
    digits = text.strip().replace("-", "")
    if digits.lower().startswith("0x"):
        digits = digits[2:]
    try:
        value = int(digits, 16)
    except ValueError:
        raise InvalidInputError(f"volume_id {text!r}: eight hex digits, as ABCD-1234") from None
    if not 0 <= value <= 0xFFFFFFFF:
        raise InvalidInputError(f"volume_id {text!r} does not fit in 32 bits")
    return value


def create(out: AtomicOutput, tree: Iterable[Entry], options: Mapping[str, str],
           progress: ProgressFn) -> None:
    """Write ``tree`` as a FAT32 volume into ``out``, a raw image (free space left sparse)."""
    from imgbridge.formats.disk import raw

    size = parse_size(options["size"]) if options.get("size") else None
    cluster_size = (parse_size(options["cluster_size"], what="cluster_size")
                    if options.get("cluster_size") else None)
    volume_id = _parse_volume_id(options["volume_id"]) if options.get("volume_id") else None
    skip = parse_switch(options, "skip_unsupported", False, format="vfat")
    with build_fat32(tree, size=size, label=options.get("label", ""), volume_id=volume_id,
                     cluster_size=cluster_size, skip_unsupported=skip) as disk:
        raw.create(out, disk, {}, progress)
