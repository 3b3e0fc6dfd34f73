"""Read an ext2, ext3 or ext4 filesystem as a tree of ``Entry`` objects.

What is read, and how:

* the superblock and the block group descriptors (32-byte, or ``s_desc_size`` with 64bit;
  meta_bg, flex_bg, sparse_super and sparse_super2 placements; block sizes 1 KiB .. 64 KiB).
  Descriptors are read on demand, a descriptor block at a time, so a filesystem with a
  million groups costs nothing until an inode in a far group is needed;
* inodes, with their content mapped by an extent tree (any depth) or a classic block map
  (direct, indirect, double and triple indirect), or held inline (``i_block`` plus the
  ``system.data`` xattr). Uninitialised extents and holes read as zeros and are never read
  from the source;
* directories, linear or htree: an htree is read by walking its leaf blocks in order and
  skipping the index blocks (their fake entries are empty), so the name hash never matters
  (and casefolded directories read as plainly as others). Every block and entry is checked;
* symlinks (fast in ``i_block``, slow in a block or extent, or inline), devices (old and new
  ``i_block`` encodings), fifos and sockets; owners with their high 16 bits; times in
  integer nanoseconds from the ``*_extra`` fields (epoch bits give dates past 2038 and the
  sign of the 32-bit seconds dates before 1970, as the kernel decodes them);
* xattrs in the inode body and in the xattr block, every name index the kernel exposes;
  POSIX ACLs are converted from ext4's compact form to the ``system.posix_acl_*`` value
  ``getxattr`` returns (version 2, 8-byte entries);
* metadata_csum: superblock, group descriptors (also the older gdt_csum crc16), inodes,
  extent blocks, directory blocks (leaf tail and htree node tail) and xattr blocks are
  verified, each failure naming the structure. ``verify=off`` reads anyway.

A journal that needs recovery is not replayed: the filesystem is read as it stands, with a
warning (``Ext4Warning`` and ``info()["warnings"]``). Incompatible features this reader does
not understand raise ``UnsupportedFeatureError`` naming them.

Hostile images (directory loops, extents past the end, absurd depths or counts, bad
``rec_len``, names with ``/`` or NUL) raise ``InvalidImageError`` before anything large is
allocated: every count is checked against the size of the structure that holds it, and
every block number against the filesystem.

References: Linux Documentation/filesystems/ext4/ (ondisk: super.rst, group_descr.rst,
inodes.rst, ifork.rst, directory.rst, attributes.rst, journal.rst, checksums.rst,
blockgroup.rst, bigalloc.rst, inlinedata.rst); include/uapi/linux/posix_acl_xattr.h;
util-linux libblkid superblocks/ext.c behaviour for telling ext2, ext3 and ext4 apart.
"""

from __future__ import annotations

import io
import struct
import uuid as _uuid
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, BinaryIO, NamedTuple

from imgbridge.crc32c import crc32c_raw
from imgbridge.errors import InvalidImageError, InvalidInputError, UnsupportedFeatureError
from imgbridge.model.fs import Filesystem
from imgbridge.model.tree import Entry, EntryType
from imgbridge.options import parse_switch
from imgbridge.source import ByteSource, CursorFile

from . import _structs as s

__all__ = ["OPEN_OPTIONS", "Ext4Filesystem", "Ext4Warning"]

#: Options for opening (``-o key=value``).
OPEN_OPTIONS = {
    "verify": "on (default) checks metadata_csum/gdt_csum checksums; off reads a damaged "
    "filesystem anyway",
}

#: Incompatible features this reader understands; any other bit makes it refuse the image.
#: (encrypt is accepted so the unencrypted part of a filesystem can be read: an encrypted
#: inode is refused when met.)
_INCOMPAT_READABLE = (
    s.INCOMPAT_FILETYPE
    | s.INCOMPAT_RECOVER
    | s.INCOMPAT_META_BG
    | s.INCOMPAT_EXTENTS
    | s.INCOMPAT_64BIT
    | s.INCOMPAT_MMP
    | s.INCOMPAT_FLEX_BG
    | s.INCOMPAT_EA_INODE
    | s.INCOMPAT_CSUM_SEED
    | s.INCOMPAT_LARGEDIR
    | s.INCOMPAT_INLINE_DATA
    | s.INCOMPAT_ENCRYPT
    | s.INCOMPAT_CASEFOLD
)

#: Content reads are merged up to this many bytes per source read.
_MAX_READ = 8 << 20
#: Inode tables are read in chunks of this size, and a few chunks are kept.
_INODE_CHUNK = 64 << 10
_INODE_CHUNKS_KEPT = 64
#: Group descriptor blocks kept in memory.
_DESC_BLOCKS_KEPT = 256
#: Symlink targets longer than this are not real (the kernel stops at PATH_MAX).
_SYMLINK_MAX = 4096
#: Inline data lives in the inode, so it can never be larger than the biggest inode.
_INLINE_MAX = 1 << 16

#: The xattr name indexes the kernel's ext4 handlers expose through listxattr/getxattr.
_VISIBLE_XATTR_INDEXES = frozenset({
    s.XATTR_INDEX_USER, s.XATTR_INDEX_POSIX_ACL_ACCESS, s.XATTR_INDEX_POSIX_ACL_DEFAULT,
    s.XATTR_INDEX_TRUSTED, s.XATTR_INDEX_SECURITY, s.XATTR_INDEX_HURD,
})

_LE32 = struct.Struct("<I")
_LE64 = struct.Struct("<Q")

_TYPES = {
    s.S_IFREG: EntryType.FILE,
    s.S_IFDIR: EntryType.DIR,
    s.S_IFLNK: EntryType.SYMLINK,
    s.S_IFCHR: EntryType.CHAR,
    s.S_IFBLK: EntryType.BLOCK,
    s.S_IFIFO: EntryType.FIFO,
    s.S_IFSOCK: EntryType.SOCKET,
}


class Ext4Warning(UserWarning):
    """Something about the filesystem the caller should know, though it can be read."""


def _crc16_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0xA001 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC16_TABLE = _crc16_table()


def _crc16(crc: int, data: bytes) -> int:
    """Linux lib/crc16.c (polynomial 0x8005, reflected), as gdt_csum uses it."""
    table = _CRC16_TABLE
    for byte in data:
        crc = (crc >> 8) ^ table[(crc ^ byte) & 0xFF]
    return crc


def _decode_time(seconds: int, extra: int | None) -> int:
    """Integer nanoseconds from a signed 32-bit seconds field and its optional ``_extra``:
    the two low bits of extra extend the seconds past 2038 (added as bits 32-33 to the
    sign-extended value, as the kernel's ext4_decode_extra_time does), the rest are ns."""
    if extra is None:
        return seconds * 1_000_000_000
    seconds += (extra & s.EXTRA_EPOCH_MASK) << 32
    return seconds * 1_000_000_000 + ((extra & s.EXTRA_NSEC_MASK) >> s.EXTRA_EPOCH_BITS)


class _Run(NamedTuple):
    """A run of a file's logical blocks: ``physical`` 0 for a run that reads as zeros
    (an uninitialised extent); holes are not runs at all."""

    logical: int
    length: int
    physical: int


