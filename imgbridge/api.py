"""The library's entry points; the CLI is a thin layer over exactly these functions."""

from __future__ import annotations

import builtins
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import ImgBridgeError, InvalidInputError, MissingCompanionError
from .model.disk import MAX_IO, CheckReport, Disk, Extent, ExtentKind
from .model.image import ContainerImage, ImageIndex
from .options import parse_size
from .output import AtomicOutput, StreamOutput
from .progress import ProgressFn, no_progress
from .registry import FormatSpec, Kind, default_registry
from .resolver import CompanionResolver
from .source import FileSource
from .trees import OpenedTree, list_at, open_tree, resolve_in_tree, through_links, tree_path

if TYPE_CHECKING:
    from imgbridge.converters.tree_diff import Change
    from imgbridge.converters.tree_to_dir import ExtractReport

    from .model.tree import Entry

__all__ = [
    "CompareResult",
    "allocation_map",
    "check",
    "compare",
    "convert",
    "create",
    "diff",
    "extract",
    "list_files",
    "list_formats",
    "inspect",
    "inspect_chain",
    "open",
    "open_filesystem",
    "parse_options",
    "parse_size",
    "read_file",
]


def list_formats() -> list[FormatSpec]:
    """Every known format (built-in and plug-in), in registry order."""
    return default_registry().all()


def open(
    path: str | os.PathLike[str],
    format: str | None = None,
    *,
    options: Mapping[str, str] | None = None,
    allow_outside: bool = False,
) -> Any:
    """Open an image of any kind; for disks this returns a :class:`~imgbridge.model.disk.Disk`.

    ``format`` names the format (or an alias) and skips detection. Without it the file is
    probed; a file no magic recognises opens as raw with ``format_guessed`` set.
    ``allow_outside`` lets companion files (backing files, extents) lie outside the image's
    folder. Close the result (or use it in a ``with`` block).
    """
    return _open_at(os.fspath(path), format, options or {}, allow_outside=allow_outside, chain=())


def _open_at(
    path: str, format: str | None, options: Mapping[str, str], *,
    allow_outside: bool, chain: tuple[str, ...],
) -> Any:
    registry = default_registry()
    path, format, options = _split_transport(path, format, options)
    if format:
        spec, guessed = registry.get(format), False
        if not os.path.exists(path):
            raise InvalidInputError(f"{path}: no such file")
    else:
        detection = registry.detect(path)
        spec, guessed = detection.spec, detection.guessed
    resolver = CompanionResolver(path, allow_outside=allow_outside, chain=chain)
    source = None if os.path.isdir(path) else FileSource(path)
    try:
        obj = spec.open(source, resolver, options)
    except BaseException:
        if source is not None:
            source.close()
        raise
    if isinstance(obj, Disk):
        obj.format_guessed = guessed
    return obj


#: skopeo's transport names that imgbridge reads, as ``TRANSPORT:PATH[:REF]`` prefixes.
_TRANSPORTS = ("oci-archive", "docker-archive", "oci", "dir")


def _split_transport(path: str, format: str | None, options: Mapping[str, str],
                     ) -> tuple[str, str | None, Mapping[str, str]]:
    """Accept skopeo-style references: ``oci:DIR[:REF]``, ``oci-archive:FILE[:REF]``,
    ``docker-archive:FILE[:REF]``, ``dir:DIR``. A path that exists as written is never split
    (a file may be named ``oci:x``). The path is the longest prefix of the rest that exists,
    so a REF may itself hold colons (``busybox:1.36``)."""
    if os.path.exists(path):
        return path, format, options
    transport, sep, rest = path.partition(":")
    if not sep or transport not in _TRANSPORTS or not rest:
        return path, format, options
    target, ref = rest, ""
    if not os.path.exists(rest):
        for i in range(len(rest) - 1, 0, -1):
            if rest[i] == ":" and os.path.exists(rest[:i]):
                target, ref = rest[:i], rest[i + 1:]
                break
    if format and default_registry().get(format).name != transport:
        raise InvalidInputError(f"{path}: names the {transport} format, but -f says {format}")
    merged = dict(options)
    if ref:
        if transport == "dir":
            raise InvalidInputError(f"{path}: a dir: image takes no reference")
        merged["ref"] = ref
    return target, transport, merged


def _open_disk_at(
    path: str, format: str | None, options: Mapping[str, str], *,
    allow_outside: bool, chain: tuple[str, ...], guessed_ok: bool,
) -> Disk:
    obj = _open_at(path, format, options, allow_outside=allow_outside, chain=chain)
    if not isinstance(obj, Disk):
        _close(obj)
        raise InvalidInputError(f"{path}: not a disk image")
    if obj.format_guessed and not guessed_ok:
        obj.close()
        raise InvalidInputError(
            f"{path}: no format recognises this file; it would be read as raw",
            hint="pass -f raw (library: format='raw') if it really is a raw disk",
        )
    return obj


