"""Tests for imgbridge.model.tree: paths, entries, whiteouts and the OCI flatten rules."""

from __future__ import annotations

import functools
import io
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imgbridge.errors import InvalidImageError, InvalidInputError, UnsupportedFeatureError
from imgbridge.model.tree import (
    Entry,
    EntryType,
    Layer,
    decode_whiteout,
    encode_whiteout,
    flatten,
    layer_changes,
    normalize_path,
)

FILE, DIR, SYMLINK, HARDLINK = EntryType.FILE, EntryType.DIR, EntryType.SYMLINK, EntryType.HARDLINK
WHITEOUT, OPAQUE, FIFO = EntryType.WHITEOUT, EntryType.OPAQUE, EntryType.FIFO


def f(path: str, content: bytes = b"", **kw: Any) -> Entry:
    return Entry(path, FILE, size=len(content), opener=functools.partial(io.BytesIO, content), **kw)


def d(path: str, **kw: Any) -> Entry:
    return Entry(path, DIR, **kw)


def hl(path: str, target: str) -> Entry:
    return Entry(path, HARDLINK, link_target=target)


def wh(path: str) -> Entry:
    """A whiteout as it appears in a layer tar: an empty file named .wh.NAME."""
    return encode_whiteout(Entry(path, WHITEOUT))


def opq(path: str) -> Entry:
    return encode_whiteout(Entry(path, OPAQUE))


def layer(*entries: Entry) -> Layer:
    return Layer(list(entries))


def paths(entries: Iterable[Entry]) -> list[str]:
    return [e.path for e in entries]


def by_path(entries: Iterable[Entry]) -> dict[str, Entry]:
    return {e.path: e for e in entries}


def content(entry: Entry) -> bytes:
    with entry.open() as stream:
        return stream.read()


