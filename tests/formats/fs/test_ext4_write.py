"""The ext4 writer, judged by e2fsprogs: e2fsck -fn must find nothing to fix; dumpe2fs,
debugfs (stat, ea_list, ls, htree_dump, dx_hash, rdump) must see exactly what the tree says.
Our own reader takes no part: a round trip through our reader and writer proves nothing."""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import subprocess
import time
import uuid
from pathlib import Path
from typing import BinaryIO

import pytest
from helpers import (
    RICH_FAR_MTIME_NS,
    RICH_MTIME_NS,
    is_root,
    make_rich_tree,
    require_tool,
    run_tool,
)
from imgbridge.formats.fs.ext4 import writer
from imgbridge.formats.fs.ext4._whash import dirhash

from imgbridge.errors import InvalidInputError
from imgbridge.model.tree import Entry, EntryType
from imgbridge.output import AtomicOutput

MiB = 1 << 20
FIXED_UUID = uuid.UUID("0b1c2d3e-4f50-4617-8829-3a4b5c6d7e8f")


def host_entries(root: Path) -> list[Entry]:
    """A host folder as a flat tree of Entries (lstat, listxattr, readlink), pre-order,
    hardlinks pointing at the first path of their inode."""
    out: list[Entry] = []
    first_path: dict[tuple[int, int], str] = {}

    def walk(path: Path, rel: str) -> None:
        st = os.lstat(path)
        xattrs: dict[str, bytes] = {}
        if not stat.S_ISLNK(st.st_mode):
            for name in os.listxattr(path, follow_symlinks=False):
                xattrs[name] = os.getxattr(path, name, follow_symlinks=False)
        common = {"mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
                  "mtime": st.st_mtime_ns, "atime": st.st_atime_ns, "ctime": st.st_ctime_ns,
                  "xattrs": tuple(xattrs.items())}
        if stat.S_ISDIR(st.st_mode):
            out.append(Entry(rel, EntryType.DIR, **common))  # type: ignore[arg-type]
            for name in sorted(os.listdir(path), key=os.fsencode):
                walk(path / name, f"{rel}/{name}" if rel else name)
            return
        key = (st.st_dev, st.st_ino)
        if key in first_path:
            out.append(Entry(rel, EntryType.HARDLINK, link_target=first_path[key]))
            return
        first_path[key] = rel
        if stat.S_ISREG(st.st_mode):
            def opener(p: Path = path) -> BinaryIO:
                return open(p, "rb")
            out.append(Entry(rel, EntryType.FILE, size=st.st_size, opener=opener,
                             **common))  # type: ignore[arg-type]
        elif stat.S_ISLNK(st.st_mode):
            out.append(Entry(rel, EntryType.SYMLINK, link_target=os.readlink(path),
                             **common))  # type: ignore[arg-type]
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            kind = EntryType.CHAR if stat.S_ISCHR(st.st_mode) else EntryType.BLOCK
            out.append(Entry(rel, kind, devmajor=os.major(st.st_rdev),
                             devminor=os.minor(st.st_rdev), **common))  # type: ignore[arg-type]
        elif stat.S_ISFIFO(st.st_mode):
            out.append(Entry(rel, EntryType.FIFO, **common))  # type: ignore[arg-type]
        elif stat.S_ISSOCK(st.st_mode):
            out.append(Entry(rel, EntryType.SOCKET, **common))  # type: ignore[arg-type]

    walk(root, "")
    return out


def write_image(path: Path, tree: list[Entry], **options: str) -> Path:
    with AtomicOutput(str(path)) as out:
        writer.create(out, tree, options, lambda done, total: None)
        out.commit()
    return path


def debugfs(image: Path, request: str) -> str:
    return run_tool("debugfs", "-R", request, image).stdout


def debugfs_bytes(image: Path, request: str) -> bytes:
    require_tool("debugfs")
    return subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True,
                          check=True).stdout


def assert_fsck_clean(image: Path) -> None:
    result = run_tool("e2fsck", "-fn", image, check=False)
    problems = [line for line in result.stdout.splitlines()
                if not line.startswith("Pass ") and not re.match(r"^\S+: \d+/\d+ files", line)]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr


def mem_file(path: str, content: bytes, **kw: object) -> Entry:
    return Entry(path, EntryType.FILE, size=len(content),
                 opener=lambda: io.BytesIO(content), **kw)  # type: ignore[arg-type]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture(scope="module")
def rich(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Entry], Path]:
    base = tmp_path_factory.mktemp("ext4w")
    root = make_rich_tree(base / "rich", big_dir=3000)
    tree = host_entries(root)
    image = write_image(base / "rich.img", tree, label="richtree", uuid=str(FIXED_UUID))
    return root, tree, image


# ---- e2fsck, dumpe2fs --------------------------------------------------------------------


def test_rich_tree_is_clean_for_e2fsck(rich: tuple[Path, list[Entry], Path]) -> None:
    assert_fsck_clean(rich[2])


