"""Files inside disks, used as a hostile or careless user would: odd partition numbers, extended
containers, damaged filesystems, paths through symlinks and above the root, outputs that are
the input, sources that are symlinks, and a filesystem used after it was closed. Every bad
input must be one line on stderr with a non-zero exit code, and leave no output behind.

Disks are partitioned by sfdisk (and fdisk -b 4096), filesystems made by mke2fs -d and
mkfs.vfat, a VHDX by qemu-img."""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import FIXTURES, require_tool, run_cli_process, run_tool

import imgbridge
from imgbridge.errors import InvalidInputError

MiB = 1 << 20
SECTOR = 512


Runner = Callable[..., "subprocess.CompletedProcess[str]"]


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Runner:
    """The CLI run in-process (a subprocess per call would cost most of this file's time):
    its exit code, stdout and stderr, as ``subprocess.run`` reports them."""
    from imgbridge.cli import main

    def run_cli(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
        capsys.readouterr()
        code = main([os.fspath(a) for a in args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, out, err)

    return run_cli


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0, proc.stdout
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    assert proc.stderr.startswith("imgbridge: error: "), proc.stderr
    return proc.stderr


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    root.mkdir(parents=True)
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def _sfdisk(disk: Path, script: str) -> None:
    run_tool("sfdisk", "-q", disk, input_text=script)


def _mke2fs(disk: Path, offset: int, size: int, tree: Path) -> None:
    run_tool("mke2fs", "-q", "-F", "-t", "ext4", "-d", tree, "-E", f"offset={offset}", disk,
             f"{size // 1024}k")


@pytest.fixture(scope="module")
def mbr_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MBR: primary 1 (ext4, 8 MiB), extended 2 holding logical 5 (ext4, 8 MiB, as large
    as 1) and logical 6 (FAT, 10 MiB)."""
    for tool in ("sfdisk", "mke2fs", "mkfs.vfat"):
        require_tool(tool)
    work = tmp_path_factory.mktemp("mbr")
    disk = work / "mbr.raw"
    with open(disk, "wb") as f:
        f.truncate(64 * MiB)
    _sfdisk(disk, "label: dos\n"
                  f"{disk}1 : start=2048, size=16384, type=83\n"
                  f"{disk}2 : start=18432, size=90112, type=5\n"
                  f"{disk}5 : start=20480, size=16384, type=83\n"
                  f"{disk}6 : start=38912, size=20480, type=83\n")
    _mke2fs(disk, 2048 * SECTOR, 8 * MiB, _tree(work / "t1", {"one": b"one\n"}))
    _mke2fs(disk, 20480 * SECTOR, 8 * MiB, _tree(work / "t5", {"five": b"five\n"}))
    run_tool("mkfs.vfat", "--offset", "38912", disk, "10240")
    return disk


@pytest.fixture(scope="module")
def gpt_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GPT: an ESP (FAT) and an x86-64 root partition (ext4 with /etc/hello)."""
    for tool in ("sfdisk", "mke2fs", "mkfs.vfat"):
        require_tool(tool)
    work = tmp_path_factory.mktemp("gpt")
    disk = work / "gpt.raw"
    with open(disk, "wb") as f:
        f.truncate(40 * MiB)
    _sfdisk(disk, "label: gpt\n"
                  "start=2048, size=16384, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n"
                  "start=18432, size=40000, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709\n")
    run_tool("mkfs.vfat", "--offset", "2048", disk, "8192")
    _mke2fs(disk, 18432 * SECTOR, 16 * MiB, _tree(work / "t", {"etc/hello": b"hello\n"}))
    return disk


@pytest.fixture(scope="module")
def link_fs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bare ext4 (mke2fs -d) with symlinks of every sort, a fifo and a nested directory."""
    require_tool("mke2fs")
    work = tmp_path_factory.mktemp("links")
    tree = _tree(work / "tree", {"etc/passwd": b"inside\n", "d/sub/f": b"deep\n"})
    os.symlink("/etc/passwd", tree / "abs")
    os.symlink("../etc/passwd", tree / "d/rel")
    os.symlink("/nonexistent", tree / "dangling")
    os.symlink("d", tree / "dlink")
    os.symlink("../../../../etc", tree / "d/sub/up")
    os.mkfifo(tree / "fifo")
    os.symlink("loop2", tree / "loop1")
    os.symlink("loop1", tree / "loop2")
    image = work / "links.ext4"
    with open(image, "wb") as f:
        f.truncate(8 * MiB)
    run_tool("mke2fs", "-q", "-F", "-t", "ext4", "-d", tree, image)
    return image


# ---- partitions ----------------------------------------------------------------------------


@pytest.mark.parametrize("number", ["0", "-1", "7"])
def test_partition_numbers_that_do_not_exist(run: Runner, mbr_disk: Path,
                                             number: str) -> None:
    err = _one_line_error(run("ls", "-P", number, mbr_disk))
    assert f"no partition {number} (partitions: 1, 2, 5, 6)" in err


def test_logical_partition_is_read(run: Runner, mbr_disk: Path) -> None:
    proc = run("cat", "-P", "5", mbr_disk, "/five")
    assert proc.returncode == 0 and proc.stdout == "five\n", proc.stderr
    assert proc.stderr == ""  # asked for: no notice


def test_extended_container_is_named_as_such(run: Runner, mbr_disk: Path) -> None:
    err = _one_line_error(run("ls", "-P", "2", mbr_disk))
    assert "partition 2 is an extended partition" in err and "5, 6" in err


def test_equal_sized_linux_partitions_say_the_tie(run: Runner, mbr_disk: Path) -> None:
    proc = run("ls", mbr_disk)
    assert proc.returncode == 0 and proc.stdout == "/lost+found\n/one\n", proc.stderr
    assert "partition 1" in proc.stderr
    assert "the first of 2 largest Linux filesystems" in proc.stderr


def test_fat_only_disk_says_the_only_filesystem(run: Runner, tmp_path: Path) -> None:
    for tool in ("sfdisk", "mkfs.vfat", "mcopy"):
        require_tool(tool)
    disk = tmp_path / "fat.raw"
    with open(disk, "wb") as f:
        f.truncate(40 * MiB)
    _sfdisk(disk, "label: dos\n,,c\n")
    run_tool("mkfs.vfat", "--offset", "2048", disk, str((40 * MiB - MiB) // 1024))
    (tmp_path / "x.txt").write_bytes(b"x\n")
    run_tool("mcopy", "-i", f"{disk}@@1M", tmp_path / "x.txt", "::/X.TXT")
    proc = run("cat", disk, "/X.TXT")
    assert proc.returncode == 0 and proc.stdout == "x\n", proc.stderr
    assert "partition 1 (vfat, the only filesystem)" in proc.stderr
    # FAT names match whatever the case, as the kernel's vfat and mtools match them.
    proc = run("cat", disk, "/x.txt")
    assert proc.returncode == 0 and proc.stdout == "x\n", proc.stderr
    proc = run("ls", disk, "/x.Txt")
    assert proc.returncode == 0 and proc.stdout == "/X.TXT\n", proc.stderr


def test_table_without_filesystem(run: Runner, tmp_path: Path) -> None:
    require_tool("sfdisk")
    disk = tmp_path / "empty.raw"
    with open(disk, "wb") as f:
        f.truncate(20 * MiB)
    _sfdisk(disk, "label: gpt\n,8M,L\n,,L\n")
    err = _one_line_error(run("ls", disk))
    assert "none of its partitions holds a filesystem" in err
    err = _one_line_error(run("cat", "-P", "1", disk, "/x"))
    assert "partition 1 holds no filesystem" in err
    out = tmp_path / "x.ext4"
    err = _one_line_error(run("convert", disk, out))
    assert not out.exists() and not list(tmp_path.glob(".*"))
    err = _one_line_error(run("extract", disk, tmp_path / "x.tar"))
    assert not (tmp_path / "x.tar").exists() and not list(tmp_path.glob(".*"))


def test_damaged_root_filesystem(run: Runner, gpt_disk: Path, tmp_path: Path) -> None:
    """The root ext4's block count made absurd: its superblock checksum no longer matches.
    inspect still describes the disk and says so; ls, cat and extract fail in one line."""
    disk = tmp_path / "bad.raw"
    disk.write_bytes(gpt_disk.read_bytes())
    with open(disk, "r+b") as f:
        f.seek(18432 * SECTOR + 1024 + 4)  # s_blocks_count_lo
        f.write(struct.pack("<I", 0x0FFFFFFF))
    before = _sha(disk)
    proc = run("inspect", disk)
    assert proc.returncode == 0, proc.stderr
    assert "vfat" in proc.stdout and "Linux root (x86-64)" in proc.stdout
    assert "ext4: unreadable (" in proc.stdout and "checksum" in proc.stdout
    for args in (("ls", disk), ("cat", disk, "/etc/hello"), ("extract", disk, tmp_path / "o")):
        err = _one_line_error(run(*args))
        assert "superblock checksum mismatch" in err
    assert not (tmp_path / "o").exists()
    assert _sha(disk) == before


def test_implausible_superblock_is_named_unreadable(run: Runner, gpt_disk: Path,
                                                   tmp_path: Path) -> None:
    """A superblock too damaged for the probe to claim (block size 2**50): inspect says the
    partition's ext4 is unreadable instead of showing nothing; ls names no filesystem."""
    disk = tmp_path / "bad.raw"
    disk.write_bytes(gpt_disk.read_bytes())
    with open(disk, "r+b") as f:
        f.seek(18432 * SECTOR + 1024 + 24)  # s_log_block_size
        f.write(struct.pack("<I", 40))
    proc = run("inspect", disk)
    assert proc.returncode == 0, proc.stderr
    assert "ext4: unreadable (its magic number is there" in proc.stdout
    err = _one_line_error(run("ls", "-P", "2", disk))
    assert "holds no filesystem that imgbridge can read" in err


def _patch_vhdx_sector_size(path: Path, size: int) -> None:
    """Set a qemu-made VHDX's logical and physical sector size (qemu-img writes 512 only).
    Metadata items carry no checksum; with one block per chunk the BAT is unchanged."""
    data = bytearray(path.read_bytes())
    region_table = 192 * 1024
    metadata_region = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E").bytes_le
    wanted = {uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F").bytes_le,
              uuid.UUID("CDA348C7-445D-4471-9CC9-E9885251C556").bytes_le}
    (count,) = struct.unpack_from("<I", data, region_table + 8)
    regions = [data[region_table + 16 + i * 32: region_table + 48 + i * 32] for i in range(count)]
    (meta,) = [struct.unpack_from("<Q", r, 16)[0] for r in regions if r[:16] == metadata_region]
    (items,) = struct.unpack_from("<H", data, meta + 10)
    patched = 0
    for i in range(items):
        item = meta + 32 + i * 32
        if bytes(data[item: item + 16]) in wanted:
            struct.pack_into("<I", data, meta + struct.unpack_from("<I", data, item + 16)[0],
                             size)
            patched += 1
    assert patched == 2
    path.write_bytes(data)


def test_gpt_with_4k_sectors_in_a_vhdx(run: Runner, tmp_path: Path) -> None:
    for tool in ("fdisk", "mke2fs", "qemu-img"):
        require_tool(tool)
    raw = tmp_path / "k4.raw"
    with open(raw, "wb") as f:
        f.truncate(48 * MiB)
    script = "g\nn\n1\n256\n+8M\nt\n1\nn\n2\n2304\n+16M\nt\n2\n23\nw\n"
    subprocess.run(["fdisk", "-b", "4096", raw], input=script, text=True, capture_output=True,
                   check=True)
    _mke2fs(raw, 2304 * 4096, 16 * MiB, _tree(tmp_path / "t", {"five": b"five\n"}))
    vhdx = tmp_path / "k4.vhdx"
    run_tool("qemu-img", "convert", "-O", "vhdx", raw, vhdx)
    _patch_vhdx_sector_size(vhdx, 4096)
    assert imgbridge.inspect(vhdx)["format-specific"]["data"]["logical-sector-size"] == 4096
    proc = run("cat", vhdx, "/five")
    assert proc.returncode == 0 and proc.stdout == "five\n", proc.stderr
    assert "partition 2 (ext4, the root partition type)" in proc.stderr


# ---- paths -------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "content"), [
    ("/abs", "inside\n"), ("d/rel", "inside\n"), ("dlink/sub/f", "deep\n"),
    ("d/sub/up/passwd", "inside\n"), ("/d/../etc/passwd", "inside\n"),
])
def test_cat_through_links(run: Runner, link_fs: Path, path: str, content: str) -> None:
    proc = run("cat", link_fs, path)
    assert proc.returncode == 0 and proc.stdout == content, proc.stderr


