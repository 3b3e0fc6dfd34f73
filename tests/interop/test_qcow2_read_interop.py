"""qcow2 reading against QEMU: every image here is made by qemu-img and qemu-io at test time,
then read by imgbridge and by qemu-img, and the two must agree on the bytes a guest reads
(``qemu-img compare`` of both raw conversions), on ``info``, on ``map`` item for item and on
the backing chain. libyal's qcowinfo is a third opinion on the virtual size.

The matrix: compat 0.10 and 1.1; clusters of 512 B, 64 KiB and 2 MiB; refcount_bits 1, 16 and
64; compressed clusters (zlib, zstd, alone and overwritten in part); extended L2 with
sub-cluster writes and zero writes, alone, over a backing file and with a data file; external
data files with and without data_file_raw; a 3-deep backing chain with growing sizes and zero
writes that hide base data; a version 2 overlay; a raw backing file; a backing file named by
absolute path; a 1 TiB image with three writes; internal snapshots (by name and by id, before
and after a resize, v2 and v3); persistent bitmaps; a dirty image left by an aborted qemu-io
with lazy refcounts. The committed fixtures are read here too.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import FIXTURES, CliResult, require_tool, run_cli_process, run_tool

pytestmark = pytest.mark.interop

KiB = 1 << 10
MiB = 1 << 20

#: Writes every plain image gets: data runs that start and end off cluster boundaries, zero
#: writes inside data, a discard, whole zero clusters and the very last sector.
PLAIN_WRITES = [
    "write -P 0x11 0 100k",
    "write -P 0x22 1028k 300k",
    "write -z 1092k 64k",
    "write -P 0x33 3M 2M",
    "discard 3M 64k",
    "write -z 4M 512k",
    "write -P 0x44 6M 1536",
    f"write -P 0x55 {8 * MiB - 512} 512",
]

#: Sub-cluster writes for extended L2 (64 KiB clusters: 2 KiB sub-clusters): aligned and odd.
EXTL2_WRITES = [
    "write -P 0x61 68k 4k",
    "write -P 0x62 133k 3k",
    "write -P 0x63 1000k 1k",
    "write -z 200k 6k",
    "write -P 0x64 2M 96k",
    "write -z 2052k 2k",
    "discard 2080k 2k",
    "write -z 5M 64k",
]


@dataclass
class Case:
    """One image of the matrix. ``snapshots``: (our ``convert`` options, qemu-img's) pairs
    that select the same internal snapshot."""

    path: Path
    qcowinfo: bool = True  #: libqcow reads it (no extended L2, data file or zstd)
    snapshots: list[tuple[list[str], list[str]]] = field(default_factory=list)


def qio(path: Path, *commands: str, fmt: str = "qcow2") -> None:
    args: list[str] = ["qemu-io", "-f", fmt]
    for command in commands:
        args += ["-c", command]
    result = run_tool(*args, path, check=False)
    assert result.returncode == 0 and "error" not in result.stdout.lower() + result.stderr, \
        (commands, result.stdout, result.stderr)


def qimg(*args: str | os.PathLike[str]) -> str:
    return run_tool("qemu-img", *args).stdout


def create(path: Path, size: str, *opts: str, backing: str | None = None,
           backing_fmt: str = "qcow2") -> Path:
    args: list[str | os.PathLike[str]] = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", ",".join(opts)]
    if backing is not None:
        args += ["-b", backing, "-F", backing_fmt]
    qimg(*args, path, size)
    return path


def _mixed_raw(path: Path) -> Path:
    """A raw source for compression: compressible runs, incompressible runs, zeros."""
    qimg("create", "-q", "-f", "raw", path, "4M")
    qio(path, "write -P 0x71 0 200k", "write -P 0x72 1M 64k", "write -P 0x73 3M 1M",
        fmt="raw")
    noise = random.Random(7).randbytes(300 * KiB)  # does not compress: stored plainly
    with open(path, "r+b") as f:
        f.seek(1600 * KiB)
        f.write(noise)
        f.seek(2 * MiB + 12345)
        f.write(b"tail of a cluster" * 100)
    return path


def _build(root: Path) -> dict[str, Case]:
    cases: dict[str, Case] = {}

    # Plain images: every version x cluster size x refcount width.
    variants = [("0.10", 9, 16), ("0.10", 16, 16), ("0.10", 21, 16), ("1.1", 16, 16)]
    variants += [("1.1", bits, refbits) for bits in (9, 16, 21) for refbits in (1, 64)]
    for compat, bits, refbits in variants:
        name = f"v{2 if compat == '0.10' else 3}-c{1 << bits}-r{refbits}"
        path = create(root / f"{name}.qcow2", "8M", f"compat={compat}",
                      f"cluster_size={1 << bits}", f"refcount_bits={refbits}")
        qio(path, *PLAIN_WRITES)
        cases[name] = Case(path)

    # Compressed clusters, from a raw file, then partly overwritten (copy-on-write of a
    # compressed cluster) in some.
    src = _mixed_raw(root / "mixed.raw")
    for kind, bits, compat, overwrite in [("zlib", 16, "1.1", False), ("zlib", 16, "1.1", True),
                                          ("zstd", 16, "1.1", False), ("zstd", 16, "1.1", True),
                                          ("zlib", 9, "1.1", False), ("zstd", 21, "1.1", False),
                                          ("zlib", 16, "0.10", False), ("zstd", 12, "1.1", True)]:
        name = f"{kind}-c{1 << bits}-v{2 if compat == '0.10' else 3}" \
               f"{'-overwritten' if overwrite else ''}"
        path = root / f"{name}.qcow2"
        opts = f"compat={compat},cluster_size={1 << bits}"
        if kind == "zstd":
            opts += ",compression_type=zstd"
        qimg("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, src, path)
        if overwrite:
            qio(path, "write -P 0x7a 100k 4k", "write -z 1M 16k", "write -P 0x7b 3M 512")
        cases[name] = Case(path, qcowinfo=kind == "zlib")

    # Extended L2: sub-cluster allocation, zero sub-clusters, unallocated sub-clusters.
    for bits in (16, 21):
        name = f"extl2-c{1 << bits}"
        path = create(root / f"{name}.qcow2", "8M", "extended_l2=on", f"cluster_size={1 << bits}")
        qio(path, *EXTL2_WRITES)
        cases[name] = Case(path, qcowinfo=False)
    base = create(root / "extl2-base.qcow2", "4M")
    qio(base, "write -P 0xaa 0 3M")
    path = create(root / "extl2-overlay.qcow2", "4M", "extended_l2=on",
                  backing="extl2-base.qcow2")
    qio(path, *EXTL2_WRITES[:6])
    cases["extl2-overlay"] = Case(path, qcowinfo=False)

    # External data files.
    for raw_flag in ("off", "on"):
        name = f"datafile-raw-{raw_flag}"
        path = create(root / f"{name}.qcow2", "8M", f"data_file={name}.data",
                      f"data_file_raw={raw_flag}")
        qio(path, *PLAIN_WRITES)
        cases[name] = Case(path, qcowinfo=False)
    path = create(root / "datafile-extl2.qcow2", "4M", "data_file=datafile-extl2.data",
                  "extended_l2=on")
    qio(path, *EXTL2_WRITES[:6])
    cases["datafile-extl2"] = Case(path, qcowinfo=False)

    # A 3-deep chain, each layer larger than the one below, mixed cluster sizes, zero writes
    # and discards in the upper layers over data below.
    base = create(root / "chain-base.qcow2", "4M")
    qio(base, "write -P 0xb0 0 4M")
    mid = create(root / "chain-mid.qcow2", "6M", "cluster_size=4096", backing="chain-base.qcow2")
    qio(mid, "write -P 0xb1 512k 64k", "write -z 1M 100k", "write -P 0xb1 5M 4k",
        "discard 2M 64k")
    top = create(root / "chain-top.qcow2", "8M", backing="chain-mid.qcow2")
    qio(top, "write -P 0xb2 0 4k", "write -z 64k 128k", "write -P 0xb2 3M 70k",
        "write -z 2M 1M", "write -P 0xb2 7M 4k")
    cases["chain-base"] = Case(base)
    cases["chain-mid"] = Case(mid)
    cases["chain-top"] = Case(top)
    # A version 2 overlay: no zero flag, so zero writes become allocated zeros.
    v2 = create(root / "chain-v2top.qcow2", "6M", "compat=0.10", backing="chain-base.qcow2")
    qio(v2, "write -z 0 64k", "write -P 0xb3 1M 8k")
    cases["chain-v2top"] = Case(v2)
    # A raw backing file.
    raw_base = root / "raw-base.raw"
    qimg("create", "-q", "-f", "raw", raw_base, "2M")
    qio(raw_base, "write -P 0xc0 0 2M", fmt="raw")
    over = create(root / "raw-backed.qcow2", "3M", backing="raw-base.raw", backing_fmt="raw")
    qio(over, "write -z 0 64k", "write -P 0xc1 1M 4k")
    cases["raw-backed"] = Case(over)
    # A backing file named by its absolute path (inside the folder, so no opt-in needed).
    over = create(root / "abs-backed.qcow2", "4M", backing=str(root / "chain-base.qcow2"))
    qio(over, "write -P 0xc2 2M 4k")
    cases["abs-backed"] = Case(over)

    # 1 TiB, three small writes far apart: the map must not walk what is not there.
    path = create(root / "huge-sparse.qcow2", "1T")
    qio(path, "write -P 0xc3 0 4k", "write -P 0xc4 600G 64k",
        f"write -P 0xc5 {(1 << 40) - 4096} 4k")
    cases["huge-sparse"] = Case(path)

    # Internal snapshots: s1 at 4 MiB, then writes, a resize to 8 MiB, s2, more writes.
    for compat in ("0.10", "1.1"):
        name = f"snapshots-v{2 if compat == '0.10' else 3}"
        path = create(root / f"{name}.qcow2", "4M", f"compat={compat}")
        qio(path, "write -P 0xd1 0 1M", "write -P 0xd1 3M 64k")
        qimg("snapshot", "-c", "s1", path)
        qio(path, "write -P 0xd2 512k 1M", "write -z 3M 4k")
        if compat == "1.1":  # v2 snapshots record no disk size: QEMU refuses the resize
            qimg("resize", "-q", path, "8M")
        qimg("snapshot", "-c", "s2", path)
        qio(path, "write -P 0xd3 0 4k", "discard 1M 64k")
        snaps = [(["-l", "s1"], ["-l", "snapshot.name=s1"]),
                 (["-l", "1"], ["-l", "snapshot.id=1"]),
                 (["-l", "s2"], ["-l", "snapshot.name=s2"]),
                 (["-l", "2"], ["-l", "snapshot.id=2"])]
        cases[name] = Case(path, snapshots=snaps)

    # Persistent dirty bitmaps.
    path = create(root / "bitmaps.qcow2", "8M")
    qio(path, "write -P 0xe1 0 64k")
    qimg("bitmap", "--add", path, "b0")
    qimg("bitmap", "--add", "-g", "128k", "--disable", path, "b1")
    qio(path, "write -P 0xe2 1M 64k")
    cases["bitmaps"] = Case(path)

    # The dirty flag: lazy refcounts, and qemu-io aborts before it closes the image.
    path = create(root / "dirty.qcow2", "4M", "lazy_refcounts=on")
    result = run_tool("qemu-io", "-f", "qcow2", "-c", "write -P 0xf1 0 64k", "-c", "abort", path,
                      check=False)
    assert result.returncode != 0
    cases["dirty"] = Case(path)
    return cases


CASE_NAMES = [
    "v2-c512-r16", "v2-c65536-r16", "v2-c2097152-r16", "v3-c65536-r16",
    "v3-c512-r1", "v3-c512-r64", "v3-c65536-r1", "v3-c65536-r64", "v3-c2097152-r1",
    "v3-c2097152-r64",
    "zlib-c65536-v3", "zlib-c65536-v3-overwritten", "zstd-c65536-v3",
    "zstd-c65536-v3-overwritten", "zlib-c512-v3", "zstd-c2097152-v3", "zlib-c65536-v2",
    "zstd-c4096-v3-overwritten",
    "extl2-c65536", "extl2-c2097152", "extl2-overlay",
    "datafile-raw-off", "datafile-raw-on", "datafile-extl2",
    "chain-base", "chain-mid", "chain-top", "chain-v2top", "raw-backed", "abs-backed",
    "huge-sparse",
    "snapshots-v2", "snapshots-v3", "bitmaps", "dirty",
]


@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Case]]:
    """Every image of the matrix, made once, in one folder.

    QEMU 7.2 opens a relative external data file name from its current directory, not from
    the image's folder (imgbridge uses the folder), so QEMU's tools run from the images'
    folder, for the whole module.
    """
    require_tool("qemu-img")
    require_tool("qemu-io")
    root = tmp_path_factory.mktemp("qcow2")
    with _cwd(root):
        cases = _build(root)
        assert sorted(cases) == sorted(CASE_NAMES)
        yield cases


def test_the_matrix_is_what_it_claims(images: dict[str, Case]) -> None:
    """Guard against a qemu-img that silently ignores an option: the images differ as meant."""
    def specific(name: str) -> dict[str, Any]:
        info = json.loads(qimg("info", "--output=json", images[name].path))
        data: dict[str, Any] = info["format-specific"]["data"]
        return data

    assert specific("v2-c512-r16")["compat"] == "0.10"
    assert specific("v3-c512-r1")["refcount-bits"] == 1
    assert specific("v3-c2097152-r64")["refcount-bits"] == 64
    assert specific("zstd-c65536-v3")["compression-type"] == "zstd"
    assert specific("extl2-c65536")["extended-l2"] is True
    assert specific("datafile-raw-on")["data-file-raw"] is True
    assert specific("bitmaps")["bitmaps"]
    assert json.loads(qimg("info", "--output=json", images["dirty"].path))["dirty-flag"] is True
    assert len(json.loads(qimg("info", "--output=json",
                               images["snapshots-v3"].path))["snapshots"]) == 2
    # Compressed clusters really are there (qemu-img map prints no offset for them).
    items = json.loads(qimg("map", "--output=json", images["zstd-c65536-v3"].path))
    assert any(i["data"] and "offset" not in i for i in items)


# ---- conversion -----------------------------------------------------------------------------

def _assert_identical(ours: Path, theirs: Path) -> None:
    result = run_tool("qemu-img", "compare", "-f", "raw", "-F", "raw", ours, theirs, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Images are identical" in result.stdout
    assert ours.stat().st_size == theirs.stat().st_size


@pytest.mark.parametrize("name", CASE_NAMES)
def test_convert_to_raw_matches_qemu_img(name: str, images: dict[str, Case], tmp_path: Path,
                                         cli: Callable[..., CliResult]) -> None:
    case = images[name]
    theirs = tmp_path / "theirs.raw"
    qimg("convert", "-f", "qcow2", "-O", "raw", case.path, theirs)
    ours = tmp_path / "ours.raw"
    result = cli("convert", "-q", "--no-sync", "-O", "raw", case.path, ours)
    assert result.code == 0, result.err
    _assert_identical(ours, theirs)


@pytest.mark.parametrize("name", ["snapshots-v2", "snapshots-v3"])
def test_convert_snapshot_matches_qemu_img(name: str, images: dict[str, Case], tmp_path: Path,
                                           cli: Callable[..., CliResult]) -> None:
    case = images[name]
    assert case.snapshots
    for ours_opt, theirs_opt in case.snapshots:
        theirs = tmp_path / "theirs.raw"
        qimg("convert", "-f", "qcow2", "-O", "raw", *theirs_opt, case.path, theirs)
        ours = tmp_path / "ours.raw"
        result = cli("convert", "-q", "--no-sync", "-O", "raw", *ours_opt, case.path, ours)
        assert result.code == 0, result.err
        # qemu-img convert -l keeps today's virtual size; we give the disk as it was when the
        # snapshot was taken (its recorded size): the same bytes, ours may end earlier.
        compared = run_tool("qemu-img", "compare", "-f", "raw", "-F", "raw", ours, theirs,
                            check=False)
        assert compared.returncode == 0, (ours_opt, compared.stdout, compared.stderr)
        snap_id = ours_opt[1]
        if name == "snapshots-v3" and snap_id in ("s1", "1"):
            assert ours.stat().st_size == 4 * MiB
        else:
            assert ours.stat().st_size == theirs.stat().st_size
    # Snapshot 1 really differs from the active layer (or the test above proves nothing).
    active = tmp_path / "active.raw"
    qimg("convert", "-f", "qcow2", "-O", "raw", case.path, active)
    qimg("convert", "-f", "qcow2", "-O", "raw", "-l", "snapshot.id=1", case.path,
         tmp_path / "s1.raw")
    assert run_tool("qemu-img", "compare", "-f", "raw", "-F", "raw", active, tmp_path / "s1.raw",
                    check=False).returncode == 1


def test_unknown_snapshot_is_one_line(images: dict[str, Case], tmp_path: Path,
                                      cli: Callable[..., CliResult]) -> None:
    result = cli("convert", "-O", "raw", "-l", "nope", images["snapshots-v3"].path,
                 tmp_path / "x.raw")
    assert result.code == 1
    assert result.err.count("\n") == 1 and "nope" in result.err and "s1" in result.err
    assert not (tmp_path / "x.raw").exists()


def test_a_real_process_converts_a_chain(images: dict[str, Case], tmp_path: Path) -> None:
    """Once through ``python -m imgbridge`` (the rest run the same CLI in-process)."""
    theirs = tmp_path / "theirs.raw"
    qimg("convert", "-f", "qcow2", "-O", "raw", images["chain-top"].path, theirs)
    result = run_cli_process("convert", "-q", "--no-sync", "-O", "raw", images["chain-top"].path,
                             tmp_path / "ours.raw")
    assert result.returncode == 0, result.stderr
    _assert_identical(tmp_path / "ours.raw", theirs)


# ---- info -----------------------------------------------------------------------------------

INFO_KEYS = ("virtual-size", "format", "cluster-size", "backing-filename",
             "backing-filename-format", "dirty-flag", "format-specific", "snapshots")


def _info_agrees(ours: dict[str, Any], theirs: dict[str, Any], where: str) -> None:
    for key in INFO_KEYS:
        assert ours.get(key) == theirs.get(key), (where, key, ours.get(key), theirs.get(key))
    assert os.path.realpath(ours["filename"]) == os.path.realpath(theirs["filename"]), where
    if "full-backing-filename" in theirs:
        assert os.path.realpath(ours["full-backing-filename"]) == \
            os.path.realpath(theirs["full-backing-filename"]), where


@pytest.mark.parametrize("name", CASE_NAMES)
def test_inspect_json_matches_qemu_img_info(name: str, images: dict[str, Case],
                                            cli: Callable[..., CliResult]) -> None:
    path = images[name].path
    result = cli("inspect", "--json", path)
    assert result.code == 0, result.err
    theirs = json.loads(qimg("info", "--output=json", path))
    _info_agrees(json.loads(result.out), theirs, name)


@pytest.mark.parametrize("name", ["chain-top", "chain-mid", "chain-v2top", "raw-backed",
                                  "abs-backed", "extl2-overlay", "v3-c65536-r16"])
def test_inspect_backing_chain_matches_qemu_img(name: str, images: dict[str, Case],
                                                cli: Callable[..., CliResult]) -> None:
    path = images[name].path
    result = cli("inspect", "--backing-chain", "--json", path)
    assert result.code == 0, result.err
    ours = json.loads(result.out)
    theirs = json.loads(qimg("info", "--backing-chain", "--output=json", path))
    assert len(ours) == len(theirs) == (3 if name == "chain-top" else
                                        1 if name.startswith("v3") else 2)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        _info_agrees(a, b, f"{name} layer {i}")


# ---- map ------------------------------------------------------------------------------------

def _host_holes_as_data(items: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    """qemu-img's map with its host-file probe undone.

    When QEMU decides an image has "metadata preallocation" (far more clusters refcounted than
    the host file has blocks: block/qcow2.c, qcow2_detect_metadata_preallocation), it asks the
    host file about every data run and prints ``"zero": true, "data": true`` where the file has
    a hole. Our map reports what the qcow2 metadata says (data). Check that each such item
    really is a hole in the host file, then read it as plain data and merge as qemu-img would.
    """
    from imgbridge.source import FileSource

    out: list[dict[str, Any]] = []
    with FileSource(path) as host:
        for item in items:
            item = dict(item)
            if item["data"] and item["zero"]:
                holes = [r for r in host.runs(item["offset"], item["length"]) if r.data]
                assert not holes, f"{path.name}: zero data at {item} is not a host hole"
                item["zero"] = False
            last = out[-1] if out else None
            if last is not None and all(last[k] == item[k]
                                        for k in ("depth", "present", "zero", "data")) \
                    and last["start"] + last["length"] == item["start"] \
                    and ("offset" in last) == ("offset" in item) \
                    and ("offset" not in last
                         or last["offset"] + last["length"] == item["offset"]):
                last["length"] += item["length"]
            else:
                out.append(item)
    return out


@pytest.mark.parametrize("name", CASE_NAMES)
def test_map_json_matches_qemu_img(name: str, images: dict[str, Case],
                                   cli: Callable[..., CliResult]) -> None:
    path = images[name].path
    result = cli("map", "--json", path)
    assert result.code == 0, result.err
    ours = json.loads(result.out)
    theirs = _host_holes_as_data(json.loads(qimg("map", "--output=json", path)), path)
    assert len(ours) == len(theirs), (ours, theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert a == b, (name, a, b)


# ---- a third opinion: libyal's qcowinfo ---------------------------------------------------------

def _qcowinfo_size(path: Path) -> int | None:
    result = run_tool("qcowinfo", path, check=False)
    for line in result.stdout.splitlines():
        if "Media size" in line:
            return int(line.split("(")[1].split()[0])
    return None


def test_qcowinfo_agrees_on_virtual_size(images: dict[str, Case],
                                         cli: Callable[..., CliResult]) -> None:
    require_tool("qcowinfo")
    supported = [name for name in CASE_NAMES if images[name].qcowinfo]
    assert len(supported) > 20
    for name in CASE_NAMES:
        theirs = _qcowinfo_size(images[name].path)
        if not images[name].qcowinfo:
            # libqcow refuses what it does not know (extended L2, data files, zstd): make sure
            # that is why it said nothing, so the list above stays honest.
            assert theirs is None, f"qcowinfo now reads {name}: add it to the checked list"
            continue
        ours = json.loads(cli("inspect", "--json", images[name].path).out)
        assert theirs == ours["virtual-size"], name


# ---- the committed fixtures -----------------------------------------------------------------

COMMITTED = ["small.qcow2", "compressed-zstd.qcow2", "chain-base.qcow2", "chain-top.qcow2",
             "small-gpt.qcow2"]


def test_the_committed_fixtures_are_all_listed() -> None:
    assert sorted(p.name for p in FIXTURES.glob("*.qcow2")) == sorted(COMMITTED)


@pytest.mark.parametrize("name", COMMITTED)
def test_committed_fixture_reads_like_qemu_img(name: str, tmp_path: Path,
                                               cli: Callable[..., CliResult]) -> None:
    require_tool("qemu-img")
    path = FIXTURES / name
    theirs = tmp_path / "theirs.raw"
    qimg("convert", "-f", "qcow2", "-O", "raw", path, theirs)
    ours = tmp_path / "ours.raw"
    result = cli("convert", "-q", "--no-sync", "-O", "raw", path, ours)
    assert result.code == 0, result.err
    _assert_identical(ours, theirs)
    info = json.loads(cli("inspect", "--json", path).out)
    _info_agrees(info, json.loads(qimg("info", "--output=json", path)), name)
    chain = json.loads(cli("inspect", "--backing-chain", "--json", path).out)
    theirs_chain = json.loads(qimg("info", "--backing-chain", "--output=json", path))
    assert len(chain) == len(theirs_chain) == (2 if name == "chain-top.qcow2" else 1)
    for a, b in zip(chain, theirs_chain, strict=True):
        _info_agrees(a, b, name)


@pytest.mark.parametrize("name", COMMITTED)
def test_committed_fixture_map_like_qemu_img(name: str, cli: Callable[..., CliResult]) -> None:
    require_tool("qemu-img")
    path = FIXTURES / name
    ours = json.loads(cli("map", "--json", path).out)
    assert ours == json.loads(qimg("map", "--output=json", path))


def test_small_qcow2_holds_small_raw() -> None:
    compared = run_tool("qemu-img", "compare", "-f", "raw", "-F", "qcow2",
                        FIXTURES / "small.raw", FIXTURES / "small.qcow2", check=False)
    assert compared.returncode == 0, compared.stdout
    compared = run_tool("qemu-img", "compare", "-f", "raw", "-F", "qcow2",
                        FIXTURES / "small.raw", FIXTURES / "compressed-zstd.qcow2", check=False)
    assert compared.returncode == 0, compared.stdout
