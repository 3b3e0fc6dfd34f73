"""Read a tar archive (a container layer) as a stream of ``Entry`` objects.

The header parsing itself is the standard library's ``tarfile`` (ustar, GNU long names, PAX
extended headers), used in seekable mode over a ``ByteSource``: it never reads member data,
so listing a multi-gigabyte layer reads only its headers. What this module adds is the
translation into the model, done once at the reader boundary:

* paths go through ``normalize_path`` (``./a//b`` is ``a/b``; ``../x`` is refused as hostile);
* whiteout names (``.wh.NAME``, ``.wh..wh..opq``) become WHITEOUT / OPAQUE entries;
* times are integer nanoseconds; a PAX ``mtime``/``atime``/``ctime`` keeps its fraction
  (``tarfile`` turns it into a float, which loses nanoseconds, so the PAX text is re-read);
* ``SCHILY.xattr.*`` PAX records become xattrs, as bytes (binary values such as
  ``security.capability`` survive: ``tarfile`` decodes them with surrogateescape);
* hardlink targets are normalised paths inside the tree; symlink targets stay verbatim
  (they are data, resolved by whoever follows them);
* content stays in the archive: each FILE's opener is a ``RangeSource`` over the member's
  data, so the caller decides how the archive itself is stored (the image readers decompress
  a compressed layer to a temporary spool file once and hand that in, see
  ``imgbridge.formats.image._blobs``).

A missing end-of-archive marker is tolerated: umoci 0.4.7's ``insert`` writes layers that end
right after the last member's data, without even its padding to 512 bytes; ``tarfile`` calls
that "unexpected end of data", this reader calls it the end (the member's data is complete).
A member whose data runs past the end of the archive is an ``InvalidImageError``.

References: POSIX.1-2017 ``pax`` (ustar and pax interchange formats); GNU tar manual,
"Basic Tar Format"; opencontainers/image-spec ``layer.md`` (whiteouts, hardlinks).
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any, BinaryIO

from imgbridge.errors import InvalidImageError, UnsupportedFeatureError
from imgbridge.model.tree import Entry, EntryType, decode_whiteout, normalize_path
from imgbridge.source import ByteSource, RangeSource

__all__ = ["read_tar", "PAX_XATTR_PREFIX"]

#: The PAX record prefix GNU tar, bsdtar, Docker and umoci use for extended attributes.
PAX_XATTR_PREFIX = "SCHILY.xattr."

#: More members than this in one layer is not a real image (the largest distro layers have a
#: few hundred thousand); stop before the caller's memory does.
MAX_MEMBERS = 10_000_000
#: PAX records (names, link targets, xattrs) and GNU long names are a few KB; xattr values are
#: at most 64 KiB each on Linux. Past this a record is hostile, not metadata.
MAX_HEADER_RECORD = 16 << 20

_TYPES = {
    tarfile.REGTYPE: EntryType.FILE,
    tarfile.AREGTYPE: EntryType.FILE,
    tarfile.CONTTYPE: EntryType.FILE,  # a "contiguous file" is a regular file everywhere today
    tarfile.DIRTYPE: EntryType.DIR,
    tarfile.SYMTYPE: EntryType.SYMLINK,
    tarfile.LNKTYPE: EntryType.HARDLINK,
    tarfile.CHRTYPE: EntryType.CHAR,
    tarfile.BLKTYPE: EntryType.BLOCK,
    tarfile.FIFOTYPE: EntryType.FIFO,
}


def _pax_time(pax: Mapping[str, str], key: str, fallback: float | None) -> int | None:
    """A time in integer nanoseconds, exact when a PAX record holds it as decimal text."""
    text = pax.get(key)
    if text is not None:
        try:
            return int(Decimal(text) * 1_000_000_000)
        except (InvalidOperation, ValueError):
            raise InvalidImageError(f"PAX {key} record {text!r} is not a number") from None
    if fallback is None:
        return None
    return int(fallback) * 1_000_000_000


def _xattrs(pax: Mapping[str, str]) -> tuple[tuple[str, bytes], ...]:
    return tuple(
        (key[len(PAX_XATTR_PREFIX):], value.encode("utf-8", "surrogateescape"))
        for key, value in pax.items()
        if key.startswith(PAX_XATTR_PREFIX)
    )


def _opener(source: ByteSource, offset: int, size: int) -> BinaryIO:
    return RangeSource(source, offset, size).as_fileobj()


def _entry(info: tarfile.TarInfo, source: ByteSource) -> Entry:
    kind = _TYPES.get(info.type)
    if kind is None:
        raise UnsupportedFeatureError(
            f"tar member {info.name!r} has type {info.type!r}, which imgbridge does not read"
        )
    if info.sparse is not None:
        raise UnsupportedFeatureError(f"tar member {info.name!r} is a GNU sparse file")
    path = normalize_path(info.name)
    pax = info.pax_headers
    common = dict(
        mode=info.mode & 0o7777,
        uid=info.uid,
        gid=info.gid,
        mtime=_pax_time(pax, "mtime", info.mtime) or 0,
        atime=_pax_time(pax, "atime", None),
        ctime=_pax_time(pax, "ctime", None),
        xattrs=_xattrs(pax),
        uname=info.uname or None,
        gname=info.gname or None,
    )
    if kind is EntryType.FILE:
        start, size = info.offset_data, info.size
        if start + size > source.size:
            raise InvalidImageError(
                f"tar member {info.name!r} needs {size} bytes at offset {start}, "
                f"the archive has {source.size}", path=source.name, offset=start)
        if path == "":
            raise InvalidImageError(f"tar member {info.name!r} names the root as a file")
        return Entry(path, kind, size=size, opener=lambda: _opener(source, start, size),
                     **common)  # type: ignore[arg-type]
    if kind is EntryType.HARDLINK:
        target = normalize_path(info.linkname)
        if not target or target == path:
            raise InvalidImageError(f"tar member {info.name!r} is a hardlink to {info.linkname!r}")
        return Entry(path, kind, link_target=target, **common)  # type: ignore[arg-type]
    if path == "" and kind is not EntryType.DIR:
        raise InvalidImageError(f"tar member {info.name!r} names the root as a {kind.value}")
    if kind is EntryType.SYMLINK:
        return Entry(path, kind, link_target=info.linkname, **common)  # type: ignore[arg-type]
    if kind in (EntryType.CHAR, EntryType.BLOCK):
        return Entry(path, kind, devmajor=info.devmajor, devminor=info.devminor,
                     **common)  # type: ignore[arg-type]
    return Entry(path, kind, **common)  # type: ignore[arg-type]


def read_tar(source: ByteSource) -> Iterator[Entry]:
    """Yield the entries of the tar archive in ``source``, in archive order.

    Whiteouts come out decoded (WHITEOUT / OPAQUE). ``InvalidImageError`` for a malformed
    archive or a hostile member name; ``UnsupportedFeatureError`` for member types the model
    has no place for (GNU sparse files, volume headers).
    """
    if source.size == 0:
        return  # an empty layer: some tools write a zero-byte blob
    for info in iter_members(source, MAX_MEMBERS):
        try:
            yield decode_whiteout(_entry(info, source))
        except InvalidImageError as exc:
            if exc.path is None:
                exc.path = source.name
            raise


class _HeaderReads:
    """The archive as ``tarfile`` sees it here: it reads only headers (member data is taken
    by offset), but it reads a PAX or GNU long-name record whole, at whatever size its header
    claims, allocating that much first. A read past ``MAX_HEADER_RECORD`` is refused."""

    def __init__(self, inner: BinaryIO, name: str) -> None:
        self._inner = inner
        self._name = name

    def read(self, n: int = -1) -> bytes:
        if n > MAX_HEADER_RECORD:
            offset = self._inner.tell()
            raise InvalidImageError(f"a tar header record claims {n} bytes; more than "
                                    f"{MAX_HEADER_RECORD} is not a real archive",
                                    path=self._name, offset=offset)
        return self._inner.read(n)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._inner, attr)


def iter_members(source: ByteSource, max_members: int) -> Iterator[tarfile.TarInfo]:
    """The member headers of the tar archive in ``source``, as real tools write archives.

    An archive may end inside the last member's padding, with no end-of-archive blocks
    (umoci 0.4.7's ``insert``): once the headers reach the end of the data, that is the end,
    not damage (callers check each member's data lies inside the source). Memory stays
    bounded: tarfile's list of every member is dropped as we go.
    """
    fileobj = source.as_fileobj()  # closed in the finally below, after the generator ends
    try:
        try:
            archive = tarfile.open(fileobj=_HeaderReads(fileobj, source.name),  # noqa: SIM115
                                   mode="r:")
        except tarfile.ReadError as exc:
            raise InvalidImageError(f"not a tar archive ({exc})", path=source.name) from None
        count = 0
        while True:
            try:
                info = archive.next()
            except tarfile.TarError as exc:
                if archive.offset >= source.size:
                    return
                raise InvalidImageError(f"malformed tar archive: {exc}", path=source.name,
                                        offset=archive.offset) from None
            if info is None:
                return
            count += 1
            if count > max_members:
                raise InvalidImageError(f"more than {max_members} members in one archive",
                                        path=source.name)
            yield info
            archive.members.clear()  # type: ignore[attr-defined]
    finally:
        fileobj.close()
