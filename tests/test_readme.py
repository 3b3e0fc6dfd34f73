"""The README's promises hold: every example runs as written, the formats table is complete."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

import imgbridge

README = (REPO / "README.md").read_text()


def _blocks(marker: str) -> list[tuple[str, str]]:
    pattern = rf"<!-- readme:{marker} -->\n```(\w+)\n(.*?)```"
    return [(m.group(1), m.group(2)) for m in re.finditer(pattern, README, re.S)]


def _imgbridge() -> list[str]:
    exe = shutil.which("imgbridge")
    return [exe] if exe else [sys.executable, "-m", "imgbridge"]


@pytest.fixture
def checkout_copy(tmp_path: Path) -> Path:
    """A folder laid out like the repository's top, with the fixtures the examples use."""
    shutil.copytree(REPO / "fixtures", tmp_path / "fixtures")
    return tmp_path


def _run_shell_line(line: str, cwd: Path) -> None:
    for command in line.split("&&"):
        argv = shlex.split(command)
        if argv[0] == "pip":
            continue  # the install step is what CI itself does before running the tests
        assert argv[0] == "imgbridge", f"README example runs something else: {line}"
        result = subprocess.run(_imgbridge() + argv[1:], cwd=cwd, capture_output=True, text=True)
        assert result.returncode == 0, f"{command.strip()}\n{result.stdout}{result.stderr}"


EXAMPLES = _blocks("example")


def test_the_readme_has_the_two_setup_blocks() -> None:
    (main_lang, main_job), = _blocks("main-job")
    (test_lang, tests), = _blocks("test-command")
    assert main_lang == test_lang == "bash"
    assert main_job.splitlines()[0].startswith("pip install")
    assert main_job.splitlines()[1].startswith("imgbridge ")
    assert tests.splitlines() == ["pip install '.[test]'", "pytest"]


def test_the_main_job_runs(checkout_copy: Path) -> None:
    (_, main_job), = _blocks("main-job")
    for line in main_job.strip().splitlines():
        _run_shell_line(line, checkout_copy)


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(index: int, checkout_copy: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    lang, body = EXAMPLES[index]
    if lang == "bash":
        for line in body.strip().splitlines():
            _run_shell_line(line, checkout_copy)
    else:
        assert lang == "python"
        monkeypatch.chdir(checkout_copy)
        exec(compile(body, f"README example {index}", "exec"), {})


def test_every_command_has_a_readme_example() -> None:
    from imgbridge.cli import cli

    shown = {shlex.split(line)[1] for lang, body in EXAMPLES if lang == "bash"
             for line in body.strip().splitlines()}
    assert set(cli.commands) <= shown


def test_every_library_entry_point_has_a_readme_example() -> None:
    python = "\n".join(body for lang, body in EXAMPLES if lang == "python")
    for name in ("open", "inspect", "inspect_chain", "convert", "create", "compare", "check",
                 "allocation_map", "list_formats", "list_files", "read_file", "extract",
                 "diff"):
        assert f"imgbridge.{name}(" in python, name


def test_the_formats_table_lists_every_format() -> None:
    rows = re.findall(r"^\| (\S+) \| (\w+) \| (yes|no) \| (yes|no) \|", README, re.M)
    table = {name: (kind, read, write) for name, kind, read, write in rows}
    for spec in imgbridge.list_formats():
        assert spec.name in table, f"README's formats table lacks {spec.name}"
        kind, read, write = table[spec.name]
        assert (kind, read == "yes", write == "yes") == (
            spec.kind.value, spec.can("read"), spec.can("create"))
