"""The stat worker started when the daemon opens a local root (`StorageDriver.start_workers`,
called by `daemon.serve`), not at the first big listing: a fresh mount's first `ls -l` finds
it ready. A mount that never lists pays only the idle process; one whose worker cannot start
mounts and lists as before (in threads), the failure logged once."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from support.mounts import exited, wait_until
from support.statworkers import put_layers, stat_workers

from storage.drivers import FilesystemDriver
from storage.drivers.inmemory import InMemoryDriver

COUNT = 300  # past INLINE_ENTRIES and a listing's first chunk: a bulk stat of the worker's

# Put first on the daemon's PYTHONPATH (it runs `python -P`, which still imports site): the
# worker's spawn fails as a process that cannot fork would (EAGAIN), nothing else changes.
REFUSE_WORKER = """
import subprocess

_Popen = subprocess.Popen


class _NoWorker(_Popen):
    def __init__(self, args, *rest, **options):
        if any("bulkstat.py" in str(arg) for arg in args):
            raise OSError(11, "Resource temporarily unavailable (the test refuses the worker)")
        super().__init__(args, *rest, **options)


subprocess.Popen = _NoWorker
"""


def _ls_l(path: Path) -> int:
    done = subprocess.run(["ls", "-l", path], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return len(done.stdout.splitlines()) - 1  # less the total


@pytest.mark.mount
def test_a_fresh_mount_has_its_worker_before_any_listing(tmp_path, mount):
    root = tmp_path / "root"
    put_layers(root, "r/one", COUNT)
    m = mount(root)
    (pid,) = m.pids()
    # Nothing is listed, looked up or stated through the mount meanwhile.
    wait_until(lambda: "stat worker" in m.log_text(), 10, "the stat worker at mount")
    (worker,) = stat_workers(pid)
    assert f"the stat worker (pid {worker}) is ready" in m.log_text()
    assert _ls_l(m.path("r/one/layers")) == COUNT
    assert stat_workers(pid) == [worker]  # the first listing used it, started no other
    m.stop()  # a plain unmount: the worker goes with the daemon
    wait_until(lambda: exited(worker), 10, "the stat worker to go with the daemon")
    assert "exited with status" not in m.log_text()  # closed, not died


@pytest.mark.mount
def test_a_mount_whose_worker_cannot_start_mounts_and_lists_in_threads(
    tmp_path, mount, monkeypatch
):
    root = tmp_path / "root"
    for name in ("r/one", "r/two"):
        put_layers(root, name, COUNT)
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(REFUSE_WORKER)
    paths = [str(shim), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))
    m = mount(root)
    (pid,) = m.pids()
    wait_until(lambda: "stat worker did not start" in m.log_text(), 10, "the failed start")
    for name in ("r/one", "r/two"):  # within RETRY_START: no try, no log, in threads
        assert _ls_l(m.path(name, "layers")) == COUNT
    assert stat_workers(pid) == []
    assert m.log_text().count("stat worker did not start") == 1


@pytest.mark.storage
def test_only_a_local_root_has_workers_to_start(tmp_path):
    InMemoryDriver().start_workers()  # the base's: nothing to start, no failure
    driver = FilesystemDriver(tmp_path / "root")
    others = set(stat_workers())  # earlier tests' drivers' workers, in this process
    driver.start_workers()
    try:
        wait_until(lambda: driver._stat_worker.ready, 10, "the worker")
        assert len(set(stat_workers()) - others) == 1
        driver.start_workers()  # ready already: no second
        assert len(set(stat_workers()) - others) == 1
    finally:
        driver._stat_worker.close()
    wait_until(lambda: not set(stat_workers()) - others, 10, "the worker to exit")
