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
from imgbridge.source import ByteSource

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

    def describe(self) -> str:
        info = self.fs.info()
        label = f" {info['label']!r}" if info.get("label") else ""
        what = f"{info.get('type', self.fs.format_name)}{label}"
        if self.partition is None:
            return f"the whole disk ({what})"
        return f"partition {self.partition.number} ({what}, {self.chosen_by})"

    def close(self) -> None:
        self.fs.close()
        if self.disk is not None:
            self.disk.close()

    def __enter__(self) -> FoundFilesystem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _probe_input(source: ByteSource) -> ProbeInput:
    size = source.size
    head = source.read_at(0, min(size, PROBE_BYTES))
    tail = head if size <= PROBE_BYTES else source.read_at(size - PROBE_BYTES, PROBE_BYTES)
    return ProbeInput(head, tail, "", size)


def _fs_specs() -> list[FormatSpec]:
    return [s for s in default_registry().all() if s.kind is Kind.FS and s.can("read")]


def probe_filesystem(source: ByteSource) -> FormatSpec | None:
    """The filesystem format whose magic is on ``source``, or None."""
    if source.size == 0:
        return None
    probe = _probe_input(source)
    best: tuple[int, FormatSpec] | None = None
    for spec in _fs_specs():
        score = spec.probe(probe)
        if score >= 50 and (best is None or score > best[0]):
            best = (score, spec)
    return best[1] if best else None


def _disk_source(disk: Disk) -> ByteSource:
    from imgbridge.formats.volume.table import DiskSource

    return DiskSource(disk)


def _open_on(spec: FormatSpec, source: ByteSource) -> Filesystem:
    fs = spec.open(source, None, {})
    if not isinstance(fs, Filesystem):
        raise InvalidInputError(f"format {spec.name} did not open as a filesystem")
    return fs


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
        return FoundFilesystem(_open_on(spec, source), None, "whole disk", notes)
    found = list(_partition_filesystems(disk, table))
    if partition is not None:
        for part, source, spec in found:
            if part.number == partition:
                if spec is None:
                    raise InvalidInputError(
                        f"{disk.filename}: partition {partition} holds no filesystem that "
                        "imgbridge can read")
                return FoundFilesystem(_open_on(spec, source), part, "asked", notes)
        numbers = ", ".join(str(p.number) for p, _, _ in found) or "none"
        raise InvalidInputError(f"{disk.filename}: no partition {partition} "
                                f"(partitions: {numbers})")
    from imgbridge.formats.volume.table import choose_root_partition

    fs_types = {part.number: (spec.name if spec else None) for part, _, spec in found}
    chosen = choose_root_partition(table, fs_types)
    if chosen is None:
        raise InvalidInputError(f"{disk.filename}: none of its partitions holds a filesystem "
                                "that imgbridge can read")
    for part, source, spec in found:
        if part.number == chosen.number and spec is not None:
            reason = _why_chosen(chosen, spec, found)
            return FoundFilesystem(_open_on(spec, source), part, reason, notes)
    raise InvalidInputError(f"{disk.filename}: partition {chosen.number} holds no filesystem "
                            "that imgbridge can read")


def _why_chosen(part: Any, spec: FormatSpec, found: list[Any]) -> str:
    from imgbridge.formats.volume.table import is_root_type

    if is_root_type(part.type):
        return "the root partition type"
    linux = [p for p, _, s in found if s is not None and s.name == "ext4"]
    if part in linux:
        return "the largest Linux filesystem" if len(linux) > 1 else "the Linux filesystem"
    return "the largest filesystem"


def describe_filesystems(disk: Disk, table: Any) -> dict[int, dict[str, Any]]:
    """``{partition number: filesystem info}`` for every partition whose filesystem could be
    read; one that cannot be read says why (``{"error": ...}``) instead of failing."""
    out: dict[int, dict[str, Any]] = {}
    for part, source, spec in _partition_filesystems(disk, table):
        if spec is not None:
            out[part.number] = filesystem_info(spec, source)
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