def open_disk(
    path: str | os.PathLike[str],
    format: str | None = None,
    *,
    options: Mapping[str, str] | None = None,
    allow_outside: bool = False,
    allow_guessed_raw: bool = True,
) -> Disk:
    """Like :func:`open`, but the result must be a disk image."""
    return _open_disk_at(
        os.fspath(path), format, options or {}, allow_outside=allow_outside, chain=(),
        guessed_ok=allow_guessed_raw,
    )


def _close(obj: Any) -> None:
    close = getattr(obj, "close", None)
    if callable(close):
        close()


def inspect(
    path: str | os.PathLike[str], format: str | None = None, *, allow_outside: bool = False,
    platform: str | None = None,
) -> dict[str, Any]:
    """Describe an image. For disks the keys are those of ``qemu-img info --output=json``.

    For container images the keys are ``skopeo inspect``'s (``Name``, ``Digest``,
    ``RepoTags``, ``Created``, ``Architecture``, ``Os``, ``Layers``, ``LayersData``, ``Env``,
    ...) plus ``Config``, ``History`` and verified per-layer facts (``LayerDetails``); every
    blob is read and checked. An image with several platforms is described as the list of
    them (``Manifests``) unless ``platform`` (``os/arch[/variant]``) picks one.
    """
    options = {"platform": platform} if platform else None
    obj = open(path, format, allow_outside=allow_outside, options=options)
    try:
        if isinstance(obj, Disk):
            disk_info = obj.info()
            disk_info.update(_partition_info(obj))
            return disk_info
        info = getattr(obj, "info", None)
        if callable(info):
            result: dict[str, Any] = info()
            return result
        raise InvalidInputError(f"{os.fspath(path)}: nothing to inspect")
    finally:
        _close(obj)


def _partition_info(disk: Disk) -> dict[str, Any]:
    """``partitions`` when the disk holds a partition table; a damaged table never fails
    inspect: it is reported as ``partition-table-error`` (and a damaged primary GPT read from
    its backup as ``partition-table-warnings``)."""
    import warnings

    from imgbridge.formats.volume.table import read_partitions

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            table = read_partitions(disk)
    except ImgBridgeError as exc:
        return {"partition-table-error": str(exc)}
    out: dict[str, Any] = {}
    from imgbridge.converters.disk_to_tree import (
        damaged_info,
        describe_filesystems,
        filesystem_info,
        probe_filesystem,
    )

    if table is not None:
        out["partitions"] = table.to_json()
        found = describe_filesystems(disk, table)
        for part in out["partitions"]["partitions"]:
            if part["number"] in found:
                part["filesystem"] = found[part["number"]]
    else:
        from imgbridge.formats.volume.table import DiskSource

        source = DiskSource(disk)
        spec = probe_filesystem(source)
        if spec is not None:
            out["filesystem"] = filesystem_info(spec, source)
        elif (damaged := damaged_info(source)) is not None:
            out["filesystem"] = damaged
    if caught:
        out["partition-table-warnings"] = [str(w.message) for w in caught]
    return out


def inspect_chain(
    path: str | os.PathLike[str], format: str | None = None, *, allow_outside: bool = False
) -> list[dict[str, Any]]:
    """``inspect`` for a disk and every backing file below it, top first
    (``qemu-img info --backing-chain``)."""
    with open_disk(path, format, allow_outside=allow_outside) as disk:
        return [layer.info() for layer in disk.chain()]


def parse_options(items: list[str] | tuple[str, ...] | str | None) -> dict[str, str]:
    """Parse qemu-img style ``-o key=value,key=value`` (several ``-o`` merge, last wins)."""
    if items is None:
        return {}
    if isinstance(items, str):
        items = [items]
    options: dict[str, str] = {}
    for item in items:
        for pair in item.split(","):
            if not pair.strip():
                continue
            key, sep, value = pair.partition("=")
            if not sep or not key.strip():
                raise InvalidInputError(f"option {pair!r} is not of the form key=value")
            options[key.strip()] = value.strip()
    return options


