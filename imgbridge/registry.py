"""The format registry: one spec per format, in one table (QEMU's BlockDriver table is the model).

A spec holds only what can be said without importing the format: name, aliases, extensions,
kind and capabilities. The code lives in the module the spec names and is imported on first
use, so ``imgbridge --help`` and ``imgbridge formats`` stay fast however many formats exist.

A format module provides:

- ``probe(p: ProbeInput) -> int``: 0..100, side-effect free. 100 for a magic number,
  at most 10 for a file-name extension alone, 1 for raw (which has no magic and is never
  chosen silently).
- ``open(source, resolver, options)``: the opened object (a ``Disk`` for kind ``disk``).
  ``source`` is a ``ByteSource`` for files, None for directory formats (``resolver.base_dir``
  is then the directory).
- ``create(out, obj, options, progress)``: write ``obj`` into ``out`` (an ``AtomicOutput``),
  when the spec has the ``create`` capability.
- optionally ``CREATE_OPTIONS``: ``{name: help}`` for ``-o``, and ``measure(obj, options)``.

Third-party formats register a ``FormatSpec`` under the entry-point group ``imgbridge.formats``.
"""

from __future__ import annotations

import enum
import importlib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from .errors import ImgBridgeError, InvalidImageError, InvalidInputError, UnsupportedFeatureError

__all__ = [
    "CAPABILITIES",
    "lazy_names",
    "Detection",
    "FormatSpec",
    "Kind",
    "ProbeInput",
    "Registry",
    "default_registry",
]

#: How many bytes of the start and the end of a file the probes see.
PROBE_BYTES = 64 * 1024
#: The score of a raw file whose partition table or filesystem was recognised.
RAW_WITH_LAYOUT = 50

CAPABILITIES = (
    "read",
    "create",
    "sparse",
    "backing",
    "compression",
    "multi-file",
    "sequential-write",
    "zero-init",
)


class Kind(str, enum.Enum):
    DISK = "disk"  #: a block device image (raw, qcow2, vmdk, ...)
    IMAGE = "image"  #: a container image (OCI layout, docker archive, ...)
    VOLUME = "volume"  #: a partition table
    FS = "fs"  #: a filesystem
    WRAP = "wrap"  #: a wrapper around another format (compression, archives, OVA)


@dataclass(frozen=True)
class ProbeInput:
    """What a probe may look at: the first and last bytes of a file, or a directory listing.

    ``tail`` is there because some formats are recognised by their end alone (a fixed VHD
    has only a footer). For a directory, ``head`` and ``tail`` are empty and ``listing``
    holds the names of its top-level entries.
    """

    head: bytes
    tail: bytes
    name_hint: str
    size: int
    listing: frozenset[str] | None = None

    @property
    def is_dir(self) -> bool:
        return self.listing is not None

    def extension_is(self, extensions: Iterable[str]) -> bool:
        name = self.name_hint.lower()
        return any(name.endswith("." + ext.lstrip(".")) for ext in extensions)


