"""``imgbridge diff``: added, removed and changed paths between two container images."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import FIXTURES, CliResult
from imgbridge.converters.tree_diff import diff_trees

import imgbridge
from imgbridge.errors import InvalidInputError
from imgbridge.model.image import ContainerImage, ImageConfig, Platform
from imgbridge.model.tree import Entry, EntryType, Layer
from imgbridge.output import AtomicOutput
from imgbridge.progress import no_progress
from imgbridge.registry import default_registry

NS = 1_000_000_000


def _file(path: str, data: bytes, **kw: object) -> Entry:
    return Entry(path, EntryType.FILE, size=len(data), opener=lambda: io.BytesIO(data),
                 **kw)  # type: ignore[arg-type]


def _write(path: Path, *layers: list[Entry], fmt: str = "oci") -> Path:
    image = ContainerImage(layers=[Layer(list(entries)) for entries in layers],
                           config=ImageConfig(platform=Platform("linux", "amd64")))
    with AtomicOutput(str(path), directory=fmt == "oci", sync=False) as out:
        default_registry().get(fmt).create(out, image, {}, no_progress)
        out.commit()
    return path


BASE = [
    Entry("etc", EntryType.DIR),
    _file("etc/same", b"same\n", mtime=1 * NS),
    _file("etc/mode", b"m\n", mode=0o644),
    _file("etc/content", b"aaaa"),
    _file("etc/grown", b"short"),
    _file("etc/owner", b"o", uid=0, gid=0),
    Entry("etc/link", EntryType.SYMLINK, link_target="same"),
    _file("etc/kind", b"k"),
    Entry("old", EntryType.DIR),
    _file("old/a", b"a"),
    _file("old/sub/b", b"b"),
]


@pytest.fixture
def images(tmp_path: Path) -> tuple[Path, Path]:
    a = _write(tmp_path / "a", BASE)
    # B is A plus an upper layer (so flattening is part of what is compared) with every kind
    # of change, and one that is not one: a new mtime on identical content.
    upper = [
        Entry("old", EntryType.WHITEOUT),
        _file("etc/same", b"same\n", mtime=99 * NS),
        _file("etc/mode", b"m\n", mode=0o755),
        _file("etc/content", b"bbbb"),
        _file("etc/grown", b"much longer"),
        _file("etc/owner", b"o", uid=1000, gid=100),
        Entry("etc/link", EntryType.SYMLINK, link_target="mode"),
        Entry("etc/kind", EntryType.SYMLINK, link_target="same"),
        Entry("new", EntryType.DIR),
        _file("new/file", b"n"),
    ]
    b = _write(tmp_path / "b.tar", BASE, upper, fmt="docker-archive")
    return a, b


EXPECTED = [
    "M /etc/content (content)",
    "M /etc/grown (content, size 5->11)",
    "M /etc/kind (type file->symlink)",
    "M /etc/link (link same->mode)",
    "M /etc/mode (mode 0644->0755)",
    "M /etc/owner (owner 0:0->1000:100)",
    "A /new",
    "A /new/file",
    "D /old",
    "D /old/a",
    "D /old/sub",
    "D /old/sub/b",
]


def test_every_kind_of_change_is_reported_and_nothing_else(images: tuple[Path, Path]) -> None:
    a, b = images
    changes = imgbridge.diff(a, b)
    assert [c.describe() for c in changes] == EXPECTED
    assert imgbridge.diff(a, a) == []
    reverse = imgbridge.diff(b, a)
    assert [c.describe() for c in reverse if c.kind != "M"] == [
        "D /new", "D /new/file", "A /old", "A /old/a", "A /old/sub", "A /old/sub/b"]


def test_the_cli_prints_lines_or_json_and_exits_like_diff(
        images: tuple[Path, Path], cli: Callable[..., CliResult]) -> None:
    a, b = images
    result = cli("diff", a, f"docker-archive:{b}")
    assert (result.code, result.out.splitlines()) == (1, EXPECTED)
    result = cli("diff", "--json", a, b)
    assert result.code == 1
    items = json.loads(result.out)
    assert [i["path"] for i in items] == [line.split()[1] for line in EXPECTED]
    content = items[0]
    assert content["change"] == "modified" and content["fields"] == ["content"]
    assert content["before"]["sha256"] != content["after"]["sha256"]
    assert content["before"]["size"] == 4 and content["before"]["mode"] == "0644"
    assert items[6] == {"path": "/new", "change": "added",
                        "after": {"type": "dir", "mode": "0755", "uid": 0, "gid": 0}}
    assert (cli("diff", a, a).code, cli("diff", a, a).out) == (0, "")
    assert cli("diff", "--json", a, a).out.strip() == "[]"


def test_errors_are_one_line_with_exit_2(images: tuple[Path, Path], tmp_path: Path,
                                         cli: Callable[..., CliResult]) -> None:
    a, _ = images
    for other, message in ((FIXTURES / "small.qcow2", "no partition table and no filesystem"),
                           (FIXTURES / "small.raw", "no partition table and no filesystem"),
                           (tmp_path / "missing", "no such file")):
        result = cli("diff", a, other)
        assert result.code == 2 and result.out == ""
        assert result.err.count("\n") == 1 and message in result.err, result.err
    with pytest.raises(InvalidInputError, match="no filesystem that imgbridge can read"):
        imgbridge.diff(FIXTURES / "small.qcow2", a)
    with pytest.raises(InvalidInputError):
        imgbridge.diff(a, FIXTURES / "small.raw")


def test_files_of_different_sizes_are_never_read() -> None:
    opened: list[str] = []

    def tracked(path: str, data: bytes) -> Entry:
        def opener() -> io.BytesIO:
            opened.append(path)
            return io.BytesIO(data)
        return Entry(path, EntryType.FILE, size=len(data), opener=opener)

    changes = diff_trees([tracked("x", b"12"), tracked("y", b"ab")],
                         [tracked("x", b"123"), tracked("y", b"ab")])
    assert [c.describe() for c in changes] == ["M /x (content, size 2->3)"]
    assert opened == ["y", "y"]  # equal sizes: both hashed; x never opened


def test_hardlinks_compare_their_target_and_xattrs_count() -> None:
    a = [_file("f", b"1"), Entry("g", EntryType.HARDLINK, link_target="f"),
         _file("x", b"", xattrs={"user.k": b"1"})]
    b = [_file("f", b"1"), _file("g", b"1"), _file("x", b"", xattrs={"user.k": b"2"})]
    assert [c.describe() for c in diff_trees(a, b)] == [
        "M /g (type hardlink->file)", "M /x (xattrs)"]


def test_a_flattened_copy_equals_its_source(tmp_path: Path) -> None:
    flat = tmp_path / "flat.tar"
    imgbridge.convert(f"oci:{FIXTURES / 'small-oci'}", flat, output_format="oci-archive",
                      flatten=True, sync=False)
    assert imgbridge.diff(FIXTURES / "small-oci", flat) == []
    # The fixture's upper layer deletes /etc/gone and adds /etc/motd: diff against a copy of
    # the lower layer alone finds exactly that (the copy is made by our own writer).
    with imgbridge.open(FIXTURES / "small-oci") as source:
        lower = _write(tmp_path / "lower", list(source.layers[0].iter_entries()))
    assert [c.describe() for c in imgbridge.diff(lower, FIXTURES / "small-oci")] == [
        "D /etc/gone", "A /etc/motd"]
