"""qcow2 reading of bad and hostile images: each is refused with the right error class by the
library, and with one line on stderr and exit code 1 by the CLI (never a traceback), before
anything large is allocated or read.

The images are the committed fixtures (made by qemu-img, see fixtures/README.md) with bytes
patched at the header offsets of QEMU docs/interop/qcow2.txt; the two that need qemu-img at
test time (LUKS encryption, zlib compression) say so through require_tool.
"""

from __future__ import annotations

import os
import shutil
import struct
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import FIXTURES, CliResult, require_tool, run_cli_process, run_tool

import imgbridge
from imgbridge.errors import (
    ImgBridgeError,
    InvalidImageError,
    MissingCompanionError,
    UnsupportedFeatureError,
)
from imgbridge.source import FileSource

MiB = 1 << 20

# Header field offsets (qcow2.txt "Header"; the same layout as _structs.HeaderV2/HeaderV3Tail).
MAGIC, VERSION, BACKING_OFFSET, BACKING_SIZE, CLUSTER_BITS = 0, 4, 8, 16, 20
CRYPT_METHOD, L1_SIZE, L1_OFFSET = 32, 36, 40
REFTABLE_CLUSTERS, NB_SNAPSHOTS, SNAPSHOTS_OFFSET = 56, 60, 64
INCOMPATIBLE, HEADER_LENGTH = 72, 100
EXT_FEATURE_NAMES, EXT_DATA_FILE = 0x6803F857, 0x44415441


# ---- patching helpers -----------------------------------------------------------------------

def fixture_copy(name: str, folder: Path, as_name: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(FIXTURES / name, folder / (as_name or name)))


def read_field(path: Path, offset: int, fmt: str) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(struct.calcsize(fmt))
    value: int = struct.unpack(">" + fmt, data)[0]
    return value


def patch(path: Path, offset: int, data: bytes) -> Path:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    return path


def patch_field(path: Path, offset: int, fmt: str, value: int) -> Path:
    return patch(path, offset, struct.pack(">" + fmt, value))


def cut(path: Path, size: int) -> Path:
    with open(path, "r+b") as f:
        f.truncate(size)
    return path


def extensions(path: Path, *items: tuple[int, bytes]) -> Path:
    """Replace the header extensions with ``items`` (then the end marker)."""
    blob = b""
    for ext_type, data in items:
        blob += struct.pack(">II", ext_type, len(data)) + data + bytes(-len(data) % 8)
    return patch(path, read_field(path, HEADER_LENGTH, "I"), blob + bytes(8))


def first_l2_offset(path: Path) -> int:
    return read_field(path, read_field(path, L1_OFFSET, "Q"), "Q") & 0x00FF_FFFF_FFFF_FE00


def l2_entries(path: Path) -> list[tuple[int, int]]:
    """(file offset of the entry, entry) for every non-zero entry of the first L2 table."""
    l2 = first_l2_offset(path)
    cluster = 1 << read_field(path, CLUSTER_BITS, "I")
    with open(path, "rb") as f:
        f.seek(l2)
        table = f.read(cluster)
    entries = struct.unpack(f">{cluster // 8}Q", table)
    return [(l2 + 8 * i, e) for i, e in enumerate(entries) if e]


def set_backing(path: Path, name: str) -> Path:
    """Point the image at another backing file name (what ``qemu-img rebase -u`` does)."""
    encoded = name.encode()
    offset = read_field(path, BACKING_OFFSET, "Q")
    assert offset, f"{path} has no backing file"
    patch(path, offset, encoded)
    return patch_field(path, BACKING_SIZE, "I", len(encoded))


def chain_copy(folder: Path) -> tuple[Path, Path]:
    return (fixture_copy("chain-top.qcow2", folder), fixture_copy("chain-base.qcow2", folder))


# ---- the hostile images ---------------------------------------------------------------------

@dataclass
class Hostile:
    make: Callable[[Path], Path]
    error: type[ImgBridgeError]
    says: str  #: a piece of the message
    #: "open": refused on opening; "map": by the allocation map (the header is fine);
    #: "data": only when the data is read
    stage: str = "open"
    args: tuple[str, ...] = ("-f", "qcow2")
    snapshot: str | None = None  #: convert this internal snapshot (-l)


