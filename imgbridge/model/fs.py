"""The filesystem side of the model: a filesystem read from bytes is a file tree.

A filesystem reader (ext4, FAT, ISO9660) opens a ``ByteSource`` (a whole file, or one
partition of a disk in any disk format) and answers two questions: what it is (``info()``:
type, label, UUID, size, usage) and what it holds (``entries()``: the tree as ``Entry``
objects, the same model container layers use, so ``ls``/``cat``/``extract``/``diff`` and every
tree writer work on disks and images alike).

``entries()`` rules, shared by every reader so consumers need not care which one they hold:

- pre-order: the root (``""``, a DIR) first, every directory before what it contains,
  siblings sorted by name (bytes order of their UTF-8 form);
- a file with several names appears once as FILE (at the first path in that order) and then
  as HARDLINK entries whose ``link_target`` is that first path (``with_link_metadata`` gives
  them their inode's mode, owner and times, as ``ls -l`` shows every name);
- a FILE's ``opener`` reads its content lazily from the source (holes come back as zeros,
  never read from the source), so listing a tree costs metadata reads only;
- names that are not valid UTF-8 are decoded with ``surrogateescape``; names that cannot be
  tree paths (``.``, ``..``, empty, containing ``/`` or NUL) are hostile: ``InvalidImageError``.

A filesystem format module provides, besides the registry's ``probe`` and ``open``:

- ``open(source, resolver, options) -> Filesystem``;
- optionally ``create(out, tree, options, progress)``, writing ``tree`` (an iterable of
  ``Entry``, a flat tree in the order above, or any order a ``flatten`` produced) into ``out``,
  an ``AtomicOutput``.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any

from .tree import Entry, EntryType

__all__ = ["Filesystem", "with_link_metadata"]


def with_link_metadata(entries: Iterable[Entry]) -> Iterator[Entry]:
    """The entries, each HARDLINK carrying the metadata of the entry it links to (which comes
    first in the tree). Holds the non-directory entries seen so far: metadata, not content."""
    seen: dict[str, Entry] = {}
    for entry in entries:
        if entry.type is EntryType.HARDLINK:
            target = seen.get(entry.link_target)
            if target is not None:
                entry = replace(entry, mode=target.mode, uid=target.uid, gid=target.gid,
                                mtime=target.mtime, atime=target.atime, ctime=target.ctime,
                                crtime=target.crtime, uname=target.uname, gname=target.gname)
        elif entry.type is not EntryType.DIR:
            seen[entry.path] = entry
        yield entry


class Filesystem(abc.ABC):
    """An opened filesystem. Close it (or use ``with``) to release its source."""

    #: The registry name of the format ("ext4", "vfat", "iso9660").
    format_name: str = ""

    @abc.abstractmethod
    def info(self) -> dict[str, Any]:
        """What the filesystem is. Keys every reader fills: ``type`` (``ext2``/``ext3``/
        ``ext4``, ``vfat`` with ``fat-bits``, ``iso9660``), ``label`` (str, ``""`` when
        none), ``uuid`` (str or None: the ext UUID, the FAT volume id ``ABCD-1234``, the ISO
        volume creation time as blkid shows it), ``size`` (bytes the filesystem spans) and
        ``used`` (bytes in use, None when the format cannot say). Readers add their own keys
        (``block-size``, ``features``, ``warnings``...)."""

    @abc.abstractmethod
    def entries(self) -> Iterator[Entry]:
        """Every entry of the tree, in the order the module docstring gives."""

    def close(self) -> None:  # noqa: B027 - readers over a shared source have nothing to free
        """Release what the reader holds (the source is the caller's)."""

    def __enter__(self) -> Filesystem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
