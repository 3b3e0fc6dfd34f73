"""ISO9660 (with Rock Ridge and Joliet): the registry's entry points.

``probe`` recognises the "CD001" standard identifier of the first volume descriptor (logical
sector 16); ``open`` returns an ``IsoFilesystem``; ``create`` writes an ISO with Rock Ridge
1.09 and Joliet from a tree (see ``writer``).

References: ECMA-119 4th edition, 8.1 "Format of a Volume Descriptor".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from imgbridge.registry import ProbeInput, lazy_names
from imgbridge.source import ByteSource

from . import _structs as s

if TYPE_CHECKING:
    from .reader import IsoFilesystem
    from .writer import CREATE_OPTIONS, create

__all__ = ["CREATE_OPTIONS", "IsoFilesystem", "create", "open", "probe"]

__getattr__ = lazy_names(__name__, {"IsoFilesystem": ".reader", "CREATE_OPTIONS": ".writer",
                                     "create": ".writer"})


def probe(p: ProbeInput) -> int:
    """100 when the first volume descriptor is an ISO9660 one, else 0."""
    start = s.DESCRIPTOR_START
    head = p.head
    if len(head) < start + 7:
        return 0
    if head[start + 1 : start + 6] != s.STANDARD_ID or head[start + 6] != 1:
        return 0
    return 100 if head[start] in s.VALID_VD_TYPES else 0


def open(source: ByteSource, resolver: Any = None,
         options: Mapping[str, str] | None = None) -> IsoFilesystem:
    """Open the ISO9660 volume in ``source`` (a whole file or a partition)."""
    from .reader import IsoFilesystem

    return IsoFilesystem(source)


