"""A listing's tag links read in the stat worker (`bulkstat.contents`, `StatWorker.contents`):
the tags' read-ahead (`Tree._read_tags`, `Tags.read_many`) no longer reads them in a thread
that holds the GIL against the loop. As safe as in process (beneath the root, no symlink
followed, nothing over the worker's limit read), and a worker that fails costs no listing."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import trio
from support.mounts import wait_until
from support.roots import build_root, write_tags
from support.statworkers import cut_replies, stat_workers, worker_ready

from storage.drivers import FilesystemDriver, bulkstat
from storage.drivers.base import CONTENT_LIMIT
from storage.errors import CorruptEntry
from storage.paths import TagCurrentLink, TagsDir, path_for

COUNT = 300  # past INLINE_ENTRIES (64): the bulk read goes to the stat worker
NAME = "a/b"
TARGET = b"sha256:" + b"0" * 64  # what a tag's current link holds (71 bytes)


def _tags(root: Path, count: int = COUNT) -> tuple[str, list[str]]:
    """count tags of NAME whose current links hold TARGET; their directory and link names."""
    write_tags(root, NAME, TARGET.decode(), [f"t{i:03d}" for i in range(count)], index=False)
    return path_for(TagsDir(NAME)), [f"t{i:03d}/current/link" for i in range(count)]


@pytest.mark.storage
@pytest.mark.parametrize("openat2", [True, False])
async def test_the_worker_reads_tag_links_as_the_driver_does_in_process(
    tmp_path: Path, openat2: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    directory, names = _tags(root)
    outside = tmp_path / "outside"
    (outside / "current").mkdir(parents=True)
    (outside / "secret").write_bytes(TARGET[:-1] + b"1")  # a link's bytes, followed: read
    (outside / "current" / "link").write_bytes(TARGET[:-1] + b"2")

    def link(i: int) -> Path:
        return root / path_for(TagCurrentLink(NAME, f"t{i:03d}")).lstrip("/")

    # The planted ones: a link that is a symlink out of the root, a tag whose current/ is
    # one, a FIFO, a link over the worker's limit (not over CONTENT_LIMIT), none, a directory.
    link(3).unlink()
    link(3).symlink_to(outside / "secret")
    os.rename(link(5).parent, tmp_path / "moved")
    link(5).parent.symlink_to(outside / "current")
    link(7).unlink()
    os.mkfifo(link(7))
    big = TARGET + b"\n" * (bulkstat.WORKER_CONTENT + 1 - len(TARGET))
    link(9).write_bytes(big)
    link(11).unlink()
    link(13).unlink()
    link(13).mkdir()
    refused = {3, 5, 7, 11, 13}

    driver = FilesystemDriver(root, openat2=openat2)
    fd = os.open(root / directory.lstrip("/"), os.O_PATH | os.O_DIRECTORY)
    try:
        in_process = bulkstat.contents(driver._resolve, fd, names, CONTENT_LIMIT)
    finally:
        os.close(fd)
    assert [i for i, got in enumerate(in_process) if got is None] == sorted(refused)
    assert in_process[9] is not None and in_process[9][0] == big

    await worker_ready(driver)

    async def no_thread(*args: object) -> None:
        raise AssertionError("read in a thread, not in the worker")

    monkeypatch.setattr(trio.to_thread, "run_sync", no_thread)
    try:
        got = await driver.contents(directory, names)
    finally:
        driver._stat_worker.close()
    assert got is not None
    # The same, but the link over WORKER_CONTENT: None there, for the caller to ask alone.
    assert got == [None if i == 9 else found for i, found in enumerate(in_process)]
    assert got[0] == (TARGET, link(0).stat().st_mtime_ns)


@pytest.mark.storage
def test_no_file_over_the_limit_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `contents` takes a file's size from its descriptor before reading: one over the limit
    # (or no regular file) is never read, whatever it holds.
    d = tmp_path / "d"
    d.mkdir()
    (d / "small").write_bytes(TARGET)
    (d / "big").write_bytes(b"x" * (bulkstat.WORKER_CONTENT + 1))
    os.mkfifo(d / "fifo")
    reads: list[int] = []
    real_read = os.read

    def read(fd: int, size: int) -> bytes:
        reads.append(size)
        return real_read(fd, size)

    monkeypatch.setattr(bulkstat.os, "read", read)
    fd = os.open(d, os.O_PATH | os.O_DIRECTORY)
    try:
        got = bulkstat.contents(
            bulkstat.openat2, fd, ["big", "fifo", "small"], bulkstat.WORKER_CONTENT
        )
    finally:
        os.close(fd)
    assert [None if g is None else g[0] for g in got] == [None, None, TARGET]
    assert reads == [len(TARGET) + 1]


@pytest.mark.storage
async def test_a_worker_reply_of_the_wrong_length_fails_that_read_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    directory, names = _tags(root)
    driver = FilesystemDriver(root)
    await worker_ready(driver)
    cut_replies(monkeypatch)
    try:
        with pytest.raises(CorruptEntry):
            await driver.contents(directory, names)
        monkeypatch.undo()
        again = await driver.contents(directory, names)  # in a thread, or a new worker
        assert again is not None and all(again)
    finally:
        driver._stat_worker.close()


def _queued(pid: int) -> bool:
    """Whether a socket of process pid has a message waiting to be received (`ss`)."""
    out = subprocess.run(["ss", "-xpnH"], capture_output=True, text=True, check=True).stdout
    return any(f"pid={pid}," in line and int(line.split()[2]) > 0 for line in out.splitlines())


@pytest.mark.mount
def test_a_worker_killed_mid_read_ahead_costs_no_tag_listing(tmp_path, mount):
    root = tmp_path / "root"
    tags = [f"t{i:04d}" for i in range(1000)]
    for name in (NAME, "a/c"):
        image = trio.run(build_root, root, name, 1000, tags[0])
        write_tags(root, name, image["digest"], tags)
    m = mount(root)
    (pid,) = m.pids()
    wait_until(lambda: len(stat_workers(pid)) == 1, 10, "the stat worker at mount")
    (worker,) = stat_workers(pid)
    os.kill(worker, signal.SIGSTOP)
    try:
        ls = subprocess.Popen(
            ["ls", "-l", m.path(NAME, "tags")], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        wait_until(lambda: _queued(worker), 10, "the tags' read-ahead to ask the worker")
    finally:
        os.kill(worker, signal.SIGKILL)
    out, err = ls.communicate(timeout=60)
    assert ls.returncode == 0, err
    assert len(out.splitlines()) == len(tags) + 1
    # Whichever saw it first says so: the read-ahead's request, or the worker's thread.
    seen = ("the stat worker failed", "exited with status -9")
    wait_until(lambda: any(s in m.log_text() for s in seen), 10, "the daemon to see it")
    for _ in range(2):  # at once (its lookups read each link), then with a new worker
        again = subprocess.run(["ls", "-l", m.path("a/c/tags")], capture_output=True, text=True)
        assert again.returncode == 0 and len(again.stdout.splitlines()) == len(tags) + 1
    wait_until(lambda: stat_workers(pid) not in ([], [worker]), 10, "a new stat worker")
