"""OCI image layout directories (``oci:DIR[:REF]``): ``oci-layout``, ``index.json``, ``blobs/``.

``index.json`` may list several images (by ``org.opencontainers.image.ref.name``) and
platforms, and may nest indexes; ``open`` returns one ``ContainerImage`` when the choice is
unambiguous (or ``ref``/``platform`` make it so), else an index that ``inspect`` lists and
``select`` picks from. Blobs are opened only as ``blobs/<alg>/<hex>`` with a validated digest,
through the companion resolver, so a symlinked blob cannot lead outside the layout.

References: opencontainers/image-spec ``image-layout.md``, ``image-index.md``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from imgbridge.errors import InvalidImageError, MissingCompanionError, UnsupportedFeatureError
from imgbridge.progress import ProgressFn
from imgbridge.registry import ProbeInput
from imgbridge.resolver import CompanionResolver
from imgbridge.source import ByteSource, FileSource

from ._blobs import (
    REF_NAME,
    BlobStore,
    Descriptor,
    StoredImage,
    StoredIndex,
    check_digest,
    open_image_or_index,
    parse_index,
    read_json,
)
from ._write import IMAGE_CREATE_OPTIONS, write_oci_layout

OPEN_OPTIONS = {"ref": "the image's ref name in index.json", "platform": "os/arch[/variant]"}

__all__ = ["CREATE_OPTIONS", "OPEN_OPTIONS", "WRITES_DIRECTORY", "create", "open", "probe",
           "check_layout_marker", "open_layout"]

#: Opened from a folder (the registry refuses a file before ``open`` runs).
OPENS_DIRECTORY = True
OTHER_FORM_HINT = "for a tar of a layout use oci-archive:"

#: The output is a folder: ``convert`` gives ``create`` an ``AtomicOutput(directory=True)``.
WRITES_DIRECTORY = True


def probe(p: ProbeInput) -> int:
    if p.listing is not None and "oci-layout" in p.listing and "index.json" in p.listing:
        return 100
    return 0


def check_layout_marker(data: Any, name: str) -> None:
    """``oci-layout`` must say ``imageLayoutVersion`` 1.x."""
    version = data.get("imageLayoutVersion") if isinstance(data, dict) else None
    if not isinstance(version, str):
        raise InvalidImageError(f"{name}: oci-layout has no imageLayoutVersion")
    if version.split(".")[0] != "1":
        raise UnsupportedFeatureError(f"{name}: OCI layout version {version} is not supported")


class DirBlobStore(BlobStore):
    """Blobs as files ``<root>/blobs/<alg>/<hex>`` (or ``<root>/<hex>`` for skopeo dir:)."""

    def __init__(self, resolver: CompanionResolver, *, flat: bool = False) -> None:
        self.resolver = resolver
        self.name = resolver.base_dir
        self.flat = flat
        # Layer contents are read through these until the image is closed, so they stay open
        # with it (one descriptor per blob read).
        self._opened: list[ByteSource] = []

    def open(self, digest: str, what: str) -> ByteSource:
        alg, _, hexpart = check_digest(digest, what).partition(":")
        rel = hexpart if self.flat else os.path.join("blobs", alg, hexpart)
        if not os.path.lexists(os.path.join(self.resolver.base_dir, rel)):
            raise InvalidImageError(f"{what} {digest} is missing (no {rel})", path=self.name)
        try:
            source = self.resolver.open_source(rel, f"{what} {digest}")
        except MissingCompanionError as exc:
            raise InvalidImageError(exc.message, path=self.name) from None
        self._opened.append(source)
        return source

    def close(self) -> None:
        for source in self._opened:
            source.close()
        self._opened.clear()


def _small_json(resolver: CompanionResolver, name: str) -> Any:
    path = os.path.join(resolver.base_dir, name)
    if not os.path.isfile(path):
        raise InvalidImageError(f"{name} is missing", path=resolver.base_dir)
    with FileSource(resolver.path(name, name)) as src:
        data, _ = read_json(src, name)
    return data


def open_layout(store: BlobStore, index_json: Any, layout: Any, options: Mapping[str, str],
                format_name: str) -> StoredImage | StoredIndex:
    """Shared by the directory and the archive readers."""
    check_layout_marker(layout, store.name)
    top = parse_index(index_json, "index.json")

    def tags(desc: Descriptor) -> list[str]:
        names = [desc.annotations.get("io.containerd.image.name"),
                 desc.annotations.get(REF_NAME)]
        return [n for n in names if n][:1]

    return open_image_or_index(store, top, format_name, dict(options), tags)


def open(source: ByteSource | None, resolver: CompanionResolver,
         options: Mapping[str, str]) -> StoredImage | StoredIndex:
    layout = _small_json(resolver, "oci-layout")
    index = _small_json(resolver, "index.json")
    store = DirBlobStore(resolver)
    try:
        return open_layout(store, index, layout, options, "oci")
    except BaseException:
        store.close()
        raise


# -- writing ----------------------------------------------------------------------------------

CREATE_OPTIONS = IMAGE_CREATE_OPTIONS


def create(out: Any, obj: Any, options: Mapping[str, str], progress: ProgressFn) -> None:
    """Write ``obj`` (a ContainerImage, or a WritableImage from converters.tree_to_tree)."""
    # Imported here: the converters build on this package, not the other way round.
    from imgbridge.converters.tree_to_tree import prepared

    if not getattr(out, "is_directory", False):
        raise UnsupportedFeatureError(
            "an OCI layout is a folder: open the output with AtomicOutput(directory=True)")
    with prepared(obj, "oci", options) as image:
        write_oci_layout(out.path, image, progress)
