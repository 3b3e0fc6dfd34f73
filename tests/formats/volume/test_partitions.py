"""Partition tables: MBR and GPT made by sfdisk and fdisk (read raw and through qcow2; 512- and
4096-byte sectors; logical partitions), damaged and hostile tables, tables written by us
checked by sgdisk, sfdisk and fdisk (and byte for byte against what sfdisk/fdisk write), the
type-name table against sfdisk and systemd, and the choice of the root partition."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import uuid
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from helpers import is_root, make_sparse_file, require_tool, run_tool
from imgbridge.formats.volume._structs import DPS_ARCH_TYPES, DPS_ROOT_TYPES, GPT_TYPE_NAMES
from imgbridge.formats.volume.gpt import write_gpt
from imgbridge.formats.volume.mbr import write_mbr
from imgbridge.formats.volume.table import (
    NewPartition,
    Partition,
    PartitionTable,
    choose_root_partition,
    dps_arch,
    is_root_type,
    partition_source,
    read_partitions,
)

import imgbridge
from imgbridge.errors import InvalidImageError, InvalidInputError

MiB = 1 << 20
DISK_SIZE = 64 * MiB
ESP = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
LINUX_DATA = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")
ROOT_X86_64 = uuid.UUID("4f68bce3-e8cd-4db1-96e7-fbcaf984b709")

MBR_SCRIPT = "label: dos\n,4M,83,*\n,4M,c\n,,5\n,8M,83\n,,82\n"
GPT_SCRIPT = (
    "label: gpt\n"
    'size=2M, type=U, name="EFI system"\n'
    f'size=16M, type={ROOT_X86_64}, name="root"\n'
    'type=L, name="data ä"\n'
)


def _tool(name: str) -> str:
    """util-linux and gdisk live in /usr/sbin, which a plain user's PATH may lack."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    return path or require_tool(name)


def _sfdisk_disk(path: Path, script: str) -> Path:
    make_sparse_file(path, DISK_SIZE, [])
    subprocess.run([_tool("sfdisk"), "-q", str(path)], input=script, text=True, check=True,
                   capture_output=True)
    return path


def _sfdisk_json(path: Path) -> dict[str, Any]:
    table: dict[str, Any] = json.loads(run_tool(_tool("sfdisk"), "--json", path).stdout)
    return table["partitiontable"]  # type: ignore[no-any-return]


def _read(path: Path, fmt: str) -> PartitionTable | None:
    with imgbridge.open_disk(path, fmt) as disk:
        return read_partitions(disk)


