"""qcow2, QEMU's copy-on-write format: versions 2 and 3, backing chains, snapshots,
compressed clusters (zlib, zstd), extended L2 entries and external data files.

References: QEMU docs/interop/qcow2.txt.
"""

from __future__ import annotations

from collections.abc import Mapping

from imgbridge.registry import ProbeInput
from imgbridge.resolver import CompanionResolver
from imgbridge.source import ByteSource

from ._structs import MAGIC
from .reader import Qcow2Disk
from .writer import CREATE_OPTIONS, create

__all__ = ["CREATE_OPTIONS", "Qcow2Disk", "create", "open", "probe"]

#: Options for opening: ``snapshot`` reads an internal snapshot (by id or name) instead of
#: the active state (``convert -l`` in qemu-img's terms).
OPEN_OPTIONS = {"snapshot": "read this internal snapshot (id or name) instead of the disk"}


def probe(p: ProbeInput) -> int:
    """The magic decides, whatever the version (so an unknown version gets a clear error
    rather than a raw guess); a .qcow2 name alone is a weak hint, so a damaged header is
    reported as a damaged qcow2."""
    if p.is_dir:
        return 0
    if p.head[:4] == MAGIC:
        return 100
    return 5 if p.extension_is(("qcow2", "qcow")) else 0


def open(
    source: ByteSource, resolver: CompanionResolver, options: Mapping[str, str]
) -> Qcow2Disk:
    return Qcow2Disk(source, resolver, options)
