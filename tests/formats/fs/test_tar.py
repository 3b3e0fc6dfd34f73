"""The layer tar reader: types, metadata, whiteouts, hostile names, missing end blocks."""

from __future__ import annotations

import io
import tarfile

import pytest
from imgbridge.formats.fs.tar import read_tar

from imgbridge.errors import InvalidImageError
from imgbridge.model.tree import EntryType
from imgbridge.source import BytesSource


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]], fmt: int = tarfile.PAX_FORMAT
         ) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, **kw: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in kw.items():
        setattr(info, key, value)
    return info


def test_types_metadata_and_contents() -> None:
    f = _info("./etc/passwd", size=5, mode=0o4755, uid=7, gid=8, uname="u", gname="g")
    f.pax_headers = {"mtime": "1700000000.123456789", "SCHILY.xattr.user.k": "v\udcff"}
    data = _tar([
        (_info("etc", tarfile.DIRTYPE, mode=0o700), None),
        (f, b"hello"),
        (_info("etc/link", tarfile.SYMTYPE, linkname="../../outside"), None),
        (_info("etc/hard", tarfile.LNKTYPE, linkname="./etc//passwd"), None),
        (_info("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3), None),
        (_info("etc/.wh.gone"), b""),
        (_info("var/.wh..wh..opq"), b""),
    ])
    entries = list(read_tar(BytesSource(data)))
    by = {(e.path, e.type): e for e in entries}
    d = by[("etc", EntryType.DIR)]
    assert d.mode == 0o700
    p = by[("etc/passwd", EntryType.FILE)]
    assert (p.mode, p.uid, p.gid, p.uname, p.gname, p.size) == (0o4755, 7, 8, "u", "g", 5)
    assert p.mtime == 1_700_000_000_123_456_789
    assert p.xattr_map() == {"user.k": b"v\xff"}
    assert p.open().read() == b"hello"
    assert by[("etc/link", EntryType.SYMLINK)].link_target == "../../outside"  # verbatim
    assert by[("etc/hard", EntryType.HARDLINK)].link_target == "etc/passwd"
    dev = by[("dev/null", EntryType.CHAR)]
    assert (dev.devmajor, dev.devminor) == (1, 3)
    assert ("etc/gone", EntryType.WHITEOUT) in by
    assert ("var", EntryType.OPAQUE) in by


@pytest.mark.parametrize("name", ["../evil", "a/../../evil"])
def test_member_climbing_out_is_refused(name: str) -> None:
    data = _tar([(_info(name, size=1), b"x")])
    with pytest.raises(InvalidImageError, match="climbs above the root"):
        list(read_tar(BytesSource(data)))


def test_hardlink_climbing_out_is_refused() -> None:
    data = _tar([(_info("a", tarfile.LNKTYPE, linkname="../../etc/shadow"), None)])
    with pytest.raises(InvalidImageError):
        list(read_tar(BytesSource(data)))


def test_missing_end_of_archive_and_padding_is_the_end() -> None:
    data = _tar([(_info("a", size=5), b"hello")], fmt=tarfile.USTAR_FORMAT)
    cut = data[:512 + 5]  # what umoci 0.4.7 insert writes: no padding, no end blocks
    entries = list(read_tar(BytesSource(cut)))
    assert [(e.path, e.open().read()) for e in entries] == [("a", b"hello")]


def test_member_data_past_the_end_is_an_error() -> None:
    data = _tar([(_info("a", size=600), b"x" * 600)], fmt=tarfile.USTAR_FORMAT)
    with pytest.raises(InvalidImageError, match="needs 600 bytes"):
        list(read_tar(BytesSource(data[:700])))


def test_empty_blob_is_an_empty_layer() -> None:
    assert list(read_tar(BytesSource(b""))) == []


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_huge_header_record_is_refused_before_it_is_read(fmt: int) -> None:
    # A long name makes tarfile write a PAX ('x') or GNU long-name ('L') record first; its
    # size field then claims 8 GiB, which tarfile would allocate before reading a byte.
    data = bytearray(_tar([(_info("d/" + "n" * 150, size=2), b"hi")], fmt=fmt))
    assert data[156:157] in (tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME)
    data[124:136] = b"77777777777\0"
    data[148:156] = b" " * 8
    data[148:156] = b"%06o\0 " % sum(data[:512])
    with pytest.raises(InvalidImageError, match="header record claims 8589934592 bytes"):
        list(read_tar(BytesSource(bytes(data))))