def _as_qcow2(raw: Path) -> Path:
    out = raw.with_suffix(".qcow2")
    run_tool("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, out)
    return out


def _assert_matches_sfdisk(table: PartitionTable, expected: dict[str, Any]) -> None:
    sector = expected["sectorsize"]
    assert len(table.partitions) == len(expected["partitions"])
    for ours, theirs in zip(table.partitions, expected["partitions"], strict=True):
        assert theirs["node"].endswith(str(ours.number))
        assert ours.start == theirs["start"] * sector
        assert ours.size == theirs["size"] * sector
        if table.kind == "gpt":
            assert str(ours.type).upper() == theirs["type"]
            assert str(ours.uuid).upper() == theirs["uuid"]
            assert ours.name == theirs.get("name", "")
        else:
            assert ours.type == int(theirs["type"], 16)
            assert ours.bootable == theirs.get("bootable", False)
    assert table.disk_id == expected["id"]


@pytest.fixture
def mbr_disk(tmp_path: Path) -> Path:
    return _sfdisk_disk(tmp_path / "mbr.img", MBR_SCRIPT)


@pytest.fixture
def gpt_disk(tmp_path: Path) -> Path:
    return _sfdisk_disk(tmp_path / "gpt.img", GPT_SCRIPT)


# ---- reading what sfdisk wrote ---------------------------------------------------------------

@pytest.mark.parametrize("container", ["raw", "qcow2"])
def test_mbr_with_logical_partitions(mbr_disk: Path, container: str) -> None:
    path = mbr_disk if container == "raw" else _as_qcow2(mbr_disk)
    table = _read(path, container)
    assert table is not None and table.kind == "mbr"
    _assert_matches_sfdisk(table, _sfdisk_json(mbr_disk))
    assert [p.number for p in table.partitions] == [1, 2, 3, 5, 6]
    assert [p.container for p in table.partitions] == [False, False, True, False, False]
    assert table.partitions[4].type_name == "Linux swap"


@pytest.mark.parametrize("container", ["raw", "qcow2"])
def test_gpt_with_names(gpt_disk: Path, container: str) -> None:
    path = gpt_disk if container == "raw" else _as_qcow2(gpt_disk)
    table = _read(path, container)
    assert table is not None and table.kind == "gpt" and not table.from_backup
    _assert_matches_sfdisk(table, _sfdisk_json(gpt_disk))
    esp, root, data = table.partitions
    assert (esp.type, esp.type_name, esp.name) == (ESP, "EFI System", "EFI system")
    assert root.type_name == "Linux root (x86-64)"
    assert (data.type_name, data.name) == ("Linux filesystem", "data ä")


def test_partition_source_reads_through_qcow2(gpt_disk: Path) -> None:
    table = _read(gpt_disk, "raw")
    assert table is not None
    root = table.partitions[1]
    with open(gpt_disk, "r+b") as f:
        f.seek(root.start + 4096)
        f.write(b"inside root")
    qcow2 = _as_qcow2(gpt_disk)
    with imgbridge.open_disk(qcow2, "qcow2") as disk:
        read_back = read_partitions(disk)
        assert read_back is not None
        part = next(p for p in read_back.partitions if p.number == 2)
        src = partition_source(disk, part)
        assert src.size == root.size
        assert src.read_at(4096, 11) == b"inside root"
        runs = list(src.runs())
        assert runs[0].offset == 0 and sum(r.length for r in runs) == root.size
        assert any(r.data for r in runs) and not all(r.data for r in runs)


def test_inspect_reports_partitions(gpt_disk: Path, mbr_disk: Path, cli: Any) -> None:
    info = imgbridge.inspect(_as_qcow2(gpt_disk))
    table = info["partitions"]
    assert table["type"] == "gpt" and table["uuid"] == _sfdisk_json(gpt_disk)["id"]
    assert [p["name"] for p in table["partitions"]] == ["EFI system", "root", "data ä"]
    assert table["partitions"][0]["type-name"] == "EFI System"
    mbr = imgbridge.inspect(mbr_disk, "raw")["partitions"]
    assert mbr["type"] == "mbr" and mbr["label-id"] == _sfdisk_json(mbr_disk)["id"]
    assert [p["number"] for p in mbr["partitions"]] == [1, 2, 3, 5, 6]
    result = cli("inspect", "-f", "raw", gpt_disk)
    assert result.code == 0
    assert "partition table: gpt" in result.out and "'EFI system'" in result.out


def test_inspect_without_a_table(tmp_path: Path) -> None:
    blank = make_sparse_file(tmp_path / "blank.img", 4 * MiB, [])
    info = imgbridge.inspect(blank, "raw")
    assert "partitions" not in info and "partition-table-error" not in info


# ---- damaged and hostile tables --------------------------------------------------------------

def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _header(path: Path, lba: int) -> bytearray:
    with open(path, "rb") as f:
        f.seek(lba * 512)
        return bytearray(f.read(512))


def _refresh_header_crc(head: bytearray) -> bytes:
    head[16:20] = bytes(4)
    head[16:20] = struct.pack("<I", zlib.crc32(bytes(head[:92])))
    return bytes(head)


def test_damaged_primary_gpt_falls_back_to_backup(gpt_disk: Path) -> None:
    expected = _sfdisk_json(gpt_disk)
    _patch(gpt_disk, 512 + 60, b"\xff\xff")  # inside the disk GUID: the header CRC fails
    with pytest.warns(UserWarning, match="primary GPT is damaged"):
        table = _read(gpt_disk, "raw")
    assert table is not None and table.from_backup
    _assert_matches_sfdisk(table, expected)
    info = imgbridge.inspect(gpt_disk, "raw")
    assert info["partitions"]["from-backup"] is True
    assert "damaged" in info["partition-table-warnings"][0]


def test_both_gpt_copies_damaged(gpt_disk: Path) -> None:
    _patch(gpt_disk, 512, b"NOT PART")
    _patch(gpt_disk, DISK_SIZE - 512, b"NOT PART")
    with pytest.raises(InvalidImageError, match="both GPT copies"):
        _read(gpt_disk, "raw")
    info = imgbridge.inspect(gpt_disk, "raw")
    assert "partitions" not in info and "both GPT copies" in info["partition-table-error"]


def test_damaged_entry_array_falls_back(gpt_disk: Path) -> None:
    _patch(gpt_disk, 2 * 512 + 56, b"X\x00")  # first partition's name: array CRC fails
    with pytest.warns(UserWarning, match="entry array CRC32"):
        table = _read(gpt_disk, "raw")
    assert table is not None and table.partitions[0].name == "EFI system"


def test_ebr_loop_is_refused(mbr_disk: Path) -> None:
    table = _read(mbr_disk, "raw")
    assert table is not None
    extended = table.partitions[2]
    second_ebr = table.partitions[4].start - 2048 * 512  # sfdisk leaves 1 MiB before it
    # The second EBR's link entry points back at the first EBR (extended start + 0).
    link = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x05, b"\0\0\0", 0, 2048)
    _patch(mbr_disk, second_ebr + 446 + 16, link)
    assert _refused(mbr_disk, "loops back")
    assert extended.container


def _refused(path: Path, message: str) -> bool:
    with pytest.raises(InvalidImageError, match=message):
        _read(path, "raw")
    info = imgbridge.inspect(path, "raw")
    return message in info["partition-table-error"]


