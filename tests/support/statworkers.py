"""Layers laid out as the registry writes them, and the stat worker processes
(storage/drivers/statworker.py) a process has started: what the stat worker's tests share."""

from __future__ import annotations

import json
import marshal
import os
from pathlib import Path

import pytest
import trio

from storage.digests import Digest, digest_bytes
from storage.drivers import FilesystemDriver, statworker
from storage.paths import BlobData, LayerLink, path_for


def put_layers(root: Path, name: str, count: int) -> list[Digest]:
    """count small blobs linked into repository name, written as the registry lays them out."""
    digests = []
    for i in range(count):
        data = json.dumps({"n": i, "repo": name}).encode()
        digest = digest_bytes(data)
        for location, content in ((BlobData(digest), data), (LayerLink(name, digest), b"")):
            path = root / path_for(location).lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content or str(digest).encode())
        digests.append(digest)
    return digests


def stat_workers(pid: int | str = "self") -> list[int]:
    """The children of process pid (this one by default) that run the stat worker."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
        except FileNotFoundError:  # the thread ended since the listing (a worker's waiter)
            continue
        for child in children:
            try:
                if b"bulkstat.py" in Path(f"/proc/{child}/cmdline").read_bytes():
                    found.append(int(child))
            except FileNotFoundError:
                continue
    return found


def cut_replies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every reply of a stat worker loses its last entry: a worker that answers wrong."""
    real = statworker._Channel.call

    async def short(self, directories, request):  # type: ignore[no-untyped-def]
        return marshal.dumps(marshal.loads(await real(self, directories, request))[:-1])

    monkeypatch.setattr(statworker._Channel, "call", short)


async def worker_ready(driver: FilesystemDriver) -> None:
    """The driver's stat worker started and ready (within 10 s): its bulk calls of more than
    INLINE_ENTRIES then go to it."""
    driver.start_workers()
    with trio.fail_after(10):
        while not driver._stat_worker.ready:
            await trio.sleep(0.01)
