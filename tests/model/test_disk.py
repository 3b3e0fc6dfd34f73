"""The derived half of the Disk model, driven by a small in-memory layer format."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imgbridge.errors import InternalError
from imgbridge.model.disk import BlockState, Disk, Extent, ExtentKind, Run, iter_nonzero
from imgbridge.source import BytesSource

D, Z, U = BlockState.DATA, BlockState.ZERO, BlockState.UNALLOCATED


class LayerDisk(Disk):
    """A layer described by fixed-size blocks: each 'D' stores its bytes, 'Z' zero, 'U' absent."""

    format_name = "test"

    def __init__(self, pattern: str, block: int, payload: bytes,
                 backing: Disk | None = None) -> None:
        super().__init__(len(pattern) * block, host=BytesSource(payload), backing=backing)
        self.pattern, self.block = pattern, block

    def block_status(self, offset: int, length: int) -> Iterator[Run]:
        first = offset // self.block
        last = (offset + length - 1) // self.block
        for i in range(first, last + 1):
            state = {"D": D, "Z": Z, "U": U}[self.pattern[i]]
            yield Run(i * self.block, self.block, state, i * self.block if state is D else None)


def test_reads_fall_through_to_backing() -> None:
    base = LayerDisk("DDDD", 4, b"AAAABBBBCCCCDDDD")
    top = LayerDisk("UDZU", 4, b"....xxxx........", backing=base)
    assert top.read_at(0, 16) == b"AAAAxxxx\0\0\0\0DDDD"
    assert top.read_at(2, 4) == b"AAxx"


def test_backing_smaller_than_overlay_reads_zero_beyond_its_end() -> None:
    base = LayerDisk("D", 4, b"AAAA")
    top = LayerDisk("UU", 4, b"", backing=base)
    assert top.read_at(0, 8) == b"AAAA\0\0\0\0"
    assert list(top.extents()) == [
        Extent(0, 4, ExtentKind.DATA, 1, True, 0),
        Extent(4, 4, ExtentKind.ZERO, 0, False, None),
    ]


def test_extents_merge_like_qemu_img_map() -> None:
    base = LayerDisk("DDUU", 4, bytes(16))
    top = LayerDisk("DDUUZ", 4, bytes(20), backing=base)
    assert list(top.extents()) == [
        Extent(0, 8, ExtentKind.DATA, 0, True, 0),
        Extent(8, 8, ExtentKind.ZERO, 1, False, None),  # unallocated in the whole chain
        Extent(16, 4, ExtentKind.ZERO, 0, True, None),
    ]


def test_extents_of_a_window_are_clipped() -> None:
    disk = LayerDisk("DZD", 4, bytes(12))
    assert list(disk.extents(2, 7)) == [
        Extent(2, 2, ExtentKind.DATA, 0, True, 2),
        Extent(4, 4, ExtentKind.ZERO, 0, True, None),
        Extent(8, 1, ExtentKind.DATA, 0, True, 8),
    ]


def test_a_block_status_with_a_gap_is_a_bug() -> None:
    class Gappy(Disk):
        def block_status(self, offset: int, length: int) -> Iterator[Run]:
            yield Run(0, 4, Z)
            yield Run(8, 4, Z)

    with pytest.raises(InternalError, match="skipped"):
        list(Gappy(12).extents())


def test_iter_nonzero_skips_zero_extents_and_zero_granules() -> None:
    granule = 4096
    payload = bytearray(4 * granule)
    payload[0:10] = b"x" * 10  # block 0: data
    payload[3 * granule + 5] = 1  # block 3: data; blocks 1-2 stored but zero
    disk = LayerDisk("DDDDZ", granule, bytes(payload) + bytes(granule))
    chunks = list(iter_nonzero(disk))
    assert [(off, len(data)) for off, data in chunks] == [(0, granule), (3 * granule, granule)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40_000), st.binary(min_size=1, max_size=300)),
                max_size=8),
       st.sampled_from([512, 4096]))
def test_iter_nonzero_loses_no_byte(writes: list[tuple[int, bytes]], granule: int) -> None:
    size = 48_000
    buf = bytearray(size)
    for off, data in writes:
        buf[off:off + len(data)] = data[: size - off]
    disk = LayerDisk("D", size, bytes(buf))
    rebuilt = bytearray(size)
    last_end = -1
    for off, data in iter_nonzero(disk, granule=granule, max_io=8192):
        assert off > last_end  # ordered, no overlap
        assert data.count(0) != len(data)  # a piece of zeros would not be a hole
        rebuilt[off:off + len(data)] = data
        last_end = off + len(data) - 1
    assert rebuilt == buf
