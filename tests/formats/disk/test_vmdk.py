"""VMDK without external tools: descriptors, our writers read back, hostile and truncated input.

Images made by qemu-img and checked by qemu-img and vmdkinfo are in
tests/interop/test_vmdk_interop.py; here every image is made by our writer or by hand, so the
tests run anywhere.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import make_sparse_file
from imgbridge.formats.disk import vmdk
from imgbridge.formats.disk.raw import RawDisk
from imgbridge.formats.disk.vmdk import _structs as S
from imgbridge.formats.disk.vmdk.descriptor import (
    Descriptor,
    DescriptorError,
    ExtentLine,
    emit,
    looks_like_descriptor,
    parse,
)
from imgbridge.formats.disk.vmdk.reader import VmdkDisk, parse_header

import imgbridge
from imgbridge.errors import (
    InvalidImageError,
    InvalidInputError,
    MissingCompanionError,
    UnsupportedFeatureError,
)
from imgbridge.model.disk import ExtentKind
from imgbridge.output import AtomicOutput
from imgbridge.registry import ProbeInput
from imgbridge.source import BytesSource, FileSource

KiB = 1 << 10
MiB = 1 << 20
GRAIN = 64 * KiB
SUBFORMATS = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
              "twoGbMaxExtentFlat", "streamOptimized")


def _pattern(seed: int, n: int) -> bytes:
    block = bytes((seed * 31 + i * 7) % 251 + 1 for i in range(4096))
    return (block * (n // 4096 + 1))[:n]


#: A small disk: data at the start, data not aligned to grains, a zero grain inside data, and
#: data in the last, partial grain (the size is not a multiple of the grain).
SMALL_SIZE = 3 * MiB + 1536
SMALL_RUNS = [
    (0, _pattern(1, 100 * KiB)),
    (700 * KiB + 100, _pattern(2, 5000)),
    (MiB, _pattern(3, GRAIN) + bytes(GRAIN) + _pattern(4, GRAIN)),
    (SMALL_SIZE - 1000, _pattern(5, 1000)),
]


def _expected(size: int, runs: list[tuple[int, bytes]]) -> bytes:
    data = bytearray(size)
    for offset, chunk in runs:
        data[offset:offset + len(chunk)] = chunk
    return bytes(data)


def _write(disk: Any, target: Path, **options: str) -> Path:
    with AtomicOutput(str(target)) as out:
        vmdk.create(out, disk, options, lambda done, total: None)
        out.commit()
    return target


@pytest.fixture
def small_raw(tmp_path: Path) -> Path:
    return make_sparse_file(tmp_path / "small.raw", SMALL_SIZE, SMALL_RUNS)


def _small_vmdk(tmp_path: Path, small_raw: Path, subformat: str = "monolithicSparse",
                name: str = "disk.vmdk") -> Path:
    with RawDisk(FileSource(small_raw)) as src:
        return _write(src, tmp_path / name, subformat=subformat)


def _patch(path: Path, offset: int, fmt: str, *values: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def _gt_sectors(path: Path) -> tuple[int, int | None]:
    """Sectors of the first primary and redundant grain tables of a sparse extent."""
    with FileSource(path) as src:
        h = parse_header(src)
        gd = struct.unpack("<I", src.read_at(h.gd_offset * 512, 4))[0]
        rgd = struct.unpack("<I", src.read_at(h.rgd_offset * 512, 4))[0] if h.redundant else None
    return gd, rgd


# ---- the descriptor ------------------------------------------------------------------------

QEMU_STYLE = """# Disk DescriptorFile
version=1
CID=2c76ee80
parentCID=ffffffff
createType="twoGbMaxExtentFlat"

# Extent description
RW 4194304 FLAT "disk-f001.vmdk" 0
RDONLY 2048 FLAT "with space.vmdk" 128
RW 1024 ZERO
RW 8 VMFS "vmfs.vmdk"
RW 16 SPARSE "s.vmdk"

# The Disk Data Base
#DDB

