"""The file-tree side of the model: entries, layers, and flattening a stack of layers.

Container layers and filesystems meet here. A reader turns whatever it parses (a tar member, an
ext4 inode, an ISO directory record) into ``Entry`` objects; a writer consumes them. Paths are
normalised once, at the reader boundary, so nothing downstream ever has to wonder whether
``./a//b/`` and ``a/b`` are the same file, or whether ``../../etc/passwd`` escapes the root.

References: opencontainers/image-spec ``layer.md`` (changesets, whiteouts, opaque whiteouts,
"changeset over existing files", hardlinks).
"""

from __future__ import annotations

import enum
import io
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import KW_ONLY, dataclass, field, replace
from typing import BinaryIO

from ..errors import InvalidImageError, InvalidInputError, UnsupportedFeatureError

__all__ = [
    "OPAQUE_MARKER",
    "WHITEOUT_PREFIX",
    "Entry",
    "EntryType",
    "Layer",
    "LayerChanges",
    "decode_whiteout",
    "encode_whiteout",
    "flatten",
    "layer_changes",
    "normalize_path",
]

#: A layer entry whose base name starts with this hides the rest of the name in lower layers.
WHITEOUT_PREFIX = ".wh."
#: A layer entry with this base name hides every lower-layer child of its directory.
OPAQUE_MARKER = ".wh..wh..opq"


class EntryType(enum.Enum):
    """What an entry is. WHITEOUT and OPAQUE exist only inside layers, never in a flat tree."""

    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"
    SOCKET = "socket"
    WHITEOUT = "whiteout"  #: hides ``path`` and everything below it in lower layers
    OPAQUE = "opaque"  #: hides every lower-layer child of the directory ``path``


_DEFAULT_MODE = {EntryType.DIR: 0o755, EntryType.SYMLINK: 0o777}


@dataclass(frozen=True, slots=True)
class Entry:
    """One node of a file tree, as a layer or a filesystem describes it.

    ``path`` is normalised (see ``normalize_path``): relative to the root, ``/``-separated, with
    no empty, ``.`` or ``..`` component; the root itself is ``""`` and can only be a DIR (or the
    OPAQUE marker of a layer that hides everything below).

    ``mode`` holds permission bits only (``0o7777``: setuid, setgid, sticky, rwx); the type lives
    in ``type``. Left at ``-1`` it becomes 0o755 for DIR, 0o777 for SYMLINK, 0o644 otherwise.
    Times are integer nanoseconds since the epoch, so negative times and times past 2038 survive
    any round trip; ``atime``/``ctime``/``crtime`` (creation, ext4's and FAT's birth time) are
    ``None`` where the source does not record them.

    ``link_target`` is a SYMLINK's target verbatim (it is data, resolved by whoever follows it)
    or, for a HARDLINK, the normalised path of the entry it shares an inode with.

    ``xattrs`` is a tuple of ``(name, value)`` pairs, sorted by name and free of duplicates —
    a tuple rather than a mapping so the entry stays frozen and hashable. Any mapping or iterable
    of pairs is accepted and normalised; ``xattr_map()`` gives a dict back.

    ``opener`` produces the content of a FILE lazily and may be called more than once, each call
    returning a fresh stream positioned at 0. It takes no part in equality, hashing or repr.

    Construction checks these invariants and raises ``InvalidInputError`` when one fails: a
    reader must normalise hostile input (``InvalidImageError``) before building entries.
    """

    path: str
    type: EntryType
    _: KW_ONLY
    mode: int = -1
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    atime: int | None = None
    ctime: int | None = None
    crtime: int | None = None
    size: int = 0
    link_target: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: tuple[tuple[str, bytes], ...] = ()
    uname: str | None = None
    gname: str | None = None
    opener: Callable[[], BinaryIO] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not _is_normalized(self.path):
            raise InvalidInputError(
                f"entry path {self.path!r} is not normalised", hint="pass it through normalize_path"
            )
        if self.path == "" and self.type not in (EntryType.DIR, EntryType.OPAQUE):
            raise InvalidInputError(f"the root can only be a directory, not a {self.type.value}")
        if self.mode == -1:
            object.__setattr__(self, "mode", _DEFAULT_MODE.get(self.type, 0o644))
        elif not 0 <= self.mode <= 0o7777:
            raise InvalidInputError(
                f"{self.path}: mode {self.mode:#o} has bits outside 0o7777 (type bits go in type)"
            )
        if self.size < 0 or (self.size and self.type is not EntryType.FILE):
            raise InvalidInputError(f"{self.path}: size {self.size} for a {self.type.value}")
        if self.type is EntryType.HARDLINK and not (
            self.link_target and _is_normalized(self.link_target)
        ):
            raise InvalidInputError(
                f"{self.path}: hardlink target {self.link_target!r} is not a normalised path"
            )
        if self.xattrs:
            object.__setattr__(self, "xattrs", tuple(sorted(dict(self.xattrs).items())))

    @property
    def name(self) -> str:
        """The last path component ("" for the root)."""
        return self.path.rpartition("/")[2]

    @property
    def parent(self) -> str:
        """The path of the containing directory ("" for top-level entries and the root)."""
        return self.path.rpartition("/")[0]

    def xattr_map(self) -> dict[str, bytes]:
        """The extended attributes as a fresh dict."""
        return dict(self.xattrs)

    def open(self) -> BinaryIO:
        """Open the content of a regular file.

        Raises ``InvalidInputError`` for anything that is not a FILE, or a FILE built without an
        opener (metadata-only listings).
        """
        if self.type is not EntryType.FILE:
            raise InvalidInputError(f"{self.path or '/'} is a {self.type.value}, it has no content")
        if self.opener is None:
            raise InvalidInputError(f"{self.path}: no content source is attached to this entry")
        return self.opener()


