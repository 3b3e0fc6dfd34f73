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
from imgbridge.output import AtomicOutput
from imgbridge.progress import ProgressFn

from . import _wdir
from . import _wstructs as S
from ._wdisk import Ext4Disk, Piece
from ._wlayout import (
    Allocator,
    Geometry,
    OutOfSpace,
    has_super,
    inode_alignment,
    max_inodes_per_group,
)
from ._wxattr import XattrItem, fits_in_block, fits_in_inode, pack_block, pack_in_inode, to_items

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

_FILE_TYPES = {
    EntryType.FILE: (S.S_IFREG, S.FT_REG_FILE),
    EntryType.DIR: (S.S_IFDIR, S.FT_DIR),
    EntryType.SYMLINK: (S.S_IFLNK, S.FT_SYMLINK),
    EntryType.CHAR: (S.S_IFCHR, S.FT_CHRDEV),
    EntryType.BLOCK: (S.S_IFBLK, S.FT_BLKDEV),
    EntryType.FIFO: (S.S_IFIFO, S.FT_FIFO),
    EntryType.SOCKET: (S.S_IFSOCK, S.FT_SOCK),
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
    if len(raw) > S.NAME_MAX:
        raise InvalidInputError(f"{path}: name is {len(raw)} bytes, ext4 allows {S.NAME_MAX}")
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
        if node.links > S.LINK_MAX:
            raise InvalidInputError(f"{target.path}: more than {S.LINK_MAX} hardlinks")

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
    root.ino = S.ROOT_INO
    lost = root.children.get(b"lost+found")
    if lost is None:
        lost = _Inode(Entry("lost+found", EntryType.DIR, mode=0o700, mtime=root.entry.mtime),
                      parent=root, children={})
        root.children[b"lost+found"] = lost
    out: list[_Inode] = []
    next_ino = S.LOST_FOUND_INO
    if lost.children is not None:
        lost.ino = S.LOST_FOUND_INO
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
    low = sec & 0xFFFFFFFF
    signed_low = low - (1 << 32) if low >= 1 << 31 else low
    epoch = (sec - signed_low) >> 32
    return low, epoch | (nsec << 2)


def _split_extents(runs: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(logical, physical, length) extents of at most 32768 blocks."""
    out: list[tuple[int, int, int]] = []
    logical = 0
    for start, length in runs:
        while length:
            take = min(length, S.EXTENT_MAX_LEN)
            out.append((logical, start, take))
            logical, start, length = logical + take, start + take, length - take
    return out


def _tree_levels(count: int, per_block: int) -> list[int]:
    """Blocks per level of an extent tree over ``count`` extents (leaves first)."""
    levels: list[int] = []
    while count > S.INODE_EXTENT_SLOTS:
        count = -(-count // per_block)
        levels.append(count)
    return levels


def _extent_block(entries: bytes, count: int, per_block: int, depth: int, block_size: int,
                  checksum_seed: int) -> bytes:
    block = bytearray(block_size)
    block[:12] = S.EXTENT_HEADER.pack(S.EXTENT_MAGIC, count, per_block, depth, 0)
    block[12 : 12 + len(entries)] = entries
    tail = 12 + per_block * S.EXTENT_ENTRY_SIZE
    block[tail : tail + 4] = crc32c_raw(checksum_seed, bytes(block[:tail])).to_bytes(4, "little")
    return bytes(block)


def _build_extent_tree(extents: list[tuple[int, int, int]], tree_blocks: list[int],
                       block_size: int, checksum_seed: int) -> tuple[bytes, list[Piece]]:
    """i_block (60 bytes) and the tree's blocks, placed at ``tree_blocks``."""
    per_block = (block_size - 12) // S.EXTENT_ENTRY_SIZE
    level: list[tuple[int, bytes]] = [
        (lb, S.EXTENT_LEAF.pack(lb, length, pb >> 32, pb & 0xFFFFFFFF))
        for lb, pb, length in extents
    ]
    pieces: list[Piece] = []
    depth = 0
    free_blocks = iter(tree_blocks)
    while len(level) > S.INODE_EXTENT_SLOTS:
        upper: list[tuple[int, bytes]] = []
        for i in range(0, len(level), per_block):
            chunk = level[i : i + per_block]
            where = next(free_blocks)
            body = b"".join(e for _, e in chunk)
            data = _extent_block(body, len(chunk), per_block, depth, block_size, checksum_seed)
            pieces.append(Piece(where * block_size, block_size, data))
            upper.append((chunk[0][0], S.EXTENT_INDEX.pack(chunk[0][0], where & 0xFFFFFFFF,
                                                           where >> 32, 0)))
        level = upper
        depth += 1
    i_block = S.EXTENT_HEADER.pack(S.EXTENT_MAGIC, len(level), S.INODE_EXTENT_SLOTS, depth, 0)
    i_block += b"".join(e for _, e in level)
    return i_block.ljust(S.INODE_BLOCK_SIZE, b"\0"), pieces


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
        self.max_ino = max((n.ino for n in tree.inodes), default=S.LOST_FOUND_INO)
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
                if len(node.symlink) > S.FAST_SYMLINK_MAX:
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
        if node.ino == S.LOST_FOUND_INO:
            while len(blocks) * bs < _LOST_FOUND_BYTES:
                blocks.append(_wdir.empty_block(bs, checksum))
        node.dir_blocks = blocks
        node.content_blocks = len(blocks)

    # ---- sizing --------------------------------------------------------------------------

    def content_total(self) -> int:
        per_block = (self.bs - 12) // S.EXTENT_ENTRY_SIZE
        total = len(self.xattr_sets)
        for node in self.all_inodes():
            total += node.content_blocks
            extents = -(-node.content_blocks // S.EXTENT_MAX_LEN)
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
        per_block = (self.bs - 12) // S.EXTENT_ENTRY_SIZE
        journal_runs = alloc.allocate(journal_blocks) if journal_blocks else []
        content: dict[int, list[tuple[int, int]]] = {}
        trees: dict[int, list[int]] = {}
        xattr_blocks: dict[tuple[XattrItem, ...], int] = {}
        if journal_runs:
            nblocks = sum(_tree_levels(len(_split_extents(journal_runs)), per_block))
            trees[S.JOURNAL_INO] = _flatten(alloc.allocate(nblocks))
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
            checksum = crc32c_raw(self.csum.seed, struct.pack("<Q", block) + bytes(data))
            data[S.XATTR_BLOCK_CHECKSUM_OFFSET : S.XATTR_BLOCK_CHECKSUM_OFFSET + 4] = (
                checksum.to_bytes(4, "little"))
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
        seed = self.csum.inode_seed(S.JOURNAL_INO)
        i_block, tree = _build_extent_tree(_split_extents(runs),
                                           self.plan.tree_runs.get(S.JOURNAL_INO, []),
                                           self.bs, seed)
        self.pieces.extend(tree)
        jsb = bytearray(self.bs)
        jsb[: S.JBD2_SUPERBLOCK.size] = S.JBD2_SUPERBLOCK.pack(
            S.JBD2_MAGIC, S.JBD2_SUPERBLOCK_V2, 0, self.bs, nblocks, 1, 1, 0, 0, 0, 0, 0,
            self.opts.fs_uuid, 1)
        self.pieces.append(Piece(runs[0][0] * self.bs, self.bs, bytes(jsb)))
        stamp = self.opts.timestamp * _NS
        entry = Entry("<journal>", EntryType.FILE, mode=0o600, mtime=stamp)
        self.journal_i_block = i_block
        self.inodes[S.JOURNAL_INO] = self._pack(
            S.JOURNAL_INO, entry, S.S_IFREG, 1, nblocks * self.bs,
            (nblocks + len(tree)) * (self.bs // 512), S.INODE_FL_EXTENTS, i_block, 0, b"")

    def _inode(self, node: _Inode) -> None:
        entry = node.entry
        bs = self.bs
        ino = node.ino
        mode_type = _FILE_TYPES[node.kind][0]
        flags = 0
        size = 0
        blocks = 0
        i_block = bytes(S.INODE_BLOCK_SIZE)
        runs = self.plan.content_runs.get(ino, [])
        if node.children is not None:
            links = 2 + sum(1 for c in node.children.values()
                            if c.children is not None and c.parent is node)
            if links > S.LINK_MAX:
                links = 1  # dir_nlink: "more than the counter holds"
            size = len(node.dir_blocks) * bs
            for (start, length), offset in zip(runs, _offsets(runs), strict=True):
                data = b"".join(node.dir_blocks[offset : offset + length])
                self.pieces.append(Piece(start * bs, length * bs, data))
            if node.indexed:
                flags |= S.INODE_FL_INDEX
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
                i_block = node.symlink.ljust(S.INODE_BLOCK_SIZE, b"\0")
        elif node.kind in (EntryType.CHAR, EntryType.BLOCK):
            major, minor = entry.devmajor, entry.devminor
            if major < 256 and minor < 256:
                i_block = struct.pack("<II", (major << 8) | minor, 0)
            else:
                encoded = (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)
                i_block = struct.pack("<III", 0, encoded, 0)
            i_block = i_block.ljust(S.INODE_BLOCK_SIZE, b"\0")
        if node.kind in (EntryType.FILE, EntryType.DIR) or (
                node.kind is EntryType.SYMLINK and runs):
            flags |= S.INODE_FL_EXTENTS
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
        S.INODE.pack_into(
            raw, 0,
            mode_type | entry.mode, entry.uid & 0xFFFF, size & 0xFFFFFFFF,
            atime[0], ctime[0], mtime[0], 0, entry.gid & 0xFFFF, links,
            sectors & 0xFFFFFFFF, flags, 0, i_block, 0, xattr_block & 0xFFFFFFFF, size >> 32, 0,
            (sectors >> 32) & 0xFFFF, xattr_block >> 32, entry.uid >> 16, entry.gid >> 16, 0, 0,
            S.EXTRA_ISIZE, 0, ctime[1], mtime[1], atime[1], crtime[0], crtime[1], 0, 0)
        if inline:
            raw[S.INLINE_XATTR_OFFSET :] = inline
        checksum = crc32c_raw(self.csum.inode_seed(ino), raw)
        struct.pack_into("<H", raw, S.INODE_CHECKSUM_LO, checksum & 0xFFFF)
        struct.pack_into("<H", raw, S.INODE_CHECKSUM_HI, checksum >> 16)
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
            desc = bytearray(S.GROUP_DESC.pack(
                meta.block_bitmap & 0xFFFFFFFF, meta.inode_bitmap & 0xFFFFFFFF,
                meta.inode_table & 0xFFFFFFFF, free_blocks & 0xFFFF, free_inodes & 0xFFFF,
                dirs_per_group[group] & 0xFFFF, S.BG_ITABLE_ZEROED, 0, bb_csum & 0xFFFF,
                ib_csum & 0xFFFF, (ipg - in_use) & 0xFFFF, 0,
                meta.block_bitmap >> 32, meta.inode_bitmap >> 32, meta.inode_table >> 32,
                free_blocks >> 16, free_inodes >> 16, dirs_per_group[group] >> 16,
                (ipg - in_use) >> 16, 0, bb_csum >> 16, ib_csum >> 16, 0))
            checksum = crc32c_raw(self.csum.seed, struct.pack("<I", group) + bytes(desc))
            struct.pack_into("<H", desc, S.GD_CHECKSUM_OFFSET, checksum & 0xFFFF)
            descs += desc
            self.free_blocks += free_blocks
            self.free_inodes += free_inodes
        gdt = bytes(descs).ljust(geo.gdt_blocks * bs, b"\0")
        for group in range(geo.groups):
            if not has_super(group):
                continue
            sb = self._superblock(group)
            start = geo.group_start(group)
            if group == 0 and bs > S.SUPERBLOCK_OFFSET:
                # Block 0 holds the boot sector's 1 KiB of zeros, then the superblock.
                block0 = bytes(S.SUPERBLOCK_OFFSET) + sb
                self.pieces.append(Piece(0, bs, block0.ljust(bs, b"\0")))
            else:
                self.pieces.append(Piece(start * bs, bs, sb.ljust(bs, b"\0")))
            self.pieces.append(Piece((start + 1) * bs, len(gdt), gdt))

    def _superblock(self, group: int) -> bytes:
        geo = self.geo
        opts = self.opts
        sb = bytearray(S.SUPERBLOCK_SIZE)
        stamp = opts.timestamp
        r_blocks = geo.blocks_count * opts.reserved_percent // 100

        def put(fmt: str, offset: int, *values: int | bytes) -> None:
            struct.pack_into("<" + fmt, sb, offset, *values)

        put("I", S.SB_INODES_COUNT, geo.inodes_count)
        put("I", S.SB_BLOCKS_COUNT_LO, geo.blocks_count & 0xFFFFFFFF)
        put("I", S.SB_R_BLOCKS_COUNT_LO, r_blocks & 0xFFFFFFFF)
        put("I", S.SB_FREE_BLOCKS_COUNT_LO, self.free_blocks & 0xFFFFFFFF)
        put("I", S.SB_FREE_INODES_COUNT, self.free_inodes)
        put("I", S.SB_FIRST_DATA_BLOCK, geo.first_data_block)
        log = (self.bs // 1024).bit_length() - 1
        put("I", S.SB_LOG_BLOCK_SIZE, log)
        put("I", S.SB_LOG_CLUSTER_SIZE, log)
        put("I", S.SB_BLOCKS_PER_GROUP, geo.blocks_per_group)
        put("I", S.SB_CLUSTERS_PER_GROUP, geo.blocks_per_group)
        put("I", S.SB_INODES_PER_GROUP, geo.inodes_per_group)
        put("I", S.SB_WTIME, stamp & 0xFFFFFFFF)
        put("H", S.SB_MAX_MNT_COUNT, 0xFFFF)
        put("H", S.SB_MAGIC, S.EXT4_MAGIC)
        put("H", S.SB_STATE, S.STATE_CLEAN)
        put("H", S.SB_ERRORS, S.ERRORS_CONTINUE)
        put("I", S.SB_LASTCHECK, stamp & 0xFFFFFFFF)
        put("I", S.SB_REV_LEVEL, S.REV_DYNAMIC)
        put("I", S.SB_FIRST_INO, S.FIRST_INO)
        put("H", S.SB_INODE_SIZE, opts.inode_size)
        put("H", S.SB_BLOCK_GROUP_NR, group)
        compat = S.COMPAT_EXT_ATTR | S.COMPAT_DIR_INDEX
        if opts.journal:
            compat |= S.COMPAT_HAS_JOURNAL
        put("I", S.SB_FEATURE_COMPAT, compat)
        put("I", S.SB_FEATURE_INCOMPAT,
            S.INCOMPAT_FILETYPE | S.INCOMPAT_EXTENTS | S.INCOMPAT_64BIT | S.INCOMPAT_FLEX_BG)
        put("I", S.SB_FEATURE_RO_COMPAT,
            S.RO_COMPAT_SPARSE_SUPER | S.RO_COMPAT_LARGE_FILE | S.RO_COMPAT_HUGE_FILE
            | S.RO_COMPAT_DIR_NLINK | S.RO_COMPAT_EXTRA_ISIZE | S.RO_COMPAT_METADATA_CSUM)
        sb[S.SB_UUID : S.SB_UUID + 16] = opts.fs_uuid
        sb[S.SB_VOLUME_NAME : S.SB_VOLUME_NAME + len(opts.label)] = opts.label
        sb[S.SB_HASH_SEED : S.SB_HASH_SEED + 16] = opts.hash_seed
        put("B", S.SB_DEF_HASH_VERSION, S.HASH_HALF_MD4)
        put("H", S.SB_DESC_SIZE, S.DESC_SIZE)
        put("I", S.SB_DEFAULT_MOUNT_OPTS, S.DEFM_XATTR_USER | S.DEFM_ACL)
        put("I", S.SB_MKFS_TIME, stamp & 0xFFFFFFFF)
        if opts.journal:
            put("I", S.SB_JOURNAL_INUM, S.JOURNAL_INO)
            put("B", S.SB_JNL_BACKUP_TYPE, S.JNL_BACKUP_BLOCKS)
            nblocks = sum(length for _, length in self.plan.journal_runs)
            jsize = nblocks * self.bs
            sb[S.SB_JNL_BLOCKS : S.SB_JNL_BLOCKS + 60] = self.journal_i_block
            put("II", S.SB_JNL_BLOCKS + 60, jsize >> 32, jsize & 0xFFFFFFFF)
        put("I", S.SB_BLOCKS_COUNT_HI, geo.blocks_count >> 32)
        put("I", S.SB_R_BLOCKS_COUNT_HI, r_blocks >> 32)
        put("I", S.SB_FREE_BLOCKS_COUNT_HI, self.free_blocks >> 32)
        put("H", S.SB_MIN_EXTRA_ISIZE, S.EXTRA_ISIZE)
        put("H", S.SB_WANT_EXTRA_ISIZE, S.EXTRA_ISIZE)
        put("I", S.SB_FLAGS, S.FLAGS_SIGNED_HASH)
        put("B", S.SB_LOG_GROUPS_PER_FLEX, S.LOG_GROUPS_PER_FLEX)
        put("B", S.SB_CHECKSUM_TYPE, S.CHECKSUM_CRC32C)
        high = (stamp >> 32) & 0xFF
        for offset in (S.SB_WTIME_HI, S.SB_MKFS_TIME_HI, S.SB_LASTCHECK_HI):
            put("B", offset, high)
        put("I", S.SB_CHECKSUM, crc32c_raw(0xFFFFFFFF, bytes(sb[: S.SB_CHECKSUM])))
        return bytes(sb)


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

    from imgbridge.api import parse_size

    unknown = sorted(set(options) - set(CREATE_OPTIONS))
    if unknown:
        raise InvalidInputError(f"ext4: unknown option {unknown[0]!r} "
                                f"(known: {', '.join(CREATE_OPTIONS)})")
    journal_text = options.get("journal", "on").lower()
    if journal_text not in ("on", "off", "yes", "no", "true", "false", "1", "0"):
        raise InvalidInputError(f"ext4: journal must be on or off, not {journal_text!r}")
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
        journal=journal_text in ("on", "yes", "true", "1"),
        timestamp=_parse_int("timestamp", options["timestamp"]) if "timestamp" in options
        else None,
        reserved_percent=_parse_int("reserved_percent", options.get("reserved_percent", "5")),
    )
    try:
        raw.create(out, disk, {}, progress)
    finally:
        disk.close()
