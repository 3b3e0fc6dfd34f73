"""ext2, ext3 and ext4 filesystems: read any of them as a file tree, write ext4 from one.

The registry's entry points: ``probe`` recognises the superblock, ``open`` returns an
``Ext4Filesystem`` (see reader.py for what is read and how), ``create`` writes a tree as an
ext4 image (see writer.py: ``build_ext4`` gives the same filesystem as a virtual Disk).

References: Linux Documentation/filesystems/ext4/ (ondisk: super.rst, group_descr.rst,
inodes.rst, ifork.rst, directory.rst, attributes.rst, journal.rst).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING

from imgbridge.registry import ProbeInput, lazy_names
from imgbridge.source import ByteSource

from . import _structs as s

if TYPE_CHECKING:
    from .reader import OPEN_OPTIONS, Ext4Filesystem, Ext4Warning
    from .writer import CREATE_OPTIONS, build_ext4, create

__all__ = ["CREATE_OPTIONS", "OPEN_OPTIONS", "Ext4Filesystem", "Ext4Warning", "build_ext4",
           "create", "open", "probe"]

__getattr__ = lazy_names(__name__, {
    "OPEN_OPTIONS": ".reader", "Ext4Filesystem": ".reader", "Ext4Warning": ".reader",
    "CREATE_OPTIONS": ".writer", "build_ext4": ".writer", "create": ".writer"})

_PROBE_FIELDS = struct.Struct("<IIIIIIIIIII")  # s_inodes_count .. s_inodes_per_group


def probe(p: ProbeInput) -> int:
    """100 when the ext magic sits at byte 1080 and the superblock around it is plausible
    (counts non-zero, block size 1..64 KiB, a known revision); 10 for the magic around an
    implausible superblock (a damaged one, or chance: the magic is only two bytes)."""
    if p.is_dir or len(p.head) < s.SUPERBLOCK_OFFSET + 0x50:
        return 0
    sb_at = s.SUPERBLOCK_OFFSET
    if int.from_bytes(p.head[s.MAGIC_OFFSET: s.MAGIC_OFFSET + 2], "little") != s.MAGIC:
        return 0
    (inodes, blocks, _r, _fb, free_inodes, first_data, log_block, _lc, per_group, _cpg,
     inodes_per_group) = _PROBE_FIELDS.unpack_from(p.head, sb_at)
    rev_level = int.from_bytes(p.head[sb_at + 0x4C: sb_at + 0x50], "little")
    plausible = (
        inodes > 0 and blocks > 0 and free_inodes <= inodes and first_data < blocks
        and log_block <= s.MAX_LOG_BLOCK_SIZE and per_group > 0 and inodes_per_group > 0
        and rev_level <= s.DYNAMIC_REV
    )
    # The magic alone (two bytes) is weak evidence: say "damaged ext?" (a low score that
    # inspect reports as unreadable) rather than claim the partition.
    return 100 if plausible else 10


def open(source: ByteSource, resolver: object, options: Mapping[str, str]) -> Ext4Filesystem:
    """Open the filesystem that ``source`` holds (companion files play no part)."""
    from .reader import Ext4Filesystem

    del resolver
    return Ext4Filesystem(source, options)


