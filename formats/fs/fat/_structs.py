"""FAT on-disk structures (boot sector, FSInfo, directory entries) and their constants.

Only layout lives here; what the fields mean for reading and writing is in reader.py and
writer.py. Every number is little-endian. The boot sector's BIOS Parameter Block (BPB) is
common to all FAT types up to offset 36; from there FAT12/16 and FAT32 each have their own
extension. Directory entries are 32 bytes; a long-name (VFAT) entry reuses the same 32 bytes
with attribute 0x0F, and is parsed with ``struct`` because directories hold thousands of them.

References: Microsoft "FAT: General Overview of On-Disk Format" (fatgen103, version 1.03,
2000): "Boot Sector and BPB", "FAT Data Structure", "FAT32 FSInfo Sector Structure",
"FAT Directory Structure", "FAT Long Directory Entries".
"""

from __future__ import annotations

import struct

from construct import Bytes, Const, Int8ul, Int16ul, Int32ul, Padding, Struct

# ---- boot sector -----------------------------------------------------------------------------

BOOT_SIGNATURE = b"\x55\xaa"
BOOT_SIGNATURE_OFFSET = 510
#: The first byte of a boot sector: a short jump (EB xx 90) or a near jump (E9 xx xx).
JUMP_OPCODES = frozenset({0xEB, 0xE9})
SECTOR_SIZES = frozenset({512, 1024, 2048, 4096})
SECTORS_PER_CLUSTER = frozenset(1 << i for i in range(8))  # 1..128

#: Offset of the FAT12/16 extended BPB, and of the FAT32 one, in the boot sector.
EXT_BPB_OFFSET = 36
#: The FAT12/16 "file system type" string (informational, but every formatter writes it).
FAT16_TYPE_OFFSET = 54
FAT32_TYPE_OFFSET = 82
TYPE_STRINGS = (b"FAT12   ", b"FAT16   ", b"FAT32   ")
#: The extended boot signature saying that volume id, label and type string are present.
EXTENDED_BOOT_SIGNATURE = 0x29
#: The label a formatter writes when the volume has none.
NO_NAME_LABEL = b"NO NAME    "

Bpb = Struct(
    "jump" / Bytes(3),
    "oem_name" / Bytes(8),
    "bytes_per_sector" / Int16ul,
    "sectors_per_cluster" / Int8ul,
    "reserved_sectors" / Int16ul,
    "num_fats" / Int8ul,
    "root_entries" / Int16ul,
    "total_sectors_16" / Int16ul,
    "media" / Int8ul,
    "fat_size_16" / Int16ul,
    "sectors_per_track" / Int16ul,
    "num_heads" / Int16ul,
    "hidden_sectors" / Int32ul,
    "total_sectors_32" / Int32ul,
)

#: The tail both extended BPBs share: BIOS drive, the extended boot signature, and the volume
#: id, label and type string it vouches for.
_VOLUME_FIELDS = (
    "drive_number" / Int8ul,
    Padding(1),
    "boot_signature" / Int8ul,
    "volume_id" / Int32ul,
    "label" / Bytes(11),
    "fs_type" / Bytes(8),
)

#: The FAT12/16 extended BPB at offset 36.
ExtBpb16 = Struct(*_VOLUME_FIELDS)

#: The FAT32 extended BPB at offset 36.
ExtBpb32 = Struct(
    "fat_size_32" / Int32ul,
    "ext_flags" / Int16ul,  # bit 7: mirroring off, bits 0-3 then name the one active FAT
    "fs_version" / Int16ul,
    "root_cluster" / Int32ul,
    "fsinfo_sector" / Int16ul,
    "backup_boot_sector" / Int16ul,
    Padding(12),
    *_VOLUME_FIELDS,
)

EXT_FLAGS_NO_MIRROR = 0x80
EXT_FLAGS_ACTIVE_FAT = 0x0F

#: Where the boot code starts after a FAT32 BPB (the jump at offset 0 lands here).
FAT32_BOOT_CODE_OFFSET = 90

