"""Differences between two file trees (flattened container images): added, removed, changed.

Two entries at the same path differ when their type, permission bits (not a symlink's),
owner, symlink or hardlink target, device numbers, extended attributes or content differ.
Times are not compared: rebuilding an image from the same inputs changes every mtime and nothing a
container sees. Content is compared by size first and, when the sizes agree, by the sha256
of each side, read in 1 MiB chunks (a file is never held in memory). A HARDLINK's content is
its target's, which is compared at the target's own path, so only the target path is
compared for it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from imgbridge.model.tree import Entry, EntryType

__all__ = ["Change", "diff_trees", "sha256_of"]

_CHUNK = 1 << 20


def sha256_of(entry: Entry) -> str:
    """``sha256:<hex>`` of a FILE's content, streamed."""
    digest = hashlib.sha256()
    with entry.open() as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


@dataclass(frozen=True)
class Change:
    """One path that differs. ``kind`` is ``"A"`` (only in the second tree), ``"D"`` (only in
    the first) or ``"M"`` (in both, different); for ``"M"``, ``fields`` names what differs, in
    a fixed order: type, mode, owner, link, device, xattrs, content. ``digests`` holds the two
    sides' sha256 when the contents were hashed (equal sizes), else None."""

    path: str
    kind: str
    before: Entry | None
    after: Entry | None
    fields: tuple[str, ...] = ()
    digests: tuple[str, str] | None = None

    def describe(self) -> str:
        """The text line: ``A /path``, ``D /path`` or ``M /path (mode 0644->0755, content)``."""
        line = f"{self.kind} /{self.path}"
        if self.kind != "M":
            return line
        a, b = self.before, self.after
        assert a is not None and b is not None
        parts = []
        for name in self.fields:
            if name == "type":
                parts.append(f"type {a.type.value}->{b.type.value}")
            elif name == "mode":
                parts.append(f"mode {a.mode:04o}->{b.mode:04o}")
            elif name == "owner":
                parts.append(f"owner {a.uid}:{a.gid}->{b.uid}:{b.gid}")
            elif name == "link":
                parts.append(f"link {a.link_target}->{b.link_target}")
            elif name == "device":
                parts.append(f"device {a.devmajor},{a.devminor}->{b.devmajor},{b.devminor}")
            elif name == "content" and a.size != b.size:
                parts.append(f"content, size {a.size}->{b.size}")
            else:
                parts.append(name)
        return f"{line} ({', '.join(parts)})"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": "/" + self.path, "change": _KIND_NAMES[self.kind]}
        if self.kind == "M":
            out["fields"] = list(self.fields)
        for key, entry, index in (("before", self.before, 0), ("after", self.after, 1)):
            if entry is not None:
                side = _entry_json(entry)
                if self.digests is not None:
                    side["sha256"] = self.digests[index]
                out[key] = side
        return out


_KIND_NAMES = {"A": "added", "D": "removed", "M": "modified"}


def _entry_json(entry: Entry) -> dict[str, Any]:
    out: dict[str, Any] = {"type": entry.type.value, "mode": f"{entry.mode:04o}",
                           "uid": entry.uid, "gid": entry.gid}
    if entry.type is EntryType.FILE:
        out["size"] = entry.size
    if entry.type in (EntryType.SYMLINK, EntryType.HARDLINK):
        out["link_target"] = entry.link_target
    if entry.type in (EntryType.CHAR, EntryType.BLOCK):
        out["device"] = [entry.devmajor, entry.devminor]
    return out


def _compare(a: Entry, b: Entry) -> tuple[tuple[str, ...], tuple[str, str] | None]:
    fields = []
    if a.type is not b.type:
        fields.append("type")
    # Linux ignores a symlink's own permission bits (always 0777 in practice), so a change
    # from or to a symlink is reported as a type change only.
    if a.mode != b.mode and EntryType.SYMLINK not in (a.type, b.type):
        fields.append("mode")
    if (a.uid, a.gid) != (b.uid, b.gid):
        fields.append("owner")
    if a.type is b.type and a.link_target != b.link_target:
        fields.append("link")
    if a.type is b.type and (a.devmajor, a.devminor) != (b.devmajor, b.devminor):
        fields.append("device")
    if a.xattrs != b.xattrs:
        fields.append("xattrs")
    digests = None
    if a.type is b.type is EntryType.FILE:
        if a.size != b.size:
            fields.append("content")  # no need to read a byte
        else:
            digests = (sha256_of(a), sha256_of(b))
            if digests[0] != digests[1]:
                fields.append("content")
    return tuple(fields), digests


def _key(path: str) -> list[str]:
    return path.split("/")


def diff_trees(a: Iterable[Entry], b: Iterable[Entry]) -> list[Change]:
    """The changes that turn tree ``a`` into tree ``b``, sorted by path (parents first).

    Both are flattened trees (no WHITEOUT or OPAQUE, one entry per path). Every path below an
    added or removed directory is listed too, as ``diff -r`` would. The root is compared only
    when both trees describe it (flatten leaves an undescribed root out).
    """
    before = {entry.path: entry for entry in a}
    after = {entry.path: entry for entry in b}
    changes: list[Change] = []
    for path in sorted(before.keys() | after.keys(), key=_key):
        old, new = before.get(path), after.get(path)
        if old is None:
            if path:
                changes.append(Change(path, "A", None, new))
        elif new is None:
            if path:
                changes.append(Change(path, "D", old, None))
        else:
            fields, digests = _compare(old, new)
            if fields:
                changes.append(Change(path, "M", old, new, fields, digests))
    return changes
