"""Wasted space (bytes lower layers store that upper layers delete or replace), on hand-built
layers whose answer is known, then end to end through ``inspect`` and the CLI."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

from helpers import CliResult
from imgbridge.converters.layer_waste import WasteCounter

import imgbridge
from imgbridge.model.image import ContainerImage, ImageConfig, Platform
from imgbridge.model.tree import Entry, EntryType, Layer
from imgbridge.output import AtomicOutput
from imgbridge.progress import no_progress
from imgbridge.registry import default_registry


def _file(path: str, size: int, **kw: object) -> Entry:
    data = b"x" * size
    return Entry(path, EntryType.FILE, size=size, opener=lambda: io.BytesIO(data),
                 **kw)  # type: ignore[arg-type]


def _dir(path: str) -> Entry:
    return Entry(path, EntryType.DIR)


def _out(path: str) -> Entry:
    return Entry(path, EntryType.WHITEOUT)


def _link(path: str, target: str) -> Entry:
    return Entry(path, EntryType.HARDLINK, link_target=target)


def _waste(*layers: list[Entry]) -> list[int]:
    counter = WasteCounter()
    for layer in layers:
        counter.add_layer(layer)
    assert counter.total == sum(counter.per_layer)
    return counter.per_layer


def test_a_file_overwritten_twice_wastes_each_lower_copy_once() -> None:
    assert _waste([_file("f", 100)], [_file("f", 200)], [_file("f", 300)]) == [0, 100, 200]


def test_a_metadata_only_change_still_wastes_the_lower_copy() -> None:
    assert _waste([_file("f", 10, mode=0o644)], [_file("f", 10, mode=0o755)]) == [0, 10]


def test_a_whited_out_directory_wastes_everything_below_it() -> None:
    lower = [_dir("d"), _file("d/a", 10), _file("d/b", 20), _file("d/sub/c", 30),
             _file("keep", 1000)]
    assert _waste(lower, [_out("d")]) == [0, 60]


def test_an_opaque_directory_hides_its_lower_children_only() -> None:
    lower = [_dir("d"), _file("d/a", 10), _file("d/b", 20), _file("other", 7)]
    upper = [Entry("d", EntryType.OPAQUE), _file("d/c", 5)]
    # d/c is the opaque layer's own: it survives, and a later deletion wastes it.
    assert _waste(lower, upper, [_out("d/c")]) == [0, 30, 5]


def test_a_hardlinked_file_is_wasted_only_when_its_last_name_goes() -> None:
    lower = [_file("f", 100), _link("g", "f")]
    assert _waste(lower, [_out("f")]) == [0, 0]  # g still reaches the bytes
    assert _waste(lower, [_out("f")], [_out("g")]) == [0, 0, 100]  # counted once
    assert _waste(lower, [_out("f"), _out("g")]) == [0, 100]


def test_an_upper_hardlink_keeps_a_lower_file_reachable() -> None:
    layers = [[_file("f", 100)], [_link("h", "f")], [_out("f")], [_file("h", 1)]]
    assert _waste(*layers) == [0, 0, 0, 100]


def test_a_directory_replaced_by_a_file_wastes_its_subtree() -> None:
    assert _waste([_file("d/a", 7), _file("d/e/b", 8)], [_file("d", 3)]) == [0, 15]


def test_what_hides_nothing_wastes_nothing() -> None:
    lower = [_file("f", 10), _dir("d"), Entry("s", EntryType.SYMLINK, link_target="f")]
    upper = [
        _dir("d"),  # directory over directory merges
        _out("missing"),  # a whiteout of nothing
        Entry("s", EntryType.SYMLINK, link_target="elsewhere"),  # symlinks store no bytes
        _file("new", 50),
        _file("new", 60),  # a duplicate inside one layer is not a lower layer's
    ]
    assert _waste(lower, upper) == [0, 0]


def test_a_whiteout_and_a_re_add_in_one_layer_waste_the_lower_copy() -> None:
    assert _waste([_file("f", 10)], [_file("f", 4), _out("f")]) == [0, 10]


def _write_oci(path: Path, layers: list[list[Entry]]) -> Path:
    image = ContainerImage(layers=[Layer(entries) for entries in layers],
                           config=ImageConfig(platform=Platform("linux", "amd64")))
    with AtomicOutput(str(path), directory=True, sync=False) as out:
        default_registry().get("oci").create(out, image, {}, no_progress)
        out.commit()
    return path


def test_inspect_reports_wasted_bytes_per_layer_and_in_total(
        tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    oci = _write_oci(tmp_path / "img", [
        [_dir("d"), _file("d/a", 1000), _file("d/b", 24), _file("f", 3000), _link("g", "f")],
        [_out("d"), _out("f"), _file("new", 5)],
        [_file("new", 6), _out("g")],
    ])
    info = imgbridge.inspect(oci)
    assert [layer["wasted"] for layer in info["LayerDetails"]] == [0, 1024, 3005]
    assert info["WastedBytes"] == 4029
    result = cli("inspect", oci)
    assert result.code == 0, result.err
    assert "wasted space: 3.93 KiB (4029 bytes" in result.out
    assert "hides 1 KiB of lower layers" in result.out


def test_the_fixture_wastes_the_file_its_second_layer_deletes() -> None:
    info = imgbridge.inspect(Path(__file__).parents[3] / "fixtures" / "small-oci")
    gone = [e for e in imgbridge.list_files(Path(__file__).parents[3] / "fixtures" / "small-oci",
                                            "/etc", layer=0) if e.path == "etc/gone"]
    assert [layer["wasted"] for layer in info["LayerDetails"]] == [0, gone[0].size]
    assert info["WastedBytes"] == gone[0].size > 0
