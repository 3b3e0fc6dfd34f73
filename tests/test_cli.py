"""The CLI's promises: one line on stderr for bad input, the right exit codes, no leftovers."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import CliResult, make_sparse_file, run_cli_process

from imgbridge.cli import cli as click_group

MiB = 1 << 20
Cli = Callable[..., CliResult]


@pytest.fixture
def disk(workdir: Path) -> Path:
    return make_sparse_file(workdir / "disk.raw", 2 * MiB, [(MiB, b"data" * 1024)])


def _assert_one_line_error(result: CliResult | subprocess.CompletedProcess[str],
                           code: int = 1) -> None:
    returncode = result.code if isinstance(result, CliResult) else result.returncode
    err = result.err if isinstance(result, CliResult) else result.stderr
    assert returncode == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("imgbridge: error: ")
    assert "Traceback" not in err


@pytest.mark.parametrize("case", ["missing", "directory", "unknown -O", "unknown -f",
                                  "unwritable destination", "destination under a file",
                                  "guessed raw", "bad -o", "same file"])
def test_bad_input_gives_one_line_and_leaves_nothing(cli: Cli, disk: Path, workdir: Path,
                                                     case: str) -> None:
    (workdir / "adir").mkdir()
    before = sorted(os.listdir(workdir))
    args = {
        "missing": ["convert", "-f", "raw", "nope.raw", "out.raw"],
        "directory": ["convert", "adir", "out.raw"],
        "unknown -O": ["convert", "-f", "raw", "disk.raw", "out.raw", "-O", "floppy"],
        "unknown -f": ["convert", "-f", "floppy", "disk.raw", "out.raw"],
        "unwritable destination": ["convert", "-f", "raw", "disk.raw", "/proc/imgbridge.raw"],
        "destination under a file": ["convert", "-f", "raw", "disk.raw", "disk.raw/x.raw"],
        "guessed raw": ["convert", "disk.raw", "out.raw"],
        "bad -o": ["convert", "-f", "raw", "disk.raw", "out.raw", "-o", "preallocation"],
        "same file": ["convert", "-f", "raw", "disk.raw", "disk.raw"],
    }[case]
    _assert_one_line_error(cli(*args))
    assert sorted(os.listdir(workdir)) == before


def test_errors_in_a_real_process_have_no_traceback(workdir: Path) -> None:
    result = run_cli_process("inspect", "nope.qcow2", cwd=workdir)
    _assert_one_line_error(result)
    assert "nope.qcow2: no such file" in result.stderr


def test_debug_shows_the_traceback(workdir: Path) -> None:
    result = run_cli_process("--debug", "inspect", "nope.qcow2", cwd=workdir)
    assert result.returncode == 1
    assert "Traceback" in result.stderr


def test_usage_errors_are_one_line(cli: Cli) -> None:
    _assert_one_line_error(cli("convert", "only-one-argument"))
    _assert_one_line_error(cli("frobnicate"))


def test_compare_exit_codes(cli: Cli, disk: Path, workdir: Path) -> None:
    same = make_sparse_file(workdir / "same.raw", 2 * MiB, [(MiB, b"data" * 1024)])
    other = make_sparse_file(workdir / "other.raw", 2 * MiB, [(MiB + 10, b"x")])
    assert cli("compare", "-f", "raw", "-F", "raw", disk, same).code == 0
    differ = cli("compare", "-f", "raw", "-F", "raw", disk, other)
    assert differ.code == 1 and "Content mismatch at offset 1048576!" in differ.out
    _assert_one_line_error(cli("compare", disk, "missing.raw"), code=2)
    _assert_one_line_error(cli("compare", disk), code=2)


def test_check_raw_has_nothing_to_check(cli: Cli, disk: Path) -> None:
    result = cli("check", "-f", "raw", disk)
    assert result.code == 0 and "no metadata to check" in result.out
    assert '"supported": false' in cli("check", "-f", "raw", "--json", disk).out


def test_convert_plan_and_option_help(cli: Cli, disk: Path, workdir: Path) -> None:
    plan = cli("convert", "--plan", "-f", "raw", disk, "out.raw")
    assert plan.code == 0 and "disk_to_disk" in plan.out
    assert not (workdir / "out.raw").exists()
    helped = cli("convert", "-f", "raw", disk, "out.raw", "-o", "help")
    assert helped.code == 0 and "preallocation" in helped.out


def test_convert_with_progress_reports_to_the_end(cli: Cli, disk: Path, workdir: Path) -> None:
    result = cli("convert", "-f", "raw", "-p", disk, "copy.img")
    assert result.code == 0, result.err
    assert (workdir / "copy.img").read_bytes() == disk.read_bytes()


def test_inspect_human_and_json(cli: Cli, disk: Path) -> None:
    human = cli("inspect", disk)
    assert "file format: raw (guessed)" in human.out and "virtual size: 2 MiB" in human.out
    assert '"virtual-size": 2097152' in cli("inspect", "--json", "-f", "raw", disk).out


def test_formats_lists_raw(cli: Cli) -> None:
    import json

    listed = json.loads(cli("formats", "--json").out)
    raw = next(f for f in listed if f["name"] == "raw")
    assert raw["kind"] == "disk" and raw["capabilities"]["read"] and raw["capabilities"]["write"]


@pytest.mark.parametrize("command", sorted(click_group.commands))
def test_every_command_has_help_with_an_example(cli: Cli, command: str) -> None:
    result = cli(command, "--help")
    assert result.code == 0
    assert "Example: imgbridge " + command in " ".join(result.out.split())


def test_help_and_version_import_no_format() -> None:
    code = (
        "import sys; from imgbridge.cli import main; main(['--help']); main(['--version']);"
        "loaded = [m for m in sys.modules if m.startswith('imgbridge.formats') "
        "or m.startswith('construct') or m.startswith('tqdm') or m == 'imgbridge.api'];"
        "print('LOADED', loaded)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert "LOADED []" in out


def test_interrupted_conversion_leaves_nothing(workdir: Path) -> None:
    import signal
    import time

    big = make_sparse_file(workdir / "big.raw", 1 << 30, [])
    with open(big, "r+b") as f:  # enough data that the copy takes a moment
        f.write(os.urandom(64 * MiB))
    proc = subprocess.Popen([sys.executable, "-m", "imgbridge", "convert", "-f", "raw",
                             "-O", "raw", "-o", "preallocation=full", str(big), "out.raw"],
                            cwd=workdir, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not any(n.endswith(".part") for n in os.listdir(workdir)):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert sorted(os.listdir(workdir)) == ["big.raw"]
