"""Read an ISO9660 image (with Rock Ridge and Joliet) as a file tree, through pycdlib.

pycdlib parses the volume descriptors, path tables, directory records, Rock Ridge (SUSP) and
Joliet; this module turns what it parsed into the model's ``Entry`` tree and reads file content
itself, straight from the source (``extent * block size``), so listing a DVD image reads only
its metadata and ``cat`` streams one file.

Which names: Rock Ridge NM names when the volume carries Rock Ridge (its ER record), else the
Joliet tree's names, else the ISO9660 names with their ``;1`` version and the trailing ``.`` of
an extensionless name removed. ISO9660 names are kept as recorded (upper case): lowering them
would invent information the volume does not hold, and Linux shows them upper case too
(``map=off``); ``mount -o map=normal`` lowers them, which a caller can do on the entries.

Metadata with Rock Ridge: PX gives the mode (every file type), owner and link count; SL the
symlink target (components joined, ``/`` for the root component, ``.`` and ``..`` kept); PN
the device number; TF the times (modify, access, attribute change, creation; short and long
form). Without Rock Ridge a directory is 0555, a file 0444, owned by 0:0, and its mtime is the
directory record's date. A directory that Rock Ridge relocated (CL/RE, trees deeper than eight
levels) is shown where its CL record puts it; the ``rr_moved`` directory that held it stays
visible (empty), as Linux shows it.

Hardlinks: a file whose PX link count is above one and whose data (extent and length) is
shared with another such file is one file with several names; the first in tree order is the
FILE, the others HARDLINK entries. Sharing an extent alone means nothing: genisoimage and
xorriso give every empty file the same extent. Empty files are never joined unless Rock Ridge
1.12 serial numbers (PX inode numbers) say they are the same file, since their shared extent
cannot tell two linked pairs apart.

Files recorded in several extents (over 4 GiB, ISO9660 level 3) are read as the
concatenation of their extents. Hostile images (directory loops, records past the end of the
image, absurd lengths) raise ``InvalidImageError``; pycdlib's own errors are translated in one
place (``_translated``), and no single metadata read may exceed ``MAX_METADATA_READ``, so a
forged length cannot make pycdlib allocate gigabytes.

References: ECMA-119 4th edition (ISO 9660); IEEE P1281 SUSP 1.12; IEEE P1282 RRIP 1.09/1.12
(PX, PN, SL, NM, CL, PL, RE, TF); Joliet Specification (Microsoft, 1995).
"""

from __future__ import annotations

import contextlib
import stat
import struct
from collections.abc import Iterator
from typing import Any, BinaryIO, cast

import pycdlib
from pycdlib import pycdlibexception

from imgbridge.errors import InvalidImageError, UnsupportedFeatureError
from imgbridge.model.fs import Filesystem
from imgbridge.model.tree import Entry, EntryType
from imgbridge.source import ByteSource, ConcatSource, CursorFile, RangeSource, read_exact

from . import _structs as s

__all__ = ["IsoFilesystem", "MAX_METADATA_READ", "decode_device"]

#: The largest single read pycdlib may make of the image: directories and path tables larger
#: than this (millions of entries) are not real.
MAX_METADATA_READ = 256 << 20

_FILE_MULTI_EXTENT = 0x80
#: Byte 7 of a supplementary volume descriptor holds its flags; bit 0 set says its escape
#: sequences are not registered ISO 2375 ones (ECMA-119 8.5.3), so it is not Joliet.
_VD_FLAGS_OFFSET = 7
_SVD_FLAG_NOT_ISO2375 = 0x01
_SL_CONTINUE, _SL_CURRENT, _SL_PARENT, _SL_ROOT = 0x01, 0x02, 0x04, 0x08

_TYPES_BY_FORMAT = {
    stat.S_IFREG: EntryType.FILE,
    stat.S_IFDIR: EntryType.DIR,
    stat.S_IFLNK: EntryType.SYMLINK,
    stat.S_IFCHR: EntryType.CHAR,
    stat.S_IFBLK: EntryType.BLOCK,
    stat.S_IFIFO: EntryType.FIFO,
    stat.S_IFSOCK: EntryType.SOCKET,
}


