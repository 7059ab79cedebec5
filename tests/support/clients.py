"""What tests do to a mount from client processes: count the FUSE operations a --debug
daemon logged, and kill -9 a daemon under running clients (none may hang)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from .mounts import Mount, wait_until

# What a client of a killed daemon's mount is told.
DEAD = ("Transport endpoint is not connected", "Software caused connection abort")

CALL = re.compile(r" DEBUG \S+\.wrapper: (\w+)\((\d*)")


def calls_after(m: Mount, start: int, parent: Path) -> Counter[str]:
    """The FUSE operations a --debug daemon logged after byte `start` of its log; a lookup
    of a name in directory `parent` counts as `lookup in parent`."""
    inode = str(os.stat(parent).st_ino)  # the daemon's inode numbers are the mount's
    found = CALL.findall(m.log_text()[start:])
    return Counter(f"{name} in parent" if (name, first) == ("lookup", inode) else name
                   for name, first in found)  # fmt: skip


def kill_mid(m: Mount, scripts: dict[str, str], started: Callable[[], bool]) -> None:
    """Run each client script (a loop that exits 1 once the mount fails), wait until
    `started`, kill -9 the daemon: every client must fail at once with a dead connection."""
    clients = {
        what: subprocess.Popen(["bash", "-c", script], stderr=subprocess.PIPE)
        for what, script in scripts.items()
    }

    def ready() -> bool:
        early = {w: c.communicate()[1] for w, c in clients.items() if c.poll() is not None}
        assert not early, f"ended before the kill: {early}"
        return started()

    try:
        wait_until(ready, 60, "the clients to be under way")
        (pid,) = m.pids()
        os.kill(pid, signal.SIGKILL)
        for what, client in clients.items():
            try:
                _, stderr = client.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{what} still hangs on the mount of the killed daemon")
            assert any(d in stderr.decode() for d in DEAD), (what, stderr.decode())
    finally:
        for client in clients.values():
            if client.poll() is None:
                subprocess.run(["umount", "-f", m.mountpoint], capture_output=True, timeout=10)
                client.kill()
                client.wait(10)
            if client.stderr:
                client.stderr.close()


def listing_loop(directory: Path, listed: Path, flags: str = "-l") -> str:
    """A script that runs `ls flags directory` until it fails for another reason than a name
    removed between its readdir and its lstat (a dead mount), a line in `listed` per run."""
    return (
        f'while err=$(ls {flags} "{directory}" 2>&1 > /dev/null)'
        f' || ! printf "%s\\n" "$err" | grep -qv "No such file or directory"; do'
        f' echo >> "{listed}"; done; printf "%s\\n" "$err" >&2; exit 1'
    )
