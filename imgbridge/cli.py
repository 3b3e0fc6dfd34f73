"""The command line: parse, call the library, print, map errors to one line and an exit code.

No logic lives here that the library does not also offer. Heavy modules are imported inside
the commands, so ``imgbridge --help`` and ``--version`` start fast.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import click

from . import __version__
from .errors import ImgBridgeError

#: Commands whose error exit code is not 1 (qemu-img compare uses 2: 1 means "different").
_ERROR_EXIT = {"compare": 2, "diff": 2}


def _human_size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{int(value)} {unit}" if value == int(value) else f"{value:.3g} {unit}"
        value /= 1024
    return f"{n} B"


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=4))


def _progress_callback(show: bool, description: str) -> tuple[Callable[[int, int], None], Any]:
    if not show:
        from .progress import no_progress

        return no_progress, None
    from .progress import tqdm_progress

    bar = tqdm_progress(description)
    return bar, bar


def _want_progress(progress: bool, quiet: bool) -> bool:
    return not quiet and (progress or sys.stderr.isatty())


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "-V", "--version", prog_name="imgbridge")
@click.option("--debug", is_flag=True, help="Show a traceback when an error occurs.")
def cli(debug: bool) -> None:
    """Inspect and convert disk images (raw, qcow2, VMDK, VHD, VHDX) and container images
    (OCI, Docker archives), without root, a daemon or loop devices."""


@cli.command("formats")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def formats_cmd(as_json: bool) -> None:
    """List every format with its kind and capabilities.

    Example: imgbridge formats --json
    """
    from .api import list_formats

    specs = list_formats()
    if as_json:
        _echo_json([spec.to_json() for spec in specs])
        return
    click.echo(f"{'name':<16}{'kind':<8}{'read':<6}{'write':<7}capabilities / extensions")
    for spec in specs:
        caps = sorted(spec.capabilities - {"read", "create"})
        exts = " ".join("." + e for e in spec.extensions)
        click.echo(
            f"{spec.name:<16}{spec.kind.value:<8}{'yes' if spec.can('read') else 'no':<6}"
            f"{'yes' if spec.can('create') else 'no':<7}{', '.join(caps)}  {exts}".rstrip()
        )


@cli.command("inspect")
@click.argument("image", type=click.Path())
@click.option("-f", "--format", "fmt", help="The image's format (skips detection).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (qemu-img info's field names).")
@click.option("--backing-chain", is_flag=True, help="Describe every backing file too.")
@click.option("--allow-outside-backing", is_flag=True,
              help="Follow companion files outside the image's folder.")
@click.option("--platform", help="Container images: describe this os/arch[/variant] only.")
def inspect_cmd(image: str, fmt: str | None, as_json: bool, backing_chain: bool,
                allow_outside_backing: bool, platform: str | None) -> None:
    """Describe an image: format, sizes, and what the format records.

    Example: imgbridge inspect disk.qcow2 --json
    """
    from .api import inspect, inspect_chain

    if backing_chain:
        chain = inspect_chain(image, fmt, allow_outside=allow_outside_backing)
        if as_json:
            _echo_json(chain)
            return
        for i, info in enumerate(chain):
            if i:
                click.echo()
            _print_info(info, image)
        return
    info = inspect(image, fmt, allow_outside=allow_outside_backing, platform=platform)
    if as_json:
        _echo_json(info)
        return
    if "Layers" in info or "Manifests" in info:
        _print_image_info(info, image)
        return
    _print_info(info, image)


def _print_image_info(info: dict[str, Any], image: str) -> None:
    """Container images: the facts skopeo inspect shows, then config, history and layers."""
    click.echo(f"image: {image}")
    click.echo(f"file format: {info.get('format', '?')}")
    if "Manifests" in info:
        click.echo("platforms (pick one with --platform):")
        for item in info["Manifests"]:
            click.echo(f"    {item['Platform']:<24}{item['Digest']}")
        return
    platform = f"{info['Os']}/{info['Architecture']}"
    if info.get("Variant"):
        platform += f"/{info['Variant']}"
    click.echo(f"platform: {platform}")
    for key, label in (("Digest", "digest"), ("Created", "created")):
        if info.get(key):
            click.echo(f"{label}: {info[key]}")
    if info.get("RepoTags"):
        click.echo(f"tags: {', '.join(info['RepoTags'])}")
    config = info.get("Config", {})
    for key in ("Entrypoint", "Cmd", "WorkingDir", "User", "ExposedPorts", "Volumes", "Author"):
        if config.get(key):
            click.echo(f"{key.lower()}: {config[key]}")
    for var in info.get("Env") or []:
        click.echo(f"env: {var}")
    for name, value in (info.get("Labels") or {}).items():
        click.echo(f"label: {name}={value}")
    if info.get("History"):
        click.echo("history:")
        for item in info["History"]:
            what = item.get("created_by") or item.get("comment") or ""
            empty = " (empty layer)" if item.get("empty_layer") else ""
            click.echo(f"    {item.get('created') or '-':<32}{what}{empty}")
    click.echo("layers:")
    for i, layer in enumerate(info.get("LayerDetails", [])):
        click.echo(
            f"    {i}: {layer['Digest']} {layer['Compression']} "
            f"{_human_size(layer['CompressedSize'])} -> {_human_size(layer['UncompressedSize'])}"
            f", {layer['Files']} entries, {layer['Whiteouts']} whiteouts"
            + (f", opaque: {' '.join(layer['OpaqueDirs'])}" if layer["OpaqueDirs"] else "")
            + (f", hides {_human_size(layer['wasted'])} of lower layers"
               if layer.get("wasted") else ""))
    if "WastedBytes" in info:
        wasted = info["WastedBytes"]
        click.echo(f"wasted space: {_human_size(wasted)} ({wasted} bytes stored in lower layers "
                   "but deleted or replaced above)")


def _print_info(info: dict[str, Any], image: str) -> None:
    click.echo(f"image: {info.get('filename', image)}")
    fmt_name = info.get("format", "?")
    click.echo(f"file format: {fmt_name}{' (guessed)' if info.get('format-guessed') else ''}")
    if "virtual-size" in info:
        size = info["virtual-size"]
        click.echo(f"virtual size: {_human_size(size)} ({size} bytes)")
    if "actual-size" in info:
        click.echo(f"disk size: {_human_size(info['actual-size'])}")
    if "cluster-size" in info:
        click.echo(f"cluster_size: {info['cluster-size']}")
    if info.get("backing-filename"):
        click.echo(f"backing file: {info['backing-filename']}")
        if info.get("backing-filename-format"):
            click.echo(f"backing file format: {info['backing-filename-format']}")
    if info.get("snapshots"):
        click.echo("Snapshot list:")
        click.echo(f"{'ID':<8}{'TAG':<24}{'VM SIZE':>10}  {'DATE':<20}{'VM CLOCK':>16}")
        for snap in info["snapshots"]:
            import time as _time

            date = _time.strftime("%Y-%m-%d %H:%M:%S", _time.localtime(snap["date-sec"]))
            secs = snap["vm-clock-sec"]
            clock = f"{secs // 3600:04d}:{secs // 60 % 60:02d}:{secs % 60:02d}." \
                    f"{snap['vm-clock-nsec'] // 1_000_000:03d}"
            click.echo(f"{snap['id']:<8}{snap['name']:<24}"
                       f"{_human_size(snap['vm-state-size']):>10}  {date:<20}{clock:>16}")
    specific = info.get("format-specific")
    if specific:
        click.echo("Format specific information:")
        for key, value in specific.get("data", {}).items():
            click.echo(f"    {key}: {value}")
    table = info.get("partitions")
    if table:
        label = table.get("uuid") or table.get("label-id")
        click.echo(f"partition table: {table['type']} ({label})")
        for part in table["partitions"]:
            kind = part["type-name"] or part["type"]
            click.echo(f"    {part['number']:>3}  start {part['start']:<14} "
                       f"size {_human_size(part['size']):<10} {kind}"
                       + (f"  '{part['name']}'" if part.get("name") else ""))
            if part.get("filesystem"):
                click.echo(f"         {_fs_line(part['filesystem'])}")
    if info.get("filesystem"):
        click.echo(f"filesystem: {_fs_line(info['filesystem'])}")
    for warning in info.get("partition-table-warnings", []):
        click.echo(f"warning: {warning}", err=True)
    if info.get("partition-table-error"):
        click.echo(f"partition table: unreadable ({info['partition-table-error']})")
    if info.get("format-guessed"):
        click.echo("note: no format recognised this file; it reads as raw", err=True)


def _fs_line(fs: dict[str, Any]) -> str:
    """One line for a filesystem: type, label, UUID, usage (or why it cannot be read)."""
    if fs.get("error"):
        return f"{fs.get('type', '?')}: unreadable ({fs['error']})"
    parts = [str(fs.get("type", "?"))]
    if fs.get("label"):
        parts.append(f"label '{fs['label']}'")
    if fs.get("uuid"):
        parts.append(f"uuid {fs['uuid']}")
    if fs.get("size") is not None:
        used = fs.get("used")
        parts.append(f"{_human_size(used)} used of {_human_size(fs['size'])}"
                     if used is not None else f"size {_human_size(fs['size'])}")
    return ", ".join(parts)


def _printed_option_help(opts: Sequence[str], fmt: str | None, path: str) -> bool:
    """``-o help``: list the output format's options (True when it was asked for)."""
    if not any(item.strip() == "help" for item in opts):
        return False
    from .registry import default_registry

    spec = default_registry().for_output(fmt, path)
    click.echo(f"Supported options for {spec.name}:")
    for key, text in sorted(spec.create_options().items()):
        click.echo(f"  {key:<20}{text}")
    return True


