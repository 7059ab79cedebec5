"""The stat worker's start (storage/drivers/statworker.py): one worker however often a
listing asks while it starts, and one that cannot start is not tried at every listing."""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from typing import Any

import pytest
import trio
from support.statworkers import stat_workers

from storage.drivers import statworker

pytestmark = pytest.mark.storage


async def _settled(worker: statworker.StatWorker) -> None:
    """Until its starting thread is done, whichever way."""
    deadline = time.monotonic() + 10
    while worker._starting and time.monotonic() < deadline:
        await trio.sleep(0.01)
    assert not worker._starting


async def test_a_start_while_the_worker_gets_ready_starts_no_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The starting thread once cleared `_starting` before it set `_channel`: a listing's
    # start() in between spawned a second worker, which replaced the first (left running).
    spawned: list[int] = []
    real_popen, real_channel = subprocess.Popen, statworker._Channel
    in_between, go_on = threading.Event(), threading.Event()

    def popen(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        process = real_popen(*args, **kwargs)
        spawned.append(process.pid)
        return process

    def channel(sock: Any) -> statworker._Channel:  # the worker is ready: the window
        in_between.set()
        go_on.wait(10)
        return real_channel(sock)

    monkeypatch.setattr(statworker.subprocess, "Popen", popen)
    monkeypatch.setattr(statworker, "_Channel", channel)
    others = set(stat_workers())
    worker = statworker.StatWorker()
    try:
        worker.start()
        assert await trio.to_thread.run_sync(in_between.wait, 10)
        worker.start()  # the next big listing, while the first worker is being made ready
        go_on.set()
        await _settled(worker)
        await trio.sleep(0.2)
        assert worker.ready
        assert len(spawned) == 1, spawned
    finally:
        go_on.set()
        worker.close()
    deadline = time.monotonic() + 10
    while set(stat_workers()) - others and time.monotonic() < deadline:  # each exits
        await trio.sleep(0.01)


async def test_a_worker_that_cannot_start_is_not_tried_at_every_listing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    tries: list[float] = []

    def popen(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        tries.append(time.monotonic())
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(statworker.subprocess, "Popen", popen)
    worker = statworker.StatWorker()
    with caplog.at_level(logging.ERROR, logger=statworker.__name__):
        for _ in range(5):  # five big listings: stated in process, one try
            worker.start()
            await _settled(worker)
        assert len(tries) == 1
        monkeypatch.setattr(worker, "_retry_at", 0.0)  # RETRY_START later
        worker.start()
        await _settled(worker)
        assert len(tries) == 2
    assert not worker.ready
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        "the stat worker did not start"
    ]
