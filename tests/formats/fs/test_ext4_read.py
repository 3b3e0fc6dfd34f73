"""The ext2/3/4 reader against filesystems made by mke2fs (and altered by debugfs, e2fsck,
sfdisk, qemu-img): every entry of a rich host tree compared with the host (type, mode,
owner, size, symlink target, device numbers, xattrs read with os.getxattr, content by
sha256), across ext2, ext3, ext4 and their variants (1 KiB, 4 KiB and 64 KiB blocks, block
maps, inline data, 128-byte inodes, 64bit, meta_bg, uninit_bg, no metadata_csum); times
against debugfs; htree directories built by e2fsck -D; a sparse file past 4 GiB whose holes
are never read; checksum failures naming the structure; a journal needing recovery; and a
filesystem inside a GPT partition, raw and through qcow2."""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import CountingSource, is_root, make_rich_tree, make_sparse_file, require_tool
from imgbridge.formats.fs import ext4
from imgbridge.formats.fs.ext4 import Ext4Filesystem, Ext4Warning

import imgbridge.api
from imgbridge.errors import InvalidImageError, InvalidInputError, UnsupportedFeatureError
from imgbridge.model.tree import Entry, EntryType
from imgbridge.registry import ProbeInput
from imgbridge.source import FileSource

MiB = 1 << 20