@dataclass(frozen=True)
class FormatSpec:
    """A format's static description and lazy entry points."""

    name: str
    kind: Kind
    module: str
    description: str = ""
    aliases: tuple[str, ...] = ()
    extensions: tuple[str, ...] = ()
    capabilities: frozenset[str] = field(default_factory=frozenset)

    def load(self) -> ModuleType:
        """Import the module that implements the format."""
        try:
            return importlib.import_module(self.module)
        except ImportError as exc:
            raise UnsupportedFeatureError(
                f"format {self.name}: its module {self.module} cannot be imported ({exc})"
            ) from exc

    def can(self, capability: str) -> bool:
        return capability in self.capabilities

    def probe(self, p: ProbeInput) -> int:
        score = int(self.load().probe(p))
        return max(0, min(100, score))

    def create_options(self) -> Mapping[str, str]:
        return getattr(self.load(), "CREATE_OPTIONS", {})

    def open_options(self) -> Mapping[str, str]:
        return getattr(self.load(), "OPEN_OPTIONS", {})

    def open(self, source: Any, resolver: Any, options: Mapping[str, str]) -> Any:
        """Open an image; construct's parse errors become InvalidImageError here, once."""
        if not self.can("read"):
            raise UnsupportedFeatureError(f"format {self.name} cannot be read")
        module = self.load()
        wants_folder = bool(getattr(module, "OPENS_DIRECTORY", False))
        if (source is None) != wants_folder:
            # Checked here once, rather than by every format's open.
            where = getattr(resolver, "image_path", None) or "the input"
            form, other = ("a folder", "a file") if wants_folder else ("a file", "a folder")
            article = "an" if self.name[0] in "aeiou" else "a"
            raise InvalidInputError(f"{where}: {article} {self.name} image is {form}, not {other}",
                                    hint=getattr(module, "OTHER_FORM_HINT", None))
        unknown = sorted(set(options) - set(self.open_options()))
        if unknown:
            raise InvalidInputError(f"format {self.name} has no {unknown[0]!r} to choose when "
                                    "opening (it is not supported for this format)")
        try:
            return self.load().open(source, resolver, options)
        except ImgBridgeError:
            raise
        except Exception as exc:
            if type(exc).__module__.split(".")[0] == "construct":
                raise InvalidImageError(
                    f"malformed header: {_first_line(exc)}",
                    format=self.name,
                    path=getattr(source, "name", None),
                ) from exc
            raise

    def create(self, out: Any, obj: Any, options: Mapping[str, str], progress: Any) -> None:
        if not self.can("create"):
            raise UnsupportedFeatureError(f"format {self.name} cannot be written")
        known = self.create_options()
        unknown = sorted(set(options) - set(known))
        if unknown:
            takes = ", ".join(sorted(known)) or "no options"
            raise InvalidInputError(
                f"format {self.name} does not take option {unknown[0]!r} (it takes: {takes})"
            )
        self.load().create(out, obj, options, progress)

    def to_json(self) -> dict[str, Any]:
        caps = {cap: cap in self.capabilities for cap in CAPABILITIES}
        caps["write"] = caps["create"]
        return {
            "name": self.name,
            "kind": self.kind.value,
            "description": self.description,
            "aliases": list(self.aliases),
            "extensions": list(self.extensions),
            "capabilities": caps,
        }


