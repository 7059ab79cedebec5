"""`regfs umount` returns once the daemon's descriptors are closed: its leader thread turns
zombie while other threads still exit, holding the table they share (a disk under the
storage root stayed busy: `umount` said EBUSY right after `regfs umount` returned)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from regfs.mountpoint import exited

pytestmark = pytest.mark.storage

# The main thread leaves (pthread_exit) while another thread runs on: the leader is a
# zombie, the process and its descriptors live until that thread ends.
LEADER_LEAVES_FIRST = """
import ctypes, sys, threading, time
threading.Thread(target=lambda: (sys.stdin.read(), time.sleep(0))).start()
ctypes.CDLL(None).pthread_exit(None)
"""


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


def test_a_process_whose_leader_is_a_zombie_has_not_exited() -> None:
    child = subprocess.Popen([sys.executable, "-c", LEADER_LEAVES_FIRST], stdin=subprocess.PIPE)
    assert child.stdin is not None
    try:
        deadline = time.monotonic() + 10
        while _state(child.pid) != "Z":
            assert time.monotonic() < deadline, "the leader never left"
            time.sleep(0.01)
        assert not exited(child.pid)  # the other thread holds the descriptors
    finally:
        child.stdin.close()  # the thread reads EOF and ends: the process exits
        child.wait(timeout=10)
    assert exited(child.pid)


def test_a_pid_that_is_gone_has_exited() -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    assert exited(child.pid)
