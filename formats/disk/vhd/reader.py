"""Reading VHD: fixed, dynamic and differencing disks.

A fixed disk is the guest's bytes followed by a footer; it reads like raw (holes in the host
file are reported as zero without being read). A dynamic disk maps the guest in blocks
through the BAT; each allocated block starts with a sector bitmap saying which of its sectors
are stored (bit set) and which are not (bit clear: zero in a dynamic disk, the parent's in a
differencing one). ``block_status`` turns BAT and bitmaps into runs, so absent blocks and
absent sectors are never read.

Robustness: the footer at the end is authoritative; when it is damaged the copy at offset 0
of a dynamic or differencing disk is used, with a warning. Every size in the footer and header
is checked against the file and against QEMU's limits before a table is read or allocated.
BAT entries pointing past the end of the file do not stop the image from opening (``check``
reports them) but reading such a block is an error.

References: "Virtual Hard Disk Image Format Specification" v1.0; QEMU block/vpc.c (vpc_open's
limits and size rules).
"""

from __future__ import annotations

import array
import bisect
import os
import sys
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

from imgbridge.errors import (
    InvalidImageError,
    MissingCompanionError,
    UnsupportedFeatureError,
)
from imgbridge.model.disk import BlockState, CheckReport, Disk, Run, merge_runs
from imgbridge.resolver import CompanionResolver
from imgbridge.source import ByteSource, read_exact

from . import _structs as S
from . import geometry, locators

#: Largest BAT we load (4 bytes per block): 16 Mi blocks, 32 TiB at 2 MiB blocks.
MAX_BAT_BYTES = 64 << 20
#: Sector bitmaps kept decoded, one per block (a 2 MiB block's bitmap is 512 bytes).
BITMAP_CACHE_BLOCKS = 1024
#: Block sizes we read: any power of two from a sector (QEMU's lower bound) to 2 GiB (the
#: field is 32 bits; such a block's bitmap is 512 KiB, still small to read).
MIN_BLOCK_SIZE = S.SECTOR
MAX_BLOCK_SIZE = 1 << 31


class VhdWarning(UserWarning):
    """A VHD was readable but damaged (a bad footer replaced by its copy, a bad BAT entry)."""


def _bad(message: str, path: str, offset: int | None = None) -> InvalidImageError:
    return InvalidImageError(message, format="vhd", path=path, offset=offset)