ddb.virtualHWVersion = "4"
ddb.geometry.cylinders = "10402"
ddb.adapterType = "lsilogic"
"""


def test_descriptor_parses_every_extent_kind_and_the_ddb() -> None:
    desc = parse(QEMU_STYLE.replace("\n", "\r\n"))
    assert (desc.version, desc.cid, desc.parent_cid) == (1, 0x2C76EE80, 0xFFFFFFFF)
    assert desc.create_type == "twoGbMaxExtentFlat" and desc.parent_hint is None
    assert [(e.access, e.sectors, e.type, e.filename, e.offset) for e in desc.extents] == [
        ("RW", 4194304, "FLAT", "disk-f001.vmdk", 0),
        ("RDONLY", 2048, "FLAT", "with space.vmdk", 128),
        ("RW", 1024, "ZERO", None, 0),
        ("RW", 8, "VMFS", "vmfs.vmdk", 0),
        ("RW", 16, "SPARSE", "s.vmdk", 0),
    ]
    assert desc.ddb == {"virtualHWVersion": "4", "geometry.cylinders": "10402",
                        "adapterType": "lsilogic"}
    assert desc.sectors == 4194304 + 2048 + 1024 + 8 + 16


def test_descriptor_as_vmware_workstation_writes_it() -> None:
    text = (
        "# Disk DescriptorFile\nversion=1\nencoding=\"windows-1252\"\nCID=fffffffe\n"
        "parentCID=ffffffff\nisNativeSnapshot=\"no\"\ncreateType=\"monolithicSparse\"\n\n"
        "# Extent description\nRW 41943040 SPARSE \"Windows 10 x64.vmdk\"\n\n"
        "# The Disk Data Base \n#DDB\n\nddb.adapterType = \"lsilogic\"\n"
        "ddb.longContentID = \"0c2d5e0b8e5e3c0f6bd7a7b4fffffffe\"\n"
        "ddb.uuid = \"60 00 C2 9b 59 0a 0b 4c-ac 58 8b 9a 5b 63 1a 84\"\n"
        "ddb.virtualHWVersion = \"19\"\n"
    )
    desc = parse(text)
    assert desc.fields == {"encoding": "windows-1252", "isNativeSnapshot": "no"}
    assert desc.cid == 0xFFFFFFFE and desc.extents[0].filename == "Windows 10 x64.vmdk"
    assert desc.ddb["uuid"].startswith("60 00 C2") and desc.ddb["virtualHWVersion"] == "19"


def test_descriptor_round_trips_through_emit() -> None:
    desc = Descriptor(create_type="monolithicSparse", cid=0x1234, parent_cid=0xABCDEF01,
                      parent_hint="base image.vmdk",
                      extents=[ExtentLine("RW", 2048, "SPARSE", "child.vmdk")],
                      ddb={"adapterType": "ide"}, fields={"encoding": "UTF-8"})
    again = parse(emit(desc))
    assert again == desc


@pytest.mark.parametrize("text, message", [
    ('version=1\nRW 10 FLAT "x"\ncreateType="monolithicFlat"', "line 2: a FLAT extent needs"),
    ('version=1\ncreateType="vmfs"\nRW 8 VMFS "x" 0 1', "line 3: malformed extent"),
    ('version=1\ncreateType="vmfs"\nRW 10 ZERO "x"', "a ZERO extent names no file"),
    ('version=1\ncreateType="vmfs"\nRW ten FLAT "x" 0', "line 3: malformed extent line"),
    ('version=1\ncreateType="vmfs"\nthis is not vmdk', "line 3: neither a setting"),
    ('version=1\nCID=zz\ncreateType="vmfs"', "line 2: CID 'zz' is not a hexadecimal number"),
    ('version=1\nRW 10 SPARSE "x"', "no createType"),
    ('version=1\ncreateType="x"\nRW 137438953473 SPARSE "x"', "more than 64 TiB"),
])
def test_descriptor_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(DescriptorError, match=message.replace("(", r"\(")):
        parse(text)


def test_descriptor_recognition() -> None:
    assert looks_like_descriptor(b"# Disk DescriptorFile\nversion=1\n")
    assert looks_like_descriptor(b"\n# a comment\n  \nversion=1\r\nCID=1\n")
    assert not looks_like_descriptor(b"version=9\n")
    assert not looks_like_descriptor(b"\x00\x01binary")


def test_probe_scores() -> None:
    def probe(head: bytes, name: str = "x.img") -> int:
        return vmdk.probe(ProbeInput(head, b"", name, len(head)))

    assert probe(b"KDMV" + bytes(508)) == 100
    assert probe(b"COWD" + bytes(508)) == 100  # recognised, then refused with a clear error
    assert probe(QEMU_STYLE.encode()) == 100
    assert probe(b"hello world", "x.vmdk") == 0
    assert vmdk.probe(ProbeInput(b"", b"", "dir", 0, frozenset())) == 0


# ---- our writers, read back -------------------------------------------------------------------

@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_every_subformat_reads_back(subformat: str, tmp_path: Path, small_raw: Path) -> None:
    path = _small_vmdk(tmp_path, small_raw, subformat)
    expected = _expected(SMALL_SIZE, SMALL_RUNS)
    with imgbridge.open(path) as disk:
        assert isinstance(disk, VmdkDisk) and not disk.format_guessed
        assert disk.size == SMALL_SIZE
        assert disk.read_at(0, SMALL_SIZE) == expected
        assert disk.create_type == subformat
        data = [e for e in disk.extents() if e.kind is ExtentKind.DATA]
        # Nothing but the data's grains (or 4 KiB blocks, for flat files) is stored.
        stored = sum(e.length for e in data)
        assert stored <= 7 * GRAIN
    info = imgbridge.inspect(path)
    specific = info["format-specific"]["data"]
    assert info["format"] == "vmdk" and info["virtual-size"] == SMALL_SIZE
    assert specific["create-type"] == subformat
    assert specific["adapter-type"] == "ide" and specific["hardware-version"] == "4"
    assert specific["geometry"] == {"cylinders": 6, "heads": 16, "sectors": 63}
    assert specific["parent-cid"] == 0xFFFFFFFF
    assert ("cluster-size" in info) == ("Sparse" in subformat or subformat == "streamOptimized")


def test_writer_options(tmp_path: Path, small_raw: Path) -> None:
    with RawDisk(FileSource(small_raw)) as src:
        path = _write(src, tmp_path / "scsi.vmdk", adapter_type="lsilogic", hwversion="11")
        for bad, message in (({"subformat": "vmfs"}, "subformat must be one of"),
                             ({"adapter_type": "nvme"}, "adapter_type must be one of"),
                             ({"hwversion": "x"}, "hwversion must be a number")):
            with pytest.raises(InvalidInputError, match=message):
                _write(src, tmp_path / "bad.vmdk", **bad)
    assert not (tmp_path / "bad.vmdk").exists()
    specific = imgbridge.inspect(path)["format-specific"]["data"]
    assert (specific["adapter-type"], specific["hardware-version"]) == ("lsilogic", "11")
    assert specific["geometry"]["heads"] == 255
    # convert -c asks for compress=on: the only compressed VMDK is streamOptimized.
    with RawDisk(FileSource(small_raw)) as src:
        compressed = _write(src, tmp_path / "c.vmdk", compress="on")
        with pytest.raises(InvalidInputError, match="monolithicFlat cannot be compressed"):
            _write(src, tmp_path / "bad.vmdk", compress="on", subformat="monolithicFlat")
    assert imgbridge.inspect(compressed)["format-specific"]["data"]["create-type"] == \
        "streamOptimized"


def test_split_subformats_name_their_files_like_qemu_img(tmp_path: Path) -> None:
    size = 2 * 1024 * MiB + 3 * MiB
    runs = [(2 * 1024 * MiB - 4096, _pattern(6, 8192)), (size - 4096, _pattern(7, 4096))]
    raw = make_sparse_file(tmp_path / "big.raw", size, runs)
    base = 2 * 1024 * MiB - 8192
    expected_tail = _expected(size - base, [(offset - base, data) for offset, data in runs])
    with RawDisk(FileSource(raw)) as src:
        for subformat, letter in (("twoGbMaxExtentSparse", "s"), ("twoGbMaxExtentFlat", "f")):
            path = _write(src, tmp_path / f"{letter}.vmdk", subformat=subformat)
            assert sorted(p.name for p in tmp_path.glob(f"{letter}-*")) == [
                f"{letter}-{letter}001.vmdk", f"{letter}-{letter}002.vmdk"]
            with imgbridge.open(path) as disk:
                assert disk.size == size
                assert disk.read_at(base, len(expected_tail)) == expected_tail
                extents = disk.info()["format-specific"]["data"]["extents"]
                assert [e["virtual-size"] for e in extents] == [2 * 1024 * MiB, 3 * MiB]
        _write(src, tmp_path / "m.vmdk", subformat="monolithicFlat")
        assert (tmp_path / "m-flat.vmdk").stat().st_size == size


class _PipeOnly(io.RawIOBase):
    """A write-only, unseekable stream, like a pipe."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.chunks.append(bytes(data))
        return len(data)

    def seekable(self) -> bool:
        return False

    def seek(self, *args: Any) -> int:
        raise io.UnsupportedOperation("a pipe cannot seek")

    def tell(self) -> int:
        raise io.UnsupportedOperation("a pipe cannot tell")


