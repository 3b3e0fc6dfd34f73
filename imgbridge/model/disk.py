"""The block-device side of the model: a virtual disk and its allocation map.

A format answers only two questions (QEMU's block-status contract): *what is at this range in
my own layer* (``block_status``: data / reads as zero / not stored here, ask the backing file)
and *give me the bytes of one data run* (``read_run``). Everything else a disk offers — reads
through the backing chain, the merged allocation map, zero-skipping iteration, ``info`` — is
derived here once, the way go-containerregistry's ``partial`` package derives an image from a
few methods.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..errors import InternalError, InvalidInputError
from ..source import ByteSource

__all__ = [
    "BlockState",
    "CheckReport",
    "Disk",
    "Extent",
    "ExtentKind",
    "Run",
    "iter_nonzero",
    "merge_runs",
    "ZERO_BLOCK",
]

#: The granularity at which data is tested for zeros before it is written.
ZERO_GRANULE = 4096
ZERO_BLOCK = bytes(ZERO_GRANULE)
#: The largest single read a converter issues (big I/O, bounded memory).
MAX_IO = 4 << 20


class BlockState(enum.Enum):
    """What one layer says about a range of its guest-visible address space."""

    DATA = "data"  #: bytes stored in this layer
    ZERO = "zero"  #: reads as zero, decided by this layer (a hole, a zero cluster)
    UNALLOCATED = "unallocated"  #: not stored here: ask the backing file, else zero


class Run(NamedTuple):
    """One layer's answer for a range.

    ``host_offset`` is where the run starts in the layer's own file, when that is meaningful
    (always for uncompressed DATA; for a raw hole too, as qemu-img reports it). ``token`` is the
    format's private note for ``read_run`` (a compressed cluster descriptor, an extent handle).
    """

    offset: int
    length: int
    state: BlockState
    host_offset: int | None = None
    token: Any = None


class ExtentKind(enum.Enum):
    """What the guest reads in an extent, after the backing chain is resolved."""

    DATA = "data"
    ZERO = "zero"


class Extent(NamedTuple):
    """A run of the guest-visible disk, resolved through the backing chain.

    ``depth`` is the layer that decided the run (0 = this image, 1 = its backing file, ...);
    where no layer decided, ``present`` is False and ``depth`` is the last layer consulted,
    exactly as in ``qemu-img map --output=json``.
    """

    offset: int
    length: int
    kind: ExtentKind
    depth: int = 0
    present: bool = True
    host_offset: int | None = None

    @property
    def allocated_here(self) -> bool:
        return self.present and self.depth == 0

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass
class CheckReport:
    """The outcome of an integrity check, counted the way ``qemu-img check`` counts.

    ``corruptions`` and ``leaks`` count problems (a leak is a cluster whose stored refcount
    is higher than its references; a corruption is anything that can lose data).
    ``messages`` are the detail lines, worded like qemu-img's (``ERROR ...``, ``Leaked ...``,
    ``Repairing ...``); ``notes`` are what the user should know (nothing to check, what a
    repair could not mend). After a repair the counts describe the image as it is now and
    ``*_fixed`` tell what the repair mended, as qemu-img's double check reports them.
    """

    format: str
    filename: str
    supported: bool = True
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int | None = None
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    messages: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """qemu-img check's convention: 1 check errors, 2 corruptions, 3 leaks only, 0 clean."""
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def to_json(self) -> dict[str, Any]:
        """The keys of ``qemu-img check --output=json``: a count appears only when non-zero
        (check-errors always). ``supported`` (false) and ``notes`` appear only when set."""
        out: dict[str, Any] = {"filename": self.filename, "format": self.format,
                               "check-errors": self.check_errors}
        optional = (
            ("image-end-offset", self.image_end_offset or 0),
            ("total-clusters", self.total_clusters),
            ("allocated-clusters", self.allocated_clusters),
            ("fragmented-clusters", self.fragmented_clusters),
            ("compressed-clusters", self.compressed_clusters),
            ("corruptions", self.corruptions),
            ("leaks", self.leaks),
            ("corruptions-fixed", self.corruptions_fixed),
            ("leaks-fixed", self.leaks_fixed),
        )
        out.update((key, value) for key, value in optional if value)
        if not self.supported:
            out["supported"] = False
        if self.notes:
            out["notes"] = list(self.notes)
        return out

    def summary(self) -> list[str]:
        """The human summary, in qemu-img check's words (details are in ``messages``)."""
        lines = list(self.notes)
        if self.corruptions_fixed or self.leaks_fixed:
            lines += ["The following inconsistencies were found and repaired:",
                      f"    {self.leaks_fixed} leaked clusters",
                      f"    {self.corruptions_fixed} corruptions",
                      "Double checking the fixed image now..."]
        if not self.supported:
            return lines
        if not (self.corruptions or self.leaks or self.check_errors):
            lines.append("No errors were found on the image.")
        if self.corruptions:
            lines += [f"{self.corruptions} errors were found on the image.",
                      "Data may be corrupted, or further writes to the image may corrupt it."]
        if self.leaks:
            lines += [f"{self.leaks} leaked clusters were found on the image.",
                      "This means waste of disk space, but no harm to data."]
        if self.check_errors:
            lines.append(f"{self.check_errors} internal errors have occurred during the check.")
        if self.total_clusters and self.allocated_clusters:
            lines.append(
                f"{self.allocated_clusters}/{self.total_clusters} = "
                f"{self.allocated_clusters * 100 / self.total_clusters:.2f}% allocated, "
                f"{self.fragmented_clusters * 100 / self.allocated_clusters:.2f}% fragmented, "
                f"{self.compressed_clusters * 100 / self.allocated_clusters:.2f}% compressed "
                "clusters")
        if self.image_end_offset:
            lines.append(f"Image end offset: {self.image_end_offset}")
        return lines


