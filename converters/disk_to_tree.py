"""From a disk to the file tree inside it: the partition table, then the filesystem.

``find_filesystem`` takes a disk in any disk format, reads its partition table (if any),
picks a partition (the one asked for, else the root: see ``choose_root_partition``), probes
the filesystem formats of the registry on that partition's first and last bytes, and opens
the winner over a range of the disk. Nothing is copied: every read goes through the disk's
own format, holes stay holes.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from imgbridge.errors import ImgBridgeError, InvalidInputError
from imgbridge.model.disk import Disk
from imgbridge.model.fs import Filesystem
from imgbridge.registry import PROBE_BYTES, FormatSpec, Kind, ProbeInput, default_registry
from imgbridge.source import ByteSource, SourceRun

__all__ = ["FoundFilesystem", "describe_filesystems", "find_filesystem", "probe_filesystem"]


@dataclass
class FoundFilesystem:
    """An opened filesystem and where it was found. ``partition`` is None for a disk that is
    one filesystem from its first byte; ``chosen_by`` says why this partition was read
    ("asked", "root type", "largest Linux filesystem", ...)."""

    fs: Filesystem
    partition: Any = None
    chosen_by: str = ""
    warnings: list[str] = field(default_factory=list)
    #: The disk the filesystem lies on, when this object owns it (``api.open_filesystem``).
    disk: Disk | None = None
    #: What the filesystem reads through; closed first, so that an entry opened or read
    #: after ``close`` fails with one clear InvalidInputError, not a bad file descriptor.
    source: _ClosableSource | None = None

    def describe(self) -> str:
        info = self.fs.info()
        label = f" {info['label']!r}" if info.get("label") else ""
        what = f"{info.get('type', self.fs.format_name)}{label}"
        if self.partition is None:
            return f"the whole disk ({what})"
        return f"partition {self.partition.number} ({what}, {self.chosen_by})"

    def close(self) -> None:
        """Release the filesystem (and the disk, when owned); closing twice is harmless."""
        if self.source is not None:
            self.source.close()
        self.fs.close()
        if self.disk is not None:
            self.disk.close()

    def __enter__(self) -> FoundFilesystem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _ClosableSource(ByteSource):
    """A source that refuses every read once closed, naming what was closed: a
    filesystem's entries keep openers that read lazily, and a caller may call them after
    ``close``."""

    def __init__(self, base: ByteSource, what: str) -> None:
        self._base: ByteSource | None = base
        self._what = what
        self.name = base.name

    def _open_base(self) -> ByteSource:
        if self._base is None:
            raise InvalidInputError(f"{self._what} was closed; open it again to read it")
        return self._base

    @property
    def size(self) -> int:
        return self._open_base().size

    def read_at(self, offset: int, n: int) -> bytes:
        return self._open_base().read_at(offset, n)

    def runs(self, offset: int = 0, length: int | None = None) -> Iterator[SourceRun]:
        return self._open_base().runs(offset, length)

    def close(self) -> None:
        # The disk below belongs to whoever opened it; only this view is closed.
        self._base = None


def _probe_input(source: ByteSource) -> ProbeInput:
    size = source.size
    head = source.read_at(0, min(size, PROBE_BYTES))
    tail = head if size <= PROBE_BYTES else source.read_at(size - PROBE_BYTES, PROBE_BYTES)
    return ProbeInput(head, tail, "", size)


def _fs_specs() -> list[FormatSpec]:
    return [s for s in default_registry().all() if s.kind is Kind.FS and s.can("read")]


#: Probe scores from here up recognise a filesystem; below it (but above 0) a probe saw its
#: magic number around a header too damaged to trust.
RECOGNISED = 50


def probe_filesystem(source: ByteSource, *, damaged: bool = False) -> FormatSpec | None:
    """The filesystem format whose magic is on ``source``, or None. With ``damaged``, the
    format whose magic is there around an implausible header (none recognised)."""
    if source.size == 0:
        return None
    probe = _probe_input(source)
    best: tuple[int, FormatSpec] | None = None
    for spec in _fs_specs():
        score = spec.probe(probe)
        wanted = 0 < score < RECOGNISED if damaged else score >= RECOGNISED
        if wanted and (best is None or score > best[0]):
            best = (score, spec)
    return best[1] if best else None


def damaged_info(source: ByteSource) -> dict[str, Any] | None:
    """What ``inspect`` says of a filesystem whose magic is there but whose header is not
    plausible: its type and why it cannot be read; None when no magic is there at all."""
    spec = probe_filesystem(source, damaged=True)
    if spec is None:
        return None
    return {"type": spec.name, "error": "its magic number is there, but its header is not "
                                        "plausible (damaged?)"}


def _disk_source(disk: Disk) -> ByteSource:
    from imgbridge.formats.volume.table import DiskSource

    return DiskSource(disk)


def _open_on(spec: FormatSpec, source: ByteSource) -> Filesystem:
    fs = spec.open(source, None, {})
    if not isinstance(fs, Filesystem):
        raise InvalidInputError(f"format {spec.name} did not open as a filesystem")
    return fs


def _found(spec: FormatSpec, source: ByteSource, partition: Any, chosen_by: str,
           notes: list[str], disk: Disk) -> FoundFilesystem:
    where = f"partition {partition.number}" if partition is not None else "the whole disk"
    guarded = _ClosableSource(source, f"the {spec.name} filesystem of {disk.filename} "
                                      f"({where})")
    return FoundFilesystem(_open_on(spec, guarded), partition, chosen_by, notes,
                           source=guarded)


def _partition_filesystems(disk: Disk, table: Any) -> Iterator[tuple[Any, ByteSource,
                                                                    FormatSpec | None]]:
    from imgbridge.formats.volume.table import partition_source

    for part in table.partitions:
        if part.container:
            continue
        source = partition_source(disk, part)
        yield part, source, probe_filesystem(source)


def _read_table(disk: Disk) -> tuple[Any, list[str]]:
    from imgbridge.formats.volume.table import read_partitions

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = read_partitions(disk)
    return table, [str(w.message) for w in caught]


def find_filesystem(disk: Disk, partition: int | None = None) -> FoundFilesystem:
    """Open the filesystem to read on ``disk``: partition number ``partition`` when given,
    else the root partition, else the whole disk when it has no partition table."""
    table, notes = _read_table(disk)
    if table is None:
        if partition is not None:
            raise InvalidInputError(f"{disk.filename}: has no partition table, so no "
                                    f"partition {partition}")
        source = _disk_source(disk)
        spec = probe_filesystem(source)
        if spec is None:
            raise InvalidInputError(f"{disk.filename}: no partition table and no filesystem "
                                    "that imgbridge can read")
        return _found(spec, source, None, "whole disk", notes, disk)
    if partition is not None:
        from imgbridge.formats.volume.table import partition_source

        # Only the partition asked for is probed: the others' first bytes are not needed.
        for part in table.partitions:
            if part.number == partition and not part.container:
                source = partition_source(disk, part)
                spec = probe_filesystem(source)
                if spec is None:
                    raise InvalidInputError(
                        f"{disk.filename}: partition {partition} holds no filesystem that "
                        "imgbridge can read")
                return _found(spec, source, part, "asked", notes, disk)
        _no_such_partition(disk, table, partition)
    found = list(_partition_filesystems(disk, table))
    from imgbridge.formats.volume.table import choose_root_partition

    fs_types = {part.number: (spec.name if spec else None) for part, _, spec in found}
    chosen = choose_root_partition(table, fs_types)
    if chosen is None:
        raise InvalidInputError(f"{disk.filename}: none of its partitions holds a filesystem "
                                "that imgbridge can read")
    for part, source, spec in found:
        if part.number == chosen.number and spec is not None:
            reason = _why_chosen(chosen, spec, found)
            return _found(spec, source, part, reason, notes, disk)
    raise InvalidInputError(f"{disk.filename}: partition {chosen.number} holds no filesystem "
                            "that imgbridge can read")


def _no_such_partition(disk: Disk, table: Any, number: int) -> None:
    """Raise the error for a partition number that holds nothing to read: an extended
    container (which only holds logical partitions) or a number not in the table."""
    contained = [p for p in table.partitions if not p.container]
    for part in table.partitions:
        if part.number == number and part.container:
            inside = ", ".join(str(p.number) for p in contained
                               if part.start <= p.start < part.start + part.size)
            raise InvalidInputError(
                f"{disk.filename}: partition {number} is an extended partition, a container "
                f"of logical partitions ({inside or 'none'}), not a filesystem")
    numbers = ", ".join(str(p.number) for p in table.partitions) or "none"
    raise InvalidInputError(f"{disk.filename}: no partition {number} (partitions: {numbers})")


def _why_chosen(part: Any, spec: FormatSpec, found: list[Any]) -> str:
    """Why ``choose_root_partition`` picked ``part``, in words that stay true when there is a
    single candidate or a tie."""
    from imgbridge.formats.volume.table import is_root_type

    if is_root_type(part.type):
        return "the root partition type"
    readable = [p for p, _, s in found if s is not None]
    linux = [p for p, _, s in found if s is not None and s.name == "ext4"]
    pool, what = (linux, "Linux filesystem") if part in linux else (readable, "filesystem")
    if len(pool) == 1:
        return f"the only {what}"
    tied = [p for p in pool if p.size == part.size]
    if len(tied) > 1:
        return f"the first of {len(tied)} largest {what}s"
    return f"the largest {what}"


def describe_filesystems(disk: Disk, table: Any) -> dict[int, dict[str, Any]]:
    """``{partition number: filesystem info}`` for every partition whose filesystem could be
    read; one that cannot be read says why (``{"error": ...}``) instead of failing."""
    out: dict[int, dict[str, Any]] = {}
    for part, source, spec in _partition_filesystems(disk, table):
        if spec is not None:
            out[part.number] = filesystem_info(spec, source)
        elif (damaged := damaged_info(source)) is not None:
            out[part.number] = damaged
    return out


def filesystem_info(spec: FormatSpec, source: ByteSource) -> dict[str, Any]:
    """The filesystem's ``info()``; a damaged one reports ``error`` rather than failing."""
    try:
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            with _open_on(spec, source) as fs:
                return fs.info()
    except ImgBridgeError as exc:
        return {"type": spec.name, "error": str(exc)}
