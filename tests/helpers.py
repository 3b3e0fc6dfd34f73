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


def run_tool(*args: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run an external tool (which must exist) and capture its output as text."""
    require_tool(os.fspath(args[0]))
    return subprocess.run([os.fspath(a) for a in args], capture_output=True, text=True,
                          check=check)


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