def test_dumpe2fs_features_label_uuid(rich: tuple[Path, list[Entry], Path]) -> None:
    out = run_tool("dumpe2fs", "-h", rich[2]).stdout
    features = set(re.search(r"Filesystem features:\s+(.*)", out).group(1).split())  # type: ignore[union-attr]
    assert {"has_journal", "ext_attr", "dir_index", "filetype", "extent", "64bit", "flex_bg",
            "sparse_super", "large_file", "huge_file", "dir_nlink", "extra_isize",
            "metadata_csum"} <= features
    assert re.search(r"Filesystem volume name:\s+richtree$", out, re.M)
    assert re.search(rf"Filesystem UUID:\s+{FIXED_UUID}$", out, re.M)
    assert re.search(r"Filesystem state:\s+clean$", out, re.M)
    assert re.search(r"Checksum type:\s+crc32c", out)
    assert re.search(r"Journal backup:\s+inode blocks", out)
    assert re.search(r"Journal start:\s+0$", out, re.M)
    assert re.search(r"Total journal size:\s+4096k", out)  # mke2fs's size below 128 MiB
    # The superblock times come from the newest directory mtime, not the clock.
    assert re.search(r"Filesystem created:\s+Tue Nov 14 22:13:20 2023", out)


# ---- what debugfs sees -------------------------------------------------------------------


def test_every_file_reads_back_identical(rich: tuple[Path, list[Entry], Path],
                                         tmp_path: Path) -> None:
    root, tree, image = rich
    run_tool("debugfs", "-R", f"rdump / {tmp_path}", image)
    dumped = tmp_path / root.name if (tmp_path / root.name).exists() else tmp_path
    files = [e for e in tree if e.type is EntryType.FILE]
    assert len(files) > 3000
    for entry in files:
        assert (dumped / entry.path).read_bytes() == (root / entry.path).read_bytes(), entry.path


def _stat(image: Path, path: str) -> str:
    return debugfs(image, f"stat /{path}")


def _time_fields(ns: int) -> str:
    sec, nsec = divmod(ns, 1_000_000_000)
    low = sec & 0xFFFFFFFF
    signed = low - (1 << 32) if low >= 1 << 31 else low
    extra = ((sec - signed) >> 32) | (nsec << 2)
    return f"0x{low:08x}:{extra:08x}"


def test_stat_owner_mode_links_times(rich: tuple[Path, list[Entry], Path]) -> None:
    _, tree, image = rich
    by_path = {e.path: e for e in tree}
    for path, mode, links in (("bin/tool", "04755", 1), ("bin/group-tool", "02711", 1),
                              ("tmp", "01777", 2), ("etc/hostname", "0644", 2),
                              ("many", "0755", 2), ("", "0755", None)):
        out = _stat(image, path)
        assert re.search(rf"Mode:\s+{mode}\b", out), (path, out)
        if links is not None:
            assert re.search(rf"Links: {links}\b", out), (path, out)
        entry = by_path[path]
        assert f"mtime: {_time_fields(entry.mtime)}" in out
        assert f"atime: {_time_fields(entry.atime or entry.mtime)}" in out
        assert f"ctime: {_time_fields(entry.ctime or entry.mtime)}" in out
    future = _stat(image, "future")
    assert f"mtime: {_time_fields(RICH_FAR_MTIME_NS)}" in future
    assert "2049" in future  # decoded past 2038 through the epoch bits
    assert f"mtime: {_time_fields(RICH_MTIME_NS)}" in _stat(image, "empty")
    # root: "." , ".." and lost+found plus every top-level directory
    top_dirs = sum(1 for e in tree if e.type is EntryType.DIR and e.path and "/" not in e.path)
    assert re.search(rf"Links: {2 + top_dirs + 1}\b", _stat(image, ""))
    if is_root():
        assert re.search(r"User:\s+1000\s+Group:\s+1000", _stat(image, "etc/hostname"))
        assert re.search(r"User:\s+1001\s+Group:\s+1002", _stat(image, "fast-link"))
        assert re.search(r"User:\s+0\s+Group:\s+100\b", _stat(image, "many"))


def test_big_owner_ids_and_old_times(tmp_path: Path) -> None:
    """32-bit owners (the high halves live in osd2) and a time before 1970."""
    tree = [Entry("", EntryType.DIR, mtime=10**18),
            mem_file("owned", b"x", uid=70000, gid=2_000_000_000, mtime=-15_000_000_005)]
    image = write_image(tmp_path / "o.img", tree)
    assert_fsck_clean(image)
    out = _stat(image, "owned")
    assert re.search(r"User:\s+70000\s+Group:\s+2000000000", out)
    assert f"mtime: {_time_fields(-15_000_000_005)}" in out
    assert "1969" in out


