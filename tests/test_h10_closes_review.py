"""Review findings on which close ends a file being written (regfs/closers.py,
regfs/openfiles.py): a reader's descriptor held by the writer's child, and the order of two
writers' ends."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import pytest
import trio
from support.registry import OCI_CONFIG, OCI_MANIFEST
from support.roots import build_root
from support.tools import errno_of

from regfs.closers import Close, Opener
from regfs.operations import Operations
from regfs.options import MountOptions
from regfs.tree import Tree
from storage.api import RegistrySource
from storage.digests import digest_bytes
from storage.drivers import InMemoryDriver
from storage.registry import Registry

NAME = "library/demo"
BAD = b'{"schemaVersion": 2}'  # JSON, but no media type: refused (EINVAL)


@dataclass(frozen=True)
class Context:
    """What the handlers read of pyfuse3's RequestContext."""

    pid: int


def operations(registry: RegistrySource) -> Operations:
    options = MountOptions("inmemory:", "/mnt", tag_ttl=0.0)
    return Operations(Tree(registry, options.tag_ttl), options)


async def section(ops: Operations, name: str) -> int:
    inode = pyfuse3.ROOT_INODE
    for part in ("a", "b", name):
        inode = (await ops.lookup(inode, part.encode(), Context(1))).st_ino
    return inode


@pytest.mark.mount
@pytest.mark.parametrize("child", [False, True], ids=["alone", "child holds a reader"])
async def test_a_reader_held_by_the_writer_s_child_leaves_the_writer_s_close_its_end(
    tmp_path: Path, mount, child: bool
) -> None:
    """The writer's process opened a reader of the tag and handed it to a child (pass_fds):
    that descriptor is no copy of the writer's, so the writer's close still ends the tag
    and fails with the refusal (it answered 0, the refusal only logged at the release)."""
    await build_root(tmp_path / "root", size=10_000)
    m = mount(tmp_path / "root", "--tag-ttl", "0")
    tag = m.path(*NAME.split("/"), "tags") / "latest"
    reader = os.open(tag, os.O_RDONLY)
    holder = subprocess.Popen(["sleep", "30"], pass_fds=[reader] if child else [])
    os.close(reader)
    try:
        fd = os.open(tag, os.O_WRONLY | os.O_TRUNC)
        os.write(fd, BAD)
        assert errno_of(lambda: os.close(fd)) == errno.EINVAL
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.storage
async def test_of_two_writers_of_a_tag_the_later_close_wins_though_its_scan_was_quicker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A close whose closer is scanned in a worker thread (many descriptors) takes its turn
    in the order the closes came, not in the order their scans end."""
    registry = Registry(InMemoryDriver())
    upload = await registry.repository("a/b").layers.upload()
    await upload.write(b"{}")
    await upload.finish(digest_bytes(b"{}"))
    config = {"mediaType": OCI_CONFIG, "digest": str(digest_bytes(b"{}")), "size": 2}
    ops = operations(registry)
    tags = await section(ops, "tags")
    manifests = [
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": config,
                "layers": [],
                "annotations": {"n": str(n)},
            }
        ).encode()
        for n in (1, 2)
    ]
    fhs = []
    for data in manifests:
        info, _ = await ops.create(tags, b"v1", 0o644, os.O_WRONLY, Context(os.getpid()))
        await ops.write(info.fh, 0, data)
        fhs.append(info.fh)
    first = ops.files.get(fhs[0]).opener

    async def close_of(opener: Opener, tid: int, others: object) -> Close:
        if opener is first:
            await trio.sleep(0.2)  # as a scan in a worker thread takes
        return Close.LAST

    monkeypatch.setattr(ops.files._closers, "close_of", close_of)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ops.flush_closer, fhs[0], Context(os.getpid()), 0)
        await trio.sleep(0.05)
        nursery.start_soon(ops.flush_closer, fhs[1], Context(os.getpid()), 0)
    for fh in fhs:
        await ops.release(fh)
    assert await registry.repository("a/b").tags.get("v1") == digest_bytes(manifests[1])
