"""qcow2 check and repair against qemu-img: the same verdict and the same numbers as
``qemu-img check --output=json`` on images QEMU made, sound or broken on purpose, and repairs
that ``qemu-img check`` then finds clean and ``qemu-img compare`` finds faithful."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import CliResult, require_tool, run_tool
from imgbridge.formats.disk.qcow2 import _structs as S
from imgbridge.formats.disk.qcow2.check import _Codec

import imgbridge

pytestmark = pytest.mark.interop

Cli = Callable[..., CliResult]
MiB = 1 << 20

#: name -> (qemu-img create -o options, extra steps). Every image gets the same writes:
#: data, a zero write, data past a gap, so there are L2 tables, runs and holes.
KINDS: dict[str, tuple[str, str]] = {
    "v2": ("compat=0.10", ""),
    "v3": ("", ""),
    "v3-512": ("cluster_size=512", ""),
    "v2-512": ("compat=0.10,cluster_size=512", ""),
    "v3-2M": ("cluster_size=2M", ""),
    "refcount-1": ("refcount_bits=1", ""),
    "refcount-4": ("refcount_bits=4", ""),
    "refcount-64": ("refcount_bits=64", ""),
    "zlib": ("", "compress"),
    "zstd": ("compression_type=zstd", "compress"),
    "zlib-512": ("cluster_size=512", "compress"),
    "snapshot": ("", "snapshot"),
    "snapshot-v2": ("compat=0.10", "snapshot"),
    "bitmap": ("", "bitmap"),
    "extended-l2": ("extended_l2=on", "snapshot"),
    "data-file": ("data_file=data.raw", ""),
    "prealloc-metadata": ("preallocation=metadata", ""),
    "backing": ("", "backing"),
}


def qemu_img(*args: str | os.PathLike[str], cwd: Path | None = None
             ) -> subprocess.CompletedProcess[str]:
    """qemu-img, run in ``cwd``: QEMU finds an external data file named without a folder
    relative to its working directory, not to the image."""
    return subprocess.run([require_tool("qemu-img"), *map(os.fspath, args)],
                          capture_output=True, text=True, cwd=cwd)


def qemu_check(path: Path, *args: str) -> tuple[int, dict[str, Any]]:
    result = qemu_img("check", "--output=json", *args, path, cwd=path.parent)
    return result.returncode, json.loads(result.stdout) if result.stdout.strip() else {}


def qemu_compare(a: Path, b: Path) -> int:
    code: int = qemu_img("compare", a, b, cwd=b.parent).returncode
    return code


def our_check(cli: Cli, path: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    result = cli("check", "--json", *args, path)
    assert result.out.strip(), result.err
    return result.code, json.loads(result.out), result.err


def qemu_io(path: Path, *commands: str, fmt: str = "qcow2") -> None:
    args: list[str] = [require_tool("qemu-io"), "-f", fmt]
    for command in commands:
        args += ["-c", command]
    subprocess.run([*args, path.name], cwd=path.parent, check=True, capture_output=True)


def _make(folder: Path, kind: str) -> Path:
    options, extra = KINDS[kind]
    path = folder / f"{kind}.qcow2"
    if extra == "compress":
        plain = folder / f"{kind}-plain.qcow2"
        run_tool("qemu-img", "create", "-f", "qcow2", plain, "32M")
        qemu_io(plain, "write -P 1 0 1M", "write -P 2 5M 300k", "write -P 3 20M 64k")
        run_tool("qemu-img", "convert", "-c", "-O", "qcow2",
                 *(["-o", options] if options else []), plain, path)
        return path
    if extra == "backing":
        base = folder / "base.qcow2"
        run_tool("qemu-img", "create", "-f", "qcow2", base, "32M")
        qemu_io(base, "write -P 7 0 4M")
        run_tool("qemu-img", "create", "-f", "qcow2", "-b", base.name, "-F", "qcow2", path)
        qemu_io(path, "write -P 8 100k 10k", "write -P 9 3M 2M")
        return path
    # In the image's folder: a data file named without a folder is created (and found) there.
    subprocess.run([require_tool("qemu-img"), "create", "-f", "qcow2",
                    *(["-o", options] if options else []), path.name, "32M"],
                   cwd=folder, check=True, capture_output=True)
    qemu_io(path, "write -P 1 0 1M", "write -P 2 5M 300k", "write -z 8M 1M",
            "write -P 3 20M 64k")
    if extra == "snapshot":
        run_tool("qemu-img", "snapshot", "-c", "s1", path)
        qemu_io(path, "write -P 4 4k 8k", "write -P 5 6M 64k")
        run_tool("qemu-img", "snapshot", "-c", "s2", path)
        qemu_io(path, "write -P 6 1M 4k")
    if extra == "bitmap":
        run_tool("qemu-img", "bitmap", "--add", path, "b0")
        qemu_io(path, "write -P 4 2M 1M")  # the bitmap now has data clusters
        run_tool("qemu-img", "bitmap", "--add", "-g", "512", path, "b1")
        qemu_io(path, "write -P 5 12M 1M")
    return path


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Images QEMU made, each made once for the module (call with a KINDS name)."""
    require_tool("qemu-img")
    require_tool("qemu-io")
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = _make(tmp_path_factory.mktemp(kind), kind)
        return made[kind]

    return get


