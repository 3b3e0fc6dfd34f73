"""Extended attributes for the ext4 writer: names to (index, suffix), POSIX ACLs from the VFS
xattr form to ext4's compact form, and the two places a set of attributes can live (the
space after the inode's extra fields, or one xattr block).

References: Linux ``Documentation/filesystems/ext4/attributes.rst``; fs/ext4/acl.h (the
on-disk ACL form); include/uapi/linux/posix_acl_xattr.h (the form getxattr returns).
"""

from __future__ import annotations

from dataclasses import dataclass

from imgbridge.errors import InvalidInputError, UnsupportedFeatureError

from . import _structs as s
from ._whash import xattr_block_hash, xattr_entry_hash

#: The extra inode fields the writer fills (up to i_projid): i_extra_isize.
EXTRA_ISIZE = s.INODE_EXTRA.size
#: Where the in-inode attribute area (its magic first) starts.
INLINE_XATTR_OFFSET = s.GOOD_OLD_INODE_SIZE + EXTRA_ISIZE
#: The name indexes the writer stores: plain prefixes, and the two ACLs (whole names).
_WRITABLE_PREFIXES = tuple(
    (s.XATTR_PREFIXES[index], index)
    for index in (s.XATTR_INDEX_USER, s.XATTR_INDEX_TRUSTED, s.XATTR_INDEX_SECURITY))
_ACL_NAMES = {s.XATTR_PREFIXES[index]: index for index in (
    s.XATTR_INDEX_POSIX_ACL_ACCESS, s.XATTR_INDEX_POSIX_ACL_DEFAULT)}


@dataclass(frozen=True)
class XattrItem:
    """One attribute as ext4 stores it."""

    index: int
    name: bytes
    value: bytes

    @property
    def entry_size(self) -> int:
        return s.XATTR_ENTRY.size + _pad4(len(self.name))

    @property
    def value_size(self) -> int:
        return _pad4(len(self.value))

    def sort_key(self) -> tuple[int, int, bytes]:
        # The order the kernel keeps block entries in (ext4_xattr_find_entry, sorted mode).
        return (self.index, len(self.name), self.name)


def _pad4(n: int) -> int:
    return (n + 3) & ~3


def convert_acl(path: str, value: bytes) -> bytes:
    """A POSIX ACL as getxattr returns it (version 2, 8-byte entries) in ext4's form."""
    entry_size = s.ACL_ENTRY.size
    header_size = s.ACL_HEADER.size
    if len(value) < header_size or (len(value) - header_size) % entry_size:
        raise InvalidInputError(f"{path}: a POSIX ACL xattr of {len(value)} bytes is malformed")
    if s.ACL_HEADER.unpack(value).a_version != s.POSIX_ACL_XATTR_VERSION:
        raise InvalidInputError(f"{path}: POSIX ACL xattr version is not 2")
    out = bytearray(s.ACL_HEADER.pack(s.AclHeader(s.EXT4_ACL_VERSION)))
    for pos in range(header_size, len(value), entry_size):
        entry = s.ACL_ENTRY.unpack(value, pos)
        tag = entry.e_tag
        if tag in (s.ACL_USER, s.ACL_GROUP):
            out += s.ACL_ENTRY.pack(entry)
        elif tag in (s.ACL_USER_OBJ, s.ACL_GROUP_OBJ, s.ACL_MASK, s.ACL_OTHER):
            out += s.ACL_ENTRY_SHORT.pack(s.AclEntryShort(tag, entry.e_perm))
        else:
            raise InvalidInputError(f"{path}: POSIX ACL entry with unknown tag {tag:#x}")
    return bytes(out)


def to_items(path: str, xattrs: tuple[tuple[str, bytes], ...]) -> tuple[XattrItem, ...]:
    """The entry's attributes as ext4 items, in the kernel's block order."""
    items: list[XattrItem] = []
    for name, value in xattrs:
        acl_index = _ACL_NAMES.get(name)
        if acl_index is not None:
            items.append(XattrItem(acl_index, b"", convert_acl(path, value)))
            continue
        for prefix, index in _WRITABLE_PREFIXES:
            if name.startswith(prefix) and len(name) > len(prefix):
                suffix = name[len(prefix) :].encode("utf-8", "surrogateescape")
                if len(suffix) > s.DIR_NAME_MAX:
                    raise InvalidInputError(f"{path}: xattr name {name!r} is too long")
                items.append(XattrItem(index, suffix, value))
                break
        else:
            raise UnsupportedFeatureError(
                f"{path}: xattr {name!r}: ext4 writer supports user.*, trusted.*, security.* "
                "and system.posix_acl_access/default"
            )
    return tuple(sorted(items, key=XattrItem.sort_key))


def inode_space(inode_size: int) -> int:
    """Bytes after the extra fields for the in-inode attribute area (magic included)."""
    return inode_size - INLINE_XATTR_OFFSET


def fits_in_inode(items: tuple[XattrItem, ...], inode_size: int) -> bool:
    # magic, entries, 4-byte terminator, values
    need = 4 + sum(i.entry_size + i.value_size for i in items) + 4
    return need <= inode_space(inode_size)


def fits_in_block(items: tuple[XattrItem, ...], block_size: int) -> bool:
    need = s.XATTR_HEADER.size + sum(i.entry_size + i.value_size for i in items) + 4
    return need <= block_size


def block_need(items: tuple[XattrItem, ...]) -> int:
    return s.XATTR_HEADER.size + sum(i.entry_size + i.value_size for i in items) + 4


def _entries_and_values(
    items: tuple[XattrItem, ...], area: int, first_entry: int, offset_base: int
) -> tuple[bytearray, list[int]]:
    """Entries packed from ``first_entry`` up, values from the end of ``area`` down.

    ``offset_base`` is where value offsets count from: the first entry in an inode, the
    block start in a block.
    """
    buf = bytearray(area)
    hashes: list[int] = []
    entry_pos = first_entry
    value_end = area
    for item in items:
        value_pos = value_end - item.value_size
        buf[value_pos : value_pos + len(item.value)] = item.value
        value_end = value_pos
        entry_hash = xattr_entry_hash(item.name, item.value)
        hashes.append(entry_hash)
        value_offs = value_pos - offset_base if item.value else 0
        s.XATTR_ENTRY.pack_into(buf, entry_pos, s.XattrEntry(
            len(item.name), item.index, value_offs, 0, len(item.value), entry_hash))
        name_at = entry_pos + s.XATTR_ENTRY.size
        buf[name_at : name_at + len(item.name)] = item.name
        entry_pos += item.entry_size
    return buf, hashes


def pack_in_inode(items: tuple[XattrItem, ...], inode_size: int) -> bytes:
    """The in-inode attribute area (starting right after the extra fields)."""
    area = inode_space(inode_size)
    buf, _ = _entries_and_values(items, area, 4, 4)
    s.XATTR_IBODY_HEADER.pack_into(buf, 0, s.XattrIbodyHeader(s.XATTR_MAGIC))
    return bytes(buf)


def pack_block(items: tuple[XattrItem, ...], block_size: int, refcount: int) -> bytearray:
    """An xattr block, checksum left zero (it depends on the block's address)."""
    buf, hashes = _entries_and_values(items, block_size, s.XATTR_HEADER.size, 0)
    s.XATTR_HEADER.pack_into(buf, 0, s.XattrHeader(
        s.XATTR_MAGIC, refcount, 1, xattr_block_hash(hashes), 0, bytes(12)))
    return buf
