"""Our container image readers against images umoci builds and skopeo copies.

Each image is built at test time: ``umoci init/new/unpack --rootless``, a rootfs modified by
hand (files, a setuid mode, a symlink, a hardlink, a deletion that becomes a whiteout),
``umoci repack``, ``umoci config`` and ``umoci insert`` (whose layer ends without tar
end-of-archive blocks). skopeo copies it to every transport we read. We check that our
inspect agrees with ``skopeo inspect`` and ``umoci stat``, and that the flattened tree equals
the rootfs ``umoci unpack --rootless`` produces.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from helpers import require_tool, run_tool

import imgbridge
from imgbridge.model.tree import EntryType

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    require_tool("umoci")
    require_tool("skopeo")
    work = tmp_path_factory.mktemp("oci")
    img = work / "img"
    run_tool("umoci", "init", "--layout", img)
    run_tool("umoci", "new", "--image", f"{img}:t")
    bundle = work / "bundle"
    run_tool("umoci", "unpack", "--rootless", "--image", f"{img}:t", bundle)
    root = bundle / "rootfs"
    (root / "etc").mkdir()
    (root / "etc" / "hello").write_text("hello\n")
    (root / "etc" / "gone").write_text("bye\n")
    (root / "etc" / "hello").chmod(0o4755)
    os.link(root / "etc" / "hello", root / "etc" / "hard")
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "link").symlink_to("../../etc/hello")
    # --refresh-bundle: the next repack diffs against this layer (so a deletion whiteouts).
    run_tool("umoci", "repack", "--refresh-bundle", "--image", f"{img}:t", bundle)
    (root / "etc" / "gone").unlink()
    (root / "etc" / "new").write_bytes(b"\x00\x01" * 5000)
    run_tool("umoci", "repack", "--image", f"{img}:t", bundle)
    run_tool("umoci", "config", "--image", f"{img}:t", "--author", "tester <t@example.org>",
             "--config.env", "FOO=bar", "--config.cmd", "/bin/sh", "--config.label", "k=v",
             "--config.workingdir", "/etc", "--history.comment", "configured")
    (work / "ins").write_text("inserted\n")
    run_tool("umoci", "insert", "--image", f"{img}:t", work / "ins", "/opt/ins")
    out = {"oci": img}
    for transport, name, extra in (("oci-archive", "a.tar", ":t"),
                                   ("docker-archive", "d.tar", ":ex/img:t"),
                                   ("dir", "sdir", ""), ("oci", "zlay", ":t")):
        flags = ["--dest-compress-format", "zstd", "--dest-compress"] if name == "zlay" else []
        run_tool("skopeo", "copy", "-q", *flags, f"oci:{img}:t",
                 f"{transport}:{work / name}{extra}")
        out[name] = work / name
    unpacked = work / "unpacked"
    run_tool("umoci", "unpack", "--rootless", "--image", f"{img}:t", unpacked)
    out["rootfs"] = unpacked / "rootfs"
    return out


REFS = {"oci": "oci:{}:t", "a.tar": "oci-archive:{}:t", "d.tar": "docker-archive:{}",
        "sdir": "dir:{}", "zlay": "oci:{}:t"}


@pytest.mark.parametrize("name", sorted(REFS))
def test_inspect_agrees_with_skopeo(built: dict[str, Path], name: str) -> None:
    ref = REFS[name].format(built[name])
    ours = imgbridge.inspect(ref)
    theirs = json.loads(run_tool("skopeo", "inspect", ref).stdout)
    for key in ("Created", "Labels", "Architecture", "Os", "Layers", "Env", "DockerVersion"):
        assert ours[key] == theirs[key], key
    if name != "d.tar":  # skopeo makes up a manifest for a docker archive; we store none
        assert ours["Digest"] == theirs["Digest"]
        # skopeo 1.9 prints no LayersData; its raw manifest holds the same facts.
        raw = json.loads(run_tool("skopeo", "inspect", "--raw", ref).stdout)
        assert [(d["Digest"], d["Size"], d["MIMEType"]) for d in ours["LayersData"]] == [
            (d["digest"], d["size"], d["mediaType"]) for d in raw["layers"]]
    expected = "zstd" if name == "zlay" else "none" if name == "d.tar" else "gzip"
    assert {d["Compression"] for d in ours["LayerDetails"]} == {expected}
    assert ours["Config"]["WorkingDir"] == "/etc" and ours["Config"]["Cmd"] == ["/bin/sh"]
    assert [d["Whiteouts"] for d in ours["LayerDetails"]] == [0, 1, 0]


def test_history_agrees_with_umoci_stat(built: dict[str, Path]) -> None:
    stat_out = json.loads(run_tool("umoci", "stat", "--json", "--image",
                                   f"{built['oci']}:t").stdout)
    ours = imgbridge.inspect(built["oci"])["History"]
    theirs = stat_out["history"]
    assert [(h["created_by"], h["comment"], h["empty_layer"]) for h in ours] == [
        (h.get("created_by"), h.get("comment"), h.get("empty_layer", False)) for h in theirs]
    assert any(h["comment"] == "configured" for h in ours)


def _walk(root: Path) -> dict[str, tuple[Any, ...]]:
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            st = full.lstat()
            rel = str(full.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), full.read_bytes())
    return out


@pytest.mark.parametrize("name", sorted(REFS))
def test_flattened_tree_equals_umoci_unpack(built: dict[str, Path], name: str) -> None:
    expected = _walk(built["rootfs"])
    with imgbridge.open(REFS[name].format(built[name])) as image:
        ours: dict[str, tuple[Any, ...]] = {}
        entries = image.flatten()
        by_path = {e.path: e for e in entries}
        for entry in entries:
            if entry.path == "":
                continue
            if entry.type is EntryType.SYMLINK:
                ours[entry.path] = ("symlink", entry.link_target)
            elif entry.type is EntryType.DIR:
                ours[entry.path] = ("dir", entry.mode)
            else:
                real = by_path[entry.link_target] if entry.type is EntryType.HARDLINK else entry
                with real.open() as f:
                    ours[entry.path] = ("file", real.mode, f.read())
    assert ours == expected
    assert "etc/gone" not in ours and ours["opt/ins"][2] == b"inserted\n"


def _walk_host(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything ``ls -ln`` would show below ``root``, plus contents and hardlink groups
    (the first path of each inode, in sorted order)."""
    out: dict[str, tuple[Any, ...]] = {}
    first: dict[tuple[int, int], str] = {}
    as_root = os.geteuid() == 0
    for full in sorted(root.rglob("*")):
        st = full.lstat()
        rel = str(full.relative_to(root))
        owner = (st.st_uid, st.st_gid) if as_root else None
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("symlink", os.readlink(full), owner)
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", mode, owner)
        elif stat.S_ISREG(st.st_mode):
            group = first.setdefault((st.st_dev, st.st_ino), rel)
            out[rel] = ("file", mode, owner, full.read_bytes(), group)
        else:
            out[rel] = ("special", stat.S_IFMT(st.st_mode), mode, owner, st.st_rdev)
    return out