class Disk:
    """A virtual disk: ``size`` guest bytes, some stored here, some in ``backing``.

    Subclasses implement ``block_status`` and, when their data is not plain bytes at
    ``host_offset`` of ``host``, ``read_run``.
    """

    format_name: str = "?"
    #: The guest's logical sector size, where the format records one (VHDX does); partition
    #: tables are read in these units first.
    logical_sector_size: int = 512

    def __init__(
        self,
        size: int,
        *,
        host: ByteSource | None = None,
        backing: Disk | None = None,
        filename: str = "",
    ) -> None:
        if size < 0:
            raise InternalError(f"negative disk size {size}")
        self.size = size
        self.host = host
        self.backing = backing
        self.filename = filename or (host.name if host is not None else "")
        #: Set by the opener when the format was guessed rather than recognised.
        self.format_guessed = False

    # ---- what a format implements ---------------------------------------------------------

    def block_status(self, offset: int, length: int) -> Iterator[Run]:
        """Yield ordered, gap-free runs of this layer covering ``[offset, offset+length)``.

        Runs may start before ``offset`` or end after it; callers clip them.
        """
        raise NotImplementedError

    def read_run(self, run: Run, offset: int, n: int) -> bytes:
        """Read ``n`` guest bytes at ``offset``, which lie inside the DATA run ``run``."""
        if self.host is None or run.host_offset is None:
            raise InternalError(f"{self.format_name}: data run without a host location")
        data = self.host.read_at(run.host_offset + (offset - run.offset), n)
        if len(data) < n:  # a data run past the end of a truncated file reads as zero
            data += bytes(n - len(data))
        return data

    def format_specific(self) -> dict[str, Any] | None:
        """The ``format-specific`` part of ``info`` (qemu-img's name), if any."""
        return None

    def check(self, repair: str | None = None) -> CheckReport:
        """Verify the image's metadata. Formats with metadata override this."""
        if repair:
            raise InvalidInputError(f"{self.format_name} images have nothing to repair")
        return CheckReport(
            format=self.format_name,
            filename=self.filename,
            supported=False,
            notes=[f"{self.format_name} images have no metadata to check"],
        )

    # ---- derived --------------------------------------------------------------------------

    def layer_runs(self, offset: int = 0, length: int | None = None) -> Iterator[Run]:
        """``block_status`` clipped to the range and checked to be ordered and gap-free."""
        end = self.size if length is None else min(self.size, offset + length)
        pos = offset
        if pos >= end:
            return
        for run in self.block_status(offset, end - offset):
            run_end = run.offset + run.length
            if run.offset > pos or run_end <= pos:
                raise InternalError(
                    f"{self.format_name}: block status skipped or repeated bytes at {pos}"
                )
            start, stop = pos, min(run_end, end)
            delta = start - run.offset
            host = None if run.host_offset is None else run.host_offset + delta
            yield Run(start, stop - start, run.state, host, run.token)
            pos = stop
            if pos >= end:
                return
        raise InternalError(f"{self.format_name}: block status ended early at {pos} of {end}")

    def read_at(self, offset: int, n: int) -> bytes:
        """Read guest bytes, falling through to the backing chain where this layer has none."""
        end = min(self.size, offset + n)
        if offset >= end:
            return b""
        parts: list[bytes] = []
        for run in self.layer_runs(offset, end - offset):
            if run.state is BlockState.DATA:
                parts.append(self._read_data(run))
            elif run.state is BlockState.UNALLOCATED and self.backing is not None:
                parts.append(self._read_backing(run.offset, run.length))
            else:
                parts.append(bytes(run.length))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _read_data(self, run: Run) -> bytes:
        # layer_runs() already clipped the run, so its own offset is where to read.
        return self.read_run(run, run.offset, run.length)

    def _read_backing(self, offset: int, n: int) -> bytes:
        assert self.backing is not None
        data = self.backing.read_at(offset, n)
        if len(data) < n:  # the backing file is smaller than this image: the rest is zero
            data += bytes(n - len(data))
        return data

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """The guest-visible allocation map, merged like ``qemu-img map --output=json``."""
        pending: Extent | None = None
        for ext in self._raw_extents(offset, length):
            if pending is None:
                pending = ext
            elif _mergeable(pending, ext):
                pending = pending._replace(length=pending.length + ext.length)
            else:
                yield pending
                pending = ext
        if pending is not None:
            yield pending

    def _raw_extents(self, offset: int, length: int | None) -> Iterator[Extent]:
        for run in self.layer_runs(offset, length):
            if run.state is BlockState.DATA:
                yield Extent(run.offset, run.length, ExtentKind.DATA, 0, True, run.host_offset)
            elif run.state is BlockState.ZERO:
                yield Extent(run.offset, run.length, ExtentKind.ZERO, 0, True, run.host_offset)
            elif self.backing is None:
                yield Extent(run.offset, run.length, ExtentKind.ZERO, 0, False, run.host_offset)
            else:
                yield from self._backing_extents(run.offset, run.length)

    def _backing_extents(self, offset: int, length: int) -> Iterator[Extent]:
        assert self.backing is not None
        end = offset + length
        inside = min(end, self.backing.size)
        if offset < inside:
            for ext in self.backing._raw_extents(offset, inside - offset):
                yield ext._replace(depth=ext.depth + 1)
        if inside < end:
            # Beyond the backing file's end this layer decides "reads as zero": QEMU reports
            # it at this layer's depth.
            yield Extent(max(offset, inside), end - max(offset, inside), ExtentKind.ZERO,
                         0, False, None)

    def chain(self) -> list[Disk]:
        """This disk and its backing files, top first."""
        out: list[Disk] = []
        disk: Disk | None = self
        while disk is not None:
            out.append(disk)
            disk = disk.backing
        return out

    def actual_size(self) -> int | None:
        """Bytes the image occupies on the host (allocated blocks), as qemu-img reports."""
        try:
            st = os.stat(self.filename)
        except OSError:
            return None
        blocks = getattr(st, "st_blocks", None)
        return blocks * 512 if blocks is not None else st.st_size

    def info(self) -> dict[str, Any]:
        """A summary keyed like ``qemu-img info --output=json``."""
        out: dict[str, Any] = {
            "virtual-size": self.size,
            "filename": self.filename,
            "format": self.format_name,
        }
        actual = self.actual_size()
        if actual is not None:
            out["actual-size"] = actual
        out["dirty-flag"] = False
        if self.format_guessed:
            out["format-guessed"] = True
        reference = self.backing_reference()
        if reference is not None:
            out["backing-filename"], backing_format = reference
            if self.backing is not None:
                out["full-backing-filename"] = self.backing.filename
            if backing_format:
                out["backing-filename-format"] = backing_format
        specific = self.format_specific()
        if specific is not None:
            out["format-specific"] = {"type": self.format_name, "data": specific}
        return out

    def backing_reference(self) -> tuple[str, str | None] | None:
        """The backing file as the image names it, and its format when recorded (qemu-img
        info's ``backing-filename`` and ``backing-filename-format``); None without one."""
        return None

    def close(self) -> None:
        """Close this layer's files and its backing chain."""
        if self.backing is not None:
            self.backing.close()
        if self.host is not None:
            self.host.close()

    def __enter__(self) -> Disk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.filename!r} {self.size} bytes>"


