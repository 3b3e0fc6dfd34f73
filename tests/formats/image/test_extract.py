"""Extracting an image's files: nothing is ever written outside OUT, whatever the image holds.

Hostile trees are fed both straight to the extractor (entries built by hand, in the order a
tar would give them) and through a real OCI layout with hand-made tar layers, via the library
and the CLI.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import FIXTURES, CliResult
from imgbridge.converters.tree_to_dir import extract_tree

import imgbridge
from imgbridge.errors import InvalidImageError, InvalidInputError
from imgbridge.model.tree import Entry, EntryType

Cli = Callable[..., CliResult]


def _file(path: str, data: bytes, **kw: Any) -> Entry:
    return Entry(path, EntryType.FILE, size=len(data), opener=lambda: io.BytesIO(data), **kw)


def _link(path: str, target: str, kind: EntryType = EntryType.SYMLINK) -> Entry:
    return Entry(path, kind, link_target=target)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to OUT that must stay empty."""
    d = tmp_path / "outside"
    d.mkdir()
    return d


def _all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ---------------------------------------------------------------------------------------------
# hostile trees, straight to the extractor


def test_symlinked_parent_is_never_followed(tmp_path: Path, outside: Path) -> None:
    out = tmp_path / "out"
    report = extract_tree([_link("a", str(outside)), _file("a/passwd", b"owned\n"),
                           _link("etc", "/etc"), _file("etc/passwd", b"owned\n")], out)
    assert _all_files(outside) == []
    assert b"owned" not in Path("/etc/passwd").read_bytes()
    assert [p for p, _ in report.refused] == ["a/passwd", "etc/passwd"]
    assert "its parent /a is a symbolic link" in report.refused[0][1]
    # The symlinks themselves are data: created verbatim, absolute target included.
    assert os.readlink(out / "a") == str(outside) and os.readlink(out / "etc") == "/etc"
    assert any("refused 2 unsafe entries" in line for line in report.summary())


def test_relative_escaping_symlink_is_data_only(tmp_path: Path, outside: Path) -> None:
    out = tmp_path / "out"
    report = extract_tree([Entry("d", EntryType.DIR), _link("d/a", "../../outside"),
                           _file("d/a/x", b"no"), _file("d/a2", b"fine")], out)
    assert os.readlink(out / "d" / "a") == "../../outside"
    assert _all_files(outside) == []
    assert [p for p, _ in report.refused] == ["d/a/x"]
    assert (out / "d" / "a2").read_bytes() == b"fine"


def test_file_is_never_written_through_an_existing_symlink(tmp_path: Path,
                                                           outside: Path) -> None:
    # A later member for the same path replaces the symlink; it must not open its target.
    victim = outside / "victim"
    victim.write_bytes(b"original")
    out = tmp_path / "out"
    extract_tree([_link("f", str(victim)), _file("f", b"replaced")], out)
    assert victim.read_bytes() == b"original"
    assert not (out / "f").is_symlink() and (out / "f").read_bytes() == b"replaced"


def test_hardlinks_only_to_files_this_extraction_wrote(tmp_path: Path, outside: Path) -> None:
    secret = outside / "secret"
    secret.write_bytes(b"host data")
    out = tmp_path / "out"
    report = extract_tree([
        _link("s", str(secret)),
        _link("via-symlink-dir", str(outside)),
        _link("h1", "via-symlink-dir/secret", EntryType.HARDLINK),   # through a symlink
        _link("h2", "never/extracted", EntryType.HARDLINK),          # not extracted
        _link("h3", "s", EntryType.HARDLINK),                        # the symlink itself
        _file("f", b"mine", mode=0o640),
        _link("h4", "f", EntryType.HARDLINK),
    ], out)
    assert [p for p, _ in report.refused] == ["h1", "h2"]
    assert not (out / "h1").exists() and not (out / "h2").exists()
    # A hardlink to a symlink links the symlink inode, never the host file it names.
    assert (out / "h3").is_symlink() and os.readlink(out / "h3") == str(secret)
    assert secret.stat().st_nlink == 1
    assert (out / "h4").stat().st_ino == (out / "f").stat().st_ino
    assert (out / "f").stat().st_nlink == 2


def test_replacing_a_directory_removes_only_inside_out(tmp_path: Path, outside: Path) -> None:
    (outside / "keep").write_bytes(b"keep")
    out = tmp_path / "out"
    report = extract_tree([Entry("d", EntryType.DIR), _link("d/l", str(outside)),
                           _file("d/f", b"x"), _file("d", b"now a file")], out)
    assert report.refused == []
    assert (out / "d").read_bytes() == b"now a file"
    assert (outside / "keep").read_bytes() == b"keep"


