"""Companion files: backing files, VMDK extents, external data files.

An image may name other files. Following such a name blindly lets a crafted image read any
file on the host (``/etc/shadow`` as a backing file), so every companion is opened through a
resolver that keeps it inside the image's own folder unless the caller opts out.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from .errors import InvalidImageError, MissingCompanionError
from .source import FileSource

if TYPE_CHECKING:
    from .model.disk import Disk

__all__ = ["CompanionResolver", "MAX_CHAIN_DEPTH"]

#: Backing chains deeper than this are refused: a crafted chain must not exhaust file handles.
MAX_CHAIN_DEPTH = 256


class CompanionResolver:
    """Resolves the names an image uses for other files, relative to the image's folder."""

    def __init__(
        self,
        image_path: str,
        *,
        allow_outside: bool = False,
        chain: tuple[str, ...] = (),
    ) -> None:
        self.image_path = image_path
        if os.path.isdir(image_path):
            self.base_dir = os.path.abspath(image_path)
        else:
            self.base_dir = os.path.dirname(os.path.abspath(image_path))
        self.allow_outside = allow_outside
        #: Real paths of the images above this one in a backing chain, for loop detection.
        self.chain = (*chain, os.path.realpath(image_path))

    def path(self, name: str, what: str) -> str:
        """The validated path of the companion ``name`` (relative names start at base_dir)."""
        if not name or "\0" in name:
            raise InvalidImageError(f"{what} has an empty or invalid name", path=self.image_path)
        full = name if os.path.isabs(name) else os.path.join(self.base_dir, name)
        real = os.path.realpath(full)
        base = os.path.realpath(self.base_dir)
        inside = os.path.commonpath([real, base]) == base
        if not inside and not self.allow_outside:
            raise MissingCompanionError(
                f"{self.image_path}: {what} {name!r} lies outside the image's folder",
                hint="allow it with --allow-outside-backing (library: allow_outside=True) "
                "if you trust this image",
            )
        if not os.path.exists(real):
            raise MissingCompanionError(f"{self.image_path}: {what} {name!r} not found")
        return full

    def open_source(self, name: str, what: str) -> FileSource:
        """Open a companion as raw bytes (a VMDK extent, a qcow2 data file)."""
        return FileSource(self.path(name, what))

    def open_disk(
        self, name: str, what: str = "backing file", format: str | None = None,
        options: Mapping[str, str] | None = None,
    ) -> Disk:
        """Open a companion that is itself a disk image (a backing file), refusing loops."""
        full = self.path(name, what)
        if os.path.realpath(full) in self.chain:
            raise InvalidImageError(
                f"{what} {name!r} makes a loop in the backing chain", path=self.image_path
            )
        if len(self.chain) >= MAX_CHAIN_DEPTH:
            raise InvalidImageError(
                f"backing chain deeper than {MAX_CHAIN_DEPTH} images", path=self.image_path
            )
        from .api import _open_disk_at  # the opener sits above the resolver

        return _open_disk_at(
            full, format, options or {}, allow_outside=self.allow_outside, chain=self.chain,
            guessed_ok=format is None,
        )
