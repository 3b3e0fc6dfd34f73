"""The container side of the model: platforms, image configs, images and multi-platform indexes.

Field names follow opencontainers/image-spec ``config.md``, ``manifest.md`` and
``image-index.md``. The config keeps the JSON it was read from (``raw``) and writes back into a
copy of it, so fields imgbridge does not model (``Healthcheck``, ``Shell``, Docker's
``container_config``, vendor extensions) survive a round trip, in their original order.
"""

from __future__ import annotations

import copy
import platform as _host
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidImageError, InvalidInputError
from .tree import Entry, Layer, flatten

__all__ = [
    "OCI_INDEX_MEDIA_TYPE",
    "OCI_MANIFEST_MEDIA_TYPE",
    "ContainerImage",
    "HistoryEntry",
    "ImageConfig",
    "ImageIndex",
    "Platform",
]

OCI_MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"

_FORMAT = "oci config"

# platform.machine() spellings (and common distro names) -> (GOARCH, implied variant).
_ARCH_ALIASES: dict[str, tuple[str, str]] = {
    "x86_64": ("amd64", ""),
    "x86-64": ("amd64", ""),
    "amd64": ("amd64", ""),
    "aarch64": ("arm64", ""),
    "arm64": ("arm64", ""),
    "armv8l": ("arm", "v8"),
    "armv7l": ("arm", "v7"),
    "armv7": ("arm", "v7"),
    "armhf": ("arm", "v7"),
    "arm": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "armel": ("arm", "v6"),
    "armv5tel": ("arm", "v5"),
    "armv5l": ("arm", "v5"),
    "i386": ("386", ""),
    "i486": ("386", ""),
    "i586": ("386", ""),
    "i686": ("386", ""),
    "x86": ("386", ""),
    "ppc64le": ("ppc64le", ""),
    "ppc64": ("ppc64", ""),
    "s390x": ("s390x", ""),
    "riscv64": ("riscv64", ""),
    "mips64el": ("mips64le", ""),
    "loongarch64": ("loong64", ""),
}


def _goos() -> str:
    for prefix, goos in (
        ("linux", "linux"),
        ("darwin", "darwin"),
        ("win32", "windows"),
        ("cygwin", "windows"),
        ("freebsd", "freebsd"),
        ("openbsd", "openbsd"),
        ("netbsd", "netbsd"),
    ):
        if sys.platform.startswith(prefix):
            return goos
    return sys.platform


@dataclass(frozen=True)
class Platform:
    """An OCI platform: what an image was built for, or what a caller asks for.

    Fields are kept as written (so ``str(Platform.parse(s)) == s``); ``matches`` compares them
    after normalising the usual aliases (``aarch64`` is ``arm64``, ``arm64/v8`` is ``arm64``,
    ``arm`` is ``arm/v7``, ``x86_64`` is ``amd64``).
    """

    os: str
    architecture: str
    variant: str = ""
    os_version: str = ""
    os_features: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Platform:
        """Parse ``os/arch`` or ``os/arch/variant`` (``linux/arm64/v8``)."""
        parts = text.strip().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise InvalidInputError(
                f"cannot parse platform {text!r}", hint="write os/arch or os/arch/variant"
            )
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else "")

    @classmethod
    def host(cls, os: str | None = None) -> Platform:
        """The platform of this machine, in Go's names (``x86_64`` -> ``amd64``, ``armv7l`` ->
        ``arm/v7``). ``os`` overrides the operating system: on a Mac, containers run in a
        Linux VM, so callers picking an image usually want ``Platform.host(os="linux")``.
        """
        machine = _host.machine().lower()
        arch, variant = _ARCH_ALIASES.get(machine, (machine, ""))
        return cls(os if os is not None else _goos(), arch, variant)

    def __str__(self) -> str:
        return (
            f"{self.os}/{self.architecture}/{self.variant}"
            if self.variant
            else (f"{self.os}/{self.architecture}")
        )

    def normalized(self) -> Platform:
        """The same platform with aliases folded into their canonical OCI/Go spelling."""
        arch, variant = self.architecture.lower(), self.variant.lower()
        arch, implied = _ARCH_ALIASES.get(arch, (arch, ""))
        variant = variant or implied
        if variant.isdigit():
            variant = "v" + variant
        if (arch == "arm64" and variant in ("v8", "v8.0")) or (arch == "amd64" and variant == "v1"):
            variant = ""  # the baseline variant is the same as none at all
        return Platform(self.os.lower(), arch, variant, self.os_version, self.os_features)

    def matches(self, other: Platform) -> bool:
        """Whether an image built for ``other`` satisfies a request for ``self``.

        OS and architecture must agree; the variant and OS version too, unless ``self`` leaves
        them empty, which means "any". ``os_features`` are not compared.
        """
        want, have = self.normalized(), other.normalized()
        return (
            want.os == have.os
            and want.architecture == have.architecture
            and (not want.variant or want.variant == have.variant)
            and (not want.os_version or want.os_version == have.os_version)
        )

    @classmethod
    def from_oci_json(cls, data: dict[str, Any]) -> Platform:
        """Read the platform keys shared by an image config and an index descriptor."""
        return cls(
            _opt_str(data, "os"),
            _opt_str(data, "architecture"),
            _opt_str(data, "variant"),
            _opt_str(data, "os.version"),
            tuple(_opt_str_list(data, "os.features") or ()),
        )

    def to_oci_json(self) -> dict[str, Any]:
        """The platform keys of an image config or an index descriptor's ``platform``."""
        out: dict[str, Any] = {"architecture": self.architecture, "os": self.os}
        _put(out, "os.version", self.os_version)
        _put(out, "os.features", list(self.os_features))
        _put(out, "variant", self.variant)
        return out