def copy_of(pristine: Callable[[str], Path], kind: str, folder: Path) -> Path:
    """A copy (with its companions) to damage or repair; the pristine image stays intact."""
    source = pristine(kind)
    for companion in source.parent.iterdir():
        shutil.copy2(companion, folder / companion.name)
    return folder / source.name


# ---- damage, done with our own reader -----------------------------------------------------------

class Patcher:
    """Finds offsets with imgbridge's qcow2 reader and patches the bytes QEMU wrote."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with imgbridge.open(path) as disk:
            self.header = disk.header
            self.l1 = list(disk.l1)
        self.cs = self.header.cluster_size
        self.codec = _Codec(self.header.refcount_order, self.cs)

    def _read(self, offset: int, n: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(n)

    def _write(self, offset: int, data: bytes) -> None:
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(data)

    def _block(self, cluster: int) -> tuple[int, int]:
        index, i = divmod(cluster, self.codec.per_block)
        entry = struct.unpack(">Q", self._read(self.header.refcount_table_offset + 8 * index,
                                               8))[0]
        if not entry:
            pytest.skip(f"no refcount block covers cluster {cluster} of this image")
        return entry & S.REFT_OFFSET_MASK, i

    def refcount(self, cluster: int) -> int:
        at, i = self._block(cluster)
        return self.codec.decode(self._read(at, self.cs))[i]

    def set_refcount(self, cluster: int, value: int) -> None:
        at, i = self._block(cluster)
        block = self.codec.decode(self._read(at, self.cs))
        block[i] = value
        self._write(at, self.codec.encode(block))

    def l2_entry_offset(self, guest: int) -> int:
        l1_index, l2_index = divmod(guest // self.cs, self.header.l2_entries)
        l2 = self.l1[l1_index] & S.L1E_OFFSET_MASK
        return l2 + l2_index * self.header.l2_entry_size

    def l2_entry(self, guest: int) -> int:
        value: int = struct.unpack(">Q", self._read(self.l2_entry_offset(guest), 8))[0]
        return value

    def data_cluster(self, guest: int = 0) -> int:
        return (self.l2_entry(guest) & S.L2E_OFFSET_MASK) // self.cs

    # the damages ------------------------------------------------------------------------------

    def leak_by_bump(self) -> None:
        """The header claims a second reference."""
        self.set_refcount(0, self.refcount(0) + 1)

    def leak_orphan(self) -> None:
        """A cluster appended to the file, with refcount 1, that nothing points at."""
        cluster = -(-self.path.stat().st_size // self.cs)
        self._write(cluster * self.cs, b"\xa5" * self.cs)
        self.set_refcount(cluster, 1)

    def zero_refcount(self) -> None:
        """A data cluster in use, with refcount 0."""
        self.set_refcount(self.data_cluster(), 0)

    def bump_data(self) -> None:
        """A data cluster with refcount 2 but OFLAG_COPIED set: a leak and a corruption."""
        self.set_refcount(self.data_cluster(), 2)

    def l2_past_end(self) -> None:
        """The first L2 entry points ten clusters past the end of the file."""
        beyond = (-(-self.path.stat().st_size // self.cs) + 10) * self.cs
        entry = self.l2_entry(0)
        self._write(self.l2_entry_offset(0),
                    struct.pack(">Q", entry & ~S.L2E_OFFSET_MASK | beyond))

    def misaligned_l2(self) -> None:
        """The first L1 entry's L2 offset moves by 512 bytes."""
        self._write(self.header.l1_table_offset, struct.pack(">Q", self.l1[0] + 512))

    def drop_refcount_block(self) -> None:
        """The refcount table forgets its first block: every count there reads as 0."""
        self._write(self.header.refcount_table_offset, bytes(8))


DAMAGES = {
    "leak-bump": (Patcher.leak_by_bump, 3),
    "leak-orphan": (Patcher.leak_orphan, 3),
    "refcount-zero": (Patcher.zero_refcount, 2),
    "bump-data": (Patcher.bump_data, 2),
    "l2-past-end": (Patcher.l2_past_end, 2),
    "misaligned-l2": (Patcher.misaligned_l2, 2),
}
#: Damages qemu-img counts exactly as we do (a misaligned L2 table is walked by qemu-img at
#: the misaligned offset, which counts garbage; we report the entry and do not walk it).
SAME_NUMBERS = {"leak-bump", "leak-orphan", "refcount-zero", "bump-data", "l2-past-end"}