class _PipeOutput:
    """An output that only offers open_sequential(), as the CLI's '-' will."""

    target = "<stdout>"

    def __init__(self) -> None:
        self.stream = _PipeOnly()

    def open_sequential(self) -> _PipeOnly:
        return self.stream

    @property
    def path(self) -> str:
        raise AssertionError("streamOptimized must not ask for a path")

    def companion(self, name: str) -> str:
        raise AssertionError("streamOptimized must not make companions")


def test_stream_optimized_goes_through_a_pipe(tmp_path: Path, small_raw: Path) -> None:
    out = _PipeOutput()
    with RawDisk(FileSource(small_raw)) as src:
        vmdk.create(out, src, {"subformat": "streamOptimized"},  # type: ignore[arg-type]
                    lambda done, total: None)
    data = b"".join(out.stream.chunks)
    path = tmp_path / "piped.vmdk"
    path.write_bytes(data)
    assert data[:4] == b"KDMV"
    assert struct.unpack_from("<Q", data, 56)[0] == S.GD_AT_END
    # Footer marker, footer (the header with the real gdOffset), end-of-stream marker.
    assert struct.unpack_from("<QII", data, len(data) - 1536) == (1, 0, S.MARKER_FOOTER)
    assert data[-1024:-1020] == b"KDMV"
    gd = struct.unpack_from("<Q", data, len(data) - 1024 + 56)[0]
    assert struct.unpack_from("<QII", data, (gd - 1) * 512) == (1, 0, S.MARKER_GD)
    assert data[-512:] == bytes(512)
    with imgbridge.open(path) as disk:
        assert disk.read_at(0, SMALL_SIZE) == _expected(SMALL_SIZE, SMALL_RUNS)
        assert disk.info()["format-specific"]["data"]["extents"][0]["filename"].endswith(
            "piped.vmdk")
        assert b'"disk.vmdk"' in data[512:1024 * 10]  # a pipe has no name: qemu's default
        assert disk.check().exit_code == 0


