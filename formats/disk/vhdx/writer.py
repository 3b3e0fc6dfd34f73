"""Writing VHDX: fixed and dynamic images laid out like qemu-img's and Hyper-V's.

Layout, every part 1 MiB aligned::

    0        file identifier, header 1 (64 KiB), header 2 (128 KiB),
             region table 1 (192 KiB), region table 2 (256 KiB)
    1 MiB    log (empty: LogGuid is zero, so its content is never read)
    ...      BAT region, then the metadata region (1 MiB)
    ...      payload blocks

The source is streamed once through ``iter_nonzero``: all-zero data is never written and, in
a dynamic image, never gets a block. Blocks are allocated in guest order as data arrives, so
the BAT is known in order too and is written a page at a time: memory stays at one read
piece plus one BAT page whatever the disk size. A fixed image maps block ``i`` to
``data_offset + i * block_size``; its file has the full size but stays sparse where the
disk is zero. Headers and region tables are written last.

The default block size follows qemu-img 7.2 (8 MiB up to 1 GiB, 16 MiB up to 100 GiB,
32 MiB up to 32 TiB, 64 MiB above), so both tools make the same shape of image.
Unwritten blocks of a dynamic image are marked ZERO by default (qemu-img's
``block_state_zero=on``): the spec leaves NOT_PRESENT blocks of a non-differencing image
undefined ("arbitrary data"), while ZERO promises zeros to every reader.

References: [MS-VHDX] 2.1 (layout), 2.2 (headers, region table), 2.5 (BAT), 2.6
(metadata); QEMU block/vhdx.c ``vhdx_co_create`` for qemu-img's layout and defaults.
"""

from __future__ import annotations

import array
import os
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from imgbridge import __version__
from imgbridge.concurrency import WriteBehind, prefetch, pwrite_all
from imgbridge.crc32c import crc32c_with_zeroed_field
from imgbridge.errors import InvalidInputError
from imgbridge.model.disk import Disk, iter_nonzero
from imgbridge.options import parse_size as parse_qemu_size
from imgbridge.options import parse_switch
from imgbridge.output import AtomicOutput
from imgbridge.progress import ProgressFn

from . import _structs as S

__all__ = ["CREATE_OPTIONS", "Layout", "create", "plan_layout"]

CREATE_OPTIONS = {
    "subformat": "dynamic (the default: blocks are allocated as data is written) or fixed "
    "(every block allocated up front; the file stays sparse where the disk is zero)",
    "block_size": "payload block size, a power of two from 1M to 256M (default as "
    "qemu-img: 8M up to 1 GiB, 16M up to 100 GiB, 32M up to 32 TiB, 64M above)",
    "log_size": "size of the (empty) log, a multiple of 1M (default 1M)",
    "block_state_zero": "on (the default, as qemu-img): blocks of a dynamic image that hold "
    "no data are marked ZERO; off: NOT_PRESENT, whose content the spec leaves undefined",
}

#: The logical and physical sector size we write (qemu-img writes 512 for both).
SECTOR_SIZE = 512
#: BAT entries written per pwrite.
BAT_PAGE_ENTRIES = 8192


def parse_size(text: str, what: str) -> int:
    """The shared qemu-style size parser, its error naming the format and the option."""
    try:
        return parse_qemu_size(text, what=what)
    except InvalidInputError:
        raise InvalidInputError(f"vhdx: {what} must be a size such as 32M, not {text!r}") \
            from None


def default_block_size(size: int) -> int:
    """qemu-img's choice, which keeps the BAT small for big disks."""
    if size > 32 * S.TiB:
        return 64 * S.MiB
    if size > 100 * S.GiB:
        return 32 * S.MiB
    if size > S.GiB:
        return 16 * S.MiB
    return 8 * S.MiB


@dataclass(frozen=True)
class Layout:
    """Where everything goes in the file."""

    size: int  # virtual disk size, a multiple of the sector size
    block_size: int
    log_offset: int
    log_size: int
    bat_offset: int
    bat_length: int
    metadata_offset: int
    metadata_length: int
    data_offset: int
    payload_blocks: int
    chunk_ratio: int
    bat_entries: int

    def bat_index(self, block: int) -> int:
        return block + block // self.chunk_ratio


