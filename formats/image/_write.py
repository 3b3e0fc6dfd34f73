"""Writing container images: the image-to-write model, layer codecs, a layer tar writer, and
the three serialisations (OCI layout folder, OCI archive, Docker archive).

A ``WritableImage`` is what the writers consume: a config, manifest annotations, tags, and
``OutLayer`` objects that produce their blob on demand (``ready()``). The transforms that build
one (copy as stored, recompress, flatten, retag) live in ``imgbridge.converters.tree_to_tree``;
this module only knows how to make and store bytes.

Every layer is made ready before the first byte of the output is written, because the small
metadata files (``oci-layout``/``index.json``, ``manifest.json``) go first in an archive (a
reader that sniffs only the first headers, ours included, recognises the format from them)
and they name every blob's digest. A layer that is copied as stored costs nothing to make
ready; a recompressed or flattened one is streamed to a temporary file once. Memory stays
bounded: blobs are streamed in 1 MiB chunks, never held.

Reproducibility: the same image and options give byte-identical output. Archive members have
mtime 0, owner 0:0 and fixed modes; gzip streams have mtime 0 and no file name; JSON is
written compactly in a fixed key order; layer tars list entries in the order given (flatten
sorts them) with only the metadata the entries carry.

References: opencontainers/image-spec ``image-layout.md``, ``manifest.md``,
``image-index.md``, ``config.md``, ``layer.md``, ``media-types.md``,
``annotations.md`` (``org.opencontainers.image.ref.name``); moby ``image/spec/v1.2.md``
(``manifest.json`` of ``docker save``); POSIX.1-2017 ``pax``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import IO, Any, BinaryIO

from imgbridge.errors import InvalidImageError, InvalidInputError
from imgbridge.model.image import ImageConfig
from imgbridge.model.tree import Entry, EntryType, encode_whiteout
from imgbridge.progress import ProgressFn

from ..fs.tar import PAX_XATTR_PREFIX
from ._blobs import OCI_CONFIG, OCI_INDEX, OCI_MANIFEST, REF_NAME, _SpoolSource

__all__ = [
    "IMAGE_CREATE_OPTIONS",
    "COMPRESSIONS",
    "OutLayer",
    "ReadyBlob",
    "Tag",
    "WritableImage",
    "build_layer",
    "compress_stream",
    "layer_media_type",
    "parse_tag",
    "write_docker_archive",
    "write_layer_tar",
    "write_oci_archive",
    "write_oci_layout",
]

#: The ``-o`` options every image writer takes (docker-archive words ``compression`` its way).
IMAGE_CREATE_OPTIONS = {
    "compression": "re-encode every layer: none, gzip (ISA-L, mtime 0) or zstd "
                   "(default: layers kept as stored)",
    "level": "compression level: gzip 0-3 (ISA-L's scale, default 2), zstd 1-19 (default 3)",
}

COMPRESSIONS = ("none", "gzip", "zstd")
#: ISA-L's gzip levels (0 fastest .. 3 smallest); 2 is its default, about zlib's 6 in size.
GZIP_LEVELS = range(0, 4)
ZSTD_LEVELS = range(1, 20)
CONTAINERD_NAME = "io.containerd.image.name"
_CHUNK = 1 << 20

_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
_LAYER_TYPES = {"none": _OCI_LAYER, "gzip": _OCI_LAYER + "+gzip", "zstd": _OCI_LAYER + "+zstd"}


def layer_media_type(compression: str) -> str:
    """The OCI layer media type for a tar stored with ``compression``."""
    return _LAYER_TYPES[compression]


# ---------------------------------------------------------------------------------------------
# tags


# Docker reference grammar (distribution/reference): an optional registry host[:port], then
# lowercase path components joined by / ; the tag is a word of at most 128 characters.
_NAME_RE = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9-]+)*(?::[0-9]+)?/)?"
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*")
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}")
# image-layout.md: ref ::= component ("/" component)*, separators [-._:@+] and "--".
_OCI_REF_RE = re.compile(r"[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*"
                         r"(?:/[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*)*")


@dataclass(frozen=True)
class Tag:
    """A name an image is written under. ``name`` is a Docker repository (``ex/img``) or None
    for a bare OCI reference (``latest``), which only an OCI layout can hold."""

    name: str | None
    ref: str

    def docker(self) -> str | None:
        return f"{self.name}:{self.ref}" if self.name else None


def parse_tag(text: str) -> Tag:
    """``NAME:TAG`` (a Docker reference) or a bare OCI ref name; InvalidInputError otherwise."""
    name, sep, ref = text.rpartition(":")
    if sep and "/" not in ref and _NAME_RE.fullmatch(name) and _TAG_RE.fullmatch(ref):
        return Tag(name, ref)
    if _OCI_REF_RE.fullmatch(text):
        return Tag(None, text)
    raise InvalidInputError(f"tag {text!r} is neither NAME:TAG nor an OCI reference name",
                            hint="for example --tag example.org/app:1.0")


# ---------------------------------------------------------------------------------------------
# layers


@dataclass
class ReadyBlob:
    """A layer blob whose digest and size are known; ``open()`` streams its stored bytes."""

    digest: str
    size: int
    diff_id: str
    compression: str
    open: Callable[[], BinaryIO]
    cleanup: Callable[[], None] = lambda: None


class OutLayer:
    """One layer of an image being written. ``make`` produces the blob (maybe spooling it to a
    temporary file) the first time ``ready()`` is called.

    ``uncompressed`` opens the layer's tar, for transforms that recompress it; ``entries``
    gives its entries, for a layer built from a tree rather than copied from a blob.
    ``ready()`` is called once per conversion; ``release()`` drops its temporary file.
    """

    def __init__(self, make: Callable[[], ReadyBlob], *, media_type: str | None = None,
                 annotations: dict[str, str] | None = None,
                 uncompressed: Callable[[], BinaryIO] | None = None,
                 entries: Callable[[], Iterable[Entry]] | None = None,
                 plain: Callable[[], ReadyBlob] | None = None,
                 stored_as_is: bool = False) -> None:
        self._make = make
        self._ready: ReadyBlob | None = None
        self.media_type = media_type  # None: derived from the compression
        self.annotations = dict(annotations or {})
        self.uncompressed = uncompressed
        self.entries = entries
        #: The uncompressed tar as a ready blob without a copy (the reader already holds it).
        self.plain = plain
        #: True when the blob is the source's own, byte for byte (a manifest can be reused).
        self.stored_as_is = stored_as_is

    def ready(self) -> ReadyBlob:
        if self._ready is None:
            self._ready = self._make()
        return self._ready

    def oci_media_type(self) -> str:
        blob = self.ready()
        if self.media_type and self.media_type.startswith("application/vnd.oci.image.layer."):
            return self.media_type  # kept as the source said (e.g. non-distributable)
        return layer_media_type(blob.compression)

    def release(self) -> None:
        if self._ready is not None:
            self._ready.cleanup()


@dataclass
class WritableImage:
    """An image ready to be serialised by one of the writers below."""

    layers: list[OutLayer]
    config: ImageConfig
    #: The config as stored, written unchanged while the diff_ids still match; None once a
    #: transform changed the config (flatten).
    raw_config: bytes | None = None
    annotations: dict[str, str] = field(default_factory=dict)
    tags: list[Tag] = field(default_factory=list)
    #: The OCI manifest as stored, reused (same digest) only while every layer is the source's
    #: own blob and the config is unchanged.
    raw_manifest: bytes | None = None

    def config_bytes(self, diff_ids: Sequence[str]) -> bytes:
        if self.raw_config is not None and list(diff_ids) == list(self.config.diff_ids):
            return self.raw_config
        config = replace(self.config, diff_ids=list(diff_ids))
        return dump_json(config.to_oci_json())

    def release(self) -> None:
        for layer in self.layers:
            layer.release()


def dump_json(value: Any) -> bytes:
    """Compact JSON in the key order given (deterministic: every dict is built in a fixed
    order or copied from the input's)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class _HashingWriter:
    """A write-only file that hashes and counts what passes through to ``sink`` (which may be
    None: hash and count only). It has no ``name``, so gzip records no file name."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self.hash = hashlib.sha256()
        self.count = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.hash.update(view)
        self.count += len(view)
        if self.sink is not None:
            self.sink.write(view)
        return len(view)

    def tell(self) -> int:
        return self.count

    def flush(self) -> None:
        if self.sink is not None:
            self.sink.flush()

    def writable(self) -> bool:
        return True

    def digest(self) -> str:
        return f"sha256:{self.hash.hexdigest()}"


class _Compressor:
    """Streams bytes into ``sink`` compressed as asked: ISA-L gzip (mtime 0), zstd, or none."""

    def __init__(self, kind: str, level: int | None, sink: _HashingWriter) -> None:
        self.kind = kind
        self.stream: Any
        if kind == "gzip":
            from isal.igzip import IGzipFile

            self.stream = IGzipFile(  # type: ignore[no-untyped-call,unused-ignore]
                fileobj=sink, mode="wb", mtime=0, compresslevel=2 if level is None else level)
        elif kind == "zstd":
            import zstandard

            # threads=0: one thread, so the frame layout never depends on the machine.
            self.stream = zstandard.ZstdCompressor(
                level=3 if level is None else level, threads=0).stream_writer(
                sink, closefd=False)  # type: ignore[arg-type]
        else:
            self.stream = sink

    def write(self, data: Any) -> int:
        self.stream.write(data)
        return len(memoryview(data))

    def tell(self) -> int:
        raise OSError("not seekable")

    def flush(self) -> None:
        """No-op: a mid-stream flush would add sync blocks that change the bytes."""

    def finish(self) -> None:
        if self.kind != "none":
            self.stream.close()


def check_level(compression: str, level: int | None) -> None:
    if level is None:
        return
    allowed = {"gzip": GZIP_LEVELS, "zstd": ZSTD_LEVELS}.get(compression)
    if allowed is None:
        raise InvalidInputError(f"level= needs compression=gzip or zstd, not {compression}")
    if level not in allowed:
        scale = " (ISA-L's scale)" if compression == "gzip" else ""
        raise InvalidInputError(f"{compression} level {level} is out of range: "
                                f"{allowed.start}..{allowed.stop - 1}{scale}")


def _spool() -> IO[bytes]:
    return tempfile.TemporaryFile(prefix="imgbridge-out-")


def _spooled_blob(spool: IO[bytes], outer: _HashingWriter, diff_id: str,
                  compression: str) -> ReadyBlob:
    spool.flush()
    # pread-based readers: each open() has its own position over the one temporary file.
    source = _SpoolSource(spool, outer.count, f"layer {outer.digest()}")
    return ReadyBlob(outer.digest(), outer.count, diff_id, compression,
                     source.as_fileobj, source.close)


def compress_stream(source: Callable[[], BinaryIO], compression: str, level: int | None,
                    diff_id: str | None) -> ReadyBlob:
    """Compress an uncompressed layer tar into a temporary file, hashing both sides."""
    spool = _spool()
    try:
        outer = _HashingWriter(spool)
        comp = _Compressor(compression, level, outer)
        inner = hashlib.sha256()
        with source() as src:
            while True:
                chunk = src.read(_CHUNK)
                if not chunk:
                    break
                inner.update(chunk)
                comp.write(chunk)
        comp.finish()
        got = f"sha256:{inner.hexdigest()}"
        if diff_id is not None and got != diff_id:
            raise InvalidImageError(f"layer tar hashes to {got}, its diff_id is {diff_id}")
        return _spooled_blob(spool, outer, got, compression)
    except BaseException:
        spool.close()
        raise


def build_layer(entries: Iterable[Entry], compression: str, level: int | None) -> ReadyBlob:
    """Write ``entries`` as a layer tar, compressed, into a temporary file (one pass)."""
    spool = _spool()
    try:
        outer = _HashingWriter(spool)
        comp = _Compressor(compression, level, outer)
        inner = _HashingWriter(comp)
        write_layer_tar(entries, inner)
        comp.finish()
        return _spooled_blob(spool, outer, inner.digest(), compression)
    except BaseException:
        spool.close()
        raise


# ---------------------------------------------------------------------------------------------
# the layer tar writer


_TAR_TYPES = {
    EntryType.FILE: tarfile.REGTYPE,
    EntryType.DIR: tarfile.DIRTYPE,
    EntryType.SYMLINK: tarfile.SYMTYPE,
    EntryType.HARDLINK: tarfile.LNKTYPE,
    EntryType.CHAR: tarfile.CHRTYPE,
    EntryType.BLOCK: tarfile.BLKTYPE,
    EntryType.FIFO: tarfile.FIFOTYPE,
}


def _pax_seconds(ns: int) -> str:
    """Nanoseconds as the decimal seconds a PAX time record holds (``1.5``, ``-0.25``)."""
    text = format(Decimal(ns).scaleb(-9), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _tarinfo(entry: Entry) -> tarfile.TarInfo:
    kind = _TAR_TYPES[entry.type]
    info = tarfile.TarInfo(entry.path)
    info.type = kind
    info.mode = entry.mode
    info.uid, info.gid = entry.uid, entry.gid
    info.uname, info.gname = entry.uname or "", entry.gname or ""
    pax: dict[str, str] = {}
    seconds, rest = divmod(entry.mtime, 1_000_000_000)
    info.mtime = seconds
    if rest or seconds < 0:
        pax["mtime"] = _pax_seconds(entry.mtime)  # sub-second or pre-1970 times: PAX only
    # atime/ctime are left out, as Docker, BuildKit and umoci do: they change on every read
    # and would make layers differ between otherwise identical builds.
    for name, value in entry.xattrs:
        # tarfile writes a value that is not UTF-8 with hdrcharset=BINARY (surrogateescape
        # restores the bytes); the reader decodes it back the same way.
        pax[PAX_XATTR_PREFIX + name] = value.decode("utf-8", "surrogateescape")
    info.pax_headers = pax
    if entry.type is EntryType.FILE:
        info.size = entry.size
    elif entry.type in (EntryType.SYMLINK, EntryType.HARDLINK):
        info.linkname = entry.link_target
    elif entry.type in (EntryType.CHAR, EntryType.BLOCK):
        info.devmajor, info.devminor = entry.devmajor, entry.devminor
    return info


def write_layer_tar(entries: Iterable[Entry], out: Any) -> None:
    """Write ``entries``, in the order given, as a PAX tar to ``out`` (a file-like object).

    WHITEOUT / OPAQUE entries are written as ``.wh.`` files. The root entry is left out
    (layers made by Docker, BuildKit and umoci have none; runtimes own the root's metadata).
    Sockets are left out as GNU tar does: a tar cannot hold one, and a socket file is
    meaningless outside the process that bound it.
    """
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for raw in entries:
            if raw.path == "" or raw.type is EntryType.SOCKET:
                continue
            entry = encode_whiteout(raw)
            info = _tarinfo(entry)
            if entry.type is EntryType.FILE:
                with entry.open() as content:
                    tar.addfile(info, _Exact(content, entry.size, entry.path))
            else:
                tar.addfile(info)


class _Exact:
    """Hands tarfile exactly ``size`` bytes, failing clearly if the content is shorter."""

    def __init__(self, inner: BinaryIO, size: int, path: str) -> None:
        self.inner, self.left, self.path = inner, size, path

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.inner.read(n) if n else b""
        if len(data) < n:
            raise InvalidImageError(f"{self.path}: content is shorter than its size")
        self.left -= len(data)
        return data


# ---------------------------------------------------------------------------------------------
# manifests


def _prepare(image: WritableImage) -> tuple[list[ReadyBlob], bytes, str]:
    """Make every layer ready; the config bytes and digest."""
    blobs = [layer.ready() for layer in image.layers]
    config = image.config_bytes([b.diff_id for b in blobs])
    return blobs, config, f"sha256:{hashlib.sha256(config).hexdigest()}"


def _oci_manifest(image: WritableImage, blobs: list[ReadyBlob], config: bytes,
                  config_digest: str) -> bytes:
    if (image.raw_manifest is not None and config == image.raw_config
            and all(layer.stored_as_is for layer in image.layers)):
        return image.raw_manifest
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [],
    }
    for layer, blob in zip(image.layers, blobs, strict=True):
        desc: dict[str, Any] = {"mediaType": layer.oci_media_type(), "digest": blob.digest,
                                "size": blob.size}
        if layer.annotations:
            desc["annotations"] = dict(sorted(layer.annotations.items()))
        manifest["layers"].append(desc)
    if image.annotations:
        manifest["annotations"] = dict(sorted(image.annotations.items()))
    return dump_json(manifest)


def _oci_index(image: WritableImage, manifest: bytes) -> bytes:
    digest = f"sha256:{hashlib.sha256(manifest).hexdigest()}"
    base = {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(manifest)}
    entries: list[dict[str, Any]] = []
    seen: set[str] = set()
    for tag in image.tags:
        if tag.ref in seen:
            raise InvalidInputError(f"two tags share the OCI reference name {tag.ref!r}",
                                    hint="an OCI layout names images by the part after ':'")
        seen.add(tag.ref)
        annotations = {REF_NAME: tag.ref}
        if tag.name:
            # containerd and Docker 25+ keep the full name here; the ref name alone is what
            # skopeo's oci:DIR:REF and umoci's DIR:REF look up.
            annotations = {CONTAINERD_NAME: f"{tag.name}:{tag.ref}", REF_NAME: tag.ref}
        entries.append({**base, "annotations": annotations})
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries or [base]}
    return dump_json(index)


_LAYOUT = dump_json({"imageLayoutVersion": "1.0.0"})


def _blob_list(image: WritableImage, blobs: list[ReadyBlob], config: bytes, config_digest: str,
               manifest: bytes | None) -> list[tuple[str, int, Callable[[], BinaryIO]]]:
    """(digest, size, opener) of every blob, each digest once, in a fixed order."""
    import io

    out: list[tuple[str, int, Callable[[], BinaryIO]]] = []
    seen: set[str] = set()

    def add(digest: str, size: int, opener: Callable[[], BinaryIO]) -> None:
        if digest not in seen:
            seen.add(digest)
            out.append((digest, size, opener))

    if manifest is not None:
        add(f"sha256:{hashlib.sha256(manifest).hexdigest()}", len(manifest),
            lambda: io.BytesIO(manifest))
    add(config_digest, len(config), lambda: io.BytesIO(config))
    for blob in blobs:
        add(blob.digest, blob.size, blob.open)
    return out


def _copy(src: BinaryIO, dst: Any, size: int, what: str, done: list[int],
          total: int, progress: ProgressFn) -> None:
    left = size
    while left:
        chunk = src.read(min(_CHUNK, left))
        if not chunk:
            raise InvalidImageError(f"{what}: ended {left} bytes early")
        dst.write(chunk)
        left -= len(chunk)
        done[0] += len(chunk)
        progress(done[0], total)
    if src.read(1):
        raise InvalidImageError(f"{what}: longer than its recorded size {size}")


# ---------------------------------------------------------------------------------------------
# the three serialisations


def write_oci_layout(root: str, image: WritableImage, progress: ProgressFn) -> None:
    """An OCI image layout in the (empty, temporary) folder ``root``."""
    blobs, config, config_digest = _prepare(image)
    manifest = _oci_manifest(image, blobs, config, config_digest)
    items = _blob_list(image, blobs, config, config_digest, manifest)
    total, done = sum(size for _, size, _ in items), [0]
    os.makedirs(os.path.join(root, "blobs", "sha256"), exist_ok=True)
    for digest, size, opener in items:
        path = os.path.join(root, "blobs", "sha256", digest.partition(":")[2])
        with opener() as src, open(path, "wb") as dst:
            _copy(src, dst, size, f"blob {digest}", done, total, progress)
    with open(os.path.join(root, "oci-layout"), "wb") as f:
        f.write(_LAYOUT)
    with open(os.path.join(root, "index.json"), "wb") as f:
        f.write(_oci_index(image, manifest))


def _member(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.mtime = 0  # fixed, for byte-identical archives
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class _ArchiveWriter:
    def __init__(self, fileobj: BinaryIO, total: int, progress: ProgressFn) -> None:
        self.tar = tarfile.open(fileobj=fileobj, mode="w",  # noqa: SIM115 - closed in close()
                                format=tarfile.PAX_FORMAT)
        self.total, self.done, self.progress = total, [0], progress

    def dir(self, name: str) -> None:
        self.tar.addfile(_member(name, kind=tarfile.DIRTYPE))

    def data(self, name: str, data: bytes) -> None:
        import io

        self.tar.addfile(_member(name, len(data)), io.BytesIO(data))

    def stream(self, name: str, size: int, opener: Callable[[], BinaryIO], what: str) -> None:
        writer = self

        class _Counting:
            def __init__(self, inner: _Exact) -> None:
                self.inner = inner

            def read(self, n: int = -1) -> bytes:
                data = self.inner.read(n)
                writer.done[0] += len(data)
                writer.progress(writer.done[0], writer.total)
                return data

        with opener() as src:
            try:
                self.tar.addfile(_member(name, size), _Counting(_Exact(src, size, what)))
            except OSError as exc:  # tarfile's "unexpected end of data"
                raise InvalidImageError(f"{what}: {exc}") from None
            if src.read(1):
                raise InvalidImageError(f"{what}: longer than its recorded size {size}")

    def close(self) -> None:
        self.tar.close()


def write_oci_archive(fileobj: BinaryIO, image: WritableImage, progress: ProgressFn) -> None:
    """A tar of an OCI layout, metadata first so a reader sniffing the head recognises it."""
    blobs, config, config_digest = _prepare(image)
    manifest = _oci_manifest(image, blobs, config, config_digest)
    items = _blob_list(image, blobs, config, config_digest, manifest)
    archive = _ArchiveWriter(fileobj, sum(size for _, size, _ in items), progress)
    archive.data("oci-layout", _LAYOUT)
    archive.data("index.json", _oci_index(image, manifest))
    archive.dir("blobs")
    archive.dir("blobs/sha256")
    for digest, size, opener in items:
        archive.stream(f"blobs/sha256/{digest.partition(':')[2]}", size, opener,
                       f"blob {digest}")
    archive.close()


def write_docker_archive(fileobj: BinaryIO, image: WritableImage,
                         progress: ProgressFn) -> None:
    """A ``docker save`` archive as skopeo's docker-archive writer lays it out: the config as
    ``<hex>.json``, each layer as ``<hex>.tar`` (its digest's hex), and ``manifest.json``
    (``Config``, ``RepoTags``, ``Layers``), which ``docker load`` (since 1.10) and skopeo read.

    The legacy per-layer folders (``<id>/json``, ``VERSION``, ``layer.tar``) and the
    ``repositories`` file that pre-1.10 Docker needed are not written. ``manifest.json`` goes
    first (skopeo puts it last) so that a reader sniffing the archive's head recognises it.
    """
    blobs, config, config_digest = _prepare(image)
    config_name = f"{config_digest.partition(':')[2]}.json"
    layer_names = [f"{b.digest.partition(':')[2]}.tar" for b in blobs]
    tags = [t for t in (tag.docker() for tag in image.tags) if t]
    manifest = [{"Config": config_name, "RepoTags": tags or None, "Layers": layer_names}]
    sizes = {b.digest: b.size for b in blobs}
    archive = _ArchiveWriter(fileobj, len(config) + sum(sizes.values()), progress)
    archive.data("manifest.json", dump_json(manifest))
    archive.data(config_name, config)
    written: set[str] = set()
    for blob, name in zip(blobs, layer_names, strict=True):
        if blob.digest not in written:  # a layer repeated in the stack is stored once
            written.add(blob.digest)
            archive.stream(name, blob.size, blob.open, f"layer {blob.digest}")
    archive.close()