def test_stream_grains_compress_in_parallel_to_the_same_bytes(tmp_path: Path,
                                                              small_raw: Path) -> None:
    from imgbridge.formats.disk.vmdk.writer import Options, write_stream

    outputs = []
    for threads in (1, 4):
        out = _PipeOutput()
        with RawDisk(FileSource(small_raw)) as src:
            write_stream(out, src, Options("streamOptimized", "ide", "4"),  # type: ignore[arg-type]
                         "disk.vmdk", lambda d, t: None, threads=threads)
        outputs.append(b"".join(out.stream.chunks)[128 * 512:])  # past the descriptor (CID)
    assert outputs[0] == outputs[1]


def test_empty_disk(tmp_path: Path) -> None:
    raw = make_sparse_file(tmp_path / "empty.raw", 0, [])
    with RawDisk(FileSource(raw)) as src:
        for subformat in ("monolithicSparse", "streamOptimized"):
            path = _write(src, tmp_path / f"{subformat}.vmdk", subformat=subformat)
            with imgbridge.open(path) as disk:
                assert disk.size == 0
        with pytest.raises(InvalidInputError, match="empty disk"):
            _write(src, tmp_path / "flat.vmdk", subformat="monolithicFlat")


# ---- hand-made streams: raw deflate, directory at the front, no descriptor -------------------

