"""Files inside disk images: partitioned disks made by sfdisk, mke2fs -d, mkfs.vfat + mcopy,
converted by qemu-img into qcow2, vmdk and vhd, read back through ``ls``/``cat``/``extract``/
``diff``; filesystems built by ``convert -O ext4|vfat|iso9660`` judged by e2fsck, fsck.fat and
isoinfo."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import (
    FIXTURES,
    is_root,
    make_rich_tree,
    require_tool,
    run_cli_process,
    run_tool,
)
from imgbridge.converters.dir_to_tree import read_host_tree

import imgbridge
from imgbridge.model.tree import Entry, EntryType

MiB = 1 << 20
ROOT_X86_64 = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"


def _sha(stream_chunks: object) -> str:
    h = hashlib.sha256()
    for chunk in stream_chunks:  # type: ignore[attr-defined]
        h.update(chunk)
    return h.hexdigest()


def _file_sha(entry: Entry) -> str:
    h = hashlib.sha256()
    with entry.open() as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _mke2fs_seconds(ns: int) -> int:
    return ((ns // 10**9 + 2**31) % 2**32) - 2**31


def _facts(entry: Entry, *, seconds: bool) -> tuple[object, ...]:
    """What must survive. ``seconds``: what mke2fs 1.47 -d keeps of a time (it stores whole
    seconds in the 32-bit field alone, so a date past 2038 wraps to a negative one)."""
    if entry.type is EntryType.HARDLINK:  # its metadata is its target's
        return (entry.path, entry.type, entry.link_target)
    mtime = _mke2fs_seconds(entry.mtime) if seconds else entry.mtime
    return (entry.path, entry.type, entry.mode, entry.uid, entry.gid, entry.size,
            entry.link_target, entry.devmajor, entry.devminor, entry.xattrs, mtime)


@pytest.fixture(scope="module")
def rich_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_rich_tree(tmp_path_factory.mktemp("rich") / "tree", big_dir=300)


@pytest.fixture(scope="module", params=["gpt", "mbr"])
def partitioned_disk(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                     rich_tree: Path) -> Path:
    """A disk partitioned by sfdisk (GPT, or MBR): an ESP (FAT32 by mkfs.vfat, files by
    mcopy), a Linux data partition (a small ext2) and the root partition (mke2fs -t ext4 -d
    of the rich tree). The root is found by its DPS type on GPT, as the largest Linux
    filesystem on MBR."""
    for tool in ("sfdisk", "mke2fs", "mkfs.vfat", "mcopy"):
        require_tool(tool)
    work = tmp_path_factory.mktemp("disk")
    disk = work / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(150 * MiB)
    if request.param == "gpt":
        script = (f"label: gpt\nstart=1MiB, size=40MiB, type={ESP}, name=esp\n"
                  f"size=8MiB, type={LINUX}, name=data\n"
                  f"type={ROOT_X86_64}, name=root\n")
    else:
        script = "label: dos\nstart=1MiB, size=40MiB, type=ef\nsize=8MiB, type=83\ntype=83\n"
    run_tool("sfdisk", "-q", disk, input_text=script)
    esp = work / "esp.fat"
    with open(esp, "wb") as f:
        f.truncate(40 * MiB)
    run_tool("mkfs.vfat", "-F", "32", "-n", "EFI", esp)
    (work / "EFI" / "BOOT").mkdir(parents=True)
    (work / "EFI" / "BOOT" / "BOOTX64.EFI").write_bytes(os.urandom(70_000))
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    subprocess.run(["mcopy", "-s", "-m", "-i", str(esp), str(work / "EFI"), "::"], check=True,
                   env=env)
    data = work / "data.ext2"
    run_tool("mke2fs", "-q", "-t", "ext2", "-L", "data", data, "8M")
    root = work / "root.ext4"
    run_tool("mke2fs", "-q", "-t", "ext4", "-L", "root", "-d", rich_tree, root, "100M")
    for image, start in ((esp, 1), (data, 41), (root, 49)):
        subprocess.run(["dd", f"if={image}", f"of={disk}", "bs=1M", f"seek={start}",
                        "conv=notrunc,sparse", "status=none"], check=True)
    return disk


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vmdk", "vpc"])
def test_rich_tree_read_back_through_every_disk_format(
        partitioned_disk: Path, rich_tree: Path, tmp_path: Path, fmt: str) -> None:
    disk = partitioned_disk
    if fmt != "raw":
        require_tool("qemu-img")
        disk = tmp_path / f"disk.{fmt}"
        run_tool("qemu-img", "convert", "-f", "raw", "-O", fmt, partitioned_disk, disk)
    notes: list[str] = []
    listed = imgbridge.list_files(disk, recursive=True, notice=notes.append)
    assert notes and "partition 3" in notes[0] and "root" in notes[0], notes
    want = [e for e in read_host_tree(rich_tree) if e.path]
    # mke2fs -d copies lost+found in and truncates times to whole seconds.
    listed = [e for e in listed if e.path != "lost+found"]
    assert [_facts(e, seconds=True) for e in listed] == [_facts(e, seconds=True) for e in want]
    with imgbridge.open_filesystem(disk) as found:
        assert found.partition.number == 3
        by_path = {e.path: e for e in found.fs.entries()}
        for entry in want:
            if entry.type is EntryType.FILE:
                assert _file_sha(by_path[entry.path]) == _file_sha(entry), entry.path


def test_ls_long_output_matches_the_source_tree(partitioned_disk: Path, rich_tree: Path,
                                                cli) -> None:  # type: ignore[no-untyped-def]
    from imgbridge.cli import _long_line

    result = cli("ls", "-l", "-R", partitioned_disk, "/")
    assert result.code == 0, result.err
    assert "reading partition 3" in result.err
    want = [_long_line(replace(e, mtime=_mke2fs_seconds(e.mtime) * 10**9))
            for e in read_host_tree(rich_tree) if e.path]
    got = [line for line in result.out.splitlines() if "/lost+found" not in line]
    assert got == want


def test_debugfs_agrees_on_a_sample(partitioned_disk: Path, tmp_path: Path) -> None:
    require_tool("debugfs")
    root = tmp_path / "root.ext4"
    subprocess.run(["dd", f"if={partitioned_disk}", f"of={root}", "bs=1M", "skip=49",
                    "status=none"], check=True)
    entries = {e.path: e for e in imgbridge.list_files(partitioned_disk, recursive=True)}
    for path in ("bin/tool", "etc/hostname", "xattrs", "future"):
        stat = run_tool("debugfs", "-R", f"stat /{path}", root).stdout
        entry = entries[path]
        fields: dict[str, str] = {}
        for key, value in re.findall(r"(Mode|User|Group|Size|Links):\s+(\d+)", stat):
            fields.setdefault(key, value)  # the first: "Fragment: ... Size: 0" comes later
        assert int(fields["Mode"], 8) == entry.mode, path
        assert (int(fields["User"]), int(fields["Group"])) == (entry.uid, entry.gid), path
        assert int(fields["Size"]) == entry.size, path
        listed = run_tool("debugfs", "-R", f"ea_list /{path}", root).stdout
        for name, _ in entry.xattrs:
            short = name.removeprefix("user.")  # debugfs prints user.* names in full too
            assert short in listed, (path, name, listed)
        assert f"mtime: {entry.mtime // 10**9 & 0xFFFFFFFF:#010x}" in stat


def test_partition_option_and_other_filesystems(partitioned_disk: Path) -> None:
    esp = imgbridge.list_files(partitioned_disk, "/EFI/BOOT", partition=1)
    assert [e.path for e in esp] == ["EFI/BOOT/BOOTX64.EFI"]
    assert esp[0].size == 70_000
    data = imgbridge.list_files(partitioned_disk, partition=2)
    assert [e.path for e in data] == ["lost+found"]
    with pytest.raises(imgbridge.InvalidInputError, match="no partition 7"):
        imgbridge.list_files(partitioned_disk, partition=7)


def test_inspect_lists_the_filesystem_of_each_partition(partitioned_disk: Path) -> None:
    info = imgbridge.inspect(partitioned_disk, "raw")
    parts = {p["number"]: p for p in info["partitions"]["partitions"]}
    assert parts[1]["filesystem"]["type"] == "vfat"
    assert parts[1]["filesystem"]["label"] == "EFI"
    assert parts[2]["filesystem"]["type"] == "ext2"
    assert parts[2]["filesystem"]["label"] == "data"
    assert parts[3]["filesystem"]["type"] == "ext4"
    blkid = shutil.which("blkid")
    if blkid:
        uuid = subprocess.run([blkid, "-p", "-o", "value", "-s", "UUID", "-O", str(49 * MiB),
                               str(partitioned_disk)], capture_output=True, text=True).stdout
        assert parts[3]["filesystem"]["uuid"] == uuid.strip()
    used = parts[3]["filesystem"]["used"]
    assert 12 * MiB < used < parts[3]["filesystem"]["size"]


def test_cat_follows_links_inside_the_disk(partitioned_disk: Path) -> None:
    assert b"".join(imgbridge.read_file(partitioned_disk, "/fast-link")) == b"imgbridge\n"
    assert b"".join(imgbridge.read_file(partitioned_disk, "/hostname-hardlink")) \
        == b"imgbridge\n"


def test_extract_from_a_disk_equals_the_tree(partitioned_disk: Path, rich_tree: Path,
                                             tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = imgbridge.extract(partitioned_disk, out, sync=False)
    assert not report.refused
    # A socket is not a file one can make by extracting (the report lists it).
    want = [_facts(e, seconds=True) for e in read_host_tree(rich_tree)
            if e.path and e.type is not EntryType.SOCKET]
    got = [_facts(e, seconds=True) for e in read_host_tree(out)
           if e.path and e.path != "lost+found"]
    if is_root():
        assert got == want
    else:  # owners and devices cannot be made: compare the rest
        assert [g[:3] for g in got] == [w[:3] for w in want if w[1] not in
                                        (EntryType.CHAR, EntryType.BLOCK)]


def test_diff_between_a_disk_and_a_container_image(partitioned_disk: Path, tmp_path: Path,
                                                   rich_tree: Path) -> None:
    require_tool("qemu-img")
    qcow2 = tmp_path / "disk.qcow2"
    run_tool("qemu-img", "convert", "-f", "raw", "-O", "qcow2", partitioned_disk, qcow2)
    assert imgbridge.diff(partitioned_disk, qcow2, format_a="raw") == []
    changes = imgbridge.diff(partitioned_disk, partitioned_disk, format_a="raw",
                             format_b="raw", partition_b=2)
    assert any(c.kind == "D" and c.path == "etc/hostname" for c in changes)


def test_fixture_disk_cli(workdir: Path, cli) -> None:  # type: ignore[no-untyped-def]
    disk = FIXTURES / "small-gpt.qcow2"
    result = cli("inspect", disk)
    assert result.code == 0, result.err
    assert "ext4, label 'root'" in result.out and "vfat, label 'ESP'" in result.out
    result = cli("cat", disk, "/usr/bin/hello")
    assert result.out == "hello from the disk fixture\n"
    result = cli("cat", "-P", "1", disk, "/HELLO.TXT")
    assert result.out == "hello from the disk fixture\n", result.err
    iso = FIXTURES / "small.iso"
    result = cli("ls", "-l", iso, "/usr/bin")
    assert result.code == 0, result.err
    assert "/usr/bin/hello -> ../../etc/hello" in result.out


def test_bad_partition_is_one_line(workdir: Path) -> None:
    proc = run_cli_process("ls", FIXTURES / "small-gpt.qcow2", "-P", "9")
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and "no partition 9" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---- building filesystems with convert -O ------------------------------------------------


def test_convert_folder_to_ext4_passes_e2fsck(rich_tree: Path, tmp_path: Path) -> None:
    require_tool("e2fsck")
    out = tmp_path / "tree.ext4"
    imgbridge.convert(rich_tree, out, output_format="ext4", sync=False)
    check = run_tool("e2fsck", "-fn", out, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    got = [_facts(e, seconds=False) for e in imgbridge.list_files(out, recursive=True)
           if e.path != "lost+found"]
    want = [_facts(e, seconds=False) for e in read_host_tree(rich_tree) if e.path]
    assert got == want


def test_convert_container_image_to_iso_and_fat(tmp_path: Path) -> None:
    require_tool("isoinfo")
    iso = tmp_path / "image.iso"
    imgbridge.convert(f"oci:{FIXTURES / 'small-oci'}:latest", iso, sync=False)
    listing = run_tool("isoinfo", "-R", "-l", "-i", iso).stdout
    assert "hello" in listing and "tool-again" in listing
    assert b"".join(imgbridge.read_file(iso, "/etc/motd")) == b"added in layer 1\n"
    require_tool("fsck.fat")
    fat = tmp_path / "image.fat"
    imgbridge.convert(FIXTURES / "small.iso", fat, output_format="vfat",
                      options={"skip_unsupported": "on"}, sync=False)
    check = run_tool("fsck.fat", "-n", fat, check=False)
    assert check.returncode == 0, check.stdout


def test_convert_tar_and_disk_to_ext4(tmp_path: Path) -> None:
    require_tool("e2fsck")
    tar = tmp_path / "rootfs.tar"
    imgbridge.extract(f"oci:{FIXTURES / 'small-oci'}:latest", tar, sync=False)
    from_tar = tmp_path / "from-tar.ext4"
    imgbridge.convert(tar, from_tar, output_format="ext4", sync=False)
    assert run_tool("e2fsck", "-fn", from_tar, check=False).returncode == 0
    changes = imgbridge.diff(f"oci:{FIXTURES / 'small-oci'}:latest", from_tar)
    assert [c.path for c in changes if c.path != "lost+found"] == []
    from_disk = tmp_path / "from-disk.ext4"
    imgbridge.convert(FIXTURES / "small-gpt.qcow2", from_disk, output_format="ext4",
                      sync=False)
    assert [c.path for c in imgbridge.diff(FIXTURES / "small-gpt.qcow2", from_disk)] == []


def test_hostile_trees_inside_a_disk_give_one_line(tmp_path: Path) -> None:
    """A symlink loop and an escape attempt inside an ext4 disk: cat refuses the loop in one
    line, and an absolute link is followed inside the disk, never on the host."""
    tree = tmp_path / "tree"
    tree.mkdir()
    os.symlink("b", tree / "a")
    os.symlink("a", tree / "b")
    os.symlink("/etc/passwd", tree / "passwd-link")
    (tree / "etc").mkdir()
    (tree / "etc" / "passwd").write_bytes(b"root:x:0:0:inside the disk\n")
    disk = tmp_path / "loop.ext4"
    imgbridge.convert(tree, disk, output_format="ext4", sync=False)
    proc = run_cli_process("cat", disk, "/a")
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1
    assert "too many levels of symbolic links" in proc.stderr
    assert b"".join(imgbridge.read_file(disk, "/passwd-link")) == b"root:x:0:0:inside the disk\n"


def test_convert_errors_are_one_line(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "big").write_bytes(os.urandom(3 * MiB))
    proc = run_cli_process("convert", tree, tmp_path / "small.ext4", "-o", "size=1M")
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1, proc.stderr
    assert "needs at least" in proc.stderr
    assert not list(tmp_path.glob("*.ext4")) and not list(tmp_path.glob(".*.part"))
    proc = run_cli_process("convert", "-P", "1", FIXTURES / "small.raw", tmp_path / "x.iso",
                           "-f", "raw")
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1, proc.stderr
    assert "no partition table" in proc.stderr
    proc = run_cli_process("convert", "-P", "1", FIXTURES / "small.qcow2", tmp_path / "x.qcow2")
    assert proc.returncode != 0 and "--partition applies when the output is a filesystem" \
        in proc.stderr
