"""Review of 044ced3's `TtlCache.put_many` (storage/cache.py): "`put` of each key with its
value, in order". A key given twice in one call: `put` of each moves it to the end at its
second put, so the other key is the older and goes first past the bound; put_many pops
each key once, then `dict.update` keeps the first place of a repeated key."""

from __future__ import annotations

import pytest

from storage.cache import TtlCache

pytestmark = pytest.mark.storage


def test_a_key_given_twice_goes_to_the_end_as_a_second_put_moves_it() -> None:
    one, bulk = TtlCache[str, int](5.0, max_size=2), TtlCache[str, int](5.0, max_size=2)
    for key, value in (("x", 1), ("y", 2), ("x", 3)):
        one.put(key, value)
    bulk.put_many(["x", "y", "x"], [1, 2, 3])
    one.put("z", 4)  # the oldest goes: "y" after a put each
    bulk.put_many(["z"], [4])
    assert list(bulk.keys()) == list(one.keys()) == ["x", "z"]
    assert bulk.get("x") == one.get("x") == 3