@pytest.mark.parametrize("name", ["oci", "d.tar", "zlay"])
def test_extract_equals_umoci_unpack(built: dict[str, Path], name: str,
                                     tmp_path: Path) -> None:
    out = tmp_path / "rootfs"
    report = imgbridge.extract(REFS[name].format(built[name]), out)
    assert report.refused == [] and report.devices == []
    theirs = _walk_host(built["rootfs"])
    ours = _walk_host(out)
    assert ours == theirs
    assert ours["etc/hello"][1] == 0o4755 and ours["etc/hard"][4] == "etc/hard"
    assert ours["etc/hello"][4] == "etc/hard"  # one inode for both names, as umoci made it
    assert "etc/gone" not in ours


def test_extract_cli_into_existing_nonempty_dir_refused(built: dict[str, Path],
                                                        tmp_path: Path) -> None:
    (tmp_path / "x").write_text("")
    from imgbridge.cli import main

    assert main(["extract", REFS["oci"].format(built["oci"]), str(tmp_path)]) == 1
    assert os.listdir(tmp_path) == ["x"]


# ---------------------------------------------------------------------------------------------
# what we write: skopeo and umoci must accept every image we convert into


WRITTEN = {  # name -> (output format, extra convert arguments, skopeo transport)
    "w-oci": ("oci", {}, "oci"),
    "w-flat": ("oci", {"flatten": True}, "oci"),
    "w-zstd": ("oci", {"options": {"compression": "zstd"}}, "oci"),
    "w-a.tar": ("oci-archive", {}, "oci-archive"),
    "w-d.tar": ("docker-archive", {}, "docker-archive"),
    "w-dflat.tar": ("docker-archive", {"flatten": True}, "docker-archive"),
}