# ---- FSInfo (FAT32) --------------------------------------------------------------------------

FsInfo = Struct(
    "lead_signature" / Const(0x41615252, Int32ul),
    Padding(480),
    "struct_signature" / Const(0x61417272, Int32ul),
    "free_count" / Int32ul,
    "next_free" / Int32ul,
    Padding(12),
    "trail_signature" / Const(0xAA550000, Int32ul),
)
FSINFO_UNKNOWN = 0xFFFFFFFF

# ---- the FAT ---------------------------------------------------------------------------------

#: fatgen103's thresholds: the cluster count alone decides the FAT type.
FAT12_MAX_CLUSTERS = 4084
FAT16_MAX_CLUSTERS = 65524
#: The largest FAT32 cluster count (entries are 28 bits; the top values are reserved).
FAT32_MAX_CLUSTERS = 0x0FFFFFF5 - 2
FAT32_ENTRY_MASK = 0x0FFFFFFF
#: The first cluster number of the data area.
FIRST_CLUSTER = 2
#: Per FAT width: (end-of-chain minimum, bad-cluster mark).
FAT_MARKS = {12: (0xFF8, 0xFF7), 16: (0xFFF8, 0xFFF7), 32: (0x0FFFFFF8, 0x0FFFFFF7)}
FAT32_END_OF_CHAIN = 0x0FFFFFFF
#: FAT[0] holds the media byte in its low 8 bits, every other bit set; FAT[1] is all ones.
FAT32_ENTRY0_BASE = 0x0FFFFF00

# ---- directory entries -----------------------------------------------------------------------

DIR_ENTRY_SIZE = 32
#: A directory holds at most 65536 entries (fatgen103: "the maximum directory size").
MAX_DIR_ENTRIES = 65536

#: name(11) attr nt_flags crt_tenth crt_time crt_date acc_date clus_hi wrt_time wrt_date
#: clus_lo size
DirEntry = struct.Struct("<11sBBBHHHHHHHI")
#: ord name1(10) attr type checksum name2(12) clus_lo(always 0) name3(4)
LfnEntry = struct.Struct("<B10sBBB12sH4s")

ATTR_READ_ONLY = 0x01
ATTR_HIDDEN = 0x02
ATTR_SYSTEM = 0x04
ATTR_VOLUME_ID = 0x08
ATTR_DIRECTORY = 0x10
ATTR_ARCHIVE = 0x20
ATTR_LONG_NAME = ATTR_READ_ONLY | ATTR_HIDDEN | ATTR_SYSTEM | ATTR_VOLUME_ID
ATTR_LONG_NAME_MASK = 0x3F

#: Windows NT's case flags (the byte fatgen103 calls DIR_NTRes): the short name's base or
#: extension is shown in lower case, so "readme.txt" needs no long-name entry.
NT_LOWER_BASE = 0x08
NT_LOWER_EXT = 0x10

#: First name byte values with a meaning of their own.
ENTRY_END = 0x00
ENTRY_DELETED = 0xE5
#: A real first byte 0xE5 (a Kanji lead byte) is stored as 0x05.
ENTRY_KANJI_E5 = 0x05

DOT_NAME = b".          "
DOTDOT_NAME = b"..         "

#: Long-name entries: ``ord`` has this bit on the last (first stored) entry of a name.
LFN_LAST = 0x40
LFN_ORDINAL_MASK = 0x3F
#: 13 UTF-16 code units per entry, at most 255 units per name (20 entries).
LFN_CHARS_PER_ENTRY = 13
LFN_MAX_UNITS = 255
LFN_MAX_ENTRIES = 20

# ---- dates and times -------------------------------------------------------------------------

#: DOS dates count years from 1980 in 7 bits.
DOS_EPOCH_YEAR = 1980
DOS_LAST_YEAR = 2107
#: The OEM code page of short names: IBM PC's 437, the default of Linux and mtools.
SHORT_NAME_CODEPAGE = "cp437"
