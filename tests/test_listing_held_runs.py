"""Review of 8173149 (`Directories._reply_held`): a run of held entries asks what the daemon
holds twice, once of its first entry (is there a run?) and once of the whole run; the
digests' cache entries can expire between the two (--tag-ttl). Seen through a real mount
(tests/test_listing_snapshots.py's two readers while layers are pushed, --tag-ttl 0.2):
`readdir: list index out of range (ENOENT)` in the daemon's debug log, and getdents64
failing with ENOENT in the middle of `ls` of layers/. Here the clock is moved between the
two questions, in process (no mount can time that), so it fails every time it can."""

from __future__ import annotations

import time
from collections.abc import Callable

import pyfuse3
import pytest
import trio

from regfs import fusefeatures
from regfs.nodes import Node, SectionNode
from regfs.operations import Operations
from regfs.options import MountOptions
from regfs.tree import Tree
from storage.digests import digest_bytes
from storage.drivers import InMemoryDriver
from storage.registry import Registry

pytestmark = [
    pytest.mark.storage,
    pytest.mark.skipif(not fusefeatures.REPLY_MANY, reason="a pyfuse3 without the bulk reply"),
]
TTL = 2.0


def clock_expiring_after(calls: int, now: float) -> Callable[[], float]:
    """time.monotonic that reads `now` `calls` times, then a time past every entry's TTL."""
    seen = 0

    def monotonic() -> float:
        nonlocal seen
        seen += 1
        return now if seen <= calls else now + TTL + 1

    return monotonic


def test_a_run_whose_attributes_expire_meanwhile_is_handed_one_by_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = Registry(InMemoryDriver())
    ops = Operations(Tree(registry, TTL), MountOptions("inmemory:", "/mnt", tag_ttl=TTL))

    async def listed() -> list[tuple[str, Node]]:
        repo = registry.repository("a/b")
        for i in range(5):
            data = b"layer %d" % i
            upload = await repo.layers.upload()
            await upload.write(data)
            await upload.finish(digest_bytes(data))
        return await ops.directories._present(SectionNode("a/b", "layers"))

    entries = trio.run(listed)  # each layer's attributes stated in bulk, and held
    assert len(entries) == 5
    handed: list[bytes] = []

    def reply_many(token: object, names: list[bytes], *args: object) -> int:
        handed.extend(names)  # all fit
        return len(names)

    monkeypatch.setattr(pyfuse3, "readdir_reply_many", reply_many)
    monkeypatch.setattr("storage.cache.time.monotonic", clock_expiring_after(1, time.monotonic()))
    # Held when first asked, expired from then on: a run of what was held then (here the
    # first entry at most), or none (`read` hands them one by one, asking storage again).
    after, full = ops.directories._reply_held(entries, 0, 0, 1 << 32, pyfuse3.ReaddirToken())
    assert not full and after <= 1
    assert handed == [name.encode() for name, _ in entries[:after]]
