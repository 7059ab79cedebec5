"""The FUSE operations called directly, without a mount: errno mapping and inode lifetimes."""

from __future__ import annotations

import errno
import logging

import pyfuse3
import pytest

from regfs.operations import FOREVER, Operations
from regfs.options import MountOptions
from regfs.tree import Tree
from storage.digests import digest_bytes
from storage.drivers import InMemoryDriver
from storage.registry import Registry

pytestmark = pytest.mark.storage


@pytest.fixture
async def ops() -> Operations:
    registry = Registry(InMemoryDriver())
    upload = await registry.repository("a/b").layers.upload()
    await upload.write(b"layer")
    await upload.finish(digest_bytes(b"layer"))
    options = MountOptions("inmemory:", "/mnt", tag_ttl=2.0)
    return Operations(Tree(registry, options.tag_ttl), options)


async def lookup_path(ops: Operations, *names: str) -> pyfuse3.EntryAttributes:
    inode = pyfuse3.ROOT_INODE
    for name in names:
        entry = await ops.lookup(inode, name.encode(), None)
        inode = entry.st_ino
    return entry


async def test_lookup_attrs_and_timeouts(ops):
    layer = str(digest_bytes(b"layer"))
    entry = await lookup_path(ops, "a", "b", "layers", layer)
    assert entry.st_size == 5 and entry.attr_timeout == FOREVER
    directory = await lookup_path(ops, "a", "b")
    assert directory.attr_timeout == 2.0
    with pytest.raises(pyfuse3.FUSEError) as err:
        await lookup_path(ops, "a", "b", "layers", "sha256:" + "0" * 64)
    assert err.value.errno == errno.ENOENT
    with pytest.raises(pyfuse3.FUSEError) as err:
        await ops.lookup(pyfuse3.ROOT_INODE, b"\xff\xfe", None)
    assert err.value.errno == errno.ENOENT


async def test_unexpected_exception_is_eio_with_traceback(ops, caplog, monkeypatch):
    async def boom(*args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(ops.tree, "lookup", boom)
    with caplog.at_level(logging.ERROR), pytest.raises(pyfuse3.FUSEError) as err:
        await ops.lookup(pyfuse3.ROOT_INODE, b"a", None)
    assert err.value.errno == errno.EIO
    assert "unexpected error" in caplog.text and "RuntimeError: a bug" in caplog.text


async def test_forget_drops_inodes_but_not_the_root(ops):
    entry = await lookup_path(ops, "a")
    await ops.lookup(pyfuse3.ROOT_INODE, b"a", None)  # a second lookup of the same node
    assert (await lookup_path(ops, "a")).st_ino == entry.st_ino
    await ops.forget([(entry.st_ino, 2)])
    assert ops.inodes.get(entry.st_ino) is not None  # one lookup is left
    await ops.forget([(entry.st_ino, 1), (pyfuse3.ROOT_INODE, 1)])
    assert ops.inodes.get(entry.st_ino) is None
    assert ops.inodes.get(pyfuse3.ROOT_INODE) is not None
    with pytest.raises(pyfuse3.FUSEError) as err:
        await ops.getattr(entry.st_ino, None)
    assert err.value.errno == errno.ESTALE


async def test_writes_refused_eperm_or_erofs(ops):
    entry = await lookup_path(ops, "a", "b", "layers", str(digest_bytes(b"layer")))
    with pytest.raises(pyfuse3.FUSEError) as err:
        await ops.open(entry.st_ino, 1, None)  # O_WRONLY
    assert err.value.errno == errno.EPERM
    ops.options.read_only = True
    with pytest.raises(pyfuse3.FUSEError) as err:
        await ops.unlink(pyfuse3.ROOT_INODE, b"a", None)
    assert err.value.errno == errno.EROFS


async def test_a_directory_moved_into_uploads_is_eperm(ops):
    """mv of a namespace into a repository's uploads/ is refused with EPERM, not answered
    with EIO: its old parent (the root) belongs to no repository."""
    uploads = await lookup_path(ops, "a", "b", "uploads")
    with pytest.raises(pyfuse3.FUSEError) as err:
        await ops.rename(pyfuse3.ROOT_INODE, b"a", uploads.st_ino, b"x", 0, None)
    assert err.value.errno == errno.EPERM