@pytest.mark.parametrize(("path", "message"), [
    ("dangling", "/dangling: no such file in the image (a symlink to /nonexistent, which "
                 "is not there)"),
    ("dlink", "/dlink: is a dir, not a regular file"),
    ("/", "/: is a dir, not a regular file"),
    ("fifo", "/fifo: is a fifo, not a regular file"),
    ("../../etc/passwd", "climbs above the image's root"),
])
def test_cat_refusals_are_one_line(run: Runner, link_fs: Path, path: str, message: str) -> None:
    assert message in _one_line_error(run("cat", link_fs, path))


def test_ls_follows_links_in_the_parent_path(run: Runner, link_fs: Path) -> None:
    proc = run("ls", link_fs, "dlink/sub")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "/d/sub/f\n/d/sub/up\n"
    proc = run("ls", link_fs, "d/sub/up/")  # a trailing / follows the last link
    assert proc.returncode == 0 and proc.stdout == "/etc/passwd\n", proc.stderr
    proc = run("ls", "-l", link_fs, "dlink")  # without it, the link itself
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("/dlink -> d"), proc.stderr
    assert "no such file" in _one_line_error(run("ls", link_fs, "dangling/x"))
    for looping in ("loop1/", "loop1/x"):
        err = _one_line_error(run("ls", link_fs, looping))
        assert "too many levels of symbolic links" in err