@contextlib.contextmanager
def _translated(name: str) -> Iterator[None]:
    """The one place pycdlib's errors become imgbridge's: a malformed image is
    ``InvalidImageError``. pycdlib also lets ``struct``/index errors escape on truncated
    records, which are the same thing."""
    try:
        yield
    except InvalidImageError:
        raise
    except (pycdlibexception.PyCdlibException, struct.error, IndexError, KeyError, ValueError,
            UnicodeError, OverflowError, RecursionError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidImageError(f"malformed ISO9660 image: {reason}", format="iso9660",
                                path=name) from None


class _GuardedFile(CursorFile):
    """The file object pycdlib reads metadata through: pread-backed, unbuffered (pycdlib
    seeks before almost every read, which would throw a read-ahead buffer away), and refusing
    any single read larger than ``MAX_METADATA_READ`` before it allocates."""

    def __init__(self, source: ByteSource, masked: frozenset[int] = frozenset()) -> None:
        super().__init__(source.size)
        self._source = source
        #: Offsets of volume descriptor flag bytes shown with bit 0 set (see ``_open``).
        self._masked = masked

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = max(0, self._source.size - self._pos)
        if size > MAX_METADATA_READ:
            raise InvalidImageError(
                f"a metadata structure at offset {self._pos} claims {size} bytes",
                format="iso9660", path=self._source.name, offset=self._pos)
        data = self._source.read_at(self._pos, size)
        hit = [offset for offset in self._masked if self._pos <= offset < self._pos + len(data)]
        if hit:
            patched = bytearray(data)
            for offset in hit:
                patched[offset - self._pos] |= _SVD_FLAG_NOT_ISO2375
            data = bytes(patched)
        self._pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)



def _text(raw: bytes) -> str:
    return raw.decode("ascii", "replace").rstrip(" \x00")


def decode_device(high: int, low: int) -> tuple[int, int]:
    """(major, minor) of a Rock Ridge PN record.

    Writers disagree: genisoimage stores major and minor in the high and low words; libisofs
    (xorriso) stores the host's 64-bit ``dev_t`` split in two, which on Linux leaves the high
    word 0 for every common device. Like the Linux kernel, a zero high word with a low word
    above 255 is read as a packed ``dev_t``, decoded with glibc's layout (major in bits 8-19
    and 32-43, minor in bits 0-7 and 20-31)."""
    if high == 0 and low & ~0xFF:
        dev = low
        return ((dev >> 8) & 0xFFF) | ((dev >> 32) & ~0xFFF), (dev & 0xFF) | ((dev >> 12) & ~0xFF)
    return high, low


def _iso_name(identifier: bytes) -> bytes:
    """An ISO9660 file identifier without its version and without the dot of a name that
    has no extension ("README.;1" is "README")."""
    name = identifier.split(b";", 1)[0]
    return name[:-1] if name.endswith(b".") else name


class _Node:
    """One directory record turned into what ``entries()`` needs."""

    __slots__ = ("children", "entry", "key", "nlink")

    def __init__(self, entry: Entry, key: tuple[Any, ...] | None, nlink: int) -> None:
        self.entry = entry
        self.key = key
        self.nlink = nlink
        self.children: list[Any] | None = None


