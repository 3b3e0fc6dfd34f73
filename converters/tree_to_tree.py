"""Container image to container image: lazy transforms over a ``WritableImage``.

Each transform returns a new ``WritableImage`` whose layers do their work only when a writer
asks for them (``OutLayer.ready()``), the way go-containerregistry's ``mutate`` package wraps
images:

* ``from_image``: the source's blobs as stored, copied byte for byte (digest checked while
  they stream); a layer known only as entries (an image built in memory) is written as a tar.
* ``recompress``: every layer re-encoded as none, gzip (ISA-L, mtime 0) or zstd; diff_ids stay,
  digests change. Decompressing is recompressing to none, and costs no copy when the reader
  already holds the tar.
* ``flatten``: the whole stack squashed into one layer (whiteouts applied, hardlinks
  resolved, entries sorted); the config's diff_ids and history say so.
* ``retag``: the names the image is written under.

``prepare`` chains them for one target and its ``-o`` options; ``convert_image`` runs a
writer over the result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, BinaryIO

from imgbridge.formats.image._blobs import (
    LayerBlob,
    StoredImage,
    VerifyingReader,
    compression_of_content,
)
from imgbridge.formats.image._write import (
    COMPRESSIONS,
    OutLayer,
    ReadyBlob,
    Tag,
    WritableImage,
    build_layer,
    check_level,
    compress_stream,
    parse_tag,
)

from imgbridge.errors import InvalidInputError, UnsupportedFeatureError
from imgbridge.model.image import ContainerImage, HistoryEntry, ImageIndex
from imgbridge.model.tree import Entry
from imgbridge.progress import ProgressFn

__all__ = ["convert_image", "flatten", "from_image", "prepare", "recompress", "retag"]

FLATTEN_CREATED_BY = "imgbridge convert --flatten"


def _stored(blob: LayerBlob) -> ReadyBlob:
    """The blob exactly as stored."""
    if blob.desc is None:
        # A docker-archive records no layer digest: verifying the layer computes it.
        blob.tar()
        assert blob.digest is not None and blob.compressed_size is not None
        assert blob.diff_id is not None
        return ReadyBlob(blob.digest, blob.compressed_size, blob.diff_id, blob.compression,
                         lambda: blob._opener().as_fileobj())
    desc = blob.desc
    source = blob._opener()
    assert blob.diff_id is not None  # load_manifest always passes the config's diff_id
    return ReadyBlob(desc.digest, desc.size, blob.diff_id, compression_of_content(source),
                     lambda: VerifyingReader(source, desc.digest, desc.size))  # type: ignore[arg-type,return-value,unused-ignore]


def _plain(blob: LayerBlob) -> ReadyBlob:
    """The layer's uncompressed tar, verified (digest and diff_id); no copy is made."""
    tar = blob.tar()
    assert blob.diff_id is not None
    return ReadyBlob(blob.diff_id, tar.size, blob.diff_id, "none", tar.as_fileobj)


def _source_tags(image: ContainerImage) -> list[Tag]:
    tags = []
    for text in image.tags:
        try:
            tags.append(parse_tag(text))
        except InvalidInputError:
            continue  # a name the source allowed but no writer can store: not carried over
    return tags


def from_image(image: ContainerImage, *, compression: str = "gzip",
               level: int | None = None) -> WritableImage:
    """The image as it is. ``compression``/``level`` apply only to layers that exist as
    entries alone (an image built in memory); stored blobs are copied unchanged."""
    blobs: list[LayerBlob] | None = getattr(image, "blobs", None)
    layers: list[OutLayer] = []
    if isinstance(image, StoredImage) and blobs is not None:
        for blob, layer in zip(blobs, image.layers, strict=True):
            layers.append(OutLayer(
                lambda b=blob: _stored(b),  # type: ignore[misc,unused-ignore]
                media_type=blob.desc.media_type if blob.desc else None,
                annotations=layer.annotations,
                uncompressed=lambda b=blob: b.tar().as_fileobj(),  # type: ignore[misc,unused-ignore]
                plain=lambda b=blob: _plain(b),  # type: ignore[misc,unused-ignore]
                stored_as_is=True))
        raw_config, raw_manifest = image.raw_config, image.raw_manifest
    else:
        for layer in image.layers:
            layers.append(_built(layer.iter_entries, compression, level, layer.annotations))
        raw_config = raw_manifest = None
    return WritableImage(layers=layers, config=image.config, raw_config=raw_config,
                         annotations=dict(image.annotations), tags=_source_tags(image),
                         raw_manifest=raw_manifest)


def _built(entries: Callable[[], Iterable[Entry]], compression: str, level: int | None,
           annotations: Mapping[str, str] | None = None) -> OutLayer:
    return OutLayer(lambda: build_layer(entries(), compression, level),
                    annotations=dict(annotations or {}), entries=entries)


