"""On-disk layouts the ext4 writer packs: superblock, group descriptor, inode, extent tree,
directory entries and htree nodes, extended attributes, the jbd2 journal superblock.

Kept apart from the writer's logic (the project's rule); the writer packs with ``struct`` and
these offsets and constants. All ext4 fields are little-endian; the jbd2 superblock is
big-endian.

References: Linux ``Documentation/filesystems/ext4/`` (super.rst, group_descr.rst,
inodes.rst, ifork.rst, directory.rst, attributes.rst, journal.rst, checksums.rst).
"""

from __future__ import annotations

import struct

# ---- superblock -------------------------------------------------------------------------------
SUPERBLOCK_OFFSET = 1024
SUPERBLOCK_SIZE = 1024
EXT4_MAGIC = 0xEF53
STATE_CLEAN = 0x0001
ERRORS_CONTINUE = 1
REV_DYNAMIC = 1
GOOD_OLD_INODE_SIZE = 128
FIRST_INO = 11

COMPAT_HAS_JOURNAL = 0x0004
COMPAT_EXT_ATTR = 0x0008
COMPAT_DIR_INDEX = 0x0020

INCOMPAT_FILETYPE = 0x0002
INCOMPAT_EXTENTS = 0x0040
INCOMPAT_64BIT = 0x0080
INCOMPAT_FLEX_BG = 0x0200

RO_COMPAT_SPARSE_SUPER = 0x0001
RO_COMPAT_LARGE_FILE = 0x0002
RO_COMPAT_HUGE_FILE = 0x0008
RO_COMPAT_DIR_NLINK = 0x0020
RO_COMPAT_EXTRA_ISIZE = 0x0040
RO_COMPAT_METADATA_CSUM = 0x0400

FLAGS_SIGNED_HASH = 0x0001
DEFM_XATTR_USER = 0x0004
DEFM_ACL = 0x0008
HASH_HALF_MD4 = 1
JNL_BACKUP_BLOCKS = 1
CHECKSUM_CRC32C = 1
LOG_GROUPS_PER_FLEX = 4

# Offsets inside the superblock of the fields the writer sets (super.rst).
SB_INODES_COUNT = 0x00
SB_BLOCKS_COUNT_LO = 0x04
SB_R_BLOCKS_COUNT_LO = 0x08
SB_FREE_BLOCKS_COUNT_LO = 0x0C
SB_FREE_INODES_COUNT = 0x10
SB_FIRST_DATA_BLOCK = 0x14
SB_LOG_BLOCK_SIZE = 0x18
SB_LOG_CLUSTER_SIZE = 0x1C
SB_BLOCKS_PER_GROUP = 0x20
SB_CLUSTERS_PER_GROUP = 0x24
SB_INODES_PER_GROUP = 0x28
SB_MTIME = 0x2C
SB_WTIME = 0x30
SB_MAX_MNT_COUNT = 0x36
SB_MAGIC = 0x38
SB_STATE = 0x3A
SB_ERRORS = 0x3C
SB_LASTCHECK = 0x40
SB_REV_LEVEL = 0x4C
SB_FIRST_INO = 0x54
SB_INODE_SIZE = 0x58
SB_BLOCK_GROUP_NR = 0x5A
SB_FEATURE_COMPAT = 0x5C
SB_FEATURE_INCOMPAT = 0x60
SB_FEATURE_RO_COMPAT = 0x64
SB_UUID = 0x68
SB_VOLUME_NAME = 0x78
SB_JOURNAL_INUM = 0xE0
SB_HASH_SEED = 0xEC
SB_DEF_HASH_VERSION = 0xFC
SB_JNL_BACKUP_TYPE = 0xFD
SB_DESC_SIZE = 0xFE
SB_DEFAULT_MOUNT_OPTS = 0x100
SB_MKFS_TIME = 0x108
SB_JNL_BLOCKS = 0x10C
SB_BLOCKS_COUNT_HI = 0x150
SB_R_BLOCKS_COUNT_HI = 0x154
SB_FREE_BLOCKS_COUNT_HI = 0x158
SB_MIN_EXTRA_ISIZE = 0x15C
SB_WANT_EXTRA_ISIZE = 0x15E
SB_FLAGS = 0x160
SB_LOG_GROUPS_PER_FLEX = 0x174
SB_CHECKSUM_TYPE = 0x175
SB_WTIME_HI = 0x274
SB_MKFS_TIME_HI = 0x276
SB_LASTCHECK_HI = 0x277
SB_CHECKSUM = 0x3FC

# ---- group descriptor (64-byte form, 64bit feature) -------------------------------------------
DESC_SIZE = 64
BG_ITABLE_ZEROED = 0x0004
#: bg_block_bitmap_lo, bg_inode_bitmap_lo, bg_inode_table_lo, free blocks lo, free inodes lo,
#: used dirs lo, flags, exclude bitmap lo, block bitmap csum lo, inode bitmap csum lo,
#: itable unused lo, checksum, then the _hi halves.
GROUP_DESC = struct.Struct("<IIIHHHHIHHHHIIIHHHHIHHI")
GD_CHECKSUM_OFFSET = 0x1E

# ---- inode --------------------------------------------------------------------------------------
S_IFIFO = 0o010000
S_IFCHR = 0o020000
S_IFDIR = 0o040000
S_IFBLK = 0o060000
S_IFREG = 0o100000
S_IFLNK = 0o120000
S_IFSOCK = 0o140000

