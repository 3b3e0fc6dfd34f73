"""qcow2 on-disk structures: the header, its extensions, snapshot entries and table entry bits.

Only layout lives here; what the fields mean for reading and writing is in reader.py and
writer.py. All numbers are big-endian.

References: QEMU docs/interop/qcow2.txt ("Header", "Header extensions", "Feature name
table", "Cluster mapping", "Extended L2 Entries", "Snapshots", "Host cluster management").
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from construct import Bytes, Int8ub, Int16ub, Int32ub, Int64ub, Struct

MAGIC = b"QFI\xfb"

#: Version 2 headers end at byte 72; version 3 headers are at least 104 bytes.
HEADER_V2_LENGTH = 72
HEADER_V3_LENGTH = 104
#: With the compression_type field (byte 104) and padding to a multiple of 8.
HEADER_V3_WITH_COMPRESSION_LENGTH = 112

HeaderV2 = Struct(
    "magic" / Bytes(4),
    "version" / Int32ub,
    "backing_file_offset" / Int64ub,
    "backing_file_size" / Int32ub,
    "cluster_bits" / Int32ub,
    "size" / Int64ub,
    "crypt_method" / Int32ub,
    "l1_size" / Int32ub,
    "l1_table_offset" / Int64ub,
    "refcount_table_offset" / Int64ub,
    "refcount_table_clusters" / Int32ub,
    "nb_snapshots" / Int32ub,
    "snapshots_offset" / Int64ub,
)

HeaderV3Tail = Struct(
    "incompatible_features" / Int64ub,
    "compatible_features" / Int64ub,
    "autoclear_features" / Int64ub,
    "refcount_order" / Int32ub,
    "header_length" / Int32ub,
)

# Incompatible feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)
# Compatible and autoclear feature bits.
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

INCOMPAT_NAMES = {0: "dirty bit", 1: "corrupt bit", 2: "external data file",
                  3: "compression type", 4: "extended L2 entries"}

CRYPT_NONE, CRYPT_AES, CRYPT_LUKS = 0, 1, 2
COMPRESSION_ZLIB, COMPRESSION_ZSTD = 0, 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

# Header extension types.
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

ExtensionHeader = Struct("type" / Int32ub, "length" / Int32ub)
FeatureNameEntry = Struct("type" / Int8ub, "bit" / Int8ub, "name" / Bytes(46))
BitmapsExtension = Struct(
    "nb_bitmaps" / Int32ub,
    "reserved" / Int32ub,
    "bitmap_directory_size" / Int64ub,
    "bitmap_directory_offset" / Int64ub,
)
CryptoExtension = Struct("offset" / Int64ub, "length" / Int64ub)

SnapshotEntryFixed = Struct(
    "l1_table_offset" / Int64ub,
    "l1_size" / Int32ub,
    "id_str_size" / Int16ub,
    "name_size" / Int16ub,
    "date_sec" / Int32ub,
    "date_nsec" / Int32ub,
    "vm_clock_nsec" / Int64ub,
    "vm_state_size" / Int32ub,
    "extra_data_size" / Int32ub,
)
SNAPSHOT_FIXED_SIZE = 40

BitmapDirectoryEntryFixed = Struct(
    "bitmap_table_offset" / Int64ub,
    "bitmap_table_size" / Int32ub,
    "flags" / Int32ub,
    "type" / Int8ub,
    "granularity_bits" / Int8ub,
    "name_size" / Int16ub,
    "extra_data_size" / Int32ub,
)
BITMAP_DIR_FIXED_SIZE = 24

# L1 and refcount table entries: bits 9-55 are a cluster-aligned host offset.
L1E_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
L1E_RESERVED_MASK = 0x7F00_0000_0000_01FF
REFT_OFFSET_MASK = 0xFFFF_FFFF_FFFF_FE00
# L2 entries.
L2E_COPIED = 1 << 63
L2E_COMPRESSED = 1 << 62
L2E_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
L2E_ZERO = 1 << 0
L2E_STD_RESERVED_MASK = 0x3F00_0000_0000_01FE
#: Extended L2: the low 32 bits of the bitmap say "allocated", the high 32 bits "reads as zero".
SUBCLUSTERS = 32

#: Limits QEMU enforces, which we enforce too before allocating anything.
MAX_CLUSTER_BITS = 21
MIN_CLUSTER_BITS = 9
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
MAX_SNAPSHOTS = 65536
#: QEMU refuses a snapshot table larger than this (ids and names are up to 64 KiB each).
MAX_SNAPSHOT_TABLE_BYTES = 64 << 20
MAX_SNAPSHOT_EXTRA = 1024
MAX_BACKING_NAME = 1023
MAX_BITMAPS = 65535


def compressed_layout(cluster_bits: int) -> tuple[int, int]:
    """(offset mask, sector-count shift) of a compressed cluster descriptor."""
    csize_shift = 62 - (cluster_bits - 8)
    return (1 << csize_shift) - 1, csize_shift


def decode_compressed(entry: int, cluster_bits: int) -> tuple[int, int]:
    """The host byte offset and the number of bytes to read for a compressed cluster.

    The descriptor gives the offset and the count of *additional* 512-byte sectors after the
    one holding the offset; the data ends somewhere inside the last of them.
    """
    offset_mask, csize_shift = compressed_layout(cluster_bits)
    descriptor = entry & ((1 << 62) - 1)
    host = descriptor & offset_mask
    extra_sectors = descriptor >> csize_shift
    length = (extra_sectors + 1) * 512 - (host & 511)
    return host, length


def encode_compressed(host: int, length: int, cluster_bits: int) -> int:
    """The L2 entry for ``length`` compressed bytes at byte offset ``host``."""
    offset_mask, csize_shift = compressed_layout(cluster_bits)
    if host > offset_mask:
        raise ValueError("compressed cluster offset too large for this cluster size")
    extra_sectors = (host + length - 1) // 512 - host // 512
    return L2E_COMPRESSED | (extra_sectors << csize_shift) | host


def pad8(n: int) -> int:
    return (n + 7) & ~7


@dataclass
class Header:
    """The parsed header, version 2 fields filled in with their version 3 defaults."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = HEADER_V2_LENGTH
    compression_type: int = COMPRESSION_ZLIB

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // self.l2_entry_size

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    def pack(self) -> bytes:
        """The header bytes (without extensions), as long as ``header_length`` says."""
        base: bytes = HeaderV2.build(dict(
            magic=MAGIC, version=self.version,
            backing_file_offset=self.backing_file_offset,
            backing_file_size=self.backing_file_size, cluster_bits=self.cluster_bits,
            size=self.size, crypt_method=self.crypt_method, l1_size=self.l1_size,
            l1_table_offset=self.l1_table_offset,
            refcount_table_offset=self.refcount_table_offset,
            refcount_table_clusters=self.refcount_table_clusters,
            nb_snapshots=self.nb_snapshots, snapshots_offset=self.snapshots_offset,
        ))
        if self.version == 2:
            return base
        tail: bytes = HeaderV3Tail.build(dict(
            incompatible_features=self.incompatible_features,
            compatible_features=self.compatible_features,
            autoclear_features=self.autoclear_features,
            refcount_order=self.refcount_order, header_length=self.header_length,
        ))
        extra = b""
        if self.header_length > HEADER_V3_LENGTH:
            extra = bytes([self.compression_type]) + bytes(
                self.header_length - HEADER_V3_LENGTH - 1)
        return base + tail + extra


