"""A bounded cache whose entries may expire: tags and listings (a TTL, cleared by SIGHUP in
the mount), and digest-addressed content of a remote registry (no TTL, only a size)."""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import KeysView, Sequence
from itertools import repeat
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    """Entries expire after ttl seconds (ttl None: never); the oldest go first past max_size."""

    def __init__(self, ttl: float | None, max_size: int = 100_000) -> None:
        self.ttl = ttl
        self.max_size = max_size
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if self.ttl is not None and expires < time.monotonic():
            del self._entries[key]
            return None
        return value

    def put(self, key: K, value: V) -> None:
        expires = time.monotonic() + (self.ttl or 0)
        self._entries[key] = (expires, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_size:
            self._entries.popitem(last=False)

    def put_many(self, keys: Sequence[K], values: Sequence[V]) -> None:
        """`put` of each key with its value, in order, but no Python call per key (a read
        ahead of 1,000 tags at a time): one read of the clock, and those held taken out
        first, so that all go to the end as `put` moves them."""
        entries = self._entries
        deque(map(entries.pop, keys, repeat(None)), maxlen=0)
        before = len(entries)
        held = zip(repeat(time.monotonic() + (self.ttl or 0)), values)  # as long as values
        entries.update(zip(keys, held, strict=True))
        if len(entries) - before != len(keys):  # a key given twice: to the end at its last
            for key, value in zip(keys, values, strict=True):
                self.put(key, value)
        while len(entries) > self.max_size:
            entries.popitem(last=False)

    def keys(self) -> KeysView[K]:
        """The keys held, expired ones among them: what may be cached, tested in C (`get`
        says whether it is)."""
        return self._entries.keys()

    def pop(self, key: K) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()
