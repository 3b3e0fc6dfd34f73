"""What every container image format shares: media types, descriptors, content-addressed
blobs read with their digest checked, layers verified in one streaming pass, and the image
and index objects the readers return.

Every blob is untrusted. A JSON blob (manifest, index, config) larger than ``MAX_JSON_BLOB``
is refused before a byte of it is read; its size and digest are checked before it is parsed.
A layer is read once, front to back: the stored bytes are hashed (``digest``), decompressed
(gzip or zstd, chosen by magic and checked against the media type), and the tar is hashed
(``diff_id``) while it is written to a temporary spool file. The spool gives random access
to member contents with bounded memory; an uncompressed layer needs no spool, its members are
ranges of the blob itself.

References: opencontainers/image-spec ``descriptor.md`` (digests, sizes), ``manifest.md``,
``image-index.md``, ``config.md`` (``rootfs.diff_ids``), ``layer.md``, ``media-types.md``
(including the Docker v2 schema 2 compatibility table).
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from imgbridge.errors import InvalidImageError, InvalidInputError, UnsupportedFeatureError
from imgbridge.model.image import ContainerImage, ImageConfig, ImageIndex, Platform
from imgbridge.model.tree import Entry, EntryType, Layer
from imgbridge.source import ByteSource, pread_full

from ...converters.layer_waste import WasteCounter
from ..fs.tar import read_tar

__all__ = [
    "MAX_JSON_BLOB",
    "BlobStore",
    "Descriptor",
    "StoredImage",
    "StoredIndex",
    "open_image_or_index",
    "read_json",
]

#: Manifests, indexes and configs are a few KB; anything past this is hostile.
MAX_JSON_BLOB = 4 << 20
#: Nested indexes deeper than this are a loop or an attack, not an image.
MAX_INDEX_DEPTH = 8
#: Layers per image: Docker's limit is 127 (overlayfs); allow generous slack.
MAX_LAYERS = 1024
_CHUNK = 1 << 20

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
REF_NAME = "org.opencontainers.image.ref.name"

_DIGEST_RE = re.compile(r"(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})")
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def check_digest(value: Any, what: str) -> str:
    """A digest string we can verify (sha256 or sha512, lowercase hex), or InvalidImageError."""
    if not isinstance(value, str) or not _DIGEST_RE.fullmatch(value):
        shown = value if isinstance(value, str) else type(value).__name__
        if isinstance(value, str) and re.fullmatch(r"[a-z0-9]+([+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+",
                                                   value):
            raise UnsupportedFeatureError(f"{what}: digest algorithm of {value!r} is not "
                                          "supported (sha256 and sha512 are)")
        raise InvalidImageError(f"{what}: {shown!r} is not a valid digest")
    return value


def _hasher(digest: str) -> Any:
    return hashlib.new(digest.partition(":")[0])


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor, validated (``descriptor.md``)."""

    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, data: Any, what: str) -> Descriptor:
        if not isinstance(data, dict):
            raise InvalidImageError(f"{what}: a descriptor must be a JSON object")
        media = data.get("mediaType", "")
        size = data.get("size")
        if not isinstance(media, str):
            raise InvalidImageError(f"{what}: mediaType is not a string")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 1 << 62:
            raise InvalidImageError(f"{what}: size {size!r} is not a valid blob size")
        annotations = data.get("annotations") or {}
        if not isinstance(annotations, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()):
            raise InvalidImageError(f"{what}: annotations must map strings to strings")
        plat = data.get("platform")
        if plat is not None and not isinstance(plat, dict):
            raise InvalidImageError(f"{what}: platform must be a JSON object")
        return cls(media, check_digest(data.get("digest"), what), size,
                   Platform.from_oci_json(plat) if plat else None, dict(annotations))


