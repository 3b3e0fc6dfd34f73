"""The virtual disk an ext4 build produces: metadata held in memory, file data read from the
entries' streams only when that part of the disk is read.

References: imgbridge.model.disk (the block-status contract).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from imgbridge.errors import InternalError, InvalidInputError
from imgbridge.model.disk import BlockState, Disk, Run
from imgbridge.model.tree import Entry


@dataclass(frozen=True)
class Piece:
    """A DATA range of the disk: in-memory ``data``, or ``entry``'s content from
    ``file_offset`` (zeros past the entry's size, up to the piece's end)."""

    offset: int
    length: int
    data: bytes | None = None
    entry: Entry | None = None
    file_offset: int = 0


class Ext4Disk(Disk):
    """A read-only disk holding one ext4 filesystem."""

    format_name = "ext4"

    def __init__(self, size: int, pieces: list[Piece], info: dict[str, Any]) -> None:
        super().__init__(size, filename="<ext4 build>")
        pieces.sort(key=lambda p: p.offset)
        end = 0
        for piece in pieces:
            if piece.offset < end or piece.offset + piece.length > size:
                raise InternalError(f"ext4 writer: overlapping pieces at {piece.offset}")
            end = piece.offset + piece.length
        self._pieces = pieces
        self._starts = [p.offset for p in pieces]
        self.build_info = info
        self._lock = threading.Lock()
        self._stream: BinaryIO | None = None
        self._stream_entry: Entry | None = None
        self._stream_pos = 0

    def block_status(self, offset: int, length: int) -> Iterator[Run]:
        end = min(self.size, offset + length)
        pos = offset
        index = max(0, bisect.bisect_right(self._starts, offset) - 1)
        while pos < end:
            piece = self._pieces[index] if index < len(self._pieces) else None
            if piece is None or piece.offset > pos:
                stop = end if piece is None else min(end, piece.offset)
                yield Run(pos, stop - pos, BlockState.ZERO)
                pos = stop
                continue
            piece_end = piece.offset + piece.length
            if piece_end <= pos:
                index += 1
                continue
            yield Run(piece.offset, piece.length, BlockState.DATA, None, piece)
            pos = piece_end
            index += 1

    def read_run(self, run: Run, offset: int, n: int) -> bytes:
        piece: Piece = run.token
        start = offset - piece.offset
        if piece.data is not None:
            return piece.data[start : start + n]
        assert piece.entry is not None
        with self._lock:
            return self._read_file(piece.entry, piece.file_offset + start, n)

    def _read_file(self, entry: Entry, pos: int, n: int) -> bytes:
        size = entry.size
        want = max(0, min(n, size - pos))
        if want == 0:
            return bytes(n)
        stream = self._position(entry, pos)
        parts: list[bytes] = []
        got = 0
        while got < want:
            chunk = stream.read(want - got)
            if not chunk:
                raise InvalidInputError(
                    f"{entry.path}: content ended at {pos + got} bytes, its size is {size}")
            parts.append(chunk)
            got += len(chunk)
        self._stream_pos = pos + got
        if self._stream_pos == size and stream.read(1):
            raise InvalidInputError(f"{entry.path}: content is longer than its size {size}")
        data = b"".join(parts)
        return data if want == n else data + bytes(n - want)

    def _position(self, entry: Entry, pos: int) -> BinaryIO:
        if self._stream is not None and self._stream_entry is entry and self._stream_pos == pos:
            return self._stream
        self._close_stream()
        stream = entry.open()
        self._stream, self._stream_entry, self._stream_pos = stream, entry, 0
        if pos:
            try:
                stream.seek(pos)
            except (OSError, ValueError, AttributeError):
                _skip(stream, pos, entry)
        return stream

    def _close_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()
        self._stream = None
        self._stream_entry = None

    def close(self) -> None:
        with self._lock:
            self._close_stream()
        super().close()


def _skip(stream: BinaryIO, count: int, entry: Entry) -> None:
    """Read and drop ``count`` bytes of a stream that cannot seek."""
    while count:
        chunk = stream.read(min(count, 1 << 20))
        if not chunk:
            raise InvalidInputError(f"{entry.path}: content is shorter than its size")
        count -= len(chunk)
