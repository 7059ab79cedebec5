"""Review of `linked_stats` (storage/drivers/filesystem.py): a listing's links read by one
pread each, no fstat. What a hostile storage root can put where a link belongs (device
nodes, here ones without side effects: null, zero, full, random) is opened, read for at most
a digest's length + 1 bytes and only compared: never a blob stated for it, nothing hangs,
and the one-at-a-time path finds it absent too (so a listing shows the same)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import trio

from storage.drivers.base import PathNotFound
from storage.drivers.filesystem import FilesystemDriver

pytestmark = pytest.mark.storage

TARGET = b"sha256:" + b"0" * 64
DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "urandom": (1, 9)}


async def test_device_nodes_where_links_belong_state_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "root"
    (root / "l").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "b" / "data").write_bytes(b"blob")
    (root / "l" / "plain").write_bytes(TARGET)
    for name, (major, minor) in DEVICES.items():
        os.mknod(root / "l" / name, stat.S_IFCHR | 0o644, os.makedev(major, minor))
    drv = FilesystemDriver(root)
    names = ["plain", *DEVICES]
    with trio.fail_after(5):
        stated = await drv.linked_stats("/l", names, [TARGET] * len(names), "/b", ["data"] * 5)
    assert stated[0] == (4, os.stat(root / "b" / "data").st_mtime_ns)
    assert stated[1:] == [None] * len(DEVICES)
    for name in DEVICES:  # asked alone, as a listing then does: absent, and logged
        with pytest.raises(PathNotFound):
            await drv.get_content(f"/l/{name}")
        assert f"/l/{name} is of mode 20644, not a regular file" in caplog.text
