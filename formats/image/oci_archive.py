"""OCI archives (``oci-archive:FILE[:REF]``): a tar of an OCI image layout, read in place.

Blobs are byte ranges of the archive (nothing is extracted). A tar that turns out to be a
Docker archive without ``oci-layout`` is read as one, since the probe, which sees only the
first headers, may not tell the two apart.

References: opencontainers/image-spec ``image-layout.md``; containers/image ``oci-archive``
transport documentation (skopeo's ``oci-archive:`` name).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from imgbridge.errors import InvalidImageError
from imgbridge.progress import ProgressFn
from imgbridge.registry import ProbeInput
from imgbridge.resolver import CompanionResolver
from imgbridge.source import ByteSource

from ._archive import TarBlobStore, tar_member_names
from ._blobs import StoredImage, StoredIndex, read_json
from ._write import IMAGE_CREATE_OPTIONS, write_oci_archive
from .oci_layout import OPEN_OPTIONS, open_layout

__all__ = ["CREATE_OPTIONS", "OPEN_OPTIONS", "create", "open", "probe", "open_archive_store"]

OTHER_FORM_HINT = "for a layout directory use oci:"


def probe(p: ProbeInput) -> int:
    names = tar_member_names(p)
    if not names:
        return 0
    if "oci-layout" in names or "index.json" in names:
        return 60
    if any(n.startswith("blobs") for n in names) and "manifest.json" not in names:
        return 30  # a layout's blobs come first in some writers; open confirms
    return 0


def open_archive_store(store: TarBlobStore, options: Mapping[str, str],
                       format_name: str) -> StoredImage | StoredIndex:
    layout, _ = read_json(store.member("oci-layout", "oci-layout"), "oci-layout")
    index, _ = read_json(store.member("index.json", "index.json"), "index.json")
    return open_layout(store, index, layout, options, format_name)


def open(source: ByteSource, resolver: CompanionResolver,
         options: Mapping[str, str]) -> StoredImage | StoredIndex:
    store = TarBlobStore(source)
    try:
        if store.has("oci-layout"):
            return open_archive_store(store, options, "oci-archive")
        if store.has("manifest.json"):
            from .docker_archive import open_docker_store

            return open_docker_store(store, options)
        raise InvalidImageError("neither oci-layout nor manifest.json is in the archive",
                                path=source.name)
    except BaseException:
        store.close()
        raise


# -- writing ----------------------------------------------------------------------------------

CREATE_OPTIONS = IMAGE_CREATE_OPTIONS


def create(out: Any, obj: Any, options: Mapping[str, str], progress: ProgressFn) -> None:
    """Write ``obj`` (a ContainerImage, or a WritableImage from converters.tree_to_tree)."""
    # Imported here: the converters build on this package, not the other way round.
    from imgbridge.converters.tree_to_tree import prepared

    with prepared(obj, "oci-archive", options) as image, out.open_sequential() as f:
        write_oci_archive(f, image, progress)
