"""Real regfs mounts for tests: started with the real command line, always torn down.

Teardown unmounts with `regfs umount`, falls back to a lazy unmount and SIGKILL, and fails
the test if the daemon logged a traceback it did not expect.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REGFS = str(Path(sys.executable).parent / "regfs")


def is_mounted(path: Path) -> bool:
    target = os.fsencode(os.path.abspath(path)).replace(b" ", b"\\040")
    with open("/proc/mounts", "rb") as mounts:
        return any(line.split()[1] == target for line in mounts)


def regfs(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([REGFS, *args], capture_output=True, text=True, timeout=timeout)


def exited(pid: int) -> bool:
    from regfs.mountpoint import exited as gone

    return gone(pid)


def daemon_pids(mountpoint: Path) -> list[int]:
    from regfs.mountpoint import daemon_pids as find

    return find(os.path.abspath(mountpoint))


def parse_getfattr(out: str) -> dict[str, dict[str, str]]:
    """`getfattr -d --absolute-names` output → {file: {name: value}}."""
    found: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in out.splitlines():
        if line.startswith("# file: "):
            current = found.setdefault(line.removeprefix("# file: "), {})
        elif "=" in line:
            key, value = line.split("=", 1)
            current[key] = value.strip('"')
    return found


def wait_until(
    predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


@dataclass
class Mount:
    source: str
    mountpoint: Path
    log: Path
    args: list[str] = field(default_factory=list)
    allow_tracebacks: bool = False

    def __post_init__(self) -> None:
        try:
            self.mountpoint.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a killed daemon's mount: `regfs mount` cleans it up
            if exc.errno != errno.ENOTCONN:
                raise

    def start(self) -> Mount:
        result = regfs(
            "mount", *self.args, "--log", str(self.log), self.source, str(self.mountpoint)
        )
        if result.returncode != 0:
            raise AssertionError(f"regfs mount failed: {result.stderr}\n{self.log_text()}")
        assert is_mounted(self.mountpoint), "regfs mount returned before the mount was up"
        return self

    def path(self, *parts: str) -> Path:
        return self.mountpoint.joinpath(*parts)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def pids(self) -> list[int]:
        return daemon_pids(self.mountpoint)

    def stop(self) -> None:
        """Unmount whatever state the mount is in; leave no mount and no daemon."""
        pids = self.pids()
        if is_mounted(self.mountpoint):
            result = regfs("umount", str(self.mountpoint), timeout=40)
            if result.returncode != 0 or is_mounted(self.mountpoint):
                subprocess.run(
                    ["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True
                )
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not self.pids() and all(map(exited, pids)), 10, "the daemon to exit")

    def check_log(self) -> None:
        text = self.log_text()
        if not self.allow_tracebacks and "Traceback" in text:
            raise AssertionError(f"the daemon logged a traceback:\n{text[-4000:]}")

    def __enter__(self) -> Mount:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.check_log()


def hang_up(m: Mount) -> None:
    """SIGHUP, and wait until the daemon has taken it."""
    before = m.log_text().count("SIGHUP")
    for pid in m.pids():
        os.kill(pid, signal.SIGHUP)
    wait_until(lambda: m.log_text().count("SIGHUP") > before, what="the daemon to take SIGHUP")


class _FuseHandle(ctypes.Structure):
    """struct file_handle as FUSE encodes one (FILEID_INO64_GEN): the node id, high word
    first, and the generation (regfs's: 0)."""

    _fields_ = [
        ("handle_bytes", ctypes.c_uint),
        ("handle_type", ctypes.c_int),
        ("f_handle", ctypes.c_uint32 * 3),
    ]


_LIBC = ctypes.CDLL(None, use_errno=True)
_FILEID_INO64_GEN = 0x81


def kernel_inodes(m: Mount, numbers: Iterable[int]) -> int:
    """How many of these inode numbers the kernel holds an inode for in this mount, none
    other: open_by_handle_at of each one's FUSE handle finds only an inode the mount's
    superblock has (ilookup5); regfs does not ask for export support, so a missing one is
    ESTALE with no request to the daemon. It creates nothing (a held one's entry expires: the
    next path walk looks it up). Root only (CAP_DAC_READ_SEARCH). Blind to other mounts,
    unlike /proc/slabinfo."""
    held = 0
    mount_fd = os.open(m.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for number in numbers:
            words = (ctypes.c_uint32 * 3)(number >> 32, number & 0xFFFFFFFF, 0)
            handle = _FuseHandle(ctypes.sizeof(words), _FILEID_INO64_GEN, words)
            fd = _LIBC.open_by_handle_at(mount_fd, ctypes.byref(handle), os.O_PATH)
            if fd >= 0:
                os.close(fd)
                held += 1
            elif ctypes.get_errno() != errno.ESTALE:
                raise OSError(ctypes.get_errno(), f"open_by_handle_at of inode {number}")
    finally:
        os.close(mount_fd)
    return held


@contextlib.contextmanager
def mounted_at(source: str, where: Path, cache: Path, *args: str) -> Iterator[Mount]:
    """A mount of `source` whose index cache is under `cache` (XDG_CACHE_HOME); stopped and
    its log checked at the end."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(cache))
        with Mount(source, where / "mnt", where / "regfs.log", list(args)) as m:
            yield m
