"""`-` as DST: a sequential format streams to standard output, and qemu-img reads the result."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_sparse_file, require_tool, run_cli_process, run_tool

pytestmark = pytest.mark.interop
MiB = 1 << 20


def test_stream_optimized_vmdk_goes_through_a_pipe(tmp_path: Path) -> None:
    require_tool("qemu-img")
    src = make_sparse_file(tmp_path / "src.raw", 8 * MiB,
                           [(0, b"boot" * 128), (3 * MiB + 512, bytes(range(256)) * 64)])
    out = tmp_path / "piped.vmdk"
    with open(out, "wb") as sink:
        # A real pipe (not a file) between imgbridge and the reader of its output.
        producer = subprocess.Popen(
            [sys.executable, "-m", "imgbridge", "convert", "-f", "raw", "-O", "vmdk",
             "-o", "subformat=streamOptimized", str(src), "-"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
        consumer = subprocess.Popen(["cat"], stdin=producer.stdout, stdout=sink)
        assert producer.stdout is not None
        producer.stdout.close()
        _, err = producer.communicate(timeout=120)
        consumer.wait(timeout=120)
    assert producer.returncode == 0, err
    data = out.read_bytes()
    # The last three sectors: footer marker, footer (a sparse header, "KDMV"), end of stream.
    assert data[-1536 + 12:-1536 + 16] == (3).to_bytes(4, "little")  # MARKER_FOOTER
    assert data[-1024:-1020] == b"KDMV"
    assert data[-512:] == bytes(512)  # the end-of-stream marker is all zeros
    assert "identical" in run_tool("qemu-img", "compare", "-f", "vmdk", "-F", "raw",
                                   out, src).stdout


@pytest.mark.parametrize(("args", "says"), [
    (["-O", "qcow2"], "cannot be written to a pipe"),
    ([], "needs the format named with -O"),
])
def test_formats_that_seek_refuse_a_pipe(tmp_path: Path, args: list[str], says: str) -> None:
    src = make_sparse_file(tmp_path / "src.raw", MiB, [(0, b"x")])
    result = run_cli_process("convert", "-f", "raw", *args, src, "-")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and says in result.stderr
