"""Directory blocks for the ext4 writer: linear blocks for directories that fit in one block,
hashed b-trees (htree: a dx_root, dx_nodes when one root cannot index every leaf, and leaves
sorted by hash) for bigger ones. Every leaf ends with the checksum tail of metadata_csum, every
dx block with its dx_tail.

References: Linux ``Documentation/filesystems/ext4/directory.rst`` (linear directories,
"Checksums", "Hash Tree Directories").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from imgbridge.errors import UnsupportedFeatureError

from . import _structs as s
from ._whash import dirhash

#: The dx_root's count/limit follows "." (12 bytes), ".." (12) and dx_root_info (8).
DX_ROOT_COUNT_OFFSET = s.DX_ROOT_INFO_OFFSET + s.DX_ROOT_INFO.size
#: A dx_node's follows one empty fake entry spanning the block (its 8-byte header).
DX_NODE_COUNT_OFFSET = s.DIR_ENTRY.size

#: crc32c over some bytes, seeded with the directory inode's checksum seed.
Checksum = Callable[[bytes], int]


@dataclass(frozen=True)
class DirItem:
    name: bytes
    ino: int
    file_type: int


def _rec_len(name_len: int) -> int:
    return (8 + name_len + 3) & ~3


def _finish_leaf(block: bytearray, block_size: int, checksum: Checksum) -> bytes:
    tail_at = block_size - s.DIR_TAIL.size
    block[tail_at:] = s.DIR_TAIL.pack(s.DirTail(0, s.DIR_TAIL.size, 0, s.FT_DIR_CSUM, 0))
    block[block_size - 4 :] = checksum(bytes(block[:tail_at])).to_bytes(4, "little")
    return bytes(block)


def _pack_leaves(records: list[DirItem], block_size: int, first_used: int,
                 first_block: bytearray | None) -> list[tuple[bytearray, list[int]]]:
    """Fill leaf blocks in order; returns each block and the record indexes it holds.

    ``first_block`` (with ``first_used`` bytes taken, "." and "..") starts the first leaf
    of a linear directory.
    """
    usable = block_size - s.DIR_TAIL.size
    leaves: list[tuple[bytearray, list[int]]] = []
    block = first_block if first_block is not None else bytearray(block_size)
    used = first_used
    last_at = -1 if first_block is None else 12  # ".." is the last record so far
    members: list[int] = []
    for idx, item in enumerate(records):
        need = _rec_len(len(item.name))
        if used + need > usable:
            _close_block(block, last_at, usable)
            leaves.append((block, members))
            block, used, last_at, members = bytearray(block_size), 0, -1, []
        s.DIR_ENTRY.pack_into(block, used, s.DirEntry2(item.ino, need, len(item.name),
                                                      item.file_type))
        block[used + 8 : used + 8 + len(item.name)] = item.name
        last_at = used
        used += need
        members.append(idx)
    _close_block(block, last_at, usable)
    leaves.append((block, members))
    return leaves


def _close_block(block: bytearray, last_at: int, usable: int) -> None:
    """Stretch the last record to the tail, or write one empty record in an empty block."""
    if last_at < 0:
        s.DIR_ENTRY.pack_into(block, 0, s.DirEntry2(0, usable, 0, 0))
        return
    rec_len = usable - last_at
    block[last_at + 4 : last_at + 6] = rec_len.to_bytes(2, "little")


def _dot_records(block: bytearray, self_ino: int, parent_ino: int, dotdot_len: int) -> None:
    s.DIR_ENTRY.pack_into(block, 0, s.DirEntry2(self_ino, 12, 1, s.FT_DIR))
    block[8:12] = b".\0\0\0"
    s.DIR_ENTRY.pack_into(block, 12, s.DirEntry2(parent_ino, dotdot_len, 2, s.FT_DIR))
    block[20:24] = b"..\0\0"


def empty_block(block_size: int, checksum: Checksum) -> bytes:
    """A directory block holding no entry (lost+found's spare blocks)."""
    block = bytearray(block_size)
    _close_block(block, -1, block_size - s.DIR_TAIL.size)
    return _finish_leaf(block, block_size, checksum)


def linear_size(items: list[DirItem], block_size: int) -> int:
    """How many blocks a linear layout takes."""
    usable = block_size - s.DIR_TAIL.size
    blocks, used = 1, 24
    for item in items:
        need = _rec_len(len(item.name))
        if used + need > usable:
            blocks, used = blocks + 1, 0
        used += need
    return blocks


def linear_blocks(items: list[DirItem], block_size: int, self_ino: int, parent_ino: int,
                  checksum: Checksum) -> list[bytes]:
    first = bytearray(block_size)
    _dot_records(first, self_ino, parent_ino, 12)
    leaves = _pack_leaves(items, block_size, 24, first)
    return [_finish_leaf(block, block_size, checksum) for block, _ in leaves]


def _dx_block(prefix: bytes, count_offset: int, entries: list[tuple[int, int]],
              block_size: int, checksum: Checksum) -> bytes:
    """A dx_root or dx_node: ``entries`` are (hash, block), the first one's hash implied 0."""
    limit = (block_size - count_offset - s.DX_TAIL.size) // s.DX_ENTRY.size
    block = bytearray(block_size)
    block[: len(prefix)] = prefix
    # The first entry's hash (implied 0) gives its place to the count/limit pair.
    s.DX_ENTRY.pack_into(block, count_offset, s.DxEntry(0, entries[0][1]))
    s.DX_COUNT_LIMIT.pack_into(block, count_offset, s.DxCountLimit(limit, len(entries)))
    pos = count_offset + s.DX_ENTRY.size
    for hash_value, target in entries[1:]:
        s.DX_ENTRY.pack_into(block, pos, s.DxEntry(hash_value, target))
        pos += s.DX_ENTRY.size
    tail_at = count_offset + limit * s.DX_ENTRY.size
    covered = bytes(block[: count_offset + len(entries) * s.DX_ENTRY.size]) + bytes(8)
    s.DX_TAIL.pack_into(block, tail_at, s.DxTail(0, checksum(covered)))
    return bytes(block)


def htree_blocks(items: list[DirItem], block_size: int, self_ino: int, parent_ino: int,
                 seed: bytes, checksum: Checksum) -> list[bytes]:
    """An indexed directory: [dx_root, dx_nodes..., leaves...] in logical block order."""
    hashed = sorted(((*dirhash(item.name, seed), item) for item in items),
                    key=lambda t: (t[0], t[1], t[2].name))
    records = [t[2] for t in hashed]
    hashes = [t[0] for t in hashed]
    leaves = _pack_leaves(records, block_size, 0, None)
    # Each leaf's lowest hash; the low bit marks a leaf continuing its predecessor's hash.
    starts: list[int] = []
    for n, (_, members) in enumerate(leaves):
        first = hashes[members[0]]
        if n and hashes[leaves[n - 1][1][-1]] == first:
            first |= 1
        starts.append(first)
    root_limit = (block_size - DX_ROOT_COUNT_OFFSET - s.DX_TAIL.size) // s.DX_ENTRY.size
    node_limit = (block_size - DX_NODE_COUNT_OFFSET - s.DX_TAIL.size) // s.DX_ENTRY.size
    nleaves = len(leaves)
    if nleaves <= root_limit:
        levels, nodes = 0, 0
    else:
        levels, nodes = 1, -(-nleaves // node_limit)
        if nodes > root_limit:
            raise UnsupportedFeatureError(
                f"a directory of {len(items)} entries needs a 3-level htree (largedir)")
    first_leaf = 1 + nodes
    root_prefix = bytearray(DX_ROOT_COUNT_OFFSET)
    _dot_records(root_prefix, self_ino, parent_ino, block_size - 12)
    s.DX_ROOT_INFO.pack_into(root_prefix, s.DX_ROOT_INFO_OFFSET, s.DxRootInfo(
        0, s.DX_HASH_HALF_MD4, s.DX_ROOT_INFO.size, levels, 0))
    out: list[bytes] = []
    if levels == 0:
        entries = [(starts[n], first_leaf + n) for n in range(nleaves)]
        out.append(_dx_block(bytes(root_prefix), DX_ROOT_COUNT_OFFSET, entries, block_size,
                             checksum))
    else:
        root_entries: list[tuple[int, int]] = []
        node_blocks: list[bytes] = []
        fake = s.DIR_ENTRY.pack(s.DirEntry2(0, block_size, 0, 0))
        for k in range(nodes):
            chunk = range(k * node_limit, min(nleaves, (k + 1) * node_limit))
            root_entries.append((starts[chunk[0]], 1 + k))
            node_entries = [(starts[n], first_leaf + n) for n in chunk]
            node_blocks.append(_dx_block(fake, DX_NODE_COUNT_OFFSET, node_entries,
                                         block_size, checksum))
        out.append(_dx_block(bytes(root_prefix), DX_ROOT_COUNT_OFFSET, root_entries,
                             block_size, checksum))
        out.extend(node_blocks)
    out.extend(_finish_leaf(block, block_size, checksum) for block, _ in leaves)
    return out