def _is_normalized(path: str) -> bool:
    return path == "" or (
        "\x00" not in path and all(part not in ("", ".", "..") for part in path.split("/"))
    )


def normalize_path(path: str) -> str:
    """Return ``path`` as a normalised tree path, refusing any that would leave the root.

    ``"./a//b/"`` and ``"/a/b"`` become ``"a/b"``; ``"."``, ``"/"`` and ``"./"`` become the root
    ``""``; ``".."`` is resolved lexically while it stays inside the tree (``"a/../b"`` is
    ``"b"``). A ``..`` that climbs above the root raises ``InvalidImageError`` instead of being
    clamped: an archive member named ``../../etc/passwd`` is hostile, not sloppy, and quietly
    rewriting it would hide that. NUL bytes are refused for the same reason.
    """
    if "\x00" in path:
        raise InvalidImageError(f"path {path!r} contains a NUL byte")
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise InvalidImageError(f"path {path!r} climbs above the root")
            parts.pop()
        else:
            parts.append(part)
    return "/".join(parts)


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def decode_whiteout(entry: Entry) -> Entry:
    """Turn an entry named with the OCI whiteout convention into a WHITEOUT or OPAQUE entry.

    Readers of layer archives call this on every member so the rest of imgbridge never sees a
    ``.wh.`` name: ``dir/.wh.NAME`` becomes WHITEOUT ``dir/NAME`` and ``dir/.wh..wh..opq``
    becomes OPAQUE ``dir`` (``""`` at the top). Any entry type carrying such a name is decoded,
    since the spec reserves the prefix entirely. Other entries come back unchanged.

    Raises ``InvalidImageError`` for ``.wh.`` with nothing usable after it (empty, ``.`` or
    ``..``) and for a ``.wh.`` name used as a directory on the way to another entry — neither
    can come from a well-formed layer (AUFS ``.wh..wh.plnk/`` link directories are refused this
    way rather than silently turned into files).
    """
    if WHITEOUT_PREFIX not in entry.path or entry.type in (EntryType.WHITEOUT, EntryType.OPAQUE):
        return entry
    parent, _, name = entry.path.rpartition("/")
    if parent and any(part.startswith(WHITEOUT_PREFIX) for part in parent.split("/")):
        raise InvalidImageError(f"{entry.path}: a whiteout name is used as a directory")
    if not name.startswith(WHITEOUT_PREFIX):
        return entry
    if name == OPAQUE_MARKER:
        return replace(entry, path=parent, type=EntryType.OPAQUE, size=0, opener=None)
    hidden = name[len(WHITEOUT_PREFIX) :]
    if hidden in ("", ".", ".."):
        raise InvalidImageError(f"whiteout {entry.path!r} names no entry")
    return replace(entry, path=_join(parent, hidden), type=EntryType.WHITEOUT, size=0, opener=None)