@cli.command("convert")
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("-f", "--format", "fmt", help="The source's format (skips detection).")
@click.option("-O", "--output-format", "out_fmt",
              help="The output format (default: from DST's extension).")
@click.option("-o", "--options", "opts", multiple=True,
              help="Output options key=value[,key=value]; '-o help' lists them.")
@click.option("-l", "--snapshot", help="Convert this internal snapshot (id or name).")
@click.option("-c", "--compress", is_flag=True,
              help="Compress the output (-o compress=on; qcow2).")
@click.option("-B", "--backing", "base",
              help="Write only what differs from this base image and name it as DST's "
                   "backing file (relative to DST's folder).")
@click.option("-F", "--backing-format", "base_fmt", help="The base image's format (with -B).")
@click.option("-p", "--progress", is_flag=True, help="Show a progress bar.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, no messages.")
@click.option("--plan", "show_plan", is_flag=True, help="Print the conversion steps and stop.")
@click.option("--sync/--no-sync", default=True, show_default=True,
              help="fsync the output before it takes its name (qemu-img convert never does).")
@click.option("--allow-outside-backing", is_flag=True,
              help="Follow companion files outside the source's (and DST's) folder.")
@click.option("--tag", "tags", multiple=True, metavar="NAME:TAG",
              help="Container images: write the image under this name (repeatable).")