class IsoFilesystem(Filesystem):
    """An ISO9660 volume opened from a ``ByteSource`` (a file or one partition of a disk)."""

    format_name = "iso9660"

    def __init__(self, source: ByteSource) -> None:
        self._source = source
        self._name = source.name
        self._descriptors = self._read_descriptors()
        primary = self._descriptors[s.VD_PRIMARY][0]
        self._block = primary.block_size
        joliet_flags = frozenset(
            s.DESCRIPTOR_START + index * s.SECTOR + _VD_FLAGS_OFFSET
            for index, svd in self._descriptor_order
            if svd.escape_sequences[:3] in s.JOLIET_ESCAPES
            and not svd.flags & _SVD_FLAG_NOT_ISO2375)
        self._joliet = bool(joliet_flags)
        # With Rock Ridge the Joliet tree is never read, yet pycdlib would parse all of it
        # (half the cost of listing): it is shown a Joliet descriptor whose flag says its
        # escape sequences are not ISO 2375 ones, which pycdlib then passes over. If the
        # volume turns out to have no Rock Ridge after all, it is parsed again, whole.
        hide = self._joliet and self._root_uses_susp()
        self._iso = self._open(joliet_flags if hide else frozenset())
        if hide and not self._iso.rock_ridge:
            self._iso.close()
            self._iso = self._open(frozenset())
        self._rock_ridge: str = self._iso.rock_ridge or ""

    def _open(self, masked: frozenset[int]) -> Any:
        iso = pycdlib.PyCdlib()
        with _translated(self._name):
            iso.open_fp(cast(BinaryIO, _GuardedFile(self._source, masked)))
        return iso

    def _root_uses_susp(self) -> bool:
        """Whether the root's "." record starts its system use area with SUSP's SP entry,
        as every Rock Ridge volume's does (SUSP 5.3)."""
        primary = self._descriptors[s.VD_PRIMARY][0]
        extent = int.from_bytes(primary.root_record[2:6], "little")
        record = self._source.read_at(extent * self._block, 64)
        length = record[0] if record else 0
        return record[34:36] == b"SP" and length >= 41

    # -- volume descriptors ---------------------------------------------------------------

    def _read_descriptors(self) -> dict[int, list[Any]]:
        """Every volume descriptor up to the terminator, checked before pycdlib sees them."""
        found: dict[int, list[Any]] = {}
        self._descriptor_order: list[tuple[int, Any]] = []
        for index in range(s.MAX_DESCRIPTORS):
            offset = s.DESCRIPTOR_START + index * s.SECTOR
            raw = read_exact(self._source, offset, s.SECTOR, what="ISO9660 volume descriptor")
            if raw[1:6] != s.STANDARD_ID:
                raise InvalidImageError("volume descriptor without the CD001 identifier",
                                        format="iso9660", path=self._name, offset=offset)
            kind = raw[0]
            if kind == s.VD_TERMINATOR:
                break
            parsed = (s.BootRecord if kind == s.VD_BOOT_RECORD else s.VolumeDescriptor).parse(raw)
            found.setdefault(kind, []).append(parsed)
            if kind == s.VD_SUPPLEMENTARY:
                self._descriptor_order.append((index, parsed))
        else:
            raise InvalidImageError(f"no volume descriptor terminator in the first "
                                    f"{s.MAX_DESCRIPTORS} descriptors", format="iso9660",
                                    path=self._name)
        if s.VD_PRIMARY not in found:
            raise InvalidImageError("no primary volume descriptor", format="iso9660",
                                    path=self._name)
        primary = found[s.VD_PRIMARY][0]
        if primary.block_size not in (512, 1024, 2048):
            raise InvalidImageError(f"logical block size {primary.block_size} is not 512, 1024 "
                                    "or 2048", format="iso9660", path=self._name)
        if primary.path_table_size > MAX_METADATA_READ:
            raise InvalidImageError(f"path table of {primary.path_table_size} bytes",
                                    format="iso9660", path=self._name)
        return found

    def info(self) -> dict[str, Any]:
        primary = self._descriptors[s.VD_PRIMARY][0]
        el_torito = any(boot.boot_system_id.rstrip(b"\x00") == s.EL_TORITO_ID
                        for boot in self._descriptors.get(s.VD_BOOT_RECORD, []))
        # blkid takes the modification date, and the creation date when that is unset.
        uuid = s.blkid_uuid(primary.modification_date) or s.blkid_uuid(primary.creation_date)
        size = primary.space_size * primary.block_size
        info: dict[str, Any] = {
            "type": "iso9660",
            "label": _text(primary.volume_id),
            "uuid": uuid,
            "size": size,
            "used": size,
            "block-size": primary.block_size,
            "rock-ridge": self._rock_ridge or None,
            "joliet": self._joliet,
            "el-torito": el_torito,
            "system-id": _text(primary.system_id),
            "publisher": _text(primary.publisher_id),
            "application": _text(primary.application_id),
        }
        created = s.long_date_ns(primary.creation_date)
        if created is not None:
            info["created"] = created
        for svd in self._descriptors.get(s.VD_SUPPLEMENTARY, []):
            if svd.escape_sequences[:3] in s.JOLIET_ESCAPES:
                info["joliet-label"] = svd.volume_id.decode("utf-16-be", "replace").rstrip(" \x00")
        return info

    # -- the tree -------------------------------------------------------------------------

    def entries(self) -> Iterator[Entry]:
        with _translated(self._name):
            if self._rock_ridge:
                root = self._iso.pvd.root_directory_record()
                namer = self._rr_name
            elif self._iso.joliet_vd is not None:
                root = self._iso.joliet_vd.root_directory_record()
                namer = self._joliet_name
            else:
                root = self._iso.pvd.root_directory_record()
                namer = self._plain_name
        yield from self._walk(root, namer)

    def _walk(self, root: Any, namer: Any) -> Iterator[Entry]:
        with _translated(self._name):
            dot = root.children[0] if root.children else root
            top = self._entry("", dot, dot, is_dir=True).entry
        yield top
        yield from self._walk_below("", root, namer, {}, {root.extent_location()})

    def _walk_below(self, top_path: str, top: Any, namer: Any,
                    first_path: dict[tuple[Any, ...], str], seen_dirs: set[int]) -> Iterator[Entry]:
        """Pre-order below one directory, iteratively (deep trees must not recurse)."""
        stack: list[Iterator[tuple[str, Any, Any, bool]]] = []
        with _translated(self._name):
            stack.append(iter(self._children(top, top_path, namer)))
        paths = [top_path]
        while stack:
            item = next(stack[-1], None)
            if item is None:
                stack.pop()
                paths.pop()
                continue
            name, record, meta_record, is_dir = item
            parent = paths[-1]
            child_path = f"{parent}/{name}" if parent else name
            with _translated(self._name):
                node = self._entry(child_path, record, meta_record, is_dir=is_dir)
            entry = node.entry
            if node.key is not None:
                target = first_path.get(node.key)
                if target is None:
                    first_path[node.key] = child_path
                else:
                    entry = Entry(child_path, EntryType.HARDLINK, link_target=target,
                                  mode=entry.mode, uid=entry.uid, gid=entry.gid,
                                  mtime=entry.mtime, atime=entry.atime, ctime=entry.ctime)
            yield entry
            if is_dir:
                extent = meta_record.extent_location()
                if extent in seen_dirs:
                    raise InvalidImageError(f"{child_path}: directory records form a loop",
                                            format="iso9660", path=self._name)
                seen_dirs.add(extent)
                with _translated(self._name):
                    stack.append(iter(self._children(meta_record, child_path, namer)))
                paths.append(child_path)

    def _children(self, directory: Any, path: str,
                  namer: Any) -> list[tuple[str, Any, Any, bool]]:
        """The listable children of a directory record, sorted by name bytes:
        ``(name, record, record holding the metadata, is a directory)``."""
        tails = {id(r.data_continuation) for r in directory.children
                 if r.data_continuation is not None}
        found: dict[bytes, tuple[str, Any, Any, bool]] = {}
        for record in directory.children:
            if record.is_dot() or record.is_dotdot() or id(record) in tails:
                continue
            if record.is_associated_file():
                continue  # Apple resource forks and the like: not part of the tree
            meta, is_dir = record, record.is_dir()
            rr = record.rock_ridge if self._rock_ridge else None
            if rr is not None:
                if is_dir and rr.relocated_record():
                    continue  # shown where its CL record points from
                if rr.child_link_record_exists():
                    meta = rr.cl_to_moved_dr
                    if meta is None or not meta.is_dir():
                        raise InvalidImageError(f"{path or '/'}: a Rock Ridge CL record points "
                                                "to no directory", format="iso9660",
                                                path=self._name)
                    is_dir = True
            name = namer(record)
            _check_name(name, path, self._name)
            key = name.encode("utf-8", "surrogateescape")
            if key in found:
                raise InvalidImageError(f"{path or '/'}: two entries named {name!r}",
                                        format="iso9660", path=self._name)
            found[key] = (name, record, meta, is_dir)
        return [found[key] for key in sorted(found)]

    def _rr_name(self, record: Any) -> str:
        rr = record.rock_ridge
        name = rr.name() if rr is not None else b""
        if not name:
            return self._plain_name(record)
        return bytes(name).decode("utf-8", "surrogateescape")

    @staticmethod
    def _joliet_name(record: Any) -> str:
        identifier = bytes(record.file_identifier())
        name = identifier.decode("utf-16-be", "replace")
        return name.rsplit(";", 1)[0] if ";" in name else name

    @staticmethod
    def _plain_name(record: Any) -> str:
        return _iso_name(bytes(record.file_identifier())).decode("utf-8", "surrogateescape")

    def _entry(self, path: str, record: Any, meta: Any, *, is_dir: bool) -> _Node:
        """The entry for one record (``meta`` holds its metadata: itself, or the relocated
        directory a CL record points to)."""
        rr = meta.rock_ridge if self._rock_ridge else None
        px = _rr_field(rr, "px_record")
        mtime = s.short_date_ns(*_date_fields(meta.date)) or 0
        atime = ctime = crtime = None
        tf = _rr_field(rr, "tf_record")
        if tf is not None:
            mtime = _tf_ns(getattr(tf, s.TF_MODIFY_SLOT)) or mtime
            atime = _tf_ns(getattr(tf, s.TF_ACCESS_SLOT))
            ctime = _tf_ns(getattr(tf, s.TF_ATTRIBUTES_SLOT))
            crtime = _tf_ns(getattr(tf, s.TF_CREATE_SLOT))
        if px is None:
            mode, uid, gid, nlink, serial, file_format = (0o555 if is_dir else 0o444), 0, 0, 1, 0, 0
        else:
            mode, uid, gid = px.posix_file_mode & 0o7777, px.posix_user_id, px.posix_group_id
            nlink, serial = px.posix_file_links, px.posix_serial_number
            file_format = stat.S_IFMT(px.posix_file_mode)

        def make(kind: EntryType, **extra: Any) -> Entry:
            return Entry(path, kind, mode=mode, uid=uid, gid=gid, mtime=mtime, atime=atime,
                         ctime=ctime, crtime=crtime, **extra)

        if is_dir:
            return _Node(make(EntryType.DIR), None, nlink)
        if rr is not None and rr.is_symlink():
            return _Node(make(EntryType.SYMLINK, link_target=_symlink_target(rr)), None, nlink)
        kind = _TYPES_BY_FORMAT.get(file_format, EntryType.FILE) if file_format else EntryType.FILE
        if kind is EntryType.DIR:
            raise InvalidImageError(f"{path}: Rock Ridge calls a file record a directory",
                                    format="iso9660", path=self._name)
        if kind is EntryType.SYMLINK:
            raise InvalidImageError(f"{path}: a symbolic link without an SL record",
                                    format="iso9660", path=self._name)
        if kind in (EntryType.CHAR, EntryType.BLOCK):
            pn = _rr_field(rr, "pn_record")
            major, minor = decode_device(pn.dev_t_high, pn.dev_t_low) if pn else (0, 0)
            return _Node(make(kind, devmajor=major, devminor=minor), None, nlink)
        if kind is not EntryType.FILE:
            return _Node(make(kind), None, nlink)
        pieces = self._extents(path, record)
        size = sum(length for _, length in pieces)
        key: tuple[Any, ...] | None = None
        if nlink > 1 and serial:
            key = ("serial", serial)
        elif nlink > 1 and size:
            key = ("extent", pieces[0][0], size)
        opener = self._opener(pieces)
        return _Node(make(EntryType.FILE, size=size, opener=opener), key, nlink)

    def _extents(self, path: str, record: Any) -> list[tuple[int, int]]:
        """``(offset, length)`` in the source of each extent of a file, in order."""
        pieces: list[tuple[int, int]] = []
        part: Any = record
        while part is not None:
            length = part.get_data_length()
            offset = (part.extent_location() + part.xattr_len) * self._block
            # pycdlib "clamps" the length of data past the end to what is left, which is
            # negative when the extent itself lies past the end.
            if length < 0 or (length and offset + length > self._source.size):
                raise InvalidImageError(
                    f"{path}: its data (at offset {offset}) lies past the end "
                    f"of the {self._source.size}-byte image", format="iso9660",
                    path=self._name, offset=offset)
            pieces.append((offset, length))
            if len(pieces) > 1 and not part.file_flags & _FILE_MULTI_EXTENT and \
                    part.data_continuation is not None:
                raise UnsupportedFeatureError(f"{path}: a multi-extent file whose extents are "
                                              "not flagged as such")
            part = part.data_continuation
            if len(pieces) > 1 << 20:
                raise InvalidImageError(f"{path}: more than a million extents",
                                        format="iso9660", path=self._name)
        return pieces

    def _opener(self, pieces: list[tuple[int, int]]) -> Any:
        source = self._source
        if len(pieces) == 1:
            offset, length = pieces[0]

            def open_one() -> BinaryIO:
                return RangeSource(source, offset, length).as_fileobj()

            return open_one

        def open_many() -> BinaryIO:
            return ConcatSource([RangeSource(source, o, n) for o, n in pieces]).as_fileobj()

        return open_many

    def close(self) -> None:
        # pycdlib's close() drops its parsed tree; the source stays the caller's.
        with contextlib.suppress(pycdlibexception.PyCdlibException):
            self._iso.close()


