"""Write a file tree as an ext4 filesystem, in pure Python, without a temporary file.

``build_ext4`` plans the whole filesystem first — inode numbers, directory blocks (linear,
or a hashed b-tree once a directory outgrows one block), block groups with flex_bg packing and
sparse_super backups, contiguous extents for every file, the journal — and keeps only the
metadata in memory. It returns a read-only virtual ``Disk``: metadata blocks come from memory,
file blocks are read from the entries' streams when that part of the disk is read (in disk
order, so each file is read once, front to back), and free space is reported as zero runs.
Any disk writer (raw, qcow2, ...) can then store it.

The result carries the features mke2fs gives ext4 (has_journal, ext_attr, dir_index,
filetype, extent, 64bit, flex_bg, sparse_super, large_file, huge_file, dir_nlink, extra_isize,
metadata_csum), less resize_inode. Determinism: with the same tree and options the bytes are
the same. The UUID and the directory hash seed, unless given, are a SHA-256 over the options
and every entry's metadata (path, type, mode, owner, times, size, link target, device, xattrs)
— not the file contents, which would cost a read of everything. Every superblock time is
``timestamp``, or else the newest directory mtime in the tree (a directory's mtime follows
the changes made in it, where a file's can be set to anything, even the future), or else the
newest mtime of any entry. Unset atime/ctime/crtime of an entry take its mtime.

Choices worth knowing: the journal is clean and its blocks other than its superblock are
left as holes (jbd2 ignores a clean journal's contents); holes inside files are allocated
and written as zeros (ext4 allows sparse extents, but telling holes apart would need a read);
unused parts of the inode tables read as zeros (bg_flags ITABLE_ZEROED).

References: Linux ``Documentation/filesystems/ext4/`` (super.rst, group_descr.rst,
inodes.rst, ifork.rst, directory.rst, attributes.rst, checksums.rst, journal.rst for the jbd2
superblock); e2fsprogs mke2fs (defaults: journal size by filesystem size, lost+found of 16 KiB,
signed directory hash, inode ratio 16384, 5% reserved blocks).
"""

from __future__ import annotations

import hashlib
import struct
import uuid as uuid_module
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from uuid import UUID

from imgbridge.crc32c import crc32c_raw
from imgbridge.errors import InvalidInputError
from imgbridge.model.tree import Entry, EntryType
from imgbridge.options import parse_size, parse_switch
from imgbridge.output import AtomicOutput
from imgbridge.progress import ProgressFn

from . import _structs as s
from . import _wdir
from ._wdisk import Ext4Disk, Piece
from ._wlayout import (
    DESC_SIZE,
    LOG_GROUPS_PER_FLEX,
    Allocator,
    Geometry,
    OutOfSpace,
    has_super,
    inode_alignment,
    max_inodes_per_group,
)
from ._wxattr import (
    EXTRA_ISIZE,
    INLINE_XATTR_OFFSET,
    XattrItem,
    fits_in_block,
    fits_in_inode,
    pack_block,
    pack_in_inode,
    to_items,
)

__all__ = ["CREATE_OPTIONS", "build_ext4", "create"]

CREATE_OPTIONS = {
    "size": "filesystem size (512M, 2G, bytes); default: the content plus ~20% headroom",
    "label": "volume label, at most 16 bytes",
    "uuid": "filesystem UUID; default: derived from the tree's metadata (reproducible)",
    "hash_seed": "directory hash seed (a UUID); default: derived from the tree's metadata",
    "block_size": "1024, 2048 or 4096 (default 4096)",
    "inode_size": "256, 512 or 1024 bytes (default 256)",
    "journal": "on (default) or off",
    "timestamp": "seconds since the epoch for the superblock times and implied directories; "
    "default: the newest directory mtime of the tree",
    "reserved_percent": "blocks reserved for root, 0-50 percent (default 5, as mke2fs)",
}

_MIB = 1 << 20
_NS = 1_000_000_000
_INODE_RATIO = 16384  # mke2fs: one inode per 16 KiB
_LOST_FOUND_BYTES = 16384  # mke2fs grows lost+found to 16 KiB
_MIN_HEADROOM = 4 * _MIB
_TIME_MIN = -(1 << 31)
_TIME_MAX = 3 * (1 << 32) + (1 << 31) - 1
#: mke2fs numbers lost+found first of the ordinary inodes.
_LOST_FOUND_INO = s.GOOD_OLD_FIRST_INO
#: A target shorter than i_block (its NUL included) is kept in the inode: a fast symlink.
_FAST_SYMLINK_MAX = s.I_BLOCK_SIZE - 1
#: Extents per block of the tree (the 4-byte checksum tail fits in what is left).
_EXTENTS_PER_BLOCK = {bs: (bs - s.EXTENT_HEADER.size) // s.EXTENT_ENTRY_SIZE
                      for bs in (1024, 2048, 4096)}
#: The longest initialised extent (a longer ee_len marks an uninitialised one).
_EXTENT_MAX_LEN = s.EXTENT_INIT_MAX_LEN
_LE16 = struct.Struct("<H")
_LE32 = struct.Struct("<I")
_LE64 = struct.Struct("<Q")
#: A superblock with every field zero, for the builder to fill.
_BLANK_SUPERBLOCK = s.SUPERBLOCK.unpack(bytes(s.SUPERBLOCK_SIZE))

_FILE_TYPES = {
    EntryType.FILE: (s.S_IFREG, s.FT_REG_FILE),
    EntryType.DIR: (s.S_IFDIR, s.FT_DIR),
    EntryType.SYMLINK: (s.S_IFLNK, s.FT_SYMLINK),
    EntryType.CHAR: (s.S_IFCHR, s.FT_CHRDEV),
    EntryType.BLOCK: (s.S_IFBLK, s.FT_BLKDEV),
    EntryType.FIFO: (s.S_IFIFO, s.FT_FIFO),
    EntryType.SOCKET: (s.S_IFSOCK, s.FT_SOCK),
}


# ---------------------------------------------------------------------------------------------
# the tree, as inodes


@dataclass(eq=False)
class _Inode:
    entry: Entry
    ino: int = 0
    links: int = 1
    parent: _Inode | None = None
    children: dict[bytes, _Inode] | None = None
    xattrs: tuple[XattrItem, ...] = ()
    symlink: bytes = b""
    #: Blocks of content: directory blocks, a slow symlink's target, file data.
    content_blocks: int = 0
    dir_blocks: list[bytes] = field(default_factory=list)
    indexed: bool = False  # an htree directory

    @property
    def kind(self) -> EntryType:
        return self.entry.type