@pytest.mark.parametrize(("field", "value", "message"), [
    (80, 1 << 31, "exceed the 1 MiB limit"),   # num_entries = 2**31
    (84, 100, "not 128"),                        # entry size
    (84, 0, "not 128"),
])
def test_absurd_gpt_arrays_are_refused(gpt_disk: Path, field: int, value: int,
                                       message: str) -> None:
    head = _header(gpt_disk, 1)
    head[field:field + 4] = struct.pack("<I", value)
    _patch(gpt_disk, 512, _refresh_header_crc(head))  # a valid CRC: hostile, not damaged
    with pytest.raises(InvalidImageError, match=message):
        _read(gpt_disk, "raw")


def test_gpt_partition_past_the_end_is_refused(gpt_disk: Path) -> None:
    with open(gpt_disk, "rb") as f:
        f.seek(1024)
        array = bytearray(f.read(16384))
    array[128 * 2 + 40:128 * 2 + 48] = struct.pack("<Q", DISK_SIZE // 512 + 100)
    _patch(gpt_disk, 1024, bytes(array))
    head = _header(gpt_disk, 1)
    head[88:92] = struct.pack("<I", zlib.crc32(bytes(array)))
    _patch(gpt_disk, 512, _refresh_header_crc(head))
    with pytest.raises(InvalidImageError, match="past the end"):
        _read(gpt_disk, "raw")


def test_mbr_partition_past_the_end_is_refused(mbr_disk: Path) -> None:
    _patch(mbr_disk, 446 + 16 + 12, struct.pack("<I", 0xFFFFFF00))  # partition 2's sectors
    assert _refused(mbr_disk, "past the end")


# ---- writing ---------------------------------------------------------------------------------

def _write(path: Path, size: int, pieces: list[tuple[int, bytes]]) -> Path:
    make_sparse_file(path, size, pieces)
    return path


def test_written_gpt_passes_sgdisk_and_sfdisk(tmp_path: Path) -> None:
    size = 100 * MiB + 512 * 7  # not a multiple of 1 MiB: the backup sits at the true end
    guid = uuid.UUID("11111111-2222-3333-4444-555555555555")
    parts = [
        NewPartition(8 * MiB, ESP, name="EFI System Partition",
                     uuid=uuid.UUID("aaaaaaaa-0000-4000-8000-000000000001")),
        NewPartition(1 * MiB, uuid.UUID("21686148-6449-6e6f-744e-656564454649"),
                     name="bios"),
        NewPartition(None, ROOT_X86_64, name="root", attributes=1 << 59),
    ]
    disk = _write(tmp_path / "ours-gpt.img", size, write_gpt(size, parts, disk_guid=guid))
    verify = run_tool(_tool("sgdisk"), "-v", disk)
    assert "No problems found" in verify.stdout, verify.stdout
    run_tool(_tool("sfdisk"), "--verify", disk)
    theirs = _sfdisk_json(disk)
    assert theirs["id"] == str(guid).upper()
    starts = [p["start"] * 512 for p in theirs["partitions"]]
    assert starts == [1 * MiB, 9 * MiB, 10 * MiB]
    assert [p.get("name") for p in theirs["partitions"]] == ["EFI System Partition", "bios",
                                                             "root"]
    table = _read(disk, "raw")
    assert table is not None
    _assert_matches_sfdisk(table, theirs)
    assert table.partitions[2].attributes == 1 << 59
    assert table.partitions[2].end == (size // 512 - 33) * 512


def test_written_mbr_passes_sfdisk(tmp_path: Path) -> None:
    size = 32 * MiB
    parts = [NewPartition(4 * MiB, 0xEF, bootable=True), NewPartition(None, 0x83)]
    disk = _write(tmp_path / "ours-mbr.img", size, write_mbr(size, parts, disk_id=0x1234ABCD))
    run_tool(_tool("sfdisk"), "--verify", disk)
    theirs = _sfdisk_json(disk)
    assert theirs["id"] == "0x1234abcd"
    got = [(p["start"], p["size"], p["type"], p.get("bootable", False))
           for p in theirs["partitions"]]
    assert got == [(2048, 8192, "ef", True), (10240, 65536 - 10240, "83", False)]
    table = _read(disk, "raw")
    assert table is not None
    _assert_matches_sfdisk(table, theirs)


def test_writers_refuse_bad_layouts() -> None:
    with pytest.raises(InvalidInputError, match="at most 4"):
        write_mbr(64 * MiB, [NewPartition(MiB, 0x83)] * 5, extended=False)
    with pytest.raises(InvalidInputError, match="at least 4"):
        write_mbr(64 * MiB, [NewPartition(MiB, 0x83)] * 3, extended=True)
    with pytest.raises(InvalidInputError, match="EBR 1 MiB before it"):
        write_mbr(64 * MiB, [NewPartition(MiB, 0x83)] * 4 + [NewPartition(MiB, 0x83,
                                                                          start=6 * MiB)])
    with pytest.raises(InvalidInputError, match="not written by write_mbr"):
        write_mbr(64 * MiB, [NewPartition(MiB, 0x83)] * 4 + [NewPartition(MiB, 0x05)])
    with pytest.raises(InvalidInputError, match="4096-byte sector"):
        write_mbr(64 * MiB, [NewPartition(MiB + 512, 0x83)], sector_size=4096)
    with pytest.raises(InvalidInputError, match="sector size 1024"):
        write_gpt(64 * MiB, [NewPartition(MiB, LINUX_DATA)], sector_size=1024)
    with pytest.raises(InvalidInputError, match="does not fit"):
        write_gpt(8 * MiB, [NewPartition(8 * MiB, LINUX_DATA)])
    with pytest.raises(InvalidInputError, match="multiple of 1 MiB"):
        write_gpt(8 * MiB, [NewPartition(MiB, LINUX_DATA, start=MiB + 512)])
    with pytest.raises(InvalidInputError, match="36"):
        write_gpt(8 * MiB, [NewPartition(MiB, LINUX_DATA, name="x" * 37)])


# ---- 4096-byte logical sectors -----------------------------------------------------------------
# sfdisk 2.38 has no --sector-size and sgdisk takes the sector size from the device, so on an
# image file fdisk -b 4096 is the independent judge (it writes, lists and verifies: its "v"
# command). As root, a loop device with 4096-byte sectors also lets sfdisk and sgdisk judge.

FDISK_4K_GPT = (  # fdisk commands: a GPT of three partitions, names set in expert mode
    "g\nx\ni\n11111111-2222-3333-4444-555555555555\nr\n"
    "n\n\n\n+8M\nt\nC12A7328-F81F-11D2-BA4B-00A0C93EC93B\n"
    f"n\n\n\n+16M\nt\n2\n{ROOT_X86_64}\n"
    "n\n\n\n\n"
    "x\nn\n1\nEFI system\nn\n3\nroot ä\nr\nw\n"
)
GPT_COLUMNS = ("Device", "Start", "Sectors", "Type-UUID", "UUID", "Name")
MBR_COLUMNS = ("Device", "Start", "Sectors", "Id", "Boot")


def _fdisk(path: Path, sector_size: int, commands: str) -> str:
    done = subprocess.run([_tool("fdisk"), "-b", str(sector_size), str(path)], input=commands,
                          text=True, capture_output=True, check=True)
    return done.stdout


def _fdisk_list(path: Path, sector_size: int,
                columns: tuple[str, ...]) -> tuple[str, list[list[str]]]:
    """(disk identifier, one row per partition) from ``fdisk -l -o``; the last column may
    hold spaces (Name) or be empty (Boot)."""
    out = run_tool(_tool("fdisk"), "-b", str(sector_size), "-l", "-o", ",".join(columns),
                   path).stdout
    lines = out.splitlines()
    disk_id = next(line.split(": ", 1)[1] for line in lines
                   if line.startswith("Disk identifier"))
    first = next(i for i, line in enumerate(lines) if line.split()[:1] == [columns[0]]) + 1
    rows = [line.split(None, len(columns) - 1) for line in lines[first:] if line.strip()]
    return disk_id, [row + [""] * (len(columns) - len(row)) for row in rows]


def _fdisk_verifies(path: Path, sector_size: int) -> None:
    out = _fdisk(path, sector_size, "v\nq\n")
    assert "No errors detected" in out, out


def _assert_matches_fdisk(table: PartitionTable, path: Path, sector_size: int) -> None:
    columns = GPT_COLUMNS if table.kind == "gpt" else MBR_COLUMNS
    disk_id, rows = _fdisk_list(path, sector_size, columns)
    assert table.sector_size == sector_size
    assert table.disk_id == disk_id
    assert len(table.partitions) == len(rows)
    for ours, row in zip(table.partitions, rows, strict=True):
        assert row[0].endswith(str(ours.number))
        assert (ours.start, ours.size) == (int(row[1]) * sector_size, int(row[2]) * sector_size)
        if table.kind == "gpt":
            assert (str(ours.type).upper(), str(ours.uuid).upper()) == (row[3], row[4])
            assert ours.name == row[5]
        else:
            assert (ours.type, ours.bootable) == (int(row[3], 16), row[4] == "*")


class _Loop4K:
    """A loop device with 4096-byte logical sectors over an image (root only), so that sfdisk
    and sgdisk see a 4Kn disk."""

    def __init__(self, path: Path) -> None:
        if not is_root():
            pytest.skip("a loop device with 4096-byte sectors needs root")
        done = subprocess.run([_tool("losetup"), "--find", "--show", "--sector-size", "4096",
                               str(path)], capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"no loop device here: {done.stderr.strip()}")
        self.device = done.stdout.strip()

    def __enter__(self) -> str:
        return self.device

    def __exit__(self, *exc: object) -> None:
        subprocess.run([_tool("losetup"), "--detach", self.device], check=True)


@pytest.mark.parametrize("container", ["raw", "qcow2"])
def test_4k_gpt_made_by_fdisk(tmp_path: Path, container: str) -> None:
    disk = make_sparse_file(tmp_path / "gpt4k.img", DISK_SIZE, [])
    _fdisk(disk, 4096, FDISK_4K_GPT)
    table = _read(disk if container == "raw" else _as_qcow2(disk), container)
    assert table is not None and table.kind == "gpt" and table.sector_size == 4096
    _assert_matches_fdisk(table, disk, 4096)
    assert [p.name for p in table.partitions] == ["EFI system", "", "root ä"]
    assert table.partitions[1].type_name == "Linux root (x86-64)"
    assert table.first_usable == MiB  # fdisk reserves up to the first 1 MiB boundary
    # The backup: header in the last sector, its 16 KiB array in the 4 sectors before it.
    assert table.last_usable == (DISK_SIZE // 4096 - 6) * 4096
    assert read_partitions_of(disk, sector_size=4096) == table


def read_partitions_of(path: Path, sector_size: int | None = None) -> PartitionTable | None:
    with imgbridge.open_disk(path, "raw") as disk:
        return read_partitions(disk, sector_size)


def test_4k_gpt_falls_back_to_its_backup(tmp_path: Path) -> None:
    disk = make_sparse_file(tmp_path / "gpt4k.img", DISK_SIZE, [])
    _fdisk(disk, 4096, FDISK_4K_GPT)
    _patch(disk, 4096, b"NOT PART")
    with pytest.warns(UserWarning, match="primary GPT is damaged"):
        table = _read(disk, "raw")
    assert table is not None and table.from_backup and table.sector_size == 4096
    _assert_matches_fdisk(table, disk, 4096)
    _patch(disk, DISK_SIZE - 4096, b"NOT PART")
    with pytest.raises(InvalidImageError, match=r"both GPT copies are damaged \(no header"):
        _read(disk, "raw")


def _header_4k(path: Path) -> bytearray:
    with open(path, "rb") as f:
        f.seek(4096)
        return bytearray(f.read(4096))


@pytest.mark.parametrize(("field", "value", "message"), [
    (80, 1 << 31, "exceed the 1 MiB limit"),
    (84, 96, "not 128"),
    (72, DISK_SIZE // 4096 - 2, f"array at LBA {DISK_SIZE // 4096 - 2} lies past the end"),
    (48, DISK_SIZE // 512, "do not fit"),  # last usable LBA counted in 512-byte sectors
])
def test_hostile_4k_gpt_headers_are_refused(tmp_path: Path, field: int, value: int,
                                            message: str) -> None:
    disk = make_sparse_file(tmp_path / "gpt4k.img", DISK_SIZE, [])
    _fdisk(disk, 4096, FDISK_4K_GPT)
    head = _header_4k(disk)
    head[field:field + (4 if field >= 80 else 8)] = struct.pack(
        "<I" if field >= 80 else "<Q", value)
    _patch(disk, 4096, _refresh_header_crc(head))
    assert _refused(disk, message)


def test_4k_gpt_partition_past_the_end_is_refused(tmp_path: Path) -> None:
    disk = make_sparse_file(tmp_path / "gpt4k.img", DISK_SIZE, [])
    _fdisk(disk, 4096, FDISK_4K_GPT)
    with open(disk, "rb") as f:
        f.seek(2 * 4096)
        array = bytearray(f.read(16384))
    # In 512-byte sectors this LBA would fit the disk; in 4096-byte sectors it does not.
    array[128 * 2 + 40:128 * 2 + 48] = struct.pack("<Q", DISK_SIZE // 4096 + 1)
    _patch(disk, 2 * 4096, bytes(array))
    head = _header_4k(disk)
    head[88:92] = struct.pack("<I", zlib.crc32(bytes(array)))
    _patch(disk, 4096, _refresh_header_crc(head))
    assert _refused(disk, "past the end")


def test_written_4k_gpt_passes_fdisk_sfdisk_and_sgdisk(tmp_path: Path) -> None:
    size = 100 * MiB + 4096 * 7
    guid = uuid.UUID("11111111-2222-3333-4444-555555555555")
    parts = [NewPartition(8 * MiB, ESP, name="EFI System Partition"),
             NewPartition(None, ROOT_X86_64, name="root", attributes=1 << 59)]
    pieces = write_gpt(size, parts, disk_guid=guid, sector_size=4096)
    disk = _write(tmp_path / "ours-gpt4k.img", size, pieces)
    _fdisk_verifies(disk, 4096)
    table = _read(disk, "raw")
    assert table is not None and table.sector_size == 4096
    _assert_matches_fdisk(table, disk, 4096)
    assert [p.start for p in table.partitions] == [1 * MiB, 9 * MiB]
    assert table.partitions[1].end == (size // 4096 - 5) * 4096
    with _Loop4K(disk) as device:
        verify = run_tool(_tool("sgdisk"), "-v", device)
        assert "No problems found" in verify.stdout, verify.stdout
        run_tool(_tool("sfdisk"), "--verify", device)
        theirs = _sfdisk_json(Path(device))
        assert theirs["sectorsize"] == 4096 and theirs["firstlba"] == 6
        _assert_matches_sfdisk(table, theirs)


# ---- MBR logical partitions ----------------------------------------------------------------

#: One layout three ways: sfdisk's script, fdisk's commands, our NewPartitions.
SFDISK_LOGICALS = ("label: dos\nlabel-id: 0x12345678\n"
                   ",4M,83,*\n,4M,c\n,4M,83\n,,E\n,4M,83\n,4M,82,*\n,,83\n")
FDISK_LOGICALS = ("o\nx\ni\n0x12345678\nr\n"
                  "n\np\n1\n\n+4M\na\nn\np\n2\n\n+4M\nt\n2\nc\nn\np\n3\n\n+4M\n"
                  "n\ne\n\n\nn\n\n+4M\nn\n\n+4M\nt\n6\n82\na\n6\nn\n\n\nw\n")
OUR_LOGICALS = [NewPartition(4 * MiB, 0x83, bootable=True), NewPartition(4 * MiB, 0x0C),
                NewPartition(4 * MiB, 0x83), NewPartition(4 * MiB, 0x83),
                NewPartition(4 * MiB, 0x82, bootable=True), NewPartition(None, 0x83)]


def _same_bytes(a: Path, b: Path) -> None:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        offset = 0
        while chunk := fa.read(MiB):
            assert chunk == fb.read(MiB), f"{a.name} and {b.name} differ near offset {offset}"
            offset += len(chunk)
        assert not fb.read(1)


def test_written_logical_partitions_are_what_sfdisk_writes(tmp_path: Path) -> None:
    theirs_img = _sfdisk_disk(tmp_path / "sfdisk.img", SFDISK_LOGICALS)
    pieces = write_mbr(DISK_SIZE, OUR_LOGICALS, disk_id=0x12345678)
    ours = _write(tmp_path / "ours.img", DISK_SIZE, pieces)
    run_tool(_tool("sfdisk"), "--verify", ours)
    theirs = _sfdisk_json(ours)
    got = [(p["start"], p["size"], p["type"], p.get("bootable", False))
           for p in theirs["partitions"]]
    assert got == [(2048, 8192, "83", True), (10240, 8192, "c", False),
                   (18432, 8192, "83", False), (26624, 104448, "5", False),
                   (28672, 8192, "83", False), (38912, 8192, "82", True),
                   (49152, 81920, "83", False)]
    _assert_matches_fdisk(_read_table(ours), ours, 512)
    _assert_matches_sfdisk(_read_table(ours), theirs)
    # Every byte, CHS fields and EBR links included, is what sfdisk wrote for the same script.
    _same_bytes(ours, theirs_img)
    assert len(pieces) == 4  # sector 0 and three EBRs


def _read_table(path: Path, sector_size: int | None = None) -> PartitionTable:
    table = read_partitions_of(path, sector_size)
    assert table is not None
    return table


def test_written_4k_logical_partitions_are_what_fdisk_writes(tmp_path: Path) -> None:
    theirs = make_sparse_file(tmp_path / "fdisk4k.img", DISK_SIZE, [])
    _fdisk(theirs, 4096, FDISK_LOGICALS)
    ours = _write(tmp_path / "ours4k.img", DISK_SIZE,
                  write_mbr(DISK_SIZE, OUR_LOGICALS, disk_id=0x12345678, sector_size=4096))
    _fdisk_verifies(ours, 4096)
    _same_bytes(ours, theirs)
    # The EBR chain only makes sense with 4 KiB sectors: found without being told.
    table = _read_table(theirs)
    assert table.sector_size == 4096 and _read_table(theirs, 4096) == table
    _assert_matches_fdisk(table, theirs, 4096)
    assert [p.number for p in table.partitions] == [1, 2, 3, 4, 5, 6, 7]
    with _Loop4K(ours) as device:
        run_tool(_tool("sfdisk"), "--verify", device)
        _assert_matches_sfdisk(table, _sfdisk_json(Path(device)))


def test_4k_mbr_without_logicals_needs_the_sector_size(tmp_path: Path) -> None:
    """Nothing in a plain MBR tells 512 from 4096: it is read as 512 unless told."""
    parts = [NewPartition(4 * MiB, 0xEF, bootable=True), NewPartition(None, 0x83)]
    disk = _write(tmp_path / "mbr4k.img", DISK_SIZE,
                  write_mbr(DISK_SIZE, parts, disk_id=0xCAFE, sector_size=4096))
    _fdisk_verifies(disk, 4096)
    table = _read_table(disk, 4096)
    _assert_matches_fdisk(table, disk, 4096)
    assert [(p.start, p.size) for p in table.partitions] == [
        (MiB, 4 * MiB), (5 * MiB, DISK_SIZE - 5 * MiB)]
    assert _read_table(disk).sector_size == 512
    with imgbridge.open_disk(disk, "raw") as opened:
        opened.logical_sector_size = 4096  # type: ignore[attr-defined]  # as a VHDX says it
        assert read_partitions(opened) == table
    with pytest.raises(InvalidInputError, match="sector size 2048"):
        read_partitions_of(disk, 2048)


def test_many_logical_partitions(tmp_path: Path) -> None:
    size = 128 * MiB
    parts = [NewPartition(2 * MiB, 0x83)] * 3 + [NewPartition(MiB + 512 * i, 0x83)
                                                 for i in range(1, 41)]
    disk = _write(tmp_path / "many.img", size, write_mbr(size, parts, disk_id=1))
    run_tool(_tool("sfdisk"), "--verify", disk)
    theirs = _sfdisk_json(disk)
    assert len(theirs["partitions"]) == 44
    table = _read_table(disk)
    _assert_matches_sfdisk(table, theirs)
    assert table.partitions[-1].number == 44 and table.partitions[-1].size == MiB + 512 * 40


def _ebr_offsets(path: Path) -> list[int]:
    table = _read_table(path)
    return [p.start - MiB for p in table.partitions if p.number >= 5]


def _set_link(path: Path, ebr: int, relative_lba: int, sectors: int = 2048) -> None:
    link = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x05, b"\0\0\0", relative_lba, sectors)
    _patch(path, ebr + 446 + 16, link)


def test_ebr_outside_the_extended_partition_is_refused(mbr_disk: Path) -> None:
    first, _ = _ebr_offsets(mbr_disk)
    _set_link(mbr_disk, first, DISK_SIZE // 512)  # next EBR far past the extended partition
    assert _refused(mbr_disk, "outside the extended partition")


def test_ebr_without_signature_is_refused(mbr_disk: Path) -> None:
    _, second = _ebr_offsets(mbr_disk)
    _patch(mbr_disk, second + 510, b"\0\0")
    assert _refused(mbr_disk, "no 0x55AA signature")


def test_logical_partition_past_the_end_is_refused(mbr_disk: Path) -> None:
    _, second = _ebr_offsets(mbr_disk)
    _patch(mbr_disk, second + 446 + 12, struct.pack("<I", 0x7FFFFFFF))
    assert _refused(mbr_disk, "past the end")


def test_endless_ebr_chain_is_refused(mbr_disk: Path) -> None:
    """300 EBRs on consecutive sectors, each linking to the next and none looping: the chain
    is cut at 256 links instead of being walked to the end."""
    table = _read_table(mbr_disk)
    extended = next(p for p in table.partitions if p.container)
    ext_lba = extended.start // 512
    with open(mbr_disk, "r+b") as f:
        for i in range(300):
            sector = bytearray(512)
            sector[446 + 16:446 + 32] = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x05,
                                                    b"\0\0\0", i + 1, 1)
            sector[510:512] = b"\x55\xaa"
            f.seek((ext_lba + i) * 512)
            f.write(sector)
    assert _refused(mbr_disk, "longer than 256 links")


# ---- partition type names ------------------------------------------------------------------

def test_type_names_are_sfdisks() -> None:
    listing = run_tool(_tool("sfdisk"), "--label", "gpt", "--list-types").stdout
    theirs = {}
    for line in listing.splitlines():
        guid, _, name = line.strip().partition(" ")
        try:
            theirs[uuid.UUID(guid)] = name.strip()
        except ValueError:
            continue
    checked = {guid: name for guid, name in GPT_TYPE_NAMES.items() if guid in theirs}
    assert checked == {guid: theirs[guid] for guid in checked}
    # util-linux 2.38 knows every DPS type but those of 5 newer architectures (30 GUIDs).
    assert len(checked) >= len(GPT_TYPE_NAMES) - 36 and len(checked) > 120


#: systemd's names for the DPS architectures (systemd-id128 show).
SYSTEMD_ARCH = {
    "Alpha": "alpha", "ARC": "arc", "ARM": "arm", "ARM-64": "arm64", "IA-64": "ia64",
    "LoongArch-64": "loongarch64", "M68K": "m68k", "MIPS-32 BE": "mips", "MIPS-64 BE": "mips64",
    "MIPS-32 LE": "mips-le", "MIPS-64 LE": "mips64-le", "HPPA/PARISC": "parisc", "PPC": "ppc",
    "PPC64": "ppc64", "PPC64LE": "ppc64-le", "RISC-V-32": "riscv32", "RISC-V-64": "riscv64",
    "S390": "s390", "S390X": "s390x", "SPARC64": "sparc64", "SH4": "sh4", "TILE-Gx": "tilegx",
    "x86": "x86", "x86-64": "x86-64",
}


def test_dps_types_are_systemds() -> None:
    """A second, independent source for the GUIDs (it also covers big-endian MIPS and
    PA-RISC, which sfdisk 2.38 lacks)."""
    listing = run_tool(require_tool("systemd-id128"), "show").stdout.split()
    theirs = {name: uuid.UUID(value) for name, value in zip(listing[::2], listing[1::2],
                                                            strict=True) if name != "NAME"}
    suffixes = ("", "-verity", "-verity-sig")
    checked = 0
    for arch, *guids in DPS_ARCH_TYPES:
        names = [f"{kind}-{SYSTEMD_ARCH[arch]}{suffix}" for suffix in suffixes
                 for kind in ("root", "usr")]
        for name, guid in zip(names, guids, strict=True):
            if name in theirs:
                assert theirs[name] == uuid.UUID(guid), name
                checked += 1
    assert checked >= 20 * 6
    for name in ("esp", "xbootldr", "swap", "home", "srv", "var", "tmp", "user-home",
                 "linux-generic"):
        assert theirs[name] in GPT_TYPE_NAMES, name


# ---- the root partition ------------------------------------------------------------------------

ROOT_ARM64 = uuid.UUID("b921b045-1df0-41c3-af44-4c6f280d3fae")


def _gpt_table(*parts: tuple[int, uuid.UUID | int] | tuple[int, uuid.UUID | int, int]
               ) -> PartitionTable:
    """Partitions numbered from 1, each (size in MiB, type[, attributes])."""
    table = PartitionTable("gpt", "X")
    start = MiB
    for number, (size_mib, type_, *attrs) in enumerate(parts, 1):
        table.partitions.append(Partition(number, start, size_mib * MiB, type_,
                                          attributes=attrs[0] if attrs else 0))
        start += size_mib * MiB
    return table


def _root_number(table: PartitionTable, fs_types: Mapping[int, str | None],
                 arch: str | None = None) -> int | None:
    chosen = choose_root_partition(table, fs_types, arch=arch)
    return None if chosen is None else chosen.number


def test_root_partition_by_dps_type(gpt_disk: Path) -> None:
    table = _read_table(gpt_disk)
    # The DPS type wins over a larger ext4 partition.
    chosen = choose_root_partition(table, {1: "vfat", 2: "ext4", 3: "ext4"}, arch="x86-64")
    assert chosen is not None and chosen.number == 2 and chosen.name == "root"
    # Even when the probes found nothing in it (LUKS, say): the type says where the root is.
    assert choose_root_partition(table, {1: "vfat", 3: "ext4"}, arch="x86-64") == chosen
    # Another architecture's root still counts when the host's is absent.
    assert choose_root_partition(table, {}, arch="ARM-64") == chosen
    assert is_root_type(ROOT_X86_64) and not is_root_type(LINUX_DATA) and not is_root_type(0x83)


def test_root_partition_prefers_the_host_architecture() -> None:
    table = _gpt_table((100, ROOT_X86_64), (50, ROOT_ARM64), (50, ROOT_ARM64))
    assert _root_number(table, {}, arch="ARM-64") == 2
    assert _root_number(table, {}, arch="x86-64") == 1
    assert _root_number(table, {}, arch="RISC-V-64") == 1
    host = dps_arch()
    if host in ("x86-64", "ARM-64"):  # the default is the host's architecture
        expected = 1 if host == "x86-64" else 2
        assert _root_number(table, {}) == expected
    no_auto = _gpt_table((100, ROOT_ARM64, 1 << 63), (50, ROOT_ARM64), (10, ROOT_X86_64))
    assert _root_number(no_auto, {}, arch="ARM-64") == 2


def test_root_partition_by_filesystem() -> None:
    table = _gpt_table((8, ESP), (20, LINUX_DATA), (30, LINUX_DATA), (500, LINUX_DATA))
    fs: dict[int, str | None] = {1: "vfat", 2: "ext4", 3: "ext3", 4: "vfat"}
    assert _root_number(table, fs, arch="x86-64") == 3  # the largest Linux filesystem
    fs = {1: "vfat", 2: "ext2", 3: None, 4: "iso9660"}
    assert _root_number(table, fs, arch="x86-64") == 2  # Linux beats a larger iso9660
    fs = {1: "vfat", 2: None, 3: None, 4: "iso9660"}
    assert _root_number(table, fs, arch="x86-64") == 4  # else the largest recognised
    assert choose_root_partition(table, {2: None}, arch="x86-64") is None
    same = _gpt_table((20, LINUX_DATA), (20, LINUX_DATA))
    assert _root_number(same, {1: "ext4", 2: "ext4"}) == 1


def test_root_partition_never_an_extended_container(mbr_disk: Path) -> None:
    table = _read_table(mbr_disk)
    # Even if a probe claimed a filesystem on the container (its first sector is an EBR).
    fs = {1: "ext4", 2: "vfat", 3: "ext4", 5: None, 6: None}
    assert _root_number(table, fs) == 1
    assert choose_root_partition(table, {3: "ext4"}) is None


def test_dps_arch_names() -> None:
    assert dps_arch("x86_64") == "x86-64" and dps_arch("AMD64") == "x86-64"
    assert dps_arch("aarch64") == "ARM-64" and dps_arch("arm64") == "ARM-64"
    assert dps_arch("armv7l") == "ARM" and dps_arch("i686") == "x86"
    assert dps_arch("mips", "big") == "MIPS-32 BE" and dps_arch("mips64", "little") == "MIPS-64 LE"
    assert dps_arch("ppc64le") == "PPC64LE" and dps_arch("riscv64") == "RISC-V-64"
    assert dps_arch("vax") is None
    assert all(arch in DPS_ROOT_TYPES for arch in SYSTEMD_ARCH)
