"""Parsing the values of ``-o key=value`` options (and sizes), the same way for every format.

Formats import these directly: this module depends on nothing but the errors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from fractions import Fraction

from .errors import InvalidInputError

__all__ = ["parse_size", "parse_switch"]

_ON = frozenset({"on", "yes", "true", "1"})
_OFF = frozenset({"off", "no", "false", "0"})


def parse_switch(options: Mapping[str, str], key: str, default: bool, *,
                 format: str = "") -> bool:
    """``options[key]`` as a boolean (on/yes/true/1 or off/no/false/0, any case), ``default``
    when absent; anything else is one InvalidInputError line naming the option."""
    text = options.get(key)
    if text is None:
        return default
    value = text.strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    prefix = f"{format}: " if format else ""
    raise InvalidInputError(f"{prefix}option {key} must be on or off, not {text!r}")


_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
               "p": 1 << 50, "e": 1 << 60}
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([bkmgtpe]?)", re.IGNORECASE)


def parse_size(value: str | int, *, what: str = "size") -> int:
    """A size in qemu's notation: ``1048576``, ``64k``, ``1.5M``, ``10G``, ``2T`` (binary
    units, case-insensitive). Refuses negative, fractional-byte and absurd (>= 2**63) sizes.
    """
    if isinstance(value, bool):
        raise InvalidInputError(f"{what} must be a size, not {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE_RE.fullmatch(value.strip())
        if match is None:
            raise InvalidInputError(
                f"{what} {value!r} is not a size (a number with an optional k, M, G, T suffix)")
        exact = Fraction(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
        if exact.denominator != 1:
            raise InvalidInputError(f"{what} {value!r} is not a whole number of bytes")
        size = int(exact)
    if size < 0 or size >= 1 << 63:
        raise InvalidInputError(f"{what} {value!r} is out of range")
    return size
