"""VHDX, Hyper-V's virtual disk format: fixed, dynamic and differencing images.

Reading covers all three kinds, both logical sector sizes, block sizes from 1 MiB to
256 MiB, partially present blocks through sector bitmaps, and a pending log, which is
replayed in memory (the file is never modified). Writing makes fixed and dynamic images laid
out like qemu-img's and Hyper-V's; ``check`` verifies checksums, regions and the BAT.

References: [MS-VHDX] "Virtual Hard Disk v2 (VHDX) File Format".
"""

from __future__ import annotations

from collections.abc import Mapping

from imgbridge.registry import ProbeInput
from imgbridge.resolver import CompanionResolver
from imgbridge.source import ByteSource

from ._structs import FILE_SIGNATURE
from .reader import VhdxDisk
from .writer import CREATE_OPTIONS, create

__all__ = ["CREATE_OPTIONS", "VhdxDisk", "create", "open", "probe"]


def probe(p: ProbeInput) -> int:
    """The file type identifier "vhdxfile" opens every VHDX; without it, no score."""
    if p.is_dir or len(p.head) < 8:
        return 0
    return 100 if p.head[:8] == FILE_SIGNATURE else 0


def open(
    source: ByteSource, resolver: CompanionResolver, options: Mapping[str, str]
) -> VhdxDisk:
    return VhdxDisk(source, resolver, options)
