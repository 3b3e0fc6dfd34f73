"""Naming a differencing disk's parent: parent locators and the parent's unicode name.

A differencing VHD names its parent up to nine times: in up to eight parent locators (one per
platform: a relative and an absolute Windows path, a Mac OS alias, a file URL) and in the
header's "parent unicode name" (the bare file name). This module only *decodes* those into
candidate paths, in the order a reader should try them; opening them (inside the image's
folder, with loop detection, checking the parent's unique id) is the reader's job.

Windows drive-letter and UNC paths mean nothing on a POSIX host, so there they contribute only
their file name, tried in the child's folder after every real path, which is also where
Hyper-V looks when a parent moved along with its child.

References: "Virtual Hard Disk Image Format Specification" v1.0 ("Dynamic Disk Header Format":
Parent Unicode Name, Parent Locator Entries; "Identification of the Parent Hard Disk Image");
Apple's alias record layout (version 2 and 3 records, tagged extra data) for "Mac " locators.
"""

from __future__ import annotations

import ntpath
import os
import posixpath
import re
import struct
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

from . import _structs as S

#: Longest locator we read: a Windows long path is at most 32767 UTF-16 code units.
MAX_LOCATOR_BYTES = 65536

_WINDOWS_ABSOLUTE = re.compile(r"^(?:[A-Za-z]:[\\/]|\\\\|//)")


@dataclass(frozen=True)
class Candidate:
    """A path to try for the parent (relative paths start at the child's folder)."""

    path: str
    origin: str  #: where it came from, for messages: "W2ru locator", "parent unicode name", ...


def decode_unicode_name(raw: bytes) -> str:
    """The header's parent unicode name: UTF-16, big-endian by the spec.

    Some writers store it little-endian; with ASCII names the zero bytes then sit at odd
    positions instead of even ones, which tells the two apart.
    """
    even_zeros = raw[0::2].count(0)
    odd_zeros = raw[1::2].count(0)
    encoding = "utf-16-le" if odd_zeros > even_zeros else "utf-16-be"
    text = raw.decode(encoding, "replace")
    return text.split("\0", 1)[0]


def _utf16le(data: bytes) -> str:
    return data.decode("utf-16-le", "replace").split("\0", 1)[0]


def decode_windows_path(data: bytes) -> str:
    """A W2ru/W2ku locator: a UTF-16LE Windows path, returned with '/' separators."""
    return _utf16le(data).replace("\\", "/")


def decode_file_url(data: bytes) -> str | None:
    """A MacX locator: a file:// URL in UTF-8 (e.g. ``file://localhost/Users/a/b.vhd``)."""
    text = data.decode("utf-8", "replace").split("\0", 1)[0].strip()
    url = urlparse(text)
    if url.scheme.lower() != "file" or url.netloc not in ("", "localhost"):
        return None
    path = unquote(url.path)
    return path or None


def decode_mac_alias(data: bytes) -> list[str]:
    """Paths to try from a Mac OS alias record: its POSIX path, then its target's name.

    Version 2 records hold the target name as a Pascal string at offset 50; both versions may
    carry tagged extra data, of which tag 14 is the target name in UTF-16BE and tag 18 the
    POSIX path from the volume root. Malformed records give what could be read.
    """
    out: list[str] = []
    if len(data) < 8:
        return out
    version = struct.unpack_from(">H", data, 6)[0]
    name: str | None = None
    extra_at = 150
    if version == 2 and len(data) >= 114:
        length = min(data[50], 63)
        name = data[51:51 + length].decode("mac_roman", "replace") or None
    elif version == 3:
        extra_at = 58
    else:
        return out
    posix: str | None = None
    pos = extra_at
    while pos + 4 <= len(data):
        tag, length = struct.unpack_from(">hH", data, pos)
        if tag == -1:
            break
        value = data[pos + 4:pos + 4 + length]
        if tag == 14 and len(value) >= 2:
            count = struct.unpack_from(">H", value, 0)[0]
            name = value[2:2 + 2 * count].decode("utf-16-be", "replace") or name
        elif tag == 18:
            posix = value.decode("utf-8", "replace") or None
        pos += 4 + length + (length & 1)
    if posix:
        out.append(posix if posix.startswith("/") else "/" + posix)
    if name:
        out.append(name)
    return out


def candidates(unicode_name: str, locators: list[tuple[bytes, bytes]]) -> list[Candidate]:
    """Paths to try for the parent, best first, without duplicates.

    ``locators`` are (platform code, locator bytes) in header order. Relative paths come
    first (a child and its parent usually move together), then absolute ones, then the file
    names alone, looked for in the child's folder.
    """
    relative: list[Candidate] = []
    absolute: list[Candidate] = []
    names: list[Candidate] = []
    for code, data in locators:
        label = f"{code.decode('latin-1').strip() or 'empty'} locator"
        if code == S.PLATFORM_W2RU:
            path = decode_windows_path(data)
            if path and not _WINDOWS_ABSOLUTE.match(path):
                relative.append(Candidate(path, label))
            names.append(Candidate(ntpath.basename(path.replace("/", "\\")), label))
        elif code == S.PLATFORM_W2KU:
            path = decode_windows_path(data)
            if _WINDOWS_ABSOLUTE.match(path):
                if os.name == "nt":
                    absolute.append(Candidate(path, label))
            elif path.startswith("/"):
                absolute.append(Candidate(path, label))
            names.append(Candidate(ntpath.basename(path.replace("/", "\\")), label))
        elif code == S.PLATFORM_MACX:
            url_path = decode_file_url(data)
            if url_path:
                absolute.append(Candidate(url_path, label))
                names.append(Candidate(posixpath.basename(url_path), label))
        elif code == S.PLATFORM_MAC:
            for path in decode_mac_alias(data):
                if path.startswith("/"):
                    absolute.append(Candidate(path, label))
                    names.append(Candidate(posixpath.basename(path), label))
                else:
                    names.append(Candidate(path, label))
    if unicode_name:
        names.append(Candidate(ntpath.basename(unicode_name.replace("/", "\\")),
                               "parent unicode name"))
    seen: set[str] = set()
    out: list[Candidate] = []
    for cand in relative + absolute + names:
        if cand.path and cand.path not in (".", "..") and cand.path not in seen:
            seen.add(cand.path)
            out.append(cand)
    return out
