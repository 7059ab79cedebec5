"""A FLUSH whose closer cannot be told (a stock pyfuse3 calls `flush(fh)`; pid 0 is a closer
outside the daemon's pid namespace) ends a tag as before closes were told apart: each flush
with writes since the last end; what it leaves (an O_TRUNC with nothing written), the
release ends. The operations are called directly, without a mount."""

from __future__ import annotations

import errno
import json
import logging
import os
from dataclasses import dataclass

import pyfuse3
import pytest
from support.registry import OCI_CONFIG, OCI_MANIFEST

from regfs.operations import Operations
from regfs.options import MountOptions
from regfs.tree import Tree
from storage.digests import digest_bytes
from storage.drivers import InMemoryDriver
from storage.registry import Registry

pytestmark = pytest.mark.storage

BAD = b'{"schemaVersion": 2}'


@dataclass(frozen=True)
class Context:
    """What the handlers read of pyfuse3's RequestContext."""

    pid: int


async def push(registry: Registry, data: bytes) -> dict[str, object]:
    upload = await registry.repository("a/b").layers.upload()
    await upload.write(data)
    await upload.finish(digest_bytes(data))
    return {"mediaType": OCI_CONFIG, "digest": str(digest_bytes(data)), "size": len(data)}


@pytest.fixture
async def ops() -> Operations:
    """A repository a/b whose tag `latest` points at a stored manifest."""
    registry = Registry(InMemoryDriver())
    config = await push(registry, b"{}")
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": []}
    await registry.repository("a/b").tags.put(
        "latest", await registry.repository("a/b").manifests.put(json.dumps(manifest).encode())
    )
    options = MountOptions("inmemory:", "/mnt", tag_ttl=0.0)
    return Operations(Tree(registry, options.tag_ttl), options)


async def tags_inode(ops: Operations) -> int:
    inode = pyfuse3.ROOT_INODE
    for name in ("a", "b", "tags"):
        inode = (await ops.lookup(inode, name.encode(), Context(1))).st_ino
    return inode


async def flush(ops: Operations, fh: int, stock: bool) -> int | None:
    """A FLUSH as a stock pyfuse3 sends it, or as regfs's with a closer outside the pid
    namespace (pid 0); its errno."""
    try:
        if stock:
            await ops.flush(fh)
        else:
            await ops.flush_closer(fh, Context(0), 0)  # type: ignore[arg-type]
    except pyfuse3.FUSEError as exc:
        return exc.errno
    return None


@pytest.mark.parametrize("stock", [True, False], ids=["stock", "pid 0"])
async def test_an_unknown_closer_ends_what_was_written(ops, caplog, stock):
    tags = await tags_inode(ops)
    info, _ = await ops.create(tags, b"v1", 0o644, os.O_WRONLY, Context(os.getpid()))
    assert await flush(ops, info.fh, stock) is None  # a shell's dup: nothing written yet
    await ops.write(info.fh, 0, BAD)
    assert await flush(ops, info.fh, stock) == errno.EINVAL  # each close with writes ends
    assert await flush(ops, info.fh, stock) is None  # nothing written since
    assert caplog.text.count("flush: tag a/b:v1 not stored: ") == 1
    caplog.clear()
    with caplog.at_level(logging.INFO):
        await ops.release(info.fh)
    assert "not stored" not in caplog.text  # the flush ended it


@pytest.mark.parametrize("stock", [True, False], ids=["stock", "pid 0"])
async def test_an_unknown_closer_leaves_an_emptied_tag_to_the_release(ops, caplog, stock):
    tags = await tags_inode(ops)
    latest = await ops.lookup(tags, b"latest", Context(1))
    before = await ops.tree.read(ops.inodes.node(latest.st_ino))
    info = await ops.open(latest.st_ino, os.O_WRONLY | os.O_TRUNC, Context(os.getpid()))
    assert await flush(ops, info.fh, stock) is None  # may be a shell's first close
    with caplog.at_level(logging.WARNING):
        await ops.release(info.fh)
    assert "release: tag a/b:latest not stored: " in caplog.text
    assert await ops.tree.read(ops.inodes.node(latest.st_ino)) == before


async def test_pyfuse3_s_flush_closer_calls_a_file_system_s_flush():
    """regfs's pyfuse3 calls `flush_closer` for each FLUSH; a file system that defines only
    `flush` (as before the patch) has it called by the default."""

    class OnlyFlush(pyfuse3.Operations):
        def __init__(self) -> None:
            super().__init__()
            self.flushed: list[int] = []

        async def flush(self, fh: int) -> None:
            self.flushed.append(fh)

    fs = OnlyFlush()
    await fs.flush_closer(7, Context(1), 0)  # type: ignore[arg-type]
    assert fs.flushed == [7]
