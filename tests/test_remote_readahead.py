"""Remote read-ahead: bytes are right, and all open files together stay within the budget."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import trio

from storage.api import BlobInfo
from storage.digests import digest_bytes
from storage.remote.reader import ReadAheadBudget, RemoteLayerReader

pytestmark = pytest.mark.storage

BLOB = os.urandom(24 << 20)


class ScriptedClient:
    """Answers Range GETs from BLOB, and records the most bytes the readers ever held."""

    def __init__(self) -> None:
        self.readers: list[RemoteLayerReader] = []
        self.peak = 0
        self.requests = 0

    async def get_range(self, url: str, start: int, end: int) -> bytes:
        self.requests += 1
        held = sum(w.end - w.start for r in self.readers for w in r._windows)
        self.peak = max(self.peak, held)
        await trio.sleep(0.001)  # a round trip: reads overlap as they do under the kernel
        return BLOB[start:end]

    async def open_range(self, url: str, start: int, end: int, *, abandon: bool = False) -> None:
        return None  # no open responses: every window is a range GET


class StreamingClient(ScriptedClient):
    """Also opens responses (`bytes=start-`), and checks that they are read in order, one
    read at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.opened: list[int] = []
        self.reading = False

    async def open_range(
        self, url: str, start: int, end: int, *, abandon: bool = False
    ) -> SimpleNamespace:
        self.opened.append(start)
        await trio.sleep(0.001)
        return SimpleNamespace(position=start, end=end, close=lambda: None)

    async def read_open(self, body: SimpleNamespace, size: int) -> bytes:
        assert not self.reading, "two reads of one open response at once"
        self.reading = True
        await trio.sleep(0.001)
        data = BLOB[body.position : min(body.position + size, body.end)]
        body.position += len(data)
        self.reading = False
        return data


async def stream(reader: RemoteLayerReader, piece: int = 128 << 10) -> bytes:
    """Read the whole blob in kernel-sized pieces, several in flight at a time, each one
    reaching the reader in order as pyfuse3's workers hand them over (trio's own start order
    is shuffled on purpose, which would make a `cat` look random)."""
    parts: dict[int, bytes] = {}

    async def one(offset: int, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()  # the parent resumes once this task first waits, in read_at
        parts[offset] = await reader.read_at(offset, piece)

    for batch in range(0, len(BLOB), 4 * piece):
        async with trio.open_nursery() as nursery:
            for offset in range(batch, min(batch + 4 * piece, len(BLOB)), piece):
                await nursery.start(one, offset)
    return b"".join(parts[o] for o in sorted(parts))


async def test_many_readers_stay_within_the_total_budget():
    budget = ReadAheadBudget(total=20 << 20)  # 8 readers would want up to 8 x 4 x 8 MiB
    client = ScriptedClient()
    info = BlobInfo(digest_bytes(BLOB), len(BLOB), 0)
    readers = client.readers = [RemoteLayerReader(client, "/blob", info, budget) for _ in range(8)]
    results: list[bytes] = []

    async def read_all(reader: RemoteLayerReader) -> None:
        results.append(await stream(reader))

    async with trio.open_nursery() as nursery:
        for reader in readers:
            nursery.start_soon(read_all, reader)
    assert all(r == BLOB for r in results)
    # Past the budget, each reader only holds windows the size of its reads.
    assert client.peak <= budget.total + 8 * RemoteLayerReader.KEEP * (128 << 10)
    for reader in readers:
        await reader.aclose()
    assert budget.used == 0


async def test_a_lone_sequential_reader_gets_large_requests():
    budget = ReadAheadBudget()
    client = ScriptedClient()
    reader = RemoteLayerReader(client, "/blob", BlobInfo(digest_bytes(BLOB), len(BLOB), 0), budget)
    assert await stream(reader) == BLOB
    assert client.requests < len(BLOB) // (1 << 20)  # far fewer than one per 128 KiB read
    await reader.aclose()
    assert budget.used == 0


async def test_a_sequential_reader_streams_one_open_response():
    """Read-ahead windows come, in turn, from one open response instead of a range GET
    each; a jump elsewhere opens a new one where the reading goes on."""
    client = StreamingClient()
    reader = RemoteLayerReader(
        client, "/blob", BlobInfo(digest_bytes(BLOB), len(BLOB), 0), ReadAheadBudget()
    )
    assert await stream(reader, piece=1 << 20) == BLOB
    # The first read is not known to be sequential yet, and the run earns its stream: range
    # GETs of 1, 1, 2 and 4 MiB, then one open response for the rest.
    assert client.requests == 4 and client.opened == [8 << 20]
    assert reader._check.done and reader._check.claimed == len(BLOB)  # hashed whole
    # Back to the start (no kept window covers it): read again, in order.
    got = [await reader.read_at(i << 20, 1 << 20) for i in range(6)]
    assert b"".join(got) == BLOB[: 6 << 20]
    # A new run earns its stream again: 4 more range GETs, then a stream ahead from 8 MiB.
    assert client.requests == 8 and client.opened == [8 << 20, 8 << 20]
    await reader.aclose()
