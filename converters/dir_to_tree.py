"""A folder on the host, read as a file tree (``Entry`` objects), for the filesystem writers.

Symlinks are read, never followed (``lstat``); a file reached by several names appears once as
FILE and then as HARDLINK entries (same device and inode), in the pre-order, name-sorted order
every filesystem reader also gives (see imgbridge/model/fs.py). File content is opened only
when a writer reads it, so walking a large tree costs metadata calls alone.

Extended attributes are read where the host has them (Linux); ``security.selinux`` labels of
the build machine are left out, since they describe the host rather than the tree.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Collection, Iterator
from functools import partial
from typing import BinaryIO

from imgbridge.errors import InvalidInputError
from imgbridge.model.tree import Entry, EntryType

__all__ = ["read_host_tree"]

#: Attributes of the machine that builds the image, not of the tree it copies.
_HOST_XATTRS = frozenset({"security.selinux"})

_TYPES: tuple[tuple[Callable[[int], bool], EntryType], ...] = (
    (stat.S_ISREG, EntryType.FILE),
    (stat.S_ISDIR, EntryType.DIR),
    (stat.S_ISLNK, EntryType.SYMLINK),
    (stat.S_ISCHR, EntryType.CHAR),
    (stat.S_ISBLK, EntryType.BLOCK),
    (stat.S_ISFIFO, EntryType.FIFO),
    (stat.S_ISSOCK, EntryType.SOCKET),
)


def _open_binary(path: str) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as exc:  # removed or made unreadable since the walk saw it
        raise InvalidInputError(f"{path}: {exc.strerror or exc}") from None


def _xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    if not hasattr(os, "listxattr"):
        return ()
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:  # a filesystem without xattr support
        return ()
    out = []
    for name in names:
        if name in _HOST_XATTRS:
            continue
        try:
            out.append((name, os.getxattr(path, name, follow_symlinks=False)))
        except OSError:
            continue  # removed while we looked, or not readable by us: not part of the tree
    return tuple(out)


def _entry(path: str, tree_path: str, st: os.stat_result) -> Entry:
    kind = next((t for test, t in _TYPES if test(st.st_mode)), None)
    if kind is None:
        raise InvalidInputError(f"{path}: a kind of file no image can hold")
    return Entry(
        tree_path, kind, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
        mtime=st.st_mtime_ns, atime=st.st_atime_ns, ctime=st.st_ctime_ns,
        size=st.st_size if kind is EntryType.FILE else 0,
        link_target=os.readlink(path) if kind is EntryType.SYMLINK else "",
        devmajor=os.major(st.st_rdev) if kind in (EntryType.CHAR, EntryType.BLOCK) else 0,
        devminor=os.minor(st.st_rdev) if kind in (EntryType.CHAR, EntryType.BLOCK) else 0,
        xattrs=_xattrs(path),
        opener=partial(_open_binary, path) if kind is EntryType.FILE else None,
    )


def read_host_tree(root: str | os.PathLike[str], *,
                   skip: Collection[tuple[int, int]] = ()) -> Iterator[Entry]:
    """Every entry below (and including) the folder ``root``, as a flat tree. ``root``
    itself may be a symlink to a folder (followed, as ``mke2fs -d`` and ``tar -C`` do);
    links below it are kept as links. Files whose ``(st_dev, st_ino)`` is in ``skip`` are
    left out: the image being written into the folder it is made from (as tar leaves out
    its own archive)."""
    top = os.fspath(root)
    try:
        st = os.stat(top)
    except OSError as exc:
        raise InvalidInputError(f"{top}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidInputError(f"{top}: not a folder")
    seen: dict[tuple[int, int], str] = {}
    yield _entry(top, "", st)
    # Depth-first pre-order: a directory's subtree comes before its next sibling.
    pending: list[Iterator[tuple[str, str]]] = [_children(top, "")]
    while pending:
        child = next(pending[-1], None)
        if child is None:
            pending.pop()
            continue
        host_path, tree_path = child
        try:
            st = os.lstat(host_path)
        except OSError as exc:  # removed (or made unreadable) while we walked
            raise InvalidInputError(f"{host_path}: {exc.strerror or exc} (the folder changed "
                                    "while it was read)") from None
        if (st.st_dev, st.st_ino) in skip:
            continue
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            first = seen.setdefault((st.st_dev, st.st_ino), tree_path)
            if first != tree_path:
                yield Entry(tree_path, EntryType.HARDLINK, link_target=first,
                            mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                            mtime=st.st_mtime_ns)
                continue
        yield _entry(host_path, tree_path, st)
        if stat.S_ISDIR(st.st_mode):
            pending.append(_children(host_path, tree_path))


def _children(host_dir: str, tree_dir: str) -> Iterator[tuple[str, str]]:
    try:
        names = sorted(os.listdir(host_dir), key=os.fsencode)
    except OSError as exc:
        raise InvalidInputError(f"{host_dir}: {exc.strerror or exc}") from None
    for name in names:
        yield os.path.join(host_dir, name), f"{tree_dir}/{name}" if tree_dir else name