@click.option("--flatten", is_flag=True,
              help="Container images: squash all layers into one.")
@click.option("--platform", help="Container images: convert this os/arch[/variant] of an index.")
@click.option("-P", "--partition", type=int, metavar="N",
              help="Disk to filesystem: read the source's partition N (default: the root).")
@click.option("--size", "fs_size", metavar="SIZE",
              help="Filesystem outputs: the filesystem's size, such as 2G (-o size=); "
                   "default: the content plus headroom.")
def convert_cmd(
    src: str, dst: str, fmt: str | None, out_fmt: str | None, opts: Sequence[str],
    snapshot: str | None, compress: bool, base: str | None, base_fmt: str | None,
    progress: bool, quiet: bool, show_plan: bool, sync: bool, allow_outside_backing: bool,
    tags: Sequence[str], flatten: bool, platform: str | None, partition: int | None,
    fs_size: str | None,
) -> None:
    """Convert SRC into DST (written to a temporary file and renamed at the end).

    -c compresses the output; -B BASE writes only what differs from BASE, which becomes
    DST's backing file. Container images convert between oci, oci-archive and
    docker-archive (-O), with --tag, --flatten and -o compression=none|gzip|zstd.
    -O ext4, vfat or iso9660 builds a filesystem from a container image, a tar, a folder
    or the filesystem of a disk image (-o size=,label=; '-o help' lists the rest).

    Example: imgbridge convert -f raw disk.img disk.qcow2 -p
    """
    from .api import convert, parse_options, plan
    from .registry import default_registry

    if _printed_option_help(opts, out_fmt, dst):
        return
    options = parse_options(list(opts))
    if fs_size is not None:
        if options.get("size", fs_size) != fs_size:
            raise click.UsageError(f"--size {fs_size} and -o size={options['size']} disagree")
        if default_registry().for_output(out_fmt, dst).kind.value != "fs":
            raise click.UsageError("--size applies to filesystem outputs (-O ext4, vfat, "
                                   "iso9660)")
        options["size"] = fs_size
    if show_plan:
        click.echo(plan(src, dst, format=fmt, output_format=out_fmt))
        return
    callback, bar = _progress_callback(_want_progress(progress, quiet), "convert")
    try:
        convert(src, dst, format=fmt, output_format=out_fmt, options=options, progress=callback,
                allow_outside=allow_outside_backing, sync=sync,
                source_options={k: v for k, v in (("snapshot", snapshot),
                                                  ("platform", platform)) if v} or None,
                compress=compress, backing=base, backing_format=base_fmt,
                tags=list(tags) or None, flatten=flatten, partition=partition)
    finally:
        if bar is not None:
            bar.close()