@dataclass
class _Tree:
    root: _Inode
    inodes: list[_Inode]  # numbered, in inode order (from 11 on; root apart)
    timestamp: int
    entries_digest: bytes


def _name_bytes(path: str, name: str) -> bytes:
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > s.DIR_NAME_MAX:
        raise InvalidInputError(f"{path}: name is {len(raw)} bytes, ext4 allows {s.DIR_NAME_MAX}")
    return raw


def _default_timestamp(entries: list[Entry]) -> int:
    dirs = [e.mtime for e in entries if e.type is EntryType.DIR]
    pool = dirs or [e.mtime for e in entries]
    # A tree from before 1970 still gets a superblock time the 32-bit fields can hold.
    return max(0, max(pool) // _NS) if pool else 0


def _digest_entries(entries: list[Entry]) -> hashlib._Hash:
    digest = hashlib.sha256(b"imgbridge-ext4-v1\0")
    for e in sorted(entries, key=lambda e: e.path.encode("utf-8", "surrogateescape")):
        fields = (e.path, e.type.value, e.mode, e.uid, e.gid, e.mtime, e.atime, e.ctime,
                  e.crtime, e.size, e.link_target, e.devmajor, e.devminor)
        digest.update(repr(fields).encode("utf-8", "surrogateescape"))
        for name, value in e.xattrs:
            digest.update(name.encode("utf-8", "surrogateescape") + b"\0")
            digest.update(hashlib.sha256(value).digest())
    return digest


def _collect(tree: Iterable[Entry], timestamp: int | None) -> _Tree:
    entries = list(tree)
    by_path: dict[str, Entry] = {}
    for entry in entries:
        if entry.type in (EntryType.WHITEOUT, EntryType.OPAQUE):
            raise InvalidInputError(
                f"{entry.path or '/'}: a {entry.type.value} entry cannot go into a filesystem "
                "(flatten the layers first)")
        if entry.path in by_path:
            raise InvalidInputError(f"{entry.path or '/'}: the tree lists this path twice")
        by_path[entry.path] = entry
    stamp = _default_timestamp(entries) if timestamp is None else timestamp
    digest = _digest_entries(entries)

    def implicit_dir(path: str) -> Entry:
        return Entry(path, EntryType.DIR, mode=0o755, mtime=stamp * _NS)

    root = _Inode(by_path.get("", implicit_dir("")), children={})
    nodes: dict[str, _Inode] = {"": root}

    def directory(path: str) -> _Inode:
        """The directory node at ``path``, creating it and missing parents (0755, root)."""
        missing: list[str] = []
        probe = path
        while probe not in nodes:
            missing.append(probe)
            probe = probe.rpartition("/")[0]
        for new_path in reversed(missing):
            parent = nodes[new_path.rpartition("/")[0]]
            if parent.children is None:
                raise InvalidInputError(
                    f"{parent.entry.path}: is a {parent.kind.value}, yet entries lie below it")
            node = _Inode(implicit_dir(new_path), children={}, parent=parent)
            parent.children[_name_bytes(new_path, new_path.rpartition("/")[2])] = node
            nodes[new_path] = node
        node = nodes[path]
        if node.children is None:
            raise InvalidInputError(f"{path}: is a {node.kind.value}, yet entries lie below it")
        return node

    ordered = sorted((e for e in entries if e.path), key=lambda e: e.path.split("/"))
    links: list[Entry] = []
    for entry in ordered:
        if entry.type is EntryType.HARDLINK:
            links.append(entry)
            continue
        parent = directory(entry.parent)
        name = _name_bytes(entry.path, entry.name)
        existing = nodes.get(entry.path)
        if existing is not None:  # an implied directory described later than its children
            if entry.type is not EntryType.DIR:
                raise InvalidInputError(f"{entry.path}: is a {entry.type.value}, "
                                        "yet entries lie below it")
            existing.entry = entry
            continue
        node = _Inode(entry, parent=parent,
                      children={} if entry.type is EntryType.DIR else None)
        assert parent.children is not None
        parent.children[name] = node
        nodes[entry.path] = node
    for link in links:
        target = _resolve_link(link, by_path)
        node = nodes[target.path]
        if node.children is not None:
            raise InvalidInputError(f"hardlink {link.path} points to a directory")
        parent = directory(link.parent)
        assert parent.children is not None
        parent.children[_name_bytes(link.path, link.name)] = node
        node.links += 1
        if node.links > s.LINK_MAX:
            raise InvalidInputError(f"{target.path}: more than {s.LINK_MAX} hardlinks")

    inodes = _number(root)
    return _Tree(root, inodes, stamp, digest.digest())


def _resolve_link(link: Entry, by_path: dict[str, Entry]) -> Entry:
    seen = {link.path}
    target = by_path.get(link.link_target)
    while target is not None and target.type is EntryType.HARDLINK:
        if target.path in seen:
            raise InvalidInputError(f"hardlink {link.path} loops")
        seen.add(target.path)
        target = by_path.get(target.link_target)
    if target is None:
        raise InvalidInputError(
            f"hardlink {link.path} points to {link.link_target}, which is not in the tree")
    return target


def _number(root: _Inode) -> list[_Inode]:
    """Inode numbers in pre-order (sorted names): root 2, lost+found 11, the rest from 12."""
    assert root.children is not None
    root.ino = s.ROOT_INO
    lost = root.children.get(b"lost+found")
    if lost is None:
        lost = _Inode(Entry("lost+found", EntryType.DIR, mode=0o700, mtime=root.entry.mtime),
                      parent=root, children={})
        root.children[b"lost+found"] = lost
    out: list[_Inode] = []
    next_ino = _LOST_FOUND_INO
    if lost.children is not None:
        lost.ino = _LOST_FOUND_INO
        out.append(lost)
        next_ino += 1
    stack = [root]
    while stack:
        node = stack.pop()
        assert node.children is not None
        for child in node.children.values():
            if child.ino == 0:
                child.ino = next_ino
                next_ino += 1
                out.append(child)
        stack.extend(child for _, child in sorted(node.children.items(), reverse=True)
                     if child.children is not None and child.parent is node)
    out.sort(key=lambda n: n.ino)
    return out


# ---------------------------------------------------------------------------------------------
# checksums and packing helpers


class _Csum:
    """metadata_csum seeds: crc32c of the UUID, then per inode of its number and generation."""

    def __init__(self, fs_uuid: bytes) -> None:
        self.seed = crc32c_raw(0xFFFFFFFF, fs_uuid)

    def inode_seed(self, ino: int) -> int:
        return crc32c_raw(crc32c_raw(self.seed, struct.pack("<I", ino)), bytes(4))


def _encode_time(path: str, ns: int) -> tuple[int, int]:
    """(seconds field, extra field) with the epoch bits, as the kernel encodes them."""
    sec, nsec = divmod(ns, _NS)
    if not _TIME_MIN <= sec <= _TIME_MAX:
        raise InvalidInputError(f"{path or '/'}: time {sec} s is outside ext4's range "
                                "(1901-12-13 to 2446-05-10)")
    # The seconds field is signed (before 1970 negative); the epoch bits add what it lacks.
    low = sec & 0xFFFFFFFF
    signed_low = low - (1 << 32) if low >= 1 << 31 else low
    epoch = (sec - signed_low) >> 32
    return signed_low, epoch | (nsec << s.EXTRA_EPOCH_BITS)


def _split_extents(runs: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(logical, physical, length) extents of at most 32768 blocks."""
    out: list[tuple[int, int, int]] = []
    logical = 0
    for start, length in runs:
        while length:
            take = min(length, _EXTENT_MAX_LEN)
            out.append((logical, start, take))
            logical, start, length = logical + take, start + take, length - take
    return out


def _tree_levels(count: int, per_block: int) -> list[int]:
    """Blocks per level of an extent tree over ``count`` extents (leaves first)."""
    levels: list[int] = []
    while count > s.EXTENT_ROOT_ENTRIES:
        count = -(-count // per_block)
        levels.append(count)
    return levels


def _extent_block(entries: bytes, count: int, per_block: int, depth: int, block_size: int,
                  checksum_seed: int) -> bytes:
    block = bytearray(block_size)
    s.EXTENT_HEADER.pack_into(block, 0, s.ExtentHeader(s.EXTENT_MAGIC, count, per_block,
                                                      depth, 0))
    first = s.EXTENT_HEADER.size
    block[first : first + len(entries)] = entries
    tail = first + per_block * s.EXTENT_ENTRY_SIZE
    _LE32.pack_into(block, tail, crc32c_raw(checksum_seed, bytes(block[:tail])))
    return bytes(block)


def _build_extent_tree(extents: list[tuple[int, int, int]], tree_blocks: list[int],
                       block_size: int, checksum_seed: int) -> tuple[bytes, list[Piece]]:
    """i_block (60 bytes) and the tree's blocks, placed at ``tree_blocks``."""
    per_block = _EXTENTS_PER_BLOCK[block_size]
    level: list[tuple[int, bytes]] = [
        (lb, s.EXTENT_LEAF.pack(s.ExtentLeaf(lb, length, pb >> 32, pb & 0xFFFFFFFF)))
        for lb, pb, length in extents
    ]
    pieces: list[Piece] = []
    depth = 0
    free_blocks = iter(tree_blocks)
    while len(level) > s.EXTENT_ROOT_ENTRIES:
        upper: list[tuple[int, bytes]] = []
        for i in range(0, len(level), per_block):
            chunk = level[i : i + per_block]
            where = next(free_blocks)
            body = b"".join(e for _, e in chunk)
            data = _extent_block(body, len(chunk), per_block, depth, block_size, checksum_seed)
            pieces.append(Piece(where * block_size, block_size, data))
            upper.append((chunk[0][0], s.EXTENT_INDEX.pack(s.ExtentIndex(
                chunk[0][0], where & 0xFFFFFFFF, where >> 32, 0))))
        level = upper
        depth += 1
    i_block = s.EXTENT_HEADER.pack(s.ExtentHeader(s.EXTENT_MAGIC, len(level),
                                                  s.EXTENT_ROOT_ENTRIES, depth, 0))
    i_block += b"".join(e for _, e in level)
    return i_block.ljust(s.I_BLOCK_SIZE, b"\0"), pieces


def _set_bits(bitmap: bytearray, start: int, end: int) -> None:
    if start >= end:
        return
    first_full = (start + 7) // 8
    last_full = end // 8
    if first_full <= last_full:
        for bit in range(start, min(end, first_full * 8)):
            bitmap[bit >> 3] |= 1 << (bit & 7)
        bitmap[first_full:last_full] = b"\xff" * (last_full - first_full)
        for bit in range(max(start, last_full * 8), end):
            bitmap[bit >> 3] |= 1 << (bit & 7)
    else:
        for bit in range(start, end):
            bitmap[bit >> 3] |= 1 << (bit & 7)


def _count_bits(bitmap: bytes | bytearray, nbits: int) -> int:
    full = int.from_bytes(bitmap[: (nbits + 7) // 8], "little")
    return (full & ((1 << nbits) - 1)).bit_count()


def _journal_blocks(blocks_count: int) -> int:
    """mke2fs's default journal size for a filesystem of ``blocks_count`` blocks."""
    table = ((32768, 1024), (256 * 1024, 4096), (512 * 1024, 8192), (4096 * 1024, 16384),
             (8192 * 1024, 32768), (16384 * 1024, 65536), (32768 * 1024, 131072))
    for limit, size in table:
        if blocks_count < limit:
            return size
    return 262144


# ---------------------------------------------------------------------------------------------
# the plan


@dataclass
class _Options:
    size: int | None
    label: bytes
    fs_uuid: bytes
    hash_seed: bytes
    block_size: int
    inode_size: int
    journal: bool
    timestamp: int
    reserved_percent: int


@dataclass
class _Allocation:
    geometry: Geometry
    journal_runs: list[tuple[int, int]]
    content_runs: dict[int, list[tuple[int, int]]]
    tree_runs: dict[int, list[int]]
    xattr_blocks: dict[tuple[XattrItem, ...], int]
    used: list[tuple[int, int]]


class _Planner:
    def __init__(self, tree: _Tree, opts: _Options) -> None:
        self.tree = tree
        self.opts = opts
        self.csum = _Csum(opts.fs_uuid)
        self.bs = opts.block_size
        self.max_ino = max((n.ino for n in tree.inodes), default=_LOST_FOUND_INO)
        self.xattr_sets: dict[tuple[XattrItem, ...], int] = {}
        self._prepare()

    def all_inodes(self) -> list[_Inode]:
        return [self.tree.root, *self.tree.inodes]

    def _prepare(self) -> None:
        bs = self.bs
        for node in self.all_inodes():
            entry = node.entry
            node.xattrs = to_items(entry.path or "/", entry.xattrs)
            if node.xattrs and not fits_in_inode(node.xattrs, self.opts.inode_size):
                if not fits_in_block(node.xattrs, bs):
                    raise InvalidInputError(
                        f"{entry.path or '/'}: its xattrs need more room than one "
                        f"{bs}-byte block (ext4 without ea_inode keeps them in one block)")
                self.xattr_sets[node.xattrs] = self.xattr_sets.get(node.xattrs, 0) + 1
            if node.children is not None:
                self._prepare_dir(node)
            elif node.kind is EntryType.FILE:
                if entry.size >= (1 << 32) * bs:
                    raise InvalidInputError(f"{entry.path}: {entry.size} bytes is more than "
                                            f"ext4 holds in one file with {bs}-byte blocks")
                node.content_blocks = -(-entry.size // bs)
            elif node.kind is EntryType.SYMLINK:
                node.symlink = entry.link_target.encode("utf-8", "surrogateescape")
                if not node.symlink or len(node.symlink) >= bs:
                    raise InvalidInputError(
                        f"{entry.path}: a symlink target of {len(node.symlink)} bytes "
                        f"(ext4 holds 1 to {bs - 1})")
                if len(node.symlink) > _FAST_SYMLINK_MAX:
                    node.content_blocks = 1
            elif node.kind in (EntryType.CHAR, EntryType.BLOCK) and (
                    entry.devmajor >= 1 << 12 or entry.devminor >= 1 << 20):
                raise InvalidInputError(
                    f"{entry.path}: device {entry.devmajor}:{entry.devminor} is out of range")
            for ns in (entry.mtime, entry.atime, entry.ctime, entry.crtime):
                if ns is not None:
                    _encode_time(entry.path, ns)
            if not (0 <= entry.uid < 1 << 32 and 0 <= entry.gid < 1 << 32):
                raise InvalidInputError(f"{entry.path or '/'}: owner {entry.uid}:{entry.gid} "
                                        "does not fit in 32 bits")

    def _prepare_dir(self, node: _Inode) -> None:
        assert node.children is not None
        items = [_wdir.DirItem(name, child.ino, _FILE_TYPES[child.kind][1])
                 for name, child in sorted(node.children.items())]
        parent = node.parent.ino if node.parent is not None else node.ino
        seed = self.csum.inode_seed(node.ino)

        def checksum(data: bytes) -> int:
            return crc32c_raw(seed, data)

        bs = self.bs
        if _wdir.linear_size(items, bs) == 1:
            blocks = _wdir.linear_blocks(items, bs, node.ino, parent, checksum)
        else:
            blocks = _wdir.htree_blocks(items, bs, node.ino, parent, self.opts.hash_seed,
                                        checksum)
            node.indexed = True
        if node.ino == _LOST_FOUND_INO and not node.indexed:
            # Only a linear lost+found takes spare blocks: an htree must index each block.
            while len(blocks) * bs < _LOST_FOUND_BYTES:
                blocks.append(_wdir.empty_block(bs, checksum))
        node.dir_blocks = blocks
        node.content_blocks = len(blocks)

    # ---- sizing --------------------------------------------------------------------------

    def content_total(self) -> int:
        per_block = _EXTENTS_PER_BLOCK[self.bs]
        total = len(self.xattr_sets)
        for node in self.all_inodes():
            total += node.content_blocks
            extents = -(-node.content_blocks // _EXTENT_MAX_LEN)
            total += sum(_tree_levels(extents, per_block))
        return total

    def _inodes_per_group(self, blocks: int, spare: bool) -> int | None:
        geo = Geometry(self.bs, blocks, 0, self.opts.inode_size)
        groups = geo.groups
        need = self.max_ino
        want = max(need + (need // 5 + 16 if spare else 0), blocks * self.bs // _INODE_RATIO)
        align = inode_alignment(self.bs, self.opts.inode_size)
        cap = max_inodes_per_group(self.bs, self.opts.inode_size)
        ipg = min(cap, max(16, -(-want // groups)))
        ipg = -(-ipg // align) * align
        ipg = min(ipg, cap)
        if ipg * groups < need or ipg * groups >= 1 << 32:
            return None
        return ipg

    def fit(self, headroom_fraction: float) -> _Allocation:
        """The smallest plan with the given headroom (automatic size)."""
        bs = self.bs
        content = self.content_total()
        headroom = 0
        if headroom_fraction:
            headroom = max(int(content * headroom_fraction), _MIN_HEADROOM // bs)
        step = _MIB // bs
        blocks = max(content + headroom, 2048 if self.opts.journal else 64)
        cap = max_inodes_per_group(bs, self.opts.inode_size)
        for _ in range(100):
            blocks = -(-blocks // step) * step
            ipg = self._inodes_per_group(blocks, spare=bool(headroom_fraction))
            if ipg is None:
                groups = -(-self.max_ino // cap)
                blocks = max(blocks + step, groups * 8 * bs)
                continue
            geo = Geometry(bs, blocks, ipg, self.opts.inode_size)
            try:
                geo.plan()
            except OutOfSpace as short:
                blocks += short.short_by
                continue
            journal = _journal_blocks(blocks) if self.opts.journal else 0
            need = geo.metadata_blocks() + journal + content + headroom
            if need > blocks:
                blocks = need
                continue
            try:
                return self.allocate(geo, journal)
            except OutOfSpace as short:
                blocks += short.short_by + step
        raise InvalidInputError("ext4 writer: could not find a size that fits the tree")

    def at_size(self, size: int) -> _Allocation:
        try:
            return self._at_size(size)
        except OutOfSpace:
            needed = self.fit(0.0).geometry.blocks_count * self.bs
            raise InvalidInputError(
                f"ext4: the tree does not fit in {size} bytes; it needs at least {needed} "
                f"bytes ({-(-needed // _MIB)} MiB)"
                + (" with a journal (journal=off saves some)" if self.opts.journal else ""),
            ) from None

    def _at_size(self, size: int) -> _Allocation:
        bs = self.bs
        blocks = size // bs
        if blocks < (2048 if self.opts.journal else 64):  # mke2fs refuses a journal below
            raise OutOfSpace(0)
        geo = Geometry(bs, blocks, 0, self.opts.inode_size)
        last = geo.groups - 1
        if last > 0 and blocks - geo.group_start(last) < geo.super_blocks(last) + 64:
            blocks = geo.group_start(last)  # mke2fs too drops a last group too short to use
        ipg = self._inodes_per_group(blocks, spare=False)
        if ipg is None:
            raise OutOfSpace(0)
        geo = Geometry(bs, blocks, ipg, self.opts.inode_size)
        geo.plan()
        return self.allocate(geo, _journal_blocks(blocks) if self.opts.journal else 0)

    def allocate(self, geo: Geometry, journal_blocks: int) -> _Allocation:
        alloc = Allocator(geo.free_ranges())
        per_block = _EXTENTS_PER_BLOCK[self.bs]
        journal_runs = alloc.allocate(journal_blocks) if journal_blocks else []
        content: dict[int, list[tuple[int, int]]] = {}
        trees: dict[int, list[int]] = {}
        xattr_blocks: dict[tuple[XattrItem, ...], int] = {}
        if journal_runs:
            nblocks = sum(_tree_levels(len(_split_extents(journal_runs)), per_block))
            trees[s.JOURNAL_INO] = _flatten(alloc.allocate(nblocks))
        for node in self.all_inodes():
            if node.content_blocks:
                runs = alloc.allocate(node.content_blocks)
                content[node.ino] = runs
                if node.kind is not EntryType.SYMLINK:
                    levels = _tree_levels(len(_split_extents(runs)), per_block)
                    if levels:
                        trees[node.ino] = _flatten(alloc.allocate(sum(levels)))
            if node.xattrs in self.xattr_sets and node.xattrs not in xattr_blocks:
                xattr_blocks[node.xattrs] = alloc.allocate(1)[0][0]
        used = list(geo.meta_ranges) + list(journal_runs)
        for runs in content.values():
            used.extend(runs)
        for blocks in trees.values():
            used.extend((b, 1) for b in blocks)
        used.extend((b, 1) for b in xattr_blocks.values())
        return _Allocation(geo, journal_runs, content, trees, xattr_blocks, used)


def _flatten(runs: list[tuple[int, int]]) -> list[int]:
    return [start + i for start, length in runs for i in range(length)]


# ---------------------------------------------------------------------------------------------
# turning the plan into bytes


class _Builder:
    def __init__(self, planner: _Planner, plan: _Allocation) -> None:
        self.p = planner
        self.plan = plan
        self.geo = plan.geometry
        self.bs = planner.bs
        self.opts = planner.opts
        self.csum = planner.csum
        self.pieces: list[Piece] = []
        self.inodes: dict[int, bytes] = {}
        self.journal_i_block = b""
        self.free_blocks = 0
        self.free_inodes = 0

    def build(self) -> Ext4Disk:
        self._journal()
        for node in self.p.all_inodes():
            self._inode(node)
        for items, block in self.plan.xattr_blocks.items():
            data = pack_block(items, self.bs, self.p.xattr_sets[items])
            checksum = crc32c_raw(self.csum.seed, _LE64.pack(block) + bytes(data))
            _LE32.pack_into(data, s.XATTR_HEADER_CHECKSUM_OFFSET, checksum)
            self.pieces.append(Piece(block * self.bs, self.bs, bytes(data)))
        self._groups_and_supers()
        size = self.opts.size if self.opts.size is not None else self.geo.blocks_count * self.bs
        info = {"blocks": self.geo.blocks_count, "block-size": self.bs,
                "inodes": self.geo.inodes_count, "groups": self.geo.groups,
                "uuid": str(UUID(bytes=self.opts.fs_uuid)),
                "free-blocks": self.free_blocks, "free-inodes": self.free_inodes}
        return Ext4Disk(size, self.pieces, info)

    # ---- inodes ----------------------------------------------------------------------------

    def _journal(self) -> None:
        runs = self.plan.journal_runs
        if not runs:
            return
        nblocks = sum(length for _, length in runs)
        seed = self.csum.inode_seed(s.JOURNAL_INO)
        i_block, tree = _build_extent_tree(_split_extents(runs),
                                           self.plan.tree_runs.get(s.JOURNAL_INO, []),
                                           self.bs, seed)
        self.pieces.extend(tree)
        # A clean, empty journal (s_start 0): the first transaction will be sequence 1.
        jsb = s.JOURNAL_SUPERBLOCK.pack(s.JournalSuperblock(
            h_magic=s.JBD2_MAGIC, h_blocktype=s.JBD2_SUPERBLOCK_V2, h_sequence=0,
            s_blocksize=self.bs, s_maxlen=nblocks, s_first=1, s_sequence=1, s_start=0,
            s_errno=0, s_feature_compat=0, s_feature_incompat=0, s_feature_ro_compat=0,
            s_uuid=self.opts.fs_uuid, s_nr_users=1, s_dynsuper=0, s_max_transaction=0,
            s_max_trans_data=0, s_checksum_type=0, s_padding2=b"", s_num_fc_blks=0, s_head=0,
            s_padding=b"", s_checksum=0, s_users=b""))
        self.pieces.append(Piece(runs[0][0] * self.bs, self.bs, jsb.ljust(self.bs, b"\0")))
        stamp = self.opts.timestamp * _NS
        entry = Entry("<journal>", EntryType.FILE, mode=0o600, mtime=stamp)
        self.journal_i_block = i_block
        self.inodes[s.JOURNAL_INO] = self._pack(
            s.JOURNAL_INO, entry, s.S_IFREG, 1, nblocks * self.bs,
            (nblocks + len(tree)) * (self.bs // 512), s.EXTENTS_FL, i_block, 0, b"")

    def _inode(self, node: _Inode) -> None:
        entry = node.entry
        bs = self.bs
        ino = node.ino
        mode_type = _FILE_TYPES[node.kind][0]
        flags = 0
        size = 0
        blocks = 0
        i_block = bytes(s.I_BLOCK_SIZE)
        runs = self.plan.content_runs.get(ino, [])
        if node.children is not None:
            links = 2 + sum(1 for c in node.children.values()
                            if c.children is not None and c.parent is node)
            if links > s.LINK_MAX:
                links = 1  # dir_nlink: "more than the counter holds"
            size = len(node.dir_blocks) * bs
            for (start, length), offset in zip(runs, _offsets(runs), strict=True):
                data = b"".join(node.dir_blocks[offset : offset + length])
                self.pieces.append(Piece(start * bs, length * bs, data))
            if node.indexed:
                flags |= s.INDEX_FL
        else:
            links = node.links
        if node.kind is EntryType.FILE:
            size = entry.size
            for (start, length), offset in zip(runs, _offsets(runs), strict=True):
                self.pieces.append(Piece(start * bs, length * bs, entry=entry,
                                         file_offset=offset * bs))
        elif node.kind is EntryType.SYMLINK:
            size = len(node.symlink)
            if runs:
                start = runs[0][0]
                self.pieces.append(Piece(start * bs, bs, node.symlink.ljust(bs, b"\0")))
            else:
                i_block = node.symlink.ljust(s.I_BLOCK_SIZE, b"\0")
        elif node.kind in (EntryType.CHAR, EntryType.BLOCK):
            major, minor = entry.devmajor, entry.devminor
            if major < 256 and minor < 256:
                i_block = struct.pack("<II", (major << 8) | minor, 0)
            else:
                encoded = (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)
                i_block = struct.pack("<III", 0, encoded, 0)
            i_block = i_block.ljust(s.I_BLOCK_SIZE, b"\0")
        if node.kind in (EntryType.FILE, EntryType.DIR) or (
                node.kind is EntryType.SYMLINK and runs):
            flags |= s.EXTENTS_FL
            tree_blocks = self.plan.tree_runs.get(ino, [])
            i_block, tree = _build_extent_tree(_split_extents(runs), tree_blocks, bs,
                                               self.csum.inode_seed(ino))
            self.pieces.extend(tree)
            blocks = sum(length for _, length in runs) + len(tree_blocks)
        xattr_block = 0
        inline = b""
        if node.xattrs:
            if node.xattrs in self.plan.xattr_blocks:
                xattr_block = self.plan.xattr_blocks[node.xattrs]
                blocks += 1
            else:
                inline = pack_in_inode(node.xattrs, self.opts.inode_size)
        self.inodes[ino] = self._pack(ino, entry, mode_type, links, size,
                                      blocks * (bs // 512), flags, i_block, xattr_block, inline)

    def _pack(self, ino: int, entry: Entry, mode_type: int, links: int, size: int,
              sectors: int, flags: int, i_block: bytes, xattr_block: int,
              inline: bytes) -> bytes:
        path = entry.path
        mtime = _encode_time(path, entry.mtime)
        atime = _encode_time(path, entry.mtime if entry.atime is None else entry.atime)
        ctime = _encode_time(path, entry.mtime if entry.ctime is None else entry.ctime)
        crtime = _encode_time(path, entry.mtime if entry.crtime is None else entry.crtime)
        raw = bytearray(self.opts.inode_size)
        s.INODE.pack_into(raw, 0, s.Inode(
            i_mode=mode_type | entry.mode, i_uid=entry.uid & 0xFFFF, i_size_lo=size & 0xFFFFFFFF,
            i_atime=atime[0], i_ctime=ctime[0], i_mtime=mtime[0], i_dtime=0,
            i_gid=entry.gid & 0xFFFF, i_links_count=links, i_blocks_lo=sectors & 0xFFFFFFFF,
            i_flags=flags, l_i_version=0, i_block=i_block, i_generation=0,
            i_file_acl_lo=xattr_block & 0xFFFFFFFF, i_size_high=size >> 32, i_obso_faddr=0,
            l_i_blocks_high=(sectors >> 32) & 0xFFFF, l_i_file_acl_high=xattr_block >> 32,
            l_i_uid_high=entry.uid >> 16, l_i_gid_high=entry.gid >> 16, l_i_checksum_lo=0,
            l_i_reserved=0))
        s.INODE_EXTRA.pack_into(raw, s.GOOD_OLD_INODE_SIZE, s.InodeExtra(
            i_extra_isize=EXTRA_ISIZE, i_checksum_hi=0, i_ctime_extra=ctime[1],
            i_mtime_extra=mtime[1], i_atime_extra=atime[1], i_crtime=crtime[0],
            i_crtime_extra=crtime[1], i_version_hi=0, i_projid=0))
        if inline:
            raw[INLINE_XATTR_OFFSET :] = inline
        checksum = crc32c_raw(self.csum.inode_seed(ino), raw)
        _LE16.pack_into(raw, s.INODE_CHECKSUM_LO_OFFSET, checksum & 0xFFFF)
        _LE16.pack_into(raw, s.INODE_CHECKSUM_HI_OFFSET, checksum >> 16)
        return bytes(raw)

    # ---- groups, bitmaps, superblocks ----------------------------------------------------

    def _groups_and_supers(self) -> None:
        geo = self.geo
        bs = self.bs
        ipg = geo.inodes_per_group
        bpg = geo.blocks_per_group
        used = sorted(self.plan.used)
        descs = bytearray()
        self.free_blocks = 0
        self.free_inodes = 0
        used_index = 0
        dirs_per_group = [0] * geo.groups
        for node in self.p.all_inodes():
            if node.children is not None:
                dirs_per_group[(node.ino - 1) // ipg] += 1
        for group in range(geo.groups):
            gstart = geo.group_start(group)
            gend = geo.group_end(group)
            block_bitmap = bytearray(bs)
            _set_bits(block_bitmap, gend - gstart, bpg)  # past the end of the filesystem
            while used_index < len(used) and used[used_index][0] + used[used_index][1] <= gstart:
                used_index += 1
            k = used_index
            while k < len(used) and used[k][0] < gend:
                start, length = used[k]
                _set_bits(block_bitmap, max(start, gstart) - gstart,
                          min(start + length, gend) - gstart)
                k += 1
            free_blocks = (gend - gstart) - _count_bits(block_bitmap, gend - gstart)
            first_ino = group * ipg + 1
            in_use = max(0, min(ipg, self.p.max_ino - first_ino + 1))
            inode_bitmap = bytearray(bs)
            _set_bits(inode_bitmap, 0, in_use)
            _set_bits(inode_bitmap, ipg, 8 * bs)
            meta = geo.groups_meta[group]
            self.pieces.append(Piece(meta.block_bitmap * bs, bs, bytes(block_bitmap)))
            self.pieces.append(Piece(meta.inode_bitmap * bs, bs, bytes(inode_bitmap)))
            if in_use:
                table = b"".join(self.inodes.get(first_ino + i, bytes(self.opts.inode_size))
                                 for i in range(in_use))
                length = -(-len(table) // bs) * bs
                self.pieces.append(Piece(meta.inode_table * bs, length, table.ljust(length,
                                                                                    b"\0")))
            bb_csum = crc32c_raw(self.csum.seed, bytes(block_bitmap[: bpg // 8]))
            ib_csum = crc32c_raw(self.csum.seed, bytes(inode_bitmap[: ipg // 8]))
            free_inodes = ipg - in_use
            dirs = dirs_per_group[group]
            unused = ipg - in_use
            desc = bytearray(DESC_SIZE)
            s.GROUP_DESC.pack_into(desc, 0, s.GroupDesc(
                bg_block_bitmap_lo=meta.block_bitmap & 0xFFFFFFFF,
                bg_inode_bitmap_lo=meta.inode_bitmap & 0xFFFFFFFF,
                bg_inode_table_lo=meta.inode_table & 0xFFFFFFFF,
                bg_free_blocks_count_lo=free_blocks & 0xFFFF,
                bg_free_inodes_count_lo=free_inodes & 0xFFFF,
                bg_used_dirs_count_lo=dirs & 0xFFFF, bg_flags=s.BG_INODE_ZEROED,
                bg_exclude_bitmap_lo=0, bg_block_bitmap_csum_lo=bb_csum & 0xFFFF,
                bg_inode_bitmap_csum_lo=ib_csum & 0xFFFF, bg_itable_unused_lo=unused & 0xFFFF,
                bg_checksum=0))
            s.GROUP_DESC_HIGH.pack_into(desc, s.GROUP_DESC_SIZE, s.GroupDescHigh(
                bg_block_bitmap_hi=meta.block_bitmap >> 32,
                bg_inode_bitmap_hi=meta.inode_bitmap >> 32,
                bg_inode_table_hi=meta.inode_table >> 32,
                bg_free_blocks_count_hi=free_blocks >> 16,
                bg_free_inodes_count_hi=free_inodes >> 16, bg_used_dirs_count_hi=dirs >> 16,
                bg_itable_unused_hi=unused >> 16, bg_exclude_bitmap_hi=0,
                bg_block_bitmap_csum_hi=bb_csum >> 16, bg_inode_bitmap_csum_hi=ib_csum >> 16,
                bg_reserved=0))
            checksum = crc32c_raw(self.csum.seed, _LE32.pack(group) + bytes(desc))
            _LE16.pack_into(desc, s.GROUP_DESC_CHECKSUM_OFFSET, checksum & 0xFFFF)
            descs += desc
            self.free_blocks += free_blocks
            self.free_inodes += free_inodes
        gdt = bytes(descs).ljust(geo.gdt_blocks * bs, b"\0")
        for group in range(geo.groups):
            if not has_super(group):
                continue
            sb = self._superblock(group)
            start = geo.group_start(group)
            if group == 0 and bs > s.SUPERBLOCK_OFFSET:
                # Block 0 holds the boot sector's 1 KiB of zeros, then the superblock.
                block0 = bytes(s.SUPERBLOCK_OFFSET) + sb
                self.pieces.append(Piece(0, bs, block0.ljust(bs, b"\0")))
            else:
                self.pieces.append(Piece(start * bs, bs, sb.ljust(bs, b"\0")))
            self.pieces.append(Piece((start + 1) * bs, len(gdt), gdt))

    def _superblock(self, group: int) -> bytes:
        geo = self.geo
        opts = self.opts
        stamp = opts.timestamp
        r_blocks = geo.blocks_count * opts.reserved_percent // 100
        log = (self.bs // 1024).bit_length() - 1
        compat = s.COMPAT_EXT_ATTR | s.COMPAT_DIR_INDEX
        jnl_blocks = bytes(len(_BLANK_SUPERBLOCK.s_jnl_blocks))
        if opts.journal:
            compat |= s.COMPAT_HAS_JOURNAL
            jsize = sum(length for _, length in self.plan.journal_runs) * self.bs
            # A copy of the journal inode's i_block, then its i_size_high and i_size.
            jnl_blocks = self.journal_i_block + struct.pack("<II", jsize >> 32,
                                                            jsize & 0xFFFFFFFF)
        low_stamp = stamp & 0xFFFFFFFF
        high_stamp = (stamp >> 32) & 0xFF
        sb = _BLANK_SUPERBLOCK._replace(
            s_inodes_count=geo.inodes_count,
            s_blocks_count_lo=geo.blocks_count & 0xFFFFFFFF,
            s_r_blocks_count_lo=r_blocks & 0xFFFFFFFF,
            s_free_blocks_count_lo=self.free_blocks & 0xFFFFFFFF,
            s_free_inodes_count=self.free_inodes,
            s_first_data_block=geo.first_data_block,
            s_log_block_size=log,
            s_log_cluster_size=log,
            s_blocks_per_group=geo.blocks_per_group,
            s_clusters_per_group=geo.blocks_per_group,
            s_inodes_per_group=geo.inodes_per_group,
            s_wtime=low_stamp,
            s_max_mnt_count=-1,  # no mount-count check
            s_magic=s.MAGIC,
            s_state=s.STATE_VALID,
            s_errors=s.ERRORS_CONTINUE,
            s_lastcheck=low_stamp,
            s_rev_level=s.DYNAMIC_REV,
            s_first_ino=s.GOOD_OLD_FIRST_INO,
            s_inode_size=opts.inode_size,
            s_block_group_nr=group,
            s_feature_compat=compat,
            s_feature_incompat=(s.INCOMPAT_FILETYPE | s.INCOMPAT_EXTENTS | s.INCOMPAT_64BIT
                                | s.INCOMPAT_FLEX_BG),
            s_feature_ro_compat=(s.RO_COMPAT_SPARSE_SUPER | s.RO_COMPAT_LARGE_FILE
                                 | s.RO_COMPAT_HUGE_FILE | s.RO_COMPAT_DIR_NLINK
                                 | s.RO_COMPAT_EXTRA_ISIZE | s.RO_COMPAT_METADATA_CSUM),
            s_uuid=opts.fs_uuid,
            s_volume_name=opts.label,
            s_journal_inum=s.JOURNAL_INO if opts.journal else 0,
            s_hash_seed=opts.hash_seed,
            s_def_hash_version=s.DX_HASH_HALF_MD4,
            s_jnl_backup_type=s.JNL_BACKUP_BLOCKS if opts.journal else 0,
            s_desc_size=DESC_SIZE,
            s_default_mount_opts=s.DEFM_XATTR_USER | s.DEFM_ACL,
            s_mkfs_time=low_stamp,
            s_jnl_blocks=jnl_blocks,
            s_blocks_count_hi=geo.blocks_count >> 32,
            s_r_blocks_count_hi=r_blocks >> 32,
            s_free_blocks_count_hi=self.free_blocks >> 32,
            s_min_extra_isize=EXTRA_ISIZE,
            s_want_extra_isize=EXTRA_ISIZE,
            s_flags=s.FLAGS_SIGNED_HASH,
            s_log_groups_per_flex=LOG_GROUPS_PER_FLEX,
            s_checksum_type=s.CHECKSUM_TYPE_CRC32C,
            s_wtime_hi=high_stamp,
            s_mkfs_time_hi=high_stamp,
            s_lastcheck_hi=high_stamp,
        )
        raw = bytearray(s.SUPERBLOCK.pack(sb))
        checksum = crc32c_raw(0xFFFFFFFF, bytes(raw[: s.SUPERBLOCK_CHECKSUM_OFFSET]))
        _LE32.pack_into(raw, s.SUPERBLOCK_CHECKSUM_OFFSET, checksum)
        return bytes(raw)


def _offsets(runs: list[tuple[int, int]]) -> list[int]:
    out, pos = [], 0
    for _, length in runs:
        out.append(pos)
        pos += length
    return out


# ---------------------------------------------------------------------------------------------
# public API


def _v4(raw: bytes) -> bytes:
    return UUID(bytes=raw[:16], version=4).bytes


def build_ext4(
    tree: Iterable[Entry],
    *,
    size: int | None = None,
    label: str = "",
    uuid: UUID | None = None,
    hash_seed: UUID | None = None,
    block_size: int = 4096,
    inode_size: int = 256,
    journal: bool = True,
    timestamp: int | None = None,
    reserved_percent: int = 5,
) -> Ext4Disk:
    """Plan an ext4 filesystem holding ``tree`` and return it as a read-only virtual disk.

    File contents are read from the entries' ``open()`` streams only when the disk is read.
    Raises ``InvalidInputError`` for a tree ext4 cannot hold or options out of range, and
    names the size needed when ``size`` is too small.
    """
    if block_size not in (1024, 2048, 4096):
        raise InvalidInputError(f"ext4: block_size must be 1024, 2048 or 4096, not {block_size}")
    if inode_size not in (256, 512, 1024) or inode_size > block_size:
        raise InvalidInputError(f"ext4: inode_size must be 256, 512 or 1024 (at most the block "
                                f"size), not {inode_size}")
    label_bytes = label.encode("utf-8")
    if len(label_bytes) > 16:
        raise InvalidInputError(f"ext4: label {label!r} is longer than 16 bytes")
    if not 0 <= reserved_percent <= 50:
        raise InvalidInputError(f"ext4: reserved_percent {reserved_percent} is not in 0-50")
    if timestamp is not None and not 0 <= timestamp < 1 << 40:
        raise InvalidInputError(f"ext4: timestamp {timestamp} is out of range")
    if size is not None and size < 0:
        raise InvalidInputError(f"ext4: size {size} is negative")
    collected = _collect(tree, timestamp)
    seed_material = hashlib.sha256(collected.entries_digest + repr(
        (label, block_size, inode_size, journal, collected.timestamp, size,
         reserved_percent)).encode()).digest()
    fs_uuid = uuid.bytes if uuid is not None else _v4(seed_material)
    seed = hash_seed.bytes if hash_seed is not None else _v4(
        hashlib.sha256(b"hash-seed\0" + seed_material).digest())
    opts = _Options(size, label_bytes, fs_uuid, seed, block_size, inode_size, journal,
                    collected.timestamp, reserved_percent)
    planner = _Planner(collected, opts)
    plan = planner.fit(0.2) if size is None else planner.at_size(size)
    return _Builder(planner, plan).build()


def _parse_int(name: str, value: str) -> int:
    try:
        return int(value, 0)
    except ValueError:
        raise InvalidInputError(f"ext4: {name} must be a whole number, not {value!r}") from None


def _parse_uuid(name: str, value: str) -> UUID:
    try:
        return uuid_module.UUID(value)
    except ValueError:
        raise InvalidInputError(f"ext4: {name} {value!r} is not a UUID") from None


def create(out: AtomicOutput, tree: Iterable[Entry], options: Mapping[str, str],
           progress: ProgressFn) -> None:
    """Write ``tree`` as a raw (sparse) ext4 image into ``out``."""
    from imgbridge.formats.disk import raw

    unknown = sorted(set(options) - set(CREATE_OPTIONS))
    if unknown:
        raise InvalidInputError(f"ext4: unknown option {unknown[0]!r} "
                                f"(known: {', '.join(CREATE_OPTIONS)})")
    journal = parse_switch(options, "journal", True, format="ext4")
    size_text = options.get("size")
    disk = build_ext4(
        tree,
        size=parse_size(size_text, what="ext4 size") if size_text else None,
        label=options.get("label", ""),
        uuid=_parse_uuid("uuid", options["uuid"]) if "uuid" in options else None,
        hash_seed=_parse_uuid("hash_seed", options["hash_seed"])
        if "hash_seed" in options else None,
        block_size=_parse_int("block_size", options.get("block_size", "4096")),
        inode_size=_parse_int("inode_size", options.get("inode_size", "256")),
        journal=journal,
        timestamp=_parse_int("timestamp", options["timestamp"]) if "timestamp" in options
        else None,
        reserved_percent=_parse_int("reserved_percent", options.get("reserved_percent", "5")),
    )
    try:
        raw.create(out, disk, {}, progress)
    finally:
        disk.close()
