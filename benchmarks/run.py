#!/usr/bin/env python3
"""Side-by-side benchmarks: imgbridge against the tools it replaces, in one run, as ratios.

Usage: python benchmarks/run.py [--repeat N] [--only NAME] [--workdir DIR]

Each case runs our command and the peer's on the same input, takes the median wall time of N
runs and the peak RSS of the process, and prints ``ratio = ours / theirs`` (below 1: we are
faster). Inputs are built at run time with independent tools (mke2fs, qemu-img;
debootstrap and umoci for a Debian image). Nothing here
is a test: figures go in the issue notes, never into assertions.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20


@dataclass
class Case:
    name: str
    ours: list[str]
    theirs: list[str]
    peer: str
    cleanup: list[Path]


GNU_TIME = "/usr/bin/time"


def run_once(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes, 0 if unknown) of one run of ``cmd``.

    The peak RSS comes from GNU time, not from our own wait4: a child forked from this Python
    process inherits its high-water mark, which would hide a small peer's true peak.
    """
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss_file:
        wrapped = cmd
        if os.path.exists(GNU_TIME):
            wrapped = [GNU_TIME, "-f", "%M", "-o", rss_file.name, *cmd]
        start = time.perf_counter()
        proc = subprocess.run(wrapped, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"benchmark command failed ({proc.returncode}): {' '.join(cmd)}\n"
                             f"{proc.stderr.decode(errors='replace')}")
        text = rss_file.read().strip().splitlines()
        kib = int(text[-1]) if text and text[-1].isdigit() else 0
    return elapsed, kib * 1024


def measure(cmd: list[str], repeat: int, cleanup: list[Path]) -> tuple[float, int]:
    times, peak = [], 0
    for _ in range(repeat):
        for path in cleanup:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)  # an extracted tree
            else:
                path.unlink(missing_ok=True)
        elapsed, rss = run_once(cmd)
        times.append(elapsed)
        peak = max(peak, rss)
    return statistics.median(times), peak


def build_filesystem_disk(work: Path, data_mib: int = 200, disk: str = "1G") -> Path:
    """A raw disk holding a real ext4 filesystem with about ``data_mib`` MiB of files.

    The files are the Python standard library's (a real mix of sizes), copied in sorted order
    until the budget is reached, then put into the filesystem by ``mke2fs -d``.
    """
    image = work / f"fs-{data_mib}M.raw"
    if image.exists():
        return image
    tree = work / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir()
    budget = data_mib * MiB
    stdlib = Path(os.__file__).parent
    for path in sorted(stdlib.rglob("*")):
        if budget <= 0:
            break
        if path.is_file() and not path.is_symlink():
            target = tree / path.relative_to(stdlib)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            budget -= path.stat().st_size
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(image), disk],
                   check=True)
    shutil.rmtree(tree)
    return image


