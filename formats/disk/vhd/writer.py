"""Writing VHD: fixed, dynamic and differencing disks, streamed from any ``Disk``.

Sizes and the creator fields follow the rule in geometry.py: the exact virtual size in
``current_size``, the specification's geometry, creator 'win ' 10.0, so qemu-img, Hyper-V and
Azure read the size we mean.

Fixed: the guest's bytes as they are (zero blocks left as holes of a sparse file), then the
footer. Dynamic: footer copy, dynamic header, BAT, then one block per ``block_size`` of guest
space that holds any non-zero byte, then the footer. Blocks are appended in guest order as the
source streams by, so only the BAT (4 bytes per block) is held in memory, and every block's
data starts on a 4 KiB boundary of the file: the padding before a block's bitmap is never
written (it costs no disk space) and guest 4 KiB blocks land on host filesystem blocks, so
zeros inside a block stay holes. A dynamic block's sector bitmap is all ones, as QEMU and
Hyper-V write it: every sector of an allocated block is stored (unwritten ones read as zero).

Differencing (``backing_file``, from ``convert -B`` or ``create -b``): the same layout plus the
parent's name in two parent locators placed between the header and the BAT (W2ru, the path
relative to the child, for Windows; MacX, a file URL of the absolute path, for POSIX hosts),
its file name in the header and its unique id. Only what the source's own layer holds is
stored (``layer_runs``: DATA and ZERO ranges; UNALLOCATED ones are left to the parent), and the
sector bitmaps mark exactly those sectors. Stored zeros are marked but never written.

Unique ids are random (uuid4), not derived from the content: the spec makes the id the disk's
identity, differencing children record their parent's id, and Hyper-V tracks disks by it, so
two conversions of the same content must not share one. Timestamps are the time of writing.

References: "Virtual Hard Disk Image Format Specification" v1.0 ("Hard Disk Footer Format",
"Dynamic Disk Header Format", "Block Allocation Table and Data Blocks", "Implementing a
Differencing Hard Disk", "Appendix: CHS Calculation"); Azure's requirements for uploaded VHDs
(fixed, size a whole number of MiB).
"""

from __future__ import annotations

import array
import os
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from urllib.parse import quote

from imgbridge.concurrency import WriteBehind, prefetch, pwrite_all
from imgbridge.errors import InvalidInputError
from imgbridge.model.disk import MAX_IO, BlockState, Disk, iter_nonzero
from imgbridge.options import parse_size, parse_switch
from imgbridge.output import AtomicOutput
from imgbridge.progress import ProgressFn

from . import _structs as S
from . import geometry
from .reader import VhdDisk

KiB, MiB = 1 << 10, 1 << 20
DEFAULT_BLOCK_SIZE = 2 * MiB
MIN_WRITE_BLOCK_SIZE = 512 * KiB
MAX_WRITE_BLOCK_SIZE = 256 * MiB
#: Block data starts on this boundary of the file (see the module docstring).
DATA_ALIGNMENT = 4 * KiB

CREATE_OPTIONS = {
    "subformat": "dynamic (the default: only blocks holding data are stored) or fixed "
    "(the whole disk, then a footer)",
    "force_size": "on (the default): the VHD is exactly the source's size; off: round it up "
    "to the next size a CHS geometry expresses, as qemu-img does by default (for Virtual PC "
    "and QEMU older than 2.5)",
    "block_size": "dynamic block size, a power of two from 512K to 256M (default 2M; Hyper-V "
    "reads 512K and 2M)",
    "azure": "on: an Azure-ready disk: fixed, size rounded up to a whole MiB, file size = "
    "size + 512",
    "backing_file": "make a differencing disk over this parent VHD (what -B / -b set)",
    "backing_fmt": "the parent's format: vhd (a VHD's parent is always a VHD)",
}


@dataclass(frozen=True)
class Plan:
    """What to write, decided from the options before anything is written."""

    subformat: str  #: fixed, dynamic or differencing
    size: int
    block_size: int
    geometry: geometry.Geometry
    backing_file: str | None = None


@dataclass
class ParentLink:
    """What a differencing child records about its parent."""

    unique_id: bytes
    timestamp: int
    unicode_name: bytes
    locators: list[tuple[bytes, bytes]] = field(default_factory=list)


def _parse_block_size(text: str) -> int:
    """The shared qemu-style size parser, its error naming the format and the option."""
    try:
        return parse_size(text, what="block_size")
    except InvalidInputError:
        raise InvalidInputError(f"vhd: block_size must be a size such as 2M, not {text!r}") \
            from None


