"""Raw disk images: the guest's bytes, one for one, with holes where the guest reads zeros.

Reading asks the host filesystem where data lies (SEEK_DATA/SEEK_HOLE through
``FileSource.runs``), so holes are reported as zero without being read. Writing leaves every
4 KiB block of zeros unwritten and sets the exact size with ``ftruncate``, so the output is as
sparse as the host filesystem allows.

References: none (raw has no structure); QEMU ``block/file-posix.c`` for the block-status
behaviour mirrored by ``imgbridge map``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping

from imgbridge.concurrency import WriteBehind, prefetch, pwrite_all
from imgbridge.errors import InvalidInputError
from imgbridge.model.disk import MAX_IO, BlockState, Disk, ExtentKind, Run, iter_nonzero
from imgbridge.output import AtomicOutput
from imgbridge.progress import ProgressFn
from imgbridge.registry import ProbeInput
from imgbridge.resolver import CompanionResolver
from imgbridge.source import ByteSource

CREATE_OPTIONS = {
    "preallocation": "off (sparse, the default), falloc (reserve the blocks), "
    "full (write every byte, zeros included)",
}


class RawDisk(Disk):
    format_name = "raw"

    def __init__(self, source: ByteSource) -> None:
        super().__init__(source.size, host=source)
        self._source = source

    def block_status(self, offset: int, length: int) -> Iterator[Run]:
        for run in self._source.runs(offset, length):
            state = BlockState.DATA if run.data else BlockState.ZERO
            yield Run(run.offset, run.length, state, run.offset)


def probe(p: ProbeInput) -> int:
    """Raw has no magic: it takes any file with the lowest score and is never chosen silently."""
    return 0 if p.is_dir else 1


def open(
    source: ByteSource, resolver: CompanionResolver, options: Mapping[str, str]
) -> RawDisk:
    return RawDisk(source)


def create(out: AtomicOutput, disk: Disk, options: Mapping[str, str], progress: ProgressFn) -> None:
    prealloc = options.get("preallocation", "off")
    if prealloc not in ("off", "falloc", "full"):
        raise InvalidInputError(f"raw: preallocation must be off, falloc or full, not {prealloc!r}")
    size = disk.size
    fd = os.open(out.path, os.O_WRONLY | getattr(os, "O_BINARY", 0))
    try:
        os.ftruncate(fd, size)
        if prealloc == "falloc" and size and hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)
        progress(0, size)
        if prealloc == "full":
            _write_every_byte(fd, disk, progress)
        else:
            # Reading and zero detection run ahead in one thread, writes trail in others.
            with WriteBehind(fd) as writer:
                for offset, data in prefetch(iter_nonzero(disk)):
                    writer.write(offset, data)
                    progress(offset + len(data), size)
        progress(size, size)
    finally:
        os.close(fd)


def _write_every_byte(fd: int, disk: Disk, progress: ProgressFn) -> None:
    """preallocation=full: every byte is written, zeros included, so no hole remains."""
    zeros = bytes(MAX_IO)
    for ext in disk.extents():
        pos = ext.offset
        while pos < ext.end:
            n = min(MAX_IO, ext.end - pos)
            data = disk.read_at(pos, n) if ext.kind is ExtentKind.DATA else zeros[:n]
            pwrite_all(fd, data, pos)
            pos += n
            progress(pos, disk.size)
