"""VHDX on-disk structures: the file identifier, headers, region table, metadata table and
items, parent locator, BAT entry bits and the log's entries, descriptors and data sectors.

Only layout and the constants the spec fixes live here; what they mean when reading, writing
and checking is in reader.py, log.py, writer.py and check.py. Every number is little-endian;
GUIDs are stored in Microsoft's mixed-endian layout (``uuid.UUID.bytes_le``).

References: [MS-VHDX] "Virtual Hard Disk v2 (VHDX) File Format", sections 2.1 (layout),
2.2 (file type identifier, headers, region table), 2.3 (log), 2.5 (BAT), 2.6 (metadata
region and its known items, parent locator).
"""

from __future__ import annotations

import uuid

from construct import Bytes, Int16ul, Int32ul, Int64ul, Struct

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

# ---- 2.1 layout: the 1 MiB header section -------------------------------------------------

#: Every region, the log and every block are placed in 1 MiB units.
ALIGNMENT = MiB
HEADER_SECTION_SIZE = MiB
FILE_ID_OFFSET = 0
HEADER_OFFSETS = (64 * KiB, 128 * KiB)
REGION_TABLE_OFFSETS = (192 * KiB, 256 * KiB)

# ---- 2.2.1 file type identifier -------------------------------------------------------------

FILE_SIGNATURE = b"vhdxfile"
#: The creator is an optional UTF-16 string of at most 256 code units after the signature.
CREATOR_BYTES = 512

# ---- 2.2.2 header -----------------------------------------------------------------------------

HEADER_SIGNATURE = b"head"
#: The checksum covers the whole 4 KiB header structure, with its own field taken as zero.
HEADER_SIZE = 4 * KiB
HEADER_VERSION = 1
LOG_VERSION = 0
CHECKSUM_OFFSET = 4  # in headers, region tables and log entries alike

Header = Struct(
    "signature" / Bytes(4),
    "checksum" / Int32ul,
    "sequence_number" / Int64ul,
    "file_write_guid" / Bytes(16),
    "data_write_guid" / Bytes(16),
    "log_guid" / Bytes(16),
    "log_version" / Int16ul,
    "version" / Int16ul,
    "log_length" / Int32ul,
    "log_offset" / Int64ul,
)
HEADER_FIELDS_SIZE = 80

# ---- 2.2.3 region table ---------------------------------------------------------------------

REGION_SIGNATURE = b"regi"
REGION_TABLE_SIZE = 64 * KiB
MAX_REGION_ENTRIES = 2047

RegionTableHeader = Struct(
    "signature" / Bytes(4),
    "checksum" / Int32ul,
    "entry_count" / Int32ul,
    "reserved" / Int32ul,
)
REGION_HEADER_SIZE = 16

RegionTableEntry = Struct(
    "guid" / Bytes(16),
    "file_offset" / Int64ul,
    "length" / Int32ul,
    "required" / Int32ul,  # bit 0: an implementation that does not know the region must refuse
)
REGION_ENTRY_SIZE = 32
REGION_REQUIRED = 1


def guid(text: str) -> bytes:
    """The on-disk bytes of a GUID written the usual way."""
    return uuid.UUID(text).bytes_le


def guid_text(raw: bytes) -> str:
    """A GUID read from disk, written the usual way (lower case, no braces)."""
    return str(uuid.UUID(bytes_le=bytes(raw)))


ZERO_GUID = bytes(16)

# 2.2.3.2 known regions
BAT_REGION = guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_REGION = guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
REGION_NAMES = {BAT_REGION: "BAT", METADATA_REGION: "metadata"}

# ---- 2.5 BAT --------------------------------------------------------------------------------

BAT_ENTRY_SIZE = 8
#: Bits 0-2: state; bits 3-19: reserved (zero); bits 20-63: file offset in MiB.
BAT_STATE_MASK = 0x7
BAT_RESERVED_MASK = 0xF_FFF8
BAT_OFFSET_SHIFT = 20

# 2.5.1.1 payload block states (4 and 5 are reserved; 5 was UNMAPPED in the 0.95 draft)
PAYLOAD_BLOCK_NOT_PRESENT = 0
PAYLOAD_BLOCK_UNDEFINED = 1
PAYLOAD_BLOCK_ZERO = 2
PAYLOAD_BLOCK_UNMAPPED = 3
PAYLOAD_BLOCK_UNMAPPED_V095 = 5
PAYLOAD_BLOCK_FULLY_PRESENT = 6
PAYLOAD_BLOCK_PARTIALLY_PRESENT = 7
PAYLOAD_STATE_NAMES = {
    0: "NOT_PRESENT", 1: "UNDEFINED", 2: "ZERO", 3: "UNMAPPED", 4: "reserved state 4",
    5: "UNMAPPED (0.95 draft)", 6: "FULLY_PRESENT", 7: "PARTIALLY_PRESENT",
}

# 2.5.1.2 sector bitmap block states
SB_BLOCK_NOT_PRESENT = 0
SB_BLOCK_PRESENT = 6
#: A sector bitmap block is always 1 MiB and covers 2**23 logical sectors (one chunk).
SECTOR_BITMAP_BLOCK_SIZE = MiB
SECTORS_PER_BITMAP_BLOCK = 1 << 23

