"""A namespace's children checked in bulk (`StorageDriver.present`, `StorageDriver.empty`,
split between a worker thread and the stat worker process) while that worker is stopped
(SIGSTOP) or killed mid-check: the listing must still be what a stat of each child says,
as it was before the checks went to the worker (the catalog used no worker then)."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest
import trio
from support.statworkers import stat_workers, worker_ready

from storage.catalog import Catalog
from storage.drivers import FilesystemDriver, statworker

pytestmark = pytest.mark.storage

NAMESPACE = "docker/registry/v2/repositories/many"
COUNT = 300  # past INLINE_ENTRIES: the later half goes to the worker


def plant(root: Path) -> list[str]:
    """COUNT children: every third a repository, every third empty, the rest uploads
    only (a started upload: counted); the names `Catalog.children` lists."""
    ns = root / NAMESPACE
    shown = []
    for i in range(COUNT):
        name = f"r{i:04d}"
        if i % 3 == 0:
            (ns / name / "_layers" / "sha256").mkdir(parents=True)
            shown.append(name)
        elif i % 3 == 1:
            (ns / name).mkdir(parents=True)
        else:
            up = ns / name / "_uploads" / "0123abcd-0000-0000-0000-0123456789ab"
            up.mkdir(parents=True)
            (up / "startedat").write_bytes(b"x")
            shown.append(name)
    return shown


async def stopped_worker(driver: FilesystemDriver) -> int:
    await worker_ready(driver)
    channel = driver._stat_worker._channel
    assert channel is not None and channel.worker is not None
    pid = channel.worker.pid  # this driver's (others of this process may live on)
    assert pid in stat_workers()
    os.kill(pid, signal.SIGSTOP)
    return pid


async def test_a_stopped_worker_is_given_up_and_the_thread_checks_its_half(tmp_path, monkeypatch):
    shown = plant(tmp_path)
    monkeypatch.setattr(statworker, "ANSWER_DEADLINE", 0.5)
    driver = FilesystemDriver(tmp_path)
    pid = await stopped_worker(driver)
    try:
        with trio.fail_after(20):
            assert await Catalog(driver).children("many") == shown
    finally:
        with contextlib.suppress(ProcessLookupError):  # killed when given up
            os.kill(pid, signal.SIGCONT)
        driver._stat_worker.close()


async def test_a_worker_killed_mid_check_leaves_its_half_to_the_thread(tmp_path):
    shown = plant(tmp_path)
    driver = FilesystemDriver(tmp_path)
    pid = await stopped_worker(driver)  # the request waits in its socket
    try:
        async with trio.open_nursery() as nursery:

            async def kill_when_asked() -> None:
                with trio.fail_after(10):
                    while (channel := driver._stat_worker._channel) is None or not channel.sent:
                        await trio.sleep(0.005)  # the worker's half sent to it
                os.kill(pid, signal.SIGKILL)

            nursery.start_soon(kill_when_asked)
            with trio.fail_after(20):
                listed = await Catalog(driver).children("many")
        assert listed == shown
    finally:
        driver._stat_worker.close()
