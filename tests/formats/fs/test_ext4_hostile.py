"""Hostile ext filesystems: real mke2fs images damaged with debugfs -w (which keeps every
checksum valid, so the structural checks are what catches them) or with byte patches (with
metadata_csum on the checksum catches them first; with it off the structure must). Each one
must end in a one-line InvalidImageError: never a hang, never another exception type."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import require_tool
from imgbridge.formats.fs.ext4 import Ext4Filesystem

from imgbridge.errors import InvalidImageError
from imgbridge.model.tree import EntryType
from imgbridge.source import FileSource

CSUM = {"csum": ("-O", "metadata_csum"), "nocsum": ("-O", "^metadata_csum")}


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    return path or require_tool(name)


def _run(*args: str | os.PathLike[str]) -> str:
    done = subprocess.run([_tool(os.fspath(args[0])), *(os.fspath(a) for a in args[1:])],
                          capture_output=True, text=True)
    if done.returncode:
        raise AssertionError(f"{args[0]} failed: {done.stderr}")
    return str(done.stdout)


def debugfs(image: Path, request: str, *, write: bool = False) -> str:
    return _run("debugfs", *(["-w"] if write else []), "-R", request, image)


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tree = tmp_path_factory.mktemp("hostile") / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_bytes(b"box\n")
    (tree / "d").mkdir()
    (tree / "d" / "a").write_bytes(b"A")
    (tree / "d" / "bb").write_bytes(b"BB")
    (tree / "sub" / "inner").mkdir(parents=True)
    (tree / "big.bin").write_bytes(os.urandom(300 * 1024))
    os.symlink("loop-b", tree / "loop-a")
    os.symlink("loop-a", tree / "loop-b")
    return tree


def make_image(tmp_path: Path, tree: Path, csum: str, *extra: str) -> Path:
    image = tmp_path / "fs.img"
    _run("mke2fs", "-q", "-F", "-t", "ext4", "-b", "1024", *CSUM[csum], *extra, "-d", tree,
         image, "8M")
    return image


def read_all(image: Path) -> None:
    """List everything and read every file, as an extract would."""
    with FileSource(image) as source, Ext4Filesystem(source) as fs:
        for entry in fs.entries():
            if entry.type is EntryType.FILE:
                with entry.open() as f:
                    while f.read(1 << 20):
                        pass


def expect_invalid(image: Path, pattern: str) -> InvalidImageError:
    with pytest.raises(InvalidImageError, match=pattern) as err:
        read_all(image)
    assert "\n" not in str(err.value)
    return err.value


def patch(image: Path, offset: int, data: bytes) -> None:
    with open(image, "r+b") as f:
        f.seek(offset)
        f.write(data)


def block_of(image: Path, path: str) -> int:
    return int(debugfs(image, f"blocks {path}").split()[0])


def test_the_untouched_images_read(tmp_path: Path, small_tree: Path) -> None:
    for csum in CSUM:
        read_all(make_image(tmp_path, small_tree, csum))


# ---- directory loops ---------------------------------------------------------------------------


@pytest.mark.parametrize("csum", sorted(CSUM))
@pytest.mark.parametrize("target", ["/sub", "/sub/inner", "/"])
def test_directory_loop(tmp_path: Path, small_tree: Path, csum: str, target: str) -> None:
    image = make_image(tmp_path, small_tree, csum)
    debugfs(image, f"link {target} /sub/inner/loop", write=True)
    expect_invalid(image, "directory loop")


@pytest.mark.parametrize("csum", sorted(CSUM))
def test_symlink_loop_is_just_listed(tmp_path: Path, small_tree: Path, csum: str) -> None:
    image = make_image(tmp_path, small_tree, csum)
    with FileSource(image) as source:
        got = {e.path: e for e in Ext4Filesystem(source).entries()}
    assert got["loop-a"].link_target == "loop-b" and got["loop-b"].link_target == "loop-a"


# ---- extents and block maps --------------------------------------------------------------------


@pytest.mark.parametrize("csum", sorted(CSUM))
def test_extent_past_the_end(tmp_path: Path, small_tree: Path, csum: str) -> None:
    image = make_image(tmp_path, small_tree, csum)
    debugfs(image, "sif /big.bin block[5] 0x7fffff00", write=True)  # ee_start_lo
    expect_invalid(image, r"extent 0 points to blocks .* outside the filesystem")


@pytest.mark.parametrize("csum", sorted(CSUM))
def test_extent_absurd_depth(tmp_path: Path, small_tree: Path, csum: str) -> None:
    image = make_image(tmp_path, small_tree, csum)
    debugfs(image, f"sif /big.bin block[1] {4 | 60000 << 16:#x}", write=True)  # eh_depth
    expect_invalid(image, "extent tree depth 60000 exceeds 5")


@pytest.mark.parametrize("csum", sorted(CSUM))
def test_extent_tree_loop(tmp_path: Path, small_tree: Path, csum: str) -> None:
    """An index block whose only entry points to itself."""
    image = make_image(tmp_path, small_tree, csum)
    free = int(re.search(r"Free blocks found: (\d+)",  # type: ignore[union-attr]
                         debugfs(image, "ffb 1 5000")).group(1))
    node = (0xF30A).to_bytes(2, "little") + (1).to_bytes(2, "little") + \
        ((1024 - 12) // 12).to_bytes(2, "little") + (1).to_bytes(2, "little") + bytes(4)
    node += (0).to_bytes(4, "little") + free.to_bytes(4, "little") + bytes(4)
    patch(image, free * 1024, node.ljust(1024, b"\0"))
    # The root in i_block: depth 2, one index entry to that block.
    root = [0xF30A | 1 << 16, 4 | 2 << 16, 0, 0, free, 0]
    for i, word in enumerate(root):
        debugfs(image, f"sif /big.bin block[{i}] {word:#x}", write=True)
    if csum == "csum":
        expect_invalid(image, f"extent block {free} checksum mismatch")
    else:
        expect_invalid(image, f"extent block {free}: extent node at depth 1 where 0 was "
                       "expected")


@pytest.mark.parametrize("csum", sorted(CSUM))
def test_two_index_entries_to_one_leaf(tmp_path: Path, small_tree: Path, csum: str) -> None:
    """A DAG rather than a tree: the second visit of the leaf maps blocks out of order."""
    image = make_image(tmp_path, small_tree, csum)
    free = int(re.search(r"Free blocks found: (\d+)",  # type: ignore[union-attr]
                         debugfs(image, "ffb 1 5000")).group(1))
    target = block_of(image, "/big.bin")
    leaf = (0xF30A).to_bytes(2, "little") + (1).to_bytes(2, "little") + \
        ((1024 - 12) // 12).to_bytes(2, "little") + (0).to_bytes(2, "little") + bytes(4)
    leaf += (0).to_bytes(4, "little") + (100).to_bytes(2, "little") + bytes(2) + \
        target.to_bytes(4, "little")
    patch(image, free * 1024, leaf.ljust(1024, b"\0"))
    root = [0xF30A | 2 << 16, 4 | 1 << 16, 0, 0, free, 0, 200, free, 0]
    for i, word in enumerate(root):
        debugfs(image, f"sif /big.bin block[{i}] {word:#x}", write=True)
    expect_invalid(image, f"extent block {free}" if csum == "csum" else "out of order")


def test_block_map_indirect_past_the_end(tmp_path: Path, small_tree: Path) -> None:
    image = make_image(tmp_path, small_tree, "nocsum", "-O", "^extent,^64bit")
    debugfs(image, "sif /big.bin block[IND] 99999999", write=True)
    expect_invalid(image, "indirect block points to blocks")


def test_block_map_repeating_blocks_exceed_allocation(tmp_path: Path,
                                                     small_tree: Path) -> None:
    """Every indirect pointer naming the same double-indirect block would map terabytes of
    the same data; the inode's own block count stops it."""
    image = make_image(tmp_path, small_tree, "nocsum", "-O", "^extent,^64bit")
    found = debugfs(image, "ffb 2 5000")
    dind, ind = map(int, re.search(r"Free blocks found: (\d+) (\d+)",  # type: ignore[union-attr]
                                   found).groups())
    data_block = block_of(image, "/big.bin")
    patch(image, dind * 1024, ind.to_bytes(4, "little") * 256)
    patch(image, ind * 1024, data_block.to_bytes(4, "little") * 256)
    debugfs(image, f"sif /big.bin block[DIND] {dind}", write=True)
    debugfs(image, f"sif /big.bin size {1 << 30}", write=True)
    expect_invalid(image, "covers more blocks than")


