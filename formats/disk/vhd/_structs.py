"""VHD on-disk structures: the hard disk footer, the dynamic disk header, parent locators.

Only layout lives here; what the fields mean for reading, writing and checking is in
reader.py, writer.py, locators.py and check.py. All numbers are big-endian. Checksums are the
one's complement of the byte sum of the structure with its checksum field taken as zero.

References: Microsoft "Virtual Hard Disk Image Format Specification", October 11, 2006,
version 1.0 ("Hard Disk Footer Format", "Dynamic Disk Header Format", "Block Allocation Table
and Data Blocks", "Implementing a Differencing Hard Disk"); QEMU block/vpc.c for the fields as
qemu-img writes them.
"""

from __future__ import annotations

import array
import uuid
from dataclasses import dataclass, field

from construct import Array, Bytes, Int8ub, Int16ub, Int32ub, Int64ub, Struct

FOOTER_COOKIE = b"conectix"
HEADER_COOKIE = b"cxsparse"
FOOTER_SIZE = 512
#: Images made before Virtual PC 2004 end with a 511-byte footer (no saved-state byte).
OLD_FOOTER_SIZE = 511
HEADER_SIZE = 1024
SECTOR = 512

#: Bit 1 of ``features`` is reserved and must always be set; bit 0 marks a temporary disk.
FEATURE_TEMPORARY = 0x1
FEATURE_RESERVED = 0x2
FILE_FORMAT_VERSION = 0x0001_0000
HEADER_VERSION = 0x0001_0000
#: ``data_offset`` of a fixed disk's footer, and of every dynamic header (the spec says
#: 0xFFFFFFFF, but Microsoft's tools set all 64 bits, as QEMU notes).
NO_OFFSET = 0xFFFF_FFFF_FFFF_FFFF

DISK_NONE = 0
DISK_FIXED = 2
DISK_DYNAMIC = 3
DISK_DIFFERENCING = 4
DISK_TYPE_NAMES = {DISK_FIXED: "fixed", DISK_DYNAMIC: "dynamic",
                   DISK_DIFFERENCING: "differencing"}

#: A BAT entry for a block that is not allocated.
BAT_FREE = 0xFFFF_FFFF
#: The array typecode of a 32-bit unsigned BAT entry on this platform.
U32 = "I" if array.array("I").itemsize == 4 else "L"

#: Seconds from the Unix epoch to 2000-01-01 00:00:00 UTC, the VHD timestamp origin.
VHD_EPOCH = 946_684_800

# Creator host OS codes.
HOST_WINDOWS = b"Wi2k"
HOST_MAC = b"Mac "

# Parent locator platform codes.
PLATFORM_NONE = b"\0\0\0\0"
PLATFORM_WI2R = b"Wi2r"  #: deprecated: a Windows relative path in the system codepage
PLATFORM_WI2K = b"Wi2k"  #: deprecated: a Windows absolute path in the system codepage
PLATFORM_W2RU = b"W2ru"  #: a Windows relative path, UTF-16 little-endian
PLATFORM_W2KU = b"W2ku"  #: a Windows absolute path, UTF-16 little-endian
PLATFORM_MAC = b"Mac "  #: a Mac OS alias record, stored as a blob
PLATFORM_MACX = b"MacX"  #: a file:// URL, UTF-8
PARENT_LOCATORS = 8

FooterStruct = Struct(
    "cookie" / Bytes(8),
    "features" / Int32ub,
    "file_format_version" / Int32ub,
    "data_offset" / Int64ub,
    "timestamp" / Int32ub,
    "creator_application" / Bytes(4),
    "creator_version" / Int32ub,
    "creator_host_os" / Bytes(4),
    "original_size" / Int64ub,
    "current_size" / Int64ub,
    "cylinders" / Int16ub,
    "heads" / Int8ub,
    "sectors_per_track" / Int8ub,
    "disk_type" / Int32ub,
    "checksum" / Int32ub,
    "unique_id" / Bytes(16),
    "saved_state" / Int8ub,
    "reserved" / Bytes(427),
)
FOOTER_CHECKSUM_AT = 64

ParentLocatorStruct = Struct(
    "platform_code" / Bytes(4),
    "platform_data_space" / Int32ub,
    "platform_data_length" / Int32ub,
    "reserved" / Int32ub,
    "platform_data_offset" / Int64ub,
)
PARENT_LOCATOR_SIZE = 24

DynamicHeaderStruct = Struct(
    "cookie" / Bytes(8),
    "data_offset" / Int64ub,
    "table_offset" / Int64ub,
    "header_version" / Int32ub,
    "max_table_entries" / Int32ub,
    "block_size" / Int32ub,
    "checksum" / Int32ub,
    "parent_unique_id" / Bytes(16),
    "parent_timestamp" / Int32ub,
    "reserved1" / Int32ub,
    "parent_unicode_name" / Bytes(512),
    "parent_locators" / Array(PARENT_LOCATORS, ParentLocatorStruct),
    "reserved2" / Bytes(256),
)
HEADER_CHECKSUM_AT = 36


def checksum(data: bytes, checksum_at: int) -> int:
    """The one's complement of the byte sum, the 4 checksum bytes counted as zero."""
    total = sum(data) - sum(data[checksum_at:checksum_at + 4])
    return ~total & 0xFFFF_FFFF


