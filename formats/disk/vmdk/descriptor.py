"""The VMDK text descriptor: parse it into a ``Descriptor``, and write one back.

A descriptor is a small text file (or a text block inside a sparse extent) that says what the
disk is made of: its content ID (CID) and its parent's, the create type, the extents in guest
order and the disk database (``ddb.*``: adapter, geometry, hardware version). The grammar lives
in ``_structs`` as data; this module applies it line by line, so a bad line is reported by its
number and text rather than ignored (QEMU skips lines it cannot parse, which shifts every
later extent without a word).

References: VMware "Virtual Disk Format 5.0", "The Descriptor File".
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import _structs as S

__all__ = ["Descriptor", "DescriptorError", "ExtentLine", "emit", "parse"]


class DescriptorError(ValueError):
    """The descriptor text breaks the grammar; ``line`` is 1-based, 0 when not line-specific."""

    def __init__(self, message: str, line: int = 0) -> None:
        super().__init__(f"descriptor line {line}: {message}" if line else message)
        self.line = line


@dataclass
class ExtentLine:
    """One extent line: ``access sectors type ["filename" [offset]]``."""

    access: str
    sectors: int
    type: str
    filename: str | None = None
    offset: int = 0  # in sectors, inside the extent file (FLAT and VMFS only)

    def text(self) -> str:
        line = f"{self.access} {self.sectors} {self.type}"
        if self.filename is not None:
            line += f' "{self.filename}"'
            if self.type == S.EXTENT_FLAT:
                line += f" {self.offset}"
        return line


@dataclass
class Descriptor:
    """What a descriptor says; ``fields`` keeps header keys we do not interpret (encoding...)."""

    create_type: str
    cid: int | None = None
    parent_cid: int = S.NO_PARENT_CID
    version: int = 1
    parent_hint: str | None = None
    extents: list[ExtentLine] = field(default_factory=list)
    ddb: dict[str, str] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def sectors(self) -> int:
        return sum(e.sectors for e in self.extents)

    @property
    def has_parent(self) -> bool:
        return self.parent_hint is not None


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def _hex32(value: str, name: str, line: int) -> int:
    text = _unquote(value).strip()
    try:
        number = int(text, 16)
    except ValueError:
        raise DescriptorError(f"{name} {text!r} is not a hexadecimal number", line) from None
    if not 0 <= number <= 0xFFFFFFFF:
        raise DescriptorError(f"{name} {text!r} does not fit in 32 bits", line)
    return number


def decode(raw: bytes) -> str:
    """Descriptor bytes as text: cut at the first NUL (embedded descriptors are padded with
    them), UTF-8 where valid, else Latin-1 (older VMware products wrote the host code page)."""
    raw = raw.split(b"\0", 1)[0]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def parse(text: str) -> Descriptor:
    """Parse descriptor text; raise ``DescriptorError`` naming the first line that is wrong."""
    if len(text) > S.MAX_DESCRIPTOR_BYTES:
        raise DescriptorError(f"descriptor of {len(text)} characters exceeds the "
                              f"{S.MAX_DESCRIPTOR_BYTES}-byte limit")
    header: dict[str, tuple[str, int]] = {}
    extents: list[ExtentLine] = []
    ddb: dict[str, str] = {}
    total_sectors = 0
    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        extent = S.EXTENT_LINE.match(line)
        if extent:
            if len(extents) >= S.MAX_EXTENTS:
                raise DescriptorError(f"more than {S.MAX_EXTENTS} extents", number)
            item = _extent(extent.groupdict(), number)
            total_sectors += item.sectors
            if total_sectors * S.SECTOR > S.MAX_CAPACITY_BYTES:
                raise DescriptorError("the extents add up to more than 64 TiB", number)
            extents.append(item)
            continue
        if line.split(None, 1)[0] in S.ACCESS_MODES:
            raise DescriptorError(f"malformed extent line: {line[:200]}", number)
        pair = S.KEY_VALUE.match(line)
        if not pair:
            raise DescriptorError(f"neither a setting nor an extent: {line[:200]}", number)
        key, value = pair.group("key"), pair.group("value")
        if key.startswith("ddb."):
            ddb[key[4:]] = _unquote(value)
        else:
            header[key] = (value, number)
    if "createType" not in header:
        raise DescriptorError("no createType")
    desc = Descriptor(create_type=_unquote(header.pop("createType")[0]))
    if "version" in header:
        value, number = header.pop("version")
        if not _unquote(value).isdigit():
            raise DescriptorError(f"version {value!r} is not a number", number)
        desc.version = int(_unquote(value))
    if "CID" in header:
        value, number = header.pop("CID")
        desc.cid = _hex32(value, "CID", number)
    if "parentCID" in header:
        value, number = header.pop("parentCID")
        desc.parent_cid = _hex32(value, "parentCID", number)
    if "parentFileNameHint" in header:
        value, number = header.pop("parentFileNameHint")
        hint = _unquote(value)
        if not hint:
            raise DescriptorError("parentFileNameHint is empty", number)
        desc.parent_hint = hint
    desc.extents = extents
    desc.ddb = ddb
    desc.fields = {key: _unquote(value) for key, (value, _) in header.items()}
    return desc


def _extent(groups: dict[str, str | None], number: int) -> ExtentLine:
    access, kind = groups["access"] or "", groups["type"] or ""
    sectors = int(groups["sectors"] or "0")
    filename, offset = groups["filename"], groups["offset"]
    if kind == S.EXTENT_ZERO:
        if filename is not None:
            raise DescriptorError("a ZERO extent names no file", number)
    elif filename is None:
        raise DescriptorError(f"a {kind} extent needs a quoted file name", number)
    elif not filename:
        raise DescriptorError(f"a {kind} extent has an empty file name", number)
    if offset is not None and kind not in (S.EXTENT_FLAT, S.EXTENT_VMFS):
        raise DescriptorError(f"a {kind} extent takes no offset", number)
    if kind == S.EXTENT_FLAT and offset is None:
        raise DescriptorError("a FLAT extent needs its start offset in sectors", number)
    start = int(offset) if offset is not None else 0
    if start * S.SECTOR > S.MAX_CAPACITY_BYTES:
        raise DescriptorError(f"extent offset {start} sectors is absurd", number)
    return ExtentLine(access, sectors, kind, filename, start)


def emit(desc: Descriptor) -> str:
    """The descriptor as VMware and qemu-img lay it out (the DDB after the extents)."""
    lines = [
        S.DESCRIPTOR_SIGNATURE,
        f"version={desc.version}",
    ]
    for key, value in desc.fields.items():
        lines.append(f'{key}="{value}"')
    lines += [
        f"CID={(desc.cid if desc.cid is not None else 0):08x}",
        f"parentCID={desc.parent_cid:08x}",
        f'createType="{desc.create_type}"',
    ]
    if desc.parent_hint is not None:
        lines.append(f'parentFileNameHint="{desc.parent_hint}"')
    lines += ["", "# Extent description"]
    lines += [e.text() for e in desc.extents]
    lines += ["", "# The Disk Data Base", "#DDB", ""]
    lines += [f'ddb.{key} = "{value}"' for key, value in desc.ddb.items()]
    return "\n".join(lines) + "\n"


def looks_like_descriptor(head: bytes) -> bool:
    """True when ``head`` starts like a text descriptor: blank and comment lines, then
    ``version=N`` (what VMware and QEMU themselves look for)."""
    for raw_line in head.split(b"\n"):
        line = raw_line.strip()
        if not line or line.startswith(b"#"):
            if raw_line.startswith(S.DESCRIPTOR_SIGNATURE.encode()):
                return True
            continue
        return line.replace(b" ", b"") in (b"version=1", b"version=2", b"version=3")
    return False