def test_errors_after_a_default_partition_are_one_line(run: Runner, gpt_disk: Path) -> None:
    """Which partition was read is part of the error line, not a second line (checked once
    in a real process too: exit code and stderr as a shell sees them)."""
    err = _one_line_error(run_cli_process("cat", gpt_disk, "/missing"))
    assert "/missing: no such file" in err and "partition 2" in err
    err = _one_line_error(run("ls", gpt_disk, "/missing"))
    assert "partition 2" in err
    err = _one_line_error(run("diff", gpt_disk, gpt_disk.parent / "nope.raw"))
    assert "nope.raw: no such file" in err


def test_partition_of_a_container_image_names_it(run: Runner, gpt_disk: Path) -> None:
    oci = FIXTURES / "small-oci"
    err = _one_line_error(run("diff", "--partition-b", "1", gpt_disk, oci))
    assert f"{oci}: --partition applies to disk images" in err


# ---- outputs that are inputs -----------------------------------------------------------------


def test_extract_onto_its_own_image_is_refused(run: Runner, tmp_path: Path) -> None:
    archive = tmp_path / "img.tar"
    imgbridge.convert(f"oci:{FIXTURES / 'small-oci'}:latest", archive,
                      output_format="docker-archive", sync=False)
    before = _sha(archive)
    for image in (archive, f"docker-archive:{archive}"):
        err = _one_line_error(run("extract", image, archive))
        assert "would overwrite the input" in err
        assert _sha(archive) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.tar"]