def _no_content() -> BinaryIO:
    return io.BytesIO()


def encode_whiteout(entry: Entry) -> Entry:
    """The reverse of ``decode_whiteout``, for layer writers.

    WHITEOUT ``dir/NAME`` becomes an empty FILE ``dir/.wh.NAME``; OPAQUE ``dir`` becomes an empty
    FILE ``dir/.wh..wh..opq``. Ownership, mode and times are kept. Other entries come back
    unchanged.
    """
    if entry.type is EntryType.WHITEOUT:
        path = _join(entry.parent, WHITEOUT_PREFIX + entry.name)
    elif entry.type is EntryType.OPAQUE:
        path = _join(entry.path, OPAQUE_MARKER)
    else:
        return entry
    return replace(entry, path=path, type=EntryType.FILE, size=0, opener=_no_content)


@dataclass
class Layer:
    """One changeset of a container image: entries in archive order plus its descriptor facts.

    Layers can be far larger than memory, so ``entries`` is either a sequence or a function that
    returns a fresh iterable each time it is called (``Layer(entries=lambda: read_tar(path))``);
    ``iter_entries()`` hides the difference. A bare iterator is refused because a layer may be
    walked more than once (flatten, then write) and the second walk would silently be empty.

    ``digest`` names the blob as stored (compressed), ``diff_id`` the uncompressed tar, both as
    ``algorithm:hex``; ``size`` is the stored blob's size.
    """

    entries: Callable[[], Iterable[Entry]] | Sequence[Entry]
    digest: str | None = None
    diff_id: str | None = None
    media_type: str | None = None
    size: int | None = None
    annotations: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.entries, Iterator):
            raise InvalidInputError(
                "Layer entries must be re-iterable",
                hint="pass a sequence, or a function that returns a fresh iterator",
            )

    def iter_entries(self) -> Iterator[Entry]:
        """Iterate over the layer's entries in archive order, from the start."""
        source = self.entries
        return iter(source() if callable(source) else source)


# ---------------------------------------------------------------------------------------------
# flatten


class _Inode:
    """The identity of one non-directory file: every path hardlinked to it holds the same one."""

    __slots__ = ("entry",)

    def __init__(self, entry: Entry) -> None:
        self.entry = entry


class _Node:
    """A path in the tree being built. ``children`` is not None exactly for directories."""

    __slots__ = ("children", "entry", "inode")

    def __init__(self, entry: Entry | None) -> None:
        self.entry = entry  # None: a directory nobody described (implicit parent, or the root)
        self.inode: _Inode | None = None
        self.children: dict[str, _Node] | None = (
            {} if entry is None or entry.type is EntryType.DIR else None
        )

    def kind(self) -> EntryType:
        return EntryType.DIR if self.entry is None else self.entry.type


def _step(node: _Node, name: str, path: str, prefix: str) -> _Node | None:
    """Step from directory ``node`` into ``name`` on the way to ``path``; None if absent."""
    assert node.children is not None
    child = node.children.get(name)
    if child is not None and child.kind() is EntryType.SYMLINK:
        raise UnsupportedFeatureError(
            f"{path}: its parent {prefix} is a symbolic link; "
            "following symlinks inside layer paths is not supported"
        )
    return child


def _find_parent(root: _Node, path: str) -> tuple[_Node | None, str]:
    """The directory node that would hold ``path`` (None if there is none) and the base name."""
    parts = path.split("/")
    node = root
    for depth, name in enumerate(parts[:-1]):
        child = _step(node, name, path, "/".join(parts[: depth + 1]))
        if child is None or child.children is None:
            return None, parts[-1]
        node = child
    return node, parts[-1]


def _find(root: _Node, path: str) -> _Node | None:
    """The node at ``path`` in the tree so far, or None. Symlinks on the way are not followed."""
    if path == "":
        return root
    parent, name = _find_parent(root, path)
    return None if parent is None or parent.children is None else parent.children.get(name)


def _insert(root: _Node, entry: Entry) -> _Node:
    """Place ``entry`` in the tree, creating implicit parents; returns its node."""
    if entry.path == "":
        root.entry = entry  # Entry guarantees the root is a DIR; its children stay
        return root
    node = root
    parts = entry.path.split("/")
    for depth, name in enumerate(parts[:-1]):
        prefix = "/".join(parts[: depth + 1])
        child = _step(node, name, entry.path, prefix)
        assert node.children is not None
        if child is None:
            child = node.children[name] = _Node(None)
        elif child.children is None:
            raise InvalidImageError(
                f"{entry.path}: its parent {prefix} is a {child.kind().value}, not a directory"
            )
        node = child
    assert node.children is not None
    name = parts[-1]
    existing = node.children.get(name)
    if entry.type is EntryType.DIR and existing is not None and existing.children is not None:
        existing.entry = entry  # directory over directory: merge, the upper metadata wins
        return existing
    # Anything else replaces the path outright, dropping a lower directory's children with it.
    new = node.children[name] = _Node(entry)
    if entry.type not in (EntryType.DIR, EntryType.HARDLINK):
        new.inode = _Inode(entry)
    return new


def _resolve_hardlink(root: _Node, start: _Node) -> None:
    """Give a HARDLINK node the inode of what its target holds in the tree right now."""
    chain: list[_Node] = []
    seen: set[int] = set()
    node = start
    while node.inode is None:  # only this layer's own unresolved hardlinks lack an inode
        if id(node) in seen:
            raise InvalidImageError(f"hardlink {start.entry.path if start.entry else ''} loops")
        seen.add(id(node))
        chain.append(node)
        link = node.entry
        assert link is not None and link.type is EntryType.HARDLINK
        target = _find(root, link.link_target)
        if target is None:
            raise InvalidImageError(
                f"hardlink {link.path} points to {link.link_target}, which does not exist"
            )
        if target.children is not None:
            raise InvalidImageError(
                f"hardlink {link.path} points to {link.link_target}, which is a directory"
            )
        node = target
    for linked in chain:
        linked.inode = node.inode


@dataclass
class LayerChanges:
    """One layer's entries in the order ``layer.md`` applies them to the layers below.

    ``whiteouts`` and ``opaques`` (paths) apply first, whatever their position in the archive
    (the opaque marker "is applied first"), and to lower layers only. ``entries`` are the
    others, one per path (a later tar member for the same path wins), parents before children.
    """

    whiteouts: set[str]
    opaques: set[str]
    entries: list[Entry]


def layer_changes(entries: Iterable[Entry]) -> LayerChanges:
    """Split one layer's entries (``.wh.`` names decoded) as flatten applies them; anything
    that mirrors flatten's bookkeeping (wasted-space counts, say) starts from this."""
    upper: dict[str, Entry] = {}
    whiteouts: set[str] = set()
    opaques: set[str] = set()
    for raw in entries:
        entry = decode_whiteout(raw)
        if entry.type is EntryType.WHITEOUT:
            whiteouts.add(entry.path)
        elif entry.type is EntryType.OPAQUE:
            opaques.add(entry.path)
        else:
            upper[entry.path] = entry
    ordered = [upper[path] for path in sorted(upper, key=lambda p: p.split("/"))]
    return LayerChanges(whiteouts, opaques, ordered)


def _apply_layer(root: _Node, layer: Layer) -> None:
    changes = layer_changes(layer.iter_entries())
    for path in changes.whiteouts:
        parent, name = _find_parent(root, path)
        if parent is not None and parent.children is not None:
            parent.children.pop(name, None)
    for path in changes.opaques:
        directory = _find(root, path)
        if directory is not None and directory.children is not None:
            directory.children.clear()

    hardlinks: list[_Node] = []
    for entry in changes.entries:
        node = _insert(root, entry)
        if node.entry is not None and node.entry.type is EntryType.HARDLINK:
            hardlinks.append(node)
    for node in hardlinks:
        _resolve_hardlink(root, node)


def _implicit_dir(path: str) -> Entry:
    return Entry(path, EntryType.DIR, mode=0o755, uid=0, gid=0, mtime=0)


def _emit(path: str, node: _Node, first_path: dict[_Inode, str]) -> Entry:
    if node.children is not None:
        return node.entry if node.entry is not None else _implicit_dir(path)
    inode = node.inode
    assert inode is not None and node.entry is not None
    primary = first_path.get(inode)
    if primary is None:
        # The first path of an inode in output order carries its content and metadata. For a
        # hardlink whose original path was deleted or replaced, that materialises the link.
        first_path[inode] = path
        return inode.entry if inode.entry.path == path else replace(inode.entry, path=path)
    if node.entry.type is EntryType.HARDLINK:
        link = node.entry
        return link if link.link_target == primary else replace(link, link_target=primary)
    return replace(node.entry, type=EntryType.HARDLINK, link_target=primary, size=0, opener=None)


def flatten(layers: Sequence[Layer]) -> list[Entry]:
    """Apply ``layers`` (lowest first) and return the resulting tree, per OCI ``layer.md``.

    The rules, exactly:

    * An entry in an upper layer replaces the same path from lower layers. Directory over
      directory merges: the upper's metadata wins and the lower children stay. Anything else
      replaces the path outright, so a non-directory over a directory drops its lower children.
      Within one layer a later member for the same path wins, as when extracting a tar.
    * A WHITEOUT hides its path and everything below it, an OPAQUE marker hides every child of
      its directory (not the directory itself). Both apply to lower layers only: whatever the
      same layer adds — the whited-out path itself, or siblings next to an opaque marker —
      survives, in whatever order the archive lists them.
    * A parent that no layer describes (``a/b/c`` without ``a/b``) is synthesised as a DIR with
      mode 0o755, owner root:root (uid/gid 0) and mtime 0. The root entry ``""`` is returned
      only if some layer describes it.
    * A HARDLINK shares the inode its target holds in the tree once the link's own layer is
      applied; the target is looked up in this tree, never on the host. From then on the link
      keeps that inode even if the target path is later whited out or replaced, as a hardlink on
      a real filesystem does. In the output, the first path of each inode (in output order) is
      the real entry — normally a FILE, with the inode's metadata and content opener — and
      every other path of that inode is a HARDLINK to it. So a link whose target is gone comes
      out as a FILE, and hardlinks always come after the entry they point to.
    * ``InvalidImageError`` for an entry below a non-directory, or a hardlink to a missing
      path, a directory, or itself; ``UnsupportedFeatureError`` for a path that runs through a
      symbolic link (runtimes would follow it inside the root; imgbridge does not yet).

    The result is sorted by path components (so parents come before their children), contains
    no WHITEOUT or OPAQUE entry and no duplicate path. Layers are streamed one at a time;
    memory holds at most one Entry per path of the tree plus those of the layer being applied,
    and never file contents, which stay behind each entry's opener.
    """
    root = _Node(None)
    for layer in layers:
        _apply_layer(root, layer)

    out: list[Entry] = []
    if root.entry is not None:
        out.append(root.entry)
    first_path: dict[_Inode, str] = {}
    stack: list[tuple[str, _Node]] = [("", root)]
    while stack:  # iterative pre-order walk: deep trees must not hit the recursion limit
        path, node = stack.pop()
        if path:
            out.append(_emit(path, node, first_path))
        if node.children:
            for name in sorted(node.children, reverse=True):
                stack.append((_join(path, name), node.children[name]))
    return out
