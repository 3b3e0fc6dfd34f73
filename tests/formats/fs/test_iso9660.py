"""ISO9660 with Rock Ridge and Joliet: images made by genisoimage and xorriso read by us (raw,
inside a partition, through qcow2), hostile images refused, and images written by us checked
by isoinfo and xorriso (listing and extraction)."""

from __future__ import annotations

import functools
import hashlib
import os
import random
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from helpers import (
    RICH_FAR_MTIME_NS,
    RICH_MTIME_NS,
    is_root,
    make_rich_tree,
    make_sparse_file,
    require_tool,
    run_tool,
)
from imgbridge.formats.fs import iso9660
from imgbridge.formats.fs.iso9660.reader import decode_device
from imgbridge.formats.volume.table import partition_source, read_partitions

import imgbridge
from imgbridge.errors import (
    ImgBridgeError,
    InvalidImageError,
    InvalidInputError,
    UnsupportedFeatureError,
)
from imgbridge.model.tree import Entry, EntryType
from imgbridge.output import AtomicOutput
from imgbridge.registry import ProbeInput
from imgbridge.source import BytesSource, FileSource

MiB = 1 << 20
NS = 1_000_000_000

# ---- helpers -------------------------------------------------------------------------------


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            digest.update(block)
    return digest.hexdigest()


def _entry_sha(entry: Entry) -> str:
    assert entry.opener is not None
    digest = hashlib.sha256()
    with entry.opener() as f:
        for block in iter(lambda: f.read(MiB), b""):
            digest.update(block)
    return digest.hexdigest()


def _open_binary(path: Path) -> BinaryIO:
    return open(path, "rb")


def host_entries(root: Path) -> Iterator[Entry]:
    """The host tree as entries (pre-order, name-sorted; hardlinks after their first name)."""
    first: dict[tuple[int, int], str] = {}

    def walk(host: Path, tree: str) -> Iterator[Entry]:
        st = os.lstat(host)
        mode = st.st_mode
        common: dict[str, Any] = dict(mode=stat.S_IMODE(mode), uid=st.st_uid, gid=st.st_gid,
                                      mtime=st.st_mtime_ns, atime=st.st_atime_ns,
                                      ctime=st.st_ctime_ns)
        if stat.S_ISDIR(mode):
            yield Entry(tree, EntryType.DIR, **common)
            for name in sorted(os.listdir(host), key=os.fsencode):
                yield from walk(host / name, f"{tree}/{name}" if tree else name)
        elif stat.S_ISREG(mode):
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in first:
                yield Entry(tree, EntryType.HARDLINK, link_target=first[key], **common)
                return
            first[key] = tree
            yield Entry(tree, EntryType.FILE, size=st.st_size,
                        opener=functools.partial(_open_binary, host), **common)
        elif stat.S_ISLNK(mode):
            yield Entry(tree, EntryType.SYMLINK, link_target=os.readlink(host), **common)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            kind = EntryType.CHAR if stat.S_ISCHR(mode) else EntryType.BLOCK
            yield Entry(tree, kind, devmajor=os.major(st.st_rdev),
                        devminor=os.minor(st.st_rdev), **common)
        elif stat.S_ISFIFO(mode):
            yield Entry(tree, EntryType.FIFO, **common)
        elif stat.S_ISSOCK(mode):
            yield Entry(tree, EntryType.SOCKET, **common)

    yield from walk(root, "")


def _read(path: Path) -> tuple[dict[str, Any], dict[str, Entry]]:
    """Info and entries; the source stays open (until garbage collection) for the openers."""
    fs = iso9660.open(FileSource(path))
    return fs.info(), {e.path: e for e in fs.entries()}


def _assert_model_order(entries: list[Entry]) -> None:
    """The reader contract: root first, pre-order, siblings sorted by name bytes."""
    assert entries[0].path == "" and entries[0].type is EntryType.DIR
    paths = [e.path for e in entries]
    assert len(paths) == len(set(paths))
    keys = [[part.encode("utf-8", "surrogateescape") for part in p.split("/")] for p in paths[1:]]
    assert keys == sorted(keys)
    seen: set[str] = set()
    for entry in entries:
        if entry.type is EntryType.HARDLINK:
            assert entry.link_target in seen
        seen.add(entry.path)


