"""FAT: volumes made by mkfs.vfat + mcopy read back (bare, in MBR/GPT partitions, through
qcow2/vmdk/vhd); volumes we write checked by fsck.fat, mtools, blkid and file; hostile
volumes (chain loops, chains past the end, directory loops, absurd BPBs) refused quickly."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shlex
import shutil
import stat
import struct
import subprocess
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from helpers import RICH_MTIME_NS, make_rich_tree, require_tool, run_tool
from imgbridge.formats.fs import fat
from imgbridge.formats.fs.fat.writer import build_fat32
from imgbridge.formats.volume.table import partition_source, read_partitions

import imgbridge
from imgbridge.errors import InvalidImageError, InvalidInputError, UnsupportedFeatureError
from imgbridge.model.tree import Entry, EntryType
from imgbridge.output import AtomicOutput
from imgbridge.progress import no_progress
from imgbridge.registry import ProbeInput
from imgbridge.resolver import CompanionResolver
from imgbridge.source import BytesSource, ConcatSource, FileSource

MiB = 1 << 20
#: mtools converts names through the locale and times through the time zone.
MTOOLS_ENV = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8", "TZ": "UTC",
              "MTOOLS_SKIP_CHECK": "1"}
#: An odd second and a fraction: FAT keeps 2-second steps, rounded down.
SOURCE_MTIME = 1_614_834_367_890_000_000  # 2021-03-04 05:06:07.89 UTC
LONG_NAMES = [
    "Mixed Case Long Name.txt",
    "ünïcödé 日本語 ñ.txt",
    "a name long enough to need three long-name entries, at least.dat",
    ".hidden-dotfile",
    "two.dots.in.name.tar.gz",
]


def _tool(name: str) -> str:
    """dosfstools and util-linux live in /usr/sbin, which a plain user's PATH may lack."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin") or require_tool(name)


