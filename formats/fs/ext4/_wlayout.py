"""Geometry and block allocation for the ext4 writer.

Block groups of ``8 * block_size`` blocks; sparse_super backups of the superblock and group
descriptor table in groups 0, 1 and the powers of 3, 5 and 7; flex_bg packing of the block
bitmaps, inode bitmaps and inode tables of 16 groups at the start of the first group of each
flex group (mke2fs's placement). What is left is handed out by a forward-moving allocator, so
a file's blocks form one run unless metadata sits in the way.

References: Linux ``Documentation/filesystems/ext4/overview.rst`` ("Blocks", "Block Groups",
"Flexible Block Groups", "Meta Block Groups"), ``group_descr.rst``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import _structs as s

#: flex_bg: the bitmaps and inode tables of 2^4 groups are packed together (mke2fs's default).
LOG_GROUPS_PER_FLEX = 4
#: The writer always uses the 64bit feature's 64-byte group descriptors.
DESC_SIZE = s.GROUP_DESC_SIZE_64BIT


class OutOfSpace(Exception):
    """The filesystem being planned is too small (internal to the planner)."""

    def __init__(self, short_by: int) -> None:
        super().__init__(f"short by {short_by} blocks")
        self.short_by = short_by


has_super = s.has_sparse_super_backup


def inode_alignment(block_size: int, inode_size: int) -> int:
    """inodes_per_group must fill whole inode-table blocks and whole bitmap bytes."""
    per_block = block_size // inode_size
    align = 8
    while align % per_block:
        align += 8
    return align


def max_inodes_per_group(block_size: int, inode_size: int) -> int:
    """At most one bitmap block of inodes, and an inode table of at most a quarter group."""
    bits = 8 * block_size
    quarter = (bits // 4) * block_size // inode_size
    align = inode_alignment(block_size, inode_size)
    return min(bits, quarter) // align * align


@dataclass
class GroupMeta:
    block_bitmap: int
    inode_bitmap: int
    inode_table: int


@dataclass
class Geometry:
    block_size: int
    blocks_count: int
    inodes_per_group: int
    inode_size: int
    groups_per_flex: int = 1 << LOG_GROUPS_PER_FLEX
    groups_meta: list[GroupMeta] = field(default_factory=list)
    #: (start, length) of every metadata range, sorted.
    meta_ranges: list[tuple[int, int]] = field(default_factory=list)

    @property
    def first_data_block(self) -> int:
        return 1 if self.block_size == 1024 else 0

    @property
    def blocks_per_group(self) -> int:
        return 8 * self.block_size

    @property
    def groups(self) -> int:
        return -(-(self.blocks_count - self.first_data_block) // self.blocks_per_group)

    @property
    def gdt_blocks(self) -> int:
        return -(-(self.groups * DESC_SIZE) // self.block_size)

    @property
    def itable_blocks(self) -> int:
        return self.inodes_per_group * self.inode_size // self.block_size

    @property
    def inodes_count(self) -> int:
        return self.inodes_per_group * self.groups

    def group_start(self, group: int) -> int:
        return self.first_data_block + group * self.blocks_per_group

    def group_end(self, group: int) -> int:
        return min(self.blocks_count, self.group_start(group + 1))

    def super_blocks(self, group: int) -> int:
        """Blocks the superblock backup and descriptor table copy take at a group's start."""
        return 1 + self.gdt_blocks if has_super(group) else 0

    def plan(self) -> None:
        """Place the backups, bitmaps and inode tables. Raises OutOfSpace when they do not fit
        (the last group too short for what it must hold)."""
        reserved: list[tuple[int, int]] = []
        if self.first_data_block:
            reserved.append((0, 1))  # the boot block of a 1 KiB-block filesystem
        for group in range(self.groups):
            count = self.super_blocks(group)
            if count:
                reserved.append((self.group_start(group), count))
        sb_ranges = sorted(reserved)
        placed: list[tuple[int, int]] = []
        self.groups_meta = []
        for flex_first in range(0, self.groups, self.groups_per_flex):
            members = range(flex_first, min(self.groups, flex_first + self.groups_per_flex))
            cursor = self.group_start(flex_first) + self.super_blocks(flex_first)
            block_bitmaps, inode_bitmaps, tables = [], [], []
            for _ in members:
                cursor = _first_fit(sb_ranges, cursor, 1)
                block_bitmaps.append(cursor)
                cursor += 1
            for _ in members:
                cursor = _first_fit(sb_ranges, cursor, 1)
                inode_bitmaps.append(cursor)
                cursor += 1
            for _ in members:
                cursor = _first_fit(sb_ranges, cursor, self.itable_blocks)
                tables.append(cursor)
                cursor += self.itable_blocks
            if cursor > self.blocks_count:
                raise OutOfSpace(cursor - self.blocks_count)
            for bb, ib, it in zip(block_bitmaps, inode_bitmaps, tables, strict=True):
                self.groups_meta.append(GroupMeta(bb, ib, it))
            placed.append((block_bitmaps[0], len(members)))
            placed.append((inode_bitmaps[0], len(members)))
            placed.extend((t, self.itable_blocks) for t in tables)
        self.meta_ranges = _merge(sorted(sb_ranges + placed))

    def free_ranges(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        pos = self.first_data_block
        for start, length in self.meta_ranges:
            if start > pos:
                out.append((pos, start - pos))
            pos = max(pos, start + length)
        if pos < self.blocks_count:
            out.append((pos, self.blocks_count - pos))
        return out

    def metadata_blocks(self) -> int:
        return sum(length for _, length in self.meta_ranges)


def _first_fit(taken: list[tuple[int, int]], pos: int, length: int) -> int:
    """The first position >= pos where ``length`` blocks avoid every taken range."""
    moved = True
    while moved:
        moved = False
        for start, size in taken:
            if start < pos + length and pos < start + size:
                pos = start + size
                moved = True
    return pos


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, length in ranges:
        if out and out[-1][0] + out[-1][1] >= start:
            prev_start, prev_len = out[-1]
            out[-1] = (prev_start, max(prev_len, start + length - prev_start))
        else:
            out.append((start, length))
    return out


class Allocator:
    """Hands out free blocks front to back; a request spans several free ranges only when
    metadata interrupts it."""

    def __init__(self, free: list[tuple[int, int]]) -> None:
        self._free = free
        self._index = 0
        self._offset = 0
        self.total_free = sum(length for _, length in free)
        self.used = 0

    def allocate(self, count: int) -> list[tuple[int, int]]:
        """``count`` blocks as (start, length) runs in ascending order."""
        runs: list[tuple[int, int]] = []
        remaining = count
        while remaining:
            if self._index >= len(self._free):
                raise OutOfSpace(remaining)
            start, length = self._free[self._index]
            take = min(remaining, length - self._offset)
            runs.append((start + self._offset, take))
            self._offset += take
            remaining -= take
            if self._offset == length:
                self._index += 1
                self._offset = 0
        self.used += count
        return runs
