"""ISO9660 (with Rock Ridge and Joliet): the registry's entry points.

``probe`` recognises the "CD001" standard identifier of the first volume descriptor (logical
sector 16); ``open`` returns an ``IsoFilesystem``; ``create`` writes an ISO with Rock Ridge
1.09 and Joliet from a tree (see ``writer``).

References: ECMA-119 4th edition, 8.1 "Format of a Volume Descriptor".
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from imgbridge.model.tree import Entry
from imgbridge.output import AtomicOutput
from imgbridge.progress import ProgressFn, no_progress
from imgbridge.registry import ProbeInput
from imgbridge.source import ByteSource

from . import _structs as s

if TYPE_CHECKING:
    from .reader import IsoFilesystem
    from .writer import CREATE_OPTIONS

__all__ = ["CREATE_OPTIONS", "IsoFilesystem", "create", "open", "probe"]

_LAZY = {"IsoFilesystem": ".reader", "CREATE_OPTIONS": ".writer"}


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


def create(out: AtomicOutput, tree: Iterable[Entry], options: Mapping[str, str] | None = None,
           progress: ProgressFn = no_progress) -> None:
    """Write ``tree`` as an ISO9660 image into ``out`` (see writer.create)."""
    from .writer import create as write

    write(out, tree, options, progress)

def __getattr__(name: str) -> Any:
    """The reader's and writer's names, imported on first use: probing every filesystem of
    the registry on a disk must not load every reader and writer."""
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(where, __name__), name)