# --- normalize_path ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("./a//b/", "a/b"),
        ("/a/b", "a/b"),
        ("a/./b", "a/b"),
        ("a/../b", "b"),
        ("a/b/../../c", "c"),
        ("a/b/..", "a"),
        (".", ""),
        ("./", ""),
        ("/", ""),
        ("", ""),
        ("..a/b..", "..a/b.."),
        ("a/...", "a/..."),
        ("a\\..\\b", "a\\..\\b"),  # a backslash is an ordinary character in a POSIX name
    ],
)
def test_normalize_path(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


@pytest.mark.parametrize(
    "hostile",
    [
        "..",
        "../etc/passwd",
        "/../etc/passwd",
        "./../x",
        "a/../../etc/passwd",
        "a/b/../../..",
        "a\x00b",
    ],
)
def test_normalize_path_refuses_escapes(hostile: str) -> None:
    with pytest.raises(InvalidImageError):
        normalize_path(hostile)


@given(st.text(alphabet="ab./", max_size=20))
def test_normalize_path_is_idempotent_and_never_escapes(raw: str) -> None:
    try:
        norm = normalize_path(raw)
    except InvalidImageError:
        depth = 0
        for part in raw.split("/"):
            depth += -1 if part == ".." else part not in ("", ".")
            if depth < 0:
                return
        raise AssertionError(f"{raw!r} was refused but stays inside the root") from None
    assert normalize_path(norm) == norm
    assert ".." not in norm.split("/")
    assert not norm.startswith("/") and not norm.endswith("/")
    Entry(norm, DIR)  # accepted as an entry path


# --- Entry ------------------------------------------------------------------------------------


def test_entry_defaults_and_validation() -> None:
    assert Entry("a", FILE).mode == 0o644
    assert Entry("a", DIR).mode == 0o755
    assert Entry("a", SYMLINK, link_target="/x").mode == 0o777
    assert Entry("a", FILE, mode=0o4755).mode == 0o4755
    for bad in ("./a", "/a", "a/", "a//b", "a/../b", "a/."):
        with pytest.raises(InvalidInputError):
            Entry(bad, FILE)
    with pytest.raises(InvalidInputError):
        Entry("a", FILE, mode=0o100644)  # type bits do not belong in mode
    with pytest.raises(InvalidInputError):
        Entry("a", DIR, size=5)
    with pytest.raises(InvalidInputError):
        Entry("", FILE)
    with pytest.raises(InvalidInputError):
        Entry("a", HARDLINK, link_target="../b")
    assert Entry("", DIR).path == ""


def test_entry_times_survive_extremes() -> None:
    e = Entry("a", FILE, mtime=-(10**18), atime=2**62, ctime=None)
    assert e.mtime == -(10**18) and e.atime == 2**62 and e.ctime is None


def test_entry_xattrs_are_sorted_hashable_and_order_free() -> None:
    a = Entry("a", FILE, xattrs=(("user.b", b"2"), ("user.a", b"1")))
    b = Entry("a", FILE, xattrs={"user.a": b"1", "user.b": b"2"})  # type: ignore[arg-type]
    assert a.xattrs == (("user.a", b"1"), ("user.b", b"2"))
    assert a == b and hash(a) == hash(b)
    assert a.xattr_map() == {"user.a": b"1", "user.b": b"2"}


def test_entry_opener_is_lazy_and_not_part_of_equality() -> None:
    calls = []

    def opener() -> io.BytesIO:
        calls.append(1)
        return io.BytesIO(b"hello")

    e = Entry("a", FILE, size=5, opener=opener)
    assert calls == []
    assert content(e) == b"hello" and content(e) == b"hello"
    assert e == Entry("a", FILE, size=5)
    assert "opener" not in repr(e)


def test_entry_open_refuses_non_files() -> None:
    with pytest.raises(InvalidInputError, match="dir"):
        Entry("a", DIR).open()
    with pytest.raises(InvalidInputError):
        Entry("a", FILE).open()  # no opener attached
    with pytest.raises(InvalidInputError):
        hl("b", "a").open()


def test_entry_name_and_parent() -> None:
    e = Entry("a/b/c", FILE)
    assert (e.name, e.parent) == ("c", "a/b")
    assert (Entry("c", FILE).name, Entry("c", FILE).parent) == ("c", "")


# --- whiteouts --------------------------------------------------------------------------------


def test_decode_whiteout() -> None:
    w = decode_whiteout(Entry("a/b/.wh.c", FILE, mode=0o600, uid=3))
    assert (w.path, w.type, w.mode, w.uid) == ("a/b/c", WHITEOUT, 0o600, 3)
    assert decode_whiteout(Entry(".wh.top", FILE)) == Entry("top", WHITEOUT)
    assert decode_whiteout(Entry("a/.wh..wh..opq", FILE)) == Entry("a", OPAQUE)
    assert decode_whiteout(Entry(".wh..wh..opq", FILE)) == Entry("", OPAQUE)
    assert decode_whiteout(Entry("a/.wh.b", DIR)).type is WHITEOUT  # the prefix is reserved


def test_decode_whiteout_leaves_other_entries_alone() -> None:
    for e in (f("a/b"), Entry("a.wh.b", FILE), Entry("x.wh./y", FILE), Entry("a/b.wh.", DIR)):
        assert decode_whiteout(e) is e


@pytest.mark.parametrize("name", [".wh.", "a/.wh.", ".wh..", "a/.wh..", "a/.wh...", "a/.wh.b/c"])
def test_decode_whiteout_refuses_bad_names(name: str) -> None:
    with pytest.raises(InvalidImageError):
        decode_whiteout(Entry(name, FILE))


def test_encode_whiteout() -> None:
    enc = encode_whiteout(Entry("a/b", WHITEOUT, mode=0o600))
    assert (enc.path, enc.type, enc.size, enc.mode) == ("a/.wh.b", FILE, 0, 0o600)
    assert content(enc) == b""
    assert encode_whiteout(Entry("a", OPAQUE)).path == "a/.wh..wh..opq"
    assert encode_whiteout(Entry("", OPAQUE)).path == ".wh..wh..opq"
    plain = f("a")
    assert encode_whiteout(plain) is plain


_names = st.text(alphabet="abc.-_", min_size=1, max_size=6).filter(
    lambda s: s not in (".", "..") and not s.startswith(".wh.")
)


@given(
    st.lists(_names, max_size=3),
    _names,
    st.sampled_from([WHITEOUT, OPAQUE]),
    st.integers(-(2**40), 2**40),
)
def test_whiteout_round_trip(parents: list[str], name: str, kind: EntryType, mtime: int) -> None:
    path = "/".join([*parents, name])
    original = Entry(path, kind, mtime=mtime, uid=7)
    encoded = encode_whiteout(original)
    assert encoded.type is FILE and encoded.name.startswith(".wh.")
    assert decode_whiteout(encoded) == original
    assert encode_whiteout(decode_whiteout(encoded)) == encoded


# --- flatten: replacement ---------------------------------------------------------------------


def test_upper_layer_replaces_lower() -> None:
    out = by_path(flatten([layer(d("a"), f("a/x", b"old")), layer(f("a/x", b"new", mode=0o600))]))
    assert content(out["a/x"]) == b"new" and out["a/x"].mode == 0o600


def test_later_member_of_one_layer_wins() -> None:
    out = by_path(flatten([layer(f("x", b"one"), f("x", b"two"))]))
    assert content(out["x"]) == b"two"


def test_dir_over_dir_merges_and_upper_metadata_wins() -> None:
    out = by_path(
        flatten(
            [layer(d("a", mode=0o700, uid=1), f("a/x")), layer(d("a", mode=0o755, uid=2), f("a/y"))]
        )
    )
    assert paths(out.values()) == ["a", "a/x", "a/y"]
    assert (out["a"].mode, out["a"].uid) == (0o755, 2)


def test_non_directory_over_directory_drops_lower_children() -> None:
    lower = layer(d("a"), d("a/b"), f("a/b/x"), f("a/y"))
    for replacement in (
        f("a", b"file"),
        Entry("a", SYMLINK, link_target="/elsewhere"),
        Entry("a", FIFO),
    ):
        out = flatten([lower, layer(replacement)])
        assert paths(out) == ["a"] and out[0].type is replacement.type


def test_directory_over_file() -> None:
    out = flatten([layer(f("a", b"x")), layer(d("a"), f("a/b"))])
    assert [(e.path, e.type) for e in out] == [("a", DIR), ("a/b", FILE)]


def test_entry_below_a_file_is_invalid() -> None:
    with pytest.raises(InvalidImageError, match="not a directory"):
        flatten([layer(f("a")), layer(f("a/b"))])
    with pytest.raises(InvalidImageError):
        flatten([layer(f("a"), f("a/b"))])


def test_entry_below_a_symlink_is_unsupported() -> None:
    with pytest.raises(UnsupportedFeatureError, match="symbolic link"):
        flatten([layer(Entry("lib", SYMLINK, link_target="usr/lib")), layer(f("lib/x"))])
    with pytest.raises(UnsupportedFeatureError):
        flatten([layer(Entry("lib", SYMLINK, link_target="usr/lib")), layer(wh("lib/x"))])


# --- flatten: whiteouts -----------------------------------------------------------------------


def test_whiteout_hides_path_and_descendants() -> None:
    lower = layer(d("a"), d("a/b"), f("a/b/x"), f("a/c"), f("keep"))
    assert paths(flatten([lower, layer(wh("a/b"))])) == ["a", "a/c", "keep"]
    assert paths(flatten([lower, layer(wh("a"))])) == ["keep"]


def test_whiteout_of_missing_path_is_harmless() -> None:
    assert paths(flatten([layer(f("x")), layer(wh("nope"), wh("x/under-a-file"))])) == ["x"]


@pytest.mark.parametrize("whiteout_first", [True, False])
def test_whiteout_spares_same_path_in_same_layer(whiteout_first: bool) -> None:
    upper = [wh("a"), d("a", mode=0o700), f("a/new")]
    if not whiteout_first:
        upper.reverse()
    out = by_path(flatten([layer(d("a"), f("a/old")), layer(*upper)]))
    assert list(out) == ["a", "a/new"]
    assert out["a"].mode == 0o700


@pytest.mark.parametrize("whiteout_first", [True, False])
def test_whiteout_spares_same_layer_file_replacing_it(whiteout_first: bool) -> None:
    upper = [wh("x"), f("x", b"new")] if whiteout_first else [f("x", b"new"), wh("x")]
    out = flatten([layer(f("x", b"old")), layer(*upper)])
    assert paths(out) == ["x"] and content(out[0]) == b"new"


def test_whiteout_spares_same_layer_descendants_and_synthesises_parent() -> None:
    out = by_path(
        flatten([layer(d("a", mode=0o700, uid=9), f("a/old")), layer(f("a/new"), wh("a"))])
    )
    assert list(out) == ["a", "a/new"]
    assert out["a"] == Entry("a", DIR, mode=0o755, uid=0, gid=0, mtime=0)


def test_whiteout_applies_to_lower_layers_only_not_upper() -> None:
    out = flatten([layer(f("x", b"1")), layer(wh("x")), layer(f("x", b"3"))])
    assert paths(out) == ["x"] and content(out[0]) == b"3"


# --- flatten: opaque --------------------------------------------------------------------------


@pytest.mark.parametrize("marker_first", [True, False])
def test_opaque_hides_lower_children_only(marker_first: bool) -> None:
    lower = layer(d("a", mode=0o711), d("a/sub"), f("a/sub/deep"), f("a/old"), f("sibling"))
    upper = [opq("a"), f("a/new")]
    if not marker_first:
        upper.reverse()
    out = by_path(flatten([lower, layer(*upper)]))
    assert list(out) == ["a", "a/new", "sibling"]
    assert out["a"].mode == 0o711  # the directory itself is kept, with its lower metadata


def test_opaque_spec_example_in_either_order() -> None:
    base = layer(d("a"), d("a/b"), d("a/b/c"), f("a/b/c/bar"))
    ordered = layer(d("a"), opq("a"), d("a/b"), d("a/b/c"), f("a/b/c/foo"))
    shuffled = layer(d("a"), d("a/b"), d("a/b/c"), f("a/b/c/foo"), opq("a"))
    expected = ["a", "a/b", "a/b/c", "a/b/c/foo"]
    assert paths(flatten([base, ordered])) == expected
    assert paths(flatten([base, shuffled])) == expected


def test_opaque_root_hides_everything_below() -> None:
    out = flatten([layer(d("a"), f("a/x"), f("b")), layer(opq(""), f("c"))])
    assert paths(out) == ["c"]


def test_opaque_on_missing_directory_is_harmless() -> None:
    assert paths(flatten([layer(f("x")), layer(opq("nope"), f("nope/y"))])) == [
        "nope",
        "nope/y",
        "x",
    ]


# --- flatten: implicit parents, root, order ---------------------------------------------------


def test_implicit_parents_are_synthesised() -> None:
    out = flatten([layer(f("a/b/c", b"x", mode=0o600, uid=5, mtime=99))])
    assert out[:2] == [Entry("a", DIR, mode=0o755), Entry("a/b", DIR, mode=0o755)]
    assert (out[0].uid, out[0].gid, out[0].mtime) == (0, 0, 0)
    assert out[2].path == "a/b/c"


def test_explicit_directory_later_replaces_synthesised_metadata() -> None:
    out = by_path(flatten([layer(f("a/b")), layer(d("a", mode=0o700, uid=3, mtime=42))]))
    assert out["a"] == Entry("a", DIR, mode=0o700, uid=3, mtime=42)
    assert "a/b" in out


def test_root_only_when_described() -> None:
    assert paths(flatten([layer(f("x"))])) == ["x"]
    out = flatten([layer(d("", mode=0o700), f("x"))])
    assert paths(out) == ["", "x"] and out[0].mode == 0o700


def test_order_is_by_path_components() -> None:
    # Plain string order would put "a-b" and "a.b" before "a/b" ('-' and '.' sort before '/').
    out = flatten([layer(f("a-b"), f("a/b"), f("a.b"), f("b"), d("a"), f("a/a"))])
    assert paths(out) == ["a", "a/a", "a/b", "a-b", "a.b", "b"]


def test_deep_tree_does_not_recurse() -> None:
    deep = "/".join(["d"] * 3000)
    out = flatten([layer(f(deep))])
    assert len(out) == 3000 and out[-1].path == deep


def test_layer_source_factory_and_iterator_refusal() -> None:
    calls = []

    def source() -> Iterable[Entry]:
        calls.append(1)
        yield f("x")

    lay = Layer(source, digest="sha256:00")
    assert paths(flatten([lay])) == ["x"] and paths(flatten([lay])) == ["x"]
    assert len(calls) == 2
    with pytest.raises(InvalidInputError):
        Layer(iter([f("x")]))  # type: ignore[arg-type]


def test_no_layers_is_an_empty_tree() -> None:
    assert flatten([]) == []


# --- flatten: hardlinks -----------------------------------------------------------------------


def test_hardlink_in_same_layer() -> None:
    out = flatten([layer(f("a", b"data"), hl("b", "a"))])
    assert [(e.path, e.type, e.link_target) for e in out] == [("a", FILE, ""), ("b", HARDLINK, "a")]


def test_hardlink_in_layer_two_to_file_in_layer_one() -> None:
    out = flatten([layer(d("bin"), f("bin/busybox", b"elf")), layer(hl("bin/sh", "bin/busybox"))])
    assert [(e.path, e.type) for e in out] == [
        ("bin", DIR),
        ("bin/busybox", FILE),
        ("bin/sh", HARDLINK),
    ]
    assert out[2].link_target == "bin/busybox"


def test_hardlink_survives_deletion_of_its_target() -> None:
    lower = layer(f("a", b"data", mode=0o600, uid=5, mtime=77), hl("b", "a"))
    out = flatten([lower, layer(wh("a"))])
    assert len(out) == 1
    b = out[0]
    assert (b.path, b.type, b.mode, b.uid, b.mtime, b.size) == ("b", FILE, 0o600, 5, 77, 4)
    assert content(b) == b"data"


def test_hardlink_from_layer_two_survives_deletion_in_layer_three() -> None:
    out = flatten([layer(f("orig", b"v1")), layer(hl("link", "orig")), layer(wh("orig"))])
    assert paths(out) == ["link"] and out[0].type is FILE and content(out[0]) == b"v1"


def test_hardlink_keeps_old_content_when_target_is_replaced() -> None:
    out = by_path(flatten([layer(f("a", b"old"), hl("b", "a")), layer(f("a", b"new"))]))
    assert out["a"].type is FILE and content(out["a"]) == b"new"
    assert out["b"].type is FILE and content(out["b"]) == b"old"


def test_hardlink_keeps_content_when_target_directory_is_replaced() -> None:
    lower = layer(d("dir"), f("dir/x", b"x"), hl("y", "dir/x"))
    out = by_path(flatten([lower, layer(f("dir", b"now a file"))]))
    assert out["y"].type is FILE and content(out["y"]) == b"x"


def test_hardlink_group_stays_linked_after_deletion() -> None:
    out = flatten([layer(f("a", b"data"), hl("b", "a"), hl("c", "a")), layer(wh("a"))])
    assert [(e.path, e.type, e.link_target) for e in out] == [("b", FILE, ""), ("c", HARDLINK, "b")]
    assert content(out[0]) == b"data"


def test_hardlink_sorting_before_its_target_takes_the_content() -> None:
    out = flatten([layer(f("z", b"data", mode=0o700), hl("a", "z"))])
    assert [(e.path, e.type, e.link_target) for e in out] == [("a", FILE, ""), ("z", HARDLINK, "a")]
    assert content(out[0]) == b"data" and out[0].mode == 0o700


def test_hardlink_chain_in_one_layer_resolves_to_the_file() -> None:
    out = by_path(flatten([layer(hl("c", "b"), hl("b", "a"), f("a", b"x"))]))
    assert out["b"].link_target == "a" and out["c"].link_target == "a"


def test_hardlink_to_the_same_inode_again_after_deletion() -> None:
    out = by_path(
        flatten([layer(f("a", b"x")), layer(hl("b", "a")), layer(wh("a")), layer(hl("a", "b"))])
    )
    assert out["a"].type is FILE and content(out["a"]) == b"x"
    assert out["b"].type is HARDLINK and out["b"].link_target == "a"


@pytest.mark.parametrize(
    "layers",
    [
        [layer(hl("b", "missing"))],
        [layer(d("dir"), hl("b", "dir"))],
        [layer(hl("a", "a"))],
        [layer(hl("a", "b"), hl("b", "a"))],
        [layer(f("a")), layer(wh("a"), hl("b", "a"))],  # the whiteout hid the target first
    ],
)
def test_bad_hardlinks_are_invalid(layers: list[Layer]) -> None:
    with pytest.raises(InvalidImageError):
        flatten(layers)


# --- flatten: properties ----------------------------------------------------------------------

DIRISH = ["a", "a/b", "c"]
LEAVES = ["a/x", "a/b/y", "a/b/z", "c/w", "v"]


@st.composite
def _entry(draw: st.DrawFn) -> Entry:
    path = draw(st.sampled_from(DIRISH + LEAVES))
    if path in DIRISH:
        kinds = [DIR, DIR, DIR, FILE, WHITEOUT, OPAQUE]
    else:
        kinds = [FILE, FILE, SYMLINK, FIFO, DIR, WHITEOUT, OPAQUE, HARDLINK, HARDLINK]
    kind = draw(st.sampled_from(kinds))
    mode = draw(st.sampled_from([0o644, 0o755, 0o4755]))
    mtime = draw(st.integers(-5, 5))
    if kind is FILE:
        return f(path, draw(st.binary(max_size=3)), mode=mode, mtime=mtime)
    if kind is HARDLINK:
        return hl(path, draw(st.sampled_from(LEAVES)))
    if kind is SYMLINK:
        target = draw(st.sampled_from(["/etc", "x", "../y"]))
        return Entry(path, SYMLINK, link_target=target, mode=mode, mtime=mtime)
    if kind in (WHITEOUT, OPAQUE):
        marker = Entry(path, kind)
        return encode_whiteout(marker) if draw(st.booleans()) else marker
    return Entry(path, kind, mode=mode, mtime=mtime)


_layers = st.lists(st.lists(_entry(), max_size=7).map(lambda es: Layer(es)), max_size=4)


def _key(path: str) -> list[str]:
    return path.split("/")


def reference_flatten(layers: list[Layer]) -> tuple[dict[str, Entry], dict[str, Entry]]:
    """A deliberately naive model of layer.md: whole-dict scans, no tree, no cleverness.

    Returns (path -> entry as applied, path -> the entry holding the content of each
    non-directory, which differs from the first only for hardlinks).
    """
    tree: dict[str, Entry] = {}
    inode: dict[str, Entry] = {}

    def drop(top: str, keep_top: bool) -> None:
        """Remove ``top`` (unless keep_top) and everything below it; "" is the root."""
        below = [p for p in tree if p != "" and (top == "" or p.startswith(top + "/"))]
        for p in below + ([] if keep_top or top not in tree else [top]):
            del tree[p]
            inode.pop(p, None)

    for lay in layers:
        decoded = [decode_whiteout(e) for e in lay.iter_entries()]
        added: dict[str, Entry] = {}
        for e in decoded:
            if e.type is WHITEOUT:
                drop(e.path, keep_top=False)
            elif e.type is OPAQUE:
                drop(e.path, keep_top=True)
            else:
                added[e.path] = e
        links: list[str] = []
        for path in sorted(added, key=_key):
            e = added[path]
            parts = path.split("/")
            for i in range(1, len(parts)):
                ancestor = "/".join(parts[:i])
                if ancestor not in tree:
                    tree[ancestor] = Entry(ancestor, DIR, mode=0o755)
                elif tree[ancestor].type is not DIR:
                    raise InvalidImageError("below a non-directory")
            old = tree.get(path)
            if old is not None and old.type is DIR and e.type is not DIR:
                drop(path, keep_top=True)
            tree[path] = e
            inode.pop(path, None)
            if e.type is HARDLINK:
                links.append(path)
            elif e.type is not DIR:
                inode[path] = e
        for path in links:
            chain: list[str] = []
            cur = path
            while cur not in inode:  # missing, a directory, or an unresolved link of this layer
                target = tree.get(cur)
                if target is None or target.type is not HARDLINK or cur in chain:
                    raise InvalidImageError("bad hardlink")
                chain.append(cur)
                cur = target.link_target
            for p in chain:
                inode[p] = inode[cur]
    tree.pop("", None)
    return tree, inode


@settings(max_examples=300, deadline=None)
@given(_layers)
def test_flatten_matches_reference_model(layers: list[Layer]) -> None:
    try:
        expected, inode = reference_flatten(layers)
    except InvalidImageError:
        with pytest.raises(InvalidImageError):
            flatten(layers)
        return
    out = by_path(flatten(layers))
    out.pop("", None)
    assert set(out) == set(expected)
    primary: dict[str, str] = {}
    for path, entry in out.items():
        want = expected[path]
        if want.type is DIR:
            assert entry == want
            continue
        primary[path] = entry.link_target if entry.type is HARDLINK else path
        holder = out[primary[path]]
        source = inode[path]
        # Same content and inode metadata as the reference says this path should have.
        assert holder.type is not HARDLINK
        assert replace(holder, path=source.path) == source
        assert holder.opener is source.opener
    for p in primary:  # two paths share an inode in the output exactly when they should
        for q in primary:
            assert (primary[p] == primary[q]) == (inode[p] is inode[q])


@settings(max_examples=300, deadline=None)
@given(_layers)
def test_flatten_output_invariants(layers: list[Layer]) -> None:
    try:
        out = flatten(layers)
    except InvalidImageError:
        return
    seen: dict[str, Entry] = {}
    for entry in out:
        assert entry.path not in seen, "duplicate path"
        assert entry.type not in (WHITEOUT, OPAQUE)
        if entry.path:
            assert seen[entry.parent].type is DIR if entry.parent else True, "parent after child"
        if entry.type is HARDLINK:
            assert seen[entry.link_target].type not in (DIR, HARDLINK)
        if entry.type is FILE:
            assert len(content(entry)) == entry.size
        seen[entry.path] = entry
    assert [_key(e.path) for e in out] == sorted(_key(e.path) for e in out)


def test_layer_changes_orders_a_layer_as_flatten_applies_it() -> None:
    changes = layer_changes([
        f("a/b/c", b"old"),
        f("a/.wh.gone"),
        Entry("a/b", DIR),
        f("a/.wh..wh..opq"),
        f("a/b/c", b"new"),
        Entry("a", DIR),
    ])
    assert changes.whiteouts == {"a/gone"}
    assert changes.opaques == {"a"}
    assert [e.path for e in changes.entries] == ["a", "a/b", "a/b/c"]
    assert changes.entries[2].open().read() == b"new"  # the later member wins
