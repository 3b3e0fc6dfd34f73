"""ISO9660 on-disk structures: the volume descriptor layout and the two date encodings.

pycdlib parses directories and Rock Ridge entries; what lives here is only what imgbridge reads
or writes itself: the volume descriptors (probe, info, a sanity check before pycdlib sees the
image) and the 7-byte / 17-byte dates (decoded to nanoseconds, encoded in UTC so that the same
tree gives the same bytes whatever the writer's time zone).

References: ECMA-119 4th edition (2019), 8.4 "Primary Volume Descriptor", 8.4.26.1 "Date and
Time Format" (17-byte form), 9.1.5 "Recording Date and Time" (7-byte form); IEEE P1282 RRIP
1.12, 4.1.6 "TF" (the same two forms inside Rock Ridge).
"""

from __future__ import annotations

import calendar
import time

from construct import Bytes, Int8ul, Int16ub, Int16ul, Int32ul, Struct

#: Volume descriptors start at logical sector 16, whatever the logical block size.
SECTOR = 2048
DESCRIPTOR_START = 16 * SECTOR
STANDARD_ID = b"CD001"
#: Descriptors before the terminator; real images carry 2 to 5 of them.
MAX_DESCRIPTORS = 64

VD_BOOT_RECORD = 0
VD_PRIMARY = 1
VD_SUPPLEMENTARY = 2
VD_PARTITION = 3
VD_TERMINATOR = 255
VALID_VD_TYPES = frozenset({VD_BOOT_RECORD, VD_PRIMARY, VD_SUPPLEMENTARY, VD_PARTITION,
                            VD_TERMINATOR})

#: Joliet's escape sequences for UCS-2 levels 1, 2 and 3 (Joliet specification, 1995).
JOLIET_ESCAPES = (b"%/@", b"%/C", b"%/E")
EL_TORITO_ID = b"EL TORITO SPECIFICATION"

#: Byte offsets of the two dates inside a primary/supplementary descriptor, for the writer's
#: fix-up of the modification date (pycdlib stamps it with the clock when it writes).
VD_CREATION_DATE_OFFSET = 813
VD_MODIFICATION_DATE_OFFSET = 830
VD_DATE_SIZE = 17

# Both-endian fields (ECMA-119 7.2.3, 7.3.3) are read from their little-endian half; the
# big-endian half is skipped as padding.
VolumeDescriptor = Struct(
    "type" / Int8ul,
    "standard_id" / Bytes(5),
    "version" / Int8ul,
    "flags" / Int8ul,  # unused in a PVD; volume flags in an SVD
    "system_id" / Bytes(32),
    "volume_id" / Bytes(32),
    "unused1" / Bytes(8),
    "space_size" / Int32ul,
    "space_size_be" / Bytes(4),
    "escape_sequences" / Bytes(32),  # zero in a PVD; Joliet's "%/E" in its SVD
    "set_size" / Int16ul,
    "set_size_be" / Bytes(2),
    "sequence_number" / Int16ul,
    "sequence_number_be" / Bytes(2),
    "block_size" / Int16ul,
    "block_size_be" / Int16ub,
    "path_table_size" / Int32ul,
    "path_table_size_be" / Bytes(4),
    "path_table_l" / Int32ul,
    "path_table_l_optional" / Int32ul,
    "path_table_m" / Bytes(4),
    "path_table_m_optional" / Bytes(4),
    "root_record" / Bytes(34),
    "volume_set_id" / Bytes(128),
    "publisher_id" / Bytes(128),
    "preparer_id" / Bytes(128),
    "application_id" / Bytes(128),
    "copyright_file" / Bytes(37),
    "abstract_file" / Bytes(37),
    "bibliographic_file" / Bytes(37),
    "creation_date" / Bytes(17),
    "modification_date" / Bytes(17),
    "expiration_date" / Bytes(17),
    "effective_date" / Bytes(17),
    "file_structure_version" / Int8ul,
)

#: Rock Ridge TF timestamps in the order RRIP 4.1.6 gives their flag bits (0 CREATE, 1 MODIFY,
#: 2 ACCESS, 3 ATTRIBUTES), named by the pycdlib attribute that holds each slot. pycdlib's
#: names do not match the bits: it calls the MODIFY slot (bit 1) ``access_time`` and the
#: ACCESS slot (bit 2) ``modification_time``; the Linux kernel, genisoimage and libisofs
#: follow the bits, so imgbridge reads and writes by slot.
TF_CREATE_SLOT = "creation_time"
TF_MODIFY_SLOT = "access_time"
TF_ACCESS_SLOT = "modification_time"
TF_ATTRIBUTES_SLOT = "attribute_change_time"

