"""The accelerated and the pure Python CRC-32C agree, in both the standard and ext4's form."""

from __future__ import annotations

import os

import pytest

from imgbridge import crc32c as c


@pytest.mark.parametrize("data", [b"", b"123456789", os.urandom(4099) + bytes(300)])
@pytest.mark.parametrize("seed", [0, 0x12345678])
def test_fast_and_python_agree(data: bytes, seed: int) -> None:
    assert c.crc32c(data, seed) == c._crc32c_python(data, seed)


def test_check_values() -> None:
    assert c.crc32c(b"123456789") == 0xE3069283  # RFC 3720 B.4
    # Linux's crc32c(~0, "123456789") leaves the register un-inverted.
    assert c.crc32c_raw(0xFFFFFFFF, b"123456789") == 0xE3069283 ^ 0xFFFFFFFF