def test_symlink_fast_slow_boundary_and_extreme_times_and_devices(tmp_path: Path) -> None:
    """59 bytes is the longest fast symlink (60 with its NUL fill i_block); times at both
    ends of ext4's range (1901-12-13 and 2446-05-10, epoch bits 3); device numbers in the
    old and the new encoding, up to 12-bit major and 20-bit minor."""
    oldest = -(1 << 31) * 10**9
    newest = (3 * (1 << 32) + (1 << 31) - 1) * 10**9 + 999_999_999
    tree = [Entry("", EntryType.DIR, mtime=10**18)]
    tree += [Entry(f"s{n}", EntryType.SYMLINK, link_target="t" * n) for n in (59, 60, 61)]
    tree += [mem_file("oldest", b"", mtime=oldest, atime=oldest + 1),
             mem_file("newest", b"", mtime=newest, crtime=newest),
             Entry("old-dev", EntryType.CHAR, devmajor=255, devminor=255),
             Entry("new-dev", EntryType.BLOCK, devmajor=256, devminor=0),
             Entry("max-dev", EntryType.CHAR, devmajor=4095, devminor=(1 << 20) - 1)]
    image = write_image(tmp_path / "b.img", tree)
    assert_fsck_clean(image)
    assert f'Fast link dest: "{"t" * 59}"' in _stat(image, "s59")
    for n in (60, 61):
        out = _stat(image, f"s{n}")
        assert "Fast link dest" not in out and "EXTENTS" in out
        assert debugfs(image, f"cat /s{n}") == "t" * n
    out = _stat(image, "oldest")
    assert f"mtime: {_time_fields(oldest)}" in out and "1901" in out
    assert f"atime: {_time_fields(oldest + 1)}" in out
    out = _stat(image, "newest")
    assert f"mtime: {_time_fields(newest)}" in out and f"crtime: {_time_fields(newest)}" in out
    assert "2446" in out
    for path, numbers in (("old-dev", "255:255"), ("new-dev", "256:0"),
                          ("max-dev", "4095:1048575")):
        match = re.search(r"Device major/minor number: (\d+):(\d+)", _stat(image, path))
        assert match and f"{int(match.group(1))}:{int(match.group(2))}" == numbers, path
    with pytest.raises(InvalidInputError, match="outside ext4's range"):
        writer.build_ext4([mem_file("later", b"", mtime=newest + 10**9)])
    with pytest.raises(InvalidInputError, match="out of range"):
        writer.build_ext4([Entry("d", EntryType.CHAR, devmajor=4096, devminor=0)])


def test_symlinks_fast_and_slow(rich: tuple[Path, list[Entry], Path]) -> None:
    root, _, image = rich
    assert 'Fast link dest: "etc/hostname"' in _stat(image, "fast-link")
    assert 'Fast link dest: "dangling"' in _stat(image, "dangling-link")
    slow = _stat(image, "slow-link")
    assert "Fast link dest" not in slow and "EXTENTS" in slow
    target = os.readlink(root / "slow-link")
    assert debugfs(image, "cat /slow-link").encode() == target.encode()


def test_types_in_listing(rich: tuple[Path, list[Entry], Path]) -> None:
    out = debugfs(rich[2], "ls -l /")
    modes = {line.split()[-1]: line.split()[1] for line in out.splitlines() if line.strip()}
    assert modes["etc"].startswith("40") and modes["empty"].startswith("100")
    assert modes["fast-link"].startswith("120") and modes["fifo"].startswith("10644")
    assert modes["socket"].startswith("140") and modes["lost+found"] == "40700"
    if is_root():
        assert modes["null"].startswith("20") and modes["sda"].startswith("60")


@pytest.mark.skipif(not is_root(), reason="creating device nodes needs root")
def test_device_numbers(rich: tuple[Path, list[Entry], Path], tmp_path: Path) -> None:
    assert "Device major/minor number: 01:03" in _stat(rich[2], "null")
    assert "Device major/minor number: 08:00" in _stat(rich[2], "sda")
    big = [Entry("", EntryType.DIR),
           Entry("dev", EntryType.BLOCK, devmajor=259, devminor=70000)]
    image = write_image(tmp_path / "d.img", big)
    assert_fsck_clean(image)
    assert "Device major/minor number: 259:70000" in _stat(image, "dev")


def test_xattrs_capability_and_acl(rich: tuple[Path, list[Entry], Path]) -> None:
    image = rich[2]
    cap = debugfs(image, "ea_list /bin/tool")
    assert "security.capability (20) = 01 00 00 02 00 04 00 00" in cap
    acl = debugfs(image, "ea_list /acl-file")
    # ext4's own ACL form: version 1, short entries for user::, group::, mask::, other::
    assert ("system.posix_acl_access (28) = 01 00 00 00 01 00 06 00 02 00 04 00 e8 03 00 00 "
            "04 00 04 00 10 00 04 00 20 00 04 00") in acl
    big = debugfs(image, "ea_list /xattrs")
    assert 'user.comment (5) = "hello"' in big and "user.big (300)" in big
    assert "File ACL: 0" not in _stat(image, "xattrs")  # too big for the inode: a block
    assert f'"{"v" * 300}"' in debugfs(image, "ea_get /xattrs user.big")


