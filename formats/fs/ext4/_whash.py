"""The hashes ext4 stores: the htree directory hash (half MD4) and the xattr hashes.

Directory hash: the kernel's ``ext4fs_dirhash`` (fs/ext4/hash.c) with ``DX_HASH_HALF_MD4``:
the name is cut into 32-byte pieces, each packed into eight 32-bit words (``str2hashbuf``,
whose bytes are signed chars on a filesystem flagged ``signed_directory_hash``, as mke2fs sets
on x86), and fed through the half-MD4 compression of lib/halfmd4.c starting from the
superblock's hash seed. Xattr hashes: ``ext4_xattr_hash_entry`` (name bytes then value words,
shifts 5 and 16) and ``ext4_xattr_rehash`` (entry hashes, shift 16) from fs/ext4/xattr.c.

References: Linux ``Documentation/filesystems/ext4/directory.rst`` ("Hash Tree Directories"),
``attributes.rst``; the algorithms as described there and in e2fsprogs' dirhash.c.
"""

from __future__ import annotations

import struct

_MASK = 0xFFFFFFFF
_K2 = 0o13240474631
_K3 = 0o15666365641
_DEFAULT_SEED = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)
#: The largest hash a directory entry may have: 0xFFFFFFFE is the end-of-directory cookie.
_EOF_HASH = 0x7FFFFFFF << 1


def _half_md4(buf: list[int], w: list[int]) -> None:
    """lib/halfmd4.c's transform, unrolled: it runs once per 32 bytes of every name."""
    m = _MASK
    a, b, c, d = buf
    # Round 1: F(x, y, z) = z ^ (x & (y ^ z)); shifts 3, 7, 11, 19
    for i in (0, 4):
        a = (a + (d ^ (b & (c ^ d))) + w[i]) & m
        a = ((a << 3) | (a >> 29)) & m
        d = (d + (c ^ (a & (b ^ c))) + w[i + 1]) & m
        d = ((d << 7) | (d >> 25)) & m
        c = (c + (b ^ (d & (a ^ b))) + w[i + 2]) & m
        c = ((c << 11) | (c >> 21)) & m
        b = (b + (a ^ (c & (d ^ a))) + w[i + 3]) & m
        b = ((b << 19) | (b >> 13)) & m
    # Round 2: G(x, y, z) = (x & y) + ((x ^ y) & z); words 1,3,5,7 then 0,2,4,6
    for i in (1, 0):
        a = (a + ((b & c) + ((b ^ c) & d)) + w[i] + _K2) & m
        a = ((a << 3) | (a >> 29)) & m
        d = (d + ((a & b) + ((a ^ b) & c)) + w[i + 2] + _K2) & m
        d = ((d << 5) | (d >> 27)) & m
        c = (c + ((d & a) + ((d ^ a) & b)) + w[i + 4] + _K2) & m
        c = ((c << 9) | (c >> 23)) & m
        b = (b + ((c & d) + ((c ^ d) & a)) + w[i + 6] + _K2) & m
        b = ((b << 13) | (b >> 19)) & m
    # Round 3: H(x, y, z) = x ^ y ^ z; words 3,7,2,6 then 1,5,0,4
    for i, j, k, n in ((3, 7, 2, 6), (1, 5, 0, 4)):
        a = (a + (b ^ c ^ d) + w[i] + _K3) & m
        a = ((a << 3) | (a >> 29)) & m
        d = (d + (a ^ b ^ c) + w[j] + _K3) & m
        d = ((d << 9) | (d >> 23)) & m
        c = (c + (d ^ a ^ b) + w[k] + _K3) & m
        c = ((c << 11) | (c >> 21)) & m
        b = (b + (c ^ d ^ a) + w[n] + _K3) & m
        b = ((b << 15) | (b >> 17)) & m
    buf[0] = (buf[0] + a) & m
    buf[1] = (buf[1] + b) & m
    buf[2] = (buf[2] + c) & m
    buf[3] = (buf[3] + d) & m


def _str2hashbuf(piece: bytes, length: int, count: int, signed: bool) -> list[int]:
    """Pack up to ``count * 4`` bytes of the name into words, padded with the length."""
    pad = length | (length << 8)
    pad |= pad << 16
    piece = piece[: count * 4]
    full = len(piece) // 4
    if not signed or piece.isascii():
        # Four bytes shift the pad out entirely: a full word is the bytes read big-endian.
        out = list(struct.unpack(f">{full}I", piece[: full * 4]))
        rest = piece[full * 4 :]
        if len(out) < count:
            out.append(((pad << (8 * len(rest))) | int.from_bytes(rest, "big")) & _MASK)
    else:
        value = pad
        out = []
        for i, byte in enumerate(piece):
            value = ((byte - 256 if byte >= 128 else byte) + (value << 8)) & _MASK
            if i % 4 == 3:
                out.append(value)
                value = pad
        if len(out) < count:
            out.append(value)
    while len(out) < count:
        out.append(pad)
    return out


def dirhash(name: bytes, seed: bytes, *, signed: bool = True) -> tuple[int, int]:
    """(hash, minor_hash) of ``name`` with the half-MD4 directory hash and ``seed`` (the
    superblock's 16-byte ``s_hash_seed``; all zeros means the default MD4 constants)."""
    words = struct.unpack("<4I", seed)
    buf = list(words) if any(words) else list(_DEFAULT_SEED)
    remaining = len(name)
    pos = 0
    while True:
        _half_md4(buf, _str2hashbuf(name[pos:], remaining, 8, signed))
        remaining -= 32
        pos += 32
        if remaining <= 0:
            break
    major = buf[1] & ~1 & _MASK
    if major == _EOF_HASH:
        major = (0x7FFFFFFF - 1) << 1
    return major, buf[2]


def xattr_entry_hash(name: bytes, value: bytes) -> int:
    """``ext4_xattr_hash_entry``: the hash stored in each xattr entry."""
    value_hash = 0
    for byte in name:
        value_hash = ((value_hash << 5) ^ (value_hash >> 27) ^ byte) & _MASK
    padded = value + bytes(-len(value) % 4)
    for (word,) in struct.iter_unpack("<I", padded):
        value_hash = ((value_hash << 16) ^ (value_hash >> 16) ^ word) & _MASK
    return value_hash


def xattr_block_hash(entry_hashes: list[int]) -> int:
    """``ext4_xattr_rehash``: the hash of an xattr block, from its entries' hashes."""
    block_hash = 0
    for entry_hash in entry_hashes:
        if entry_hash == 0:
            return 0
        block_hash = ((block_hash << 16) ^ (block_hash >> 16) ^ entry_hash) & _MASK
    return block_hash
