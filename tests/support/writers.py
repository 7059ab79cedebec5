"""A `cp` writing an upload through a mount while a test acts beside it (`rm -r` of its
repository or namespace): the writer holds the upload open until the test lets it end."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from support.tools import ls


@contextlib.contextmanager
def cp_writing(upload: Path, fifo: Path) -> Iterator[BinaryIO]:
    """`cp FIFO upload` (upload: MOUNT/<repository>/uploads/<name>), fed 100,000 bytes and
    waited for until uploads/ lists it (4 s at most); yields the feed, which the block may
    write more into. At the block's end the feed closes, ending the copy, and cp must have
    exited 0."""
    os.mkfifo(fifo)
    cp = subprocess.Popen(["cp", str(fifo), str(upload)])
    try:
        with open(fifo, "wb") as feed:
            feed.write(os.urandom(100_000))
            feed.flush()
            for _ in range(200):  # the upload shows once cp has created it
                if upload.name in ls(upload.parent):
                    break
                threading.Event().wait(0.02)
            yield feed
    finally:
        code = cp.wait(timeout=30)
    assert code == 0
