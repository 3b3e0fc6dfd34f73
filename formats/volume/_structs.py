"""MBR and GPT on-disk structures and the constants that name their fields' values.

Only layout lives here; what the fields mean for reading and writing is in mbr.py, gpt.py
and table.py. MBR and GPT numbers are little-endian; GUIDs are stored in the mixed-endian
form (``uuid.UUID(bytes_le=...)``).

References: UEFI Specification 2.10, chapter 5 "GUID Partition Table (GPT) Disk Layout"
(5.2.1 Legacy MBR, 5.2.3 Protective MBR, 5.3.2 GPT Header, 5.3.3 GPT Partition Entry Array);
the UAPI group's Discoverable Partitions Specification (type GUIDs); the extended boot
record chain as documented for IBM PC partitioning (Linux block/partitions/msdos.c behaviour).
"""

from __future__ import annotations

import uuid

from construct import Bytes, Int8ul, Int32ul, Int64ul, Struct

SECTOR = 512
#: 1 MiB in 512-byte sectors: where new partitions start.
ALIGNMENT_SECTORS = 2048

# ---- MBR -------------------------------------------------------------------------------------

MBR_SIGNATURE = b"\x55\xaa"
MBR_SIGNATURE_OFFSET = 510
MBR_DISK_ID_OFFSET = 440
MBR_TABLE_OFFSET = 446
MBR_ENTRY_SIZE = 16
MBR_ENTRIES = 4

MbrEntry = Struct(
    "status" / Int8ul,  # 0x80 bootable, 0x00 not; anything else: not a partition entry
    "chs_first" / Bytes(3),
    "type" / Int8ul,
    "chs_last" / Bytes(3),
    "lba_first" / Int32ul,
    "sectors" / Int32ul,
)

MBR_BOOTABLE = 0x80
MBR_TYPE_EMPTY = 0x00
MBR_TYPE_GPT_PROTECTIVE = 0xEE
#: Extended partition types (CHS, LBA, Linux): containers of the EBR chain.
MBR_EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})
#: Logical partitions are numbered from 5, as Linux and sfdisk number them.
FIRST_LOGICAL_NUMBER = 5
#: A bound on the EBR chain, far above any real disk, so hostile chains end quickly.
MAX_LOGICAL_PARTITIONS = 256

MBR_TYPE_NAMES = {
    0x01: "FAT12",
    0x04: "FAT16 <32M",
    0x05: "Extended",
    0x06: "FAT16",
    0x07: "HPFS/NTFS/exFAT",
    0x0B: "W95 FAT32",
    0x0C: "W95 FAT32 (LBA)",
    0x0E: "W95 FAT16 (LBA)",
    0x0F: "W95 Extended (LBA)",
    0x82: "Linux swap",
    0x83: "Linux",
    0x85: "Linux extended",
    0x8E: "Linux LVM",
    0xEE: "GPT protective",
    0xEF: "EFI (FAT-12/16/32)",
    0xFD: "Linux raid autodetect",
}

# ---- GPT -------------------------------------------------------------------------------------

GPT_SIGNATURE = b"EFI PART"
GPT_REVISION = 0x00010000
GPT_HEADER_SIZE = 92
GPT_ENTRY_SIZE = 128
#: The UEFI minimum for the entry array (128 entries of 128 bytes: 32 sectors of 512).
GPT_MIN_ARRAY_BYTES = 16384
#: The largest entry array we read (hostile headers ask for gigabytes).
GPT_MAX_ARRAY_BYTES = 1 << 20

GptHeader = Struct(
    "signature" / Bytes(8),
    "revision" / Int32ul,
    "header_size" / Int32ul,
    "header_crc32" / Int32ul,
    "reserved" / Int32ul,
    "my_lba" / Int64ul,
    "alternate_lba" / Int64ul,
    "first_usable_lba" / Int64ul,
    "last_usable_lba" / Int64ul,
    "disk_guid" / Bytes(16),
    "entries_lba" / Int64ul,
    "num_entries" / Int32ul,
    "entry_size" / Int32ul,
    "entries_crc32" / Int32ul,
)
#: Byte offset of header_crc32 inside the header (zeroed while the CRC is computed).
GPT_HEADER_CRC_OFFSET = 16

GptEntry = Struct(
    "type_guid" / Bytes(16),
    "unique_guid" / Bytes(16),
    "first_lba" / Int64ul,
    "last_lba" / Int64ul,
    "attributes" / Int64ul,
    "name" / Bytes(72),  # UTF-16LE, NUL-padded
)
GPT_NAME_BYTES = 72

# Attribute bits (UEFI 5.3.3, table "Defined GPT Partition Entry - Attributes").
GPT_ATTR_REQUIRED = 1 << 0
GPT_ATTR_NO_BLOCK_IO = 1 << 1
GPT_ATTR_LEGACY_BIOS_BOOTABLE = 1 << 2

GPT_TYPE_UNUSED = uuid.UUID(int=0)

#: Type GUIDs with names (Discoverable Partitions Specification, plus UEFI's ESP and BIOS boot).
GPT_TYPE_NAMES = {
    uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b"): "EFI System",
    uuid.UUID("21686148-6449-6e6f-744e-656564454649"): "BIOS boot",
    uuid.UUID("bc13c2ff-59e6-4262-a352-b275fd6f7172"): "Linux extended boot",
    uuid.UUID("4f68bce3-e8cd-4db1-96e7-fbcaf984b709"): "Linux root (x86-64)",
    uuid.UUID("44479540-f297-41b2-9af7-d131d5f0458a"): "Linux root (x86)",
    uuid.UUID("b921b045-1df0-41c3-af44-4c6f280d3fae"): "Linux root (ARM-64)",
    uuid.UUID("69dad710-2ce4-4e3c-b16c-21a1d49abed3"): "Linux root (ARM)",
    uuid.UUID("8484680c-9521-48c6-9c11-b0720656f69e"): "Linux /usr (x86-64)",
    uuid.UUID("b0e01050-ee5f-4390-949a-9101b17104e9"): "Linux /usr (ARM-64)",
    uuid.UUID("933ac7e1-2eb4-4f13-b844-0e14e2aef915"): "Linux /home",
    uuid.UUID("3b8f8425-20e0-4f3b-907f-1a25a76f98e8"): "Linux /srv",
    uuid.UUID("4d21b016-b534-45c2-a9fb-5c16e091fd2d"): "Linux /var",
    uuid.UUID("7ec6f557-3bc5-4aca-b293-16ef5df639d1"): "Linux /var/tmp",
    uuid.UUID("0657fd6d-a4ab-43c4-84e5-0933c84b4f4f"): "Linux swap",
    uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4"): "Linux filesystem",
    uuid.UUID("e6d6d379-f507-44c2-a23c-238f2a3df928"): "Linux LVM",
    uuid.UUID("a19d880f-05fc-4d3b-a006-743f0f84911e"): "Linux RAID",
    uuid.UUID("ebd0a0a2-b9e5-4433-87c0-68b6b72699c7"): "Microsoft basic data",
}
