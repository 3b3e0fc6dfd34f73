"""Opening what ls, cat, extract and diff read, and finding paths in it.

A container image gives its flattened tree (or one layer's entries); a disk image, in any
disk format, gives the filesystem of one partition (see converters.disk_to_tree). Paths are
looked up the way a container or a mounted filesystem would: symlinks followed inside the
tree, never on the host, every lookup clamped to the tree's root.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .errors import ImgBridgeError, InvalidInputError
from .model.disk import Disk
from .model.tree import Entry

__all__ = ["MAX_HOPS", "OpenedTree", "list_at", "open_tree", "resolve_in_tree", "through_links",
           "tree_path"]


def close_quietly(obj: Any) -> None:
    close = getattr(obj, "close", None)
    if callable(close):
        close()


class OpenedTree:
    """What ls/cat/extract/diff read: a container image's layers, or the filesystem inside a
    disk (in any disk format, partition chosen by number or by default the root)."""

    def __init__(self, obj: Any, found: Any = None, name: str = "",
                 chosen: str | None = None) -> None:
        self.obj = obj  # a ContainerImage, or the Disk holding ``found``
        self.found = found
        self.name = name
        #: "partition N (...)" when the partition was chosen for the caller, not asked for.
        self.chosen = chosen

    def tell(self, notice: Callable[[str], None] | None) -> None:
        """Say which partition was chosen, once the command has succeeded so far."""
        if notice is not None and self.chosen is not None:
            notice(f"{self.name}: reading {self.chosen}")
            self.chosen = None

    def matching_name(self, by_path: Mapping[str, Entry], want: str) -> str:
        """``want`` as the tree spells it: on FAT, whose names match whatever their case
        (as the kernel's vfat and mtools match them), the one entry equal but for case."""
        if want in by_path or self.found is None or self.found.fs.format_name != "vfat":
            return want
        folded = want.casefold()
        return next((path for path in by_path if path.casefold() == folded), want)

    def explain(self, exc: ImgBridgeError, option: str = "-P N") -> None:
        """Put the chosen partition into the error's hint, so that a failure (a path not on
        the partition the user thought) stays one line that still says what was read."""
        if self.chosen is not None and exc.hint is None:
            exc.hint = f"read {self.chosen}; {option} reads another partition"

    def entries(self, layer: int | None = None) -> list[Entry]:
        """The flattened tree, or layer ``layer``'s entries in archive order (whiteouts
        kept)."""
        if layer is not None:
            return list(self.iter_layer(layer))
        if self.found is not None:
            from .model.fs import with_link_metadata

            return list(with_link_metadata(self.found.fs.entries()))
        entries: list[Entry] = self.obj.flatten()
        return entries

    def iter_layer(self, layer: int) -> Iterable[Entry]:
        """Layer ``layer``'s entries, streamed in archive order (the number checked first)."""
        if self.found is not None:
            raise InvalidInputError("--layer applies to container images, not to disks")
        count = len(self.obj.layers)
        if not 0 <= layer < count:
            raise InvalidInputError(f"no layer {layer}: this image has {count} "
                                    f"(numbered 0 to {count - 1})" if count else
                                    f"no layer {layer}: this image has none")
        entries: Iterable[Entry] = self.obj.layers[layer].iter_entries()
        return entries

    def close(self) -> None:
        if self.found is not None:
            self.found.close()
        close_quietly(self.obj)


def open_tree(image: str | os.PathLike[str], platform: str | None, *,
               format: str | None = None, partition: int | None = None,
               ) -> OpenedTree:
    """Open what ``image`` names as a tree: a container image (``platform`` picks one of an
    index) or a disk image with a filesystem (``partition`` picks the partition; the
    tree's ``chosen`` says which one was read when none was asked for)."""
    from .api import open as open_image
    from .model.image import ContainerImage

    name = os.fspath(image)
    options = {"platform": platform} if platform else None
    obj = open_image(name, format, allow_outside=False, options=options)
    if isinstance(obj, ContainerImage):
        if partition is not None:
            close_quietly(obj)
            raise InvalidInputError(f"{name}: --partition applies to disk images, and this is "
                                    "a container image")
        return OpenedTree(obj)
    if isinstance(obj, Disk):
        from imgbridge.converters.disk_to_tree import find_filesystem

        try:
            found = find_filesystem(obj, partition)
        except BaseException:
            obj.close()
            raise
        chosen = None
        if found.partition is not None and partition is None:
            chosen = found.describe()
        return OpenedTree(obj, found, name, chosen)
    platforms = getattr(obj, "platforms", None)
    close_quietly(obj)
    if platforms is not None:
        raise InvalidInputError(
            f"{name}: holds images for several platforms: "
            f"{', '.join(str(p) for p in platforms)}", hint="pick one with --platform")
    raise InvalidInputError(f"{name}: neither a container image nor a disk image")


def tree_path(path: str) -> str:
    from .model.tree import normalize_path

    try:
        return normalize_path(path)
    except ImgBridgeError:
        raise InvalidInputError(f"{path}: climbs above the image's root") from None


def through_links(by_path: dict[str, Entry], want: str, *, follow_last: bool) -> str:
    """``want`` with the symlinks of its directories followed (and of its last name with
    ``follow_last``), as a path of the tree; unchanged when a step is missing (the caller
    then reports that nothing is there)."""
    if not want:
        return want
    parent, _, last = want.rpartition("/")
    if follow_last:
        parent, last = want, ""
    if not parent:
        return want
    entry = resolve_in_tree(by_path, parent)
    if entry is None:
        return want
    return "/".join(p for p in (entry.path, last) if p)


def list_at(entries: list[Entry], want: str, layer: int | None, recursive: bool, *,
             shown: str) -> list[Entry]:
    prefix = want + "/" if want else ""
    below = [e for e in entries if e.path.startswith(prefix) and e.path != want
             and (recursive or "/" not in e.path[len(prefix):])]
    here = [e for e in entries if e.path == want]
    from .model.tree import EntryType

    if here and here[-1].type not in (EntryType.DIR, EntryType.OPAQUE):
        return here[-1:]
    if layer is not None and not recursive:
        # A layer need not describe the directories its entries sit in (umoci's upper layers
        # often do not): show such a directory as flatten would make it, not as nothing.
        listed = {e.path for e in below}
        for e in entries:
            if e.path.startswith(prefix) and "/" in e.path[len(prefix):]:
                top = prefix + e.path[len(prefix):].split("/", 1)[0]
                if top not in listed:
                    listed.add(top)
                    below.append(Entry(top, EntryType.DIR, mode=0o755))
    if not (here or below or want == ""):
        raise InvalidInputError(f"/{shown}: no such file or directory in the image"
                                + (f" (layer {layer})" if layer is not None else ""))
    return sorted(below, key=lambda e: e.path.split("/"))


#: Symlink hops before giving up, as Linux's MAXSYMLINKS.
MAX_HOPS = 40


def resolve_in_tree(by_path: dict[str, Entry], path: str) -> Entry | None:
    """Follow symlinks inside the tree the way a container would, every lookup clamped to
    the image's root (an absolute target starts there, ``..`` stops there). None if absent."""
    from .model.tree import EntryType

    hops = 0
    todo = [p for p in path.split("/") if p]
    done: list[str] = []
    entry: Entry | None = by_path.get("")
    while todo:
        part = todo.pop(0)
        if part == ".":
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        done.append(part)
        entry = by_path.get("/".join(done))
        if entry is None:
            return None
        if entry.type is EntryType.HARDLINK:
            entry = by_path.get(entry.link_target)
        if entry is not None and entry.type is EntryType.SYMLINK:
            hops += 1
            if hops > MAX_HOPS:
                raise InvalidInputError(f"/{path}: too many levels of symbolic links")
            target = entry.link_target
            done.pop()
            if target.startswith("/"):
                done = []
            todo = [p for p in target.split("/") if p] + todo
            entry = by_path.get("/".join(done)) if done else by_path.get("")
    return entry