def _tool(name: str) -> str:
    """e2fsprogs and util-linux live in /usr/sbin, which a plain user's PATH may lack."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    return path or require_tool(name)


def _run(*args: str | os.PathLike[str]) -> str:
    tool = _tool(os.fspath(args[0]))
    done = subprocess.run([tool, *(os.fspath(a) for a in args[1:])], capture_output=True, text=True)
    if done.returncode:
        raise AssertionError(f"{args[0]} failed: {done.stderr}")
    return str(done.stdout)


def mkfs(image: Path, tree: Path | None, *args: str, size: str = "64M") -> Path:
    if image.exists():
        image.unlink()
    extra = ["-d", os.fspath(tree)] if tree is not None else []
    _run("mke2fs", "-q", "-F", *args, *extra, image, size)
    return image


def debugfs(image: Path, request: str, *, write: bool = False) -> str:
    return _run("debugfs", *(["-w"] if write else []), "-R", request, image)


def read_entries(image: Path, **options: str) -> list[Entry]:
    """Every entry (metadata only: the source is closed when this returns)."""
    with FileSource(image) as source, Ext4Filesystem(source, options) as fs:
        return list(fs.entries())


def read_file(image: Path, path: str, **options: str) -> bytes:
    with FileSource(image) as source, Ext4Filesystem(source, options) as fs:
        for entry in fs.entries():
            if entry.path == path:
                with entry.open() as f:
                    return f.read()
    raise KeyError(path)


def sha256_stream(stream: object) -> str:
    digest = hashlib.sha256()
    read = stream.read  # type: ignore[attr-defined]
    while chunk := read(4 * MiB):
        digest.update(chunk)
    return digest.hexdigest()


# ---- the host side ---------------------------------------------------------------------------


def _host_xattrs(path: Path) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {name: os.getxattr(path, name, follow_symlinks=False) for name in names}


def host_entries(root: Path) -> dict[str, dict[str, object]]:
    """What the reader must report for each path of a host tree (pre-order, name-sorted)."""
    out: dict[str, dict[str, object]] = {}
    first_path: dict[tuple[int, int], str] = {}

    def walk(directory: Path, prefix: str) -> None:
        for name in sorted(os.listdir(directory), key=os.fsencode):
            path = directory / name
            rel = f"{prefix}/{name}" if prefix else name
            st = os.lstat(path)
            info: dict[str, object] = {
                "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
                "xattrs": _host_xattrs(path),
            }
            key = (st.st_dev, st.st_ino)
            if not stat.S_ISDIR(st.st_mode) and key in first_path:
                out[rel] = {"type": EntryType.HARDLINK, "link_target": first_path[key]}
                continue
            first_path[key] = rel
            if stat.S_ISDIR(st.st_mode):
                info["type"] = EntryType.DIR
            elif stat.S_ISREG(st.st_mode):
                info["type"] = EntryType.FILE
                info["size"] = st.st_size
                with open(path, "rb") as f:
                    info["sha256"] = sha256_stream(f)
            elif stat.S_ISLNK(st.st_mode):
                info["type"] = EntryType.SYMLINK
                info["link_target"] = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                info["type"] = EntryType.CHAR if stat.S_ISCHR(st.st_mode) else EntryType.BLOCK
                info["dev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
            elif stat.S_ISFIFO(st.st_mode):
                info["type"] = EntryType.FIFO
            else:
                info["type"] = EntryType.SOCKET
            out[rel] = info
            if stat.S_ISDIR(st.st_mode):
                walk(path, rel)

    walk(root, "")
    return out


def entry_facts(entry: Entry) -> dict[str, object]:
    if entry.type is EntryType.HARDLINK:
        return {"type": entry.type, "link_target": entry.link_target}
    info: dict[str, object] = {
        "type": entry.type, "mode": entry.mode, "uid": entry.uid, "gid": entry.gid,
        "xattrs": entry.xattr_map(),
    }
    if entry.type is EntryType.FILE:
        info["size"] = entry.size
        with entry.open() as stream:
            info["sha256"] = sha256_stream(stream)
    elif entry.type is EntryType.SYMLINK:
        info["link_target"] = entry.link_target
    elif entry.type in (EntryType.CHAR, EntryType.BLOCK):
        info["dev"] = (entry.devmajor, entry.devminor)
    return info


@pytest.fixture(scope="module")
def rich_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_rich_tree(tmp_path_factory.mktemp("ext4src") / "tree")


@pytest.fixture(scope="module")
def rich_expected(rich_tree: Path) -> dict[str, dict[str, object]]:
    return host_entries(rich_tree)


def check_tree(entries: list[Entry], expected: dict[str, dict[str, object]]) -> None:
    assert entries[0].path == "" and entries[0].type is EntryType.DIR
    paths = [e.path for e in entries]
    assert len(paths) == len(set(paths))
    # pre-order, siblings sorted by their name bytes
    for previous, current in itertools.pairwise(paths[1:]):
        p, c = previous.split("/"), current.split("/")
        assert [x.encode() for x in p] < [x.encode() for x in c], (previous, current)
    got = {e.path: e for e in entries[1:]}
    lost = got.pop("lost+found")
    assert lost.type is EntryType.DIR and lost.mode == 0o700
    assert sorted(got) == sorted(expected)
    for path, facts in expected.items():
        assert entry_facts(got[path]) == facts, path


# ---- the rich tree through every variant -------------------------------------------------------

VARIANTS = {
    "ext4": (["-t", "ext4"], "ext4"),
    "ext4-4k": (["-t", "ext4", "-b", "4096"], "ext4"),
    "ext2": (["-t", "ext2"], "ext2"),
    "ext3": (["-t", "ext3"], "ext3"),
    "no-csum": (["-t", "ext4", "-O", "^metadata_csum"], "ext4"),
    "uninit_bg": (["-t", "ext4", "-O", "^metadata_csum,uninit_bg"], "ext4"),
    "inline": (["-t", "ext4", "-O", "inline_data"], "ext4"),
    "blockmap": (["-t", "ext4", "-O", "^extent,^64bit"], "ext4"),
    "64bit-4k": (["-t", "ext4", "-O", "64bit", "-b", "4096"], "ext4"),
    "small-inodes": (["-t", "ext4", "-I", "128"], "ext4"),
    "meta_bg": (["-t", "ext4", "-O", "meta_bg,^resize_inode"], "ext4"),
    "sparse_super2": (["-t", "ext4", "-O", "sparse_super2"], "ext4"),
    "64k-blocks": (["-t", "ext4", "-b", "65536"], "ext4"),
    "csum-seed": (["-t", "ext4", "-O", "metadata_csum_seed", "-U", "random"], "ext4"),
    "bigalloc": (["-t", "ext4", "-O", "bigalloc", "-C", "16384"], "ext4"),
    "casefold": (["-t", "ext4", "-O", "casefold"], "ext4"),
    "no-filetype": (["-t", "ext4", "-O", "^filetype"], "ext4"),
    "no-flex_bg": (["-t", "ext4", "-O", "^flex_bg"], "ext4"),
    "revision-0": (["-t", "ext2", "-r", "0"], "ext2"),
}


@pytest.mark.interop
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rich_tree_matches_host(variant: str, rich_tree: Path,
                                rich_expected: dict[str, dict[str, object]],
                                tmp_path: Path) -> None:
    args, fs_type = VARIANTS[variant]
    image = mkfs(tmp_path / "fs.img", rich_tree, *args)
    expected = rich_expected
    if variant == "inline":
        # mke2fs 1.47.0 -O inline_data copies a sparse file short (e2fsck accepts the result),
        # so debugfs's copy of that one file is the reference.
        dumped = tmp_path / "sparse.bin"
        debugfs(image, f"dump /sparse.bin {dumped}")
        with open(dumped, "rb") as f:
            patched = dict(expected["sparse.bin"], size=dumped.stat().st_size,
                           sha256=sha256_stream(f))
        expected = {**expected, "sparse.bin": patched}
    if variant == "revision-0":
        # No ext_attr feature in revision 0: mke2fs drops every xattr (debugfs agrees).
        assert "Extended attributes:" not in debugfs(image, "stat /xattrs")
        expected = {path: {**facts, "xattrs": {}} if "xattrs" in facts else facts
                    for path, facts in expected.items()}
    with FileSource(image) as source, Ext4Filesystem(source) as fs:
        info = fs.info()
        check_tree(list(fs.entries()), expected)
    assert info["type"] == fs_type
    dumpe2fs = _run("dumpe2fs", "-h", image)
    features = re.search(r"^Filesystem features:\s+(.*)$", dumpe2fs, re.M)
    assert features is not None
    assert info["features"] == [f for f in features.group(1).split() if f != "(none)"]
    block_size = int(re.search(r"^Block size:\s+(\d+)", dumpe2fs, re.M).group(1))  # type: ignore[union-attr]
    assert info["block-size"] == block_size
    assert info["state"] == "clean"
    if variant == "inline":
        # Prove the inline path ran: small files live in the inode.
        assert "Size of inline data" in debugfs(image, "stat /etc/hostname")
    if variant == "blockmap":
        assert "EXTENTS" not in debugfs(image, "stat /big.bin")


def test_info_matches_blkid_and_dumpe2fs(tmp_path: Path) -> None:
    image = mkfs(tmp_path / "fs.img", None, "-t", "ext4", "-L", "my-label", "-U",
                 "0c9a1b2e-1111-4222-8333-444455556666")
    with FileSource(image) as source, Ext4Filesystem(source) as fs:
        info = fs.info()
    assert info["label"] == "my-label"
    assert info["uuid"] == "0c9a1b2e-1111-4222-8333-444455556666"
    blkid = _run("blkid", "-p", "-o", "export", image)
    assert f"TYPE={info['type']}" in blkid.split()
    assert "UUID=0c9a1b2e-1111-4222-8333-444455556666" in blkid.split()
    dumpe2fs = _run("dumpe2fs", "-h", image)

    def field(name: str) -> int:
        found = re.search(rf"^{name}:\s+(\d+)", dumpe2fs, re.M)
        assert found is not None
        return int(found.group(1))

    assert info["size"] == field("Block count") * field("Block size")
    assert info["used"] == (field("Block count") - field("Free blocks")) * field("Block size")
    assert info["inode-count"] == field("Inode count")
    assert info["free-inodes"] == field("Free inodes")
    assert info["warnings"] == []


def test_probe(tmp_path: Path) -> None:
    image = mkfs(tmp_path / "fs.img", None, "-t", "ext2", size="4M")
    head = image.read_bytes()[:4096]
    assert ext4.probe(ProbeInput(head, b"", "fs.img", 4 * MiB)) == 100
    broken = bytearray(head)
    broken[1080] ^= 0xFF
    assert ext4.probe(ProbeInput(bytes(broken), b"", "fs.img", 4 * MiB)) == 0
    implausible = bytearray(head)
    implausible[1024 + 0x18] = 40  # s_log_block_size
    # The magic around a damaged superblock: not claimed (< 50), but named as damaged ext.
    assert ext4.probe(ProbeInput(bytes(implausible), b"", "fs.img", 4 * MiB)) == 10
    assert ext4.probe(ProbeInput(head[:1000], b"", "fs.img", 1000)) == 0


def test_unknown_option_is_refused(tmp_path: Path) -> None:
    image = mkfs(tmp_path / "fs.img", None, "-t", "ext4", size="4M")
    with FileSource(image) as source:
        with pytest.raises(InvalidInputError, match="unknown option"):
            Ext4Filesystem(source, {"bogus": "1"})
        with pytest.raises(InvalidInputError, match="on or off"):
            Ext4Filesystem(source, {"verify": "maybe"})


# ---- times -------------------------------------------------------------------------------------

NS = 123_456_789
PAST_2038 = 2_500_000_000  # 2049-03-22
BEFORE_1970 = -315_619_199  # 1960-01-02 00:00:01


def _debugfs_times(image: Path, path: str) -> dict[str, tuple[int, int]]:
    """The raw (seconds, extra) pairs debugfs prints for each time of an inode."""
    out = {}
    for name, seconds, extra in re.findall(r"^\s*(\w+): 0x([0-9a-f]+):([0-9a-f]+) --",
                                           debugfs(image, f"stat {path}"), re.M):
        out[name] = (int(seconds, 16), int(extra, 16))
    return out


def _kernel_decode(seconds: int, extra: int) -> int:
    """How fs/ext4/ext4.h ext4_decode_extra_time reads a stored time (for the check)."""
    signed = seconds - (1 << 32) if seconds & (1 << 31) else seconds
    return (signed + ((extra & 3) << 32)) * 1_000_000_000 + (extra >> 2)


def test_times_with_nanoseconds_and_epoch_bits(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(b"x")
    image = mkfs(tmp_path / "fs.img", tree, "-t", "ext4")
    # An _extra field first (ns << 2), then the date: debugfs keeps the ns and sets the epoch.
    for name in ("mtime", "atime", "ctime", "crtime"):
        debugfs(image, f"set_inode_field /f {name}_extra {NS << 2:#x}", write=True)
    debugfs(image, "set_inode_field /f mtime 20490322000000", write=True)
    debugfs(image, "set_inode_field /f atime 19600102000001", write=True)
    debugfs(image, "set_inode_field /f crtime 21060207062816", write=True)
    raw = _debugfs_times(image, "/f")
    entries = {e.path: e for e in read_entries(image)}
    f = entries["f"]
    assert f.mtime == _kernel_decode(*raw["mtime"])
    assert f.atime == _kernel_decode(*raw["atime"])
    assert f.ctime == _kernel_decode(*raw["ctime"])
    assert f.crtime == _kernel_decode(*raw["crtime"])
    # ... and the values themselves, independently of the decoder above:
    assert f.mtime % 1_000_000_000 == NS and f.mtime // 10**9 > 2**31  # past 2038
    assert f.atime < 0 and f.atime % 1_000_000_000 == NS  # before 1970
    assert f.crtime is not None and f.crtime // 10**9 >= 2**32  # 2106: both epoch bits
    # The seconds debugfs shows as dates agree (UTC).
    mtime_text = re.search(r" mtime: \S+ -- (.*)$", debugfs(image, "stat /f"), re.M)
    assert mtime_text is not None
    assert time.strftime("%a %b %e %H:%M:%S %Y", time.gmtime(f.mtime // 10**9)) == \
        mtime_text.group(1).strip()


def test_small_inodes_have_second_times_and_no_crtime(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(b"x")
    os.utime(tree / "f", ns=(1_600_000_000_999_999_999, 1_600_000_000_999_999_999))
    image = mkfs(tmp_path / "fs.img", tree, "-t", "ext4", "-I", "128")
    f = {e.path: e for e in read_entries(image)}["f"]
    assert f.mtime == 1_600_000_000 * 10**9
    assert f.crtime is None


# ---- htree, inline data, big sparse files -------------------------------------------------------


@pytest.mark.interop
def test_htree_directory_lists_every_name(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "many").mkdir(parents=True)
    # Long names fill leaf blocks fast, so a two-level index needs only a few thousand.
    names = [f"entry-{i:05d}-{'y' * (50 + i % 23)}" for i in range(3000)]
    for name in names:
        (tree / "many" / name).touch()
    image = mkfs(tmp_path / "fs.img", tree, "-t", "ext4", "-b", "1024", "-N", "4000",
                 size="32M")
    subprocess.run([_tool("e2fsck"), "-fyD", os.fspath(image)], capture_output=True)
    dump = debugfs(image, "htree_dump /many")
    assert "Indirect levels: 1" in dump  # a two-level index: interior dx nodes exist
    entries = read_entries(image)
    listed = [e.path for e in entries if e.path.startswith("many/")]
    assert listed == [f"many/{n}" for n in sorted(names)]
    # The same with checksums off for the directory blocks' content (verify=off path).
    assert len(read_entries(image, verify="off")) == len(entries)


def test_inline_data_files_and_dirs(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "d" / "sub").mkdir(parents=True)
    (tree / "d" / "tiny").write_bytes(b"1234")
    (tree / "sixty").write_bytes(bytes(range(60)))
    (tree / "more").write_bytes(bytes(range(100)))  # spills into system.data
    (tree / "link").symlink_to("x" * 70)  # longer than i_block
    image = mkfs(tmp_path / "fs.img", tree, "-t", "ext4", "-O", "inline_data", "-I", "512")
    for path in ("/d", "/d/sub", "/d/tiny", "/more"):
        assert "Size of inline data" in debugfs(image, f"stat {path}"), path
    got = {e.path: e for e in read_entries(image)}
    assert sorted(got) == ["", "d", "d/sub", "d/tiny", "link", "lost+found", "more", "sixty"]
    for name in ("d/tiny", "sixty", "more"):
        assert read_file(image, name) == (tree / name).read_bytes()
        assert "system.data" not in got[name].xattr_map()
    assert got["link"].link_target == "x" * 70


@pytest.mark.skipif(not is_root(), reason="a loop mount needs root")
def test_inline_directory_with_entries_in_system_data(tmp_path: Path) -> None:
    """An inline directory of 30 names: 56 bytes of entries fit in i_block, the rest live in
    the system.data xattr of a 1 KiB inode. e2fsprogs never spills a directory there (it
    moves it to a block), the kernel does: it writes the directory."""
    image = mkfs(tmp_path / "fs.img", None, "-t", "ext4", "-O", "inline_data", "-I", "1024")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot loop-mount here: {mounted.stderr.decode().strip()}")
    names = sorted(f"n{i:02d}" for i in range(30))
    try:
        (mnt / "d").mkdir()
        for name in names:
            (mnt / "d" / name).write_bytes(name.encode())
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    out = debugfs(image, "stat /d")
    inline = re.search(r"Size of inline data: (\d+)", out)
    assert inline is not None and int(inline.group(1)) > 200 and "system.data" in out
    got = {e.path: e for e in read_entries(image)}
    assert [p for p in got if p.startswith("d/")] == [f"d/{n}" for n in names]
    assert read_file(image, "d/n17") == b"n17"


@pytest.mark.slow
def test_file_past_4gib_reads_right_and_holes_are_not_read(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    size = 5 * (1 << 30) + 12345
    head, tail = os.urandom(70000), os.urandom(300000)
    make_sparse_file(tree / "huge", size, [(0, head), (size - len(tail), tail)])
    image = mkfs(tmp_path / "fs.img", tree, "-t", "ext4", size="32M")
    with FileSource(image) as raw:
        counting = CountingSource(raw)
        fs = Ext4Filesystem(counting)
        huge = {e.path: e for e in fs.entries()}["huge"]
        assert huge.size == size
        before = counting.bytes_read
        zeros = bytes(64 * MiB)
        position = 0
        with huge.open() as f:
            while chunk := f.read(64 * MiB):
                end = position + len(chunk)
                # Compare by ranges (memcmp speed): head, zeros, tail.
                for start, data in ((0, head), (size - len(tail), tail)):
                    lo, hi = max(start, position), min(start + len(data), end)
                    if lo < hi:
                        assert chunk[lo - position: hi - position] == data[lo - start: hi - start]
                zero_lo, zero_hi = max(len(head), position), min(size - len(tail), end)
                if zero_lo < zero_hi:
                    assert chunk[zero_lo - position: zero_hi - position] == \
                        zeros[: zero_hi - zero_lo]
                position = end
        assert position == size
        # Data plus a little metadata, never the 5 GiB of holes.
        assert counting.bytes_read - before < len(head) + len(tail) + 256 * 1024
        with huge.open() as f:
            f.seek(size - len(tail) - 10)
            assert f.read(10 + 5) == bytes(10) + tail[:5]
            f.seek(100)  # backward seek: the map is walked again
            assert f.read(10) == head[100:110]


def test_uninitialised_extent_reads_as_zeros_without_reading(tmp_path: Path) -> None:
    image = mkfs(tmp_path / "fs.img", None, "-t", "ext4", "-b", "4096")
    # fallocate in debugfs makes uninitialised extents over blocks that hold old bytes.
    debugfs(image, "write /dev/null /f", write=True)
    debugfs(image, "fallocate /f 0 99", write=True)
    debugfs(image, "sif /f size 409600", write=True)
    assert "[uninit]" in debugfs(image, "stat /f") or "Uninit" in debugfs(image, "ex /f")
    with FileSource(image) as raw:
        counting = CountingSource(raw)
        fs = Ext4Filesystem(counting)
        f = {e.path: e for e in fs.entries()}["f"]
        before = counting.bytes_read
        with f.open() as stream:
            assert stream.read() == bytes(409600)
        assert counting.bytes_read == before


def test_uninitialised_extent_in_the_middle_of_a_file(tmp_path: Path) -> None:
    """Data, then blocks 10..19 punched and fallocated (an uninitialised extent over blocks
    that may hold anything), then data again: the middle reads as zeros."""
    image = mkfs(tmp_path / "fs.img", None, "-t", "ext4", "-b", "4096")
    content = os.urandom(30 * 4096)
    (tmp_path / "data").write_bytes(content)
    debugfs(image, f"write {tmp_path / 'data'} f", write=True)
    debugfs(image, "punch /f 10 19", write=True)
    debugfs(image, "fallocate /f 10 19", write=True)
    extents = debugfs(image, "ex /f")
    assert re.search(r"\b10 -\s+19\s.*Uninit", extents), extents
    expected = content[: 10 * 4096] + bytes(10 * 4096) + content[20 * 4096:]
    assert read_file(image, "f") == expected


# ---- checksums, journal ------------------------------------------------------------------------


def _flip(image: Path, offset: int) -> None:
    with open(image, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x5A]))


def _inode_offset(image: Path, path: str) -> int:
    found = re.search(r"located at block (\d+), offset (0x[0-9a-f]+)",
                      debugfs(image, f"imap {path}"))
    assert found is not None
    block_size = int(re.search(r"Block size:\s+(\d+)",  # type: ignore[union-attr]
                               _run("dumpe2fs", "-h", image)).group(1))
    return int(found.group(1)) * block_size + int(found.group(2), 16)


def test_corrupt_inode_is_named(tmp_path: Path, rich_tree: Path) -> None:
    image = mkfs(tmp_path / "fs.img", rich_tree, "-t", "ext4")
    _flip(image, _inode_offset(image, "/etc/hostname") + 0x08)  # i_atime
    with pytest.raises(InvalidImageError, match=r"inode \d+ checksum mismatch") as err:
        read_entries(image)
    assert "\n" not in str(err.value)
    assert read_file(image, "etc/hostname", verify="off") == b"imgbridge\n"


def test_corrupt_directory_block_is_named(tmp_path: Path, rich_tree: Path) -> None:
    image = mkfs(tmp_path / "fs.img", rich_tree, "-t", "ext4", "-b", "4096")
    block = int(debugfs(image, "blocks /etc").split()[0])
    # A byte of the unused room before the dir tail: the entries stay valid.
    _flip(image, block * 4096 + 4096 - 12 - 100)
    with pytest.raises(InvalidImageError, match=r"directory block 0 checksum mismatch"):
        read_entries(image)
    assert "etc/hostname" in {e.path for e in read_entries(image, verify="off")}


def test_extent_tree_with_index_block_and_its_checksum(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    islands = [(i * 200 * 1024, os.urandom(5000)) for i in range(12)]
    make_sparse_file(tree / "frag", 12 * 200 * 1024, islands)
    image = mkfs(tmp_path / "fs.img", tree, "-t", "ext4", "-b", "1024", size="16M")
    levels = debugfs(image, "ex /frag").splitlines()
    index = re.match(r"\s*0/\s*1\s+1/\s+1\s+\d+ -\s+\d+\s+(\d+)", levels[1])
    assert index is not None, levels[:3]  # depth 1: the root points to one leaf block
    assert read_file(image, "frag") == (tree / "frag").read_bytes()
    _flip(image, int(index.group(1)) * 1024 + 500)  # unused room of the leaf block
    with pytest.raises(InvalidImageError,
                       match=rf"extent block {index.group(1)} checksum mismatch"):
        read_file(image, "frag")
    assert read_file(image, "frag", verify="off") == (tree / "frag").read_bytes()


def test_depth_two_extent_tree_of_a_fragmented_file(tmp_path: Path) -> None:
    """debugfs writes a file into a filesystem whose free space is every other block: one
    extent per block, 684 of them, so the tree has two index levels below i_block."""
    image = mkfs(tmp_path / "frag.img", None, "-t", "ext4", "-b", "1024", "-N", "2048",
                 "-O", "^resize_inode", size="3M")
    (tmp_path / "one").write_bytes(os.urandom(1024))
    content = os.urandom(700_000)
    (tmp_path / "big").write_bytes(content)
    fill = tmp_path / "fill.cmd"
    fill.write_text("".join(f"write {tmp_path / 'one'} f{i}\n" for i in range(1200)))
    _run("debugfs", "-w", "-f", fill, image)
    holes = tmp_path / "holes.cmd"
    holes.write_text("".join(f"rm f{i}\n" for i in range(0, 1200, 2))
                     + f"write {tmp_path / 'big'} big\n")
    _run("debugfs", "-w", "-f", holes, image)
    assert re.search(r"^\s*0/\s*2\s", debugfs(image, "ex /big"), re.M)  # depth 2
    dumped = tmp_path / "dumped"
    debugfs(image, f"dump /big {dumped}")
    assert dumped.read_bytes() == content
    assert read_file(image, "big") == content
    with FileSource(image) as source, Ext4Filesystem(source) as fs:
        entry = next(e for e in fs.entries() if e.path == "big")
        with entry.open() as f:
            f.seek(654_321)
            assert f.read(5000) == content[654_321:659_321]
            f.seek(1000)  # backwards: the walk starts again
            assert f.read(3000) == content[1000:4000]


def test_corrupt_xattr_block_is_named(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(b"x")
    os.setxattr(tree / "f", "user.big", b"v" * 600)
    image = mkfs(tmp_path / "fs.img", tree, "-t", "ext4", "-b", "1024", "-I", "128",
                 size="4M")
    acl_block = re.search(r"File ACL: (\d+)", debugfs(image, "stat /f"))
    assert acl_block is not None and int(acl_block.group(1))
    assert {e.path: e for e in read_entries(image)}["f"].xattr_map() == {"user.big": b"v" * 600}
    _flip(image, int(acl_block.group(1)) * 1024 + 1000)  # inside the value
    with pytest.raises(InvalidImageError, match=rf"xattr block {acl_block.group(1)} checksum"):
        read_entries(image)
    value = {e.path: e for e in read_entries(image, verify="off")}["f"].xattr_map()["user.big"]
    assert value != b"v" * 600 and len(value) == 600


def test_corrupt_superblock_and_group_descriptor(tmp_path: Path) -> None:
    image = mkfs(tmp_path / "fs.img", None, "-t", "ext4", "-b", "4096")
    _flip(image, 1024 + 0x150 - 8)  # a byte of s_jnl_blocks: covered by the checksum only
    with pytest.raises(InvalidImageError, match="superblock checksum mismatch"):
        read_entries(image)
    assert read_entries(image, verify="off")[0].path == ""
    image = mkfs(tmp_path / "fs2.img", None, "-t", "ext4", "-b", "4096")
    _flip(image, 4096 + 0x14)  # group 0's bg_exclude_bitmap_lo
    with pytest.raises(InvalidImageError, match="group descriptor 0 checksum mismatch"):
        read_entries(image)
    image = mkfs(tmp_path / "fs3.img", None, "-t", "ext4", "-b", "4096", "-O",
                 "^metadata_csum,uninit_bg")
    _flip(image, 4096 + 0x14)
    with pytest.raises(InvalidImageError, match="group descriptor 0 checksum mismatch"):
        read_entries(image)


def test_dirty_journal_warns_and_reads(tmp_path: Path, rich_tree: Path) -> None:
    image = mkfs(tmp_path / "fs.img", rich_tree, "-t", "ext4")
    debugfs(image, "feature needs_recovery", write=True)
    with FileSource(image) as source:
        with pytest.warns(Ext4Warning, match="journal needs recovery"):
            fs = Ext4Filesystem(source)
        assert any("journal" in w for w in fs.info()["warnings"])
        assert "needs_recovery" in fs.info()["features"]
        assert "etc/hostname" in {e.path for e in fs.entries()}


def test_unknown_incompat_feature_is_named(tmp_path: Path) -> None:
    image = mkfs(tmp_path / "fs.img", None, "-t", "ext4", "-O", "^metadata_csum", size="4M")
    with open(image, "r+b") as f:
        f.seek(1024 + 0x60)
        incompat = int.from_bytes(f.read(4), "little")
        f.seek(1024 + 0x60)
        f.write((incompat | 0x1 | (1 << 30)).to_bytes(4, "little"))
    with FileSource(image) as source, pytest.raises(
            UnsupportedFeatureError, match="compression FEATURE_I30"):
        Ext4Filesystem(source)


# ---- inside a partition, raw and through qcow2 --------------------------------------------------


def _paths_and_hashes(entries: Iterator[Entry]) -> list[tuple[str, str, str]]:
    out = []
    for e in entries:
        digest = ""
        if e.type is EntryType.FILE:
            with e.open() as f:
                digest = sha256_stream(f)
        out.append((e.path, e.type.value, digest))
    return out


@pytest.mark.interop
def test_filesystem_in_a_gpt_partition_raw_and_qcow2(tmp_path: Path, rich_tree: Path) -> None:
    from imgbridge.formats.volume.table import DiskSource, partition_source, read_partitions

    fs_image = mkfs(tmp_path / "fs.img", rich_tree, "-t", "ext4")
    with FileSource(fs_image) as source:
        direct = _paths_and_hashes(Ext4Filesystem(source).entries())

    disk = make_sparse_file(tmp_path / "disk.img", 80 * MiB, [])
    subprocess.run([_tool("sfdisk"), "-q", os.fspath(disk)], input="label: gpt\nsize=64M\n",
                   text=True, check=True, capture_output=True)
    _run("dd", f"if={fs_image}", f"of={disk}", "bs=1M", "seek=1", "conv=notrunc,sparse",
         "status=none")
    qcow2 = tmp_path / "disk.qcow2"
    _run("qemu-img", "convert", "-O", "qcow2", disk, qcow2)

    for path in (disk, qcow2):
        opened = imgbridge.api.open_disk(path)
        try:
            table = read_partitions(opened)
            assert table is not None and table.kind == "gpt"
            part = table.partitions[0]
            assert part.start == 1 * MiB
            with Ext4Filesystem(partition_source(opened, part)) as fs:
                assert _paths_and_hashes(fs.entries()) == direct
            # the whole disk, seen as a source, is not itself a filesystem
            with pytest.raises(InvalidImageError):
                Ext4Filesystem(DiskSource(opened))
        finally:
            opened.close()


# ---- speed (reported, not asserted) -------------------------------------------------------------


@pytest.mark.slow
def test_measure_listing_and_reading_vs_debugfs_rdump(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    tree = tmp_path / "tree"
    for d in range(40):
        sub = tree / f"dir{d:02d}"
        sub.mkdir(parents=True)
        for i in range(50):
            (sub / f"f{i:03d}").write_bytes(os.urandom(100 * 1024 if i % 10 else 0))
        (sub / "big").write_bytes(os.urandom(1 * MiB))
    image = mkfs(tmp_path / "fs.img", tree, "-t", "ext4", "-b", "4096", size="400M")
    # Both sides write what they read to disk (rdump cannot do less), from a warm cache.
    ours_out = tmp_path / "ours"
    ours_out.mkdir()
    start = time.perf_counter()
    total = 0
    with FileSource(image) as source, Ext4Filesystem(source) as fs:
        for e in fs.entries():
            target = ours_out / e.path
            if e.type is EntryType.DIR:
                target.mkdir(exist_ok=True)
            elif e.type is EntryType.FILE:
                with e.open() as f, open(target, "wb") as sink:
                    shutil.copyfileobj(f, sink, 4 * MiB)
                total += e.size
    ours = time.perf_counter() - start
    out = tmp_path / "rdump"
    out.mkdir()
    start = time.perf_counter()
    debugfs(image, f"rdump / {out}")
    theirs = time.perf_counter() - start
    with capsys.disabled():
        print(f"\next4 extract of {total / MiB:.0f} MiB in {len(list(tree.rglob('*')))} "
              f"entries: imgbridge {ours:.2f} s, debugfs rdump {theirs:.2f} s")
    assert total > 150 * MiB


def test_devices_need_root_to_build(tmp_path: Path) -> None:
    if not is_root():
        pytest.skip("mknod needs root")
    tree = tmp_path / "tree"
    tree.mkdir()
    os.mknod(tree / "big-minor", 0o600 | stat.S_IFCHR, os.makedev(259, 70000))
    image = mkfs(tmp_path / "fs.img", tree, "-t", "ext4", size="4M")
    dev = {e.path: e for e in read_entries(image)}["big-minor"]
    assert (dev.type, dev.devmajor, dev.devminor) == (EntryType.CHAR, 259, 70000)


def test_ea_inode_values_and_encrypted_inodes_are_refused(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    (tree / "d" / "f").write_bytes(b"x")
    image = mkfs(tmp_path / "fs.img", tree, "-t", "ext4", "-b", "1024", "-O", "ea_inode",
                 size="8M")
    value = tmp_path / "value"
    value.write_bytes(os.urandom(1000))
    debugfs(image, f"ea_set -f {value} /d/f user.huge", write=True)
    with pytest.raises(UnsupportedFeatureError, match=r"xattr value stored in inode \d+ "
                       r"\(ea_inode\)"):
        read_entries(image)
    image = mkfs(tmp_path / "fs2.img", tree, "-t", "ext4", "-O", "encrypt", size="8M")
    debugfs(image, "sif /d flags 0x800", write=True)
    with pytest.raises(UnsupportedFeatureError, match=r"inode \d+ is encrypted"):
        read_entries(image)
