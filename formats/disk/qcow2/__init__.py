"""qcow2, QEMU's copy-on-write format: versions 2 and 3, backing chains, snapshots,
compressed clusters (zlib, zstd), extended L2 entries and external data files.

References: QEMU docs/interop/qcow2.txt.
"""

from __future__ import annotations

from collections.abc import Mapping

from imgbridge.errors import InvalidInputError
from imgbridge.registry import ProbeInput
from imgbridge.resolver import CompanionResolver
from imgbridge.source import ByteSource

from ._structs import MAGIC
from .reader import Qcow2Disk

__all__ = ["Qcow2Disk", "open", "probe"]

#: Options for opening: ``snapshot`` reads an internal snapshot (by id or name) instead of
#: the active state (``convert -l`` in qemu-img's terms).
OPEN_OPTIONS = {"snapshot": "read this internal snapshot (id or name) instead of the disk"}


def probe(p: ProbeInput) -> int:
    if p.is_dir or len(p.head) < 8:
        return 0
    if p.head[:4] == MAGIC and int.from_bytes(p.head[4:8], "big") in (2, 3):
        return 100
    return 0


def open(
    source: ByteSource | None, resolver: CompanionResolver, options: Mapping[str, str]
) -> Qcow2Disk:
    if source is None:
        raise InvalidInputError(f"{resolver.image_path}: a qcow2 image must be a file")
    return Qcow2Disk(source, resolver, options)
