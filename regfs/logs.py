"""Logging for the daemon and the command line."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import platformdirs

FORMAT = "%(asctime)s %(levelname)s %(name)s.%(funcName)s: %(message)s"


def default_log_file() -> Path:
    return platformdirs.user_log_path("regfs") / "regfs.log"


def setup_logging(debug: bool, log_file: str | None) -> None:
    """Log to log_file (or stderr); --debug shows each FUSE operation."""
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(log_file)
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
