"""Writing container images: oci, oci-archive and docker-archive in every direction, with
recompression, flattening, retagging, and byte-identical repeat runs.

The source image is built in memory from entries (two layers: files with xattrs and
nanosecond times, a hardlink, a symlink, a device; then a whiteout and an opaque directory),
written as an OCI layout by our own writer, and converted from there.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest

import imgbridge
from imgbridge.errors import InvalidInputError, UnsupportedFeatureError
from imgbridge.model.image import ContainerImage, HistoryEntry, ImageConfig, Platform
from imgbridge.model.tree import Entry, EntryType, Layer
from imgbridge.output import AtomicOutput
from imgbridge.progress import no_progress
from imgbridge.registry import default_registry

NS = 1_000_000_000


def _file(path: str, data: bytes, **kw: object) -> Entry:
    return Entry(path, EntryType.FILE, size=len(data), opener=lambda: io.BytesIO(data),
                 **kw)  # type: ignore[arg-type]


def _source_image() -> ContainerImage:
    lower = [
        Entry("etc", EntryType.DIR, mode=0o755, mtime=5 * NS),
        _file("etc/hello", b"hello\n", mode=0o4755, uid=1000, gid=100, mtime=1234567891 * NS + 5,
              xattrs={"user.k": b"v\xff\x00", "security.capability": b"\x01\x02"}),
        Entry("etc/hard", EntryType.HARDLINK, link_target="etc/hello"),
        _file("etc/gone", b"bye\n"),
        Entry("usr/bin/link", EntryType.SYMLINK, link_target="../../etc/hello"),
        Entry("dev/null", EntryType.CHAR, mode=0o666, devmajor=1, devminor=3),
        Entry("var", EntryType.DIR),
        _file("var/old", b"old"),
    ]
    upper = [
        Entry("etc/gone", EntryType.WHITEOUT),
        Entry("var", EntryType.OPAQUE),
        _file("var/new", b"\x00\x01" * 3000, mtime=-3 * NS // 2),
    ]
    config = ImageConfig(
        platform=Platform("linux", "amd64"), cmd=["/bin/sh"], env=["FOO=bar"],
        working_dir="/etc", labels={"k": "v"}, created="2024-01-02T03:04:05Z",
        history=[HistoryEntry(created_by="lower"), HistoryEntry(created_by="upper"),
                 HistoryEntry(comment="configured", empty_layer=True)])
    return ContainerImage(layers=[Layer(lower), Layer(upper)], config=config,
                          annotations={"org.example.note": "kept"}, tags=["ex/img:t"])


@pytest.fixture
def src(tmp_path: Path) -> Path:
    path = tmp_path / "src"
    with AtomicOutput(str(path), directory=True, sync=False) as out:
        default_registry().get("oci").create(out, _source_image(), {}, no_progress)
        out.commit()
    return path


def _tree(image: ContainerImage) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for e in image.flatten():
        content = b""
        if e.type is EntryType.FILE:
            with e.open() as f:
                content = f.read()
        out[e.path] = (e.type, e.mode, e.uid, e.gid, e.mtime, e.link_target, e.xattrs,
                       e.devmajor, e.devminor, content)
    return out


def _convert(src: str | Path, dst: Path, fmt: str, **kw: object) -> Path:
    imgbridge.convert(str(src), str(dst), output_format=fmt, sync=False, **kw)  # type: ignore[arg-type]
    return dst


def test_round_trip_through_every_format_keeps_config_history_tags(src: Path,
                                                                   tmp_path: Path) -> None:
    with imgbridge.open(src) as original:
        want_tree = _tree(original)
        want_cfg = original.config.to_oci_json()
        assert original.tags == ["ex/img:t"]
    a = _convert(src, tmp_path / "a.tar", "oci-archive")
    d = _convert(a, tmp_path / "d.tar", "docker-archive")
    back = _convert(d, tmp_path / "back", "oci")
    a2 = _convert(back, tmp_path / "a2.tar", "oci-archive")
    for path in (a, d, back, a2):
        with imgbridge.open(path) as image:
            assert image.tags == ["ex/img:t"], path
            assert image.config.to_oci_json() == want_cfg, path
            assert [h.created_by for h in image.config.history] == ["lower", "upper", None]
            assert _tree(image) == want_tree, path
    info = imgbridge.inspect(a)
    assert info["Annotations"] == {"org.example.note": "kept"}
    # docker-archive stores layers uncompressed; the OCI side keeps what it was given.
    assert {x["Compression"] for x in imgbridge.inspect(d)["LayerDetails"]} == {"none"}
    assert {x["Compression"] for x in info["LayerDetails"]} == {"gzip"}


def test_copy_as_stored_keeps_every_digest(src: Path, tmp_path: Path) -> None:
    a = _convert(src, tmp_path / "a.tar", "oci-archive")
    again = _convert(a, tmp_path / "again", "oci")
    ours, theirs = imgbridge.inspect(src), imgbridge.inspect(again)
    assert ours["Digest"] == theirs["Digest"] == imgbridge.inspect(a)["Digest"]
    assert ours["ConfigDigest"] == theirs["ConfigDigest"]
    assert sorted(os.listdir(src / "blobs" / "sha256")) == \
        sorted(os.listdir(again / "blobs" / "sha256"))


@pytest.mark.parametrize("codec", ["zstd", "none", "gzip"])
def test_recompression_changes_digests_and_keeps_diff_ids(src: Path, tmp_path: Path,
                                                         codec: str) -> None:
    before = imgbridge.inspect(src)
    out = _convert(src, tmp_path / "z.tar", "oci-archive",
                   options={"compression": codec, "level": "1" if codec != "none" else ""})
    after = imgbridge.inspect(out)
    assert {x["Compression"] for x in after["LayerDetails"]} == {codec}
    assert [x["DiffID"] for x in after["LayerDetails"]] == \
        [x["DiffID"] for x in before["LayerDetails"]]
    assert after["Layers"] != before["Layers"]
    assert after["ConfigDigest"] == before["ConfigDigest"]  # the config did not change
    with imgbridge.open(src) as a, imgbridge.open(out) as b:
        assert _tree(a) == _tree(b)


def test_flatten_applies_whiteouts_opaque_and_hardlinks(src: Path, tmp_path: Path) -> None:
    out = _convert(src, tmp_path / "flat.tar", "docker-archive", flatten=True,
                   tags=["ex/flat:1"])
    with imgbridge.open(src) as original, imgbridge.open(out) as flat:
        assert len(flat.layers) == 1
        assert _tree(flat) == _tree(original)
        assert flat.tags == ["ex/flat:1"]
        entries = {e.path: e for e in flat.layers[0].iter_entries()}
        assert "etc/gone" not in entries and "var/old" not in entries
        assert not any(e.type in (EntryType.WHITEOUT, EntryType.OPAQUE)
                       for e in entries.values())
        # the first path of the inode in sorted order carries it; the other links to it
        assert entries["etc/hard"].type is EntryType.FILE
        assert entries["etc/hello"].type is EntryType.HARDLINK
        assert entries["etc/hello"].link_target == "etc/hard"
        assert entries["etc/hard"].mtime == 1234567891 * NS + 5
        assert entries["var/new"].mtime == -3 * NS // 2
        assert entries["etc/hard"].xattr_map()["user.k"] == b"v\xff\x00"
        assert list(entries) == sorted(entries, key=lambda p: p.split("/"))
        history = flat.config.history
        assert history[-1].created_by == "imgbridge convert --flatten"
        assert [h.empty_layer for h in history] == [True, True, True, False]
        assert len(flat.config.diff_ids) == 1


@pytest.mark.parametrize("fmt,name", [("oci-archive", "x.tar"), ("docker-archive", "x.tar"),
                                      ("oci", "x")])
@pytest.mark.parametrize("flatten", [False, True])
def test_two_runs_are_byte_identical(src: Path, tmp_path: Path, fmt: str, name: str,
                                     flatten: bool) -> None:
    opts = {"compression": "gzip"} if fmt != "docker-archive" else {}
    (tmp_path / "1").mkdir()
    (tmp_path / "2").mkdir()
    one = _convert(src, tmp_path / "1" / name, fmt, options=opts, flatten=flatten)
    two = _convert(src, tmp_path / "2" / name, fmt, options=opts, flatten=flatten)

    def content(p: Path) -> dict[str, bytes]:
        if p.is_file():
            return {"": p.read_bytes()}
        return {str(f.relative_to(p)): f.read_bytes() for f in sorted(p.rglob("*"))
                if f.is_file()}

    assert content(one) == content(two)


def test_archive_metadata_comes_first_with_fixed_times(src: Path, tmp_path: Path) -> None:
    for fmt, first in (("oci-archive", "oci-layout"), ("docker-archive", "manifest.json")):
        out = _convert(src, tmp_path / f"{fmt}.tar", fmt, tags=["ex/img:2"])
        with tarfile.open(out) as tar:
            members = tar.getmembers()
        assert members[0].name == first
        assert {(m.mtime, m.uid, m.gid) for m in members} == {(0, 0, 0)}
        # detected without -f: the probe sees the metadata in the first headers
        assert imgbridge.inspect(out)["format"] == fmt
    with tarfile.open(tmp_path / "docker-archive.tar") as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    assert manifest[0]["RepoTags"] == ["ex/img:2"]
    index = json.loads((_convert(src, tmp_path / "lay", "oci", tags=["ex/img:3", "extra"])
                        / "index.json").read_text())
    assert [m["annotations"]["org.opencontainers.image.ref.name"]
            for m in index["manifests"]] == ["3", "extra"]


def test_bad_requests_fail_cleanly_and_leave_nothing(src: Path, tmp_path: Path) -> None:
    cases: list[tuple[dict[str, Any], str, type[Exception]]] = [
        ({"options": {"compression": "lz4"}}, "docker-archive", InvalidInputError),
        ({"options": {"compression": "zstd"}}, "docker-archive", UnsupportedFeatureError),
        ({"options": {"compression": "gzip", "level": "9"}}, "oci-archive", InvalidInputError),
        ({"options": {"level": "2"}}, "oci-archive", InvalidInputError),
        ({"tags": ["bare"]}, "docker-archive", InvalidInputError),
        ({"tags": ["Not A Tag"]}, "oci-archive", InvalidInputError),
        ({"compress": True}, "oci-archive", InvalidInputError),
    ]
    for kwargs, fmt, error in cases:
        with pytest.raises(error):
            _convert(src, tmp_path / "out.tar", fmt, **kwargs)
        assert os.listdir(tmp_path) == ["src"], kwargs
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(InvalidInputError, match="already exists"):
        _convert(src, tmp_path / "full", "oci")
    with pytest.raises(UnsupportedFeatureError, match="image \\(oci\\) to disk"):
        _convert(src, tmp_path / "o.qcow2", "qcow2")


def test_a_corrupt_blob_is_caught_while_copying(src: Path, tmp_path: Path) -> None:
    layer = imgbridge.inspect(src)["Layers"][0]
    blob = src / "blobs" / "sha256" / layer.partition(":")[2]
    data = bytearray(blob.read_bytes())
    data[-9] ^= 0xFF  # inside the gzip trailer's CRC: same size, different digest
    blob.write_bytes(bytes(data))
    with pytest.raises(imgbridge.ImgBridgeError, match=r"hash|digest"):
        _convert(src, tmp_path / "o.tar", "oci-archive")
    assert not (tmp_path / "o.tar").exists()
    assert [p for p in os.listdir(tmp_path) if p != "src"] == []


def test_plan_describes_image_conversion(src: Path, tmp_path: Path) -> None:
    text = imgbridge.api.plan(str(src), str(tmp_path / "x.tar"), output_format="docker-archive")
    assert "tree_to_tree" in text and "docker-archive" in text