#: qemu's size suffixes: binary multiples; "b" (or none) means bytes.
def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    format: str | None = None,
    output_format: str | None = None,
    options: Mapping[str, str] | None = None,
    progress: ProgressFn | None = None,
    allow_outside: bool = False,
    sync: bool = True,
    source_options: Mapping[str, str] | None = None,
    compress: bool = False,
    backing: str | os.PathLike[str] | None = None,
    backing_format: str | None = None,
    tags: Sequence[str] | None = None,
    flatten: bool = False,
    partition: int | None = None,
) -> None:
    """Convert ``src`` into ``dst``, written atomically (a temporary file, renamed at the end).

    ``format`` names the source format; without it the source is probed and a file that only
    raw would accept is refused (pass ``format="raw"``). ``output_format`` defaults to the one
    ``dst``'s extension belongs to. ``options`` are the writer's ``-o`` options.
    ``source_options`` are the source format's open options, such as
    ``{"snapshot": "name"}`` to convert a qcow2 internal snapshot (qemu-img's ``-l``).
    ``progress(done, total)`` is called as the work advances. ``sync=False`` skips the
    final fsync (faster; qemu-img convert never flushes), at the cost of durability if the
    machine crashes right after.

    ``compress=True`` compresses the output's clusters (qemu-img convert ``-c``; the format
    must support compression). ``backing`` (qemu-img's ``-B``) writes only what differs from
    that base image and names it as the output's backing file: the name is stored as given
    and, when relative, is relative to ``dst``'s folder, as with qemu-img (``-o
    backing_file=`` means the same). ``backing_format`` names the base's format (default:
    detected). The base must lie in ``dst``'s folder unless ``allow_outside``.

    Container images convert between ``oci`` (a layout folder), ``oci-archive`` and
    ``docker-archive``: blobs are copied unchanged (digests checked) unless ``options`` ask
    for ``compression=none|gzip|zstd`` (and ``level=``); ``tags`` (``NAME:TAG``) replace the
    names the image is written under; ``flatten`` squashes the layers into one.

    A filesystem as the output (``ext4``, ``vfat``, ``iso9660``) is built from a file tree:
    a container image's root filesystem (all layers flattened), a tar archive, a folder on
    the host, or the filesystem inside a disk image (``partition`` picks it, by default the
    root one). ``options`` are the filesystem writer's (``size``, ``label``, ...).
    """
    src_path, dst_path = os.fspath(src), os.fspath(dst)
    registry = default_registry()
    to_stdout = dst_path == "-"
    if to_stdout and not output_format:
        raise InvalidInputError("writing to standard output ('-') needs the format named with -O")
    target = registry.for_output(output_format, dst_path)
    if target.kind is Kind.FS:
        if compress or backing is not None or tags or flatten:
            raise InvalidInputError(f"-c, -B, --tag and --flatten do not apply to "
                                    f"filesystem outputs ({target.name})")
        _convert_to_filesystem(src_path, dst_path, target, format=format,
                               source_options=source_options or {}, options=options or {},
                               progress=progress or no_progress, sync=sync,
                               partition=partition)
        return
    if partition is not None:
        raise InvalidInputError("--partition applies when the output is a filesystem")
    if to_stdout and not target.can("sequential-write"):
        streamable = ", ".join(s.name for s in registry.all() if s.can("sequential-write"))
        raise InvalidInputError(f"format {target.name} cannot be written to a pipe",
                                hint=f"formats that can: {streamable or 'none'}")
    write_options = dict(options or {})
    if compress:
        if not target.can("compression"):
            raise InvalidInputError(f"format {target.name} cannot compress (-c)",
                                    hint="choose a format that can, such as qcow2")
        write_options["compress"] = "on"
    backing_name, backing_format = _backing_choice(backing, backing_format, write_options)
    _refuse_same_file(src_path, dst_path)
    source = _open_at(src_path, format, source_options or {}, allow_outside=allow_outside,
                      chain=())
    base: Disk | None = None
    try:
        if getattr(source, "format_guessed", False):
            raise InvalidInputError(
                f"{src_path}: no format recognises this file; it would be read as raw",
                hint="pass -f raw (library: format='raw') if it really is a raw disk",
            )
        if (tags or flatten) and not (isinstance(source, ContainerImage | ImageIndex)
                                      and target.kind is Kind.IMAGE):
            raise InvalidInputError("--tag and --flatten apply to container images only")
        if isinstance(source, ContainerImage | ImageIndex):
            _convert_image(source, target, dst_path, write_options, progress or no_progress,
                           sync=sync, to_stdout=to_stdout, tags=tags, flatten=flatten,
                           compress=compress, backing=backing_name)
        elif isinstance(source, Disk):
            if target.kind is not Kind.DISK:
                from imgbridge.converters.planner import plan

                plan(registry.get(source.format_name), target)  # raises for unsupported pairs
            from imgbridge.converters.disk_to_disk import convert_disk

            if backing_name is not None:
                base = _open_base(target, dst_path, backing_name, backing_format, allow_outside)
                write_options["backing_file"] = backing_name
                write_options["backing_fmt"] = backing_format or base.format_name
            output = StreamOutput(sys.stdout.buffer) if to_stdout else \
                AtomicOutput(dst_path, sync=sync)
            with output as out:
                convert_disk(source, target, out, write_options, progress or no_progress,
                             base=base)
                out.commit()
        else:
            raise InvalidInputError(f"{src_path}: converting this kind of image is not supported")
    finally:
        if base is not None:
            base.close()
        _close(source)


