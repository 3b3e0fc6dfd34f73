"""skopeo ``dir:`` folders: ``manifest.json``, ``version`` and one file per blob, named by
the hex of its digest (``<hex>``, no algorithm folder).

``version`` must say ``Directory Transport Version: 1.x``. The manifest is an OCI image
manifest or a Docker v2 schema 2 manifest (whichever skopeo copied); a manifest list
(``skopeo copy --all``) is read as an index of per-platform manifests, also stored as blobs.

References: containers/image ``directory`` transport (``docs/containers-transports.5.md``);
opencontainers/image-spec ``manifest.md``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping

from imgbridge.errors import InvalidImageError, UnsupportedFeatureError
from imgbridge.registry import ProbeInput
from imgbridge.resolver import CompanionResolver
from imgbridge.source import ByteSource, FileSource

from ._blobs import (
    INDEX_TYPES,
    Descriptor,
    StoredImage,
    StoredIndex,
    load_manifest,
    open_image_or_index,
    parse_index,
    read_json,
)
from .oci_layout import DirBlobStore

OPEN_OPTIONS = {"platform": "os/arch[/variant]"}

__all__ = ["OPEN_OPTIONS", "open", "probe"]

#: Opened from a folder (the registry refuses a file before ``open`` runs).
OPENS_DIRECTORY = True


class _SkopeoDirStore(DirBlobStore):
    """``skopeo copy --all`` keeps each platform's manifest as ``<hex>.manifest.json``."""

    def open(self, digest: str, what: str) -> ByteSource:
        hexpart = digest.partition(":")[2]
        alt = f"{hexpart}.manifest.json"
        if (what == "manifest" and not os.path.lexists(os.path.join(self.name, hexpart))
                and os.path.lexists(os.path.join(self.name, alt))):
            source = self.resolver.open_source(alt, f"{what} {digest}")
            self._opened.append(source)  # closed with the store, as every other blob
            return source
        return super().open(digest, what)


def probe(p: ProbeInput) -> int:
    if p.listing is not None and {"manifest.json", "version"} <= p.listing:
        return 100
    return 0


def open(source: ByteSource | None, resolver: CompanionResolver,
         options: Mapping[str, str]) -> StoredImage | StoredIndex:
    base = resolver.base_dir
    for name in ("version", "manifest.json"):
        if not os.path.isfile(os.path.join(base, name)):
            raise InvalidImageError(f"{name} is missing", path=base)
    with FileSource(resolver.path("version", "version")) as src:
        version = src.read_at(0, 256).decode("utf-8", "replace").strip()
    if not version.startswith("Directory Transport Version: 1."):
        raise UnsupportedFeatureError(f"{base}: skopeo dir version {version!r} is not supported")
    store = _SkopeoDirStore(resolver, flat=True)
    with FileSource(resolver.path("manifest.json", "manifest.json")) as src:
        data, raw = read_json(src, "manifest.json")
    try:
        media = data.get("mediaType", "") if isinstance(data, dict) else ""
        if media in INDEX_TYPES:
            return open_image_or_index(store, parse_index(data, "manifest.json"), "dir",
                                       dict(options), lambda d: [])
        digest = f"sha256:{hashlib.sha256(raw).hexdigest()}"
        desc = Descriptor(media or "application/vnd.oci.image.manifest.v1+json", digest, len(raw))
        image = load_manifest(store, desc, data, raw, "dir", [])
        image.store = store
        if options.get("platform"):
            from imgbridge.model.image import ImageIndex

            ImageIndex(manifests=[(image.platform, image)]).select(options["platform"])
        return image
    except BaseException:
        store.close()
        raise