def _check_name(name: str, parent: str, image: str) -> None:
    if name in ("", ".", "..") or "/" in name or "\x00" in name:
        raise InvalidImageError(f"{parent or '/'}: a directory record is named {name!r}",
                                format="iso9660", path=image)


def _rr_field(rr: Any, field: str) -> Any:
    """A Rock Ridge record from the directory record's system use area, or from its
    continuation area (CE) when it did not fit."""
    if rr is None:
        return None
    value = getattr(rr.dr_entries, field)
    if value is None and rr.ce_entries is not None:
        value = getattr(rr.ce_entries, field)
    return value


def _date_fields(date: Any) -> tuple[int, int, int, int, int, int, int]:
    return (date.years_since_1900, date.month, date.day_of_month, date.hour, date.minute,
            date.second, date.gmtoffset)


def _tf_ns(date: Any) -> int | None:
    """A TF timestamp in either form (7-byte directory-record style or 17-byte long form)."""
    if date is None:
        return None
    if hasattr(date, "years_since_1900"):
        return s.short_date_ns(*_date_fields(date))
    return s.long_date_ns(bytes(date.date_str))


def _symlink_target(rr: Any) -> str:
    """Join the SL components of every SL record (a long target spans several, a component
    may continue in the next): "/" is the root component, "." and ".." the current and parent
    components, everything else literal bytes."""
    records = list(rr.dr_entries.sl_records)
    if rr.ce_entries is not None:
        records.extend(rr.ce_entries.sl_records)
    parts: list[bytes] = []
    absolute = False
    continuing = False
    for record in records:
        for component in record.symlink_components:
            flags = component.flags
            if flags & _SL_ROOT:
                parts, absolute, continuing = [], True, False
                continue
            if flags & _SL_CURRENT:
                text = b"."
            elif flags & _SL_PARENT:
                text = b".."
            else:
                text = bytes(component.data)
            if continuing and parts:
                parts[-1] += text
            else:
                parts.append(text)
            continuing = bool(flags & _SL_CONTINUE)
    target = (b"/" if absolute else b"") + b"/".join(parts)
    return target.decode("utf-8", "surrogateescape")