@pytest.fixture(scope="module")
def rich(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tree: Path = make_rich_tree(tmp_path_factory.mktemp("iso") / "tree")
    return tree


def _mkisofs(tool: str, flags: list[str], tree: Path, out: Path) -> Path:
    if tool == "genisoimage":
        run_tool("genisoimage", "-quiet", *flags, "-o", out, tree)
    else:
        require_tool("xorriso")
        run_tool("xorriso", "-as", "mkisofs", "-quiet", *flags, "-o", out, tree)
    return out


def _check_against_host(entries: dict[str, Entry], tree: Path, *, owners: bool,
                        modes: bool) -> None:
    """Names, types, sizes, bytes, symlink targets, hardlinks and times equal the host's."""
    host = {e.path: e for e in host_entries(tree)}
    assert set(entries) == set(host)
    for path, theirs in host.items():
        ours = entries[path]
        assert ours.type is theirs.type, path
        if modes:
            assert ours.mode == theirs.mode, path
        if owners:
            assert (ours.uid, ours.gid) == (theirs.uid, theirs.gid), path
        if theirs.type is EntryType.FILE:
            assert ours.size == theirs.size, path
            assert _entry_sha(ours) == _entry_sha(theirs), path
        elif theirs.type in (EntryType.SYMLINK, EntryType.HARDLINK):
            assert ours.link_target == theirs.link_target, path
        elif theirs.type in (EntryType.CHAR, EntryType.BLOCK):
            assert (ours.devmajor, ours.devminor) == (theirs.devmajor, theirs.devminor), path
        if theirs.type in (EntryType.FILE, EntryType.DIR) and path:
            assert ours.mtime == theirs.mtime // NS * NS, path


# ---- probe ---------------------------------------------------------------------------------


def test_probe(rich: Path, tmp_path: Path) -> None:
    iso = _mkisofs("genisoimage", ["-R"], rich, tmp_path / "p.iso")
    head = iso.read_bytes()[: 64 * 1024]
    assert iso9660.probe(ProbeInput(head, b"", "p.iso", iso.stat().st_size)) == 100
    assert iso9660.probe(ProbeInput(bytes(64 * 1024), b"", "x.iso", 64 * 1024)) == 0
    bad_type = bytearray(head)
    bad_type[32768] = 7
    assert iso9660.probe(ProbeInput(bytes(bad_type), b"", "p.iso", len(head))) == 0
    assert iso9660.probe(ProbeInput(head[:32770], b"", "p.iso", 32770)) == 0


# ---- reading what genisoimage and xorriso wrote ----------------------------------------------


@pytest.mark.interop
@pytest.mark.parametrize("tool", ["genisoimage", "xorriso"])
def test_rock_ridge_keeps_everything(rich: Path, tmp_path: Path, tool: str) -> None:
    iso = _mkisofs(tool, ["-R", "-J"], rich, tmp_path / "rr.iso")
    info, entries = _read(iso)
    _assert_model_order(list(entries.values()))
    # -R keeps modes and owners; as root the tree has devices and other owners too.
    _check_against_host(entries, rich, owners=True, modes=True)
    assert entries["hostname-hardlink"].type is EntryType.HARDLINK
    assert entries["hostname-hardlink"].link_target == "etc/hostname"
    assert entries["empty"].type is EntryType.FILE  # shares the empty extent, not a link
    assert entries["future"].mtime == RICH_FAR_MTIME_NS // NS * NS
    assert entries["etc/hostname"].mtime == RICH_MTIME_NS // NS * NS
    assert entries["bin/tool"].mode == 0o4755 and entries["tmp"].mode == 0o1777
    assert entries["fifo"].type is EntryType.FIFO and entries["socket"].type is EntryType.SOCKET
    assert entries["slow-link"].link_target == "/" + "long-target/" * 8 + "end"
    assert info["type"] == "iso9660" and info["rock-ridge"] and info["joliet"] is True
    assert info["el-torito"] is False
    assert info["label"] == ("CDROM" if tool == "genisoimage" else "ISOIMAGE")
    assert info["size"] == info["used"] == iso.stat().st_size
    if is_root():
        assert (entries["null"].devmajor, entries["null"].devminor) == (1, 3)
        assert (entries["sda"].type, entries["sda"].devmajor) == (EntryType.BLOCK, 8)
        assert (entries["etc/hostname"].uid, entries["fast-link"].gid) == (1000, 1002)


@pytest.mark.interop
def test_rationalised_rock_ridge(rich: Path, tmp_path: Path) -> None:
    """-r keeps names, types and content but makes owners 0 and modes readable by all."""
    _, entries = _read(_mkisofs("genisoimage", ["-r", "-J"], rich, tmp_path / "r.iso"))
    _check_against_host(entries, rich, owners=False, modes=False)
    assert entries["etc/hostname"].uid == 0 and entries["etc/hostname"].mode == 0o444
    assert entries["bin/tool"].mode == 0o555 and entries["tmp"].mode == 0o555


@pytest.mark.interop
def test_joliet_only(rich: Path, tmp_path: Path) -> None:
    """Without Rock Ridge the Joliet names are used: no symlinks, 0444 files, 0555 dirs.
    (xorriso always adds Rock Ridge, so only genisoimage makes such an image.)"""
    iso = _mkisofs("genisoimage", ["-J", "-joliet-long"], rich, tmp_path / "j.iso")
    info, entries = _read(iso)
    _assert_model_order(list(entries.values()))
    assert info["rock-ridge"] is None and info["joliet"] is True
    assert entries["etc/hostname"].mode == 0o444 and entries["etc"].mode == 0o555
    assert entries["bin/tool"].uid == 0
    assert _entry_sha(entries["big.bin"]) == _file_sha(rich / "big.bin")
    assert _entry_sha(entries["sparse.bin"]) == _file_sha(rich / "sparse.bin")
    assert entries["hostname-hardlink"].type is EntryType.FILE  # no link count without RR
    assert "fast-link" not in entries
    assert len([p for p in entries if p.startswith("many/")]) == 400
    assert entries["many/file-00007-xxxxxxx"].size == 2


@pytest.mark.interop
def test_joliet_tree_left_unparsed_with_rock_ridge(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """With Rock Ridge the Joliet tree is never read, so pycdlib is kept from parsing it (half
    the cost of a listing); the volume still says it has Joliet. A volume whose root looks
    like SUSP but that has no Rock Ridge is parsed again with its Joliet tree."""
    tree = tmp_path / "t"
    (tree / "Sub Dir").mkdir(parents=True)
    (tree / "Sub Dir" / "Mixed Case name.txt").write_bytes(b"x")
    both = _mkisofs("xorriso", ["-R", "-J"], tree, tmp_path / "rj.iso")
    with FileSource(both) as src:
        fs = iso9660.open(src)
        assert fs.info()["joliet"] is True and fs.info()["rock-ridge"] == "1.09"
        assert [e.path for e in fs.entries()] == ["", "Sub Dir", "Sub Dir/Mixed Case name.txt"]
        assert fs._iso.joliet_vd is None
    joliet = _mkisofs("genisoimage", ["-J"], tree, tmp_path / "j.iso")
    monkeypatch.setattr(iso9660.IsoFilesystem, "_root_uses_susp", lambda self: True)
    with FileSource(joliet) as src:
        fs = iso9660.open(src)
        assert fs.info()["joliet"] is True and fs.info()["rock-ridge"] is None
        assert [e.path for e in fs.entries()] == ["", "Sub Dir", "Sub Dir/Mixed Case name.txt"]


@pytest.mark.interop
def test_multi_session_and_el_torito(tmp_path: Path) -> None:
    """xorriso appends a session to an image file and rewrites the descriptors at sector 16
    to point at it: the last session's tree is what is read (as Linux mounts it). An El
    Torito boot catalog shows as the file it is recorded as."""
    require_tool("xorriso")
    first, second = tmp_path / "one", tmp_path / "two"
    first.mkdir()
    second.mkdir()
    (first / "a").write_bytes(b"one\n")
    (first / "boot.img").write_bytes(bytes(4096))
    (second / "b").write_bytes(b"two\n")
    iso = tmp_path / "ms.iso"
    run_tool("xorriso", "-dev", iso, "-map", first, "/", "-commit")
    run_tool("xorriso", "-dev", iso, "-map", second, "/new", "-commit")
    assert "2 sessions" in run_tool("xorriso", "-indev", iso, "-toc").stdout
    _, entries = _read(iso)
    assert sorted(entries) == ["", "a", "boot.img", "new", "new/b"]
    assert _entry_sha(entries["new/b"]) == _sha(b"two\n")
    boot = _mkisofs("xorriso", ["-R", "-J", "-b", "boot.img", "-no-emul-boot"], first,
                    tmp_path / "boot.iso")
    info, entries = _read(boot)
    assert info["el-torito"] is True
    assert sorted(entries) == ["", "a", "boot.catalog", "boot.img"]
    assert _entry_sha(entries["boot.img"]) == _sha(bytes(4096))


@pytest.mark.interop
def test_plain_iso9660(rich: Path, tmp_path: Path) -> None:
    """No extension: the ISO9660 names as recorded, without ';1' and a trailing dot."""
    info, entries = _read(_mkisofs("genisoimage", [], rich, tmp_path / "p.iso"))
    assert info["rock-ridge"] is None and info["joliet"] is False
    assert entries["ETC/HOSTNAME"].type is EntryType.FILE
    assert entries["ETC/HOSTNAME"].mode == 0o444 and entries["ETC"].mode == 0o555
    assert _entry_sha(entries["BIG.BIN"]) == _file_sha(rich / "big.bin")
    assert entries["FUTURE"].mtime == RICH_FAR_MTIME_NS // NS * NS
    assert len([p for p in entries if p.startswith("MANY/")]) == 400


@pytest.mark.interop
def test_label_and_uuid_match_blkid(rich: Path, tmp_path: Path) -> None:
    """blkid shows the modification date as the UUID; xorriso can set it apart from the
    creation date."""
    iso = tmp_path / "v.iso"
    run_tool("xorriso", "-outdev", iso, "-volid", "MY_VOLUME", "-publisher", "ACME",
             "-volume_date", "c", "2020010203040500", "-volume_date", "m", "2021061718192000",
             "-map", rich / "etc", "/etc")
    blkid = shutil.which("blkid") or shutil.which("blkid", path="/usr/sbin:/sbin")
    if blkid is None:
        require_tool("blkid")
    assert blkid is not None
    out = run_tool(blkid, "-p", "-o", "export", iso).stdout
    fields = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    info, entries = _read(iso)
    assert info["uuid"] == fields["UUID"] == "2021-06-17-18-19-20-00"
    assert info["label"] == fields["LABEL"] == "MY_VOLUME"
    assert info["publisher"] == "ACME"
    assert entries["etc/hostname"].type is EntryType.FILE


@pytest.mark.interop
@pytest.mark.parametrize("container", ["raw", "qcow2"])
def test_iso_inside_a_partition(rich: Path, tmp_path: Path, container: str) -> None:
    iso = _mkisofs("genisoimage", ["-R", "-J"], rich, tmp_path / "in.iso")
    disk = make_sparse_file(tmp_path / "disk.img", 32 * MiB, [])
    sfdisk = shutil.which("sfdisk") or shutil.which("sfdisk", path="/usr/sbin:/sbin")
    if sfdisk is None:
        require_tool("sfdisk")
    assert sfdisk is not None
    subprocess.run([sfdisk, "-q", str(disk)], input="label: dos\n,24M,83\n", text=True,
                   check=True, capture_output=True)
    with open(disk, "r+b") as f:
        f.seek(MiB)
        f.write(iso.read_bytes())
    path = disk
    if container == "qcow2":
        path = tmp_path / "disk.qcow2"
        run_tool("qemu-img", "convert", "-f", "raw", "-O", "qcow2", disk, path)
    with imgbridge.open_disk(path, container) as opened:
        table = read_partitions(opened)
        assert table is not None
        source = partition_source(opened, table.partitions[0])
        with iso9660.open(source) as fs:
            entries = {e.path: e for e in fs.entries()}
            assert fs.info()["rock-ridge"]
            assert _entry_sha(entries["big.bin"]) == _file_sha(rich / "big.bin")
            assert _entry_sha(entries["sparse.bin"]) == _file_sha(rich / "sparse.bin")
            assert entries["fast-link"].link_target == "etc/hostname"


@pytest.mark.slow
@pytest.mark.interop
def test_multi_extent_file(tmp_path: Path) -> None:
    """A file over 4 GiB is recorded in several extents (xorriso -iso-level 3)."""
    tree = tmp_path / "big"
    tree.mkdir()
    size = (4 << 30) + 3 * MiB + 5
    make_sparse_file(tree / "huge.bin", size, [(0, b"start"), ((4 << 30) - 2, b"across"),
                                               (size - 3, b"end")])
    iso = _mkisofs("xorriso", ["-R", "-iso-level", "3"], tree, tmp_path / "huge.iso")
    _, entries = _read(iso)
    huge = entries["huge.bin"]
    assert huge.size == size
    assert huge.opener is not None
    with huge.opener() as f:  # hashing 4 GiB twice would take a minute: read the seams
        assert f.read(5) == b"start"
        f.seek((4 << 30) - 2)
        assert f.read(6) == b"across"
        f.seek(0xFFFFF800 - 4)
        assert f.read(8) == bytes(8)  # the first extent ends here, the second starts
        f.seek(size - 3)
        assert f.read() == b"end"


@pytest.mark.interop
def test_relocated_deep_directories(tmp_path: Path) -> None:
    """genisoimage -R moves directories deeper than 8 levels to rr_moved, leaving CL/PL/RE
    records; the tree is read where the CL records put it."""
    deep = tmp_path / "deep" / "a/b/c/d/e/f/g/h/i/j/k"
    deep.mkdir(parents=True)
    (deep / "leaf").write_bytes(b"leaf\n")
    _, entries = _read(_mkisofs("genisoimage", ["-R"], tmp_path / "deep", tmp_path / "d.iso"))
    leaf = entries["a/b/c/d/e/f/g/h/i/j/k/leaf"]
    assert _entry_sha(leaf) == _sha(b"leaf\n")
    assert entries["a/b/c/d/e/f/g/h"].type is EntryType.DIR
    assert not any(p.startswith("rr_moved/") for p in entries)  # the moved copies are hidden


def test_device_numbers_of_both_writers() -> None:
    assert decode_device(1, 3) == (1, 3)  # genisoimage: major, minor
    assert decode_device(0, os.makedev(8, 16)) == (8, 16)  # libisofs: a packed dev_t
    assert decode_device(0, 5) == (0, 5)


# ---- hostile images ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_iso(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    base = tmp_path_factory.mktemp("small")
    tree = base / "t"
    (tree / "sub" / "deeper").mkdir(parents=True)
    (tree / "sub" / "file.txt").write_bytes(b"hello\n")
    (tree / "top.txt").write_bytes(b"top\n" * 1000)
    os.symlink("sub/file.txt", tree / "link")
    return _mkisofs("genisoimage", ["-R", "-J"], tree, base / "s.iso").read_bytes()


def _records(image: bytes | bytearray, extent: int) -> Iterator[tuple[int, bytes]]:
    """(offset, identifier) of each directory record in the directory at ``extent``."""
    offset = extent * 2048
    end = offset + 2048
    while offset < end and image[offset]:
        length = image[offset]
        yield offset, bytes(image[offset + 33 : offset + 33 + image[offset + 32]])
        offset += length


def _find_record(image: bytes | bytearray, identifier: bytes) -> int:
    root_extent = int.from_bytes(image[32768 + 156 + 2 : 32768 + 156 + 6], "little")
    for offset, name in _records(image, root_extent):
        if name == identifier:
            return offset
    raise AssertionError(f"no record {identifier!r}")


def _set_both_endian(image: bytearray, offset: int, value: int) -> None:
    image[offset : offset + 4] = value.to_bytes(4, "little")
    image[offset + 4 : offset + 8] = value.to_bytes(4, "big")


def _open_all(image: bytes) -> None:
    with iso9660.open(BytesSource(image, "hostile.iso")) as fs:
        for entry in fs.entries():
            if entry.type is EntryType.FILE:
                _entry_sha(entry)


def test_directory_loop(small_iso: bytes) -> None:
    image = bytearray(small_iso)
    root_extent = int.from_bytes(image[32768 + 158 : 32768 + 162], "little")
    sub = _find_record(image, b"SUB")
    _set_both_endian(image, sub + 2, root_extent)
    with pytest.raises(InvalidImageError):
        _open_all(bytes(image))


def test_extent_past_the_end(small_iso: bytes) -> None:
    image = bytearray(small_iso)
    _set_both_endian(image, _find_record(image, b"TOP.TXT;1") + 2, 0x7FFFFF00)
    with pytest.raises(InvalidImageError, match=r"past the end|ISO"):
        _open_all(bytes(image))


def test_absurd_path_table(small_iso: bytes) -> None:
    image = bytearray(small_iso)
    _set_both_endian(image, 32768 + 132, 0xFFFFFFF0)
    with pytest.raises(InvalidImageError, match="path table"):
        _open_all(bytes(image))


def test_absurd_directory_length(small_iso: bytes) -> None:
    image = bytearray(small_iso)
    _set_both_endian(image, 32768 + 156 + 10, 0xFFFFF800)  # the root directory's length
    with pytest.raises(InvalidImageError):
        _open_all(bytes(image))


def test_truncated(small_iso: bytes) -> None:
    for cut in (100, 32768 + 100, 40 * 1024):
        with pytest.raises(InvalidImageError):
            _open_all(small_iso[:cut])


def test_random_damage_is_refused_cleanly(small_iso: bytes) -> None:
    """Random bytes over the descriptors, path tables and directories: either a tree or
    InvalidImageError / UnsupportedFeatureError, never another exception, never a hang."""
    rng = random.Random(9660)
    metadata_end = 40 * 2048
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(300):
        image = bytearray(small_iso)
        for _ in range(rng.randint(1, 12)):
            image[rng.randrange(16 * 2048, metadata_end)] = rng.randrange(256)
        start = time.monotonic()
        try:
            _open_all(bytes(image))
            outcomes["ok"] += 1
        except (InvalidImageError, UnsupportedFeatureError):
            outcomes["refused"] += 1
        assert time.monotonic() - start < 5
    assert outcomes["refused"] > 0 and outcomes["ok"] > 0


# ---- writing: checked by isoinfo and xorriso -------------------------------------------------


def _write(entries: Iterator[Entry] | list[Entry], target: Path,
           options: dict[str, str] | None = None,
           progress: Callable[[int, int], None] | None = None) -> Path:
    with AtomicOutput(os.fspath(target), sync=False) as out:
        if progress is None:
            iso9660.create(out, entries, options or {})
        else:
            iso9660.create(out, entries, options or {}, progress)
        out.commit()
    return target


@pytest.fixture(scope="module")
def written(rich: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write(host_entries(rich), tmp_path_factory.mktemp("out") / "ours.iso")


_LS_LINE = re.compile(r"^([-dlcbps][-rwxsStT]{9})\s+(\d+)\s+(\d+)\s+(\d+)\s+(\S+(?:,\s*\d+)?)\s+"
                      r"\w+\s+\d+\s+\d+\s+'(.*?)'(?: -> '(.*)')?$")


def _xorriso_listing(iso: Path) -> dict[str, tuple[str, ...]]:
    out = run_tool("xorriso", "-indev", iso, "-find", "/", "-exec", "lsdl").stdout
    listing: dict[str, tuple[str, ...]] = {}
    for line in out.splitlines():
        match = _LS_LINE.match(line)
        if match:
            perms, _, uid, gid, size, path, target = match.groups()
            listing[path.lstrip("/")] = (perms, uid, gid, size.replace(" ", ""), target or "")
    return listing


@pytest.mark.interop
def test_written_listing_by_xorriso(rich: Path, written: Path) -> None:
    listing = _xorriso_listing(written)
    host = {e.path: e for e in host_entries(rich)}
    assert set(listing) == set(host)
    for path, entry in host.items():
        perms, uid, gid, size, target = listing[path]
        st = os.lstat(rich / path) if path else os.lstat(rich)
        assert perms == stat.filemode(st.st_mode), path
        assert (int(uid), int(gid)) == (entry.uid, entry.gid), path
        if entry.type is EntryType.SYMLINK:
            assert target == entry.link_target
        elif entry.type in (EntryType.FILE, EntryType.HARDLINK):
            assert int(size) == st.st_size, path
        elif entry.type in (EntryType.CHAR, EntryType.BLOCK):
            assert size == f"{entry.devmajor},{entry.devminor}", path


_ISOINFO_DIR = re.compile(r"^Directory listing of (.*)$")
_ISOINFO_LINE = re.compile(r"^([-dlcbpsf][-rwxsStT]{9})\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+"
                           r"\w+\s+\d+\s+\d+\s+\[\s*\d+\s+\d+\]\s+(.*?)\s*(?:-> (.*))?$")


def _isoinfo(iso: Path, *flags: str) -> dict[str, tuple[str, int, int, int, int, str]]:
    """isoinfo -l: path -> (mode string, links, uid, gid, size, link target). isoinfo
    prints owners in octal."""
    require_tool("isoinfo")
    # isoinfo prints Joliet names in Latin-1: read its output as bytes, not UTF-8 text.
    out = subprocess.run(["isoinfo", *flags, "-l", "-i", os.fspath(iso)], capture_output=True,
                         check=True).stdout.decode("utf-8", "replace")
    listing = {}
    directory = "/"
    for line in out.splitlines():
        header = _ISOINFO_DIR.match(line)
        if header:
            directory = header.group(1)
            continue
        match = _ISOINFO_LINE.match(line)
        if match and match.group(6) not in (".", ".."):
            perms, links, uid, gid, size, name, target = match.groups()
            listing[(directory + name).lstrip("/")] = (perms, int(links), int(uid, 8),
                                                       int(gid, 8), int(size), target or "")
    return listing


@pytest.mark.interop
def test_written_listing_by_isoinfo(rich: Path, written: Path) -> None:
    rr = _isoinfo(written, "-R")
    host = {e.path: e for e in host_entries(rich) if e.path}
    assert set(rr) == set(host)
    for path, entry in host.items():
        perms, links, uid, gid, _, target = rr[path]
        mode = os.lstat(rich / path).st_mode
        # isoinfo shows neither setuid/setgid/sticky nor the fifo letter as ls does
        assert perms[1:] == stat.filemode(mode & ~0o7000)[1:], path
        assert (uid, gid) == (entry.uid, entry.gid), path
        if entry.type is EntryType.SYMLINK:
            assert target == entry.link_target
        if path in ("etc/hostname", "hostname-hardlink"):
            assert links == 2  # the PX link count of a hardlinked file
    joliet = _isoinfo(written, "-J")
    # Joliet: directories and regular files only, names cut to 64 characters.
    assert "etc/hostname" in joliet and "hostname-hardlink" in joliet
    assert "fast-link" not in joliet and "fifo" not in joliet
    assert ("n" * 64) in joliet and joliet["big.bin"][4] == 3 * MiB
    assert len([p for p in joliet if p.startswith("many/")]) == 400
    info = run_tool("isoinfo", "-d", "-i", written).stdout
    assert "Joliet with UCS level 3 found" in info and "Rock Ridge signatures" in info


@pytest.mark.interop
def test_written_extract_by_xorriso(rich: Path, written: Path, tmp_path: Path) -> None:
    out = tmp_path / "x"
    run_tool("xorriso", "-osirrox", "on:device_files" if is_root() else "on", "-indev", written,
             "-extract", "/", out)
    for entry in host_entries(rich):
        if not entry.path or (entry.type is EntryType.SOCKET):
            continue  # xorriso does not make sockets
        ours, theirs = out / entry.path, rich / entry.path
        st_ours, st_theirs = os.lstat(ours), os.lstat(theirs)
        assert stat.S_IFMT(st_ours.st_mode) == stat.S_IFMT(st_theirs.st_mode), entry.path
        if entry.type is EntryType.SYMLINK:
            assert os.readlink(ours) == os.readlink(theirs)
        elif entry.type in (EntryType.FILE, EntryType.HARDLINK):
            assert _file_sha(ours) == _file_sha(theirs), entry.path
            assert st_ours.st_mtime_ns == st_theirs.st_mtime_ns // NS * NS, entry.path
            assert stat.S_IMODE(st_ours.st_mode) == stat.S_IMODE(st_theirs.st_mode), entry.path
        elif entry.type in (EntryType.CHAR, EntryType.BLOCK):
            assert st_ours.st_rdev == st_theirs.st_rdev


@pytest.mark.interop
def test_written_read_back(rich: Path, written: Path) -> None:
    info, entries = _read(written)
    _assert_model_order(list(entries.values()))
    _check_against_host(entries, rich, owners=True, modes=True)
    assert info["application"] == "IMGBRIDGE"
    assert info["created"] == RICH_FAR_MTIME_NS // (NS // 100) * (NS // 100)


def test_deterministic(rich: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # One snapshot of the tree: reading a file whose mtime is in the future moves its atime.
    tree = list(host_entries(rich))
    first = _file_sha(_write(tree, tmp_path / "a.iso"))
    # Another clock and another time zone: pycdlib reads both while it builds the image.
    monkeypatch.setattr(time, "time", lambda: 1_234_567_890.5)
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    try:
        second = _file_sha(_write(tree, tmp_path / "b.iso"))
    finally:
        monkeypatch.undo()
        time.tzset()
    assert first == second


def test_one_file_open_at_a_time(tmp_path: Path) -> None:
    open_now = 0
    most = 0

    class Counted:
        def __init__(self, data: bytes) -> None:
            self._data = data

        def __call__(self) -> Any:
            nonlocal open_now, most
            open_now += 1
            most = max(most, open_now)
            stream = _Closing(self._data)
            return stream

    class _Closing:
        def __init__(self, data: bytes) -> None:
            self._pos = 0
            self._data = data

        def read(self, n: int = -1) -> bytes:
            piece = self._data[self._pos : self._pos + (n if n >= 0 else len(self._data))]
            self._pos += len(piece)
            return piece

        def close(self) -> None:
            nonlocal open_now
            open_now -= 1

    entries = [Entry("", EntryType.DIR)]
    for i in range(200):
        data = f"file {i}\n".encode() * (i + 1)
        entries.append(Entry(f"f{i:03d}", EntryType.FILE, size=len(data),
                             opener=Counted(data)))
    reports: list[tuple[int, int]] = []
    iso = _write(entries, tmp_path / "many.iso", progress=lambda d, t: reports.append((d, t)))
    assert most == 1 and open_now == 0
    assert reports[-1] == (iso.stat().st_size, iso.stat().st_size)
    assert [d for d, _ in reports] == sorted(d for d, _ in reports)
    _, read = _read(iso)
    with read["f199"].opener() as f:  # type: ignore[misc]
        assert f.read() == b"file 199\n" * 200


def test_options(rich: Path, tmp_path: Path) -> None:
    tree = [Entry("", EntryType.DIR), Entry("a", EntryType.DIR, mode=0o700),
            Entry("a/b.txt", EntryType.FILE, size=3, opener=lambda: BytesSource(b"abc")
                  .as_fileobj()),
            Entry("a/link", EntryType.SYMLINK, link_target="b.txt")]
    with pytest.warns(UserWarning, match="a/link"):
        plain = _write(tree, tmp_path / "plain.iso", {"rock_ridge": "off", "joliet": "off",
                                                      "label": "plain_disk"})
    info, entries = _read(plain)
    assert info["rock-ridge"] is None and info["joliet"] is False and info["label"] == "PLAIN_DISK"
    assert set(entries) == {"", "A", "A/B.TXT"}
    assert "NO Joliet present" in run_tool("isoinfo", "-d", "-i", plain).stdout
    with pytest.raises(InvalidInputError, match="unknown"):
        _write(tree, tmp_path / "x.iso", {"colour": "blue"})
    with pytest.raises(InvalidInputError, match="label"):
        _write(tree, tmp_path / "x.iso", {"label": "x" * 33})
    with pytest.raises(InvalidInputError, match="on or off"):
        _write(tree, tmp_path / "x.iso", {"joliet": "maybe"})


def test_short_content_is_an_error(tmp_path: Path) -> None:
    tree = [Entry("short", EntryType.FILE, size=10,
                  opener=lambda: BytesSource(b"abc").as_fileobj())]
    with pytest.raises(InvalidInputError, match="ended after 3 of its 10 bytes"):
        _write(tree, tmp_path / "short.iso")
    assert not (tmp_path / "short.iso").exists()


def test_names_made_unique(tmp_path: Path) -> None:
    """Names that collide once cut to 8.3 / 64 Joliet bytes stay apart; isoinfo lists all."""
    names = [f"{'same-prefix'}-{i}.text" for i in range(30)] + ["x" * 70 + "a", "x" * 70 + "b",
                                                               "sp ace", "UPPER", "upper", "é"]
    tree = [Entry("", EntryType.DIR)] + [
        Entry(name, EntryType.FILE, size=len(name),
              opener=lambda n=name: BytesSource(n.encode()).as_fileobj())  # type: ignore[misc]
        for name in names]
    iso = _write(tree, tmp_path / "names.iso")
    plain = _isoinfo(iso)
    assert len(plain) == len(names)
    assert all(re.fullmatch(r"[A-Z0-9_]{1,8}\.[A-Z0-9_]{0,3};1", p) for p in plain)
    assert len(_isoinfo(iso, "-J")) == len(names)
    _, entries = _read(iso)
    assert set(entries) - {""} == set(names)


def test_long_joliet_names_keep_their_extension(tmp_path: Path) -> None:
    """Joliet names are cut to 64 characters; the extension survives the cut (and a numeric
    tail goes before it), so Windows still knows what the file is."""
    names = ["j" * 100 + ".txt", "j" * 100 + ".txt.gz", "j" * 101 + ".txt",
             "k" * 100 + ".a-much-too-long-extension"]
    tree = [Entry("", EntryType.DIR)] + [
        Entry(name, EntryType.FILE, size=1, opener=lambda: BytesSource(b"x").as_fileobj())
        for name in names]
    iso = _write(tree, tmp_path / "long.iso")
    joliet = {path.lstrip("/") for path in _isoinfo(iso, "-J")}
    assert joliet == {"j" * 60 + ".txt", "j" * 61 + ".gz", "j" * 58 + "~1.txt", "k" * 64}
    _, entries = _read(iso)
    assert set(entries) - {""} == set(names)


def test_deep_tree_written_as_is(tmp_path: Path) -> None:
    parts = [f"level{i}" for i in range(12)]
    tree = [Entry("", EntryType.DIR)] + [Entry("/".join(parts[: i + 1]), EntryType.DIR)
                                         for i in range(len(parts))]
    tree.append(Entry("/".join(parts) + "/leaf", EntryType.FILE, size=4,
                      opener=lambda: BytesSource(b"leaf").as_fileobj()))
    iso = _write(tree, tmp_path / "deep.iso")
    listing = _xorriso_listing(iso)
    assert "/".join(parts) + "/leaf" in listing
    with pytest.raises(UnsupportedFeatureError, match="levels deep"):
        _write(tree, tmp_path / "deep2.iso", {"rock_ridge": "off"})


# ---- speed ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.interop
def test_write_speed_against_genisoimage(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    tree = tmp_path / "speed"
    for d in range(20):
        (tree / f"d{d}").mkdir(parents=True)
        for f in range(50):
            (tree / f"d{d}" / f"f{f}").write_bytes(os.urandom(200 * 1024))  # 1000 x 200 KiB
    make_sparse_file(tree / "big", 4 * MiB, [(0, os.urandom(4 * MiB))])
    start = time.perf_counter()
    _write(host_entries(tree), tmp_path / "ours.iso")
    ours = time.perf_counter() - start
    start = time.perf_counter()
    run_tool("genisoimage", "-quiet", "-R", "-J", "-o", tmp_path / "theirs.iso", tree)
    theirs = time.perf_counter() - start
    size = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file()) / MiB
    with capsys.disabled():
        print(f"\niso9660 write of {size:.0f} MiB: imgbridge {ours:.2f} s "
              f"({size / ours:.0f} MiB/s), genisoimage -R -J {theirs:.2f} s "
              f"({size / theirs:.0f} MiB/s), ratio {ours / theirs:.1f}x")
    _, entries = _read(tmp_path / "ours.iso")
    assert _entry_sha(entries["d7/f13"]) == _file_sha(tree / "d7" / "f13")


def test_errors_are_imgbridge_errors() -> None:
    with pytest.raises(ImgBridgeError):
        iso9660.open(BytesSource(bytes(40 * 1024)))