def test_dotdot_member_refused_by_the_reader(tmp_path: Path, outside: Path) -> None:
    layout = _Layout(tmp_path / "img")
    layout.image([_tar([("ok", b"1"), ("../outside/evil", b"2")])])
    with pytest.raises(InvalidImageError, match="climbs above the root"):
        imgbridge.extract(layout.root, tmp_path / "out", layer=0)
    assert _all_files(outside) == []


def test_devices_skipped_and_reported_when_not_root(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # CI runs as root: pretend not to be, as an unprivileged user would be.
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    out = tmp_path / "out"
    report = extract_tree([Entry("null", EntryType.CHAR, devmajor=1, devminor=3),
                           Entry("sda", EntryType.BLOCK, devmajor=8, devminor=0),
                           Entry("fifo", EntryType.FIFO, mode=0o600, uid=4242,
                                 gid=os.getegid()),
                           _file("owned", b"x", uid=7, gid=7)], out)
    assert report.devices == ["null", "sda"]
    assert not (out / "null").exists() and not (out / "sda").exists()
    assert stat.S_ISFIFO((out / "fifo").lstat().st_mode)
    assert report.owners == ["owned"]
    summary = "\n".join(report.summary())
    assert "skipped 2 device nodes" in summary and "ownership not kept for 1" in summary


@pytest.mark.skipif(os.geteuid() != 0, reason="creating device nodes needs root")
def test_devices_and_owners_as_root(tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = extract_tree([Entry("null", EntryType.CHAR, devmajor=1, devminor=3, mode=0o666),
                           _file("owned", b"x", uid=7, gid=8)], out)
    st = (out / "null").lstat()
    assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3
    assert stat.S_IMODE(st.st_mode) == 0o666
    assert ((out / "owned").stat().st_uid, (out / "owned").stat().st_gid) == (7, 8)
    assert report.complete


def test_metadata_is_kept(tmp_path: Path) -> None:
    out = tmp_path / "out"
    t = 1_700_000_000_123_456_789
    extract_tree([
        Entry("ro", EntryType.DIR, mode=0o555, mtime=t),  # read-only, yet gets children
        _file("ro/suid", b"#!", mode=0o4755, mtime=t + 1),
        Entry("tmp", EntryType.DIR, mode=0o1777, mtime=t + 2),
        _link("ro/l", "suid"),
    ], out)
    assert stat.S_IMODE((out / "ro").stat().st_mode) == 0o555
    assert stat.S_IMODE((out / "ro" / "suid").stat().st_mode) == 0o4755
    assert stat.S_IMODE((out / "tmp").stat().st_mode) == 0o1777
    assert (out / "ro").stat().st_mtime_ns == t
    assert (out / "ro" / "suid").stat().st_mtime_ns == t + 1
    assert (out / "tmp").stat().st_mtime_ns == t + 2
    os.chmod(out / "ro", 0o755)  # let pytest clean up as a non-root user


def test_xattrs_kept_or_reported(tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = extract_tree([_file("f", b"x", xattrs={"user.imgbridge": b"\x00v",
                                                    "bogus.namespace": b"v"})], out)
    # No filesystem accepts an unknown namespace: always reported, never fatal.
    assert ("f", "bogus.namespace") in report.xattrs
    if ("f", "user.imgbridge") not in report.xattrs:
        assert os.getxattr(out / "f", "user.imgbridge") == b"\x00v"


def test_out_must_be_empty(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_bytes(b"")
    with pytest.raises(InvalidInputError, match="not empty"):
        extract_tree([_file("x", b"y")], tmp_path / "full")
    assert (tmp_path / "full" / "x").read_bytes() == b""
    (tmp_path / "afile").write_bytes(b"")
    with pytest.raises(InvalidInputError, match="not a directory"):
        extract_tree([], tmp_path / "afile")
    (tmp_path / "empty").mkdir()
    assert extract_tree([_file("x", b"y")], tmp_path / "empty").written == 1
    with pytest.raises(InvalidInputError, match="parent directory does not exist"):
        extract_tree([], tmp_path / "no" / "such")


# ---------------------------------------------------------------------------------------------
# through an OCI layout: library and CLI


def _tar(members: list[tuple[str, bytes | str]]) -> bytes:
    """A tar: bytes are a file's content, str is a symlink target ("hard:" a hardlink)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, str):
                hard = data.startswith("hard:")
                info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
                info.linkname = data[5:] if hard else data
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class _Layout:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')

    def _put(self, data: bytes, media: str) -> dict[str, Any]:
        digest = hashlib.sha256(data).hexdigest()
        (self.root / "blobs" / "sha256" / digest).write_bytes(data)
        return {"mediaType": media, "digest": "sha256:" + digest, "size": len(data)}

    def image(self, layers: list[bytes]) -> None:
        descs = [self._put(gzip.compress(t), "application/vnd.oci.image.layer.v1.tar+gzip")
                 for t in layers]
        config = {"architecture": "amd64", "os": "linux", "rootfs": {
            "type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(t).hexdigest()
                                           for t in layers]}}
        cdesc = self._put(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json")
        mdesc = self._put(json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": cdesc, "layers": descs}).encode(),
            "application/vnd.oci.image.manifest.v1+json")
        (self.root / "index.json").write_text(json.dumps({"schemaVersion": 2,
                                                          "manifests": [mdesc]}))


def test_hostile_layer_through_the_cli(cli: Cli, tmp_path: Path, outside: Path) -> None:
    layout = _Layout(tmp_path / "img")
    layout.image([_tar([("a", str(outside)), ("a/passwd", b"owned"), ("ok", b"fine"),
                        ("h", "hard:a/passwd")])])
    result = cli("extract", "--layer", "0", layout.root, tmp_path / "out")
    assert result.code == 1
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imgbridge: warning: refused 2 unsafe")
    assert _all_files(outside) == []
    assert (tmp_path / "out" / "ok").read_bytes() == b"fine"
    # The flattened tree refuses the path through a symlink before writing anything.
    flat = cli("extract", layout.root, tmp_path / "out2")
    assert flat.code == 1 and "symbolic link" in flat.err and _all_files(outside) == []


def test_fixture_ls_cat_extract(cli: Cli, tmp_path: Path) -> None:
    image = FIXTURES / "small-oci"
    long = cli("ls", "-l", image, "/usr/bin")
    assert long.code == 0, long.err
    lines = long.out.splitlines()
    assert lines[0].startswith("lrwxrwxrwx") and lines[0].endswith(
        "/usr/bin/hello -> ../../etc/hello")
    assert lines[1].startswith("-rwsr-xr-x     0     0         20 1970-01-01 00:00 ")
    assert cli("ls", image).out.split() == ["/etc", "/usr"]
    assert "/etc/gone" not in cli("ls", "-R", image).out
    assert "/etc/gone (whiteout)" in cli("ls", "-l", "-R", "--layer", "1", image).out
    assert cli("cat", image, "/usr/bin/hello").out == "hello from the fixture\n"
    for bad, why in (("/etc", "is a dir"), ("/etc/gone", "no such file")):
        result = cli("cat", image, bad)
        assert result.code == 1 and result.out == "" and why in result.err
        assert len(result.err.strip().splitlines()) == 1
    assert cli("cat", "--layer", "0", image, "/etc/gone").out == "deleted in layer 1\n"
    result = cli("extract", image, tmp_path / "root")
    assert result.code == 0 and result.err == ""
    root = tmp_path / "root"
    assert sorted(_all_files(root)) == ["etc", "etc/hello", "etc/motd", "usr", "usr/bin",
                                        "usr/bin/hello", "usr/bin/tool", "usr/bin/tool-again"]
    assert (root / "usr/bin/tool").stat().st_ino == (root / "usr/bin/tool-again").stat().st_ino
    assert cli("extract", image, tmp_path / "root").code == 1  # not empty any more


def test_read_file_follows_symlinks_inside_the_image_only(tmp_path: Path) -> None:
    layout = _Layout(tmp_path / "img")
    layout.image([_tar([("etc/real", b"inside"), ("abs", "/etc/real"),
                        ("up", "../../../../etc/real"), ("dir", "/etc"),
                        ("loop1", "loop2"), ("loop2", "loop1"), ("host", "/etc/hostname")])])
    for path in ("abs", "up", "dir/real", "/dir/../etc/real"):
        assert b"".join(imgbridge.read_file(layout.root, path)) == b"inside", path
    with pytest.raises(InvalidInputError, match="too many levels"):
        imgbridge.read_file(layout.root, "loop1")
    with pytest.raises(InvalidInputError, match="no such file"):
        imgbridge.read_file(layout.root, "host")  # never the host's /etc/hostname
    names = [e.path for e in imgbridge.list_files(layout.root)]
    assert names == ["abs", "dir", "etc", "host", "loop1", "loop2", "up"]