@pytest.fixture(scope="module")
def written(built: dict[str, Path]) -> dict[str, Path]:
    out = {}
    for name, (fmt, extra, _) in WRITTEN.items():
        dst = built["oci"].parent / name
        imgbridge.convert(f"oci:{built['oci']}:t", str(dst), output_format=fmt,
                          tags=["ex/img:t"], sync=False, **extra)  # type: ignore[arg-type]
        out[name] = dst
    return out


@pytest.mark.parametrize("name", sorted(WRITTEN))
def test_skopeo_accepts_what_we_write(built: dict[str, Path], written: dict[str, Path],
                                      name: str) -> None:
    fmt, extra, transport = WRITTEN[name]
    ref = f"{transport}:{written[name]}" + (":t" if transport != "docker-archive" else "")
    theirs = json.loads(run_tool("skopeo", "inspect", ref).stdout)
    ours = imgbridge.inspect(ref)
    assert theirs["Layers"] == ours["Layers"]
    assert theirs["Env"] == ["FOO=bar"] and theirs["Labels"] == {"k": "v"}
    if transport != "docker-archive":
        assert theirs["Digest"] == ours["Digest"]
    if not extra and fmt != "docker-archive":
        # copied as stored: the manifest and every blob keep their digests
        assert ours["Digest"] == imgbridge.inspect(built["oci"])["Digest"]
    # skopeo copies it on to another transport, then reads every blob of the copy.
    copy = built["oci"].parent / f"copy-{name}"
    run_tool("skopeo", "copy", "-q", ref, f"dir:{copy}")
    with imgbridge.open(copy) as image, imgbridge.open(ref) as ours_image:
        assert [layer.diff_id for layer in image.layers] == \
            [layer.diff_id for layer in ours_image.layers]
        assert image.config.cmd == ["/bin/sh"]


def test_skopeo_reads_our_docker_archive_tags(written: dict[str, Path]) -> None:
    # skopeo copy docker-archive:FILE:TAG finds the image by its RepoTag
    dst = written["w-d.tar"].parent / "by-tag"
    run_tool("skopeo", "copy", "-q", f"docker-archive:{written['w-d.tar']}:ex/img:t",
             f"oci:{dst}:t")
    # skopeo gzips the layers on the way into oci:, so compare what they hold
    assert [d["DiffID"] for d in imgbridge.inspect(f"oci:{dst}:t")["LayerDetails"]] == [
        d["DiffID"] for d in imgbridge.inspect(written["w-d.tar"])["LayerDetails"]]


@pytest.mark.parametrize("name", ["w-oci", "w-flat"])  # umoci 0.4.7 reads no zstd layers
def test_umoci_unpacks_our_oci_layout(built: dict[str, Path], written: dict[str, Path],
                                      name: str) -> None:
    bundle = written[name].parent / f"bundle-{name}"
    run_tool("umoci", "unpack", "--rootless", "--image", f"{written[name]}:t", bundle)
    assert _walk(bundle / "rootfs") == _walk(built["rootfs"])


def test_umoci_unpacks_our_docker_archive_via_skopeo(built: dict[str, Path],
                                                      written: dict[str, Path]) -> None:
    layout = written["w-dflat.tar"].parent / "from-docker"
    run_tool("skopeo", "copy", "-q", f"docker-archive:{written['w-dflat.tar']}",
             f"oci:{layout}:t")
    bundle = layout.parent / "bundle-from-docker"
    run_tool("umoci", "unpack", "--rootless", "--image", f"{layout}:t", bundle)
    assert _walk(bundle / "rootfs") == _walk(built["rootfs"])


@pytest.mark.parametrize("name", sorted(REFS))
def test_diff_finds_no_change_across_skopeo_copies(built: dict[str, Path], name: str) -> None:
    # skopeo re-encodes (zstd, docker-archive's plain tars) but the trees must stay equal.
    assert imgbridge.diff(REFS["oci"].format(built["oci"]), REFS[name].format(built[name])) == []


def test_wasted_space_of_a_umoci_image(built: dict[str, Path]) -> None:
    # umoci's second layer whites out etc/gone ("bye\n"); nothing else is hidden.
    info = imgbridge.inspect(REFS["oci"].format(built["oci"]))
    assert [layer["wasted"] for layer in info["LayerDetails"]] == [0, 4, 0]
    assert info["WastedBytes"] == 4


