from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from imgbridge.errors import InvalidInputError
from imgbridge.registry import (
    Detection,
    FormatSpec,
    Kind,
    ProbeInput,
    Registry,
    default_registry,
    read_probe_input,
)


def test_lookup_by_name_alias_and_extension(tmp_path: Path) -> None:
    reg = Registry(entry_points=False)
    assert reg.get("RAW").name == "raw"
    assert reg.for_output(None, str(tmp_path / "x.img")).name == "raw"
    with pytest.raises(InvalidInputError, match=r"known: .*\braw\b"):
        reg.get("nope")
    with pytest.raises(InvalidInputError, match="cannot tell the output format"):
        reg.for_output(None, str(tmp_path / "x.unknown"))


def test_a_registered_format_is_probed_and_wins_over_raw(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    module = tmp_path / "fakefmt_mod.py"
    module.write_text(textwrap.dedent("""
        def probe(p):
            return 100 if p.head.startswith(b"FAKE") else (10 if p.extension_is(["fk"]) else 0)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = FormatSpec("fake", Kind.DISK, "fakefmt_mod", aliases=("fk",), extensions=("fk",),
                      capabilities=frozenset({"read"}))
    reg = Registry(entry_points=False)
    reg.add(spec)
    magic = tmp_path / "a.bin"
    magic.write_bytes(b"FAKE" + bytes(100))
    assert reg.detect(str(magic)) == Detection(spec, 100)
    by_ext = tmp_path / "b.fk"
    by_ext.write_bytes(bytes(10))
    found = reg.detect(str(by_ext))
    assert found.spec is spec and found.guessed  # an extension alone is only a guess
    other = tmp_path / "c.bin"
    other.write_bytes(bytes(10))
    assert reg.detect(str(other)).spec.name == "raw"
    assert reg.detect(str(other)).guessed
    assert reg.get("fk") is spec


def test_third_party_formats_come_through_entry_points(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "plugin_fmt.py").write_text(textwrap.dedent("""
        from imgbridge.registry import FormatSpec, Kind
        SPEC = FormatSpec("plugfmt", Kind.DISK, "plugin_fmt", capabilities=frozenset({"read"}))
        def probe(p):
            return 0
    """))
    dist = tmp_path / "plugin_fmt-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: plugin-fmt\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[imgbridge.formats]\nplugfmt = plugin_fmt:SPEC\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry()
    assert reg.get("plugfmt").module == "plugin_fmt"
    assert "plugfmt" in [s.name for s in reg.all()]
    assert "plugfmt" not in [s.name for s in Registry(entry_points=False).all()]


def test_probe_input_sees_head_and_tail(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"HEAD" + bytes(200_000) + b"TAIL")
    p = read_probe_input(str(path))
    assert p.head.startswith(b"HEAD") and p.tail.endswith(b"TAIL")
    assert p.size == 200_008 and not p.is_dir
    assert read_probe_input(str(tmp_path)).listing == frozenset({"f"})


def test_probe_input_of_a_missing_file_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="no such file"):
        read_probe_input(str(tmp_path / "missing"))


def test_probe_scores_are_clamped() -> None:
    spec = default_registry().get("raw")
    assert spec.probe(ProbeInput(b"", b"", "x", 0)) == 1
    assert spec.probe(ProbeInput(b"", b"", "d", 0, frozenset())) == 0


def test_probing_filesystems_loads_no_reader_or_writer() -> None:
    """Every filesystem is probed on every partition: its reader and writer load only when
    they are used."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from imgbridge.registry import ProbeInput, default_registry, Kind\n"
        "p = ProbeInput(bytes(65536), b'', 'x', 65536)\n"
        "scores = [s.probe(p) for s in default_registry().all() if s.kind is Kind.FS]\n"
        "assert scores == [0, 0, 0], scores\n"
        "loaded = [m for m in sys.modules if m.endswith(('ext4.reader', 'ext4.writer',\n"
        "          'fat.writer', 'iso9660.reader', 'iso9660.writer'))]\n"
        "assert not loaded, loaded\n"
        "import imgbridge.formats.fs.ext4 as e\n"
        "assert callable(e.create) and 'size' in e.CREATE_OPTIONS\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_raw_file_with_a_filesystem_or_table_is_not_a_guess(tmp_path: Path) -> None:
    """qemu-img calls an ext4 image or a partitioned disk raw; so do we, but knowingly: it is
    not marked guessed and converts without -f raw. A file of random bytes stays a guess."""
    import imgbridge

    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "hello").write_bytes(b"hello\n")
    fs = tmp_path / "fs.img"
    imgbridge.convert(tree, fs, output_format="ext4", sync=False)
    assert default_registry().detect(str(fs)).guessed is False
    imgbridge.convert(fs, tmp_path / "fs.qcow2", sync=False)
    assert imgbridge.compare(fs, tmp_path / "fs.qcow2").identical
    noise = tmp_path / "noise.img"
    noise.write_bytes(bytes(range(256)) * 4096)
    assert default_registry().detect(str(noise)).guessed is True


def test_file_and_folder_formats_are_told_apart_once(tmp_path: Path) -> None:
    """The registry refuses a folder for a file format and a file for a folder format, with
    one line (and the format's hint), before the format's own open runs."""
    import imgbridge

    with pytest.raises(InvalidInputError, match="a qcow2 image is a file, not a folder"):
        imgbridge.open(tmp_path, "qcow2")
    image = tmp_path / "image.tar"
    image.write_bytes(bytes(1024))
    with pytest.raises(InvalidInputError, match="an oci image is a folder, not a file") as exc:
        imgbridge.open(image, "oci")
    assert exc.value.hint == "for a tar of a layout use oci-archive:"
