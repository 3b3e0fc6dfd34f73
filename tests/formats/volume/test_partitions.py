"""Partition tables: MBR and GPT made by sfdisk (read raw and through qcow2), damaged and
hostile tables, and tables written by us checked by sgdisk and sfdisk."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import uuid
import zlib
from pathlib import Path
from typing import Any

import pytest
from helpers import make_sparse_file, require_tool, run_tool
from imgbridge.formats.volume.gpt import write_gpt
from imgbridge.formats.volume.mbr import write_mbr
from imgbridge.formats.volume.table import (
    NewPartition,
    PartitionTable,
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
        write_mbr(64 * MiB, [NewPartition(MiB, 0x83)] * 5)
    with pytest.raises(InvalidInputError, match="does not fit"):
        write_gpt(8 * MiB, [NewPartition(8 * MiB, LINUX_DATA)])
    with pytest.raises(InvalidInputError, match="multiple of 1 MiB"):
        write_gpt(8 * MiB, [NewPartition(MiB, LINUX_DATA, start=MiB + 512)])
    with pytest.raises(InvalidInputError, match="36"):
        write_gpt(8 * MiB, [NewPartition(MiB, LINUX_DATA, name="x" * 37)])
