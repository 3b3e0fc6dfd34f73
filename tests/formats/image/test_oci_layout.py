"""OCI layout, archive, docker-archive and dir: readers against hand-built (and broken) images.

The images here are written by the test itself so that each can be broken in one precise way;
tests/interop/test_oci_interop.py checks the readers against what umoci and skopeo write.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

import imgbridge
from imgbridge.errors import InvalidImageError, InvalidInputError

LAYER_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Layout:
    """Writes an OCI layout; ``put`` returns a descriptor."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')

    def put(self, data: bytes, media: str) -> dict[str, Any]:
        digest = _sha(data)
        (self.root / "blobs" / "sha256" / digest[7:]).write_bytes(data)
        return {"mediaType": media, "digest": digest, "size": len(data)}

    def image(self, layers: list[bytes], *, compress: str = "gzip", arch: str = "amd64",
              diff_ids: list[str] | None = None) -> dict[str, Any]:
        descs = []
        for tar in layers:
            if compress == "gzip":
                descs.append(self.put(gzip.compress(tar), LAYER_GZ))
            elif compress == "zstd":
                import zstandard

                descs.append(self.put(zstandard.ZstdCompressor().compress(tar), LAYER_ZSTD))
            else:
                descs.append(self.put(tar, "application/vnd.oci.image.layer.v1.tar"))
        config = {"architecture": arch, "os": "linux",
                  "config": {"Env": ["A=1"], "Cmd": ["/bin/sh"]},
                  "rootfs": {"type": "layers",
                             "diff_ids": diff_ids or [_sha(t) for t in layers]},
                  "history": [{"created_by": "test", "comment": "c"}]}
        cdesc = self.put(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json")
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": cdesc, "layers": descs}
        return self.put(json.dumps(manifest).encode(), manifest["mediaType"])

    def index(self, descs: list[dict[str, Any]]) -> None:
        (self.root / "index.json").write_text(json.dumps({"schemaVersion": 2,
                                                          "manifests": descs}))


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout(tmp_path / "img")


@pytest.mark.parametrize("compress", ["gzip", "zstd", "none"])
def test_reads_and_verifies(layout: Layout, compress: str) -> None:
    base, top = _tar({"a": b"one", "b": b"two"}), _tar({".wh.a": b"", "c": b"three"})
    desc = layout.image([base, top], compress=compress)
    layout.index([{**desc, "annotations": {"org.opencontainers.image.ref.name": "t"}}])
    info = imgbridge.inspect(layout.root)
    assert info["format"] == "oci" and info["Digest"] == desc["digest"]
    assert [d["Compression"] for d in info["LayerDetails"]] == [compress] * 2
    assert [d["UncompressedSize"] for d in info["LayerDetails"]] == [len(base), len(top)]
    assert info["LayerDetails"][1]["Whiteouts"] == 1
    assert info["Env"] == ["A=1"] and info["Config"]["Cmd"] == ["/bin/sh"]
    with imgbridge.open(f"oci:{layout.root}:t") as image:
        tree = {e.path: e for e in image.flatten()}
        assert sorted(tree) == ["b", "c"] and tree["c"].open().read() == b"three"


def _blob(layout: Layout, desc: dict[str, Any]) -> Path:
    return layout.root / "blobs" / "sha256" / desc["digest"][7:]


def _layer_desc(layout: Layout, manifest: dict[str, Any]) -> dict[str, Any]:
    data = json.loads(_blob(layout, manifest).read_bytes())
    return data["layers"][0]  # type: ignore[no-any-return]


def test_corrupted_layer_blob_names_it(layout: Layout) -> None:
    desc = layout.image([_tar({"a": b"x" * 100})], compress="none")
    layout.index([desc])
    path = _blob(layout, _layer_desc(layout, desc))
    data = bytearray(path.read_bytes())
    data[600] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidImageError, match="does not match its digest"):
        imgbridge.inspect(layout.root)


def test_wrong_diff_id(layout: Layout) -> None:
    desc = layout.image([_tar({"a": b"x"})], diff_ids=[_sha(b"something else")])
    layout.index([desc])
    with pytest.raises(InvalidImageError, match="diff_id"):
        imgbridge.inspect(layout.root)


def test_missing_blob(layout: Layout) -> None:
    desc = layout.image([_tar({"a": b"x"})])
    layout.index([desc])
    _blob(layout, _layer_desc(layout, desc)).unlink()
    with pytest.raises(InvalidImageError, match="missing"):
        imgbridge.inspect(layout.root)