def plan_layout(size: int, block_size: int, log_size: int) -> Layout:
    if size % SECTOR_SIZE:
        raise InvalidInputError(f"vhdx: size {size} is not a multiple of {SECTOR_SIZE}")
    if size > S.MAX_VIRTUAL_DISK_SIZE:
        raise InvalidInputError(f"vhdx: a {size}-byte disk exceeds the format's 64 TiB")
    if not S.MIN_BLOCK_SIZE <= block_size <= S.MAX_BLOCK_SIZE or block_size & (block_size - 1):
        raise InvalidInputError(
            f"vhdx: block_size must be a power of two from 1M to 256M, not {block_size}")
    if log_size < S.MiB or log_size % S.MiB or log_size >= 1 << 32:
        raise InvalidInputError(
            f"vhdx: log_size must be a multiple of 1M from 1M to 4095M, not {log_size}")
    payload = -(-size // block_size)
    chunk_ratio = S.SECTORS_PER_BITMAP_BLOCK * SECTOR_SIZE // block_size
    entries = payload + (payload - 1) // chunk_ratio if payload else 0
    bat_length = S.round_up(max(entries * S.BAT_ENTRY_SIZE, 1), S.ALIGNMENT)
    log_offset = S.HEADER_SECTION_SIZE
    bat_offset = log_offset + log_size
    metadata_offset = bat_offset + bat_length
    metadata_length = S.MiB
    return Layout(size, block_size, log_offset, log_size, bat_offset, bat_length,
                  metadata_offset, metadata_length, metadata_offset + metadata_length,
                  payload, chunk_ratio, entries)


class _BatWriter:
    """Writes the BAT in index order, one page at a time, filling skipped entries."""

    def __init__(self, fd: int, layout: Layout, default_state: int) -> None:
        self.fd = fd
        self.layout = layout
        self.default_state = default_state
        self.page_start = 0
        self.page = self._fresh_page(0)

    def _fresh_page(self, start: int) -> array.array[int]:
        count = max(0, min(BAT_PAGE_ENTRIES, self.layout.bat_entries - start))
        page = array.array("Q", [self.default_state]) * count
        if self.default_state:  # sector bitmap entries stay NOT_PRESENT (zero)
            step = self.layout.chunk_ratio + 1
            first = (self.layout.chunk_ratio - start) % step
            slots = len(range(first, count, step))
            page[first:count:step] = array.array("Q", [S.SB_BLOCK_NOT_PRESENT]) * slots
        return page

    def set(self, index: int, entry: int) -> None:
        while index >= self.page_start + BAT_PAGE_ENTRIES:
            self._flush()
        self.page[index - self.page_start] = entry

    def _flush(self) -> None:
        if len(self.page) and any(self.page):  # an all-zero page stays a hole
            data = self.page
            if sys.byteorder == "big":
                data = array.array("Q", data)
                data.byteswap()
            pwrite_all(self.fd, data.tobytes(),
                       self.layout.bat_offset + self.page_start * S.BAT_ENTRY_SIZE)
        self.page_start += BAT_PAGE_ENTRIES
        self.page = self._fresh_page(self.page_start)

    def finish(self) -> None:
        while self.page_start < self.layout.bat_entries:
            self._flush()


def _entry(host: int, state: int) -> int:
    return (host >> S.BAT_OFFSET_SHIFT) << S.BAT_OFFSET_SHIFT | state


def create(out: AtomicOutput, disk: Disk, options: Mapping[str, str], progress: ProgressFn) -> None:
    subformat = options.get("subformat", "dynamic")
    if subformat not in ("dynamic", "fixed"):
        raise InvalidInputError(f"vhdx: subformat must be dynamic or fixed, not {subformat!r} "
                                "(differencing images cannot be written)")
    fixed = subformat == "fixed"
    size = S.round_up(disk.size, SECTOR_SIZE)  # qemu-img rounds up the same way
    block_size = parse_size(options["block_size"], "block_size") \
        if options.get("block_size") else default_block_size(size)
    log_size = parse_size(options.get("log_size", "1M"), "log_size")
    zero_state = parse_switch(options, "block_state_zero", True, format="vhdx")
    layout = plan_layout(size, block_size, log_size)
    fd = os.open(out.path, os.O_WRONLY | getattr(os, "O_BINARY", 0))
    try:
        progress(0, disk.size)
        if fixed:
            end = _write_fixed(fd, disk, layout, progress)
        else:
            default = S.PAYLOAD_BLOCK_ZERO if zero_state else S.PAYLOAD_BLOCK_NOT_PRESENT
            end = _write_dynamic(fd, disk, layout, default, progress)
        os.ftruncate(fd, end)
        pwrite_all(fd, metadata_region(layout, fixed), layout.metadata_offset)
        table = region_table(layout)
        for offset in S.REGION_TABLE_OFFSETS:
            pwrite_all(fd, table, offset)
        file_write, data_write = uuid.uuid4().bytes_le, uuid.uuid4().bytes_le
        for slot, offset in enumerate(S.HEADER_OFFSETS):
            pwrite_all(fd, header(slot + 1, file_write, data_write, layout), offset)
        pwrite_all(fd, file_identifier(), S.FILE_ID_OFFSET)
        progress(disk.size, disk.size)
    finally:
        os.close(fd)


def _write_fixed(fd: int, disk: Disk, layout: Layout, progress: ProgressFn) -> int:
    end = layout.data_offset + layout.payload_blocks * layout.block_size
    os.ftruncate(fd, end)
    bat = _BatWriter(fd, layout, S.PAYLOAD_BLOCK_NOT_PRESENT)
    for block in range(layout.payload_blocks):
        host = layout.data_offset + block * layout.block_size
        bat.set(layout.bat_index(block), _entry(host, S.PAYLOAD_BLOCK_FULLY_PRESENT))
    bat.finish()
    # Block i is at data_offset + i * block_size: guest bytes map to the file in one piece.
    with WriteBehind(fd) as writer:
        for offset, data in prefetch(iter_nonzero(disk)):
            writer.write(layout.data_offset + offset, data)
            progress(offset + len(data), disk.size)
    return end


def _write_dynamic(fd: int, disk: Disk, layout: Layout, default_state: int,
                   progress: ProgressFn) -> int:
    bs = layout.block_size
    bat = _BatWriter(fd, layout, default_state)
    next_host = layout.data_offset
    block, host = -1, 0
    with WriteBehind(fd) as writer:
        for offset, data in prefetch(iter_nonzero(disk)):
            pos, n = 0, len(data)
            while pos < n:
                guest = offset + pos
                if guest // bs != block:  # iter_nonzero goes forward: a new block
                    block, host = guest // bs, next_host
                    next_host += bs
                    bat.set(layout.bat_index(block), _entry(host, S.PAYLOAD_BLOCK_FULLY_PRESENT))
                take = min(n - pos, (block + 1) * bs - guest)
                piece = data if take == n else data[pos:pos + take]
                writer.write(host + guest - block * bs, piece)
                pos += take
            progress(offset + n, disk.size)
    bat.finish()
    return next_host


def metadata_region(layout: Layout, fixed: bool) -> bytes:
    """The metadata table and the five items every VHDX has, in one 1 MiB-aligned piece."""
    flags = S.PARAM_LEAVE_BLOCKS_ALLOCATED if fixed else 0
    items = [
        (S.FILE_PARAMETERS, S.FileParameters.build(dict(block_size=layout.block_size,
                                                        flags=flags)), S.META_IS_REQUIRED),
        (S.VIRTUAL_DISK_SIZE, layout.size.to_bytes(8, "little"),
         S.META_IS_REQUIRED | S.META_IS_VIRTUAL_DISK),
        (S.PAGE83_DATA, uuid.uuid4().bytes_le, S.META_IS_REQUIRED | S.META_IS_VIRTUAL_DISK),
        (S.LOGICAL_SECTOR_SIZE, SECTOR_SIZE.to_bytes(4, "little"),
         S.META_IS_REQUIRED | S.META_IS_VIRTUAL_DISK),
        (S.PHYSICAL_SECTOR_SIZE, SECTOR_SIZE.to_bytes(4, "little"),
         S.META_IS_REQUIRED | S.META_IS_VIRTUAL_DISK),
    ]
    table = bytearray(S.METADATA_TABLE_SIZE)
    table[:S.METADATA_HEADER_SIZE] = S.MetadataTableHeader.build(dict(
        signature=S.METADATA_SIGNATURE, reserved=0, entry_count=len(items),
        reserved2=bytes(20)))
    body = bytearray()
    for i, (item_id, value, item_flags) in enumerate(items):
        at = S.METADATA_HEADER_SIZE + i * S.METADATA_ENTRY_SIZE
        table[at:at + S.METADATA_ENTRY_SIZE] = S.MetadataTableEntry.build(dict(
            item_id=item_id, offset=S.METADATA_ITEMS_MIN_OFFSET + len(body), length=len(value),
            flags=item_flags, reserved=0))
        body += value
    return bytes(table) + bytes(body)


def region_table(layout: Layout) -> bytes:
    table = bytearray(S.REGION_TABLE_SIZE)
    entries = [(S.BAT_REGION, layout.bat_offset, layout.bat_length),
               (S.METADATA_REGION, layout.metadata_offset, layout.metadata_length)]
    table[:S.REGION_HEADER_SIZE] = S.RegionTableHeader.build(dict(
        signature=S.REGION_SIGNATURE, checksum=0, entry_count=len(entries), reserved=0))
    for i, (guid, offset, length) in enumerate(entries):
        at = S.REGION_HEADER_SIZE + i * S.REGION_ENTRY_SIZE
        table[at:at + S.REGION_ENTRY_SIZE] = S.RegionTableEntry.build(dict(
            guid=guid, file_offset=offset, length=length, required=S.REGION_REQUIRED))
    _set_checksum(table)
    return bytes(table)


def header(sequence: int, file_write: bytes, data_write: bytes, layout: Layout) -> bytes:
    raw = bytearray(S.HEADER_SIZE)
    raw[:S.HEADER_FIELDS_SIZE] = S.Header.build(dict(
        signature=S.HEADER_SIGNATURE, checksum=0, sequence_number=sequence,
        file_write_guid=file_write, data_write_guid=data_write, log_guid=S.ZERO_GUID,
        log_version=S.LOG_VERSION, version=S.HEADER_VERSION, log_length=layout.log_size,
        log_offset=layout.log_offset))
    _set_checksum(raw)
    return bytes(raw)


def file_identifier() -> bytes:
    creator = f"imgbridge {__version__}".encode("utf-16-le")[:S.CREATOR_BYTES]
    return S.FILE_SIGNATURE + creator


def _set_checksum(buf: bytearray) -> None:
    crc = crc32c_with_zeroed_field(buf, S.CHECKSUM_OFFSET)
    buf[S.CHECKSUM_OFFSET:S.CHECKSUM_OFFSET + 4] = crc.to_bytes(4, "little")