@dataclass
class Snapshot:
    """One internal snapshot, as ``qemu-img info`` lists it."""

    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int | None
    icount: int | None = None
    extra: bytes = field(default=b"", repr=False)
    #: Bytes of the table entry without its padding (fixed part, extra data, id, name).
    entry_size: int = 0

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {}
        if self.icount is not None:
            out["icount"] = self.icount
        out.update({
            "vm-clock-nsec": self.vm_clock_nsec % 1_000_000_000,
            "name": self.name,
            "date-sec": self.date_sec,
            "date-nsec": self.date_nsec,
            "vm-clock-sec": self.vm_clock_nsec // 1_000_000_000,
            "id": self.id,
            "vm-state-size": self.vm_state_size,
        })
        return out


def pack_extension(ext_type: int, data: bytes) -> bytes:
    return struct.pack(">II", ext_type, len(data)) + data + bytes(pad8(len(data)) - len(data))


# ---- used by check.py (consistency check and repair) ----------------------------------------
#: Refcount table entries: bits 0-8 are reserved ("Host cluster management").
REFT_RESERVED_MASK = 0x1FF
#: Bitmap table entries ("Bitmap table"): offset bits 9-55; bit 0 (all ones) only without one.
BME_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
BME_RESERVED_MASK = 0xFF00_0000_0000_01FE
BME_FLAG_ALL_ONES = 1
#: Extended L2 subcluster bitmap: the low half says "allocated", the high half "reads as zero".
L2_BITMAP_ALL_ALLOC = 0xFFFF_FFFF
#: Header byte offsets a repair rewrites: refcount_table_offset (u64) followed by
#: refcount_table_clusters (u32), and the v3 incompatible / autoclear feature words (u64).
HDR_REFCOUNT_TABLE_OFFSET = 48
HDR_INCOMPATIBLE_FEATURES = 72
HDR_AUTOCLEAR_FEATURES = 88
AUTOCLEAR_KNOWN = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW
#: SnapshotEntryFixed as a ``struct`` format, for tables of thousands of entries.
SNAPSHOT_FIXED_FORMAT = ">QIHHIIQII"
