"""FAT12/16/32 filesystems ("vfat"): read any of them as a file tree, write FAT32 volumes.

The registry's entry points: ``probe`` recognises a FAT boot sector (and tells it apart from
an MBR, which ends in 55AA too but has no BPB), ``open`` returns a ``FatFilesystem``,
``create`` writes a tree as a FAT32 volume (for EFI system partitions) into a raw image.

References: Microsoft "FAT: General Overview of On-Disk Format" (fatgen103, 1.03) and its
"FAT Long Directory Entries" (VFAT long file names).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from imgbridge.errors import InvalidImageError
from imgbridge.registry import ProbeInput, lazy_names
from imgbridge.resolver import CompanionResolver
from imgbridge.source import ByteSource

from .reader import FatFilesystem, parse_boot_sector

if TYPE_CHECKING:
    from .writer import CREATE_OPTIONS, build_fat32, create

__all__ = ["CREATE_OPTIONS", "FatFilesystem", "build_fat32", "create", "open", "probe"]

__getattr__ = lazy_names(__name__, {"CREATE_OPTIONS": ".writer", "build_fat32": ".writer",
                                     "create": ".writer"})


def probe(p: ProbeInput) -> int:
    """100 for a sane FAT boot sector, 0 for anything else."""
    if p.is_dir or len(p.head) < 512:
        return 0
    try:
        parse_boot_sector(p.head[:4096])
    except InvalidImageError:
        return 0
    return 100


def open(source: ByteSource, resolver: CompanionResolver | None,
         options: Mapping[str, str]) -> FatFilesystem:
    """The volume on ``source`` (a whole file, or one partition of a disk) as a tree."""
    return FatFilesystem(source)