@cli.command("create")
@click.argument("output", type=click.Path())
@click.argument("size", required=False)
@click.option("-f", "--format", "fmt",
              help="The image's format (default: from OUTPUT's extension).")
@click.option("-b", "--backing", "base",
              help="A base image the new one reads through to (relative to OUTPUT's folder).")
@click.option("-F", "--backing-format", "base_fmt",
              help="The base image's format (default: detected).")
@click.option("-o", "--options", "opts", multiple=True,
              help="Format options key=value[,key=value]; '-o help' lists them.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing.")
@click.option("--sync/--no-sync", default=True, show_default=True,
              help="fsync the image before it takes its name.")
@click.option("--allow-outside-backing", is_flag=True,
              help="Allow a base image outside OUTPUT's folder.")
def create_cmd(
    output: str, size: str | None, fmt: str | None, base: str | None, base_fmt: str | None,
    opts: Sequence[str], quiet: bool, sync: bool, allow_outside_backing: bool,
) -> None:
    """Create an empty disk image of SIZE bytes (k, M, G, T suffixes), like qemu-img create.

    Without SIZE the image takes the base image's size. A relative base name is stored as
    given and read relative to OUTPUT's folder, as qemu-img does.

    Example: imgbridge create -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2
    """
    from .api import create, parse_options

    if _printed_option_help(opts, fmt, output):
        return
    options = parse_options(list(opts))
    create(output, size, format=fmt, backing=base, backing_format=base_fmt, options=options,
           allow_outside=allow_outside_backing, sync=sync)
    if not quiet:
        from .api import inspect

        info = inspect(output, fmt, allow_outside=allow_outside_backing)
        described = f"Formatting '{output}', fmt={info['format']} size={info['virtual-size']}"
        if base:
            described += f" backing_file={base}"
            if info.get("backing-filename-format"):
                described += f" backing_fmt={info['backing-filename-format']}"
        click.echo(described)


@cli.command("map")
@click.argument("image", type=click.Path())
@click.option("-f", "--format", "fmt", help="The image's format (skips detection).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON like qemu-img map --output=json.")
@click.option("--allow-outside-backing", is_flag=True,
              help="Follow companion files outside the image's folder.")
def map_cmd(image: str, fmt: str | None, as_json: bool, allow_outside_backing: bool) -> None:
    """Print the allocation map: which ranges hold data, read as zero, or come from a backing file.

    Example: imgbridge map disk.raw --json
    """
    from .api import allocation_map, extent_to_json

    extents = allocation_map(image, fmt, allow_outside=allow_outside_backing)
    if as_json:
        _echo_json([extent_to_json(ext) for ext in extents])
        return
    click.echo(f"{'Offset':<20}{'Length':<20}{'Mapped to':<20}File")
    for ext in extents:
        if ext.kind.value == "data" and ext.host_offset is not None:
            click.echo(f"{ext.offset:<#20x}{ext.length:<#20x}{ext.host_offset:<#20x}{image}")


