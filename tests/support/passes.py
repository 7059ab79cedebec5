"""Watching layer index passes from the outside: when each one has its blob open, and how
long the trio loop went without running meanwhile.

`timed_layer` gives a `LayerRef` over a blob held in memory whose opener notes when the pass
opens the blob and when it closes it (the indexer opens a layer inside its one-build-at-a-
time limiter and closes it there), so that tests can check passes for overlap. `loop_lag`
measures the loop's longest stall, which a pass run in the trio thread, or one holding the
GIL, makes long.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from storage.api import BlobReader, Buffer
from storage.digests import digest_bytes
from storage.rootfs.index import LayerRef
from support.layers import MEDIA_TYPES


@dataclass
class Opened:
    """When (monotonic) a pass opened its layer and closed it again."""

    layer: str
    opened: float
    closed: float | None = None


@dataclass
class _TimedReader:
    blob: bytes
    record: Opened

    async def read_at(self, offset: int, size: int) -> Buffer:
        return self.blob[offset : offset + size]

    async def aclose(self) -> None:
        self.record.closed = time.monotonic()


@dataclass
class Openings:
    """Every opening of the layers made by `timed_layer` with this record."""

    seen: list[Opened] = field(default_factory=list)

    def overlaps(self) -> list[tuple[Opened, Opened]]:
        """Pairs of openings that were open at the same moment (an unclosed one is open
        until now)."""
        spans = sorted(self.seen, key=lambda o: o.opened)
        return [
            (a, b)
            for i, a in enumerate(spans)
            for b in spans[i + 1 :]
            if b.opened < (a.closed if a.closed is not None else time.monotonic())
        ]


def timed_layer(blob: bytes, how: str, openings: Openings) -> LayerRef:
    """A layer of `blob` (compressed as `how`, a support.layers compression) read from
    memory, each opening noted in `openings`."""
    digest = digest_bytes(blob)

    async def opener() -> BlobReader:
        record = Opened(str(digest), time.monotonic())
        openings.seen.append(record)
        return _TimedReader(blob, record)

    return LayerRef(digest, len(blob), MEDIA_TYPES[how], opener)


@asynccontextmanager
async def loop_lag() -> AsyncIterator[list[float]]:
    """The times a 1 ms sleep of the loop took while the block ran, filled in as it runs."""
    lags: list[float] = []

    async def tick() -> None:
        while True:
            before = time.monotonic()
            await trio.sleep(0.001)
            lags.append(time.monotonic() - before)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(tick)
        yield lags
        nursery.cancel_scope.cancel()