def test_shared_xattr_block(tmp_path: Path) -> None:
    attrs = (("user.a", b"1" * 200), ("trusted.b", b"2" * 100))
    tree = [Entry("", EntryType.DIR)] + [mem_file(f"f{i}", b"z", xattrs=attrs) for i in range(3)]
    image = write_image(tmp_path / "x.img", tree)
    assert_fsck_clean(image)
    acl_blocks = {re.search(r"File ACL: (\d+)", _stat(image, f"f{i}")).group(1)  # type: ignore[union-attr]
                  for i in range(3)}
    assert len(acl_blocks) == 1 and acl_blocks != {"0"}
    assert "trusted.b (100)" in debugfs(image, "ea_list /f2")


def test_xattrs_larger_than_a_block_are_refused() -> None:
    tree = [Entry("", EntryType.DIR), mem_file("f", b"", xattrs={"user.huge": b"v" * MiB})]
    with pytest.raises(InvalidInputError, match="more room than one 4096-byte block"):
        writer.build_ext4(tree)


# ---- directories -------------------------------------------------------------------------


def test_htree_for_a_big_directory(rich: tuple[Path, list[Entry], Path]) -> None:
    out = debugfs(rich[2], "htree_dump /many")
    assert "Root node dump" in out and "Indirect levels: 0" in out
    assert len(re.findall(r"^Entry #\d+: Hash", out, re.M)) > 20
    assert "Flags: 0x81000" in _stat(rich[2], "many")  # EXTENTS | INDEX


def test_dirhash_matches_debugfs(tmp_path: Path) -> None:
    image = write_image(tmp_path / "h.img", [Entry("", EntryType.DIR)])
    seed = uuid.UUID("12345678-9abc-4def-8123-456789abcdef")
    # Non-ASCII bytes are where the signed and unsigned variants part.
    for name in ("a", "file-00001", "x" * 40, "n" * 255, "caf\u00e9", "\u00fc" * 20):
        raw = name.encode()
        out = debugfs(image, f"dx_hash -h half_md4 -s {seed} {name}")
        match = re.search(r"is (0x[0-9a-f]+) \(minor (0x[0-9a-f]+)\)", out)
        assert match, out
        assert dirhash(raw, seed.bytes) == (int(match.group(1), 16), int(match.group(2), 16))


def test_two_level_htree(tmp_path: Path) -> None:
    """1 KiB blocks: 6000 names overflow one dx_root, so dx_nodes appear. The names are
    not ASCII, where the signed hash differs from the unsigned one."""
    tree = [Entry("", EntryType.DIR), Entry("d", EntryType.DIR)]
    tree += [Entry(f"d/entr\u00e9-{i:06d}-\u00fc", EntryType.FIFO) for i in range(6000)]
    image = write_image(tmp_path / "t.img", tree, block_size="1024")
    assert_fsck_clean(image)
    assert "Indirect levels: 1" in debugfs(image, "htree_dump /d")


@pytest.mark.parametrize("block_size", ["1024", "4096"])
def test_given_lost_found_big_enough_for_an_htree(tmp_path: Path, block_size: str) -> None:
    """A lost+found of the tree that outgrows one block becomes an htree; padding it to
    mke2fs's 16 KiB with empty blocks the index does not reference breaks the htree."""
    names = [f"lost+found/n{i:04d}" + "y" * 100 for i in range(40)]
    tree = [Entry("lost+found", EntryType.DIR, mode=0o700)] + [mem_file(n, b"") for n in names]
    image = write_image(tmp_path / "lf.img", tree, block_size=block_size)
    assert_fsck_clean(image)
    assert "Root node dump" in debugfs(image, "htree_dump /lost+found")


def test_hash_collision_across_a_leaf_boundary_sets_the_continuation_bit(
        tmp_path: Path) -> None:
    """Two names with one hash, the first closing leaf 0 exactly and the second opening
    leaf 1: the index entry of leaf 1 must carry the low (continuation) bit, or a lookup of
    the second name would stop in leaf 0. debugfs confirms the collision and reads the
    index; e2fsck checks the hash ranges."""
    seed = FIXED_UUID
    first, second = "c0025644", "c0060321"  # found by search: same half-MD4 hash with seed
    hashes = set()
    for name in (first, second):
        out = debugfs(write_image(tmp_path / "h.img", []),
                      f"dx_hash -h half_md4 -s {seed} {name}")
        hashes.add(int(re.search(r"is (0x[0-9a-f]+)", out).group(1), 16))  # type: ignore[union-attr]
    (collision,) = hashes
    # 253 fillers of 16 bytes and one of 20, all hashing below the pair: with 16 more for
    # the first name, leaf 0 holds exactly its 4084 bytes (4096 less the checksum tail).
    fillers: list[str] = []
    i = 0
    while len(fillers) < 254:
        name = f"f{i:07d}" if len(fillers) < 253 else f"g{i:011d}"
        if dirhash(name.encode(), seed.bytes)[0] < collision:
            fillers.append(name)
        i += 1
    tree = [Entry("d", EntryType.DIR)] + [Entry(f"d/{n}", EntryType.FIFO)
                                         for n in [*fillers, first, second]]
    image = write_image(tmp_path / "c.img", tree, hash_seed=str(seed))
    assert_fsck_clean(image)
    dump = debugfs(image, "htree_dump /d")
    assert f"Entry #1: Hash 0x{collision | 1:08x}, block 2" in dump, dump[:600]
    listing = debugfs(image, "ls /d")
    assert first in listing and second in listing
    if not is_root():
        return
    # Linux itself looks both names up through the index (debugfs reads leaves linearly).
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-o", "loop,ro", str(image), str(mnt)],
                      capture_output=True).returncode:
        return
    try:
        for name in (first, second, fillers[0], fillers[-1]):
            assert stat.S_ISFIFO(os.lstat(mnt / "d" / name).st_mode), name
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_missing_parents_are_created(tmp_path: Path) -> None:
    tree = [mem_file("a/b/c.txt", b"deep")]
    image = write_image(tmp_path / "p.img", tree)
    assert_fsck_clean(image)
    assert debugfs(image, "cat /a/b/c.txt") == "deep"
    assert re.search(r"Mode:\s+0755", _stat(image, "a/b"))


