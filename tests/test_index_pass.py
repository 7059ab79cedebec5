"""The index pass's quick parts against what they stand for (storage/rootfs/tarscan.py)."""

from __future__ import annotations

import random

import pytest

from storage.rootfs.tarscan import _unsigned_sum

pytestmark = pytest.mark.storage


@pytest.mark.parametrize("fill", [0x00, 0x01, 0x7F, 0x80, 0xFF])
def test_the_unsigned_sum_is_the_bytes_sum(fill: int) -> None:
    """adler32 in pieces gives the exact sum of a header's bytes but its checksum field's,
    up to the largest (every byte 0xff: past adler32's modulus over the whole 512) and for
    random headers."""
    rng = random.Random(fill)
    headers = [bytes([fill]) * 512]
    for _ in range(200):
        headers.append(bytes(rng.choice([fill, rng.randrange(256)]) for _ in range(512)))
    for header in headers:
        assert _unsigned_sum(header) == sum(header) - sum(header[148:156])
        assert _unsigned_sum(bytearray(header)) == _unsigned_sum(header)