def plan(disk_size: int, options: Mapping[str, str]) -> Plan:
    """Validate the options and decide subformat, size, block size and geometry."""
    azure = parse_switch(options, "azure", False, format="vhd")
    force_size = parse_switch(options, "force_size", True, format="vhd")
    backing = options.get("backing_file") or None
    subformat = options.get("subformat", "fixed" if azure else "dynamic")
    if subformat not in ("dynamic", "fixed"):
        raise InvalidInputError(f"vhd: subformat must be dynamic or fixed, not {subformat!r}")
    if azure and subformat != "fixed":
        raise InvalidInputError("vhd: azure=on makes a fixed disk (Azure accepts no other); "
                                "drop subformat=dynamic")
    if azure and not force_size:
        raise InvalidInputError("vhd: azure=on needs the size in whole MiB, which force_size=off "
                                "(rounding to a CHS geometry) would break")
    if backing is None and options.get("backing_fmt"):
        raise InvalidInputError("vhd: backing_fmt was given without backing_file")
    if backing is not None:
        if subformat != "dynamic" or azure:
            raise InvalidInputError("vhd: a disk with a backing file is a differencing disk, "
                                    "which is never fixed")
        if not force_size:
            raise InvalidInputError("vhd: a differencing disk has its parent's size; "
                                    "force_size=off cannot round it")
        fmt = options.get("backing_fmt", "vhd").lower()
        if fmt not in ("vhd", "vpc"):
            raise InvalidInputError(f"vhd: the parent of a differencing VHD must be a VHD, "
                                    f"not {fmt}")
        subformat = "differencing"
    block_size = DEFAULT_BLOCK_SIZE
    if "block_size" in options:
        if subformat == "fixed":
            raise InvalidInputError("vhd: block_size applies to dynamic disks only")
        block_size = _parse_block_size(options["block_size"])
        if not MIN_WRITE_BLOCK_SIZE <= block_size <= MAX_WRITE_BLOCK_SIZE \
                or block_size & (block_size - 1):
            raise InvalidInputError(f"vhd: block_size must be a power of two from 512K to "
                                    f"256M, not {options['block_size']!r}")
    # A VHD holds whole sectors; a source of another size is padded with zeros.
    size = -(-disk_size // S.SECTOR) * S.SECTOR
    if azure:
        size = -(-size // MiB) * MiB
    elif not force_size:
        size = geometry.chs_round_up(size // S.SECTOR) * S.SECTOR
    if size > geometry.MAX_SIZE:
        raise InvalidInputError(f"vhd: a disk of {disk_size} bytes exceeds the VHD maximum of "
                                "2040 GiB (use vhdx)")
    return Plan(subformat, size, block_size, geometry.chs_for(size // S.SECTOR), backing)


def make_footer(p: Plan, disk_type: int, data_offset: int) -> S.Footer:
    return S.Footer(
        disk_type=disk_type, current_size=p.size, original_size=p.size,
        cylinders=p.geometry.cylinders, heads=p.geometry.heads,
        sectors_per_track=p.geometry.sectors_per_track, data_offset=data_offset,
        timestamp=_vhd_time(time.time()), creator_application=geometry.CREATOR_APPLICATION,
        creator_version=geometry.CREATOR_VERSION, creator_host_os=geometry.CREATOR_HOST_OS,
        unique_id=uuid.uuid4().bytes,
    )


def _vhd_time(unix: float) -> int:
    """Seconds since 2000-01-01 00:00:00 UTC, as the 32-bit fields hold them."""
    return min(max(0, int(unix) - S.VHD_EPOCH), 0xFFFF_FFFF)


def parent_link(disk: Disk, p: Plan, child_path: str) -> ParentLink:
    """The parent fields of a differencing child at ``child_path`` over ``disk.backing``."""
    parent = disk.backing
    if not isinstance(parent, VhdDisk):
        kind = "none" if parent is None else parent.format_name
        raise InvalidInputError(f"vhd: the parent of a differencing VHD must be a VHD (the "
                                f"backing file is {kind})")
    if parent.size != p.size:
        raise InvalidInputError(f"vhd: a differencing VHD has its parent's size ({parent.size} "
                                f"bytes), not {p.size}")
    assert p.backing_file is not None
    parent_path = os.path.abspath(parent.filename)
    name = p.backing_file
    if os.path.isabs(name):
        name = os.path.relpath(parent_path, os.path.dirname(os.path.abspath(child_path)))
    relative = name.replace("/", "\\")
    if not relative.startswith((".\\", "..\\")):
        relative = ".\\" + relative
    return ParentLink(
        unique_id=parent.footer.unique_id,
        timestamp=_vhd_time(os.stat(parent_path).st_mtime),
        unicode_name=os.path.basename(parent_path).encode("utf-16-be")[:512].ljust(512, b"\0"),
        locators=[(S.PLATFORM_W2RU, relative.encode("utf-16-le")),
                  (S.PLATFORM_MACX, ("file://" + quote(parent_path)).encode("utf-8"))],
    )


def create(out: AtomicOutput, disk: Disk, options: Mapping[str, str],
           progress: ProgressFn) -> None:
    p = plan(disk.size, options)
    link = parent_link(disk, p, out.target) if p.subformat == "differencing" else None
    fd = os.open(out.path, os.O_WRONLY | getattr(os, "O_BINARY", 0))
    try:
        if p.subformat == "fixed":
            write_fixed(fd, disk, p, progress)
        else:
            write_dynamic(fd, disk, p, progress, link)
    finally:
        os.close(fd)


def write_fixed(fd: int, disk: Disk, p: Plan, progress: ProgressFn) -> None:
    footer = make_footer(p, S.DISK_FIXED, S.NO_OFFSET).pack()
    os.ftruncate(fd, p.size + S.FOOTER_SIZE)
    progress(0, disk.size)
    with WriteBehind(fd) as writer:
        for offset, data in prefetch(iter_nonzero(disk)):
            writer.write(offset, data)
            progress(offset + len(data), disk.size)
    pwrite_all(fd, footer, p.size)
    progress(disk.size, disk.size)


def set_bits(bitmap: bytearray, first: int, count: int) -> None:
    """Set ``count`` bits from bit ``first`` (bit 7 of byte 0 is bit 0), whole bytes at once."""
    end = first + count
    while first < end and first % 8:
        bitmap[first // 8] |= 0x80 >> (first % 8)
        first += 1
    whole = (end - first) // 8
    if whole > 0:
        bitmap[first // 8:first // 8 + whole] = b"\xff" * whole
        first += whole * 8
    while first < end:
        bitmap[first // 8] |= 0x80 >> (first % 8)
        first += 1


class BlockAllocator:
    """Places blocks one after another as guest data streams by, in guest order.

    With ``full_bitmaps`` (dynamic disks) a block's bitmap is all ones and written when the
    block is placed. Otherwise (differencing disks) bits are set as sectors are stored and a
    block's bitmap is written once the stream has moved past it, so one bitmap at a time is
    held in memory.
    """

    def __init__(self, writer: WriteBehind, blocks: int, block_size: int, first_free: int,
                 full_bitmaps: bool) -> None:
        self.writer = writer
        self.block_size = block_size
        self.bitmap_size = S.bitmap_size(block_size)
        self.bat = array.array(S.U32, [S.BAT_FREE]) * blocks
        self.free = first_free
        self.full_bitmaps = full_bitmaps
        self._pending: dict[int, bytearray] = {}

    def _block(self, index: int) -> int:
        """The file offset of block ``index``'s bitmap, placing the block if it is new."""
        entry = self.bat[index]
        if entry != S.BAT_FREE:
            return int(entry) * S.SECTOR
        for done in [i for i in self._pending if i < index]:
            self._flush(done)
        data = -(-(self.free + self.bitmap_size) // DATA_ALIGNMENT) * DATA_ALIGNMENT
        start = data - self.bitmap_size
        self.bat[index] = start // S.SECTOR
        self.free = data + self.block_size
        if self.full_bitmaps:
            self.writer.write(start, b"\xff" * self.bitmap_size)
        else:
            self._pending[index] = bytearray(self.bitmap_size)
        return start

    def _flush(self, index: int) -> None:
        self.writer.write(self.bat[index] * S.SECTOR, bytes(self._pending.pop(index)))

    def store(self, offset: int, length: int, data: bytes | None) -> None:
        """Store guest bytes ``[offset, offset+length)``: ``data``, or zeros when None (the
        sectors are marked as stored, the bytes left as a hole that reads as zero)."""
        bs = self.block_size
        pos = 0
        while pos < length:
            index, within = divmod(offset + pos, bs)
            take = min(length - pos, bs - within)
            start = self._block(index)
            if not self.full_bitmaps:
                first = within // S.SECTOR
                set_bits(self._pending[index], first,
                         -(-(within + take) // S.SECTOR) - first)
            if data is not None:
                piece = data if take == len(data) else data[pos:pos + take]
                self.writer.write(start + self.bitmap_size + within, piece)
            pos += take

    def finish(self) -> int:
        """Write the bitmaps still held; return the end of the last block."""
        for index in list(self._pending):
            self._flush(index)
        return self.free


def layer_pieces(disk: Disk) -> Iterator[tuple[int, int, bytes | None]]:
    """What a differencing child stores of ``disk``'s own layer, in whole sectors:
    ``(offset, length, data)`` with data None for stored zeros.

    UNALLOCATED ranges are left to the parent. Sectors a range only partly covers are read
    through the chain (their other bytes come from the parent), so marking them stored keeps
    every byte as the guest sees it.
    """
    sector = S.SECTOR
    for run in disk.layer_runs():
        if run.state is BlockState.UNALLOCATED:
            continue
        start, end = run.offset, run.offset + run.length
        outer = (start // sector * sector, -(-end // sector) * sector)
        inner = (-(-start // sector) * sector, end // sector * sector)
        if run.state is BlockState.ZERO and inner[0] < inner[1]:
            read = [(outer[0], inner[0]), (inner[1], outer[1])]
            yield from _read_pieces(disk, *read[0])
            yield inner[0], inner[1] - inner[0], None
            yield from _read_pieces(disk, *read[1])
        else:
            yield from _read_pieces(disk, *outer)


def _read_pieces(disk: Disk, start: int, end: int) -> Iterator[tuple[int, int, bytes | None]]:
    pos = start
    while pos < end:
        n = min(MAX_IO, end - pos)
        data = disk.read_at(pos, n)
        if len(data) < n:  # the last sector of a disk that is not whole sectors
            data += bytes(n - len(data))
        yield pos, n, data
        pos += n


def write_dynamic(fd: int, disk: Disk, p: Plan, progress: ProgressFn,
                  link: ParentLink | None = None) -> None:
    bs = p.block_size
    blocks = -(-p.size // bs)
    header = S.DynamicHeader(table_offset=0, max_table_entries=blocks, block_size=bs)
    header_at = S.FOOTER_SIZE
    pos = header_at + S.HEADER_SIZE
    locator_data: list[tuple[int, bytes]] = []
    if link is not None:
        header.parent_unique_id = link.unique_id
        header.parent_timestamp = link.timestamp
        header.parent_unicode_name = link.unicode_name
        for index, (code, data) in enumerate(link.locators):
            space = -(-len(data) // S.SECTOR) * S.SECTOR
            # Data space in bytes, as Hyper-V and Virtual PC write it (the spec says sectors;
            # readers go by the length and offset).
            header.parent_locators[index] = S.ParentLocator(code, space, len(data), pos)
            locator_data.append((pos, data))
            pos += space
    header.table_offset = pos
    table_bytes = -(-blocks * 4 // S.SECTOR) * S.SECTOR
    progress(0, disk.size)
    with WriteBehind(fd) as writer:
        alloc = BlockAllocator(writer, blocks, bs, pos + table_bytes, full_bitmaps=link is None)
        if link is None:
            for offset, data in prefetch(iter_nonzero(disk)):
                alloc.store(offset, len(data), data)
                progress(offset + len(data), disk.size)
        else:
            for offset, length, maybe in prefetch(layer_pieces(disk)):
                alloc.store(offset, length, maybe)
                progress(min(disk.size, offset + length), disk.size)
        end = alloc.finish()
    disk_type = S.DISK_DYNAMIC if link is None else S.DISK_DIFFERENCING
    footer = make_footer(p, disk_type, header_at).pack()
    table = alloc.bat
    if sys.byteorder == "little":
        table = array.array(S.U32, table)
        table.byteswap()
    pwrite_all(fd, table.tobytes() + b"\xff" * (table_bytes - blocks * 4), header.table_offset)
    for at, data in locator_data:
        pwrite_all(fd, data, at)
    pwrite_all(fd, header.pack(), header_at)
    pwrite_all(fd, footer, 0)
    pwrite_all(fd, footer, end)
    os.ftruncate(fd, end + S.FOOTER_SIZE)
    progress(disk.size, disk.size)