def _convert_image(source: ContainerImage | ImageIndex, target: FormatSpec, dst: str,
                   options: Mapping[str, str], progress: ProgressFn, *, sync: bool,
                   to_stdout: bool, tags: Sequence[str] | None, flatten: bool,
                   compress: bool, backing: str | None) -> None:
    """The container image branch of ``convert``: tree_to_tree's transforms, then a writer."""
    from imgbridge.converters.planner import plan
    from imgbridge.converters.tree_to_tree import convert_image

    if target.kind is not Kind.IMAGE:
        plan(default_registry().get(getattr(source, "format_name", "oci")), target)  # raises
    if compress or backing is not None:
        raise InvalidInputError("-c and -B apply to disk images",
                                hint="for container images use -o compression=gzip|zstd")
    if isinstance(source, ImageIndex):
        raise InvalidInputError("the source holds several platforms; choose one",
                                hint="pass --platform os/arch (library: "
                                     "source_options={'platform': ...})")
    directory = bool(getattr(target.load(), "WRITES_DIRECTORY", False))
    if to_stdout and directory:
        raise InvalidInputError(f"format {target.name} is a folder; it cannot go to a pipe")
    output = StreamOutput(sys.stdout.buffer) if to_stdout else \
        AtomicOutput(dst, sync=sync, directory=directory)
    with output as out:
        convert_image(source, target, out, options, progress, tags=tags, squash=flatten)
        out.commit()


def _is_tar(path: str) -> bool:
    try:
        with builtins.open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return False
    return len(head) == 512 and head[257:262] == b"ustar"


def _convert_to_filesystem(src: str, dst: str, target: FormatSpec, *, format: str | None,
                           source_options: Mapping[str, str], options: Mapping[str, str],
                           progress: ProgressFn, sync: bool, partition: int | None) -> None:
    """Build a filesystem from the tree that ``src`` holds (see ``convert``)."""
    if dst == "-":
        raise InvalidInputError(f"a {target.name} filesystem cannot be written to a pipe")
    _refuse_same_file(src, dst)
    output = AtomicOutput(dst, sync=sync)
    tree: OpenedTree | None = None
    tar_source: FileSource | None = None
    try:
        entries: Iterable[Entry]
        plain = _plain_tree(src, format)
        if plain == "folder":
            from imgbridge.converters.dir_to_tree import read_host_tree

            # DST may lie inside SRC: neither its temporary file nor an older DST goes in.
            ours = {(st.st_dev, st.st_ino) for st in map(_stat_or_none, (output.path, dst))
                    if st is not None}
            entries = read_host_tree(src, skip=ours)
        elif plain == "tar":
            from imgbridge.formats.fs.tar import read_tar
            from imgbridge.model.tree import Layer, flatten

            tar_source = FileSource(src)
            source = tar_source
            entries = flatten([Layer(lambda: read_tar(source))])
        else:
            if format == "tar":
                raise InvalidInputError(f"{src}: not a tar archive")
            platform = source_options.get("platform")
            tree = open_tree(src, platform, format=format, partition=partition)
            entries = tree.entries()
        with output as out:
            target.create(out, entries, options, progress)
            out.commit()
    finally:
        output.abort()
        if tree is not None:
            tree.close()
        if tar_source is not None:
            tar_source.close()


def _stat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _refuse_same_file(src: str, dst: str) -> None:
    """Refuse an output that is the input (named as written or through a skopeo-style
    reference such as ``docker-archive:FILE``): it would be replaced while being read."""
    path = _split_transport(src, None, {})[0]
    if os.path.exists(dst) and os.path.exists(path) and os.path.samefile(path, dst):
        raise InvalidInputError(f"{dst}: the output would overwrite the input")


def _plain_tree(src: str, format: str | None) -> str | None:
    """``"folder"`` or ``"tar"`` when ``src`` is a tree as it is (a host folder that is no
    image layout, a tar archive that no image format claims), else None."""
    if format is None and os.path.isdir(src):
        try:
            default_registry().detect(src)
        except InvalidInputError:
            return "folder"
        return None
    if format in (None, "tar") and os.path.isfile(src) and _is_tar(src) \
            and default_registry().detect(src).guessed:
        return "tar"
    return None


