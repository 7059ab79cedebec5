"""Storage drivers, and the one function that picks one from a source string."""

from __future__ import annotations

import os
import re

from ..errors import InvalidPath
from .base import FileInfo, FileReader, FileWriter, PathNotFound, StorageDriver
from .filesystem import FilesystemDriver
from .inmemory import InMemoryDriver

__all__ = [
    "FileInfo",
    "FileReader",
    "FileWriter",
    "FilesystemDriver",
    "InMemoryDriver",
    "InvalidPath",
    "PathNotFound",
    "StorageDriver",
    "open_driver",
]

SUPPORTED_SOURCES = "a storage root directory (e.g. /srv/registry) or 'inmemory:'"


def open_driver(source: str | os.PathLike[str]) -> StorageDriver:
    """A driver for SOURCE; a scheme (`s3:`, `https:`, …) this build lacks is refused clearly.

    A path that starts like a scheme can still be given as `./name:…`.
    """
    text = os.fspath(source)
    if text == "inmemory:":
        return InMemoryDriver()
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", text):
        raise ValueError(f"unsupported source {text!r}: use {SUPPORTED_SOURCES}")
    return FilesystemDriver(text)
