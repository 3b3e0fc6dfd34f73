"""Docker archives (``docker-archive:FILE[:REF]``), as ``docker save`` writes them.

``manifest.json`` lists the images: ``Config`` (a member holding the config JSON), ``RepoTags``
and ``Layers`` (members holding layer tars, ``<id>/layer.tar`` in the legacy layout,
``blobs/sha256/<hex>`` since Docker 25, whose archives are also OCI layouts). The archive has
no layer digests, so each layer's digest is computed while its diff_id is checked against the
config; a config whose member name is its digest is checked against it. The legacy
``repositories`` file and per-layer ``json``/``VERSION`` files repeat what the config says
and are not needed.

``REF`` picks an image by one of its RepoTags, or ``@N`` by its position in manifest.json
(skopeo's convention).

References: moby ``image/spec/v1.2.md`` and ``image/tarexport`` behaviour (manifest.json);
Docker image manifest v2 schema 2 (layer digests); skopeo's ``docker-archive:`` transport.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

from imgbridge.errors import InvalidImageError, InvalidInputError
from imgbridge.model.image import ImageConfig
from imgbridge.progress import ProgressFn
from imgbridge.registry import ProbeInput
from imgbridge.resolver import CompanionResolver
from imgbridge.source import ByteSource

from ._archive import TarBlobStore, tar_member_names
from ._blobs import (
    DOCKER_MANIFEST,
    MAX_LAYERS,
    LayerBlob,
    StoredImage,
    StoredIndex,
    check_digest,
    read_json,
)
from ._write import IMAGE_CREATE_OPTIONS, write_docker_archive

OPEN_OPTIONS = {"ref": "a RepoTag, or @N for the Nth image", "platform": "os/arch[/variant]"}

__all__ = ["CREATE_OPTIONS", "OPEN_OPTIONS", "create", "open", "probe", "open_docker_store"]

_HEX_NAME = re.compile(r"(?:blobs/sha256/)?([0-9a-f]{64})(?:\.json)?")


def probe(p: ProbeInput) -> int:
    names = tar_member_names(p)
    if not names:
        return 0
    if "manifest.json" in names or "repositories" in names:
        return 60
    if any(n.endswith("/layer.tar") or n.endswith("/VERSION") for n in names):
        return 40  # legacy layer folders come first; open confirms manifest.json
    return 0


def _short(tag: str) -> str:
    return tag.removeprefix("docker.io/library/").removeprefix("docker.io/")


def _str_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidImageError(f"manifest.json: {what} must be a list of strings")
    return list(value)


def open_docker_store(store: TarBlobStore, options: Mapping[str, str]) -> StoredImage:
    manifest, _ = read_json(store.member("manifest.json", "manifest.json"), "manifest.json")
    if not isinstance(manifest, list) or not manifest or not all(
            isinstance(m, dict) for m in manifest):
        raise InvalidImageError("manifest.json must be a non-empty list of objects",
                                path=store.name)
    ref = options.get("ref")
    if ref and ref.startswith("@"):
        if not ref[1:].isdigit() or int(ref[1:]) >= len(manifest):
            raise InvalidInputError(f"{ref}: the archive holds {len(manifest)} images")
        item = manifest[int(ref[1:])]
    elif ref:
        # Docker writes short names ("busybox:1.36"), skopeo full ones ("docker.io/library/
        # busybox:1.36"); either spelling of the reference finds either.
        found = [m for m in manifest
                 if _short(ref) in {_short(t) for t in _str_list(m.get("RepoTags"), "RepoTags")}]
        if not found:
            tags = [t for m in manifest for t in _str_list(m.get("RepoTags"), "RepoTags")]
            raise InvalidInputError(f"no image tagged {ref!r} in {store.name}; "
                                    f"tags: {', '.join(tags) or 'none'}")
        item = found[0]
    elif len(manifest) > 1:
        tags = [t for m in manifest for t in _str_list(m.get("RepoTags"), "RepoTags")]
        raise InvalidInputError(f"{store.name} holds {len(manifest)} images "
                                f"({', '.join(tags) or 'untagged'})",
                                hint="name one: docker-archive:FILE:TAG or :@N")
    else:
        item = manifest[0]
    config_name = item.get("Config")
    if not isinstance(config_name, str):
        raise InvalidImageError("manifest.json: Config is missing", path=store.name)
    config_src = store.member(config_name, "config")
    cfg_json, cfg_bytes = read_json(config_src, f"config {config_name}")
    config_digest = f"sha256:{hashlib.sha256(cfg_bytes).hexdigest()}"
    named = _HEX_NAME.fullmatch(config_name)
    if named and f"sha256:{named.group(1)}" != config_digest:
        raise InvalidImageError(f"config {config_name}: content does not match its name "
                                f"(it hashes to {config_digest})", path=store.name)
    config = ImageConfig.from_oci_json(cfg_json)
    layer_names = _str_list(item.get("Layers"), "Layers")
    if len(layer_names) > MAX_LAYERS:
        raise InvalidImageError(f"manifest.json lists {len(layer_names)} layers")
    if len(layer_names) != len(config.diff_ids):
        raise InvalidImageError(f"manifest.json lists {len(layer_names)} layers but the config "
                                f"has {len(config.diff_ids)} diff_ids", path=store.name)
    blobs = []
    for i, (name, diff) in enumerate(zip(layer_names, config.diff_ids, strict=True)):
        check_digest(diff, f"config diff_id {i}")
        if not store.has(name):
            raise InvalidImageError(f"layer {name} is missing from the archive",
                                    path=store.name)
        blobs.append(LayerBlob(store, None, diff,
                               lambda n=name: store.member(n, "layer"),  # type: ignore[misc]
                               name))
    image = StoredImage(layers=[b.to_layer() for b in blobs], config=config,
                        tags=_str_list(item.get("RepoTags"), "RepoTags"),
                        manifest_media_type=DOCKER_MANIFEST)
    image.blobs = blobs
    image.format_name = "docker-archive"
    image.config_digest = config_digest
    image.raw_config = cfg_bytes
    image.manifest_digest = None  # a docker archive stores no manifest to take a digest of
    image.store = store
    return image


def open(source: ByteSource, resolver: CompanionResolver,
         options: Mapping[str, str]) -> StoredImage | StoredIndex:
    store = TarBlobStore(source)
    try:
        if store.has("manifest.json"):
            image = open_docker_store(store, options)
            if options.get("platform"):
                from imgbridge.model.image import ImageIndex

                ImageIndex(manifests=[(image.platform, image)]).select(options["platform"])
            return image
        if store.has("oci-layout"):
            from .oci_archive import open_archive_store

            return open_archive_store(store, options, "oci-archive")
        raise InvalidImageError("manifest.json is not in the archive", path=source.name)
    except BaseException:
        store.close()
        raise


# -- writing ----------------------------------------------------------------------------------

CREATE_OPTIONS = {
    **IMAGE_CREATE_OPTIONS,
    "compression": "re-encode every layer: none or gzip (ISA-L, mtime 0) "
                   "(default: none, as docker save writes; zstd is refused: docker load "
                   "cannot read it)",
}


def create(out: Any, obj: Any, options: Mapping[str, str], progress: ProgressFn) -> None:
    """Write ``obj`` (a ContainerImage, or a WritableImage from converters.tree_to_tree)."""
    # Imported here: the converters build on this package, not the other way round.
    from imgbridge.converters.tree_to_tree import prepared

    with prepared(obj, "docker-archive", options) as image, out.open_sequential() as f:
        write_docker_archive(f, image, progress)