# ---------------------------------------------------------------------------------------------
# a richer umoci image: several layers, whiteouts umoci makes itself, `insert --opaque` and
# `insert --whiteout`, hardlinks, symlinks, a user.* xattr, authored history


RICH_REFS = {"oci": "oci:{}:t", "a.tar": "oci-archive:{}:t", "d.tar": "docker-archive:{}",
             "sdir": "dir:{}", "zlay": "oci:{}:t"}


@pytest.fixture(scope="module")
def rich(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    require_tool("umoci")
    require_tool("skopeo")
    require_tool("setfattr")
    work = tmp_path_factory.mktemp("oci-rich")
    img = work / "img"
    ref = f"{img}:t"
    run_tool("umoci", "init", "--layout", img)
    run_tool("umoci", "new", "--image", ref)
    bundle = work / "bundle"
    run_tool("umoci", "unpack", "--rootless", "--image", ref, bundle)
    root = bundle / "rootfs"
    for d in ("etc", "usr/bin", "data/old", "keep", "lib"):
        (root / d).mkdir(parents=True)
    (root / "etc" / "a").write_text("a\n")
    (root / "etc" / "gone").write_text("gone\n")
    (root / "etc" / "noted").write_text("noted\n")
    run_tool("setfattr", "-n", "user.note", "-v", "hello", root / "etc" / "noted")
    os.link(root / "etc" / "a", root / "etc" / "a-hard")
    (root / "etc" / "a").chmod(0o4750)
    (root / "usr" / "bin" / "rel").symlink_to("../../etc/a")
    (root / "usr" / "bin" / "abs").symlink_to("/etc/a")
    (root / "usr" / "bin" / "dangling").symlink_to("nowhere")
    (root / "data" / "old" / "f").write_text("old\n")
    (root / "data" / "keep-me-not").write_text("masked\n")
    (root / "keep" / "x").write_text("x\n")
    (root / "keep" / "y").write_text("y\n")
    (root / "lib" / "big").write_bytes(bytes(range(256)) * 300)
    os.link(root / "lib" / "big", root / "lib" / "big2")
    run_tool("umoci", "repack", "--refresh-bundle", "--image", ref,
             "--history.author", "builder <b@example.org>", "--history.comment", "base",
             bundle)
    (root / "etc" / "gone").unlink()  # umoci writes etc/.wh.gone
    (root / "etc" / "b").write_text("b\n")
    run_tool("umoci", "repack", "--refresh-bundle", "--image", ref,
             "--history.author", "deleter", "--history.comment", "delete gone", bundle)
    src = work / "newdata"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "n").write_text("new\n")
    (src / "top").write_text("top\n")
    run_tool("umoci", "insert", "--image", ref, "--opaque", "--history.author", "inserter",
             "--history.comment", "replace data", src, "/data")
    run_tool("umoci", "insert", "--image", ref, "--whiteout", "--history.comment",
             "drop keep/x", "/keep/x")
    run_tool("umoci", "config", "--image", ref, "--config.env", "RICH=1",
             "--config.label", "rich=yes", "--history.author", "configurer",
             "--history.comment", "configured")
    out = {"oci": img}
    for transport, name, extra in (("oci-archive", "a.tar", ":t"),
                                   ("docker-archive", "d.tar", ":ex/rich:t"),
                                   ("dir", "sdir", ""), ("oci", "zlay", ":t")):
        flags = ["--dest-compress-format", "zstd", "--dest-compress"] if name == "zlay" else []
        run_tool("skopeo", "copy", "-q", *flags, f"oci:{ref}",
                 f"{transport}:{work / name}{extra}")
        out[name] = work / name
    unpacked = work / "unpacked"
    run_tool("umoci", "unpack", "--rootless", "--image", ref, unpacked)
    out["rootfs"] = unpacked / "rootfs"
    return out


@pytest.mark.parametrize("name", sorted(RICH_REFS))
def test_rich_inspect_agrees_with_skopeo(rich: dict[str, Path], name: str) -> None:
    ref = RICH_REFS[name].format(rich[name])
    ours = imgbridge.inspect(ref)
    theirs = json.loads(run_tool("skopeo", "inspect", ref).stdout)
    for key in ("Architecture", "Os", "Layers", "Env", "Labels"):
        assert ours[key] == theirs[key], key
    assert len(ours["Layers"]) == 4 and "RICH=1" in ours["Env"]
    assert ours["Labels"] == {"rich": "yes"}
    # umoci's own deletion, insert --opaque and insert --whiteout, one per upper layer.
    whiteouts = [d["Whiteouts"] for d in ours["LayerDetails"]]
    assert whiteouts[0] == 0 and whiteouts[1] >= 1 and whiteouts[3] == 1


