"""storage/ under failure: an exception or a cancellation at every step of a finish and of a
manifest push leaves a valid root, and the work can be completed afterwards."""

from __future__ import annotations

import contextlib
import json
import os

import pytest
import trio

from storage.check import Severity, check
from storage.digests import digest_bytes
from storage.drivers import FileInfo, FileReader, FileWriter, InMemoryDriver, StorageDriver
from storage.registry import Registry, Repository

pytestmark = pytest.mark.storage


class Crash(Exception):
    """Stands for the process dying at this call."""


class FaultyDriver(StorageDriver):
    """Delegates to a driver; the `fail_at`-th call raises Crash, or is cancelled."""

    name = "faulty"

    def __init__(self, inner: StorageDriver) -> None:
        self.inner = inner
        self.calls = 0
        self.fail_at = 0
        self.scope: trio.CancelScope | None = None

    async def _step(self) -> None:
        self.calls += 1
        if self.calls != self.fail_at:
            return
        if self.scope is None:
            raise Crash(f"call {self.calls}")
        self.scope.cancel()
        await trio.lowlevel.checkpoint()

    async def _get_content(self, path: str, limit: int) -> bytes:
        await self._step()
        return await self.inner.get_content(path)

    async def _put_content(self, path: str, data: bytes) -> None:
        await self._step()
        await self.inner.put_content(path, data)

    async def _reader(self, path: str) -> FileReader:
        await self._step()
        return await self.inner.reader(path)

    async def _writer(self, path: str) -> FileWriter:
        await self._step()
        return await self.inner.writer(path)

    async def _stat(self, path: str) -> FileInfo:
        await self._step()
        return await self.inner.stat(path)

    async def _list(self, path: str) -> list[str]:
        await self._step()
        return await self.inner.list(path)

    async def _move(self, source: str, dest: str) -> None:
        await self._step()
        await self.inner.move(source, dest)

    async def _delete(self, path: str) -> None:
        await self._step()
        await self.inner.delete(path)


async def assert_valid(driver: StorageDriver) -> None:
    damage = [f for f in await check(driver, verify=True) if f.severity == Severity.DAMAGE]
    # A finish cut during the final delete may leave an upload directory without its
    # startedat: harmless (the layer is linked), reported by check, never a wrong blob.
    assert [f for f in damage if f.kind != "broken-upload"] == []


async def release_writers(driver: InMemoryDriver) -> None:
    """A dead process's writers are gone, and so are their locks."""
    async for info in driver.walk("/"):
        if not info.is_dir:
            driver._file(info.path).writing = False


@pytest.mark.parametrize("mode", ["exception", "cancel"])
async def test_finish_interrupted_at_every_step(mode):
    data = os.urandom(5000)
    digest = digest_bytes(data)
    step = 1
    while True:
        inner = InMemoryDriver()
        layers = Registry(inner).repository("a/b").layers
        upload = await layers.upload()
        await upload.write(data)
        await upload.close()

        faulty = FaultyDriver(inner)
        flayers = Registry(faulty).repository("a/b").layers
        faulty.fail_at = step
        with trio.CancelScope() as scope:
            faulty.scope = scope if mode == "cancel" else None
            with contextlib.suppress(Crash):
                await (await flayers.resume(upload.uuid)).finish(digest)
        completed = faulty.calls < step  # no fault was reached: the finish ran through
        await release_writers(inner)
        await assert_valid(inner)
        if not await layers.exists(digest) or await layers.uploads():
            await (await layers.resume(upload.uuid)).finish(digest)
        async with await layers.fetch(digest) as reader:
            assert await reader.read() == data
        assert await layers.uploads() == []
        await assert_valid(inner)
        if completed:
            break
        step += 1
    assert step > 5  # the finish really was cut at each of its steps


async def manifest_of_a_config(repo: Repository) -> bytes:
    """An image manifest of a config blob pushed first, and no layer: its bytes."""
    upload = await repo.layers.upload()
    await upload.write(b"cfg")
    await upload.finish(digest_bytes(b"cfg"))
    desc = {
        "mediaType": "application/vnd.oci.image.config.v1+json",
        "digest": str(digest_bytes(b"cfg")),
        "size": 3,
    }
    return json.dumps({"schemaVersion": 2, "config": desc, "layers": []}).encode()


async def test_manifest_push_interrupted_at_every_step():
    step = 1
    while True:
        inner = InMemoryDriver()
        repo = Registry(inner).repository("a/b")
        body = await manifest_of_a_config(repo)
        faulty = FaultyDriver(inner)
        frepo = Registry(faulty).repository("a/b")
        faulty.fail_at = step
        with contextlib.suppress(Crash):
            await frepo.tags.put("v1", await frepo.manifests.put(body))
        await assert_valid(inner)
        await repo.tags.put("v1", await repo.manifests.put(body))  # a retry completes it
        assert (await repo.manifests.get(await repo.tags.get("v1"))).data == body
        if faulty.calls < step:
            break
        step += 1


async def test_retag_interrupted_at_every_step_loses_no_tag():
    # `mv tags/v1 tags/v2` (Tags.move): whatever call the process dies at, v1 or v2 (or
    # both) still names the manifest; it is never left untagged for a garbage collection.
    step = 1
    while True:
        inner = InMemoryDriver()
        repo = Registry(inner).repository("a/b")
        body = await manifest_of_a_config(repo)
        digest = await repo.manifests.put(body)
        await repo.tags.put("v1", digest)
        faulty = FaultyDriver(inner)
        faulty.fail_at = step
        with contextlib.suppress(Crash):
            assert await Registry(faulty).repository("a/b").tags.move("v1", "v2") == digest
        assert await repo.tags.lookup(digest) != [], f"no tag left at step {step}"
        if faulty.calls < step:
            assert await repo.tags.list() == ["v2"]
            break
        step += 1