def _mtools(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = [_tool(str(args[0])), *(os.fspath(arg) for arg in args[1:])]
    return subprocess.run(command, capture_output=True, text=True, check=check, env=MTOOLS_ENV)


def _sha(stream: BinaryIO) -> str:
    digest = hashlib.sha256()
    with stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _sha_file(path: Path) -> str:
    with open(path, "rb") as f:
        return _sha(f)


def _make_source(root: Path) -> Path:
    """The tree the reader tests copy in with mcopy."""
    root.mkdir()
    (root / "README.TXT").write_bytes(b"upper case 8.3\n")
    (root / "lower.txt").write_bytes(b"lower case 8.3\n")
    for i, name in enumerate(LONG_NAMES):
        (root / name).write_bytes(f"{name}\n".encode() * (i + 1))
    (root / "empty").write_bytes(b"")
    deep = root / "dir with spaces" / "nested" / "deeper"
    deep.mkdir(parents=True)
    (deep / "leaf.txt").write_bytes(b"leaf\n")
    (root / "BIG").mkdir()
    (root / "BIG" / "five.bin").write_bytes(random.Random(5).randbytes(5 * MiB))
    (root / "ro.txt").write_bytes(b"read only\n")
    for path in root.rglob("*"):
        os.utime(path, ns=(SOURCE_MTIME, SOURCE_MTIME))
    os.chmod(root / "ro.txt", 0o444)  # for the writer; mcopy drops it, mattrib sets it
    return root


def _expected(root: Path) -> dict[str, tuple[str, int, str, int]]:
    """path -> (type, size, sha256, mtime rounded down to FAT's 2 seconds)."""
    out: dict[str, tuple[str, int, str, int]] = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        st = path.lstat()
        mtime = st.st_mtime_ns // 2_000_000_000 * 2_000_000_000
        if stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", 0, "", mtime)
        else:
            out[rel] = ("file", st.st_size, _sha_file(path), mtime)
    return out


def _read_tree(fs: fat.FatFilesystem) -> tuple[list[str], dict[str, Entry],
                                               dict[str, tuple[str, int, str, int]]]:
    entries = list(fs.entries())
    assert entries[0].path == "" and entries[0].type is EntryType.DIR
    got = {}
    for e in entries[1:]:
        sha = _sha(e.open()) if e.type is EntryType.FILE else ""
        got[e.path] = (e.type.value, e.size, sha, e.mtime)
    return [e.path for e in entries[1:]], {e.path: e for e in entries}, got


def _assert_tree(fs: fat.FatFilesystem, source: Path, *, dir_times: bool = False) -> None:
    order, by_path, got = _read_tree(fs)
    expected = _expected(source)
    assert sorted(got) == sorted(expected)
    # Pre-order with siblings sorted by the bytes of their names (the reader contract).
    assert order == sorted(order, key=lambda p: [part.encode() for part in p.split("/")])
    for path, (kind, size, sha, mtime) in expected.items():
        assert got[path][:3] == (kind, size, sha), path
        if kind == "file" or dir_times:
            assert got[path][3] == mtime, path
    assert by_path["ro.txt"].mode == 0o444
    assert by_path["README.TXT"].mode == 0o644
    assert by_path["BIG"].mode == 0o755
    assert by_path["lower.txt"].crtime is not None and by_path["lower.txt"].atime is not None


def _mkfs(image: Path, size: int, *args: str) -> Path:
    with open(image, "wb") as f:
        f.truncate(size)
    subprocess.run([_tool("mkfs.vfat"), *args, str(image)], check=True, capture_output=True)
    return image


def _fill(image: Path, source: Path, offset: int = 0) -> None:
    spec = f"{image}@@{offset}" if offset else str(image)
    _mtools("mcopy", "-i", spec, "-s", "-m", *sorted(source.iterdir()), "::")
    _mtools("mattrib", "-i", spec, "+r", "::/ro.txt")


def _blkid(image: Path) -> dict[str, str]:
    out = run_tool(_tool("blkid"), "-p", "-o", "export", image).stdout
    # The export format is shell-quoted ("MY\\ LABEL").
    return dict(shlex.split(line)[0].split("=", 1) for line in out.splitlines() if "=" in line)


def _fsck_used_clusters(image: Path) -> int:
    out = run_tool(_tool("fsck.fat"), "-n", image).stdout
    match = re.search(r"(\d+)/(\d+) clusters", out)
    assert match, out
    return int(match.group(1))


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_source(tmp_path_factory.mktemp("fat-src") / "tree")


# ---- reading what mkfs.vfat and mcopy wrote ---------------------------------------------------

@pytest.mark.parametrize("bits, size", [(12, 8 * MiB), (16, 32 * MiB), (32, 64 * MiB)])
def test_reader_mkfs_vfat(tmp_path: Path, source: Path, bits: int, size: int) -> None:
    image = _mkfs(tmp_path / "fat.img", size, "-F", str(bits), "-n", "MY LABEL")
    _fill(image, source)
    with FileSource(image) as src:
        fs = fat.FatFilesystem(src)
        _assert_tree(fs, source)
        info = fs.info()
    blkid = _blkid(image)
    assert info["type"] == "vfat" and info["fat-bits"] == bits
    assert blkid["VERSION"] == f"FAT{bits}"
    assert info["label"] == blkid["LABEL"] == "MY LABEL"
    assert info["uuid"] == blkid["UUID"]
    assert info["size"] == size
    assert info["used"] == _fsck_used_clusters(image) * info["cluster-size"]


def test_reader_label_in_root_directory_wins(tmp_path: Path, source: Path) -> None:
    image = _mkfs(tmp_path / "fat.img", 32 * MiB, "-F", "16", "-n", "BOOTSECT", "-i", "1234abcd")
    # mlabel writes the root directory's label entry (and the boot sector's copy, which we
    # set back): when the two differ, blkid reports the root directory's.
    _mtools("mlabel", "-i", image, "::ROOTDIR")
    _patch(image, 43, b"BOOTSECT   ")
    with FileSource(image) as src:
        info = fat.FatFilesystem(src).info()
    assert info["label"] == _blkid(image)["LABEL"] == "ROOTDIR"
    assert info["uuid"] == "1234-ABCD"


def test_reader_4096_byte_sectors(tmp_path: Path, source: Path) -> None:
    image = _mkfs(tmp_path / "fat.img", 64 * MiB, "-F", "16", "-S", "4096", "-n", "BIGSECT")
    _fill(image, source)
    with FileSource(image) as src:
        fs = fat.FatFilesystem(src)
        assert fs.info()["sector-size"] == 4096
        _assert_tree(fs, source)


def test_reader_small_fat32_from_mkfs(tmp_path: Path, source: Path) -> None:
    """mkfs.fat -F 32 makes FAT32 volumes of fewer than 65525 clusters (small ESPs, with a
    warning); fsck.fat and Linux read them as FAT32 by their BPB, and so must we. (mtools
    refuses them, so the files are copied in while the volume is large, then it is shrunk.)"""
    small = _mkfs(tmp_path / "small.img", 20 * MiB, "-F", "32", "-n", "SMALL")
    assert "32 bit entries" in run_tool(_tool("fsck.fat"), "-n", "-v", small).stdout
    with FileSource(small) as src:
        assert fat.FatFilesystem(src).info()["fat-bits"] == 32
    image = _mkfs(tmp_path / "small32.img", 64 * MiB, "-F", "32", "-n", "SMALL")
    _fill(image, source)
    boot = image.read_bytes()[:512]
    reserved, fat_size = struct.unpack_from("<H", boot, 14)[0], struct.unpack_from("<I", boot,
                                                                                    36)[0]
    _patch(image, 32, struct.pack("<I", reserved + 2 * fat_size + 40_000))
    fsck = subprocess.run([_tool("fsck.fat"), "-n", "-v", str(image)], capture_output=True,
                          text=True).stdout
    assert "32 bit entries" in fsck and "/40000 clusters" in fsck, fsck
    with FileSource(image) as src:
        fs = fat.FatFilesystem(src)
        info = fs.info()
        assert (info["fat-bits"], info["label"]) == (32, "SMALL")
        assert info["clusters"] < 65525
        _assert_tree(fs, source)
    assert _blkid(image)["VERSION"] == "FAT32"


def _with_cluster_count(image: Path, clusters: int, fat_sectors: int | None = None) -> None:
    """Set a FAT12/16 volume's sector count (and FAT size) so it has exactly ``clusters``
    clusters of one sector; a new FAT size gets fresh, empty FATs and root directory."""
    boot = image.read_bytes()[:512]
    reserved, nfats, root_entries = struct.unpack_from("<HBH", boot, 14)
    fat_size = fat_sectors or struct.unpack_from("<H", boot, 22)[0]
    metadata = reserved + nfats * fat_size + root_entries * 32 // 512
    _patch(image, 19, struct.pack("<H", 0))
    _patch(image, 32, struct.pack("<I", metadata + clusters))
    if fat_sectors is not None:
        _patch(image, 22, struct.pack("<H", fat_sectors))
        _patch(image, reserved * 512, bytes((metadata - reserved) * 512))
        for copy in range(nfats):
            _patch(image, (reserved + copy * fat_size) * 512, b"\xf8\xff\xff\xff")


@pytest.mark.parametrize("clusters, bits", [(4084, 12), (4085, 16), (65524, 16)])
def test_reader_fat_type_at_cluster_count_boundaries(tmp_path: Path, clusters: int,
                                                     bits: int) -> None:
    image = _mkfs(tmp_path / "b.img", 32 * MiB, "-F", "16", "-s", "1")
    _with_cluster_count(image, clusters, 257 if clusters > 65000 else None)
    with open(image, "r+b") as f:
        f.truncate(40 * MiB)
    done = subprocess.run([_tool("fsck.fat"), "-n", "-v", str(image)], capture_output=True,
                          text=True)
    assert f"{bits} bit entries" in done.stdout and f"/{clusters} clusters" in done.stdout
    with FileSource(image) as src:
        geometry = fat.FatFilesystem(src).geometry
    assert (geometry.fat_bits, geometry.cluster_count) == (bits, clusters)


def test_reader_refuses_fat16_of_65525_clusters(tmp_path: Path) -> None:
    """65525 clusters cannot be FAT16 (fsck.fat and Linux refuse such a volume too)."""
    image = _mkfs(tmp_path / "b.img", 32 * MiB, "-F", "16", "-s", "1")
    _with_cluster_count(image, 65525, 257)
    with open(image, "r+b") as f:
        f.truncate(40 * MiB)
    assert subprocess.run([_tool("fsck.fat"), "-n", str(image)],
                          capture_output=True).returncode != 0
    with FileSource(image) as src, pytest.raises(InvalidImageError, match="65525 clusters"):
        fat.FatFilesystem(src)


def test_reader_fat32_active_fat_without_mirroring(tmp_path: Path) -> None:
    """ext_flags bit 7 turns mirroring off and bits 0-3 name the FAT in use: FAT 1 here, with
    FAT 0 wiped. mtools follows the flag (fsck.fat does not), and so must we."""
    image = _mkfs(tmp_path / "m.img", 64 * MiB, "-F", "32")
    payload = random.Random(7).randbytes(300_000)
    (tmp_path / "r.bin").write_bytes(payload)
    _mtools("mcopy", "-i", image, tmp_path / "r.bin", "::")
    reserved = struct.unpack_from("<H", image.read_bytes()[:512], 14)[0]
    _patch(image, 40, struct.pack("<H", 0x81))
    _patch(image, reserved * 512 + 3 * 4, bytes(4 * 600))
    assert subprocess.run([_tool("mtype"), "-i", str(image), "::/r.bin"], capture_output=True,
                          env=MTOOLS_ENV, check=True).stdout == payload
    with FileSource(image) as src:
        files = {e.path: e for e in fat.FatFilesystem(src).entries()}
        with files["r.bin"].open() as stream:
            assert stream.read() == payload
    _patch(image, 40, struct.pack("<H", 0x80))  # FAT 0 active: its chain is gone
    with FileSource(image) as src, pytest.raises(InvalidImageError, match="free cluster"):
        for entry in fat.FatFilesystem(src).entries():
            if entry.type is EntryType.FILE:
                _sha(entry.open())


@pytest.mark.parametrize("bits, size", [(12, 4 * MiB), (16, 20 * MiB)])
def test_reader_fragmented_file(tmp_path: Path, bits: int, size: int) -> None:
    """Delete every other small file, then copy a big one: mtools fills the holes, so the big
    file's chain jumps (FAT12's odd and even 12-bit entries both get read)."""
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(bits)
    for i in range(10, 41):
        (src / f"s{i}.bin").write_bytes(rng.randbytes(3000))
    (src / "big.bin").write_bytes(rng.randbytes(200_000))
    image = _mkfs(tmp_path / "frag.img", size, "-F", str(bits))
    _mtools("mcopy", "-i", image, *sorted(src.glob("s*.bin")), "::")
    for i in range(10, 41, 2):
        _mtools("mdel", "-i", image, f"::/s{i}.bin")
    _mtools("mcopy", "-i", image, src / "big.bin", "::")
    chain = _mtools("mshowfat", "-i", image, "::/big.bin").stdout
    assert chain.count("<") > 10, chain
    with FileSource(image) as source:
        files = {e.path: e for e in fat.FatFilesystem(source).entries()}
        assert sorted(files) == ["", "big.bin", *sorted(f"s{i}.bin" for i in range(11, 41, 2))]
        for name in ("big.bin", "s11.bin", "s39.bin"):
            assert _sha(files[name].open()) == _sha_file(src / name), name
        with files["big.bin"].open() as stream:  # seeks across fragments
            stream.seek(123_457)
            assert stream.read(10_000) == (src / "big.bin").read_bytes()[123_457:133_457]


def test_reader_orphan_long_name_entries(tmp_path: Path) -> None:
    """A long name whose checksum does not match its short entry is an orphan (left by a
    driver that knew no long names): the short name is used, as mtools does."""
    src = tmp_path / "Mixed Case Long Name.txt"
    src.write_bytes(b"x")
    image = _mkfs(tmp_path / "o.img", 32 * MiB, "-F", "16")
    _mtools("mcopy", "-i", image, src, "::")
    boot = image.read_bytes()[:512]
    bps, _, reserved, nfats, _, _, _, fat_sectors = struct.unpack_from("<HBHBHHBH", boot, 11)
    short = _entry_at(image, (reserved + nfats * fat_sectors) * bps, b"MIXEDC~1TXT")
    with FileSource(image) as source:
        assert [e.path for e in fat.FatFilesystem(source).entries()][1:] == [src.name]
    _patch(image, short - 32 + 13, b"\x00")  # the checksum of the entry just before it
    assert src.name not in _mtools("mdir", "-i", image, "::/").stdout
    with FileSource(image) as source:
        assert [e.path for e in fat.FatFilesystem(source).entries()][1:] == ["MIXEDC~1.TXT"]


def _partitioned(tmp_path: Path, source: Path, table: str) -> Path:
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(48 * MiB)
    script = ("label: dos\nstart=2048, type=ef\n" if table == "mbr"
              else "label: gpt\nstart=2048, type=U\n")
    subprocess.run([_tool("sfdisk"), "-q", str(disk)], input=script, text=True, check=True,
                   capture_output=True)
    layout = json.loads(run_tool(_tool("sfdisk"), "--json", disk).stdout)["partitiontable"]
    part = layout["partitions"][0]
    start, size = part["start"] * 512, part["size"] * 512
    fs_image = _mkfs(tmp_path / "esp.img", size, "-F", "32", "-n", "ESP")
    _fill(fs_image, source)
    run_tool("dd", f"if={fs_image}", f"of={disk}", "bs=1M", f"seek={start}", "oflag=seek_bytes",
             "conv=notrunc,sparse", "status=none")
    return disk


@pytest.mark.parametrize("table, container",
                         [("mbr", "raw"), ("gpt", "qcow2"), ("gpt", "vmdk"), ("mbr", "vpc")])
def test_reader_inside_partition(tmp_path: Path, source: Path, table: str,
                                 container: str) -> None:
    disk = _partitioned(tmp_path, source, table)
    path = disk
    if container != "raw":
        path = tmp_path / f"disk.{container}"
        run_tool("qemu-img", "convert", "-f", "raw", "-O", container, disk, path)
    with imgbridge.open_disk(path) as opened:
        partitions = read_partitions(opened)
        assert partitions is not None and partitions.kind == table
        (esp,) = partitions.partitions
        src = partition_source(opened, esp)
        head = src.read_at(0, 65536)
        assert fat.probe(ProbeInput(head, b"", "", src.size)) == 100
        fs = fat.FatFilesystem(src)
        _assert_tree(fs, source)
        assert fs.info()["label"] == "ESP"
        # The disk's own first sector (an MBR, ending in 55AA too) is not a FAT volume.
        first = opened.read_at(0, 65536)
        assert fat.probe(ProbeInput(first, b"", "", opened.size)) == 0


def test_probe(tmp_path: Path) -> None:
    for bits in (12, 16, 32):
        image = _mkfs(tmp_path / f"f{bits}.img", 64 * MiB, "-F", str(bits))
        head = image.read_bytes()[:65536]
        assert fat.probe(ProbeInput(head, b"", image.name, 64 * MiB)) == 100
        with FileSource(image) as src:
            opened = fat.open(src, CompanionResolver(str(image)), {})
            assert opened.format_name == "vfat" and opened.info()["fat-bits"] == bits
    assert fat.probe(ProbeInput(bytes(65536), b"", "zero.img", 65536)) == 0
    mbr = bytearray(512)
    mbr[0] = 0xEB  # GRUB's boot.img starts with a jump too
    mbr[510:512] = b"\x55\xaa"
    mbr[446:462] = bytes([0x80, 0, 0, 0, 0xEF, 0, 0, 0]) + struct.pack("<II", 2048, 10000)
    assert fat.probe(ProbeInput(bytes(mbr), b"", "mbr.img", 64 * MiB)) == 0
    assert fat.probe(ProbeInput(b"", b"", "dir", 0, frozenset({"x"}))) == 0


# ---- writing ---------------------------------------------------------------------------------

def _open_binary(path: Path) -> BinaryIO:
    return open(path, "rb")


def _host_entries(root: Path) -> Iterator[Entry]:
    """The host folder as a tree (lstat, never following links; hardlinks by inode)."""
    seen: dict[tuple[int, int], str] = {}
    yield Entry("", EntryType.DIR, mtime=root.stat().st_mtime_ns)
    paths = sorted(root.rglob("*"), key=lambda p: [c.encode() for c in
                                                     p.relative_to(root).parts])
    for path in paths:
        rel = path.relative_to(root).as_posix()
        st = path.lstat()
        common: dict[str, Any] = {"mode": stat.S_IMODE(st.st_mode), "mtime": st.st_mtime_ns,
                                  "atime": st.st_atime_ns}
        if stat.S_ISDIR(st.st_mode):
            yield Entry(rel, EntryType.DIR, **common)
        elif stat.S_ISREG(st.st_mode):
            first = seen.setdefault((st.st_dev, st.st_ino), rel)
            if first != rel:
                yield Entry(rel, EntryType.HARDLINK, link_target=first, **common)
            else:
                yield Entry(rel, EntryType.FILE, size=st.st_size, **common,
                            opener=partial(_open_binary, path))
        elif stat.S_ISLNK(st.st_mode):
            yield Entry(rel, EntryType.SYMLINK, link_target=os.readlink(path), **common)
        elif stat.S_ISFIFO(st.st_mode):
            yield Entry(rel, EntryType.FIFO, **common)
        elif stat.S_ISSOCK(st.st_mode):
            yield Entry(rel, EntryType.SOCKET, **common)
        else:
            kind = EntryType.CHAR if stat.S_ISCHR(st.st_mode) else EntryType.BLOCK
            yield Entry(rel, kind, devmajor=os.major(st.st_rdev), devminor=os.minor(st.st_rdev),
                        **common)


def _write(image: Path, root: Path, **options: str) -> Path:
    with AtomicOutput(str(image)) as out:
        fat.create(out, _host_entries(root), options, no_progress)
        out.commit()
    return image


def _fsck_clean(image: Path) -> str:
    """fsck.fat -n -V (a check pass, then a verification pass) must exit 0 and say nothing but
    its banner, the names of its two passes and the summary line."""
    done = subprocess.run([_tool("fsck.fat"), "-n", "-V", str(image)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[1:3] == ["Starting check/repair pass.", "Starting verification pass."], lines
    assert len(lines) == 4 and re.match(r".*: \d+ files, \d+/\d+ clusters$", lines[3]), lines
    return done.stdout


def _mdir_names(image: Path, directory: str = "::/", *, recursive: bool = False) -> list[str]:
    """Names mdir lists: the long name where there is one, else the short one."""
    out = _mtools("mdir", *(["-/"] if recursive else []), "-i", image, directory).stdout
    names = []
    for line in out.splitlines():
        match = re.match(r"^(\S+)\s+(\S*)\s+(<DIR>|\d[\d ]*)\s+\d{4}-\d\d-\d\d\s+\d+:\d\d"
                         r"(?:\s+(.*))?$", line)
        if match:
            base, ext, _, long_name = match.groups()
            names.append(long_name or (f"{base}.{ext}" if ext else base))
    return [n for n in names if n not in (".", "..")]


def test_writer_checked_by_fsck_and_mtools(tmp_path: Path, source: Path) -> None:
    started = time.monotonic()
    image = _write(tmp_path / "esp.img", source, label="efi-boot", volume_id="CAFE-1234")
    elapsed = time.monotonic() - started
    assert elapsed < 10, f"writing {image.stat().st_size} bytes took {elapsed:.1f} s"
    _fsck_clean(image)
    verbose = run_tool(_tool("fsck.fat"), "-n", "-v", image).stdout
    assert "32 bit entries" in verbose and "32 reserved sectors" in verbose
    assert 'System ID "MSWIN4.1"' in verbose and "Media byte 0xf8" in verbose
    minfo = _mtools("minfo", "-i", image).stdout
    assert re.search(r"disk type=\"FAT32", minfo), minfo
    blkid = _blkid(image)
    assert (blkid["TYPE"], blkid["VERSION"], blkid["LABEL"], blkid["UUID"]) == (
        "vfat", "FAT32", "EFI-BOOT", "CAFE-1234")
    assert 'label: "EFI-BOOT' in run_tool("file", image).stdout

    # Every name, long ones included, as mdir lists it.
    assert sorted(_mdir_names(image)) == sorted(p.name for p in source.iterdir())
    assert sorted(_mdir_names(image, recursive=True)) == sorted(p.name for p in source.rglob("*"))
    assert _mdir_names(image, "::/dir with spaces/nested/deeper") == ["leaf.txt"]
    # Plain 8.3 names need no long-name entry; lower-case ones use the NT case flags.
    listing = _mtools("mdir", "-i", image, "::/").stdout
    assert re.search(r"^README   TXT +15 2021-03-04   5:06 *$", listing, re.M), listing
    assert re.search(r"^lower    txt +15 2021-03-04   5:06 *$", listing, re.M), listing
    assert re.search(r"^MIXEDC~1 TXT .* 2021-03-04   5:06  Mixed Case Long Name.txt$",
                     listing, re.M), listing
    assert "r" in _mtools("mattrib", "-i", image, "::/ro.txt").stdout.split(":")[0].lower()

    out = tmp_path / "out"
    out.mkdir()
    _mtools("mcopy", "-i", image, "-s", "-m", "::/", out)
    copied = _expected(out)
    assert copied.keys() == _expected(source).keys()
    for path, (kind, size, sha, mtime) in _expected(source).items():
        assert copied[path][:3] == (kind, size, sha), path
        if kind == "file":
            assert (out / path).stat().st_mtime_ns == mtime, path

    # Our reader agrees with what the tools saw (not a proof on its own; the tools are).
    with FileSource(image) as src:
        fs = fat.FatFilesystem(src)
        _assert_tree(fs, source, dir_times=True)
        assert fs.info()["used"] == _fsck_used_clusters(image) * fs.info()["cluster-size"]


def test_writer_is_deterministic(tmp_path: Path, source: Path) -> None:
    first = _write(tmp_path / "a.img", source)
    second = _write(tmp_path / "b.img", source)
    assert _sha_file(first) == _sha_file(second)
    with FileSource(first) as src:
        info = fat.FatFilesystem(src).info()
    assert info["uuid"] == _blkid(first)["UUID"] and info["label"] == ""


def test_writer_rich_tree(tmp_path: Path) -> None:
    root = make_rich_tree(tmp_path / "rich", big_dir=200)
    with pytest.raises(UnsupportedFeatureError, match="dangling-link: is a symbolic link"):
        _write(tmp_path / "refused.img", root)
    image = _write(tmp_path / "rich.img", root, skip_unsupported="on")
    _fsck_clean(image)
    out = tmp_path / "out"
    out.mkdir()
    _mtools("mcopy", "-i", image, "-s", "-m", "::/", out)
    kept = {p.relative_to(root).as_posix() for p in root.rglob("*")
            if not p.is_symlink() and (p.is_file() or p.is_dir())}
    assert {p.relative_to(out).as_posix() for p in out.rglob("*")} == kept
    for rel in kept:
        if (root / rel).is_file():
            assert (out / rel).read_bytes() == (root / rel).read_bytes(), rel
    # The hardlink became a copy; the 255-character name survived.
    assert (out / "hostname-hardlink").read_bytes() == b"imgbridge\n"
    assert (out / ("n" * 255)).exists()
    # mtime of 2049 fits FAT's range (to 2107); the usual ones keep their 2-second step.
    assert (out / "etc/hostname").stat().st_mtime_ns == RICH_MTIME_NS // 2_000_000_000 * \
        2_000_000_000


def _short_entries(image: Path) -> dict[str, tuple[int, int]]:
    """name -> (first cluster, size) of the first 32-byte-aligned record that looks like a
    file or directory short entry with that name, found by scanning the raw image."""
    out: dict[str, tuple[int, int]] = {}
    data = image.read_bytes()
    for match in re.finditer(rb"[\x20-\x7e]{11}[\x10\x20\x21]", data[:64 * MiB]):
        pos = match.start()
        if pos % 32:
            continue
        hi, lo, size = struct.unpack_from("<H", data, pos + 20)[0], *struct.unpack_from(
            "<HI", data, pos + 26)
        out.setdefault(data[pos:pos + 11].decode(), (hi << 16 | lo, size))
    return out


def test_writer_short_names_long_names_and_sizes(tmp_path: Path) -> None:
    """Numeric tails past ~9, names with several dots, leading dots and spaces, long names of
    exactly 13, 26 and 255 characters, a directory of many clusters, and files of 0 bytes and
    of exactly one and eight clusters: judged by fsck.fat's verification pass and mtools."""
    root = tmp_path / "names"
    (root / "sub").mkdir(parents=True)
    (root / "many").mkdir()
    names = ["name.tar.gz", "name.tar.xz", ".bashrc", "a b c.txt", "x" * 13, "y" * 26,
             "z" * 255, "MiXeD", "mixed2", "...dots", *(f"longfilename{i:03d}.txt"
                                                         for i in range(12))]
    for name in names:
        (root / name).write_bytes(name.encode()[:40])
    (root / "sub" / "empty").write_bytes(b"")
    (root / "sub" / "one.bin").write_bytes(b"1" * 512)
    (root / "sub" / "eight.bin").write_bytes(b"8" * 4096)
    for i in range(1500):  # four entries each: 188 KiB of directory, 376 clusters
        (root / "many" / f"entry number {i:05d} with a long name").write_bytes(b"%d" % i)
    image = _write(tmp_path / "n.img", root, label="names")
    _fsck_clean(image)
    listing = _mtools("mdir", "-i", image, "::/").stdout
    for short, long_name in [("NAMETA~1 GZ", "name.tar.gz"), ("NAMETA~1 XZ", "name.tar.xz"),
                             ("BASHRC~1", ".bashrc"), ("ABC~1    TXT", "a b c.txt"),
                             ("DOTS~1", "...dots"), ("XXXXXX~1", "x" * 13),
                             ("YYYYYY~1", "y" * 26), ("ZZZZZZ~1", "z" * 255),
                             ("MIXED", "MiXeD"), ("LONGFI~9 TXT", "longfilename008.txt"),
                             ("LONGF~10 TXT", "longfilename009.txt"),
                             ("LONGF~12 TXT", "longfilename011.txt")]:
        assert re.search(rf"^{re.escape(short)} .* {re.escape(long_name)}$", listing,
                         re.M), (short, listing)
    assert re.search(r"^mixed2 +6 ", listing, re.M), listing
    assert sorted(_mdir_names(image, "::/many")) == sorted(p.name for p in
                                                            (root / "many").iterdir())
    out = tmp_path / "out"
    out.mkdir()
    _mtools("mcopy", "-i", image, "-s", "::/", out)
    for path in root.rglob("*"):
        if path.is_file():
            rel = path.relative_to(root)
            assert (out / rel).read_bytes() == path.read_bytes(), rel
    entries = _short_entries(image)
    assert entries["EMPTY      "] == (0, 0)  # an empty file owns no cluster
    sub_cluster = entries["SUB        "][0]
    layout = build_fat32(_host_entries(root), label="names").layout
    sub = image.read_bytes()[layout.cluster_offset(sub_cluster):][:64]
    assert sub[:11] == b".          " and sub[32:43] == b"..         "
    # "." names the directory itself, ".." of a directory in the root names cluster 0.
    assert struct.unpack_from("<H", sub, 26)[0] == sub_cluster
    assert struct.unpack_from("<HH", sub, 32 + 20)[0] == 0
    assert struct.unpack_from("<H", sub, 32 + 26)[0] == 0


def test_writer_many_names_sharing_a_basis_is_quick() -> None:
    """Short names with numeric tails: 3000 names of one basis each take one probe (the
    first writer scanned from ~1 for every name: seconds of quadratic work)."""
    tree = [Entry("", EntryType.DIR)] + [
        Entry(f"entry number {i:05d} with a long name.txt", EntryType.FILE, size=0,
              opener=lambda: io.BytesIO(b"")) for i in range(3000)]
    started = time.monotonic()
    disk = build_fat32(tree)
    elapsed = time.monotonic() - started
    assert elapsed < 1.5, f"{elapsed:.1f} s"
    disk.close()


def test_writer_read_only_and_clamped_times(tmp_path: Path) -> None:
    tree = [
        Entry("", EntryType.DIR),
        Entry("OLD.TXT", EntryType.FILE, mode=0o444, mtime=0, size=3,
              opener=lambda: io.BytesIO(b"old")),
        Entry("late.txt", EntryType.FILE, mtime=5_000_000_000 * 1_000_000_000, size=0,
              opener=lambda: io.BytesIO(b"")),
    ]
    image = tmp_path / "t.img"
    with AtomicOutput(str(image)) as out:
        fat.create(out, tree, {"size": "40M"}, no_progress)
        out.commit()
    _fsck_clean(image)
    assert image.stat().st_size == 40 * MiB
    listing = _mtools("mdir", "-i", image, "::/").stdout
    assert re.search(r"^OLD +TXT +3 1980-01-01   0:00", listing, re.M), listing
    assert re.search(r"^late +txt +0 2107-12-31  23:59", listing, re.M), listing
    assert "R" in _mtools("mattrib", "-i", image, "::/OLD.TXT").stdout.split(":")[0]


def test_writer_refuses(tmp_path: Path) -> None:
    def one(path: str) -> list[Entry]:
        return [Entry(path, EntryType.FILE, size=1, opener=lambda: io.BytesIO(b"x"))]

    with pytest.raises(InvalidInputError, match=r"too small.*needs at least \d+ bytes"):
        build_fat32(one("a"), size=20 * MiB)
    big = [Entry("big", EntryType.FILE, size=40 * MiB,
                 opener=lambda: io.BytesIO(bytes(40 * MiB)))]
    with pytest.raises(InvalidInputError, match="needs at least 4"):
        build_fat32(big, size=36 * MiB)
    with pytest.raises(InvalidInputError, match="differ only in case"):
        build_fat32(one("Readme") + one("README"))
    with pytest.raises(UnsupportedFeatureError, match="a:b"):
        build_fat32(one("a:b"))
    assert build_fat32(one("a:b") + one("ok"), skip_unsupported=True).size >= 33 * MiB
    with pytest.raises(InvalidInputError, match="label"):
        build_fat32(one("a"), label="much too long a label")
    with pytest.raises(InvalidInputError, match="cluster size"):
        build_fat32(one("a"), cluster_size=3000)
    for options, match in [({"volume_id": "xyz"}, "volume_id"),
                           ({"skip_unsupported": "maybe"}, "skip_unsupported"),
                           ({"size": "-1"}, "size")]:
        with AtomicOutput(str(tmp_path / "x.img")) as out, \
                pytest.raises(InvalidInputError, match=match):
            fat.create(out, one("a"), options, no_progress)
    assert not (tmp_path / "x.img").exists()


def test_writer_automatic_size_and_cluster_size(tmp_path: Path) -> None:
    entries = [Entry("", EntryType.DIR)] + [
        Entry(f"f{i}", EntryType.FILE, size=MiB, opener=lambda: io.BytesIO(b""))
        for i in range(300)]
    disk = build_fat32(entries)
    # 300 MiB of content: past 260 MiB, mkfs.fat's table gives 4 KiB clusters.
    assert disk.layout.cluster_size == 4096
    assert 300 * MiB < disk.size < 340 * MiB
    small = build_fat32(entries[:2])
    assert small.layout.cluster_size == 512 and small.size == 33 * MiB


@pytest.mark.slow
def test_writer_50_mib_speed(tmp_path: Path) -> None:
    root = tmp_path / "big"
    (root / "EFI" / "BOOT").mkdir(parents=True)
    rng = random.Random(50)
    for i in range(50):
        (root / "EFI" / "BOOT" / f"some long file name {i}.efi").write_bytes(rng.randbytes(MiB))
    started = time.monotonic()
    image = _write(tmp_path / "big.img", root)
    elapsed = time.monotonic() - started
    assert elapsed < 5, f"50 MiB took {elapsed:.1f} s"
    _fsck_clean(image)


# ---- hostile volumes -------------------------------------------------------------------------

def _fat16_with_files(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """A FAT16 volume (4 KiB clusters) with BIG.BIN (64 KiB), SUB/ and SUB/INNER/; returns
    the image and its layout, computed here from the BPB."""
    src = tmp_path / "src"
    (src / "SUB" / "INNER").mkdir(parents=True)
    (src / "BIG.BIN").write_bytes(bytes(range(256)) * 256)
    image = _mkfs(tmp_path / "h.img", 32 * MiB, "-F", "16", "-s", "8")
    _mtools("mcopy", "-i", image, "-s", src / "BIG.BIN", src / "SUB", "::")
    boot = image.read_bytes()[:512]
    bps, spc, reserved, nfats, root_entries, _, _, fat_sectors = struct.unpack_from(
        "<HBHBHHBH", boot, 11)
    root_dir = (reserved + nfats * fat_sectors) * bps
    layout = {"bps": bps, "cluster": bps * spc, "fat": reserved * bps,
              "fat_bytes": fat_sectors * bps, "nfats": nfats, "root": root_dir,
              "data": root_dir + root_entries * 32}
    return image, layout


def _entry_at(image: Path, directory: int, name: bytes) -> int:
    data = image.read_bytes()
    for pos in range(directory, directory + 16384, 32):
        if data[pos:pos + 11] == name:
            return pos
    raise AssertionError(f"{name!r} not found")


def _patch(image: Path, offset: int, data: bytes) -> None:
    with open(image, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _set_fat16(image: Path, layout: dict[str, int], cluster: int, value: int) -> None:
    for copy in range(layout["nfats"]):
        _patch(image, layout["fat"] + copy * layout["fat_bytes"] + cluster * 2,
               struct.pack("<H", value))


def _list_all(image: Path) -> None:
    with FileSource(image) as src:
        for entry in fat.FatFilesystem(src).entries():
            if entry.type is EntryType.FILE:
                _sha(entry.open())


def _refused(image: Path, match: str) -> None:
    started = time.monotonic()
    with pytest.raises(InvalidImageError, match=match):
        _list_all(image)
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("shape", ["jump back", "run into"])
def test_hostile_chain_loop(tmp_path: Path, shape: str) -> None:
    image, layout = _fat16_with_files(tmp_path)
    start = struct.unpack_from("<H", image.read_bytes(),
                               _entry_at(image, layout["root"], b"BIG     BIN") + 26)[0]
    if shape == "jump back":
        # The file's 16 clusters: make the 10th point back to the 3rd.
        _set_fat16(image, layout, start + 9, start + 2)
    else:
        # 0-2, then 10-12, then back to 3: the run 3..9 flows on into 10, seen already
        # (the reader walks contiguous runs at once, so the run itself must be checked).
        _set_fat16(image, layout, start + 2, start + 10)
        _set_fat16(image, layout, start + 12, start + 3)
    _refused(image, "BIG.BIN: its cluster chain loops back to cluster")


def test_hostile_chain_past_the_end(tmp_path: Path) -> None:
    image, layout = _fat16_with_files(tmp_path)
    start = struct.unpack_from("<H", image.read_bytes(),
                               _entry_at(image, layout["root"], b"BIG     BIN") + 26)[0]
    _set_fat16(image, layout, start + 3, 0xFFF0)
    _refused(image, "points to cluster 65520, past the last cluster")


def test_hostile_size_beyond_chain(tmp_path: Path) -> None:
    image, layout = _fat16_with_files(tmp_path)
    entry = _entry_at(image, layout["root"], b"BIG     BIN")
    _patch(image, entry + 28, struct.pack("<I", 10 * MiB))
    _refused(image, "BIG.BIN: 10485760 bytes, but its cluster chain holds only 16 clusters")


@pytest.mark.parametrize("target", ["self", "parent", "root"])
def test_hostile_directory_loop(tmp_path: Path, target: str) -> None:
    image, layout = _fat16_with_files(tmp_path)
    data = image.read_bytes()
    sub_cluster = struct.unpack_from("<H", data, _entry_at(image, layout["root"],
                                                           b"SUB        ") + 26)[0]
    sub_dir = layout["data"] + (sub_cluster - 2) * layout["cluster"]
    inner = _entry_at(image, sub_dir, b"INNER      ")
    inner_cluster = struct.unpack_from("<H", data, inner + 26)[0]
    if target == "self":
        inner_dir = layout["data"] + (inner_cluster - 2) * layout["cluster"]
        # A third entry in INNER, a directory pointing to INNER itself.
        _patch(image, inner_dir + 64, b"LOOP       \x10" + bytes(14) +
               struct.pack("<HI", inner_cluster, 0))
        _refused(image, r"SUB/INNER/LOOP: its cluster \d+ belongs to another directory")
    elif target == "parent":
        _patch(image, inner + 26, struct.pack("<H", sub_cluster))
        _refused(image, r"SUB/INNER: its cluster \d+ belongs to another directory")
    else:
        _patch(image, inner + 26, struct.pack("<H", 0))
        _refused(image, "SUB/INNER: the directory points to the root")


def test_hostile_fat32_chain_loop_is_quick(tmp_path: Path) -> None:
    image = _mkfs(tmp_path / "h32.img", 64 * MiB, "-F", "32")
    (tmp_path / "f.bin").write_bytes(bytes(4096))
    _mtools("mcopy", "-i", image, tmp_path / "f.bin", "::")
    boot = image.read_bytes()[:512]
    bps, reserved = struct.unpack_from("<H", boot, 11)[0], struct.unpack_from("<H", boot, 14)[0]
    root_cluster = struct.unpack_from("<I", boot, 44)[0]
    # The root directory's chain points back to itself: without loop tracking, a hang.
    _patch(image, reserved * bps + root_cluster * 4, struct.pack("<I", root_cluster))
    _refused(image, "cluster 2 belongs to another directory or comes twice")


@pytest.mark.parametrize("field, value, match", [
    (22, struct.pack("<H", 0xFFFF), "end past the"),  # sectors per FAT * FATs > volume
    (11, struct.pack("<H", 1000), "bytes per sector"),
    (13, b"\x03", "sectors per cluster"),
    (16, b"\x07", "7 FATs"),
    (14, struct.pack("<H", 0), "no reserved sectors"),
])
def test_hostile_bpb(tmp_path: Path, field: int, value: bytes, match: str) -> None:
    image = _mkfs(tmp_path / "b.img", 8 * MiB, "-F", "12")
    data = bytearray(image.read_bytes()[:4096])
    data[field:field + len(value)] = value
    with pytest.raises(InvalidImageError, match=match):
        fat.FatFilesystem(BytesSource(bytes(data) + bytes(8 * MiB - 4096)))


@pytest.mark.parametrize("bits", [12, 32])
def test_random_damage_is_refused_cleanly(tmp_path: Path, bits: int) -> None:
    """Random bytes over the boot sector, the FAT and the first directories of an mkfs.vfat
    volume: a tree, or InvalidImageError / UnsupportedFeatureError, never another exception,
    never a hang. (Thousands of such runs passed while this reader was reviewed.)"""
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"hello\n")
    (src / "A long name here.txt").write_bytes(b"long\n")
    (src / "sub" / "r.bin").write_bytes(random.Random(1).randbytes(5000))
    (src / "sub" / "deeper" / "x").write_bytes(b"x")
    image = _mkfs(tmp_path / "f.img", 34 * MiB if bits == 32 else 4 * MiB, "-F", str(bits))
    _mtools("mcopy", "-i", image, "-s", *sorted(src.iterdir()), "::")
    clean = image.read_bytes()
    geometry = fat.parse_boot_sector(clean[:4096])
    root = geometry.data_offset - geometry.root_dir_bytes
    regions = [(0, 512), (geometry.fat_offset, geometry.fat_offset + 4096), (root, root + 16384)]
    # Only the head is damaged: the rest of the volume is shared by every damaged copy.
    head_size = root + 16384
    rest = BytesSource(clean[head_size:])
    rng = random.Random(bits)
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(150):
        damaged = bytearray(clean[:head_size])
        for _ in range(rng.randint(1, 16)):
            start, end = rng.choice(regions)
            damaged[rng.randrange(start, end)] ^= 1 << rng.randrange(8)
        started = time.monotonic()
        try:
            with ConcatSource([BytesSource(bytes(damaged)), rest]) as source:
                fs = fat.FatFilesystem(source)
                fs.info()
                for entry in fs.entries():
                    if entry.type is EntryType.FILE:
                        _sha(entry.open())
            outcomes["ok"] += 1
        except (InvalidImageError, UnsupportedFeatureError):
            outcomes["refused"] += 1
        assert time.monotonic() - started < 5
    assert outcomes["refused"] > 0 and outcomes["ok"] > 0


def test_truncated_volume(tmp_path: Path) -> None:
    image = _mkfs(tmp_path / "t.img", 64 * MiB, "-F", "32")
    head = image.read_bytes()[:4096]
    with pytest.raises(InvalidImageError, match="truncated"):
        fat.FatFilesystem(BytesSource(head))