@cli.command("compare")
@click.argument("image_a", type=click.Path())
@click.argument("image_b", type=click.Path())
@click.option("-f", "fmt_a", help="The first image's format.")
@click.option("-F", "fmt_b", help="The second image's format.")
@click.option("-p", "--progress", is_flag=True, help="Show a progress bar.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing; the exit code tells.")
@click.option("--allow-outside-backing", is_flag=True,
              help="Follow companion files outside the images' folders.")
def compare_cmd(
    image_a: str, image_b: str, fmt_a: str | None, fmt_b: str | None, progress: bool,
    quiet: bool, allow_outside_backing: bool,
) -> None:
    """Compare what a guest would read from two disks, in any formats.

    Exit 0 when equal, 1 when they differ (the first differing byte's offset is printed),
    2 on error. Example: imgbridge compare disk.raw disk.qcow2
    """
    from .api import compare

    callback, bar = _progress_callback(_want_progress(progress, quiet), "compare")
    try:
        result = compare(image_a, image_b, format_a=fmt_a, format_b=fmt_b, progress=callback,
                         allow_outside=allow_outside_backing)
    finally:
        if bar is not None:
            bar.close()
    if result.size_mismatch and not quiet:
        click.echo("Warning: Image size mismatch!")
    if result.identical:
        if not quiet:
            click.echo("Images are identical.")
        return
    if not quiet:
        click.echo(f"Content mismatch at offset {result.first_difference}!")
    raise SystemExit(1)


@cli.command("check")
@click.argument("image", type=click.Path())
@click.option("-f", "--format", "fmt", help="The image's format (skips detection).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON like qemu-img check.")
@click.option("-r", "--repair", type=click.Choice(["leaks", "all"]),
              help="Repair in place (without it the image is never modified).")
@click.option("--allow-outside-backing", is_flag=True,
              help="Follow companion files outside the image's folder.")
def check_cmd(
    image: str, fmt: str | None, as_json: bool, repair: str | None, allow_outside_backing: bool
) -> None:
    """Check an image's metadata. Exit 0 clean, 2 corrupt, 3 leaks only, 1 error.

    Details go to stderr and the summary to stdout, as with qemu-img check.
    Example: imgbridge check disk.qcow2
    """
    from .api import check

    report = check(image, fmt, repair=repair, allow_outside=allow_outside_backing)
    for line in report.messages:
        click.echo(line, err=True)
    if as_json:
        _echo_json(report.to_json())
    else:
        for line in report.summary():
            click.echo(line)
    if report.exit_code:
        raise SystemExit(report.exit_code)



_TYPE_CHAR = {"file": "-", "dir": "d", "symlink": "l", "hardlink": "-", "char": "c",
              "block": "b", "fifo": "p", "socket": "s", "whiteout": "w", "opaque": "o"}


def _mode_string(kind: str, mode: int) -> str:
    """``ls -l``'s mode column: type letter, rwx triplets, s/S t/T for set-id and sticky."""
    out = [_TYPE_CHAR.get(kind, "?")]
    for shift, special, letter in ((6, 0o4000, "s"), (3, 0o2000, "s"), (0, 0o1000, "t")):
        bits = (mode >> shift) & 7
        out.append("r" if bits & 4 else "-")
        out.append("w" if bits & 2 else "-")
        if mode & special:
            out.append(letter if bits & 1 else letter.upper())
        else:
            out.append("x" if bits & 1 else "-")
    return "".join(out)