def bitmap_size(block_size: int) -> int:
    """Bytes of a block's sector bitmap: one bit per sector, padded to a whole sector."""
    bits = block_size // SECTOR
    return -(-bits // (8 * SECTOR)) * SECTOR


@dataclass
class Footer:
    """The hard disk footer (also the copy at offset 0 of dynamic and differencing disks)."""

    disk_type: int
    current_size: int
    original_size: int
    cylinders: int
    heads: int
    sectors_per_track: int
    data_offset: int
    timestamp: int
    creator_application: bytes
    creator_version: int
    creator_host_os: bytes
    unique_id: bytes
    features: int = FEATURE_RESERVED
    file_format_version: int = FILE_FORMAT_VERSION
    saved_state: int = 0
    checksum: int = 0
    cookie: bytes = FOOTER_COOKIE

    @classmethod
    def unpack(cls, raw: bytes) -> Footer:
        """Parse 512 bytes (a 511-byte old footer is padded with a zero by the caller)."""
        c = FooterStruct.parse(raw)
        return cls(
            disk_type=c.disk_type, current_size=c.current_size, original_size=c.original_size,
            cylinders=c.cylinders, heads=c.heads, sectors_per_track=c.sectors_per_track,
            data_offset=c.data_offset, timestamp=c.timestamp,
            creator_application=c.creator_application, creator_version=c.creator_version,
            creator_host_os=c.creator_host_os, unique_id=c.unique_id, features=c.features,
            file_format_version=c.file_format_version, saved_state=c.saved_state,
            checksum=c.checksum, cookie=c.cookie,
        )

    def pack(self) -> bytes:
        """The 512 footer bytes with a freshly computed checksum (stored in ``checksum``)."""
        fields = dict(
            cookie=self.cookie, features=self.features,
            file_format_version=self.file_format_version, data_offset=self.data_offset,
            timestamp=self.timestamp, creator_application=self.creator_application,
            creator_version=self.creator_version, creator_host_os=self.creator_host_os,
            original_size=self.original_size, current_size=self.current_size,
            cylinders=self.cylinders, heads=self.heads,
            sectors_per_track=self.sectors_per_track, disk_type=self.disk_type, checksum=0,
            unique_id=self.unique_id, saved_state=self.saved_state, reserved=bytes(427),
        )
        raw: bytes = FooterStruct.build(fields)
        self.checksum = checksum(raw, FOOTER_CHECKSUM_AT)
        return raw[:FOOTER_CHECKSUM_AT] + self.checksum.to_bytes(4, "big") \
            + raw[FOOTER_CHECKSUM_AT + 4:]

    @property
    def uuid(self) -> uuid.UUID:
        return uuid.UUID(bytes=self.unique_id)

    @property
    def chs_sectors(self) -> int:
        return self.cylinders * self.heads * self.sectors_per_track


@dataclass
class ParentLocator:
    """Where one platform's name for the parent disk is stored in the file."""

    platform_code: bytes = PLATFORM_NONE
    platform_data_space: int = 0
    platform_data_length: int = 0
    platform_data_offset: int = 0
    reserved: int = 0


@dataclass
class DynamicHeader:
    """The dynamic disk header of dynamic and differencing disks (1024 bytes)."""

    table_offset: int
    max_table_entries: int
    block_size: int
    parent_unique_id: bytes = bytes(16)
    parent_timestamp: int = 0
    parent_unicode_name: bytes = bytes(512)
    parent_locators: list[ParentLocator] = field(
        default_factory=lambda: [ParentLocator() for _ in range(PARENT_LOCATORS)])
    data_offset: int = NO_OFFSET
    header_version: int = HEADER_VERSION
    checksum: int = 0
    cookie: bytes = HEADER_COOKIE

    @classmethod
    def unpack(cls, raw: bytes) -> DynamicHeader:
        c = DynamicHeaderStruct.parse(raw)
        locators = [
            ParentLocator(platform_code=loc.platform_code,
                          platform_data_space=loc.platform_data_space,
                          platform_data_length=loc.platform_data_length,
                          platform_data_offset=loc.platform_data_offset, reserved=loc.reserved)
            for loc in c.parent_locators
        ]
        return cls(
            table_offset=c.table_offset, max_table_entries=c.max_table_entries,
            block_size=c.block_size, parent_unique_id=c.parent_unique_id,
            parent_timestamp=c.parent_timestamp, parent_unicode_name=c.parent_unicode_name,
            parent_locators=locators, data_offset=c.data_offset,
            header_version=c.header_version, checksum=c.checksum, cookie=c.cookie,
        )

    def pack(self) -> bytes:
        """The 1024 header bytes with a freshly computed checksum (stored in ``checksum``)."""
        locators = [dict(platform_code=loc.platform_code,
                         platform_data_space=loc.platform_data_space,
                         platform_data_length=loc.platform_data_length, reserved=loc.reserved,
                         platform_data_offset=loc.platform_data_offset)
                    for loc in self.parent_locators]
        raw: bytes = DynamicHeaderStruct.build(dict(
            cookie=self.cookie, data_offset=self.data_offset, table_offset=self.table_offset,
            header_version=self.header_version, max_table_entries=self.max_table_entries,
            block_size=self.block_size, checksum=0, parent_unique_id=self.parent_unique_id,
            parent_timestamp=self.parent_timestamp, reserved1=0,
            parent_unicode_name=self.parent_unicode_name, parent_locators=locators,
            reserved2=bytes(256),
        ))
        self.checksum = checksum(raw, HEADER_CHECKSUM_AT)
        return raw[:HEADER_CHECKSUM_AT] + self.checksum.to_bytes(4, "big") \
            + raw[HEADER_CHECKSUM_AT + 4:]