INODE_FL_INDEX = 0x00001000
INODE_FL_EXTENTS = 0x00080000
EXTRA_ISIZE = 32
#: i_mode, i_uid, i_size_lo, i_atime, i_ctime, i_mtime, i_dtime, i_gid, i_links_count,
#: i_blocks_lo, i_flags, l_i_version, i_block (60 bytes), i_generation, i_file_acl_lo,
#: i_size_high, i_obso_faddr, l_i_blocks_high, l_i_file_acl_high, l_i_uid_high, l_i_gid_high,
#: l_i_checksum_lo, l_i_reserved, i_extra_isize, i_checksum_hi, i_ctime_extra, i_mtime_extra,
#: i_atime_extra, i_crtime, i_crtime_extra, i_version_hi, i_projid.
INODE = struct.Struct("<HHIIIIIHHIII60sIIIIHHHHHHHHIIIIIII")
INODE_CHECKSUM_LO = 0x7C
INODE_CHECKSUM_HI = 0x82
INODE_BLOCK_OFFSET = 0x28
INODE_BLOCK_SIZE = 60
FAST_SYMLINK_MAX = 59  # a target shorter than i_block (60 bytes) lives in the inode
INLINE_XATTR_OFFSET = GOOD_OLD_INODE_SIZE + EXTRA_ISIZE

# ---- extent tree ------------------------------------------------------------------------------
EXTENT_MAGIC = 0xF30A
EXTENT_HEADER = struct.Struct("<HHHHI")  # magic, entries, max, depth, generation
EXTENT_LEAF = struct.Struct("<IHHI")  # ee_block, ee_len, ee_start_hi, ee_start_lo
EXTENT_INDEX = struct.Struct("<IIHH")  # ei_block, ei_leaf_lo, ei_leaf_hi, unused
EXTENT_ENTRY_SIZE = 12
EXTENT_TAIL_SIZE = 4
#: The longest initialized extent (the top bit of ee_len marks an uninitialized one).
EXTENT_MAX_LEN = 32768
INODE_EXTENT_SLOTS = 4

# ---- directories ------------------------------------------------------------------------------
DIRENT_HEADER = struct.Struct("<IHBB")  # inode, rec_len, name_len, file_type
DIR_TAIL = struct.Struct("<IHBBI")  # reserved 0, rec_len 12, 0, 0xDE, checksum
DIR_TAIL_SIZE = 12
DIR_TAIL_FT = 0xDE
FT_REG_FILE = 1
FT_DIR = 2
FT_CHRDEV = 3
FT_BLKDEV = 4
FT_FIFO = 5
FT_SOCK = 6
FT_SYMLINK = 7
DX_ROOT_INFO = struct.Struct("<IBBBB")  # reserved 0, hash_version, info_length 8, levels, flags
DX_COUNT_LIMIT = struct.Struct("<HHI")  # limit, count, block of the first (hash 0) entry
DX_ENTRY = struct.Struct("<II")  # hash, block
DX_TAIL = struct.Struct("<II")  # reserved, checksum
DX_ROOT_COUNT_OFFSET = 32  # "." (12) + ".." header and name (12) + dx_root_info (8)
DX_NODE_COUNT_OFFSET = 8  # an empty fake dirent spanning the block
NAME_MAX = 255
LINK_MAX = 65000

# ---- extended attributes ----------------------------------------------------------------------
XATTR_MAGIC = 0xEA020000
XATTR_BLOCK_HEADER = struct.Struct("<IIIII12x")  # magic, refcount, blocks, hash, checksum
XATTR_BLOCK_CHECKSUM_OFFSET = 16
XATTR_ENTRY = struct.Struct("<BBHIII")  # name_len, name_index, value_offs, value_inum, size, hash
XATTR_INDEX_USER = 1
XATTR_INDEX_POSIX_ACL_ACCESS = 2
XATTR_INDEX_POSIX_ACL_DEFAULT = 3
XATTR_INDEX_TRUSTED = 4
XATTR_INDEX_SECURITY = 6
#: Name prefixes and their indexes; the stored name is what follows the prefix.
XATTR_PREFIXES = (
    ("user.", XATTR_INDEX_USER),
    ("trusted.", XATTR_INDEX_TRUSTED),
    ("security.", XATTR_INDEX_SECURITY),
)
XATTR_ACL_NAMES = {
    "system.posix_acl_access": XATTR_INDEX_POSIX_ACL_ACCESS,
    "system.posix_acl_default": XATTR_INDEX_POSIX_ACL_DEFAULT,
}

# POSIX ACLs: the VFS form getxattr returns, and ext4's compact on-disk form (acl.h).
POSIX_ACL_XATTR_VERSION = 2
EXT4_ACL_VERSION = 1
ACL_USER_OBJ = 0x01
ACL_USER = 0x02
ACL_GROUP_OBJ = 0x04
ACL_GROUP = 0x08
ACL_MASK = 0x10
ACL_OTHER = 0x20
ACL_XATTR_ENTRY = struct.Struct("<HHI")  # tag, perm, id
ACL_EXT4_SHORT = struct.Struct("<HH")  # tag, perm
ACL_EXT4_FULL = struct.Struct("<HHI")  # tag, perm, id (ACL_USER, ACL_GROUP only)

# ---- jbd2 journal superblock (big-endian) -----------------------------------------------------
JBD2_MAGIC = 0xC03B3998
JBD2_SUPERBLOCK_V2 = 4
#: magic, blocktype, sequence, blocksize, maxlen, first, sequence, start, errno, compat,
#: incompat, ro_compat, uuid, nr_users.
JBD2_SUPERBLOCK = struct.Struct(">IIIIIIIIIIII16sI")
JOURNAL_INO = 8
ROOT_INO = 2
LOST_FOUND_INO = 11