# ---------------------------------------------------------------------------------------------
# JSON helpers: strict about types (a config is untrusted input), lenient about absence.


def _bad(key: str, expected: str, value: Any) -> InvalidImageError:
    return InvalidImageError(
        f"field {key!r} should be {expected}, not {type(value).__name__}", format=_FORMAT
    )


def _opt_str(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _bad(key, "a string", value)
    return value


def _opt_str_list(data: dict[str, Any], key: str) -> list[str] | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(key, "a list of strings", value)
    return list(value)


def _opt_obj(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(key, "an object", value)
    return value


def _str_map(data: dict[str, Any], key: str) -> dict[str, str]:
    value = _opt_obj(data, key)
    if not all(isinstance(v, str) for v in value.values()):
        raise _bad(key, "an object of strings", value)
    return dict(value)


def _is_empty(value: Any) -> bool:
    return (
        value is None
        or value is False
        or (isinstance(value, (str, list, dict, tuple)) and len(value) == 0)
    )


def _put(target: dict[str, Any], key: str, value: Any) -> None:
    """Write a model value into JSON that may already hold the original.

    A real value is written (in place, keeping key order). An empty one leaves an absent key
    absent and an original ``null``/``[]``/``""`` spelled as it was, and removes a key whose
    original value the model has since cleared.
    """
    if not _is_empty(value):
        target[key] = value
    elif not _is_empty(target.get(key)):
        del target[key]


@dataclass
class HistoryEntry:
    """One ``history`` item of an image config. ``created`` is the RFC 3339 string as written."""

    created: str | None = None
    created_by: str | None = None
    author: str | None = None
    comment: str | None = None
    empty_layer: bool = False
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_oci_json(cls, data: Any) -> HistoryEntry:
        if not isinstance(data, dict):
            raise _bad("history", "a list of objects", data)
        empty = data.get("empty_layer", False)
        if not isinstance(empty, bool):
            raise _bad("empty_layer", "a boolean", empty)
        return cls(
            created=_opt_str(data, "created") or None,
            created_by=_opt_str(data, "created_by") or None,
            author=_opt_str(data, "author") or None,
            comment=_opt_str(data, "comment") or None,
            empty_layer=empty,
            raw=copy.deepcopy(data),
        )

    def to_oci_json(self) -> dict[str, Any]:
        out = copy.deepcopy(self.raw)
        _put(out, "created", self.created)
        _put(out, "created_by", self.created_by)
        _put(out, "author", self.author)
        _put(out, "comment", self.comment)
        _put(out, "empty_layer", self.empty_layer)
        return out


@dataclass
class ImageConfig:
    """An image configuration (``application/vnd.oci.image.config.v1+json``).

    ``raw`` is the JSON object this config was read from; ``to_oci_json`` starts from a copy of
    it and overwrites only the modelled fields, so nothing else is lost. ``entrypoint`` and
    ``cmd`` are None when unset, which runtimes treat differently from an explicit empty list
    when they merge a run's arguments. ``exposed_ports`` and ``volumes`` are the keys of the JSON
    sets (``"80/tcp"``, ``"/data"``). ``diff_ids`` mirror ``rootfs.diff_ids``: one per layer,
    the digest of its uncompressed tar.
    """

    platform: Platform
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    env: list[str] = field(default_factory=list)
    working_dir: str = ""
    user: str = ""
    exposed_ports: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    stop_signal: str = ""
    created: str | None = None
    author: str = ""
    history: list[HistoryEntry] = field(default_factory=list)
    diff_ids: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_oci_json(cls, data: Any) -> ImageConfig:
        """Parse a config JSON object; ``InvalidImageError`` if a known field has a wrong type."""
        if not isinstance(data, dict):
            raise InvalidImageError("an image config must be a JSON object", format=_FORMAT)
        cfg = _opt_obj(data, "config")
        rootfs = _opt_obj(data, "rootfs")
        history = data.get("history")
        history = [] if history is None else history
        if not isinstance(history, list):
            raise _bad("history", "a list", history)
        return cls(
            platform=Platform.from_oci_json(data),
            entrypoint=_opt_str_list(cfg, "Entrypoint"),
            cmd=_opt_str_list(cfg, "Cmd"),
            env=_opt_str_list(cfg, "Env") or [],
            working_dir=_opt_str(cfg, "WorkingDir"),
            user=_opt_str(cfg, "User"),
            exposed_ports=list(_opt_obj(cfg, "ExposedPorts")),
            volumes=list(_opt_obj(cfg, "Volumes")),
            labels=_str_map(cfg, "Labels"),
            stop_signal=_opt_str(cfg, "StopSignal"),
            created=_opt_str(data, "created") or None,
            author=_opt_str(data, "author"),
            history=[HistoryEntry.from_oci_json(item) for item in history],
            diff_ids=_opt_str_list(rootfs, "diff_ids") or [],
            raw=copy.deepcopy(data),
        )

    def to_oci_json(self) -> dict[str, Any]:
        """The config as a JSON object: ``raw`` with the modelled fields written over it."""
        out = copy.deepcopy(self.raw)
        # Required by config.md, so written even when empty.
        out["architecture"] = self.platform.architecture
        out["os"] = self.platform.os
        _put(out, "os.version", self.platform.os_version)
        _put(out, "os.features", list(self.platform.os_features))
        _put(out, "variant", self.platform.variant)
        _put(out, "created", self.created)
        _put(out, "author", self.author)

        original = out.get("config")
        cfg: dict[str, Any] = dict(original) if isinstance(original, dict) else {}
        _put(cfg, "User", self.user)
        _put(cfg, "ExposedPorts", _json_set(cfg.get("ExposedPorts"), self.exposed_ports))
        _put(cfg, "Env", list(self.env))
        _put(cfg, "Entrypoint", None if self.entrypoint is None else list(self.entrypoint))
        _put(cfg, "Cmd", None if self.cmd is None else list(self.cmd))
        _put(cfg, "Volumes", _json_set(cfg.get("Volumes"), self.volumes))
        _put(cfg, "WorkingDir", self.working_dir)
        _put(cfg, "Labels", dict(self.labels))
        _put(cfg, "StopSignal", self.stop_signal)
        if cfg or isinstance(original, dict):
            out["config"] = cfg

        rootfs = out.get("rootfs")
        rootfs = dict(rootfs) if isinstance(rootfs, dict) else {}
        rootfs["type"] = rootfs.get("type") or "layers"
        rootfs["diff_ids"] = list(self.diff_ids)
        out["rootfs"] = rootfs
        _put(out, "history", [item.to_oci_json() for item in self.history])
        return out


def _json_set(original: Any, keys: list[str]) -> dict[str, Any]:
    """A JSON "set" (``{"80/tcp": {}}``), keeping any original value of a surviving key."""
    before = original if isinstance(original, dict) else {}
    return {key: before.get(key, {}) for key in keys}


@dataclass
class ContainerImage:
    """One single-platform image: layers (lowest first), config, and manifest facts.

    ``tags`` are the names the image is known by: Docker ``RepoTags`` (``busybox:1.36``) or
    OCI ``org.opencontainers.image.ref.name`` values. ``annotations`` are the manifest's.
    """

    layers: list[Layer]
    config: ImageConfig
    annotations: dict[str, str] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    manifest_media_type: str = OCI_MANIFEST_MEDIA_TYPE

    @property
    def platform(self) -> Platform:
        return self.config.platform

    def flatten(self) -> list[Entry]:
        """The image's root filesystem as one tree; see ``imgbridge.model.tree.flatten``."""
        return flatten(self.layers)


@dataclass
class ImageIndex:
    """A multi-platform image: one manifest per platform.

    Each image may be given as a loader (a function returning the image), so that an index of
    ten platforms does not parse ten manifests and configs to use one.
    """

    manifests: list[tuple[Platform, ContainerImage | Callable[[], ContainerImage]]] = field(
        default_factory=list
    )
    annotations: dict[str, str] = field(default_factory=dict)
    media_type: str = OCI_INDEX_MEDIA_TYPE

    @property
    def platforms(self) -> list[Platform]:
        return [platform for platform, _ in self.manifests]

    def select(self, platform: Platform | str) -> ContainerImage:
        """The image for ``platform`` (see ``Platform.matches``), loading it if needed.

        When several match, one whose normalised variant equals the request's wins, then the
        first in index order. ``InvalidInputError`` listing the available platforms if none do.
        """
        want = Platform.parse(platform) if isinstance(platform, str) else platform
        found = [(p, image) for p, image in self.manifests if want.matches(p)]
        if not found:
            available = ", ".join(_describe(p) for p in self.platforms) or "none"
            raise InvalidInputError(
                f"no image for platform {_describe(want)} in this index; available: {available}",
                hint="choose one of the available platforms",
            )
        exact_variant = want.normalized().variant
        found.sort(key=lambda item: item[0].normalized().variant != exact_variant)  # stable
        image = found[0][1]
        return image if isinstance(image, ContainerImage) else image()


def _describe(platform: Platform) -> str:
    return f"{platform} ({platform.os_version})" if platform.os_version else str(platform)
