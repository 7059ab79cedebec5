"""A remote upload's writer holds an flock on `<uuid>.lock` beside its record; a daemon
killed mid-write (kill -9) leaves the file, held by no one. A later mount resumed such an
upload as before (an flock on a file no one holds is taken at once), but a lock file whose
record is gone (killed between taking the lock and saving the record, or between deleting
the record and letting go) was kept for ever: nothing names that upload again. A lock file
no process holds is stale: the next mount's records remove it, never one a live writer
holds (another mount's)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from support.registry import RegistryServer

from storage.digests import digest_bytes
from storage.errors import Busy
from storage.remote.client import RemoteClient
from storage.remote.registry import RemoteRegistry

pytestmark = [pytest.mark.registry, pytest.mark.remote]

ORPHAN = "0f6d3a8e-6a37-4c43-9a52-2f1c8f7e5b10"  # a lock taken, its record never saved

WRITER = textwrap.dedent(
    """
    import sys, time, trio
    from pathlib import Path
    from storage.remote.client import RemoteClient
    from storage.remote.registry import RemoteRegistry

    async def main(url, state, orphan):
        source = RemoteRegistry(RemoteClient(url, timeout=10), Path(state), listing_ttl=0)
        upload = await source.repository("h3/stale").layers.upload(label="x")
        await upload.write_at(0, b"before the kill, ")
        await upload.flush()  # PATCHed, the record saved: then killed mid-write
        await source.records.lock(orphan)  # as if killed before its record was saved
        print(upload.uuid, flush=True)
        await trio.sleep(600)

    trio.run(main, *sys.argv[1:])
    """
)


def opened(url: str, state: Path) -> RemoteRegistry:
    return RemoteRegistry(RemoteClient(url, timeout=10), state, listing_ttl=0)


def names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


async def test_lock_files_a_killed_writer_left_go_and_its_upload_resumes(
    tmp_path: Path, module_registry_server: RegistryServer
) -> None:
    state = tmp_path / "state"
    url = module_registry_server.url
    with subprocess.Popen(
        [sys.executable, "-c", WRITER, url, str(state), ORPHAN],
        stdout=subprocess.PIPE,
        text=True,
        cwd="/",
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    ) as writer:
        try:
            assert writer.stdout is not None
            uuid = writer.stdout.readline().strip()
            assert uuid, "the writer did not start"
            other = opened(url, state)  # another mount meanwhile: live locks are left alone
            try:
                records = other.records.directory
                await other.catalog.is_repository("h3/stale")  # its records in use
                assert {f"{uuid}.lock", f"{ORPHAN}.lock"} <= names(records)
                with pytest.raises(Busy):
                    await other.repository("h3/stale").layers.resume(uuid)
            finally:
                await other.aclose()
        finally:
            writer.send_signal(signal.SIGKILL)
    assert {f"{uuid}.json", f"{uuid}.lock", f"{ORPHAN}.lock"} <= names(records)
    later = opened(url, state)  # the next mount
    try:
        assert await later.repository("h3/stale").layers.uploads() == [uuid]
        assert names(records) == {f"{uuid}.json"}  # no lock file no process holds
        resumed = await later.repository("h3/stale").layers.resume(uuid)
        await resumed.write_at(17, b"and after")
        data = b"before the kill, and after"
        assert (await resumed.finish(digest_bytes(data))).size == len(data)
        assert names(records) == set()
    finally:
        await later.aclose()