class VhdDisk(Disk):
    format_name = "vhd"

    def __init__(self, source: ByteSource, resolver: CompanionResolver,
                 options: Mapping[str, str]) -> None:
        self.path = source.name
        self.warnings: list[str] = []
        self.file_size = source.size
        self.footer, self.footer_offset = self._locate_footer(source)
        footer = self.footer
        if footer.disk_type not in S.DISK_TYPE_NAMES:
            raise UnsupportedFeatureError(
                f"{self.path}: VHD disk type {footer.disk_type} is not supported (known: 2 "
                "fixed, 3 dynamic, 4 differencing)")
        self.disk_type = footer.disk_type
        size = geometry.virtual_size(footer)
        if size > geometry.MAX_SIZE:
            raise _bad(f"virtual size {size} exceeds the VHD maximum of 2040 GiB", self.path,
                       self.footer_offset + 48)
        super().__init__(size, host=source, filename=source.name)
        self.header: S.DynamicHeader | None = None
        self.bat: array.array[int] = array.array(S.U32)
        self.block_size = 0
        self.bitmap_size = 0
        self.parent_name: str | None = None
        self._bitmaps: OrderedDict[int, list[tuple[int, int, bool]]] = OrderedDict()
        self._past_end: set[int] = set()
        #: Indices of allocated BAT entries, ascending: runs of absent blocks are skipped with
        #: one bisection instead of a step per block (a 2 TB disk has a million blocks).
        self._allocated: list[int] = []
        if self.disk_type == S.DISK_FIXED:
            if size > self.footer_offset:
                raise _bad(f"the fixed disk's data area holds {self.footer_offset} bytes, "
                           f"less than its virtual size {size} (truncated image?)", self.path,
                           self.footer_offset)
            return
        self._read_dynamic_header(source)
        if self.disk_type == S.DISK_DIFFERENCING:
            # Last, so that nothing can fail after the parent is open (the opener closes the
            # source when this constructor raises).
            self.backing = self._open_parent(source, resolver)

    # ---- footer and header -----------------------------------------------------------------

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        warnings.warn(f"{self.path}: {message}", VhdWarning, stacklevel=2)

    def _locate_footer(self, source: ByteSource) -> tuple[S.Footer, int]:
        """The footer to trust and where it is.

        The end of the file is tried first (512-byte footer, then the 511-byte footer of images
        older than Virtual PC 2004); a dynamic disk's copy at offset 0 stands in when the end
        is damaged.
        """
        size = source.size
        if size < S.OLD_FOOTER_SIZE:
            raise _bad(f"file of {size} bytes is too small for a VHD footer", self.path, 0)
        problems: list[str] = []
        end: tuple[S.Footer, int, bytes] | None = None
        for length in (S.FOOTER_SIZE, S.OLD_FOOTER_SIZE):
            at = size - length
            if at < 0:
                continue
            raw = source.read_at(at, length)
            if raw[:8] != S.FOOTER_COOKIE:
                continue
            raw = raw.ljust(S.FOOTER_SIZE, b"\0")
            footer = S.Footer.unpack(raw)
            computed = S.checksum(raw, S.FOOTER_CHECKSUM_AT)
            if computed == footer.checksum:
                end = (footer, at, raw)
            else:
                problems.append(f"the footer at offset {at:#x} has checksum "
                                f"{footer.checksum:#010x}, its bytes sum to {computed:#010x}")
            break
        else:
            problems.append("no footer at the end of the file")
        head_raw = source.read_at(0, S.FOOTER_SIZE)
        head: S.Footer | None = None
        if len(head_raw) == S.FOOTER_SIZE and head_raw[:8] == S.FOOTER_COOKIE:
            candidate = S.Footer.unpack(head_raw)
            if S.checksum(head_raw, S.FOOTER_CHECKSUM_AT) == candidate.checksum \
                    and candidate.disk_type in (S.DISK_DYNAMIC, S.DISK_DIFFERENCING):
                head = candidate
        if end is not None:
            if head is not None and end[0].disk_type != S.DISK_FIXED and head_raw != end[2]:
                self._warn("the footer copy at offset 0 differs from the footer at the end; "
                           "using the one at the end")
            return end[0], end[1]
        if head is not None:
            self._warn(f"{problems[0]}; using the footer copy at offset 0")
            return head, 0
        if head_raw[:8] == S.FOOTER_COOKIE:
            problems.append("the footer copy at offset 0 is damaged too")
        raise _bad(f"not a usable VHD: {'; '.join(problems)}", self.path,
                   size - S.FOOTER_SIZE if size >= S.FOOTER_SIZE else 0)

    def _read_dynamic_header(self, source: ByteSource) -> None:
        footer = self.footer
        at = footer.data_offset
        if at % S.SECTOR or at + S.HEADER_SIZE > self.file_size:
            raise _bad(f"dynamic header offset {at:#x} is invalid for a file of "
                       f"{self.file_size} bytes", self.path, self.footer_offset + 16)
        raw = read_exact(source, at, S.HEADER_SIZE, what="dynamic disk header")
        header = S.DynamicHeader.unpack(raw)
        if header.cookie != S.HEADER_COOKIE:
            raise _bad("dynamic disk header has no 'cxsparse' cookie", self.path, at)
        computed = S.checksum(raw, S.HEADER_CHECKSUM_AT)
        if computed != header.checksum:
            raise _bad(f"dynamic disk header checksum is {header.checksum:#010x}, its bytes sum "
                       f"to {computed:#010x}", self.path, at + S.HEADER_CHECKSUM_AT)
        bs = header.block_size
        if not MIN_BLOCK_SIZE <= bs <= MAX_BLOCK_SIZE or bs & (bs - 1):
            raise _bad(f"block size {bs} is not a power of two between 512 bytes and 2 GiB",
                       self.path, at + 32)
        entries = header.max_table_entries
        needed = -(-self.size // bs)
        if entries < needed:
            raise _bad(f"the BAT has {entries} entries, a disk of {self.size} bytes needs "
                       f"{needed}", self.path, at + 28)
        if entries > max(needed, geometry.MAX_SIZE // bs) or entries * 4 > MAX_BAT_BYTES:
            raise _bad(f"the BAT's {entries} entries exceed the limit for {bs}-byte blocks",
                       self.path, at + 28)
        table = header.table_offset
        if table + entries * 4 > self.file_size:
            raise _bad(f"the BAT ({entries} entries at {table:#x}) runs past the end of the "
                       f"{self.file_size}-byte file (truncated image?)", self.path, at + 16)
        self.header = header
        self.block_size = bs
        self.bitmap_size = S.bitmap_size(bs)
        bat = array.array(S.U32, read_exact(source, table, entries * 4, what="BAT"))
        if sys.byteorder == "little":
            bat.byteswap()
        self.bat = bat
        # A block must fit in the file. Damage does not stop the image from opening, so that
        # check can report it; reading the block is refused.
        self._allocated = allocated_entries(bat)
        last_start = (self.file_size - self.bitmap_size - bs) // S.SECTOR
        self._past_end = {index for index in self._allocated if bat[index] > last_start}
        if self._past_end:
            first = min(self._past_end)
            count = len(self._past_end)
            self._warn(f"{count} BAT entr{'y points' if count == 1 else 'ies point'} past the "
                       f"end of the file (first: block {first} at sector {bat[first]}); "
                       "reading them fails")

    # ---- the parent ------------------------------------------------------------------------

    def parent_locators(self, source: ByteSource) -> list[tuple[bytes, bytes]]:
        """(platform code, bytes) of every parent locator that is in use."""
        assert self.header is not None
        out: list[tuple[bytes, bytes]] = []
        for index, loc in enumerate(self.header.parent_locators):
            if loc.platform_code == S.PLATFORM_NONE or loc.platform_data_length == 0:
                continue
            where = self.footer.data_offset + 576 + index * S.PARENT_LOCATOR_SIZE
            if loc.platform_data_length > locators.MAX_LOCATOR_BYTES:
                raise _bad(f"parent locator {index} claims {loc.platform_data_length} bytes",
                           self.path, where)
            if loc.platform_data_offset + loc.platform_data_length > self.file_size:
                raise _bad(f"parent locator {index} lies past the end of the file", self.path,
                           where)
            data = read_exact(source, loc.platform_data_offset, loc.platform_data_length,
                              what=f"parent locator {index}")
            out.append((loc.platform_code, data))
        return out

    def _open_parent(self, source: ByteSource, resolver: CompanionResolver) -> Disk:
        """Open the parent through the resolver: the first candidate that exists, lies inside
        the image's folder (unless the caller allowed otherwise) and has the unique id this
        disk was made against.

        A candidate outside the folder or with another id does not stop the search (a copy of
        the parent beside the child may still match); if nothing matches, the first such
        refusal is the error, since it says more than "not found".
        """
        assert self.header is not None
        self.parent_name = locators.decode_unicode_name(self.header.parent_unicode_name)
        tried: list[str] = []
        refused: Exception | None = None
        want = self.header.parent_unique_id
        for cand in locators.candidates(self.parent_name, self.parent_locators(source)):
            full = cand.path if os.path.isabs(cand.path) else os.path.join(resolver.base_dir,
                                                                         cand.path)
            if not os.path.exists(full):
                tried.append(f"{cand.path} ({cand.origin})")
                continue
            try:
                resolver.path(cand.path, "parent VHD")  # inside the folder?
            except MissingCompanionError as exc:
                refused = refused or exc
                continue
            parent = resolver.open_disk(cand.path, "parent VHD", "vhd")
            got = parent.footer.unique_id if isinstance(parent, VhdDisk) else None
            if want != bytes(16) and got != want:
                parent.close()
                shown = "none" if got is None else str(uuid.UUID(bytes=got))
                refused = refused or _bad(
                    f"parent {cand.path!r} has unique id {shown}, but this disk was made "
                    f"from {uuid.UUID(bytes=want)}", self.path, self.footer.data_offset + 40)
                continue
            self.parent_name = cand.path
            return parent
        if refused is not None:
            raise refused
        raise MissingCompanionError(
            f"{self.path}: parent VHD not found (tried: {', '.join(tried) or 'no name given'})")

    # ---- the block map ---------------------------------------------------------------------

    def block_status(self, offset: int, length: int) -> Iterator[Run]:
        if self.disk_type == S.DISK_FIXED:
            return self._fixed_status(offset, length)
        return merge_runs(self._map_runs(offset, length), offset)

    def _map_runs(self, offset: int, length: int) -> Iterator[Run]:
        """The block map, block by block, before merging."""
        end = min(self.size, offset + length)
        bs = self.block_size
        block = offset // bs
        while block * bs < end:
            if self.bat[block] == S.BAT_FREE:
                # Every absent block up to the next allocated one is one run.
                at = bisect.bisect_left(self._allocated, block)
                following = self._allocated[at] if at < len(self._allocated) else len(self.bat)
                stop = min(self.size, following * bs)
                runs: Iterator[Run] = iter(
                    (Run(block * bs, stop - block * bs, BlockState.UNALLOCATED),))
                block = following
            else:
                runs = self._block_runs(block)
                block += 1
            yield from runs

    def _fixed_status(self, offset: int, length: int) -> Iterator[Run]:
        assert self.host is not None
        end = min(self.size, offset + length)
        for run in self.host.runs(offset, end - offset):
            state = BlockState.DATA if run.data else BlockState.ZERO
            yield Run(run.offset, run.length, state, run.offset)

    def _block_runs(self, block: int) -> Iterator[Run]:
        """One allocated block's runs, clipped to the disk, host-file holes made ZERO."""
        bs = self.block_size
        start = block * bs
        stop = min(self.size, start + bs)
        entry = self.bat[block]
        if block in self._past_end:
            raise _bad(f"block {block} (guest offset {start:#x}) lies at sector {entry}, past "
                       f"the end of the file", self.path,
                       self.header.table_offset + 4 * block if self.header else None)
        data_at = entry * S.SECTOR + self.bitmap_size
        for rel, n, present in self._bitmap_runs(block, entry):
            if start + rel >= stop:
                break
            n = min(n, stop - start - rel)
            if not present:
                yield Run(start + rel, n, BlockState.UNALLOCATED)
                continue
            yield from self._host_runs(start + rel, n, data_at + rel)

    def _host_runs(self, guest: int, n: int, host_at: int) -> Iterator[Run]:
        """A stored run, split where the host file has holes (they read as zero)."""
        assert self.host is not None
        # Blocks past the end of the file were refused above, so the runs cover all n bytes.
        for run in self.host.runs(host_at, n):
            state = BlockState.DATA if run.data else BlockState.ZERO
            yield Run(guest + run.offset - host_at, run.length, state, run.offset)

    def _bitmap_runs(self, block: int, entry: int) -> list[tuple[int, int, bool]]:
        """(byte offset in block, length, stored?) from the block's sector bitmap, cached."""
        cached = self._bitmaps.get(block)
        if cached is not None:
            self._bitmaps.move_to_end(block)
            return cached
        assert self.host is not None
        sectors = self.block_size // S.SECTOR
        raw = read_exact(self.host, entry * S.SECTOR, self.bitmap_size,
                         what=f"sector bitmap of block {block}")
        runs = bitmap_to_runs(raw, sectors)
        self._bitmaps[block] = runs
        if len(self._bitmaps) > BITMAP_CACHE_BLOCKS:
            self._bitmaps.popitem(last=False)
        return runs

    # ---- description -----------------------------------------------------------------------

    @property
    def subformat(self) -> str:
        return S.DISK_TYPE_NAMES[self.disk_type]

    def format_specific(self) -> dict[str, Any]:
        f = self.footer
        chs_size = f.chs_sectors * S.SECTOR
        data: dict[str, Any] = {
            "subformat": self.subformat,
            "creator-app": f.creator_application.decode("latin-1"),
            "creator-version": f"{f.creator_version >> 16}.{f.creator_version & 0xFFFF}",
            "creator-os": f.creator_host_os.decode("latin-1"),
            "current-size": f.current_size,
            "chs": {"cylinders": f.cylinders, "heads": f.heads,
                    "sectors-per-track": f.sectors_per_track},
            "size-from": "chs" if geometry.uses_chs(f) else "current-size",
            "uuid": str(f.uuid),
        }
        if chs_size != f.current_size:
            data["chs-size"] = chs_size
        if f.original_size != f.current_size:
            data["original-size"] = f.original_size
        if self.header is not None:
            data["block-size"] = self.block_size
        if self.disk_type == S.DISK_DIFFERENCING and self.header is not None:
            data["parent-uuid"] = str(uuid.UUID(bytes=self.header.parent_unique_id))
            data["parent-name"] = locators.decode_unicode_name(self.header.parent_unicode_name)
        if self.warnings:
            data["warnings"] = list(self.warnings)
        return data

    def info(self) -> dict[str, Any]:
        out = super().info()
        if self.disk_type != S.DISK_FIXED:
            out["cluster-size"] = self.block_size
        return out

    def backing_reference(self) -> tuple[str, str | None] | None:
        if self.disk_type == S.DISK_DIFFERENCING and self.parent_name:
            return self.parent_name, "vhd"
        return None

    def check(self, repair: str | None = None) -> CheckReport:
        from .check import check_disk

        return check_disk(self, repair)


def allocated_entries(bat: array.array[int]) -> list[int]:
    """Indices of the BAT entries that are not 0xFFFFFFFF, ascending.

    Stretches of absent blocks are skipped a chunk at a time with a bytes comparison (the
    free marker reads the same in either byte order), so a large, mostly empty BAT costs
    little; only chunks holding allocated entries are looked at entry by entry.
    """
    chunk = 4096
    free = b"\xff" * (4 * chunk)
    raw = bat.tobytes()
    out: list[int] = []
    for base in range(0, len(bat), chunk):
        piece = raw[4 * base:4 * (base + chunk)]
        if piece == free[:len(piece)]:
            continue
        out.extend(i for i in range(base, min(len(bat), base + chunk)) if bat[i] != S.BAT_FREE)
    return out


def bitmap_to_runs(raw: bytes, sectors: int) -> list[tuple[int, int, bool]]:
    """Decode a sector bitmap (bit 7 of byte 0 is the block's first sector) into byte runs.

    Whole 0x00 / 0xFF bytes are taken eight sectors at a time, so the usual all-set and
    all-clear bitmaps cost one comparison in all.
    """
    full, rest = divmod(sectors, 8)
    body = raw[:full]
    if not rest and body == b"\xff" * full:
        return [(0, sectors * S.SECTOR, True)]
    if not rest and body == bytes(full):
        return [(0, sectors * S.SECTOR, False)]
    runs: list[tuple[int, int, bool]] = []
    run_start, run_state = 0, bool(raw[0] & 0x80)
    sector = 0

    def switch(state: bool) -> None:
        nonlocal run_start, run_state
        if state != run_state:
            runs.append((run_start * S.SECTOR, (sector - run_start) * S.SECTOR, run_state))
            run_start, run_state = sector, state

    for byte in body:
        if byte in (0, 0xFF):
            switch(byte == 0xFF)
            sector += 8
            continue
        for bit in range(7, -1, -1):
            switch(bool(byte >> bit & 1))
            sector += 1
    for bit in range(7, 7 - rest, -1):
        switch(bool(raw[full] >> bit & 1))
        sector += 1
    runs.append((run_start * S.SECTOR, (sector - run_start) * S.SECTOR, run_state))
    return runs
