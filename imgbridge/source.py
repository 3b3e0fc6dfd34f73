"""Byte sources: random-access, read-only views of bytes with pread semantics.

Every format reads through a ``ByteSource`` rather than a file object, because there is no
shared cursor: two readers (a disk and its backing file, a thread pool decompressing grains)
can use one source at once. A source also tells where it holds data and where it only
holds a hole (``runs``), so that no reader ever needs to read a hole to learn it is zero.
"""

from __future__ import annotations

import bisect
import errno
import io
import os
import stat
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from .errors import InvalidImageError, InvalidInputError

__all__ = [
    "ByteSource",
    "BytesSource",
    "ConcatSource",
    "CursorFile",
    "FileSource",
    "RangeSource",
    "SourceRun",
    "ZeroSource",
    "pread_full",
    "read_exact",
]


class SourceRun(NamedTuple):
    """A run of a source: ``data`` is False where the source knows the bytes are a hole."""

    offset: int
    length: int
    data: bool


def pread_full(fd: int, n: int, offset: int) -> bytes:
    """``n`` bytes at ``offset`` of ``fd`` (fewer only at the end of the file): ``pread`` may
    return short for large requests (Linux caps one call near 2 GiB), so finish the read."""
    data = os.pread(fd, n, offset)
    if len(data) == n:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        chunk = os.pread(fd, n - got, offset + got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


class ByteSource:
    """A read-only, random-access run of bytes.

    Subclasses implement ``size`` and ``read_at``; ``runs`` defaults to "all data" and is
    overridden by sources that can see holes.
    """

    name: str = "<bytes>"

    @property
    def size(self) -> int:
        raise NotImplementedError

    def read_at(self, offset: int, n: int) -> bytes:
        """Return up to ``n`` bytes at ``offset``; fewer only at the end of the source."""
        raise NotImplementedError

    def runs(self, offset: int = 0, length: int | None = None) -> Iterator[SourceRun]:
        """Yield ordered, gap-free runs covering ``[offset, offset+length)`` clipped to size."""
        end = self.size if length is None else min(self.size, offset + length)
        if offset < end:
            yield SourceRun(offset, end - offset, True)

    def as_fileobj(self) -> io.BufferedReader:
        """A seekable, read-only file object over this source (for tarfile, pycdlib, py7zr)."""
        return io.BufferedReader(_SourceFile(self), buffer_size=1 << 20)

    def close(self) -> None:
        """Release what the source holds; reading afterwards is an error."""

    def __enter__(self) -> ByteSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_exact(source: ByteSource, offset: int, n: int, *, what: str = "data") -> bytes:
    """Read exactly ``n`` bytes or raise InvalidImageError naming what was cut short."""
    data = source.read_at(offset, n)
    if len(data) != n:
        raise InvalidImageError(
            f"truncated: {what} needs {n} bytes at offset {offset}, the file has {source.size}",
            path=source.name,
            offset=offset,
        )
    return data


class FileSource(ByteSource):
    """A regular file (or block device) read with ``os.pread``.

    ``runs`` asks the filesystem with SEEK_DATA/SEEK_HOLE, so a sparse file's holes are known
    without reading them. Where the filesystem cannot tell, the whole file counts as data.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.name = os.fspath(path)
        try:
            self._fd = os.open(self.name, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except FileNotFoundError:
            raise InvalidInputError(f"{self.name}: no such file") from None
        except IsADirectoryError:
            raise InvalidInputError(f"{self.name}: is a directory, not an image file") from None
        except PermissionError:
            raise InvalidInputError(f"{self.name}: permission denied") from None
        except OSError as exc:
            raise InvalidInputError(f"{self.name}: cannot open: {exc.strerror}") from None
        st = os.fstat(self._fd)
        if stat.S_ISDIR(st.st_mode):
            os.close(self._fd)
            raise InvalidInputError(f"{self.name}: is a directory, not an image file")
        self._size = st.st_size if stat.S_ISREG(st.st_mode) else os.lseek(self._fd, 0, os.SEEK_END)
        self._closed = False

    @property
    def size(self) -> int:
        return self._size

    @property
    def fileno(self) -> int:
        return self._fd

    def read_at(self, offset: int, n: int) -> bytes:
        if n <= 0 or offset >= self._size:
            return b""
        return pread_full(self._fd, min(n, self._size - offset), offset)

    def runs(self, offset: int = 0, length: int | None = None) -> Iterator[SourceRun]:
        end = self._size if length is None else min(self._size, offset + length)
        seek_data = getattr(os, "SEEK_DATA", None)
        seek_hole = getattr(os, "SEEK_HOLE", None)
        if seek_data is None or seek_hole is None:
            yield from super().runs(offset, length)
            return
        pos = offset
        while pos < end:
            try:
                data_start = os.lseek(self._fd, pos, seek_data)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos: the rest is a hole
                    yield SourceRun(pos, end - pos, False)
                    return
                if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                    yield SourceRun(pos, end - pos, True)
                    return
                raise
            if data_start >= end:
                yield SourceRun(pos, end - pos, False)
                return
            if data_start > pos:
                yield SourceRun(pos, data_start - pos, False)
            hole_start = min(os.lseek(self._fd, data_start, seek_hole), end)
            yield SourceRun(data_start, hole_start - data_start, True)
            pos = hole_start

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)

    def __repr__(self) -> str:
        return f"FileSource({self.name!r})"


class BytesSource(ByteSource):
    """Bytes held in memory (headers, tests)."""

    def __init__(self, data: bytes, name: str = "<bytes>") -> None:
        self._data = bytes(data)
        self.name = name

    @property
    def size(self) -> int:
        return len(self._data)

    def read_at(self, offset: int, n: int) -> bytes:
        return self._data[offset : offset + max(n, 0)]


class ZeroSource(ByteSource):
    """``size`` zero bytes, all of them a hole."""

    def __init__(self, size: int) -> None:
        self._size = size
        self.name = "<zeros>"

    @property
    def size(self) -> int:
        return self._size

    def read_at(self, offset: int, n: int) -> bytes:
        return bytes(max(0, min(n, self._size - offset)))

    def runs(self, offset: int = 0, length: int | None = None) -> Iterator[SourceRun]:
        end = self._size if length is None else min(self._size, offset + length)
        if offset < end:
            yield SourceRun(offset, end - offset, False)


class RangeSource(ByteSource):
    """The bytes ``[start, start+length)`` of another source (a partition, a tar member)."""

    def __init__(self, base: ByteSource, start: int, length: int) -> None:
        if start < 0 or length < 0 or start + length > base.size:
            raise InvalidImageError(
                f"range {start}+{length} lies outside the {base.size}-byte source",
                path=base.name,
                offset=start,
            )
        self._base = base
        self._start = start
        self._length = length
        self.name = f"{base.name}[{start}:{start + length}]"

    @property
    def size(self) -> int:
        return self._length

    def read_at(self, offset: int, n: int) -> bytes:
        n = min(n, self._length - offset)
        if n <= 0:
            return b""
        return self._base.read_at(self._start + offset, n)

    def runs(self, offset: int = 0, length: int | None = None) -> Iterator[SourceRun]:
        end = self._length if length is None else min(self._length, offset + length)
        for run in self._base.runs(self._start + offset, end - offset):
            yield SourceRun(run.offset - self._start, run.length, run.data)


class ConcatSource(ByteSource):
    """Several sources one after another (split extents, twoGbMaxExtent files)."""

    def __init__(self, parts: Sequence[ByteSource]) -> None:
        self._parts = list(parts)
        self._starts: list[int] = []
        pos = 0
        for part in self._parts:
            self._starts.append(pos)
            pos += part.size
        self._size = pos
        self.name = "+".join(p.name for p in self._parts)

    @property
    def size(self) -> int:
        return self._size

    def _pieces(self, offset: int, end: int) -> Iterator[tuple[ByteSource, int, int, int]]:
        i = max(0, bisect.bisect_right(self._starts, offset) - 1)
        while offset < end and i < len(self._parts):
            part, start = self._parts[i], self._starts[i]
            local = offset - start
            take = min(part.size - local, end - offset)
            if take > 0:
                yield part, start, local, take
                offset += take
            i += 1

    def read_at(self, offset: int, n: int) -> bytes:
        end = min(self._size, offset + n)
        return b"".join(p.read_at(local, take) for p, _, local, take in self._pieces(offset, end))

    def runs(self, offset: int = 0, length: int | None = None) -> Iterator[SourceRun]:
        end = self._size if length is None else min(self._size, offset + length)
        for part, start, local, take in self._pieces(offset, end):
            for run in part.runs(local, take):
                yield SourceRun(start + run.offset, run.length, run.data)

    def close(self) -> None:
        for part in self._parts:
            part.close()


class CursorFile(io.RawIOBase):
    """A read-only, seekable file object of ``size`` bytes over something that reads at a
    position (a source, a file's extents, a cluster chain): the cursor, ``seek``/``tell`` and
    the end-of-file rule live here once, and a subclass implements ``readinto`` reading at
    ``self._pos`` (and advancing it). Seeking past the end is allowed, as for files."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._size + offset
        else:
            raise ValueError(f"bad whence {whence}")
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def tell(self) -> int:
        return self._pos


class _SourceFile(CursorFile):
    """The cursor that ``ByteSource.as_fileobj`` puts in front of a source."""

    def __init__(self, source: ByteSource) -> None:
        super().__init__(source.size)
        self._source = source

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self._source.read_at(self._pos, len(buffer))
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)