def _backing_choice(backing: str | os.PathLike[str] | None, backing_format: str | None,
                    options: dict[str, str]) -> tuple[str | None, str | None]:
    """The backing file and format to use: given directly (-B/-b, -F) or as ``-o
    backing_file=,backing_fmt=`` (taken out of ``options``), but not two different ones."""
    chosen: list[str | None] = []
    for direct, key in ((backing, "backing_file"), (backing_format, "backing_fmt")):
        named = options.pop(key, None)
        value = None if direct is None else os.fspath(direct)
        if value is not None and named is not None and named != value:
            raise InvalidInputError(f"two values given for {key}: {value!r} and {named!r}")
        chosen.append(value if value is not None else named)
    if chosen[0] is None and chosen[1] is not None:
        raise InvalidInputError("a backing format was given without a backing file")
    return chosen[0], chosen[1]


def _open_base(target: FormatSpec, image: str, name: str, format: str | None,
               allow_outside: bool) -> Disk:
    """Open the backing file an image being written will name, through the companion rules:
    a relative name starts at the image's folder, and the file must lie inside that folder
    unless ``allow_outside``."""
    if not target.can("backing"):
        raise InvalidInputError(f"format {target.name} cannot have a backing file")
    resolver = CompanionResolver(image, allow_outside=allow_outside)
    try:
        return resolver.open_disk(name, "backing file", format)
    except MissingCompanionError as exc:
        if exc.hint is None and not os.path.isabs(name) and "not found" in exc.message:
            exc.hint = (f"a relative backing file name starts at the new image's folder "
                        f"({resolver.base_dir}), as with qemu-img")
        raise


