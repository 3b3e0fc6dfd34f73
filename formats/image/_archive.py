"""A tar archive of blobs (oci-archive, docker-archive): member name -> byte range, no copy.

The archive is indexed once (headers only, through ``tarfile`` in seekable mode); a blob is
then a ``RangeSource`` over the archive file. Symlinks and hardlinks between members (legacy
``docker save`` links a repeated layer's ``layer.tar`` to the first copy) are followed inside
the archive only, a bounded number of times.
"""

from __future__ import annotations

import posixpath

from imgbridge.formats.fs.tar import iter_members

from imgbridge.errors import InvalidImageError
from imgbridge.model.tree import normalize_path
from imgbridge.registry import ProbeInput
from imgbridge.source import ByteSource, RangeSource

from ._blobs import BlobStore, check_digest

__all__ = ["TarBlobStore", "tar_member_names"]

MAX_ARCHIVE_MEMBERS = 1_000_000


class TarBlobStore(BlobStore):
    def __init__(self, source: ByteSource) -> None:
        self.source = source
        self.name = source.name
        self.files: dict[str, tuple[int, int]] = {}
        self.links: dict[str, str] = {}
        for info in iter_members(source, MAX_ARCHIVE_MEMBERS):
            try:
                name = normalize_path(info.name)
            except InvalidImageError:
                raise InvalidImageError(f"member {info.name!r} climbs out of the archive",
                                        path=self.name) from None
            if info.isreg():
                if info.offset_data + info.size > source.size:
                    raise InvalidImageError(f"member {info.name!r} is truncated",
                                            path=self.name)
                self.files[name] = (info.offset_data, info.size)
                self.links.pop(name, None)
            elif info.issym():
                self.links[name] = posixpath.join(posixpath.dirname(name), info.linkname)
            elif info.islnk():
                self.links[name] = info.linkname

    def has(self, name: str) -> bool:
        return name in self.files or name in self.links

    def member(self, name: str, what: str) -> ByteSource:
        seen = 0
        current = name
        while current in self.links and current not in self.files:
            seen += 1
            if seen > 16:
                raise InvalidImageError(f"{what} {name}: links loop", path=self.name)
            try:
                current = normalize_path(self.links[current])
            except InvalidImageError:
                raise InvalidImageError(f"{what} {name} links outside the archive",
                                        path=self.name) from None
        if current not in self.files:
            raise InvalidImageError(f"{what} {name} is missing from the archive", path=self.name)
        start, size = self.files[current]
        src = RangeSource(self.source, start, size)
        src.name = f"{self.name}:{name}"
        return src

    def open(self, digest: str, what: str) -> ByteSource:
        alg, _, hexpart = check_digest(digest, what).partition(":")
        name = f"blobs/{alg}/{hexpart}"
        if not self.has(name):
            raise InvalidImageError(f"{what} {digest} is missing (no {name} in the archive)",
                                    path=self.name)
        return self.member(name, f"{what} {digest}")

    def close(self) -> None:
        self.source.close()


def tar_member_names(p: ProbeInput) -> list[str] | None:
    """Names of the tar members whose headers lie in ``p.head``; None if not a ustar/gnu tar."""
    head = p.head
    if p.is_dir or len(head) < 512 or head[257:262] != b"ustar":
        return None
    names: list[str] = []
    pos = 0
    while pos + 512 <= len(head) and len(names) < 64:
        block = head[pos:pos + 512]
        if block[257:262] != b"ustar":
            break
        name = block[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        prefix = block[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
        names.append(posixpath.normpath(f"{prefix}/{name}" if prefix else name).lstrip("./"))
        try:
            size = int(block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            break
        pos += 512 + (size + 511) // 512 * 512
    return names