def test_convert_onto_its_own_transport_source_is_refused(run: Runner, tmp_path: Path) -> None:
    archive = tmp_path / "img.tar"
    imgbridge.convert(f"oci:{FIXTURES / 'small-oci'}:latest", archive,
                      output_format="docker-archive", sync=False)
    before = _sha(archive)
    err = _one_line_error(run("convert", f"docker-archive:{archive}", archive,
                                          "-O", "ext4"))
    assert "would overwrite the input" in err
    assert _sha(archive) == before and sorted(p.name for p in tmp_path.iterdir()) == ["img.tar"]


# ---- convert sources ---------------------------------------------------------------------


def test_convert_a_symlink_to_a_folder(run: Runner, tmp_path: Path) -> None:
    """The SRC link itself is followed (as mke2fs -d and tar -C do); links inside are not."""
    tree = _tree(tmp_path / "tree", {"a": b"a\n"})
    os.symlink("a", tree / "link")
    os.symlink("tree", tmp_path / "alias")
    out = tmp_path / "alias.ext4"
    proc = run("convert", tmp_path / "alias", out)
    assert proc.returncode == 0, proc.stderr
    names = {e.path: e.type.value for e in imgbridge.list_files(out)}
    assert names == {"a": "file", "link": "symlink", "lost+found": "dir"}