def merge_runs(runs: Iterable[Run], start: int = 0) -> Iterator[Run]:
    """Join runs that continue each other and drop those that end at or before ``start``.

    Formats look their maps up entry by entry (a cluster, a grain, a sector); callers want
    few, large runs so they read with few, large preads. Two runs join when they are adjacent
    in the guest, in the same state, carry the same token object (a compressed cluster's token
    is its own, so it always stays one run) and, where they have host offsets, continue each
    other in the host file.
    """
    pending: Run | None = None
    for run in runs:
        if run.offset + run.length <= start:
            continue  # a lookup unit that began before the range: the first run must cover it
        if pending is not None and _runs_continue(pending, run):
            pending = pending._replace(length=pending.length + run.length)
            continue
        if pending is not None:
            yield pending
        pending = run
    if pending is not None:
        yield pending


def _runs_continue(a: Run, b: Run) -> bool:
    if a.state is not b.state or a.token is not b.token or a.offset + a.length != b.offset:
        return False
    if a.host_offset is None or b.host_offset is None:
        return a.host_offset is None and b.host_offset is None
    return a.host_offset + a.length == b.host_offset


def _mergeable(a: Extent, b: Extent) -> bool:
    if (a.kind, a.depth, a.present) != (b.kind, b.depth, b.present) or a.end != b.offset:
        return False
    if a.host_offset is None or b.host_offset is None:
        return a.host_offset is None and b.host_offset is None
    return a.host_offset + a.length == b.host_offset