def _long_line(entry: Any) -> str:
    import time as _time

    kind = entry.type.value
    seconds = entry.mtime // 1_000_000_000
    try:
        when = _time.strftime("%Y-%m-%d %H:%M", _time.gmtime(seconds))
    except (OverflowError, OSError, ValueError):
        when = str(seconds)
    size = f"{entry.devmajor}, {entry.devminor}" if kind in ("char", "block") else str(entry.size)
    name = "/" + entry.path
    if kind == "symlink":
        name += f" -> {entry.link_target}"
    elif kind == "hardlink":
        name += f" link to /{entry.link_target}"
    elif kind in ("whiteout", "opaque"):
        name += f" ({kind})"
    return (f"{_mode_string(kind, entry.mode)} {entry.uid:>5} {entry.gid:>5} {size:>10} "
            f"{when} {name}")


@cli.command("ls")
@click.argument("image", type=click.Path())
@click.argument("path", default="/")
@click.option("-l", "long", is_flag=True,
              help="Long listing: mode, uid, gid, size, mtime (UTC), link target.")
@click.option("-R", "--recursive", is_flag=True, help="List everything below PATH.")
@click.option("--layer", type=int, help="List layer N's own entries (0 is the lowest), "
                                        "whiteouts included, instead of the flattened tree.")
@click.option("--platform", help="Pick this os/arch[/variant] from a multi-platform image.")
@click.option("-P", "--partition", type=int, metavar="N",
              help="Disk images: read partition N (default: the root partition).")
def ls_cmd(image: str, path: str, long: bool, recursive: bool, layer: int | None,
           platform: str | None, partition: int | None) -> None:
    """List the files at PATH (default /) inside a container image or a disk image.

    IMAGE is a path or a skopeo-style reference (oci:DIR:TAG, docker-archive:FILE, ...), or
    a disk image in any disk format: its filesystem (ext2/3/4, FAT, ISO9660) is read from
    partition N (-P), by default the root partition (named on stderr).
    Example: imgbridge ls -l oci:image:latest /etc
    """
    from .api import list_files

    for entry in list_files(image, path, layer=layer, platform=platform, recursive=recursive,
                            partition=partition, notice=_notice):
        click.echo(_long_line(entry) if long else "/" + entry.path)


@cli.command("cat")
@click.argument("image", type=click.Path())
@click.argument("path")
@click.option("--layer", type=int, help="Read from layer N's own files (0 is the lowest).")
@click.option("--platform", help="Pick this os/arch[/variant] from a multi-platform image.")
@click.option("-P", "--partition", type=int, metavar="N",
              help="Disk images: read partition N (default: the root partition).")
def cat_cmd(image: str, path: str, layer: int | None, platform: str | None,
            partition: int | None) -> None:
    """Write the content of the file at PATH inside a container image or a disk image to
    standard output.

    Symlinks are followed inside the image, never on the host.
    Example: imgbridge cat oci:image:latest /etc/os-release
    """
    from .api import read_file

    out = sys.stdout.buffer
    for chunk in read_file(image, path, layer=layer, platform=platform, partition=partition,
                           notice=_notice):
        out.write(chunk)
    out.flush()


@cli.command("extract")
@click.argument("image", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--layer", type=int, help="Extract layer N's own entries (0 is the lowest) "
                                        "instead of the flattened tree.")
@click.option("--platform", help="Pick this os/arch[/variant] from a multi-platform image.")
@click.option("--no-sync", is_flag=True, help="With a .tar OUT: skip the final flush.")
@click.option("-P", "--partition", type=int, metavar="N",
              help="Disk images: read partition N (default: the root partition).")
def extract_cmd(image: str, out: str, layer: int | None, platform: str | None,
                no_sync: bool, partition: int | None) -> None:
    """Write a container image's root filesystem, or the files of a disk image, into the
    directory OUT.

    OUT must not exist or be empty. Nothing is written outside OUT: symlinks are created as
    they are but never followed. What the host cannot reproduce (owners and device nodes
    when not root, refused xattrs) is listed on stderr, one line per kind; entries refused
    as unsafe make the exit code 1.

    An OUT ending in .tar (or -, standard output) gets a sorted tar stream instead, with
    owners, device nodes, xattrs and nanosecond times kept whoever runs it; the file
    appears only when complete.
    Example: imgbridge extract oci:image:latest rootfs
    """
    from .api import extract

    report = extract(image, out, layer=layer, platform=platform, sync=not no_sync,
                     partition=partition, notice=_notice)
    for line in report.summary():
        click.echo(f"imgbridge: warning: {line}", err=True)
    if report.refused:
        raise SystemExit(1)