# ---- 2.6 metadata region --------------------------------------------------------------------

METADATA_SIGNATURE = b"metadata"
METADATA_TABLE_SIZE = 64 * KiB
MAX_METADATA_ENTRIES = 2047
#: Items start after the 64 KiB table; none may be longer than 1 MiB.
METADATA_ITEMS_MIN_OFFSET = 64 * KiB
METADATA_ITEM_MAX_LENGTH = MiB

MetadataTableHeader = Struct(
    "signature" / Bytes(8),
    "reserved" / Int16ul,
    "entry_count" / Int16ul,
    "reserved2" / Bytes(20),
)
METADATA_HEADER_SIZE = 32

MetadataTableEntry = Struct(
    "item_id" / Bytes(16),
    "offset" / Int32ul,
    "length" / Int32ul,
    "flags" / Int32ul,
    "reserved" / Int32ul,
)
METADATA_ENTRY_SIZE = 32
META_IS_USER = 1 << 0
META_IS_VIRTUAL_DISK = 1 << 1
META_IS_REQUIRED = 1 << 2

# 2.6.2 known metadata items
FILE_PARAMETERS = guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE83_DATA = guid("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE = guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE = guid("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR = guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
METADATA_NAMES = {
    FILE_PARAMETERS: "file parameters",
    VIRTUAL_DISK_SIZE: "virtual disk size",
    PAGE83_DATA: "page 83 data",
    LOGICAL_SECTOR_SIZE: "logical sector size",
    PHYSICAL_SECTOR_SIZE: "physical sector size",
    PARENT_LOCATOR: "parent locator",
}
#: The fixed length of each known item (the parent locator's varies).
METADATA_ITEM_SIZES = {
    FILE_PARAMETERS: 8, VIRTUAL_DISK_SIZE: 8, PAGE83_DATA: 16,
    LOGICAL_SECTOR_SIZE: 4, PHYSICAL_SECTOR_SIZE: 4,
}

FileParameters = Struct("block_size" / Int32ul, "flags" / Int32ul)
PARAM_LEAVE_BLOCKS_ALLOCATED = 1 << 0
PARAM_HAS_PARENT = 1 << 1

MIN_BLOCK_SIZE = MiB
MAX_BLOCK_SIZE = 256 * MiB
MAX_VIRTUAL_DISK_SIZE = 64 * TiB
SECTOR_SIZES = (512, 4096)

# 2.6.2.6 parent locator
PARENT_LOCATOR_VHDX = guid("B04AEFB7-D19E-4A81-B789-25B8E9445913")
ParentLocatorHeader = Struct(
    "locator_type" / Bytes(16),
    "reserved" / Int16ul,
    "key_value_count" / Int16ul,
)
PARENT_LOCATOR_HEADER_SIZE = 20
ParentLocatorEntry = Struct(
    "key_offset" / Int32ul,
    "value_offset" / Int32ul,
    "key_length" / Int16ul,
    "value_length" / Int16ul,
)
PARENT_LOCATOR_ENTRY_SIZE = 12

# ---- 2.3 log --------------------------------------------------------------------------------

LOG_SECTOR_SIZE = 4 * KiB
LOG_ENTRY_SIGNATURE = b"loge"
LogEntryHeader = Struct(
    "signature" / Bytes(4),
    "checksum" / Int32ul,
    "entry_length" / Int32ul,
    "tail" / Int32ul,
    "sequence_number" / Int64ul,
    "descriptor_count" / Int32ul,
    "reserved" / Int32ul,
    "log_guid" / Bytes(16),
    "flushed_file_offset" / Int64ul,
    "last_file_offset" / Int64ul,
)
LOG_ENTRY_HEADER_SIZE = 64

#: Zero and data descriptors share one 32-byte shape; the signature tells them apart.
ZERO_DESCRIPTOR_SIGNATURE = b"zero"
DATA_DESCRIPTOR_SIGNATURE = b"desc"
ZeroDescriptor = Struct(
    "signature" / Bytes(4),
    "reserved" / Int32ul,
    "zero_length" / Int64ul,
    "file_offset" / Int64ul,
    "sequence_number" / Int64ul,
)
DataDescriptor = Struct(
    "signature" / Bytes(4),
    "trailing_bytes" / Bytes(4),
    "leading_bytes" / Bytes(8),
    "file_offset" / Int64ul,
    "sequence_number" / Int64ul,
)
LOG_DESCRIPTOR_SIZE = 32

#: A data sector keeps bytes 8..4091 of the sector it restores; the descriptor keeps the rest.
DATA_SECTOR_SIGNATURE = b"data"
DataSector = Struct(
    "signature" / Bytes(4),
    "sequence_high" / Int32ul,
    "data" / Bytes(4084),
    "sequence_low" / Int32ul,
)


def descriptor_sectors(count: int) -> int:
    """Sectors holding the entry header and ``count`` descriptors (126 fit in the first)."""
    return (LOG_ENTRY_HEADER_SIZE + count * LOG_DESCRIPTOR_SIZE + LOG_SECTOR_SIZE - 1) \
        // LOG_SECTOR_SIZE


def round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit
