"""Write an ISO9660 image with Rock Ridge 1.09 and Joliet from a file tree, through pycdlib.

What each part of the image carries:

* ISO9660 names: interchange level 3, 8.3 names of d-characters (``A-Z 0-9 _``, e.g.
  ``HOSTNAME.;1``, directories up to 8 characters), made unique in each directory with a
  numeric tail (``FILE_001``, ``FILE_002``...) in the order of the Rock Ridge names. 8.3 is
  what every reader accepts (isoinfo, xorriso, the Linux kernel, Windows, DOS); level 3 is
  needed only so files over 4 GiB can be split in several extents. Directories deeper than
  eight levels are written where they are (no RR_MOVED relocation): Linux, isoinfo and
  xorriso read them; without Rock Ridge such a tree is refused.
* Rock Ridge 1.09: the real names (NM), modes of every file type and owners (PX), symlink
  targets (SL), device numbers (PN, see ``_device_words``),
  times (TF: modify, access, attribute change, in seconds; no creation time), and hardlinks
  (several directory records sharing one extent, with the PX link count set to the number of
  names). Empty hardlinked files share the empty extent every empty file has; readers
  cannot tell them from unrelated empty files (Rock Ridge 1.09 has no inode numbers).
* Joliet (UCS-2, level 3) for Windows: directories and regular files (hardlinks too);
  symlinks, devices, fifos and sockets are left out, as genisoimage does. Names lose the
  characters Joliet forbids (``* / : ; ? \\``) and are cut to 64 bytes of UTF-8 (pycdlib's
  limit) keeping an extension of up to 8 characters, made unique with a ``~N`` tail before
  the extension.

pycdlib gaps and how they are filled: it writes no PN record, so a device's PN is added to
its directory record after pycdlib made it and the record is placed again in its directory
(``_add_device_number``, private pycdlib calls guarded by a feature check); it stamps dates
with the clock and the local time zone, so every directory record date, Rock Ridge TF and
volume date is set again from the tree's times (in UTC) and the volume modification date,
which pycdlib takes from the clock while writing, is patched in the output afterwards. The
volume dates are the newest mtime in the tree. Same tree, same bytes.

Streaming: pycdlib keeps each file's object until it writes the image, then reads each in
turn; every file is a ``_LazyContent`` that calls the entry's ``open()`` on its first read
and closes it at the end of its data, so one file is open at a time and no content is held
in memory. pycdlib needs a seekable output, so the image is written to ``out.path``.

References: ECMA-119 4th edition; IEEE P1281 SUSP 1.12; IEEE P1282 RRIP 1.09 (PX, PN, SL,
NM, TF); Joliet Specification (Microsoft, 1995).
"""

from __future__ import annotations

import builtins
import contextlib
import io
import stat
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import pycdlib
from pycdlib import dates, pycdlibexception, rockridge

from imgbridge.errors import InternalError, InvalidInputError, UnsupportedFeatureError
from imgbridge.model.tree import Entry, EntryType
from imgbridge.options import parse_switch
from imgbridge.output import AtomicOutput
from imgbridge.progress import ProgressFn, no_progress

from . import _structs as s

__all__ = ["CREATE_OPTIONS", "create"]

CREATE_OPTIONS = {
    "label": "volume identifier: up to 32 characters A-Z 0-9 _ (lower case is raised; "
             "default CDROM); Joliet keeps its first 16",
    "joliet": "on|off: add a Joliet tree for Windows (default on)",
    "rock_ridge": "on|off: add Rock Ridge 1.09: POSIX names, modes, owners, times, "
                  "symlinks, devices, hardlinks (default on)",
    "publisher": "publisher identifier, up to 128 characters (default empty)",
}

