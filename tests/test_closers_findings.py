"""Review findings on which close ends a file being written (regfs/closers.py,
regfs/openfiles.py): a reader's descriptor held by the writer's child, the order of two
writers' ends, and an upload's lock after a failed O_TRUNC."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pyfuse3
import pytest
import trio
from support.registry import OCI_CONFIG, OCI_MANIFEST, RegistryServer
from support.roots import build_root
from support.tools import errno_of

from regfs.closers import Close, Opener
from regfs.nodes import UploadNode
from regfs.operations import Operations
from regfs.options import MountOptions
from regfs.tree import Tree
from storage.api import RegistrySource, Upload
from storage.digests import digest_bytes
from storage.drivers import FilesystemDriver, InMemoryDriver
from storage.errors import RemoteUnavailable
from storage.registry import Registry
from storage.remote import uploads as remote_uploads
from storage.remote.client import RemoteClient
from storage.remote.registry import RemoteRegistry

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


async def open_truncating_fails_then_not_busy(
    ops: Operations, monkeypatch: pytest.MonkeyPatch, failure: Callable[[pytest.MonkeyPatch], None]
) -> None:
    """An upload written and closed is opened with O_TRUNC while failure (patched in) makes
    its truncate fail, so the open fails; then opened again: not EBUSY, as the failed open
    let the upload (and its lock) go."""
    monkeypatch.setattr("storage.drivers.filesystem.LOCK_WAIT", 0.5)  # else EBUSY after 2 s
    uploads = await section(ops, "uploads")
    info, entry = await ops.create(uploads, b"x", 0o644, os.O_WRONLY, Context(os.getpid()))
    await ops.write(info.fh, 0, b"abc")
    await ops.release(info.fh)
    with monkeypatch.context() as patched:
        failure(patched)
        with pytest.raises(pyfuse3.FUSEError):
            await ops.open(entry.st_ino, os.O_WRONLY | os.O_TRUNC, Context(os.getpid()))
    again = await ops.open(entry.st_ino, os.O_WRONLY | os.O_TRUNC, Context(os.getpid()))
    await ops.release(again.fh)


async def down(*args: object) -> NoReturn:
    raise RemoteUnavailable("registry down")


@pytest.mark.storage
async def test_a_failed_truncate_on_open_lets_the_upload_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = Registry(FilesystemDriver(tmp_path / "root"))
    await registry.create_repository("a/b")
    ops = operations(registry)
    resume = ops.tree.resume_upload

    def truncate_fails(patched: pytest.MonkeyPatch) -> None:
        async def resumed(node: UploadNode) -> Upload:
            upload = await resume(node)
            patched.setattr(upload, "truncate", down)
            return upload

        patched.setattr(ops.tree, "resume_upload", resumed)

    await open_truncating_fails_then_not_busy(ops, monkeypatch, truncate_fails)


@pytest.mark.registry
@pytest.mark.remote
async def test_a_failed_truncate_on_open_leaves_no_remote_upload_locked(
    tmp_path: Path, module_registry_server: RegistryServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over https://, the truncate is a new upload begun at the registry (a POST): its
    failure left the upload's lock file held, every later writer EBUSY."""
    registry = RemoteRegistry(
        RemoteClient(module_registry_server.url, timeout=10), tmp_path / "state", listing_ttl=0
    )
    try:
        await registry.create_repository("a/b")
        await open_truncating_fails_then_not_busy(
            operations(registry),
            monkeypatch,
            lambda patched: patched.setattr(remote_uploads, "_begin", down),
        )
    finally:
        await registry.aclose()
