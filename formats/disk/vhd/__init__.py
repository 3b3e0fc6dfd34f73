"""VHD (Microsoft Virtual Hard Disk, qemu-img's "vpc"): fixed, dynamic and differencing disks.

Reads all three subformats (a differencing disk's parent through the companion resolver),
writes all three (differencing ones with ``backing_file``, i.e. ``convert -B`` / ``create -b``)
with a size qemu-img, Hyper-V and Azure all read the same way (see geometry.py), and checks
the metadata.

References: Microsoft "Virtual Hard Disk Image Format Specification", October 11, 2006,
version 1.0; QEMU block/vpc.c for how qemu-img sizes and writes VHDs.
"""

from __future__ import annotations

from collections.abc import Mapping

from imgbridge.registry import ProbeInput
from imgbridge.resolver import CompanionResolver
from imgbridge.source import ByteSource

from ._structs import FOOTER_COOKIE, FOOTER_SIZE, OLD_FOOTER_SIZE
from .reader import VhdDisk, VhdWarning
from .writer import CREATE_OPTIONS, create

__all__ = ["CREATE_OPTIONS", "VhdDisk", "VhdWarning", "create", "open", "probe"]


def probe(p: ProbeInput) -> int:
    """A footer cookie at the end (every VHD) or at the start (dynamic and differencing)."""
    if p.is_dir:
        return 0
    if p.head[:8] == FOOTER_COOKIE:
        return 100
    for length in (FOOTER_SIZE, OLD_FOOTER_SIZE):
        if p.size >= length and len(p.tail) >= length \
                and p.tail[-length:-length + 8] == FOOTER_COOKIE:
            return 100
    return 0


def open(
    source: ByteSource, resolver: CompanionResolver, options: Mapping[str, str]
) -> VhdDisk:
    return VhdDisk(source, resolver, options)