def recompress(image: WritableImage, compression: str, level: int | None = None
               ) -> WritableImage:
    """Every stored layer re-encoded with ``compression`` (diff_ids kept, digests new)."""
    layers = []
    for layer in image.layers:
        if layer.uncompressed is None:
            layers.append(layer)  # built from entries: already made with the target's codec
        elif compression == "none" and layer.plain is not None:
            layers.append(OutLayer(layer.plain, annotations=layer.annotations))
        else:
            opener: Callable[[], BinaryIO] = layer.uncompressed
            layers.append(OutLayer(
                lambda o=opener: compress_stream(o, compression, level, None),  # type: ignore[misc,unused-ignore]
                annotations=layer.annotations))
    return replace(image, layers=layers, raw_manifest=None)


def flatten(image: ContainerImage, *, compression: str = "gzip",
            level: int | None = None) -> WritableImage:
    """All layers squashed into one (``ContainerImage.flatten``), written as one sorted tar.

    History: every existing entry is marked ``empty_layer`` and one entry saying what
    happened is added, so the non-empty entries still match the layers one to one (Docker
    refuses a config where they do not). Its time is the image's ``created``, so a second run
    gives the same bytes.
    """
    count = len(image.layers)
    history = [replace(h, empty_layer=True) for h in image.config.history]
    history.append(HistoryEntry(
        created=image.config.created, created_by=FLATTEN_CREATED_BY,
        comment=f"flattened {count} layer{'s' if count != 1 else ''} into one"))
    config = replace(image.config, history=history)
    layer = _built(image.flatten, compression, level)
    return WritableImage(layers=[layer], config=config, raw_config=None,
                         annotations=dict(image.annotations), tags=_source_tags(image))


def retag(image: WritableImage, tags: Sequence[str]) -> WritableImage:
    """The image under the names ``tags`` (``NAME:TAG``, or a bare OCI reference)."""
    return replace(image, tags=[parse_tag(t) for t in tags])


def _option_level(options: Mapping[str, str]) -> int | None:
    text = options.get("level")
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise InvalidInputError(f"level={text!r} is not a whole number") from None


@contextmanager
def prepared(obj: Any, target: str, options: Mapping[str, str]) -> Iterator[WritableImage]:
    """``prepare`` for a writer's ``create``: the staged layers are released afterwards,
    whether the write succeeded or not."""
    image = prepare(obj, target, options)
    try:
        yield image
    finally:
        if image is not obj:
            image.release()


def prepare(obj: Any, target: str, options: Mapping[str, str], *,
            tags: Sequence[str] | None = None, squash: bool = False) -> WritableImage:
    """The transforms that ``convert`` applies for ``target`` and its ``-o`` options.

    Layers are kept as stored unless ``compression`` is given, except for a docker-archive,
    whose layers are stored uncompressed by default (as ``docker save`` and skopeo do).
    """
    if isinstance(obj, WritableImage):
        return obj
    if isinstance(obj, ImageIndex):
        raise InvalidInputError("the source holds several platforms; choose one",
                                hint="pass --platform os/arch")
    if not isinstance(obj, ContainerImage):
        raise InvalidInputError(f"{type(obj).__name__} is not a container image")
    docker = target == "docker-archive"
    compression = options.get("compression") or None
    if compression is not None and compression not in COMPRESSIONS:
        raise InvalidInputError(f"compression={compression} is not one of "
                                f"{', '.join(COMPRESSIONS)}")
    if docker and compression == "zstd":
        raise UnsupportedFeatureError(
            "zstd layers in a docker-archive (docker load reads only tar and gzip layers)",
            hint="use -o compression=gzip or none")
    level = _option_level(options)
    check_level(compression or "none", level)
    codec = compression or ("none" if docker else "gzip")
    if squash:
        image = flatten(obj, compression=codec, level=level)
    else:
        image = from_image(obj, compression=codec, level=level)
        if compression is not None or docker:
            image = recompress(image, codec, level)
    if tags:
        image = retag(image, tags)
    if docker and tags and any(t.name is None for t in image.tags):
        bare = next(t.ref for t in image.tags if t.name is None)
        raise InvalidInputError(f"tag {bare!r}: a docker-archive needs NAME:TAG",
                                hint="for example --tag example.org/app:1.0")
    return image


def convert_image(source: ContainerImage, target: Any, out: Any, options: Mapping[str, str],
                  progress: ProgressFn, *, tags: Sequence[str] | None = None,
                  squash: bool = False) -> None:
    """Write ``source`` through ``target``'s writer (a ``FormatSpec``) into ``out``."""
    image = prepare(source, target.name, options, tags=tags, squash=squash)
    try:
        target.create(out, image, options, progress)
    finally:
        image.release()