def create(
    path: str | os.PathLike[str],
    size: int | str | None = None,
    *,
    format: str | None = None,
    backing: str | os.PathLike[str] | None = None,
    backing_format: str | None = None,
    options: Mapping[str, str] | None = None,
    allow_outside: bool = False,
    sync: bool = True,
    progress: ProgressFn | None = None,
) -> None:
    """Create an empty disk image (``qemu-img create``), written atomically.

    ``size`` takes qemu's suffixes (``"10G"``) and is rounded up to a multiple of 512 bytes,
    as qemu-img does; without it, the backing file's size is used. ``format`` defaults to the
    one ``path``'s extension belongs to. ``backing`` names a base image: the new image reads
    through to it; its name is stored as given and, when relative, is relative to the new
    image's folder (qemu-img's rule). ``backing_format`` is the base's format (default:
    detected). ``options`` are the format's ``-o`` options.
    """
    dst_path = os.fspath(path)
    target = default_registry().for_output(format, dst_path)
    write_options = dict(options or {})
    backing_name, backing_format = _backing_choice(backing, backing_format, write_options)
    if size is None and backing_name is None:
        raise InvalidInputError("give a size for the new image (or a backing file to take "
                                "it from)")
    wanted = None if size is None else parse_size(size)
    base: Disk | None = None
    try:
        if backing_name is not None:
            base = _open_base(target, dst_path, backing_name, backing_format, allow_outside)
            write_options["backing_file"] = backing_name
            write_options["backing_fmt"] = backing_format or base.format_name
        virtual = base.size if wanted is None and base is not None else wanted or 0
        virtual = -(-virtual // 512) * 512
        from imgbridge.converters.disk_to_disk import EmptyDisk

        with AtomicOutput(dst_path, sync=sync) as out:
            target.create(out, EmptyDisk(virtual, base), write_options,
                          progress or no_progress)
            out.commit()
    finally:
        if base is not None:
            base.close()


def plan(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
    format: str | None = None, output_format: str | None = None,
) -> str:
    """Describe, without doing it, how ``convert`` would turn ``src`` into ``dst``."""
    from imgbridge.converters.planner import plan as make_plan

    registry = default_registry()
    target = registry.for_output(output_format, os.fspath(dst))
    name, format, _ = _split_transport(os.fspath(src), format, {})
    plain = _plain_tree(name, format) if target.kind is Kind.FS else None
    if plain is not None:
        # A host folder or a tar is a tree already; describe it as the target's own kind.
        source = FormatSpec(name=plain, kind=Kind.FS, module="")
    else:
        source = registry.get(format) if format else registry.detect(name).spec
    return make_plan(source, target).describe()


@dataclass(frozen=True)
class CompareResult:
    """``first_difference`` is the guest offset of the first differing byte, or None."""

    identical: bool
    first_difference: int | None
    size_a: int
    size_b: int

    @property
    def size_mismatch(self) -> bool:
        return self.size_a != self.size_b


def compare(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    format_a: str | None = None,
    format_b: str | None = None,
    progress: ProgressFn | None = None,
    allow_outside: bool = False,
) -> CompareResult:
    """Compare the guest-visible content of two disks, in any formats.

    As with ``qemu-img compare``, disks of different sizes are equal when the larger one reads
    as zero beyond the smaller one's end. Ranges both disks report as zero are never read.
    """
    with open_disk(a, format_a, allow_outside=allow_outside) as disk_a, \
            open_disk(b, format_b, allow_outside=allow_outside) as disk_b:
        diff = first_difference(disk_a, disk_b, progress or no_progress)
        return CompareResult(diff is None, diff, disk_a.size, disk_b.size)


def first_difference(a: Disk, b: Disk, progress: ProgressFn = no_progress) -> int | None:
    """The offset of the first byte at which two disks differ, or None when they are equal."""
    total = max(a.size, b.size)
    common = min(a.size, b.size)
    for offset, length, a_zero, b_zero in _zip_extents(a, b, common):
        if not (a_zero and b_zero):
            diff = _first_diff_in(a, b, offset, length, a_zero, b_zero)
            if diff is not None:
                return diff
        progress(offset + length, total)
    longer = a if a.size > b.size else b
    for ext in longer.extents(common):
        if ext.kind is ExtentKind.DATA:
            diff = _first_nonzero(longer, ext.offset, ext.length)
            if diff is not None:
                return diff
        progress(ext.end, total)
    return None


def _zip_extents(a: Disk, b: Disk, end: int) -> Any:
    """Walk two allocation maps together: ``(offset, length, a_is_zero, b_is_zero)``."""
    ia, ib = a.extents(0, end), b.extents(0, end)
    ea, eb = next(ia, None), next(ib, None)
    pos = 0
    while ea is not None and eb is not None and pos < end:
        stop = min(ea.end, eb.end)
        yield pos, stop - pos, ea.kind is ExtentKind.ZERO, eb.kind is ExtentKind.ZERO
        pos = stop
        if ea.end <= pos:
            ea = next(ia, None)
        if eb.end <= pos:
            eb = next(ib, None)


def _first_diff_in(
    a: Disk, b: Disk, offset: int, length: int, a_zero: bool, b_zero: bool
) -> int | None:
    pos, end = offset, offset + length
    while pos < end:
        n = min(MAX_IO, end - pos)
        da = bytes(n) if a_zero else a.read_at(pos, n)
        db = bytes(n) if b_zero else b.read_at(pos, n)
        if da != db:
            return pos + _mismatch_index(da, db)
        pos += n
    return None


def _first_nonzero(disk: Disk, offset: int, length: int) -> int | None:
    pos, end = offset, offset + length
    while pos < end:
        n = min(MAX_IO, end - pos)
        data = disk.read_at(pos, n)
        stripped = data.lstrip(b"\0")
        if stripped:
            return pos + n - len(stripped)
        pos += n
    return None


def _mismatch_index(x: bytes, y: bytes) -> int:
    """Index of the first differing byte: bisect with slice comparisons (memcmp speed)."""
    lo, hi = 0, min(len(x), len(y))
    while hi - lo > 64:
        mid = (lo + hi) // 2
        if x[lo:mid] != y[lo:mid]:
            hi = mid
        else:
            lo = mid
    for i in range(lo, hi):
        if x[i] != y[i]:
            return i
    return hi


def check(
    path: str | os.PathLike[str], format: str | None = None, *, repair: str | None = None,
    allow_outside: bool = False,
) -> CheckReport:
    """Check an image's metadata; ``repair`` ("leaks" or "all") mends it in place, like qemu-img.

    Without ``repair`` the image is opened read-only and never modified.
    """
    if repair not in (None, "leaks", "all"):
        raise InvalidInputError(f"repair must be 'leaks' or 'all', not {repair!r}")
    with open_disk(path, format, allow_outside=allow_outside) as disk:
        return disk.check(repair)


def allocation_map(
    path: str | os.PathLike[str], format: str | None = None, *, allow_outside: bool = False
) -> list[Extent]:
    """The merged allocation map of a disk, the same runs ``qemu-img map`` prints."""
    with open_disk(path, format, allow_outside=allow_outside) as disk:
        return list(disk.extents())


def extent_to_json(ext: Extent) -> dict[str, Any]:
    """One ``qemu-img map --output=json`` item."""
    item: dict[str, Any] = {
        "start": ext.offset,
        "length": ext.length,
        "depth": ext.depth,
        "present": ext.present,
        "zero": ext.kind is ExtentKind.ZERO,
        "data": ext.kind is ExtentKind.DATA,
    }
    if ext.host_offset is not None:
        item["offset"] = ext.host_offset
    return item


# ---------------------------------------------------------------------------------------------
# Files inside a container image or a disk image: list_files, read_file, extract (the
# opening and the path lookups live in trees.py).


def open_filesystem(
    path: str | os.PathLike[str], format: str | None = None, *, partition: int | None = None,
    allow_outside: bool = False,
) -> Any:
    """Open the filesystem inside a disk image (any disk format): partition number
    ``partition`` (as ``inspect`` numbers them), by default the root partition (the
    Discoverable Partitions root type, else the largest Linux filesystem, else the largest
    filesystem), or the whole disk when it has no partition table. Returns a
    :class:`~imgbridge.converters.disk_to_tree.FoundFilesystem`: ``.fs`` is the
    :class:`~imgbridge.model.fs.Filesystem` (``info()``, ``entries()``), ``.partition`` the
    partition read, ``.describe()`` says which and why. Close it (or use ``with``).
    """
    from imgbridge.converters.disk_to_tree import find_filesystem

    disk = open_disk(path, format, allow_outside=allow_outside)
    try:
        found = find_filesystem(disk, partition)
    except BaseException:
        disk.close()
        raise
    found.disk = disk  # closed with it
    return found


def list_files(
    image: str | os.PathLike[str], path: str = "", *, layer: int | None = None,
    platform: str | None = None, recursive: bool = False, partition: int | None = None,
    notice: Callable[[str], None] | None = None,
) -> list[Entry]:
    """The entries at ``path`` inside a container image or a disk image, like ``ls -a``: a
    directory's children (every descendant with ``recursive``), or the entry itself when it
    is not a directory. Paths are relative to the image's root (``/etc`` and ``etc`` are the
    same); symlinks among its directories are followed inside the image, as ``ls`` does, and
    so is its last name when ``path`` ends in ``/``. On FAT, names match whatever their case.

    Without ``layer`` this is the image's root filesystem (all layers flattened); with
    ``layer=N`` (0 is the lowest) it is that layer's own entries, whiteouts included
    (``EntryType.WHITEOUT`` / ``OPAQUE``), and no link is followed. ``InvalidInputError``
    when nothing is at ``path``.

    For a disk image (any disk format) it is the filesystem of partition ``partition``, by
    default the root one (see :func:`open_filesystem`); ``notice`` is called with one line
    saying which partition was chosen when none was asked for (on failure, the error's hint
    says it instead).
    """
    want = tree_path(path)
    tree = open_tree(image, platform, partition=partition)
    try:
        entries = tree.entries(layer)
        if layer is None:
            by_path = {e.path: e for e in entries}
            want = tree.matching_name(by_path, want)
            want = through_links(by_path, want, follow_last=path.endswith("/"))
        listing = list_at(entries, want, layer, recursive, shown=tree_path(path))
    except ImgBridgeError as exc:
        tree.explain(exc)
        raise
    finally:
        tree.close()
    tree.tell(notice)
    return listing


def read_file(
    image: str | os.PathLike[str], path: str, *, layer: int | None = None,
    platform: str | None = None, partition: int | None = None,
    notice: Callable[[str], None] | None = None,
) -> Iterator[bytes]:
    """The content of the regular file at ``path`` inside a container image or a disk image
    (``partition`` and ``notice`` as for :func:`list_files`), as chunks of at most 1 MiB
    (memory stays bounded whatever the file's size).

    Symlinks and hardlinks are followed inside the image (never on the host) in the
    flattened tree; with ``layer=N`` only that layer's own files are read and a link is not
    followed. Checked before the first chunk: ``InvalidInputError`` when ``path`` is missing
    or not a regular file.
    """
    from .model.tree import EntryType

    want = tree_path(path)
    img = open_tree(image, platform, partition=partition)
    try:
        entries = img.entries(layer)
        by_path = {e.path: e for e in entries}
        want = img.matching_name(by_path, want)
        entry = resolve_in_tree(by_path, want) if layer is None else by_path.get(want)
        if entry is None:
            named = by_path.get(want)
            if named is not None and named.type is EntryType.SYMLINK:
                raise InvalidInputError(f"/{want}: no such file in the image (a symlink to "
                                        f"{named.link_target}, which is not there)")
            raise InvalidInputError(f"/{want}: no such file in the image"
                                    + (f" (layer {layer})" if layer is not None else ""))
        if entry.type is not EntryType.FILE:
            raise InvalidInputError(f"/{want}: is a {entry.type.value}, not a regular file")
        stream = entry.open()
    except BaseException as exc:
        if isinstance(exc, ImgBridgeError):
            img.explain(exc)
        img.close()
        raise
    img.tell(notice)

    def chunks() -> Iterator[bytes]:
        try:
            with stream:
                while chunk := stream.read(1 << 20):
                    yield chunk
        finally:
            img.close()  # the image's spooled layers live until the last chunk is read

    return chunks()


def _is_tar_out(out: str | os.PathLike[str]) -> bool:
    """``extract`` writes a tar stream (not a directory) to ``-`` and to names ending in
    ``.tar``."""
    name = os.fspath(out)
    return name == "-" or name.endswith(".tar")


def extract(
    image: str | os.PathLike[str], out: str | os.PathLike[str], *, layer: int | None = None,
    platform: str | None = None, sync: bool = True, partition: int | None = None,
    notice: Callable[[str], None] | None = None,
) -> ExtractReport:
    """Write a container image's root filesystem (or, with ``layer=N``, one layer's own
    entries), or the files of a disk image (``partition`` and ``notice`` as for
    :func:`list_files`), into the directory ``out``, which must not exist yet or be empty.

    Nothing is ever written outside ``out``: symlinks are created as they are but never
    followed, parents are opened without following symlinks, hardlinks may only point at
    files this extraction wrote. Modes, times (to the nanosecond), xattrs and hardlinks are
    kept; owners and device nodes only when running as root. The returned
    :class:`~imgbridge.converters.tree_to_dir.ExtractReport` lists what was refused or could
    not be reproduced; ``report.summary()`` says it in a line per kind.

    When ``out`` ends in ``.tar`` (or is ``-``, standard output) the tree is written as a
    PAX tar stream instead, whoever runs us: entries sorted (a layer's in its own order,
    whiteouts as ``.wh.`` files), owners, device nodes, xattrs and nanosecond mtimes in the
    headers, hardlinks as links; no root entry, and sockets (which a tar cannot hold) are
    listed in ``report.devices``. The file appears only when complete (written beside it,
    flushed unless ``sync=False``, and renamed); the same image gives byte-identical tars.
    """
    from imgbridge.converters.tree_to_dir import extract_tree, prepare_out

    to_tar = _is_tar_out(out)
    output: AtomicOutput | StreamOutput | None = None
    if to_tar and os.fspath(out) != "-":
        _refuse_same_file(os.fspath(image), os.fspath(out))
    if to_tar:
        # Checked before the image is opened, so a bad OUT costs nothing.
        output = (StreamOutput(sys.stdout.buffer) if os.fspath(out) == "-"
                  else AtomicOutput(os.fspath(out), sync=sync))
    try:
        img = open_tree(image, platform, partition=partition)
    except BaseException:
        if output is not None:
            output.abort()
        raise
    try:
        if layer is None:
            if not to_tar:
                prepare_out(os.fspath(out))  # refuse a non-empty OUT before flattening
            entries: Iterable[Entry] = img.entries()
        else:
            entries = img.iter_layer(layer)
        img.tell(notice)
        if output is None:
            return extract_tree(entries, out)
        from imgbridge.converters.tree_to_tar import write_tree_tar

        with output:
            with output.open_sequential() as stream:
                report: ExtractReport = write_tree_tar(entries, stream)
            output.commit()
        return report
    except ImgBridgeError as exc:
        img.explain(exc)
        raise
    finally:
        if output is not None:
            output.abort()
        img.close()


# ---------------------------------------------------------------------------------------------
# diff: what changed between two container images' root filesystems.


def diff(
    a: str | os.PathLike[str], b: str | os.PathLike[str], *,
    format_a: str | None = None, format_b: str | None = None, platform: str | None = None,
    partition_a: int | None = None, partition_b: int | None = None,
    notice: Callable[[str], None] | None = None,
) -> list[Change]:
    """What changed from ``a`` to ``b``, each a container image (its flattened root
    filesystem) or a disk image (the filesystem of ``partition_a``/``partition_b``, by
    default the root one): the trees compared path by path, as a list of
    :class:`~imgbridge.converters.tree_diff.Change` (``kind`` ``"A"``, ``"D"`` or ``"M"``),
    sorted by path. Empty when the trees are the same.

    Entries differ by type, permission bits, owner, link target, device numbers, xattrs or
    content (sha256, streamed; only files of equal size are read); times are not compared.
    ``platform`` picks ``os/arch[/variant]`` from multi-platform images, on both sides. A
    container image and a disk can be compared (what a conversion kept, for instance).
    """
    from imgbridge.converters.tree_diff import diff_trees

    tree_a = open_tree(a, platform, format=format_a, partition=partition_a)
    try:
        tree_b = open_tree(b, platform, format=format_b, partition=partition_b)
        try:
            try:
                changes = diff_trees(tree_a.entries(), tree_b.entries())
            except ImgBridgeError as exc:
                tree_a.explain(exc, "--partition-a N")
                tree_b.explain(exc, "--partition-b N")
                raise
        finally:
            tree_b.close()
    finally:
        tree_a.close()
    tree_a.tell(notice)
    tree_b.tell(notice)
    return changes