@cli.command("diff")
@click.argument("image_a", type=click.Path())
@click.argument("image_b", type=click.Path())
@click.option("-f", "fmt_a", help="The first image's format.")
@click.option("-F", "fmt_b", help="The second image's format.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of changes.")
@click.option("--platform", help="Pick this os/arch[/variant] from multi-platform images.")
@click.option("--partition-a", type=int, metavar="N", help="IMAGE_A is a disk: read partition N.")
@click.option("--partition-b", type=int, metavar="N", help="IMAGE_B is a disk: read partition N.")
def diff_cmd(image_a: str, image_b: str, fmt_a: str | None, fmt_b: str | None,
             as_json: bool, platform: str | None, partition_a: int | None,
             partition_b: int | None) -> None:
    """List what changed from IMAGE_A to IMAGE_B (container images or disk images, in any
    mix): one line per path, "A" added,
    "D" removed, "M" changed (type, mode, owner, link, device, xattrs or content; times are
    not compared).

    Container images are compared flattened, disks by the filesystem of their root
    partition (or --partition-a/-b); contents by sha256, streamed. Exit 0 when
    they are the same, 1 when they differ, 2 on error, like diff(1).
    Example: imgbridge diff oci:old:latest oci:new:latest
    """
    from .api import diff

    changes = diff(image_a, image_b, format_a=fmt_a, format_b=fmt_b, platform=platform,
                   partition_a=partition_a, partition_b=partition_b, notice=_notice)
    if as_json:
        _echo_json([change.to_json() for change in changes])
    else:
        for change in changes:
            click.echo(change.describe())
    if changes:
        raise SystemExit(1)


def _notice(message: str) -> None:
    click.echo(f"imgbridge: {message}", err=True)


def _subcommand(argv: Sequence[str]) -> str | None:
    for arg in argv:
        if not arg.startswith("-"):
            return arg
    return None


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _one_line_warnings() -> None:
    """Show library warnings (a damaged footer read from its copy, ...) as one line each,
    once per message, instead of Python's two-line format with a source location."""
    import warnings

    shown: set[str] = set()

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: object = None, line: str | None = None) -> None:
        text = str(message)
        if text not in shown:
            shown.add(text)
            click.echo(f"imgbridge: warning: {text}", err=True)

    warnings.showwarning = show


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code. Bad input gives one line on stderr, never a traceback."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("IMGBRIDGE_DEBUG") == "1"
    error_exit = _ERROR_EXIT.get(_subcommand(args) or "", 1)
    _one_line_warnings()
    if hasattr(signal, "SIGTERM"):
        # A killed conversion must clean up its temporary file like Ctrl-C does.
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        result = cli.main(args=args, prog_name="imgbridge", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except click.exceptions.Abort:
        click.echo("imgbridge: interrupted", err=True)
        return 130
    except click.ClickException as exc:
        click.echo(f"imgbridge: error: {exc.format_message()}", err=True)
        return error_exit
    except ImgBridgeError as exc:
        if debug:
            traceback.print_exc()
        hint = f" (hint: {exc.hint})" if exc.hint else ""
        click.echo(f"imgbridge: error: {exc}{hint}", err=True)
        return error_exit
    except KeyboardInterrupt:
        click.echo("imgbridge: interrupted", err=True)
        return 130
    except BrokenPipeError:
        # The reader went away (`imgbridge map | head`): not an error worth a message.
        sys.stderr.close()
        return 0
    except OSError as exc:
        if debug:
            traceback.print_exc()
        name = f"{exc.filename}: " if exc.filename else ""
        click.echo(f"imgbridge: error: {name}{exc.strerror or exc}", err=True)
        return error_exit
    except Exception as exc:  # a bug: still one line, with the way to learn more
        if debug:
            traceback.print_exc()
        click.echo(
            f"imgbridge: internal error: {type(exc).__name__}: {exc} "
            "(rerun with --debug for a traceback, and please report it)",
            err=True,
        )
        return error_exit
    return result if isinstance(result, int) else 0
