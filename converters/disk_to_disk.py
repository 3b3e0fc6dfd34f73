"""disk -> disk: one function over ``Disk.extents()`` for every pair of disk formats.

The source is read through its allocation map, so zero extents and holes are never read; the
target's writer receives the source as a ``Disk`` and stores only what is not zero (writers
call ``iter_nonzero``). No format-pair code exists anywhere.

Two small views make the other disk jobs the same job:

- ``EmptyDisk``: a disk that stores nothing (every range defers to its backing file, if any).
  ``create`` is "convert from an EmptyDisk", so every writable format can be created.
- ``DiffDisk``: the source seen against a base image (qemu-img convert ``-B``): ranges whose
  bytes equal the base's are UNALLOCATED, so a writer that keeps UNALLOCATED ranges
  unallocated stores only the difference.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping

from imgbridge.errors import ImgBridgeError
from imgbridge.model.disk import MAX_IO, BlockState, Disk, ExtentKind, Run, merge_runs
from imgbridge.options import parse_size
from imgbridge.output import Output
from imgbridge.progress import ProgressFn
from imgbridge.registry import FormatSpec

__all__ = ["DiffDisk", "EmptyDisk", "convert_disk"]

#: The granularity at which ``-B`` compares the source with its base when the target's
#: cluster size is not known (qcow2's default cluster size).
DEFAULT_DIFF_GRANULE = 64 * 1024


def convert_disk(
    source: Disk,
    target_format: FormatSpec,
    out: Output,
    options: Mapping[str, str],
    progress: ProgressFn,
    *,
    base: Disk | None = None,
) -> None:
    """Write the guest-visible content of ``source`` as ``target_format`` into ``out``.

    With ``base``, write only what differs from it (the caller names ``base`` as the
    output's backing file in ``options``).
    """
    if base is not None:
        source = DiffDisk(source, base, granule=_granule(options))
    target_format.create(out, source, options, progress)


def _granule(options: Mapping[str, str]) -> int:
    """Compare at the target's cluster size when it is given (a finer comparison would find
    equal pieces the target cannot leave unallocated anyway)."""
    text = options.get("cluster_size")
    if text is None:
        return DEFAULT_DIFF_GRANULE
    try:
        size = parse_size(text)
    except ImgBridgeError:
        return DEFAULT_DIFF_GRANULE  # the writer refuses the bad value with its own message
    return size if size >= 512 and not size & (size - 1) else DEFAULT_DIFF_GRANULE


class EmptyDisk(Disk):
    """``size`` bytes of nothing: every range is UNALLOCATED, so it reads from ``backing``
    (or as zeros without one). Writers turn it into an empty image."""

    format_name = "empty"

    def __init__(self, size: int, backing: Disk | None = None) -> None:
        super().__init__(size, backing=backing, filename="<empty>")

    def block_status(self, offset: int, length: int) -> Iterator[Run]:
        yield Run(offset, length, BlockState.UNALLOCATED)

    def close(self) -> None:
        """The backing disk belongs to whoever opened it."""


class DiffDisk(Disk):
    """``source`` as a layer over ``base``: UNALLOCATED where their bytes are equal.

    Compared in ``granule``-sized pieces aligned to the disk: equal pieces are UNALLOCATED
    (they read from ``base``), different ones are DATA, or ZERO when the source reads as zero
    there. Pieces both disks map as zero are never read, nor are the ranges the source itself
    leaves to a backing file that is ``base`` (same file, same format); a chunk of the source
    is read once for the comparison and kept for the writer's read that follows.
    Reads return the source's bytes. Neither disk is closed with this view.
    """

    format_name = "diff"

    def __init__(self, source: Disk, base: Disk, *, granule: int = DEFAULT_DIFF_GRANULE
                 ) -> None:
        super().__init__(source.size, backing=base, filename=source.filename)
        self.source = source
        self.base = base
        self.granule = granule
        self._chunk = max(granule, MAX_IO // granule * granule)
        self._recent: OrderedDict[int, bytes] = OrderedDict()
        self._recent_bytes = 0
        self._shares_base = _same_layer(source.backing, base)

    def block_status(self, offset: int, length: int) -> Iterator[Run]:
        g = self.granule
        pos = offset - offset % g
        end = min(self.size, offset + length)
        while pos < end:
            n = min(self._chunk, self.size - pos)
            if not self._shares_base:
                yield from self._compare(pos, n)
            else:  # what the source leaves to the base is equal without a look
                for run in self.source.layer_runs(pos, n):
                    if run.state is BlockState.UNALLOCATED:
                        yield Run(run.offset, run.length, BlockState.UNALLOCATED)
                    else:
                        yield from self._compare(run.offset, run.length)
            pos += n

    def _compare(self, offset: int, n: int) -> Iterator[Run]:
        src_zero = _reads_as_zero(self.source, offset, n)
        base_zero = offset >= self.base.size or _reads_as_zero(
            self.base, offset, min(n, self.base.size - offset))
        if src_zero and base_zero:
            yield Run(offset, n, BlockState.UNALLOCATED)
            return
        src = bytes(n) if src_zero else self._read_source(offset, n)
        if not src_zero:
            self._remember(offset, src)
        other = bytes(n) if base_zero else self.base.read_at(offset, n)
        if len(other) < n:  # the base is smaller: beyond its end it reads as zero
            other += bytes(n - len(other))
        if src == other:
            yield Run(offset, n, BlockState.UNALLOCATED)
            return
        yield from merge_runs(self._granules(offset, src, other))

    def _granules(self, offset: int, src: bytes, other: bytes) -> Iterator[Run]:
        """One run per granule of ``src``: equal to ``other``, all zero, or data."""
        g = self.granule
        zero = bytes(g)
        for at in range(0, len(src), g):
            piece = src[at:at + g]
            if piece == other[at:at + g]:
                state = BlockState.UNALLOCATED
            elif piece == zero[:len(piece)]:
                state = BlockState.ZERO
            else:
                state = BlockState.DATA
            yield Run(offset + at, len(piece), state)

    def _read_source(self, offset: int, n: int) -> bytes:
        data = self.source.read_at(offset, n)
        return data + bytes(n - len(data)) if len(data) < n else data

    def _remember(self, offset: int, data: bytes) -> None:
        """Keep the last few chunks compared (at most three chunks' worth of bytes)."""
        self._recent[offset] = data
        self._recent_bytes += len(data)
        while self._recent_bytes > 3 * self._chunk:
            _, old = self._recent.popitem(last=False)
            self._recent_bytes -= len(old)

    def read_at(self, offset: int, n: int) -> bytes:
        """The source's bytes (equal to the base's wherever this view defers to it)."""
        end = min(self.size, offset + n)
        parts: list[bytes] = []
        pos = offset
        while pos < end:
            for start, data in self._recent.items():
                if start <= pos < start + len(data):
                    part = data[pos - start:end - start]
                    break
            else:  # not compared lately: read the source again
                part = self.source.read_at(pos, end - pos)
                if not part:
                    break
            parts.append(part)
            pos += len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        """The source and the base belong to whoever opened them."""


def _same_layer(a: Disk | None, b: Disk) -> bool:
    """True when ``a`` and ``b`` are the same file opened as the same format."""
    if a is None or a.format_name != b.format_name or a.size != b.size:
        return False
    try:
        return os.path.samefile(a.filename, b.filename)
    except OSError:
        return False


def _reads_as_zero(disk: Disk, offset: int, n: int) -> bool:
    """True when the disk's map says ``[offset, offset+n)`` reads as zero (nothing is read)."""
    return all(ext.kind is ExtentKind.ZERO for ext in disk.extents(offset, n))
