"""VMDK, VMware's virtual disk: monolithic and split, sparse and flat, stream-optimized, deltas.

Reads descriptor files and descriptors embedded in sparse extents; FLAT, VMFS, ZERO and SPARSE
extents; the createTypes monolithicSparse, monolithicFlat, twoGbMaxExtentSparse,
twoGbMaxExtentFlat, vmfs and streamOptimized; delta disks through parentFileNameHint, their
parentCID checked against the parent's CID. Writes the five subformats qemu-img writes, with
streamOptimized in one sequential pass (footer and end-of-stream marker included).

References: VMware "Virtual Disk Format 5.0" and "Virtual Disk Format 1.1".
"""

from __future__ import annotations

from collections.abc import Mapping

from imgbridge.registry import ProbeInput
from imgbridge.resolver import CompanionResolver
from imgbridge.source import ByteSource

from ._structs import COWD_MAGIC, MAGIC
from .descriptor import looks_like_descriptor
from .reader import IGNORE_CID, VmdkDisk
from .writer import CREATE_OPTIONS, create

__all__ = ["CREATE_OPTIONS", "OPEN_OPTIONS", "VmdkDisk", "create", "open", "probe"]

OPEN_OPTIONS = {
    IGNORE_CID: "on: read a delta disk even though its parentCID does not match its parent's "
                "CID (the parent changed after the delta was made)",
}


def probe(p: ProbeInput) -> int:
    """100 for a sparse extent's magic (or a COWD one, refused with a clear error on open) and
    for a text descriptor; nothing for the rest, whatever its extension."""
    if p.is_dir or len(p.head) < 4:
        return 0
    if p.head[:4] in (MAGIC, COWD_MAGIC):
        return 100
    if looks_like_descriptor(p.head[:4096]):
        return 100
    return 0


def open(
    source: ByteSource, resolver: CompanionResolver, options: Mapping[str, str]
) -> VmdkDisk:
    return VmdkDisk(source, resolver, options)