def lazy_names(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``names`` (``{name: ".module"}``, relative to
    ``package``) on first use, so that a format package can answer ``probe`` without loading
    its reader and writer: probing every format on a disk must stay cheap."""

    def lookup(name: str) -> Any:
        where = names.get(name)
        if where is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(where, package), name)

    return lookup


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


#: The built-in formats. Order breaks ties between equal probe scores.
BUILTIN: tuple[FormatSpec, ...] = (
    FormatSpec(
        name="raw",
        kind=Kind.DISK,
        module="imgbridge.formats.disk.raw",
        description="Raw disk image: the guest's bytes as they are, holes kept sparse",
        extensions=("raw", "img", "bin"),
        capabilities=frozenset({"read", "create", "sparse", "zero-init"}),
    ),
    FormatSpec(
        name="qcow2",
        kind=Kind.DISK,
        module="imgbridge.formats.disk.qcow2",
        description="QEMU copy-on-write v2/v3: backing files, snapshots, compression",
        extensions=("qcow2", "qcow"),
        capabilities=frozenset({"read", "create", "sparse", "backing", "compression",
                                "zero-init"}),
    ),
    FormatSpec(
        name="vmdk",
        kind=Kind.DISK,
        module="imgbridge.formats.disk.vmdk",
        description="VMware virtual disk: sparse, flat, split, stream-optimized, delta disks",
        extensions=("vmdk",),
        capabilities=frozenset({"read", "create", "sparse", "backing", "compression",
                                "multi-file", "sequential-write"}),
    ),
    FormatSpec(
        name="oci",
        kind=Kind.IMAGE,
        module="imgbridge.formats.image.oci_layout",
        description="OCI image layout directory (oci-layout, index.json, blobs/)",
        capabilities=frozenset({"read", "create", "multi-file", "compression"}),
    ),
    FormatSpec(
        name="oci-archive",
        kind=Kind.IMAGE,
        module="imgbridge.formats.image.oci_archive",
        description="Tar archive of an OCI image layout",
        capabilities=frozenset({"read", "create", "compression", "sequential-write"}),
    ),
    FormatSpec(
        name="docker-archive",
        kind=Kind.IMAGE,
        module="imgbridge.formats.image.docker_archive",
        description="docker save archive: manifest.json, legacy layer folders, Docker 25+",
        capabilities=frozenset({"read", "create", "compression", "sequential-write"}),
    ),
    FormatSpec(
        name="dir",
        kind=Kind.IMAGE,
        module="imgbridge.formats.image.skopeo_dir",
        description="skopeo dir: folder (manifest.json, version, one file per blob)",
        capabilities=frozenset({"read", "multi-file", "compression"}),
    ),
    # -- vmdk --
    FormatSpec(
        name="vhd",
        kind=Kind.DISK,
        module="imgbridge.formats.disk.vhd",
        description="Microsoft Virtual Hard Disk (qemu-img's vpc): fixed, dynamic, differencing",
        aliases=("vpc",),
        extensions=("vhd",),
        capabilities=frozenset({"read", "create", "sparse", "backing", "zero-init"}),
    ),
    # -- vhd --
    FormatSpec(
        name="vhdx",
        kind=Kind.DISK,
        module="imgbridge.formats.disk.vhdx",
        description="Hyper-V VHDX: fixed, dynamic and differencing (read), log replay in memory",
        extensions=("vhdx",),
        capabilities=frozenset({"read", "create", "sparse", "backing"}),
    ),
    # -- vhdx --
    FormatSpec(
        name="ext4",
        kind=Kind.FS,
        module="imgbridge.formats.fs.ext4",
        description="Linux ext2/ext3/ext4 filesystem: read any, write ext4 (journal, checksums)",
        aliases=("ext2", "ext3"),
        extensions=("ext4", "ext3", "ext2"),
        capabilities=frozenset({"read", "create"}),
    ),
    FormatSpec(
        name="vfat",
        kind=Kind.FS,
        module="imgbridge.formats.fs.fat",
        description="FAT12/16/32 filesystem with long names: read any, write FAT32 (EFI)",
        aliases=("fat", "fat12", "fat16", "fat32", "msdos"),
        extensions=("fat", "vfat"),
        capabilities=frozenset({"read", "create"}),
    ),
    FormatSpec(
        name="iso9660",
        kind=Kind.FS,
        module="imgbridge.formats.fs.iso9660",
        description="ISO9660 CD/DVD filesystem with Rock Ridge and Joliet (pycdlib)",
        aliases=("iso",),
        extensions=("iso",),
        capabilities=frozenset({"read", "create"}),
    ),
)


@dataclass(frozen=True)
class Detection:
    spec: FormatSpec
    score: int

    @property
    def guessed(self) -> bool:
        """True when no magic recognised the file: raw with nothing known inside it, or an
        extension alone. A raw file that holds a partition table or a filesystem is known."""
        return self.score <= 10


class Registry:
    """Looks formats up by name, alias or extension, and detects them by probing."""

    def __init__(self, specs: Iterable[FormatSpec] = BUILTIN, *, entry_points: bool = True):
        self._specs: dict[str, FormatSpec] = {}
        self._aliases: dict[str, str] = {}
        for spec in specs:
            self.add(spec)
        self._want_entry_points = entry_points

    def add(self, spec: FormatSpec) -> None:
        key = spec.name.lower()
        if key in self._aliases:
            raise InvalidInputError(f"format {spec.name} is registered twice")
        self._specs[key] = spec
        self._aliases[key] = key
        for alias in spec.aliases:
            self._aliases.setdefault(alias.lower(), key)

    def _load_entry_points(self) -> None:
        if not self._want_entry_points:
            return
        self._want_entry_points = False
        from importlib.metadata import entry_points

        for ep in entry_points(group="imgbridge.formats"):
            try:
                spec = ep.load()
            except Exception as exc:  # a broken plug-in must not break the built-in formats
                import warnings

                warnings.warn(f"imgbridge: format plug-in {ep.name!r} failed to load: {exc}",
                              stacklevel=2)
                continue
            if isinstance(spec, FormatSpec) and spec.name.lower() not in self._aliases:
                self.add(spec)

    def all(self) -> list[FormatSpec]:
        self._load_entry_points()
        return list(self._specs.values())

    def get(self, name: str) -> FormatSpec:
        # Plug-ins are looked for only when no built-in format answers: scanning the installed
        # distributions' entry points costs tens of milliseconds on every start-up.
        key = self._aliases.get(name.lower())
        if key is None:
            self._load_entry_points()
            key = self._aliases.get(name.lower())
        if key is None:
            known = ", ".join(sorted(self._specs))
            raise InvalidInputError(f"unknown format {name!r} (known: {known})")
        return self._specs[key]

    def for_output(self, name: str | None, path: str) -> FormatSpec:
        """The format to write: the one named, else the one DST's extension belongs to."""
        if name:
            spec = self.get(name)
        else:
            ext = os.path.splitext(path)[1].lower().lstrip(".")

            def writers_of(specs: Iterable[FormatSpec]) -> list[FormatSpec]:
                return [s for s in specs if ext and ext in s.extensions and s.can("create")]

            matches = writers_of(self._specs.values()) or writers_of(self.all())
            if not matches:
                raise InvalidInputError(
                    f"cannot tell the output format from {os.path.basename(path)!r}",
                    hint="name it with -O (see 'imgbridge formats')",
                )
            spec = matches[0]
        if not spec.can("create"):
            writable = ", ".join(s.name for s in self.all() if s.can("create"))
            raise InvalidInputError(f"format {spec.name} cannot be written (writable: {writable})")
        return spec

    def detect(self, path: str) -> Detection:
        """Probe ``path`` with every format and return the best match (raw at worst)."""
        probe = read_probe_input(path)
        best: Detection | None = None
        checked: set[str] = set()
        # Built-ins first: a magic match (100) cannot be beaten, so plug-ins need not load.
        for specs in (list(self._specs.values()), None):
            if specs is None:
                if best is not None and best.score >= 100:
                    break
                specs = self.all()
            for spec in specs:
                # A filesystem is found inside a disk (see converters.disk_to_tree): a file
                # holding one is a raw disk first, as for qemu-img.
                if spec.name in checked or not spec.can("read") or spec.kind is Kind.FS:
                    continue
                checked.add(spec.name)
                score = spec.probe(probe)
                if score > 0 and (best is None or score > best.score):
                    best = Detection(spec, score)
        if best is None:
            if probe.is_dir:
                raise InvalidInputError(f"{path}: is a directory, not an image")
            raise InvalidInputError(f"{path}: no format recognises this file")
        if best.spec.name == "raw" and self._holds_known_layout(probe):
            return Detection(best.spec, RAW_WITH_LAYOUT)
        return best

    def _holds_known_layout(self, probe: ProbeInput) -> bool:
        """A partition table or a filesystem at the start: the bytes of a disk, not a guess.
        Asked only when no disk or image format claimed the file."""
        head = probe.head
        if head[512:520] == b"EFI PART":
            return True
        if len(head) >= 512 and head[510:512] == b"\x55\xaa":
            from imgbridge.formats.volume.mbr import parse_entries

            sector = probe.size // 512
            used = [e for e in parse_entries(head[:512]) if e.type and e.sectors]
            if used and all(e.status in (0, 0x80) and e.lba_first + e.sectors <= sector
                            for e in used):
                return True
        return any(spec.kind is Kind.FS and spec.can("read") and spec.probe(probe) >= 50
                   for spec in self._specs.values())


def read_probe_input(path: str) -> ProbeInput:
    """Read what the probes look at, with one clear error for files that cannot be read."""
    try:
        if os.path.isdir(path):
            return ProbeInput(b"", b"", path, 0, frozenset(os.listdir(path)))
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(PROBE_BYTES)
            tail = head[-PROBE_BYTES:] if size <= PROBE_BYTES else b""
            if size > PROBE_BYTES:
                f.seek(max(0, size - PROBE_BYTES))
                tail = f.read(PROBE_BYTES)
    except FileNotFoundError:
        raise InvalidInputError(f"{path}: no such file") from None
    except PermissionError:
        raise InvalidInputError(f"{path}: permission denied") from None
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return ProbeInput(head, tail, path, size)


_default: Registry | None = None


def default_registry() -> Registry:
    """The process-wide registry of built-in and plug-in formats."""
    global _default
    if _default is None:
        _default = Registry()
    return _default