def build_debian_image(work: Path) -> tuple[str, str]:
    """An OCI layout (one layer) of a real Debian root filesystem, and a label saying so.

    The tree comes from ``debootstrap --variant=minbase bookworm`` (root and Debian's mirror
    needed); umoci turns it into an image the way the interop tests do (init, new, unpack
    --rootless, copy the tree in, repack). Both are cached in ``work``. Where debootstrap
    cannot run, the largest real tree at hand, /usr/lib/python3.*, stands in, and the label
    says so.
    """
    layout = work / "debian-oci"
    label_file = work / "debian-oci.label"
    if layout.exists() and label_file.exists():
        return f"oci:{layout}:bookworm", label_file.read_text()
    rootfs = work / "debian-rootfs"
    label = "debian bookworm minbase"
    if not (rootfs / "etc" / "debian_version").exists():
        shutil.rmtree(rootfs, ignore_errors=True)
        done = shutil.which("debootstrap") and subprocess.run(
            ["debootstrap", "--variant=minbase", "bookworm", str(rootfs)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE).returncode == 0
        if not done:
            shutil.rmtree(rootfs, ignore_errors=True)
            stdlib = max(Path("/usr/lib").glob("python3.*"),
                         key=lambda p: sum(f.stat().st_size for f in p.rglob("*")
                                           if f.is_file() and not f.is_symlink()))
            shutil.copytree(stdlib, rootfs / stdlib.relative_to("/"), symlinks=True)
            label = f"NOT debian: {stdlib} (debootstrap failed)"
    shutil.rmtree(layout, ignore_errors=True)
    bundle = work / "debian-bundle"
    shutil.rmtree(bundle, ignore_errors=True)
    ref = f"{layout}:bookworm"
    subprocess.run(["umoci", "init", "--layout", str(layout)], check=True)
    subprocess.run(["umoci", "new", "--image", ref], check=True)
    subprocess.run(["umoci", "unpack", "--rootless", "--image", ref, str(bundle)], check=True)
    subprocess.run(["cp", "-a", f"{rootfs}/.", str(bundle / "rootfs")], check=True)
    subprocess.run(["umoci", "repack", "--image", ref, str(bundle)], check=True)
    shutil.rmtree(bundle)
    size = sum(f.stat().st_size for f in rootfs.rglob("*") if f.is_file() and not f.is_symlink())
    label += f", {size / MiB:.0f} MiB of files"
    label_file.write_text(label)
    return f"oci:{ref}", label


def imgbridge_cmd(*args: str) -> list[str]:
    exe = shutil.which("imgbridge")
    return [exe, *args] if exe else [sys.executable, "-m", "imgbridge", *args]


def cases(work: Path) -> list[tuple[str, Callable[[], Case]]]:
    def startup() -> Case:
        return Case("startup (--version)", imgbridge_cmd("--version"),
                    ["qemu-img", "--version"], "qemu-img", [])

    def convert_case(label: str, src: Path, out: str, fmt: str, ours: list[str],
                     theirs: list[str] | None = None, *, sync: bool = False) -> Case:
        """Our convert against qemu-img convert on the same input and output options.
        Without ``sync`` neither side flushes (qemu-img's default cache mode is unsafe)."""
        dst = work / out
        flush = [] if sync else ["--no-sync"]
        return Case(label,
                    imgbridge_cmd("convert", "-q", *flush, "-f", fmt, *ours, str(src),
                                  str(dst)),
                    ["qemu-img", "convert", *(["-t", "writeback"] if sync else []), "-f", fmt,
                     *(ours if theirs is None else theirs), str(src), str(dst)],
                    "qemu-img", [dst])

    def qemu_qcow2(src: Path) -> Path:
        image = work / "fs-by-qemu.qcow2"  # made by qemu-img, so we read a peer's output
        if not image.exists():
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(src),
                            str(image)], check=True)
        return image

    def raw_to_raw() -> Case:
        return convert_case("raw -> raw, 1 GiB ext4 / 200 MiB, no flush",
                            build_filesystem_disk(work), "out.raw", "raw", ["-O", "raw"])

    def raw_to_raw_synced() -> Case:
        # Our default flushes before the rename; qemu-img does that with -t writeback.
        return convert_case("raw -> raw, 1 GiB ext4 / 200 MiB, flushed",
                            build_filesystem_disk(work), "out.raw", "raw", ["-O", "raw"],
                            sync=True)

    def compare_raw() -> Case:
        src = build_filesystem_disk(work)
        copy = work / "copy.raw"
        if not copy.exists():
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", str(src), str(copy)],
                           check=True)
        return Case("compare raw, 1 GiB ext4 with 200 MiB",
                    imgbridge_cmd("compare", "-q", "-f", "raw", "-F", "raw", str(src), str(copy)),
                    ["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(src), str(copy)],
                    "qemu-img", [])

    def raw_to_qcow2() -> Case:
        return convert_case("raw -> qcow2, 1 GiB ext4 / 200 MiB",
                            build_filesystem_disk(work), "out.qcow2", "raw", ["-O", "qcow2"])

    def qcow2_to_raw() -> Case:
        return convert_case("qcow2 -> raw, 1 GiB ext4 / 200 MiB",
                            qemu_qcow2(build_filesystem_disk(work)), "out.raw", "qcow2",
                            ["-O", "raw"])

    def raw_to_qcow2_compressed() -> Case:
        return convert_case("raw -> qcow2 -c (zlib), 1 GiB / 200 MiB",
                            build_filesystem_disk(work), "out-c.qcow2", "raw",
                            ["-c", "-O", "qcow2"])

    def raw_to_qcow2_zstd() -> Case:
        return convert_case("raw -> qcow2 -c (zstd), 1 GiB / 200 MiB",
                            build_filesystem_disk(work), "out-z.qcow2", "raw",
                            ["-c", "-o", "compression_type=zstd", "-O", "qcow2"])

    def raw_to_stream_vmdk() -> Case:
        return convert_case("raw -> vmdk streamOptimized", build_filesystem_disk(work),
                            "out-stream.vmdk", "raw",
                            ["-O", "vmdk", "-o", "subformat=streamOptimized"])

    def qcow2_to_vhd() -> Case:
        return convert_case("qcow2 -> vhd (dynamic)", qemu_qcow2(build_filesystem_disk(work)),
                            "out.vhd", "qcow2", ["-O", "vhd"], ["-O", "vpc"])

    def raw_to_vhdx() -> Case:
        return convert_case("raw -> vhdx (dynamic)", build_filesystem_disk(work), "out.vhdx",
                            "raw", ["-O", "vhdx"])

    def oci_to_docker_archive() -> Case:
        ref, label = build_debian_image(work)
        out = work / "debian-docker.tar"
        return Case(f"oci -> docker-archive ({label})",
                    imgbridge_cmd("convert", "-q", "--no-sync", "-O", "docker-archive",
                                  ref, str(out)),
                    ["skopeo", "copy", "-q", ref, f"docker-archive:{out}"],
                    "skopeo", [out])

    def flatten_extract() -> Case:
        # Both flatten the layers and write the tree. Run as root, ours also sets owners and
        # makes device nodes, which umoci --rootless never does: a little more work for us.
        ref, label = build_debian_image(work)
        out = work / "debian-extracted"
        return Case(f"flatten + extract ({label})",
                    imgbridge_cmd("extract", ref, str(out)),
                    ["umoci", "unpack", "--rootless", "--image", ref.removeprefix("oci:"),
                     str(out)],
                    "umoci", [out])

    def debian_rootfs() -> tuple[Path, str]:
        _, label = build_debian_image(work)  # leaves the tree in work/debian-rootfs
        return work / "debian-rootfs", label

    def ext4_write() -> Case:
        # A fixed size for both: the same work (mke2fs needs one; ours would pick its own).
        rootfs, label = debian_rootfs()
        out = work / "debian.ext4"
        return Case(f"folder -> ext4 1 GiB ({label})",
                    imgbridge_cmd("convert", "-q", "--no-sync", "-O", "ext4", "-o", "size=1G",
                                  str(rootfs), str(out)),
                    ["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(rootfs), str(out), "1G"],
                    "mke2fs -d", [out])

    def ext4_read_all() -> Case:
        rootfs, label = debian_rootfs()
        image = work / "debian-read.ext4"
        if not image.exists():
            subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(rootfs), str(image),
                            "1G"], check=True)
        out = work / "debian-read-out"
        return Case(f"ext4 -> every file out ({label})",
                    imgbridge_cmd("extract", str(image), str(out)),
                    ["sh", "-c", f"mkdir -p {out} && debugfs -R 'rdump / {out}' {image}"],
                    "debugfs rdump", [out])

    def iso_write() -> Case:
        rootfs, label = debian_rootfs()
        out = work / "debian.iso"
        return Case(f"folder -> iso9660 RR+Joliet ({label})",
                    imgbridge_cmd("convert", "-q", "--no-sync", "-O", "iso9660", str(rootfs),
                                  str(out)),
                    ["genisoimage", "-quiet", "-R", "-J", "-o", str(out), str(rootfs)],
                    "genisoimage", [out])

    return [("startup", startup), ("raw-to-raw", raw_to_raw),
            ("raw-to-raw-synced", raw_to_raw_synced), ("compare-raw", compare_raw),
            ("raw-to-qcow2", raw_to_qcow2), ("qcow2-to-raw", qcow2_to_raw),
            ("raw-to-qcow2-c", raw_to_qcow2_compressed),
            ("raw-to-qcow2-zstd", raw_to_qcow2_zstd),
            ("raw-to-vmdk-stream", raw_to_stream_vmdk), ("qcow2-to-vhd", qcow2_to_vhd),
            ("raw-to-vhdx", raw_to_vhdx), ("oci-to-docker-archive", oci_to_docker_archive),
            ("flatten-extract", flatten_extract), ("ext4-write", ext4_write),
            ("ext4-read-all", ext4_read_all), ("iso-write", iso_write)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", action="append", help="run only the named case(s)")
    parser.add_argument("--workdir", type=Path, help="keep inputs here between runs")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="imgbridge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"{'case':<60}{'ours s':>9}{'peer s':>9}{'ratio':>8}{'ours MiB':>10}"
          f"{'peer MiB':>10}  peer")
    for name, make in cases(work):
        if args.only and name not in args.only:
            continue
        case = make()
        ours_t, ours_rss = measure(case.ours, args.repeat, case.cleanup)
        theirs_t, theirs_rss = measure(case.theirs, args.repeat, case.cleanup)
        print(f"{case.name:<60}{ours_t:>9.3f}{theirs_t:>9.3f}{ours_t / theirs_t:>8.2f}"
              f"{ours_rss / MiB:>10.1f}{theirs_rss / MiB:>10.1f}  {case.peer}", flush=True)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