# ---- superblock and group descriptors ----------------------------------------------------------


@pytest.mark.parametrize("csum", sorted(CSUM))
@pytest.mark.parametrize(("field", "value", "pattern"), [
    ("inodes_count", "4000000000", "inodes is not"),
    ("blocks_count", "4000000000", "the source holds only"),
    ("inodes_per_group", "0xfffffff0", "inodes per group is invalid"),
    ("blocks_per_group", "1", "blocks per group is invalid"),
    ("log_block_size", "30", "block size"),
    ("inode_size", "100", "inode size 100 is invalid"),
    ("first_ino", "0", "first inode 0 is invalid"),
])
def test_absurd_superblock(tmp_path: Path, small_tree: Path, csum: str, field: str, value: str,
                           pattern: str) -> None:
    image = make_image(tmp_path, small_tree, csum)
    debugfs(image, f"ssv {field} {value}", write=True)
    with FileSource(image) as source, pytest.raises(InvalidImageError, match=pattern) as err:
        Ext4Filesystem(source)
    assert "\n" not in str(err.value)


def test_superblock_byte_patch_with_checksum(tmp_path: Path, small_tree: Path) -> None:
    image = make_image(tmp_path, small_tree, "csum")
    patch(image, 1024, (4_000_000_000).to_bytes(4, "little"))
    with FileSource(image) as source, pytest.raises(InvalidImageError,
                                                    match="superblock checksum mismatch"):
        Ext4Filesystem(source)