def test_hardlinks_share_an_inode(tmp_path: Path) -> None:
    tree = [Entry("", EntryType.DIR), mem_file("one", b"same"),
            Entry("sub", EntryType.DIR), Entry("sub/two", EntryType.HARDLINK, link_target="one"),
            Entry("three", EntryType.HARDLINK, link_target="sub/two")]
    image = write_image(tmp_path / "l.img", tree)
    assert_fsck_clean(image)
    inodes = {re.search(r"Inode: (\d+)", _stat(image, p)).group(1)  # type: ignore[union-attr]
              for p in ("one", "sub/two", "three")}
    assert len(inodes) == 1
    assert "Links: 3" in _stat(image, "three")


def test_contents_are_read_late_once_and_in_order(tmp_path: Path) -> None:
    opened: list[str] = []

    def file(path: str, content: bytes) -> Entry:
        def opener() -> BinaryIO:
            opened.append(path)
            return io.BytesIO(content)
        return Entry(path, EntryType.FILE, size=len(content), opener=opener)

    tree = [file(f"d{i % 3}/f{i:03d}", os.urandom(5000 + i)) for i in range(60)]
    disk = writer.build_ext4(tree)
    assert opened == []  # planning reads no content
    disk.close()
    write_image(tmp_path / "late.img", tree)
    assert sorted(opened) == opened and len(set(opened)) == len(opened) == 60


def test_undecodable_name_keeps_its_bytes(tmp_path: Path) -> None:
    image = write_image(tmp_path / "n.img", [mem_file("caf\udce9", b"latin-1 name")])
    assert_fsck_clean(image)
    listing = debugfs_bytes(image, "ls -l /")
    assert b" caf\\xe9\n" in listing  # debugfs escapes the byte that is not UTF-8


def test_refusals() -> None:
    with pytest.raises(InvalidInputError, match="flatten"):
        writer.build_ext4([Entry("gone", EntryType.WHITEOUT)])
    with pytest.raises(InvalidInputError, match="256 bytes"):
        writer.build_ext4([mem_file("\u00e9" * 128, b"")])
    with pytest.raises(InvalidInputError, match="not in the tree"):
        writer.build_ext4([Entry("l", EntryType.HARDLINK, link_target="nowhere")])
    with pytest.raises(InvalidInputError, match="entries lie below it"):
        writer.build_ext4([mem_file("f", b""), mem_file("f/g", b"")])
    with pytest.raises(InvalidInputError, match="longer than 16 bytes"):
        writer.build_ext4([], label="x" * 17)
    with pytest.raises(InvalidInputError, match="symlink target of 0 bytes"):
        writer.build_ext4([Entry("s", EntryType.SYMLINK, link_target="")])
    with pytest.raises(InvalidInputError, match="outside ext4's range"):
        writer.build_ext4([mem_file("old", b"", mtime=-(1 << 40) * 10**9)])
    with pytest.raises(InvalidInputError, match="unknown option"):
        writer.create(None, [], {"colour": "blue"}, lambda d, t: None)  # type: ignore[arg-type]


def test_stream_of_the_wrong_length_is_an_error(tmp_path: Path) -> None:
    tree = [Entry("", EntryType.DIR), mem_file("f", b"abc")]
    liar = Entry("f", EntryType.FILE, size=10, opener=lambda: io.BytesIO(b"abc"))
    with pytest.raises(InvalidInputError, match="content ended"):
        write_image(tmp_path / "s.img", [tree[0], liar])
    longer = Entry("f", EntryType.FILE, size=2, opener=lambda: io.BytesIO(b"abc"))
    with pytest.raises(InvalidInputError, match="longer than its size"):
        write_image(tmp_path / "s.img", [tree[0], longer])
    assert not (tmp_path / "s.img").exists()


# ---- sizes, options, determinism ---------------------------------------------------------


