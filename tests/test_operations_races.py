"""The end-of-stop review (stop 23) of this stop's regfs and storage changes: each test a
finding the reviewers proved with a reproducer, fixed by the lead (operations called
directly, no mount: the races need a storage call slowed in between)."""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pyfuse3
import pytest
import trio

from regfs.closers import Close
from regfs.operations import Operations
from regfs.options import MountOptions
from regfs.tree import Tree
from storage.digests import digest_bytes
from storage.drivers import FilesystemDriver, InMemoryDriver
from storage.drivers.base import StorageDriver
from storage.errors import NotEmpty
from storage.paths import UploadData, path_for
from storage.registry import Registry
from storage.remote.uploads import UploadRecords

pytestmark = pytest.mark.storage


@dataclass(frozen=True)
class Context:
    """What pyfuse3 hands a request: who asks."""

    pid: int


async def make_ops(driver: StorageDriver) -> Operations:
    """Operations on a registry holding a/b with a config blob."""
    registry = Registry(driver)
    upload = await registry.repository("a/b").layers.upload()
    await upload.write(b"{}")
    await upload.finish(digest_bytes(b"{}"))
    options = MountOptions("inmemory:", "/mnt", tag_ttl=0.0)
    return Operations(Tree(registry, options.tag_ttl), options)


async def section(ops: Operations, name: str) -> int:
    inode = pyfuse3.ROOT_INODE
    for part in ("a", "b", name):
        inode = (await ops.lookup(inode, part.encode(), Context(1))).st_ino  # type: ignore[arg-type]
    return inode


async def test_a_release_whose_finish_fails_lets_the_upload_go(tmp_path: Path) -> None:
    """A finish at release that fails with anything but a refusal (a failed write's OSError
    raised again by the finish, a remote or S3 error) left the storage writer and its flock
    held: the next `>>` of that upload was EBUSY until the daemon exited."""
    ops = await make_ops(FilesystemDriver(tmp_path / "root"))
    uploads = await section(ops, "uploads")
    data = b"layer bytes"
    me = Context(os.getpid())
    info, entry = await ops.create(
        uploads, str(digest_bytes(data)).encode(), 0o644, os.O_WRONLY, me
    )  # type: ignore[arg-type]
    await ops.write(info.fh, 0, data)

    async def not_last(*args: object) -> Close:
        return Close.NOT_LAST  # a child holds it: the release finishes

    ops.files._closers.close_of = not_last  # type: ignore[method-assign]
    await ops.flush_closer(info.fh, me, 0)  # type: ignore[arg-type]
    handle = ops.files.get(info.fh)

    async def failing_finish(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    handle.upload.finish = failing_finish  # type: ignore[attr-defined]
    with pytest.raises(pyfuse3.FUSEError):
        await ops.release(info.fh)
    again = await ops.open(entry.st_ino, os.O_WRONLY | os.O_APPEND, me)  # type: ignore[arg-type]
    await ops.release(again.fh)


@pytest.mark.parametrize("driver", ["memory", "filesystem"])
async def test_a_rename_under_a_writer_wins_over_its_last_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, driver: str
) -> None:
    """mv uploads/sha256:X uploads/tmp while its writer closes: the writer took its new
    name only after the storage's rename (an await), so a last close in between finished
    the upload under its digest name, and the mv that came first met ENOENT."""
    ops = await make_ops(
        FilesystemDriver(tmp_path / "root") if driver == "filesystem" else InMemoryDriver()
    )
    uploads = await section(ops, "uploads")
    data = b"layer bytes"
    me = Context(os.getpid())
    name = str(digest_bytes(data)).encode()
    info, _ = await ops.create(uploads, name, 0o644, os.O_WRONLY, me)  # type: ignore[arg-type]
    await ops.write(info.fh, 0, data)

    async def last(*args: object) -> Close:
        return Close.LAST

    monkeypatch.setattr(ops.files._closers, "close_of", last)
    rename_upload = ops.tree.rename_upload

    async def slow_rename_upload(*args: object) -> None:
        await trio.sleep(0.1)  # a storage write: a label file, a remote record, an S3 PUT
        await rename_upload(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(ops.tree, "rename_upload", slow_rename_upload)
    moved: list[int] = []

    async def mv() -> None:
        await ops.rename(uploads, name, uploads, b"tmp", 0, Context(1))  # type: ignore[arg-type]
        moved.append(0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(mv)
        await trio.sleep(0.02)
        await ops.flush_closer(info.fh, me, 0)  # type: ignore[arg-type]
    await ops.release(info.fh)
    assert moved == [0]
    tmp = await ops.lookup(uploads, b"tmp", Context(1))  # type: ignore[arg-type]
    assert tmp.st_size == len(data)


@pytest.mark.parametrize("operation", ["unlink", "rename"])
async def test_rm_or_mv_of_a_tag_being_written_is_ebusy(operation: str) -> None:
    """A tag being written is found by lookup from its create on (stat shows it); rm and mv
    of it found nothing (ENOENT): they are EBUSY, as for a stored tag being written."""
    ops = await make_ops(InMemoryDriver())
    tags = await section(ops, "tags")
    await ops.create(tags, b"tmp", 0o644, os.O_WRONLY, Context(os.getpid()))  # type: ignore[arg-type]
    await ops.lookup(tags, b"tmp", Context(1))  # type: ignore[arg-type]
    with pytest.raises(pyfuse3.FUSEError) as refused:
        if operation == "unlink":
            await ops.unlink(tags, b"tmp", Context(1))  # type: ignore[arg-type]
        else:
            await ops.rename(tags, b"tmp", tags, b"v1", 0, Context(1))  # type: ignore[arg-type]
    assert refused.value.errno == errno.EBUSY


async def test_rmdir_keeps_a_lost_uploads_data(tmp_path: Path) -> None:
    """What the registry's cancel leaves (hash states of an upload without startedat) is
    nothing to rmdir; a lost upload's data is something (`regfs check` reports it and keeps
    it): rmdir deleted those bytes."""
    registry = Registry(FilesystemDriver(tmp_path))
    await registry.create_repository("org/app")
    uuid = "0f6d3a8e-6a37-4c43-9a52-2f1c8f7e5b10"
    await registry.driver.put_content(path_for(UploadData("org/app", uuid)), b"x" * 1000)
    with pytest.raises(NotEmpty):
        await registry.remove_repository("org/app")


def test_two_mounts_mkdir_at_once_keep_both(tmp_path: Path) -> None:
    """The repositories mkdir made over https:// are one file beside the upload records,
    shared by every mount of the user: each mkdir read it, then wrote it, so two at one
    moment lost one (R2's interleaving: a reads, b writes, a writes)."""
    directory, base = tmp_path / "state" / "uploads" / "host", tmp_path / "state"
    mounts = [UploadRecords(directory, base=base) for _ in range(2)]
    names = [f"org/app{i}" for i in range(60)]

    async def add(records: UploadRecords, mine: list[str]) -> None:
        for name in mine:
            await records.change_made(add=name)

    def make(records: UploadRecords, mine: list[str]) -> None:
        trio.run(add, records, mine)  # one daemon's loop each

    threads = [
        threading.Thread(target=make, args=(records, names[i::2]))
        for i, records in enumerate(mounts)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    trio.run(partial(mounts[0].change_made, drop="org/app0"))
    assert UploadRecords(directory, base=base).made() == set(names) - {"org/app0"}