def _handmade_stream(path: Path, grains: dict[int, bytes], capacity: int,
                     compress: Callable[[bytes], bytes]) -> None:
    """A stream whose grain directory and tables sit at the front (gdOffset is real)."""
    gs = 128
    h = S.Header(version=3, flags=S.FLAG_VALID_NEWLINE_DETECTOR | S.FLAG_COMPRESSED
                 | S.FLAG_MARKERS, capacity=capacity, grain_size=gs, descriptor_offset=0,
                 descriptor_size=0, num_gtes_per_gt=512, rgd_offset=0, gd_offset=1,
                 overhead=0, unclean_shutdown=0, compress_algorithm=1)
    gt_base = 1 + h.gd_sectors
    h.overhead = gt_base + h.gd_entries * 4
    body = bytearray()
    gts = [[0] * 512 for _ in range(h.gd_entries)]
    for grain, data in sorted(grains.items()):
        gts[grain // 512][grain % 512] = h.overhead + len(body) // 512
        payload = compress(data)
        blob = struct.pack("<QI", grain * gs, len(payload)) + payload
        body += blob + bytes(-len(blob) % 512)
    gd = struct.pack(f"<{h.gd_entries}I", *(gt_base + 4 * i for i in range(h.gd_entries)))
    tables = b"".join(struct.pack("<512I", *t) for t in gts)
    image = h.pack() + gd + bytes(-len(gd) % 512) + tables + bytes(body)
    path.write_bytes(image + bytes(512))  # and an end-of-stream marker


def _raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(6, zlib.DEFLATED, -15)
    return packer.compress(data) + packer.flush()


@pytest.mark.parametrize("compress", [zlib.compress, _raw_deflate], ids=["zlib", "raw-deflate"])
def test_stream_payloads_zlib_or_raw_deflate_directory_in_front(
        compress: Callable[[bytes], bytes], tmp_path: Path) -> None:
    capacity = 700 * 128 + 5  # two grain tables, a last grain of 5 sectors
    grains = {0: _pattern(1, GRAIN), 3: _pattern(2, GRAIN), 600: _pattern(3, GRAIN),
              700: _pattern(4, 5 * 512)}
    path = tmp_path / "hand.vmdk"
    _handmade_stream(path, grains, capacity, compress)
    with imgbridge.open(path) as disk:
        assert disk.create_type == "streamOptimized" and disk.cid is None
        for grain, data in grains.items():
            assert disk.read_at(grain * GRAIN, len(data)) == data
        assert disk.read_at(GRAIN, GRAIN) == bytes(GRAIN)
        assert disk.read_at(3 * GRAIN + 100, 10) == grains[3][100:110]  # sliced from a grain
        assert disk.check().exit_code == 0


def test_a_grain_marker_for_another_grain_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "hand.vmdk"
    _handmade_stream(path, {0: _pattern(1, GRAIN)}, 1024, zlib.compress)
    with FileSource(path) as src:
        first = parse_header(src).overhead * 512
    _patch(path, first, "<Q", 128)  # the marker now claims guest sector 128
    with imgbridge.open(path) as disk, pytest.raises(InvalidImageError, match="marker for sec"):
        disk.read_at(0, 512)
    with imgbridge.open(path) as disk:
        report = disk.check()
    assert report.exit_code == 2 and any("sector 128" in m for m in report.messages)


# ---- hostile and truncated input ------------------------------------------------------------

HOSTILE = [
    ("capacity", 12, "<Q", (1 << 50,), InvalidImageError, "capacity of .* is absurd"),
    ("grain directory", 12, "<QQ", (1 << 37, 1), InvalidImageError, "grain directory would"),
    ("gtes per gt", 44, "<I", (256,), InvalidImageError, "numGTEsPerGT is 256"),
    ("grain not power of two", 20, "<Q", (3,), InvalidImageError, "grain size of 3"),
    ("grain absurd", 20, "<Q", (1 << 20,), InvalidImageError, "grain size of 1048576"),
    ("descriptor size", 36, "<Q", (1 << 30,), InvalidImageError, "embedded descriptor of"),
    ("gd past the end", 56, "<Q", (1 << 30,), InvalidImageError, "grain directory at sector"),
    ("gd at sector 0", 56, "<Q", (0,), InvalidImageError, "offset is 0"),
    ("gd at end, no footer", 56, "<Q", (S.GD_AT_END,), InvalidImageError, "footer"),
    ("version", 4, "<I", (4,), UnsupportedFeatureError, "version 4"),
    ("incompatible flag", 8, "<I", (3 | 1 << 20,), UnsupportedFeatureError, "incompatible"),
    ("markers without compression", 8, "<I", (3 | 1 << 17,), InvalidImageError, "markers"),
    ("compression algorithm", 77, "<H", (7,), UnsupportedFeatureError, "algorithm 7"),
    ("text-mode transfer", 75, "<B", (0x0A,), InvalidImageError, "text-mode transfer"),
    ("COWD", 0, "<4s", (b"COWD",), UnsupportedFeatureError, "COWD"),
]


@pytest.mark.parametrize("case", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_headers_are_refused_before_anything_is_allocated(
        case: tuple[Any, ...], tmp_path: Path, small_raw: Path, cli: Any) -> None:
    _, offset, fmt, values, error, message = case
    path = _small_vmdk(tmp_path, small_raw)
    _patch(path, offset, fmt, *values)
    with pytest.raises(error, match=message):
        imgbridge.open(path, format="vmdk")
    result = cli("inspect", "-f", "vmdk", path)
    assert result.code == 1 and result.out == ""
    assert len(result.err.strip().splitlines()) == 1, result.err


def test_truncated_images(tmp_path: Path, small_raw: Path) -> None:
    sparse = _small_vmdk(tmp_path, small_raw)
    stream = _small_vmdk(tmp_path, small_raw, "streamOptimized", "stream.vmdk")
    flat = _small_vmdk(tmp_path, small_raw, "monolithicFlat", "flat.vmdk")
    header_only = tmp_path / "header.vmdk"
    header_only.write_bytes(sparse.read_bytes()[:100])
    with pytest.raises(InvalidImageError, match="truncated: VMDK sparse extent header"):
        imgbridge.open(header_only, format="vmdk")
    metadata_cut = tmp_path / "cut.vmdk"
    metadata_cut.write_bytes(sparse.read_bytes()[:32 * KiB])
    with pytest.raises(InvalidImageError, match=r"shorter than the .* metadata"):
        imgbridge.open(metadata_cut)
    data = stream.read_bytes()
    stream.write_bytes(data[:len(data) - 600])
    with pytest.raises(InvalidImageError, match="does not end with a footer marker"):
        imgbridge.open(stream)
    with open(tmp_path / "flat-flat.vmdk", "r+b") as f:
        f.truncate(MiB)
    with pytest.raises(InvalidImageError, match=r"needs .* bytes but its file has"):
        imgbridge.open(flat)
    # Grains past the end of a cut sparse file read as zeros (as in QEMU); check says so.
    whole = sparse.read_bytes()
    sparse.write_bytes(whole[:len(whole) - GRAIN - 100])
    with imgbridge.open(sparse) as disk:
        assert disk.read_at(0, 4096) == _pattern(1, 4096)
        assert disk.read_at(SMALL_SIZE - 1000, 1000) == bytes(1000)
        report = disk.check()
    assert report.exit_code == 2 and any("past the end" in m for m in report.messages)


def test_descriptor_files_that_are_not_descriptors(tmp_path: Path) -> None:
    big = tmp_path / "big.vmdk"
    big.write_bytes(b"version=1\n" + b"#" * (2 * MiB))
    with pytest.raises(InvalidImageError, match="too large to be a descriptor"):
        imgbridge.open(big, format="vmdk")
    binary = tmp_path / "bin.vmdk"
    binary.write_bytes(b"version=1\n\x00\x01\x02junk")
    with pytest.raises(InvalidImageError, match="binary data"):
        imgbridge.open(binary, format="vmdk")
    empty = tmp_path / "none.vmdk"
    empty.write_text('version=1\ncreateType="monolithicFlat"\n')
    with pytest.raises(InvalidImageError, match="lists no extents"):
        imgbridge.open(empty)


# ---- descriptor files: extents, the resolver ------------------------------------------------

def _descriptor_file(folder: Path, lines: list[str], create_type: str = "monolithicFlat",
                     name: str = "d.vmdk", extra: str = "") -> Path:
    path = folder / name
    path.write_text(f'# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n'
                    f'createType="{create_type}"\n{extra}\n' + "\n".join(lines) + "\n")
    return path


def test_flat_zero_and_vmfs_extents_with_offsets(tmp_path: Path) -> None:
    (tmp_path / "data.bin").write_bytes(b"J" * MiB + _pattern(1, MiB))
    (tmp_path / "vmfs.bin").write_bytes(_pattern(2, 4096))
    path = _descriptor_file(tmp_path, ['RW 2048 FLAT "data.bin" 2048', "RW 16 ZERO",
                                       'RDONLY 8 VMFS "vmfs.bin"'])
    with imgbridge.open(path) as disk:
        assert disk.size == MiB + 8192 + 4096
        assert disk.read_at(0, MiB) == _pattern(1, MiB)
        assert disk.read_at(MiB, 8192) == bytes(8192)
        assert disk.read_at(MiB + 8192, 4096) == _pattern(2, 4096)
        kinds = [(e.offset, e.kind) for e in disk.extents()]
        assert (MiB, ExtentKind.ZERO) in kinds
        info = disk.info()["format-specific"]["data"]
        assert [e["format"] for e in info["extents"]] == ["FLAT", "ZERO", "VMFS"]


def test_missing_and_outside_extents(tmp_path: Path) -> None:
    inside = tmp_path / "img"
    inside.mkdir()
    (tmp_path / "outside.bin").write_bytes(_pattern(3, 4096))
    missing = _descriptor_file(inside, ['RW 8 FLAT "gone.bin" 0'], name="missing.vmdk")
    with pytest.raises(MissingCompanionError, match=r"'gone\.bin' not found"):
        imgbridge.open(missing)
    outside = _descriptor_file(inside, ['RW 8 FLAT "../outside.bin" 0'], name="out.vmdk")
    with pytest.raises(MissingCompanionError, match="outside the image's folder"):
        imgbridge.open(outside)
    with imgbridge.open(outside, allow_outside=True) as disk:
        assert disk.read_at(0, 4096) == _pattern(3, 4096)
    absolute = _descriptor_file(inside, [f'RW 8 FLAT "{tmp_path / "outside.bin"}" 0'],
                                name="abs.vmdk")
    with pytest.raises(MissingCompanionError, match="outside the image's folder"):
        imgbridge.open(absolute)
    itself = _descriptor_file(inside, ['RW 1 FLAT "self.vmdk" 0'], name="self.vmdk")
    with pytest.raises(InvalidImageError, match="names the descriptor file itself"):
        imgbridge.open(itself)


@pytest.mark.parametrize("line, create_type, message", [
    ('RW 8 VMFSSPARSE "x.bin"', "vmfsSparse", "vmfsSparse \\(COWD\\) extents"),
    ('RW 8 SESPARSE "x.bin"', "seSparse", "seSparse extents"),
    ('RW 8 VMFSRDM "x.bin"', "vmfsRawDeviceMap", "raw device mappings"),
    ('RW 8 FLAT "x.bin" 0', "fullDevice", "fullDevice disks"),
    ('NOACCESS 8 FLAT "x.bin" 0', "monolithicFlat", "NOACCESS"),
    ('RW 8 WEIRD "x.bin"', "monolithicFlat", "unknown type 'WEIRD'"),
])
def test_unsupported_extents_are_named(line: str, create_type: str, message: str,
                                       tmp_path: Path) -> None:
    (tmp_path / "x.bin").write_bytes(bytes(4096))
    path = _descriptor_file(tmp_path, [line], create_type)
    with pytest.raises(UnsupportedFeatureError, match=message):
        imgbridge.open(path)


def test_sparse_extent_size_must_match_its_line(tmp_path: Path, small_raw: Path) -> None:
    _small_vmdk(tmp_path, small_raw, name="part.vmdk")
    path = _descriptor_file(tmp_path, ['RW 64 SPARSE "part.vmdk"'], "twoGbMaxExtentSparse")
    with pytest.raises(InvalidImageError, match="64 sectors but its header says"):
        imgbridge.open(path)


# ---- sparse-extent features -------------------------------------------------------------------

def test_zeroed_grain_entries_read_as_zero(tmp_path: Path, small_raw: Path) -> None:
    path = _small_vmdk(tmp_path, small_raw)
    gt, rgt = _gt_sectors(path)
    for sector in (gt, rgt):
        assert sector is not None
        _patch(path, sector * 512, "<I", S.GTE_ZEROED)  # grain 0
    _patch(path, 8, "<I", 3 | S.FLAG_ZEROED_GRAIN_GTE)
    with imgbridge.open(path) as disk:
        assert disk.read_at(0, GRAIN) == bytes(GRAIN)
        first = next(iter(disk.extents()))
        assert (first.kind, first.present, first.length) == (ExtentKind.ZERO, True, GRAIN)


def test_redundant_grain_tables_stand_in_for_a_bad_primary(tmp_path: Path,
                                                           small_raw: Path) -> None:
    path = _small_vmdk(tmp_path, small_raw)
    with FileSource(path) as src:
        h = parse_header(src)
    _patch(path, h.gd_offset * 512, "<I", 0x7FFFFFFF)  # primary GD entry 0: past the end
    with imgbridge.open(path) as disk:
        assert disk.read_at(0, SMALL_SIZE) == _expected(SMALL_SIZE, SMALL_RUNS)
        report = disk.check()
    assert report.exit_code == 2
    assert any("lies past the end" in m for m in report.messages)
    assert any("redundant copy" in n for n in report.notes)


def _check(path: Path) -> Any:
    with imgbridge.open(path) as disk:
        return disk.check()


def test_check_finds_corruptions_and_leaks(tmp_path: Path, small_raw: Path) -> None:
    clean = _small_vmdk(tmp_path, small_raw)
    report = _check(clean)
    assert report.exit_code == 0 and report.allocated_clusters == 7
    original = clean.read_bytes()
    gt, rgt = _gt_sectors(clean)
    assert rgt is not None
    entry1 = struct.unpack_from("<I", original, gt * 512 + 4)[0]

    def variant(name: str, patches: list[tuple[int, int]]) -> Path:
        path = tmp_path / name
        path.write_bytes(original)
        for offset, value in patches:
            _patch(path, offset, "<I", value)
        return path

    past_end = variant("past.vmdk", [(gt * 512, 0xFFFFFF00), (rgt * 512, 0xFFFFFF00)])
    report = _check(past_end)
    assert report.exit_code == 2 and any("past the end" in m for m in report.messages)
    overlap = variant("overlap.vmdk", [(gt * 512, entry1), (rgt * 512, entry1)])
    report = _check(overlap)
    assert report.exit_code == 2 and any("overlap" in m for m in report.messages)
    misaligned = variant("misaligned.vmdk", [(gt * 512 + 4, entry1 + 3),
                                             (rgt * 512 + 4, entry1 + 3)])
    report = _check(misaligned)
    assert any("not aligned to a grain" in m for m in report.messages)
    disagree = variant("disagree.vmdk", [(gt * 512 + 4, 0)])
    report = _check(disagree)
    assert report.exit_code == 2
    assert any("redundant grain table 0 disagrees" in m for m in report.messages)
    leaked = variant("leak.vmdk", [(gt * 512 + 4, 0), (rgt * 512 + 4, 0)])
    report = _check(leaked)
    assert (report.exit_code, report.leaks, report.corruptions) == (3, 1, 0)
    with imgbridge.open(leaked) as disk, pytest.raises(UnsupportedFeatureError,
                                                       match="repairing"):
        disk.check("leaks")


def test_check_on_flat_disks_says_there_is_nothing_to_check(tmp_path: Path,
                                                            small_raw: Path) -> None:
    report = _check(_small_vmdk(tmp_path, small_raw, "monolithicFlat"))
    assert report.exit_code == 0 and "no grain tables" in report.notes[0]


# ---- delta disks ------------------------------------------------------------------------------

def _make_delta(folder: Path, parent: Path, parent_cid: int, hint: str,
                runs: list[tuple[int, bytes]]) -> Path:
    """A monolithicSparse child whose embedded descriptor names ``hint`` as its parent."""
    raw = make_sparse_file(folder / "child.raw", SMALL_SIZE, runs)
    with RawDisk(FileSource(raw)) as src:
        child = _write(src, folder / "child.vmdk")
    with FileSource(child) as f:
        h = parse_header(f)
        text = f.read_at(h.descriptor_offset * 512, h.descriptor_size * 512).split(b"\0")[0]
    text = text.replace(b"parentCID=ffffffff", f"parentCID={parent_cid:08x}".encode())
    text = text.replace(b"createType=", f'parentFileNameHint="{hint}"\ncreateType='.encode())
    with open(child, "r+b") as f:
        f.seek(h.descriptor_offset * 512)
        f.write(text.ljust(h.descriptor_size * 512, b"\0"))
    return child


def test_delta_disks_read_through_their_parent(tmp_path: Path, small_raw: Path) -> None:
    parent = _small_vmdk(tmp_path, small_raw, name="parent.vmdk")
    with imgbridge.open(parent) as p:
        parent_cid = p.cid
    assert parent_cid is not None
    child_runs = [(MiB + 10, b"child!" * 100)]
    child = _make_delta(tmp_path, parent, parent_cid, "parent.vmdk", child_runs)
    expected = bytearray(_expected(SMALL_SIZE, SMALL_RUNS))
    # The child's grain replaces the parent's whole grain (zeros around the child's bytes).
    expected[MiB:MiB + GRAIN] = _expected(GRAIN, [(10, b"child!" * 100)])
    with imgbridge.open(child) as disk:
        assert disk.backing is not None and disk.read_at(0, SMALL_SIZE) == bytes(expected)
        depths = {e.depth for e in disk.extents()}
        assert depths == {0, 1}
        info = disk.info()
        assert info["backing-filename"] == "parent.vmdk"
        assert info["backing-filename-format"] == "vmdk"
        assert info["format-specific"]["data"]["parent-cid"] == parent_cid


def test_delta_cid_mismatch_loops_and_outside_parents(tmp_path: Path, small_raw: Path) -> None:
    parent = _small_vmdk(tmp_path, small_raw, name="parent.vmdk")
    with imgbridge.open(parent) as p:
        assert p.cid is not None
        wrong = p.cid ^ 1
    child = _make_delta(tmp_path, parent, wrong, "parent.vmdk", [(0, b"x")])
    with pytest.raises(InvalidImageError, match=r"parentCID .* does not match the CID") as err:
        imgbridge.open(child)
    assert err.value.hint is not None and "ignore_cid=on" in err.value.hint
    with imgbridge.open(child, options={"ignore_cid": "on"}) as disk:
        assert disk.read_at(MiB, 16) == _pattern(3, 16)
    with pytest.raises(InvalidInputError, match="ignore_cid must be on or off"):
        imgbridge.open(child, options={"ignore_cid": "maybe"})

    loop_dir = tmp_path / "loop"
    loop_dir.mkdir()
    looped = _make_delta(loop_dir, parent, 1, "child.vmdk", [(0, b"x")])
    with pytest.raises(InvalidImageError, match="loop in the backing chain"):
        imgbridge.open(looped)

    far_dir = tmp_path / "far"
    far_dir.mkdir()
    far = _make_delta(far_dir, parent, wrong ^ 1, "../parent.vmdk", [(0, b"x")])
    with pytest.raises(MissingCompanionError, match="outside the image's folder"):
        imgbridge.open(far)
    with imgbridge.open(far, allow_outside=True) as disk:
        assert disk.read_at(MiB, 16) == _pattern(3, 16)


def test_compressed_grain_cache_serves_many_small_reads(tmp_path: Path,
                                                        small_raw: Path) -> None:
    path = _small_vmdk(tmp_path, small_raw, "streamOptimized")
    expected = _expected(SMALL_SIZE, SMALL_RUNS)
    with imgbridge.open(path) as disk:
        pieces = [disk.read_at(pos, 4096) for pos in range(MiB, MiB + 3 * GRAIN, 4096)]
    assert b"".join(pieces) == expected[MiB:MiB + 3 * GRAIN]


def test_bytes_source_reader(tmp_path: Path, small_raw: Path) -> None:
    """A monolithic sparse VMDK reads from any ByteSource, not only files."""
    path = _small_vmdk(tmp_path, small_raw)
    from imgbridge.resolver import CompanionResolver

    disk = vmdk.open(BytesSource(path.read_bytes(), str(path)), CompanionResolver(str(path)), {})
    with disk:
        assert disk.read_at(700 * KiB + 100, 5000) == _pattern(2, 5000)


def test_split_extents_share_one_grain_table_cache(tmp_path: Path) -> None:
    # A disk split into many extents must hold GT_CACHE_TABLES tables in all, not per extent.
    gib = 1 << 30
    src = make_sparse_file(tmp_path / "src.raw", 2 * gib + (1 << 20),
                           [(4096, b"first extent"), (2 * gib + 8192, b"second extent")])
    out = tmp_path / "split.vmdk"
    imgbridge.convert(src, out, format="raw", options={"subformat": "twoGbMaxExtentSparse"},
                      sync=False)
    with imgbridge.open(out) as disk:
        assert disk.read_at(2 * gib + 8192, 13) == b"second extent"
        sparse = [e for e in disk.extent_list if hasattr(e, "grain_table")]
        assert len(sparse) == 2
        assert len({id(e._gt_cache) for e in sparse}) == 1
