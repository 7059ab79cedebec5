"""The stat worker process (storage/drivers/statworker.py): a listing's bulk stat of links and
blobs in a child process, as safe as in the daemon, gone with the daemon, and a failure of
it is EIO for that listing only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import trio
from support.mounts import exited, wait_until
from support.statworkers import put_layers, stat_workers

from storage.drivers import FilesystemDriver
from storage.drivers.bulkstat import linked_stats
from storage.paths import BlobData, BlobsDir, LayerLink, LayersDir, path_for

pytestmark = pytest.mark.mount

COUNT = 300  # more than a listing's first chunk (regfs/statahead.py), so it reads ahead


@pytest.mark.parametrize("openat2", [True, False])
async def test_the_worker_answers_as_the_driver_does_in_process(tmp_path, openat2, monkeypatch):
    root = tmp_path / "root"
    digests = put_layers(root, "a/b", COUNT)
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 1234)

    def place(location: object) -> Path:
        return root / path_for(location).lstrip("/")  # type: ignore[arg-type]

    # The planted ones: data a symlink outside, a blob directory a symlink, a link that is a
    # FIFO, a link naming another digest, a blob gone.
    data = place(BlobData(digests[3]))
    data.unlink()
    data.symlink_to(secret)
    blob_dir = place(BlobData(digests[5])).parent
    os.rename(blob_dir, tmp_path / "moved")
    blob_dir.symlink_to(tmp_path / "moved")
    fifo = place(LayerLink("a/b", digests[7]))
    fifo.unlink()
    os.mkfifo(fifo)
    place(LayerLink("a/b", digests[9])).write_bytes(str(digests[10]).encode())
    place(BlobData(digests[11])).unlink()
    planted = {3, 5, 7, 9, 11}

    driver = FilesystemDriver(root, openat2=openat2)
    links, files = path_for(LayersDir("a/b")), path_for(BlobsDir())
    link_names = [f"{d.hex}/link" for d in digests]
    targets = [str(d).encode() for d in digests]
    data_names = [f"{d.hex[:2]}/{d.hex}/data" for d in digests]
    links_fd = os.open(root / links.lstrip("/"), os.O_PATH | os.O_DIRECTORY)
    files_fd = os.open(root / files.lstrip("/"), os.O_PATH | os.O_DIRECTORY)
    resolve = driver._resolve
    expected = linked_stats(resolve, links_fd, files_fd, link_names, targets, data_names)
    os.close(links_fd)
    os.close(files_fd)
    assert [i for i, got in enumerate(expected) if got is None] == sorted(planted)

    driver._stat_worker.start()
    while not driver._stat_worker.ready:
        await trio.sleep(0.01)

    async def no_thread(*args: object) -> None:
        raise AssertionError("stated in a thread, not in the worker")

    monkeypatch.setattr(trio.to_thread, "run_sync", no_thread)
    got = await driver.linked_stats(links, link_names, targets, files, data_names)
    assert got == expected
    assert got[0] == (len(json.dumps({"n": 0, "repo": "a/b"})), got[0][1])  # type: ignore[index]
    driver._stat_worker.close()


def test_a_listing_goes_to_the_worker_which_ends_with_the_daemon(tmp_path, mount):
    root = tmp_path / "root"
    for name in ("r/one", "r/two"):
        put_layers(root, name, COUNT)
    m = mount(root)
    (pid,) = m.pids()
    first = subprocess.run(["ls", "-l", m.path("r/one/layers")], capture_output=True, text=True)
    assert first.returncode == 0 and len(first.stdout.splitlines()) == COUNT + 1
    wait_until(lambda: "stat worker" in m.log_text(), 10, "the stat worker")
    (worker,) = stat_workers(pid)
    second = subprocess.run(["ls", "-l", m.path("r/two/layers")], capture_output=True, text=True)
    assert second.returncode == 0 and len(second.stdout.splitlines()) == COUNT + 1
    assert stat_workers(pid) == [worker]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: exited(worker), 10, "the stat worker to go with the daemon")


def test_a_worker_killed_while_idle_costs_no_listing_and_the_next_starts_another(tmp_path, mount):
    root = tmp_path / "root"
    for name in ("r/one", "r/two", "r/three"):
        put_layers(root, name, COUNT)
    m = mount(root)
    (pid,) = m.pids()
    subprocess.run(["ls", "-l", m.path("r/one/layers")], capture_output=True, check=True)
    wait_until(lambda: "stat worker" in m.log_text(), 10, "the stat worker")
    (worker,) = stat_workers(pid)
    assert f"the stat worker (pid {worker}) is ready" in m.log_text()
    os.kill(worker, signal.SIGKILL)
    wait_until(lambda: "exited with status -9" in m.log_text(), 10, "the daemon to see it")
    for name in ("r/two", "r/three"):  # at once in process, then in a new worker
        again = subprocess.run(["ls", "-l", m.path(name, "layers")], capture_output=True, text=True)
        assert again.returncode == 0 and len(again.stdout.splitlines()) == COUNT + 1
    wait_until(lambda: stat_workers(pid) not in ([], [worker]), 10, "a new stat worker")