# ---- sound images --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(KINDS))
def test_sound_images_match_qemu_img(cli: Cli, pristine: Callable[[str], Path], kind: str,
                                     tmp_path: Path) -> None:
    path = copy_of(pristine, kind, tmp_path)
    expected_code, expected = qemu_check(path)
    code, report, err = our_check(cli, path)
    assert (code, report) == (expected_code, expected), err
    assert code == 0


def test_dirty_image_with_lazy_refcounts_matches_qemu_img(cli: Cli, tmp_path: Path) -> None:
    """qemu-io aborts with lazy refcounts on: the image is dirty and its refcounts stale."""
    require_tool("qemu-io")
    path = tmp_path / "dirty.qcow2"
    run_tool("qemu-img", "create", "-f", "qcow2", "-o", "lazy_refcounts=on", path, "64M")
    run_tool("qemu-io", "-c", "write -P 3 0 128k", "-c", "write -P 4 1M 64k", "-c", "abort",
             path, check=False)
    expected_code, expected = qemu_check(path)
    code, report, err = our_check(cli, path)
    assert (code, report) == (expected_code, expected), err
    assert code == 2
    before = tmp_path / "before.qcow2"
    shutil.copy2(path, before)
    code, report, err = our_check(cli, path, "-r", "all")
    assert code == 0 and report["corruptions-fixed"] == 3, err
    assert qemu_check(path)[0] == 0
    info = json.loads(qemu_img("info", "--output=json", path).stdout)
    assert info["dirty-flag"] is False
    assert qemu_compare(before, path) == 0


# ---- broken on purpose ---------------------------------------------------------------------------

# A 1-bit refcount cannot hold 2, so the damages that bump a count to 2 do not apply to it.
DAMAGE_CASES = [(kind, damage)
                for kind in ("v3", "v2-512", "refcount-1", "refcount-64", "v3-2M")
                for damage in DAMAGES
                if not (kind == "refcount-1" and damage in ("leak-bump", "bump-data"))]


@pytest.mark.parametrize(("kind", "damage"), DAMAGE_CASES)
def test_damage_is_classified_like_qemu_img(cli: Cli, pristine: Callable[[str], Path],
                                            kind: str, damage: str, tmp_path: Path) -> None:
    path = copy_of(pristine, kind, tmp_path)
    patcher = Patcher(path)
    harm, exit_code = DAMAGES[damage]
    harm(patcher)
    expected_code, expected = qemu_check(path)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    before = path.read_bytes()
    code, report, err = our_check(cli, path)
    assert code == expected_code == exit_code, (err, expected)
    if damage in SAME_NUMBERS:
        assert report == expected, err
    assert path.read_bytes() == before and path.stat().st_mtime_ns == 1_000_000_000


# ---- repairs -------------------------------------------------------------------------------------

REPAIRABLE_KINDS = ["v3", "v2-512", "refcount-1", "refcount-64", "v3-2M", "zstd", "snapshot",
                    "bitmap", "extended-l2", "data-file"]


@pytest.mark.parametrize("kind", REPAIRABLE_KINDS)
def test_repair_leaks(cli: Cli, pristine: Callable[[str], Path], kind: str,
                      tmp_path: Path) -> None:
    path = copy_of(pristine, kind, tmp_path)
    Patcher(path).leak_orphan()
    assert qemu_check(path)[0] == 3
    code, report, err = our_check(cli, path, "-r", "leaks")
    assert code == 0 and report["leaks-fixed"] == 1, err
    assert qemu_check(path)[0] == 0
    assert qemu_compare(pristine(kind), path) == 0