def test_rich_history_agrees_with_umoci_stat(rich: dict[str, Path]) -> None:
    stat_out = json.loads(run_tool("umoci", "stat", "--json", "--image",
                                   f"{rich['oci']}:t").stdout)
    keys = ("author", "comment", "created_by", "empty_layer")
    theirs = [(h.get("author"), h.get("comment"), h.get("created_by"),
               h.get("empty_layer", False)) for h in stat_out["history"]]
    for name in sorted(RICH_REFS):
        history = imgbridge.inspect(RICH_REFS[name].format(rich[name]))["History"]
        assert [tuple(h[k] for k in keys) for h in history] == theirs, name
    assert ("builder <b@example.org>", "base") in [t[:2] for t in theirs]
    assert ("inserter", "replace data") in [t[:2] for t in theirs]
    assert any(t[1] == "configured" and t[3] for t in theirs)


def _walk_rich(root: Path) -> dict[str, tuple[Any, ...]]:
    """Type, mode, link target, content, hardlink group and user.note of every path."""
    out: dict[str, tuple[Any, ...]] = {}
    first: dict[tuple[int, int], str] = {}
    for full in sorted(root.rglob("*")):
        st = full.lstat()
        rel = str(full.relative_to(root))
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("symlink", os.readlink(full))
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", mode)
        else:
            group = first.setdefault((st.st_dev, st.st_ino), rel)
            try:
                note = os.getxattr(full, "user.note", follow_symlinks=False)
            except OSError:
                note = None
            out[rel] = ("file", mode, full.read_bytes(), group, note)
    return out


def _walk_tar(path: Path) -> dict[str, tuple[Any, ...]]:
    """The same view of a tar we wrote (hardlink groups: the first name, in tar order)."""
    import tarfile

    out: dict[str, tuple[Any, ...]] = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            name = m.name.rstrip("/")
            if m.issym():
                out[name] = ("symlink", m.linkname)
            elif m.isdir():
                out[name] = ("dir", m.mode)
            else:
                target = tf.getmember(m.linkname) if m.islnk() else m
                group = m.linkname if m.islnk() else name
                note = target.pax_headers.get("SCHILY.xattr.user.note")
                data = tf.extractfile(target).read()  # type: ignore[union-attr]
                out[name] = ("file", target.mode, data, group,
                             note.encode() if note is not None else None)
    return out


@pytest.mark.parametrize("name", sorted(RICH_REFS))
def test_rich_extract_equals_umoci_unpack(rich: dict[str, Path], name: str,
                                          tmp_path: Path) -> None:
    ref = RICH_REFS[name].format(rich[name])
    theirs = _walk_rich(rich["rootfs"])
    # What umoci must have made of the layers, before we compare against it.
    assert "etc/gone" not in theirs and "keep/x" not in theirs and theirs["keep/y"]
    assert sorted(p for p in theirs if p.startswith("data/")) == [
        "data/sub", "data/sub/n", "data/top"]
    assert theirs["etc/a"][3] == theirs["etc/a-hard"][3]
    assert theirs["lib/big"][3] == theirs["lib/big2"][3]
    report = imgbridge.extract(ref, tmp_path / "rootfs")
    assert report.refused == [] and report.devices == []
    ours = _walk_rich(tmp_path / "rootfs")
    if theirs["etc/noted"][4] is None:  # umoci dropped the xattr: compare without it
        ours["etc/noted"] = (*ours["etc/noted"][:4], None)
    else:
        assert theirs["etc/noted"][4] == b"hello"
    assert ours == theirs
    # The same tree as a tar stream.
    imgbridge.extract(ref, tmp_path / "rootfs.tar", sync=False)
    in_tar = _walk_tar(tmp_path / "rootfs.tar")
    assert in_tar["etc/noted"][4] == b"hello"  # the tar keeps it whatever umoci does
    if theirs["etc/noted"][4] is None:
        in_tar["etc/noted"] = (*in_tar["etc/noted"][:4], None)
    # Hardlink groups are named by the first path in sorted order on both sides.
    assert in_tar == theirs
