"""Wasted space in a layer stack: bytes lower layers store that upper layers make unreachable.

A layer cannot change a lower layer's blob, only hide parts of it: a whiteout or an opaque
marker deletes, and a new entry at the same path replaces (a metadata-only change such as a
``chmod`` re-stores the whole file). The hidden bytes still travel with every pull.

The count is exact for what the image spec defines, with these rules:

* each stored file version counts once, when its *last* name disappears, and is charged to the
  layer that removed that name (a file written in layer 0 and replaced in layers 1 and 2
  wastes layer 0's copy, charged to layer 1, and layer 1's copy, charged to layer 2);
* hardlinks share one stored copy: deleting one name of a hardlinked file wastes nothing while
  another name (in any layer) still reaches it, as on a real filesystem;
* replacing or whiting out a directory hides everything below it; an opaque marker hides the
  directory's lower children but not the directory itself;
* directories, symlinks and devices store no content and waste nothing. Two members for one
  path inside the same layer are that layer's own business (the earlier one is not counted:
  it is not in a *lower* layer).

The bookkeeping mirrors ``imgbridge.model.tree.flatten`` (both order a layer with
``layer_changes``: whiteouts and opaque markers apply first, then its entries parents-first,
then its hardlinks), but keeps only sizes and name counts, never contents. Where flatten
would refuse the stack (an entry below a non-directory, a hardlink to nothing) this module
does not: ``inspect`` reports what it can, and such an entry is simply taken to hide nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

from imgbridge.model.tree import Entry, EntryType, layer_changes

__all__ = ["WasteCounter"]


class _Stored:
    """One stored file version (an inode): its size and how many tree paths still reach it."""

    __slots__ = ("names", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.names = 0


class _Dir:
    __slots__ = ("children",)

    def __init__(self) -> None:
        self.children: dict[str, _Dir | _Leaf] = {}


class _Leaf:
    """A non-directory path. ``stored`` is None only for a hardlink not yet resolved."""

    __slots__ = ("link", "stored")

    def __init__(self, stored: _Stored | None, link: str = "") -> None:
        self.stored = stored
        self.link = link
        if stored is not None:
            stored.names += 1


class WasteCounter:
    """Feed layers lowest first with ``add_layer``; each call returns the bytes that layer
    hides from the layers below it. ``total`` is the sum so far.

    Memory holds one small node per path of the tree, as flatten does; entries are consumed
    as they stream and their contents are never opened.
    """

    def __init__(self) -> None:
        self._root = _Dir()
        self.per_layer: list[int] = []

    @property
    def total(self) -> int:
        return sum(self.per_layer)

    def add_layer(self, entries: Iterable[Entry]) -> int:
        changes = layer_changes(entries)
        wasted = 0
        for path in changes.whiteouts:
            parent, name = self._parent(path)
            if parent is not None and name in parent.children:
                wasted += _drop(parent.children.pop(name))
        for path in changes.opaques:
            node = self._find(path)
            if isinstance(node, _Dir):
                for child in node.children.values():
                    wasted += _drop(child)
                node.children.clear()
        links: list[_Leaf] = []
        for entry in changes.entries:
            wasted_here, leaf = self._insert(entry)
            wasted += wasted_here
            if leaf is not None and leaf.stored is None:
                links.append(leaf)
        for leaf in links:
            self._resolve(leaf)
        self.per_layer.append(wasted)
        return wasted

    # -- tree helpers -------------------------------------------------------------------

    def _parent(self, path: str) -> tuple[_Dir | None, str]:
        *dirs, name = path.split("/")
        node: _Dir | _Leaf = self._root
        for part in dirs:
            if not isinstance(node, _Dir) or part not in node.children:
                return None, name
            node = node.children[part]
        return (node if isinstance(node, _Dir) else None), name

    def _find(self, path: str) -> _Dir | _Leaf | None:
        if path == "":
            return self._root
        parent, name = self._parent(path)
        return None if parent is None else parent.children.get(name)

    def _insert(self, entry: Entry) -> tuple[int, _Leaf | None]:
        """Place ``entry``; returns the bytes it hides and its leaf (None for a directory)."""
        if entry.path == "":
            return 0, None
        node = self._root
        *dirs, name = entry.path.split("/")
        for part in dirs:
            child = node.children.get(part)
            if child is None:
                child = node.children[part] = _Dir()  # an implicit parent, as flatten makes
            if not isinstance(child, _Dir):
                return 0, None  # below a non-directory: flatten refuses it; it hides nothing
            node = child
        existing = node.children.get(name)
        if entry.type is EntryType.DIR:
            if isinstance(existing, _Dir):
                return 0, None  # directory over directory merges; the children stay
            node.children[name] = _Dir()
            return (_drop(existing) if existing is not None else 0), None
        if entry.type is EntryType.HARDLINK:
            leaf = _Leaf(None, entry.link_target)
        else:
            leaf = _Leaf(_Stored(entry.size if entry.type is EntryType.FILE else 0))
        node.children[name] = leaf
        return (_drop(existing) if existing is not None else 0), leaf

    def _resolve(self, leaf: _Leaf) -> None:
        """Give a hardlink the stored file its target reaches now (after its own layer)."""
        seen: set[int] = set()
        node: _Dir | _Leaf | None = leaf
        while isinstance(node, _Leaf) and node.stored is None and id(node) not in seen:
            seen.add(id(node))
            node = self._find(node.link)
        if isinstance(node, _Leaf) and node.stored is not None:
            leaf.stored = node.stored
        else:
            # A link to nothing, a directory or itself: flatten refuses the image. Give it a
            # copy of its own so it hides nothing and is never counted as wasted.
            leaf.stored = _Stored(0)
        leaf.stored.names += 1


def _drop(node: _Dir | _Leaf) -> int:
    """Remove ``node`` and everything below it from the tree; the bytes that became hidden."""
    wasted = 0
    stack: list[_Dir | _Leaf] = [node]
    while stack:  # iterative: a deep tree must not hit the recursion limit
        current = stack.pop()
        if isinstance(current, _Dir):
            stack.extend(current.children.values())
            continue
        stored = current.stored
        if stored is None:
            continue  # an unresolved hardlink of this very layer: it was never a name
        stored.names -= 1
        if stored.names == 0:
            wasted += stored.size
    return wasted