@pytest.mark.parametrize("kind", REPAIRABLE_KINDS)
def test_repair_a_refcount_of_zero(cli: Cli, pristine: Callable[[str], Path], kind: str,
                                   tmp_path: Path) -> None:
    path = copy_of(pristine, kind, tmp_path)
    patcher = Patcher(path)
    if kind == "data-file":
        patcher.set_refcount(patcher.header.l1_table_offset // patcher.cs, 0)
    else:
        patcher.zero_refcount()
    assert qemu_check(path)[0] == 2
    code, report, err = our_check(cli, path, "-r", "leaks")
    assert code == 2 and any("-r all" in n for n in report["notes"]), err
    code, report, err = our_check(cli, path, "-r", "all")
    assert code == 0 and report["corruptions-fixed"] == 1, err
    assert qemu_check(path)[0] == 0
    assert qemu_compare(pristine(kind), path) == 0


@pytest.mark.parametrize("kind", ["v3", "v2-512", "refcount-64"])
@pytest.mark.parametrize(("damage", "mode"), [
    ("leak-orphan", "leaks"), ("leak-bump", "leaks"), ("bump-data", "leaks"),
    ("leak-orphan", "all"), ("bump-data", "all"),
])
def test_repair_reports_like_qemu_img(cli: Cli, pristine: Callable[[str], Path], kind: str,
                                      damage: str, mode: str, tmp_path: Path) -> None:
    """The same damage on twin copies: qemu-img check -r and ours report the same fixes and
    the same state after them. (Where a refcount is too low, qemu-img rebuilds every refcount
    structure at the end of the file and we mend the blocks in place, so only the image end
    offsets differ; that case is covered by the tests above.)"""
    (tmp_path / "q").mkdir()
    (tmp_path / "o").mkdir()
    theirs, ours = copy_of(pristine, kind, tmp_path / "q"), copy_of(pristine, kind, tmp_path / "o")
    for path in (theirs, ours):
        DAMAGES[damage][0](Patcher(path))
    expected_code, expected = qemu_check(theirs, "-r", mode)
    code, report, err = our_check(cli, ours, "-r", mode)
    del expected["filename"], report["filename"]
    assert (code, report) == (expected_code, expected), err
    assert theirs.read_bytes() == ours.read_bytes()  # the very same bytes mended


@pytest.mark.parametrize("kind", ["v3", "v2-512", "refcount-1", "refcount-64"])
def test_repair_a_missing_refcount_block(cli: Cli, pristine: Callable[[str], Path], kind: str,
                                         tmp_path: Path) -> None:
    path = copy_of(pristine, kind, tmp_path)
    Patcher(path).drop_refcount_block()
    assert qemu_check(path)[0] == 2
    code, _, err = our_check(cli, path, "-r", "all")
    assert code == 0, err
    assert qemu_check(path)[0] == 0
    assert qemu_compare(pristine(kind), path) == 0


def test_repair_moves_a_refcount_table_that_is_too_small(cli: Cli, tmp_path: Path) -> None:
    """512-byte clusters: one table cluster covers 64 blocks of 256 clusters (8 MiB); a data
    cluster at 9 MiB needs a new block and a bigger table."""
    require_tool("qemu-io")
    path = tmp_path / "small.qcow2"
    run_tool("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=512", path, "16M")
    qemu_io(path, "write -P 1 0 64k")
    patcher = Patcher(path)
    far = 9 * MiB
    patcher._write(far, b"Z" * 512)
    patcher._write(patcher.l2_entry_offset(0), struct.pack(">Q", S.L2E_COPIED | far))
    damaged = tmp_path / "damaged.qcow2"
    shutil.copy2(path, damaged)
    assert qemu_check(path)[0] == 2
    code, _, err = our_check(cli, path, "-r", "all")
    assert code == 0, err
    assert qemu_check(path)[0] == 0
    assert qemu_compare(damaged, path) == 0
    with imgbridge.open(path) as disk:
        assert disk.header.refcount_table_offset > far


@pytest.mark.parametrize("damage", ["l2-past-end", "misaligned-l2"])
def test_unrepairable_damage_stays_reported(cli: Cli, pristine: Callable[[str], Path],
                                            damage: str, tmp_path: Path) -> None:
    path = copy_of(pristine, "v3", tmp_path)
    DAMAGES[damage][0](Patcher(path))
    code, report, err = our_check(cli, path, "-r", "all")
    assert code == 2, err
    assert any("not freed" in note for note in report["notes"])
    assert qemu_check(path)[0] == 2


def _locked(path: Path) -> bool:
    """Whether some process holds a record lock on ``path``, read from /proc/locks: asking
    with a lock of our own (or with qemu-img info) could make qemu-io fail to take its own."""
    locks = Path("/proc/locks")
    if not locks.exists():
        pytest.skip("needs /proc/locks to see QEMU's image locks")
    inode = f":{path.stat().st_ino} "
    return inode in locks.read_text()


def test_repair_refuses_an_image_qemu_has_open(cli: Cli, pristine: Callable[[str], Path],
                                               tmp_path: Path) -> None:
    path = copy_of(pristine, "v3", tmp_path)
    Patcher(path).leak_orphan()
    holder = subprocess.Popen([require_tool("qemu-io"), "-c", "sleep 60000", str(path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not _locked(path):  # until qemu-io holds its locks
            assert time.monotonic() < deadline and holder.poll() is None
            time.sleep(0.05)
        before = path.read_bytes()
        result = cli("check", "-r", "leaks", path)
        assert result.code == 1 and "the image is in use" in result.err
        assert result.err.count("\n") == 1
        assert path.read_bytes() == before
        assert cli("check", path).code == 3  # a read-only check needs no lock
    finally:
        holder.terminate()
        holder.wait()
