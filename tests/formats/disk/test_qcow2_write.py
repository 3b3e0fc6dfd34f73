"""The qcow2 writer on its own: options, layout, refcounts, zero clusters, compression, backing.

Images are checked here by a small independent walker (struct, not our reader) that
recomputes every refcount from the L1/L2 tables; tests/interop/test_qcow2_write_interop.py
checks the same outputs with qemu-img.
"""

from __future__ import annotations

import itertools
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import CliResult, CountingSource, make_sparse_file
from imgbridge.converters.disk_to_disk import DiffDisk, EmptyDisk
from imgbridge.formats.disk import raw
from imgbridge.formats.disk.qcow2 import writer as W

import imgbridge
from imgbridge.errors import InvalidInputError, MissingCompanionError
from imgbridge.model.disk import BlockState, ExtentKind
from imgbridge.output import AtomicOutput
from imgbridge.source import FileSource

KiB, MiB = 1 << 10, 1 << 20
Cli = Callable[..., CliResult]


def _pattern(seed: int, n: int) -> bytes:
    block = bytes((seed * 31 + i * 7) % 251 + 1 for i in range(4096))
    return (block * (n // 4096 + 1))[:n]


def _text(n: int) -> bytes:
    """Compressible but not trivial: numbered lines."""
    out = b"".join(b"line %08d of some text that compresses\n" % i for i in range(n // 40 + 1))
    return out[:n]


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """8 MiB: text, a random-ish run, written zeros, a cluster half zero, an unaligned tail."""
    return make_sparse_file(tmp_path / "src.raw", 8 * MiB + 3 * KiB, [
        (0, _text(300 * KiB)),
        (1 * MiB, _pattern(1, 256 * KiB)),
        (2 * MiB, bytes(512 * KiB)),              # zeros that were written: still not stored
        (3 * MiB + 32 * KiB, _pattern(2, 4 * KiB)),  # one 4 KiB granule inside a 64k cluster
        (5 * MiB - 700, os.urandom(1400)),        # straddles a cluster boundary
        (8 * MiB + 1 * KiB, b"tail" * 256),
    ])


def _convert(src: Path, dst: Path, **options: str) -> Path:
    imgbridge.convert(src, dst, format="raw", output_format="qcow2", options=options)
    return dst


# ---- an independent walker ----------------------------------------------------------------

@dataclass
class Walk:
    version: int
    cluster_bits: int
    size: int
    refcount_bits: int
    incompatible: int
    header_length: int
    compression_type: int
    backing: str | None
    extensions: dict[int, bytes]
    l2_entries: dict[int, int] = field(default_factory=dict)  # guest cluster -> entry
    stored: dict[int, int] = field(default_factory=dict)  # host cluster -> refcount
    expected: dict[int, int] = field(default_factory=dict)
    file_size: int = 0


def walk(path: Path) -> Walk:
    data = path.read_bytes()
    (magic, version, backing_offset, backing_size, cluster_bits, size, _crypt, l1_size,
     l1_offset, rt_offset, rt_clusters, nb_snapshots, _) = struct.unpack_from(
        ">4sIQIIQIIQQIIQ", data)
    assert magic == b"QFI\xfb" and nb_snapshots == 0
    cs = 1 << cluster_bits
    incompatible, refcount_order, header_length, ctype = 0, 4, 72, 0
    if version == 3:
        incompatible, _, _, refcount_order, header_length = struct.unpack_from(">QQQII", data, 72)
        if header_length > 104:
            ctype = data[104]
    extensions: dict[int, bytes] = {}
    pos = header_length
    while True:
        kind, length = struct.unpack_from(">II", data, pos)
        if kind == 0:
            break
        extensions[kind] = data[pos + 8:pos + 8 + length]
        pos += 8 + (length + 7) // 8 * 8
    backing = data[backing_offset:backing_offset + backing_size].decode() \
        if backing_offset else None
    w = Walk(version, cluster_bits, size, 1 << refcount_order, incompatible, header_length,
             ctype, backing, extensions, file_size=len(data))

    def use(offset: int, length: int = cs) -> None:
        for c in range(offset // cs, (offset + length - 1) // cs + 1):
            w.expected[c] = w.expected.get(c, 0) + 1

    use(0)
    if l1_size:
        use(l1_offset, l1_size * 8)
    per_l2 = cs // 8
    for i in range(l1_size):
        l1e, = struct.unpack_from(">Q", data, l1_offset + 8 * i)
        l2 = l1e & 0x00FF_FFFF_FFFF_FE00
        if not l2:
            continue
        assert l1e >> 63 == 1, "an L2 table with refcount 1 needs the COPIED flag"
        use(l2)
        for j, entry in enumerate(struct.unpack_from(f">{per_l2}Q", data, l2)):
            if not entry:
                continue
            w.l2_entries[i * per_l2 + j] = entry
            if entry >> 62 & 1:  # compressed: offset in the low x bits, extra sectors above
                x = 62 - (cluster_bits - 8)
                host = entry & ((1 << x) - 1)
                extra = (entry & ((1 << 62) - 1)) >> x
                start = host & ~511
                use(start, (extra + 1) * 512)
            elif entry & 0x00FF_FFFF_FFFF_FE00:
                assert entry >> 63 == 1
                use(entry & 0x00FF_FFFF_FFFF_FE00)
    use(rt_offset, rt_clusters * cs)
    bits = w.refcount_bits
    per_block = cs * 8 // bits
    for i in range(rt_clusters * cs // 8):
        block, = struct.unpack_from(">Q", data, rt_offset + 8 * i)
        if not block:
            continue
        use(block)
        raw_block = data[block:block + cs]
        if bits >= 8:
            code = {8: "B", 16: "H", 32: "I", 64: "Q"}[bits]
            values = struct.unpack(f">{per_block}{code}", raw_block)
        else:
            values = tuple(raw_block[j * bits // 8] >> (j * bits % 8) & ((1 << bits) - 1)
                           for j in range(per_block))
        for j, value in enumerate(values):
            if value:
                w.stored[i * per_block + j] = value
    return w


def assert_consistent(w: Walk) -> None:
    """Every refcount is what the tables imply; nothing leaks, nothing is missing."""
    assert w.stored == w.expected
    cs = 1 << w.cluster_bits
    assert max(w.expected) * cs < w.file_size <= (max(w.expected) + 1) * cs


# ---- options ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("options", "message"), [
    ({"compat": "2"}, "compat must be 0.10 or 1.1"),
    ({"cluster_size": "3000"}, "power of two from 512 to 2M"),
    ({"cluster_size": "256"}, "power of two from 512 to 2M"),
    ({"cluster_size": "4M"}, "power of two from 512 to 2M"),
    ({"cluster_size": "lots"}, "is not a size"),
    ({"compression_type": "lz4"}, "zlib or zstd"),
    ({"compat": "0.10", "compression_type": "zstd"}, "needs compat=1.1"),
    ({"refcount_bits": "3"}, "refcount_bits must be"),
    ({"refcount_bits": "128"}, "refcount_bits must be"),
    ({"refcount_bits": "-16"}, "refcount_bits must be"),
    ({"compat": "0.10", "refcount_bits": "8"}, "only refcount_bits=16"),
    ({"compress": "maybe"}, "compress must be on or off"),
    ({"backing_file": ""}, "non-empty"),
    ({"backing_file": "x" * 1024}, "longer than 1023"),
    ({"backing_file": "b.raw", "backing_fmt": "floppy"}, "unknown format"),
    ({"backing_fmt": "raw"}, "needs backing_file"),
    ({"cluster_size": "512", "backing_file": "n" * 450}, "does not fit"),
])
def test_bad_options_are_refused_before_writing(options: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        W.parse_create_options(options)


def test_good_options() -> None:
    s = W.parse_create_options({"compat": "0.10", "cluster_size": "2M", "compress": "on"})
    assert (s.version, s.cluster_size, s.compress, s.refcount_bits) == (2, 2 * MiB, True, 16)
    s = W.parse_create_options({"cluster_size": "4k", "refcount_bits": "1",
                                "compression_type": "zstd"})
    assert (s.version, s.cluster_bits, s.refcount_order, s.compression_type) == (3, 12, 0, 1)
    assert W.parse_create_options({"cluster_size": "65536"}).cluster_bits == 16


@pytest.mark.parametrize(("text", "value"), [
    ("0", 0), ("1048576", MiB), ("64k", 64 * KiB), ("64K", 64 * KiB), ("2M", 2 * MiB),
    ("1.5M", 3 * MiB // 2), ("10G", 10 << 30), ("2T", 2 << 40), ("512b", 512), (" 4k ", 4096),
])
def test_sizes_in_qemu_notation(text: str, value: int) -> None:
    assert imgbridge.api.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "k", "-1", "1.3k", "1x", "1 2", "9E", "0x10"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(InvalidInputError):
        imgbridge.api.parse_size(text)


@pytest.mark.parametrize("args", [
    ["convert", "-f", "raw", "src.raw", "out.qcow2", "-o", "cluster_size=3000"],
    ["convert", "-f", "raw", "src.raw", "out.qcow2", "-o", "refcount_bits=3"],
    ["convert", "-f", "raw", "src.raw", "out.qcow2", "-o", "compat=0.10,compression_type=zstd"],
    ["convert", "-f", "raw", "src.raw", "out.qcow2", "-o", "lazy_refcounts=on"],
    ["convert", "-f", "raw", "src.raw", "out.raw", "-c"],
    ["convert", "-f", "raw", "src.raw", "out.raw", "-B", "src.raw"],
    ["convert", "-f", "raw", "src.raw", "out.qcow2", "-B", "missing.qcow2"],
    ["convert", "-f", "raw", "src.raw", "out.qcow2", "-B", "src.raw", "-o",
     "backing_file=other.raw"],
    ["create", "-f", "qcow2", "out.qcow2"],
    ["create", "-f", "qcow2", "out.qcow2", "1.3k"],
    ["create", "-f", "qcow2", "out.qcow2", "200G", "-o", "cluster_size=512"],
    ["create", "-f", "qcow2", "out.qcow2", "1M", "-o", "compat=1.0"],
    ["create", "-f", "raw", "-b", "src.raw", "out.raw"],
    ["create", "-f", "qcow2", "-b", "/etc/hostname", "out.qcow2"],
    ["create", "-f", "qcow2", "-b", "src.raw", "-F", "floppy", "out.qcow2"],
    ["create", "-f", "qcow2", "-F", "raw", "out.qcow2", "1M"],
    ["create", "out.unknown", "1M"],
])
def test_cli_errors_are_one_line_and_leave_nothing(cli: Cli, workdir: Path,
                                                   args: list[str]) -> None:
    make_sparse_file(workdir / "src.raw", MiB, [(0, b"x" * 4096)])
    before = sorted(os.listdir(workdir))
    result = cli(*args)
    assert result.code == 1, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imgbridge: error: "), result.err
    assert sorted(os.listdir(workdir)) == before


def test_option_help_lists_the_qcow2_options(cli: Cli, workdir: Path) -> None:
    result = cli("create", "-f", "qcow2", "x.qcow2", "-o", "help")
    assert result.code == 0
    for key in W.CREATE_OPTIONS:
        assert key in result.out
    assert not (workdir / "x.qcow2").exists()


# ---- layout, refcounts and content ---------------------------------------------------------

@pytest.mark.parametrize("options", [
    {},
    {"compat": "0.10"},
    {"cluster_size": "512"},
    {"cluster_size": "2M"},
    {"refcount_bits": "1"},
    {"refcount_bits": "2", "cluster_size": "4k"},
    {"refcount_bits": "64", "cluster_size": "1k"},
    {"compress": "on"},
    {"compress": "on", "compression_type": "zstd", "cluster_size": "16k"},
    {"compress": "on", "refcount_bits": "1", "cluster_size": "4k"},
    {"compress": "on", "compat": "0.10", "cluster_size": "512"},
])
def test_round_trip_and_refcounts(source: Path, tmp_path: Path, options: dict[str, str]) -> None:
    out = _convert(source, tmp_path / "out.qcow2", **options)
    w = walk(out)
    assert_consistent(w)
    assert w.size == -(-source.stat().st_size // 512) * 512
    assert imgbridge.compare(source, out, format_a="raw").identical
    with imgbridge.open(out) as disk:
        assert disk.read_at(5 * MiB - 700, 1400) == source.read_bytes()[5 * MiB - 700:5 * MiB + 700]
    compressed = [e for e in w.l2_entries.values() if e >> 62 & 1]
    assert bool(compressed) == (options.get("compress") == "on")


def test_zero_clusters_are_never_allocated(source: Path, tmp_path: Path) -> None:
    out = _convert(source, tmp_path / "out.qcow2")
    w = walk(out)
    cs = 64 * KiB
    # Only clusters with a non-zero byte have an L2 entry: the written zeros at 2 MiB have none.
    content = source.read_bytes()
    data_clusters = {c for c in range(-(-len(content) // cs))
                     if content[c * cs:(c + 1) * cs].strip(b"\0")}
    assert set(w.l2_entries) == data_clusters
    extents = imgbridge.allocation_map(out)
    zero_at_2m = [e for e in extents if e.offset <= 2 * MiB < e.end]
    assert zero_at_2m[0].kind is ExtentKind.ZERO and not zero_at_2m[0].present


def test_a_big_sparse_disk_stays_small(tmp_path: Path) -> None:
    src = make_sparse_file(tmp_path / "big.raw", 16 << 30, [(1 << 30, b"x" * MiB),
                                                           ((16 << 30) - 4096, b"end" * 1000)])
    out = _convert(src, tmp_path / "big.qcow2")
    assert out.stat().st_size < 2 * MiB
    assert_consistent(walk(out))
    assert imgbridge.compare(src, out, format_a="raw").identical


def test_zero_granules_inside_a_data_cluster_stay_holes(tmp_path: Path) -> None:
    src = make_sparse_file(tmp_path / "s.raw", 2 * MiB, [(i * MiB // 4, b"y" * 4096)
                                                         for i in range(8)])
    out = _convert(src, tmp_path / "s.qcow2", cluster_size="2M")
    with FileSource(out) as f:
        holes = [r for r in f.runs() if not r.data]
    if not holes:
        pytest.skip("this filesystem does not report holes (SEEK_HOLE)")
    # One 2 MiB data cluster holding 32 KiB of data: the host file stores about that much.
    assert out.stat().st_blocks * 512 < 512 * KiB




@pytest.mark.parametrize("compress", ["off", "on"])
def test_one_pass_over_the_source(tmp_path: Path, compress: str) -> None:
    src = make_sparse_file(tmp_path / "s.raw", 64 * MiB, [(3 * MiB, _text(5 * MiB)),
                                                           (40 * MiB, _pattern(3, 2 * MiB))])
    with FileSource(src) as f:
        data_runs = [r for r in f.runs() if r.data]
    counting = CountingSource(FileSource(src))
    with AtomicOutput(str(tmp_path / "o.qcow2")) as out:
        W.create(out, raw.RawDisk(counting), {"compress": compress}, lambda d, t: None)
        out.commit()
    covered = sorted(counting.reads)
    assert sum(n for _, n in covered) <= sum(r.length for r in data_runs) + 2 * 64 * KiB
    for (a, n), (b, _) in itertools.pairwise(covered):
        assert a + n <= b, "a byte was read twice"
    assert imgbridge.compare(src, tmp_path / "o.qcow2", format_a="raw").identical


def test_progress_reaches_the_end(source: Path, tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    imgbridge.convert(source, tmp_path / "o.qcow2", format="raw", progress=lambda d, t:
                      seen.append((d, t)), compress=True)
    size = source.stat().st_size
    assert seen[-1] == (size, size)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


# ---- header ---------------------------------------------------------------------------------

def test_header_like_qemus(source: Path, tmp_path: Path) -> None:
    w = walk(_convert(source, tmp_path / "v3.qcow2"))
    assert (w.version, w.header_length, w.compression_type, w.incompatible) == (3, 112, 0, 0)
    names = w.extensions[W.S.EXT_FEATURE_NAMES]
    assert len(names) == 8 * 48 and b"lazy refcounts" in names and b"dirty bit" in names
    w = walk(_convert(source, tmp_path / "z.qcow2", compress="on", compression_type="zstd"))
    assert (w.compression_type, w.incompatible) == (1, 8)
    w = walk(_convert(source, tmp_path / "v2.qcow2", compat="0.10"))
    assert (w.version, w.extensions) == (2, {})


def test_feature_table_gives_way_to_a_long_backing_name() -> None:
    name = "b" * 200
    settings = W.parse_create_options({"cluster_size": "512", "backing_file": name,
                                       "backing_fmt": "raw"})
    cluster = W.header_cluster(settings, MiB, 1, 512, 1024, 1)
    assert len(cluster) <= 512 and cluster.endswith(name.encode())
    assert b"lazy refcounts" not in cluster and b"raw" in cluster
    settings = W.parse_create_options({"backing_file": name})
    assert b"lazy refcounts" in W.header_cluster(settings, MiB, 1, 512, 1024, 1)


def test_refcount_packing_puts_entry_zero_in_the_low_bits() -> None:
    assert W.pack_refcounts(bytes([1, 0, 1, 1, 0, 0, 0, 1, 1]), 1) == bytes([0b10001101, 1])
    assert W.pack_refcounts(bytes([1, 2, 3, 0]), 2) == bytes([0b00111001])
    assert W.pack_refcounts(bytes([5, 15]), 4) == bytes([0xF5])
    assert W.pack_refcounts(bytes([1, 300 % 256]), 16) == b"\x00\x01\x00\x2c"
    assert W.pack_refcounts(bytes([7]), 64) == (7).to_bytes(8, "big")


def test_cluster_spans_mix_partial_clusters() -> None:
    D, Z, S = W._DATA, W._ZERO, W._SKIP
    runs = [(0, 100, S), (100, 50, Z), (150, 874, S), (1024, 2048, Z), (3072, 1000, D),
            (4072, 24, S)]
    assert list(W.cluster_spans(iter(runs), 1024, 64)) == [(0, 1, D), (1, 2, Z), (3, 1, D)]
    runs = [(0, 10 * 1024, D)]
    assert list(W.cluster_spans(iter(runs), 1024, 4)) == [(0, 4, D), (4, 4, D), (8, 2, D)]
    assert list(W.cluster_spans(iter([(0, 1500, S)]), 1024, 4)) == [(0, 2, S)]


# ---- compression ----------------------------------------------------------------------------

def _inflate_with_a_4k_window(blob: bytes, size: int) -> bytes:
    """Inflate as QEMU does (wbits=-12) but a little at a time, so that a back-reference
    further than 4 KiB cannot be served from the output buffer and must fail."""
    d = zlib.decompressobj(-12)
    out = b""
    while len(out) < size:
        piece = d.decompress(blob, 256)
        blob = d.unconsumed_tail
        if not piece:
            break
        out += piece
    return out


def test_deflate_keeps_to_a_4k_window() -> None:
    period = os.urandom(6000)  # repeats 6000 bytes apart: only a 32 KiB window could match
    cluster = (period * 12)[:64 * KiB]
    blob = W.make_compressor(W.S.COMPRESSION_ZLIB)(cluster)
    assert _inflate_with_a_4k_window(blob, len(cluster)) == cluster
    wide = zlib.compressobj(6, zlib.DEFLATED, -15)
    with pytest.raises(zlib.error, match="too far back"):
        _inflate_with_a_4k_window(wide.compress(cluster) + wide.flush(), len(cluster))


def test_compressed_clusters_inflate_with_qemus_window(source: Path, tmp_path: Path) -> None:
    out = _convert(source, tmp_path / "c.qcow2", compress="on")
    w = walk(out)
    data = out.read_bytes()
    original = source.read_bytes()
    cs = 1 << w.cluster_bits
    found = 0
    for guest, entry in w.l2_entries.items():
        if not entry >> 62 & 1:
            continue
        host = entry & ((1 << 54) - 1)
        blob = data[host:host + cs]
        expect = original[guest * cs:(guest + 1) * cs]
        expect += bytes(cs - len(expect))
        assert _inflate_with_a_4k_window(blob, cs)[:cs] == expect
        found += 1
    assert found >= 3


def test_incompressible_clusters_are_stored_plain(tmp_path: Path) -> None:
    src = make_sparse_file(tmp_path / "r.raw", MiB, [(0, os.urandom(256 * KiB)),
                                                     (512 * KiB, _text(256 * KiB))])
    w = walk(_convert(src, tmp_path / "r.qcow2", compress="on"))
    kinds = [e >> 62 & 1 for _, e in sorted(w.l2_entries.items())]
    assert kinds == [0] * 4 + [1] * 4
    assert_consistent(w)


def test_compressed_clusters_share_host_clusters_up_to_the_refcount_limit(
        tmp_path: Path) -> None:
    # 512 clusters of one repeated byte compress to about 100 bytes each: more would fit in a
    # host cluster than the refcount allows (3 with 2 bits; 255, our own cap, with 16).
    src = make_sparse_file(tmp_path / "a.raw", 32 * MiB, [(0, b"a" * 32 * MiB)])
    for bits, most in (("2", 3), ("16", 255)):
        w = walk(_convert(src, tmp_path / f"a{bits}.qcow2", compress="on", refcount_bits=bits))
        assert_consistent(w)
        assert max(w.stored.values()) == most
    assert imgbridge.compare(src, tmp_path / "a2.qcow2", format_a="raw").identical


# ---- backing files, create, -B ---------------------------------------------------------------

def test_create_an_overlay_stores_nothing(tmp_path: Path) -> None:
    base = _convert(make_sparse_file(tmp_path / "b.raw", 3 * MiB, [(MiB, b"b" * MiB)]),
                    tmp_path / "base.qcow2")
    imgbridge.create(tmp_path / "top.qcow2", backing="base.qcow2")
    w = walk(tmp_path / "top.qcow2")
    assert_consistent(w)
    assert (w.backing, w.extensions[W.S.EXT_BACKING_FORMAT], w.l2_entries) == \
        ("base.qcow2", b"qcow2", {})
    assert w.size == 3 * MiB
    assert imgbridge.compare(tmp_path / "top.qcow2", base).identical
    info = imgbridge.inspect(tmp_path / "top.qcow2")
    assert info["backing-filename"] == "base.qcow2"


def test_create_sizes_and_raw(tmp_path: Path) -> None:
    imgbridge.create(tmp_path / "x.raw", "1G", format="raw")
    assert (tmp_path / "x.raw").stat().st_size == 1 << 30
    assert (tmp_path / "x.raw").stat().st_blocks == 0
    imgbridge.create(tmp_path / "odd.qcow2", 1000)
    assert walk(tmp_path / "odd.qcow2").size == 1024
    imgbridge.create(tmp_path / "small.qcow2", "1M", backing="x.raw", backing_format="raw")
    assert walk(tmp_path / "small.qcow2").size == MiB


def test_create_base_is_found_from_the_new_images_folder(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "vm").mkdir()
    make_sparse_file(tmp_path / "vm" / "base.raw", MiB, [(0, b"z" * 4096)])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingCompanionError, match="not found") as err:
        imgbridge.create("vm/top.qcow2", backing="vm/base.raw")
    assert err.value.hint is not None and "folder" in err.value.hint
    imgbridge.create("vm/top.qcow2", backing="base.raw")
    assert walk(tmp_path / "vm" / "top.qcow2").backing == "base.raw"
    (tmp_path / "other").mkdir()
    with pytest.raises(MissingCompanionError, match="outside"):
        imgbridge.create("other/top.qcow2", backing=str(tmp_path / "vm" / "base.raw"))
    with pytest.raises(MissingCompanionError, match="outside"):
        imgbridge.create("other/top.qcow2", backing="../vm/base.raw")
    assert os.listdir(tmp_path / "other") == []
    imgbridge.create("other/top.qcow2", backing="../vm/base.raw", allow_outside=True)
    assert walk(tmp_path / "other" / "top.qcow2").backing == "../vm/base.raw"
    assert imgbridge.compare("other/top.qcow2", "vm/base.raw", format_b="raw",
                             allow_outside=True).identical


def test_empty_disk_is_all_unallocated() -> None:
    disk = EmptyDisk(10 * MiB)
    assert [r.state for r in disk.layer_runs()] == [BlockState.UNALLOCATED]
    assert disk.read_at(5 * MiB, 4) == bytes(4)


def _diff_states(source: Path, base: Path, granule: int) -> list[tuple[int, int, BlockState]]:
    with imgbridge.open(source, "raw") as s, imgbridge.open(base, "raw") as b:
        view = DiffDisk(s, b, granule=granule)
        runs = [(r.offset, r.length, r.state) for r in view.layer_runs()]
        assert view.read_at(0, s.size) == s.read_at(0, s.size)
    merged: list[tuple[int, int, BlockState]] = []
    for offset, length, state in runs:
        if merged and merged[-1][2] is state:
            merged[-1] = (merged[-1][0], merged[-1][1] + length, state)
        else:
            merged.append((offset, length, state))
    return merged


def test_diff_view_marks_equal_granules_unallocated(tmp_path: Path) -> None:
    g = 64 * KiB
    base = make_sparse_file(tmp_path / "base.raw", 8 * MiB, [(0, b"B" * 2 * MiB)])
    src = make_sparse_file(tmp_path / "src.raw", 9 * MiB, [
        (0, b"B" * 2 * MiB),                  # equal
        (g, b"C" * 10),                       # one granule differs
        (4 * g, bytes(g)),                    # zeros over base data: must read as zero
        (5 * MiB, b"new" * 100),              # data where the base has none
        (8 * MiB + 10, b"past the base"),     # beyond the base's end
    ])
    U, Z, D = BlockState.UNALLOCATED, BlockState.ZERO, BlockState.DATA
    assert _diff_states(src, base, g) == [
        (0, g, U), (g, g, D), (2 * g, 2 * g, U), (4 * g, g, Z), (5 * g, 5 * MiB - 5 * g, U),
        (5 * MiB, g, D), (5 * MiB + g, 3 * MiB - g, U), (8 * MiB, g, D),
        (8 * MiB + g, MiB - g, U)]


def test_convert_with_base_writes_only_the_difference(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    base = make_sparse_file(tmp_path / "base.raw", 8 * MiB, [(0, _text(6 * MiB))])
    changed = bytearray(base.read_bytes())
    changed[3 * MiB:3 * MiB + 5] = b"HELLO"
    changed[5 * MiB:5 * MiB + 128 * KiB] = bytes(128 * KiB)
    (tmp_path / "new.raw").write_bytes(bytes(changed))
    for compat in ("1.1", "0.10"):
        out = tmp_path / f"diff-{compat}.qcow2"
        imgbridge.convert("new.raw", out, format="raw", backing="base.raw",
                          options={"compat": compat})
        w = walk(out)
        assert_consistent(w)
        assert w.backing == "base.raw" and len(w.l2_entries) == 3
        zero_entries = [e for e in w.l2_entries.values() if e == W.S.L2E_ZERO]
        assert len(zero_entries) == (2 if compat == "1.1" else 0)
        assert imgbridge.compare("new.raw", out, format_a="raw").identical
    # -o backing_file= means the same as -B, as in qemu-img.
    imgbridge.convert("new.raw", "o.qcow2", format="raw", options={"backing_file": "base.raw"})
    assert len(walk(tmp_path / "o.qcow2").l2_entries) == 3


def test_backing_mode_keeps_the_sources_own_layer(tmp_path: Path) -> None:
    base = _convert(make_sparse_file(tmp_path / "b.raw", 4 * MiB, [(0, b"b" * 4 * MiB)]),
                    tmp_path / "base.qcow2")
    imgbridge.create(tmp_path / "top.qcow2", backing="base.qcow2")
    # The overlay's own layer is empty: converting it with the same backing file stores
    # nothing, while converting it alone stores the whole base.
    with imgbridge.open(tmp_path / "top.qcow2") as top:
        for options, entries in (({"backing_file": "base.qcow2"}, 0), ({}, 4 * MiB // 65536)):
            with AtomicOutput(str(tmp_path / "again.qcow2")) as out:
                W.create(out, top, options, lambda d, t: None)
                out.commit()
            assert len(walk(tmp_path / "again.qcow2").l2_entries) == entries
    assert imgbridge.compare(tmp_path / "again.qcow2", base).identical


def test_diff_view_does_not_read_what_the_source_leaves_to_the_same_base(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    make_sparse_file(tmp_path / "b.raw", 8 * MiB, [(0, _text(8 * MiB))])
    _convert(tmp_path / "b.raw", tmp_path / "base.qcow2")
    changed = bytearray((tmp_path / "b.raw").read_bytes())
    changed[MiB:MiB + 5] = b"HELLO"
    (tmp_path / "new.raw").write_bytes(bytes(changed))
    imgbridge.convert("new.raw", "top.qcow2", format="raw", backing="base.qcow2")
    with imgbridge.open("top.qcow2") as top, imgbridge.open("base.qcow2") as base:
        read: list[int] = []
        real = base.read_at

        def counting_read(offset: int, n: int) -> bytes:
            read.append(n)
            data: bytes = real(offset, n)
            return data

        monkeypatch.setattr(base, "read_at", counting_read)
        view = DiffDisk(top, base)
        states = [(r.offset, r.length, r.state) for r in view.layer_runs()]
        assert sum(read) <= 64 * KiB  # only the one cluster the top stores was compared
        assert [s for s in states if s[2] is not BlockState.UNALLOCATED] == \
            [(MiB, 64 * KiB, BlockState.DATA)]