def test_manifest_pointing_nowhere(layout: Layout) -> None:
    layout.index([{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                   "digest": "sha256:" + "0" * 64, "size": 10}])
    with pytest.raises(InvalidImageError, match="missing"):
        imgbridge.inspect(layout.root)


def test_absurd_manifest_size_refused_before_reading(layout: Layout) -> None:
    desc = layout.image([_tar({"a": b"x"})])
    layout.index([{**desc, "size": 1 << 40}])
    with pytest.raises(InvalidImageError, match="claims"):
        imgbridge.inspect(layout.root)


def test_media_type_and_magic_disagree(layout: Layout) -> None:
    tar = _tar({"a": b"x"})
    ldesc = layout.put(tar, LAYER_GZ)  # says gzip, is a plain tar
    config = {"architecture": "amd64", "os": "linux",
              "rootfs": {"type": "layers", "diff_ids": [_sha(tar)]}}
    cdesc = layout.put(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json")
    manifest = {"schemaVersion": 2, "config": cdesc, "layers": [ldesc],
                "mediaType": "application/vnd.oci.image.manifest.v1+json"}
    layout.index([layout.put(json.dumps(manifest).encode(), manifest["mediaType"])])
    with pytest.raises(InvalidImageError, match="promises gzip"):
        imgbridge.inspect(layout.root)


def test_platforms_listed_and_selected(layout: Layout) -> None:
    amd = layout.image([_tar({"amd": b"1"})], arch="amd64")
    arm = layout.image([_tar({"arm": b"2"})], arch="arm64")
    nested = layout.put(json.dumps({"schemaVersion": 2, "manifests": [
        {**arm, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}}]}).encode(),
        "application/vnd.oci.image.index.v1+json")
    layout.index([{**amd, "platform": {"os": "linux", "architecture": "amd64"}}, nested])
    info = imgbridge.inspect(layout.root)
    assert [m["Platform"] for m in info["Manifests"]] == ["linux/amd64", "linux/arm64/v8"]
    assert imgbridge.inspect(layout.root, platform="linux/arm64")["Architecture"] == "arm64"
    with pytest.raises(InvalidInputError, match="available: linux/amd64, linux/arm64/v8"):
        imgbridge.inspect(layout.root, platform="linux/s390x")


def test_unknown_ref(layout: Layout) -> None:
    desc = layout.image([_tar({"a": b"x"})])
    layout.index([{**desc, "annotations": {"org.opencontainers.image.ref.name": "t"}}])
    with pytest.raises(InvalidInputError, match="names: t"):
        imgbridge.inspect(f"oci:{layout.root}:nope")


def _tar_of_dir(root: Path, out: Path, first: list[str]) -> None:
    with tarfile.open(out, "w") as tf:
        for name in first:
            tf.add(root / name, arcname=name)


def test_oci_archive_and_hostile_member(layout: Layout, tmp_path: Path) -> None:
    desc = layout.image([_tar({"a": b"x"})])
    layout.index([desc])
    archive = tmp_path / "a.tar"
    _tar_of_dir(layout.root, archive, ["oci-layout", "index.json", "blobs"])
    info = imgbridge.inspect(archive)
    assert info["format"] == "oci-archive" and info["Digest"] == desc["digest"]
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tf:
        info_ = tarfile.TarInfo("../oci-layout")
        tf.addfile(info_, io.BytesIO(b""))
    with pytest.raises(InvalidImageError, match="climbs out"):
        imgbridge.inspect(f"oci-archive:{bad}")


def test_docker_archive_legacy(tmp_path: Path) -> None:
    tar = _tar({"etc/x": b"hi"})
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [_sha(tar), _sha(tar)]}})
    cfg_name = hashlib.sha256(config.encode()).hexdigest() + ".json"
    manifest = [{"Config": cfg_name, "RepoTags": ["busybox:1"],
                 "Layers": ["l1/layer.tar", "l2/layer.tar"]}]
    path = tmp_path / "d.tar"
    with tarfile.open(path, "w") as tf:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        add("l1/layer.tar", tar)
        link = tarfile.TarInfo("l2/layer.tar")
        link.type, link.linkname = tarfile.SYMTYPE, "../l1/layer.tar"  # as docker save does
        tf.addfile(link)
        add(cfg_name, config.encode())
        add("manifest.json", json.dumps(manifest).encode())
    info = imgbridge.inspect(f"docker-archive:{path}:docker.io/library/busybox:1")
    assert info["format"] == "docker-archive" and info["RepoTags"] == ["busybox:1"]
    assert info["Layers"] == [_sha(tar), _sha(tar)]