#: A file longer than this takes several directory records (pycdlib's extent size).
_MAX_EXTENT = 0xFFFFF800
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_JOLIET_FORBIDDEN = frozenset("*/:;?\\")
_JOLIET_MAX_BYTES = 64
#: The longest extension (without its dot) kept when a Joliet name is cut.
_JOLIET_KEPT_SUFFIX = 8
_ISO_MAX_DEPTH = 8
_COPY_BLOCK = 1 << 20
_FORMAT_BITS = {
    EntryType.FILE: stat.S_IFREG,
    EntryType.HARDLINK: stat.S_IFREG,
    EntryType.DIR: stat.S_IFDIR,
    EntryType.SYMLINK: stat.S_IFLNK,
    EntryType.CHAR: stat.S_IFCHR,
    EntryType.BLOCK: stat.S_IFBLK,
    EntryType.FIFO: stat.S_IFIFO,
    EntryType.SOCKET: stat.S_IFSOCK,
}


class _LazyContent(io.RawIOBase):
    """A file's content for pycdlib: opened on the first read, closed once ``size`` bytes
    were read. A stream that ends early is an error (pycdlib would silently pad the file)."""

    def __init__(self, entry: Entry) -> None:
        self._entry = entry
        self._stream: BinaryIO | None = None
        self._left = entry.size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._entry.size - self._left

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence != io.SEEK_SET or offset != self.tell():
            raise InternalError(f"{self._entry.path}: pycdlib seeked inside a file's content")
        return offset

    def read(self, size: int | None = -1) -> bytes:
        want = self._left if size is None or size < 0 else min(size, self._left)
        if want == 0:
            return b""
        if self._stream is None:
            if self._entry.opener is None:
                raise InvalidInputError(f"{self._entry.path}: a file entry has no content")
            self._stream = self._entry.opener()
        pieces = []
        got = 0
        while got < want:
            piece = self._stream.read(want - got)
            if not piece:
                self._finish()
                raise InvalidInputError(
                    f"{self._entry.path}: its content ended after "
                    f"{self._entry.size - self._left + got} of its {self._entry.size} bytes",
                    hint="was the file changed while the image was written?")
            pieces.append(piece)
            got += len(piece)
        self._left -= got
        if self._left == 0:
            self._finish()
        return b"".join(pieces)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def _finish(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def close(self) -> None:
        self._finish()
        super().close()


@dataclass
class _Node:
    """One path of the tree being written, with the names it gets in each namespace."""

    entry: Entry
    iso_path: str = ""
    joliet_path: str | None = None
    children: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Options:
    label: str
    joliet: bool
    rock_ridge: bool
    publisher: str


def _parse_options(options: Mapping[str, str]) -> _Options:
    unknown = set(options) - set(CREATE_OPTIONS)
    if unknown:
        raise InvalidInputError(f"unknown iso9660 option(s): {', '.join(sorted(unknown))}",
                                hint=f"known: {', '.join(CREATE_OPTIONS)}")
    label = options.get("label", "CDROM").upper()
    if len(label) > 32 or any(ch not in _NAME_CHARS for ch in label):
        raise InvalidInputError(f"label {label!r} must be at most 32 characters A-Z 0-9 _")
    publisher = options.get("publisher", "")
    if len(publisher) > 128 or not publisher.isascii() or not publisher.isprintable():
        raise InvalidInputError("publisher must be at most 128 printable ASCII characters")
    return _Options(label, parse_switch(options, "joliet", True, format="iso9660"),
                    parse_switch(options, "rock_ridge", True, format="iso9660"), publisher)


# -- names -----------------------------------------------------------------------------------


def _d_characters(text: str) -> str:
    return "".join(ch if ch in _NAME_CHARS else "_" for ch in text.upper())


def _iso_names(names: list[str], dirs: set[str]) -> dict[str, str]:
    """8.3 identifiers for the children of one directory, unique, in the order given."""
    taken: set[str] = set()
    out: dict[str, str] = {}
    for name in names:
        if name in dirs:
            base, ext = _d_characters(name)[:8] or "_", ""
        else:
            stem, dot, suffix = name.rpartition(".")
            if not dot or not stem:
                stem, suffix = name, ""
            base, ext = _d_characters(stem)[:8], _d_characters(suffix)[:3]
            if not base:
                base = "_"
        candidate, number = base, 0
        while f"{candidate}.{ext}" in taken:
            number += 1
            tail = str(number)
            candidate = base[: 8 - len(tail)] + tail
        taken.add(f"{candidate}.{ext}")
        out[name] = candidate if name in dirs else f"{candidate}.{ext};1"
    return out


def _cut_utf8(text: str, limit: int) -> str:
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    return data[:limit].decode("utf-8", "ignore")


def _joliet_fit(name: str, tail: str) -> str:
    """``name`` with ``tail`` before its extension, cut to Joliet's 64 bytes; a short
    extension (".txt", ".tar.gz" keeps ".gz") survives the cut, so Windows still knows the
    file's type."""
    if not tail and len(name.encode("utf-8")) <= _JOLIET_MAX_BYTES:
        return name
    stem, dot, suffix = name.rpartition(".")
    if not dot or not stem or len(suffix.encode("utf-8")) > _JOLIET_KEPT_SUFFIX:
        stem, suffix = name, ""
    else:
        suffix = "." + suffix
    room = _JOLIET_MAX_BYTES - len(tail) - len(suffix.encode("utf-8"))
    return _cut_utf8(stem, room) + tail + suffix


def _joliet_names(names: list[str]) -> dict[str, str]:
    """Joliet names for the children of one directory, unique, in the order given."""
    taken: set[str] = set()
    out: dict[str, str] = {}
    for name in names:
        clean = "".join(
            "_" if ch in _JOLIET_FORBIDDEN or ch < " " or "\udc80" <= ch <= "\udcff" else ch
            for ch in name)
        candidate, number = _joliet_fit(clean, ""), 0
        while candidate in taken:
            number += 1
            candidate = _joliet_fit(clean, f"~{number}")
        taken.add(candidate)
        out[name] = candidate
    return out


# -- the tree --------------------------------------------------------------------------------


def _collect(tree: Iterable[Entry], rock_ridge: bool) -> dict[str, _Node]:
    """Every path of the tree (implicit parents added), by path."""
    nodes: dict[str, _Node] = {"": _Node(Entry("", EntryType.DIR, mode=0o755))}
    for entry in tree:
        if entry.type in (EntryType.WHITEOUT, EntryType.OPAQUE):
            raise InvalidInputError(f"{entry.path}: a {entry.type.value} entry belongs in a "
                                    "layer, not in a filesystem", hint="flatten the layers first")
        if not rock_ridge and entry.type not in (EntryType.FILE, EntryType.DIR,
                                                 EntryType.HARDLINK):
            warnings.warn(f"{entry.path}: a {entry.type.value} needs Rock Ridge; left out",
                          stacklevel=3)
            continue
        existing = nodes.get(entry.path)
        if existing is not None and entry.path:
            if existing.entry.type is EntryType.DIR and entry.type is EntryType.DIR:
                existing.entry = entry
                continue
            raise InvalidInputError(f"{entry.path}: the tree holds this path twice")
        if existing is not None:
            existing.entry = entry
            continue
        parent = entry.parent
        chain = []
        while parent not in nodes:
            chain.append(parent)
            parent = parent.rpartition("/")[0]
        for missing in reversed(chain):
            nodes[missing] = _Node(Entry(missing, EntryType.DIR, mode=0o755))
            nodes[missing.rpartition("/")[0]].children.append(missing)
        if nodes[entry.parent].entry.type is not EntryType.DIR:
            raise InvalidInputError(f"{entry.path}: its parent is not a directory")
        nodes[entry.path] = _Node(entry)
        nodes[entry.parent].children.append(entry.path)
    return nodes


def _preorder(nodes: dict[str, _Node]) -> Iterator[_Node]:
    stack = [""]
    while stack:
        node = nodes[stack.pop()]
        yield node
        stack.extend(sorted(node.children, key=_name_key, reverse=True))


def _name_key(path: str) -> bytes:
    return path.rpartition("/")[2].encode("utf-8", "surrogateescape")


def _assign_names(nodes: dict[str, _Node], joliet: bool) -> None:
    for node in _preorder(nodes):
        if node.entry.type is not EntryType.DIR:
            continue
        children = sorted(node.children, key=_name_key)
        names = [path.rpartition("/")[2] for path in children]
        dirs = {path.rpartition("/")[2] for path in children
                if nodes[path].entry.type is EntryType.DIR}
        iso = _iso_names(names, dirs)
        jol = _joliet_names([n for n, p in zip(names, children, strict=True)
                             if nodes[p].entry.type in (EntryType.DIR, EntryType.FILE,
                                                        EntryType.HARDLINK)])
        for name, path in zip(names, children, strict=True):
            child = nodes[path]
            child.iso_path = f"{node.iso_path}/{iso[name]}"
            if joliet and name in jol and node.joliet_path is not None:
                child.joliet_path = f"{node.joliet_path}/{jol[name]}"
    nodes[""].iso_path = "/"


def _resolve_links(nodes: dict[str, _Node]) -> dict[str, str]:
    """Each hardlink's final FILE path; an error for a link to nothing or to a non-file."""
    resolved: dict[str, str] = {}
    for path, node in nodes.items():
        if node.entry.type is not EntryType.HARDLINK:
            continue
        target, seen = node.entry.link_target, {path}
        while target in nodes and nodes[target].entry.type is EntryType.HARDLINK:
            if target in seen:
                raise InvalidInputError(f"hardlink {path} loops")
            seen.add(target)
            target = nodes[target].entry.link_target
        if target not in nodes or nodes[target].entry.type is not EntryType.FILE:
            raise InvalidInputError(f"hardlink {path} points to {node.entry.link_target!r}, "
                                    "which is not a file of the tree")
        resolved[path] = target
    return resolved


# -- metadata fix-ups ------------------------------------------------------------------------


def _short_date(ns: int) -> Any:
    return dates.DirectoryRecordDate.from_fields(*s.short_date_fields(ns))


def _long_date(ns: int) -> Any:
    date = dates.VolumeDescriptorDate()
    date.parse(s.long_date_bytes(ns))
    return date


def _rr_part(rr: Any, name: str) -> Any:
    value = getattr(rr.dr_entries, name)
    if value is None and rr.ce_entries is not None:
        value = getattr(rr.ce_entries, name)
    return value


def _stamp(record: Any, entry: Entry, nlink: int) -> None:
    """Give one directory record the entry's times, and its Rock Ridge the entry's mode,
    owner and link count. Every field changed has a fixed size, so no layout moves."""
    record.date = _short_date(entry.mtime)
    rr = record.rock_ridge
    if rr is None:
        return
    px = _rr_part(rr, "px_record")
    if px is not None:
        mode = entry.mode if entry.mode >= 0 else (0o755 if entry.type is EntryType.DIR
                                                   else 0o644)
        px.posix_file_mode = _FORMAT_BITS[entry.type] | (mode & 0o7777)
        px.posix_user_id = entry.uid
        px.posix_group_id = entry.gid
        if entry.type is not EntryType.DIR:
            px.posix_file_links = nlink
    tf = _rr_part(rr, "tf_record")
    if tf is not None:
        times = {s.TF_MODIFY_SLOT: entry.mtime, s.TF_ACCESS_SLOT: entry.atime,
                 s.TF_ATTRIBUTES_SLOT: entry.ctime}
        for attribute, value in times.items():
            if getattr(tf, attribute) is not None:
                setattr(tf, attribute, _short_date(entry.mtime if value is None else value))


def _add_device_number(iso: Any, record: Any, major: int, minor: int) -> None:
    """Add a PN record to a device's directory record, which pycdlib made without one.

    The record grows by the PN's 20 bytes, so it is taken out of its directory and placed
    again, which lets pycdlib recompute the directory's layout (and grow it a block if the
    record no longer fits)."""
    if not all(hasattr(iso, name) for name in ("_add_child_to_dr", "_finish_add")):
        raise UnsupportedFeatureError("device files: this pycdlib version cannot be extended "
                                      "with Rock Ridge PN records")
    rr = record.rock_ridge
    if major > 0xFFFFFFFF or minor > 0xFFFFFFFF:
        raise InvalidInputError(f"device number {major}:{minor} does not fit Rock Ridge PN")
    pn = rockridge.RRPNRecord()
    pn.new(*_device_words(major, minor))
    if record.dr_len + rockridge.RRPNRecord.length() > rockridge.ALLOWED_DR_SIZE:
        raise UnsupportedFeatureError("a device whose Rock Ridge entry leaves no room for its "
                                      "device number (PN): use a shorter name")
    rr.dr_entries.pn_record = pn
    # pycdlib parses PN but never emits it; the ES list is emitted verbatim, record by
    # record, so the PN rides there (SUSP entries may come in any order).
    rr.dr_entries.es_records.append(pn)
    if rr.dr_entries.rr_record is not None:
        rr.dr_entries.rr_record.append_field("PN")
    parent = record.parent
    parent.children[:] = [child for child in parent.children if child is not record]
    parent.rr_children[:] = [child for child in parent.rr_children if child is not record]
    record.dr_len += rockridge.RRPNRecord.length()
    iso._finish_add(0, iso._add_child_to_dr(record))


def _device_words(major: int, minor: int) -> tuple[int, int]:
    """The PN high and low words for a device number.

    Readers disagree (see ``reader.decode_device``): libisofs reads the two words as one
    64-bit ``dev_t``, Linux reads a zero high word with a low word above 255 as a packed
    16-bit-style ``dev_t`` and anything else as major/minor. A packed ``dev_t`` in the low
    word (glibc layout) is read right by both while the minor fits a byte; otherwise the
    major/minor pair genisoimage writes is what Linux reads right."""
    if major < 0x1000 and minor < 0x100:
        return 0, (minor & 0xFF) | (major << 8)
    return major, minor


def _patch_modification_dates(out: BinaryIO, when: bytes) -> None:
    """pycdlib writes the volume modification date from the clock: replace it."""
    for index in range(s.MAX_DESCRIPTORS):
        offset = s.DESCRIPTOR_START + index * s.SECTOR
        out.seek(offset)
        head = out.read(7)
        if len(head) < 7 or head[1:6] != s.STANDARD_ID or head[0] == s.VD_TERMINATOR:
            return
        if head[0] in (s.VD_PRIMARY, s.VD_SUPPLEMENTARY):
            out.seek(offset + s.VD_MODIFICATION_DATE_OFFSET)
            out.write(when)


# -- create ----------------------------------------------------------------------------------


def create(out: AtomicOutput, tree: Iterable[Entry], options: Mapping[str, str] | None = None,
           progress: ProgressFn = no_progress) -> None:
    """Write ``tree`` as an ISO9660 image into ``out.path`` (the caller commits ``out``)."""
    opts = _parse_options(options or {})
    nodes = _collect(tree, opts.rock_ridge)
    nodes[""].joliet_path = "/" if opts.joliet else None
    _assign_names(nodes, opts.joliet)
    links = _resolve_links(nodes)
    names_of: dict[str, int] = {}
    for first in links.values():
        names_of[first] = names_of.get(first, 1) + 1
    if not opts.rock_ridge:
        deepest = max((path.count("/") + 1 for path in nodes if path), default=0)
        if deepest > _ISO_MAX_DEPTH:
            raise UnsupportedFeatureError(f"a tree {deepest} levels deep without Rock Ridge "
                                          "(ISO9660 allows 8)", hint="use -o rock_ridge=on")
    newest = max((node.entry.mtime for node in nodes.values()), default=0)

    iso = pycdlib.PyCdlib()
    try:
        with _pycdlib_input():
            iso.new(interchange_level=3, vol_ident=opts.label, sys_ident="LINUX",
                    pub_ident_str=opts.publisher, app_ident_str="IMGBRIDGE",
                    joliet=3 if opts.joliet else None,
                    rock_ridge="1.09" if opts.rock_ridge else None)
            for node in _preorder(nodes):
                _add(iso, node, nodes, links, opts.rock_ridge)
            _fix_metadata(iso, nodes, links, names_of, opts, newest)
        total = 0

        def report(done: int, whole: int, _opaque: Any) -> None:
            nonlocal total
            total = whole
            progress(done, whole)

        with builtins.open(out.path, "r+b") as target:
            with _pycdlib_input():
                iso.write_fp(target, blocksize=_COPY_BLOCK, progress_cb=report)
            _patch_modification_dates(target, s.long_date_bytes(newest))
            # pycdlib writes no trailing padding after the last extent it fills.
            target.truncate(iso.pvd.space_size * iso.logical_block_size)
        progress(total, total)
    finally:
        iso.close()


@contextlib.contextmanager
def _pycdlib_input() -> Iterator[None]:
    """pycdlib's complaints about what we asked of it mean the tree cannot be written as
    is; any other pycdlib error is a bug on one side or the other."""
    try:
        yield
    except pycdlibexception.PyCdlibInvalidInput as exc:
        raise InvalidInputError(f"cannot write this tree as ISO9660: {exc}") from None
    except pycdlibexception.PyCdlibException as exc:
        raise InternalError(f"pycdlib failed: {exc}") from None


def _rr_name(node: _Node) -> str:
    name = node.entry.name
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsupportedFeatureError(f"{node.entry.path}: a name that is not valid UTF-8 "
                                      "(pycdlib stores Rock Ridge names as UTF-8)") from None
    return name


def _add(iso: Any, node: _Node, nodes: dict[str, _Node], links: dict[str, str],
         rock_ridge: bool) -> None:
    entry = node.entry
    if entry.path == "":
        return
    rr: dict[str, Any] = {"rr_name": _rr_name(node)} if rock_ridge else {}
    mode = _FORMAT_BITS[entry.type] | (entry.mode & 0o7777 if entry.mode >= 0 else 0o644)
    if rock_ridge:
        rr["file_mode"] = mode
    joliet = {"joliet_path": node.joliet_path} if node.joliet_path else {}
    kind = entry.type
    if kind is EntryType.DIR:
        iso.add_directory(iso_path=node.iso_path, **rr, **joliet)
    elif kind is EntryType.FILE:
        iso.add_fp(_LazyContent(entry), entry.size, iso_path=node.iso_path, **rr, **joliet)
    elif kind is EntryType.HARDLINK:
        target = nodes[links[entry.path]]
        if target.entry.size > _MAX_EXTENT:
            # pycdlib links only the first extent of a multi-extent file: store a copy.
            iso.add_fp(_LazyContent(target.entry), target.entry.size, iso_path=node.iso_path,
                       **rr, **joliet)
            return
        link_rr = {"rr_name": rr["rr_name"]} if rock_ridge else {}
        iso.add_hard_link(iso_old_path=target.iso_path, iso_new_path=node.iso_path, **link_rr)
        if node.joliet_path:
            iso.add_hard_link(iso_old_path=target.iso_path, joliet_new_path=node.joliet_path)
    elif kind is EntryType.SYMLINK:
        iso.add_symlink(symlink_path=node.iso_path, rr_symlink_name=rr["rr_name"],
                        rr_path=entry.link_target)
    else:
        iso.add_fp(io.BytesIO(), 0, iso_path=node.iso_path, **rr)
        if kind in (EntryType.CHAR, EntryType.BLOCK):
            record = iso.get_record(iso_path=node.iso_path)
            _add_device_number(iso, record, entry.devmajor, entry.devminor)


def _fix_metadata(iso: Any, nodes: dict[str, _Node], links: dict[str, str],
                  names_of: dict[str, int], opts: _Options, newest: int) -> None:
    """Replace every clock time pycdlib stamped, and set owners and link counts."""
    # One walk of each record tree: pycdlib's get_record searches from the root every time.
    by_iso = _record_index(iso.pvd.root_directory_record(), "ascii")
    by_joliet = (_record_index(iso.joliet_vd.root_directory_record(), "utf-16-be")
                 if iso.joliet_vd is not None else {})
    for path, node in nodes.items():
        entry = node.entry
        inode = links.get(path, path)
        shown = entry if entry.type is not EntryType.HARDLINK else nodes[inode].entry
        nlink = names_of.get(inode, 1)
        if path == "":
            record = iso.pvd.root_directory_record()
        else:
            record = by_iso[_record_key(node.iso_path)]
        for part in _extent_records(record):
            _stamp(part, shown, nlink)
        if entry.type is EntryType.DIR:
            _stamp(record.children[0], entry, 1)  # "." carries the directory's own attributes
            for child_path in node.children:
                child = nodes[child_path]
                if child.entry.type is EntryType.DIR:
                    sub = by_iso[_record_key(child.iso_path)]
                    _stamp(sub.children[1], entry, 1)  # ".." carries its parent's
            if path == "":
                _stamp(record.children[1], entry, 1)
        if node.joliet_path is not None:
            jrecord = (iso.joliet_vd.root_directory_record() if path == ""
                       else by_joliet[_record_key(node.joliet_path)])
            for part in _extent_records(jrecord):
                part.date = _short_date(shown.mtime)
            if entry.type is EntryType.DIR:
                for dot in jrecord.children[:2]:
                    dot.date = _short_date(entry.mtime)
    volume_date = s.long_date_bytes(newest)
    for descriptor in (iso.pvd, iso.joliet_vd):
        if descriptor is None:
            continue
        for attribute in ("volume_creation_date", "volume_modification_date",
                          "volume_effective_date"):
            date = dates.VolumeDescriptorDate()
            date.parse(volume_date)
            setattr(descriptor, attribute, date)
        descriptor.root_directory_record().date = _short_date(nodes[""].entry.mtime)


def _record_index(root: Any, encoding: str) -> dict[str, Any]:
    """Every record below ``root`` by its path (``/DIR/NAME.;1``, also without the ``;1``
    version), as pycdlib's get_record finds it; for a file in several extents, its first
    record."""
    index: dict[str, Any] = {}
    stack = [("", root)]
    while stack:
        prefix, record = stack.pop()
        for child in record.children[2:]:  # past "." and ".."
            name = child.file_identifier().decode(encoding)
            path = f"{prefix}/{name}"
            if child.rock_ridge is not None and child.rock_ridge.child_link_record_exists():
                # A directory deeper than 8 levels, moved to rr_moved: its path leads there.
                child = child.rock_ridge.cl_to_moved_dr
            index.setdefault(path, child)
            index.setdefault(path.rpartition(";")[0] or path, child)
            if child.is_dir():
                stack.append((path, child))
    return index


def _record_key(path: str) -> str:
    """A path as ``_record_index`` keys it: pycdlib accepts ``//a`` for ``/a``, so do we."""
    return "/" + "/".join(part for part in path.split("/") if part)


def _extent_records(record: Any) -> Iterator[Any]:
    """A record and the records continuing it (a file over 4 GiB has several)."""
    part = record
    while part is not None:
        yield part
        part = part.data_continuation
