"""Picks the conversion path between two kinds of object and explains it (``convert --plan``).

There is no N x N matrix of format pairs: a plan is a short list of steps between the model's
kinds (disk, container image, file tree), and each step is one generic converter.
"""

from __future__ import annotations

from dataclasses import dataclass

from imgbridge.errors import UnsupportedFeatureError
from imgbridge.registry import FormatSpec, Kind


@dataclass(frozen=True)
class Plan:
    source: FormatSpec
    target: FormatSpec
    steps: tuple[str, ...]

    def describe(self) -> str:
        return "\n".join(f"{i}. {step}" for i, step in enumerate(self.steps, 1))


def plan(source: FormatSpec, target: FormatSpec) -> Plan:
    """The steps from a ``source`` object to a ``target`` file, or UnsupportedFeatureError."""
    if source.kind is Kind.DISK and target.kind is Kind.DISK:
        return Plan(source, target, (
            f"read {source.name}: allocation map first, zero extents never read",
            "disk_to_disk: copy the guest-visible bytes, skipping 4 KiB blocks of zeros",
            f"write {target.name} to a temporary file beside the target, then rename",
        ))
    if source.kind is Kind.IMAGE and target.kind is Kind.IMAGE:
        return Plan(source, target, (
            f"read {source.name}: manifest and config; each layer's digest and diff_id "
            "checked as it streams",
            "tree_to_tree: copy blobs unchanged, or recompress (-o compression=), squash "
            "(--flatten) and retag (--tag), each lazily, one layer at a time",
            f"write {target.name} (metadata first, fixed times and owners: the same input "
            "gives the same bytes) beside the target, then rename",
        ))
    if target.kind is Kind.FS and source.kind in (Kind.IMAGE, Kind.DISK, Kind.FS):
        read = {
            Kind.IMAGE: f"read {source.name}: every layer streamed (digests checked) and "
                        "flattened into one tree (whiteouts applied, hardlinks kept)",
            Kind.DISK: f"read {source.name}: partition table, then the filesystem of the "
                       "chosen partition (disk_to_tree), metadata only",
            Kind.FS: f"read the {source.name} tree (a host folder or a tar archive): "
                     "metadata only",
        }[source.kind]
        return Plan(source, target, (
            read,
            f"lay out the {target.name} filesystem in memory: metadata, then where each "
            "file's bytes go",
            f"write {target.name}: metadata from memory, file contents streamed from the "
            "source in one pass, free space left as holes; temporary file, then rename",
        ))
    raise UnsupportedFeatureError(
        f"converting {source.kind.value} ({source.name}) to {target.kind.value} "
        f"({target.name}) is not implemented yet"
    )
