"""Helpers the tests import (tests/ is on pytest's pythonpath).

External tools: ``require_tool("qemu-img")`` skips with a clear reason when the tool is missing,
unless IMGBRIDGE_REQUIRE_TOOLS=1 (set by .ci/run), where a missing tool fails the test: CI
never skips an interoperability check silently.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from imgbridge.source import ByteSource, SourceRun

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "fixtures"


def require_tool(name: str) -> str:
    """The tool's path; skip (laptop) or fail (CI) when it is not installed."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (apt-get install the package that ships it)"
        if os.environ.get("IMGBRIDGE_REQUIRE_TOOLS") == "1":
            pytest.fail(f"IMGBRIDGE_REQUIRE_TOOLS=1 but {message}")
        pytest.skip(message)
    return path


def run_tool(*args: str | os.PathLike[str], check: bool = True,
             input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run an external tool (which must exist) and capture its output as text."""
    require_tool(os.fspath(args[0]))
    return subprocess.run([os.fspath(a) for a in args], capture_output=True, text=True,
                          check=check, input=input_text)


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_cli_process(*args: str | os.PathLike[str], cwd: Path | None = None,
                    timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``python -m imgbridge`` in a fresh process (a real exit code, a real stderr)."""
    return subprocess.run([sys.executable, "-m", "imgbridge", *map(os.fspath, args)],
                          capture_output=True, text=True, cwd=cwd or tempfile.gettempdir(),
                          timeout=timeout)


def make_sparse_file(path: Path, size: int, runs: list[tuple[int, bytes]]) -> Path:
    """A sparse file of ``size`` bytes with ``runs`` of data written at their offsets."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in runs:
            f.seek(offset)
            f.write(data)
    return path


class CountingSource(ByteSource):
    """Wraps a source and records every read, to prove that holes are never read and that
    data is read once."""

    def __init__(self, inner: ByteSource) -> None:
        self.inner = inner
        self.name = inner.name
        self.reads: list[tuple[int, int]] = []
        self.bytes_read = 0

    @property
    def size(self) -> int:
        return self.inner.size

    def read_at(self, offset: int, n: int) -> bytes:
        self.reads.append((offset, n))
        data = self.inner.read_at(offset, n)
        self.bytes_read += len(data)
        return data

    def runs(self, offset: int = 0, length: int | None = None) -> Iterator[SourceRun]:
        return self.inner.runs(offset, length)


#: Times of the rich tree: nanoseconds, one before 1970 is avoided (FAT/ISO cannot hold it),
#: one past 2038 (ext4's extra epoch bits).
RICH_MTIME_NS = 1_700_000_000_123_456_789
RICH_FAR_MTIME_NS = 2_500_000_000_987_654_321


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def make_rich_tree(root: Path, *, big_dir: int = 400, devices: bool = True) -> Path:
    """A tree with every kind of entry a filesystem must carry: files (empty, small, sparse
    with holes, a few MiB), modes with setuid/setgid/sticky, fast and slow symlinks, hardlinks,
    fifo, socket, char/block devices (root only), xattrs (user.*, security.capability, a POSIX
    ACL), owners (root only), ns times and a time past 2038, a directory of ``big_dir`` files
    (htree), a 255-byte name. Tests that cannot be root pass ``devices=False``."""
    import socket
    import stat as st

    root.mkdir(parents=True, exist_ok=True)
    (root / "etc").mkdir()
    (root / "etc/hostname").write_bytes(b"imgbridge\n")
    (root / "empty").write_bytes(b"")
    (root / "bin").mkdir()
    (root / "bin/tool").write_bytes(bytes(range(256)) * 40)
    os.chmod(root / "bin/tool", 0o4755)
    (root / "bin/group-tool").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(root / "bin/group-tool", 0o2711)
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)
    with open(root / "sparse.bin", "wb") as f:
        f.write(b"head")
        f.seek(5 << 20)
        f.write(b"middle")
        f.truncate(9 << 20)
    (root / "big.bin").write_bytes(os.urandom(3 << 20))
    os.symlink("etc/hostname", root / "fast-link")
    os.symlink("/" + "long-target/" * 8 + "end", root / "slow-link")
    os.symlink("dangling", root / "dangling-link")
    os.link(root / "etc/hostname", root / "hostname-hardlink")
    os.mkfifo(root / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(os.fspath(root / "socket"))
    finally:
        sock.close()
    (root / "xattrs").write_bytes(b"x")
    os.setxattr(root / "xattrs", "user.comment", b"hello")
    os.setxattr(root / "xattrs", "user.big", b"v" * 300)
    # security.capability v2: cap_net_bind_service (bit 10) permitted + effective.
    cap = (0x02000001).to_bytes(4, "little") + (1 << 10).to_bytes(4, "little") + bytes(12)
    os.setxattr(root / "bin/tool", "security.capability", cap)
    # system.posix_acl_access: user::rw- user:1000:r-- group::r-- mask::r-- other::r--
    def ace(tag: int, perm: int, ident: int = 0xFFFFFFFF) -> bytes:
        return tag.to_bytes(2, "little") + perm.to_bytes(2, "little") + ident.to_bytes(4, "little")
    acl = (2).to_bytes(4, "little") + ace(1, 6) + ace(2, 4, 1000) + ace(4, 4) + ace(16, 4) \
        + ace(32, 4)
    (root / "acl-file").write_bytes(b"acl")
    os.setxattr(root / "acl-file", "system.posix_acl_access", acl)
    many = root / "many"
    many.mkdir()
    for i in range(big_dir):
        (many / f"file-{i:05d}-{'x' * (i % 40)}").write_bytes(f"{i}\n".encode())
    (root / ("n" * 255)).write_bytes(b"long name")
    (root / "future").write_bytes(b"2049")
    if devices and is_root():
        os.mknod(root / "null", 0o666 | st.S_IFCHR, os.makedev(1, 3))
        os.mknod(root / "sda", 0o660 | st.S_IFBLK, os.makedev(8, 0))
        os.chown(root / "etc/hostname", 1000, 1000, follow_symlinks=False)
        os.chown(root / "fast-link", 1001, 1002, follow_symlinks=False)
        os.chown(root / "many", 0, 100)
    os.utime(root / "future", ns=(RICH_FAR_MTIME_NS, RICH_FAR_MTIME_NS))
    for path in sorted(root.rglob("*"), reverse=True):
        if path.name == "future":
            continue
        os.utime(path, ns=(RICH_MTIME_NS, RICH_MTIME_NS), follow_symlinks=False)
    os.utime(root, ns=(RICH_MTIME_NS, RICH_MTIME_NS))
    return root
