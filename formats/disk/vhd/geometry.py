"""How big a VHD is: CHS geometry, and which of the footer's two sizes a reader believes.

A VHD footer states the disk size twice: ``current_size`` in bytes, and a CHS geometry
(cylinders x heads x sectors per track, 512-byte sectors). The geometry comes from an
algorithm in the specification's appendix and usually rounds the size *down*, so the two
disagree for most sizes. Readers split in two camps:

- Virtual PC sizes the disk by its geometry.
- Hyper-V, Azure, Disk2vhd, XenServer, VirtualBox and libvhdi use ``current_size``.
- QEMU looks at the creator application: 'vpc ' and 'qemu' are sized by CHS, and (since
  QEMU 10.0) every other creator by ``current_size``. QEMU 2.5 to 9.2 used ``current_size``
  only for a fixed list ('win ', 'qem2', 'd2v ', 'tap\\0', 'CTXS') and CHS for anything else.
  With any creator, a geometry of 65535/16/255 (the largest) means "use current_size".

Reading follows current QEMU exactly (``virtual_size``), so ``inspect`` and qemu-img agree.

Writing, the rule chosen is:

- the geometry is the specification's algorithm applied to the virtual size (what Hyper-V
  writes), so it is never larger than the disk;
- ``current_size`` and ``original_size`` hold the exact virtual size;
- the creator application is 'win ' (Hyper-V), version 10.0, host OS 'Wi2k'. It is a creator
  every QEMU since 2.5 sizes by ``current_size`` (an honest 'imgb' would be sized by CHS, i.e.
  truncated, by qemu-img up to 9.2), and it is what Hyper-V itself writes, whose conventions
  these fields now follow. Hyper-V and Azure ignore the creator when sizing.

So qemu-img, Hyper-V, Azure, VirtualBox and libvhdi all read exactly the size we wrote, whether
or not it is CHS-representable. Only Virtual PC (and QEMU older than 2.5) would see the smaller
CHS size of a disk whose size the geometry cannot express; ``force_size=off`` rounds the size up
to the next size the geometry can express, as qemu-img does by default, for those readers.

References: "Virtual Hard Disk Image Format Specification" v1.0, "Appendix: CHS Calculation"
and "Hard Disk Footer Format" (Current Size, Disk Geometry); QEMU block/vpc.c (vpc_open's size
rules, calculate_geometry, and the 2025 change making current_size the default).
"""

from __future__ import annotations

from typing import NamedTuple

from ._structs import SECTOR, Footer

#: The largest geometry the footer can hold: 65535 cylinders, 16 heads, 255 sectors per track.
MAX_CHS_SECTORS = 65535 * 16 * 255
#: QEMU (and Hyper-V) refuse VHDs above 2040 GiB; so do we, reading and writing.
MAX_SECTORS = 0xFF00_0000
MAX_SIZE = MAX_SECTORS * SECTOR

#: Creators whose images QEMU sizes by their geometry (unless it is the maximum one).
CHS_CREATORS = (b"vpc ", b"qemu")

#: What we write: see the module docstring for why this is Hyper-V's signature.
CREATOR_APPLICATION = b"win "
CREATOR_VERSION = 0x000A_0000
CREATOR_HOST_OS = b"Wi2k"


class Geometry(NamedTuple):
    cylinders: int
    heads: int
    sectors_per_track: int

    @property
    def sectors(self) -> int:
        return self.cylinders * self.heads * self.sectors_per_track


def chs_for(total_sectors: int) -> Geometry:
    """The specification's CHS algorithm: a geometry of at most ``total_sectors`` sectors."""
    total = min(total_sectors, MAX_CHS_SECTORS)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cyl_times_heads = total // spt
    else:
        spt = 17
        cyl_times_heads = total // spt
        heads = max(4, (cyl_times_heads + 1023) // 1024)
        if cyl_times_heads >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cyl_times_heads = total // spt
        if cyl_times_heads >= heads * 1024:
            spt, heads = 63, 16
            cyl_times_heads = total // spt
    return Geometry(cyl_times_heads // heads, heads, spt)


def chs_round_up(total_sectors: int) -> int:
    """The sector count qemu-img gives a disk of ``total_sectors`` without force_size.

    The smallest geometry of at least ``total_sectors`` sectors, found as qemu-img finds it
    (asking the algorithm for one more sector at a time). When that is the largest geometry,
    no geometry fits and the count stays as it is: the maximum geometry tells every reader to
    use current_size.
    """
    extra = 0
    while True:
        geometry = chs_for(total_sectors + extra)
        if geometry.sectors >= total_sectors or geometry.sectors == MAX_CHS_SECTORS:
            break
        extra += 1
    if geometry.sectors == MAX_CHS_SECTORS:
        return total_sectors
    return geometry.sectors


def uses_chs(footer: Footer) -> bool:
    """Whether current QEMU sizes this image by its geometry rather than current_size."""
    return footer.creator_application in CHS_CREATORS and footer.chs_sectors != MAX_CHS_SECTORS


def virtual_size(footer: Footer) -> int:
    """The guest size as current QEMU computes it (whole sectors)."""
    if uses_chs(footer):
        return footer.chs_sectors * SECTOR
    return footer.current_size // SECTOR * SECTOR