def test_convert_a_folder_with_a_socket(run: Runner, tmp_path: Path) -> None:
    tree = _tree(tmp_path / "tree", {"a": b"a\n"})
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(os.fspath(tree / "sock"))
        proc = run("convert", tree, tmp_path / "s.ext4")
        assert proc.returncode == 0, proc.stderr
        assert [e.type.value for e in imgbridge.list_files(tmp_path / "s.ext4", "sock")] \
            == ["socket"]
        err = _one_line_error(run("convert", tree, tmp_path / "s.fat"))
        assert "socket" in err and "skip_unsupported" in err
        assert not (tmp_path / "s.fat").exists()


def test_convert_a_tar_climbing_out_or_linking_nowhere(run: Runner, tmp_path: Path) -> None:
    import io
    import tarfile

    tar = tmp_path / "evil.tar"
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as archive:
        for name in ("ok", "../escape"):
            info = tarfile.TarInfo(name)
            info.size = 3
            archive.addfile(info, io.BytesIO(b"xx\n"))
    links = tmp_path / "links.tar"
    with tarfile.open(links, "w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("c")
        info.type, info.linkname = tarfile.LNKTYPE, "missing"
        archive.addfile(info)
    for fmt in ("ext4", "vfat", "iso9660"):
        out = tmp_path / f"evil.{fmt}"
        err = _one_line_error(run("convert", tar, out, "-O", fmt))
        assert "'../escape' climbs above the root" in err
        err = _one_line_error(run("convert", links, out, "-O", fmt))
        assert "hardlink c points to missing" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.tar", "links.tar"]


@pytest.mark.parametrize("args", [
    ("-c",), ("-B", "base.qcow2"), ("--tag", "x:y"),
])
def test_convert_filesystem_refuses_image_options(run: Runner, tmp_path: Path,
                                                  args: tuple[str, ...]) -> None:
    tree = _tree(tmp_path / "tree", {"a": b"a\n"})
    err = _one_line_error(run("convert", tree, tmp_path / "x.ext4", *args))
    assert "do not apply" in err and not (tmp_path / "x.ext4").exists()


# ---- the library -------------------------------------------------------------------------


def test_open_filesystem_refusals(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="not a disk image"):
        imgbridge.open_filesystem(FIXTURES / "small-oci")
    with pytest.raises(InvalidInputError, match="no such file"):
        imgbridge.open_filesystem(tmp_path / "missing.raw")


@pytest.mark.parametrize(("image", "partition"), [
    ("small-gpt.qcow2", None), ("small-gpt.qcow2", 1), ("small.iso", None),
])
def test_use_after_close_is_a_clean_error(image: str, partition: int | None) -> None:
    """Closing twice is harmless; entries, their openers and open streams used after close
    raise InvalidInputError ("... was closed"), not a bad file descriptor (ext4, FAT and
    ISO9660 readers alike)."""
    found = imgbridge.open_filesystem(FIXTURES / image, partition=partition)
    files = [e for e in found.fs.entries() if e.type.value == "file"]
    stream = files[0].open()
    found.close()
    found.close()
    with pytest.raises(InvalidInputError, match="was closed"):
        files[0].open().read()
    with pytest.raises(InvalidInputError, match="was closed"):
        stream.read()
    with pytest.raises(InvalidInputError, match="was closed"):
        list(found.fs.entries())


@pytest.mark.parametrize("fmt", ["ext4", "iso9660", "vfat"])
def test_convert_into_the_folder_it_reads(run: Runner, tmp_path: Path, fmt: str) -> None:
    """DST inside SRC: the image being written (its temporary file, or the DST a previous
    run left) is not part of the tree, as tar leaves out its own archive."""
    tree = _tree(tmp_path / "tree", {"a": b"a\n"})
    out = tree / f"out.{fmt}"
    for _ in range(2):  # the second run finds the first one's DST in the folder
        proc = run("convert", tree, out, "-O", fmt)
        assert proc.returncode == 0, proc.stderr
        names = {e.path for e in imgbridge.list_files(out)} - {"lost+found"}
        assert names == {"a"}, names
    assert sorted(p.name for p in tree.iterdir()) == ["a", f"out.{fmt}"]


def test_a_file_removed_while_the_folder_is_read(tmp_path: Path) -> None:
    from imgbridge.converters.dir_to_tree import read_host_tree

    tree = _tree(tmp_path / "tree", {"a": b"a\n", "b": b"b\n"})
    walk = read_host_tree(tree)
    assert [next(walk).path, next(walk).path] == ["", "a"]
    (tree / "b").unlink()
    with pytest.raises(InvalidInputError, match=r"b: No such file.*changed while it was read"):
        next(walk)


def test_convert_source_errors_leave_nothing(run: Runner, tmp_path: Path) -> None:
    out = tmp_path / "x.ext4"
    err = _one_line_error(run("convert", tmp_path / "missing", out, "-O", "ext4"))
    assert "missing" in err
    (tmp_path / "text").write_bytes(b"not an image\n" * 100)
    err = _one_line_error(run("convert", tmp_path / "text", out))
    assert "no partition table and no filesystem" in err
    (tmp_path / "adir.ext4").mkdir()
    _one_line_error(run("convert", FIXTURES / "small.iso", tmp_path / "adir.ext4"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir.ext4", "text"]
    assert not list((tmp_path / "adir.ext4").iterdir())


def test_a_file_that_cannot_be_opened_is_a_clean_error(tmp_path: Path) -> None:
    """A file that vanished (or is unreadable: chmod 000 as a user) between the walk and the
    copy of its bytes: InvalidInputError naming it, not an OSError."""
    from imgbridge.converters.dir_to_tree import read_host_tree

    tree = _tree(tmp_path / "tree", {"a": b"a\n"})
    (entry,) = [e for e in read_host_tree(tree) if e.path == "a"]
    (tree / "a").unlink()
    with pytest.raises(InvalidInputError, match=r"tree/a: No such file"):
        entry.open()


@pytest.mark.parametrize("fmt", ["ext4", "vfat", "iso9660"])
def test_convert_filesystem_options(run: Runner, tmp_path: Path, fmt: str) -> None:
    tree = _tree(tmp_path / "tree", {"a": b"a\n"})
    out = tmp_path / "out.img"
    proc = run("convert", "-O", fmt, "-o", "help", tree, out)
    assert proc.returncode == 0 and f"Supported options for {fmt}:" in proc.stdout
    assert "label" in proc.stdout and not out.exists()
    err = _one_line_error(run("convert", "-O", fmt, "-o", "bogus=1", tree, out))
    assert f"format {fmt} does not take option 'bogus'" in err
    err = _one_line_error(run("convert", "-O", fmt, tree, tmp_path / "missing" / "x"))
    assert "does not exist" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tree"]


def test_size_applies_to_filesystems_only(run: Runner, tmp_path: Path) -> None:
    err = _one_line_error(run("convert", "--size", "10M", FIXTURES / "small.qcow2",
                              tmp_path / "x.raw"))
    assert "--size applies to filesystem outputs" in err
    assert not list(tmp_path.iterdir())