def test_empty_tree_gets_a_small_automatic_size(tmp_path: Path) -> None:
    image = write_image(tmp_path / "e.img", [])
    assert_fsck_clean(image)
    assert 8 * MiB <= image.stat().st_size <= 32 * MiB
    assert "lost+found" in debugfs(image, "ls /")


def test_journal_off_and_small_blocks(rich: tuple[Path, list[Entry], Path],
                                      tmp_path: Path) -> None:
    image = write_image(tmp_path / "k.img", rich[1], journal="off", block_size="1024")
    assert_fsck_clean(image)
    out = run_tool("dumpe2fs", "-h", image).stdout
    assert "has_journal" not in out and re.search(r"Block size:\s+1024", out)
    assert debugfs(image, "cat /etc/hostname") == "imgbridge\n"


def _sparse_source(size: int, marks: dict[int, bytes]) -> Entry:
    """A file read from a generated stream: zeros with a few marks (no host file)."""

    class Stream(io.RawIOBase):
        def __init__(self) -> None:
            self.pos = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
            n = min(len(buf), size - self.pos)
            buf[:n] = bytes(n)
            for at, data in marks.items():
                lo, hi = max(at, self.pos), min(at + len(data), self.pos + n)
                if lo < hi:
                    buf[lo - self.pos : hi - self.pos] = data[lo - at : hi - at]
            self.pos += n
            return n

    return Entry("big/sparse.bin", EntryType.FILE, size=size,
                 opener=lambda: io.BufferedReader(Stream(), 1 << 20))  # type: ignore[arg-type]


@pytest.mark.slow
def test_300_mib_file_over_several_groups(tmp_path: Path) -> None:
    size = 300 * MiB + 123
    marks = {0: b"start", 200 * MiB + 7: b"middle", size - 3: b"end"}
    tree = [Entry("", EntryType.DIR), _sparse_source(size, marks)]
    image = write_image(tmp_path / "b.img", tree)
    assert_fsck_clean(image)
    assert size < image.stat().st_size < size * 1.4
    assert os.stat(image).st_blocks * 512 < 64 * MiB  # zeros were not written
    out = _stat(image, "big/sparse.bin")
    assert f"Size: {size}" in out
    extents = debugfs(image, "ex /big/sparse.bin")
    # 128 MiB per extent at most, and the backup superblock of group 1 sits in the way
    assert len([ln for ln in extents.splitlines() if re.match(r"\s*0/\s*0", ln)]) == 3
    dumped = tmp_path / "out.bin"
    run_tool("debugfs", "-R", f"dump /big/sparse.bin {dumped}", image)
    with open(dumped, "rb") as f:
        for at, data in marks.items():
            f.seek(at)
            assert f.read(len(data)) == data


def test_extent_tree_with_index_blocks(tmp_path: Path) -> None:
    """1 KiB blocks: extents of at most 32 MiB, broken by the metadata of 8 MiB groups, so a
    100 MiB file needs more than the inode's 4 extent slots: a depth-1 tree."""
    size = 100 * MiB + 5
    tree = [Entry("", EntryType.DIR), _sparse_source(size, {size - 5: b"tail!"})]
    image = write_image(tmp_path / "x.img", tree, block_size="1024")
    assert_fsck_clean(image)
    extents = debugfs(image, "ex /big/sparse.bin")
    assert re.search(r"^\s*0/\s*1\s", extents, re.M) and re.search(r"^\s*1/\s*1\s", extents, re.M)
    assert debugfs_bytes(image, "cat /big/sparse.bin")[-5:] == b"tail!"


def test_size_option_and_too_small(tmp_path: Path) -> None:
    tree = [Entry("", EntryType.DIR), mem_file("f", os.urandom(6 * MiB))]
    image = write_image(tmp_path / "s.img", tree, size="64M")
    assert image.stat().st_size == 64 * MiB
    assert_fsck_clean(image)
    with pytest.raises(InvalidInputError, match=r"needs at least \d+ bytes"):
        writer.build_ext4(tree, size=9 * MiB)
    with pytest.raises(InvalidInputError, match=r"needs at least \d+ bytes .* with a journal"):
        writer.build_ext4(tree, size=4 * MiB)
    try:
        writer.build_ext4(tree, size=9 * MiB)
    except InvalidInputError as exc:  # the size it names is enough
        needed = int(re.search(r"at least (\d+) bytes", str(exc)).group(1))  # type: ignore[union-attr]
        writer.build_ext4(tree, size=needed).close()
    with pytest.raises(InvalidInputError, match="is not a size"):
        write_image(tmp_path / "bad.img", tree, size="lots")
    with pytest.raises(InvalidInputError, match="block_size must be"):
        write_image(tmp_path / "bad.img", tree, block_size="3000")
    with pytest.raises(InvalidInputError, match="not a UUID"):
        write_image(tmp_path / "bad.img", tree, uuid="nope")


