"""FAT12/16/32 filesystems ("vfat"): read any of them as a file tree, write FAT32 volumes.

The registry's entry points: ``probe`` recognises a FAT boot sector (and tells it apart from
an MBR, which ends in 55AA too but has no BPB), ``open`` returns a ``FatFilesystem``,
``create`` writes a tree as a FAT32 volume (for EFI system partitions) into a raw image.

References: Microsoft "FAT: General Overview of On-Disk Format" (fatgen103, 1.03) and its
"FAT Long Directory Entries" (VFAT long file names).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from imgbridge.errors import InvalidImageError, InvalidInputError
from imgbridge.model.tree import Entry
from imgbridge.output import AtomicOutput
from imgbridge.progress import ProgressFn
from imgbridge.registry import ProbeInput
from imgbridge.resolver import CompanionResolver
from imgbridge.source import ByteSource

from .reader import FatFilesystem, parse_boot_sector

if TYPE_CHECKING:
    from .writer import CREATE_OPTIONS, build_fat32

__all__ = ["CREATE_OPTIONS", "FatFilesystem", "build_fat32", "create", "open", "probe"]

_LAZY = {"CREATE_OPTIONS": ".writer", "build_fat32": ".writer"}


def probe(p: ProbeInput) -> int:
    """100 for a sane FAT boot sector, 0 for anything else."""
    if p.is_dir or len(p.head) < 512:
        return 0
    try:
        parse_boot_sector(p.head[:4096])
    except InvalidImageError:
        return 0
    return 100


def open(source: ByteSource | None, resolver: CompanionResolver | None,
         options: Mapping[str, str]) -> FatFilesystem:
    """The volume on ``source`` (a whole file, or one partition of a disk) as a tree."""
    if source is None:
        where = resolver.image_path if resolver is not None else "the input"
        raise InvalidInputError(f"{where}: a FAT volume must be a file, not a folder")
    return FatFilesystem(source)


def create(out: AtomicOutput, tree: Iterable[Entry], options: Mapping[str, str],
           progress: ProgressFn) -> None:
    """Write ``tree`` as a FAT32 volume into ``out`` (see writer.create)."""
    from .writer import create as write

    write(out, tree, options, progress)


def __getattr__(name: str) -> Any:
    """The reader's and writer's names, imported on first use: probing every filesystem of
    the registry on a disk must not load every reader and writer."""
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(where, __name__), name)
