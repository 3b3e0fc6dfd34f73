"""VMDK on-disk structures: the sparse extent header, stream markers, and the descriptor grammar.

Only layout and vocabulary live here; reader.py, writer.py and check.py give them meaning.
Every binary number is little-endian; sizes and offsets in headers, grain directories and
grain tables count 512-byte sectors.

References: VMware "Virtual Disk Format 5.0" technical note ("The Descriptor File",
"Hosted Sparse Extent Header", "Grain Directories and Grain Tables", "Stream-Optimized
Compressed Sparse Extents"), and "Virtual Disk Format 1.1" for the same structures.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from construct import Bytes, Int8ul, Int16ul, Int32ul, Int64ul, Struct

SECTOR = 512

#: "KDMV" on disk: the little-endian 32-bit number 0x564d444b ("VMDK").
MAGIC = b"KDMV"
#: The magic of VMDK3 / ESX "COWD" sparse extents (vmfsSparse), which we recognise, not read.
COWD_MAGIC = b"COWD"

# ---- the sparse extent header (one sector) ---------------------------------------------------

SparseExtentHeader = Struct(
    "magic" / Bytes(4),
    "version" / Int32ul,
    "flags" / Int32ul,
    "capacity" / Int64ul,  # sectors of guest data in this extent
    "grain_size" / Int64ul,  # sectors per grain
    "descriptor_offset" / Int64ul,  # sector of an embedded descriptor, 0 if none
    "descriptor_size" / Int64ul,  # its size in sectors
    "num_gtes_per_gt" / Int32ul,
    "rgd_offset" / Int64ul,  # redundant grain directory (with FLAG_REDUNDANT)
    "gd_offset" / Int64ul,  # grain directory, or GD_AT_END in a stream's leading header
    "overhead" / Int64ul,  # sectors before the first grain
    "unclean_shutdown" / Int8ul,
    "single_end_line_char" / Bytes(1),
    "non_end_line_char" / Bytes(1),
    "double_end_line_char1" / Bytes(1),
    "double_end_line_char2" / Bytes(1),
    "compress_algorithm" / Int16ul,
    "pad" / Bytes(433),
)
HEADER_SIZE = 512

#: The four characters a text-mode (newline-converting) transfer would damage.
NEWLINE_CHARS = (b"\n", b" ", b"\r", b"\n")

# Flags. Low 16 bits are compatible, high 16 incompatible (a reader must understand them).
FLAG_VALID_NEWLINE_DETECTOR = 1 << 0
FLAG_REDUNDANT_GRAIN_TABLE = 1 << 1
FLAG_ZEROED_GRAIN_GTE = 1 << 2
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
INCOMPAT_MASK = 0xFFFF0000
INCOMPAT_KNOWN = FLAG_COMPRESSED | FLAG_MARKERS

COMPRESSION_NONE = 0
COMPRESSION_DEFLATE = 1

#: gdOffset in the leading header of a stream whose grain directory follows the grains;
#: the footer near the end of the file holds the real value.
GD_AT_END = 0xFFFF_FFFF_FFFF_FFFF

#: The grain-table size the format fixes (spec: numGTEsPerGT is 512); 4 bytes per entry.
GTES_PER_GT = 512
GTE_SIZE = 4
GT_SECTORS = GTES_PER_GT * GTE_SIZE // SECTOR
#: A grain-table entry of 1 means "reads as zero" when FLAG_ZEROED_GRAIN_GTE is set.
GTE_ZEROED = 1

# ---- stream-optimized markers ----------------------------------------------------------------

#: A grain marker: the grain's first guest sector, the compressed size, then the data.
GrainMarker = Struct("lba" / Int64ul, "size" / Int32ul)
GRAIN_MARKER_SIZE = 12
#: A metadata marker fills a sector: numSectors of what follows, size 0, type.
MetadataMarker = Struct("num_sectors" / Int64ul, "size" / Int32ul, "type" / Int32ul)
METADATA_MARKER_SIZE = 16

MARKER_EOS = 0
MARKER_GT = 1
MARKER_GD = 2
MARKER_FOOTER = 3
MARKER_NAMES = {MARKER_EOS: "end-of-stream", MARKER_GT: "grain table",
                MARKER_GD: "grain directory", MARKER_FOOTER: "footer"}

#: The tail of a stream with its directory at the end: footer marker, footer, end-of-stream.
STREAM_TAIL_SIZE = 3 * SECTOR


def metadata_marker(kind: int, num_sectors: int) -> bytes:
    """One sector announcing ``num_sectors`` of metadata of ``kind`` (or end-of-stream)."""
    return struct.pack("<QII", num_sectors, 0, kind) + bytes(SECTOR - METADATA_MARKER_SIZE)


# ---- limits enforced before anything is allocated --------------------------------------------

#: Guest capacity beyond 64 TiB is refused (seSparse, the largest VMDK kind, stops at 62 TB).
MAX_CAPACITY_BYTES = 64 << 40
#: Grains larger than 16 MiB are refused (VMware writes 64 KiB; QEMU gives up at 1 GiB).
MAX_GRAIN_SECTORS = 1 << 15
#: A grain directory above 4 Mi entries (16 MiB) is refused; 64 KiB grains need 64 Ki of
#: them for 2 TiB.
MAX_GD_ENTRIES = 1 << 22
#: An embedded or separate descriptor above 1 MiB is refused (QEMU reads at most that much).
MAX_DESCRIPTOR_BYTES = 1 << 20
#: A descriptor naming more extents than this is refused (a twoGbMaxExtent disk of 8 TiB
#: has 4096); each extent holds an open file.
MAX_EXTENTS = 4096
#: Sector offsets in grain tables are 32-bit: a sparse extent file cannot pass 2 TiB.
MAX_SPARSE_FILE_SECTORS = (1 << 32) - 1

# ---- the descriptor grammar ------------------------------------------------------------------

DESCRIPTOR_SIGNATURE = "# Disk DescriptorFile"

#: ``key=value`` or ``key = "value"`` (ddb lines use the spaced, quoted form).
KEY_VALUE = re.compile(r'^(?P<key>[A-Za-z_][A-Za-z0-9_.]*)\s*=\s*(?P<value>.*?)\s*$')
#: An extent line: access, size in sectors, type, then a quoted file name and a start offset
#: in sectors (both absent for ZERO extents; the offset only for FLAT and VMFS).
EXTENT_LINE = re.compile(
    r'^(?P<access>RW|RDONLY|NOACCESS)\s+(?P<sectors>\d+)\s+(?P<type>[A-Z]+)'
    r'(?:\s+"(?P<filename>[^"]*)"(?:\s+(?P<offset>\d+))?)?\s*$'
)

ACCESS_MODES = ("RW", "RDONLY", "NOACCESS")
#: Extent types we read, and those we recognise but refuse with a named reason.
EXTENT_FLAT = "FLAT"
EXTENT_SPARSE = "SPARSE"
EXTENT_ZERO = "ZERO"
EXTENT_VMFS = "VMFS"
UNSUPPORTED_EXTENTS = {
    "VMFSSPARSE": "vmfsSparse (COWD) extents",
    "SESPARSE": "seSparse extents",
    "VMFSRDM": "raw device mapping (VMFSRDM) extents",
    "VMFSRAW": "raw device (VMFSRAW) extents",
    "VSANSPARSE": "vsanSparse extents",
}

#: createType values (spec, "Disk Database" and "Header"), and those naming host devices that
#: an image file cannot carry.
CREATE_TYPES = (
    "monolithicSparse", "vmfsSparse", "monolithicFlat", "vmfs", "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat", "fullDevice", "vmfsRaw", "partitionedDevice", "vmfsRawDeviceMap",
    "vmfsPassthroughRawDeviceMap", "streamOptimized", "seSparse", "vsanSparse",
)
DEVICE_CREATE_TYPES = {
    "fullDevice": "fullDevice disks (extents on a host's raw disk)",
    "partitionedDevice": "partitionedDevice disks (extents on a host's raw partitions)",
    "vmfsRaw": "vmfsRaw disks (raw device extents)",
    "vmfsRawDeviceMap": "raw device mappings (vmfsRawDeviceMap)",
    "vmfsPassthroughRawDeviceMap": "raw device mappings (vmfsPassthroughRawDeviceMap)",
}
#: What we write, the names qemu-img's subformat option uses.
WRITABLE_CREATE_TYPES = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
                         "twoGbMaxExtentFlat", "streamOptimized")

#: parentCID of a disk without a parent.
NO_PARENT_CID = 0xFFFFFFFF
#: CIDs a writer must not pick: ffffffff means "no parent", fffffffe is reserved too.
RESERVED_CIDS = (0xFFFFFFFF, 0xFFFFFFFE)

ADAPTER_TYPES = ("ide", "lsilogic", "buslogic", "legacyESX")

#: A twoGbMaxExtent disk splits every 2 GiB (qemu-img and VMware use exactly this size).
SPLIT_BYTES = 2 << 30


@dataclass
class Header:
    """A parsed sparse extent header; ``gd_at_end`` is true when the footer supplied gdOffset."""

    version: int
    flags: int
    capacity: int
    grain_size: int
    descriptor_offset: int
    descriptor_size: int
    num_gtes_per_gt: int
    rgd_offset: int
    gd_offset: int
    overhead: int
    unclean_shutdown: int
    compress_algorithm: int
    gd_at_end: bool = False

    @property
    def grain_bytes(self) -> int:
        return self.grain_size * SECTOR

    @property
    def compressed(self) -> bool:
        return bool(self.flags & FLAG_COMPRESSED)

    @property
    def markers(self) -> bool:
        return bool(self.flags & FLAG_MARKERS)

    @property
    def zeroed_grain_gte(self) -> bool:
        return bool(self.flags & FLAG_ZEROED_GRAIN_GTE)

    @property
    def redundant(self) -> bool:
        return bool(self.flags & FLAG_REDUNDANT_GRAIN_TABLE) and self.rgd_offset != 0

    @property
    def grains(self) -> int:
        return -(-self.capacity // self.grain_size) if self.grain_size else 0

    @property
    def gd_entries(self) -> int:
        return -(-self.grains // self.num_gtes_per_gt) if self.num_gtes_per_gt else 0

    @property
    def gd_sectors(self) -> int:
        return -(-self.gd_entries * GTE_SIZE // SECTOR)

    def pack(self, gd_offset: int | None = None) -> bytes:
        """The 512-byte header; ``gd_offset`` overrides the field (GD_AT_END, or the footer's)."""
        data: bytes = SparseExtentHeader.build(dict(
            magic=MAGIC, version=self.version, flags=self.flags, capacity=self.capacity,
            grain_size=self.grain_size, descriptor_offset=self.descriptor_offset,
            descriptor_size=self.descriptor_size, num_gtes_per_gt=self.num_gtes_per_gt,
            rgd_offset=self.rgd_offset,
            gd_offset=self.gd_offset if gd_offset is None else gd_offset,
            overhead=self.overhead, unclean_shutdown=self.unclean_shutdown,
            single_end_line_char=NEWLINE_CHARS[0], non_end_line_char=NEWLINE_CHARS[1],
            double_end_line_char1=NEWLINE_CHARS[2], double_end_line_char2=NEWLINE_CHARS[3],
            compress_algorithm=self.compress_algorithm, pad=bytes(433),
        ))
        return data