def test_deterministic_and_options_matter(rich: tuple[Path, list[Entry], Path],
                                          tmp_path: Path) -> None:
    _, tree, _ = rich
    a = write_image(tmp_path / "a.img", tree, label="same")
    b = write_image(tmp_path / "b.img", tree, label="same")
    c = write_image(tmp_path / "c.img", tree, label="other")
    assert sha256(a) == sha256(b)
    assert sha256(a) != sha256(c)
    uuid_a = re.search(r"UUID:\s+(\S+)", run_tool("dumpe2fs", "-h", a).stdout)
    uuid_c = re.search(r"UUID:\s+(\S+)", run_tool("dumpe2fs", "-h", c).stdout)
    assert uuid_a and uuid_c and uuid_a.group(1) != uuid_c.group(1)


def test_disk_reports_free_space_as_zero_runs(rich: tuple[Path, list[Entry], Path]) -> None:
    disk = writer.build_ext4(rich[1], size=256 * MiB)
    kinds = {ext.kind.value for ext in disk.extents()}
    assert kinds == {"data", "zero"}
    data = sum(ext.length for ext in disk.extents() if ext.kind.value == "data")
    assert data < 64 * MiB
    disk.close()


@pytest.mark.slow
def test_twenty_thousand_files(tmp_path: Path) -> None:
    tree: list[Entry] = [Entry("", EntryType.DIR)]
    for d in range(20):
        tree.append(Entry(f"d{d:02d}", EntryType.DIR, mode=0o750, uid=d, gid=d))
        for i in range(1000):
            tree.append(mem_file(f"d{d:02d}/f{i:04d}", f"{d}-{i}\n".encode() * (i % 7),
                                 mtime=i * 1_000_000_123))
    start = time.monotonic()
    image = write_image(tmp_path / "m.img", tree)
    elapsed = time.monotonic() - start
    assert_fsck_clean(image)
    assert debugfs(image, "cat /d19/f0999") == "19-999\n" * (999 % 7)
    assert elapsed < 60


@pytest.mark.skipif(not is_root(), reason="a loop mount needs root")
def test_the_kernel_mounts_and_writes_it(rich: tuple[Path, list[Entry], Path],
                                         tmp_path: Path) -> None:
    """Linux itself: mount read-write, read xattrs back in the VFS form (the ACL converted
    back), add names to the htree directory, then e2fsck again."""
    root, _, image = rich
    copy = tmp_path / "rw.img"
    copy.write_bytes(image.read_bytes())
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-o", "loop", str(copy), str(mnt)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot loop-mount here: {mounted.stderr.decode().strip()}")
    try:
        for name in ("system.posix_acl_access",):
            assert os.getxattr(mnt / "acl-file", name) == os.getxattr(root / "acl-file", name)
        assert os.getxattr(mnt / "bin/tool", "security.capability") == os.getxattr(
            root / "bin/tool", "security.capability")
        assert os.getxattr(mnt / "xattrs", "user.big") == b"v" * 300
        assert (mnt / "big.bin").read_bytes() == (root / "big.bin").read_bytes()
        assert os.lstat(mnt / "future").st_mtime_ns == RICH_FAR_MTIME_NS
        for i in range(300):
            (mnt / "many" / f"added-{i}").write_bytes(b"new")
        assert (mnt / "many" / "file-00007-xxxxxxx").read_bytes() == b"7\n"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert_fsck_clean(copy)


@pytest.mark.slow
def test_file_over_4_gib(tmp_path: Path) -> None:
    size = (4 << 30) + 4097
    tree = [Entry("", EntryType.DIR), _sparse_source(size, {size - 4: b"last"})]
    image = write_image(tmp_path / "h.img", tree)
    assert_fsck_clean(image)
    assert f"Size: {size}" in _stat(image, "big/sparse.bin")
    assert "large_file" in run_tool("dumpe2fs", "-h", image).stdout


def test_deep_implicit_parents(tmp_path: Path) -> None:
    deep = "/".join(["d"] * 1500)
    image = write_image(tmp_path / "deep.img", [mem_file(f"{deep}/leaf", b"bottom")])
    assert_fsck_clean(image)
    assert debugfs(image, f"cat /{deep}/leaf") == "bottom"


@pytest.mark.slow
def test_compare_with_mke2fs_d(tmp_path: Path) -> None:
    """Both tools build the same tree; both results are clean and hold the same bytes."""
    root = make_rich_tree(tmp_path / "src", big_dir=500)
    ours = write_image(tmp_path / "ours.img", host_entries(root))
    theirs = tmp_path / "theirs.img"
    run_tool("mke2fs", "-q", "-t", "ext4", "-d", root, theirs, "64M")
    assert_fsck_clean(ours)
    for path in ("etc/hostname", "big.bin", "sparse.bin", "many/file-00499-" + "x" * 19):
        assert debugfs_bytes(ours, f"cat /{path}") == (root / path).read_bytes(), path
        assert debugfs_bytes(theirs, f"cat /{path}") == (root / path).read_bytes(), path


# ---- round trips, judged by e2fsprogs ------------------------------------------------------