BootRecord = Struct(
    "type" / Int8ul,
    "standard_id" / Bytes(5),
    "version" / Int8ul,
    "boot_system_id" / Bytes(32),
)

_NS = 1_000_000_000
_QUARTER_HOUR = 15 * 60
#: Offsets from GMT a reader believes, in quarter hours. ECMA-119 allows -48..+52; like the
#: Linux kernel, anything outside -52..+52 is ignored (read as UTC): genisoimage writes -96
#: for dates past 2038, an overflow in its offset arithmetic, not a real zone.
_MAX_GMT_OFFSET = 52


def _offset_seconds(gmt_offset: int) -> int:
    return gmt_offset * _QUARTER_HOUR if -_MAX_GMT_OFFSET <= gmt_offset <= _MAX_GMT_OFFSET else 0


def _valid(year: int, month: int, day: int, hour: int, minute: int, second: int) -> bool:
    return (1 <= month <= 12 and 1 <= day <= 31 and hour <= 23 and minute <= 59
            and second <= 60 and 1 <= year <= 9999)


def short_date_ns(year_since_1900: int, month: int, day: int, hour: int, minute: int,
                  second: int, gmt_offset: int) -> int | None:
    """A 7-byte date (ECMA-119 9.1.5) as nanoseconds since the epoch; None when unset or
    not a calendar date (a zeroed or garbled date tells nothing, it is not damage)."""
    year = 1900 + year_since_1900
    if not _valid(year, month, day, hour, minute, second):
        return None
    local = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    return (local - _offset_seconds(gmt_offset)) * _NS


def long_date_ns(raw: bytes) -> int | None:
    """A 17-byte date (ECMA-119 8.4.26.1: 16 ASCII digits and a signed quarter-hour
    offset) as nanoseconds; None when unset ("0000..." or zeros) or not a date."""
    digits = raw[:16]
    if len(raw) != 17 or not digits.isdigit():
        return None
    year, month, day = int(digits[0:4]), int(digits[4:6]), int(digits[6:8])
    hour, minute, second = int(digits[8:10]), int(digits[10:12]), int(digits[12:14])
    hundredths = int(digits[14:16])
    if not _valid(year, month, day, hour, minute, second):
        return None
    offset = int.from_bytes(raw[16:17], "little", signed=True)
    local = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    return (local - _offset_seconds(offset)) * _NS + hundredths * 10_000_000


def blkid_uuid(raw: bytes) -> str | None:
    """The volume "UUID" as blkid prints it: the date digits as YYYY-MM-DD-HH-MM-SS-cc."""
    digits = raw[:16]
    if len(digits) != 16 or not digits.isdigit() or digits == b"0" * 16:
        return None
    text = digits.decode("ascii")
    return "-".join((text[0:4], text[4:6], text[6:8], text[8:10], text[10:12], text[12:14],
                     text[14:16]))


#: Range of the 7-byte form: the year is one byte counted from 1900.
SHORT_DATE_MIN_S = calendar.timegm((1900, 1, 1, 0, 0, 0, 0, 0, 0))
SHORT_DATE_MAX_S = calendar.timegm((2155, 12, 31, 23, 59, 59, 0, 0, 0))


def short_date_fields(ns: int) -> tuple[int, int, int, int, int, int, int]:
    """The 7-byte date fields (years since 1900, month, day, h, m, s, GMT offset 0) of a
    time in UTC, clamped to the years the form can hold."""
    seconds = min(max(ns // _NS, SHORT_DATE_MIN_S), SHORT_DATE_MAX_S)
    tm = time.gmtime(seconds)
    return (tm.tm_year - 1900, tm.tm_mon, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, 0)


def long_date_bytes(ns: int) -> bytes:
    """The 17-byte date of a time, in UTC, with its hundredths of a second."""
    seconds = min(max(ns // _NS, calendar.timegm((1, 1, 1, 0, 0, 0, 0, 0, 0))),
                  calendar.timegm((9999, 12, 31, 23, 59, 59, 0, 0, 0)))
    tm = time.gmtime(seconds)
    hundredths = (ns % _NS) // 10_000_000 if seconds == ns // _NS else 0
    text = (f"{tm.tm_year:04d}{tm.tm_mon:02d}{tm.tm_mday:02d}{tm.tm_hour:02d}"
            f"{tm.tm_min:02d}{tm.tm_sec:02d}{hundredths:02d}")
    return text.encode("ascii") + b"\x00"