@pytest.mark.parametrize("csum", sorted(CSUM))
def test_inode_table_past_the_end(tmp_path: Path, small_tree: Path, csum: str) -> None:
    image = make_image(tmp_path, small_tree, csum)
    debugfs(image, "set_bg 0 inode_table 99999999", write=True)
    debugfs(image, "set_bg 0 checksum calc", write=True)
    expect_invalid(image, "inode table points to blocks")


def test_meta_bg_descriptors_past_the_end(tmp_path: Path, small_tree: Path) -> None:
    image = make_image(tmp_path, small_tree, "nocsum", "-O", "meta_bg,^resize_inode")
    debugfs(image, "ssv first_meta_bg 0xffffff", write=True)
    with FileSource(image) as source, pytest.raises(InvalidImageError, match="meta_bg"):
        Ext4Filesystem(source)


def test_truncated_image(tmp_path: Path, small_tree: Path) -> None:
    image = make_image(tmp_path, small_tree, "csum")
    with open(image, "r+b") as f:
        f.truncate(300 * 1024)
    with FileSource(image) as source, pytest.raises(InvalidImageError,
                                                    match="the source holds only"):
        Ext4Filesystem(source)
    with open(image, "r+b") as f:
        f.truncate(1500)
    with FileSource(image) as source, pytest.raises(InvalidImageError, match="too small"):
        Ext4Filesystem(source)


# ---- directory entries -------------------------------------------------------------------------


def _dir_entry_offset(image: Path, directory: str, name: bytes) -> int:
    """Where the entry for ``name`` starts in the directory's first block."""
    block = block_of(image, directory)
    data = image.read_bytes()[block * 1024: block * 1024 + 1024]
    at = data.index(bytes([len(name), 1]) + name) - 6
    return block * 1024 + at


