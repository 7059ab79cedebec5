"""Fresh regfs mounts through the real command line, always unmounted.

A fresh mount per repetition matters: the kernel keeps a layer's pages across opens
(keep_cache) for as long as the mount lives, so only a new mount reads cold through the daemon.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from regfs.mountpoint import daemon_pids, mounted_filesystem

from .measure import BenchError

REGFS = [sys.executable, "-m", "regfs"]
_counter = itertools.count(1)


@dataclass(eq=False)
class Mount:
    """`regfs mount ROOT MNT --log LOG` on enter, `regfs umount MNT` on exit; ROOT may be a
    registry's URL (a remote mount)."""

    root: Path | str
    mountpoint: Path
    logdir: Path
    log: Path = field(init=False)
    pid: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.log = self.logdir / f"mount-{next(_counter)}.log"

    def start(self) -> Self:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.logdir.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [*REGFS, "mount", "--log", str(self.log), str(self.root), str(self.mountpoint)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        pids = daemon_pids(str(self.mountpoint))
        if result.returncode != 0 or len(pids) != 1:
            self.stop()
            raise BenchError(f"regfs mount failed: {result.stderr.strip()} (pids {pids})")
        self.pid = pids[0]
        return self

    def path(self, *parts: str) -> Path:
        return self.mountpoint.joinpath(*parts)

    def status(self, field_name: str) -> int:
        """A `kB` field of the daemon's /proc/<pid>/status (VmHWM, VmRSS), in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
        raise BenchError(f"no {field_name} in /proc/{self.pid}/status")

    def tracebacks(self) -> str:
        """The daemon log if it holds a traceback (a regfs bug worth reporting), else ''."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text[-3000:] if "Traceback" in text else ""

    def stop(self) -> None:
        """Unmount whatever state the mount is in; leave no mount and no daemon."""
        where = str(self.mountpoint)
        pids = daemon_pids(where)
        if mounted_filesystem(where) is not None:
            result = subprocess.run([*REGFS, "umount", where], capture_output=True, timeout=60)
            if result.returncode != 0 and mounted_filesystem(where) is not None:
                subprocess.run(["fusermount3", "-u", "-z", where], capture_output=True)
        deadline = time.monotonic() + 10
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if _alive(p)]
            time.sleep(0.02)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if pids and mounted_filesystem(where) is not None:  # killed after it mounted: dead mount
            subprocess.run(["fusermount3", "-u", "-z", where], capture_output=True)

    @property
    def mounted(self) -> bool:
        return mounted_filesystem(str(self.mountpoint)) is not None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False