class BlobStore:
    """Where a format keeps its blobs: ``open(digest)`` gives the stored bytes."""

    name = "<image>"

    def open(self, digest: str, what: str) -> ByteSource:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the store holds (an archive's file, say)."""


def _read_all(source: ByteSource, what: str) -> bytes:
    if source.size > MAX_JSON_BLOB:
        raise InvalidImageError(f"{what} is {source.size} bytes; more than {MAX_JSON_BLOB} "
                                "is not a real manifest or config", path=source.name)
    data = source.read_at(0, source.size)
    if len(data) != source.size:
        raise InvalidImageError(f"{what} is truncated", path=source.name)
    return data


def read_json(source: ByteSource, what: str, desc: Descriptor | None = None) -> tuple[Any, bytes]:
    """Parse a JSON blob, checking its size and digest against ``desc`` first (if given).

    Returns the parsed value and the raw bytes (whose hash is, say, a manifest's digest).
    """
    if desc is not None and desc.size > MAX_JSON_BLOB:
        raise InvalidImageError(f"{what} {desc.digest} claims {desc.size} bytes; more than "
                                f"{MAX_JSON_BLOB} is not a real manifest or config")
    data = _read_all(source, what)
    if desc is not None:
        if len(data) != desc.size:
            raise InvalidImageError(f"{what} {desc.digest}: {len(data)} bytes stored, "
                                    f"the descriptor says {desc.size}")
        h = _hasher(desc.digest)
        h.update(data)
        if f"{h.name}:{h.hexdigest()}" != desc.digest:
            raise InvalidImageError(f"{what} {desc.digest}: content does not match its digest")
    try:
        return json.loads(data), data
    except (ValueError, RecursionError) as exc:
        raise InvalidImageError(f"{what} is not valid JSON: {exc}", path=source.name) from None


# ---------------------------------------------------------------------------------------------
# layers


def compression_of_media_type(media_type: str) -> str | None:
    """"gzip", "zstd" or "none" as a layer media type promises, None if it promises nothing."""
    if media_type.endswith(("+gzip", ".tar.gzip")) or media_type.endswith("diff.tar.gzip"):
        return "gzip"
    if media_type.endswith(("+zstd", ".tar.zstd")):
        return "zstd"
    if media_type.endswith((".tar", "diff.tar")):
        return "none"
    if "+" in media_type.rpartition("/")[2] or media_type.endswith(("+encrypted",)):
        raise UnsupportedFeatureError(f"layer media type {media_type} is not supported")
    return None


def compression_of_content(blob: ByteSource) -> str:
    """"gzip", "zstd" or "none", as the blob's first bytes say."""
    magic = blob.read_at(0, 4)
    return ("gzip" if magic.startswith(_GZIP_MAGIC) else
            "zstd" if magic.startswith(_ZSTD_MAGIC) else "none")


class _SpoolSource(ByteSource):
    """A ByteSource over an anonymous temporary file (deleted by the OS when closed)."""

    def __init__(self, spool: IO[bytes], size: int, name: str) -> None:
        self._spool = spool
        self._size = size
        self.name = name

    @property
    def size(self) -> int:
        return self._size

    def read_at(self, offset: int, n: int) -> bytes:
        if n <= 0 or offset >= self._size:
            return b""
        return pread_full(self._spool.fileno(), min(n, self._size - offset), offset)

    def close(self) -> None:
        self._spool.close()


class _HashingReader:
    """Reads a ByteSource front to back, hashing what it hands out (a file-like ``read``)."""

    def __init__(self, source: ByteSource, hasher: Any) -> None:
        self.source, self.hasher, self.pos = source, hasher, 0

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.source.size - self.pos
        data = self.source.read_at(self.pos, min(n, _CHUNK * 4))
        self.pos += len(data)
        self.hasher.update(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass


class VerifyingReader(_HashingReader):
    """Streams a stored blob, checking its size and digest when the end is reached: a blob
    copied unchanged is still never trusted. The source belongs to its store, which closes it.
    """

    def __init__(self, source: ByteSource, digest: str, size: int) -> None:
        super().__init__(source, _hasher(digest))
        self.digest, self.size = digest, size

    def read(self, n: int = -1) -> bytes:
        data = super().read(n)
        if n != 0 and not data:
            got = f"{self.hasher.name}:{self.hasher.hexdigest()}"
            if self.pos != self.size or got != self.digest:
                raise InvalidImageError(f"blob {self.digest}: {self.pos} bytes hashing to "
                                        f"{got}; the manifest says {self.size} bytes")
        return data

    def close(self) -> None:
        """Nothing to release: the store owns the source."""

    def __enter__(self) -> VerifyingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LayerBlob:
    """One layer blob, verified and made randomly readable on first use (then cached).

    ``digest`` may be None where the format does not record it (a legacy ``docker save``
    layer folder); it is then computed. ``diff_id`` comes from the config.
    """

    def __init__(self, store: BlobStore, desc: Descriptor | None, diff_id: str | None,
                 opener: Callable[[], ByteSource], what: str) -> None:
        self.store, self.desc, self.diff_id, self._opener, self.what = (
            store, desc, diff_id, opener, what)
        self._tar: ByteSource | None = None
        self.digest: str | None = desc.digest if desc else None
        self.compressed_size: int | None = desc.size if desc else None
        self.compression = ""
        self.uncompressed_size: int | None = None

    def tar(self) -> ByteSource:
        if self._tar is None:
            self._tar = self._verify()
        return self._tar

    def _verify(self) -> ByteSource:
        blob = self._opener()
        name = self.desc.digest if self.desc else self.what
        if self.desc is not None and blob.size != self.desc.size:
            raise InvalidImageError(f"layer blob {name}: {blob.size} bytes stored, the "
                                    f"manifest says {self.desc.size}")
        self.compressed_size = blob.size
        found = compression_of_content(blob)
        promised = compression_of_media_type(self.desc.media_type) if self.desc else None
        if promised is not None and promised != found:
            raise InvalidImageError(f"layer blob {name}: media type {self.desc.media_type} "  # type: ignore[union-attr]
                                    f"promises {promised} but the content is {found}")
        self.compression = found
        outer = _hasher(self.desc.digest if self.desc else "sha256:")
        inner = _hasher(self.diff_id or "sha256:")
        reader = _HashingReader(blob, outer)
        if found == "none":
            reader.drain()
            inner = outer.copy()
            tar, size = blob, blob.size
        else:
            spool = tempfile.TemporaryFile(prefix="imgbridge-layer-")  # noqa: SIM115 - kept open
            try:
                size = _decompress(found, reader, spool, inner, name)
                reader.drain()
            except BaseException:
                spool.close()
                raise
            tar = _SpoolSource(spool, size, f"{name} (uncompressed)")
        self.uncompressed_size = size
        got = f"{outer.name}:{outer.hexdigest()}"
        if self.desc is not None and got != self.desc.digest:
            raise InvalidImageError(f"layer blob {name}: content does not match its digest "
                                    f"(it hashes to {got})")
        self.digest = got
        diff = f"{inner.name}:{inner.hexdigest()}"
        if self.diff_id is not None and diff != self.diff_id:
            raise InvalidImageError(f"layer blob {name}: its uncompressed tar hashes to {diff}, "
                                    f"the config's diff_id is {self.diff_id}")
        self.diff_id = diff
        return tar

    def release(self) -> None:
        """Drop the spooled tar, if any (an uncompressed blob's tar is the store's)."""
        if isinstance(self._tar, _SpoolSource):
            self._tar.close()
        self._tar = None

    def to_layer(self) -> Layer:
        return Layer(entries=lambda: read_tar(self.tar()), digest=self.digest,
                     diff_id=self.diff_id,
                     media_type=self.desc.media_type if self.desc else None,
                     size=self.compressed_size,
                     annotations=dict(self.desc.annotations) if self.desc else {})


def _decompress(kind: str, reader: _HashingReader, spool: IO[bytes], inner: Any,
                name: str) -> int:
    """Stream-decompress ``reader`` into ``spool``, hashing the output; return its size."""
    size = 0
    try:
        if kind == "gzip":
            try:
                from isal.igzip import IGzipFile as GzipReader
            except ImportError:  # pragma: no cover - isal is a dependency, but stay usable
                from gzip import GzipFile as GzipReader  # type: ignore[assignment]
            stream: Any = GzipReader(fileobj=reader, mode="rb")  # type: ignore[no-untyped-call,unused-ignore]
        else:
            import zstandard

            stream = zstandard.ZstdDecompressor().stream_reader(
                reader, read_across_frames=True)  # type: ignore[arg-type]
        while True:
            chunk = stream.read(_CHUNK)
            if not chunk:
                break
            inner.update(chunk)
            spool.write(chunk)
            size += len(chunk)
    except (OSError, EOFError, ValueError) as exc:
        raise InvalidImageError(f"layer blob {name}: cannot decompress {kind}: {exc}") from None
    except Exception as exc:
        if type(exc).__module__.startswith("zstandard"):
            raise InvalidImageError(f"layer blob {name}: cannot decompress zstd: {exc}") from None
        raise
    spool.flush()
    return size


# ---------------------------------------------------------------------------------------------
# images and indexes


class StoredImage(ContainerImage):
    """A ContainerImage read from storage, with the facts ``inspect`` reports."""

    format_name: str = ""
    manifest_digest: str | None = None
    blobs: list[LayerBlob]
    store: BlobStore | None = None
    config_digest: str | None = None
    #: The config and manifest exactly as stored, so a writer can copy them unchanged (same
    #: digests) when a conversion changes nothing they describe. Both are at most
    #: MAX_JSON_BLOB bytes.
    raw_config: bytes | None = None
    raw_manifest: bytes | None = None

    def close(self) -> None:
        for blob in getattr(self, "blobs", []):
            blob.release()
        if self.store is not None:
            self.store.close()

    def __enter__(self) -> StoredImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def layer_stats(self, index: int, waste: WasteCounter | None = None) -> dict[str, Any]:
        """Verify layer ``index`` and count what is in it. With ``waste`` (fed every lower
        layer already), also the bytes this layer hides from lower ones (``wasted``), in the
        same pass over the layer's headers."""
        blob = self.blobs[index]
        files = whiteouts = 0
        opaque: list[str] = []

        def counted() -> Iterator[Entry]:
            nonlocal files, whiteouts
            for entry in self.layers[index].iter_entries():
                if entry.type is EntryType.WHITEOUT:
                    whiteouts += 1
                elif entry.type is EntryType.OPAQUE:
                    opaque.append("/" + entry.path)
                else:
                    files += 1
                yield entry

        if waste is None:
            for _ in counted():
                pass
            wasted = None
        else:
            wasted = waste.add_layer(counted())
        stats = {"Digest": blob.digest, "DiffID": blob.diff_id,
                 "MIMEType": blob.desc.media_type if blob.desc else None,
                 "Compression": blob.compression, "CompressedSize": blob.compressed_size,
                 "UncompressedSize": blob.uncompressed_size, "Files": files,
                 "Whiteouts": whiteouts, "OpaqueDirs": opaque}
        if wasted is not None:
            stats["wasted"] = wasted
        return stats

    def info(self) -> dict[str, Any]:
        """skopeo inspect's fields, plus config, history and verified per-layer facts.

        ``WastedBytes`` (and each layer's ``wasted``) are the bytes lower layers store that
        upper layers delete or replace; see ``imgbridge.converters.layer_waste``.
        """
        cfg = self.config
        docker = self.format_name == "docker-archive"
        waste = WasteCounter()
        stats = [self.layer_stats(i, waste) for i in range(len(self.layers))]
        out: dict[str, Any] = {
            "format": self.format_name,
            # skopeo shows Name and RepoTags only for Docker names; an OCI ref name is not one.
            "Name": self.tags[0] if self.tags and docker else "",
            "Digest": self.manifest_digest,
            "RepoTags": list(self.tags) if docker else [],
            "RefNames": list(self.tags),
            "Created": cfg.created,
            "DockerVersion": cfg.raw.get("docker_version", ""),
            "Labels": dict(cfg.labels) or None,
            "Architecture": cfg.platform.architecture,
            "Os": cfg.platform.os,
        }
        if cfg.platform.variant:
            out["Variant"] = cfg.platform.variant
        out["Layers"] = [s["Digest"] for s in stats]
        out["LayersData"] = [
            {"MIMEType": s["MIMEType"], "Digest": s["Digest"], "Size": s["CompressedSize"],
             "Annotations": dict(layer.annotations) or None}
            for s, layer in zip(stats, self.layers, strict=True)]
        out["Env"] = list(cfg.env) or None
        out["Config"] = {
            "Entrypoint": cfg.entrypoint, "Cmd": cfg.cmd, "WorkingDir": cfg.working_dir,
            "User": cfg.user, "ExposedPorts": list(cfg.exposed_ports),
            "Volumes": list(cfg.volumes), "StopSignal": cfg.stop_signal, "Author": cfg.author,
        }
        out["ConfigDigest"] = self.config_digest
        out["History"] = [
            {"created": h.created, "created_by": h.created_by, "author": h.author,
             "comment": h.comment, "empty_layer": h.empty_layer} for h in cfg.history]
        out["LayerDetails"] = stats
        out["WastedBytes"] = waste.total
        out["Annotations"] = dict(self.annotations)
        return out


class StoredIndex(ImageIndex):
    """Several images (an index, nested or not): ``select`` one; ``info`` lists them all."""

    format_name: str = ""
    digests: list[str]
    store: BlobStore | None = None

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    def __enter__(self) -> StoredIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def select(self, platform: Platform | str) -> ContainerImage:
        image = super().select(platform)
        if isinstance(image, StoredImage):
            image.store = self.store  # the image now owns the open archive
            self.store = None
        return image

    def info(self) -> dict[str, Any]:
        return {
            "format": self.format_name,
            "MediaType": self.media_type,
            "Manifests": [{"Platform": str(p), "Digest": d}
                          for (p, _), d in zip(self.manifests, self.digests, strict=True)],
            "Annotations": dict(self.annotations),
        }


def load_manifest(store: BlobStore, desc: Descriptor | None, raw_manifest: Any,
                  manifest_bytes: bytes | None, format_name: str,
                  tags: list[str]) -> StoredImage:
    """Build a StoredImage from a parsed OCI / Docker v2s2 manifest."""
    what = f"manifest {desc.digest}" if desc else "manifest"
    if not isinstance(raw_manifest, dict):
        raise InvalidImageError(f"{what} is not a JSON object")
    media = raw_manifest.get("mediaType") or (desc.media_type if desc else OCI_MANIFEST)
    if media in INDEX_TYPES:
        raise InvalidImageError(f"{what} is an index where a manifest was expected")
    if media not in MANIFEST_TYPES:
        raise UnsupportedFeatureError(f"{what} has media type {media!r}; imgbridge reads OCI "
                                      "image manifests and Docker v2 schema 2")
    config_desc = Descriptor.parse(raw_manifest.get("config"), f"{what} config")
    layer_list = raw_manifest.get("layers")
    if not isinstance(layer_list, list) or len(layer_list) > MAX_LAYERS:
        raise InvalidImageError(f"{what}: layers must be a list of at most {MAX_LAYERS}")
    layer_descs = [Descriptor.parse(d, f"{what} layer {i}") for i, d in enumerate(layer_list)]
    cfg_json, cfg_bytes = read_json(store.open(config_desc.digest, "config"), "config",
                                    config_desc)
    config = ImageConfig.from_oci_json(cfg_json)
    if len(config.diff_ids) != len(layer_descs):
        raise InvalidImageError(f"{what} lists {len(layer_descs)} layers but config "
                                f"{config_desc.digest} has {len(config.diff_ids)} diff_ids")
    blobs = []
    for i, (ld, diff) in enumerate(zip(layer_descs, config.diff_ids, strict=True)):
        check_digest(diff, f"config {config_desc.digest} diff_id {i}")
        blobs.append(LayerBlob(store, ld, diff,
                               lambda d=ld: store.open(d.digest, "layer blob"),  # type: ignore[misc]
                               f"layer {i}"))
    annotations = raw_manifest.get("annotations") or {}
    image = StoredImage(layers=[b.to_layer() for b in blobs], config=config,
                        annotations=dict(annotations) if isinstance(annotations, dict) else {},
                        tags=tags, manifest_media_type=media)
    image.blobs = blobs
    image.format_name = format_name
    image.config_digest = config_desc.digest
    image.raw_config = cfg_bytes
    image.raw_manifest = manifest_bytes
    if manifest_bytes is not None:
        h = hashlib.sha256(manifest_bytes)
        image.manifest_digest = desc.digest if desc else f"sha256:{h.hexdigest()}"
    return image


def _expand(store: BlobStore, descs: list[Descriptor], depth: int,
            seen: set[str]) -> Iterator[Descriptor]:
    """Image manifest descriptors under ``descs``, nested indexes opened (bounded depth)."""
    for desc in descs:
        if desc.media_type in INDEX_TYPES:
            if depth >= MAX_INDEX_DEPTH or desc.digest in seen:
                raise InvalidImageError(f"index {desc.digest} nests too deep or loops")
            data, _ = read_json(store.open(desc.digest, "index"), "index", desc)
            yield from _expand(store, parse_index(data, f"index {desc.digest}"), depth + 1,
                               seen | {desc.digest})
        elif desc.media_type in MANIFEST_TYPES or desc.media_type == "":
            yield desc
        # Other media types (attestations, signatures, artifacts) are not images: skip them.


def parse_index(data: Any, what: str) -> list[Descriptor]:
    if not isinstance(data, dict) or not isinstance(data.get("manifests"), list):
        raise InvalidImageError(f"{what}: an index must be an object with a manifests list")
    if len(data["manifests"]) > 4096:
        raise InvalidImageError(f"{what}: {len(data['manifests'])} manifests is not plausible")
    return [Descriptor.parse(d, f"{what} manifest {i}") for i, d in enumerate(data["manifests"])]


def open_image_or_index(store: BlobStore, top: list[Descriptor], format_name: str,
                        options: dict[str, str], tags_of: Callable[[Descriptor], list[str]],
                        ) -> StoredImage | StoredIndex:
    """Resolve the top-level descriptors of a layout into one image or an index of them.

    ``options["ref"]`` keeps only descriptors whose ref name (or full image name) matches;
    ``options["platform"]`` selects one platform and returns that image.
    """
    ref = options.get("ref")
    if ref:
        chosen = [d for d in top if ref in (d.annotations.get(REF_NAME),
                                            d.annotations.get("io.containerd.image.name"))
                  or ref in tags_of(d)]
        if not chosen:
            names = sorted({n for d in top for n in [d.annotations.get(REF_NAME)] if n})
            raise InvalidInputError(f"no image named {ref!r} in {store.name}; "
                                    f"names: {', '.join(names) or 'none'}")
        top = chosen
    manifests = list(_expand(store, top, 0, set()))
    if not manifests:
        raise InvalidImageError(f"{store.name}: the index lists no image manifest")

    def loader(desc: Descriptor) -> StoredImage:
        data, raw = read_json(store.open(desc.digest, "manifest"), "manifest", desc)
        return load_manifest(store, desc, data, raw, format_name, tags_of(desc))

    entries: list[tuple[Platform, Any]] = []
    for desc in manifests:
        if desc.platform is not None and desc.platform.os:
            entries.append((desc.platform, lambda d=desc: loader(d)))
        else:
            image = loader(desc)  # no platform in the index: the config says it
            entries.append((image.platform, image))
    platform = options.get("platform")
    if len(entries) == 1 and not platform:
        only = entries[0][1]
        image = only if isinstance(only, StoredImage) else only()
        image.store = store
        return image
    if not platform and not ref:
        keys = [str(p.normalized()) for p, _ in entries]
        if len(set(keys)) != len(keys):
            names = sorted({n for d in top for n in [d.annotations.get(REF_NAME)] if n})
            if len(names) > 1:
                raise InvalidInputError(
                    f"{store.name} holds several images ({', '.join(names)})",
                    hint="name one, e.g. oci:DIR:REF (library: options={'ref': ...})")
    index = StoredIndex(manifests=entries)
    index.format_name = format_name
    index.digests = [d.digest for d in manifests]
    index.store = store
    if platform:
        return index.select(platform)  # type: ignore[return-value]
    return index