@pytest.mark.parametrize("csum", sorted(CSUM))
@pytest.mark.parametrize(("where", "rec_len", "pattern"), [
    ("a", 0, "rec_len 0"),
    ("a", 2000, "rec_len 2000"),
    ("a", 6, "rec_len 6"),
    ("bb", 4, "rec_len 4"),
])
def test_bad_rec_len(tmp_path: Path, small_tree: Path, csum: str, where: str, rec_len: int,
                     pattern: str) -> None:
    image = make_image(tmp_path, small_tree, csum)
    patch(image, _dir_entry_offset(image, "/d", where.encode()) + 4,
          rec_len.to_bytes(2, "little"))
    expect_invalid(image, "directory block 0 checksum mismatch" if csum == "csum" else pattern)


@pytest.mark.parametrize("csum", sorted(CSUM))
@pytest.mark.parametrize(("old", "new", "pattern"), [
    (b"a", b"/", "invalid name"),
    (b"a", b"\0", "invalid name"),
    (b"a", b".", "named '.' out of place"),
    (b"bb", b"..", "named '..' out of place"),
    (b"bb", b"a/", "invalid name"),
])
def test_hostile_names(tmp_path: Path, small_tree: Path, csum: str, old: bytes, new: bytes,
                       pattern: str) -> None:
    image = make_image(tmp_path, small_tree, csum)
    patch(image, _dir_entry_offset(image, "/d", old) + 8, new)
    expect_invalid(image, "directory block 0 checksum mismatch" if csum == "csum" else pattern)


@pytest.mark.parametrize("csum", sorted(CSUM))
@pytest.mark.parametrize(("at", "value", "pattern"), [
    (24 + 6, 7, "htree root info is invalid"),  # indirect_levels
    (24 + 5, 30, "htree root info is invalid"),  # info_length
    (32, 9999, "htree node says"),  # limit
    (34, 0, "htree node says"),  # count
])
def test_hostile_htree_root(tmp_path: Path, csum: str, at: int, value: int,
                            pattern: str) -> None:
    tree = tmp_path / "tree"
    (tree / "many").mkdir(parents=True)
    for i in range(300):
        (tree / "many" / f"{i:04d}-{'z' * 60}").touch()
    image = tmp_path / "fs.img"
    _run("mke2fs", "-q", "-F", "-t", "ext4", "-b", "1024", *CSUM[csum], "-d", tree, image, "8M")
    subprocess.run([_tool("e2fsck"), "-fyD", os.fspath(image)], capture_output=True)
    assert "Root node dump" in debugfs(image, "htree_dump /many")
    size = 2 if at >= 32 else 1
    patch(image, block_of(image, "/many") * 1024 + at, value.to_bytes(size, "little"))
    # The structure is checked before the checksum, so both variants name the same fault.
    expect_invalid(image, pattern)


def test_htree_index_checksum(tmp_path: Path) -> None:
    """A changed hash in the index: only the checksum can tell (the index itself is never
    used for reading, so without metadata_csum the listing is still right)."""
    tree = tmp_path / "tree"
    (tree / "many").mkdir(parents=True)
    for i in range(300):
        (tree / "many" / f"{i:04d}-{'z' * 60}").touch()
    for csum in sorted(CSUM):
        image = tmp_path / f"{csum}.img"
        _run("mke2fs", "-q", "-F", "-t", "ext4", "-b", "1024", *CSUM[csum], "-d", tree, image,
             "8M")
        subprocess.run([_tool("e2fsck"), "-fyD", os.fspath(image)], capture_output=True)
        patch(image, block_of(image, "/many") * 1024 + 40, b"\x12\x34")  # dx_entry[1].hash
        if csum == "csum":
            expect_invalid(image, "htree block 0 checksum mismatch")
        else:
            with FileSource(image) as source:
                names = [e.path for e in Ext4Filesystem(source).entries()
                         if e.path.startswith("many/")]
            assert len(names) == 300


def test_name_longer_than_its_record(tmp_path: Path, small_tree: Path) -> None:
    image = make_image(tmp_path, small_tree, "nocsum")
    patch(image, _dir_entry_offset(image, "/d", b"a") + 6, bytes([200]))
    expect_invalid(image, "longer than its record")