_STAT_FIELDS = re.compile(
    r"(Type: \S+|Mode:\s+\d+|User:\s+\d+\s+Group:\s+\d+|Size: \d+|Links: \d+"
    r"|[cam]time: 0x[0-9a-f]+:[0-9a-f]+|crtime: 0x[0-9a-f]+:[0-9a-f]+"
    r'|Fast link dest: ".*"|Device major/minor number: \S+ \(hex \S+\))')


def _debugfs_facts(image: Path, paths: list[str]) -> dict[str, list[str]]:
    """What debugfs says of each path: type, mode, owner, size, links, the raw time fields
    (with their extra words), symlink target, device; and its xattrs (ea_list)."""
    facts: dict[str, list[str]] = {}
    for path in paths:
        stat_out = _stat(image, path)
        found = [re.sub(r"\s+", " ", m) for m in _STAT_FIELDS.findall(stat_out)]
        if "Type: directory" in found:
            # A directory's size is its layout's (linear or htree), not part of the tree.
            found = [f for f in found if not f.startswith("Size")]
        # Where each xattr lives (inode or block) and in which order is the writer's choice.
        facts[path] = found + sorted(debugfs(image, f"ea_list /{path}").strip().splitlines())
    return facts


def test_mke2fs_image_through_our_reader_and_writer(tmp_path: Path) -> None:
    """mke2fs -d builds an image; our reader lists it and our writer writes that listing
    again. e2fsck finds the copy clean; debugfs sees the same types, modes, owners, sizes,
    links, raw time fields, crtime, symlinks, devices, xattrs (the ACL and the capability)
    and contents in both. (mke2fs -d 1.47 stores whole seconds without epoch bits, so the
    times past 2038 are the job of the test below and test_stat_owner_mode_links_times.)"""
    from imgbridge.formats.fs.ext4 import Ext4Filesystem

    from imgbridge.source import FileSource

    root = make_rich_tree(tmp_path / "rich", big_dir=300, devices=is_root())
    source_image = tmp_path / "mke2fs.img"
    run_tool("mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-d", root,
             source_image, "64M")
    with FileSource(source_image) as source, Ext4Filesystem(source) as fs:
        tree = [e for e in fs.entries() if e.path != "lost+found"]
        copy = write_image(tmp_path / "copy.img", tree, uuid=str(FIXED_UUID))
    assert_fsck_clean(copy)
    paths = [e.path for e in tree if not e.path.startswith("many/") or e.path.endswith("7")]
    assert "future" in paths and "acl-file" in paths and "bin/tool" in paths
    want = _debugfs_facts(source_image, paths)
    got = _debugfs_facts(copy, paths)
    for path in paths:
        assert got[path] == want[path], path
    assert any(f.startswith("crtime") for f in got["future"])
    for image, out in ((source_image, tmp_path / "a"), (copy, tmp_path / "b")):
        out.mkdir()
        run_tool("debugfs", "-R", f"rdump / {out}", image)
    for entry in tree:
        if entry.type is EntryType.FILE:
            assert sha256(tmp_path / "b" / entry.path) == sha256(tmp_path / "a" / entry.path)


def test_our_reader_reads_every_field_our_writer_wrote(
        rich: tuple[Path, list[Entry], Path]) -> None:
    """Our reader over our writer's image gives back every field of the tree it was given:
    ns times (2049 too), crtime (the mtime, as the tree had none), owners, modes, xattrs with
    the ACL in its getxattr form and the capability, devices, symlinks, contents. debugfs
    (test_stat_owner_mode_links_times and friends) is the independent judge of the image;
    this checks the reader decodes what e2fsprogs agrees is there."""
    from imgbridge.formats.fs.ext4 import Ext4Filesystem

    from imgbridge.source import FileSource

    root, tree, image = rich
    with FileSource(image) as source, Ext4Filesystem(source) as fs:
        got = {e.path: e for e in fs.entries()}
        assert got.pop("lost+found").type is EntryType.DIR
        assert sorted(got) == sorted(e.path for e in tree)
        for want in tree:
            have = got[want.path]
            assert have.type is want.type, want.path
            if want.type is EntryType.HARDLINK:
                continue
            for name in ("mode", "uid", "gid", "mtime", "link_target", "devmajor",
                         "devminor"):
                assert getattr(have, name) == getattr(want, name), (want.path, name)
            assert have.atime == want.atime and have.ctime == want.ctime, want.path
            assert have.crtime == want.mtime, want.path
            assert sorted(have.xattrs) == sorted(want.xattrs), want.path
            if want.type is EntryType.FILE:
                assert have.size == want.size
                if want.size < (1 << 20) or want.path.endswith(".bin"):
                    with have.open() as f:
                        assert f.read() == (root / want.path).read_bytes(), want.path
    assert got["future"].mtime == RICH_FAR_MTIME_NS
    assert dict(got["acl-file"].xattrs)["system.posix_acl_access"] == os.getxattr(
        root / "acl-file", "system.posix_acl_access")
