"""Logging for the daemon and the command line."""

from __future__ import annotations

import io
import logging
import os
import stat
import sys
from pathlib import Path

import platformdirs

FORMAT = "%(asctime)s %(levelname)s %(name)s.%(funcName)s: %(message)s"


def default_log_file() -> Path:
    return platformdirs.user_log_path("regfs") / "regfs.log"


def open_log(path: str) -> int:
    """Open a log file for appending, as the daemon (often root) may write into a directory
    others share: a symlink planted at `path` is refused (O_NOFOLLOW) rather than followed to
    its target, a FIFO or device is refused rather than written (O_NONBLOCK keeps a FIFO from
    hanging the open), a new file is 0600, and a file someone else owns is refused."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot open log file {path}: {exc.strerror}") from None
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = "not a regular file"
    elif st.st_uid != os.geteuid():
        problem = f"owned by uid {st.st_uid}, not by uid {os.geteuid()}"
    if problem:
        os.close(fd)
        raise OSError(f"log file {path} is {problem}")
    os.set_blocking(fd, True)
    return fd


class _LogFileHandler(logging.FileHandler):
    """A FileHandler that opens its file with open_log's checks."""

    def _open(self) -> io.TextIOWrapper:
        return os.fdopen(open_log(self.baseFilename), "a", encoding="utf-8")


def setup_logging(debug: bool, log_file: str | None) -> None:
    """Log to log_file (or stderr); --debug shows each FUSE operation."""
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = _LogFileHandler(log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    if not debug:
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)
    # httpx logs each request at INFO, with its URL: upload URLs carry signed state.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