def iter_nonzero(
    disk: Disk, *, granule: int = ZERO_GRANULE, max_io: int = MAX_IO
) -> Iterator[tuple[int, bytes]]:
    """Yield ``(offset, data)`` for every run of the disk that is not all zeros.

    Zero extents are skipped without a read; data extents are read in pieces of at most
    ``max_io`` bytes and split at ``granule``-sized blocks of zeros, so a writer that leaves
    gaps unwritten produces a sparse image. Memory stays at one piece whatever the disk size.
    """
    zero = ZERO_BLOCK if granule == ZERO_GRANULE else bytes(granule)
    for ext in disk.extents():
        if ext.kind is not ExtentKind.DATA:
            continue
        pos, end = ext.offset, ext.end
        while pos < end:
            n = min(max_io, end - pos)
            data = disk.read_at(pos, n)
            yield from _split_zeros(pos, data, granule, zero)
            pos += n


def _split_zeros(base: int, data: bytes, granule: int, zero: bytes) -> Iterator[tuple[int, bytes]]:
    n = len(data)
    if zero[:64] not in data:  # no 64 zero bytes in a row: no zero granule can hide here
        yield base, data
        return
    if data == bytes(n):
        return
    # Granules are aligned to the disk, not the piece, so holes land on filesystem blocks.
    # Slicing bytes and comparing runs at memcmp speed; memoryview comparison does not.
    start = -1
    pos = 0
    while pos < n:
        nxt = min(n, pos + granule - (base + pos) % granule)
        piece = data[pos:nxt]
        if piece == zero or (nxt - pos != granule and piece == bytes(nxt - pos)):
            if start >= 0:
                yield base + start, data[start:pos]
                start = -1
        elif start < 0:
            start = pos
        pos = nxt
    if start >= 0:
        yield base + start, data[start:] if start else data