class _Budget:
    """The blocks an inode may still map or walk through. A real map never needs more than
    the inode has allocated (data plus index and indirect blocks), nor more than the
    filesystem holds; a hostile one (blocks shared between branches of the tree) runs out
    of budget instead of making the walk loop or explode."""

    __slots__ = ("left",)

    def __init__(self, blocks: int) -> None:
        self.left = blocks

    def spend(self, blocks: int) -> bool:
        self.left -= blocks
        return self.left >= 0


@dataclass(frozen=True, slots=True)
class _Inode:
    """What the reader keeps of one inode."""

    number: int
    mode: int
    uid: int
    gid: int
    size: int
    links: int
    flags: int
    generation: int
    block: bytes  # i_block, 60 bytes
    file_acl: int
    allocated_blocks: int  # i_blocks in filesystem blocks
    atime: int
    ctime: int
    mtime: int
    crtime: int | None
    extra: bytes  # the in-inode xattr area (after i_extra_isize), b"" when there is none
    csum_seed: int

    @property
    def kind(self) -> int:
        return self.mode & s.S_IFMT


class Ext4Filesystem(Filesystem):
    """An ext2/3/4 filesystem over a ``ByteSource`` (a whole file, or a partition)."""

    format_name = "ext4"

    def __init__(self, source: ByteSource, options: Mapping[str, str] | None = None) -> None:
        options = options or {}
        unknown = set(options) - set(OPEN_OPTIONS)
        if unknown:
            raise InvalidInputError(
                f"ext4: unknown option(s) {', '.join(sorted(unknown))}",
                hint=f"known: {', '.join(OPEN_OPTIONS)}",
            )
        self._source = source
        self._verify = parse_switch(options, "verify", True, format="ext4")
        self.warnings: list[str] = []
        self._desc_cache: OrderedDict[int, bytes] = OrderedDict()
        self._group_cache: dict[int, tuple[int, int, int]] = {}
        self._inode_cache: OrderedDict[int, bytes] = OrderedDict()
        self._read_superblock()

    # ---- errors and warnings -----------------------------------------------------------------

    def _bad(self, message: str, offset: int | None = None) -> InvalidImageError:
        return InvalidImageError(message, format="ext4", path=self._source.name, offset=offset)

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        # stacklevel: _warn, _read_superblock, __init__, then the caller that opened the image.
        warnings.warn(f"{self._source.name}: {message}", Ext4Warning, stacklevel=4)

    # ---- superblock --------------------------------------------------------------------------

    def _read_superblock(self) -> None:
        raw = self._source.read_at(s.SUPERBLOCK_OFFSET, s.SUPERBLOCK_SIZE)
        if len(raw) < s.SUPERBLOCK_SIZE:
            raise self._bad("too small to hold an ext superblock")
        sb = s.SUPERBLOCK.unpack(raw)
        if sb.s_magic != s.MAGIC:
            raise self._bad(f"no ext superblock (magic {sb.s_magic:#06x}, expected 0xef53)",
                            s.MAGIC_OFFSET)
        self.sb = sb
        self._compat = sb.s_feature_compat
        self._incompat = sb.s_feature_incompat
        self._ro_compat = sb.s_feature_ro_compat
        self._metadata_csum = bool(self._ro_compat & s.RO_COMPAT_METADATA_CSUM)
        self._gdt_csum = bool(self._ro_compat & s.RO_COMPAT_GDT_CSUM) and not self._metadata_csum

        if self._metadata_csum and self._verify:
            if sb.s_checksum_type != s.CHECKSUM_TYPE_CRC32C:
                raise self._bad(f"superblock checksum type {sb.s_checksum_type} is not crc32c")
            want = crc32c_raw(0xFFFFFFFF, raw[: s.SUPERBLOCK_CHECKSUM_OFFSET])
            if want != sb.s_checksum:
                raise self._bad(
                    f"superblock checksum mismatch (stored {sb.s_checksum:#010x}, "
                    f"computed {want:#010x})", s.SUPERBLOCK_OFFSET)

        if self._incompat & s.INCOMPAT_JOURNAL_DEV:
            raise UnsupportedFeatureError(
                "ext4: this is an external journal device (journal_dev), not a filesystem")
        unknown = self._incompat & ~_INCOMPAT_READABLE
        if unknown:
            names = s.feature_names(0, unknown, 0)
            raise UnsupportedFeatureError(
                f"ext4: incompatible feature(s) not supported: {' '.join(names)}")

        if not s.MIN_LOG_BLOCK_SIZE <= sb.s_log_block_size <= s.MAX_LOG_BLOCK_SIZE:
            raise self._bad(f"superblock: block size 2^(10+{sb.s_log_block_size}) is invalid")
        bs = self.block_size = 1024 << sb.s_log_block_size
        if sb.s_rev_level > s.DYNAMIC_REV:
            raise UnsupportedFeatureError(f"ext4: revision level {sb.s_rev_level}")
        if sb.s_rev_level == s.GOOD_OLD_REV:
            self.inode_size = s.GOOD_OLD_INODE_SIZE
            self._first_ino = s.GOOD_OLD_FIRST_INO
        else:
            self.inode_size = sb.s_inode_size
            self._first_ino = sb.s_first_ino
            size = self.inode_size
            if size < s.GOOD_OLD_INODE_SIZE or size > bs or size & (size - 1):
                raise self._bad(f"superblock: inode size {size} is invalid")
        is64 = bool(self._incompat & s.INCOMPAT_64BIT)
        self.blocks_count = sb.s_blocks_count_lo | (sb.s_blocks_count_hi << 32 if is64 else 0)
        self.free_blocks = sb.s_free_blocks_count_lo | (
            sb.s_free_blocks_count_hi << 32 if is64 else 0)
        if is64:
            self.desc_size = sb.s_desc_size
            if (self.desc_size < s.GROUP_DESC_SIZE_64BIT or self.desc_size > s.GROUP_DESC_MAX_SIZE
                    or self.desc_size & (self.desc_size - 1)):
                raise self._bad(f"superblock: group descriptor size {self.desc_size} is invalid")
        else:
            self.desc_size = s.GROUP_DESC_SIZE
        if self.desc_size > bs:
            raise self._bad("superblock: group descriptors are larger than a block")

        cluster_ratio = 1
        if self._ro_compat & s.RO_COMPAT_BIGALLOC:
            if not sb.s_log_block_size <= sb.s_log_cluster_size <= sb.s_log_block_size + 16:
                raise self._bad("superblock: cluster size is invalid")
            cluster_ratio = 1 << (sb.s_log_cluster_size - sb.s_log_block_size)
        bpg, ipg = sb.s_blocks_per_group, sb.s_inodes_per_group
        if not 8 <= bpg <= 8 * bs * cluster_ratio:
            raise self._bad(f"superblock: {bpg} blocks per group is invalid")
        inodes_per_block = bs // self.inode_size
        if not inodes_per_block <= ipg <= 8 * bs or ipg % inodes_per_block:
            raise self._bad(f"superblock: {ipg} inodes per group is invalid")
        if not sb.s_first_data_block < self.blocks_count:
            raise self._bad(f"superblock: {self.blocks_count} blocks is invalid")
        fs_bytes = self.blocks_count * bs
        if fs_bytes > self._source.size:
            raise self._bad(
                f"superblock: the filesystem spans {self.blocks_count} blocks of {bs} bytes "
                f"({fs_bytes} bytes) but the source holds only {self._source.size} bytes")
        self.groups = -(-(self.blocks_count - sb.s_first_data_block) // bpg)
        if sb.s_inodes_count != self.groups * ipg:
            raise self._bad(
                f"superblock: {sb.s_inodes_count} inodes is not {self.groups} groups of {ipg}")
        if not s.ROOT_INO <= self._first_ino <= sb.s_inodes_count:
            raise self._bad(f"superblock: first inode {self._first_ino} is invalid")
        self._descs_per_block = bs // self.desc_size
        if self._incompat & s.INCOMPAT_META_BG:
            if sb.s_first_meta_bg * self._descs_per_block > self.groups + self._descs_per_block:
                raise self._bad(f"superblock: first meta_bg {sb.s_first_meta_bg} is invalid")
            plain_groups = min(self.groups, sb.s_first_meta_bg * self._descs_per_block)
        else:
            plain_groups = self.groups
        gdt_start = s.SUPERBLOCK_OFFSET // bs + 1
        gdt_blocks = -(-plain_groups * self.desc_size // bs)
        if gdt_start + gdt_blocks > self.blocks_count:
            raise self._bad(
                f"superblock: {self.groups} group descriptors ({gdt_blocks} blocks) do not fit "
                f"in {self.blocks_count} blocks")

        if self._metadata_csum:
            self._csum_seed = (sb.s_checksum_seed if self._incompat & s.INCOMPAT_CSUM_SEED
                               else crc32c_raw(0xFFFFFFFF, sb.s_uuid))
        else:
            self._csum_seed = 0
        self._backup_bgs = tuple(s.le32_words(sb.s_backup_bgs, 2))
        self._has_extra_isize = self.inode_size > s.GOOD_OLD_INODE_SIZE

        if self._incompat & s.INCOMPAT_RECOVER:
            self._warn("the journal needs recovery (the filesystem was not cleanly "
                       "unmounted); reading it as it stands, without replaying the journal")

    # ---- info --------------------------------------------------------------------------------

    def fs_type(self) -> str:
        """ext2, ext3 or ext4, decided as blkid does: ext4 once any feature beyond what the
        ext3 driver knew is on, ext3 when there is a journal, ext2 otherwise."""
        if (self._incompat & ~s.EXT3_INCOMPAT_SUPPORTED
                or self._ro_compat & ~s.EXT2_RO_COMPAT_SUPPORTED):
            return "ext4"
        return "ext3" if self._compat & s.COMPAT_HAS_JOURNAL else "ext2"

    def info(self) -> dict[str, Any]:
        sb = self.sb
        label = sb.s_volume_name.split(b"\0", 1)[0].decode("utf-8", "replace")
        raw_uuid = sb.s_uuid
        state = "clean" if sb.s_state & s.STATE_VALID else "not clean"
        if sb.s_state & s.STATE_ERROR:
            state += " with errors"
        return {
            "type": self.fs_type(),
            "label": label,
            "uuid": str(_uuid.UUID(bytes=raw_uuid)) if any(raw_uuid) else None,
            "size": self.blocks_count * self.block_size,
            "used": (self.blocks_count - min(self.free_blocks, self.blocks_count))
            * self.block_size,
            "block-size": self.block_size,
            "block-count": self.blocks_count,
            "free-blocks": self.free_blocks,
            "inode-size": self.inode_size,
            "inode-count": sb.s_inodes_count,
            "free-inodes": sb.s_free_inodes_count,
            "features": s.feature_names(self._compat, self._incompat, self._ro_compat),
            "state": state,
            "warnings": list(self.warnings),
        }

    # ---- raw reads ---------------------------------------------------------------------------

    def _read(self, offset: int, n: int, what: str) -> bytes:
        data = self._source.read_at(offset, n)
        if len(data) != n:
            raise self._bad(f"truncated: {what} needs {n} bytes at offset {offset}", offset)
        return data

    def _check_blocks(self, start: int, count: int, what: str) -> None:
        """Refuse a block range outside the filesystem (or over block 0, which holds the
        boot sector and superblock: no inode may point there)."""
        if start <= self.sb.s_first_data_block or start + count > self.blocks_count:
            raise self._bad(
                f"{what} points to blocks {start}..{start + count - 1}, outside the filesystem "
                f"({self.blocks_count} blocks)")

    def _read_block(self, block: int, what: str) -> bytes:
        self._check_blocks(block, 1, what)
        return self._read(block * self.block_size, self.block_size, what)

    # ---- group descriptors -------------------------------------------------------------------

    def _has_super(self, group: int) -> bool:
        if group == 0:
            return True
        if self._compat & s.COMPAT_SPARSE_SUPER2:
            return group in self._backup_bgs
        if not self._ro_compat & s.RO_COMPAT_SPARSE_SUPER:
            return True
        return s.has_sparse_super_backup(group)

    def _desc_offset(self, group: int) -> int:
        bs, dpb = self.block_size, self._descs_per_block
        sb = self.sb
        if self._incompat & s.INCOMPAT_META_BG and group >= sb.s_first_meta_bg * dpb:
            first = group - group % dpb
            block = sb.s_first_data_block + first * sb.s_blocks_per_group
            block += 1 if self._has_super(first) else 0
            if bs == 1024 and first == 0 and sb.s_first_data_block == 0:
                block += 1
            return block * bs + (group % dpb) * self.desc_size
        return (s.SUPERBLOCK_OFFSET // bs + 1) * bs + group * self.desc_size

    def _group_desc(self, group: int) -> tuple[int, int, int]:
        """(inode table block, bg_flags, itable_unused) of a group, checksum verified."""
        known = self._group_cache.get(group)
        if known is not None:
            return known
        if len(self._group_cache) >= _DESC_BLOCKS_KEPT * 16:
            self._group_cache.clear()
        known = self._group_cache[group] = self._read_group_desc(group)
        return known

    def _read_group_desc(self, group: int) -> tuple[int, int, int]:
        offset = self._desc_offset(group)
        bs = self.block_size
        block_start = offset - offset % bs
        if block_start + bs > self.blocks_count * bs:
            raise self._bad(f"group descriptor {group} lies past the end of the filesystem",
                            offset)
        block = self._desc_cache.get(block_start)
        if block is None:
            block = self._read(block_start, bs, f"group descriptor block of group {group}")
            self._desc_cache[block_start] = block
            if len(self._desc_cache) > _DESC_BLOCKS_KEPT:
                self._desc_cache.popitem(last=False)
        raw = block[offset - block_start: offset - block_start + self.desc_size]
        desc = s.GROUP_DESC.unpack(raw)
        table = desc.bg_inode_table_lo
        unused = desc.bg_itable_unused_lo
        if self.desc_size >= s.GROUP_DESC_SIZE_64BIT:
            high = s.GROUP_DESC_HIGH.unpack(raw, s.GROUP_DESC_SIZE)
            table |= high.bg_inode_table_hi << 32
            unused |= high.bg_itable_unused_hi << 16
        if self._verify and (self._metadata_csum or self._gdt_csum):
            self._verify_desc(group, raw, desc.bg_checksum, offset)
        return table, desc.bg_flags, unused

    def _verify_desc(self, group: int, raw: bytes, stored: int, offset: int) -> None:
        at = s.GROUP_DESC_CHECKSUM_OFFSET
        number = _LE32.pack(group)
        if self._metadata_csum:
            zeroed = raw[:at] + b"\0\0" + raw[at + 2:]
            want = crc32c_raw(crc32c_raw(self._csum_seed, number), zeroed) & 0xFFFF
        else:
            crc = _crc16(_crc16(0xFFFF, self.sb.s_uuid), number)
            crc = _crc16(crc, raw[:at])
            if self.desc_size > at + 2:
                crc = _crc16(crc, raw[at + 2:])
            want = crc
        if want != stored:
            raise self._bad(
                f"group descriptor {group} checksum mismatch (stored {stored:#06x}, "
                f"computed {want:#06x})", offset)

    # ---- inodes ------------------------------------------------------------------------------

    def _inode_bytes(self, number: int) -> bytes:
        sb = self.sb
        if not 1 <= number <= sb.s_inodes_count:
            raise self._bad(f"inode number {number} is outside 1..{sb.s_inodes_count}")
        group, index = divmod(number - 1, sb.s_inodes_per_group)
        table, flags, unused = self._group_desc(group)
        if (self._metadata_csum or self._gdt_csum) and (
                flags & s.BG_INODE_UNINIT or index >= sb.s_inodes_per_group - unused):
            raise self._bad(f"inode {number} lies in the unused part of group {group}'s "
                            "inode table")
        table_blocks = -(-sb.s_inodes_per_group * self.inode_size // self.block_size)
        self._check_blocks(table, table_blocks, f"group {group}'s inode table")
        offset = table * self.block_size + index * self.inode_size
        # Chunks are aligned in the filesystem, not per table, so one may hold the end of
        # one group's table and the start of the next (flex_bg packs them together).
        chunk_start = offset - offset % _INODE_CHUNK
        chunk = self._inode_cache.get(chunk_start)
        if chunk is None:
            end = min(chunk_start + _INODE_CHUNK, self.blocks_count * self.block_size)
            chunk = self._read(chunk_start, end - chunk_start, f"inode table of group {group}")
            self._inode_cache[chunk_start] = chunk
            if len(self._inode_cache) > _INODE_CHUNKS_KEPT:
                self._inode_cache.popitem(last=False)
        at = offset - chunk_start
        return chunk[at: at + self.inode_size]

    def _inode(self, number: int) -> _Inode:
        raw = self._inode_bytes(number)
        ino = s.INODE.unpack(raw)
        extra_isize = 0
        extra: s.InodeExtra | None = None
        if self._has_extra_isize:
            extra = s.INODE_EXTRA.unpack(raw.ljust(s.GOOD_OLD_INODE_SIZE + 32, b"\0"),
                                         s.GOOD_OLD_INODE_SIZE)
            extra_isize = extra.i_extra_isize
            if extra_isize & 3 or s.GOOD_OLD_INODE_SIZE + extra_isize > self.inode_size:
                raise self._bad(f"inode {number}: i_extra_isize {extra_isize} is invalid")
        end = s.GOOD_OLD_INODE_SIZE + extra_isize

        def fits(field: str) -> bool:
            return end >= s.INODE_EXTRA_FIELD_END[field]

        csum_seed = 0
        if self._metadata_csum:
            csum_seed = crc32c_raw(crc32c_raw(self._csum_seed, _LE32.pack(number)),
                                   _LE32.pack(ino.i_generation))
            if self._verify:
                self._verify_inode(number, raw, ino, extra, csum_seed, fits("i_checksum_hi"))
        if ino.i_flags & s.ENCRYPT_FL:
            raise UnsupportedFeatureError(f"ext4: inode {number} is encrypted (fscrypt)")

        def time(base: int, field: str) -> int:
            value = getattr(extra, field) if extra is not None and fits(field) else None
            return _decode_time(base, value)

        crtime: int | None = None
        if extra is not None and fits("i_crtime"):
            crtime = time(extra.i_crtime, "i_crtime_extra")
        allocated = ino.i_blocks_lo
        if self._ro_compat & s.RO_COMPAT_HUGE_FILE:
            allocated |= ino.l_i_blocks_high << 32
        if not (self._ro_compat & s.RO_COMPAT_HUGE_FILE and ino.i_flags & s.HUGE_FILE_FL):
            allocated = allocated * 512 // self.block_size
        file_acl = ino.i_file_acl_lo
        if self._incompat & s.INCOMPAT_64BIT:
            file_acl |= ino.l_i_file_acl_high << 32
        size = ino.i_size_lo
        # As the kernel's ext4_isize: the high half counts for regular files, and for
        # directories only with large_dir (old ext2 kept i_dir_acl there).
        if ino.i_mode & s.S_IFMT == s.S_IFREG or self._incompat & s.INCOMPAT_LARGEDIR:
            size |= ino.i_size_high << 32
        has_xattr_area = (extra is not None and end + 4 <= self.inode_size
                          and raw[end: end + 4] == _LE32.pack(s.XATTR_MAGIC))
        return _Inode(
            number=number,
            mode=ino.i_mode,
            uid=ino.i_uid | ino.l_i_uid_high << 16,
            gid=ino.i_gid | ino.l_i_gid_high << 16,
            size=size,
            links=ino.i_links_count,
            flags=ino.i_flags,
            generation=ino.i_generation,
            block=ino.i_block,
            file_acl=file_acl,
            allocated_blocks=allocated,
            atime=time(ino.i_atime, "i_atime_extra"),
            ctime=time(ino.i_ctime, "i_ctime_extra"),
            mtime=time(ino.i_mtime, "i_mtime_extra"),
            crtime=crtime,
            extra=raw[end + 4:] if has_xattr_area else b"",
            csum_seed=csum_seed,
        )

    def _verify_inode(self, number: int, raw: bytes, ino: s.Inode, extra: s.InodeExtra | None,
                      seed: int, has_hi: bool) -> None:
        buf = bytearray(raw)
        buf[s.INODE_CHECKSUM_LO_OFFSET: s.INODE_CHECKSUM_LO_OFFSET + 2] = b"\0\0"
        stored = ino.l_i_checksum_lo
        if has_hi and extra is not None:
            buf[s.INODE_CHECKSUM_HI_OFFSET: s.INODE_CHECKSUM_HI_OFFSET + 2] = b"\0\0"
            stored |= extra.i_checksum_hi << 16
        want = crc32c_raw(seed, bytes(buf))
        if not has_hi:
            want &= 0xFFFF
        if want != stored:
            raise self._bad(f"inode {number} checksum mismatch (stored {stored:#x}, "
                            f"computed {want:#x})")

    # ---- content mapping ---------------------------------------------------------------------

    def _runs(self, inode: _Inode) -> Iterator[_Run]:
        """The mapped runs of an inode's content in logical order, contiguous ones merged.
        Hostile maps are bounded: every level of a tree is checked, logical order must
        strictly increase and the mapped blocks may not exceed what the inode has allocated."""
        budget = _Budget(min(inode.allocated_blocks, self.blocks_count))
        source = (self._extent_runs(inode, budget) if inode.flags & s.EXTENTS_FL
                  else self._blockmap_runs(inode, budget))
        pending: _Run | None = None
        for run in source:
            if not budget.spend(run.length):
                raise self._overspent(inode)
            if (pending is not None and pending.logical + pending.length == run.logical
                    and (pending.physical == run.physical == 0 or (
                        pending.physical and pending.physical + pending.length == run.physical))
                    and pending.length < (1 << 31)):
                pending = _Run(pending.logical, pending.length + run.length, pending.physical)
                continue
            if pending is not None:
                yield pending
            pending = run
        if pending is not None:
            yield pending

    def _overspent(self, inode: _Inode) -> InvalidImageError:
        return self._bad(f"inode {inode.number}: its block map covers more blocks than the "
                         f"{inode.allocated_blocks} it has allocated")

    def _extent_node(self, inode: _Inode, data: bytes, where: str,
                     expected_depth: int | None) -> s.ExtentHeader:
        header = s.EXTENT_HEADER.unpack(data)
        if header.eh_magic != s.EXTENT_MAGIC:
            raise self._bad(f"inode {inode.number}: {where}: bad extent header magic "
                            f"{header.eh_magic:#06x}")
        capacity = (len(data) - s.EXTENT_HEADER.size) // s.EXTENT_ENTRY_SIZE
        if header.eh_max > capacity or header.eh_entries > header.eh_max:
            raise self._bad(f"inode {inode.number}: {where}: extent header says "
                            f"{header.eh_entries} of {header.eh_max} entries in room for "
                            f"{capacity}")
        if header.eh_depth > s.EXTENT_MAX_DEPTH:
            raise self._bad(f"inode {inode.number}: extent tree depth {header.eh_depth} "
                            f"exceeds {s.EXTENT_MAX_DEPTH}")
        if expected_depth is not None:
            if header.eh_depth != expected_depth:
                raise self._bad(f"inode {inode.number}: {where}: extent node at depth "
                                f"{header.eh_depth} where {expected_depth} was expected")
            if header.eh_entries == 0:
                raise self._bad(f"inode {inode.number}: {where}: empty extent node")
        return header

    def _extent_runs(self, inode: _Inode, budget: _Budget) -> Iterator[_Run]:
        header = self._extent_node(inode, inode.block, "i_block", None)
        # Each level must map logical blocks in strictly increasing order, and each child
        # must stay inside the range its index entry gives it: together with the depth that
        # drops by one per level, no block can be visited twice (no loop, no blow-up).
        yield from self._extent_walk(inode, inode.block, header, 0, 1 << 32, "i_block", budget)

    def _extent_walk(self, inode: _Inode, data: bytes, header: s.ExtentHeader, low: int,
                     high: int, where: str, budget: _Budget) -> Iterator[_Run]:
        entries = header.eh_entries
        if header.eh_depth == 0:
            cursor = low
            for i in range(entries):
                leaf = s.EXTENT_LEAF.unpack(data, 12 + 12 * i)
                length = leaf.ee_len
                uninit = length > s.EXTENT_INIT_MAX_LEN
                if uninit:
                    length -= s.EXTENT_INIT_MAX_LEN
                if length == 0 or leaf.ee_block < cursor or leaf.ee_block + length > high:
                    raise self._bad(
                        f"inode {inode.number}: {where}: extent {i} (logical {leaf.ee_block}, "
                        f"{length} blocks) is out of order or out of range")
                physical = leaf.ee_start_lo | leaf.ee_start_hi << 32
                self._check_blocks(physical, length, f"inode {inode.number} extent {i}")
                cursor = leaf.ee_block + length
                yield _Run(leaf.ee_block, length, 0 if uninit else physical)
            return
        indexes = [s.EXTENT_INDEX.unpack(data, 12 + 12 * i) for i in range(entries)]
        for i, index in enumerate(indexes):
            start = index.ei_block
            end = indexes[i + 1].ei_block if i + 1 < entries else high
            if start < low or end <= start or end > high:
                raise self._bad(f"inode {inode.number}: {where}: extent index {i} (logical "
                                f"{start}) is out of order or out of range")
            child = index.ei_leaf_lo | index.ei_leaf_hi << 32
            child_where = f"extent block {child}"
            if not budget.spend(1):
                raise self._overspent(inode)
            block = self._read_block(child, f"inode {inode.number} {child_where}")
            child_header = self._extent_node(inode, block, child_where,
                                                       header.eh_depth - 1)
            if self._metadata_csum and self._verify:
                tail = 12 + 12 * child_header.eh_max
                if tail + 4 > len(block):
                    raise self._bad(f"inode {inode.number}: {child_where} has no room for its "
                                    "checksum")
                stored = _LE32.unpack_from(block, tail)[0]
                want = crc32c_raw(inode.csum_seed, block[:tail])
                if stored != want:
                    raise self._bad(f"inode {inode.number}: {child_where} checksum mismatch "
                                    f"(stored {stored:#010x}, computed {want:#010x})",
                                    child * self.block_size)
            yield from self._extent_walk(inode, block, child_header, start, end, child_where,
                                         budget)

    def _blockmap_runs(self, inode: _Inode, budget: _Budget) -> Iterator[_Run]:
        bs = self.block_size
        per_block = bs // 4
        total = -(-inode.size // bs)
        limit = s.NDIR_BLOCKS + per_block + per_block**2 + per_block**3
        if total > limit:
            raise self._bad(f"inode {inode.number}: size {inode.size} is beyond what a block "
                            "map can address")
        words = list(s.le32_words(inode.block, s.N_BLOCKS))
        for logical in range(min(s.NDIR_BLOCKS, total)):
            if words[logical]:
                self._check_blocks(words[logical], 1, f"inode {inode.number} block {logical}")
                yield _Run(logical, 1, words[logical])
        base = s.NDIR_BLOCKS
        for level, pointer in ((1, words[s.IND_BLOCK]), (2, words[s.DIND_BLOCK]),
                               (3, words[s.TIND_BLOCK])):
            if base >= total:
                return
            if pointer:
                yield from self._indirect(inode, pointer, level, base, total, budget)
            base += per_block**level

    def _indirect(self, inode: _Inode, pointer: int, level: int, base: int,
                  total: int, budget: _Budget) -> Iterator[_Run]:
        per_block = self.block_size // 4
        if not budget.spend(1):
            raise self._overspent(inode)
        data = self._read_block(pointer, f"inode {inode.number} indirect block")
        words = struct.unpack_from(f"<{per_block}I", data)
        span = per_block ** (level - 1)
        for i, word in enumerate(words):
            logical = base + i * span
            if logical >= total:
                return
            if not word:
                continue
            if level == 1:
                self._check_blocks(word, 1, f"inode {inode.number} block {logical}")
                yield _Run(logical, 1, word)
            else:
                yield from self._indirect(inode, word, level - 1, logical, total, budget)

    # ---- inline data -------------------------------------------------------------------------

    def _inline_data(self, inode: _Inode) -> bytes:
        """The whole content of an inline-data inode: i_block, then system.data."""
        if inode.size > _INLINE_MAX:
            raise self._bad(f"inode {inode.number}: inline data of {inode.size} bytes")
        data = inode.block
        if inode.size > len(data):
            more = b""
            for index, name, value in self._raw_xattrs_ibody(inode):
                if index == s.XATTR_INDEX_SYSTEM and name == b"data":
                    more = value
            data += more
        if len(data) < inode.size:
            raise self._bad(f"inode {inode.number}: inline data holds {len(data)} of "
                            f"{inode.size} bytes")
        return data[: inode.size]

    # ---- extended attributes -----------------------------------------------------------------

    def _xattr_entries(self, inode: _Inode, data: bytes, start: int, value_base: int,
                       where: str) -> Iterator[tuple[int, bytes, bytes]]:
        """(index, name, value) of each entry in ``data`` from ``start``; values at
        ``value_base + e_value_offs``."""
        pos = start
        end = len(data)
        while True:
            if pos + 4 > end:
                raise self._bad(f"inode {inode.number}: {where}: xattr list runs off its end")
            if data[pos: pos + 4] == b"\0\0\0\0":
                return
            if pos + s.XATTR_ENTRY.size > end:
                raise self._bad(f"inode {inode.number}: {where}: xattr entry runs off its end")
            entry = s.XATTR_ENTRY.unpack(data, pos)
            name_start = pos + s.XATTR_ENTRY.size
            name_end = name_start + entry.e_name_len
            if name_end > end:
                raise self._bad(f"inode {inode.number}: {where}: xattr name runs off its end")
            name = data[name_start:name_end]
            if entry.e_value_inum:
                raise UnsupportedFeatureError(
                    f"ext4: inode {inode.number}: xattr value stored in inode "
                    f"{entry.e_value_inum} (ea_inode)")
            value_start = value_base + entry.e_value_offs
            value_end = value_start + entry.e_value_size
            if entry.e_value_size and (value_start < value_base or value_end > end):
                raise self._bad(f"inode {inode.number}: {where}: xattr value lies outside "
                                "its block")
            yield entry.e_name_index, name, data[value_start:value_end]
            pos = (name_end + s.XATTR_ROUND - 1) & ~(s.XATTR_ROUND - 1)

    def _raw_xattrs_ibody(self, inode: _Inode) -> Iterator[tuple[int, bytes, bytes]]:
        if inode.extra:
            yield from self._xattr_entries(inode, inode.extra, 0, 0, "in-inode xattrs")

    def _raw_xattrs(self, inode: _Inode) -> Iterator[tuple[int, bytes, bytes]]:
        yield from self._raw_xattrs_ibody(inode)
        if not inode.file_acl:
            return
        where = f"xattr block {inode.file_acl}"
        data = self._read_block(inode.file_acl, f"inode {inode.number} {where}")
        header = s.XATTR_HEADER.unpack(data)
        if header.h_magic != s.XATTR_MAGIC or header.h_blocks != 1:
            raise self._bad(f"inode {inode.number}: {where} is not an xattr block",
                            inode.file_acl * self.block_size)
        if self._metadata_csum and self._verify:
            at = s.XATTR_HEADER_CHECKSUM_OFFSET
            zeroed = data[:at] + b"\0\0\0\0" + data[at + 4:]
            want = crc32c_raw(crc32c_raw(self._csum_seed, _LE64.pack(inode.file_acl)), zeroed)
            if want != header.h_checksum:
                raise self._bad(f"{where} checksum mismatch (stored {header.h_checksum:#010x}, "
                                f"computed {want:#010x})", inode.file_acl * self.block_size)
        yield from self._xattr_entries(inode, data, s.XATTR_HEADER.size, 0, where)

    def _xattrs(self, inode: _Inode) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        for index, name, value in self._raw_xattrs(inode):
            if index not in _VISIBLE_XATTR_INDEXES:
                # The kernel lists only these (system.data holds inline data; Lustre,
                # richacl and the fscrypt context have no handler), and so do we.
                continue
            prefix = s.XATTR_PREFIXES[index]
            full = prefix + name.decode("utf-8", "surrogateescape")
            if index in (s.XATTR_INDEX_POSIX_ACL_ACCESS, s.XATTR_INDEX_POSIX_ACL_DEFAULT):
                value = self._acl_to_xattr(inode, value)
            out.append((full, value))
        return out

    def _acl_to_xattr(self, inode: _Inode, value: bytes) -> bytes:
        """ext4's compact ACL (version 1; 4-byte entries without an id for the owner, group,
        mask and other tags) as the version 2 value getxattr returns (8-byte entries)."""
        if len(value) < s.ACL_HEADER.size or s.ACL_HEADER.unpack(value).a_version \
                != s.EXT4_ACL_VERSION:
            raise self._bad(f"inode {inode.number}: POSIX ACL xattr has a bad header")
        out = [s.ACL_HEADER.pack(s.AclHeader(s.POSIX_ACL_XATTR_VERSION))]
        pos = s.ACL_HEADER.size
        while pos < len(value):
            if pos + s.ACL_ENTRY_SHORT.size > len(value):
                raise self._bad(f"inode {inode.number}: POSIX ACL xattr is truncated")
            short = s.ACL_ENTRY_SHORT.unpack(value, pos)
            if short.e_tag in (s.ACL_USER, s.ACL_GROUP):
                if pos + s.ACL_ENTRY.size > len(value):
                    raise self._bad(f"inode {inode.number}: POSIX ACL xattr is truncated")
                entry = s.ACL_ENTRY.unpack(value, pos)
                pos += s.ACL_ENTRY.size
            elif short.e_tag in (s.ACL_USER_OBJ, s.ACL_GROUP_OBJ, s.ACL_MASK, s.ACL_OTHER):
                entry = s.AclEntry(short.e_tag, short.e_perm, s.ACL_UNDEFINED_ID)
                pos += s.ACL_ENTRY_SHORT.size
            else:
                raise self._bad(f"inode {inode.number}: POSIX ACL entry tag {short.e_tag:#x} "
                                "is invalid")
            out.append(s.ACL_ENTRY.pack(entry))
        return b"".join(out)

    # ---- directories -------------------------------------------------------------------------

    def _dir_children(self, inode: _Inode, path: str) -> list[tuple[bytes, int]]:
        """(name, inode number) of every entry of a directory but "." and ".."."""
        where = f"directory /{path}" if path else "the root directory"
        if inode.flags & s.INLINE_DATA_FL:
            data = self._inline_data(inode)
            if len(data) < 4:
                raise self._bad(f"{where}: inline directory is too short")
            children: list[tuple[bytes, int]] = []
            head = data[: s.I_BLOCK_SIZE]
            self._parse_dir_block(head[4:], where, children, allow_dots=False)
            if len(data) > s.I_BLOCK_SIZE:
                self._parse_dir_block(data[s.I_BLOCK_SIZE:], where, children, allow_dots=False)
            return children
        bs = self.block_size
        if inode.size % bs:
            raise self._bad(f"{where}: size {inode.size} is not a whole number of blocks")
        total = inode.size // bs
        htree = bool(inode.flags & s.INDEX_FL) and bool(self._compat & s.COMPAT_DIR_INDEX)
        children = []
        for run in self._runs(inode):
            if run.logical >= total:
                break
            if not run.physical:
                continue  # an uninitialised run in a directory holds no entries
            count = min(run.length, total - run.logical)
            step = max(1, _MAX_READ // bs)
            for first in range(0, count, step):
                n = min(step, count - first)
                data = self._read((run.physical + first) * bs, n * bs, f"{where} blocks")
                for k in range(n):
                    logical = run.logical + first + k
                    block = data[k * bs: (k + 1) * bs]
                    self._dir_block(inode, block, logical, htree, where, children)
        return children

    def _dir_block(self, inode: _Inode, block: bytes, logical: int, htree: bool, where: str,
                   children: list[tuple[bytes, int]]) -> None:
        bs = self.block_size
        csum = self._metadata_csum and self._verify
        first = s.DIR_ENTRY.unpack(block)
        first_len = self._rec_len(first.rec_len)
        if htree and logical == 0:
            self._dx_root(inode, block, where, csum)
            return
        if htree and first.inode == 0 and first_len == bs and first.name_len == 0:
            # An htree interior node (one empty entry spanning the block, then dx entries),
            # or, without metadata_csum, possibly a leaf whose entries were all deleted: no
            # names either way. Under metadata_csum a leaf ends in a tail instead, so the
            # node can be checked.
            if self._metadata_csum:
                self._dx_counts(block, 8, where)
                if csum:
                    self._dx_csum(inode, block, 8, where, logical)
            return
        end = bs
        if csum:
            tail = s.DIR_TAIL.unpack(block, bs - s.DIR_TAIL.size)
            if (tail.det_reserved_zero1 or tail.det_rec_len != s.DIR_TAIL.size
                    or tail.det_reserved_zero2 or tail.det_reserved_ft != s.FT_DIR_CSUM):
                raise self._bad(f"{where}: block {logical} has no checksum tail")
            want = crc32c_raw(inode.csum_seed, block[: bs - s.DIR_TAIL.size])
            if want != tail.det_checksum:
                raise self._bad(f"{where}: directory block {logical} checksum mismatch "
                                f"(stored {tail.det_checksum:#010x}, computed {want:#010x})")
            end = bs - s.DIR_TAIL.size
        self._parse_dir_block(block[:end], where, children, allow_dots=logical == 0,
                              self_ino=inode.number)

    def _rec_len(self, value: int) -> int:
        if self.block_size < 65536:
            return value
        # 64 KiB blocks: rec_len 65536 does not fit 16 bits (the kernel's rec_len_from_disk).
        if value in (0, 65535):
            return 65536
        return (value & 65532) | ((value & 3) << 16)

    def _parse_dir_block(self, data: bytes, where: str, children: list[tuple[bytes, int]],
                         *, allow_dots: bool, self_ino: int = 0) -> None:
        pos = 0
        end = len(data)
        filetype = bool(self._incompat & s.INCOMPAT_FILETYPE)
        index = 0
        while pos < end:
            if pos + s.DIR_ENTRY.size > end:
                raise self._bad(f"{where}: directory entry header runs past the block")
            entry = s.DIR_ENTRY.unpack(data, pos)
            rec_len = self._rec_len(entry.rec_len)
            name_len = entry.name_len if filetype else entry.name_len | entry.file_type << 8
            if rec_len < s.DIR_ENTRY.size or rec_len % s.DIR_ROUND or pos + rec_len > end:
                raise self._bad(f"{where}: directory entry with rec_len {rec_len} at byte "
                                f"{pos} of a {end}-byte block")
            if s.DIR_ENTRY.size + name_len > rec_len:
                raise self._bad(f"{where}: directory entry name ({name_len} bytes) is longer "
                                f"than its record ({rec_len} bytes)")
            if entry.inode:
                name = data[pos + 8: pos + 8 + name_len]
                if name in (b".", b".."):
                    if not allow_dots or index != (0 if name == b"." else 1):
                        raise self._bad(f"{where}: a directory entry named {name.decode()!r} "
                                        "out of place")
                    if name == b"." and entry.inode != self_ino:
                        raise self._bad(f"{where}: '.' points to inode {entry.inode}, not to "
                                        "the directory itself")
                elif not name or b"/" in name or b"\0" in name:
                    raise self._bad(f"{where}: invalid name {name!r} in a directory entry")
                else:
                    children.append((name, entry.inode))
            pos += rec_len
            index += 1

    def _dx_root(self, inode: _Inode, block: bytes, where: str, csum: bool) -> None:
        bs = self.block_size
        dot = s.DIR_ENTRY.unpack(block)
        dotdot = s.DIR_ENTRY.unpack(block, 12)
        if (dot.name_len != 1 or block[8:9] != b"." or self._rec_len(dot.rec_len) != 12
                or dot.inode != inode.number or dotdot.name_len != 2 or block[20:22] != b".."
                or self._rec_len(dotdot.rec_len) != bs - 12):
            raise self._bad(f"{where}: htree root block lacks its '.' and '..' entries")
        info = s.DX_ROOT_INFO.unpack(block, s.DX_ROOT_INFO_OFFSET)
        levels = (s.DX_MAX_LEVELS_LARGEDIR if self._incompat & s.INCOMPAT_LARGEDIR
                  else s.DX_MAX_LEVELS)
        if info.info_length != s.DX_ROOT_INFO.size or info.indirect_levels >= levels:
            raise self._bad(f"{where}: htree root info is invalid (length {info.info_length}, "
                            f"{info.indirect_levels} indirect levels)")
        count_at = s.DX_ROOT_INFO_OFFSET + info.info_length
        self._dx_counts(block, count_at, where)
        if csum:
            self._dx_csum(inode, block, count_at, where, 0)

    def _dx_counts(self, block: bytes, count_at: int, where: str) -> s.DxCountLimit:
        # Under metadata_csum the tail takes room whether or not we verify it.
        tail = s.DX_TAIL.size if self._metadata_csum else 0
        room = (self.block_size - count_at - tail) // s.DX_ENTRY.size
        counts = s.DX_COUNT_LIMIT.unpack(block, count_at)
        if counts.dx_limit != room or not 1 <= counts.dx_count <= counts.dx_limit:
            raise self._bad(f"{where}: htree node says {counts.dx_count} of {counts.dx_limit} "
                            f"entries where {room} fit")
        return counts

    def _dx_csum(self, inode: _Inode, block: bytes, count_at: int, where: str,
                 logical: int) -> None:
        counts = self._dx_counts(block, count_at, where)
        tail_at = count_at + counts.dx_limit * s.DX_ENTRY.size
        tail = s.DX_TAIL.unpack(block, tail_at)
        size = count_at + counts.dx_count * s.DX_ENTRY.size
        # The sum runs over the live entries, then the tail with its checksum field zeroed.
        want = crc32c_raw(crc32c_raw(inode.csum_seed, block[:size]),
                          block[tail_at: tail_at + 4] + b"\0\0\0\0")
        if want != tail.dt_checksum:
            raise self._bad(f"{where}: htree block {logical} checksum mismatch (stored "
                            f"{tail.dt_checksum:#010x}, computed {want:#010x})")

    # ---- entries -----------------------------------------------------------------------------

    def _symlink_target(self, inode: _Inode, path: str) -> str:
        size = inode.size
        if size > min(_SYMLINK_MAX, self.block_size) or size == 0:
            raise self._bad(f"/{path}: symlink target of {size} bytes")
        if inode.flags & s.INLINE_DATA_FL:
            raw = self._inline_data(inode)
        else:
            # The kernel's test: a symlink is fast when it owns no block but its xattr block.
            ea_blocks = 1 << self._cluster_shift() if inode.file_acl else 0
            if inode.allocated_blocks - ea_blocks <= 0:
                if size > s.I_BLOCK_SIZE:
                    raise self._bad(f"/{path}: fast symlink target of {size} bytes")
                raw = inode.block[:size]
            else:
                buffer = bytearray(size)
                got = _ContentIO(self, inode).readinto(buffer)
                raw = bytes(buffer[:got])
        if len(raw) != size:
            raise self._bad(f"/{path}: symlink target is truncated")
        if b"\0" in raw:
            raise self._bad(f"/{path}: symlink target contains a NUL byte")
        return raw.decode("utf-8", "surrogateescape")

    def _cluster_shift(self) -> int:
        if self._ro_compat & s.RO_COMPAT_BIGALLOC:
            return self.sb.s_log_cluster_size - self.sb.s_log_block_size
        return 0

    def _entry(self, path: str, inode: _Inode) -> Entry:
        kind = _TYPES.get(inode.kind)
        if kind is None:
            raise self._bad(f"/{path}: inode {inode.number} has an invalid mode "
                            f"{inode.mode:#o}")
        fields: dict[str, Any] = {}
        if kind is EntryType.FILE:
            if inode.flags & s.EXTENTS_FL and inode.size > (1 << 32) * self.block_size:
                # Logical block numbers are 32 bits: no extent can reach past this size.
                raise self._bad(f"/{path}: size {inode.size} is beyond what extents address "
                                f"with {self.block_size}-byte blocks")
            fields["size"] = inode.size
            # The opener keeps only what reading needs (not the in-inode xattrs, unless
            # they hold inline data): listings of millions of files stay small.
            kept = (inode if inode.flags & s.INLINE_DATA_FL or not inode.extra
                    else replace(inode, extra=b""))
            fields["opener"] = lambda: self._open_content(kept)
        elif kind is EntryType.SYMLINK:
            fields["link_target"] = self._symlink_target(inode, path)
        elif kind in (EntryType.CHAR, EntryType.BLOCK):
            old, new = s.le32_words(inode.block, 2)
            if old:
                fields["devmajor"], fields["devminor"] = (old >> 8) & 0xFF, old & 0xFF
            else:
                fields["devmajor"] = (new & 0xFFF00) >> 8
                fields["devminor"] = (new & 0xFF) | ((new >> 12) & 0xFFF00)
        return Entry(
            path, kind, mode=inode.mode & s.S_IPERM, uid=inode.uid, gid=inode.gid,
            mtime=inode.mtime, atime=inode.atime, ctime=inode.ctime, crtime=inode.crtime,
            xattrs=tuple(self._xattrs(inode)), **fields,
        )

    def entries(self) -> Iterator[Entry]:
        root = self._inode(s.ROOT_INO)
        if root.kind != s.S_IFDIR:
            raise self._bad("the root inode is not a directory")
        yield self._entry("", root)
        visited_dirs = {s.ROOT_INO}
        first_path: dict[int, str] = {}
        # Each stack item is a directory's children still to emit, in reverse order.
        stack: list[list[tuple[str, int]]] = [self._sorted_children(root, "")]
        while stack:
            pending = stack[-1]
            if not pending:
                stack.pop()
                continue
            path, number = pending.pop()
            if number < self._first_ino and number != s.ROOT_INO:
                raise self._bad(f"/{path}: points to reserved inode {number}")
            primary = first_path.get(number)
            if primary is not None:
                yield Entry(path, EntryType.HARDLINK, link_target=primary)
                continue
            inode = self._inode(number)
            if inode.links == 0:
                raise self._bad(f"/{path}: points to inode {number}, which is not in use")
            if inode.kind == s.S_IFDIR:
                if number in visited_dirs:
                    raise self._bad(f"/{path}: directory loop (inode {number} is already in "
                                    "the tree)")
                visited_dirs.add(number)
                yield self._entry(path, inode)
                stack.append(self._sorted_children(inode, path))
                continue
            if inode.links > 1:
                first_path[number] = path
            yield self._entry(path, inode)

    def _sorted_children(self, inode: _Inode, path: str) -> list[tuple[str, int]]:
        children = self._dir_children(inode, path)
        children.sort(reverse=True)
        out: list[tuple[str, int]] = []
        previous = None
        for name, number in children:
            if name == previous:
                raise self._bad(f"/{path}: two entries named {name!r}")
            previous = name
            text = name.decode("utf-8", "surrogateescape")
            out.append((f"{path}/{text}" if path else text, number))
        return out

    # ---- content -----------------------------------------------------------------------------

    def _open_content(self, inode: _Inode) -> BinaryIO:
        if inode.flags & s.INLINE_DATA_FL:
            return io.BytesIO(self._inline_data(inode))
        return io.BufferedReader(_ContentIO(self, inode), buffer_size=1 << 20)

    def close(self) -> None:
        self._desc_cache.clear()
        self._group_cache.clear()
        self._inode_cache.clear()


class _ContentIO(CursorFile):
    """A file's content: logical positions mapped through the inode's runs, found lazily
    (a forward read never re-walks the map; a backward seek starts the walk again), mapped
    runs read in large pieces and holes or uninitialised runs filled with zeros."""

    def __init__(self, fs: Ext4Filesystem, inode: _Inode) -> None:
        super().__init__(inode.size)
        self._fs = fs
        self._inode = inode
        self._runs: Iterator[_Run] = fs._runs(inode)
        self._current: _Run | None = None  # the last run pulled from the walk
        self._walked_to = 0  # the end of the runs before it, which are gone
        self._walk_done = False

    def _run_for(self, block: int) -> tuple[_Run | None, int | None]:
        """The run holding ``block`` (None in a hole) and the first block past what that
        answer covers (None: the map has nothing more, the rest is a hole)."""
        if block < self._walked_to:
            # A backward seek past runs already dropped: walk the map again from the start.
            self._runs = self._fs._runs(self._inode)
            self._current = None
            self._walked_to = 0
            self._walk_done = False
        while True:
            current = self._current
            if current is not None:
                if block < current.logical:
                    return None, current.logical
                if block < current.logical + current.length:
                    return current, current.logical + current.length
                self._walked_to = current.logical + current.length
                self._current = None
            if self._walk_done:
                return None, None
            self._current = next(self._runs, None)
            if self._current is None:
                self._walk_done = True

    def readall(self) -> bytes:
        # RawIOBase's own readall would go 8 KiB at a time.
        buffer = bytearray(max(0, self._size - self._pos))
        got = self.readinto(buffer)
        del buffer[got:]
        return bytes(buffer)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._pos >= self._size:
            return 0
        want = min(len(view), self._size - self._pos)
        bs = self._fs.block_size
        done = 0
        while done < want:
            pos = self._pos + done
            block, within = divmod(pos, bs)
            run, stop = self._run_for(block)
            span = want - done if stop is None else min(want - done, stop * bs - pos)
            if run is None or run.physical == 0:
                view[done: done + span] = bytes(span)
            else:
                span = min(span, _MAX_READ)
                offset = (run.physical + block - run.logical) * bs + within
                data = self._fs._read(offset, span, f"inode {self._inode.number} content")
                view[done: done + span] = data
            done += span
        self._pos += done
        return done
