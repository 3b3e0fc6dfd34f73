"""ext2/ext3/ext4 on-disk structures and the constants that name their fields' values.

Only layout lives here; what the fields mean when reading is in reader.py (and, for writing,
in the writer's modules). Every ext4 number is little-endian; the jbd2 journal's are
big-endian. Each structure is a typed ``NamedTuple`` paired with a ``struct`` format through
``Layout``, which unpacks and packs it: ext4 reads one inode per file, so the per-record cost
matters more than for a disk header, and plain ``struct`` is an order of magnitude faster than
construct here. Field names are the kernel's (``struct ext4_super_block`` and friends).

References: Linux Documentation/filesystems/ext4/ (super.rst, group_descr.rst, inodes.rst,
ifork.rst, directory.rst, attributes.rst, journal.rst, checksums.rst, special_inodes.rst,
blockgroup.rst); e2fsprogs lib/e2p/feature.c for the feature names dumpe2fs prints;
include/uapi/linux/posix_acl_xattr.h for the ACL xattr value format.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from typing import Any, Generic, NamedTuple, TypeVar

_Record = TypeVar("_Record", bound=tuple[Any, ...])


class Layout(Generic[_Record]):
    """A ``struct`` format bound to the NamedTuple it unpacks into (and packs from)."""

    def __init__(self, record: Callable[..., _Record], fmt: str, size: int) -> None:
        self._struct = struct.Struct(fmt)
        if self._struct.size != size:
            raise AssertionError(f"{fmt}: {self._struct.size} bytes, expected {size}")
        self._record = record
        self.size = size

    def unpack(self, data: bytes | bytearray | memoryview, offset: int = 0) -> _Record:
        return self._record(*self._struct.unpack_from(data, offset))

    def pack(self, value: _Record) -> bytes:
        return self._struct.pack(*value)

    def pack_into(self, buffer: bytearray | memoryview, offset: int, value: _Record) -> None:
        self._struct.pack_into(buffer, offset, *value)


# ---- superblock ------------------------------------------------------------------------------

#: The primary superblock sits 1024 bytes into the filesystem, whatever the block size.
SUPERBLOCK_OFFSET = 1024
SUPERBLOCK_SIZE = 1024
MAGIC = 0xEF53
#: Where the magic lies from the start of the filesystem (1024 + 0x38).
MAGIC_OFFSET = SUPERBLOCK_OFFSET + 0x38
#: The superblock checksum covers the bytes before this offset (the s_checksum field).
SUPERBLOCK_CHECKSUM_OFFSET = 0x3FC

MIN_LOG_BLOCK_SIZE = 0  # 1 KiB
MAX_LOG_BLOCK_SIZE = 6  # 64 KiB

#: s_rev_level: 0 is the original format (128-byte inodes, first inode 11).
GOOD_OLD_REV = 0
DYNAMIC_REV = 1
GOOD_OLD_INODE_SIZE = 128
GOOD_OLD_FIRST_INO = 11

#: s_state bits.
STATE_VALID = 0x0001
STATE_ERROR = 0x0002
STATE_ORPHAN = 0x0004

#: s_errors: what the kernel does on an error.
ERRORS_CONTINUE = 1
ERRORS_RO = 2
ERRORS_PANIC = 3

#: s_flags bits.
FLAGS_SIGNED_HASH = 0x0001
FLAGS_UNSIGNED_HASH = 0x0002

#: s_default_mount_opts bits.
DEFM_XATTR_USER = 0x0004
DEFM_ACL = 0x0008

#: s_jnl_backup_type: s_jnl_blocks holds a copy of the journal inode's i_block and size.
JNL_BACKUP_BLOCKS = 1

#: s_checksum_type
CHECKSUM_TYPE_CRC32C = 1

#: s_creator_os
OS_LINUX = 0
OS_HURD = 1


class Superblock(NamedTuple):
    s_inodes_count: int
    s_blocks_count_lo: int
    s_r_blocks_count_lo: int
    s_free_blocks_count_lo: int
    s_free_inodes_count: int
    s_first_data_block: int
    s_log_block_size: int
    s_log_cluster_size: int
    s_blocks_per_group: int
    s_clusters_per_group: int
    s_inodes_per_group: int
    s_mtime: int
    s_wtime: int
    s_mnt_count: int
    s_max_mnt_count: int
    s_magic: int
    s_state: int
    s_errors: int
    s_minor_rev_level: int
    s_lastcheck: int
    s_checkinterval: int
    s_creator_os: int
    s_rev_level: int
    s_def_resuid: int
    s_def_resgid: int
    s_first_ino: int
    s_inode_size: int
    s_block_group_nr: int
    s_feature_compat: int
    s_feature_incompat: int
    s_feature_ro_compat: int
    s_uuid: bytes
    s_volume_name: bytes
    s_last_mounted: bytes
    s_algorithm_usage_bitmap: int
    s_prealloc_blocks: int
    s_prealloc_dir_blocks: int
    s_reserved_gdt_blocks: int
    s_journal_uuid: bytes
    s_journal_inum: int
    s_journal_dev: int
    s_last_orphan: int
    s_hash_seed: bytes  # four __le32
    s_def_hash_version: int
    s_jnl_backup_type: int
    s_desc_size: int
    s_default_mount_opts: int
    s_first_meta_bg: int
    s_mkfs_time: int
    s_jnl_blocks: bytes  # seventeen __le32: a copy of the journal inode's i_block and size
    s_blocks_count_hi: int
    s_r_blocks_count_hi: int
    s_free_blocks_count_hi: int
    s_min_extra_isize: int
    s_want_extra_isize: int
    s_flags: int
    s_raid_stride: int
    s_mmp_interval: int
    s_mmp_block: int
    s_raid_stripe_width: int
    s_log_groups_per_flex: int
    s_checksum_type: int
    s_reserved_pad: int
    s_kbytes_written: int
    s_snapshot_inum: int
    s_snapshot_id: int
    s_snapshot_r_blocks_count: int
    s_snapshot_list: int
    s_error_count: int
    s_first_error_time: int
    s_first_error_ino: int
    s_first_error_block: int
    s_first_error_func: bytes
    s_first_error_line: int
    s_last_error_time: int
    s_last_error_ino: int
    s_last_error_line: int
    s_last_error_block: int
    s_last_error_func: bytes
    s_mount_opts: bytes
    s_usr_quota_inum: int
    s_grp_quota_inum: int
    s_overhead_clusters: int
    s_backup_bgs: bytes  # two __le32: the sparse_super2 backup groups
    s_encrypt_algos: bytes
    s_encrypt_pw_salt: bytes
    s_lpf_ino: int
    s_prj_quota_inum: int
    s_checksum_seed: int
    s_wtime_hi: int
    s_mtime_hi: int
    s_mkfs_time_hi: int
    s_lastcheck_hi: int
    s_first_error_time_hi: int
    s_last_error_time_hi: int
    s_first_error_errcode: int
    s_last_error_errcode: int
    s_encoding: int
    s_encoding_flags: int
    s_orphan_file_inum: int
    s_reserved: bytes
    s_checksum: int


SUPERBLOCK = Layout(
    Superblock,
    "<"
    "IIIIIIIIIIIII"  # 0x00 .. 0x30 s_inodes_count .. s_wtime
    "HhHHHH"  # 0x34 s_mnt_count .. s_minor_rev_level
    "IIII"  # 0x40 s_lastcheck .. s_rev_level
    "HH"  # 0x50 s_def_resuid, s_def_resgid
    "IHH"  # 0x54 s_first_ino, s_inode_size, s_block_group_nr
    "III"  # 0x5C feature sets
    "16s16s64s"  # 0x68 s_uuid, s_volume_name, s_last_mounted
    "I"  # 0xC8 s_algorithm_usage_bitmap
    "BBH"  # 0xCC prealloc, s_reserved_gdt_blocks
    "16sIII"  # 0xD0 s_journal_uuid, s_journal_inum, s_journal_dev, s_last_orphan
    "16sBBH"  # 0xEC s_hash_seed, s_def_hash_version, s_jnl_backup_type, s_desc_size
    "III"  # 0x100 s_default_mount_opts, s_first_meta_bg, s_mkfs_time
    "68s"  # 0x10C s_jnl_blocks
    "III"  # 0x150 blocks hi
    "HHI"  # 0x15C s_min_extra_isize, s_want_extra_isize, s_flags
    "HHQI"  # 0x164 s_raid_stride, s_mmp_interval, s_mmp_block, s_raid_stripe_width
    "BBH"  # 0x174 s_log_groups_per_flex, s_checksum_type, s_reserved_pad
    "QIIQI"  # 0x178 s_kbytes_written .. s_snapshot_list
    "IIIQ32sI"  # 0x194 s_error_count .. s_first_error_line
    "IIIQ32s"  # 0x1CC s_last_error_time .. s_last_error_func
    "64s"  # 0x200 s_mount_opts
    "III8s"  # 0x240 quota inodes, s_overhead_clusters, s_backup_bgs
    "4s16s"  # 0x254 s_encrypt_algos, s_encrypt_pw_salt
    "III"  # 0x268 s_lpf_ino, s_prj_quota_inum, s_checksum_seed
    "BBBBBBBB"  # 0x274 time high bytes and error codes
    "HHI"  # 0x27C s_encoding, s_encoding_flags, s_orphan_file_inum
    "376s"  # 0x284 s_reserved
    "I",  # 0x3FC s_checksum
    SUPERBLOCK_SIZE,
)

# ---- feature flags ---------------------------------------------------------------------------

COMPAT_DIR_PREALLOC = 0x0001
COMPAT_IMAGIC_INODES = 0x0002
COMPAT_HAS_JOURNAL = 0x0004
COMPAT_EXT_ATTR = 0x0008
COMPAT_RESIZE_INODE = 0x0010
COMPAT_DIR_INDEX = 0x0020
COMPAT_LAZY_BG = 0x0040
COMPAT_EXCLUDE_INODE = 0x0080
COMPAT_EXCLUDE_BITMAP = 0x0100
COMPAT_SPARSE_SUPER2 = 0x0200
COMPAT_FAST_COMMIT = 0x0400
COMPAT_STABLE_INODES = 0x0800
COMPAT_ORPHAN_FILE = 0x1000

INCOMPAT_COMPRESSION = 0x0001
INCOMPAT_FILETYPE = 0x0002
INCOMPAT_RECOVER = 0x0004  # needs_recovery
INCOMPAT_JOURNAL_DEV = 0x0008
INCOMPAT_META_BG = 0x0010
INCOMPAT_EXTENTS = 0x0040
INCOMPAT_64BIT = 0x0080
INCOMPAT_MMP = 0x0100
INCOMPAT_FLEX_BG = 0x0200
INCOMPAT_EA_INODE = 0x0400
INCOMPAT_DIRDATA = 0x1000
INCOMPAT_CSUM_SEED = 0x2000
INCOMPAT_LARGEDIR = 0x4000
INCOMPAT_INLINE_DATA = 0x8000
INCOMPAT_ENCRYPT = 0x10000
INCOMPAT_CASEFOLD = 0x20000

RO_COMPAT_SPARSE_SUPER = 0x0001
RO_COMPAT_LARGE_FILE = 0x0002
RO_COMPAT_BTREE_DIR = 0x0004
RO_COMPAT_HUGE_FILE = 0x0008
RO_COMPAT_GDT_CSUM = 0x0010  # uninit_bg
RO_COMPAT_DIR_NLINK = 0x0020
RO_COMPAT_EXTRA_ISIZE = 0x0040
RO_COMPAT_HAS_SNAPSHOT = 0x0080
RO_COMPAT_QUOTA = 0x0100
RO_COMPAT_BIGALLOC = 0x0200
RO_COMPAT_METADATA_CSUM = 0x0400
RO_COMPAT_REPLICA = 0x0800
RO_COMPAT_READONLY = 0x1000
RO_COMPAT_PROJECT = 0x2000
RO_COMPAT_SHARED_BLOCKS = 0x4000
RO_COMPAT_VERITY = 0x8000
RO_COMPAT_ORPHAN_PRESENT = 0x10000

#: Feature names as e2fsprogs (dumpe2fs, tune2fs -O) spells them.
COMPAT_NAMES = {
    COMPAT_DIR_PREALLOC: "dir_prealloc",
    COMPAT_IMAGIC_INODES: "imagic_inodes",
    COMPAT_HAS_JOURNAL: "has_journal",
    COMPAT_EXT_ATTR: "ext_attr",
    COMPAT_RESIZE_INODE: "resize_inode",
    COMPAT_DIR_INDEX: "dir_index",
    COMPAT_LAZY_BG: "lazy_bg",
    COMPAT_EXCLUDE_BITMAP: "snapshot_bitmap",
    COMPAT_SPARSE_SUPER2: "sparse_super2",
    COMPAT_FAST_COMMIT: "fast_commit",
    COMPAT_STABLE_INODES: "stable_inodes",
    COMPAT_ORPHAN_FILE: "orphan_file",
}
INCOMPAT_NAMES = {
    INCOMPAT_COMPRESSION: "compression",
    INCOMPAT_FILETYPE: "filetype",
    INCOMPAT_RECOVER: "needs_recovery",
    INCOMPAT_JOURNAL_DEV: "journal_dev",
    INCOMPAT_META_BG: "meta_bg",
    INCOMPAT_EXTENTS: "extent",
    INCOMPAT_64BIT: "64bit",
    INCOMPAT_MMP: "mmp",
    INCOMPAT_FLEX_BG: "flex_bg",
    INCOMPAT_EA_INODE: "ea_inode",
    INCOMPAT_DIRDATA: "dirdata",
    INCOMPAT_CSUM_SEED: "metadata_csum_seed",
    INCOMPAT_LARGEDIR: "large_dir",
    INCOMPAT_INLINE_DATA: "inline_data",
    INCOMPAT_ENCRYPT: "encrypt",
    INCOMPAT_CASEFOLD: "casefold",
}
RO_COMPAT_NAMES = {
    RO_COMPAT_SPARSE_SUPER: "sparse_super",
    RO_COMPAT_LARGE_FILE: "large_file",
    RO_COMPAT_HUGE_FILE: "huge_file",
    RO_COMPAT_GDT_CSUM: "uninit_bg",
    RO_COMPAT_DIR_NLINK: "dir_nlink",
    RO_COMPAT_EXTRA_ISIZE: "extra_isize",
    RO_COMPAT_HAS_SNAPSHOT: "snapshot",
    RO_COMPAT_QUOTA: "quota",
    RO_COMPAT_BIGALLOC: "bigalloc",
    RO_COMPAT_METADATA_CSUM: "metadata_csum",
    RO_COMPAT_REPLICA: "replica",
    RO_COMPAT_READONLY: "read-only",
    RO_COMPAT_PROJECT: "project",
    RO_COMPAT_SHARED_BLOCKS: "shared_blocks",
    RO_COMPAT_VERITY: "verity",
    RO_COMPAT_ORPHAN_PRESENT: "orphan_present",
}

#: What ext2 and ext3 drivers understand (blkid calls a filesystem ext4 once it uses more).
EXT2_INCOMPAT_SUPPORTED = INCOMPAT_FILETYPE | INCOMPAT_META_BG
EXT3_INCOMPAT_SUPPORTED = INCOMPAT_FILETYPE | INCOMPAT_RECOVER | INCOMPAT_META_BG
EXT2_RO_COMPAT_SUPPORTED = RO_COMPAT_SPARSE_SUPER | RO_COMPAT_LARGE_FILE | RO_COMPAT_BTREE_DIR


def has_sparse_super_backup(group: int) -> bool:
    """sparse_super: the superblock and descriptor table are backed up in groups 0, 1 and
    the powers of 3, 5 and 7 (sparse_super2 and a filesystem without sparse_super differ)."""
    if group <= 1:
        return True
    if not group & 1:
        return False
    for base in (3, 5, 7):
        power = base
        while power < group:
            power *= base
        if power == group:
            return True
    return False


def feature_names(compat: int, incompat: int, ro_compat: int) -> list[str]:
    """Feature names in the order dumpe2fs prints them: compat, incompat, ro_compat, each by
    bit; an unnamed bit appears as e2fsprogs shows it (``FEATURE_I31``)."""
    names: list[str] = []
    for mask, table, letter in (
        (compat, COMPAT_NAMES, "C"),
        (incompat, INCOMPAT_NAMES, "I"),
        (ro_compat, RO_COMPAT_NAMES, "R"),
    ):
        for bit in range(32):
            if mask & (1 << bit):
                names.append(table.get(1 << bit, f"FEATURE_{letter}{bit}"))
    return names


# ---- block group descriptor ------------------------------------------------------------------

#: Without the 64bit feature a descriptor is 32 bytes; with it s_desc_size (>= 64, power of 2).
GROUP_DESC_SIZE = 32
GROUP_DESC_SIZE_64BIT = 64
GROUP_DESC_MAX_SIZE = 1024
#: bg_checksum's offset: the checksum covers the descriptor with these two bytes left out.
GROUP_DESC_CHECKSUM_OFFSET = 0x1E

BG_INODE_UNINIT = 0x0001
BG_BLOCK_UNINIT = 0x0002
BG_INODE_ZEROED = 0x0004


class GroupDesc(NamedTuple):
    bg_block_bitmap_lo: int
    bg_inode_bitmap_lo: int
    bg_inode_table_lo: int
    bg_free_blocks_count_lo: int
    bg_free_inodes_count_lo: int
    bg_used_dirs_count_lo: int
    bg_flags: int
    bg_exclude_bitmap_lo: int
    bg_block_bitmap_csum_lo: int
    bg_inode_bitmap_csum_lo: int
    bg_itable_unused_lo: int
    bg_checksum: int


GROUP_DESC = Layout(GroupDesc, "<IIIHHHHIHHHH", GROUP_DESC_SIZE)


class GroupDescHigh(NamedTuple):
    """The second half of a 64-bit descriptor (bytes 0x20..0x40)."""

    bg_block_bitmap_hi: int
    bg_inode_bitmap_hi: int
    bg_inode_table_hi: int
    bg_free_blocks_count_hi: int
    bg_free_inodes_count_hi: int
    bg_used_dirs_count_hi: int
    bg_itable_unused_hi: int
    bg_exclude_bitmap_hi: int
    bg_block_bitmap_csum_hi: int
    bg_inode_bitmap_csum_hi: int
    bg_reserved: int


GROUP_DESC_HIGH = Layout(GroupDescHigh, "<IIIHHHHIHHI", GROUP_DESC_SIZE_64BIT - GROUP_DESC_SIZE)

# ---- inode -----------------------------------------------------------------------------------

#: i_links_count stops here; a directory with more subdirectories has 1 (dir_nlink).
LINK_MAX = 65000

#: Reserved inode numbers.
BAD_BLOCKS_INO = 1
ROOT_INO = 2
USR_QUOTA_INO = 3
GRP_QUOTA_INO = 4
BOOT_LOADER_INO = 5
UNDEL_DIR_INO = 6
RESIZE_INO = 7
JOURNAL_INO = 8
EXCLUDE_INO = 9

#: i_block: 15 __le32; 12 direct blocks, then the indirect, double and triple indirect ones.
N_BLOCKS = 15
I_BLOCK_SIZE = N_BLOCKS * 4
NDIR_BLOCKS = 12
IND_BLOCK = 12
DIND_BLOCK = 13
TIND_BLOCK = 14

#: i_mode file types (the S_IFMT bits).
S_IFMT = 0o170000
S_IFSOCK = 0o140000
S_IFLNK = 0o120000
S_IFREG = 0o100000
S_IFBLK = 0o060000
S_IFDIR = 0o040000
S_IFCHR = 0o020000
S_IFIFO = 0o010000
#: Permission bits plus setuid, setgid and sticky.
S_IPERM = 0o7777

#: i_flags bits.
SECRM_FL = 0x00000001
UNRM_FL = 0x00000002
COMPR_FL = 0x00000004
SYNC_FL = 0x00000008
IMMUTABLE_FL = 0x00000010
APPEND_FL = 0x00000020
NODUMP_FL = 0x00000040
NOATIME_FL = 0x00000080
DIRTY_FL = 0x00000100
COMPRBLK_FL = 0x00000200
NOCOMPR_FL = 0x00000400
ENCRYPT_FL = 0x00000800
INDEX_FL = 0x00001000  # htree directory
IMAGIC_FL = 0x00002000
JOURNAL_DATA_FL = 0x00004000
NOTAIL_FL = 0x00008000
DIRSYNC_FL = 0x00010000
TOPDIR_FL = 0x00020000
HUGE_FILE_FL = 0x00040000  # i_blocks counts filesystem blocks, not 512-byte sectors
EXTENTS_FL = 0x00080000
VERITY_FL = 0x00100000
EA_INODE_FL = 0x00200000
DAX_FL = 0x02000000
INLINE_DATA_FL = 0x10000000
PROJINHERIT_FL = 0x20000000
CASEFOLD_FL = 0x40000000


class Inode(NamedTuple):
    """The first 128 bytes of an inode (the "good old" inode, Linux flavour of osd1/osd2)."""

    i_mode: int
    i_uid: int
    i_size_lo: int
    i_atime: int
    i_ctime: int
    i_mtime: int
    i_dtime: int
    i_gid: int
    i_links_count: int
    i_blocks_lo: int
    i_flags: int
    l_i_version: int
    i_block: bytes
    i_generation: int
    i_file_acl_lo: int
    i_size_high: int
    i_obso_faddr: int
    l_i_blocks_high: int
    l_i_file_acl_high: int
    l_i_uid_high: int
    l_i_gid_high: int
    l_i_checksum_lo: int
    l_i_reserved: int


INODE = Layout(Inode, "<HHIiiiiHHIII60sIIIIHHHHHH", GOOD_OLD_INODE_SIZE)
#: Byte offsets of the two checksum halves inside an inode.
INODE_CHECKSUM_LO_OFFSET = 0x7C
INODE_CHECKSUM_HI_OFFSET = 0x82


class InodeExtra(NamedTuple):
    """Bytes 128.. of a large inode. A field exists only when 128 + i_extra_isize covers it
    (``INODE_EXTRA_FIELD_END`` gives where each one ends)."""

    i_extra_isize: int
    i_checksum_hi: int
    i_ctime_extra: int
    i_mtime_extra: int
    i_atime_extra: int
    i_crtime: int
    i_crtime_extra: int
    i_version_hi: int
    i_projid: int


INODE_EXTRA = Layout(InodeExtra, "<HHIIIiIII", 32)
#: Offset (from the inode start) just past each extra field: the field exists when
#: 128 + i_extra_isize >= this value.
INODE_EXTRA_FIELD_END = {
    "i_checksum_hi": 0x84,
    "i_ctime_extra": 0x88,
    "i_mtime_extra": 0x8C,
    "i_atime_extra": 0x90,
    "i_crtime": 0x94,
    "i_crtime_extra": 0x98,
    "i_version_hi": 0x9C,
    "i_projid": 0xA0,
}

#: The *_extra time fields: two epoch bits (bits 32-33 of the seconds) then nanoseconds << 2.
EXTRA_EPOCH_BITS = 2
EXTRA_EPOCH_MASK = (1 << EXTRA_EPOCH_BITS) - 1
EXTRA_NSEC_MASK = ~EXTRA_EPOCH_MASK & 0xFFFFFFFF

# ---- extent tree -----------------------------------------------------------------------------

EXTENT_MAGIC = 0xF30A
#: The kernel refuses deeper trees (EXT4_MAX_EXTENT_DEPTH).
EXTENT_MAX_DEPTH = 5
#: ee_len above this marks an uninitialised extent of (ee_len - this) blocks.
EXTENT_INIT_MAX_LEN = 1 << 15
#: The extent tree root in i_block: a header and room for four entries.
EXTENT_ROOT_ENTRIES = 4
#: An extent block ends with a 4-byte checksum after eh_max entries (struct ext4_extent_tail).
EXTENT_TAIL_SIZE = 4


class ExtentHeader(NamedTuple):
    eh_magic: int
    eh_entries: int
    eh_max: int
    eh_depth: int
    eh_generation: int


EXTENT_HEADER = Layout(ExtentHeader, "<HHHHI", 12)


class ExtentIndex(NamedTuple):
    ei_block: int
    ei_leaf_lo: int
    ei_leaf_hi: int
    ei_unused: int


EXTENT_INDEX = Layout(ExtentIndex, "<IIHH", 12)


class ExtentLeaf(NamedTuple):
    ee_block: int
    ee_len: int
    ee_start_hi: int
    ee_start_lo: int


EXTENT_LEAF = Layout(ExtentLeaf, "<IHHI", 12)
#: Index and leaf entries have the same size.
EXTENT_ENTRY_SIZE = 12

# ---- directories -----------------------------------------------------------------------------


class DirEntry2(NamedTuple):
    """A directory entry with the filetype feature (``struct ext4_dir_entry_2``); without it
    name_len is a __le16 whose high byte then reads as file_type here and must be ignored."""

    inode: int
    rec_len: int
    name_len: int
    file_type: int


DIR_ENTRY = Layout(DirEntry2, "<IHBB", 8)
DIR_NAME_MAX = 255
#: Entries are 4-byte aligned: 8 bytes of header, then the name padded.
DIR_ROUND = 4

#: file_type values (EXT4_FT_*).
FT_UNKNOWN = 0
FT_REG_FILE = 1
FT_DIR = 2
FT_CHRDEV = 3
FT_BLKDEV = 4
FT_FIFO = 5
FT_SOCK = 6
FT_SYMLINK = 7
#: A dir tail's file_type: the fake entry that holds a directory block's checksum.
FT_DIR_CSUM = 0xDE


class DirTail(NamedTuple):
    """The last 12 bytes of a directory leaf block under metadata_csum."""

    det_reserved_zero1: int
    det_rec_len: int
    det_reserved_zero2: int
    det_reserved_ft: int
    det_checksum: int


DIR_TAIL = Layout(DirTail, "<IHBBI", 12)

#: The root of an htree lives in directory block 0, behind fake "." and ".." entries.
DX_ROOT_INFO_OFFSET = 24


class DxRootInfo(NamedTuple):
    reserved_zero: int
    hash_version: int
    info_length: int
    indirect_levels: int
    unused_flags: int


DX_ROOT_INFO = Layout(DxRootInfo, "<IBBBB", 8)


class DxCountLimit(NamedTuple):
    """The header of a dx_entry array (the kernel's ``limit`` and ``count``); it takes the
    place of the first entry's hash."""

    dx_limit: int
    dx_count: int


DX_COUNT_LIMIT = Layout(DxCountLimit, "<HH", 4)


class DxEntry(NamedTuple):
    hash: int
    block: int


DX_ENTRY = Layout(DxEntry, "<II", 8)


class DxTail(NamedTuple):
    dt_reserved: int
    dt_checksum: int


DX_TAIL = Layout(DxTail, "<II", 8)

#: dx_root_info.hash_version values.
DX_HASH_LEGACY = 0
DX_HASH_HALF_MD4 = 1
DX_HASH_TEA = 2
DX_HASH_LEGACY_UNSIGNED = 3
DX_HASH_HALF_MD4_UNSIGNED = 4
DX_HASH_TEA_UNSIGNED = 5
DX_HASH_SIPHASH = 6
#: Without large_dir an htree has at most 2 levels of index (3 with it).
DX_MAX_LEVELS = 2
DX_MAX_LEVELS_LARGEDIR = 3

# ---- extended attributes ---------------------------------------------------------------------

XATTR_MAGIC = 0xEA020000
#: Entries are padded to 4 bytes; the list ends with four zero bytes.
XATTR_ROUND = 4


class XattrHeader(NamedTuple):
    """The 32-byte header of an xattr block (entries start right after it)."""

    h_magic: int
    h_refcount: int
    h_blocks: int
    h_hash: int
    h_checksum: int
    h_reserved: bytes


XATTR_HEADER = Layout(XattrHeader, "<IIIII12s", 32)
XATTR_HEADER_CHECKSUM_OFFSET = 0x10


class XattrIbodyHeader(NamedTuple):
    """In-inode xattrs start at 128 + i_extra_isize with this magic; value offsets there count
    from the first entry, just after it."""

    h_magic: int


XATTR_IBODY_HEADER = Layout(XattrIbodyHeader, "<I", 4)


class XattrEntry(NamedTuple):
    """An xattr entry; the name (e_name_len bytes) follows."""

    e_name_len: int
    e_name_index: int
    e_value_offs: int
    e_value_inum: int  # with ea_inode: the inode holding the value, else 0
    e_value_size: int
    e_hash: int


XATTR_ENTRY = Layout(XattrEntry, "<BBHIII", 16)

XATTR_INDEX_USER = 1
XATTR_INDEX_POSIX_ACL_ACCESS = 2
XATTR_INDEX_POSIX_ACL_DEFAULT = 3
XATTR_INDEX_TRUSTED = 4
XATTR_INDEX_LUSTRE = 5
XATTR_INDEX_SECURITY = 6
XATTR_INDEX_SYSTEM = 7
XATTR_INDEX_RICHACL = 8
XATTR_INDEX_ENCRYPTION = 9
XATTR_INDEX_HURD = 10

#: Name prefixes by index, as the kernel's and e2fsprogs' handlers spell them (the two ACL
#: indexes, and richacl, carry the whole name and an empty suffix). A writer picks the longest
#: prefix that matches a name; anything else cannot be stored on ext4.
XATTR_PREFIXES = {
    XATTR_INDEX_USER: "user.",
    XATTR_INDEX_POSIX_ACL_ACCESS: "system.posix_acl_access",
    XATTR_INDEX_POSIX_ACL_DEFAULT: "system.posix_acl_default",
    XATTR_INDEX_TRUSTED: "trusted.",
    XATTR_INDEX_SECURITY: "security.",
    XATTR_INDEX_SYSTEM: "system.",
    XATTR_INDEX_RICHACL: "system.richacl",
    XATTR_INDEX_HURD: "gnu.",
}
#: The system.data xattr holds inline data beyond i_block; it is not a user-visible xattr.
XATTR_INLINE_DATA_NAME = "data"

# ---- POSIX ACLs ------------------------------------------------------------------------------

#: ext4 stores ACLs compactly: a 4-byte header, 4-byte entries for the owner/group/mask/
#: other tags and 8-byte entries (with an id) for named users and groups.
EXT4_ACL_VERSION = 0x0001
#: The xattr value getxattr returns: a 4-byte header and 8-byte entries throughout.
POSIX_ACL_XATTR_VERSION = 0x0002
ACL_UNDEFINED_ID = 0xFFFFFFFF

ACL_USER_OBJ = 0x01
ACL_USER = 0x02
ACL_GROUP_OBJ = 0x04
ACL_GROUP = 0x08
ACL_MASK = 0x10
ACL_OTHER = 0x20


class AclHeader(NamedTuple):
    a_version: int


ACL_HEADER = Layout(AclHeader, "<I", 4)


class AclEntryShort(NamedTuple):
    e_tag: int
    e_perm: int


ACL_ENTRY_SHORT = Layout(AclEntryShort, "<HH", 4)


class AclEntry(NamedTuple):
    """An 8-byte ACL entry: ext4's for ACL_USER/ACL_GROUP, and every entry of the xattr form."""

    e_tag: int
    e_perm: int
    e_id: int


ACL_ENTRY = Layout(AclEntry, "<HHI", 8)

# ---- jbd2 journal (big-endian) ---------------------------------------------------------------

JBD2_MAGIC = 0xC03B3998
JBD2_DESCRIPTOR_BLOCK = 1
JBD2_COMMIT_BLOCK = 2
JBD2_SUPERBLOCK_V1 = 3
JBD2_SUPERBLOCK_V2 = 4
JBD2_REVOKE_BLOCK = 5
JBD2_FC_BLOCK = 6

JBD2_FEATURE_COMPAT_CHECKSUM = 0x1
JBD2_FEATURE_INCOMPAT_REVOKE = 0x1
JBD2_FEATURE_INCOMPAT_64BIT = 0x2
JBD2_FEATURE_INCOMPAT_ASYNC_COMMIT = 0x4
JBD2_FEATURE_INCOMPAT_CSUM_V2 = 0x8
JBD2_FEATURE_INCOMPAT_CSUM_V3 = 0x10
JBD2_FEATURE_INCOMPAT_FAST_COMMIT = 0x20

JBD2_CHECKSUM_TYPE_CRC32C = 4
JBD2_USERS_MAX = 48
JBD2_SUPERBLOCK_SIZE = 1024


class JournalSuperblock(NamedTuple):
    h_magic: int
    h_blocktype: int
    h_sequence: int
    s_blocksize: int
    s_maxlen: int
    s_first: int
    s_sequence: int
    s_start: int  # 0: the journal is empty (nothing to replay)
    s_errno: int
    s_feature_compat: int
    s_feature_incompat: int
    s_feature_ro_compat: int
    s_uuid: bytes
    s_nr_users: int
    s_dynsuper: int
    s_max_transaction: int
    s_max_trans_data: int
    s_checksum_type: int
    s_padding2: bytes
    s_num_fc_blks: int
    s_head: int
    s_padding: bytes
    s_checksum: int
    s_users: bytes  # 48 UUIDs of 16 bytes


JOURNAL_SUPERBLOCK = Layout(
    JournalSuperblock,
    ">IIIIIIIIiIII16sIIIIB3sII160sI768s",
    JBD2_SUPERBLOCK_SIZE,
)


def le32_words(data: bytes, count: int) -> Iterable[int]:
    """The ``count`` little-endian 32-bit words at the start of ``data`` (i_block, s_jnl_blocks,
    s_backup_bgs)."""
    return struct.unpack_from(f"<{count}I", data)
