"""Parsing the values of ``-o key=value`` options, the same way for every format."""

from __future__ import annotations

from collections.abc import Mapping

from .errors import InvalidInputError

__all__ = ["parse_switch"]

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
