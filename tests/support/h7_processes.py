"""Processes that stress regfs/closers.py's scan of /proc: one with many children that hold
no descriptors, one with many descriptors. Run as a script: `children N` or `descriptors N`;
it prints "ready" once set up and lives until its stdin closes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def process(kind: str, count: int) -> Iterator[int]:
    """A running `kind` process of count children or descriptors: its pid. Killed (its
    session too) at the end."""
    with subprocess.Popen(
        [sys.executable, "-P", __file__, kind, str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
    ) as child:
        try:
            assert child.stdout is not None and child.stdout.readline() == b"ready\n"
            yield child.pid
        finally:
            os.killpg(child.pid, signal.SIGKILL)


def _main(kind: str, count: int) -> None:
    if kind == "children":
        for _ in range(count):
            if os.fork() == 0:  # a child holding no descriptor at all
                os.closerange(0, os.sysconf("SC_OPEN_MAX"))
                while True:
                    signal.pause()
    else:
        held = [os.open("/dev/null", os.O_RDONLY) for _ in range(count)]
        assert held
    print("ready", flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    _main(sys.argv[1], int(sys.argv[2]))