def test_entry_to_an_inode_out_of_range(tmp_path: Path, small_tree: Path) -> None:
    image = make_image(tmp_path, small_tree, "nocsum")
    patch(image, _dir_entry_offset(image, "/d", b"a"), (0x7FFFFFFF).to_bytes(4, "little"))
    expect_invalid(image, "inode number 2147483647 is outside")


def test_entry_to_a_free_inode(tmp_path: Path, small_tree: Path) -> None:
    image = make_image(tmp_path, small_tree, "nocsum")
    patch(image, _dir_entry_offset(image, "/d", b"a"), (40).to_bytes(4, "little"))
    expect_invalid(image, "not in use|unused part|invalid mode")


@pytest.mark.parametrize("csum", sorted(CSUM))
def test_directory_size_not_whole_blocks(tmp_path: Path, small_tree: Path, csum: str) -> None:
    image = make_image(tmp_path, small_tree, csum)
    debugfs(image, "sif /d size 1000", write=True)
    expect_invalid(image, "not a whole number of blocks")


@pytest.mark.parametrize("csum", sorted(CSUM))
def test_symlink_with_absurd_size(tmp_path: Path, small_tree: Path, csum: str) -> None:
    image = make_image(tmp_path, small_tree, csum)
    debugfs(image, f"sif /loop-a size {1 << 40}", write=True)
    expect_invalid(image, "symlink target of")


@pytest.mark.parametrize("csum", sorted(CSUM))
def test_file_size_past_what_extents_address(tmp_path: Path, small_tree: Path, csum: str) -> None:
    """Found by fuzzing: a flipped bit in i_size_high made a 2^53-byte file, which an extract
    would read as zeros for ever. Extents address 2^32 blocks; a larger size is a lie."""
    image = make_image(tmp_path, small_tree, csum)
    debugfs(image, f"sif /d/a size {1 << 53}", write=True)
    expect_invalid(image, r"/d/a: size 9007199254740992 is beyond")
    debugfs(image, f"sif /d/a size {(1 << 32) * 1024}", write=True)  # the largest: fine
    with FileSource(image) as source, Ext4Filesystem(source) as fs:
        sizes = {e.path: e.size for e in fs.entries()}
    assert sizes["d/a"] == (1 << 32) * 1024


@pytest.mark.slow
@pytest.mark.parametrize("csum", sorted(CSUM))
def test_bit_flip_fuzz(tmp_path: Path, small_tree: Path, csum: str) -> None:
    """A small fuzz (the full one ran thousands of images): random bits flipped in the
    blocks that hold something, then open, list and read (64 MiB of each file at most: a
    sparse file may be terabytes), checked and unchecked. Only the two documented errors may
    come out, each image within 5 seconds."""
    import random
    import signal
    import time
    import warnings

    from imgbridge.errors import UnsupportedFeatureError

    image = make_image(tmp_path, small_tree, csum)
    _run("e2fsck", "-fyD", image)  # htree directories too
    pristine = image.read_bytes()
    used = [i for i in range(len(pristine) // 1024) if any(pristine[i * 1024: i * 1024 + 1024])]
    rng = random.Random(20261128)

    def timeout(*_: object) -> None:
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, timeout)
    try:
        for _ in range(40):
            damaged = bytearray(pristine)
            for _ in range(rng.choice((1, 2, 4, 16))):
                bit = rng.choice(used) * 8192 + rng.randrange(8192)
                damaged[bit // 8] ^= 1 << (bit % 8)
            image.write_bytes(damaged)
            for options in ({}, {"verify": "off"}):
                start = time.monotonic()
                signal.alarm(10)
                try:
                    with warnings.catch_warnings(), FileSource(image) as source, \
                            Ext4Filesystem(source, options) as fs:
                        warnings.simplefilter("ignore")
                        for entry in fs.entries():
                            if entry.type is EntryType.FILE:
                                with entry.open() as f:
                                    for _ in range(64):
                                        if not f.read(1 << 20):
                                            break
                except (InvalidImageError, UnsupportedFeatureError) as err:
                    assert "\n" not in str(err)
                finally:
                    signal.alarm(0)
                assert time.monotonic() - start < 5
    finally:
        signal.signal(signal.SIGALRM, previous)
