"""``extract`` to a tar stream (OUT ending in .tar, or -): the flattened tree (or one layer)
as a sorted PAX tar that carries owners, device nodes, xattrs and nanosecond mtimes whoever
runs us, written atomically to a file or sequentially to standard output."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import CliResult
from imgbridge.converters.tree_to_tar import write_tree_tar

import imgbridge
from imgbridge.errors import InvalidInputError
from imgbridge.model.tree import Entry, EntryType

Cli = Callable[..., CliResult]

_KIND = {EntryType.FILE: tarfile.REGTYPE, EntryType.DIR: tarfile.DIRTYPE,
         EntryType.SYMLINK: tarfile.SYMTYPE, EntryType.HARDLINK: tarfile.LNKTYPE,
         EntryType.CHAR: tarfile.CHRTYPE, EntryType.BLOCK: tarfile.BLKTYPE,
         EntryType.FIFO: tarfile.FIFOTYPE}


def _member(tf: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE,
            data: bytes = b"", **kw: Any) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    pax = kw.pop("pax", {})
    for key, value in kw.items():
        setattr(info, key, value)
    info.pax_headers = pax
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _layer0() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        _member(tf, "etc", tarfile.DIRTYPE, mode=0o755)
        _member(tf, "etc/conf", data=b"conf\n", mode=0o640, uid=1000, gid=100,
                pax={"SCHILY.xattr.user.note": "hello", "mtime": "1700000000.123456789",
                     "SCHILY.xattr.security.capability": "\x01\x00"})
        _member(tf, "etc/conf-link", tarfile.LNKTYPE, linkname="etc/conf", mode=0o640,
                uid=1000, gid=100)
        _member(tf, "etc/gone", data=b"bye\n", mode=0o644)
        _member(tf, "dev", tarfile.DIRTYPE, mode=0o755)
        _member(tf, "dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666)
        _member(tf, "dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0, mode=0o660, gid=6)
        _member(tf, "dev/pipe", tarfile.FIFOTYPE, mode=0o600)
        _member(tf, "bin", tarfile.SYMTYPE, linkname="usr/bin", mode=0o777)
        _member(tf, "usr/bin/tool", data=b"#!/bin/sh\n", mode=0o4755)
    return buf.getvalue()


def _layer1() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        _member(tf, "etc/.wh.gone", mode=0o644)
        _member(tf, "opt/new", data=b"new\n", mode=0o600, mtime=1)
    return buf.getvalue()


def _image(root: Path) -> Path:
    """An OCI layout with the two layers above, gzip-compressed."""
    (root / "blobs" / "sha256").mkdir(parents=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')

    def put(data: bytes, media: str) -> dict[str, Any]:
        digest = hashlib.sha256(data).hexdigest()
        (root / "blobs" / "sha256" / digest).write_bytes(data)
        return {"mediaType": media, "digest": "sha256:" + digest, "size": len(data)}

    layers = [_layer0(), _layer1()]
    descs = [put(gzip.compress(t, mtime=0), "application/vnd.oci.image.layer.v1.tar+gzip")
             for t in layers]
    config = {"architecture": "amd64", "os": "linux", "rootfs": {
        "type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(t).hexdigest()
                                       for t in layers]}}
    cdesc = put(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json")
    mdesc = put(json.dumps({"schemaVersion": 2,
                            "mediaType": "application/vnd.oci.image.manifest.v1+json",
                            "config": cdesc, "layers": descs}).encode(),
                "application/vnd.oci.image.manifest.v1+json")
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [mdesc]}))
    return root


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return _image(tmp_path / "img")


def _from_tar(data: bytes) -> list[tuple[Any, ...]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        out = []
        for m in tf.getmembers():
            xattrs = tuple(sorted((k[len("SCHILY.xattr."):], v.encode("utf-8", "surrogateescape"))
                                  for k, v in m.pax_headers.items()
                                  if k.startswith("SCHILY.xattr.")))
            content = tf.extractfile(m).read() if m.isreg() else None  # type: ignore[union-attr]
            mtime = m.pax_headers.get("mtime", str(int(m.mtime)))
            out.append((m.name.rstrip("/"), m.type, m.mode, m.uid, m.gid, m.linkname,
                        (m.devmajor, m.devminor) if m.ischr() or m.isblk() else None,
                        xattrs, content, mtime))
        return out


def _from_tree(entries: list[Entry]) -> list[tuple[Any, ...]]:
    out = []
    for e in entries:
        if e.path == "":
            continue
        content = None
        if e.type is EntryType.FILE:
            with e.open() as f:
                content = f.read()
        secs, rest = divmod(e.mtime, 1_000_000_000)
        mtime = f"{secs}.{rest:09d}".rstrip("0") if rest else str(secs)
        out.append((e.path, _KIND[e.type], e.mode, e.uid, e.gid, e.link_target,
                    (e.devmajor, e.devminor) if e.type in (EntryType.CHAR, EntryType.BLOCK)
                    else None, e.xattrs, content, mtime))
    return out


def test_tar_holds_the_flattened_tree(image: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # Not root: a directory extraction would skip the devices; the tar still carries them.
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(os, "getegid", lambda: 1000)
    out = tmp_path / "root.tar"
    report = imgbridge.extract(image, out, sync=False)
    data = out.read_bytes()
    with imgbridge.open(image) as img:
        expected = _from_tree(img.flatten())
    assert report.complete and report.written == len(expected) == 13
    ours = _from_tar(data)
    assert ours == expected
    names = [m[0] for m in ours]
    assert names == sorted(names, key=lambda p: p.split("/")) and "etc/gone" not in names
    by_name = {m[0]: m for m in ours}
    assert by_name["dev/null"][1:3] == (tarfile.CHRTYPE, 0o666)
    assert by_name["dev/null"][6] == (1, 3) and by_name["dev/sda"][6] == (8, 0)
    assert by_name["etc/conf"][7] == (("security.capability", b"\x01\x00"),
                                      ("user.note", b"hello"))
    assert by_name["etc/conf"][9] == "1700000000.123456789"
    assert by_name["etc/conf-link"][1] == tarfile.LNKTYPE
    assert by_name["etc/conf-link"][5] == "etc/conf"
    assert by_name["usr/bin/tool"][2] == 0o4755
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".part")]
    # The same image twice: byte-identical.
    again = tmp_path / "again.tar"
    imgbridge.extract(image, again, sync=False)
    assert again.read_bytes() == data


def test_gnu_tar_reads_it(image: Path, tmp_path: Path) -> None:
    gnu = shutil.which("tar")
    if gnu is None:
        pytest.skip("GNU tar is not installed")
    out = tmp_path / "root.tar"
    imgbridge.extract(image, out, sync=False)
    listing = subprocess.run([gnu, "--numeric-owner", "-tvf", out], capture_output=True,
                             text=True, check=True)
    assert listing.stderr == ""
    lines = {line.split()[-1] if " -> " not in line and " link to " not in line
             else line.split()[5]: line for line in listing.stdout.splitlines()}
    assert lines["dev/null"].startswith("crw-rw-rw- 0/0") and " 1,3 " in lines["dev/null"]
    assert lines["dev/sda"].startswith("brw-rw---- 0/6")
    assert lines["etc/conf"].startswith("-rw-r----- 1000/100")
    assert lines["etc/conf-link"].startswith("hrw-r----- 1000/100")
    assert lines["etc/conf-link"].endswith("link to etc/conf")
    assert lines["bin"].endswith("bin -> usr/bin") and lines["usr/bin/tool"][:10] == "-rwsr-xr-x"
    assert lines["dev/pipe"].startswith("prw-------")
    xattrs = subprocess.run([gnu, "--xattrs", "--xattrs-include=*", "-tvvf", out],
                            capture_output=True, text=True)
    if xattrs.returncode == 0 and "user.note" in xattrs.stdout:  # GNU tar built with xattrs
        assert "  x: 5 user.note\n" in xattrs.stdout


def test_layer_to_tar_keeps_its_whiteouts(image: Path, tmp_path: Path) -> None:
    out = tmp_path / "layer.tar"
    imgbridge.extract(image, out, layer=1, sync=False)
    with tarfile.open(out) as tf:
        assert tf.getnames() == ["etc/.wh.gone", "opt/new"]
    with pytest.raises(InvalidInputError, match="no layer 5"):
        imgbridge.extract(image, tmp_path / "bad.tar", layer=5)
    assert sorted(os.listdir(tmp_path)) == ["img", "layer.tar"]  # nothing half-written


def test_cli_to_a_file_and_to_stdout(cli: Cli, image: Path, tmp_path: Path) -> None:
    result = cli("extract", "--no-sync", image, tmp_path / "root.tar")
    assert result.code == 0 and result.out == "" and result.err == ""
    # -: the same bytes, sequentially on standard output (a real process, a real pipe).
    piped = subprocess.run([sys.executable, "-m", "imgbridge", "extract", os.fspath(image),
                            "-"], capture_output=True, check=True, timeout=120)
    assert piped.stderr == b""
    assert piped.stdout == (tmp_path / "root.tar").read_bytes()
    (tmp_path / "d.tar").mkdir()
    result = cli("extract", image, tmp_path / "d.tar")
    assert result.code == 1 and "is a directory" in result.err


def test_sockets_and_the_root_are_left_out() -> None:
    buf = io.BytesIO()
    report = write_tree_tar([Entry("", EntryType.DIR, mode=0o700),
                             Entry("run", EntryType.DIR),
                             Entry("run/sock", EntryType.SOCKET),
                             Entry("run/tty", EntryType.CHAR, devmajor=5, devminor=0)], buf)
    assert report.written == 2 and report.devices == ["run/sock"]
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tf:
        assert tf.getnames() == ["run", "run/tty"]