def _small(tmp: Path) -> Path:
    return fixture_copy("small.qcow2", tmp)


def _compressed_garbage(tmp: Path) -> Path:
    path = fixture_copy("compressed-zstd.qcow2", tmp)
    entries = [e for _, e in l2_entries(path) if e >> 62 & 1]
    assert entries, "the fixture has no compressed cluster"
    host = entries[0] & ((1 << (62 - (12 - 8))) - 1)  # 4 KiB clusters: 58 offset bits
    return patch(path, host, bytes(range(7, 250)) * 3)


def _compressed_past_eof(tmp: Path) -> Path:
    path = fixture_copy("compressed-zstd.qcow2", tmp)
    at, entry = next((a, e) for a, e in l2_entries(path) if e >> 62 & 1)
    return patch_field(path, at, "Q", (entry & ~((1 << 58) - 1)) | (64 * MiB))


_bomb_made: list[bytes] = []


def _zstd_bomb(tmp: Path) -> Path:
    """A compressed cluster whose 8 KiB zstd frame inflates to 200 MiB (one cluster is 4 KiB)."""
    path = fixture_copy("compressed-zstd.qcow2", tmp)
    if not _bomb_made:
        import zstandard

        _bomb_made.append(zstandard.ZstdCompressor(level=1).compress(bytes(200 * MiB)))
    bomb = _bomb_made[0]
    assert len(bomb) <= 16 * 512, len(bomb)  # 4 KiB clusters: at most 16 sectors
    at = -(-path.stat().st_size // 512) * 512
    patch(path, at, bomb)
    extra_sectors = -(-len(bomb) // 512) - 1
    l2_at, _ = next((a, e) for a, e in l2_entries(path) if e >> 62 & 1)
    return patch_field(path, l2_at, "Q", 1 << 62 | extra_sectors << 58 | at)


def _snapshot_size_huge(tmp: Path) -> Path:
    require_tool("qemu-img")
    path = _small(tmp)
    run_tool("qemu-img", "snapshot", "-c", "s1", path)
    entry = read_field(path, SNAPSHOTS_OFFSET, "Q")
    assert read_field(path, entry + 36, "I") >= 16, "no disk size in the snapshot's extra data"
    return patch_field(path, entry + 48, "Q", 1 << 50)  # extra data: vm state size, disk size


def _feature_named(tmp: Path) -> Path:
    path = _small(tmp)
    names = struct.pack(">BB46s", 0, 10, b"frobnication") + \
        struct.pack(">BB46s", 0, 4, b"extended L2 entries")
    extensions(path, (EXT_FEATURE_NAMES, names))
    return patch_field(path, INCOMPATIBLE, "Q", 1 << 10)


def _data_file(name: str) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        path = _small(tmp / "images")
        extensions(path, (EXT_DATA_FILE, name.encode()))
        return patch_field(path, INCOMPATIBLE, "Q", 1 << 2)

    return make


def _outside_backing(tmp: Path) -> Path:
    top, _ = chain_copy(tmp)
    inner = tmp / "inner"
    inner.mkdir()
    moved = top.rename(inner / top.name)
    return set_backing(moved, "../chain-base.qcow2")


def _absolute_outside_backing(tmp: Path) -> Path:
    top, _ = chain_copy(tmp)
    return set_backing(top, "/etc/passwd")


def _missing_backing(tmp: Path) -> Path:
    top, base = chain_copy(tmp)
    base.unlink()
    return top


def _loop(tmp: Path) -> Path:
    a = fixture_copy("chain-top.qcow2", tmp, "a.qcow2")
    b = fixture_copy("chain-top.qcow2", tmp, "b.qcow2")
    set_backing(a, "b.qcow2")
    set_backing(b, "a.qcow2")
    return a


def _self_loop(tmp: Path) -> Path:
    a = fixture_copy("chain-top.qcow2", tmp, "a.qcow2")
    return set_backing(a, "./a.qcow2")


def _unaligned_data(tmp: Path) -> Path:
    path = _small(tmp)
    at, entry = l2_entries(path)[0]
    return patch_field(path, at, "Q", entry + 512)


_luks_made: list[bytes] = []


def _luks(tmp: Path) -> Path:
    """A LUKS-encrypted image by qemu-img, made once (key derivation takes seconds)."""
    path = tmp / "luks.qcow2"
    if not _luks_made:
        require_tool("qemu-img")
        run_tool("qemu-img", "create", "-q", "--object", "secret,id=sec0,data=abc", "-f",
                 "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=sec0,"
                 "encrypt.iter-time=10", path, "1M")
        _luks_made.append(path.read_bytes())
    path.write_bytes(_luks_made[0])
    return path


def _zlib_garbage(tmp: Path) -> Path:
    require_tool("qemu-img")
    path = tmp / "zlib.qcow2"
    run_tool("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096",
             FIXTURES / "small.raw", path)
    entries = [e for _, e in l2_entries(path) if e >> 62 & 1]
    return patch(path, entries[-1] & ((1 << 58) - 1), b"\xff" * 600)


def _v2_zero_flag(tmp: Path) -> Path:
    """A version 2 image whose L2 entry carries the zero flag, which only v3 defines: QEMU
    refuses to read it ("Zero cluster entry found in pre-v3 image"), it does not read data."""
    path = patch_field(_small(tmp), VERSION, "I", 2)  # bytes 72.. are zero: no extensions
    at, entry = l2_entries(path)[0]
    return patch_field(path, at, "Q", entry | 1)


def _snapshot_table_too_big(tmp: Path) -> Path:
    """520 snapshot entries, each naming itself with 2 x 65535 bytes: 68 MB of table in a
    sparse file. QEMU refuses a table over 64 MiB ("Snapshot table is too big"); 65536 such
    entries would otherwise be 8.6 GB of names read and held."""
    path = _small(tmp)
    count, at, step = 520, MiB, (40 + 2 * 65535 + 7) & ~7
    with open(path, "r+b") as f:
        for i in range(count):
            f.seek(at + i * step)
            f.write(struct.pack(">QIHHIIQII", 0, 0, 65535, 65535, 0, 0, 0, 0, 0))
        f.truncate(at + count * step)
    patch_field(path, SNAPSHOTS_OFFSET, "Q", at)
    return patch_field(path, NB_SNAPSHOTS, "I", count)


CASES: dict[str, Hostile] = {
    "header-cut": Hostile(lambda t: cut(_small(t), 50), InvalidImageError, "truncated"),
    "v3-header-cut": Hostile(lambda t: cut(_small(t), 90), InvalidImageError, "truncated"),
    "l1-cut": Hostile(lambda t: cut(_small(t), read_field(_small(t), L1_OFFSET, "Q") + 4),
                      InvalidImageError, "L1 table"),
    "l2-cut": Hostile(lambda t: cut(_small(t), first_l2_offset(_small(t)) + 100),
                      InvalidImageError, "L2 table", stage="map"),
    "l2-past-the-end": Hostile(
        lambda t: patch_field(_small(t), read_field(_small(t), L1_OFFSET, "Q"), "Q",
                              (1 << 63) | 1 << 30),
        InvalidImageError, "L2 table", stage="map"),
    "bad-magic": Hostile(lambda t: patch(_small(t), MAGIC, b"QFI\0"), InvalidImageError,
                         "bad magic"),
    "version-4": Hostile(lambda t: patch_field(_small(t), VERSION, "I", 4),
                         UnsupportedFeatureError, "version 4"),
    "cluster-bits-30": Hostile(lambda t: patch_field(_small(t), CLUSTER_BITS, "I", 30),
                               InvalidImageError, "cluster_bits 30"),
    "cluster-bits-8": Hostile(lambda t: patch_field(_small(t), CLUSTER_BITS, "I", 8),
                              InvalidImageError, "cluster_bits 8"),
    "l1-size-huge": Hostile(lambda t: patch_field(_small(t), L1_SIZE, "I", 0xFFFF_FFFF),
                            InvalidImageError, "32 MiB"),
    "l1-size-past-eof": Hostile(lambda t: patch_field(_small(t), L1_SIZE, "I", 4 << 20),
                                InvalidImageError, "past the end"),
    "l1-size-too-small": Hostile(lambda t: patch_field(_small(t), L1_SIZE, "I", 0),
                                 InvalidImageError, "L1 table has 0 entries"),
    "refcount-table-huge": Hostile(
        lambda t: patch_field(_small(t), REFTABLE_CLUSTERS, "I", 0xFFFF_FFFF),
        InvalidImageError, "refcount table"),
    "nb-snapshots-huge": Hostile(
        lambda t: patch_field(_small(t), NB_SNAPSHOTS, "I", 0xFFFF_FFFF),
        InvalidImageError, "snapshots exceed"),
    "snapshot-table-too-big": Hostile(_snapshot_table_too_big, InvalidImageError,
                                      "snapshot table"),
    "v2-zero-flag": Hostile(_v2_zero_flag, InvalidImageError, "zero flag", stage="map"),
    "snapshot-table-past-eof": Hostile(
        lambda t: patch_field(patch_field(_small(t), NB_SNAPSHOTS, "I", 65536),
                              SNAPSHOTS_OFFSET, "Q", 1 << 30),
        InvalidImageError, "snapshot table entry"),
    "extension-past-cluster": Hostile(
        lambda t: extensions(_small(t), (0x1234_5678, b"x" * 4000)),
        InvalidImageError, "runs past the header cluster"),
    "extension-length-huge": Hostile(
        lambda t: patch(_small(t), 112, struct.pack(">II", 0x1234_5678, 0xFFFF_FFFF)),
        InvalidImageError, "runs past the header cluster"),
    "unknown-incompatible-bit": Hostile(
        lambda t: patch_field(_small(t), INCOMPATIBLE, "Q", 1 << 10),
        UnsupportedFeatureError, "bit 10"),
    "unknown-incompatible-named": Hostile(_feature_named, UnsupportedFeatureError,
                                          "frobnication"),
    "aes-encryption": Hostile(lambda t: patch_field(_small(t), CRYPT_METHOD, "I", 1),
                              UnsupportedFeatureError, "encryption (AES)"),
    "luks-encryption": Hostile(_luks, UnsupportedFeatureError, "encryption (LUKS)"),
    "backing-outside-folder": Hostile(_outside_backing, MissingCompanionError,
                                      "outside the image's folder"),
    "backing-absolute-outside": Hostile(_absolute_outside_backing, MissingCompanionError,
                                        "'/etc/passwd' lies outside"),
    "backing-missing": Hostile(_missing_backing, MissingCompanionError, "not found"),
    "backing-loop": Hostile(_loop, InvalidImageError, "loop"),
    "backing-self-loop": Hostile(_self_loop, InvalidImageError, "loop"),
    "backing-name-too-long": Hostile(lambda t: patch_field(chain_copy(t)[0], BACKING_SIZE, "I",
                                                           5000),
                                     InvalidImageError, "backing file name length 5000"),
    "data-file-missing": Hostile(_data_file("gone.data"), MissingCompanionError, "not found"),
    "data-file-outside": Hostile(_data_file("../outside.data"), MissingCompanionError,
                                 "outside the image's folder"),
    "compressed-garbage-zstd": Hostile(_compressed_garbage, InvalidImageError,
                                       "does not decompress", stage="data"),
    "compressed-garbage-zlib": Hostile(_zlib_garbage, InvalidImageError, "compressed cluster",
                                       stage="data"),
    "compressed-past-eof": Hostile(_compressed_past_eof, InvalidImageError,
                                   "compressed cluster", stage="data"),
    "compressed-zstd-bomb": Hostile(_zstd_bomb, InvalidImageError, "more than", stage="data"),
    "snapshot-size-huge": Hostile(_snapshot_size_huge, InvalidImageError,
                                  "more than its L1 table", stage="data", snapshot="s1"),
    "data-cluster-unaligned": Hostile(_unaligned_data, InvalidImageError, "not cluster-aligned",
                                      stage="map"),
}


@pytest.fixture(params=[pytest.param(name, marks=pytest.mark.slow)  # LUKS key derivation
                        if name == "luks-encryption" else name for name in sorted(CASES)])
def hostile(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Hostile, Path]:
    case = CASES[request.param]
    return case, case.make(tmp_path)


def test_the_library_raises_the_right_error(hostile: tuple[Hostile, Path],
                                            tmp_path: Path) -> None:
    case, path = hostile
    with pytest.raises(case.error) as caught:
        if case.stage == "open":
            imgbridge.inspect(path, "qcow2")
        else:
            imgbridge.convert(path, tmp_path / "out.raw", format="qcow2", output_format="raw",
                              source_options={"snapshot": case.snapshot} if case.snapshot else None)
    assert case.says in str(caught.value)
    assert str(path) in str(caught.value) or path.name in str(caught.value)
    assert not (tmp_path / "out.raw").exists()


def test_the_cli_says_one_line_and_exits_1(hostile: tuple[Hostile, Path], tmp_path: Path,
                                           cli: Callable[..., CliResult]) -> None:
    case, path = hostile
    fails = {"open": ("inspect", "map", "convert"), "map": ("map", "convert"),
             "data": ("convert",)}[case.stage]
    for command in (["inspect", "--json"], ["map", "--json"], ["convert", "-O", "raw"]):
        extra = [str(tmp_path / "out.raw")] if command[0] == "convert" else []
        if command[0] == "convert" and case.snapshot:
            extra = ["-l", case.snapshot, *extra]
        result = cli(*command, *case.args, path, *extra)
        if command[0] not in fails:  # the damage lies deeper than this command looks
            assert result.code == 0, (command, result.err)
            continue
        assert result.code == 1, (command, result.out, result.err)
        assert result.err.startswith("imgbridge: error: "), result.err
        assert result.err.count("\n") == 1, result.err
        assert case.says in result.err
        assert "Traceback" not in result.err and "internal error" not in result.err
        assert not (tmp_path / "out.raw").exists()


@pytest.mark.parametrize("name", ["header-cut", "backing-loop", "compressed-garbage-zstd"])
def test_a_real_process_says_one_line(name: str, tmp_path: Path) -> None:
    path = CASES[name].make(tmp_path)
    result = run_cli_process("convert", "-O", "raw", path, tmp_path / "out.raw")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert CASES[name].says in result.stderr


# ---- without -f: the name says qcow2, the magic says otherwise -------------------------------

@pytest.mark.parametrize("name", ["bad-magic", "version-4", "header-cut"])
def test_without_f_a_qcow2_name_is_still_refused_clearly(name: str, tmp_path: Path,
                                                         cli: Callable[..., CliResult]) -> None:
    path = CASES[name].make(tmp_path)
    with pytest.raises(CASES[name].error):
        imgbridge.inspect(path)
    result = cli("inspect", path)
    assert result.code == 1 and result.err.count("\n") == 1
    assert CASES[name].says in result.err


def test_without_f_convert_refuses_a_broken_qcow2(tmp_path: Path,
                                                  cli: Callable[..., CliResult]) -> None:
    # Whatever the probe makes of it, a file named .qcow2 with a broken header is never
    # converted as if it were raw.
    for name in ("bad-magic", "version-4"):
        path = CASES[name].make(tmp_path / name)
        result = cli("convert", "-O", "raw", path, tmp_path / "out.raw")
        assert result.code == 1 and result.err.count("\n") == 1, result.err
        assert not (tmp_path / "out.raw").exists()


# ---- refused before anything big is allocated or read ---------------------------------------

@pytest.mark.parametrize("name", ["l1-size-huge", "l1-size-past-eof", "refcount-table-huge",
                                  "nb-snapshots-huge", "snapshot-table-past-eof",
                                  "extension-length-huge", "backing-name-too-long"])
def test_hostile_sizes_are_refused_before_allocating(name: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = CASES[name].make(tmp_path)
    reads: list[int] = []
    real_read_at = FileSource.read_at

    def counting_read_at(self: FileSource, offset: int, n: int) -> bytes:
        reads.append(n)
        return real_read_at(self, offset, n)

    monkeypatch.setattr(FileSource, "read_at", counting_read_at)
    tracemalloc.start()
    try:
        with pytest.raises(CASES[name].error):
            imgbridge.open(path, "qcow2")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert max(reads) <= 64 * 1024, f"read {max(reads)} bytes at once"
    assert sum(reads) <= MiB
    assert peak < 4 * MiB, f"peak allocation {peak} bytes"


def test_a_zstd_bomb_is_refused_without_inflating_it(tmp_path: Path) -> None:
    path = _zstd_bomb(tmp_path)
    tracemalloc.start()
    try:
        with pytest.raises(InvalidImageError, match="gives more than 4096 bytes"):
            imgbridge.convert(path, tmp_path / "out.raw", output_format="raw")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 * MiB, f"peak allocation {peak} bytes"


# ---- companions: refused unless the caller opts in ------------------------------------------

def test_allow_outside_backing_opts_in(tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    path = _outside_backing(tmp_path)
    out = tmp_path / "out.raw"
    result = cli("convert", "-O", "raw", "--allow-outside-backing", path, out)
    assert result.code == 0, result.err
    assert imgbridge.compare(out, FIXTURES / "chain-top.qcow2", format_a="raw").identical
    info = imgbridge.inspect(path, allow_outside=True)
    assert info["backing-filename"] == "../chain-base.qcow2"


def test_a_snapshot_that_is_not_there(tmp_path: Path) -> None:
    with pytest.raises(imgbridge.InvalidInputError, match="no snapshot 's9'"):
        imgbridge.open(FIXTURES / "small.qcow2", options={"snapshot": "s9"})


# ---- well-formed but unusual, read right --------------------------------------------------------

def test_compressed_cluster_padding_after_the_stream_is_ignored(tmp_path: Path) -> None:
    """Bytes after the compressed stream, inside its last sector, are not part of it."""
    path = fixture_copy("compressed-zstd.qcow2", tmp_path)
    with imgbridge.open(path) as disk:
        before = disk.read_at(0, disk.size)
    size = path.stat().st_size
    with open(path, "ab") as f:  # a tail of junk past the last compressed stream
        f.write(b"\xa5" * (-size % 512 or 512))
    with imgbridge.open(path) as disk:
        assert disk.read_at(0, disk.size) == before
    assert before == (FIXTURES / "small.raw").read_bytes()


def test_every_fixture_reads_as_small_raw(tmp_path: Path) -> None:
    expected = (FIXTURES / "small.raw").read_bytes()
    for name in ("small.qcow2", "compressed-zstd.qcow2"):
        with imgbridge.open(FIXTURES / name) as disk:
            assert disk.read_at(0, disk.size) == expected, name
            assert disk.read_at(64 * 1024 - 3, 6) == b"\0\0\0\x5a\x5a\x5a"


def test_a_compressed_cluster_read_in_pieces_is_inflated_once() -> None:
    """Small reads (a filesystem reader's 512-byte blocks) inside one compressed cluster must
    not inflate the whole cluster again for every piece."""
    expected = (FIXTURES / "small.raw").read_bytes()
    with imgbridge.open(FIXTURES / "compressed-zstd.qcow2", "qcow2") as disk:
        run = next(r for r in disk.layer_runs() if r.token is not None)
        calls: list[int] = []
        inflate = disk._decompressor

        def counting(raw: bytes, size: int) -> bytes:
            calls.append(size)
            return inflate(raw, size)

        disk._decompressor = counting
        pieces = [disk.read_at(at, 512) for at in range(run.offset, run.offset + run.length, 512)]
    assert b"".join(pieces) == expected[run.offset:run.offset + run.length]
    assert len(calls) == 1


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open descriptors in /proc")
def test_a_refused_open_closes_the_data_file(tmp_path: Path) -> None:
    """The external data file is opened before the backing file; when the backing file is
    refused, the data file must not stay open."""
    top, base = chain_copy(tmp_path)
    base.unlink()
    extensions(top, (EXT_DATA_FILE, b"top.data"))
    patch_field(top, INCOMPATIBLE, "Q", 1 << 2)
    (tmp_path / "top.data").write_bytes(bytes(4096))
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with pytest.raises(MissingCompanionError):
            imgbridge.open(top, "qcow2")
    assert len(os.listdir("/proc/self/fd")) == before
